"""benchmarks/step_floor.py's arithmetic: which calls it records, and the FLOPs it counts for them."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import step_floor  # noqa: E402


def test_forward_and_backward_products_counted_with_their_flops():
    """A linear layer with autograd: the forward is one addmm (2 m k n), the backward two mm of
    the same size (input and weight gradients); the recorded layouts replay to the same FLOPs."""
    m, k, n = 6, 5, 3
    x = torch.randn(m, k, requires_grad=True)
    w, b = torch.randn(n, k, requires_grad=True), torch.randn(n, requires_grad=True)
    rec = step_floor.MatmulRecorder()
    with rec:
        F.linear(x, w, b).sum().backward()
    names = sorted(func.overloadpacket.__name__ for (func, _, _), count in rec.calls.items() for _ in range(count))
    assert names == ["addmm", "mm", "mm"]
    seconds, flops, rows = step_floor.time_calls(rec.calls, repeats=2)
    assert flops == 3 * 2 * m * k * n and seconds > 0 and len(rows) == 3


def test_inference_mode_products_counted_whole_and_elementwise_ops_not_at_all():
    """Under inference mode ``linear`` and a batched ``matmul`` reach the dispatcher whole (as in
    the engines' decoding): each is one call with 2 x output elements x contracted size."""
    q, kt = torch.randn(4, 2, 1, 8), torch.randn(4, 2, 8, 7)
    x, w = torch.randn(3, 1, 16), torch.randn(10, 16)
    rec = step_floor.MatmulRecorder()
    with torch.inference_mode(), rec:
        torch.softmax(torch.matmul(q, kt) * 0.5, dim=-1)
        F.linear(x, w)
        F.linear(x, w)
    counts = {func.overloadpacket.__name__: c for (func, _, _), c in rec.calls.items()}
    assert counts == {"matmul": 1, "linear": 2}
    _, flops, _ = step_floor.time_calls(rec.calls, repeats=2)
    assert flops == 2 * (4 * 2 * 1 * 7) * 8 + 2 * (2 * (3 * 1 * 10) * 16)
