"""Durable production state: the quota count and the ledger, in one database.

Invariant S3 (quota never exceeded, even if killed at any instruction) rests on two rules:

1. slots are *reserved* (counted and committed) before any device uses them;
2. a device's ledger record (and the checkpoint covering it) is committed before its
   secrets are released.

A slot is handed out once, ever, whatever copy of this file is put back.  Within a run, a
reserved slot is either used by a committed record or given back (a device refused after
reservation, a duplicate at commit, a batch rolled back); given-back slots are reused before
fresh ones.  A slot with no committed record never had secrets released under it -- *in this
file*.  A copy of the file restored over a newer one has forgotten records that used its free
and reserved slots and its fresh ones, so those slots are reused only when the token's quota
mark vouches for the store as the latest (:meth:`begin_run`: the last run ended cleanly and
left exactly these counts and this ledger head).  Otherwise -- a killed run, a restored
copy -- they are *burned*: the free slots and dead runs' reservations are dropped and the
high-water mark jumps to the mark's ``limit``, above every slot ever handed out.  Burned
slots stay counted against the quota (``quota_used`` in the close record): a restore loses
slots, it never re-counts them (S3: over-count, never under).

What was released to a device (certificate, provisioning data, license) is kept until its
programming is recorded, so a device counted but not programmed (kill, signal, programming
failure) is programmed later with the same certificate and license, without a second count.

Invariant S7 (this state cannot be silently forgotten) needs a witness outside the file: the
quota mark in the programmer token (:mod:`securethread.programmer.quota_mark`).  Every job
has a random ``store_id``; :meth:`reserve` asks the mark keeper to move the mark before the
reservations pass the limit the mark covers, inside the write transaction.  A store is
trusted only after ``PRAGMA quick_check`` (:meth:`inspect`): a damaged page is refused
before anything is counted into it.

The embedded default is SQLite in WAL mode with ``synchronous=FULL`` (a commit is on disk
when ``COMMIT`` returns); ``BEGIN IMMEDIATE`` takes the write lock up front so concurrent
worker processes serialise their reservations and their batch commits.  Every SQLite failure
leaves as a :class:`~securethread.errors.StoreError` naming the file.  The
:class:`ProductionStore` protocol is all the pipeline uses, so a server database can be
added later.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import attrs

from securethread.errors import (
    JobError,
    QuotaExceededError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreMissingError,
)
from securethread.formats import ledger

SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job        BLOB PRIMARY KEY,      -- the job identity (formats.job.job_hash)
    job_id     TEXT NOT NULL,
    quota      INTEGER NOT NULL CHECK (quota > 0),
    reserved   INTEGER NOT NULL DEFAULT 0 CHECK (reserved <= quota),  -- slots ever handed out
    committed  INTEGER NOT NULL DEFAULT 0,  -- provisioned records
    store_id   BLOB NOT NULL,         -- random; also in the token's quota mark (S7)
    mark_limit INTEGER NOT NULL DEFAULT 0,  -- reservations the token's quota mark covers
    mark_nonce BLOB NOT NULL DEFAULT x'',   -- names the mark generation this store wrote last
    burned     INTEGER NOT NULL DEFAULT 0,  -- counted, never to be used (see the module)
    signed     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS free_slots (   -- given back, reused first
    job  BLOB NOT NULL,
    slot INTEGER NOT NULL,
    PRIMARY KEY (job, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (  -- handed out, no record committed yet
    job  BLOB NOT NULL,
    slot INTEGER NOT NULL,
    run  BLOB NOT NULL,
    PRIMARY KEY (job, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS releases (      -- provisioned, programming not yet recorded
    job          BLOB NOT NULL,
    device_id    TEXT NOT NULL,
    slot         INTEGER NOT NULL,
    certificate  BLOB NOT NULL,
    provisioning BLOB NOT NULL,
    license      BLOB NOT NULL,
    run          BLOB NOT NULL,         -- the run that released it
    PRIMARY KEY (job, device_id)
);
CREATE TABLE IF NOT EXISTS records (
    job       BLOB NOT NULL,
    seq       INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    device_id TEXT NOT NULL,
    slot      INTEGER NOT NULL,
    record    BLOB NOT NULL,
    hash      BLOB NOT NULL,
    PRIMARY KEY (job, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS records_device ON records (job, kind, device_id);
CREATE UNIQUE INDEX IF NOT EXISTS records_slot ON records (job, kind, slot);
CREATE TABLE IF NOT EXISTS checkpoints (
    job      BLOB NOT NULL,
    upto     INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (job, upto)
);
CREATE TABLE IF NOT EXISTS closes (
    job      BLOB PRIMARY KEY,      -- a closed job takes no more slots or records
    envelope BLOB NOT NULL          -- the signed ledger close record
);
"""
_TABLES = frozenset(
    {"jobs", "free_slots", "reservations", "releases", "records", "checkpoints", "closes"}
)

