"""The supervised warm-up, once per seed: every arm of seed S then starts from its folder.

The warm-up depends only on the seed (given the base config: model shape, task, warm-up
settings; :data:`reclight.study.config.WARMUP_KEYS`, which no arm may change), so running it
inside each of a seed's runs would repeat identical work. Here it runs once, with the library
calls the trainer itself makes at the start of ``fit`` (``build_tiny``, ``load_causal_lm``,
``supervised_warmup``, on the base config parsed by the real CLI), and the warmed-up model is
written with ``save_pretrained``. A run then loads it as its policy
(``--model.policy.name_or_path=<folder> --model.warmup=null``); its RL-start weights are
bitwise the saved ones (``tests/study/test_study_cli.py``), and equal the weights the trainer's
own warm-up reaches for that seed.

The folder is written to a temporary sibling and renamed into place, so a killed warm-up never
leaves a half-written model that a run would load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from reclight.study.config import StudyConfig
from reclight.study.plan import base_args, parse_fit, warmup_folder

DONE = "warmup.json"


def warmup_finished(folder: Path) -> bool:
    return (folder / DONE).is_file() and (folder / "config.json").is_file()


def warm_up(cfg: StudyConfig, seed: int, log=print) -> Path:
    """Warm up seed ``seed`` on the study's base config and save the model under
    ``warmup/seed<S>/`` (reused when it is already there). Returns the folder."""
    folder = warmup_folder(cfg, seed)
    if warmup_finished(folder):
        log(f"warm-up seed{seed}: already done ({folder})")
        return folder
    from reclight.models.loading import load_causal_lm
    from reclight.models.tiny import build_tiny
    from reclight.trainer.warmup import supervised_warmup

    args = base_args(cfg, seed)
    cli = parse_fit(args, "base")
    module, data = cli.model, cli.datamodule
    if module.warmup_cfg is None:
        raise ValueError("model.warmup=None in the base config: this study has no warm-up to run")
    policy = module.policy_cfg
    start = time.perf_counter()
    # The same calls, with the same arguments, as RLModule.configure_model and on_fit_start.
    path = policy.name_or_path or str(build_tiny(policy.tiny_dir, policy.tiny, seed=module.run_seed))
    model, tokenizer = load_causal_lm(path, policy.dtype, attn_implementation=module.forward_cfg.attn_implementation)
    model.train()

    def progress(metrics: dict[str, float], step: int) -> None:
        log(f"warm-up seed{seed} step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))

    stats = supervised_warmup(model, tokenizer, data.task, module.warmup_cfg, seed=module.run_seed,
                              max_new_tokens=module.eval_max_new_tokens,
                              use_chat_template=policy.use_chat_template, log=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"seed": seed, "from": path, "base_args": args, **stats,
                  "wall_s": time.perf_counter() - start}
        (tmp / DONE).write_text(json.dumps(record, indent=1) + "\n")
        if folder.exists():  # a half-finished earlier attempt without its marker
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"warm-up seed{seed}: {stats['warmup/steps']:.0f} steps, check-set accuracy {stats['warmup/acc']:.3f}, "
        f"saved to {folder}")
    return folder
