"""The store's slot accounting without a token (S3, and no stranded slots): reservations
belong to a run, unused ones go back to a free pool that is used first, a slot is used by
one record only, a run after a clean end reclaims a dead run's reservations, a run after a
kill or on a restored copy burns them (a slot is handed out once, ever: the quota mark's
rules on :class:`MemoryObjects`, copies of one store file meeting one keeper), what was
released is kept until the device's programming is recorded, a damaged page is refused."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest

from securethread.errors import (
    JobError,
    QuotaExceededError,
    StoreCorruptError,
    StoreError,
    StoreMissingError,
    StoreRolledBackError,
)
from securethread.formats import ledger
from securethread.hsm.data import DataObject
from securethread.programmer.quota_mark import Mark, MemoryObjects, QuotaMark
from securethread.programmer.store import UNGUARDED, Release, SQLiteStore, StoreState

JOB = b"\x11" * 32


def _sign(upto: int, head: bytes) -> bytes:
    return b"checkpoint %d " % upto + head


@attrs.define
class Keeper:
    """The real quota mark on objects in memory, noting what it was asked to cover."""

    objects: MemoryObjects = attrs.Factory(MemoryObjects)
    block: int = 4
    advances: list[tuple[StoreState, int]] = attrs.Factory(list)

    @property
    def mark(self) -> QuotaMark:
        return QuotaMark(self.objects, JOB, block=self.block)

    def begin(self, state: StoreState) -> Any:
        return self.mark.begin(state)

    def advance(self, state: StoreState, fresh: int) -> Any:
        self.advances.append((state, fresh))
        return self.mark.advance(state, fresh)

    def finish(self, state: StoreState) -> Any:
        return self.mark.finish(state)

    def read(self) -> Mark:
        mark = self.mark.read()
        assert mark is not None
        return mark


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


def _marked(tmp_path: Path, keeper: Keeper, quota: int = 10, name: str = "store") -> SQLiteStore:
    s = SQLiteStore(tmp_path / f"{name}.sqlite")
    s.open_job(job=JOB, job_id="j", quota=quota, signed=b"signed job")
    s.end_run(JOB, guard=keeper)  # what open_store does for a new job: its first mark
    return s


def test_a_clean_end_reclaims_a_dead_runs_reservations(tmp_path: Path) -> None:
    keeper = Keeper()
    s = _marked(tmp_path, keeper)
    assert s.begin_run(JOB, guard=keeper).burned == 0
    s.reserve(JOB, 3, run=b"dead", guard=keeper)  # a worker died holding these...
    assert s.end_run(JOB, guard=keeper)  # ...and its leader ended the run cleanly
    assert keeper.read().clean and keeper.read().limit == 3  # every slot ever handed out
    assert s.counts(JOB) == (10, 0) and s.state(JOB).free == 3
    start = s.begin_run(JOB, guard=keeper)  # the mark vouches for this store: reuse
    assert (start.reclaimed, start.burned) == (0, 0)
    assert s.reserve(JOB, 2, run=b"new", guard=keeper) == [0, 1]
    with pytest.raises(StoreError):  # the dead run cannot commit what was reclaimed
        s.commit(JOB, [_prov(0, _dev(0))], _sign, run=b"dead")


def test_after_a_kill_the_next_run_burns_what_it_cannot_prove_unreleased(
    tmp_path: Path,
) -> None:
    keeper = Keeper(block=4)
    s = _marked(tmp_path, keeper)
    s.begin_run(JOB, guard=keeper)
    assert s.reserve(JOB, 3, run=b"A", guard=keeper) == [0, 1, 2]
    s.give_back(JOB, [1], run=b"A")  # one free slot, two reserved by a run then killed
    start = s.begin_run(JOB, guard=keeper)  # no end_run: the run was killed
    # the free slot, the two reservations and the rest of the killed run's block (3)
    assert (start.reclaimed, start.burned) == (0, 4)
    state = s.state(JOB)
    assert (state.reserved, state.free, state.burned, state.used) == (4, 0, 4, 4)
    assert s.reserve(JOB, 2, run=b"B", guard=keeper) == [4, 5]  # above the killed block


def test_quota_is_never_exceeded_and_the_mark_moves_per_block(tmp_path: Path) -> None:
    keeper = Keeper(block=4)
    s = _marked(tmp_path, keeper, quota=10)
    s.begin_run(JOB, guard=keeper)
    got: list[int] = []
    for _ in range(4):
        got += s.reserve(JOB, 3, run=b"A", guard=keeper)  # 3, 3, 3, then the last one
    with pytest.raises(QuotaExceededError):
        s.reserve(JOB, 1, run=b"A", guard=keeper)
    assert got == list(range(10))
    # one mark write per block, always before the reservations passed the mark's limit
    # begin covers 4 slots; the second batch passes them: one write covers it and a block
    assert [(st.reserved, fresh) for st, fresh in keeper.advances] == [(3, 3)]
    assert keeper.read().generation == 2 and keeper.read().limit == 10  # open, begin, one
    assert len(keeper.objects.objects) == 2  # older generations are destroyed


def _slots(store: Path) -> list[int]:
    """The slots of every provisioning record in a store file."""
    db = sqlite3.connect(store)
    try:
        rows = db.execute(
            "SELECT slot FROM records WHERE kind = ?", (ledger.KIND_PROVISIONED,)
        ).fetchall()
    finally:
        db.close()
    return [r[0] for r in rows]


def _run(path: Path, keeper: Keeper, n: int, released: set[int], *, end: bool) -> list[int]:
    """One run on the store file ``path``: ``n`` devices counted and committed, then a clean
    end or (``end=False``) a kill; checks that no slot was committed before."""
    st = SQLiteStore(path, create=False)
    try:
        st.begin_run(JOB, guard=keeper)
        slots = st.reserve(JOB, n, run=b"r", guard=keeper)
        st.commit(JOB, [_prov(x, _dev(len(released) + i)) for i, x in enumerate(slots)], _sign,
                  run=b"r")  # fmt: skip
        assert not released & set(slots), f"slots {released & set(slots)} handed out twice"
        released.update(slots)
        if end:
            st.end_run(JOB, guard=keeper)
        return slots
    finally:
        st.close()


def test_a_copy_put_back_after_a_kill_burns_one_block_per_cycle(tmp_path: Path) -> None:
    keeper = Keeper(block=8)
    live = tmp_path / "store.sqlite"
    _marked(tmp_path, keeper, quota=50).close()
    copy = tmp_path / "copy.sqlite"
    shutil.copyfile(live, copy)  # one copy, taken once...
    released: set[int] = set()
    for cycle in range(5):
        got = _run(live, keeper, 5, released, end=False)  # ...5 devices, killed in the block
        assert got == list(range(8 * cycle, 8 * cycle + 5))  # a fresh block every cycle
        shutil.copyfile(copy, live)  # ...put back after each kill
    # The copy counts 0 devices, but the next run starts above every block handed out.
    assert _run(live, keeper, 50, released, end=True) == list(range(40, 50))
    st = SQLiteStore(live, create=False)
    try:
        state = st.state(JOB)
        assert (state.committed, state.burned, state.used) == (10, 40, 50)
        st.begin_run(JOB, guard=keeper)
        with pytest.raises(QuotaExceededError):
            st.reserve(JOB, 1, run=b"r", guard=keeper)
    finally:
        st.close()
    assert len(released) == 35 <= 50


def test_two_copies_run_at_once_never_share_a_slot(tmp_path: Path) -> None:
    keeper = Keeper(block=4)
    _marked(tmp_path, keeper, quota=40).close()
    shutil.copyfile(tmp_path / "store.sqlite", tmp_path / "twin.sqlite")
    a = SQLiteStore(tmp_path / "store.sqlite", create=False)
    b = SQLiteStore(tmp_path / "twin.sqlite", create=False)
    assert a.begin_run(JOB, guard=keeper).burned == 0  # the mark vouches for a...
    assert b.begin_run(JOB, guard=keeper).burned == 4  # ...not for b: above a's block
    got: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(4):
        for name, st in (("a", a), ("b", b)):
            got[name] += st.reserve(JOB, 3, run=name.encode(), guard=keeper)
    assert not set(got["a"]) & set(got["b"]), got
    # each jumps above the other's block whenever it meets the other's mark
    assert got["a"][:6] == [0, 1, 2, 8, 9, 10] and got["b"][:6] == [4, 5, 6, 15, 16, 17]
    assert not a.end_run(JOB, guard=keeper)  # b wrote the mark last: a is not vouched for
    a.close()
    b.close()


@pytest.mark.parametrize("seed", range(8))
def test_restored_copies_never_hand_out_a_slot_twice(tmp_path: Path, seed: int) -> None:
    """Random runs on one store, some killed, copies taken and put back at random, and
    copies run at the same time: every slot committed in any copy is committed once,
    below the quota, and each store's count covers what it burned."""
    rng = random.Random(seed)
    quota = 80
    keeper = Keeper(block=rng.choice([2, 6, 12]))
    live = tmp_path / "store.sqlite"
    _marked(tmp_path, keeper, quota=quota).close()
    copies: list[Path] = []
    released: set[int] = set()  # every slot any copy committed: the devices in the field
    for step in range(40):
        if rng.random() < 0.5:
            copies.append(tmp_path / f"copy-{step}.sqlite")
            shutil.copyfile(live, copies[-1])
        stores = [live]
        if copies and rng.random() < 0.25:  # a copy run at the same time, elsewhere
            twin = tmp_path / f"twin-{step}.sqlite"
            shutil.copyfile(rng.choice(copies), twin)
            stores.append(twin)
        opened = []
        for path in stores:
            st = SQLiteStore(path, create=False)
            try:
                st.begin_run(JOB, guard=keeper)
                opened.append(st)
            except StoreRolledBackError:  # an older copy: refused
                st.close()
        for _ in range(rng.randint(1, 3)):
            for st in opened:
                run = b"run-%d" % id(st)
                try:
                    slots = st.reserve(JOB, rng.randint(1, 4), run=run, guard=keeper)
                except (QuotaExceededError, StoreRolledBackError):
                    continue
                keep = slots[: rng.randint(0, len(slots))]
                st.commit(JOB, [_prov(x, _dev(len(released) + i)) for i, x in enumerate(keep)],
                          _sign, run=run)  # fmt: skip
                assert not released & set(keep), f"slots {released & set(keep)} twice"
                assert all(x < quota for x in keep)
                released.update(keep)
                st.give_back(JOB, slots[len(keep) :], run=run)
        for st in opened:
            if rng.random() < 0.5:  # else killed: no end
                with contextlib.suppress(StoreRolledBackError):
                    st.end_run(JOB, guard=keeper)
            state = st.state(JOB)
            assert state.committed + state.burned <= state.used <= quota
            st.close()
        if copies and rng.random() < 0.5:  # the operator puts a copy back
            shutil.copyfile(rng.choice(copies[-3:]), live)
    assert len(released) <= quota
    assert set(_slots(live)) <= released


