"""FSDP2 through Lightning's ``ModelParallelStrategy`` on 2 CPU processes (gloo): the sharded
policy's gradients and parameters after one step equal a single process's, and the rollout
engine's weight sync gathers the full (unsharded) weights."""

import pytest
import torch

from test_ddp import _run


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
    _run(1, single, tiny, "grpo", "token_mean", "fsdp")
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
