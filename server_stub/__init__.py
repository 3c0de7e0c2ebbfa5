"""Reference collection server for the ``telemetry`` client (standard library only).

- ``create_app(...)``: the WSGI application (``gunicorn 'server_stub:create_app(db="t.db")'``).
- ``serve(port=0)``: the app on a background thread, for tests (a ``Server``).
- ``python -m server_stub``: the app under the standard library's threading WSGI server.
"""

from ._app import App, create_app
from ._harness import RecordedRequest, ScriptedResponse, Server, serve
from ._policy import Policy, PolicyRules, RateLimit
from ._store import PayloadRecord, SQLiteStore, Store

__all__ = [
    "App",
    "PayloadRecord",
    "Policy",
    "PolicyRules",
    "RateLimit",
    "RecordedRequest",
    "SQLiteStore",
    "ScriptedResponse",
    "Server",
    "Store",
    "create_app",
    "serve",
]
