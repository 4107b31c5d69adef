"""Micro-batches side by side on threads (``model.train_forward.threads``,
reclight/kernels/threads.py): the same bits as running them in turn, at one intra-op thread.

Why bitwise and not "close": each piece's gradient is computed by the same kernels on the same
rows whichever thread runs it, and the pieces' gradients are added in piece order on the calling
thread, the fold ``backward()`` makes piece after piece (``g0``, then ``+ g1``). So the only
freedom threads have is WHEN a piece runs, never how its numbers are formed. At one intra-op
thread per op a matrix product's rounding does not depend on the thread that runs it."""

import threading

import lightning.pytorch as pl
import pytest
import torch
from conftest import MICRO, fit_micro

import reclight.trainer.module as module_lib
import reclight.trainer.warmup as warmup_lib
from reclight.models.loading import load_causal_lm
from reclight.models.tiny import build_tiny
from reclight.trainer.config import TrainForwardConfig
from reclight.kernels.threads import MicroBatchThreads, resolve_threads, usable_threads
from reclight.trainer.warmup import WarmupConfig


@pytest.fixture
def one_intra_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_pieces_on_threads_fold_their_gradients_like_backward_in_turn(one_intra_thread):
    """Three pieces of a 12-row batch, each loss its share of the batch's sum (divided by 12): on
    2 threads the gradients are bitwise those of three ``backward()`` calls in turn, including onto
    a gradient already there (accumulation across calls), and within fp32 rounding of the whole
    batch's gradient (a 12-term sum regrouped: relative error ~1e-7)."""
    x, y = torch.randn(12, 6, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 3
    pieces = [slice(0, 5), slice(5, 9), slice(9, 12)]

    def loss_of(model, rows):
        return torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum") / 12

    in_turn, threaded, whole = _mlp(), _mlp(), _mlp()
    for model in (in_turn, threaded):  # a gradient already there, as after a first micro-batch
        loss_of(model, slice(0, 12)).backward()
    for rows in pieces:
        loss_of(in_turn, rows).backward()
    runner = MicroBatchThreads(2)
    seen = []

    def piece(rows):
        seen.append(threading.current_thread().name)
        loss = loss_of(threaded, rows)
        return loss, loss.detach()

    outs = runner.backward(piece, pieces, list(threaded.parameters()))
    runner.close()
    assert any(name.startswith("reclight-micro") for name in seen)  # really on the pool's threads
    for p, q in zip(in_turn.parameters(), threaded.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert torch.equal(sum(outs), sum(loss_of(whole, r).detach() for r in pieces))  # outputs in piece order
    loss_of(whole, slice(0, 12)).backward()
    for p, q in zip(in_turn.parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-6, atol=1e-7)


def test_threads_carry_grad_mode_and_autocast_and_restore_the_intra_op_count(one_intra_thread):
    torch.set_num_threads(2)  # 2 intra-op threads: the pieces get 2 // 2 = 1 each
    runner = MicroBatchThreads(2)
    state = lambda _: (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),  # noqa: E731
                       torch.get_autocast_dtype("cpu"), torch.get_num_threads(), threading.current_thread().name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inside = runner.map(state, [0, 1])
    plain = runner.map(state, [0, 1])
    runner.close()
    assert [s[:4] for s in inside] == [(False, True, torch.bfloat16, 1)] * 2
    assert [s[:2] for s in plain] == [(True, False)] * 2
    assert all(s[4].startswith("reclight-micro") for s in inside + plain)
    assert torch.get_num_threads() == 2


class Metrics(pl.Callback):
    """Every logged metric of each step, timings left out (they are wall-clock)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()
                           if not k.endswith("_s") and "tok_s" not in k})


def _fit(tmp_path, threads, monkeypatch):
    """A 3-step fit of the micro model with a 4-step warm-up: the fused forward, 2 prompts a step
    in micro-batches of 1, the warm-up's 8 examples in pieces of 3 (3, 3, 2), kl/init (a
    forward-only pass over the micro-batches) every step; which threads ran the forwards."""
    names = []
    for lib in (module_lib, warmup_lib):
        real = lib.response_logprobs

        def spy(*args, real=real, **kwargs):
            names.append(threading.current_thread().name)
            return real(*args, **kwargs)

        monkeypatch.setattr(lib, "response_logprobs", spy)
    warmup = WarmupConfig(target_accuracy=1.0, max_steps=4, batch_size=8, micro_batch_size=3, check_every=100,
                          check_size=4)
    rec = Metrics()
    module, _ = fit_micro(tmp_path, 3, callbacks=[rec], warmup=warmup,
                          train_forward=TrainForwardConfig(impl="fused", micro_batch_size=1, threads=threads))
    monkeypatch.undo()
    return module, rec, names


def test_a_fit_on_two_threads_is_bitwise_the_fit_in_turn(tmp_path, monkeypatch, one_intra_thread):
    if usable_threads(2) < 2:
        pytest.skip("one usable core: threads are capped at 1")
    one, rec1, names1 = _fit(tmp_path / "one", 1, monkeypatch)
    two, rec2, names2 = _fit(tmp_path / "two", 2, monkeypatch)
    assert two.micro_threads.threads == 2 and one.micro_threads.threads == 1
    assert not any(n.startswith("reclight-micro") for n in names1)
    # the warm-up's pieces, the trained and the kl/init forwards all ran on the pool
    assert sum(n.startswith("reclight-micro") for n in names2) >= 4 * 3 + 3 * 2 * 2
    for p, q in zip(one.policy.parameters(), two.policy.parameters()):
        assert torch.equal(p, q)
    assert len(rec1.steps) == 3 and rec1.steps == rec2.steps and "loss/policy" in rec1.steps[0]
    init, _ = load_causal_lm(str(build_tiny(tmp_path / "one" / "tiny", MICRO, seed=0)))  # the fit trains
    assert max((p - q).abs().max().item() for p, q in zip(one.policy.parameters(), init.parameters())) > 1e-3


def test_threads_are_refused_where_they_would_change_or_not_help():
    cpu = dict(device=torch.device("cpu"), world_size=1, strategy="SingleDeviceStrategy", compiled=False)
    assert resolve_threads(1, **cpu) == 1
    assert resolve_threads(2, **cpu) == min(2, usable_threads(2))
    bad = [({"device": torch.device("cuda")}, r"the CPU \(this run trains on cuda"),
           ({"world_size": 2}, r"a single process \(this run has 2: DDP"),
           ({"strategy": "FSDPStrategy"}, r"an unsharded model \(this run's strategy is FSDPStrategy\)"),
           ({"compiled": True}, r"model.train_forward.compile: false"),
           ({"dropout": "model.policy.lora.dropout=0.05"}, r"a forward without random draws \(this run has "
                                                          r"model.policy.lora.dropout=0.05")]
    for change, why in bad:
        with pytest.raises(ValueError, match=r"model.train_forward.threads=2 is not valid; accepted: 1, or > 1 only "
                                             r"with " + why):
            resolve_threads(2, **{**cpu, **change})
        assert resolve_threads(1, **{**cpu, **change}) == 1
    with pytest.raises(ValueError, match=r"model.train_forward.threads=2 is not valid; accepted: 1 while "
                                         r"model.train_forward.micro_batch_size is null"):
        TrainForwardConfig(threads=2)
    with pytest.raises(ValueError, match=r"model.train_forward.threads=0 is not valid"):
        TrainForwardConfig(threads=0, micro_batch_size=4)
    with pytest.raises(ValueError, match=r"model.warmup.micro_batch_size=0 is not valid"):
        WarmupConfig(micro_batch_size=0)
