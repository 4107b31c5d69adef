"""A rollout engine on vLLM (GPU only; ``pip install 'reclight[vllm]'``).

It implements the same :class:`reclight.rollout.RolloutEngine` protocol as the default
Hugging Face engine, so the weight-sync callback, the loss and the checkpoints do not know which
engine sampled:

- ``generate`` asks vLLM for K samples per prompt with ``logprobs=0``, which returns the
  log-prob of each sampled token; in ``processed_logprobs`` mode that is
  ``log_softmax(logits / temperature)``, the trainer's convention (top-p, when < 1, is also
  applied by vLLM before it records the log-prob; see ``recompute_logp_behav``).
- ``update_weights`` loads the trainer's current tensors into the vLLM model IN PLACE
  (``model.load_weights``, called inside the vLLM worker): no restart and no round-trip through a
  checkpoint on disk. The prefix cache is reset afterwards, since cached keys/values belong to the
  old weights.
- every sample is tagged with ``version``, the trainer step whose weights the engine holds.
- ``recompute_logp_behav=True`` replaces vLLM's log-probs by the trainer model's own
  ``logp`` of the sampled tokens (computed right after generation, without grad). That removes
  the inference/training numerical mismatch (different kernels, bf16 vs fp32), at the cost of
  one extra forward pass. It is exact only when the trainer still holds the engine's weights at
  generation time: the engine says so (``scores_with_trainer``), and the rollout queue then
  generates every batch of a version at that version's sync.

What is verified where: the conversion of vLLM outputs to reclight tensors and the guarded
import are tested on CPU with stand-in objects; the vLLM calls themselves need a GPU and are
tested only when ``vllm`` and CUDA are present (see the README's "What is verified").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from reclight.engines.base import Generation, SamplingConfig
from reclight.models.fsdp import full_weights
from reclight.models.tokens import pad_id


def require_vllm() -> Any:
    """Import vllm or raise an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "engine='vllm' needs the vllm package and a CUDA GPU; install it with "
            "`pip install 'reclight[vllm]'`, or use engine='hf' (the default, CPU or GPU)"
        ) from err
    return vllm


def _logprob_value(entry: Any) -> float:
    """vLLM stores a sampled token's log-prob as an object with ``.logprob`` (or, in some
    versions' flat mode, as a float)."""
    return float(getattr(entry, "logprob", entry))


