"""The operator console: HTML pages under ``/``, built from sub-requests to the JSON API.

Every number a page shows comes from calling the application itself with a
constructed request (``GET /v1/series?...``) that carries the caller's access,
so the console shows exactly what the JSON API answers and knows nothing of
storage. Pages are rendered by ``_pages`` (charts by ``_svg``); this module
owns routing, sign-in, CSRF checks and the response headers:
``Content-Security-Policy: default-src 'self'`` on everything, so no inline
script or style could run even if escaping failed somewhere.

Access follows the JSON API's: with a token configured, a console page needs
a session (sign in with the read or admin token; ``_sessions``), else it
answers 401 with the sign-in form and no data. With no token configured, the
console is served to loopback clients only. The stylesheet, script and icon
need nothing.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, urlencode

from . import _pages
from ._access import Access, Grant
from ._pages import WINDOWS, Answer, Frame, PolicyForm
from ._sessions import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    SESSION_SECONDS,
    Session,
    Sessions,
    cookie_header,
    request_cookies,
    same_secret,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

__all__ = ["Console", "is_console_path"]

logger = logging.getLogger("server_stub")

Headers = List[Tuple[str, str]]
Reply = Tuple[int, Headers, bytes]
"""Status, headers, body: what the app turns into its response."""

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_DEFAULT_DAYS = 30
_EVENTS_SHOWN = 50
_PAYLOADS_SHOWN = 20
_BREAKDOWN_SHOWN = 20
_MAX_FORM_BYTES = 64 << 10
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PAGES = ("/", "/keys", "/key", "/events", "/policy", "/login", "/logout")
_STATIC = {
    "/static/console.css": ("console.css", "text/css; charset=utf-8"),
    "/static/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
# What /data/... may relay: the JSON API's read endpoints.
_DATA = re.compile(
    r"/v1/(stats|series|breakdown|active|events|policy|policy/history|openapi\.json"
    r"|instances/[0-9a-fA-F-]{36})"
)
_SECURITY_HEADERS: Headers = [
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
]


def is_console_path(path: str) -> bool:
    """Whether the console answers ``path`` (the JSON API keeps ``/v1/...`` and ``/healthz``)."""
    return (
        path in _PAGES
        or path in _STATIC
        or path.startswith("/instance/")
        or path.startswith("/data/v1/")
    )


@dataclass(frozen=True)
class _Caller:
    """Who is asking: what they may do, their session, and their forms' CSRF token."""

    environ: WSGIEnvironment
    grant: Grant
    session: Optional[Session]
    csrf: str
    set_cookies: Tuple[Tuple[str, str], ...] = ()


