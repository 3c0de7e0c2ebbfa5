"""PostgreSQL storage: the same answers as SQLite, migrations, and 4 gunicorn workers sharing it.

The server tests that use ``backend_server`` run on PostgreSQL too; these are the
ones only PostgreSQL needs. They use the plugin's session-wide real PostgreSQL
(``postgres_cluster``/``postgres_url``): when it cannot start they fail.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import psycopg
import pytest
import requests
from _net import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_stub import PayloadRecord, PostgresStore, SQLiteStore, open_store, serve
from server_stub._postgres import SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
RECEIVED_AT = "2026-11-23T10:00:00.123456Z"


def canonical(value: Any) -> str:
    """A JSON text that tells 1, 1.0 and true apart (``==`` does not)."""
    return json.dumps(value, sort_keys=True)


def record(
    data: Dict[str, Any], *, instance_id: str = "i-1", payload_id: Optional[str] = None
) -> PayloadRecord:
    return PayloadRecord(
        payload_id=payload_id or uuid.uuid4().hex,
        instance_id=instance_id,
        timestamp="2026-11-23T10:00:00.123456789+01:00",
        received_at=RECEIVED_AT,
        data=data,
        client={"name": "telemetry-python", "dropped": 1},
    )


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_url)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def pg_connection(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the test's schema, for emptying it between Hypothesis examples."""
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        yield connection


def _empty(connection: psycopg.Connection[Any]) -> None:
    # DELETE, not TRUNCATE: on tables this small it costs a millisecond, not tens.
    connection.execute("DELETE FROM payloads")
    connection.execute("DELETE FROM rate_windows")


# -- the same answers as SQLite ---------------------------------------------------------------

# jsonb has no \u0000 and no unpaired surrogates (refused, tested below), and no -0.0.
_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
_FLOATS = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda x: x != 0 or str(x) == "0.0"
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | _FLOATS
    | st.sampled_from([1, 1.0, 1e16, 1.5e300, 1e-7, 2**63, "1", True])
    | _TEXT
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "z", "bb", "é", "value", "count"]), children)
    ),
    max_leaves=8,
)
_COUNTING_SET = st.lists(
    st.fixed_dictionaries(
        {
            "value": _JSON | st.sampled_from([1, 1.0, "x", {"a": 1, "z": 2}, {"z": 2, "a": 1}]),
            "count": st.integers() | st.sampled_from([1, 2, 10**20]),
        }
    ),
    max_size=4,
)
_VALUES = (
    st.integers()
    | st.sampled_from([0, 1, -3, 10**30])
    | _COUNTING_SET
    | _JSON
    # Nearly a counting set: an extra key, a float or bool count, or not all items.
    | st.sampled_from(
        [
            [{"value": "x", "count": 1, "extra": 0}],
            [{"value": "x", "count": 1.0}],
            [{"value": "x", "count": True}],
            [{"value": "x", "count": 1}, 5],
            [{"count": 1}],
            [{"value": None}],
            [{"value": "x", "count": None}],
            [{"value": "x", "count": "1"}],
            [{"value": "x", "count": 1}, {"value": "y"}],
        ]
    )
)
# Few keys, so that they repeat across payloads and change kind.
_DATAS = st.lists(
    st.dictionaries(st.sampled_from(["k", "n", "set", "flag", "Z", "ключ", "a b"]), _VALUES),
    max_size=8,
)


