"""The shared validation helpers: every numeric check accepts numpy integers, rejects bool and
non-finite floats, and names the field, the value and what is accepted."""

import math

import numpy as np
import pytest

from reclight.checks import check_bool, check_choice, check_float, check_int, check_subset, invalid


def test_message_form():
    assert str(invalid("a.b", 3, "x")) == "a.b=3 is not valid; accepted: x"


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1)])
def test_check_int_accepts_python_and_numpy_integers(value):
    out = check_int("n", value, minimum=1)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value, accepted", [
    (0, "an integer >= 1"), (True, "an integer >= 1"), (1.0, "an integer >= 1"), ("2", "an integer >= 1"),
    (None, "an integer >= 1"), (np.float64(2.0), "an integer >= 1"),
])
def test_check_int_rejects(value, accepted):
    with pytest.raises(ValueError) as e:
        check_int("x.n", value, minimum=1)
    assert str(e.value) == f"x.n={value!r} is not valid; accepted: {accepted}"


def test_check_int_bounds_and_none():
    assert check_int("n", None, minimum=1, allow_none=True) is None
    with pytest.raises(ValueError, match=r"n=10 is not valid; accepted: an integer in \[1, 9\]"):
        check_int("n", 10, minimum=1, maximum=9)
    with pytest.raises(ValueError, match=r"n=0 is not valid; accepted: None or an integer >= 1"):
        check_int("n", 0, minimum=1, allow_none=True)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, np.float32("nan")])
def test_check_float_rejects_non_finite_with_any_bounds(value):
    for kwargs in ({}, {"gt": 0}, {"ge": 0}, {"lt": 0}, {"gt": 0, "lt": 1}):
        with pytest.raises(ValueError, match=r"\(a finite number\)|a finite number"):
            check_float("lr", value, **kwargs)


def test_check_float_bounds_text_and_values():
    assert check_float("lr", 1, gt=0) == 1.0 and type(check_float("lr", np.int64(2), gt=0)) is float
    assert check_float("p", 1.0, gt=0, le=1) == 1.0
    cases = [({"gt": 0, "lt": 1}, 1.0, "0 < eps < 1"), ({"ge": 0}, -0.5, "eps >= 0"), ({"gt": 0}, 0.0, "eps > 0"),
             ({"ge": 0, "le": 1}, 1.5, "0 <= eps <= 1"), ({"le": 2}, 3.0, "eps <= 2")]
    for kwargs, value, text in cases:
        with pytest.raises(ValueError) as e:
            check_float("cfg.eps", value, **kwargs)
        assert str(e.value) == f"cfg.eps={value!r} is not valid; accepted: {text}"
    with pytest.raises(ValueError, match=r"cfg.eps=True is not valid; accepted: eps > 0 \(a finite number\)"):
        check_float("cfg.eps", True, gt=0)


def test_bool_choice_subset():
    assert check_bool("f", False) is False
    with pytest.raises(ValueError, match=r"f=1 is not valid; accepted: true or false"):
        check_bool("f", 1)
    assert check_choice("m", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"m='c' is not valid; accepted: a, b"):
        check_choice("m", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"m=True is not valid; accepted: None, a"):
        check_choice("m", True, (None, "a"))
    assert check_subset("s", ["a"], ("a", "b")) == ["a"]
    for bad, text in (([], "a non-empty list of a, b"), ("a", "a list of a, b"), (["a", "a"], "distinct entries")):
        with pytest.raises(ValueError, match=text):
            check_subset("s", bad, ("a", "b"))
