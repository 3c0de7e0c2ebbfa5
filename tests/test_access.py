"""Who may read and change the policy: every endpoint, token configuration and credential.

Requests from another machine cannot be made over loopback, so the matrix
calls the WSGI application with a ``REMOTE_ADDR``; a real server on loopback
checks the same answers over HTTP.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import requests

from server_stub import create_app, serve
from server_stub._access import Access, Grant, bearer_token, is_loopback
from server_stub._app import App
from server_stub._http import make_server

READ, ADMIN = "read-secret", "admin-secret"
INSTANCE = str(uuid.uuid4())
OPEN, READS, ADMINS = "open", "read", "admin"
ENDPOINTS: List[Tuple[str, str, str]] = [
    ("POST", f"/v1/update/{INSTANCE}", OPEN),
    ("GET", "/healthz", OPEN),
    ("GET", "/v1/stats", READS),
    ("GET", "/v1/series?key=k", READS),
    ("GET", "/v1/breakdown?key=k", READS),
    ("GET", "/v1/active?bucket=week", READS),
    ("GET", f"/v1/instances/{INSTANCE}", READS),
    ("GET", "/v1/policy", READS),
    ("GET", "/v1/policy/history", READS),
    ("GET", "/v1/openapi.json", READS),
    ("HEAD", "/v1/stats", READS),
    ("PUT", "/v1/policy", ADMINS),
]
CONFIGURATIONS = {
    "no tokens": (None, None),
    "read token": (READ, None),
    "admin token": (None, ADMIN),
    "both tokens": (READ, ADMIN),
}


def call(
    app: App,
    method: str,
    path: str,
    *,
    remote: str = "127.0.0.1",
    token: Optional[str] = None,
    body: Optional[Dict[str, Any]] = None,
) -> Tuple[int, Dict[str, str], bytes]:
    """One request through the WSGI interface: status, headers, body."""
    raw = json.dumps(body).encode() if body is not None else b""
    route, _, query = path.partition("?")
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": route,
        "QUERY_STRING": query,
        "REMOTE_ADDR": remote,
        "CONTENT_TYPE": "application/json" if body is not None else "",
        "CONTENT_LENGTH": str(len(raw)),
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": io.BytesIO(raw),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
    }
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    answer: Dict[str, Any] = {}

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
        answer["status"] = int(status.split(maxsplit=1)[0])
        answer["headers"] = dict(headers)
        return None

    chunks = app(environ, start_response)
    return answer["status"], answer["headers"], b"".join(chunks)


def request_body(method: str) -> Optional[Dict[str, Any]]:
    if method == "POST":
        return {"instance_id": INSTANCE, "timestamp": "2026-11-23T10:00:00Z", "data": {"k": 1}}
    if method == "PUT":
        return {"next_update": 60}
    return None


def expected_status(
    configuration: Tuple[Optional[str], Optional[str]], need: str, token: Optional[str], remote: str
) -> int:
    """The documented rules, written out as a table of cases."""
    read_token, admin_token = configuration
    if need == OPEN:
        return 200
    if read_token is None and admin_token is None:
        return 200 if remote == "127.0.0.1" else 403
    if need == ADMINS and admin_token is None:
        return 403  # policy changes need an admin token to be configured
    is_admin = token is not None and token == admin_token
    is_reader = token is not None and token == read_token
    if need == READS:
        return 200 if (is_admin or is_reader) else 401
    if is_admin:
        return 200
    return 403 if is_reader else 401


@pytest.fixture
def apps(backend_db: str) -> Iterator[Dict[str, App]]:
    """One app per token configuration, all on one store."""
    built: Dict[str, App] = {}
    first: Optional[App] = None
    for name, (read_token, admin_token) in CONFIGURATIONS.items():
        if first is None:
            first = create_app(db=backend_db, read_token=read_token, admin_token=admin_token)
            built[name] = first
        else:
            built[name] = App(first.store, first.policy, access=Access(read_token, admin_token))
    yield built
    assert first is not None
    first.store.close()


def test_every_endpoint_for_every_token_and_client(apps: Dict[str, App]) -> None:
    checked = 0
    for name, app in apps.items():
        configuration = CONFIGURATIONS[name]
        for method, path, need in ENDPOINTS:
            for token in (None, "wrong", READ, ADMIN):
                for remote in ("127.0.0.1", "203.0.113.9"):
                    status, headers, body = call(
                        app, method, path, remote=remote, token=token, body=request_body(method)
                    )
                    expected = expected_status(configuration, need, token, remote)
                    case = f"{name}: {method} {path} token={token} from {remote}"
                    assert status == expected, f"{case}: {status} {body!r}"
                    checked += 1
                    if status == 401:
                        assert headers["WWW-Authenticate"] == "Bearer", case
                    if status in (401, 403) and method != "HEAD":
                        message = json.loads(body)["error"]
                        assert "stats" not in message and INSTANCE not in message
                        if configuration == (None, None):
                            assert "--read-token" in message, case
                        elif status == 403 and configuration[1] is None:
                            assert "--admin-token" in message, case
    assert checked == 4 * len(ENDPOINTS) * 4 * 2


def test_refused_requests_reveal_no_data(apps: Dict[str, App]) -> None:
    app = apps["both tokens"]
    assert call(app, "POST", f"/v1/update/{INSTANCE}", body=request_body("POST"))[0] == 200
    status, _, body = call(app, "GET", f"/v1/instances/{INSTANCE}", token="wrong")
    assert status == 401
    assert json.loads(body) == {"error": "a valid bearer token is required"}
    status, _, body = call(app, "GET", f"/v1/instances/{INSTANCE}", token=READ)
    assert status == 200
    assert len(json.loads(body)["payloads"]) == 1


def test_tokens_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEMETRY_READ_TOKEN", READ)
    monkeypatch.setenv("TELEMETRY_ADMIN_TOKEN", ADMIN)
    app = create_app()  # the tokens come from the environment
    httpd = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = httpd.url
        refused = requests.get(f"{url}/v1/stats", timeout=10)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        wrong = requests.get(f"{url}/v1/stats", headers={"Authorization": "Bearer x"}, timeout=10)
        assert wrong.status_code == 401
        auth = {"Authorization": f"Bearer {READ}"}
        assert requests.get(f"{url}/v1/stats", headers=auth, timeout=10).status_code == 200
        put = requests.put(f"{url}/v1/policy", json={"stop": True}, headers=auth, timeout=10)
        assert put.status_code == 403
        admin = {"Authorization": f"Bearer {ADMIN}"}
        put = requests.put(f"{url}/v1/policy", json={"stop": True}, headers=admin, timeout=10)
        assert put.status_code == 200
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
        app.store.close()


def test_the_loopback_default_over_http() -> None:
    with serve(port=0) as server:
        assert requests.get(f"{server.url}/v1/policy", timeout=10).status_code == 200
        answer = requests.put(f"{server.url}/v1/policy", json={"next_update": 5}, timeout=10)
        assert answer.status_code == 200


def test_grant_for_a_token_obtained_elsewhere() -> None:
    access = Access(READ, ADMIN)
    assert access.grant_for_token(ADMIN) is Grant.ADMIN
    assert access.grant_for_token(READ) is Grant.READ
    assert access.grant_for_token("nope") is Grant.NONE
    assert access.grant_for_token(None) is Grant.NONE
    assert access.grant_for_token("é") is Grant.NONE  # non-ASCII compared safely
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert access.grant(remote, token=READ) is Grant.READ  # e.g. a console session
    assert access.check(remote, Grant.READ, token=READ) is None
    refusal = access.check(remote, Grant.ADMIN, token=READ)
    assert refusal is not None
    assert refusal.status == 403
    assert Access().grant({"REMOTE_ADDR": "::1"}) is Grant.ADMIN
    assert Access().grant(remote) is Grant.NONE
    assert "secret" not in repr(access)


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("", False),
        ("localhost", False),
        (None, False),
    ],
)
def test_loopback_addresses(address: Optional[str], local: bool) -> None:
    assert is_loopback(address) is local


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer ", None)],
)
def test_bearer_header(header: str, token: Optional[str]) -> None:
    assert bearer_token({"HTTP_AUTHORIZATION": header}) == token


@pytest.mark.parametrize("bad", ["", " x", "a b"])
def test_bad_tokens_are_refused_at_start(bad: str) -> None:
    with pytest.raises(ValueError, match="read_token"):
        Access(read_token=bad)
