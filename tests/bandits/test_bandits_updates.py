"""Several updates per batch and the proximal anchor on the bench (docs/algorithms.md sections 6.1-6.2)."""

import torch

from bandits.problems import bandit_problem
from bandits.simulate import run_preset
from reclight.algorithms import get_algorithm

F64 = torch.float64


def _run(preset, settings, **kw):
    problem = bandit_problem(4, 5, [0, 1, 2], "bernoulli")
    init = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    cfg = get_algorithm(preset, **kw.pop("overrides", {}))
    return run_preset(problem, cfg, preset, settings, init, steps=6, group_size=4, lr=0.3, seed=0, **kw)


def test_on_policy_clipping_acts_only_with_several_updates():
    """One update per batch on-policy: rho = 1 exactly, nothing is clipped and IS = NoIS (same
    curves, bitwise). Four updates (2 epochs x 2 mini-batches of the 4 groups): later updates see
    rho != 1, the mask fires, and IS differs from NoIS."""
    on = {"on_policy": (1, 0)}
    one_is, one_nois = _run("rec_oneside_is", on), _run("rec_oneside_nois", on)
    assert one_is.history["clip/frac"].abs().max() == 0
    assert torch.equal(one_is.history["reward/expected"], one_nois.history["reward/expected"])
    assert torch.equal(one_is.history["ratio/max"], torch.ones_like(one_is.history["ratio/max"]))
    four_is = _run("rec_oneside_is", on, epochs=2, mini_batches=2)
    four_nois = _run("rec_oneside_nois", on, epochs=2, mini_batches=2)
    assert four_is.history["clip/frac"].max() > 0 and four_is.history["ratio/max"].max() > 1.2
    assert not torch.equal(four_is.history["reward/expected"], four_nois.history["reward/expected"])


def test_proximal_anchor_equals_behaviour_anchor_on_policy_and_not_off_policy():
    """On-policy the proximal policy IS the behaviour policy (same logits), so the decoupled
    loss with truncation is exactly the behaviour-anchored one; with a lag of 2 steps they differ."""
    over = {"ratio_anchor": "proximal", "behavior_correction": "truncate"}
    for settings, same in (({"on_policy": (1, 0)}, True), ({"lag": (1, 2)}, False)):
        behav = _run("rec_oneside_is", settings, epochs=1, mini_batches=2)
        prox = _run("rec_oneside_is", settings, epochs=1, mini_batches=2, overrides=over)
        close = torch.allclose(behav.history["reward/expected"], prox.history["reward/expected"], rtol=0, atol=1e-12)
        assert close == same, settings
