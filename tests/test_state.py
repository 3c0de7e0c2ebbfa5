"""State files: locations, modes, atomic writes, tolerant reads, identity, policy, spool."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from conftest import encoded

from telemetry._files import UnsafeStateError
from telemetry._spool import Claimed, SpoolSize
from telemetry._state import STOP_REMEMBERED_FOR, ServerPolicy, State
from telemetry._wire import Payload, encode_payload

APP = "testapp"
ENDPOINT = "https://telemetry.example/api"
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
INSTANCE = str(uuid.UUID(int=0x1234))


def payload(seconds: float = 0, data: Optional[Dict[str, Any]] = None, dropped: int = 0) -> Payload:
    return Payload(
        instance_id=INSTANCE,
        timestamp=T0 + timedelta(seconds=seconds),
        data={"n": seconds, "list": [1, 2, 3]} if data is None else data,
        dropped=dropped,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def state(root: Path) -> State:
    return State(APP, root)


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], List[str]]:
    """The warnings logged on the ``telemetry`` logger so far."""
    caplog.set_level(logging.WARNING, logger="telemetry")

    def messages() -> List[str]:
        return [
            record.getMessage() for record in caplog.records
            if record.name == "telemetry" and record.levelno >= logging.WARNING
        ]

    return messages


def files_under(path: Path) -> List[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def run_python(code: str, *, stdin: str = "", timeout: float = 30) -> str:
    """Run ``code`` in a fresh interpreter (inherits the test's environment)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], input=stdin, capture_output=True,
        text=True, timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def start_python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def populate(state: State) -> None:
    """Every kind of state file, as a client that is on would leave them."""
    assert state.write_consent("on")
    state.instance_id()
    assert state.write_policy(ENDPOINT, ServerPolicy(frozenset({"tls"}), 123.0))
    assert state.spool.save(encoded([payload(1), payload(2)])) == 0
    assert state.first_run_notice_due()


# -- where the files are --------------------------------------------------------------------


def test_explicit_root_wins_over_the_environment(tmp_path: Path) -> None:
    state = State(APP, tmp_path / "mine")
    assert state.config_dir == tmp_path / "mine" / APP / "config"
    assert state.state_dir == tmp_path / "mine" / APP / "state"
    assert state.consent_path.parent == state.config_dir
    assert state.spool.directory.parent == state.state_dir


def test_environment_root(tmp_path: Path) -> None:
    # conftest points TELEMETRY_STATE_DIR at tmp_path / "state".
    state = State(APP)
    assert state.config_dir == tmp_path / "state" / APP / "config"
    assert state.state_dir == tmp_path / "state" / APP / "state"


def test_platformdirs_without_a_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    monkeypatch.delenv("TELEMETRY_STATE_DIR")
    state = State(APP)
    assert state.config_dir == Path(platformdirs.user_config_dir(APP))
    assert state.state_dir == Path(platformdirs.user_state_dir(APP))


def test_importing_state_does_not_import_platformdirs() -> None:
    out = run_python("""
        import sys, telemetry._state
        from telemetry._state import State
        State("x", "/nonexistent").read_consent()
        print("platformdirs" in sys.modules, "requests" in sys.modules)
    """)
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("app", ["", " ", ".", "..", "a/b", "a\\b", "../up", "nul\0"])
def test_app_names_unfit_for_a_directory_are_misuse(app: str, root: Path) -> None:
    with pytest.raises(ValueError, match="app"):
        State(app, root)


def test_other_misuse_raises(state: State, root: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        state.write_consent("yes")
    with pytest.raises(ValueError, match="endpoint"):
        state.read_policy("")
    with pytest.raises(ValueError, match="at least 1"):
        State(APP, root, max_spool_files=0)
    for bad in (float("nan"), float("inf"), True, "soon"):
        with pytest.raises(ValueError, match="stop_until"):
            ServerPolicy(stop_until=bad)  # type: ignore[arg-type]


def test_reading_writes_nothing(state: State, root: Path) -> None:
    assert state.read_consent() is None
    assert state.read_instance_id() is None
    assert state.read_policy(ENDPOINT) == ServerPolicy()
    assert state.spool.payloads() == []
    assert state.spool.size() == SpoolSize(0, 0)
    assert state.spool.claim() == []
    assert state.delete_all()
    assert not root.exists()


# -- modes and atomic writes -------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_directories_0700_and_files_0600(state: State, root: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        populate(state)
        state.spool.claim()[0].release()
    finally:
        os.umask(previous)
    directories = [p for p in root.rglob("*") if p.is_dir()]
    files = [p for p in root.rglob("*") if p.is_file()]
    expected = {state.config_dir, state.state_dir, state.spool.directory, root / APP}
    assert expected <= set(directories)
    assert len(files) == 6  # consent, id, policy, marker, two payloads
    for path in directories:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_existing_directories_keep_their_mode(state: State) -> None:
    state.state_dir.mkdir(parents=True, mode=0o755)
    os.chmod(state.state_dir, 0o755)
    state.instance_id()
    assert stat.S_IMODE(state.state_dir.stat().st_mode) == 0o755  # maybe the app's own dir


def failing_replace(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EIO, "simulated crash between write and rename")


WRITERS: Dict[str, Callable[[State, int], object]] = {
    "consent": lambda state, n: state.write_consent(["on", "off"][n]),
    "instance id": lambda state, n: state.reset_instance_id(),
    "policy": lambda state, n: state.write_policy(ENDPOINT, ServerPolicy(stop_until=float(n))),
}
# Each reads through a new State, as the next process would.
READERS: Dict[str, Callable[[State], object]] = {
    "consent": lambda state: fresh(state).read_consent(),
    "instance id": lambda state: fresh(state).read_instance_id(),
    "policy": lambda state: fresh(state).read_policy(ENDPOINT),
}


def fresh(state: State) -> State:
    return State(state.app, state.config_dir.parents[1])


@pytest.mark.parametrize("kind", list(WRITERS))
def test_failed_rename_leaves_the_old_file(
    state: State, root: Path, kind: str, monkeypatch: pytest.MonkeyPatch,
    warnings: Callable[[], List[str]],
) -> None:
    WRITERS[kind](state, 0)
    before = READERS[kind](state)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_replace)
        WRITERS[kind](state, 1)  # returns normally: never raises for disk problems
    assert READERS[kind](state) == before
    assert any("simulated crash" in message for message in warnings())
    assert not [name for name in files_under(root) if name.endswith(".tmp")]


def test_failed_rename_keeps_the_spooled_file(
    state: State, monkeypatch: pytest.MonkeyPatch, warnings: Callable[[], List[str]]
) -> None:
    old = payload(1)
    state.spool.save(encoded([old]))
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_replace)
        assert state.spool.save(encoded([payload(2)])) == payload(2).items
    assert state.spool.payloads() == [old]
    assert warnings()


