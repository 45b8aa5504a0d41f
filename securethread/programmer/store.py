"""Durable production state: the quota count and the ledger, in one database.

Invariant S3 (quota never exceeded, even if killed at any instruction) rests on two rules:

1. slots are *reserved* (counted and committed) before any device uses them;
2. a device's ledger record (and the checkpoint covering it) is committed before its
   secrets are released.

Reservations never strand slots: a reserved slot is either used by a committed record, or
given back (a device refused after reservation, a duplicate at commit, a batch rolled back),
or -- if its process died -- reclaimed by the next run of the job (:meth:`begin_run`; one run
per job at a time, see :mod:`securethread.programmer.runner`).  Given-back slots are reused
before fresh ones.  A slot with no committed record never had secrets released under it, so
reusing it keeps S3.

What was released to a device (certificate, provisioning data, license) is kept until its
programming is recorded, so a device counted but not programmed (kill, signal, programming
failure) is programmed later with the same certificate and license, without a second count.

Invariant S7 (this state cannot be silently forgotten) needs a witness outside the file: the
quota mark in the programmer token (:mod:`securethread.programmer.quota_mark`).  Every job
has a random ``store_id``; :meth:`reserve` asks the mark keeper to move the mark before the
reservations pass the limit the mark covers, inside the write transaction.

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

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job        BLOB PRIMARY KEY,      -- the job identity (formats.job.job_hash)
    job_id     TEXT NOT NULL,
    quota      INTEGER NOT NULL CHECK (quota > 0),
    reserved   INTEGER NOT NULL DEFAULT 0 CHECK (reserved <= quota),  -- slots ever handed out
    committed  INTEGER NOT NULL DEFAULT 0,  -- provisioned records
    store_id   BLOB NOT NULL,         -- random; also in the token's quota mark (S7)
    mark_limit INTEGER NOT NULL DEFAULT 0,  -- reservations the token's quota mark covers
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

    @property
    def used(self) -> int:
        """Slots counted against the quota (committed, or reserved and not given back)."""
        return self.reserved - self.free


class MarkKeeper(Protocol):
    """Keeps a durable witness of the store's counts outside it (S7)."""

    def advance(self, state: StoreState, upto: int) -> int:
        """Record ``state`` durably and cover reservations up to ``upto`` slots; return the
        new limit (at least ``upto``).  Called inside the store's write transaction."""
        ...


@attrs.frozen
class Unguarded:
    """No witness outside the store: a deleted store is not detected (S7 does not hold).

    An explicit, named choice for unit tests and benchmarks of the store alone; production
    code (the runner, ``open_store``) always passes a
    :class:`~securethread.programmer.quota_mark.QuotaMark`.
    """

    def advance(self, state: StoreState, upto: int) -> int:
        return state.quota


