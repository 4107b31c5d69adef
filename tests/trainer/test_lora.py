"""LoRA through peft (issue #27; docs/lora.md): the seeded adapter, merged weights for the
readers of raw weights (fused training forward, fast engine), ``logp_behav`` against the trainer's,
the reference as the base with the adapter disabled, the adapter-only checkpoint, bad input."""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("peft")

from conftest import MICRO, DigitTask, fit_micro, micro_module  # noqa: E402
from reclight.algorithms import PRESETS  # noqa: E402
from reclight.engines.base import SamplingConfig  # noqa: E402
from reclight.engines.config import EngineConfig  # noqa: E402
from reclight.engines.fast import FastLlamaEngine  # noqa: E402
from reclight.engines.hf import HFGenerateEngine  # noqa: E402
from reclight.models.forward import enable_checkpointing, is_checkpointing, response_logprobs  # noqa: E402
from reclight.models.loading import load_causal_lm  # noqa: E402
from reclight.models.lora import (  # noqa: E402
    LoraConfig,
    adapter_disabled,
    adapter_state,
    attach_lora,
    base_sha256,
    effective_weights,
    is_adapter,
    plain_copy,
)
from reclight.models.tiny import build_tiny  # noqa: E402
from reclight.models.tokens import encode_prompts  # noqa: E402
from reclight.trainer.config import PolicyConfig, TrainForwardConfig, UpdatesConfig  # noqa: E402
from reclight.trainer.warmup import WarmupConfig  # noqa: E402

PROMPTS = ["1+2=", "123+45=", "9=", "77+8="]
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0)


def _policy(tmp_path, lora=LORA, **kw):
    return PolicyConfig(tiny=MICRO, tiny_dir=str(tmp_path / "tiny"), lora=lora, **kw)


def _lora_model(tmp_path, seed=0, trained=True):
    """The micro model with an adapter; ``trained``: B set to random values (a trained adapter),
    so the adapter really changes the model."""
    model, tok = load_causal_lm(str(build_tiny(tmp_path / "tiny", MICRO, seed=3)))
    attach_lora(model, LORA, seed=seed)
    if trained:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


