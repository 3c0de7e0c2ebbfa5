"""Consent resolution: the seven rules of README.md "Consent", first match wins."""

from __future__ import annotations

import itertools
from typing import Dict, Optional, Tuple

import pytest

from telemetry import _consent
from telemetry._consent import LOCAL, OFF, ON, Decision, resolve

APP = "my-app"
APP_VAR = "MY_APP_TELEMETRY"


def decide(
    env: Optional[Dict[str, str]] = None,
    consent: Optional[str] = None,
    persisted: Optional[str] = None,
    app: str = APP,
) -> Decision:
    return resolve(app=app, consent=consent, env=env or {}, persisted=persisted)


# -- the table, rule by rule -----------------------------------------------------------

# Each adjacent pair of rules, both in force, with the later one pulling the
# other way wherever it can: the earlier rule must decide.
ADJACENT = [
    pytest.param({"DO_NOT_TRACK": "1", APP_VAR: "on"}, None, None, OFF, 1, id="1-beats-2"),
    pytest.param({APP_VAR: "on"}, OFF, None, ON, 2, id="2-beats-3"),
    pytest.param({APP_VAR: "local"}, OFF, None, LOCAL, 2, id="2-beats-3-local"),
    pytest.param({"CI": "true"}, OFF, None, OFF, 3, id="3-beats-4"),
    pytest.param({"CI": "true"}, None, ON, OFF, 4, id="4-beats-5"),
    pytest.param({"CI": "true"}, None, LOCAL, OFF, 4, id="4-beats-5-local"),
    pytest.param({}, ON, OFF, OFF, 5, id="5-beats-6"),
    pytest.param({}, LOCAL, ON, ON, 5, id="5-beats-6-mode"),
    pytest.param({}, ON, None, ON, 6, id="6-beats-7"),
    pytest.param({}, LOCAL, None, LOCAL, 6, id="6-beats-7-local"),
    pytest.param({}, None, None, OFF, 7, id="7-default-off"),
]


@pytest.mark.parametrize(("env", "consent", "persisted", "mode", "rule"), ADJACENT)
def test_adjacent_rules_the_earlier_one_wins(
    env: Dict[str, str], consent: Optional[str], persisted: Optional[str], mode: str, rule: int
) -> None:
    decision = decide(env, consent, persisted)
    assert (decision.mode, decision.number) == (mode, rule), decision


@pytest.mark.parametrize(
    ("rule", "env", "consent", "persisted", "mode"),
    [
        (1, {"DO_NOT_TRACK": "1", APP_VAR: "on", "CI": "1"}, OFF, ON, OFF),
        (2, {APP_VAR: "on", "CI": "1"}, OFF, OFF, ON),
        (3, {"CI": "1"}, OFF, ON, OFF),
        (4, {"CI": "1"}, ON, ON, OFF),
        (5, {}, ON, OFF, OFF),
        (6, {}, LOCAL, None, LOCAL),
        (7, {}, None, None, OFF),
    ],
)
def test_each_rule_beats_all_later_ones_in_force(
    rule: int, env: Dict[str, str], consent: Optional[str], persisted: Optional[str], mode: str
) -> None:
    # Rules 3 and 6 share the consent argument, so only one of them is in force at a time.
    decision = decide(env, consent, persisted)
    assert (decision.mode, decision.number) == (mode, rule), decision


def reference(
    env: Dict[str, str], consent: Optional[str], persisted: Optional[str]
) -> Tuple[str, int]:
    """The README's consent list read literally, as the oracle for every combination."""
    falsy = {"", "0", "false", "no", "off"}
    if env.get("DO_NOT_TRACK", "").lower() not in falsy:
        return OFF, 1
    if env.get(APP_VAR, "").lower() in (ON, OFF, LOCAL):
        return env[APP_VAR].lower(), 2
    if consent == OFF:
        return OFF, 3
    if env.get("CI", "").lower() not in falsy:
        return OFF, 4
    if persisted is not None:
        return persisted, 5
    if consent is not None:
        return consent, 6
    return OFF, 7


def test_every_combination_matches_the_table() -> None:
    for dnt, app_value, consent, ci, persisted in itertools.product(
        [None, "1", "false"],
        [None, "on", "OFF", "Local", "bogus"],
        [None, OFF, ON, LOCAL],
        [None, "true", "0"],
        [None, OFF, ON, LOCAL],
    ):
        env = {
            name: value
            for name, value in (("DO_NOT_TRACK", dnt), (APP_VAR, app_value), ("CI", ci))
            if value is not None
        }
        decision = decide(env, consent, persisted)
        assert (decision.mode, decision.number) == reference(env, consent, persisted), (
            env, consent, persisted, decision)


