"""Data parallelism through Lightning's ``ddp`` strategy (2 CPU processes, gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reclight.trainer.data import RLDataModule
from reclight.tasks.arithmetic import Arithmetic

WORKER = Path(__file__).with_name("ddp_worker.py")


class _FakeTrainer:
    def __init__(self, world, rank):
        self.world_size, self.global_rank, self.max_steps = world, rank, 10


def test_prompts_shard_into_whole_groups_per_rank():
    """With W ranks, step t's B prompts split into W contiguous blocks of B/W prompts: disjoint,
    and their union (in rank order) is exactly the single-process batch. B % W != 0 is refused
    with a message naming the field, the value and what is accepted."""
    task = Arithmetic(val_size=8, test_size=8)
    single = RLDataModule(task=task, prompts_per_step=6, seed=3)
    single.trainer = None
    single.setup("fit")
    whole = single.prompt_source()
    sources = []
    for rank in range(3):
        dm = RLDataModule(task=task, prompts_per_step=6, seed=3)
        dm.trainer = _FakeTrainer(3, rank)
        dm.setup("fit")
        sources.append(dm.prompt_source())
    for step in (0, 1, 17):
        full, _ = whole.for_step(step)
        parts = [src.for_step(step)[0] for src in sources]
        assert [len(p) for p in parts] == [2, 2, 2]
        assert sum(parts, []) == full
    # the stream in admission order is the per-step view laid end to end, on every rank
    for src in [whole, *sources]:
        n = src.sampled_per_rank
        assert [src.index_at(i) for i in range(3 * n)] == sum((src.for_step(t)[0] for t in range(3)), [])
    dm = RLDataModule(task=task, prompts_per_step=6, seed=3)
    dm.trainer = _FakeTrainer(4, 0)
    with pytest.raises(ValueError, match=r"data.prompts_per_step=6 is not valid; accepted: a multiple of the 4 "
                                         r"data-parallel ranks"):
        dm.setup("fit")


def _single(out, tiny_dir, *extra):
    """The single-process reference, in this process (the worker's own code, one thread like each
    rank of the 2-process run): a subprocess would only add ~7 s of imports."""
    import ddp_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_worker.main(1, str(out), str(tiny_dir), *extra)
    finally:
        torch.set_num_threads(threads)


def _run(world, out, tiny_dir, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parents[2]), str(WORKER.parents[1])]), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(world), str(out), str(tiny_dir), *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, loss_agg, updates", [
    pytest.param("grpo", "token_mean", "1x1", marks=pytest.mark.extended),  # -m extended
    # 4 updates per batch: mini-batches {0, 2} and {1, 3} of 4 prompts. Not opmd here: its k2
    # term's gradient is (logp - logp_behav), a difference of two nearly equal numbers after the
    # first update, so the 1e-7 float noise of a different reduction order grows to ~3e-6 in the
    # last update's gradients (measured; the parameters still agree to 1e-7).
    ("rec_oneside_is", "seq_mean_token_mean", "2x2"),
    # LoRA (issue #27): only the adapter has gradients, and they are the single process's too
    pytest.param("grpo", "token_mean", "1x1 lora", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("peft") is None, reason="needs peft (the lora extra)")),
])
def test_ddp_two_processes_equal_single_process(tmp_path, algorithm, loss_agg, updates):
    """One step with strategy=ddp on 2 CPU processes (gloo) equals one step of a single process
    on the union of the ranks' data: every gradient and every parameter within 1e-6. This holds
    only because each rank normalises by the all-reduced GLOBAL token/sequence counts and scales
    its loss by the world size (DDP averages gradients): with local counts the two ranks' uneven
    token counts would weight tokens differently, and without the scale the gradient is halved.
    Gradient clipping is off so the raw gradients are compared. With 2 epochs x 2 mini-batches
    each rank's mini-batch m is its rows m, m + 2, ..., so the union over the ranks is the
    single process's mini-batch m, and the 4 updates agree as well (the gradients compared are
    the last update's)."""
    tiny = tmp_path / "tiny"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    _single(single, tiny, algorithm, loss_agg, "ddp", *updates.split())
    _run(2, ddp, tiny, algorithm, loss_agg, "ddp", *updates.split())
    ref = torch.load(single / "rank0.pt")
    for rank in (0, 1):
        got = torch.load(ddp / f"rank{rank}.pt")
        for kind in ("grads", "params"):
            assert got[kind].keys() == ref[kind].keys()
            for name, value in ref[kind].items():
                torch.testing.assert_close(got[kind][name], value, rtol=0, atol=1e-6, msg=f"{kind} {name} rank {rank}")
    # the comparison means something: the gradient is far from zero
    assert sum(g.abs().sum() for g in ref["grads"].values()) > 1e-2
    if updates.endswith("lora"):  # the adapter only; the engine got W + scaling * (B @ A)
        assert ref["grads"] and all(".lora_" in n for n in ref["grads"])
        assert ".base_layer." not in " ".join(ref["engine"]) and "model.layers.0.self_attn.q_proj.weight" in ref["engine"]