# -- the adapter ------------------------------------------------------------------------------------
def test_adapter_is_seeded_by_the_run_seed_starts_at_zero_and_leaves_the_global_rng(tmp_path):
    """Same seed: the same adapter bitwise, whatever the global RNG did before (TRL issue 6688);
    another seed: another A. B = 0, so the adapted model's outputs are the base's bitwise. Only
    the adapter is trainable, and attaching draws nothing from the global RNG."""
    path = str(build_tiny(tmp_path / "tiny", MICRO, seed=3))
    base, _ = load_causal_lm(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = base(ids).logits
    models = []
    for seed, global_seed in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        m, _ = load_causal_lm(path)
        attach_lora(m, LORA, seed=seed)
        assert torch.equal(torch.get_rng_state(), before)
        models.append(adapter_state(m))
        assert torch.equal(m(ids).logits, ref)  # B = 0: the base model exactly
        assert {n for n, p in m.named_parameters() if p.requires_grad} == set(models[-1])
    same, other = models[1], models[2]
    assert len(models[0]) == 2 * len(LORA.target_modules) * MICRO.num_layers
    for name, t in models[0].items():
        assert torch.equal(same[name], t), name
        if ".lora_B." in name:
            assert not t.any(), name
        else:
            assert t.abs().max() > 0 and not torch.equal(other[name], t), name


def test_off_changes_nothing(tmp_path):
    """LoRA off (even with non-default LoRA fields): the run is bitwise the run without the
    group, the policy has no adapter, and the checkpointed weights are the full model."""
    a, _ = fit_micro(tmp_path / "a", 2)
    off = LoraConfig(enabled=False, rank=2, alpha=3.0, target_modules=("q_proj",))
    b, _ = fit_micro(tmp_path / "b", 2, policy=_policy(tmp_path / "b", lora=off))
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys() and not any(is_adapter(k) for k in sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert b._init_policy is not None  # the frozen reference copy, as before


# -- merged weights: fused forward and engines ---------------------------------------------------
def _batch(tok, K=3, T=6, seed=0):
    ids, mask = encode_prompts(tok, PROMPTS)
    g = torch.Generator().manual_seed(seed)
    B = ids.shape[0]
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    lengths[0, 0] = T
    rmask = torch.arange(T) < lengths[..., None]
    return ids, mask, torch.randint(3, len(tok), (B, K, T), generator=g).masked_fill(~rmask, tok.pad_token_id), rmask


def _logp_and_grads(model, batch, impl, checkpointing=False):
    model.zero_grad(set_to_none=True)
    logp, ent = response_logprobs(model, *batch, temperature=0.8, return_entropy=True, impl=impl,
                                  checkpointing=checkpointing)
    a = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    (a * logp).sum().add((0.3 * ent).sum()).backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_forward_reads_the_adapter_same_logp_and_adapter_gradients_as_hf(tmp_path):
    """The fused forward reads W + scaling * (B @ A), with autograd into A and B: its log-probs
    and adapter gradients equal the HF forward through peft's layers (fp32, 1e-5 as for the full
    model); the base gets no gradient. With the adapter disabled both give the base's log-probs."""
    model, tok = _lora_model(tmp_path)
    batch = _batch(tok)
    hf = _logp_and_grads(model, batch, "hf")
    fused = _logp_and_grads(model, batch, "fused")
    assert_close(fused[0], hf[0], rtol=0, atol=1e-5)
    assert set(hf[1]) == set(fused[1]) == {n for n, _ in model.named_parameters() if is_adapter(n)}
    for name, g in hf[1].items():
        assert g.abs().max() > 0, name
        assert_close(fused[1][name], g, rtol=1e-4, atol=1e-5, msg=name)
    plain = plain_copy(model)  # the merged model: what the engines hold
    with torch.no_grad():
        assert_close(response_logprobs(plain, *batch, temperature=0.8)[0], hf[0], rtol=0, atol=1e-5)
        with adapter_disabled(model):
            base = response_logprobs(model, *batch, temperature=0.8)[0]
            base_fused = response_logprobs(model, *batch, temperature=0.8, impl="fused")[0]
        assert (base - hf[0]).abs().max() > 1e-3  # the adapter matters
        assert_close(base_fused, base, rtol=0, atol=1e-5)
    assert all(p.requires_grad == is_adapter(n) for n, p in model.named_parameters())  # restored


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_logp_behav_equals_the_trainers_with_a_trained_adapter(tmp_path, engine):
    """The engines receive merged weights: the sampling-time log-probs equal the trainer's
    (HF forward through peft's layers, and the fused one) in fp32 to 1e-5, as for the full model."""
    model, tok = _lora_model(tmp_path)
    sampling = SamplingConfig(num_samples=3, max_new_tokens=6, temperature=0.7)
    eng = FastLlamaEngine(model, tok, sampling) if engine == "fast" else HFGenerateEngine(model, tok, sampling)
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=11)
    assert gen.response_mask.sum() > 12
    with torch.no_grad():
        for impl in ("hf", "fused"):
            logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=0.7,
                                        impl=impl)
            assert_close(logp, gen.logp_behav, rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_engine_state_is_in_adapter_form_and_restores_bitwise(tmp_path, engine):
    """The engine's checkpoint state holds the adapter its weights were merged from, not the
    weights; loading it into a fresh engine re-merges bitwise the same weights."""
    model, tok = _lora_model(tmp_path)
    sampling = SamplingConfig(num_samples=2, max_new_tokens=3)
    make = FastLlamaEngine if engine == "fast" else HFGenerateEngine
    eng = make(model, tok, sampling)
    eng.update_weights(model, 4)
    state = eng.state_dict()
    assert "weights" not in state and set(state["adapter"]) == set(adapter_state(model)) and state["version"] == 4
    weights = dict(eng.weights) if engine == "fast" else eng.model.state_dict()
    weights = {k: v.clone() for k, v in weights.items()}
    with torch.no_grad():  # the trainer moves on; the saved state keeps version 4's adapter
        for n, p in model.named_parameters():
            if is_adapter(n):
                p.add_(1.0)
    fresh = make(model, tok, sampling)
    fresh.load_state_dict(state)
    got = fresh.weights if engine == "fast" else fresh.model.state_dict()
    assert fresh.version == 4
    for k, v in weights.items():
        assert torch.equal(got[k], v), k


# -- the trainer ------------------------------------------------------------------------------------
class _StartCopy(__import__("lightning").pytorch.Callback):
    """The RL-start policy as a plain model (merged weights), and the adapter and base then."""

    def on_train_start(self, trainer, module):
        self.start = plain_copy(module.policy).eval()
        self.adapter = adapter_state(module.policy)
        self.base = {n: p.detach().clone() for n, p in module.policy.named_parameters() if not is_adapter(n)}


def test_reference_is_the_base_with_the_adapter_disabled_equal_to_the_rl_start_policy(tmp_path):
    """With LoRA the warm-up trains the base (adapter disabled) and leaves the adapter at B = 0,
    so the adapter-disabled model is the RL-start policy: after RL steps its log-probs equal a
    copy of the RL-start policy bitwise, and kl/init (grpo_kl's k3 reference term too) is computed
    against it. No frozen copy is kept."""
    from conftest import Capture

    start, cap = _StartCopy(), Capture()
    warm = WarmupConfig(max_steps=3, check_every=2, check_size=4, batch_size=8, target_accuracy=1.0)
    tiny_before = load_causal_lm(str(build_tiny(tmp_path / "tiny", MICRO, seed=0)))[0]
    module, _ = fit_micro(tmp_path, 3, policy=_policy(tmp_path), warmup=warm, algorithm="grpo_kl",
                          callbacks=[start, cap])
    assert module._init_policy is None
    # the warm-up trained the base, not the adapter (B = 0 at the start of RL)
    moved = [n for n, p in tiny_before.named_parameters()
             if not torch.equal(p, start.base[n.replace("_proj.weight", "_proj.base_layer.weight")])]
    assert moved
    assert all(not t.any() for n, t in start.adapter.items() if ".lora_B." in n)
    # RL trained the adapter only
    after = dict(module.policy.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in start.base.items())
    assert any(not torch.equal(after[n], t) for n, t in start.adapter.items())
    batch = cap.batches[2]
    with torch.no_grad():
        args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        with adapter_disabled(module.policy):
            ref = response_logprobs(module.policy, *args)[0]
        expected = response_logprobs(start.start, *args)[0]
        now = response_logprobs(module.policy, *args)[0]
    assert torch.equal(ref, expected)
    assert (now - ref)[batch.response_mask].abs().max() > 1e-4  # the adapter moved the policy away from it
    assert cap.metrics[0]["kl/init"] == pytest.approx(0.0, abs=1e-6)  # step 0: the policy is the reference
    assert cap.metrics[2]["kl/init"] > 0


@pytest.mark.slow
def test_every_preset_and_several_updates_train_the_adapter(tmp_path):
    """One step of every preset (and 2 epochs x 2 mini-batches of one) trains the adapter: B
    leaves 0, the base does not move."""
    for preset in [*PRESETS, "updates"]:
        kw = dict(algorithm=preset) if preset != "updates" else dict(
            algorithm="rec_oneside_is", updates=UpdatesConfig(epochs=2, mini_batches=2))
        start = _StartCopy()
        module, _ = fit_micro(tmp_path / preset, 1, policy=_policy(tmp_path), callbacks=[start], **kw)
        after = dict(module.policy.named_parameters())
        assert all(torch.equal(after[n], t) for n, t in start.base.items()), preset
        assert all(after[n].abs().max() > 0 for n in start.adapter if ".lora_B." in n), preset


# -- checkpoint --------------------------------------------------------------------------------------
def _fit_with_checkpoint(tmp_path, steps, ckpt_path=None, policy=None, **kw):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from reclight.trainer.data import RLDataModule

    module = micro_module(tmp_path, policy=policy or _policy(tmp_path), engine=EngineConfig(name="fast"), **kw)
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                         accelerator="cpu", devices=1,
                         callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1,
                                                    save_top_k=-1, filename="{step}")])
    # weights_only=False: an in-process run's hyper-parameters are dataclasses (the CLI's are plain)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False)
    return module