class Console:
    """The console's pages, answering from sub-requests to ``api`` (the WSGI app itself)."""

    def __init__(
        self,
        api: WSGIApplication,
        access: Access,
        *,
        read_body: Callable[[WSGIEnvironment], bytes],
        clock: Callable[[], float],
    ) -> None:
        self._api = api
        self._access = access
        self._read_body = read_body
        self._clock = clock
        self._sessions = Sessions(access, clock=clock)
        self._static: Dict[str, bytes] = {}

    # -- entry --------------------------------------------------------------------------

    def handle(self, environ: WSGIEnvironment) -> Reply:
        """Answer one console request (the caller checked ``is_console_path``)."""
        path: str = environ.get("PATH_INFO", "") or "/"
        method: str = environ.get("REQUEST_METHOD", "GET").upper()
        if path in _STATIC:
            if method not in ("GET", "HEAD"):
                return self._not_allowed("GET, HEAD")
            return self._static_file(path)
        posting = path in ("/login", "/logout", "/policy")
        if method not in ("GET", "HEAD") and not (posting and method == "POST"):
            return self._not_allowed("GET, HEAD, POST" if posting else "GET, HEAD")
        if method == "POST" and not _same_origin(environ):
            return self._message(403, "Refused: this form was sent from another site.")
        if not self._access.tokens_configured:
            if self._access.grant(environ) is Grant.NONE:
                return self._message(
                    403,
                    "This console is served to this machine only while no token is "
                    "configured. Start the server with --read-token TOKEN (and --admin-token "
                    "TOKEN to change the policy), then sign in with it.",
                )
            caller = self._local_caller(environ)
        else:
            if path == "/login":
                return self._login(environ, method)
            session = self._sessions.verify(request_cookies(environ).get(SESSION_COOKIE))
            if session is None:
                return self._sign_in_first(environ)
            caller = _Caller(environ, session.grant, session, self._sessions.csrf_token(session))
        if path in ("/login", "/logout"):
            if path == "/logout" and method == "POST":
                return self._logout(caller)
            return _redirect("/")
        return self._page(caller, path, method)

    def _page(self, caller: _Caller, path: str, method: str) -> Reply:
        query = parse_qs(caller.environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if path.startswith("/data/"):
            return self._relay(caller, path[len("/data") :], caller.environ.get("QUERY_STRING", ""))
        frame = self._frame(caller, query)
        if path == "/":
            return self._overview(caller, frame)
        if path == "/keys":
            return self._keys(caller, frame)
        if path == "/key":
            return self._key(caller, frame, _first(query, "name"))
        if path == "/events":
            return self._events(caller, frame, _first(query, "type"), _first(query, "name"))
        if path == "/policy":
            if method == "POST":
                return self._policy_post(caller, frame)
            return self._policy(caller, frame, saved=_first(query, "saved") == "1")
        return self._instance(caller, frame, path[len("/instance/") :], query)

    # -- who is asking ------------------------------------------------------------------

    def _local_caller(self, environ: WSGIEnvironment) -> _Caller:
        """A loopback caller with no token configured: CSRF token from a cookie of its own."""
        existing = request_cookies(environ).get(CSRF_COOKIE, "")
        if re.fullmatch(r"[0-9a-f]{32}", existing):
            return _Caller(environ, Grant.ADMIN, None, existing)
        token = secrets.token_hex(16)
        cookie = cookie_header(CSRF_COOKIE, token, max_age=SESSION_SECONDS, secure=_https(environ))
        return _Caller(environ, Grant.ADMIN, None, token, (cookie,))

    def _sign_in_first(self, environ: WSGIEnvironment) -> Reply:
        path = environ.get("PATH_INFO", "/")
        query = environ.get("QUERY_STRING", "")
        next_path = path + (f"?{query}" if query else "")
        if path.startswith("/data/") or environ.get("REQUEST_METHOD") == "POST":
            next_path = "/"
        html = _pages.login_page(_signed_out_frame(), next_path=next_path)
        return _html(401, html)

    def _login(self, environ: WSGIEnvironment, method: str) -> Reply:
        if method != "POST":
            next_path = _local_path(_first(parse_qs(environ.get("QUERY_STRING", "")), "next"))
            return _html(200, _pages.login_page(_signed_out_frame(), next_path=next_path))
        fields = self._form(environ)
        next_path = _local_path(fields.get("next", "/"))
        grant = self._access.grant_for_token(fields.get("token", "").strip() or None)
        if grant is Grant.NONE:
            html = _pages.login_page(
                _signed_out_frame(), next_path=next_path, error="That token is not valid here."
            )
            return _html(401, html)
        cookie = cookie_header(
            SESSION_COOKIE,
            self._sessions.issue(grant),
            max_age=SESSION_SECONDS,
            secure=_https(environ),
        )
        return _redirect(next_path, [cookie])

    def _logout(self, caller: _Caller) -> Reply:
        fields = self._form(caller.environ)
        if not same_secret(fields.get("csrf"), caller.csrf):
            return self._message(403, "Refused: the form was stale. Reload the page and retry.")
        cookie = cookie_header(SESSION_COOKIE, "", max_age=0, secure=_https(caller.environ))
        return _redirect("/login", [cookie])

    def _frame(self, caller: _Caller, query: Mapping[str, List[str]]) -> Frame:
        try:
            days = int(_first(query, "days") or _DEFAULT_DAYS)
        except ValueError:
            days = _DEFAULT_DAYS
        if days not in WINDOWS:
            days = _DEFAULT_DAYS
        today = datetime.fromtimestamp(self._clock(), timezone.utc).date()
        since = today - timedelta(days=days - 1)
        until = today + timedelta(days=1)
        environ = caller.environ
        kept = [
            (name, value)
            for name, values in query.items()
            if name not in ("days", "saved")
            for value in values[:1]
        ]
        here = environ.get("PATH_INFO", "/") + (f"?{urlencode(kept)}" if kept else "")
        return Frame(
            title="",
            days=days,
            since=since.isoformat(),
            until=until.isoformat(),
            here=here,
            csrf=caller.csrf,
            signed_in=caller.session is not None,
        )

    # -- the JSON API, in-process -------------------------------------------------------

    def _get(self, caller: _Caller, path: str, **params: object) -> Answer:
        return self._call(caller, "GET", path, params)

    def _window(self, frame: Frame) -> Dict[str, object]:
        return {"since": frame.since, "until": frame.until}

    def _call(
        self,
        caller: _Caller,
        method: str,
        path: str,
        params: Mapping[str, object],
        *,
        body: Optional[bytes] = None,
        token: Optional[str] = None,
    ) -> Answer:
        """Call the JSON API with the caller's access (or ``token``); its answer, parsed."""
        query = urlencode({name: value for name, value in params.items() if value is not None})
        status, _, content = self._subrequest(caller, method, path, query, body=body, token=token)
        parsed: Any = None
        if content:
            try:
                parsed = json.loads(content)
            except ValueError:
                parsed = None
        return Answer(path + (f"?{query}" if query else ""), status, parsed)

    def _subrequest(
        self,
        caller: _Caller,
        method: str,
        path: str,
        query: str,
        *,
        body: Optional[bytes] = None,
        token: Optional[str] = None,
    ) -> Tuple[int, Headers, bytes]:
        outer = caller.environ
        environ: Dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": outer.get("SERVER_NAME", "localhost"),
            "SERVER_PORT": outer.get("SERVER_PORT", "80"),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": outer.get("REMOTE_ADDR", ""),
            "CONTENT_LENGTH": str(len(body or b"")),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": outer.get("wsgi.url_scheme", "http"),
            "wsgi.input": io.BytesIO(body or b""),
            "wsgi.errors": outer.get("wsgi.errors"),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        if body is not None:
            environ["CONTENT_TYPE"] = "application/json"
        if token is None and self._access.tokens_configured:
            token = self._sessions.token_for(caller.grant)
        if token:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        answer: Dict[str, Any] = {}

        def start_response(status: str, headers: Headers, exc_info: Any = None) -> Any:
            answer["status"] = int(status.split(" ", 1)[0])
            answer["headers"] = headers
            return lambda data: None

        chunks = self._api(environ, start_response)
        content = b"".join(chunks)
        return answer.get("status", 500), answer.get("headers", []), content

    def _relay(self, caller: _Caller, path: str, query: str) -> Reply:
        """``/data/v1/...``: the JSON API's answer as it is (JSON or CSV), with the session's
        access, so the pages' data links work in the browser."""
        if not _DATA.fullmatch(path):
            return self._message(404, "No such data.")
        status, headers, content = self._subrequest(caller, "GET", path, query)
        kept = [
            (name, value)
            for name, value in headers
            if name.lower() in ("content-type", "content-disposition")
        ]
        return status, kept + _SECURITY_HEADERS + [("Cache-Control", "no-store")], content

    # -- pages --------------------------------------------------------------------------

    def _overview(self, caller: _Caller, frame: Frame) -> Reply:
        window = self._window(frame)
        stats = self._get(caller, "/v1/stats", **window)
        active = self._get(caller, "/v1/active", bucket="day", **window)
        frame = replace(frame, title="Fleet overview", section="overview")
        return _html(200, _pages.overview_page(frame, stats, active), caller)

    def _keys(self, caller: _Caller, frame: Frame) -> Reply:
        stats = self._get(caller, "/v1/stats", **self._window(frame))
        frame = replace(frame, title="Keys", section="keys")
        return _html(200, _pages.keys_page(frame, stats), caller)

    def _key(self, caller: _Caller, frame: Frame, key: str) -> Reply:
        if not key:
            return _redirect(f"/keys?days={frame.days}")
        window = self._window(frame)
        series = self._get(caller, "/v1/series", key=key, bucket="day", **window)
        breakdown = self._get(caller, "/v1/breakdown", key=key, limit=_BREAKDOWN_SHOWN, **window)
        frame = replace(frame, title=f"Key {key}", section="keys")
        return _html(200, _pages.key_page(frame, key, series, breakdown), caller)

    def _events(self, caller: _Caller, frame: Frame, event_type: str, event_name: str) -> Reply:
        stats = self._get(caller, "/v1/stats", **self._window(frame))
        events = self._get(
            caller,
            "/v1/events",
            type=event_type or None,
            name=event_name or None,
            limit=_EVENTS_SHOWN,
            **self._window(frame),
        )
        frame = replace(frame, title="Events", section="events")
        html = _pages.events_page(
            frame, stats, events, event_type=event_type, event_name=event_name
        )
        return _html(200, html, caller)

    def _instance(
        self, caller: _Caller, frame: Frame, instance_id: str, query: Mapping[str, List[str]]
    ) -> Reply:
        if not _UUID.fullmatch(instance_id):
            return self._message(404, "No such page: an instance id is a UUID.", caller)
        offset = _first(query, "offset")
        payloads = self._get(
            caller,
            f"/v1/instances/{instance_id.lower()}",
            limit=_PAYLOADS_SHOWN,
            offset=offset if offset.isdigit() else None,
        )
        events = self._get(caller, "/v1/events", instance=instance_id.lower(), limit=_EVENTS_SHOWN)
        frame = replace(frame, title=f"Instance {instance_id.lower()}", windowed=False)
        return _html(200, _pages.instance_page(frame, payloads, events), caller)

    def _policy(
        self,
        caller: _Caller,
        frame: Frame,
        *,
        saved: bool = False,
        form: Optional[PolicyForm] = None,
        status: int = 200,
    ) -> Reply:
        policy = self._get(caller, "/v1/policy")
        history = self._get(caller, "/v1/policy/history")
        if form is None and policy.ok:
            form = PolicyForm.from_policy(policy.body)
        can_change = not self._access.tokens_configured or self._access.admin_token is not None
        frame = replace(frame, title="Policy", section="policy", windowed=False)
        html = _pages.policy_page(
            frame,
            policy,
            history,
            form,
            can_change=can_change,
            needs_token=caller.grant < Grant.ADMIN,
            saved=saved,
        )
        return _html(status, html, caller)

    def _policy_post(self, caller: _Caller, frame: Frame) -> Reply:
        fields = self._form(caller.environ)
        if not same_secret(fields.get("csrf"), caller.csrf):
            return self._message(
                403, "Refused: the form was stale or came from elsewhere. Reload and retry.", caller
            )
        form = PolicyForm.from_fields(fields)
        policy = form.to_policy()
        token: Optional[str] = None
        if caller.grant < Grant.ADMIN:
            token = fields.get("admin_token", "").strip()
            if not token:
                form.errors["admin_token"] = "Enter the admin token to change the policy."  # noqa: S105
        if policy is None or form.errors:
            return self._policy(caller, frame, form=form, status=400)
        answer = self._call(
            caller, "PUT", "/v1/policy", {}, body=json.dumps(policy).encode(), token=token
        )
        if answer.status == 200:
            return _redirect(f"/policy?saved=1&days={frame.days}")
        if answer.status in (401, 403) and token:
            form.errors["admin_token"] = "That is not the admin token."  # noqa: S105
        else:
            form.errors["form"] = f"The policy was not saved: {answer.error}"
        return self._policy(caller, frame, form=form, status=400)

    # -- plumbing -----------------------------------------------------------------------

    def _form(self, environ: WSGIEnvironment) -> Dict[str, str]:
        """A urlencoded form body's fields (the first of repeated names), bounded."""
        content_type = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return {}
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return {}
        if not 0 < length <= _MAX_FORM_BYTES:
            return {}
        raw = self._read_body(environ)
        fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return {name: values[0] for name, values in fields.items()}

    def _static_file(self, path: str) -> Reply:
        name, content_type = _STATIC[path]
        content = self._static.get(name)
        if content is None:
            content = resources.files(__package__).joinpath("static", name).read_bytes()
            self._static[name] = content
        headers = [("Content-Type", content_type), ("Cache-Control", "public, max-age=3600")]
        return 200, headers + _SECURITY_HEADERS, content

    def _message(self, status: int, message: str, caller: Optional[_Caller] = None) -> Reply:
        frame = Frame(title="Not available" if status >= 400 else "", data=False)
        return _html(status, _pages.message_page(frame, message), caller)

    def _not_allowed(self, allow: str) -> Reply:
        status, headers, body = self._message(405, "That method is not allowed here.")
        return status, [*headers, ("Allow", allow)], body


def _signed_out_frame() -> Frame:
    return Frame(title="Sign in", data=False)


def _html(status: int, html: str, caller: Optional[_Caller] = None) -> Reply:
    headers: Headers = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")]
    headers += _SECURITY_HEADERS
    if caller is not None:
        headers += list(caller.set_cookies)
    return status, headers, html.encode()


def _redirect(location: str, extra: Optional[List[Tuple[str, str]]] = None) -> Reply:
    headers: Headers = [("Location", location), ("Cache-Control", "no-store"), *_SECURITY_HEADERS]
    return 303, headers + list(extra or []), b""


def _first(query: Mapping[str, List[str]], name: str) -> str:
    values = query.get(name)
    return values[0] if values else ""


def _local_path(path: str) -> str:
    """``path`` when it is a path on this server (no scheme, host or ``//``), else ``/``."""
    if path.startswith("/") and not path.startswith("//") and "\\" not in path:
        return path
    return "/"


def _https(environ: WSGIEnvironment) -> bool:
    return environ.get("wsgi.url_scheme") == "https"


def _same_origin(environ: WSGIEnvironment) -> bool:
    """False when the browser says a form came from another site.

    ``Sec-Fetch-Site`` first (every current browser sends it, and a proxy that
    ends TLS does not change it); else the ``Origin``'s host and port against
    ``Host`` (not the scheme: behind such a proxy the server sees plain HTTP).
    """
    fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return True
    host = environ.get("HTTP_HOST", "")
    return bool(host) and origin.partition("://")[2] == host
