"""The vLLM engine: output conversion and guarded import on CPU; the real engine on GPU only."""

import importlib.util
import math
from types import SimpleNamespace as NS

import pytest
import torch

from reclight.engines.vllm import outputs_to_generation, require_vllm
from reclight.engines.base import SamplingConfig

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _completion(tokens, logps, other=None):
    """A stand-in for vLLM's CompletionOutput: logprobs[t] maps token id -> object with .logprob
    and holds the sampled token (plus, optionally, other top tokens)."""
    steps = []
    for tok, lp in zip(tokens, logps):
        d = {tok: NS(logprob=lp)}
        if other is not None:
            d[other] = NS(logprob=-9.0)
        steps.append(d)
    return NS(token_ids=tokens, logprobs=steps)


def test_outputs_to_generation_pads_and_gathers_sampled_logprobs():
    """Two prompts x K=2 completions of lengths 3, 1, 2, 0 become [2, 2, 3] tensors: ids
    right-padded with pad_id, mask true on real tokens only, logp_behav the sampled token's
    log-prob (never the other top token's), 0 off-mask, and the engine's version on every sample."""
    outs = [
        NS(outputs=[_completion([5, 6, 2], [-0.1, -0.2, -0.3], other=7), _completion([9], [-1.5])]),
        NS(outputs=[_completion([4, 2], [-0.25, -0.5]), _completion([], [])]),
    ]
    gen = outputs_to_generation(outs, num_samples=2, pad_id=0, version=7, max_new_tokens=4)
    assert gen.response_ids.tolist() == [[[5, 6, 2], [9, 0, 0]], [[4, 2, 0], [0, 0, 0]]]
    assert gen.response_mask.sum(-1).tolist() == [[3, 1], [2, 0]]
    expected = torch.tensor([[[-0.1, -0.2, -0.3], [-1.5, 0, 0]], [[-0.25, -0.5, 0], [0, 0, 0]]])
    torch.testing.assert_close(gen.logp_behav, expected)
    assert gen.version.tolist() == [[7, 7], [7, 7]]
    assert gen.logp_behav.dtype == torch.float32


def test_outputs_to_generation_accepts_flat_float_logprobs_and_truncates():
    """Some vLLM versions store plain floats; completions longer than max_new_tokens are cut."""
    comp = NS(token_ids=[1, 2, 3], logprobs=[{1: -1.0}, {2: -2.0}, {3: -3.0}])
    other = NS(token_ids=[4, 5], logprobs=[{4: -0.5}, {5: -0.25}])
    gen = outputs_to_generation([NS(outputs=[comp, other])], num_samples=2, pad_id=0, version=0, max_new_tokens=2)
    assert gen.response_ids.tolist() == [[[1, 2], [4, 5]]]
    assert gen.logp_behav.tolist() == [[[-1.0, -2.0], [-0.5, -0.25]]]


def test_outputs_to_generation_rejects_wrong_k_and_bad_logprobs():
    one = NS(outputs=[_completion([1], [-1.0])])
    with pytest.raises(ValueError, match="returned 1 completions for prompt 0; expected num_samples=2"):
        outputs_to_generation([one], num_samples=2, pad_id=0, version=0, max_new_tokens=4)
    bad = NS(outputs=[_completion([1], [-math.inf]), _completion([1], [-1.0])])
    with pytest.raises(ValueError, match="non-finite log-prob for prompt 0, sample 0"):
        outputs_to_generation([bad], num_samples=2, pad_id=0, version=0, max_new_tokens=4)
    missing = NS(outputs=[NS(token_ids=[1], logprobs=None), _completion([1], [-1.0])])
    with pytest.raises(ValueError, match="no logprobs"):
        outputs_to_generation([missing], num_samples=2, pad_id=0, version=0, max_new_tokens=4)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here; the missing-package message cannot be checked")
def test_missing_vllm_gives_install_hint():
    with pytest.raises(ImportError, match=r"pip install 'reclight\[vllm\]'.*engine='hf'"):
        require_vllm()


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()),
    reason="needs the vllm extra and a CUDA GPU (the CPU suite checks the conversion only)",
)
def test_vllm_engine_matches_trainer_logp_and_updates_in_place(tmp_path):  # pragma: no cover - GPU only
    """On GPU: the tiny model served by vLLM samples K responses whose logp_behav is within a
    bf16-level tolerance of the trainer's fp32 logp; after update_weights with perturbed weights
    the engine's log-probs follow the new weights (no restart), and the version tag follows."""
    from reclight.engines.vllm import VLLMEngine
    from reclight.models.forward import response_logprobs
    from reclight.models.tokens import encode_prompts
    from reclight.models.tiny import build_tiny

    path = str(build_tiny(tmp_path / "tiny", seed=0))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).cuda()
    engine = VLLMEngine(path, tok, SamplingConfig(num_samples=4, max_new_tokens=6), dtype="float32",
                        gpu_memory_utilization=0.2, enforce_eager=True)
    ids, mask = encode_prompts(tok, ["12+34=", "07+05="], use_chat_template=False)
    for version in (0, 3):
        if version:
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            engine.update_weights(policy, version)
        gen = engine.generate(ids, mask, seed=1)
        logp, _ = response_logprobs(policy, ids.cuda(), mask.cuda(), gen.response_ids.cuda(),
                                    gen.response_mask.cuda())
        diff = (logp.cpu() - gen.logp_behav).abs()[gen.response_mask]
        assert diff.mean().item() < 1e-3, diff.mean().item()
        assert (gen.version == version).all()


def test_engine_config_is_validated_before_any_load(tmp_path, capsys):
    """The engine's name and each engine's options are typed: a bad name, an option of an engine
    that is not selected, a bad value, or a misspelt option (through the real CLI) are refused
    naming the field, the value and what is accepted, before any model is loaded."""
    from pathlib import Path

    from reclight.engines.config import EngineConfig, VLLMEngineOptions
    from reclight.trainer.cli import main

    with pytest.raises(ValueError, match=r"model.engine.name='vLLM' is not valid; accepted: auto, hf, fast, vllm"):
        EngineConfig(name="vLLM")
    with pytest.raises(ValueError, match=r"model.engine.vllm.gpu_memory_utilization=0.3 is not valid; accepted: only "
                                         r"with model.engine.name: vllm \(this run's engine is 'hf'\)"):
        EngineConfig(name="hf", vllm=VLLMEngineOptions(gpu_memory_utilization=0.3))
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=1.5 is not valid; accepted: 0 < gpu_memory_utilization <= 1"):
        VLLMEngineOptions(gpu_memory_utilization=1.5)
    cfg = EngineConfig(name="vllm", vllm=VLLMEngineOptions(gpu_memory_utilization=0.3, recompute_logp_behav=True))
    assert cfg.vllm.recompute_logp_behav and not cfg.compiles
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(root / "configs/smoke_test.yaml"), "--config", str(root / "configs/engine/vllm.yaml"),
              "--model.policy.tiny_dir", str(tmp_path / "tiny"), "--model.engine.vllm.gpu_memory_utilisation", "0.3"])
    assert e.value.code == 2
    assert ("model.engine.vllm.gpu_memory_utilisation=0.3 is not valid: model.engine.vllm has no field "
            "'gpu_memory_utilisation'; accepted: gpu_memory_utilization, max_model_len, enforce_eager, "
            "recompute_logp_behav") in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
