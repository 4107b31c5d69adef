"""Algorithm configuration and the paper's presets.

One frozen dataclass, :class:`AlgorithmConfig`, describes every algorithm reclight runs: REC
(clipping masks), REP (a regularizer term) and RED (data shaping), plus GRPO and plain
group-relative REINFORCE. The maths that consumes it lives in :mod:`reclight.advantages` and
:mod:`reclight.losses`; the presets below are the table of docs/algorithms.md section 3.

Adding an algorithm: if it is a new combination of existing knobs, add one entry to
``PRESETS`` (and ``configs/algo/<name>.yaml``). If it needs a new knob, add the field here with
its validation in ``__post_init__`` (with :mod:`reclight.checks`), consume it in ``losses.py`` or
``advantages.py``, and add a hand-derived test beside the others in ``tests/core/test_losses.py``.

Every preset is group-relative: the baseline is the group mean, so K >= 2 samples per prompt
are required (callers validate K; see ``MIN_GROUP_SIZE``).

Imports: torch-free on purpose (only the standard library and :mod:`reclight.checks`), so
configs can be validated before any heavy import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from reclight.checks import check_bool, check_choice, check_float, check_int, invalid

CLIP_MODES = ("none", "one_side", "two_side", "ring")
REGULARIZERS = ("none", "k2", "forward_kl")
ADVANTAGE_WEIGHTINGS = ("none", "exp")
DROP_MODES = ("none", "balance")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_IN = ("loss", "reward")
RATIO_LEVELS = ("token", "sequence")
RATIO_ANCHORS = ("behavior", "proximal")
BEHAVIOR_CORRECTIONS = ("none", "truncate", "mask")
CORRECTION_LEVELS = ("token", "sequence")
MIN_GROUP_SIZE = 2
FIELD_PREFIX = "model.algorithm."
"""Errors name a field as the trainer's command line spells it (``model.algorithm.eps_low``)."""


