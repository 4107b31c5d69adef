"""Continuous batching on the fast engine's weights: groups join and leave at any decoding step.

:class:`ContinuousEngine` is the step-wise generator that the asynchronous schedule
(:mod:`reclight.clock`, docs/algorithms.md section 7) drives: ``admit`` a group of K samples,
``decode`` one token of every sequence still decoding, ``swap`` weights in mid-flight,
``release`` a finished group. It holds no weights: it runs the decoder of a
:class:`~reclight.engines.fast.FastLlamaEngine` (its fused weights, which ``swap`` updates in
place, its sizes, sampling settings, EOS/pad ids, dtype and cache dtype) on a KV cache of its
own, one row per sequence. It works on token ids and tensors; the rollout queue maps prompts to
ids and groups to batches.

Departures from ``FastLlamaEngine.generate`` and from a textbook serving engine, listed up front:

- **Rows are sequences, compacted as they end.** A group takes K cache rows (its samples) at
  admission; a sample that ends leaves the decoding batch at that step: the sequences still
  decoding stay a contiguous prefix of the cache (rows from the tail move into the holes), so
  a decoding step works on views, not gathered copies, and costs what the clock charges
  (``decode_a + decode_b * live_rows``, live rows = sequences still decoding). A group's
  responses live apart from the cache, in the K output rows of its slot, until released.
- **The cache is a ring of W columns shared by all rows.** Decoding step c writes the key/value
  of every row at column c mod W, so the write is one slice per layer and attention runs over
  the contiguous ``[rows, Hkv, W, D]`` prefix, as in ``generate``. Per-row slots (each row at its
  own position) need an indexed write per layer and attention over strided views: that measured
  about 15% slower per step at the default shapes. A group whose first step is step c holds
  its prompt in columns c - P + 1 .. c (mod W) and its response token j in column c + 1 + j;
  each row's own additive bias is 0 on the columns it has written and -inf elsewhere;
  its RoPE positions count its own tokens (0 .. P - 1 for the prompt, no left padding), so
  attention sees the same keys as a cache in position order, summed in another order. W covers
  the longest prompt in flight, ``W >= P - 1 + max_new_tokens``; a longer prompt grows the ring
  (reallocated, live columns re-placed); it never shrinks.
- **Every token's logits are computed in the decoding step that samples it.** The step after
  a group's admission runs its whole prompt (once, shared by its K rows) and samples its K first
  tokens from the last position's logits; every later step runs each row's last token through
  the decoder with the weights held at that step and samples from those logits. So a token's
  version is exactly the version of the weights that produced its distribution, and with a
  kept (stale) cache ``logp_behav`` is still the distribution it was drawn from.
- **Admission is prefilled inside the next decoding step.** ``admit`` only reserves K rows (the
  last ones of the cache); the next ``decode`` runs every prompt admitted since the last step
  together with the started rows' last tokens through the linear layers, so a step reads each
  weight matrix once however many groups joined (a separate prefill per group cost about half a
  decoding step each); their attention is causal within each prompt (one padded batch) and
  their keys/values are written once per token to their K rows. Under the clock an event swaps
  before it admits, so these are the weights of admission; a ``swap`` between ``admit`` and
  ``decode`` first prefills the waiting prompts with the weights still held, and those rows then
  start like any other, from their last prompt token.
- **Noise per group.** Group n samples with its own ``torch.Generator`` seeded by
  :func:`group_seed` (run seed, n, rank), and each decoding step draws exactly K uniforms from it
  (groups in admission order; inverse-CDF sampling, :func:`~reclight.engines.fast.inverse_cdf_sample`),
  so its tokens are a function of its prompt, n and the weights at each of its steps, not of what
  else is in flight (tested: alone or beside other groups, the same tokens; ``logp_behav``
  differs only by float rounding, since other batch shapes and ring columns sum in another order).
- **Re-prefill** (``swap(..., recompute_kv=True)``, AReaL) rebuilds, per live group, its cached
  prompt tokens once (shared by its K rows), then the cached response tokens of each sample still
  decoding, with the new weights. It returns that count: ``min(P, P - 1 + t) + max(t - 1, 0) *
  (samples still decoding)`` after t decoding steps, one token per sample less than "prompt +
  generated tokens": a sample's last token is not cached yet (the next decoding step runs it, as
  for every row). ``recompute_kv=False`` (PipelineRL) keeps the old entries.
- Eager only: ``FastLlamaEngine.compile_decode`` is not used here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reclight.checks import check_int
from reclight.engines.fast import FastLlamaEngine, inverse_cdf_sample
from reclight.engines.stop import check_stop
from reclight.kernels.llama import additive_mask, attn_out_and_mlp, pointwise_ops, rope_tables
from reclight.kernels.masks import response_mask_from_ids

STATE_FORMAT = 1
"""Version of :meth:`ContinuousEngine.state_dict`'s layout."""
_ROW_STATE = ("pos", "last_tok", "step", "sample")


