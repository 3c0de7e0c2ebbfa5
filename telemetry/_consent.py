"""Consent: which mode telemetry runs in, as a pure function of its inputs.

The seven rules are listed in README.md, "Consent".

First match wins; the person at the machine outranks the application's
default, and anyone can say no.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple, Optional, Union

OFF, ON, LOCAL = "off", "on", "local"
MODES = (OFF, ON, LOCAL)

ConsentArgument = Union[bool, str, None]

_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


class Decision(NamedTuple):
    """The resolved mode and the rule that decided it (for ``status()`` and the CLI).

    ``number`` is the rule's place in README.md's "Consent" list (1-7); 0 when no rule was applied
    (e.g. before ``init()``).
    """

    mode: str
    rule: str
    number: int = 0


def env_var_name(app: str) -> str:
    """``<APP>_TELEMETRY``: the app name upper-cased, non-alphanumerics turned into ``_``."""
    return re.sub(r"[^A-Za-z0-9]", "_", app).upper() + "_TELEMETRY"


def is_truthy(value: Optional[str]) -> bool:
    """Truthiness of a flag variable such as ``DO_NOT_TRACK`` or ``CI``."""
    return value is not None and value.strip().lower() not in _FALSE_WORDS


def normalize_consent(consent: ConsentArgument) -> Optional[str]:
    """``consent=`` as a mode (or None); raises ``ValueError`` for anything else."""
    if consent is None:
        return None
    if consent is True:
        return ON
    if consent is False:
        return OFF
    if isinstance(consent, str) and consent.lower() in MODES:
        return consent.lower()
    raise ValueError(f"consent must be True, False, None or one of {MODES}, not {consent!r}")


def parse_mode(text: Optional[str]) -> Optional[str]:
    """A mode word (``on``/``off``/``local``, any case), or None when it is not one."""
    if text is None:
        return None
    word = text.strip().lower()
    return word if word in MODES else None


def resolve(
    *,
    app: str,
    consent: Optional[str],
    env: Mapping[str, str],
    persisted: Optional[str],
) -> Decision:
    """Decide the mode; ``consent`` and ``persisted`` are modes or None.

    A ``persisted`` value that is not a mode is ignored (the state file
    reader already warned about it).
    """
    if is_truthy(env.get("DO_NOT_TRACK")):
        return Decision(OFF, "DO_NOT_TRACK is set", 1)
    name = env_var_name(app)
    from_env = parse_mode(env.get(name))
    if from_env is not None:
        return Decision(from_env, f"{name}={env[name]}", 2)
    if consent == OFF:
        return Decision(OFF, "the application passed consent=False", 3)
    if is_truthy(env.get("CI")):
        return Decision(OFF, "running in CI (CI is set)", 4)
    saved = parse_mode(persisted)
    if saved is not None:
        return Decision(saved, "the choice saved with set_consent() or the CLI", 5)
    if consent is not None:
        return Decision(consent, f"the application passed consent={consent!r}", 6)
    return Decision(OFF, "no consent was given (telemetry is opt-in)", 7)
