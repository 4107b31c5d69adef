"""The learning-rate axis of a study (``lrs``): each (setting, lr) is a setting of its own, named
``<setting>_lr<lr>``, whose runs get ``--model.optim.lr`` (the RL phase only: one warm-up per
seed for every lr); a bad lr, or a second source of ``model.optim.lr``, is refused naming the
file, the field, the value and what is accepted."""

import json

import pytest
import yaml
from study_helpers import ROOT, micro_study, write_study

from reclight.study.config import load_study, lr_tag, study_from_dict
from reclight.study.plan import make_plan, parse_fit, validate_commands

LRS = [1.0e-4, 3.0e-4, 1.0e-3]
NAMES = ["periodic_lr1e-4", "periodic_lr3e-4", "periodic_lr1e-3", "offline_lr1e-4", "offline_lr3e-4",
         "offline_lr1e-3"]


def _lr_study(tmp_path, **changes):
    claims = [{"text": "clipping beats REINFORCE offline at lr 1e-3", "a": "clip@offline_lr1e-3",
               "b": "reinforce@offline_lr1e-3", "statistic": "final", "rule": "greater", "family": "primary"},
              {"text": "clipping not worse", "a": "clip", "b": "reinforce", "statistic": "final", "rule": "not_worse",
               "family": "secondary"}]
    return micro_study(tmp_path, settings=["periodic", "offline"], lrs=LRS, claims=claims, **changes)


def test_lr_tags():
    assert [lr_tag(x) for x in (1e-4, 3e-4, 1e-3, 2.5e-4, 0.5, 1.0)] == ["1e-4", "3e-4", "1e-3", "2.5e-4", "5e-1",
                                                                          "1e0"]


def test_each_setting_runs_at_each_lr_with_one_warmup_per_seed(tmp_path):
    """2 settings x 3 lrs = 6 settings; 2 arms x 6 x 2 seeds = 24 runs after 2 warm-ups (one per
    seed, shared by every lr). Each run's command sets model.optim.lr to its setting's lr, once,
    and the real parser reads exactly that lr, with the base's warm-up lr untouched."""
    cfg = study_from_dict(_lr_study(tmp_path))
    assert [s.name for s in cfg.settings] == NAMES
    assert [s.lr for s in cfg.settings] == LRS * 2 and [s.offline for s in cfg.settings] == [False] * 3 + [True] * 3
    assert cfg.settings[5].describe() == "offline (d = steps), lr=0.001"
    jobs = make_plan(cfg, validate_commands(cfg))
    warmups, runs = [j for j in jobs if j.is_warmup], [j for j in jobs if not j.is_warmup]
    assert len(warmups) == 2 and len(runs) == 24
    base = parse_fit(["--config", str(ROOT / "configs" / "smoke_test.yaml")], "base").config
    for job in runs:
        lr = cfg.setting(job.setting).lr
        assert [a for a in job.argv if a.startswith("--model.optim.lr")] == [f"--model.optim.lr={lr!r}"]
        assert job.folder == tmp_path / "study" / "runs" / job.setting / job.arm / f"seed{job.seed}"
    # clip @ offline_lr3e-4, as the real parser reads it (less the warm-up folder, not written here)
    run = next(j for j in runs if (j.arm, j.setting) == ("clip", "offline_lr3e-4"))
    args = [a for a in run.argv[1:] if not a.startswith(("--model.policy.name_or_path", "--model.warmup="))]
    parsed = parse_fit(args, "run").config
    assert parsed.get("model.optim.lr") == 3e-4 and base.get("model.optim.lr") == 1e-3
    assert parsed.get("model.warmup") == base.get("model.warmup") and parsed.get("model.sync.offline") is True
    # the claims: one cell pair named by setting and lr; an unnamed one covers all six settings
    assert len(cfg.claims) == 2 and cfg.claims[0].a == "clip@offline_lr1e-3"
    # study.yaml keeps the axis as written, and reads back to the same study
    written = cfg.to_dict()
    assert written["settings"] == ["periodic", "offline"] and written["lrs"] == LRS
    assert study_from_dict(written) == cfg


