"""SQLiteStore.inspect beside a writer: the status view and the S7 checks read a store
that a run (another thread or process) may be opening, committing into and closing at that
moment.  An immutable read that overlapped the writer's checkpoint saw torn pages and
called the store damaged (the appliance's status answered an error once,
test_appliance.py::test_sigterm_drains_then_sigkill_and_restart_count_nothing_twice)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from securethread.formats import ledger
from securethread.programmer.store import UNGUARDED, SQLiteStore

JOB = b"\x11" * 32
QUOTA = 1_000_000


def _prov(slot: int) -> ledger.PendingRecord:
    device = f"{slot:016x}"
    return ledger.PendingRecord(
        kind=ledger.KIND_PROVISIONED, slot=slot, device_id=device, time=1,
        cert=b"cert-" + device.encode() * 20, license_sha256=b"\x00" * 32, vendor_ca=b"\x0a" * 32,
    )  # fmt: skip


def _sign(upto: int, head: bytes) -> bytes:
    return b"checkpoint %d " % upto + head


def _write(path: Path, runs: int, per_run: int, stop: threading.Event) -> None:
    """Runs as ``programmer provision`` makes them: open, reserve, commit, end, close (the
    last close checkpoints into the file and removes the -wal)."""
    for _ in range(runs):
        if stop.is_set():
            return
        s = SQLiteStore(path)
        try:
            s.begin_run(JOB, guard=UNGUARDED)
            slots = s.reserve(JOB, per_run, run=b"R", guard=UNGUARDED)
            s.commit(JOB, [_prov(x) for x in slots], _sign, run=b"R")
            s.end_run(JOB, guard=UNGUARDED)
        finally:
            s.close()


def test_inspect_beside_a_writer_never_sees_a_damaged_store(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    s = SQLiteStore(path)
    s.open_job(job=JOB, job_id="j", quota=QUOTA, signed=b"signed job")
    s.close()
    _write(path, 1, 2000, threading.Event())  # pages enough for a read to take a while
    stop = threading.Event()
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            _write(path, 150, 40, stop)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            failed.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    seen: list[int] = []
    try:
        while t.is_alive():
            state = SQLiteStore.inspect(path, JOB)  # raised "damaged" before the fix
            assert state is not None and state.committed >= 2000
            seen.append(state.committed)
    finally:
        stop.set()
        t.join()
    assert not failed, failed
    assert seen == sorted(seen)  # every read a committed state, never one going back
    assert len(set(seen)) > 10  # the reads really overlapped the writer's runs
    final = SQLiteStore.inspect(path, JOB)
    assert final is not None and final.committed == 2000 + 150 * 40


def test_inspect_of_a_closed_store_leaves_no_side_files(tmp_path: Path) -> None:
    """No writer: read as immutable, so reading adds no -wal/-shm beside the file."""
    path = tmp_path / "store.sqlite"
    _write_one = SQLiteStore(path)
    _write_one.open_job(job=JOB, job_id="j", quota=10, signed=b"signed job")
    _write_one.close()
    before = sorted(os.listdir(tmp_path))
    state = SQLiteStore.inspect(path, JOB)
    assert state is not None and state.quota == 10
    assert sorted(os.listdir(tmp_path)) == before == ["store.sqlite"]
