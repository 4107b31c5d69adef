"""Prompt + response must fit the model's positions (issue #17, item 3).

Before: never checked. On the 64-position tiny model GSM8K trained silently past the context
(RoPE extrapolates); a GPT-2-style model crashed with ``IndexError`` in its position embedding;
a 200k-character question tried to allocate 40 GB; ``max_new_tokens: 100000`` generated for
minutes (that one is a config error now: ``test_bad_input.py``'s ``max_new_tokens 100000``).
Now the response caps are checked against ``max_position_embeddings`` at set-up, and each prompt
longer than the rest is dropped or cut from the left (``data.long_prompts``), and counted.
"""

import csv
import json

import pytest

from conftest import MICRO, micro_module, micro_trainer
from reclight.models.tiny import build_tokenizer
from reclight.tasks import GSM8K, DataError
from reclight.tasks.jsonl import held_out_indices
from reclight.trainer.cli import main
from reclight.trainer.data import RLDataModule
from test_bad_input import fit_args

SHORT = [f"{a}+{b}" for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (4, 4)]]
LONG = ["Natalia sold clips to 48 of her friends in April, and then half as many in May. " * 3,
        "How many? " * 20_000]  # the second one: a 200,000-character question


def gsm8k(tmp_path, questions, template="{question}="):
    data = tmp_path / "gsm8k"
    data.mkdir(exist_ok=True)
    rows = [json.dumps({"question": q, "answer": "#### 3"}) for q in questions]
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    (data / "test.jsonl").write_text(rows[0] + "\n")
    # the split seed whose one held-out (val) row is a short question (SHORT comes first)
    seed = next(s for s in range(100) if len(questions[held_out_indices(len(questions), 1, s)[0]]) < 10)
    return GSM8K(data_dir=str(data), val_size=1, prompt_template=template, seed=seed)


def fit(tmp_path, task, long_prompts, steps=2, **kw):
    module = micro_module(tmp_path, **kw)  # 32 positions, max_new_tokens 3: prompts of <= 29 tokens
    dm = RLDataModule(task=task, prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0, long_prompts=long_prompts)
    micro_trainer(tmp_path, steps).fit(module, datamodule=dm)
    return module, dm


def test_over_long_prompts_are_dropped_and_counted(tmp_path):
    task = gsm8k(tmp_path, SHORT + LONG)
    module, dm = fit(tmp_path, task, "drop")
    n_train = len(task.examples("train"))
    long_in_train = sum(len(e.prompt) > 29 for e in task.examples("train"))
    assert long_in_train == 2 - sum(len(e.prompt) > 29 for e in task.examples("val"))
    src = module.prompts  # the data as the module sees it (RLDataModule.prompt_source)
    assert src is dm.source
    assert len(src.train) == n_train - long_in_train and src.counts["train"] == long_in_train
    assert all(len(e.prompt) <= 29 for e in list(src.train) + list(src.examples_of("val")))
    assert module.trainer.global_step == 2


def test_truncate_left_keeps_the_end_of_each_prompt(tmp_path):
    """The char tokenizer makes one token per character: a cut prompt is the last 29 characters
    of the original (its end, where the templates put the instruction)."""
    task = gsm8k(tmp_path, SHORT + LONG, template="{question} Answer after ####:")
    module, dm = fit(tmp_path, task, "truncate_left")
    originals = {e.uid: e.prompt for e in task.examples("train")}
    src = module.prompts
    cut = [e for e in src.train if e.prompt != originals[e.uid]]
    assert len(cut) == src.counts["train"] >= 1 and len(src.train) == len(originals)
    for e in cut:
        assert e.prompt == originals[e.uid][-29:] and e.prompt.endswith(" Answer after ####:")
    assert module.trainer.global_step == 2


def test_every_prompt_too_long_is_an_error_naming_the_budget(tmp_path):
    """GSM8K's own template on the 64-position tiny model (the smoke config): every prompt is
    longer than the 59 positions max_new_tokens 5 leaves, so nothing is left to train on."""
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"question": f"{LONG[0]}({i})", "answer": "#### 3"}) + "\n"
                                              for i in range(4)))  # distinct: repeats are dropped; 1 val, 1 check
    (data / "test.jsonl").write_text(json.dumps({"question": LONG[0], "answer": "#### 3"}) + "\n")
    with pytest.raises(DataError) as e:
        main(fit_args(tmp_path, "--data.task", "reclight.tasks.GSM8K", "--data.task.init_args.data_dir", str(data),
                      "--data.task.init_args.val_size", "1", "--data.prompts_per_step", "2"))
    shortest = len(GSM8K(data_dir=str(data), val_size=1).examples("train")[0].prompt)  # one token per character
    assert str(e.value) == (
        "data.long_prompts=drop: all 2 train prompts are longer than 59 tokens (the model's 64 positions minus "
        f"max_new_tokens 5; the shortest has {shortest}); accepted: a model with more positions, smaller "
        "max_new_tokens, shorter prompts, or data.long_prompts: truncate_left")


@pytest.fixture
def gpt2(tmp_path):
    """A GPT-2-style model (learned positions: 32 of them) built from a config and saved, as a
    model folder a user would pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_gpt2_style_model_response_cap_is_checked_against_its_positions(tmp_path, gpt2):
    """Before: IndexError in the position embedding, after the model was loaded and generating."""
    with pytest.raises(ValueError) as e:
        main(fit_args(tmp_path, "--model.policy.name_or_path", str(gpt2), "--model.sampling.max_new_tokens", "40"))
    assert str(e.value) == (f"model.sampling.max_new_tokens=40 is not valid; accepted: at most 31 with the model "
                            f"{str(gpt2)!r}: it has 32 positions (max_position_embeddings) for the prompt and the "
                            "response together")


def test_gpt2_style_model_trains_with_its_long_prompts_dropped_and_logged(tmp_path, gpt2):
    task = gsm8k(tmp_path, SHORT * 2 + LONG)
    cli = main(["fit", "--config", str(fit_args(tmp_path)[2]), "--model.policy.tiny_dir", str(tmp_path / "tiny"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--model.policy.name_or_path", str(gpt2),
                "--data.task", "reclight.tasks.GSM8K", "--data.task.init_args.data_dir", task.data_dir,
                "--data.task.init_args.val_size", "1", "--data.task.init_args.prompt_template", "{question}=",
                "--data.task.init_args.seed", str(task.seed),
                "--data.prompts_per_step", "2"])
    assert cli.trainer.global_step == 2
    src = cli.model.prompts
    assert all(len(e.prompt) <= 32 - 5 for e in src.train) and sum(src.counts.values()) == 2
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        dropped = [float(r["prompts/dropped"]) for r in csv.DictReader(f) if r["prompts/dropped"]]
    assert dropped == [2.0]  # logged once, with the start-of-RL evaluation (step 0)