#: Signs a checkpoint over ``(upto, head)``; called inside the write transaction.
CheckpointSigner = Callable[[int, bytes], bytes]
#: Keeps a closed ledger (records, checkpoints, close record, as ``export`` yields them)
#: before the close commits; raises if it cannot.
LedgerKeeper = Callable[[Iterator[tuple[str, bytes]]], None]


class JobClosedError(JobError):
    """The job's ledger was closed: no slot is counted and no record appended any more."""


@attrs.frozen
class StoreState:
    """What a store durably holds about one job (read inside one transaction)."""

    job: bytes
    job_id: str
    store_id: bytes
    quota: int
    reserved: int  # high-water mark of slots ever handed out (never decreases)
    free: int  # slots given back, to be reused first
    committed: int  # provisioned records: devices counted and certified
    mark_limit: int  # reservations the token's quota mark covers
    burned: int = 0  # counted and never to be used: a restored copy, a killed run
    head: bytes = b""  # hash of the last ledger record (the job identity if none)
    mark_nonce: bytes = b""  # the quota-mark generation this store wrote last

    @property
    def used(self) -> int:
        """Slots counted against the quota (committed, burned, or reserved and not given
        back)."""
        return self.reserved - self.free


@attrs.frozen
class Grant:
    """What the quota mark lets a store hand out.

    ``floor``: fresh slots start at it or above (a store below it jumps up and burns the
    gap: another copy may have handed those out); ``limit``: fresh slots stay below it
    until the mark moves again; ``nonce``: the mark generation written for this store;
    ``reuse``: the mark vouches for the store as the latest, so its free slots and dead
    runs' reservations were never released and may be handed out."""

    floor: int
    limit: int
    nonce: bytes = b""
    reuse: bool = False


class MarkKeeper(Protocol):
    """Keeps a durable witness of the store outside it (S7) and bounds the slots it hands
    out (S3 across restored copies).  Each method is called inside the store's write
    transaction with the store's committed ``state``."""

    def begin(self, state: StoreState) -> Grant:
        """A run starts: may the store reuse its free and reserved slots, from where may it
        hand out fresh ones, up to which limit."""
        ...

    def advance(self, state: StoreState, fresh: int) -> Grant:
        """The store needs ``fresh`` slots beyond its limit: the new floor and a limit of
        at least ``min(quota, floor + fresh)``."""
        ...

    def finish(self, state: StoreState) -> Grant:
        """A run ended cleanly: ``reuse`` is true if the mark now vouches for ``state`` as
        the latest (its reservations may then go back to the free pool)."""
        ...


@attrs.frozen
class Unguarded:
    """No witness outside the store: a deleted or restored store is not detected (S7 and
    S3 across copies do not hold).

    An explicit, named choice for unit tests and benchmarks of the store alone; production
    code (the runner, ``open_store``) always passes a
    :class:`~securethread.programmer.quota_mark.QuotaMark`.
    """

    def begin(self, state: StoreState) -> Grant:
        return Grant(state.reserved, state.quota, reuse=True)

    def advance(self, state: StoreState, fresh: int) -> Grant:
        return Grant(state.reserved, state.quota)

    def finish(self, state: StoreState) -> Grant:
        return Grant(state.reserved, state.quota, reuse=True)


UNGUARDED = Unguarded()


@attrs.frozen
class RunStart:
    """What :meth:`SQLiteStore.begin_run` did: slots of dead runs put back in the free
    pool (``reclaimed``: the mark vouched for the store) or dropped with the free pool and
    the slots other copies may have used (``burned``)."""

    reclaimed: int
    burned: int


@attrs.frozen
class Release:
    """What was released to a device whose programming is not recorded yet (by ``run``)."""

    device_id: str
    slot: int
    certificate: bytes  # DER
    provisioning: bytes
    license: bytes
    run: bytes = b""


