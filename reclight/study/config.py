"""The study config: arms, off-policy settings, seeds, the shared base, and the claims with
their rules, all fixed in one YAML file BEFORE any run (``configs/study/*.yaml``).

Every field is documented below (the dataclasses are the schema); :func:`load_study` reads
the YAML and validates all of it before anything runs or is written: an unknown key, preset,
setting, statistic or rule, a claim naming an arm or cell that is not in the study, no seeds,
a margin outside the accuracy scale, ... is a ``ValueError`` naming the field, the value and
what is accepted. (Whether each arm's ``reclight fit`` arguments parse is checked next, by the
real CLI, in :func:`reclight.study.plan.validate_commands`.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reclight.algorithms import PRESETS
from reclight.checks import check_bool, check_float, check_int, check_out_dir, invalid
from reclight.clock import ClockConfig, ClockCosts
from reclight.stats import BINARY_RULES, FAMILIES, RULES
from reclight.sync import PAPER_SETTINGS

STATISTICS = {
    "final": "mean of the last `last_evals` evaluations (the main job's 'after' figure)",
    "auc": "mean of every evaluation after step 0 (area under the accuracy curve / steps: speed and level)",
    "early": "mean of the evaluations in (0, max_steps / 4] (how fast it starts)",
    "drawdown": "largest drop from the running best evaluation (max over k of best_{j<=k} - acc_k): instability",
    "collapsed": "1 if `final` < `collapse_floor`, else 0 (per seed; its mean is the fraction of seeds that collapsed)",
    "len_trained": "mean over the steps of `response/len_mean`, the trained responses' length in tokens",
    "staleness": "mean over the steps of `rollout/staleness_mean` (steps between a sample's oldest token's "
                 "version and the step that trains it)",
}
"""Per-seed figures of a run: of its held-out accuracy curve (``val/acc``, in [0, 1]), and of
the trained data (``len_trained``, ``staleness``: a claim on them gives its own ``margin``)."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WARMUP_KEYS = ("model.policy", "model.warmup", "model.seed", "data.task", "seed_everything",
               "model.sampling.max_new_tokens", "model.monitor.eval_max_new_tokens",
               "model.train_forward.attn_implementation")
"""What the supervised warm-up depends on: the arms and settings may not change these (every arm
of a seed starts from ONE warmed-up model)."""
RESERVED_KEYS = ("model.algorithm.preset", "model.sync", "model.clock", "trainer.logger", "seed_everything",
                 "model.policy.tiny_dir")
"""Set by the study itself for every run (the arm's preset, the setting, the run folder, the
seed, the tiny model's folder under ``out_dir``). An arm may set other ``model.algorithm`` fields
(``model.algorithm.std_normalize: true``); the base may not (every arm's algorithm is its preset
plus its own overrides)."""


@dataclass(frozen=True)
class Setting:
    """One off-policy setting: the schedule of docs/algorithms.md section 4 (``model.sync``)."""

    name: str
    """Its name in the report and the run folders."""
    sync_interval: int = 1
    """k: the engine receives the trainer's weights every k steps."""
    sync_offset: int = 0
    """d: the engine runs d steps ahead."""
    offline: bool = False
    """Every batch from the initial policy (d = the run's steps)."""
    clock: dict[str, Any] | None = None
    """An asynchronous schedule instead (docs/algorithms.md section 7): fields of ``model.clock``
    (``enabled`` implied), e.g. ``{staleness: pace, max_staleness: 1, weight_update: inflight}``;
    the run then keeps the section 4 defaults (k = 1, d = 0)."""
    lr: float | None = None
    """The RL learning rate of this setting's runs (``model.optim.lr``, the RL phase only: the
    warm-up keeps ``model.warmup.lr``, so every lr of a seed starts from one warm-up); null: the
    base's. Set by the study's ``lrs`` axis, or by hand on every setting (then no arm and no base
    override may set ``model.optim.lr``)."""

    def as_sync(self) -> dict[str, Any]:
        return {"sync_interval": self.sync_interval, "sync_offset": self.sync_offset, "offline": self.offline}

    def as_clock(self) -> dict[str, Any] | None:
        """The run's ``model.clock`` (None: the synchronous schedule)."""
        return None if self.clock is None else {**self.clock, "enabled": True}

    def describe(self) -> str:
        lr = "" if self.lr is None else f", lr={self.lr:g}"
        if self.clock is not None:
            return "clock: " + ", ".join(f"{k}={v}" for k, v in self.clock.items() if k != "costs") + lr
        return ("offline (d = steps)" if self.offline else f"k={self.sync_interval}, d={self.sync_offset}") + lr


