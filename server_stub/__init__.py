"""Reference collection server for the ``telemetry`` client (standard library only with SQLite).

- ``create_app(...)``: the WSGI application (``gunicorn 'server_stub:create_app(db="t.db")'``).
- ``serve(port=0)``: the app on a background thread, for tests (a ``Server``); loaded
  on first use, so running the server never imports it.
- ``python -m server_stub``: the app behind ``FrontServer``, a buffering asyncio front
  that slow clients cannot stall (the production setup); ``Limits``: what requests may cost.
- ``db="postgresql://..."``: ``PostgresStore`` (the ``postgres`` extra), for several workers.
"""

from typing import TYPE_CHECKING, Any

from ._app import App, create_app
from ._backends import open_store
from ._http import FrontLimits, FrontServer
from ._limits import Limits
from ._policy import Policy, PolicyRules, RateLimit
from ._postgres import PostgresStore
from ._sqlite import SQLiteStore
from ._storage import PayloadRecord, Store, UnstorablePayload

if TYPE_CHECKING:
    from ._harness import RecordedRequest, ScriptedResponse, Server, serve

_HARNESS = frozenset({"RecordedRequest", "ScriptedResponse", "Server", "serve"})


def __getattr__(name: str) -> Any:
    """The test harness (``serve``, ``Server`` ...) loads on first use: a server never needs it."""
    if name in _HARNESS:
        from . import _harness  # noqa: PLC0415

        return getattr(_harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "App",
    "FrontLimits",
    "FrontServer",
    "Limits",
    "PayloadRecord",
    "Policy",
    "PolicyRules",
    "PostgresStore",
    "RateLimit",
    "RecordedRequest",
    "SQLiteStore",
    "ScriptedResponse",
    "Server",
    "Store",
    "UnstorablePayload",
    "create_app",
    "open_store",
    "serve",
]