# The resumed in-process runs write their checkpoints to a folder of their own on purpose.
NEW_FOLDER = pytest.mark.filterwarnings("ignore:The dirpath has changed from")


@NEW_FOLDER
def test_checkpoint_holds_the_adapter_its_optimizer_state_and_the_base_hash(tmp_path):
    """A LoRA checkpoint: the adapter (no base weight), AdamW's state for the adapter only, the
    engine's state in adapter form, the base's SHA-256, and no frozen reference copy. Resumed
    in-process, it ends on the straight run's adapter bitwise."""
    straight = _fit_with_checkpoint(tmp_path / "a", 3)
    ck = torch.load(tmp_path / "a" / "ckpt" / "step=2.ckpt", weights_only=False)
    names = set(adapter_state(straight.policy))
    assert set(ck["state_dict"]) == {f"policy.{n}" for n in names}
    opt = ck["optimizer_states"][0]
    assert len(opt["state"]) == len(names) and all(s["exp_avg"].shape[0] <= 64 for s in opt["state"].values())
    state = ck["reclight"]
    assert state["lora"] == {"base_sha256": base_sha256(straight.policy), "rank": 4}
    assert "init_policy" not in state
    engine = state["rollouts"]["engine"]
    assert "weights" not in engine and set(engine["adapter"]) == names
    resumed = _fit_with_checkpoint(tmp_path / "b", 3, ckpt_path=str(tmp_path / "a" / "ckpt" / "step=2.ckpt"))
    for n, t in adapter_state(straight.policy).items():
        assert torch.equal(dict(resumed.policy.named_parameters())[n], t), n


