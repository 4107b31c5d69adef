"""AlgorithmConfig validation, the 14 presets of docs/algorithms.md section 3, the six of 6.7 and the three of 6.8."""

import dataclasses

import pytest

from reclight.algorithms import PAPER_PRESETS, PRESETS, AlgorithmConfig, get_algorithm

# The preset table of docs/algorithms.md section 3, written out independently of the code:
# name: (clip_mode, eps_low, eps_high, IS, std, extra fields)
TABLE = {
    "reinforce": ("none", None, None, False, False, {}),
    "grpo": ("one_side", 0.2, 0.2, True, True, {}),
    "rec_oneside_is": ("one_side", 0.2, 0.2, True, False, {}),
    "rec_oneside_nois": ("one_side", 0.2, 0.2, False, False, {}),
    "rec_oneside_is_wide": ("one_side", 0.6, 2.0, True, False, {}),
    "rec_oneside_nois_wide": ("one_side", 0.6, 2.0, False, False, {}),
    "rec_twoside_is": ("two_side", 0.2, 0.2, True, False, {}),
    "rec_twoside_nois": ("two_side", 0.2, 0.2, False, False, {}),
    "rec_ring_is": ("ring", 0.2, 0.2, True, False, {"eps_low_outer": 0.6, "eps_high_outer": 2.0}),
    "rec_ring_nois": ("ring", 0.2, 0.2, False, False, {"eps_low_outer": 0.6, "eps_high_outer": 2.0}),
    "opmd": ("none", None, None, False, False, {"regularizer": "k2", "regularizer_coef": 0.1}),
    "asymre": ("none", None, None, False, False, {"regularizer": "forward_kl", "regularizer_coef": 0.1}),
    "red_drop": ("none", None, None, False, False, {"drop": "balance"}),
    "red_weight": ("none", None, None, False, False, {"advantage_weighting": "exp", "weight_temperature": 1.0}),
}


# docs/algorithms.md section 6.7, every field that differs from AlgorithmConfig()'s defaults.
TABLE_6_7 = {
    "grpo_kl": dict(importance_sampling=True, std_normalize=True, kl_coef=0.04, kl_estimator="k3", kl_in="loss"),
    "dr_grpo": dict(importance_sampling=True, loss_agg="seq_mean_token_sum_norm"),
    "dapo": dict(eps_high=0.28, importance_sampling=True, std_normalize=True, filter_uniform_groups=True,
                 overlong_penalty=True),
    "gspo": dict(eps_low=3e-4, eps_high=4e-4, importance_sampling=True, std_normalize=True, ratio_level="sequence",
                 loss_agg="seq_mean_token_mean"),
    "cispo": dict(clip_mode="none", importance_sampling=True, is_clip=(1.0, 5.0), std_normalize=True),
    "decoupled_tis": dict(importance_sampling=True, ratio_anchor="proximal", behavior_correction="truncate",
                          behavior_correction_level="token", behavior_correction_cap=2.0),
}


# docs/algorithms.md section 6.8, every field that differs from AlgorithmConfig()'s defaults.
TABLE_6_8 = {
    "icepop": dict(importance_sampling=True, ratio_anchor="proximal", behavior_correction="mask",
                   behavior_correction_cap=5.0, behavior_correction_floor=0.5),
    "geo_mask": dict(importance_sampling=True, ratio_anchor="proximal", behavior_correction="truncate",
                     behavior_correction_cap=2.0, geo_mask=(0.99, 1.01)),
    "opsm": dict(importance_sampling=True, std_normalize=True, opsm_threshold=1e-4),
}


def test_section_6_7_and_6_8_presets_differ_from_the_default_exactly_as_the_tables_say():
    assert list(PRESETS) == list(TABLE) + list(TABLE_6_7) + list(TABLE_6_8) and PAPER_PRESETS == tuple(TABLE)
    for name, fields in {**TABLE_6_7, **TABLE_6_8}.items():
        assert PRESETS[name] == AlgorithmConfig(**fields), name


