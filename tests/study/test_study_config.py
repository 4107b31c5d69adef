"""The study config is validated before any run starts or any file is written: each bad config
below is an error naming the field, the value and what is accepted; every shipped study YAML
parses, arms included, through the real ``reclight fit`` parser."""

from pathlib import Path

import pytest
from study_helpers import ROOT, micro_study, write_study

from reclight.study.cli import main
from reclight.study.config import claim_cells, load_study, study_from_dict
from reclight.study.plan import make_plan, validate_commands

SHIPPED = sorted((ROOT / "configs" / "study").glob("*.yaml"))


def _claim(**kw):
    return [{"text": "t", "a": "clip", "b": "reinforce", "statistic": "final", "rule": "not_worse", "family": "primary", **kw}]


BAD = [
    # (changes, message fragment)
    ({"arms": {"clip": {"preset": "ppo"}}}, "arms.clip.preset='ppo' is not valid; accepted: reinforce, grpo"),
    ({"settings": ["weekly"]}, "settings[0]='weekly' is not valid; accepted: one of on_policy, periodic, lag, offline"),
    ({"claims": _claim(a="clip", b="ppo_arm")},
     "claims[0].b='ppo_arm' is not valid; accepted: an arm of the study: reinforce, clip"),
    ({"claims": _claim(a="clip@lag")}, "claims[0].a='clip@lag' is not valid; accepted: 'clip@<setting>' with a "
     "setting of the study: periodic"),
    # asynchronous settings (model.clock): validated with the trainer's own checks; a claim on the
    # trained data's length or staleness states its own margin
    ({"settings": [{"name": "fast", "clock": {"max_inflight": 0}}]}, "model.clock.max_inflight=0 is not valid"),
    ({"settings": [{"name": "fast", "clock": {"staleness": "pace", "sync_offset": 2}}]},
     "settings[0].clock={'staleness': 'pace', 'sync_offset': 2} is not valid; accepted: fields of model.clock"),
    ({"settings": [{"name": "fast", "sync_offset": 1, "clock": {"staleness": "pace"}}]},
     "accepted: a setting with either model.clock fields or a (k, d) schedule, not both"),
    ({"claims": _claim(statistic="len_trained")}, "claims[0].margin=None is not valid; accepted: a number > 0 in the "
     "units of len_trained"),
    ({"seeds": []}, "seeds=[] is not valid; accepted: a non-empty list of distinct integers >= 0"),
    ({"seeds": [0, 0]}, "seeds=[0, 0] is not valid; accepted: distinct integers >= 0"),
    ({"seeds": [-1]}, "seeds[0]=-1 is not valid; accepted: an integer >= 0"),
    ({"margin": 1e9}, "margin=1000000000.0 is not valid; accepted: 0 < margin < 1 (accuracy units"),
    ({"margin": float("nan")}, "margin=nan is not valid; accepted: 0 < margin < 1"),
    ({"claims": _claim(statistic="median")}, "claims[0].statistic='median' is not valid; accepted: final, auc, early, "
     "drawdown, collapsed"),
    ({"claims": _claim(rule="most")}, "claims[0].rule='most' is not valid; accepted: less, greater, alike, not_worse"),
    # every claim says, before any run, whether it is in the Holm-adjusted primary family
    ({"claims": [{k: v for k, v in _claim()[0].items() if k != "family"}]},
     "claims[0].family=None is not valid; accepted: primary or secondary, required for every claim and fixed before "
     "any run (claim 't';"),
    ({"claims": _claim(family="headline")}, "claims[0].family='headline' is not valid; accepted: primary or secondary"),
    ({"claims": _claim(source="  ")}, "claims[0].source='  ' is not valid; accepted: a non-empty string (the paper's "
     "statement with its section or figure"),
    # a 0/1 statistic gets an exact paired test, which has no margin: alike / not_worse are refused
    ({"claims": _claim(statistic="collapsed", rule="alike")}, "claims[0].rule='alike' is not valid; accepted: less or "
     "greater for the binary statistic collapsed"),
    ({"claims": _claim(a="clip@periodic", b="clip@periodic")}, "claims[0]='clip@periodic vs itself' is not valid"),
    ({"arms": {"clip": {"preset": "rec_oneside_nois", "settings": ["lag"]}}},
     "arms.clip.settings[0]='lag' is not valid; accepted: a setting of the study: periodic"),
    ({"arms": {"clip": {"preset": "rec_oneside_nois", "overrides": {"model.sync": {"sync_interval": 2}}}}},
     "arms.clip.overrides.model.sync={'sync_interval': 2} is not valid; accepted: any key but model.algorithm.preset"),
    # the preset of an arm is its own field: a snippet that reaches model.algorithm.preset is refused too
    ({"arms": {"clip": {"preset": "rec_oneside_nois", "overrides": {"model.algorithm": {"preset": "grpo"}}}}},
     "arms.clip.overrides.model.algorithm={'preset': 'grpo'} is not valid; accepted: any key but model.algorithm.preset"),
    ({"arms": {"clip": {"preset": "rec_oneside_nois", "temperature": 2}}},
     "arms.clip.temperature=2 is not valid; accepted: no such field; arms.clip accepts preset, overrides, configs, "
     "settings"),
    ({"arms": {"my arm": "reinforce"}}, "arms key='my arm' is not valid; accepted: a name of letters"),
    ({"arms": {}}, "arms={} is not valid; accepted: a non-empty mapping"),
    ({"base": ["configs/nope.yaml"]}, "base='configs/nope.yaml' is not valid; accepted: an existing config file"),
    ({"workers": 0}, "workers=0 is not valid; accepted: None or an integer >= 1"),
    ({"seeds_per_cell": 3}, "the study config.seeds_per_cell=3 is not valid; accepted: no such field"),
    ({"settings": ["periodic", {"name": "periodic", "sync_interval": 5}]},
     "settings[1].name='periodic' is not valid; accepted: a name other than the paper's"),
]