PAPER = {
    "on_policy": Setting("on_policy"),
    "periodic": Setting("periodic", sync_interval=PAPER_SETTINGS["periodic"][0]),
    "lag": Setting("lag", sync_offset=PAPER_SETTINGS["lag"][1]),
    "offline": Setting("offline", offline=True),
}
"""The paper's four settings by name (``reclight.sync.PAPER_SETTINGS``; offline as
``model.sync.offline: true``, i.e. d = the run's steps)."""


@dataclass(frozen=True)
class Arm:
    """One algorithm of the study: a preset plus ``reclight fit`` overrides."""

    name: str
    """Its name in the report, the claims and the run folders."""
    preset: str
    """A name of ``reclight.algorithms.PRESETS`` (``--model.algorithm.preset``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra ``reclight fit`` arguments: dotted key -> value, a value may be a mapping (a config
    snippet), e.g. ``{model.algorithm.std_normalize: true}`` or, once that group
    lands, ``{model.updates: {epochs: 2, mini_batches: 2}}``."""
    configs: tuple[str, ...] = ()
    """Extra config files of this arm, composed after the base's."""
    settings: tuple[str, ...] | None = None
    """The study settings this arm runs under (null: all of them)."""


BINARY_STATISTICS = ("collapsed",)
"""Statistics that are 0 or 1 per seed: tested exactly (``reclight.stats``), ``less``/``greater`` only."""


@dataclass(frozen=True)
class Claim:
    """One pre-registered claim: ``statistic(a) - statistic(b)`` obeys ``rule`` with the study margin."""

    text: str
    """What the paper claims, in words."""
    a: str
    """``arm`` or ``arm@setting``: the first cell (without ``@``: each of ``settings``)."""
    b: str
    """``arm`` or ``arm@setting``: the second cell."""
    statistic: str
    """One of ``STATISTICS``."""
    rule: str
    """One of ``reclight.stats.RULES``: less, greater, alike, not_worse (a binary statistic such as
    ``collapsed``: less or greater, tested exactly with margin 0)."""
    family: str
    """Required, fixed before any run: ``primary`` (a headline claim: the primary rows are
    Holm-adjusted as one family, and the report's headline counts are theirs) or ``secondary``
    (reported with its per-row verdict, not adjusted: exploratory)."""
    settings: tuple[str, ...] | None = None
    """Settings the claim is tested under, one report row each (null: every setting both arms
    run under); unused when both sides name their setting."""
    margin: float | None = None
    """This claim's delta, in the statistic's units (null: the study's ``margin``, in accuracy
    units); required for ``len_trained`` and ``staleness``."""
    source: str | None = None
    """Where the claim comes from, in the report beside it: the statement of the paper it tests
    (quoted, with its section or figure) or ``reclight's own question``. Optional in general;
    ``configs/study/paper.yaml`` gives one for every claim (a test checks)."""