@pytest.mark.parametrize("change, message", [
    (dict(lora=LoraConfig()), r"model.policy.lora.enabled: the checkpoint has True, this run False"),
    (dict(lora=dataclasses.replace(LORA, rank=8)), r"model.policy.lora.rank: the checkpoint has 4, this run 8"),
    ("hash", r"the LoRA adapter was trained on another base model \(base weights SHA-256: the checkpoint has "
             r"0{64}, this run [0-9a-f]{64}\)"),
])
@NEW_FOLDER
def test_resume_into_another_lora_setting_is_refused_naming_the_field(tmp_path, change, message):
    _fit_with_checkpoint(tmp_path / "a", 1)
    path = tmp_path / "a" / "ckpt" / "step=1.ckpt"
    if change == "hash":  # the adapter belongs to another base model
        ck = torch.load(path, weights_only=False)
        ck["reclight"]["lora"]["base_sha256"] = "0" * 64
        torch.save(ck, path)
        policy = None
    else:
        policy = _policy(tmp_path / "b", **change)
    with pytest.raises(Exception, match=message):
        _fit_with_checkpoint(tmp_path / "b", 2, ckpt_path=str(path), policy=policy)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), r"model.policy.lora.rank=0 is not valid; accepted: an integer >= 1"),
    (dict(rank=-2), r"model.policy.lora.rank=-2 is not valid; accepted: an integer >= 1"),
    (dict(alpha=0.0), r"model.policy.lora.alpha=0.0 is not valid"),
    (dict(dropout=1.0), r"model.policy.lora.dropout=1.0 is not valid; accepted: a number in \[0, 1\)"),
    (dict(target_modules=()), r"model.policy.lora.target_modules=\(\) is not valid; accepted: a non-empty list"),
])
def test_bad_lora_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(enabled=True, **kwargs)


def test_a_target_module_the_model_lacks_is_refused_naming_the_modules(tmp_path):
    model, _ = load_causal_lm(str(build_tiny(tmp_path / "tiny", MICRO, seed=3)))
    with pytest.raises(ValueError, match=r"model.policy.lora.target_modules=\['q_proj', 'c_attn'\] is not valid; "
                                         r"accepted: names of the nn.Linear modules of the model's decoder layers "
                                         r"\(down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\); not found: c_attn"):
        attach_lora(model, LoraConfig(enabled=True, target_modules=("q_proj", "c_attn")), seed=0)
    with pytest.raises(ValueError, match=r"not found: lm_head"):  # may be tied to the input embedding
        attach_lora(model, LoraConfig(enabled=True, target_modules=("lm_head",)), seed=0)


def test_lora_without_peft_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ImportError, match=r"model.policy.lora.enabled=true needs the peft library.*"
                                          r"pip install 'reclight\[lora\]'"):
        LoraConfig(enabled=True)
    LoraConfig()  # off: peft is not needed