@attrs.frozen
class Committed:
    """What a batch commit wrote, and which pending records it refused as duplicates."""

    records: list[tuple[ledger.PendingRecord, int, bytes]]  # (record, seq, raw)
    duplicates: list[ledger.PendingRecord]


class ProductionStore(Protocol):
    def open_job(self, *, job: bytes, job_id: str, quota: int, signed: bytes) -> None: ...

    def state(self, job: bytes) -> StoreState: ...

    def begin_run(self, job: bytes, *, guard: MarkKeeper) -> RunStart: ...

    def end_run(self, job: bytes, *, guard: MarkKeeper) -> bool: ...

    def reserve(
        self, job: bytes, n: int, *, guard: MarkKeeper, run: bytes = b""
    ) -> list[int]: ...

    def give_back(self, job: bytes, slots: Sequence[int], *, run: bytes = b"") -> None: ...

    def counts(self, job: bytes) -> tuple[int, int]: ...

    def known_devices(self, job: bytes, kind: str, device_ids: Sequence[str]) -> set[str]: ...

    def unprogrammed(self, job: bytes, device_ids: Sequence[str]) -> dict[str, Release]: ...

    def released(self, job: bytes, device_ids: Sequence[str]) -> None: ...

    def commit(
        self,
        job: bytes,
        pending: Sequence[ledger.PendingRecord],
        sign: CheckpointSigner,
        *,
        releases: Mapping[str, Release] | None = None,
        run: bytes = b"",
    ) -> Committed: ...

    def export(self, job: bytes) -> Iterator[tuple[str, bytes]]: ...

    def close_job(
        self, job: bytes, sign: ledger.CloseSigner, *, keep: LedgerKeeper | None = None
    ) -> bytes: ...

    def close(self) -> None: ...


def _translate(path: Path, what: str, exc: sqlite3.Error, waited: float) -> StoreError:
    """One clear securethread error for an SQLite failure (never a traceback)."""
    msg = str(exc)
    where = f"production store {str(path)!r}"
    low = msg.lower()
    if "locked" in low or "busy" in low:
        return StoreBusyError(
            f"{where} is locked by another process (waited {waited:g} s to {what}); "
            "stop that process and run again"
        )
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return StoreCorruptError(
            f"{where} is damaged ({msg}); restore it from backup (with its -wal file)"
        )
    if "full" in low:
        return StoreError(f"{where}: the disk is full ({what}); free space and run again")
    return StoreError(f"{where}: cannot {what}: {msg}")


def _untouched(p: Path) -> tuple[int, int, int, int] | None:
    """The store file's identity if no connection has it open, else ``None``.

    Every WAL-mode connection keeps the ``-wal`` and ``-shm`` files while it is open, and
    the last one to close checkpoints into the file (changing its size or times) before it
    removes them (https://sqlite.org/wal.html#the_wal_file): the same identity, with no
    side file before and after a read, means no writer touched the file during it."""
    if any(os.path.lexists(f"{p}{suffix}") for suffix in ("-wal", "-shm")):
        return None
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _inspect(p: Path, job: bytes, query: str, busy_timeout_s: float) -> StoreState | None:
    """:meth:`SQLiteStore.inspect`'s read through one connection opened with ``query``."""
    try:
        db = sqlite3.connect(
            p.as_uri() + query, uri=True, isolation_level=None, timeout=busy_timeout_s
        )
    except sqlite3.Error as exc:
        raise _translate(p, "read it", exc, busy_timeout_s) from None
    try:
        # One read transaction: the counts and the records compared below are one snapshot
        # (https://sqlite.org/lang_transaction.html), not two moments of a live store.
        db.execute("BEGIN")
        tables = _tables(db)
        if not tables:
            return None
        if "jobs" not in tables:
            raise StoreCorruptError(f"{str(p)!r} is an SQLite database but not a production store")
        _quick_check(db, p)
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            raise StoreCorruptError(
                f"production store {str(p)!r} has another schema version than "
                f"{SCHEMA_VERSION} (written by another securethread version)"
            )
        state = _read_state(db, job)
        if state is None:
            return None
        counted = db.execute(
            "SELECT COUNT(*) FROM records WHERE job = ? AND kind != ?",  # the counted kinds
            (job, ledger.KIND_PROGRAMMED),
        ).fetchone()[0]
        if counted != state.committed:
            raise StoreCorruptError(
                f"production store {str(p)!r} is inconsistent: {counted} provisioned "
                f"records, {state.committed} counted; restore it from backup"
            )
        return state
    except sqlite3.Error as exc:
        raise _translate(p, "read it", exc, busy_timeout_s) from None
    finally:
        db.close()