def test_an_lr_on_each_setting_by_hand(tmp_path):
    settings = [{"name": "fast", "sync_interval": 20, "lr": 1.0e-3},
                {"name": "slow", "sync_interval": 20, "lr": 1.0e-4}]
    cfg = study_from_dict(micro_study(tmp_path, settings=settings))
    assert [(s.name, s.lr) for s in cfg.settings] == [("fast", 1e-3), ("slow", 1e-4)]
    runs = [j for j in make_plan(cfg, validate_commands(cfg)) if not j.is_warmup]
    assert sorted({a for j in runs for a in j.argv if a.startswith("--model.optim.lr")}) == [
        "--model.optim.lr=0.0001", "--model.optim.lr=0.001"]
    assert study_from_dict(cfg.to_dict()) == cfg


ACCEPTED = "accepted: a finite number > 0 (the RL learning rate, model.optim.lr)"
BAD = [
    ({"lrs": [1.0e-4, 0.0]}, f"lrs[1]=0.0 is not valid; {ACCEPTED}"),
    ({"lrs": [-1.0e-3]}, f"lrs[0]=-0.001 is not valid; {ACCEPTED}"),
    ({"lrs": [float("inf")]}, f"lrs[0]=inf is not valid; {ACCEPTED}"),
    ({"lrs": [float("nan")]}, f"lrs[0]=nan is not valid; {ACCEPTED}"),
    ({"lrs": ["1e-4"]}, f"lrs[0]='1e-4' is not valid; {ACCEPTED}; write 1.0e-4, not 1e-4: YAML reads a number "
                        "without a '.' before its 'e' as text"),
    ({"lrs": []}, "lrs=[] is not valid; accepted: a non-empty list of distinct learning rates > 0"),
    ({"lrs": 1.0e-3}, "lrs=0.001 is not valid; accepted: a non-empty list of distinct learning rates > 0"),
    ({"lrs": [1.0e-3, 0.001]}, "lrs=[0.001, 0.001] is not valid; accepted: distinct learning rates"),
    ({"settings": [{"name": "p", "sync_interval": 2, "lr": 0}]}, f"settings[0].lr=0 is not valid; {ACCEPTED}"),
    ({"settings": [{"name": "p", "sync_interval": 2, "lr": 1.0e-3}], "lrs": [1.0e-4]},
     "settings[0].lr=0.001 is not valid; accepted: no lr on a setting when the study has an lrs axis"),
    ({"settings": [{"name": "p", "sync_interval": 2, "lr": 1.0e-3}, "offline"]},
     "settings[1].lr=None is not valid; accepted: a learning rate on every setting, or on none (setting 'offline'"),
    ({"lrs": [1.0e-3], "base_overrides": {"model.optim.lr": 0.01}},
     "base_overrides.model.optim.lr=0.01 is not valid; accepted: any key but model.optim.lr while the study has a "
     "learning-rate axis"),
    ({"lrs": [1.0e-3], "arms": {"reinforce": "reinforce",
                                "clip": {"preset": "rec_oneside_nois", "overrides": {"model.optim": {"lr": 0.01}}}}},
     "arms.clip.overrides.model.optim={'lr': 0.01} is not valid; accepted: any key but model.optim.lr"),
]