@pytest.mark.slow
def test_asynchronous_schedule_under_ddp_one_clock_per_rank(tmp_path):
    """model.clock under DDP (2 CPU processes, gloo): one clock per rank over its own share of
    the prompt stream. Every step each rank trains B / 2 groups from its block of the per-step
    prompts (the two ranks' groups are disjoint, and at step 0, before any weight moved, they are
    exactly the two blocks of step 0's prompts), its tokens' versions follow its own clock, and
    the weights stay identical on both ranks (DDP's all-reduce), so the run stays in step."""
    import json

    root = WORKER.parents[2]
    cmd = [sys.executable, "-m", "reclight", "fit", "--config", str(root / "configs/smoke_test.yaml"),
           "--config", str(root / "configs/strategy/ddp.yaml"), "--trainer.accelerator", "cpu",
           "--trainer.max_steps", "3", "--trainer.callbacks+=conftest.BatchLog", f"--trainer.callbacks.folder={tmp_path}",
           "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--data.task", "conftest.DigitTask",
           "--data.prompts_per_step", "4", "--model.sampling", "{num_samples: 3, max_new_tokens: 3}",
           "--model.policy.tiny_dir", str(tmp_path / "tiny"),
           "--model.clock", "{enabled: true, max_inflight: 3, staleness: pace, max_staleness: 1}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "tests"), str(root)]), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # in step: the same weights on both ranks
    from conftest import DigitTask

    for step in ("0", "1", "2"):
        mine = [r["steps"][step]["example_index"] for r in ranks]
        assert [len(m) for m in mine] == [2, 2] and not set(mine[0]) & set(mine[1])
    for rank, log in enumerate(ranks):  # step 0: theta_0 only, groups from the rank's own first admissions
        dm = RLDataModule(task=DigitTask(), prompts_per_step=4, seed=0)
        dm.trainer = _FakeTrainer(2, rank)
        dm.setup("fit")
        source = dm.prompt_source()
        assert set(log["steps"]["0"]["example_index"]) <= {source.index_at(i) for i in range(3)}  # 3 slots
        assert log["steps"]["0"]["versions"] == [0]


@pytest.mark.extended
def test_rollout_workers_under_ddp_are_the_in_process_run(tmp_path):
    """model.rollout.workers 1 under DDP (2 CPU processes, gloo; docs/async.md "Rollout workers"):
    one worker per rank, talking to its rank through shared memory and torch multiprocessing
    queues (no process group: Lightning's default group is the ranks' alone). Every rank's batches
    (response ids, logp_behav, rewards) and the final weights are bitwise those of the same DDP run
    with in-process rollouts. Two DDP runs, the second of four processes: 70 s on 2 loaded cores."""
    import json

    root = WORKER.parents[2]
    cmd = [sys.executable, "-m", "reclight", "fit", "--config", str(root / "configs/smoke_test.yaml"),
           "--config", str(root / "configs/strategy/ddp.yaml"), "--trainer.accelerator", "cpu",
           "--trainer.max_steps", "3", "--trainer.callbacks+=conftest.BatchLog",
           "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--data.task", "conftest.DigitTask",
           "--data.prompts_per_step", "4", "--model.sampling", "{num_samples: 3, max_new_tokens: 3}",
           "--model.policy.tiny_dir", str(tmp_path / "tiny"),
           "--model.clock", "{enabled: true, max_inflight: 3, staleness: pace, max_staleness: 1}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "tests"), str(root)]), OMP_NUM_THREADS="1")
    runs = {}
    for workers in (0, 1):
        out = tmp_path / f"workers{workers}"
        proc = subprocess.run([*cmd, f"--trainer.callbacks.folder={out}", "--model.rollout", f"{{workers: {workers}}}",
                               "--trainer.default_root_dir", str(out)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[workers] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in (0, 1):
        assert runs[1][rank] == runs[0][rank], rank
        assert (tmp_path / "workers1" / f"rollout-worker-{rank}.log").read_text().startswith("rollout worker: pid ")
    assert runs[1][0]["weights_digest"] == runs[1][1]["weights_digest"]  # DDP kept the ranks in step
    assert runs[1][0]["steps"]["2"]["digest"] != runs[1][1]["steps"]["2"]["digest"]  # each rank its own data
