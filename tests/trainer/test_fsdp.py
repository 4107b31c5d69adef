"""FSDP2 through Lightning's ``ModelParallelStrategy`` on 2 CPU processes (gloo): the sharded
policy's gradients and parameters after one step equal a single process's, and the rollout
engine's weight sync gathers the full (unsharded) weights."""

import pytest
import torch

from test_ddp import _run, _single


@pytest.mark.slow
def test_fsdp2_two_processes_equal_single_process(tmp_path):
    """The DDP test's setting (fixed global rollout, each rank trains on its whole groups) under
    FSDP2: every parameter is sharded (DTensor), yet after one step the full gradients and
    parameters equal a single process's within 1e-6, on both ranks; the engine synced after the
    step holds exactly the full updated parameters on both ranks."""
    tiny = tmp_path / "tiny"
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    single.mkdir()
    fsdp.mkdir()
    # The 2-process run goes first, on a fresh tiny_dir: only rank 0 may write the model
    # (transformers' save_pretrained writes nothing on other ranks) while rank 1 waits for it.
    _run(2, fsdp, tiny, "grpo", "token_mean", "fsdp")
    _single(single, tiny, "grpo", "token_mean", "fsdp")
    ref = torch.load(single / "rank0.pt")
    assert ref["sharded"] == "Parameter"
    for rank in (0, 1):
        got = torch.load(fsdp / f"rank{rank}.pt")
        assert got["sharded"] == "DTensor"  # really sharded, not silently replicated
        for kind in ("grads", "params"):
            assert got[kind].keys() == ref[kind].keys()
            for name, value in ref[kind].items():
                torch.testing.assert_close(got[kind][name], value, rtol=0, atol=1e-6, msg=f"{kind} {name} rank {rank}")
        for name, value in got["engine"].items():  # the engine got the full, updated weights
            torch.testing.assert_close(value, ref["params"][name], rtol=0, atol=1e-6, msg=f"engine {name} rank {rank}")
    assert sum(g.abs().sum() for g in ref["grads"].values()) > 1e-2


def _cli(cwd, tiny, max_steps, *extra):
    """``reclight fit`` of the smoke config under FSDP2 on 2 CPU processes, with checkpoints."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "reclight", "fit", "--config", str(root / "configs/smoke_test.yaml"),
           "--config", str(root / "configs/strategy/fsdp.yaml"), "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy.init_args.data_parallel_size", "2",
           "--trainer.enable_checkpointing", "true", "--trainer.max_steps", str(max_steps),
           "--model.policy.tiny_dir", str(tiny), *extra]
    # PYTHONFAULTHANDLER: a crashing rank prints where it crashed (a rank 0 died once with SIGSEGV
    # while gathering the full state dict for the checkpoint, in 1 of 13 runs; not reproduced since)
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sorted(Path(cwd).rglob("*.ckpt"))


@pytest.mark.extended
@pytest.mark.slow
def test_fsdp2_cli_fit_checkpoint_and_exact_resume(tmp_path):
    """The shipped FSDP config through the real CLI on 2 CPU processes: a full checkpoint written
    by rank 0; a run resumed from the step-1 checkpoint ends on exactly the weights of a straight
    2-step run; and ``val_check_interval: 2`` (the smoke config's) works with 2 steps on 2 ranks:
    the step loader is not split between ranks (before, each rank got max_steps / 2 = 1 batch per
    epoch and Lightning refused an interval of 2)."""
    tiny = tmp_path / "tiny"
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    first = _cli(tmp_path / "a", tiny, 1, "--trainer.val_check_interval", "1")
    assert len(first) == 1
    resumed = _cli(tmp_path / "a", tiny, 2, "--trainer.val_check_interval", "1", "--ckpt_path", str(first[0]))
    straight = _cli(tmp_path / "b", tiny, 2)  # the smoke config's val_check_interval: 2
    a = torch.load([p for p in resumed if p != first[0]][0], weights_only=False)
    b = torch.load(straight[0], weights_only=False)
    assert a["global_step"] == b["global_step"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], value), name
    import csv

    with open(next((tmp_path / "b").rglob("metrics.csv"))) as f:
        val_steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("val/acc")})
    # Evaluated after the 2nd step (logged at step index 1). Under ModelParallelStrategy Lightning
    # also logs the sanity-check validation (at step 0); DDP and one process do not.
    assert val_steps[-1] == 1 and 2 not in val_steps, val_steps