class SQLiteStore:
    """The embedded default :class:`ProductionStore`. One per process (not thread-shared).

    ``create=False`` refuses a path where no store exists yet (a worker opening the store its
    leader checked must not create an empty one).
    """

    def __init__(
        self, path: str | Path, *, create: bool = True, busy_timeout_s: float = 60.0
    ) -> None:
        self.path = Path(path)
        self._timeout = busy_timeout_s
        if not create and not self.path.is_file():
            raise StoreMissingError(f"production store {str(self.path)!r} does not exist")
        with self._errors("open it"):
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout_s)
        try:
            self._prepare(create)
        except BaseException:
            self._db.close()
            raise

    def _prepare(self, create: bool) -> None:
        db = self._db
        with self._errors("open it"):
            db.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            tables = _tables(db)
            if tables and "jobs" not in tables:
                raise StoreCorruptError(
                    f"{str(self.path)!r} is an SQLite database but not a production store"
                )
            if tables and db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                raise StoreCorruptError(
                    f"production store {str(self.path)!r} has another schema version than "
                    f"{SCHEMA_VERSION} (written by another securethread version)"
                )
            if tables and not _TABLES <= tables:
                raise StoreCorruptError(f"production store {str(self.path)!r} lacks tables")
            if not tables and not create:
                raise StoreMissingError(f"production store {str(self.path)!r} is empty")
            # Switching to WAL and creating the schema need an exclusive lock that SQLite
            # does not wait for (no busy handler); concurrent openers retry briefly.
            for attempt in range(50):
                try:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    if not tables:
                        # One transaction: a kill leaves no schema or all of it.
                        db.executescript(
                            "BEGIN IMMEDIATE;"
                            + _SCHEMA
                            + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                        )
                    break
                except sqlite3.OperationalError as exc:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    if "locked" not in str(exc) or attempt == 49:
                        raise
                    time.sleep(0.02 * (attempt + 1))
            # durable at COMMIT (https://sqlite.org/pragma.html#pragma_synchronous)
            db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _translate(self.path, what, exc, self._timeout) from None

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, committed on success, rolled back on any
        exception (SQLite failures leave as :class:`StoreError`)."""
        db = self._db
        with self._errors(what):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()

    # --- reading without changing anything (S7 checks before the store is used) ----------

    @staticmethod
    def inspect(
        path: str | Path, job: bytes, *, busy_timeout_s: float = 60.0
    ) -> StoreState | None:
        """The job's state in the store at ``path``, read-only; ``None`` if there is no
        file, an empty one, or no record of the job.  Raises :class:`StoreCorruptError`
        for a damaged file (``PRAGMA quick_check``: every b-tree page, cell and record
        format; about 0.1 s per 100,000 devices, docs/performance.md) or one whose counts
        disagree with its records: nothing is counted into a store before it is checked.

        Safe beside a writer in another thread or process: a store no connection has open
        is read as immutable (no lock, no -wal/-shm side files left behind), and that read
        counts only if the file was still untouched after it; otherwise it is read again
        through SQLite's locks (``mode=ro``, waiting up to ``busy_timeout_s``).  An
        immutable read that overlapped a writer's checkpoint saw torn pages and took the
        store for damaged (the status view's spurious "damaged" answer)."""
        p = Path(path).resolve()
        if not p.is_file():
            return None
        before = _untouched(p)
        if before is not None:
            found: StoreState | StoreError | None
            try:
                found = _inspect(p, job, "?mode=ro&immutable=1", busy_timeout_s)
            except StoreError as exc:  # damaged -- or torn by a writer: decided below
                found = exc
            if _untouched(p) == before:
                if isinstance(found, StoreError):
                    raise found
                return found
        # https://sqlite.org/uri.html: with immutable=1 a file that changes gives "incorrect
        # query results"; mode=ro reads one consistent snapshot under the WAL's read locks
        # (https://sqlite.org/wal.html#concurrency).
        return _inspect(p, job, "?mode=ro", busy_timeout_s)

    def state(self, job: bytes) -> StoreState:
        with self._errors("read the job's counts"):
            state = _read_state(self._db, job)
        if state is None:
            raise JobError("job is not open in this store")
        return state

    # --- the job and its quota ------------------------------------------------------------

    def open_job(self, *, job: bytes, job_id: str, quota: int, signed: bytes) -> None:
        """Register a job (idempotent); refuse a different job body under the same hash.

        A new job gets a random store id, the name the token's quota mark knows it by."""
        with self._write("open the job") as db:
            row = db.execute("SELECT quota, job_id FROM jobs WHERE job = ?", (job,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO jobs (job, job_id, quota, signed, store_id)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (job, job_id, quota, signed, os.urandom(16)),
                )
            elif row != (quota, job_id):
                raise JobError(f"job {job_id} is already open with different terms")

    def begin_run(self, job: bytes, *, guard: MarkKeeper) -> RunStart:
        """Start a run (the caller holds the job's run lock).  If the quota mark vouches for
        this store as the latest, slots reserved by runs that died go back to the free
        pool; otherwise (a killed run, a restored copy) free slots and dead reservations
        are burned and the high-water mark jumps to the grant's floor (see the module)."""
        with self._write("start a run") as db:
            self._refuse_closed(job)
            state = _read_state(db, job)
            if state is None:
                raise JobError("job is not open in this store")
            grant = guard.begin(state)
            if grant.reuse:
                start = RunStart(reclaimed=_reclaim(db, job), burned=0)
            else:
                dead = db.execute("DELETE FROM reservations WHERE job = ?", (job,)).rowcount
                free = db.execute("DELETE FROM free_slots WHERE job = ?", (job,)).rowcount
                high = min(max(grant.floor, state.reserved), state.quota)
                start = RunStart(reclaimed=0, burned=dead + free + high - state.reserved)
                db.execute(
                    "UPDATE jobs SET reserved = ?, burned = burned + ? WHERE job = ?",
                    (high, start.burned, job),
                )
            _granted(db, job, grant)
        return start

    def end_run(self, job: bytes, *, guard: MarkKeeper) -> bool:
        """A run ended cleanly (no process of it hands out slots any more): the quota mark
        records the store's counts, and if it vouches for the store as the latest, dead
        reservations go back to the free pool.  Also when a job is opened (its first
        mark).  Returns whether the mark vouches for the store."""
        with self._write("update the quota mark") as db:
            state = _read_state(db, job)
            if state is None:
                raise JobError("job is not open in this store")
            grant = guard.finish(state)
            if grant.reuse:
                _reclaim(db, job)
            _granted(db, job, grant)
        return grant.reuse

    def reserve(
        self, job: bytes, n: int, *, guard: MarkKeeper, run: bytes = b""
    ) -> list[int]:
        """Durably count up to ``n`` slots against the quota for ``run`` (given-back slots
        first); raise :class:`QuotaExceededError` if none is left.  Before fresh slots pass
        the limit the quota mark covers, ``guard`` moves the mark (S7); if another copy of
        the store moved it meanwhile, this one jumps above the other's slots (burned)."""
        if n < 1:
            raise ValueError("reserve at least one slot")
        with self._write("reserve slots") as db:
            state = _read_state(db, job)
            if state is None:
                raise JobError("job is not open in this store")
            self._refuse_closed(job)
            free = [
                r[0]
                for r in db.execute(
                    "SELECT slot FROM free_slots WHERE job = ? ORDER BY slot LIMIT ?", (job, n)
                )
            ]
            low = state.reserved
            fresh = max(0, min(n - len(free), state.quota - low))
            if fresh and low + fresh > state.mark_limit:
                grant = guard.advance(state, fresh)
                if grant.floor > low:  # another copy's slots: never ours to hand out
                    low = min(grant.floor, state.quota)
                    db.execute(
                        "UPDATE jobs SET burned = burned + ? WHERE job = ?",
                        (low - state.reserved, job),
                    )
                fresh = max(0, min(n - len(free), state.quota - low, grant.limit - low))
                _granted(db, job, grant)
            slots = free + list(range(low, low + fresh))
            db.executemany(
                "DELETE FROM free_slots WHERE job = ? AND slot = ?", [(job, s) for s in free]
            )
            db.execute("UPDATE jobs SET reserved = ? WHERE job = ?", (low + fresh, job))
            db.executemany(
                "INSERT INTO reservations (job, slot, run) VALUES (?, ?, ?)",
                [(job, s, run) for s in slots],
            )
        if not slots:  # (a jump above another copy's slots is kept: committed above)
            raise QuotaExceededError(f"quota of {state.quota} devices is exhausted")
        return slots

    def give_back(self, job: bytes, slots: Sequence[int], *, run: bytes = b"") -> None:
        """Return ``run``'s unused reservations to the free pool."""
        if not slots:
            return
        with self._write("give back slots") as db:
            _free_reserved(db, job, slots, run)

    def counts(self, job: bytes) -> tuple[int, int]:
        """``(quota, used)``: slots counted are committed or reserved and not given back."""
        state = self.state(job)
        return state.quota, state.used

    def known_devices(self, job: bytes, kind: str, device_ids: Sequence[str]) -> set[str]:
        if not device_ids:
            return set()
        with self._errors("read the ledger"):
            return _known(self._db, job, kind, device_ids)

    def unprogrammed(self, job: bytes, device_ids: Sequence[str]) -> dict[str, Release]:
        """Which of ``device_ids`` were provisioned and their programming is not recorded,
        with what was released to them."""
        if not device_ids:
            return {}
        marks = ",".join("?" * len(device_ids))
        with self._errors("read released devices"):
            rows = self._db.execute(
                "SELECT device_id, slot, certificate, provisioning, license, run FROM releases"
                f" WHERE job = ? AND device_id IN ({marks})",
                (job, *device_ids),
            ).fetchall()
        return {
            r[0]: Release(r[0], r[1], bytes(r[2]), bytes(r[3]), bytes(r[4]), bytes(r[5]))
            for r in rows
        }

    def released(self, job: bytes, device_ids: Sequence[str]) -> None:
        """The devices took what was released to them and nothing follows for them in this
        job (a "provision" job programs nothing, so no programmed record ends their
        release): forget what was released.  A device met again is then refused as done."""
        if not device_ids:
            return
        with self._write("forget released devices") as db:
            db.executemany(
                "DELETE FROM releases WHERE job = ? AND device_id = ?",
                [(job, d) for d in device_ids],
            )

    def unprogrammed_summary(self, job: bytes, *, limit: int = 100) -> tuple[int, list[str]]:
        """How many devices of the job are provisioned but not programmed; the first ids."""
        with self._errors("read released devices"):
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM releases WHERE job = ?", (job,)
            ).fetchone()
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT device_id FROM releases WHERE job = ? ORDER BY device_id LIMIT ?",
                    (job, limit),
                )
            ]
        return int(n), ids

    # --- the ledger -----------------------------------------------------------------------

    def commit(
        self,
        job: bytes,
        pending: Sequence[ledger.PendingRecord],
        sign: CheckpointSigner,
        *,
        releases: Mapping[str, Release] | None = None,
        run: bytes = b"",
    ) -> Committed:
        """Append ``pending`` to the job's chain and a signed checkpoint, in one transaction.

        Records for a device (or slot) already in the ledger under the same kind are
        refused and returned as duplicates (another worker got there first); the slots of
        refused provisioning records go back to the free pool.  A provisioning record must
        use a slot ``run`` reserved; ``releases`` (by device id) is kept with it until a
        programming record for the device is committed.
        """
        releases = releases or {}
        with self._write("commit ledger records") as db:
            self._refuse_closed(job)
            by_kind: dict[str, list[str]] = {}
            for p in pending:
                by_kind.setdefault(p.kind, []).append(p.device_id)
            taken: set[tuple[str, str]] = set()
            for kind, ids in by_kind.items():
                taken |= {(kind, d) for d in _known(db, job, kind, ids)}
            fresh, dups, seen = [], [], set()
            for p in pending:
                key = (p.kind, p.device_id)
                if key in taken or key in seen:
                    dups.append(p)
                else:
                    seen.add(key)
                    fresh.append(p)
            provisioned = [p for p in fresh if p.kind in ledger.COUNTED_KINDS]
            _use_reserved(db, job, [p.slot for p in provisioned], run)
            _free_reserved(
                db, job, [p.slot for p in dups if p.kind in ledger.COUNTED_KINDS], run
            )
            row = db.execute(
                "SELECT seq, hash FROM records WHERE job = ? ORDER BY seq DESC LIMIT 1", (job,)
            ).fetchone()
            start, prev = (row[0] + 1, row[1]) if row else (0, job)
            chained = ledger.chain(fresh, job=job, start_seq=start, prev=prev)
            db.executemany(
                "INSERT INTO records (job, seq, kind, device_id, slot, record, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job, seq, r.kind, r.device_id, r.slot, raw, h) for r, seq, raw, h in chained],
            )
            if chained:
                upto, head = chained[-1][1], chained[-1][3]
                db.execute(
                    "INSERT INTO checkpoints (job, upto, envelope) VALUES (?, ?, ?)",
                    (job, upto, sign(upto, head)),
                )
            kept = [releases[p.device_id] for p in provisioned if p.device_id in releases]
            db.executemany(
                "INSERT INTO releases"
                " (job, device_id, slot, certificate, provisioning, license, run)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (job, r.device_id, r.slot, r.certificate, r.provisioning, r.license, run)
                    for r in kept
                ],
            )
            db.executemany(
                "DELETE FROM releases WHERE job = ? AND device_id = ?",
                [(job, p.device_id) for p in fresh if p.kind == ledger.KIND_PROGRAMMED],
            )
            if provisioned:
                db.execute(
                    "UPDATE jobs SET committed = committed + ? WHERE job = ?",
                    (len(provisioned), job),
                )
        return Committed(records=[(r, seq, raw) for r, seq, raw, _ in chained], duplicates=dups)

    def export(self, job: bytes) -> Iterator[tuple[str, bytes]]:
        """Records and checkpoints in chain order (streamed, constant memory)."""
        with self._errors("read the ledger"):
            cps = self._db.execute(
                "SELECT upto, envelope FROM checkpoints WHERE job = ? ORDER BY upto", (job,)
            )
            recs = self._db.cursor().execute(
                "SELECT seq, record FROM records WHERE job = ? ORDER BY seq", (job,)
            )
            next_cp = cps.fetchone()
            for seq, raw in recs:
                yield "r", raw
                while next_cp is not None and next_cp[0] == seq:
                    yield "c", next_cp[1]
                    next_cp = cps.fetchone()
            closed = self._db.execute(
                "SELECT envelope FROM closes WHERE job = ?", (job,)
            ).fetchone()
            if closed is not None:
                yield ledger.TAG_CLOSE, bytes(closed[0])

    def _refuse_closed(self, job: bytes) -> None:
        if self._db.execute("SELECT 1 FROM closes WHERE job = ?", (job,)).fetchone():
            raise JobClosedError("the job's ledger is closed")

    def close_job(
        self, job: bytes, sign: ledger.CloseSigner, *, keep: LedgerKeeper | None = None
    ) -> bytes:
        """Close the job's ledger: ``sign`` (see :func:`ledger.close_signer`) signs the totals
        inside the transaction that marks the job closed, so no record can slip in between;
        ``keep`` gets the closed ledger inside that transaction, before it commits -- if it
        fails, nothing is closed (a job is never closed without its ledger).  Idempotent: a
        closed job returns its existing close record (and ``keep`` gets its ledger again)."""
        with self._errors("close the job"):
            return self._close_job(job, sign, keep)

    def _close_job(
        self, job: bytes, sign: ledger.CloseSigner, keep: LedgerKeeper | None
    ) -> bytes:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            done = db.execute("SELECT envelope FROM closes WHERE job = ?", (job,)).fetchone()
            if done is not None:
                envelope = bytes(done[0])
            else:
                envelope = sign(self._totals(job))
                db.execute("INSERT INTO closes (job, envelope) VALUES (?, ?)", (job, envelope))
            if keep is not None:
                keep(self.export(job))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return envelope

    def _totals(self, job: bytes) -> ledger.LedgerTotals:
        db = self._db
        row = db.execute("SELECT quota, reserved FROM jobs WHERE job = ?", (job,)).fetchone()
        if row is None:
            raise JobError("job is not open in this store")
        quota, reserved = row
        (free,) = db.execute("SELECT COUNT(*) FROM free_slots WHERE job = ?", (job,)).fetchone()
        n, prov, head = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(kind != ?), 0),"  # the counted kinds
            " (SELECT hash FROM records WHERE job = ? ORDER BY seq DESC LIMIT 1)"
            " FROM records WHERE job = ?",
            (ledger.KIND_PROGRAMMED, job, job),
        ).fetchone()
        # quota_used counts burned slots too (>= provisioned): a restore never re-counts.
        return ledger.LedgerTotals(
            records=n,
            provisioned=prov,
            programmed=n - prov,
            head=job if head is None else bytes(head),
            quota=quota,
            quota_used=reserved - free,
        )

    def signed_job(self, job: bytes) -> bytes:
        with self._errors("read the job"):
            row = self._db.execute("SELECT signed FROM jobs WHERE job = ?", (job,)).fetchone()
        if row is None:
            raise JobError("job is not open in this store")
        return bytes(row[0])


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _read_state(db: sqlite3.Connection, job: bytes) -> StoreState | None:
    row = db.execute(
        "SELECT job_id, store_id, quota, reserved, committed, mark_limit, burned, mark_nonce,"
        " (SELECT COUNT(*) FROM free_slots WHERE job = ?),"
        " (SELECT hash FROM records WHERE job = ? ORDER BY seq DESC LIMIT 1)"
        " FROM jobs WHERE job = ?",
        (job, job, job),
    ).fetchone()
    if row is None:
        return None
    job_id, store_id, quota, reserved, committed, mark_limit, burned, nonce, free, head = row
    return StoreState(
        job=job,
        job_id=str(job_id),
        store_id=bytes(store_id),
        quota=int(quota),
        reserved=int(reserved),
        free=int(free),
        committed=int(committed),
        mark_limit=int(mark_limit),
        burned=int(burned),
        head=job if head is None else bytes(head),
        mark_nonce=bytes(nonce),
    )