@pytest.mark.parametrize("changes,needle", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_study_config_is_named(tmp_path, changes, needle):
    with pytest.raises(ValueError) as err:
        study_from_dict(micro_study(tmp_path, **changes))
    assert needle in str(err.value)


def test_bad_config_through_the_cli_writes_nothing(tmp_path, capsys):
    """The real command: exit status 2, the message on stderr, and no study folder created."""
    path = write_study(tmp_path / "bad.yaml", micro_study(tmp_path, arms={"clip": "ppo"}))
    assert main(["--config", str(path)]) == 2
    assert f"{path}: arms.clip.preset='ppo' is not valid; accepted: reinforce" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_a_repeated_key_in_a_study_yaml_is_refused_naming_the_line(tmp_path, capsys):
    """Before: YAML kept the last of two equal keys, silently: an arm named `reinforce` ran grpo."""
    text = write_study(tmp_path / "s.yaml", micro_study(tmp_path)).read_text()
    first = text.splitlines().index("  reinforce: reinforce") + 1
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("  reinforce: reinforce\n", "  reinforce: reinforce\n  reinforce: grpo\n"))
    assert main(["--config", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"--config={str(path)!r} is not valid: line {first + 1}, column 3: key 'reinforce' is given twice in one "
            f"mapping (first at line {first}); YAML would keep only the last one; accepted: a YAML mapping of study "
            "fields, each key once: ") in err
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match=r"empty.yaml' is not valid: the file holds no YAML value \(only comments\)"):
        load_study(tmp_path / "empty.yaml")
    assert not (tmp_path / "study").exists()


def test_out_dir_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir='.*f/study' is not valid; accepted: a folder path \(this one is "
                                         r"under the file"):
        study_from_dict(micro_study(tmp_path, out_dir=str(tmp_path / "f" / "study")))


def test_an_arm_may_not_change_the_warmup(tmp_path):
    """Every arm of a seed starts from ONE warm-up, so an arm changing what it depends on is refused
    (after parsing through the real `reclight fit` parser)."""
    arms = {"reinforce": "reinforce", "clip": {"preset": "rec_oneside_nois",
                                              "overrides": {"model.warmup.lr": 0.01}}}
    cfg = study_from_dict(micro_study(tmp_path, arms=arms))
    with pytest.raises(ValueError, match=r"arms.clip \(model.warmup\)=.*is not valid; accepted: the base's value"):
        validate_commands(cfg)


def test_a_typo_in_an_override_fails_in_the_real_parser(tmp_path):
    arms = {"reinforce": "reinforce", "clip": {"preset": "rec_oneside_nois", "overrides": {"model.optim.lrr": 1}}}
    cfg = study_from_dict(micro_study(tmp_path, arms=arms))
    with pytest.raises(ValueError, match=r"arms.clip: `reclight fit` refuses its arguments: .*model.optim has no "
                                         r"field 'lrr'"):
        validate_commands(cfg)


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"paper.yaml", "quick.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_study_parses_through_the_real_cli(path, monkeypatch):
    """The config, every claim's cells, and every arm's `reclight fit` arguments (real parser)."""
    monkeypatch.chdir(ROOT)
    cfg = load_study(path)
    shape = validate_commands(cfg)
    jobs = make_plan(cfg, shape)
    runs = [j for j in jobs if not j.is_warmup]
    assert len(runs) == len(cfg.cells()) * len(cfg.seeds) and len(jobs) - len(runs) == len(cfg.seeds)
    assert len(cfg.seeds) >= 3 and shape.warmup and shape.max_steps % shape.val_check_interval == 0
    assert all(f"--model.policy.name_or_path={Path(cfg.out_dir) / 'warmup' / f'seed{j.seed}'}" in j.argv for j in runs)


