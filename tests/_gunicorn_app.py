"""The app ``test_postgres``'s gunicorn workers serve (``_gunicorn_app:app``).

``create_app(db=..., policy_file=...)`` but for the policy's clock, which every
worker reads from a file the test writes (``TEST_GUNICORN_CLOCK``): the test lets
the policy's refresh interval pass by moving that clock, not by waiting it out.
Each worker imports this module once, at start.
"""

from __future__ import annotations

import os
from pathlib import Path

from server_stub import Policy, create_app

_CLOCK = Path(os.environ["TEST_GUNICORN_CLOCK"])


def _clock() -> float:
    return float(_CLOCK.read_text())


app = create_app(
    db=os.environ["TEST_GUNICORN_DB"],
    policy=Policy(os.environ["TEST_GUNICORN_POLICY_FILE"], clock=_clock),
)