def outputs_to_generation(
    outputs: Sequence[Any],  # B request outputs, each with .outputs = K completions
    num_samples: int,
    pad_id: int,
    version: int,
    max_new_tokens: int,
) -> Generation:
    """Right-pad vLLM completions into reclight's ``[B, K, T]`` tensors.

    Each completion's ``token_ids`` are its real tokens (EOS included when the model emitted
    it), and ``logprobs[t]`` maps token ids to log-probs at step t and always contains the
    sampled token. ``T`` is the longest completion (at most ``max_new_tokens``).

    Returns ``Generation(response_ids [B, K, T] long, response_mask [B, K, T] bool,
    logp_behav [B, K, T] fp32 (0 off-mask), version [B, K] long)``.
    """
    B = len(outputs)
    for b, out in enumerate(outputs):
        if len(out.outputs) != num_samples:
            raise ValueError(
                f"vLLM returned {len(out.outputs)} completions for prompt {b}; expected "
                f"num_samples={num_samples}"
            )
    lengths = [len(c.token_ids) for out in outputs for c in out.outputs]
    T = max(1, min(max(lengths, default=1), max_new_tokens))
    ids = torch.full((B, num_samples, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, num_samples, T, dtype=torch.bool)
    logp = torch.zeros(B, num_samples, T, dtype=torch.float32)
    for b, out in enumerate(outputs):
        for k, comp in enumerate(out.outputs):
            tokens = list(comp.token_ids)[:T]
            if comp.logprobs is None:
                raise ValueError("vLLM returned no logprobs; the engine must request logprobs=0")
            n = len(tokens)
            ids[b, k, :n] = torch.tensor(tokens, dtype=torch.long)
            mask[b, k, :n] = True
            vals = [_logprob_value(comp.logprobs[t][tok]) for t, tok in enumerate(tokens)]
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(
                    f"vLLM returned a non-finite log-prob for prompt {b}, sample {k}; with top_p < 1 "
                    "use processed log-probs of the sampled token only"
                )
            logp[b, k, :n] = torch.tensor(vals, dtype=torch.float32)
    return Generation(
        response_ids=ids,
        response_mask=mask,
        logp_behav=logp,
        version=torch.full((B, num_samples), int(version), dtype=torch.long),
    )


def _load_weights_in_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Runs inside the vLLM worker: copy the given tensors into its model (vLLM handles the
    name mapping, e.g. fused qkv projections)."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMEngine:
    """Rollout engine on vLLM (implements ``RolloutEngine``).

    Args:
        model_name_or_path: the same model the trainer starts from (vLLM loads its own copy).
        tokenizer: the trainer's tokenizer (for pad/eos ids).
        sampling: K, temperature, top_p, max_new_tokens.
        dtype: vLLM's weight dtype (``bfloat16`` by default).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer shares the
            GPU: leave room for its weights, optimizer state and activations).
        max_model_len: longest prompt + response vLLM must handle (None: the model's).
        enforce_eager: disable CUDA graphs (slower decoding, faster start, less memory).
        recompute_logp_behav: replace vLLM's log-probs with the trainer model's (see module doc).
        seed: vLLM's base seed (each ``generate`` call also gets its own).
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer: Any,
        sampling: SamplingConfig,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.4,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        recompute_logp_behav: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"VLLMEngine.gpu_memory_utilization={gpu_memory_utilization!r} is not valid; "
                "accepted: 0 < gpu_memory_utilization <= 1"
            )
        vllm = require_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("engine='vllm' needs a CUDA GPU; none is visible (use engine='hf')")
        # In-process engine core, so update_weights can reach the model without IPC of tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs: dict[str, Any] = dict(
            model=model_name_or_path, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            max_model_len=max_model_len, enable_prefix_caching=True,
        )
        try:
            self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **kwargs)
        except TypeError:  # older vLLM without logprobs_mode: its default applies temperature
            self.llm = vllm.LLM(**kwargs)
        self._sampling_params_cls = vllm.SamplingParams
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.recompute_logp_behav = recompute_logp_behav
        self.scores_with_trainer = bool(recompute_logp_behav)  # the rollout queue then generates eagerly
        self.version = 0
        self._policy: torch.nn.Module | None = None
        self._weights: dict[str, Tensor] = {}
        self._pad_id = pad_id(tokenizer)  # one int even when the tokenizer lists several end tokens

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, seed: int) -> Generation:
        s = self.sampling
        params = self._sampling_params_cls(
            n=s.num_samples, temperature=s.temperature, top_p=s.top_p,
            max_tokens=s.max_new_tokens, logprobs=0, seed=seed,
        )
        prompts = [
            {"prompt_token_ids": ids[m].tolist()} for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu().bool())
        ]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        gen = outputs_to_generation(outputs, s.num_samples, self._pad_id, self.version, s.max_new_tokens)
        if self.recompute_logp_behav:
            gen.logp_behav = self._trainer_logp(prompt_ids, prompt_mask, gen)
        return gen

    def _trainer_logp(self, prompt_ids: Tensor, prompt_mask: Tensor, gen: Generation) -> Tensor:
        from reclight.models.forward import response_logprobs

        if self._policy is None:
            raise RuntimeError("recompute_logp_behav needs update_weights() to have been called once")
        device = next(self._policy.parameters()).device
        with torch.no_grad():
            logp, _ = response_logprobs(
                self._policy, prompt_ids.to(device), prompt_mask.to(device),
                gen.response_ids.to(device), gen.response_mask.to(device),
                temperature=self.sampling.temperature,
            )
        return logp.float().masked_fill(~gen.response_mask.to(device), 0.0).cpu()

    @torch.no_grad()
    def update_weights(self, policy: torch.nn.Module, version: int) -> None:
        full = full_weights(policy)  # gathered when the policy is sharded (FSDP2)
        state = full.state_dict() if isinstance(full, torch.nn.Module) else full
        weights = [(name, t.detach()) for name, t in state.items()]
        self.llm.collective_rpc(_load_weights_in_worker, args=(weights,))
        self.llm.reset_prefix_cache()
        self._policy = policy
        # One host copy of the behaviour weights (not one per pending step), so a checkpoint
        # can restore the engine exactly: vLLM's own tensors use fused, renamed layouts.
        self._weights = {name: t.to("cpu", copy=True) for name, t in weights}
        self.version = int(version)

    def state_dict(self) -> dict[str, Any]:
        """The behaviour weights last pushed (HF names, on the host) and their version."""
        return {"version": self.version, "weights": self._weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get("weights")
        if weights is not None:
            self.llm.collective_rpc(_load_weights_in_worker, args=(list(weights.items()),))
            self.llm.reset_prefix_cache()
            self._weights = weights
        self.version = int(state["version"])