@pytest.mark.parametrize("changes,needle", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_lr_axis_names_the_file_the_field_and_the_value(tmp_path, changes, needle):
    study = micro_study(tmp_path)
    study.update(changes)
    if "base_overrides" in changes:
        study["base_overrides"] = {**micro_study(tmp_path)["base_overrides"], **changes["base_overrides"]}
    path = write_study(tmp_path / "bad.yaml", study)
    with pytest.raises(ValueError) as err:
        load_study(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_without_the_axis_an_arm_may_set_its_lr(tmp_path):
    arms = {"reinforce": "reinforce", "clip": {"preset": "rec_oneside_nois", "overrides": {"model.optim.lr": 0.01}}}
    cfg = study_from_dict(micro_study(tmp_path, arms=arms))
    assert validate_commands(cfg).max_steps == 3 and all(s.lr is None for s in cfg.settings)


def test_an_arm_config_file_may_not_set_the_lr_under_the_axis(tmp_path):
    """The arm's own config file sets model.optim.lr: found by the real parser, before any run."""
    snippet = tmp_path / "lr.yaml"
    snippet.write_text(yaml.safe_dump({"model": {"optim": {"lr": 0.05}}}))
    arms = {"reinforce": "reinforce", "clip": {"preset": "rec_oneside_nois", "configs": [str(snippet)]}}
    cfg = study_from_dict(_lr_study(tmp_path, arms=arms))
    with pytest.raises(ValueError, match=r"arms.clip \(model.optim.lr\)=0.05 is not valid; accepted: the base's value "
                                         r".*with a learning-rate axis"):
        validate_commands(cfg)


def test_the_shipped_lr_study(monkeypatch):
    """configs/study/lr.yaml: REINFORCE and one-side clipping (NoIS) on-policy and off-policy at 3
    learning rates; one warm-up per seed; every claim names its family; at most 45 minutes by the
    estimate in its comments (runs x 65 s / 2 at a time, plus the warm-ups)."""
    monkeypatch.chdir(ROOT)
    path = ROOT / "configs" / "study" / "lr.yaml"
    cfg = load_study(path)
    assert len(cfg.lrs) == 3 and {a.preset for a in cfg.arms} == {"reinforce", "rec_oneside_nois"}
    assert {s.name.rsplit("_lr", 1)[0] for s in cfg.settings} >= {"on_policy", "offline"}
    jobs = make_plan(cfg, validate_commands(cfg))
    runs = [j for j in jobs if not j.is_warmup]
    assert len(jobs) - len(runs) == len(cfg.seeds)
    assert len(runs) * 65 / 2 + len(cfg.seeds) * 45 / 2 <= 45 * 60
    raw = yaml.safe_load(path.read_text())
    assert all(c["family"] in ("primary", "secondary") for c in raw["claims"])
    assert json.loads(json.dumps(cfg.to_dict()))["lrs"] == list(cfg.lrs)


def test_the_report_reads_each_setting_and_lr_cell(tmp_path):
    """Synthetic run folders for every cell of a 2-arm x (periodic, offline) x 3-lr x 3-seed study:
    clip's final accuracy beats reinforce's by 0.1 x (the lr's index + 1) offline, so the report's
    rows for the claim over the three offline cells carry exactly those differences."""
    from study_helpers import write_run

    from reclight.study.cli import main

    study = _lr_study(tmp_path, seeds=[0, 1, 2])
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.yaml").write_text(yaml.safe_dump(study_from_dict(study).to_dict(), sort_keys=False))
    for name in NAMES:
        for arm in ("reinforce", "clip"):
            for seed in range(3):
                gain = 0.1 * (NAMES.index(name) % 3 + 1) if arm == "clip" and name.startswith("offline") else 0.0
                accs = [0.4, 0.4 + 0.01 * seed + gain, 0.4 + 0.01 * seed + gain, 0.4 + 0.01 * seed + gain]
                write_run(out / "runs" / name / arm / f"seed{seed}", accs, max_steps=3, every=1)
    assert main(["report", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for r in summary["rows"] if r["claim"].startswith("clipping beats")]
    assert len(rows) == 1 and rows[0]["deltas"] == pytest.approx([0.3] * 3, abs=1e-12)
    unnamed = [r for r in summary["rows"] if r["claim"] == "clipping not worse"]
    assert [d for r in unnamed for d in r["deltas"]] == pytest.approx([0.0] * 9 + [0.1] * 3 + [0.2] * 3 + [0.3] * 3,
                                                                      abs=1e-12)
    assert "offline_lr1e-3" in (out / "report.md").read_text()