@settings(
    max_examples=100,  # up to 8 payloads each, every kind of value (more by hand)
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(datas=_DATAS)
def test_stats_equal_sqlite_stats(
    pg_store: PostgresStore, pg_connection: psycopg.Connection[Any], datas: List[Dict[str, Any]]
) -> None:
    _empty(pg_connection)
    sqlite = SQLiteStore()
    try:
        for index, data in enumerate(datas):
            item = record(data, instance_id=f"i-{index % 3}")
            assert sqlite.add(item) is True
            assert pg_store.add(item) is True

        expected = sqlite.stats()
        got = pg_store.stats()
    finally:
        sqlite.close()

    assert canonical(got) == canonical(expected)
    assert list(got["keys"]) == list(expected["keys"])


def test_stats_follow_kind_changes_and_merge_counting_sets(pg_store: PostgresStore) -> None:
    datas: List[Dict[str, Any]] = [
        {"k": 5, "flag": True, "set": [{"value": "a", "count": 1}], "empty": 3, "big": 10**30},
        {"k": "text", "flag": True, "set": 7, "empty": [], "big": 10**30},
        {"k": 2, "set": [{"value": {"z": 1, "a": 2}, "count": 2}, {"value": "a", "count": 1}]},
        {"k": 3, "set": [{"value": {"a": 2, "z": 1}, "count": 3}, {"value": 1, "count": 1}]},
        {"set": [{"value": 1.0, "count": 4}], "float": 1e16, "f": 2.5},
        {"almost": [{"value": None}]},  # no count: a plain value, not a counting set
    ]
    for data in datas:
        assert pg_store.add(record(data))

    keys = pg_store.stats()["keys"]

    assert canonical(keys) == canonical(
        {
            "almost": [{"value": None}],
            "big": 2**63 - 1,  # the sum saturates
            "empty": [],
            "f": 2.5,
            "flag": True,
            "float": 1e16,
            "k": 5,
            "set": [
                {"value": "a", "count": 1},
                {"value": 1, "count": 1},
                {"value": 1.0, "count": 4},
                {"value": {"a": 2, "z": 1}, "count": 5},
            ],
        }
    )


def test_payloads_come_back_as_they_were_sent(pg_store: PostgresStore) -> None:
    data = {
        "float": 1e16,
        "huge": 1.5e300,
        "tiny": 5e-324,
        "int": 2**70,
        "text": 'é 😀 "quoted" e+5 \\u0000',
        "nested": {"z": [1, 1.0, True, None], "a": {}},
    }
    sent = record(data, payload_id="ab" * 16)

    assert pg_store.add(sent) is True
    assert pg_store.add(sent) is False

    [stored] = pg_store.instance_payloads("i-1", 10, 0)
    assert canonical(stored["data"]) == canonical(data)
    assert stored == {
        "payload_id": "ab" * 16,
        "timestamp": "2026-11-23T10:00:00.123456789+01:00",
        "received_at": RECEIVED_AT,
        "data": data,
        "client": {"name": "telemetry-python", "dropped": 1},
    }
    assert pg_store.all_payloads() == [{**stored, "instance_id": "i-1"}]


@pytest.mark.parametrize("text", ["nul \x00 inside", "lone \ud800 surrogate"])
def test_what_jsonb_cannot_hold_is_refused_with_400(postgres_url: str, text: str) -> None:
    payload = {
        "instance_id": str(uuid.uuid4()),
        "timestamp": "2026-11-23T10:00:00Z",
        "payload_id": uuid.uuid4().hex,
        "data": {"key": text},
    }
    with serve(db=postgres_url) as server:
        response = requests.post(
            f"{server.url}/v1/update/{payload['instance_id']}", json=payload, timeout=10
        )

        assert response.status_code == 400
        assert "cannot be stored" in response.json()["error"]
        assert server.stats()["payloads"] == 0
    with serve() as server:  # SQLite stores it
        response = requests.post(
            f"{server.url}/v1/update/{payload['instance_id']}", json=payload, timeout=10
        )
        assert response.status_code == 200


def test_rate_limit_decisions_equal_sqlite_ones(pg_store: PostgresStore) -> None:
    rng = random.Random(9)
    sqlite = SQLiteStore()
    now = 1000.0
    try:
        for _ in range(300):
            now += rng.choice([0.0, 0.5, 3.0, 11.0, -20.0])  # backwards too: a new window
            instance_id, limit = rng.choice("ab"), rng.choice([1, 2, 3, 5])  # limits change

            expected = sqlite.check_rate(instance_id, limit, 10.0, now)
            got = pg_store.check_rate(instance_id, limit, 10.0, now)

            assert got == (None if expected is None else pytest.approx(expected))
    finally:
        sqlite.close()


# -- schema and configuration -----------------------------------------------------------------


def test_schema_is_created_once_when_workers_start_together(postgres_url: str) -> None:
    start = threading.Barrier(6)

    def open_one() -> PostgresStore:
        start.wait()
        return PostgresStore(postgres_url)

    with ThreadPoolExecutor(6) as pool:
        stores = list(pool.map(lambda _: open_one(), range(6)))
    for store in stores:
        store.close()

    with psycopg.connect(postgres_url) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
        indexes = connection.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'payloads' ORDER BY indexname"
        ).fetchall()
    assert versions == [(SCHEMA_VERSION,)]
    assert any("(instance_id, seq)" in definition for (definition,) in indexes)


