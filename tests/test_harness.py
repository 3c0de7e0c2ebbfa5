"""The test harness (``serve()``/``Server``): scripted answers, drops, delays, prompt
close, waiting for requests."""

from __future__ import annotations

import threading
import time
import uuid
from typing import List

import pytest
import requests
from _server_api import NS, assert_healthy, make_payload, post

from server_stub import Server, serve


def test_scripted_status_is_answered_and_not_stored(backend_server: Server) -> None:
    backend_server.script(503, {"error": "busy"}, headers={"Retry-After": "7"})
    payload = make_payload()

    response = post(backend_server, payload)

    assert response.status_code == 503
    assert response.json() == {"error": "busy"}
    assert response.headers["Retry-After"] == "7"
    assert backend_server.stats()["payloads"] == 0
    assert backend_server.payloads == [payload]
    assert backend_server.requests[-1].scripted
    # The script is used up: the retry is processed normally.
    assert post(backend_server, payload).status_code == 200
    assert backend_server.stats()["payloads"] == 1


def test_scripted_status_with_store_stores(backend_server: Server) -> None:
    backend_server.script(500, store=True)

    response = post(backend_server, make_payload())

    assert response.status_code == 500
    assert response.content == b""
    assert backend_server.stats()["payloads"] == 1


def test_scripted_responses_are_used_in_order(backend_server: Server) -> None:
    backend_server.script(429, headers={"Retry-After": "1"}, times=2)
    backend_server.script(200, b"not json")
    backend_server.script(body={"next_update": 5 * NS, "stop": True})
    assert backend_server.scripts_pending == 4

    answers = [post(backend_server, make_payload()) for _ in range(5)]

    assert [answer.status_code for answer in answers] == [429, 429, 200, 200, 200]
    assert answers[2].content == b"not json"
    assert answers[3].json() == {"next_update": 5 * NS, "stop": True}
    assert answers[4].json() == {"next_update": 3600 * NS}
    assert backend_server.stats()["payloads"] == 2  # the normally processed ones
    # Only /v1/update requests use the script.
    backend_server.script(500)
    assert_healthy(backend_server)
    assert backend_server.scripts_pending == 1


def test_scripted_drop_closes_without_answer_or_storing(backend_server: Server) -> None:
    backend_server.script(drop=True)
    payload = make_payload()

    with pytest.raises(requests.ConnectionError):
        post(backend_server, payload)

    assert backend_server.stats()["payloads"] == 0
    assert backend_server.requests[-1].dropped
    assert backend_server.payloads == [payload]
    assert_healthy(backend_server)


def test_scripted_drop_after_store_stores_then_drops(backend_server: Server) -> None:
    backend_server.script(drop_after_store=True)
    payload = make_payload(data={"n": 1})

    with pytest.raises(requests.ConnectionError):
        post(backend_server, payload)
    retry = post(backend_server, payload)

    assert retry.status_code == 200
    assert backend_server.stats()["payloads"] == 1
    assert [request.status for request in backend_server.requests] == [None, 200]


def test_scripted_delay_answers_late(backend_server: Server) -> None:
    backend_server.script(delay=0.2)

    started = time.monotonic()
    response = post(backend_server, make_payload())

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_scripted_delay_times_out_the_client_and_close_stays_prompt() -> None:
    server = serve()
    try:
        server.script(delay=60)
        with pytest.raises(requests.Timeout):
            requests.post(
                f"{server.url}/v1/update/{uuid.uuid4()}",
                json=make_payload(),
                timeout=(5, 0.2),
            )
    finally:
        closed_before_the_delay_ends(server)
    server.close()  # twice is fine


def closed_before_the_delay_ends(server: Server) -> None:
    """``server.close()``, which must cut a scripted 60 s delay short: a 30 s guard, no
    timed assertion (``close()`` waiting for the delay would be caught, however loaded
    the machine)."""
    closer = threading.Thread(target=server.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() waited for the scripted delay"


def test_close_while_a_request_waits_in_a_scripted_delay() -> None:
    server = serve()
    errors: List[BaseException] = []

    def client() -> None:
        try:
            post(server, make_payload())
        except requests.ConnectionError as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    try:
        server.script(delay=60)
        thread.start()
        assert server.wait_for(lambda: server.scripts_pending == 0)
    finally:
        closed_before_the_delay_ends(server)
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert server.requests[-1].dropped


def test_a_scripted_hold_answers_once_released_and_close_cuts_it_short() -> None:
    release = threading.Event()
    answers: List[int] = []
    errors: List[BaseException] = []

    def client() -> None:
        try:
            answers.append(post(server, make_payload()).status_code)
        except requests.ConnectionError as exc:
            errors.append(exc)

    with serve() as server:
        server.script(hold=release)
        first = threading.Thread(target=client)
        first.start()
        assert server.wait_for(lambda: server.scripts_pending == 0)
        assert server.requests == []  # arrived, held: not answered yet
        release.set()
        first.join(10)
        assert answers == [200]
        server.script(hold=threading.Event())  # never released by the test
        second = threading.Thread(target=client)
        second.start()
        assert server.wait_for(lambda: server.scripts_pending == 0)
    second.join(10)
    assert not second.is_alive()
    assert len(errors) == 1
    assert server.requests[-1].dropped


def test_wait_for_requests(backend_server: Server) -> None:
    assert not backend_server.wait_for_requests(1, timeout=0.01)
    assert_healthy(backend_server)
    assert not backend_server.wait_for_requests(1, timeout=0.01)
    assert backend_server.wait_for_requests(1, timeout=0.01, path_prefix="")
    thread = threading.Thread(target=post, args=(backend_server, make_payload()))
    thread.start()
    assert backend_server.wait_for_requests(1)
    thread.join()


def test_script_rejects_contradictions(backend_server: Server) -> None:
    with pytest.raises(ValueError, match="exclude"):
        backend_server.script(drop=True, drop_after_store=True)
    with pytest.raises(ValueError, match="status"):
        backend_server.script(700)
    with pytest.raises(ValueError, match="status"):
        backend_server.script(100)
    with pytest.raises(TypeError):
        backend_server.script(200, {"when": object()})
    with pytest.raises(ValueError, match="hop-by-hop"):
        backend_server.script(200, headers={"Connection": "close"})
    assert backend_server.scripts_pending == 0
