"""``reclight calibrate`` (reclight/trainer/calibrate.py): the least-squares fits on points whose
answer is known by hand, the floors that keep a noisy fit valid for the clock, and the command
end to end on the smoke config (its YAML parses into ``ClockCosts`` and composes with --config)."""

import math
import sys

import pytest
import yaml

from reclight.clock import ClockCosts
from reclight.trainer.calibrate import (FLOOR_SHARE, costs_from, fit_line, least_squares, planned_steps,
                                        train_sizes)

from conftest import ROOT

SMOKE = str(ROOT / "configs/smoke_test.yaml")


def test_least_squares_recovers_a_line_exactly():
    """Points on y = 3/8 + x/8 (dyadic: every sum is exact in binary floating point), with and
    without weights, give back a = 3/8, b = 1/8 and R^2 = 1 exactly."""
    xs = [0.0, 1.0, 2.0, 3.0, 8.0]
    ys = [0.375 + 0.125 * x for x in xs]
    assert least_squares(xs, ys) == (0.375, 0.125, 1.0)
    assert least_squares(xs, ys, [1, 4, 2, 1, 8]) == (0.375, 0.125, 1.0)
    a, b = 2.65e-3, 1.03e-4  # the order of the measured decoding costs
    got = least_squares([7, 8, 16, 24, 64], [a + b * x for x in (7, 8, 16, 24, 64)])
    assert got[0] == pytest.approx(a, rel=1e-12) and got[1] == pytest.approx(b, rel=1e-12)


def test_least_squares_by_hand_and_weights_count_as_repeats():
    """(0, 0), (1, 1), (2, 1): mx = 1, my = 2/3, sxy = (-1)(-2/3) + (1)(1/3) = 1, sxx = 2, so
    b = 1/2, a = 2/3 - 1/2 = 1/6; residuals -1/6, 1/3, -1/6 give SS_res = 1/6 against
    SS_tot = 4/9 + 1/9 + 1/9 = 2/3: R^2 = 1 - 1/4 = 3/4. A weight of 2 is the point given twice."""
    a, b, r2 = least_squares([0, 1, 2], [0, 1, 1])
    assert (a, b, r2) == pytest.approx((1 / 6, 0.5, 0.75), rel=1e-15, abs=1e-15)
    weighted = least_squares([0, 1, 2], [0, 1, 1], [2, 1, 1])
    repeated = least_squares([0, 0, 1, 2], [0, 0, 1, 1])
    assert weighted == pytest.approx(repeated, rel=1e-15, abs=1e-15)
    with pytest.raises(ValueError, match="at least two distinct x"):
        least_squares([3, 3], [1, 2])


def test_fit_line_takes_medians_weighted_by_their_samples():
    """x = 1: median of (1, 9, 2) = 2 (n 3); x = 2: 3 (n 1); x = 3: median of (4, 4) = 4 (n 2):
    the medians lie on y = 1 + x, whatever the weights."""
    fit = fit_line({1: [1.0, 9.0, 2.0], 2: [3.0], 3: [4.0, 4.0]})
    assert (fit.intercept, fit.slope, fit.r2) == pytest.approx((1.0, 1.0, 1.0), abs=1e-15)
    assert fit.points == [(1, 2.0, 3), (2, 3.0, 1), (3, 4.0, 2)]
    assert fit.max_rel_residual == pytest.approx(0.0, abs=1e-15)
    assert fit.total_ratio == pytest.approx((2 * 3 + 3 + 4 * 2) / (1 + 9 + 2 + 3 + 4 + 4), rel=1e-15)


def test_noise_below_zero_becomes_a_stated_floor():
    """A decode slope and a prefill slope that noise made negative: decode_b becomes 1% of the
    intercept per row at the largest size (0.01 * 5 / 4), prefill_b becomes 0; both noted."""
    gen = {"decode": {2: [4.0], 4: [3.0]},  # y = 5 - x / 2: slope -1/2, intercept 5
           "prefill": {2: [2.0], 10: [1.0]}, "swap": [0.5, 0.25, 1.0]}
    train = {100: [2.0], 300: [3.0]}  # y = 1.5 + x / 200
    costs, fits, notes = costs_from(gen, train)
    assert fits["decode"].slope == pytest.approx(-0.5, abs=1e-15)
    assert costs == ClockCosts(decode_a=5.0, decode_b=FLOOR_SHARE * 5.0 / 4, prefill_b=0.0, sync_cost=0.5,
                               train_c=1.5, train_e=0.005)
    assert [n.split(":")[0] for n in notes] == ["prefill_b", "decode_b"]


def test_training_sizes_are_whole_mini_batches():
    assert train_sizes(32, 1) == [8, 16, 32, 64]
    assert train_sizes(4, 2) == [2, 2, 4, 8]
    assert train_sizes(1, 1) == [1, 1, 1, 2]
    assert planned_steps([1, 2], 2) == [2, 2, 1, 2, 1, 2]  # two untimed at the largest, then round-robin


def test_the_command_end_to_end_on_the_smoke_config(tmp_path, monkeypatch, capsys):
    """``reclight calibrate`` through the console script: the YAML on stdout equals --out's,
    parses into ClockCosts with every cost finite (> 0 where the clock needs it), lists the
    measured points, and composes with --config (the trainer's CLI reads the same costs)."""
    from reclight import launch
    from reclight.trainer.cli import main as cli_main

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the console script would set (restored after)
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    out = tmp_path / "costs.yaml"
    monkeypatch.setattr(sys, "argv", ["reclight", "calibrate", "--config", SMOKE, "--model.policy.tiny_dir",
                                      str(tmp_path / "tiny"), "--model.clock.max_inflight", "3", "--steps", "1",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        launch.entrypoint()
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text == out.read_text()
    assert "# decoding step = " in text and "# training step = " in text and "# weight swap: " in text
    costs = ClockCosts(**yaml.safe_load(text)["model"]["clock"]["costs"])
    for name in ("decode_a", "decode_b", "train_c", "train_e", "sync_cost"):
        value = getattr(costs, name)
        assert math.isfinite(value) and value > 0, (name, value)
    assert math.isfinite(costs.prefill_b) and costs.prefill_b >= 0
    cli = cli_main(["--config", SMOKE, "--config", str(out), "--model.policy.tiny_dir", str(tmp_path / "tiny"),
                    "--trainer.logger", "false"], run=False)
    assert cli.model.clock_cfg.costs == costs


def test_an_engine_without_continuous_batching_is_refused_before_loading(tmp_path, capsys):
    from reclight.trainer.calibrate import main

    code = main(["--config", SMOKE, "--model.policy.tiny_dir", str(tmp_path / "tiny"), "--model.engine.name", "hf"])
    assert code == 2
    assert "model.engine.name='hf' is not valid; accepted: fast" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
    with pytest.raises(SystemExit):
        main(["--config", SMOKE, "--steps", "0"])
    assert "--steps=0 is not valid; accepted: an integer >= 1" in capsys.readouterr().err
