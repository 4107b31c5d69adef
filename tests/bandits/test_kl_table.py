"""The exact estimator table: the on-policy identities of docs/algorithms.md section 6.3, exactly (float64,
enumerated outcomes), and what breaks off-policy without importance weighting."""

import math

import pytest
import torch
from torch.testing import assert_close

from bandits.kl_table import exact_kl_gradients, expected_kl_gradient, kl_estimator_table

F64 = torch.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_policy_identities(seed):
    """E_pi[grad k1] = 0, E_pi[grad k2] = grad KL(pi||ref), E_pi[grad k3] = grad KL(ref||pi); the
    same with samples from any mu once importance-weighted by pi/mu."""
    g = torch.Generator().manual_seed(seed)
    theta, ref, behav = (torch.randn(5, generator=g, dtype=F64) for _ in range(3))
    logp_ref, mu = torch.log_softmax(ref, -1), torch.softmax(behav, -1)
    fwd, rev = exact_kl_gradients(theta, logp_ref)
    for sampler, weighted in ((None, False), (mu, True)):
        assert_close(expected_kl_gradient(theta, logp_ref, sampler, "k1", weighted), torch.zeros(5, dtype=F64),
                     rtol=0, atol=1e-14)
        assert_close(expected_kl_gradient(theta, logp_ref, sampler, "k2", weighted), fwd, rtol=0, atol=1e-14)
        assert_close(expected_kl_gradient(theta, logp_ref, sampler, "k3", weighted), rev, rtol=0, atol=1e-14)


def test_exact_kl_gradients_by_hand():
    """softmax gradients: grad KL(pi||ref) = pi * (log pi - log ref - KL(pi||ref));
    grad KL(ref||pi) = pi - ref."""
    theta = torch.tensor([0.3, -0.2, 1.0], dtype=F64)
    logp_ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5], dtype=F64), -1)
    pi = torch.softmax(theta, -1)
    kl = (pi * (pi.log() - logp_ref)).sum()
    fwd, rev = exact_kl_gradients(theta, logp_ref)
    assert_close(fwd, pi * (pi.log() - logp_ref - kl), rtol=0, atol=1e-15)
    assert_close(rev, pi - logp_ref.exp(), rtol=0, atol=1e-15)


def test_table_rows_say_which_kl_each_gradient_follows():
    rows = {(r["estimator"], r["weighting"], r["sampling"]): r for r in kl_estimator_table()}
    assert len(rows) == 12
    assert rows[("k2", "plain", "on-policy")]["relerr_forward"] < 1e-12
    assert rows[("k3", "plain", "on-policy")]["relerr_reverse"] < 1e-12
    assert rows[("k3", "plain", "on-policy")]["relerr_forward"] > 0.1  # k3's gradient is NOT the forward KL's
    assert math.isnan(rows[("k1", "plain", "on-policy")]["cos_forward"])  # zero: no direction
    for est in ("k1", "k2", "k3"):  # off-policy without weighting: biased for both KLs
        r = rows[(est, "plain", "off-policy")]
        assert r["relerr_forward"] > 0.1 and r["relerr_reverse"] > 0.1, est
        assert rows[(est, "importance-weighted", "off-policy")]["relerr_forward"] == pytest.approx(
            rows[(est, "plain", "on-policy")]["relerr_forward"], abs=1e-12)