@dataclass(frozen=True)
class AlgorithmConfig:
    """Every knob of the REC / REP / RED family (docs/algorithms.md sections 1-3).

    The defaults are the paper's recommended default, ``rec_oneside_nois``.
    """

    clip_mode: Literal[CLIP_MODES] = "one_side"
    """Keep mask M: ``none``, ``one_side``, ``two_side`` or ``ring`` (it zeroes gradient,
    never clamps values)."""
    eps_low: float = 0.2
    """Lower band edge: tokens with rho < 1 - eps_low may be masked. Must lie in (0, 1)."""
    eps_high: float = 0.2
    """Upper band edge: tokens with rho > 1 + eps_high may be masked. Must be > 0."""
    eps_low_outer: float = 0.6
    """``ring`` only: a good token (A >= 0) with rho <= 1 - eps_low_outer keeps its gradient.
    Must lie in [eps_low, 1) when clip_mode is ``ring``."""
    eps_high_outer: float = 2.0
    """``ring`` only: a bad token (A <= 0) with rho >= 1 + eps_high_outer keeps its gradient.
    Must be >= eps_high when clip_mode is ``ring``."""
    importance_sampling: bool = False
    """Multiply the advantage by the detached ratio rho (the "IS" variants; equals the PPO
    clipped-surrogate gradient)."""
    std_normalize: bool = False
    """Divide group advantages by the group's population std + 1e-6 (GRPO)."""
    regularizer: Literal[REGULARIZERS] = "none"
    """Per-token loss term: ``none``, ``k2`` (OPMD, coef*(logp - logp_behav)^2) or
    ``forward_kl`` (AsymRE, -coef*logp)."""
    regularizer_coef: float = 0.0
    """Coefficient of the regularizer; must be >= 0."""
    advantage_weighting: Literal[ADVANTAGE_WEIGHTINGS] = "none"
    """``none`` or ``exp`` (RED-Weight: A -> A*exp(A/weight_temperature))."""
    weight_temperature: float = 1.0
    """Temperature of RED-Weight; must be > 0."""
    drop: Literal[DROP_MODES] = "none"
    """``none`` or ``balance`` (RED-Drop: drop negatives until #neg == #pos per group)."""
    loss_agg: Literal[LOSS_AGGS] = "token_mean"
    """``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum`` or
    ``seq_mean_token_sum_norm`` (Dr. GRPO: sum(l) / (N_seq * L), a constant normalizer)."""
    norm_length: int | None = None
    """L of ``seq_mean_token_sum_norm``; None: the caller's (the trainer passes max_new_tokens)."""
    ratio_anchor: Literal[RATIO_ANCHORS] = "behavior"
    """What the ratio rho (mask and IS factor) is measured against (docs/algorithms.md section 6.2):
    ``behavior`` (mu, the policy that sampled: the paper) or ``proximal`` (theta_t, the trainer's
    weights at the start of the step, AReaL's decoupled PPO); ``proximal`` also weights the
    advantage by w = pi_t / mu (detached), corrected by ``behavior_correction``."""
    behavior_correction: Literal[BEHAVIOR_CORRECTIONS] = "none"
    """``proximal`` only: ``none`` (A *= w), ``truncate`` (TIS: A *= min(w, cap)) or ``mask``
    (MIS: tokens or sequences with w > cap or w < 1/cap get M = 0, the others A *= w)."""
    behavior_correction_level: Literal[CORRECTION_LEVELS] = "token"
    """``token``: w per token; ``sequence``: w = exp(sum_t (logp_prox - logp_behav)) for every
    token of the sequence."""
    behavior_correction_cap: float = 2.0
    """C > 1 of ``truncate`` / ``mask``."""
    behavior_correction_floor: float | None = None
    """``mask`` only: the lower edge of the kept band [floor, C] of the behaviour weight, 0 <= floor <= 1
    (ICEPOP's separate lower bound); null: 1/C, the symmetric band (docs/algorithms.md section 6.8)."""
    kl_coef: float = 0.0
    """beta >= 0 of a KL penalty to the reference policy (the policy at the start of RL); 0 = off
    (docs/algorithms.md section 6.3)."""
    kl_estimator: Literal[KL_ESTIMATORS] = "k3"
    """``k1`` (-d), ``k2`` (d^2 / 2) or ``k3`` (exp(d) - d - 1), d = logp_ref - logp."""
    kl_in: Literal[KL_IN] = "loss"
    """``loss``: beta * k per token in the loss (gradient through logp, not masked by M);
    ``reward``: r_i -= beta * sum_t (logp_behav - logp_ref) before the group advantages."""
    kl_importance_weighted: bool = False
    """``loss`` only: multiply the KL term by rho = pi_theta / mu (detached, per token)."""
    entropy_coef: float = 0.0
    """>= 0: adds -entropy_coef * H_t per token (the full-vocabulary entropy of pi_theta,
    differentiable)."""
    ratio_level: Literal[RATIO_LEVELS] = "token"
    """``token`` or ``sequence`` (GSPO): rho_i = exp(mean over the sequence's valid tokens of
    (logp - logp_anchor)) for every token of sequence i, in the mask and the IS factor."""
    is_clip: tuple[float, float] | None = None
    """[low, high]: the IS factor becomes clamp(rho, 1 - low, 1 + high), detached (CISPO: every
    token keeps its gradient, with a bounded weight). Needs ``importance_sampling``."""
    dual_clip: float | None = None
    """c > 1: also M = 0 where A < 0 and rho > c (dual-clip PPO). Needs ``importance_sampling``."""
    filter_uniform_groups: bool = False
    """Groups whose valid rewards are all equal leave the loss and every count (keep = False;
    DAPO's dynamic sampling without refill)."""
    overlong_filter: bool = False
    """Trainer side: truncated samples (no end token within max_new_tokens) get keep = False."""
    overlong_penalty: bool = False
    """Trainer side (DAPO's soft overlong punishment): add 0 if |y| <= L - C, ((L - C) - |y|) / C
    if L - C < |y| <= L, and -1 if |y| > L to the reward, L = ``overlong_length``, C =
    ``overlong_cache``."""
    overlong_length: int | None = None
    """L of ``overlong_penalty``; None: the trainer's max_new_tokens."""
    overlong_cache: int | None = None
    """C of ``overlong_penalty``, 1 <= C <= L; None: 20% of L rounded down, at least 1 (DAPO's
    4096 of 20480)."""
    geo_mask: tuple[float, float] | None = None
    """[low, high], 0 <= low <= 1 <= high: M = 0 for every token of a sequence whose geometric-mean
    behaviour ratio exp(mean_t log w_t) leaves [low, high] (SkyRL's geometric sequence mask; verl's
    seq_mean_k1 band [a, b] is [1/b, 1/a] here). w_t = pi_t / mu with the proximal anchor, pi_theta / mu
    (detached, each update) with the behaviour anchor (docs/algorithms.md section 6.8)."""
    token_veto: tuple[float | None, float | None] | None = None
    """[low, high], either side null (no bound), 0 <= low <= 1 <= high: M = 0 for every token of a
    sequence holding a token whose behaviour ratio w_t is below low or above high (SkyRL's outlier
    thresholds; verl's former token veto is [threshold, null]); w_t as for ``geo_mask``."""
    opsm_threshold: float | None = None
    """delta >= 0: M = 0 for every token of a sequence with A < 0 whose mean over its tokens of
    log(mu / pi_theta) (pi_theta detached, at every update) exceeds delta (DeepSeek-V3.2's off-policy
    sequence masking, OPSM); null: off."""
    truncation_correction: bool = False
    """Top-p sampling: measure every ratio against the distribution the engine sampled, the truncated
    and renormalised one: log mu = logp_behav - log S, S the probability mass top-p kept at that
    position (recorded by the ``hf`` engine; needs model.sampling.top_p < 1)."""

    def __post_init__(self) -> None:
        f = FIELD_PREFIX
        check_choice(f + "clip_mode", self.clip_mode, CLIP_MODES)
        check_choice(f + "regularizer", self.regularizer, REGULARIZERS)
        check_choice(f + "advantage_weighting", self.advantage_weighting, ADVANTAGE_WEIGHTINGS)
        check_choice(f + "drop", self.drop, DROP_MODES)
        check_choice(f + "loss_agg", self.loss_agg, LOSS_AGGS)
        check_bool(f + "importance_sampling", self.importance_sampling)
        check_bool(f + "std_normalize", self.std_normalize)
        eps_low = check_float(f + "eps_low", self.eps_low, gt=0.0, lt=1.0)
        eps_high = check_float(f + "eps_high", self.eps_high, gt=0.0)
        eps_low_outer = check_float(f + "eps_low_outer", self.eps_low_outer)
        eps_high_outer = check_float(f + "eps_high_outer", self.eps_high_outer)
        if self.clip_mode == "ring" and not eps_low <= eps_low_outer < 1.0:
            raise invalid(f + "eps_low_outer", self.eps_low_outer, f"eps_low ({eps_low}) <= eps_low_outer < 1")
        if self.clip_mode == "ring" and not eps_high_outer >= eps_high:
            raise invalid(f + "eps_high_outer", self.eps_high_outer, f"eps_high_outer >= eps_high ({eps_high})")
        check_float(f + "regularizer_coef", self.regularizer_coef, ge=0.0)
        check_float(f + "weight_temperature", self.weight_temperature, gt=0.0)
        check_choice(f + "ratio_anchor", self.ratio_anchor, RATIO_ANCHORS)
        check_choice(f + "behavior_correction", self.behavior_correction, BEHAVIOR_CORRECTIONS)
        check_choice(f + "behavior_correction_level", self.behavior_correction_level, CORRECTION_LEVELS)
        check_float(f + "behavior_correction_cap", self.behavior_correction_cap, gt=1.0)
        check_int(f + "norm_length", self.norm_length, minimum=1, allow_none=True)
        check_float(f + "kl_coef", self.kl_coef, ge=0.0)
        check_choice(f + "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice(f + "kl_in", self.kl_in, KL_IN)
        check_bool(f + "kl_importance_weighted", self.kl_importance_weighted)
        if self.kl_importance_weighted and self.kl_in != "loss":
            raise invalid(f + "kl_importance_weighted", True, "false with kl_in 'reward' (the reward penalty has "
                          "no gradient to weight)")
        check_float(f + "entropy_coef", self.entropy_coef, ge=0.0)
        check_choice(f + "ratio_level", self.ratio_level, RATIO_LEVELS)
        if self.is_clip is not None:
            bounds, accepted = self.is_clip, "null or [low, high] with 0 <= low <= 1 and high >= 0"
            try:
                if isinstance(bounds, (str, bytes)) or len(bounds) != 2:
                    raise ValueError
                low = check_float(f + "is_clip", bounds[0], ge=0.0, le=1.0)
                high = check_float(f + "is_clip", bounds[1], ge=0.0)
            except (ValueError, TypeError):
                raise invalid(f + "is_clip", bounds, accepted) from None
            object.__setattr__(self, "is_clip", (low, high))
            if not self.importance_sampling:
                raise invalid(f + "is_clip", self.is_clip, "null without importance_sampling (it clips the IS factor)")
        if self.dual_clip is not None:
            check_float(f + "dual_clip", self.dual_clip, gt=1.0, accepted="null or a number > 1")
            if not self.importance_sampling:
                raise invalid(f + "dual_clip", self.dual_clip, "null without importance_sampling (dual-clip PPO "
                              "bounds the IS-weighted loss of negative advantages)")
        for name in ("filter_uniform_groups", "overlong_filter", "overlong_penalty"):
            check_bool(f + name, getattr(self, name))
        check_int(f + "overlong_length", self.overlong_length, minimum=1, allow_none=True)
        check_int(f + "overlong_cache", self.overlong_cache, minimum=1, allow_none=True)
        if self.overlong_length is not None and self.overlong_cache is not None and \
                self.overlong_cache > self.overlong_length:
            raise invalid(f + "overlong_cache", self.overlong_cache,
                          f"an integer in [1, overlong_length={self.overlong_length}]")
        if self.behavior_correction != "none" and self.ratio_anchor == "behavior":
            raise invalid(f + "behavior_correction", self.behavior_correction,
                          "'none' with ratio_anchor 'behavior' (the ratio is already measured against mu: a "
                          "correction would count the behaviour ratio twice); set ratio_anchor: proximal")
        self._check_rollout_corrections()

    def _check_rollout_corrections(self) -> None:
        """The fields of docs/algorithms.md section 6.8: bands hold 1 and have low <= high, thresholds
        are finite, and each field is refused where it would do nothing."""
        f = FIELD_PREFIX
        if self.behavior_correction_floor is not None:
            if self.behavior_correction != "mask":
                raise invalid(f + "behavior_correction_floor", self.behavior_correction_floor,
                              f"null with behavior_correction {self.behavior_correction!r} (the floor is the lower "
                              "edge of the mask's band; set behavior_correction: mask)")
            check_float(f + "behavior_correction_floor", self.behavior_correction_floor, ge=0.0, le=1.0,
                        accepted="null or a number in [0, 1] (the band [floor, behavior_correction_cap] must "
                        "hold w = 1)")
        if self.geo_mask is not None:
            object.__setattr__(self, "geo_mask", _band(f + "geo_mask", self.geo_mask, open_sides=False))
        if self.token_veto is not None:
            object.__setattr__(self, "token_veto", _band(f + "token_veto", self.token_veto, open_sides=True))
        if self.opsm_threshold is not None:
            check_float(f + "opsm_threshold", self.opsm_threshold, ge=0.0,
                        accepted="null or a number >= 0 (delta; a negative one drops on-policy negatives too)")
        check_bool(f + "truncation_correction", self.truncation_correction)

    def check_sampling(self, engine: str, top_p: float) -> None:
        """Config-time check against the run's engine (``model.engine.name``) and
        ``model.sampling.top_p``: ``truncation_correction`` needs an engine that records the kept
        mass S (``hf``; ``auto`` resolves to ``hf`` whenever top_p < 1) and a top_p that truncates."""
        if not self.truncation_correction:
            return
        field = FIELD_PREFIX + "truncation_correction"
        if engine in ("fast", "vllm"):
            raise invalid(field, True, f"false with model.engine.name {engine!r}: that engine does not record the "
                          "probability mass top-p kept (use model.engine.name: hf)")
        if not top_p < 1.0:
            raise invalid(field, True, f"false with model.sampling.top_p {top_p!r}: nothing is truncated (the "
                          "correction needs top_p < 1)")

    @property
    def needs_proximal(self) -> bool:
        """Whether the loss needs ``logp_prox`` (the trainer then computes it once per batch)."""
        return self.ratio_anchor == "proximal"

    @property
    def rejects_sequences(self) -> bool:
        """Whether a whole-sequence rule of section 6.8 is on (``geo_mask``, ``token_veto``, ``opsm_threshold``)."""
        return self.geo_mask is not None or self.token_veto is not None or self.opsm_threshold is not None

    @property
    def needs_reference(self) -> bool:
        """Whether the loss or the rewards need ``logp_ref`` (the reference policy's log-probs)."""
        return self.kl_coef > 0

    def overlong_bounds(self, max_new_tokens: int) -> tuple[int, int]:
        """(L, C) of the overlong penalty for a run sampling at most ``max_new_tokens``; raises
        naming the field when the cache does not fit the length."""
        length = self.overlong_length or max_new_tokens
        cache = self.overlong_cache if self.overlong_cache is not None else max(1, length // 5)
        if cache > length:
            raise invalid(FIELD_PREFIX + "overlong_cache", cache, f"an integer in [1, overlong_length={length}] "
                          f"(the length is max_new_tokens={max_new_tokens} unless overlong_length is set)")
        return length, cache

    def replace(self, **overrides: Any) -> "AlgorithmConfig":
        """A copy with ``overrides`` applied (and validated); unknown fields are rejected."""
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _band(field: str, value: Any, *, open_sides: bool) -> tuple[Any, Any]:
    """``[low, high]`` with 0 <= low <= 1 <= high, finite; with ``open_sides`` either side may be None
    (no bound), not both. Returns the pair as a tuple of floats (or None)."""
    sides = "each a finite number or null, not both null" if open_sides else "two finite numbers"
    accepted = f"null or [low, high] ({sides}) with 0 <= low <= 1 <= high"
    try:
        if isinstance(value, (str, bytes)) or len(value) != 2:
            raise ValueError
        low, high = value
        if open_sides and low is None and high is None:
            raise ValueError
        low = None if (open_sides and low is None) else check_float(field, low, ge=0.0)
        high = None if (open_sides and high is None) else check_float(field, high, ge=0.0)
    except (ValueError, TypeError):
        raise invalid(field, value, accepted) from None
    if low is not None and high is not None and low > high:
        raise invalid(field, value, accepted + f" (here low {low:g} > high {high:g})")
    if (low is not None and low > 1.0) or (high is not None and high < 1.0):
        raise invalid(field, value, accepted + " (a band without 1 rejects every on-policy sample)")
    return low, high


def _check_fields(overrides: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"{FIELD_PREFIX.rstrip('.')} has no field {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(sorted(known))}"
        )


_NO_CLIP = dict(clip_mode="none")
_WIDE = dict(eps_low=0.6, eps_high=2.0)

PRESETS: dict[str, AlgorithmConfig] = {
    "reinforce": AlgorithmConfig(**_NO_CLIP),
    "grpo": AlgorithmConfig(clip_mode="one_side", importance_sampling=True, std_normalize=True),
    "rec_oneside_is": AlgorithmConfig(clip_mode="one_side", importance_sampling=True),
    "rec_oneside_nois": AlgorithmConfig(clip_mode="one_side"),
    "rec_oneside_is_wide": AlgorithmConfig(
        clip_mode="one_side", importance_sampling=True, **_WIDE
    ),
    "rec_oneside_nois_wide": AlgorithmConfig(clip_mode="one_side", **_WIDE),
    "rec_twoside_is": AlgorithmConfig(clip_mode="two_side", importance_sampling=True),
    "rec_twoside_nois": AlgorithmConfig(clip_mode="two_side"),
    "rec_ring_is": AlgorithmConfig(clip_mode="ring", importance_sampling=True),
    "rec_ring_nois": AlgorithmConfig(clip_mode="ring"),
    "opmd": AlgorithmConfig(**_NO_CLIP, regularizer="k2", regularizer_coef=0.1),
    "asymre": AlgorithmConfig(**_NO_CLIP, regularizer="forward_kl", regularizer_coef=0.1),
    "red_drop": AlgorithmConfig(**_NO_CLIP, drop="balance"),
    "red_weight": AlgorithmConfig(
        **_NO_CLIP, advantage_weighting="exp", weight_temperature=1.0
    ),
}
PRESETS.update({
    # DeepSeekMath's GRPO: the k3 estimator of KL(pi || ref) in the loss, beta 0.04 (as TRL's beta).
    "grpo_kl": PRESETS["grpo"].replace(kl_coef=0.04, kl_estimator="k3", kl_in="loss"),
    # Dr. GRPO: no std normalisation and a constant normalizer (no length bias).
    "dr_grpo": AlgorithmConfig(clip_mode="one_side", importance_sampling=True, loss_agg="seq_mean_token_sum_norm"),
    # DAPO: clip-higher (0.2, 0.28), dynamic sampling (uniform groups filtered, no refill), soft overlong
    # punishment (L = max_new_tokens, C = 20% of L unless set).
    "dapo": AlgorithmConfig(clip_mode="one_side", eps_high=0.28, importance_sampling=True, std_normalize=True,
                            filter_uniform_groups=True, overlong_penalty=True),
    # GSPO (Qwen3): length-normalised sequence ratio, its tiny clip range, one loss per sequence.
    "gspo": AlgorithmConfig(clip_mode="one_side", eps_low=3e-4, eps_high=4e-4, importance_sampling=True,
                            std_normalize=True, ratio_level="sequence", loss_agg="seq_mean_token_mean"),
    # CISPO (MiniMax-M1): no mask; the IS weight clamped to [0, 1 + 5] and detached, so every token keeps
    # its gradient. Lower bound: none (MiniMax-M1 sets eps_low^IS "large"); upper: SkyRL's CISPOConfig
    # default cispo_eps_clip_high = 5 (MiniMax-M1 does not publish its eps_high^IS).
    "cispo": AlgorithmConfig(clip_mode="none", importance_sampling=True, is_clip=(1.0, 5.0), std_normalize=True),
    # AReaL's decoupled PPO with token-level TIS: rec_oneside_is measured against the proximal policy,
    # the advantage weighted by min(pi_t / mu, 2).
    "decoupled_tis": PRESETS["rec_oneside_is"].replace(ratio_anchor="proximal", behavior_correction="truncate",
                                                       behavior_correction_level="token",
                                                       behavior_correction_cap=2.0),
})
PRESETS.update({
    # IcePop (NeMo-RL's truncated_importance_sampling_type "icepop", reference band 0.5-5): decoupled_tis
    # whose token weight pi_t / mu is kept inside [0.5, 5] and zeroes the token's gradient outside it.
    "icepop": PRESETS["decoupled_tis"].replace(behavior_correction="mask", behavior_correction_floor=0.5,
                                               behavior_correction_cap=5.0),
    # SkyRL's off-policy correction {tis_ratio_type: token (cap 2), sequence_mask_metric: geometric,
    # geo_mask_low: 0.99, geo_mask_high: 1.01}: decoupled_tis plus the geometric sequence mask.
    "geo_mask": PRESETS["decoupled_tis"].replace(geo_mask=(0.99, 1.01)),
    # DeepSeek-V3.2's off-policy sequence masking on GRPO, delta = slime's default --opsm-delta 1e-4.
    "opsm": PRESETS["grpo"].replace(opsm_threshold=1e-4),
})
"""The 14 presets of docs/algorithms.md section 3 (all ``token_mean``, no reference KL), the six of
section 6.7 (``grpo_kl``, ``dr_grpo``, ``dapo``, ``gspo``, ``cispo``, ``decoupled_tis``) and the three of
section 6.8 (``icepop``, ``geo_mask``, ``opsm``)."""
PAPER_PRESETS = tuple(list(PRESETS)[:14])
"""The paper's 14 presets (the bandit bench's default set)."""


def get_algorithm(name: str, **overrides: Any) -> AlgorithmConfig:
    """The preset ``name`` with ``overrides`` applied, e.g.
    ``get_algorithm("rec_oneside_nois", eps_high=0.28)``. Raises ``ValueError`` naming the
    preset or field when either is unknown, and on any invalid value."""
    if name not in PRESETS:
        raise ValueError(
            f"algorithm preset {name!r} is unknown; accepted: {', '.join(PRESETS)}"
        )
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