class RacingObjects(MemoryObjects):
    """Another writer creates the same generation right after ours, once."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    def create(self, label: str, value: bytes) -> DataObject:
        obj = super().create(label, value)
        if not self.raced and Mark.from_bytes(value).generation == 1:
            self.raced = True
            rival = attrs.evolve(Mark.from_bytes(value), limit=7, nonce=os.urandom(8))
            super().create(label, rival.to_bytes())
        return obj


def test_a_writer_that_meets_a_rival_generation_tries_again_above_it(tmp_path: Path) -> None:
    keeper = Keeper(objects=RacingObjects(), block=4)
    s = _marked(tmp_path, keeper)
    start = s.begin_run(JOB, guard=keeper)  # generation 1: a rival wrote one too
    mark = keeper.read()
    assert mark.generation == 2 and not mark.clean  # written again, above the rival
    assert start.burned == 7  # its fresh slots start above the rival's limit
    assert s.reserve(JOB, 1, run=b"A", guard=keeper) == [7]


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


def _filled(tmp_path: Path, devices: int = 400) -> Path:
    """A closed store file of ``devices`` provisioned records (several pages per table)."""
    s = _store(tmp_path, quota=devices)
    slots = s.reserve(JOB, devices, run=b"A", guard=UNGUARDED)
    s.commit(JOB, [_prov(x, _dev(x)) for x in slots], _sign, run=b"A")
    s.close()
    return tmp_path / "store.sqlite"


def _page_of(path: Path, name: str) -> int:
    db = sqlite3.connect(path)
    try:
        sql = "SELECT rootpage FROM sqlite_master WHERE name = ?"
        (page,) = db.execute(sql, (name,)).fetchone()
    finally:
        db.close()
    return int(page)


@pytest.mark.parametrize("page", ["header", "records", "records_device", "records_slot", "jobs"])
@pytest.mark.parametrize("fill", ["zeros", "garbage"])
def test_a_damaged_page_is_refused_before_anything_is_counted(
    tmp_path: Path, page: str, fill: str
) -> None:
    path = _filled(tmp_path)
    number = 1 if page == "header" else _page_of(path, page)
    data = bytearray(path.read_bytes())
    size = 4096
    assert len(data) > 20 * size
    data[(number - 1) * size : number * size] = bytes(size) if fill == "zeros" else os.urandom(size)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError) as info:
        SQLiteStore.inspect(path, JOB)
    text = str(info.value)
    assert str(path) in text and "restore it from backup" in text and "\n" not in text
    assert path.read_bytes() == bytes(data)  # reading it changed nothing


def test_a_close_whose_ledger_cannot_be_kept_closes_nothing(tmp_path: Path) -> None:
    s = _store(tmp_path, quota=10)
    slots = s.reserve(JOB, 3, run=b"A", guard=UNGUARDED)
    s.commit(JOB, [_prov(x, _dev(x)) for x in slots[:2]], _sign, run=b"A")

    def sign(totals: ledger.LedgerTotals) -> bytes:
        return b"close %d %d" % (totals.provisioned, totals.quota_used)

    def broken(items: Any) -> None:
        next(items)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        s.close_job(JOB, sign, keep=broken)
    assert s.reserve(JOB, 1, run=b"A", guard=UNGUARDED) == [3]  # not closed
    kept: list[list[tuple[str, bytes]]] = []
    envelope = s.close_job(JOB, sign, keep=lambda items: kept.append(list(items)))
    assert envelope == b"close 2 4"  # burned and unused slots count as used
    assert kept[0][-1] == (ledger.TAG_CLOSE, envelope) and len(kept[0]) == 4
    # closed once: a second close signs nothing new and hands out the same ledger again
    again = s.close_job(JOB, lambda t: b"other", keep=lambda items: kept.append(list(items)))
    assert again == envelope and kept[1] == kept[0]


def test_a_store_of_another_schema_version_is_refused_by_name(tmp_path: Path) -> None:
    path = _filled(tmp_path, devices=3)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    for read in (lambda: SQLiteStore.inspect(path, JOB), lambda: SQLiteStore(path)):
        with pytest.raises(StoreCorruptError, match="another schema version than 3"):
            read()
