"""The one YAML loader of config files (issue #25): ``reclight fit --config``, study configs
(``tests/study/test_study_config.py``) and the bench's ``--config``: one module,
``reclight.yamlio``, for all three.

Before: a repeated key was kept silently (the last one won) everywhere; an empty file or a list
reached the CLI as "Unexpected config: "; a tab or an unclosed brace gave PyYAML's message
naming "<unicode string>", not the file.
"""

from pathlib import Path

import pytest

import reclight.yamlio as yamlio
from bandits.cli import main as bench_main
from reclight.trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke_test.yaml"

CASES = {
    "empty": ("", "the file is empty (no YAML mapping in it)"),
    "only comments": ("# model:\n#   optim: {lr: 0.1}\n", "the file holds no YAML value (only comments)"),
    "a list": ("- model\n- data\n", "its top level is a list (\"['model', 'data']\"), not a mapping"),
    "a string": ("model.optim.lr 0.1\n", "its top level is a string ('model.optim.lr 0.1'), not a mapping"),
    "tab": ("model:\n\toptim: {lr: 0.1}\n", "line 2, column 1: found character '\\t' that cannot start any token "
            "(indent with spaces: YAML does not allow a tab there)"),
    "unclosed brace": ("model:\n  optim: {lr: 0.1\ndata: {}\n", "line 3, column 5: expected ',' or '}', but got ':' "
                       "(while parsing a flow mapping at line 2, column 10)"),
    "repeated key": ("model:\n  optim: {lr: 0.1}\n  sampling: {num_samples: 4}\n  optim: {lr: 0.2}\n",
                     "line 4, column 3: key 'optim' is given twice in one mapping (first at line 2); YAML would keep "
                     "only the last one"),
    "repeated key in braces": ("model: {optim: {lr: 0.1, lr: 0.2}}\n", "line 1, column 26: key 'lr' is given twice "
                               "in one mapping (first at line 1); YAML would keep only the last one"),
    "two documents": ("a: 1\n---\nb: 2\n", "line 2, column 1: but found another document (expected a single document "
                      "in the stream at line 1, column 1)"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_yaml_names_the_file_and_line(tmp_path, case):
    loader = yamlio
    text, why = CASES[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(loader.YamlFileError) as e:
        loader.load_yaml_file(path, "--config", "X")
    assert str(e.value) == f"--config={str(path)!r} is not valid: {why}; accepted: X"


def test_merge_keys_and_equal_keys_in_different_mappings_are_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 0.1, wd: 0}\nmodel:\n  optim:\n    <<: *b\n    lr: 0.2\ndata: {lr: 1}\n")
    for loader in (yamlio,):
        assert loader.load_yaml_file(path) == {"base": {"lr": 0.1, "wd": 0}, "model": {"optim": {"lr": 0.2, "wd": 0}},
                                               "data": {"lr": 1}}


@pytest.mark.parametrize("case", ["empty", "a list", "tab", "unclosed brace", "repeated key"])
def test_fit_refuses_a_bad_config_file_naming_it(tmp_path, case, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(CASES[case][0])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(SMOKE), "--config", str(path), "--model.policy.tiny_dir", str(tmp_path / "tiny")])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2
    assert (f"error: --config={str(path)!r} is not valid: {' '.join(CASES[case][1].split())}; accepted: a YAML mapping "
            "of reclight fit settings, each key once") in err
    assert not (tmp_path / "tiny").exists()


def test_every_shipped_yaml_loads(tmp_path):
    """The loaders accept every YAML the repository ships (no repeated key anywhere)."""
    paths = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "tests").rglob("*.yaml"))
    assert len(paths) > 30
    for path in paths:
        assert isinstance(yamlio.load_yaml_file(path), dict)


def test_the_bench_refuses_a_repeated_key(tmp_path, capsys):
    """Before: `seeds: 4` then `seeds: 8` ran 8 seeds, silently."""
    path = tmp_path / "b.yaml"
    path.write_text("seeds: 4\nsteps: 10\nseeds: 8\n")
    with pytest.raises(SystemExit) as e:
        bench_main(["claims", "--config", str(path)])
    assert e.value.code == 2
    assert (f"error: --config={str(path)!r} is not valid: line 3, column 1: key 'seeds' is given twice in one mapping "
            "(first at line 1)") in capsys.readouterr().err
