"""Configuration: every value is checked, from ``configure()`` and from the environment alike."""

from __future__ import annotations

import dataclasses
import math

import pytest
from helpers import run_python

from cmwq_exec.core import system as _system
from cmwq_exec.core.config import Config, SettingError, from_environment

FLOATS = [f.name for f in dataclasses.fields(Config) if f.type == "float"]
#: each time setting's allowed range, as written next to its field
RANGES: dict[str, tuple[float, float]] = {f.name: f.metadata["seconds"] for f in dataclasses.fields(Config)
                                          if f.type == "float"}
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


def allowed(name: str) -> str:
    """How an error message states the range of time setting ``name``."""
    low, high = RANGES[name]
    if high == math.inf:
        return f"a finite number of seconds >= {low:g}"
    return f"a number of seconds from {low:g} to {high:g}"


def test_every_time_has_a_positive_minimum_and_its_default_within_its_range() -> None:
    for field in dataclasses.fields(Config):
        if field.type == "float":
            low, high = RANGES[field.name]
            assert 0 < low <= field.default <= high, field.name


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, 0.0, -1.0, True, "1", None])
def test_validate_rejects_what_is_not_a_number_of_seconds_in_range(name: str, value: object) -> None:
    with pytest.raises(SettingError) as info:
        dataclasses.replace(Config(), **{name: value}).validate()
    assert str(info.value) == f"{name} must be {allowed(name)}, got {value!r}"


@pytest.mark.parametrize("name", FLOATS)
def test_validate_refuses_times_beyond_their_range(name: str) -> None:
    low, high = RANGES[name]
    for value in (low / 10, high * 10) if high < math.inf else (low / 10,):
        with pytest.raises(SettingError) as info:
            dataclasses.replace(Config(), **{name: value}).validate()
        assert str(info.value) == f"{name} must be {allowed(name)}, got {value!r}"


@pytest.mark.parametrize("name", FLOATS)
def test_validate_accepts_times_within_their_range(name: str) -> None:
    low, high = RANGES[name]
    for value in (low, 1 if high >= 1 else high, high if high < math.inf else 1e12):
        dataclasses.replace(Config(), **{name: value}).validate()


#: the small and large values the test suite itself runs the pools with (grep tests/ for them)
VALUES_THE_TESTS_USE = dict(
    idle_timeout=[0.001, 0.02, 0.1, 0.2, 600.0], trustee_cooldown=[0.001, 0.01],
    mayday_initial_timeout=[0.005, 0.01], mayday_interval=[0.01, 0.02, 0.05],
    create_cooldown=[0.01, 0.02, 0.05, 60.0], create_interval=[0.0005, 0.001, 0.002, 1.5],
    create_hold_max=[5.0], watchdog_tick=[3600.0], stall_timeout=[0.3, 0.5], hotplug_poll_interval=[0.02],
)


@pytest.mark.parametrize("name", sorted(VALUES_THE_TESTS_USE))
def test_the_ranges_keep_the_values_the_tests_use(name: str) -> None:
    for value in VALUES_THE_TESTS_USE[name]:
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
    with pytest.raises(SettingError, match=r"^idle_timeout must be a finite number of seconds >= 0\.001"):
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
    ("idle_timeout", "0", "idle_timeout must be a finite number of seconds >= 0.001"),
    ("watchdog_tick", "-1", "watchdog_tick must be a finite number of seconds >= 0.001"),
    ("max_total_workers", "1", "max_total_workers must be an integer >= 2"),
    # values that keep a timer firing: an idle process burnt a CPU polling every nanosecond
    ("hotplug_poll_interval", "1e-9", "hotplug_poll_interval must be a finite number of seconds >= 0.01"),
    ("watchdog_tick", "1e-9", "watchdog_tick must be a finite number of seconds >= 0.001"),
    ("idle_timeout", "1e-9", "idle_timeout must be a finite number of seconds >= 0.001"),
    ("trustee_cooldown", "0.0000001", "trustee_cooldown must be a finite number of seconds >= 0.001"),
    ("create_cooldown", "1e-6", "create_cooldown must be a finite number of seconds >= 0.001"),
    ("mayday_interval", "1e-9", "mayday_interval must be a number of seconds from 0.001 to 60"),
    ("mayday_initial_timeout", "1e-9", "mayday_initial_timeout must be a number of seconds from 0.001 to 60"),
    # and a rescuer called an hour late guarantees nothing
    ("mayday_interval", "3600", "mayday_interval must be a number of seconds from 0.001 to 60"),
])
def test_environment_values_out_of_range_are_refused_naming_the_variable(
        clean_environment: pytest.MonkeyPatch, name: str, raw: str, problem: str) -> None:
    clean_environment.setenv(variable(name), raw)
    with pytest.raises(SettingError) as info:
        from_environment(Config())
    assert str(info.value) == f"environment variable {variable(name)}={raw!r}: {problem}"


def test_a_spinning_value_stops_the_program_naming_the_variable_and_the_range() -> None:
    proc = run_python("import cmwq_exec\ncmwq_exec.CMWQExecutor().submit(int).result(timeout=30)\n",
                      timeout=60, CMWQ_HOTPLUG_POLL_INTERVAL="1e-9", CMWQ_EXEC_DISABLE_PLUGIN_AUTOLOAD="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ("SettingError: environment variable CMWQ_HOTPLUG_POLL_INTERVAL='1e-9': hotplug_poll_interval "
            "must be a finite number of seconds >= 0.01") in proc.stderr


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