def test_a_database_from_newer_code_is_refused(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("UPDATE schema_version SET version = version + 1")

    with pytest.raises(RuntimeError, match="newer"):
        PostgresStore(postgres_url)


def test_db_selects_the_backend(postgres_url: str, tmp_path: Path) -> None:
    for url in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        store.close()
    sqlite = open_store(str(tmp_path / "t.db"))
    assert isinstance(sqlite, SQLiteStore)
    sqlite.close()


def test_a_password_never_shows_in_a_stores_repr(postgres_url: str) -> None:
    with_password = postgres_url.replace("://postgres@", "://postgres:s3cret@", 1)
    assert with_password != postgres_url
    for url, shown in ((with_password, "://postgres:***@"), (postgres_url, "://postgres@")):
        store = PostgresStore(url)  # the throwaway server trusts loopback: any password works
        try:
            assert shown in repr(store)
            assert "s3cret" not in repr(store)
        finally:
            store.close()


def test_the_pool_is_not_shared_with_a_forked_child(pg_store: PostgresStore) -> None:
    assert pg_store.add(record({"n": 1}))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new pool of its own, while the parent's stays usable
        try:
            ok = pg_store.add(record({"n": 2})) and pg_store.stats()["payloads"] == 2
            pg_store.close()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        assert answer.read() == b"1"
    os.waitpid(pid, 0)
    assert pg_store.stats()["keys"] == {"n": 3}


def test_command_line_server_on_postgres(postgres_url: str) -> None:
    command = [sys.executable, "-m", "server_stub", "--port", "0", "--db", postgres_url]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().split()[-1]
            payload = {"instance_id": str(uuid.uuid4()), "timestamp": "2026-11-23T10:00:00Z"}
            response = requests.post(
                f"{url}/v1/update/{payload['instance_id']}", json=payload, timeout=10
            )
            assert response.status_code == 200
            stats = requests.get(f"{url}/v1/stats?since=2000-01-01", timeout=10).json()
            assert stats["payloads"] == 1
        finally:
            process.terminate()
            process.wait(10)


def test_command_line_refuses_an_unreachable_database() -> None:
    url = f"postgresql://me:secret@127.0.0.1:{free_port()}/telemetry"

    result = subprocess.run(
        [sys.executable, "-m", "server_stub", "--port", "0", "--db", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert "cannot open database postgresql://me:***@127.0.0.1" in result.stderr
    assert "secret" not in result.stderr


# -- four gunicorn workers --------------------------------------------------------------------


class Workers:
    """What gunicorn's workers told through the hooks' pipe: lines read by a thread."""

    def __init__(self, read_fd: int) -> None:
        self._lines: List[str] = []
        self._changed = threading.Condition()
        self._file = os.fdopen(read_fd, "r")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._file:
            for line in self._file:  # ends when every worker and the master closed the pipe
                with self._changed:
                    self._lines.append(line.rstrip("\n"))
                    self._changed.notify_all()

    def count(self, kind: str, path: str = "") -> int:
        """Lines of ``kind`` (``ready``, or ``request`` for ``path``)."""
        with self._changed:
            return sum(
                1
                for line in self._lines
                if line.split(" ", 1)[0] == kind and (not path or line.endswith(f" {path}"))
            )

    def await_count(
        self, count: int, process: subprocess.Popen[bytes], kind: str, path: str = ""
    ) -> None:
        """Wait until there are ``count`` such lines (a 30 s guard against a hang)."""
        with self._changed:
            arrived = self._changed.wait_for(
                lambda: self.count(kind, path) >= count or process.poll() is not None, 30
            )
        assert process.poll() is None, "gunicorn exited"
        assert arrived, f"only {self.count(kind, path)} of {count} {kind} {path} signals"

    def close(self) -> None:
        self._thread.join(10)


START = 1000.0  # the workers' policy clock at start


def set_clock(path: Path, now: float) -> None:
    """Move the workers' policy clock to ``now`` (replaced whole: never read half-written)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(repr(now))
    os.replace(partial, path)


class Gunicorn(NamedTuple):
    url: str
    policy_file: Path
    access_log: Path
    clock: Path
    workers: Workers
    process: subprocess.Popen[bytes]


@pytest.fixture
def gunicorn_server(postgres_url: str, tmp_path: Path) -> Iterator[Gunicorn]:
    """``gunicorn -w 4`` serving ``create_app(db=<postgres>, policy=<file>)``, all workers up.

    The workers' policy clock is the number in ``clock`` (``set_clock``); each
    worker writes ``ready <pid>`` to a pipe once it has loaded the app, and
    ``request <pid> <path>`` once it has read a request's head.
    """
    policy_file = tmp_path / "policy.json"
    policy_file.write_text("{}")
    clock = tmp_path / "clock"
    set_clock(clock, START)
    access_log = tmp_path / "access.log"
    read_fd, write_fd = os.pipe()
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        "import os\n"
        "def post_worker_init(worker):\n"
        f"    os.write({write_fd}, f'ready {{worker.pid}}\\n'.encode())\n"
        "def pre_request(worker, req):\n"
        f"    os.write({write_fd}, f'request {{worker.pid}} {{req.path}}\\n'.encode())\n"
    )
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        "4",
        "--bind",
        f"127.0.0.1:{port}",
        "--access-logfile",
        str(access_log),
        "--access-logformat",
        "%(p)s %(r)s %(s)s",
        "--graceful-timeout",
        "5",
        "--config",
        str(config),
        "--pythonpath",
        str(Path(__file__).parent),
        "_gunicorn_app:app",
    ]
    environment = {
        **os.environ,
        "TEST_GUNICORN_CLOCK": str(clock),
        "TEST_GUNICORN_DB": postgres_url,
        "TEST_GUNICORN_POLICY_FILE": str(policy_file),
    }
    with (tmp_path / "gunicorn.log").open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=environment,
            stdout=output,
            stderr=output,
            start_new_session=True,
            pass_fds=(write_fd,),
        )
    os.close(write_fd)
    workers = Workers(read_fd)
    url = f"http://127.0.0.1:{port}"
    try:
        # Every worker has loaded the app (so none of them is still starting when
        # the test needs all four), and the server answers.
        workers.await_count(4, process, "ready")
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        yield Gunicorn(url, policy_file, access_log, clock, workers, process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the session we started: master and workers
            process.wait(10)
        workers.close()


def _post(url: str, payload: Dict[str, Any]) -> requests.Response:
    # No session: a new connection each time, so that the workers take turns.
    response: requests.Response = requests.post(
        f"{url}/v1/update/{payload['instance_id']}",
        json=payload,
        headers={"Connection": "close"},
        timeout=10,
    )
    return response


def _payload(
    instance_id: str, data: Dict[str, Any], payload_id: Optional[str] = None
) -> Dict[str, Any]:
    return {
        "instance_id": instance_id,
        "timestamp": "2026-11-23T10:00:00.123456Z",
        "payload_id": payload_id or uuid.uuid4().hex,
        "data": data,
        "client": {"name": "telemetry-python", "version": "0.1.0", "dropped": 1},
    }


def _post_on_several_workers(server: Gunicorn, payloads: List[Dict[str, Any]]) -> List[int]:
    """Post each payload on its own connection at once; the statuses, in order.

    Every request is sent but for its last byte until a worker has read the head
    of each (its ``pre_request`` hook says so): a sync worker busy reading one
    request cannot take another, so the requests are held by different workers
    (spread, not serialised by one fast worker).
    """
    host, port = server.url.rsplit("/", 1)[1].split(":")
    paths = Counter(f"/v1/update/{payload['instance_id']}" for payload in payloads)
    heads_read = {path: server.workers.count("request", path) for path in paths}
    connections = []
    for payload in payloads:
        path = f"/v1/update/{payload['instance_id']}"
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        connection = socket.create_connection((host, int(port)), timeout=10)
        connection.sendall(head + body[:-1])
        connections.append((connection, body[-1:]))
    for path, count in paths.items():
        server.workers.await_count(heads_read[path] + count, server.process, "request", path)
    statuses = []
    for connection, last_byte in connections:
        with connection:
            connection.sendall(last_byte)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        statuses.append(int(answer.split(b" ", 2)[1]))
    return statuses


def _workers_that_served(access_log: Path, instance_id: str, status: int) -> Counter[str]:
    """Worker pid -> how many ``status`` answers to ``instance_id`` it gave."""
    lines = access_log.read_text().splitlines()
    return Counter(
        line.split()[0]
        for line in lines
        if f"/v1/update/{instance_id} " in line and line.endswith(f" {status}")
    )


def test_four_gunicorn_workers_share_dedup_totals_policy_and_rate_limit(
    gunicorn_server: Gunicorn,
) -> None:
    server = gunicorn_server
    url, policy_file, access_log = server.url, server.policy_file, server.access_log

    # One payload posted to four workers at once, then 16 more times: stored once.
    duplicate = _payload(str(uuid.uuid4()), {"dup": 1, "set": [{"value": "d", "count": 2}]})
    assert _post_on_several_workers(server, [duplicate] * 4) == [200] * 4
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _post(url, duplicate), range(16)))
    assert [answer.status_code for answer in answers] == [200] * 16
    listing = requests.get(f"{url}/v1/instances/{duplicate['instance_id']}", timeout=10).json()
    assert [item["payload_id"] for item in listing["payloads"]] == [duplicate["payload_id"]]

    # 8 concurrent posters: the totals are exact.
    posters, per_poster = 8, 15

    def poster(number: int) -> None:
        instance_id = str(uuid.uuid4())
        for n in range(per_poster):
            data = {"hits": n, "posters": [{"value": number, "count": 1}], "last": "x"}
            assert _post(url, _payload(instance_id, data)).status_code == 200

    with ThreadPoolExecutor(posters) as pool:
        for future in [pool.submit(poster, number) for number in range(posters)]:
            future.result()
    stats = requests.get(f"{url}/v1/stats?since=2000-01-01", timeout=10).json()
    assert stats == {
        "instances": posters + 1,
        "payloads": posters * per_poster + 1,
        "dropped": posters * per_poster + 1,
        "keys": {
            "dup": 1,
            "hits": posters * sum(range(per_poster)),
            "last": "x",
            "posters": [{"value": number, "count": per_poster} for number in range(posters)],
            "set": [{"value": "d", "count": 2}],
        },
        "events": {},
    }

    # A policy change reaches every worker (each re-reads the file when it changes),
    # and the rate limit is one limit across them: 6 accepted, by several workers,
    # then every worker refuses the 7th.
    policy_file.write_text(json.dumps({"rate_limit": {"payloads": 6, "window": 600}}))
    limited = str(uuid.uuid4())
    accepted = _post_on_several_workers(server, [_payload(limited, {"n": 1}) for _ in range(4)])
    accepted += [_post(url, _payload(limited, {"n": 1})).status_code for _ in range(2)]
    refused = _post_on_several_workers(server, [_payload(limited, {"n": 1}) for _ in range(4)])
    assert accepted == [200] * 6
    assert refused == [429] * 4
    assert _post(url, _payload(str(uuid.uuid4()), {})).status_code == 200  # another instance
    stats = requests.get(f"{url}/v1/stats?since=2000-01-01", timeout=10).json()
    assert stats["payloads"] == posters * per_poster + 1 + 6 + 1

    # The requests really were spread over several workers.
    assert len(_workers_that_served(access_log, duplicate["instance_id"], 200)) >= 2
    assert len(_workers_that_served(access_log, limited, 200)) >= 2
    assert len(_workers_that_served(access_log, limited, 429)) >= 2

    # A PUT /v1/policy, answered by one worker, reaches every worker within a
    # second (each re-reads the stored policy at most once a second): the workers'
    # policy clock is moved on by that documented bound, then every worker
    # applies the new limit.
    tighter = {"rate_limit": {"payloads": 1, "window": 600}}
    assert requests.put(f"{url}/v1/policy", json=tighter, timeout=10).status_code == 200
    set_clock(server.clock, START + 1.0)
    capped = str(uuid.uuid4())
    assert _post(url, _payload(capped, {"n": 1})).status_code == 200
    capped_payloads = [_payload(capped, {"n": 1}) for _ in range(4)]
    assert _post_on_several_workers(server, capped_payloads) == [429] * 4
    assert len(_workers_that_served(access_log, capped, 429)) >= 2
    history = requests.get(f"{url}/v1/policy/history", timeout=10).json()["changes"]
    # Newest first: the PUT, the file's change, the file seeding the empty store.
    assert [change["source"] for change in history] == ["http", "file", "file"]