def test_dropout_warns_and_rules_out_the_fused_forward(tmp_path):
    with pytest.warns(UserWarning, match=r"model.policy.lora.dropout=0.1: .*on-policy ratios pi / mu are no longer 1"):
        lora = LoraConfig(enabled=True, rank=4, dropout=0.1)
    module = micro_module(tmp_path, policy=_policy(tmp_path, lora=lora), train_forward=TrainForwardConfig(impl="fused"))
    with pytest.raises(ValueError, match=r"model.train_forward.impl='fused' is not valid; accepted: 'hf' or 'auto' "
                                         r"here: the fused forward does not support model.policy.lora.dropout=0.1"):
        module.configure_model()
    auto = micro_module(tmp_path, policy=_policy(tmp_path, lora=lora), train_forward=TrainForwardConfig(impl="auto"))
    auto.configure_model()
    assert auto.forward_impl == "hf"


def test_lora_refused_under_fsdp_and_with_vllm(tmp_path):
    from types import SimpleNamespace

    module = micro_module(tmp_path, policy=_policy(tmp_path))
    module._device_mesh = SimpleNamespace()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(ValueError, match=r"model.policy.lora.enabled=True is not valid; accepted: false under FSDP"):
        module.configure_model()
    with pytest.raises(ValueError, match=r"model.engine.name='vllm' is not valid; accepted: hf, fast or auto with "
                                         r"model.policy.lora.enabled true"):
        micro_module(tmp_path, policy=_policy(tmp_path), engine=EngineConfig(name="vllm"))


# -- gradient checkpointing ------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["hf", "fused"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_same_gradients(tmp_path, impl, lora):
    """Checkpointing recomputes each layer in the backward: same log-probs and gradients within
    fp32 round-off, for the full model and for the adapter."""
    model, tok = _lora_model(tmp_path) if lora else load_causal_lm(str(build_tiny(tmp_path / "t", MICRO, seed=3)))
    batch = _batch(tok)
    plain = _logp_and_grads(model, batch, impl)
    if impl == "hf":
        enable_checkpointing(model)
    ckpt = _logp_and_grads(model, batch, impl, checkpointing=True)
    assert is_checkpointing(model) == (impl == "hf")
    assert_close(ckpt[0], plain[0], rtol=0, atol=1e-6)
    assert plain[1].keys() == ckpt[1].keys() and plain[1]
    for name, g in plain[1].items():
        assert g.abs().max() > 0, name
        assert_close(ckpt[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("impl", ["hf", "fused"])
def test_checkpointing_switch_in_a_trainer_step(tmp_path, impl):
    """``model.train_forward.checkpointing``: a whole step's gradients equal the step without it."""
    a, _ = fit_micro(tmp_path / "a", 1, optim_kwargs=dict(grad_clip=0.0), train_forward=TrainForwardConfig(impl=impl))
    b, _ = fit_micro(tmp_path / "b", 1, optim_kwargs=dict(grad_clip=0.0),
                     train_forward=TrainForwardConfig(impl=impl, checkpointing=True))
    assert is_checkpointing(b.policy) == (impl == "hf") and not is_checkpointing(a.policy)
    for (name, p), q in zip(a.policy.named_parameters(), b.policy.parameters()):
        assert p.grad.abs().max() > 0, name
        assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks")  # validate needs none
def test_validate_with_a_lora_checkpoint_of_another_base_is_refused(tmp_path):
    """Outside ``fit`` no warm-up rebuilds the base: the hash is checked when the checkpoint loads."""
    import lightning.pytorch as pl

    from reclight.trainer.data import RLDataModule

    _fit_with_checkpoint(tmp_path / "a", 1)
    path = tmp_path / "a" / "ckpt" / "step=1.ckpt"
    module = micro_module(tmp_path / "b", policy=_policy(tmp_path / "b"), engine=EngineConfig(name="fast"))
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=1, accelerator="cpu", devices=1,
                         default_root_dir=str(tmp_path / "b"))
    trainer.validate(module, datamodule=dm, ckpt_path=str(path), weights_only=False)  # the same base: accepted
    ck = torch.load(path, weights_only=False)
    ck["reclight"]["lora"]["base_sha256"] = "f" * 64
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"the LoRA adapter was trained on another base model \(base weights SHA-256: "
                                         r"the checkpoint has f{64}, this run [0-9a-f]{64}\)"):
        trainer.validate(module, datamodule=dm, ckpt_path=str(path), weights_only=False)