def test_presets_match_the_spec_table():
    assert list(PAPER_PRESETS) == list(TABLE)
    for name, (mode, lo, hi, is_, std, extra) in TABLE.items():
        cfg = PRESETS[name]
        assert cfg.clip_mode == mode, name
        if lo is not None:
            assert (cfg.eps_low, cfg.eps_high) == (lo, hi), name
        assert cfg.importance_sampling is is_ and cfg.std_normalize is std, name
        assert cfg.loss_agg == "token_mean", name
        for field, value in extra.items():
            assert getattr(cfg, field) == value, (name, field)
        # fields the table does not mention keep their neutral defaults
        neutral = {"regularizer": "none", "drop": "none", "advantage_weighting": "none"}
        for field, value in neutral.items():
            if field not in extra:
                assert getattr(cfg, field) == value, (name, field)


def test_config_is_frozen_and_overridable():
    cfg = get_algorithm("rec_oneside_nois", eps_high=0.28, loss_agg="seq_mean_token_mean")
    assert (cfg.eps_low, cfg.eps_high, cfg.loss_agg) == (0.2, 0.28, "seq_mean_token_mean")
    assert PRESETS["rec_oneside_nois"].eps_high == 0.2  # the preset itself is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eps_high = 0.5  # type: ignore[misc]
    assert AlgorithmConfig() == PRESETS["rec_oneside_nois"]  # the paper's recommended default


BAD = [
    ("clip_mode", "both_sides", "none, one_side, two_side, ring"),
    ("regularizer", "kl", "none, k2, forward_kl"),
    ("advantage_weighting", "softmax", "none, exp"),
    ("drop", "random", "none, balance"),
    ("loss_agg", "sum", "token_mean, seq_mean_token_mean, seq_mean_token_sum"),
    ("eps_low", 0.0, "0 < eps_low < 1"),
    ("eps_low", 1.0, "0 < eps_low < 1"),
    ("eps_low", -0.1, "0 < eps_low < 1"),
    ("eps_high", 0.0, "eps_high > 0"),
    ("eps_high", -1.0, "eps_high > 0"),
    ("eps_high", float("nan"), "eps_high > 0 (a finite number)"),
    ("eps_high", float("inf"), "eps_high > 0 (a finite number)"),
    ("eps_high", "0.2", "eps_high > 0 (a finite number)"),
    ("regularizer_coef", -0.1, "regularizer_coef >= 0"),
    ("weight_temperature", 0.0, "weight_temperature > 0"),
    ("weight_temperature", -2.0, "weight_temperature > 0"),
    ("importance_sampling", "yes", "true or false"),
    ("std_normalize", 1, "true or false"),
]


@pytest.mark.parametrize("field, value, accepted", BAD)
def test_invalid_values_name_field_value_and_accepted(field, value, accepted):
    with pytest.raises(ValueError) as err:
        AlgorithmConfig(**{field: value})
    msg = str(err.value)
    assert f"model.algorithm.{field}={value!r}" in msg  # the field as the trainer's command line spells it
    assert f"accepted: {accepted}" in msg


def test_ring_outer_bounds_checked_only_for_ring():
    """eps_low_outer must lie in [eps_low, 1) and eps_high_outer >= eps_high for ring; other
    modes ignore them, so widening a one-side preset's eps_low past 0.6 is fine."""
    with pytest.raises(ValueError, match=r"eps_low_outer=0.1 .*eps_low \(0.2\) <= eps_low_outer < 1"):
        AlgorithmConfig(clip_mode="ring", eps_low_outer=0.1)
    with pytest.raises(ValueError, match=r"eps_high_outer=0.1 .*eps_high_outer >= eps_high \(0.2\)"):
        AlgorithmConfig(clip_mode="ring", eps_high_outer=0.1)
    assert get_algorithm("rec_oneside_nois", eps_low=0.8).eps_low == 0.8


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match=r"algorithm preset 'ppo' is unknown; accepted: reinforce, grpo, "):
        get_algorithm("ppo")
    with pytest.raises(ValueError, match=r"model.algorithm has no field 'epsilon'; accepted: "):
        get_algorithm("grpo", epsilon=0.2)
