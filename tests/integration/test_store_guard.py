"""S7: a job's store cannot be silently forgotten (real SoftHSM token, real SQLite files).

Each scenario starts a job (10 devices provisioned and programmed), then breaks its store
the way a factory would -- deleted, emptied, replaced by a fresh store, by an older copy, by
another store of the same job, corrupted, one page overwritten, truncated, locked -- and
checks that the next run is refused with one clear line naming what to restore, that nothing
changed (store bytes, the token's quota mark), and that with the right store back the run
goes on counting from where it was: never a fresh quota.  And S3 across copies: a store
copied back after runs SIGKILLed inside their reservation block, cycle after cycle, never
issues a slot (a serial) twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509

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
from securethread.formats import cbor, ledger
from securethread.hsm.data import create_data, destroy_data, find_data
from securethread.pki.serial import parse_device_serial
from securethread.programmer import runner
from securethread.programmer.quota_mark import APPLICATION, Mark, QuotaMark
from securethread.programmer.store import SQLiteStore
from tests.integration.line_support import (
    Job,
    World,
    file_digest,
    finish,
    ledger_view,
    run_sub,
    start_run,
)


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


def _root_page(path: Path, name: str) -> int:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        sql = "SELECT rootpage FROM sqlite_master WHERE name = ?"
        return int(db.execute(sql, (name,)).fetchone()[0])
    finally:
        db.close()


PAGES = [("header", b"\x00"), ("records", b"garbage"), ("records_device", b"\x00"),
         ("records_slot", b"garbage"), ("last", b"\x00")]  # fmt: skip


@pytest.mark.parametrize(("page", "fill"), PAGES, ids=[p for p, _ in PAGES])
def test_one_damaged_page_is_refused_before_anything_is_counted(
    world: World, programmer: Any, tmp_path: Path, page: str, fill: bytes
) -> None:
    """One 4 KiB page overwritten (the header page, a table's, an index's, the last one):
    the run is refused with StoreCorruptError before a slot is counted or a device served."""
    job = world.job(quota=40, targets=40, batch_size=4)
    runner.run(job.config, job.chips(world.specs[:30]))
    backup = tmp_path / "backup.sqlite"
    shutil.copyfile(job.store, backup)
    size = 4096
    pages = job.store.stat().st_size // size
    number = {"header": 1, "last": pages}.get(page) or _root_page(job.store, page)
    data = bytearray(job.store.read_bytes())
    junk = (fill * size)[:size] if fill != b"garbage" else os.urandom(size)
    data[(number - 1) * size : number * size] = junk
    job.store.write_bytes(bytes(data))
    mark, released = _mark(programmer, job), job.log("released.log")
    with pytest.raises(StoreCorruptError) as info:
        runner.run(job.config, job.chips(world.specs[30:35]))
    text = _one_line(info.value)
    assert str(job.store) in text and "damaged" in text and "restore it from backup" in text
    assert job.store.read_bytes() == bytes(data) and _mark(programmer, job) == mark
    assert job.log("released.log") == released  # no device was served
    _delete(job, backup)
    shutil.copyfile(backup, job.store)
    r = runner.run(job.config, job.chips(world.specs[30:35]))
    assert (r.provisioned, r.quota_used, r.burned) == (5, 35, 0)


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


def _issued(job: Job, into: dict[bytes, str]) -> None:
    """Every certificate the line has issued so far: its files and its store's ledger (a
    device provisioned again after a restore gets a second one; files are overwritten)."""
    for f in Path(job.config.certificates).glob("*.pem"):
        into[ssl.PEM_cert_to_DER_cert(f.read_text())] = f.stem
    for device_id, der in ledger_view(job).certificates.items():
        into[der] = device_id


def test_store_restored_after_kills_never_reissues_a_slot(
    world: World, programmer: Any, tmp_path: Path
) -> None:
    """The attack of issue 22: one copy of the store, put back after each of six runs that
    were SIGKILLed inside their reservation block.  Each run provisions again the devices
    the copy does not know; every certificate gets a slot no other one had: distinct
    certificates <= quota, no serial twice.  A clean end then makes the copy refusable."""
    quota, block = 50, 8
    job = world.job(quota=quota, targets=40, batch_size=4, mark_block=block)
    runner.run(job.config, [])  # the job opened in its store, marked clean
    copy = tmp_path / "copy.sqlite"
    shutil.copyfile(job.store, copy)  # closed by the run: no -wal to take along
    chips = job.chips(world.specs[:12])
    setup = job.dump(chips)
    issued: dict[bytes, str] = {}
    for cycle in range(6):
        # batch 1 (4 devices) released, batch 2 reserved: killed before it passes the block
        killed = run_sub(setup, fault="after-reserve:2")
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        view = ledger_view(job)
        assert len(view.provisioned) == 4 and view.used == block * (cycle + 1)
        assert sorted(view.slots) == list(range(block * cycle, block * cycle + 4))
        _issued(job, issued)
        _delete(job, copy)
        shutil.copyfile(copy, job.store)  # the operator puts the copy back
    r = runner.run(job.config, job.chips(world.specs[:40]))
    assert (r.burned, r.provisioned, r.quota_used) == (48, 2, quota)  # 6 blocks lost, not more
    assert r.refused == {"QuotaExceededError": 38}
    _issued(job, issued)
    serials = [x509.load_der_x509_certificate(der).serial_number for der in issued]
    slots = [parse_device_serial(s).sequence for s in serials]
    assert len(issued) == 6 * 4 + 2 <= quota  # distinct certificates
    assert len(set(serials)) == len(serials) and len(set(slots)) == len(slots)
    assert all(s < quota for s in slots)
    assert len(set(issued.values())) == 4  # the same 4 chips, each certified 7 times

    # The close record counts the burned slots: quota used 50, 2 devices in this ledger.
    store = SQLiteStore(job.store, create=False)
    try:
        key = programmer.private_key(world.labels.ledger_signing)
        sign = ledger.close_signer(key, job=job.job_hash, time=int(time.time()))
        store.close_job(job.job_hash, sign)
        summary = ledger.verify_ledger(
            store.export(job.job_hash), job=job.job_hash, ledger_key=job.ledger_key
        )
    finally:
        store.close()
    assert summary.close is not None
    assert (summary.provisioned, summary.close.quota_used, summary.close.quota) == (2, 50, 50)

    # The run ended cleanly: the mark records its counts, so the copy is now refused.
    _delete(job, copy)
    shutil.copyfile(copy, job.store)
    with pytest.raises(StoreRolledBackError) as info:
        runner.run(job.config, chips)
    assert "older than the token's quota mark" in _one_line(info.value)


def test_two_copies_of_a_store_run_at_once_never_share_a_serial(
    world: World, programmer: Any, tmp_path: Path
) -> None:
    """A run paused in flight; its store (with its -wal) copied to another path, where a
    second run -- another run lock -- provisions the same chips to the end; then the first
    goes on.  The copy's run starts above the first's block; the first, when it meets the
    copy's mark, is refused: no slot, so no serial, issued by both."""
    job = world.job(quota=40, targets=40, batch_size=4, mark_block=8)
    chips = job.chips(world.specs[:16])
    setup = job.dump(chips)
    first = start_run(setup, fault="after-commit:1:pause")
    try:
        gate = Path(f"{setup}.go.paused")
        while not gate.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        twin = tmp_path / "twin"
        twin.mkdir()
        for suffix in ("", "-wal"):
            if Path(f"{job.store}{suffix}").exists():
                shutil.copyfile(f"{job.store}{suffix}", twin / f"store.sqlite{suffix}")
        other = attrs.evolve(job.config, store=str(twin / "store.sqlite"),
                             certificates=str(twin / "devices"))  # fmt: skip
        r = runner.run(other, chips)  # the copy, elsewhere, to the end of the chips
        # 4 devices counted in the copy already (programmed now); slots 4-7, the rest of the
        # first run's block, burned: the copy's fresh slots start at 8
        assert (r.recovered, r.provisioned, r.burned) == (4, 12, 4)
    finally:
        Path(f"{setup}.go").touch()
    # The first run goes on in its block (slots 4-7, burned by the copy), then meets the
    # copy's mark, which counts more than its store: refused, one line (exit 6 of run_entry).
    done = finish(first)
    assert done.returncode == 6 and "older than the token's quota mark" in done.stderr
    issued: dict[int, bytes] = {}  # slot -> certificate, over both stores
    for config in (job.config, other):
        view = ledger_view(attrs.evolve(job, config=config))
        for device_id, der in view.certificates.items():
            slot = parse_device_serial(x509.load_der_x509_certificate(der).serial_number).sequence
            assert issued.setdefault(slot, der) == der, f"slot {slot} issued twice ({device_id})"
    # 4 records both stores hold (the copy's), 4 + 12 issued apart: 20 serials, none twice
    assert len(issued) == 20 <= 40


def test_mark_is_written_per_block_not_per_device(world: World, programmer: Any) -> None:
    job = world.job(quota=40, targets=40, batch_size=4, mark_block=8)
    r = runner.run(job.config, job.chips(world.specs[:40]))
    assert r.provisioned == 40
    mark = _mark(programmer, job)
    assert mark is not None and mark.clean and mark.limit == 40
    # open + run start + one per 8 slots + end of run: far fewer writes than devices
    assert mark.generation <= 1 + 1 + 40 // 8 + 1
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
        {"v": 1},
        {"v": True},
        {"gen": -1},
        {"committed": True},
        {"store": "not bytes"},
        {"clean": 1},
        {"head": "not bytes"},
        {"nonce": 7},
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
