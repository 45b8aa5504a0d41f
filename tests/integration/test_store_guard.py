"""S7: a job's store cannot be silently forgotten (real SoftHSM token, real SQLite files).

Each scenario starts a job (10 devices provisioned and programmed), then breaks its store
the way a factory would -- deleted, emptied, replaced by a fresh store, by an older copy, by
another store of the same job, corrupted, truncated, locked -- and checks that the next run
is refused with one clear line naming what to restore, that nothing changed (store bytes,
the token's quota mark), and that with the right store back the run goes on counting from
where it was: never a fresh quota.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from securethread.errors import (
    Error,
    QuotaMarkError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreMissingError,
    StoreReplacedError,
    StoreRolledBackError,
)
from securethread.formats import cbor
from securethread.hsm.data import create_data, destroy_data, find_data
from securethread.programmer import runner
from securethread.programmer.quota_mark import APPLICATION, Mark, QuotaMark
from securethread.programmer.store import SQLiteStore
from tests.integration.line_support import Job, World, file_digest, ledger_view


@pytest.fixture(scope="module")
def world(oem: Any, programmer: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(oem, programmer, tmp_path_factory.mktemp("guard"), chips=40)


def _started(world: World, **config: Any) -> Job:
    job = world.job(quota=30, targets=40, batch_size=4, **config)
    r = runner.run(job.config, job.chips(world.specs[:10]))
    assert (r.provisioned, r.programmed, r.quota_used) == (10, 10, 10)
    return job


def _files(job: Job) -> list[Path]:
    return [Path(str(job.store) + s) for s in ("", "-wal", "-shm")]


def _mark(programmer: Any, job: Job) -> Mark | None:
    return QuotaMark(programmer, job.job_hash).read()


def _one_line(exc: Error) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def _delete(job: Job, _other: Path) -> None:
    for f in _files(job):
        f.unlink(missing_ok=True)


def _empty(job: Job, _other: Path) -> None:
    job.store.write_bytes(b"")


def _fresh(job: Job, _other: Path) -> None:
    _delete(job, _other)
    SQLiteStore(job.store).close()  # someone "re-initialised" it: a store without the job


def _another(job: Job, other: Path) -> None:
    # The same job opened in a second store (its own store id), moved in place.
    j = job.config.job
    s = SQLiteStore(other)
    s.open_job(job=j.sha256, job_id=j.job.job_id, quota=j.job.quota, signed=j.signed)
    s.close()
    _delete(job, other)
    shutil.copyfile(other, job.store)


BREAKS: list[tuple[str, Callable[[Job, Path], None], type[Error], str]] = [
    ("deleted", _delete, StoreMissingError, "is missing, empty or has no record"),
    ("emptied", _empty, StoreMissingError, "is missing, empty or has no record"),
    ("fresh store", _fresh, StoreMissingError, "is missing, empty or has no record"),
    ("another store", _another, StoreReplacedError, "not the one job"),
]


@pytest.mark.parametrize(("how", "brk", "error", "says"), BREAKS, ids=[b[0] for b in BREAKS])
def test_missing_or_replaced_store_is_refused(
    world: World,
    programmer: Any,
    tmp_path: Path,
    how: str,
    brk: Callable[[Job, Path], None],
    error: type[Error],
    says: str,
) -> None:
    job = _started(world)
    backup = tmp_path / "backup.sqlite"
    shutil.copyfile(job.store, backup)  # the run closed the store: no -wal left behind
    brk(job, tmp_path / "other.sqlite")
    before = [file_digest(f) for f in _files(job)]
    mark = _mark(programmer, job)
    assert mark is not None and (mark.committed, mark.reserved) == (10, 10)

    with pytest.raises(error) as info:
        runner.run(job.config, job.chips(world.specs[10:20]))
    text = _one_line(info.value)
    assert says in text
    assert "10 device(s) were counted" in text and f"job {job.config.job.job.job_id}" in text
    assert "restore" in text and mark.store_id.hex() in text
    assert [file_digest(f) for f in _files(job)] == before  # nothing changed...
    assert _mark(programmer, job) == mark  # ...in the store or in the token
    assert not job.log("released.log")[10:]  # and no device received anything

    # With the right store back, the run counts on from 10: never a fresh quota.
    _delete(job, backup)
    shutil.copyfile(backup, job.store)
    r = runner.run(job.config, job.chips(world.specs[10:40]))
    assert (r.provisioned, r.quota_used) == (20, 30)
    assert r.refused == {"QuotaExceededError": 10}
    view = ledger_view(job)
    assert len(view.provisioned) == 30 and sorted(view.slots) == list(range(30))


def test_older_copy_is_refused(world: World, programmer: Any, tmp_path: Path) -> None:
    job = _started(world)
    old = tmp_path / "old.sqlite"
    shutil.copyfile(job.store, old)  # a copy taken after 10 devices...
    r = runner.run(job.config, job.chips(world.specs[10:15]))  # ...then 5 more were counted
    assert r.provisioned == 5
    current = tmp_path / "current.sqlite"
    shutil.copyfile(job.store, current)
    _delete(job, old)
    shutil.copyfile(old, job.store)
    mark = _mark(programmer, job)
    before = file_digest(job.store)

    with pytest.raises(StoreRolledBackError) as info:
        runner.run(job.config, job.chips(world.specs[15:20]))
    text = _one_line(info.value)
    assert "older than the token's quota mark" in text
    assert "10 device(s) counted" in text and "15 device(s) were counted" in text
    assert file_digest(job.store) == before and _mark(programmer, job) == mark

    _delete(job, old)
    shutil.copyfile(current, job.store)
    assert runner.run(job.config, job.chips(world.specs[15:20])).quota_used == 20


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database, it is a log file\n" * 200)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("damage", [_garbage, _truncated], ids=["not-a-database", "truncated"])
def test_corrupt_store_gives_one_clear_error(
    world: World, programmer: Any, damage: Callable[[Path], None]
) -> None:
    # A bigger store, so that a third of it cuts through the records.
    job = world.job(quota=30, targets=40, batch_size=4)
    runner.run(job.config, job.chips(world.specs[:30]))
    damage(job.store)
    before = file_digest(job.store)
    mark = _mark(programmer, job)
    with pytest.raises(StoreError) as info:
        runner.run(job.config, job.chips(world.specs[30:35]))
    text = _one_line(info.value)
    assert str(job.store) in text
    if damage is _garbage:
        assert isinstance(info.value, StoreCorruptError)
        assert "damaged" in text and "restore it from backup" in text
    assert file_digest(job.store) == before and _mark(programmer, job) == mark
    # The store's own reading functions say the same, never sqlite3's exception.
    with pytest.raises(StoreError):
        store = SQLiteStore(job.store, create=False)
        try:
            store.state(job.job_hash)
            list(store.export(job.job_hash))
        finally:
            store.close()


def test_store_locked_by_another_process_is_one_clear_error(world: World) -> None:
    job = _started(world, busy_timeout_s=0.3)
    holder = sqlite3.connect(job.store, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # and never commits
    try:
        with pytest.raises(StoreBusyError) as info:
            runner.run(job.config, job.chips(world.specs[10:12]))
        assert "locked by another process" in _one_line(info.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert runner.run(job.config, job.chips(world.specs[10:12])).provisioned == 2


def test_store_opened_before_the_mark_is_adopted(world: World, programmer: Any) -> None:
    """A job opened in its store by a step that did not mark it (or before a mark existed)
    is marked by its first run; from then on a deleted store is refused."""
    job = world.job(quota=5)
    j = job.config.job
    s = SQLiteStore(job.store)
    s.open_job(job=j.sha256, job_id=j.job.job_id, quota=j.job.quota, signed=j.signed)
    s.close()
    assert _mark(programmer, job) is None
    assert runner.run(job.config, job.chips(world.specs[:2])).provisioned == 2
    mark = _mark(programmer, job)
    assert mark is not None and mark.committed == 2
    _delete(job, job.store)
    with pytest.raises(StoreMissingError):
        runner.run(job.config, job.chips(world.specs[2:4]))


def test_mark_moves_per_block_not_per_device(world: World, programmer: Any) -> None:
    job = world.job(quota=40, targets=40, batch_size=4, mark_block=8)
    r = runner.run(job.config, job.chips(world.specs[:40]))
    assert r.provisioned == 40
    mark = _mark(programmer, job)
    assert mark is not None
    # open + one per 8 slots + end of run: far fewer writes than devices
    assert mark.generation <= 1 + 40 // 8 + 1
    assert (mark.committed, mark.reserved) == (40, 40)
    objs = find_data(programmer, label=QuotaMark(programmer, job.job_hash).label,
                     application=APPLICATION)  # fmt: skip
    assert len(objs) <= 2  # older generations are destroyed


def test_unreadable_mark_stops_the_run(world: World, programmer: Any) -> None:
    job = world.job(quota=3)
    label = QuotaMark(programmer, job.job_hash).label
    junk = create_data(programmer, label=label, application=APPLICATION, value=b"\xff\x00junk")
    try:
        with pytest.raises(QuotaMarkError) as info:
            runner.run(job.config, job.chips(world.specs[:1]))
        assert "unreadable" in _one_line(info.value)
        assert not job.store.exists()
    finally:
        destroy_data(programmer, junk)


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"gen": -1},
        {"committed": True},
        {"store": "not bytes"},
        {"extra": 1},
    ],
)
def test_mark_encoding_is_strict(change: dict[str, Any]) -> None:
    good = Mark(job=b"j" * 32, job_id="a", store_id=b"s" * 16, generation=1, committed=2,
                reserved=3, limit=4)  # fmt: skip
    assert Mark.from_bytes(good.to_bytes()) == good
    body = cbor.decode(good.to_bytes())
    body.update(change)
    with pytest.raises(Error):
        Mark.from_bytes(cbor.encode(body))
    assert attrs.evolve(good, generation=2) != good