def group_seed(run_seed: int, n: int, rank: int = 0) -> int:
    """Seed of group n's sampling noise: a function of (run seed, admission index n, rank) only.

    A hash (BLAKE2b of ``"run_seed:n:rank"``, 63 bits; stable across platforms and processes), so
    different (n, rank) never share a stream the way a linear mix can (``seed + n + c * rank``
    collides at n = c)."""
    run_seed = check_int("seed", run_seed)
    n, rank = check_int("n", n, minimum=0), check_int("rank", rank, minimum=0)
    digest = hashlib.blake2b(f"{run_seed}:{n}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class GroupOutput:
    """A group whose K samples all ended (T_n = its decoding steps, the longest sample's length)."""

    response_ids: Tensor  # [K, T_n] long, right-padded with the pad id
    response_mask: Tensor  # [K, T_n] bool, real tokens (up to and including EOS)
    logp_behav: Tensor  # [K, T_n] fp32, log softmax(logits / temperature) of the sampling weights, 0 off-mask
    token_version: Tensor  # [T_n] long, the engine's version at each of the group's decoding steps
    prompt_ids: Tensor  # [P] long, the prompt as admitted

    def to_dict(self) -> dict[str, Tensor]:
        return {"response_ids": self.response_ids, "response_mask": self.response_mask,
                "logp_behav": self.logp_behav, "token_version": self.token_version, "prompt_ids": self.prompt_ids}


@dataclass
class _Group:
    """A group in flight: output rows [slot * K, (slot + 1) * K); the cache rows of its samples
    still decoding are wherever compaction put them; its tokens are in ring columns
    ``start``, ``start + 1``, ... (absolute: taken mod W)."""

    n: int
    prompt: Tensor  # [P] long
    generator: torch.Generator
    slot: int
    start: int
    pending: bool = False
    """Admitted since the last decoding step: its prompt is not in the cache yet (the next step runs it)."""
    steps: int = 0
    versions: list[int] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)