def _reclaim(db: sqlite3.Connection, job: bytes) -> int:
    """Dead runs' reservations back to the free pool (the mark vouched for the store)."""
    n = db.execute(
        "INSERT INTO free_slots (job, slot) SELECT job, slot FROM reservations WHERE job = ?",
        (job,),
    ).rowcount
    db.execute("DELETE FROM reservations WHERE job = ?", (job,))
    return int(n)


def _granted(db: sqlite3.Connection, job: bytes, grant: Grant) -> None:
    db.execute(
        "UPDATE jobs SET mark_limit = ?, mark_nonce = ? WHERE job = ?",
        (grant.limit, grant.nonce, job),
    )


def _quick_check(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a damaged file before its counts are trusted: ``PRAGMA quick_check``
    (https://sqlite.org/pragma.html#pragma_quick_check; integrity_check without the
    index-to-table cross check) found each 4 KiB page of a 2,000-device store overwritten
    with zeros or random bytes, one at a time."""
    rows = db.execute("PRAGMA quick_check(1)").fetchall()
    if rows != [("ok",)]:
        what = " ".join(str(rows[0][0]).split())[:200] if rows else "no answer"
        raise StoreCorruptError(
            f"production store {str(path)!r} is damaged ({what}); restore it from backup "
            "(with its -wal file)"
        )


def _known(db: sqlite3.Connection, job: bytes, kind: str, device_ids: Sequence[str]) -> set[str]:
    marks = ",".join("?" * len(device_ids))
    rows = db.execute(
        f"SELECT device_id FROM records WHERE job = ? AND kind = ? AND device_id IN ({marks})",
        (job, kind, *device_ids),
    )
    return {r[0] for r in rows}


def _use_reserved(db: sqlite3.Connection, job: bytes, slots: Sequence[int], run: bytes) -> None:
    """Consume ``run``'s reservations of ``slots``; a slot it does not hold is refused (a
    slot is used by one record only: S3)."""
    if not slots:
        return
    marks = ",".join("?" * len(slots))
    (held,) = db.execute(
        f"SELECT COUNT(*) FROM reservations WHERE job = ? AND run = ? AND slot IN ({marks})",
        (job, run, *slots),
    ).fetchone()
    if held != len(set(slots)) or len(set(slots)) != len(slots):
        raise StoreError(
            "slots to commit are not reserved by this run (another run reclaimed them?)"
        )
    db.executemany(
        "DELETE FROM reservations WHERE job = ? AND slot = ?", [(job, s) for s in slots]
    )


def _free_reserved(db: sqlite3.Connection, job: bytes, slots: Sequence[int], run: bytes) -> None:
    for slot in slots:
        gone = db.execute(
            "DELETE FROM reservations WHERE job = ? AND slot = ? AND run = ?", (job, slot, run)
        ).rowcount
        if gone:
            db.execute("INSERT INTO free_slots (job, slot) VALUES (?, ?)", (job, slot))
