"""Micro-batching uses the exact global token-count normalization: one step with
micro_batch_size=1 gives the same weights as one step over the whole batch."""

from torch.testing import assert_close

from test_module_fixtures import fit_micro


def test_micro_batches_match_full_batch(tmp_path):
    full, _, _ = fit_micro(tmp_path / "full", 1, log_kl_init=False)
    micro, _, _ = fit_micro(tmp_path / "micro", 1, log_kl_init=False, micro_batch_size=1)
    moved = 0.0
    for (name, p), q in zip(full.policy.named_parameters(), micro.policy.parameters()):
        assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    init, _, _ = fit_micro(tmp_path / "zero", 1, log_kl_init=False, lr=1e-12)
    moved = max((p - q).abs().max().item() for p, q in zip(full.policy.parameters(), init.policy.parameters()))
    assert moved > 1e-3  # the step really moved the weights (Adam at lr 3e-2)