class ContinuousEngine:
    """Step-wise continuous batching of groups of K samples on ``engine``'s weights.

    Args:
        engine: the fast engine whose weights, sizes and sampling settings (K = ``num_samples``,
            ``temperature``, ``max_new_tokens``) are used; ``swap`` updates its weights in place.
        max_groups: the most groups in flight at once (the cache holds ``max_groups * K`` rows).
        seed: the run seed; group n samples with :func:`group_seed` ``(seed, n, rank)``.
        rank: this process's rank (each rank gets its own noise).
    """

    def __init__(self, engine: FastLlamaEngine, max_groups: int, *, seed: int, rank: int = 0) -> None:
        if not isinstance(engine, FastLlamaEngine):
            raise TypeError(f"engine={type(engine).__name__} is not valid; accepted: a FastLlamaEngine "
                            "(continuous batching runs the fast engine's decoder)")
        self.engine = engine
        self.max_groups = check_int("max_groups", max_groups, minimum=1)
        self.seed = check_int("seed", seed)
        self.rank = check_int("rank", rank, minimum=0)
        s = engine.sampling
        self.K, self.T = s.num_samples, s.max_new_tokens
        self.pad_id = engine.pad_id
        dev = self.device = engine.device
        M = self.max_groups * self.K
        self._ar = torch.arange(M, device=dev)
        self._eos = torch.tensor(engine.eos_ids, device=dev)
        # Cache rows [0, rows) are the sequences still decoding. Per cache row: the position of
        # its last token, that token, its decoding steps so far and its output row (mirrored in
        # the Python list).
        self.rows = 0
        self.pos = torch.zeros(M, dtype=torch.long, device=dev)
        self.last_tok = torch.zeros(M, dtype=torch.long, device=dev)
        self.step = torch.zeros(M, dtype=torch.long, device=dev)
        self.sample = torch.zeros(M, dtype=torch.long, device=dev)
        self._row_sample: list[int] = []
        # Output rows: sample k of the group in slot s is row s * K + k; so are a step's uniforms.
        self.out_ids = torch.full((M, self.T), self.pad_id, dtype=torch.long, device=dev)
        self.out_logp = torch.zeros(M, self.T, dtype=torch.float32, device=dev)
        self._u = torch.zeros(M, dtype=torch.float32, device=dev)
        # The ring: [M, Hkv, W, D] per layer, its additive bias [M, 1, 1, W] and RoPE tables
        # [W, 1, D], allocated by the first admission and grown by _grow. ``col``: the
        # absolute column the next decoding step writes (column col mod W).
        self.width = 0
        self.col = 0
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []
        self._bias = torch.empty(M, 1, 1, 0, device=dev)
        self._cos = self._sin = torch.empty(0, 1, engine.head_dim, dtype=engine.dtype, device=dev)
        self.groups: dict[int, _Group] = {}  # in flight, in admission order
        self.finished: dict[int, GroupOutput] = {}

    # -- what the caller reads -------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The engine's version (the trainer step whose weights it holds)."""
        return self.engine.version

    @property
    def live_rows(self) -> int:
        """Sequences still decoding (the clock's ``live_rows``)."""
        return self.rows

    @property
    def live_groups(self) -> list[int]:
        """Groups in flight, in admission order."""
        return list(self.groups)

    # -- the ring --------------------------------------------------------------------------------
    def _columns(self, first: int, stop: int, width: int | None = None) -> Tensor:
        """Ring columns of the absolute columns [first, stop), in order."""
        return torch.arange(first, stop, device=self.device) % (width or self.width)

    def _grow(self, need: int) -> None:
        """Reallocate the ring for ``need`` columns (rounded up to a multiple of 8), the live
        rows' columns moved to their place modulo the new width."""
        eng, width = self.engine, -(-need // 8) * 8
        old, R, M = self.width, self.rows, len(self._ar)
        # The live rows wrote only in the last `old` absolute columns (a row spans < old columns).
        src, dst = self._columns(self.col - old, self.col, old or 1), self._columns(self.col - old, self.col, width)
        shape = (M, eng.num_kv_heads, width, eng.head_dim)
        for bufs in (self._keys, self._values):
            for i in range(eng.num_layers):
                # Zeros, not empty: a masked column gets probability 0, and 0 * garbage could be NaN.
                new = torch.zeros(shape, dtype=eng.cache_dtype, device=self.device)
                if i < len(bufs):
                    new[:R][:, :, dst] = bufs[i][:R][:, :, src]
                    bufs[i] = new
                else:
                    bufs.append(new)
        bias = torch.full((M, 1, 1, width), float("-inf"), device=self.device)
        bias[:R][..., dst] = self._bias[:R][..., src]
        self._bias, self.width = bias, width
        cos, sin = rope_tables(torch.arange(width, device=self.device)[None], eng.inv_freq, eng.dtype)
        self._cos, self._sin = cos[0, 0][:, None], sin[0, 0][:, None]  # [W, 1, D]

    def _pieces(self, first: int, length: int) -> list[tuple[int, int, int]]:
        """The absolute columns [first, first + length) as ring pieces (columns [a, b), offset in the run)."""
        W = self.width
        a = first % W
        if a + length <= W:
            return [(a, a + length, 0)]
        return [(a, W, 0), (0, a + length - W, W - a)]

    def _put(self, rows: slice | Tensor, first: int, keys: list[Tensor], values: list[Tensor]) -> None:
        """Write ``keys``/``values`` [n or 1, Hkv, L, D] per layer (a sequence's positions in order)
        into the cache ``rows`` at the absolute columns [first, first + L)."""
        for a, b, o in self._pieces(first, keys[0].shape[2]):
            for buf, src in zip((*self._keys, *self._values), (*keys, *values)):
                buf[rows, :, a:b] = src[:, :, o : o + b - a]

    def _prompt_kv(self, ids: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Keys/values [1, Hkv, L, D] per layer of the prompt tokens ``ids`` [L] (causal, positions 0..L-1)."""
        eng, L = self.engine, ids.shape[0]
        shape = (1, eng.num_kv_heads, L, eng.head_dim)
        keys = [torch.zeros(shape, dtype=eng.cache_dtype, device=self.device) for _ in range(eng.num_layers)]
        values = [torch.zeros(shape, dtype=eng.cache_dtype, device=self.device) for _ in range(eng.num_layers)]
        causal = additive_mask(torch.ones(L, L, dtype=torch.bool, device=self.device).tril())[None, None]
        eng._forward(ids[None], self._cos[None, :L], self._sin[None, :L], keys, values, 0, causal)
        return keys, values

    def _prompt_plan(self, new: list[_Group], first: int) -> dict[str, Tensor]:
        """How :meth:`_step_forward` runs the ``new`` prompts, whose tokens sit in its flat batch
        from token ``first`` on, one prompt after another, as one padded batch [G, Lmax]:

        - ``pad`` [G, Lmax]: the flat token at each padded position (a padding position repeats
          its prompt's last token); ``real`` [sum P]: the padded positions of the real tokens;
        - ``bias`` [G, 1, Lmax, Lmax]: causal over the real tokens (a padding query sees itself
          only: a softmax over nothing is NaN; its output is dropped);
        - ``dest`` [sum P * K * Hkv]: where each prompt token's key/value of each head goes in
          each of its group's K rows (the last rows of the cache, in order), in a cache buffer
          seen as [M * Hkv * W, D], token-major (one ``index_copy_`` writes them all);
        - ``last`` [G]: the flat index of each prompt's last token (its logits are the K samples'
          first distribution)."""
        dev, K, W, Hkv = self.device, self.K, self.width, self.engine.num_kv_heads
        lengths = [g.prompt.shape[0] for g in new]
        G, Lmax, total = len(new), max(lengths), sum(lengths)
        L = torch.tensor(lengths, device=dev)
        offset = L.cumsum(0) - L  # of each prompt among the prompt tokens
        t = torch.arange(Lmax, device=dev)
        valid = t < L[:, None]  # [G, Lmax]
        pad = first + offset[:, None] + torch.minimum(t, L[:, None] - 1)
        group = torch.repeat_interleave(torch.arange(G, device=dev), L)  # [total]: the prompt of each token
        tok = torch.arange(total, device=dev)
        col = (torch.tensor([g.start for g in new], device=dev)[group] + tok - offset[group]) % W
        row = (self.rows - G * K + group * K)[:, None] + torch.arange(K, device=dev)  # [total, K]
        dest = (row[..., None] * Hkv + torch.arange(Hkv, device=dev)) * W + col[:, None, None]  # [total, K, Hkv]
        causal = torch.ones(Lmax, Lmax, dtype=torch.bool, device=dev).tril()
        visible = (causal & valid[:, None, :]) | torch.eye(Lmax, dtype=torch.bool, device=dev)
        return {"pad": pad, "bias": additive_mask(visible)[:, None], "real": valid.flatten().nonzero().squeeze(1),
                "dest": dest.reshape(-1), "last": first + offset + L - 1}

    def _step_forward(self, new: list[_Group]) -> Tensor:
        """One pass of the decoder over the last token of every decoding row of the groups
        already started AND the whole prompts of the groups admitted since the last step
        (``new``, whose K rows are the last ones of the cache, in admission order): the linear
        layers run on all these tokens at once (one read of each weight matrix per step), the
        attention apart: the started rows over the ring, writing at column ``col``; the new
        prompts as one padded batch, each causally over itself, their keys/values written once
        per token to their K rows (the last prompt token at column ``col`` too). Returns the
        next-token log-probs [rows, V] fp32 (a new group's, computed once, for each of its K
        rows). The maths of ``FastLlamaEngine._forward``."""
        eng, w, pw, dt, eps = self.engine, self.engine.weights, pointwise_ops(), self.engine.dtype, self.engine.eps
        H, Hkv, D, cdt, K = eng.num_heads, eng.num_kv_heads, eng.head_dim, eng.cache_dtype, self.K
        R0, c = self.rows - K * len(new), self.col % self.width  # R0: rows of started groups
        if any(self._row_sample[R0 + j * K] != g.slot * K for j, g in enumerate(new)):
            raise RuntimeError("ContinuousEngine: the rows of groups admitted since the last step are not the last "
                               "ones of the cache in admission order (internal invariant)")
        ids, positions, plan = self.last_tok[:R0], self.pos[:R0], None
        if new:
            plan = self._prompt_plan(new, R0)
            ids = torch.cat([ids, *(g.prompt for g in new)])
            positions = torch.cat([positions, *(torch.arange(g.prompt.shape[0], device=self.device) for g in new)])
        cos, sin = self._cos[positions], self._sin[positions]  # [N, 1, D]
        bias, keys, values = self._bias[:R0], [k[:R0] for k in self._keys], [v[:R0] for v in self._values]
        x, dx = F.embedding(ids, w["embed"]), None  # [N, h]; dx: the last MLP output, not yet added
        for i in range(eng.num_layers):
            ln1 = w[f"{i}.ln1"]
            x, h = (x, pw["norm"](x, ln1, eps, dt)) if dx is None else pw["add_norm"](x, dx, ln1, eps, dt)
            heads = pw["rope"](F.linear(h, w[f"{i}.wqkv"], w.get(f"{i}.bqkv")), cos, sin, H + Hkv, D, dt)
            att = []
            if R0:
                q, k, v = heads[:R0].view(R0, 1, H + 2 * Hkv, D).transpose(1, 2).split((H, Hkv, Hkv), dim=1)
                keys[i][:, :, c : c + 1] = k
                values[i][:, :, c : c + 1] = v
                att.append(eng._attend(q, keys[i], values[i], bias).view(R0, H * D))  # [R0, H, 1, D]
            if plan is not None:
                G, Lmax = plan["pad"].shape
                flat = heads[R0:].view(-1, 1, H + 2 * Hkv, D).expand(-1, K, -1, -1)  # [sum P, K, H + 2 Hkv, D]
                self._keys[i].view(-1, D).index_copy_(0, plan["dest"], flat[:, :, H : H + Hkv].reshape(-1, D).to(cdt))
                self._values[i].view(-1, D).index_copy_(0, plan["dest"], flat[:, :, H + Hkv :].reshape(-1, D).to(cdt))
                q, k, v = heads[plan["pad"]].view(G, Lmax, H + 2 * Hkv, D).transpose(1, 2).split((H, Hkv, Hkv), dim=1)
                out = eng._attend(q, k.to(cdt), v.to(cdt), plan["bias"])  # [G, H, Lmax, D]
                att.append(out.transpose(1, 2).reshape(G * Lmax, H * D)[plan["real"]])
            x, dx = attn_out_and_mlp(pw, x, torch.cat(att) if len(att) > 1 else att[0], w, i, eps, dt)
        if plan is not None:
            last = torch.cat([torch.arange(R0, device=self.device), plan["last"]])
            x, dx = x[last], dx[last]
        logp = eng._logprobs(pw["add_norm"](x[: R0 + len(new)], dx[: R0 + len(new)], w["norm"], eps, dt)[1])
        return logp if plan is None else torch.cat([logp[:R0], logp[R0:].repeat_interleave(K, 0)])

    def _compact(self, ended: list[bool], stable: bool = False) -> None:
        """Drop the cache rows whose sample ended (``ended`` [rows]): the rows still decoding
        from the tail move into the holes, or (``stable``) every row moves up, keeping the order
        (the rows of groups not started yet must stay the last ones, in admission order)."""
        R = self.rows
        keep = R - sum(ended)
        dst = [r for r in range(keep) if ended[r]]
        src = [r for r in range(keep, R) if not ended[r]]
        if stable:
            moves = [(d, r) for d, r in enumerate(r for r in range(R) if not ended[r]) if d != r]
            dst, src = [d for d, _ in moves], [r for _, r in moves]
        if dst:
            d, s = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
            for t in (*self._keys, *self._values, self._bias, *(getattr(self, name) for name in _ROW_STATE)):
                t[d] = t[s]
            for a, b in zip(dst, src):
                self._row_sample[a] = self._row_sample[b]
        del self._row_sample[keep:]
        self.rows = keep

    def _group_rows(self, g: _Group) -> list[int]:
        """The cache rows of group ``g``'s samples still decoding."""
        first = g.slot * self.K
        return [r for r, s in enumerate(self._row_sample) if first <= s < first + self.K]

    # -- the schedule's calls --------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, n: int, prompt_ids: Sequence[int] | Tensor) -> int:  # prompt_ids [P] long, no padding
        """Start group n (K samples of ``prompt_ids``): reserve K rows, whose prompt the next
        :meth:`decode` prefills once (shared by the K rows) with the weights held now, and seed its
        generator with :func:`group_seed` (seed, n, rank). Returns the prompt's token count P."""
        n = check_int("n", n, minimum=0)
        if n in self.groups or n in self.finished:
            raise ValueError(f"n={n} is not valid; accepted: an admission index not in flight or finished "
                             "(release a group before its index is reused)")
        if len(self.groups) >= self.max_groups:
            raise RuntimeError(f"admit(n={n}): max_groups={self.max_groups} groups are in flight already; "
                               "a group leaves when its last sample ends (decode) or when released")
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).to(self.device).clone()
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"prompt_ids of shape {tuple(ids.shape)} is not valid; accepted: a non-empty 1-D "
                             "sequence of token ids (no padding)")
        P, K = ids.shape[0], self.K
        if P - 1 + self.T > self.width:
            self._grow(P - 1 + self.T)
        slot = min(set(range(self.max_groups)) - {g.slot for g in self.groups.values()})
        rows = slice(self.rows, self.rows + K)
        start = self.col - (P - 1)  # the prompt's first P - 1 tokens end just before the next decoding column
        self._bias[rows] = float("-inf")
        for a, b, _ in self._pieces(start, P - 1):
            self._bias[rows, :, :, a:b] = 0.0
        self.pos[rows], self.last_tok[rows], self.step[rows] = P - 1, ids[-1], 0
        self.sample[rows] = self._ar[slot * K : slot * K + K]
        self._row_sample.extend(range(slot * K, slot * K + K))
        self.rows += K
        self.out_ids[slot * K : slot * K + K], self.out_logp[slot * K : slot * K + K] = self.pad_id, 0.0
        gen = torch.Generator(device=self.device).manual_seed(group_seed(self.seed, n, self.rank))
        self.groups[n] = _Group(n=n, prompt=ids, generator=gen, slot=slot, start=start, pending=True,
                                ended=[False] * K)
        return P

    @torch.no_grad()
    def decode(self) -> dict[int, list[bool]]:
        """One decoding step: every sequence still decoding runs its last token through the
        decoder with the current weights and samples its next token from those logits, recording
        ``logp_behav`` and the version. A sample ends at an EOS token or after ``max_new_tokens``
        tokens. Returns ``{n: ended flags [K] after this step}`` for every group live before it
        (in admission order); a group whose samples all ended leaves (see :meth:`output`)."""
        check_stop("ContinuousEngine.decode")  # a SIGTERM is honoured within one token (reclight.engines.stop)
        if not self.groups:
            return {}
        K, R, c = self.K, self.rows, self.col % self.width
        pos, step, sample = self.pos[:R], self.step[:R], self.sample[:R]
        self._bias[:R, :, :, c] = 0.0  # every row writes its last token's key/value at column c
        new = [g for g in self.groups.values() if g.pending]
        logp = self._step_forward(new)  # [R, V] fp32
        for g in new:
            g.pending = False
        self.col += 1
        # Exactly K uniforms per live group from its own generator, into its output rows (the
        # draws of a sample that ended are not used).
        for g in self.groups.values():
            torch.rand(K, generator=g.generator, device=self.device, out=self._u[g.slot * K : g.slot * K + K])
        tok = inverse_cdf_sample(logp, self._u[sample][:, None])
        self.out_ids[sample, step] = tok
        self.out_logp[sample, step] = logp.gather(-1, tok[:, None]).squeeze(-1)
        ended = torch.isin(tok, self._eos) | (step == self.T - 1)
        self.last_tok[:R] = tok
        pos += 1
        step += 1
        ended_rows, version, out, finished = ended.tolist(), self.version, {}, []
        if any(ended_rows):
            by_slot = {g.slot: g for g in self.groups.values()}
            for r, e in enumerate(ended_rows):
                if e:
                    s = self._row_sample[r]
                    by_slot[s // K].ended[s % K] = True
            self._compact(ended_rows)
        for n, g in self.groups.items():
            g.steps += 1
            g.versions.append(version)
            out[n] = list(g.ended)
            if all(g.ended):
                finished.append(n)
        for n in finished:
            self._finish(n)
        return out

    def _finish(self, n: int) -> None:
        g = self.groups.pop(n)
        rows = slice(g.slot * self.K, g.slot * self.K + self.K)
        ids, logp = self.out_ids[rows, : g.steps].clone(), self.out_logp[rows, : g.steps].clone()
        mask = response_mask_from_ids(ids, self.engine.eos_ids)  # up to the first EOS (a sampled pad is real)
        self.finished[n] = GroupOutput(response_ids=ids, response_mask=mask, logp_behav=logp.masked_fill_(~mask, 0.0),
                                       token_version=torch.tensor(g.versions, dtype=torch.long, device=self.device),
                                       prompt_ids=g.prompt)

    @torch.no_grad()
    def swap(self, policy: torch.nn.Module | Mapping[str, Tensor], version: int, recompute_kv: bool) -> int:
        """Copy ``policy``'s weights into the engine (``FastLlamaEngine.update_weights``) as
        ``version``. With ``recompute_kv`` rebuild every live sequence's cached keys/values (its
        prompt and its cached response tokens) with the new weights and return the number of
        tokens run (see the module docstring); else keep the old entries and return 0."""
        for g in self.groups.values():  # prompts admitted since the last step: prefilled with the weights held
            if g.pending and g.prompt.shape[0] > 1:
                self._put(torch.tensor(self._group_rows(g), device=self.device), g.start,
                          *self._prompt_kv(g.prompt[:-1]))
            g.pending = False
        self.engine.update_weights(policy, version)
        if not recompute_kv:
            return 0
        return sum(self._reprefill(g) for g in self.groups.values())

    def _reprefill(self, g: _Group) -> int:
        eng, P, t = self.engine, g.prompt.shape[0], g.steps
        rows = torch.tensor(self._group_rows(g), device=self.device)
        prompt_len = min(P, P - 1 + t)  # the prompt tokens in the cache (the last one once decoded)
        if not prompt_len:
            return 0
        keys, values = self._prompt_kv(g.prompt[:prompt_len])
        L = t - 1  # cached response tokens per sample (its last one is run by the next decode)
        if L > 0:  # the samples' own tokens, each row over the shared prompt
            S = P + L
            keys, values = ([self._with_prefix(x, rows.numel(), S) for x in kv] for kv in (keys, values))
            causal = torch.ones(L, S, dtype=torch.bool, device=self.device).tril(diagonal=P)
            eng._forward(self.out_ids[self.sample[rows], :L], self._cos[None, P:S], self._sin[None, P:S], keys,
                         values, P, additive_mask(causal)[None, None])
        self._put(rows, g.start, keys, values)
        return prompt_len + max(L, 0) * rows.numel()

    def _with_prefix(self, prefix: Tensor, n: int, slots: int) -> Tensor:
        """A zero cache [n, Hkv, slots, D] whose first slots hold ``prefix`` [1, Hkv, P, D]."""
        out = torch.zeros((n, *prefix.shape[1:2], slots, prefix.shape[3]), dtype=prefix.dtype, device=self.device)
        out[:, :, : prefix.shape[2]] = prefix
        return out

    def output(self, n: int) -> GroupOutput:
        """Group n's samples, once all K ended (until :meth:`release`)."""
        if n not in self.finished:
            state = "still decoding" if n in self.groups else "not admitted or already released"
            raise ValueError(f"output(n={n}): group {n} is {state}; accepted: a group whose K samples all ended")
        return self.finished[n]

    def release(self, n: int) -> None:
        """Forget group n: its output, or (still decoding: abandoned) its rows."""
        if n in self.finished:
            del self.finished[n]
        elif n in self.groups:
            g = self.groups.pop(n)
            first = g.slot * self.K
            self._compact([first <= s < first + self.K for s in self._row_sample], stable=True)
        else:
            raise ValueError(f"release(n={n}): group {n} is not valid; accepted: a group in flight or finished "
                             f"(in flight: {self.live_groups}, finished: {sorted(self.finished)})")

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue bitwise, weights excepted (the ``FastLlamaEngine``'s own state
        holds them; load it first): the decoding rows' ring columns that some row has written,
        their bias, positions, last tokens, steps and output rows, the responses so far, each
        group's prompt, slot, ring start, steps, versions, ended flags and generator state, and
        the finished groups' outputs. Tensors are copies; the rest is plain Python."""
        R = self.rows
        first = min((g.start for g in self.groups.values()), default=self.col)
        cols = self._columns(first, self.col) if self.width else self._ar[:0]
        return {
            "format": STATE_FORMAT, "max_groups": self.max_groups, "num_samples": self.K, "max_new_tokens": self.T,
            "seed": self.seed, "rank": self.rank, "version": self.version, "width": self.width, "col": self.col,
            "first_col": first,
            "groups": [{"n": g.n, "prompt": g.prompt.tolist(), "slot": g.slot, "start": g.start,
                        "pending": g.pending, "steps": g.steps,
                        "versions": list(g.versions), "ended": list(g.ended), "generator": g.generator.get_state()}
                       for g in self.groups.values()],
            "keys": [k[:R][:, :, cols] for k in self._keys], "values": [v[:R][:, :, cols] for v in self._values],
            "bias": self._bias[:R, 0, 0][:, cols],
            **{name: getattr(self, name)[:R].clone() for name in _ROW_STATE},
            "out_ids": self.out_ids.clone(), "out_logp": self.out_logp.clone(),
            "finished": {n: {k: v.clone() for k, v in o.to_dict().items()} for n, o in self.finished.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into this engine (nothing in flight or finished is kept)."""
        mine = {"format": STATE_FORMAT, "max_groups": self.max_groups, "num_samples": self.K,
                "max_new_tokens": self.T, "seed": self.seed, "rank": self.rank, "version": self.version}
        for key, value in mine.items():
            if state.get(key) != value:
                hint = (" (load the FastLlamaEngine's state_dict first: it holds the weights and their version)"
                        if key == "version" else "")
                raise ValueError(f"{key}={value!r} differs from the saved state's {state.get(key)!r}; accepted: "
                                 f"the settings the state was saved with{hint}")
        self.groups, self.finished, self.rows, self._row_sample = {}, {}, 0, []
        self.width, self.col, self._keys, self._values = 0, int(state["col"]), [], []
        self._bias = torch.empty(len(self._ar), 1, 1, 0, device=self.device)
        if state["width"]:
            self._grow(int(state["width"]))
        R = state["pos"].shape[0]
        if R:
            cols = self._columns(int(state["first_col"]), self.col)
            for buf, saved in zip((*self._keys, *self._values), (*state["keys"], *state["values"])):
                buf[:R][:, :, cols] = saved.to(self.device)
            self._bias[:R, 0, 0][:, cols] = state["bias"].to(self.device)
        for name in _ROW_STATE:
            getattr(self, name)[:R] = state[name]
        self.out_ids.copy_(state["out_ids"])
        self.out_logp.copy_(state["out_logp"])
        self.rows, self._row_sample = R, state["sample"].tolist()
        for d in state["groups"]:
            gen = torch.Generator(device=self.device)
            gen.set_state(d["generator"])
            g = _Group(n=int(d["n"]), prompt=torch.tensor(d["prompt"], dtype=torch.long, device=self.device),
                       generator=gen, slot=int(d["slot"]), start=int(d["start"]), pending=bool(d["pending"]),
                       steps=int(d["steps"]),
                       versions=list(d["versions"]), ended=list(d["ended"]))
            self.groups[g.n] = g
        self.finished = {int(n): GroupOutput(**{k: v.to(self.device) for k, v in o.items()})
                         for n, o in state["finished"].items()}
