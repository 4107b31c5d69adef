"""The default rollout engine: Hugging Face ``generate`` on the engine's own copy of the weights.

The engine's model is a separate copy of the policy (optionally in another dtype, e.g. bf16
for generation while the trainer keeps fp32 master weights). It is the behaviour policy: the
trainer pushes weights into it only when the sync schedule says so (``update_weights``, an
in-place copy, no new allocation).

``logp_behav`` is recorded at sampling time by a logits processor placed FIRST in the chain, so
it sees the raw logits: at each decoding step it stores ``log_softmax(logits / temperature)``
and, at the next step, gathers it at the token that was just sampled (one ``[N, V]`` buffer
alive at a time, never the ``[N, T, V]`` history). Temperature and top-p are applied after it
by our own warpers; the model's ``generation_config`` (which may carry top-k, repetition
penalties, ...) is replaced by an explicit one so nothing else changes the distribution.

With ``top_p < 1`` a second processor, placed LAST, records log S per token, S the mass top-p
kept (``Generation.logp_kept_mass``): the token was sampled from pi / S on the kept set, and
``model.algorithm.truncation_correction`` reads log mu = logp_behav - log S (docs/algorithms.md
section 6.8). With ``top_p`` 1 that processor is not added: the samples and ``logp_behav`` are
exactly those of the plain path, and ``logp_kept_mass`` is None.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from reclight.engines.base import Generation, SamplingConfig
from reclight.engines.stop import check_stop, stop_requested
from reclight.kernels.masks import response_mask_from_ids
from reclight.models.fsdp import full_weights, is_sharded
from reclight.models.loading import resolve_dtype
from reclight.models.tokens import eos_ids as tokenizer_eos_ids
from reclight.models.tokens import pad_id as tokenizer_pad_id


class _StopOnRequest:
    """Stopping criterion: ends ``generate`` at the next token once a stop was requested
    (:mod:`reclight.engines.stop`); :func:`hf_generate` then raises instead of returning the
    cut responses."""

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        return torch.full((input_ids.shape[0],), stop_requested() is not None, dtype=torch.bool,
                          device=input_ids.device)


class _RecordLogprobs:
    """Logits processor that records the behaviour log-prob of every sampled token."""

    def __init__(self, temperature: float, prompt_len: int) -> None:
        self.temperature = temperature
        self.prompt_len = prompt_len
        self.prev: Tensor | None = None  # [N, V] fp32 log-probs of the last step
        self.logp: list[Tensor] = []  # T x [N]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[1] > self.prompt_len:  # gather the token sampled from self.prev
            self.logp.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: Tensor) -> Tensor:  # [N, P + T] -> [N, T]
        if sequences.shape[1] > self.prompt_len + len(self.logp):
            self.logp.append(self.prev.gather(-1, sequences[:, -1:]).squeeze(-1))
        self.prev = None
        return torch.stack(self.logp, dim=1)


class _RecordKeptMass:
    """Logits processor placed LAST, after top-p: at each decoding step it records log S, S the
    probability mass (under ``log_softmax(logits / temperature)``, the distribution ``logp_behav``
    is read from) of the tokens top-p kept, i.e. those whose warped score is still finite. The
    engine then sampled from pi / S on that set; the token sampled at this step is the one S
    belongs to, so one value per call, no gather."""

    def __init__(self, recorder: _RecordLogprobs) -> None:
        self.recorder = recorder
        self.log_kept: list[Tensor] = []  # T x [N]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        kept = torch.isfinite(scores)  # top-p sets every token it drops to -inf
        self.log_kept.append(torch.logsumexp(self.recorder.prev.masked_fill(~kept, -torch.inf), dim=-1))
        return scores

    def finish(self) -> Tensor:  # [N, T]
        return torch.stack(self.log_kept, dim=1)


def hf_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Tensor,  # [B, P]
    prompt_mask: Tensor,  # [B, P]
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    record_logp: bool = True,
    record_kept_mass: bool = False,
    stop_strings: tuple[str, ...] = (),
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:  # ids, mask, logp, logp_kept_mass: [B, K, T]
    """Sample (or greedy-decode) ``num_samples`` responses per prompt with the KV cache; with
    ``record_kept_mass`` (sampling with top_p < 1) also log S per token, the mass top-p kept (0
    off-mask; None without it). The flag adds a recording processor only: the samples are the same."""
    from transformers import (
        GenerationConfig,
        LogitsProcessorList,
        StoppingCriteriaList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    B, P = prompt_ids.shape
    eos_ids, pad_id = tokenizer_eos_ids(tokenizer), tokenizer_pad_id(tokenizer)
    gen_cfg = GenerationConfig(
        do_sample=do_sample, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
        temperature=1.0, top_p=1.0, top_k=None, eos_token_id=eos_ids, pad_token_id=pad_id,
        use_cache=True, return_dict_in_generate=False,
    )
    recorder = _RecordLogprobs(temperature, P) if record_logp else None
    processors = LogitsProcessorList([recorder] if recorder else [])
    if do_sample and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if do_sample and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    kept_recorder = None
    if record_kept_mass:
        if recorder is None or not (do_sample and top_p < 1.0):
            raise ValueError("record_kept_mass=True is not valid here; accepted: with record_logp and sampling "
                             f"with top_p < 1 (got record_logp={record_logp}, do_sample={do_sample}, top_p={top_p})")
        kept_recorder = _RecordKeptMass(recorder)
        processors.append(kept_recorder)  # last: it reads what top-p kept
    extra = dict(stop_strings=list(stop_strings), tokenizer=tokenizer) if stop_strings else {}
    device = next(model.parameters()).device
    # Not inference_mode on a sharded (FSDP2) policy: its unshard buffers are reused by training
    # forwards, and tensors created in inference mode cannot be updated outside it.
    with torch.no_grad() if is_sharded(model) else torch.inference_mode():
        seqs = model.generate(
            input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device).long(),
            generation_config=gen_cfg, logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([_StopOnRequest()]), **extra,
        )
    check_stop("hf_generate")  # a SIGTERM (reclight.engines.stop) ended it early: never return cut responses
    response = seqs[:, P:]
    mask = response_mask_from_ids(response, eos_ids, pad_id)
    T = response.shape[1]
    logp = log_kept = None
    if recorder is not None:
        logp = recorder.finish(seqs).masked_fill(~mask, 0.0).reshape(B, num_samples, T).clone()
    if kept_recorder is not None:
        log_kept = kept_recorder.finish().masked_fill(~mask, 0.0).reshape(B, num_samples, T).clone()
    # clone(): tensors made under inference_mode cannot be saved for backward later.
    return response.reshape(B, num_samples, T).clone(), mask.reshape(B, num_samples, T).clone(), logp, log_kept


class HFGenerateEngine:
    """Rollout engine on Hugging Face ``generate`` (implements ``RolloutEngine``).

    Args:
        policy: the trainer's model; the engine deep-copies it (the behaviour policy).
        tokenizer: its tokenizer (left padding).
        sampling: K, temperature, top_p, max_new_tokens.
        dtype: the engine copy's dtype (``None`` keeps the policy's).
        stop_strings: extra strings that end a response (besides EOS).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        sampling: SamplingConfig,
        dtype: str | None = None,
        stop_strings: tuple[str, ...] = (),
    ) -> None:
        from reclight.models.lora import AdapterForm, has_lora, plain_copy

        # A LoRA policy: a plain model of its merged weights (reclight/models/lora.py)
        self.model = (plain_copy(policy) if has_lora(policy) else copy.deepcopy(policy)).eval()
        self._lora = AdapterForm()
        self._lora.source(policy)  # records the adapter of version 0 (LoRA only)
        if dtype is not None:
            self.model.to(resolve_dtype(dtype, "engine_dtype"))
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.stop_strings = tuple(stop_strings)
        self.version = 0
        self.scores_with_trainer = False

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, seed: int) -> Generation:
        s = self.sampling
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            ids, mask, logp, log_kept = hf_generate(
                self.model, self.tokenizer, prompt_ids, prompt_mask, num_samples=s.num_samples,
                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                record_kept_mass=s.top_p < 1.0, stop_strings=self.stop_strings,
            )
        version = torch.full(ids.shape[:2], self.version, dtype=torch.long, device=ids.device)
        return Generation(response_ids=ids, response_mask=mask, logp_behav=logp, version=version,
                          logp_kept_mass=log_kept)

    @torch.no_grad()
    def update_weights(self, policy: torch.nn.Module | Mapping[str, Tensor], version: int) -> None:
        """Copy the policy's weights (a module, or its full state dict with HF names, e.g.
        gathered from a sharded policy by ``reclight.models.fsdp.full_weights``) into the engine's
        model, in place. Buffers are copied when the source has them (a state dict holds
        only persistent ones, e.g. not the rotary ``inv_freq``, which never changes)."""
        policy = self._lora.source(policy)  # LoRA: the merged weights, the adapter recorded
        policy = full_weights(policy) if isinstance(policy, torch.nn.Module) else policy
        if isinstance(policy, torch.nn.Module):
            src = dict(policy.named_parameters())
            src.update(dict(policy.named_buffers()))
        else:
            src = dict(policy)
        for name, dst in self.model.named_parameters():  # a tied head is not listed: nothing to map
            dst.copy_(src[name])  # in place: casts dtype/device, allocates nothing
        for name, dst in self.model.named_buffers():
            if name in src:
                dst.copy_(src[name])
        self.version = int(version)

    def state_dict(self) -> dict[str, Any]:
        """The weights and their version; with LoRA the adapter they were merged from instead."""
        return self._lora.state({"version": self.version, "weights": self.model.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        merged = self._lora.restore(state)
        self.model.load_state_dict(state["weights"] if merged is None else merged, strict=merged is None)
        self.version = int(state["version"])