@dataclass(frozen=True)
class StudyConfig:
    """A study: arms x settings x seeds of plain ``reclight fit`` runs, and the claims."""

    name: str
    """The study's name (report title)."""
    out_dir: str
    """The one folder of everything the study writes: ``tiny-model/`` (the embedded model the
    warm-ups start from), ``warmup/seed<S>/`` (the warmed-up models), ``runs/<setting>/<arm>/seed<S>/``
    (each run's metrics.csv, config and log), the report."""
    base: tuple[str, ...]
    """Config files shared by every run, in order (``reclight fit --config ...``)."""
    arms: tuple[Arm, ...]
    """The algorithms (a mapping name -> {preset, overrides, configs, settings} in YAML)."""
    settings: tuple[Setting, ...]
    """Off-policy settings: the paper's by name (on_policy, periodic, lag, offline) or
    ``{name, sync_interval, sync_offset}`` for any other (k, d)."""
    seeds: tuple[int, ...]
    """Seeds (``--seed_everything``); seed S's runs all start from the warm-up of seed S."""
    claims: tuple[Claim, ...]
    """The claims with their rules, fixed before running."""
    margin: float
    """delta of every rule, in accuracy units (0 < margin < 1), fixed before running."""
    base_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra ``reclight fit`` arguments of every run (dotted key -> value)."""
    lrs: tuple[float, ...] | None = None
    """A learning-rate axis, e.g. ``[1.0e-4, 3.0e-4, 1.0e-3]``: every setting runs at each of
    these RL learning rates as its own setting, named ``<setting>_lr<lr>`` (``offline_lr1e-3``:
    the name claims and run folders use, ``reinforce@offline_lr1e-3``), with its ``lr`` set
    (``settings`` holds these, setting by setting). Null: no axis."""
    last_evals: int = 3
    """Evaluations averaged by the ``final`` statistic."""
    collapse_floor: float = 0.2
    """A run whose ``final`` accuracy is below this has collapsed (``collapsed`` statistic)."""
    threads: int = 1
    """Torch threads per run (``OMP_NUM_THREADS``)."""
    workers: int | None = None
    """Runs at once (null: the usable CPU cores // threads)."""

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def arm_settings(self, arm: Arm) -> tuple[str, ...]:
        return arm.settings if arm.settings is not None else tuple(s.name for s in self.settings)

    def cells(self) -> list[tuple[str, str]]:
        """``(setting, arm)`` of every cell, settings first (the order of the report)."""
        return [(s.name, a.name) for s in self.settings for a in self.arms if s.name in self.arm_settings(a)]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what :func:`load_study` reads back)."""
        d = dataclasses.asdict(self)
        d["arms"] = {a.pop("name"): a for a in d["arms"]}
        settings = self.settings
        if self.lrs is not None:  # the settings as written: the first lr's, without the axis's suffix and lr
            tag = "_lr" + lr_tag(self.lrs[0])
            settings = tuple(dataclasses.replace(s, name=s.name.removesuffix(tag), lr=None)
                             for s in settings if s.lr == self.lrs[0])
        d["settings"] = [s.name if PAPER.get(s.name) == s else dataclasses.asdict(s) for s in settings]
        return json.loads(json.dumps(d))  # plain lists and dicts (YAML-safe)


def _keys(where: str, value: Any, accepted: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``value`` as a mapping whose keys are among ``accepted`` and include ``required``."""
    if not isinstance(value, dict):
        raise invalid(where, value, f"a mapping with keys {', '.join(accepted)}")
    for k in value:
        if k not in accepted:
            raise invalid(f"{where}.{k}", value[k], f"no such field; {where} accepts {', '.join(accepted)}")
    for k in required:
        if k not in value:
            raise invalid(where, value, f"a mapping with the required key {k!r} (fields: {', '.join(accepted)})")
    return value


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise invalid(where, value, "a name of letters, digits, '_', '.', '-' (it names a folder)")
    return value


