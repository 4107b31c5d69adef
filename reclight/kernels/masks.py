"""Position ids and masks of left-padded prompts and right-padded responses, written once.

Used by the Hugging Face training forward, the fused training forward and the engines, so that
every path assigns the same positions and treats padding the same way (each one of these was
once written two or three times). Imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:  # [N, L] -> [N, L] long
    """Positions counted over real tokens only (0 for left padding), so a left-padded prompt
    gets the same positions as the same prompt alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill_visible(prompt_mask: Tensor) -> Tensor:  # [B, P] bool -> [B, P, P] bool
    """Causal self-attention over a left-padded prompt: query i sees key j <= i when j is a real
    token. A padding query row would see nothing (a softmax over no entries is NaN), so it sees
    itself; its output is never used."""
    P = prompt_mask.shape[-1]
    causal = torch.ones(P, P, dtype=torch.bool, device=prompt_mask.device).tril()
    return (causal & prompt_mask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool, device=prompt_mask.device)


def response_mask_from_ids(response_ids: Tensor, eos_ids: list[int], pad_id: int | None = None) -> Tensor:
    """``[..., T]`` bool: the tokens up to and including the first EOS. With ``pad_id`` (an
    engine that pads finished rows with it, and pad is not an EOS id), a response without EOS
    also loses its trailing run of padding (a stop string or ``max_new_tokens`` ended it)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()
    mask = (is_eos.cumsum(-1) - is_eos) == 0
    if pad_id is not None and pad_id not in eos_ids:
        trailing_pad = (response_ids == pad_id).flip(-1).long().cumprod(-1).flip(-1).bool()
        mask &= ~trailing_pad
    return mask
