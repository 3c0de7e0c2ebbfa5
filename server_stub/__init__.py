"""Reference collection server for the ``telemetry`` client (standard library only with SQLite).

- ``create_app(...)``: the WSGI application (``gunicorn 'server_stub:create_app(db="t.db")'``).
- ``serve(port=0)``: the app on a background thread, for tests (a ``Server``).
- ``python -m server_stub``: the app behind ``FrontServer``, a buffering asyncio front
  that slow clients cannot stall (the production setup); ``Limits``: what requests may cost.
- ``db="postgresql://..."``: ``PostgresStore`` (the ``postgres`` extra), for several workers.
"""

from ._app import App, create_app
from ._backends import open_store
from ._harness import RecordedRequest, ScriptedResponse, Server, serve
from ._http import FrontLimits, FrontServer
from ._limits import Limits
from ._policy import Policy, PolicyRules, RateLimit
from ._postgres import PostgresStore
from ._sqlite import SQLiteStore
from ._storage import PayloadRecord, Store, UnstorablePayload

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