def _str_list(where: str, value: Any, *, nonempty: bool = True) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or (nonempty and not value):
        raise invalid(where, value, "a non-empty list of strings" if nonempty else "a list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            raise invalid(f"{where}[{i}]", v, "a non-empty string")
    return tuple(value)


def _overrides(where: str, value: Any, reserved: tuple[str, ...] = RESERVED_KEYS) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(where, value, "a mapping of dotted `reclight fit` keys to values, e.g. {trainer.max_steps: 200}")
    for key in value:
        if not isinstance(key, str) or not re.match(r"^[A-Za-z_][\w.]*$", key):
            raise invalid(f"{where} key", key, "a dotted `reclight fit` key such as model.optim.lr")
        for r in reserved:
            inner = value[key]  # a mapping may reach a reserved key too: {model.algorithm: {preset: ...}}
            for part in r[len(key) + 1:].split(".") if r.startswith(key + ".") else ():
                inner = inner.get(part) if isinstance(inner, dict) and part in inner else None
            if key == r or key.startswith(r + ".") or (r.startswith(key + ".") and inner is not None):
                raise invalid(f"{where}.{key}", value[key], f"any key but {', '.join(reserved)} (the study sets them: "
                              "the preset goes in the arm, the schedule in settings, the seeds in seeds, the tiny "
                              "model under out_dir/tiny-model)")
    return dict(value)


def _setting(where: str, value: Any) -> Setting:
    if isinstance(value, str):
        if value not in PAPER:
            raise invalid(where, value, f"one of {', '.join(PAPER)}, or a mapping {{name, sync_interval, sync_offset}}")
        return PAPER[value]
    v = _keys(where, value, _fields(Setting), required=("name",))
    clock = v.get("clock")
    if clock is not None:
        if not isinstance(clock, dict) or "enabled" in clock:
            raise invalid(f"{where}.clock", clock, "a mapping of model.clock fields (enabled is implied), e.g. "
                          "{staleness: pace, max_staleness: 1}")
        if (value.get("sync_interval", 1), value.get("sync_offset", 0), value.get("offline", False)) != (1, 0, False):
            raise invalid(f"{where}.clock", clock, "a setting with either model.clock fields or a (k, d) schedule, "
                          "not both")
        try:  # validated now, with the trainer's own checks (their messages name model.clock.<field>)
            ClockConfig(**{**clock, "enabled": True,
                           **({"costs": ClockCosts(**clock["costs"])} if isinstance(clock.get("costs"), dict) else {})})
        except TypeError as e:
            raise invalid(f"{where}.clock", clock, f"fields of model.clock ({e})") from None
    s = Setting(name=_name(f"{where}.name", v["name"]),
                sync_interval=check_int(f"{where}.sync_interval", v.get("sync_interval", 1), minimum=1),
                sync_offset=check_int(f"{where}.sync_offset", v.get("sync_offset", 0), minimum=0),
                offline=check_bool(f"{where}.offline", v.get("offline", False)), clock=clock,
                lr=None if v.get("lr") is None else _lr(f"{where}.lr", v["lr"]))
    if s.name in PAPER and PAPER[s.name] != s:
        raise invalid(f"{where}.name", s.name, f"a name other than the paper's {', '.join(PAPER)} for a custom (k, d)")
    return s


def lr_tag(lr: float) -> str:
    """A learning rate as it appears in a setting's name: ``1e-3``, ``3e-4``, ``2.5e-4`` (7
    significant digits at most)."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _lr(where: str, value: Any) -> float:
    """A learning rate: a finite number > 0 (YAML 1.1 reads ``1e-4`` as text: the message says so)."""
    hint = ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]+[eE][-+]?[0-9]+", value.strip()):
        mantissa, exponent = f"{float(value):.6e}".split("e")
        yaml_float = f"{mantissa.rstrip('0')}{'0' if mantissa.endswith('.000000') else ''}e{int(exponent):+d}"
        hint = f"; write {yaml_float}, not {value}: YAML reads a number without a '.' before its 'e' as text"
    return check_float(where, value, gt=0, accepted="a finite number > 0 (the RL learning rate, model.optim.lr)" + hint)


def _lr_axis(value: Any, settings: list[Setting]) -> list[Setting]:
    """``settings`` at each learning rate of the ``lrs`` axis (setting by setting, lrs in the order
    given), each named ``<setting>_lr<lr_tag>`` with its ``lr`` set."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise invalid("lrs", value, "a non-empty list of distinct learning rates > 0, e.g. [1.0e-4, 3.0e-4, 1.0e-3]")
    lrs = [_lr(f"lrs[{i}]", v) for i, v in enumerate(value)]
    if len({lr_tag(lr) for lr in lrs}) != len(lrs):
        raise invalid("lrs", list(value), "distinct learning rates (at 7 significant digits: they name the settings)")
    for i, s in enumerate(settings):
        if s.lr is not None:
            raise invalid(f"settings[{i}].lr", s.lr, "no lr on a setting when the study has an lrs axis (each setting "
                          "runs at every lr of lrs; give lrs or one lr per setting, not both)")
    return [dataclasses.replace(s, name=f"{s.name}_lr{lr_tag(lr)}", lr=lr) for s in settings for lr in lrs]


def _setting_key(overrides: dict[str, Any], target: str) -> str | None:
    """The key of ``overrides`` that sets the dotted ``target``, by name or through a mapping
    (``{model.optim: {lr: ...}}``); None if none does."""
    for key, value in overrides.items():
        if key == target or key.startswith(target + "."):
            return key
        if target.startswith(key + "."):
            inner = value
            for part in target[len(key) + 1:].split("."):
                if not isinstance(inner, dict) or part not in inner:
                    break
                inner = inner[part]
            else:
                return key
    return None


def _check_lr_overrides(cfg: StudyConfig) -> None:
    """With a learning-rate axis (``lrs``, or an ``lr`` on every setting), no arm and no base
    override may set ``model.optim.lr``: which one a cell ran at would be ambiguous."""
    if all(s.lr is None for s in cfg.settings):
        return
    if any(s.lr is None for s in cfg.settings):
        i, s = next((i, s) for i, s in enumerate(cfg.settings) if s.lr is None)
        raise invalid(f"settings[{i}].lr", None, f"a learning rate on every setting, or on none (setting "
                      f"{s.name!r} has none while others have one)")
    for where, overrides in [("base_overrides", cfg.base_overrides)] + [(f"arms.{a.name}.overrides", a.overrides)
                                                                        for a in cfg.arms]:
        key = _setting_key(overrides, "model.optim.lr")
        if key is not None:
            raise invalid(f"{where}.{key}", overrides[key], "any key but model.optim.lr while the study has a "
                          "learning-rate axis (lrs, or settings[*].lr): each cell's RL learning rate is its setting's, "
                          "so another one is ambiguous (the warm-up's is model.warmup.lr)")


def _arm(name: str, value: Any, setting_names: tuple[str, ...]) -> Arm:
    where = f"arms.{name}"
    _name("arms key", name)
    if isinstance(value, str):  # shorthand: `reinforce: reinforce`
        value = {"preset": value}
    v = _keys(where, value, _fields(Arm)[1:], required=("preset",))
    preset = v["preset"]
    if preset not in PRESETS:
        raise invalid(f"{where}.preset", preset, ", ".join(PRESETS))
    settings = _setting_list(f"{where}.settings", v.get("settings"), setting_names)
    return Arm(name=name, preset=preset, overrides=_overrides(f"{where}.overrides", v.get("overrides")),
               configs=_str_list(f"{where}.configs", v.get("configs", []), nonempty=False), settings=settings)


def _setting_list(where: str, value: Any, setting_names: tuple[str, ...]) -> tuple[str, ...] | None:
    """``value`` as a list of the study's setting names (None stays None: every setting)."""
    if value is None:
        return None
    settings = _str_list(where, value)
    for i, s in enumerate(settings):
        if s not in setting_names:
            raise invalid(f"{where}[{i}]", s, f"a setting of the study: {', '.join(setting_names)}")
    return settings


def _side(where: str, value: Any, cfg_arms: dict[str, Arm], setting_names: tuple[str, ...]) -> tuple[str, str | None]:
    if not isinstance(value, str) or not value:
        raise invalid(where, value, "'arm' or 'arm@setting'")
    arm, _, setting = value.partition("@")
    if arm not in cfg_arms:
        raise invalid(where, value, f"an arm of the study: {', '.join(cfg_arms)} (optionally @setting)")
    if setting and setting not in setting_names:
        raise invalid(where, value, f"'{arm}@<setting>' with a setting of the study: {', '.join(setting_names)}")
    return arm, setting or None


def claim_cells(cfg: StudyConfig, claim: Claim) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The ``((arm_a, setting_a), (arm_b, setting_b))`` pairs (report rows) of ``claim``."""
    arms = {a.name: a for a in cfg.arms}
    names = tuple(s.name for s in cfg.settings)
    (arm_a, set_a), (arm_b, set_b) = (_side("a", claim.a, arms, names), _side("b", claim.b, arms, names))
    if set_a and set_b:
        return [((arm_a, set_a), (arm_b, set_b))]
    if claim.settings is not None:
        over = claim.settings
    else:
        runs = [set(cfg.arm_settings(arms[arm])) for arm, s in ((arm_a, set_a), (arm_b, set_b)) if s is None]
        over = tuple(n for n in names if all(n in r for r in runs))
    return [((arm_a, set_a or s), (arm_b, set_b or s)) for s in over]


def _source(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid(where, value, "a non-empty string (the paper's statement with its section or figure, or "
                      "\"reclight's own question\"), or null")
    return " ".join(value.split())


def _claim(i: int, value: Any, cfg: StudyConfig) -> Claim:
    where = f"claims[{i}]"
    v = _keys(where, value, _fields(Claim), required=("text", "a", "b", "statistic", "rule"))
    if not isinstance(v["text"], str) or not v["text"].strip():
        raise invalid(f"{where}.text", v["text"], "a non-empty string")
    if v.get("family") not in FAMILIES:
        raise invalid(f"{where}.family", v.get("family"), f"{' or '.join(FAMILIES)}, required for every claim and "
                      f"fixed before any run (claim {v['text'].strip()!r}; primary claims are Holm-adjusted as one "
                      "family)")
    if v["statistic"] not in STATISTICS:
        raise invalid(f"{where}.statistic", v["statistic"], ", ".join(STATISTICS))
    if v["rule"] not in RULES:
        raise invalid(f"{where}.rule", v["rule"], ", ".join(RULES))
    if v["statistic"] in BINARY_STATISTICS and v["rule"] not in BINARY_RULES:
        raise invalid(f"{where}.rule", v["rule"], f"{' or '.join(BINARY_RULES)} for the binary statistic "
                      f"{v['statistic']} (0/1 per seed: an exact paired test, which has no margin)")
    arms = {a.name: a for a in cfg.arms}
    names = tuple(s.name for s in cfg.settings)
    for side in ("a", "b"):
        _side(f"{where}.{side}", v[side], arms, names)
    settings = _setting_list(f"{where}.settings", v.get("settings"), names)
    margin = v.get("margin")
    if margin is not None:
        margin = check_float(f"{where}.margin", margin, gt=0)
    elif v["statistic"] in ("len_trained", "staleness"):
        raise invalid(f"{where}.margin", None, f"a number > 0 in the units of {v['statistic']} (the study's margin "
                      "is in accuracy units)")
    claim = Claim(text=v["text"].strip(), a=v["a"], b=v["b"], statistic=v["statistic"], rule=v["rule"],
                  family=v["family"], settings=settings, margin=margin, source=_source(f"{where}.source", v.get("source")))
    rows = claim_cells(cfg, claim)
    if not rows:
        raise invalid(where, f"{claim.a} vs {claim.b}", "a claim with at least one setting both arms run under")
    cells = set(cfg.cells())
    for (arm_a, set_a), (arm_b, set_b) in rows:
        for arm, s in ((arm_a, set_a), (arm_b, set_b)):
            if (s, arm) not in cells:
                raise invalid(where, f"{arm}@{s}", f"cells the study runs: arm {arm} runs under "
                              f"{', '.join(cfg.arm_settings(arms[arm]))}")
        if (arm_a, set_a) == (arm_b, set_b):
            raise invalid(where, f"{arm_a}@{set_a} vs itself", "two different cells")
    return claim


TOP_KEYS = _fields(StudyConfig)


def study_from_dict(raw: Any, source: str = "the study config", check_files: bool = True) -> StudyConfig:
    """Validate a parsed study YAML (see the module docstring) into a :class:`StudyConfig`
    (``check_files=False``: do not require the config files to exist, for reading a finished
    study's folder elsewhere)."""
    v = _keys(source, raw, TOP_KEYS, required=("name", "out_dir", "base", "arms", "settings", "seeds", "claims",
                                               "margin"))
    settings: list[Setting] = []
    if not isinstance(v["settings"], list) or not v["settings"]:
        raise invalid("settings", v["settings"], f"a non-empty list of {', '.join(PAPER)} or {{name, sync_interval, "
                      "sync_offset}} mappings")
    for i, s in enumerate(v["settings"]):
        setting = _setting(f"settings[{i}]", s)
        if setting.name in [x.name for x in settings]:
            raise invalid(f"settings[{i}]", setting.name, "distinct setting names")
        settings.append(setting)
    lrs = v.get("lrs")
    if lrs is not None:
        settings = _lr_axis(lrs, settings)
        if len({s.name for s in settings}) != len(settings):
            raise invalid("lrs", lrs, f"learning rates whose setting names ({', '.join(s.name for s in settings)}) "
                          "are distinct from each other and from the other settings")
    names = tuple(s.name for s in settings)
    if not isinstance(v["arms"], dict) or not v["arms"]:
        raise invalid("arms", v["arms"], "a non-empty mapping name -> {preset, overrides, configs, settings}")
    arms = tuple(_arm(name, spec, names) for name, spec in v["arms"].items())
    seeds = v["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise invalid("seeds", seeds, "a non-empty list of distinct integers >= 0")
    seeds = tuple(check_int(f"seeds[{i}]", s, minimum=0) for i, s in enumerate(seeds))
    if len(set(seeds)) != len(seeds):
        raise invalid("seeds", list(seeds), "distinct integers >= 0")
    base = _str_list("base", v["base"])
    for i, path in enumerate(base + tuple(c for a in arms for c in a.configs)):
        if check_files and not Path(path).is_file():
            raise invalid("base" if i < len(base) else "arms.*.configs", path, "an existing config file (paths are "
                          "relative to the folder the study runs from)")
    workers = v.get("workers")
    cfg = StudyConfig(
        name=_name("name", v["name"]), out_dir=check_out_dir("out_dir", v["out_dir"]), base=base, arms=arms,
        settings=tuple(settings), seeds=seeds, claims=(),
        margin=check_float("margin", v["margin"], gt=0, lt=1, accepted="0 < margin < 1 (accuracy units: every "
                           "statistic lies in [0, 1], so a margin >= 1 makes greater/less unreachable)"),
        base_overrides=_overrides("base_overrides", v.get("base_overrides"), RESERVED_KEYS + ("model.algorithm",)),
        last_evals=check_int("last_evals", v.get("last_evals", 3), minimum=1),
        collapse_floor=check_float("collapse_floor", v.get("collapse_floor", 0.2), ge=0, le=1,
                                   accepted="a number in [0, 1] (accuracy)"),
        threads=check_int("threads", v.get("threads", 1), minimum=1),
        workers=check_int("workers", workers, minimum=1, allow_none=True),
        lrs=None if lrs is None else tuple(float(lr) for lr in lrs),
    )
    _check_lr_overrides(cfg)
    if not isinstance(v["claims"], list):
        raise invalid("claims", v["claims"], "a list of {text, a, b, statistic, rule, family, settings, margin} "
                      "mappings")
    claims = tuple(_claim(i, c, cfg) for i, c in enumerate(v["claims"]))
    return dataclasses.replace(cfg, claims=claims)


def load_study(paths: str | Path | list[str | Path], overrides: dict[str, Any] | None = None,
               check_files: bool = True, field: str = "--config") -> StudyConfig:
    """Read one or more study YAML files (later files replace earlier top-level keys), apply
    ``overrides`` (top-level keys, e.g. ``{"out_dir": ...}``) and validate. Every error names
    the file(s); ``field`` is the option that named them (``--config``; ``DIR`` for a report)."""
    from reclight.yamlio import load_yaml_file

    raw: dict[str, Any] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(path)
        if not p.is_file():
            raise invalid(field, str(path), "an existing study YAML file (e.g. configs/study/paper.yaml)")
        # file and line of a syntax error, an empty file or a list; a repeated key (an arm given twice) refused
        raw.update(load_yaml_file(p, field, "a YAML mapping of study fields, each key once: " + ", ".join(TOP_KEYS)))
    raw.update(overrides or {})
    files = " + ".join(str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths))
    try:
        return study_from_dict(raw, check_files=check_files)
    except ValueError as err:
        raise ValueError(f"{files}: {err}") from None