def test_process_killed_between_write_and_rename(state: State, root: Path) -> None:
    """A real crash: the process dies after the fsync, before the rename."""
    state.write_consent("on")
    run_python(f"""
        import os
        from telemetry._state import State
        state = State({APP!r}, {str(root)!r})
        os.replace = lambda *args, **kwargs: os._exit(0)
        state.write_consent("off")
        raise SystemExit("not reached")
    """)
    leftovers = [name for name in os.listdir(state.config_dir) if name.endswith(".tmp")]
    assert len(leftovers) == 1  # the dead writer's temporary file...
    assert state.read_consent() == "on"  # ...and the old file, intact
    assert state.write_consent("local")
    assert state.read_consent() == "local"
    assert os.listdir(state.config_dir) == [state.consent_path.name]  # leftovers cleaned


def test_dead_writers_temporaries_are_cleaned_up(state: State, root: Path) -> None:
    run_python(f"""
        import os
        from datetime import datetime, timezone
        from telemetry._state import State
        from telemetry._wire import Payload, encode_request
        state = State({APP!r}, {str(root)!r})
        state.instance_id()
        os.replace = lambda *args, **kwargs: os._exit(0)
        payload = Payload(instance_id={INSTANCE!r}, timestamp=datetime.now(timezone.utc))
        state.spool.save([encode_request(payload)[0]])
    """)
    assert [name for name in os.listdir(state.spool.directory) if name.endswith(".tmp")]
    assert state.spool.claim() == []
    assert os.listdir(state.spool.directory) == []


