"""The console over HTTP: access, sessions, CSRF, headers and the policy form.

What a browser shows is checked in ``test_console_browser.py``; these tests
speak HTTP to a real server on loopback to pin the rules a browser test would
only see from the outside.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import requests
from _fleet import ADMIN_TOKEN, READ_TOKEN, RunningServer, running_server

from server_stub import create_app
from server_stub._access import Access, Grant
from server_stub._sessions import SESSION_COOKIE, SESSION_SECONDS, Sessions

SECRET_KEY = "only-for-signed-in-eyes"
PAGES = [
    "/",
    "/keys",
    "/key?name=requests",
    "/events",
    "/policy",
    f"/instance/{uuid.UUID(int=1, version=4)}",
    "/data/v1/stats",
]


def post_payload(url: str, data: Dict[str, Any]) -> Dict[str, Any]:
    instance_id = str(uuid.UUID(int=7, version=4))
    body = {
        "instance_id": instance_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "payload_id": uuid.uuid4().hex,
        "data": data,
    }
    answer = requests.post(f"{url}/v1/update/{instance_id}", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    result: Dict[str, Any] = answer.json()
    return result


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with running_server() as running:
        post_payload(running.url, {SECRET_KEY: 1, "requests": 3})
        yield running


def sign_in(url: str, token: str = READ_TOKEN) -> requests.Session:
    session = requests.Session()
    answer = session.post(f"{url}/login", data={"token": token, "next": "/"}, allow_redirects=False)
    assert answer.status_code == 303
    return session


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match is not None, "no CSRF token in the page"
    return match.group(1)


def set_cookie_headers(answer: requests.Response) -> List[str]:
    return [value for name, value in answer.raw.headers.items() if name.lower() == "set-cookie"]


@pytest.mark.parametrize("path", PAGES)
def test_pages_without_a_session_answer_401_with_the_form_and_no_data(
    server: RunningServer, path: str
) -> None:
    answer = requests.get(f"{server.url}{path}", timeout=10)
    assert answer.status_code == 401
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert 'name="token"' in answer.text and 'action="/login"' in answer.text
    assert SECRET_KEY not in answer.text
    assert "requests" not in answer.text.replace("/key?name=requests", "")


def test_static_files_need_no_token(server: RunningServer) -> None:
    for path, content_type in (
        ("/static/console.css", "text/css; charset=utf-8"),
        ("/static/console.js", "text/javascript; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
        ("/favicon.ico", "image/svg+xml"),
    ):
        answer = requests.get(f"{server.url}{path}", timeout=10)
        assert answer.status_code == 200, path
        assert answer.headers["Content-Type"] == content_type
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.content


def test_signing_in_sets_a_strict_http_only_cookie_that_holds_no_token(
    server: RunningServer,
) -> None:
    wrong = requests.post(f"{server.url}/login", data={"token": "guess"}, allow_redirects=False)
    assert wrong.status_code == 401
    assert 'aria-invalid="true"' in wrong.text and "not valid" in wrong.text
    assert not set_cookie_headers(wrong)
    for token in (READ_TOKEN, ADMIN_TOKEN):
        answer = requests.post(
            f"{server.url}/login", data={"token": token, "next": "/keys"}, allow_redirects=False
        )
        assert answer.status_code == 303
        assert answer.headers["Location"] == "/keys"
        (cookie,) = set_cookie_headers(answer)
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        flags = [flag.strip() for flag in cookie.split(";")[1:]]
        assert {"HttpOnly", "SameSite=Strict", "Path=/", f"Max-Age={SESSION_SECONDS}"} <= set(flags)
        assert token not in cookie
        value = cookie.split(";", 1)[0].split("=", 1)[1]
        page = requests.get(f"{server.url}/keys", cookies={SESSION_COOKIE: value}, timeout=10)
        assert page.status_code == 200
        assert SECRET_KEY in page.text


def test_sign_in_goes_back_only_to_a_path_on_this_server(server: RunningServer) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        answer = requests.post(
            f"{server.url}/login",
            data={"token": READ_TOKEN, "next": target},
            allow_redirects=False,
        )
        assert answer.headers["Location"] == "/"


def test_forged_and_expired_sessions_are_refused(server: RunningServer) -> None:
    session = sign_in(server.url)
    value = session.cookies[SESSION_COOKIE]
    version, grant, expires, nonce, signature = value.split(".")
    forged = [
        f"{version}.2.{expires}.{nonce}.{signature}",  # a read session claiming admin
        f"{version}.{grant}.{int(expires) + 1}.{nonce}.{signature}",  # living longer
        f"{version}.{grant}.{expires}.{nonce}.{'0' * len(signature)}",
        READ_TOKEN,
        "",
    ]
    for cookie in forged:
        answer = requests.get(f"{server.url}/", cookies={SESSION_COOKIE: cookie}, timeout=10)
        assert answer.status_code == 401, cookie
    now = [1_000_000.0]
    sessions = Sessions(Access(read_token="t" * 10), clock=lambda: now[0])
    issued = sessions.issue(Grant.READ)
    assert sessions.verify(issued) is not None
    now[0] += SESSION_SECONDS
    assert sessions.verify(issued) is None
    now[0] -= SESSION_SECONDS
    other_token = Sessions(Access(read_token="u" * 10), clock=lambda: now[0])
    assert other_token.verify(issued) is None  # changing the token ends its sessions


def test_signing_out_needs_the_form_token_and_drops_the_cookie(server: RunningServer) -> None:
    session = sign_in(server.url)
    page = session.get(f"{server.url}/keys", timeout=10)
    refused = session.post(f"{server.url}/logout", data={"csrf": "0" * 64}, allow_redirects=False)
    assert refused.status_code == 403
    answer = session.post(
        f"{server.url}/logout", data={"csrf": csrf_of(page.text)}, allow_redirects=False
    )
    assert answer.status_code == 303 and answer.headers["Location"] == "/login"
    (cookie,) = set_cookie_headers(answer)
    assert cookie.startswith(f"{SESSION_COOKIE}=;") and "Max-Age=0" in cookie
    assert session.get(f"{server.url}/keys", timeout=10).status_code == 401


def policy_fields(csrf: str, **changes: str) -> Dict[str, str]:
    fields = {"csrf": csrf, "next_update": "120", "disabled_keys": "version", "stop": "none"}
    fields.update(changes)
    return fields


def test_the_policy_form_refuses_missing_tokens_and_other_origins(server: RunningServer) -> None:
    session = sign_in(server.url, ADMIN_TOKEN)
    csrf = csrf_of(session.get(f"{server.url}/policy", timeout=10).text)
    before = server.api("/v1/policy")
    attempts: List[Tuple[Dict[str, str], Dict[str, str]]] = [
        (policy_fields(""), {}),
        (policy_fields("f" * 64), {}),
        (policy_fields(csrf), {"Origin": "http://evil.example"}),
        (policy_fields(csrf), {"Sec-Fetch-Site": "cross-site"}),
    ]
    for fields, headers in attempts:
        answer = session.post(
            f"{server.url}/policy", data=fields, headers=headers, allow_redirects=False
        )
        assert answer.status_code == 403, (fields, headers)
    assert server.api("/v1/policy") == before


def test_a_policy_saved_through_the_form_is_the_next_update_answer(server: RunningServer) -> None:
    session = sign_in(server.url, ADMIN_TOKEN)
    page = session.get(f"{server.url}/policy", timeout=10)
    assert 'name="admin_token"' not in page.text  # the session is the admin's
    answer = session.post(
        f"{server.url}/policy",
        data=policy_fields(csrf_of(page.text), next_update="120"),
        # as a browser sends it through a proxy that ends TLS
        headers={"Origin": server.url.replace("http:", "https:"), "Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    )
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/policy?saved=1&days=30"
    reply = post_payload(server.url, {"requests": 1})
    assert reply["disable_keys"] == ["version"]
    assert reply["next_update"] == 120 * 1_000_000_000
    saved = session.get(f"{server.url}/policy?saved=1", timeout=10)
    assert "The policy was saved." in saved.text


def test_a_reader_changes_the_policy_only_with_the_admin_token(server: RunningServer) -> None:
    session = sign_in(server.url, READ_TOKEN)
    page = session.get(f"{server.url}/policy", timeout=10)
    assert 'name="admin_token"' in page.text
    csrf = csrf_of(page.text)
    for token, message in (("", "Enter the admin token"), (READ_TOKEN, "not the admin token")):
        answer = session.post(
            f"{server.url}/policy", data=policy_fields(csrf, admin_token=token), timeout=10
        )
        assert answer.status_code == 400
        assert message in answer.text
        assert 'id="admin_token" name="admin_token"' in answer.text
        assert 'aria-describedby="admin_token-error"' in answer.text
    assert post_payload(server.url, {}).get("disable_keys") is None
    answer = session.post(
        f"{server.url}/policy",
        data=policy_fields(csrf, admin_token=ADMIN_TOKEN),
        allow_redirects=False,
    )
    assert answer.status_code == 303
    assert post_payload(server.url, {})["disable_keys"] == ["version"]


def test_an_invalid_policy_is_shown_in_the_form_with_what_was_typed(
    server: RunningServer,
) -> None:
    session = sign_in(server.url, ADMIN_TOKEN)
    csrf = csrf_of(session.get(f"{server.url}/policy", timeout=10).text)
    answer = session.post(
        f"{server.url}/policy", data=policy_fields(csrf, next_update="soon <b>"), timeout=10
    )
    assert answer.status_code == 400
    assert 'value="soon &lt;b&gt;" aria-invalid="true" aria-describedby="next_update-error"' in (
        answer.text
    )
    # A value only the server can refuse: its message is shown, the form kept.
    answer = session.post(
        f"{server.url}/policy", data=policy_fields(csrf, next_update="-5"), timeout=10
    )
    assert answer.status_code == 400
    assert "The policy was not saved: 400: " in answer.text
    assert "next_update" in answer.text and 'value="-5"' in answer.text
    assert "disable_keys" not in post_payload(server.url, {})


def test_data_links_answer_what_the_json_api_answers(server: RunningServer) -> None:
    session = sign_in(server.url)
    window = {"since": "2020-01-01", "until": "2030-01-01"}
    relayed = session.get(f"{server.url}/data/v1/stats", params=window, timeout=10)
    assert relayed.status_code == 200
    assert relayed.headers["Content-Type"] == "application/json"
    assert relayed.json() == server.api("/v1/stats", **window)
    assert relayed.json()["keys"][SECRET_KEY] == 1
    as_csv = session.get(
        f"{server.url}/data/v1/stats", params={**window, "format": "csv"}, timeout=10
    )
    assert as_csv.headers["Content-Type"].startswith("text/csv")
    for path in (
        "/data/v1/update/x",
        "/data/healthz",
        "/data/v1/stats%2F..%2Fpolicy",
        "/data/v1/instances/x",
    ):
        assert session.get(f"{server.url}{path}", timeout=10).status_code == 404


def test_other_methods_are_refused(server: RunningServer) -> None:
    session = sign_in(server.url)
    answer = session.put(f"{server.url}/keys", data=b"", timeout=10)
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "GET, HEAD"
    assert session.head(f"{server.url}/keys", timeout=10).status_code == 200


def test_without_a_token_the_console_is_for_this_machine_only() -> None:
    app = create_app()

    def call(remote: str) -> Tuple[str, Dict[str, str], bytes]:
        seen: Dict[str, Any] = {}

        def start_response(status: str, headers: List[Tuple[str, str]], exc: Any = None) -> Any:
            seen["status"], seen["headers"] = status, dict(headers)
            return lambda data: None

        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/keys",
            "QUERY_STRING": "",
            "REMOTE_ADDR": remote,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "wsgi.input": io.BytesIO(b""),
            "wsgi.url_scheme": "http",
        }
        body = b"".join(app(environ, start_response))
        return seen["status"], seen["headers"], body

    try:
        status, headers, body = call("10.1.2.3")
        assert status.startswith("403")
        assert b"--read-token" in body and b"<table" not in body
        status, headers, body = call("127.0.0.1")
        assert status.startswith("200")
        assert b"<table" in body
        assert "HttpOnly; SameSite=Strict" in headers["Set-Cookie"]
    finally:
        app.store.close()


def test_without_a_token_forms_still_need_their_csrf_cookie() -> None:
    with running_server(read_token=None, admin_token=None) as server:
        session = requests.Session()
        page = session.get(f"{server.url}/policy", timeout=10)
        assert page.status_code == 200
        csrf = csrf_of(page.text)
        assert session.cookies["telemetry_csrf"] == csrf
        stranger = requests.post(f"{server.url}/policy", data=policy_fields(csrf), timeout=10)
        assert stranger.status_code == 403  # the form token without the cookie
        answer = session.post(
            f"{server.url}/policy", data=policy_fields(csrf), allow_redirects=False
        )
        assert answer.status_code == 303
        assert server.api("/v1/policy", token=None)["disabled_keys"] == ["version"]