UNGUARDED = Unguarded()


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

    def begin_run(self, job: bytes, *, guard: MarkKeeper) -> int: ...

    def reserve(
        self, job: bytes, n: int, *, guard: MarkKeeper, run: bytes = b""
    ) -> list[int]: ...

    def give_back(self, job: bytes, slots: Sequence[int], *, run: bytes = b"") -> None: ...

    def counts(self, job: bytes) -> tuple[int, int]: ...

    def known_devices(self, job: bytes, kind: str, device_ids: Sequence[str]) -> set[str]: ...

    def unprogrammed(self, job: bytes, device_ids: Sequence[str]) -> dict[str, Release]: ...

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

    def close_job(self, job: bytes, sign: ledger.CloseSigner) -> bytes: ...

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
        for a damaged file or one whose counts disagree with its records."""
        p = Path(path).resolve()
        if not p.is_file():
            return None
        # Without a -wal file the database file is all there is: read it as immutable, so
        # that not even SQLite's -shm/-wal side files appear (https://sqlite.org/uri.html).
        wal = Path(str(p) + "-wal").exists()
        query = "?mode=ro" if wal else "?mode=ro&immutable=1"
        try:
            db = sqlite3.connect(
                p.as_uri() + query, uri=True, isolation_level=None, timeout=busy_timeout_s
            )
        except sqlite3.Error as exc:
            raise _translate(p, "read it", exc, busy_timeout_s) from None
        try:
            tables = _tables(db)
            if not tables:
                return None
            if "jobs" not in tables:
                raise StoreCorruptError(
                    f"{str(p)!r} is an SQLite database but not a production store"
                )
            state = _read_state(db, job)
            if state is None:
                return None
            counted = db.execute(
                "SELECT COUNT(*) FROM records WHERE job = ? AND kind = ?",
                (job, ledger.KIND_PROVISIONED),
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

    def begin_run(self, job: bytes, *, guard: MarkKeeper) -> int:
        """Start a run (the caller holds the job's run lock): slots reserved by runs that
        died go back to the free pool, and the quota mark is brought up to date.  Returns
        how many slots were reclaimed."""
        with self._write("start a run") as db:
            self._refuse_closed(job)
            reclaimed = db.execute(
                "INSERT INTO free_slots (job, slot) SELECT job, slot FROM reservations"
                " WHERE job = ?",
                (job,),
            ).rowcount
            db.execute("DELETE FROM reservations WHERE job = ?", (job,))
            state = _read_state(db, job)
            if state is None:
                raise JobError("job is not open in this store")
            limit = guard.advance(state, state.reserved)
            db.execute("UPDATE jobs SET mark_limit = ? WHERE job = ?", (limit, job))
        return reclaimed

    def sync_mark(self, job: bytes, *, guard: MarkKeeper) -> None:
        """Bring the quota mark up to the store's counts (when a job is opened, a run ends)."""
        with self._write("update the quota mark") as db:
            state = _read_state(db, job)
            if state is None:
                raise JobError("job is not open in this store")
            limit = guard.advance(state, state.reserved)
            db.execute("UPDATE jobs SET mark_limit = ? WHERE job = ?", (limit, job))

    def reserve(
        self, job: bytes, n: int, *, guard: MarkKeeper, run: bytes = b""
    ) -> list[int]:
        """Durably count up to ``n`` slots against the quota for ``run`` (given-back slots
        first); raise :class:`QuotaExceededError` if none is left.  Before the reservations
        pass the limit the quota mark covers, ``guard`` moves the mark (S7)."""
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
            fresh = max(0, min(n - len(free), state.quota - state.reserved))
            if not free and not fresh:
                raise QuotaExceededError(f"quota of {state.quota} devices is exhausted")
            high = state.reserved + fresh
            if high > state.mark_limit:
                limit = guard.advance(state, high)
                db.execute("UPDATE jobs SET mark_limit = ? WHERE job = ?", (limit, job))
            slots = free + list(range(state.reserved, high))
            db.executemany(
                "DELETE FROM free_slots WHERE job = ? AND slot = ?", [(job, s) for s in free]
            )
            db.execute("UPDATE jobs SET reserved = ? WHERE job = ?", (high, job))
            db.executemany(
                "INSERT INTO reservations (job, slot, run) VALUES (?, ?, ?)",
                [(job, s, run) for s in slots],
            )
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
            provisioned = [p for p in fresh if p.kind == ledger.KIND_PROVISIONED]
            _use_reserved(db, job, [p.slot for p in provisioned], run)
            _free_reserved(
                db, job, [p.slot for p in dups if p.kind == ledger.KIND_PROVISIONED], run
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

    def close_job(self, job: bytes, sign: ledger.CloseSigner) -> bytes:
        """Close the job's ledger: ``sign`` (see :func:`ledger.close_signer`) signs the totals
        inside the transaction that marks the job closed, so no record can slip in between.
        Idempotent: a closed job returns its existing close record."""
        with self._errors("close the job"):
            return self._close_job(job, sign)

    def _close_job(self, job: bytes, sign: ledger.CloseSigner) -> bytes:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            done = db.execute("SELECT envelope FROM closes WHERE job = ?", (job,)).fetchone()
            if done is not None:
                db.execute("COMMIT")
                return bytes(done[0])
            row = db.execute("SELECT quota, reserved FROM jobs WHERE job = ?", (job,)).fetchone()
            if row is None:
                raise JobError("job is not open in this store")
            quota, reserved = row
            (free,) = db.execute(
                "SELECT COUNT(*) FROM free_slots WHERE job = ?", (job,)
            ).fetchone()
            n, prov, head = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(kind = ?), 0),"
                " (SELECT hash FROM records WHERE job = ? ORDER BY seq DESC LIMIT 1)"
                " FROM records WHERE job = ?",
                (ledger.KIND_PROVISIONED, job, job),
            ).fetchone()
            totals = ledger.LedgerTotals(
                records=n,
                provisioned=prov,
                programmed=n - prov,
                head=job if head is None else bytes(head),
                quota=quota,
                quota_used=reserved - free,
            )
            envelope = sign(totals)
            db.execute("INSERT INTO closes (job, envelope) VALUES (?, ?)", (job, envelope))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return envelope

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
        "SELECT job_id, store_id, quota, reserved, committed, mark_limit,"
        " (SELECT COUNT(*) FROM free_slots WHERE job = ?) FROM jobs WHERE job = ?",
        (job, job),
    ).fetchone()
    if row is None:
        return None
    job_id, store_id, quota, reserved, committed, mark_limit, free = row
    return StoreState(
        job=job,
        job_id=str(job_id),
        store_id=bytes(store_id),
        quota=int(quota),
        reserved=int(reserved),
        free=int(free),
        committed=int(committed),
        mark_limit=int(mark_limit),
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
