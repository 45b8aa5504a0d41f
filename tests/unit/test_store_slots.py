"""The store's slot accounting without a token (S3, and no stranded slots): reservations
belong to a run, unused ones go back to a free pool that is used first, a slot is used by
one record only, a new run reclaims a dead run's reservations, what was released is kept
until the device's programming is recorded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs
import pytest

from securethread.errors import (
    JobError,
    QuotaExceededError,
    StoreCorruptError,
    StoreError,
    StoreMissingError,
)
from securethread.formats import ledger
from securethread.programmer.store import UNGUARDED, Release, SQLiteStore, StoreState

JOB = b"\x11" * 32


def _sign(upto: int, head: bytes) -> bytes:
    return b"checkpoint %d " % upto + head


@attrs.define
class Keeper:
    """A mark keeper that records what it was asked to witness."""

    calls: list[tuple[StoreState, int]] = attrs.Factory(list)
    block: int = 4

    def advance(self, state: StoreState, upto: int) -> int:
        self.calls.append((state, upto))
        return min(state.quota, upto + self.block)


def _store(tmp_path: Path, quota: int = 10) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "store.sqlite")
    s.open_job(job=JOB, job_id="j", quota=quota, signed=b"signed job")
    return s


def _prov(slot: int, device: str) -> ledger.PendingRecord:
    return ledger.PendingRecord(
        kind=ledger.KIND_PROVISIONED, slot=slot, device_id=device, time=1,
        cert=b"cert-" + device.encode(), license_sha256=b"\x00" * 32, vendor_ca=b"\x0a" * 32,
    )  # fmt: skip


def _dev(i: int) -> str:
    return f"{i:016x}"


def test_unused_slots_go_back_and_are_used_first(tmp_path: Path) -> None:
    s = _store(tmp_path)
    a = s.reserve(JOB, 4, run=b"A", guard=UNGUARDED)
    assert a == [0, 1, 2, 3]
    s.give_back(JOB, [1, 3], run=b"A")
    assert s.counts(JOB) == (10, 2)
    assert s.reserve(JOB, 3, run=b"A", guard=UNGUARDED) == [1, 3, 4]  # free ones first, then fresh
    s.give_back(JOB, [0], run=b"B")  # not B's: nothing changes
    assert s.counts(JOB) == (10, 5)


def test_a_slot_is_used_by_one_record_of_the_run_that_reserved_it(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.reserve(JOB, 2, run=b"A", guard=UNGUARDED)
    with pytest.raises(StoreError, match="not reserved by this run"):
        s.commit(JOB, [_prov(0, _dev(0))], _sign, run=b"B")
    with pytest.raises(StoreError, match="not reserved by this run"):
        s.commit(JOB, [_prov(5, _dev(0))], _sign, run=b"A")
    committed = s.commit(JOB, [_prov(0, _dev(0)), _prov(1, _dev(0))], _sign, run=b"A")
    assert [r.device_id for r, _seq, _raw in committed.records] == [_dev(0)]
    assert [d.slot for d in committed.duplicates] == [1]
    state = s.state(JOB)
    assert (state.committed, state.used, state.free) == (1, 1, 1)  # the duplicate's slot is free


def test_next_run_reclaims_a_dead_runs_reservations(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.reserve(JOB, 3, run=b"dead", guard=UNGUARDED)
    keeper = Keeper()
    assert s.begin_run(JOB, guard=keeper) == 3
    assert s.counts(JOB) == (10, 0)
    assert keeper.calls[-1][0].reserved == 3  # the mark is brought up to date
    assert s.reserve(JOB, 2, run=b"new", guard=UNGUARDED) == [0, 1]
    with pytest.raises(StoreError):  # the dead run cannot commit what was reclaimed
        s.commit(JOB, [_prov(0, _dev(0))], _sign, run=b"dead")


def test_quota_is_never_exceeded_and_the_mark_moves_per_block(tmp_path: Path) -> None:
    s = _store(tmp_path, quota=10)
    keeper = Keeper(block=4)
    got: list[int] = []
    for _ in range(4):
        got += s.reserve(JOB, 3, run=b"A", guard=keeper)  # 3, 3, 3, then the last one
    with pytest.raises(QuotaExceededError):
        s.reserve(JOB, 1, run=b"A", guard=keeper)
    assert got == list(range(10))
    # one mark write per block, always before the reservations passed the mark's limit
    assert [upto for _state, upto in keeper.calls] == [3, 9]
    assert all(state.reserved <= upto for state, upto in keeper.calls)


def test_releases_are_kept_until_programmed(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.reserve(JOB, 2, run=b"A", guard=UNGUARDED)
    rel = {_dev(i): Release(_dev(i), i, b"cert", b"provisioning", b"license") for i in range(2)}
    s.commit(JOB, [_prov(0, _dev(0)), _prov(1, _dev(1))], _sign, releases=rel, run=b"A")
    kept = s.unprogrammed(JOB, [_dev(0), _dev(1), _dev(2)])
    assert set(kept) == {_dev(0), _dev(1)} and kept[_dev(0)].run == b"A"
    assert kept[_dev(1)].license == b"license"
    programmed = ledger.PendingRecord(
        kind=ledger.KIND_PROGRAMMED, slot=0, device_id=_dev(0), time=2, boot=b"boot"
    )
    s.commit(JOB, [programmed], _sign, run=b"B")
    assert s.unprogrammed_summary(JOB) == (1, [_dev(1)])


def test_store_state_and_inspect(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    assert SQLiteStore.inspect(path, JOB) is None
    s = _store(tmp_path)
    s.reserve(JOB, 2, run=b"A", guard=UNGUARDED)
    s.commit(JOB, [_prov(0, _dev(0))], _sign, run=b"A")
    s.close()
    state = SQLiteStore.inspect(path, JOB)
    assert state is not None and (state.committed, state.reserved, state.used) == (1, 2, 2)
    assert len(state.store_id) == 16
    assert SQLiteStore.inspect(path, b"\x22" * 32) is None  # another job
    with pytest.raises(JobError):
        SQLiteStore(path).state(b"\x22" * 32)


def test_files_that_are_not_stores(tmp_path: Path) -> None:
    with pytest.raises(StoreMissingError):
        SQLiteStore(tmp_path / "absent.sqlite", create=False)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreCorruptError, match="not a production store"):
        SQLiteStore(other)
    with pytest.raises(StoreCorruptError, match="not a production store"):
        SQLiteStore.inspect(other, JOB)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00junk" * 1000)
    with pytest.raises(StoreCorruptError, match="is damaged"):
        SQLiteStore(junk)
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(StoreMissingError, match="is empty"):
        SQLiteStore(empty, create=False)


def test_unguarded_store_still_counts(tmp_path: Path) -> None:
    s = _store(tmp_path, quota=3)
    assert s.reserve(JOB, 5, guard=UNGUARDED) == [0, 1, 2]