def test_paper_study_covers_the_issue_claims(monkeypatch):
    """paper.yaml: the four settings, 9 cells x 8 seeds, and as its primary family exactly the
    paper's headline claims that issue #23 names (REINFORCE degrades at periodic, lag, offline;
    one-side clipping keeps learning at periodic and offline; IS alike NoIS; OPMD's and AsymRE's
    regularizers keep REINFORCE from degrading); paper_more.yaml keeps the paper's other
    comparisons, every one secondary."""
    monkeypatch.chdir(ROOT)
    cfg = load_study(ROOT / "configs" / "study" / "paper.yaml")
    assert [s.name for s in cfg.settings] == ["on_policy", "periodic", "lag", "offline"]
    assert len(cfg.cells()) == 9 and len(cfg.seeds) == 8
    preset = {a.name: a.preset for a in cfg.arms}
    rows = set()
    for c in cfg.claims:
        if c.family == "primary":
            for (arm_a, set_a), (arm_b, set_b) in claim_cells(cfg, c):
                rows.add((preset[arm_a], set_a, preset[arm_b], set_b, c.rule))
    assert rows == {
        ("reinforce", "periodic", "reinforce", "on_policy", "less"),
        ("reinforce", "lag", "reinforce", "on_policy", "less"),
        ("reinforce", "offline", "reinforce", "on_policy", "less"),
        ("rec_oneside_nois", "periodic", "reinforce", "periodic", "greater"),
        ("rec_oneside_nois", "offline", "reinforce", "offline", "greater"),
        ("rec_oneside_is", "periodic", "rec_oneside_nois", "periodic", "alike"),
        ("opmd", "periodic", "reinforce", "periodic", "greater"),
        ("asymre", "periodic", "reinforce", "periodic", "greater"),
    }
    more = load_study(ROOT / "configs" / "study" / "paper_more.yaml")
    assert {c.family for c in more.claims} == {"secondary"}
    presets = {a.preset for a in cfg.arms} | {a.preset for a in more.arms}
    assert presets >= {"reinforce", "rec_oneside_nois", "rec_oneside_is", "rec_oneside_nois_wide", "rec_twoside_nois",
                       "rec_ring_nois", "opmd", "asymre", "red_drop", "red_weight", "grpo"}
    assert any(a.overrides.get("model.updates") for a in more.arms)  # several updates per batch, on-policy


def test_a_clock_setting_runs_with_model_clock(tmp_path):
    """A setting with ``clock`` fields: its runs get ``--model.clock`` (enabled) and keep the
    section 4 defaults; the real parser accepts them."""
    import json

    study = micro_study(tmp_path, settings=[{"name": "pace1", "clock": {"staleness": "pace", "max_staleness": 1,
                                                                        "max_inflight": 3}}])
    cfg = study_from_dict(study)
    jobs = make_plan(cfg, validate_commands(cfg))
    runs = [j for j in jobs if not j.is_warmup]
    assert len(runs) == 4
    for job in runs:
        clock = [a for a in job.argv if a.startswith("--model.clock=")]
        assert len(clock) == 1 and json.loads(clock[0].split("=", 1)[1]) == {
            "staleness": "pace", "max_staleness": 1, "max_inflight": 3, "enabled": True}
    assert cfg.settings[0].describe() == "clock: staleness=pace, max_staleness=1, max_inflight=3"
    # the study writes its normalized config (study.yaml) and its warm-ups and report read it back
    assert study_from_dict(cfg.to_dict()) == cfg


def test_every_claim_of_the_default_study_names_its_source(monkeypatch):
    """Issue #23 item 5: each claim of configs/study/paper.yaml quotes or cites what it tests, or
    says it is reclight's own question; the headline (primary) family is the paper's."""
    monkeypatch.chdir(ROOT)
    cfg = load_study(ROOT / "configs" / "study" / "paper.yaml")
    assert all(c.source for c in cfg.claims), [c.text for c in cfg.claims if not c.source]
    for c in cfg.claims:
        assert any(k in c.source for k in ("2509.24203", "the paper", "docs/algorithms.md", "reclight's own question")), c
    primary = [c for c in cfg.claims if c.family == "primary"]
    assert all("reclight's own question" not in c.source for c in primary)
    assert len(cfg.seeds) >= 8