# -- anyone can say no -------------------------------------------------------------------


def test_do_not_track_beats_consent_true() -> None:
    assert decide({"DO_NOT_TRACK": "1"}, ON, ON) == Decision(OFF, "DO_NOT_TRACK is set", 1)


def test_saved_off_beats_consent_true() -> None:
    assert decide({}, _consent.normalize_consent(True), OFF).mode == OFF


def test_consent_true_in_ci_is_off() -> None:
    assert decide({"CI": "true"}, ON, None) == Decision(OFF, "running in CI (CI is set)", 4)


# -- truthiness of DO_NOT_TRACK and CI ------------------------------------------------------

SET = ["1", "true", "TRUE", "yes", "Yes", "on", "anything", " 1 ", "2"]
NOT_SET = ["", "0", "false", "False", "FALSE", "no", "NO", "off", "Off", "  ", " false "]


@pytest.mark.parametrize("value", SET)
def test_do_not_track_set(value: str) -> None:
    assert decide({"DO_NOT_TRACK": value}, ON).number == 1


@pytest.mark.parametrize("value", NOT_SET)
def test_do_not_track_not_set(value: str) -> None:
    assert decide({"DO_NOT_TRACK": value}, ON) == Decision(
        ON, "the application passed consent='on'", 6)


@pytest.mark.parametrize("value", SET)
def test_ci_set(value: str) -> None:
    assert decide({"CI": value}, ON).number == 4


@pytest.mark.parametrize("value", NOT_SET)
def test_ci_not_set(value: str) -> None:
    assert decide({"CI": value}, ON).number == 6


@pytest.mark.parametrize("value", SET)
def test_is_truthy_set(value: str) -> None:
    assert _consent.is_truthy(value)


@pytest.mark.parametrize("value", [None, *NOT_SET])
def test_is_truthy_not_set(value: Optional[str]) -> None:
    assert not _consent.is_truthy(value)


# -- <APP>_TELEMETRY --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "name"),
    [
        ("myapp", "MYAPP_TELEMETRY"),
        ("MyApp", "MYAPP_TELEMETRY"),
        ("my-app", "MY_APP_TELEMETRY"),
        ("my.app 2", "MY_APP_2_TELEMETRY"),
        ("café", "CAF__TELEMETRY"),
        ("a_b", "A_B_TELEMETRY"),
    ],
)
def test_env_var_name_mangling(app: str, name: str) -> None:
    assert _consent.env_var_name(app) == name
    assert decide({name: "local"}, app=app) == Decision(LOCAL, f"{name}=local", 2)


@pytest.mark.parametrize(("value", "mode"), [
    ("on", ON), ("ON", ON), ("Off", OFF), ("LOCAL", LOCAL), (" local ", LOCAL),
])
def test_app_variable_is_case_insensitive(value: str, mode: str) -> None:
    assert decide({APP_VAR: value}, OFF).mode == mode


@pytest.mark.parametrize("value", ["", "yes", "1", "true", "enabled", "o n", "0"])
def test_invalid_app_variable_is_ignored(value: str) -> None:
    assert decide({APP_VAR: value}, LOCAL).number == 6
    assert decide({APP_VAR: value}).number == 7


def test_only_the_mangled_name_counts() -> None:
    for name in ("my-app_TELEMETRY", "my_app_telemetry", "TELEMETRY", "MYAPP_TELEMETRY"):
        assert decide({name: "on"}).number == 7, name


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("argument", "mode"), [
    (None, None), (True, ON), (False, OFF), ("on", ON), ("off", OFF), ("local", LOCAL),
    ("LOCAL", LOCAL),
])
def test_normalize_consent(argument: _consent.ConsentArgument, mode: Optional[str]) -> None:
    assert _consent.normalize_consent(argument) == mode


@pytest.mark.parametrize("argument", [1, 0, "yes", "", "true", ["on"]])
def test_normalize_consent_rejects_misuse(argument: object) -> None:
    with pytest.raises(ValueError, match="consent must be"):
        _consent.normalize_consent(argument)  # type: ignore[arg-type]


@pytest.mark.parametrize("persisted", ["bogus", "", "ON "])
def test_persisted_value_is_parsed_or_ignored(persisted: str) -> None:
    expected = ON if persisted.strip().lower() == ON else None
    decision = decide({}, LOCAL, persisted)
    assert decision.mode == (expected or LOCAL)
    assert decision.number == (5 if expected else 6)


def test_decision_before_any_rule_has_number_zero() -> None:
    assert Decision(OFF, "init() was not called").number == 0
