"""Configuration: every value is checked, from ``configure()`` and from the environment alike."""

from __future__ import annotations

import dataclasses
import math

import pytest

from cmwq_exec.core import system as _system
from cmwq_exec.core.config import Config, from_environment

FLOATS = [f.name for f in dataclasses.fields(Config) if f.type == "float"]
INTS = [f.name for f in dataclasses.fields(Config) if f.type == "int"]
BOOLS = [f.name for f in dataclasses.fields(Config) if f.type == "bool"]


def variable(name: str) -> str:
    return "CMWQ_" + name.upper()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CMWQ_<FIELD> variable from the outside world."""
    for field in dataclasses.fields(Config):
        monkeypatch.delenv(variable(field.name), raising=False)
    return monkeypatch


def test_every_field_has_a_checked_type() -> None:
    assert sorted(FLOATS + INTS + BOOLS) == sorted(f.name for f in dataclasses.fields(Config))
    assert FLOATS and INTS and BOOLS


def test_the_defaults_are_valid() -> None:
    Config().validate()


# -- validate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, 0.0, -1.0, True, "1", None])
def test_validate_rejects_what_is_not_a_finite_positive_number_of_seconds(name: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        dataclasses.replace(Config(), **{name: value}).validate()
    assert str(info.value) == f"{name} must be a finite number of seconds > 0, got {value!r}"


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [1, 0.001, 3600.0, 1e12])
def test_validate_accepts_finite_positive_seconds(name: str, value: float) -> None:
    dataclasses.replace(Config(), **{name: value}).validate()


@pytest.mark.parametrize("name", INTS)
@pytest.mark.parametrize("value", [1, 0, -5, 2.0, True, "8", math.inf, math.nan])
def test_validate_rejects_bad_integers(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be an integer >= 2, got "):
        dataclasses.replace(Config(), **{name: value}).validate()


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_validate_rejects_what_is_not_a_bool(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be True or False, got "):
        dataclasses.replace(Config(), **{name: value}).validate()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_configure_refuses_nan_and_inf(value: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_system, "_system", None)  # as before the first use
    before = _system._config
    with pytest.raises(ValueError, match=r"^idle_timeout must be a finite number of seconds > 0"):
        _system.configure(idle_timeout=value)
    assert _system._config is before


# -- from_environment -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("0", False), ("true", True), ("false", False), ("yes", True), ("no", False),
    ("on", True), ("off", False), ("TRUE", True), ("False", False), ("Yes", True), ("NO", False),
    ("On", True), ("OFF", False), (" 1 ", True), ("off\n", False),
])
@pytest.mark.parametrize("name", BOOLS)
def test_environment_bools(clean_environment: pytest.MonkeyPatch, name: str, raw: str,
                           expected: bool) -> None:
    clean_environment.setenv(variable(name), raw)
    config = from_environment(Config())
    assert getattr(config, name) is expected
    config.validate()


@pytest.mark.parametrize("raw", ["garbage", "", "2", "-1", "y", "n", "enabled", "truee", "0.0"])
@pytest.mark.parametrize("name", BOOLS)
def test_environment_bool_garbage_is_refused_naming_the_variable(
        clean_environment: pytest.MonkeyPatch, name: str, raw: str) -> None:
    clean_environment.setenv(variable(name), raw)
    with pytest.raises(ValueError) as info:
        from_environment(Config())
    assert str(info.value) == (f"environment variable {variable(name)}={raw!r} is not a valid bool: "
                               f"use 1/0, true/false, yes/no or on/off")


def test_cmwq_hotplug_garbage_is_not_false(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("CMWQ_HOTPLUG", "garbage")
    with pytest.raises(ValueError, match=r"^environment variable CMWQ_HOTPLUG='garbage' is not a "
                                         r"valid bool: use 1/0, true/false, yes/no or on/off$"):
        from_environment(Config())


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400"])
@pytest.mark.parametrize("name", FLOATS)
def test_environment_nan_and_inf_are_refused_naming_the_variable(
        clean_environment: pytest.MonkeyPatch, name: str, raw: str) -> None:
    clean_environment.setenv(variable(name), raw)
    with pytest.raises(ValueError) as info:
        from_environment(Config())
    assert str(info.value).startswith(f"environment variable {variable(name)}={raw!r} is not a "
                                      f"valid float: ")
    assert "finite" in str(info.value)


@pytest.mark.parametrize("raw", ["soon", "", "1s", "0x10"])
@pytest.mark.parametrize("name", FLOATS)
def test_environment_unparseable_floats_are_refused_naming_the_variable(
        clean_environment: pytest.MonkeyPatch, name: str, raw: str) -> None:
    clean_environment.setenv(variable(name), raw)
    with pytest.raises(ValueError, match=f"^environment variable {variable(name)}="):
        from_environment(Config())


@pytest.mark.parametrize("raw", ["many", "", "2.5", "1e3"])
@pytest.mark.parametrize("name", INTS)
def test_environment_unparseable_ints_are_refused_naming_the_variable(
        clean_environment: pytest.MonkeyPatch, name: str, raw: str) -> None:
    clean_environment.setenv(variable(name), raw)
    with pytest.raises(ValueError, match=f"^environment variable {variable(name)}={raw!r} is not a "
                                         f"valid int"):
        from_environment(Config())


@pytest.mark.parametrize("name, raw, problem", [
    ("idle_timeout", "0", "idle_timeout must be a finite number of seconds > 0"),
    ("watchdog_tick", "-1", "watchdog_tick must be a finite number of seconds > 0"),
    ("max_total_workers", "1", "max_total_workers must be an integer >= 2"),
])
def test_environment_values_out_of_range_are_refused_naming_the_variable(
        clean_environment: pytest.MonkeyPatch, name: str, raw: str, problem: str) -> None:
    clean_environment.setenv(variable(name), raw)
    with pytest.raises(ValueError) as info:
        from_environment(Config())
    message = str(info.value)
    assert message.startswith(f"environment variable {variable(name)}={raw!r}"), message
    assert problem in message


def test_environment_values_are_applied(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("CMWQ_IDLE_TIMEOUT", " 2.5 ")
    clean_environment.setenv("CMWQ_MAX_TOTAL_WORKERS", "64")
    clean_environment.setenv("CMWQ_PIN_WORKERS", "off")
    base = Config()
    config = from_environment(base)
    assert (config.idle_timeout, config.max_total_workers, config.pin_workers) == (2.5, 64, False)
    assert base == Config()  # the given config is left alone
    config.validate()


def test_no_environment_changes_nothing(clean_environment: pytest.MonkeyPatch) -> None:
    base = dataclasses.replace(Config(), idle_timeout=3.0)
    assert from_environment(base) == base