# -- tolerant reads ------------------------------------------------------------------------------

CORRUPT = {
    "empty": b"",
    "truncated": None,  # the first half of a good file
    "garbage": b"\x00\xff\xfe not what we wrote \x80",
    "wrong type": b'["a", "list"]',
    "huge": b"7" * (65 * 1024),
}


def good_content(kind: str) -> bytes:
    return {
        "consent": b'{"mode": "local"}\n',
        "instance id": b"3f0c8e6e-8a7b-4c1d-9e2f-0a1b2c3d4e5f\n",
        "policy": b'{"endpoint": "x", "disabled_keys": ["a"], "stop_until": 12.5}\n',
    }[kind]


def path_of(state: State, kind: str) -> Path:
    return {
        "consent": state.consent_path,
        "instance id": state.instance_id_path,
        "policy": state.policy_path(ENDPOINT),
    }[kind]


@pytest.mark.parametrize("damage", list(CORRUPT))
@pytest.mark.parametrize("kind", ["consent", "instance id", "policy"])
def test_corrupt_file_warns_reads_default_and_is_rewritten(
    state: State, kind: str, damage: str, warnings: Callable[[], List[str]]
) -> None:
    path = path_of(state, kind)
    path.parent.mkdir(parents=True)
    good = good_content(kind)
    content = CORRUPT[damage]
    path.write_bytes(good[: len(good) // 2] if content is None else content)
    default = {"consent": None, "instance id": None, "policy": ServerPolicy()}[kind]
    assert READERS[kind](state) == default
    assert len(warnings()) == 1
    assert str(path) in warnings()[0]

    # The next save replaces it.
    if kind == "instance id":
        expected: object = state.instance_id()  # creating the id is its save
    else:
        WRITERS[kind](state, 0)
        expected = {"consent": "on", "policy": ServerPolicy(stop_until=0.0)}[kind]
    logged = len(warnings())
    assert READERS[kind](state) == expected
    assert len(warnings()) == logged  # the file is good again


@pytest.mark.parametrize("kind", ["consent", "instance id", "policy"])
def test_good_files_read_back(state: State, kind: str) -> None:
    path = path_of(state, kind)
    path.parent.mkdir(parents=True)
    path.write_bytes(good_content(kind))
    assert READERS[kind](state) == {
        "consent": "local",
        "instance id": uuid.UUID("3f0c8e6e-8a7b-4c1d-9e2f-0a1b2c3d4e5f"),
        "policy": ServerPolicy(frozenset({"a"}), 12.5),
    }[kind]


@pytest.mark.parametrize("content", [
    b'{"mode": "maybe"}', b'{"mode": 1}', b'{"other": "on"}', b'"on"', b"on",
])
def test_consent_file_with_unknown_content(
    state: State, content: bytes, warnings: Callable[[], List[str]]
) -> None:
    state.config_dir.mkdir(parents=True)
    state.consent_path.write_bytes(content)
    assert state.read_consent() is None
    assert warnings()


@pytest.mark.parametrize("content", [
    b'{"disabled_keys": "tls", "stop_until": null}',
    b'{"disabled_keys": [1], "stop_until": null}',
    b'{"disabled_keys": [], "stop_until": true}',
    b'{"disabled_keys": [], "stop_until": "soon"}',
    b'{"disabled_keys": [], "stop_until": NaN}',
    b'{"disabled_keys": []}',
])
def test_policy_file_with_bad_fields(
    state: State, content: bytes, warnings: Callable[[], List[str]]
) -> None:
    path = state.policy_path(ENDPOINT)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert state.read_policy(ENDPOINT) == ServerPolicy()
    assert warnings()


def test_nil_instance_id_is_corrupt(state: State, warnings: Callable[[], List[str]]) -> None:
    state.state_dir.mkdir(parents=True)
    state.instance_id_path.write_text(str(uuid.UUID(int=0)))
    assert state.read_instance_id() is None
    new = state.instance_id()
    assert new.int != 0
    assert state.read_instance_id() == new


def test_a_directory_where_a_file_should_be(
    state: State, warnings: Callable[[], List[str]]
) -> None:
    state.consent_path.mkdir(parents=True)
    reason = state.check()
    assert reason is not None and "is not a regular file" in reason
    with pytest.raises(UnsafeStateError, match="is not a regular file"):
        state.read_consent()  # never opened as if it were the file
    assert not state.write_consent("on")
    assert len(warnings()) == 1


def test_corrupt_spool_files_are_deleted_on_claim_and_skipped_by_show(
    state: State, warnings: Callable[[], List[str]]
) -> None:
    good = payload(1)
    state.spool.save(encoded([good]))
    truncated = encode_payload(payload(2))
    for index, content in enumerate([b"", b"garbage", truncated[: len(truncated) // 2],
                                     b'{"instance_id": 1}']):
        (state.spool.directory / f"{index:032x}.json").write_bytes(content)
    assert state.spool.payloads() == [good]
    assert len(warnings()) == 4
    assert state.spool.size().files == 5  # payloads() changed nothing
    claimed = state.spool.claim()
    assert [item.payload for item in claimed] == [good]
    assert len(warnings()) == 8
    claimed[0].done()
    assert os.listdir(state.spool.directory) == []


def test_unknown_files_in_the_spool_are_left_alone(state: State) -> None:
    state.spool.save(encoded([payload(1)]))
    (state.spool.directory / "README").write_text("not ours")
    assert len(state.spool.claim()) == 1
    assert (state.spool.directory / "README").exists()


# -- disks that refuse -----------------------------------------------------------------------------


def refusing(code: int) -> Callable[..., Any]:
    def refuse(*args: object, **kwargs: object) -> Any:
        raise OSError(code, os.strerror(code))

    return refuse


@pytest.mark.parametrize(("target", "code"), [
    ("open", errno.EROFS),  # a read-only file system
    ("open", errno.EACCES),  # a directory we may not write
    ("write", errno.ENOSPC),  # a full disk
    ("fsync", errno.EIO),
])
def test_disk_errors_are_warnings_not_exceptions(
    state: State, target: str, code: int, monkeypatch: pytest.MonkeyPatch,
    warnings: Callable[[], List[str]],
) -> None:
    assert state.write_consent("on")
    original_id = state.instance_id()
    with monkeypatch.context() as patch:
        patch.setattr(os, target, refusing(code))
        assert not state.write_consent("off")
        assert not state.write_policy(ENDPOINT, ServerPolicy(stop_until=1.0))
        assert state.spool.save(encoded([payload(1, dropped=2)])) == payload(1).items + 2
        assert state.first_run_notice_due()  # better repeated than never shown
        new = state.reset_instance_id()  # not saved, but this process keeps using it
        assert new != original_id
        assert state.instance_id() == new
        assert state.read_instance_id() == new
    messages = warnings()
    assert len(messages) >= 5
    assert all(os.strerror(code) in message for message in messages)
    # Nothing changed on disk, and no temporary file was left behind.
    assert fresh(state).read_consent() == "on"
    assert fresh(state).read_instance_id() == original_id
    assert state.spool.size() == SpoolSize(0, 0)
    assert files_under(state.state_dir) == ["telemetry-instance-id"]


def test_instance_id_when_nothing_can_be_saved(
    state: State, monkeypatch: pytest.MonkeyPatch, warnings: Callable[[], List[str]]
) -> None:
    monkeypatch.setattr(os, "open", refusing(errno.EROFS))
    first = state.instance_id()
    assert state.instance_id() == first  # stable within the process
    assert warnings()
    assert state.delete_all()
    assert state.instance_id() != first  # consent withdrawn: that identity is gone


def test_root_that_is_a_file(tmp_path: Path, warnings: Callable[[], List[str]]) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    state = State(APP, blocker)
    assert not state.write_consent("on")
    assert isinstance(state.instance_id(), uuid.UUID)
    assert state.spool.save(encoded([payload()])) == payload().items
    assert state.read_consent() is None
    assert state.delete_all()
    assert len(warnings()) == 3  # the three writes; reads find nothing, quietly


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs a non-root POSIX user for permissions to bite")
def test_read_only_directory(state: State, warnings: Callable[[], List[str]]) -> None:
    populate(state)
    os.chmod(state.config_dir, 0o500)
    os.chmod(state.spool.directory, 0o500)
    try:
        assert not state.write_consent("off")
        assert state.read_consent() == "on"
        assert state.spool.claim() == []
        assert state.spool.save(encoded([payload(9)])) == payload(9).items
    finally:
        os.chmod(state.config_dir, 0o700)
        os.chmod(state.spool.directory, 0o700)
    assert warnings()


# -- instance id -----------------------------------------------------------------------------------


def test_instance_id_is_created_once(state: State, root: Path) -> None:
    first = state.instance_id()
    assert first.version == 4
    assert state.instance_id() == first
    assert State(APP, root).instance_id() == first
    assert State("otherapp", root).instance_id() != first


def test_instance_id_stable_across_processes(state: State, root: Path) -> None:
    code = f"""
        from telemetry._state import State
        print(State({APP!r}).instance_id())
    """
    first = run_python(code).strip()
    second = run_python(code).strip()
    assert first == second == str(State(APP).instance_id())


def test_processes_starting_together_agree_on_one_id(root: Path) -> None:
    code = f"""
        import sys
        from telemetry._state import State
        state = State({APP!r}, {str(root)!r})
        print("ready", flush=True)
        sys.stdin.readline()
        print(state.instance_id())
    """
    processes = [start_python(code) for _ in range(4)]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [process.communicate(timeout=30)[0].strip() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert len(set(outputs)) == 1
    assert outputs[0] == str(State(APP, root).read_instance_id())


def test_reset_instance_id(state: State) -> None:
    first = state.instance_id()
    second = state.reset_instance_id()
    assert second != first
    assert state.instance_id() == second
    assert state.read_instance_id() == second


# -- server policy ---------------------------------------------------------------------------------


def test_policy_round_trip_per_endpoint(state: State, root: Path) -> None:
    policy = ServerPolicy(disabled_keys=["tls", "http_user_agent"], stop_until=1_800_000_000.5)
    assert state.write_policy(ENDPOINT, policy)
    restarted = State(APP, root)
    assert restarted.read_policy(ENDPOINT) == policy
    assert restarted.read_policy(ENDPOINT + "/") == policy  # the same endpoint
    assert restarted.read_policy("https://other.example") == ServerPolicy()
    assert isinstance(restarted.read_policy(ENDPOINT).disabled_keys, frozenset)
    assert state.write_policy(ENDPOINT, ServerPolicy())
    assert restarted.read_policy(ENDPOINT) == ServerPolicy()


def test_stop_is_remembered_for_thirty_days(state: State, root: Path) -> None:
    now = 1_800_000_000.0
    assert STOP_REMEMBERED_FOR == 30 * 86400
    policy = ServerPolicy(frozenset({"a"})).remember_stop(now)
    assert policy.disabled_keys == frozenset({"a"})
    state.write_policy(ENDPOINT, policy)
    remembered = State(APP, root).read_policy(ENDPOINT)  # a restart
    assert remembered.stopped(now)
    assert remembered.stopped(now + STOP_REMEMBERED_FOR - 1)
    assert not remembered.stopped(now + STOP_REMEMBERED_FOR)
    assert not ServerPolicy().stopped(now)


# -- first-run notice ------------------------------------------------------------------------------


def test_first_run_notice_is_due_once_per_app(state: State, root: Path) -> None:
    assert state.first_run_notice_due()
    assert not state.first_run_notice_due()
    assert not State(APP, root).first_run_notice_due()
    assert State("otherapp", root).first_run_notice_due()


# -- spool -----------------------------------------------------------------------------------------


def test_spool_round_trip_keeps_payload_ids(state: State, root: Path) -> None:
    payloads = [payload(2, dropped=5), payload(0, {"empty": {}}), payload(1)]
    assert state.spool.save(encoded(payloads)) == 0
    assert sorted(os.listdir(state.spool.directory)) == sorted(
        f"{item.payload_id}.json" for item in payloads)
    assert state.spool.size().files == 3
    assert state.spool.size().size == sum(len(encode_payload(item)) for item in payloads)
    claimed = State(APP, root).spool.claim()  # the next process
    assert [item.payload for item in claimed] == [payloads[1], payloads[2], payloads[0]]
    assert [item.payload.payload_id for item in claimed] == [
        payloads[1].payload_id, payloads[2].payload_id, payloads[0].payload_id]
    assert claimed[0].payload.items == payloads[1].items


def test_done_deletes_and_release_puts_back(state: State) -> None:
    first, second = payload(1), payload(2)
    state.spool.save(encoded([first, second]))
    claimed = state.spool.claim()
    assert all(item.path.name.endswith(f".claimed-{os.getpid()}") for item in claimed)
    assert state.spool.claim() == []  # this process holds them already
    assert state.spool.payloads() == [first, second]  # show still sees claimed files
    claimed[0].done()
    claimed[1].release()
    claimed[0].done()  # settling twice is harmless
    claimed[1].done()
    assert os.listdir(state.spool.directory) == [f"{second.payload_id}.json"]
    again = state.spool.claim()
    assert [item.payload.payload_id for item in again] == [second.payload_id]


def test_spool_drops_oldest_beyond_the_file_bound(root: Path) -> None:
    state = State(APP, root, max_spool_files=3)
    assert state.spool.save(encoded([payload(5), payload(1, dropped=7)])) == 0
    newer = [payload(6), payload(4)]
    # 4 files over a bound of 3: the oldest (t=1) goes, with its items and its drop count.
    assert state.spool.save(encoded(newer)) == payload(1).items + 7
    assert [item.timestamp for item in state.spool.payloads()] == [
        T0 + timedelta(seconds=s) for s in (4, 5, 6)]
    # An older payload than everything spooled is itself the one dropped.
    old = payload(0, {"a": 1, "b": [1, 2]})
    assert state.spool.save(encoded([old])) == 4
    assert len(state.spool.payloads()) == 3


def test_spool_drops_oldest_beyond_the_byte_bound(root: Path) -> None:
    size = len(encode_payload(payload(1)))
    state = State(APP, root, max_spool_bytes=2 * size + size // 2)
    assert state.spool.save(encoded([payload(3), payload(1), payload(2)])) == payload(1).items
    assert [item.timestamp for item in state.spool.payloads()] == [
        T0 + timedelta(seconds=2), T0 + timedelta(seconds=3)]
    assert state.spool.size() == SpoolSize(2, 2 * size)


def test_payload_bigger_than_the_spool_is_dropped_unwritten(root: Path) -> None:
    state = State(APP, root, max_spool_bytes=1000)
    big = payload(1, {"big": "x" * 1000}, dropped=3)
    assert state.spool.save(encoded([big])) == 1 + 3
    assert state.spool.size() == SpoolSize(0, 0)


def test_claims_of_a_live_process_are_not_taken(state: State, root: Path) -> None:
    state.spool.save(encoded([payload(1)]))
    holder = start_python(f"""
        import sys
        from telemetry._state import State
        print(len(State({APP!r}, {str(root)!r}).spool.claim()), flush=True)
        sys.stdin.readline()
    """)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "1"
        assert state.spool.claim() == []
        assert state.spool.size().files == 1
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0


def test_claims_of_a_killed_process_come_back(state: State, root: Path) -> None:
    payloads = [payload(1), payload(2), payload(3)]
    state.spool.save(encoded(payloads))
    killed = start_python(f"""
        import os, signal
        from telemetry._state import State
        claimed = State({APP!r}, {str(root)!r}).spool.claim()
        assert len(claimed) == 3
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    _, err = killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL, err
    assert sorted(os.listdir(state.spool.directory)) == sorted(
        f"{p.payload_id}.json.claimed-{killed.pid}" for p in payloads)
    claimed = state.spool.claim()
    assert [item.payload for item in claimed] == payloads
    for item in claimed:
        item.release()
    names = sorted(f"{p.payload_id}.json" for p in payloads)
    assert sorted(os.listdir(state.spool.directory)) == names


def test_claims_left_under_our_own_pid_by_an_earlier_process(state: State) -> None:
    # A container's app has the same pid at every start: a claim file with our
    # pid that this process does not hold was left by a dead predecessor.
    left = payload(1)
    state.spool.save(encoded([left]))
    (name,) = os.listdir(state.spool.directory)
    os.rename(state.spool.directory / name, state.spool.directory / f"{name}.claimed-{os.getpid()}")
    claimed = state.spool.claim()
    assert [item.payload for item in claimed] == [left]
    assert state.spool.claim() == []


def test_corrupt_claim_of_a_dead_process_is_deleted(
    state: State, warnings: Callable[[], List[str]]
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    state.spool.directory.mkdir(parents=True)
    (state.spool.directory / f"{'a' * 32}.json.claimed-{dead.pid}").write_bytes(b"{")
    assert state.spool.claim() == []
    assert os.listdir(state.spool.directory) == []
    assert warnings()


DRAIN = """
    import json, sys
    from telemetry._state import State
    state = State({app!r}, {root!r})
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = state.spool.claim()
    for item in claimed:
        item.done()
    print(json.dumps([item.payload.payload_id for item in claimed]))
"""


def test_two_processes_drain_one_spool_without_a_duplicate(root: Path) -> None:
    state = State(APP, root, max_spool_files=100)
    payloads = [payload(i) for i in range(50)]
    assert state.spool.save(encoded(payloads)) == 0
    drainers = [start_python(DRAIN.format(app=APP, root=str(root))) for _ in range(2)]
    for drainer in drainers:
        assert drainer.stdout is not None
        assert drainer.stdout.readline() == "ready\n"
    for drainer in drainers:  # both are up and waiting: release them together
        assert drainer.stdin is not None
        drainer.stdin.write("go\n")
        drainer.stdin.flush()
    results = []
    for drainer in drainers:
        out, err = drainer.communicate(timeout=30)
        assert drainer.returncode == 0, err
        results.append(json.loads(out))
    first, second = (set(ids) for ids in results)
    assert len(first) + len(second) == sum(len(ids) for ids in results) == 50
    assert first.isdisjoint(second)
    assert first | second == {item.payload_id for item in payloads}
    assert os.listdir(state.spool.directory) == []


def test_threads_of_one_process_never_share_a_claim(root: Path) -> None:
    import threading

    state = State(APP, root, max_spool_files=100)
    state.spool.save(encoded([payload(i) for i in range(40)]))
    results: List[List[Claimed]] = []
    barrier = threading.Barrier(4)

    def drain() -> None:
        mine = State(APP, root)
        barrier.wait()
        results.append(mine.spool.claim())

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [item.payload.payload_id for claimed in results for item in claimed]
    assert len(ids) == len(set(ids)) == 40


# -- consent withdrawn -----------------------------------------------------------------------------


def test_delete_all_leaves_only_the_consent_file(state: State, root: Path) -> None:
    populate(state)
    held = state.spool.claim()
    state.spool.save(encoded([payload(3)]))
    (state.state_dir / ".telemetry-instance-id.999999999.abcd.tmp").write_text("x")
    assert state.write_consent("off")
    assert state.delete_all()
    assert os.listdir(state.state_dir) == []
    assert files_under(root) == [f"{APP}/config/telemetry-consent.json"]
    assert state.read_consent() == "off"
    held[0].done()  # a sender finishing late does not raise...
    held[1].release()  # ...nor does one putting its file back after all was deleted
    assert files_under(root) == [f"{APP}/config/telemetry-consent.json"]


def test_delete_all_touches_only_its_own_files_in_a_shared_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On macOS and Windows the config and state dirs are one, maybe the app's own."""
    import platformdirs

    shared = tmp_path / "app-data"
    monkeypatch.delenv("TELEMETRY_STATE_DIR")
    monkeypatch.setattr(platformdirs, "user_config_dir", lambda app: str(shared))
    monkeypatch.setattr(platformdirs, "user_state_dir", lambda app: str(shared))
    state = State(APP)
    assert state.config_dir == state.state_dir == shared
    populate(state)
    (shared / "app.db").write_text("the application's own data")
    assert state.delete_all()
    assert files_under(shared) == ["app.db", "telemetry-consent.json"]
    assert state.read_consent() == "on"
