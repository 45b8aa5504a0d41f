"""Durable production state: the quota count and the ledger, in one database.

Invariant S3 (quota never exceeded, even if killed at any instruction) rests on two rules:

1. slots are *reserved* (the count is incremented and committed) before any device uses
   them; a crash after the commit wastes the unused slots of the block, never adds one;
2. a device's ledger record (and the checkpoint covering it) is committed before its
   secrets are released.

The embedded default is SQLite in WAL mode with ``synchronous=FULL`` (a commit is on disk
when ``COMMIT`` returns); ``BEGIN IMMEDIATE`` takes the write lock up front so concurrent
worker processes serialise their reservations and their batch commits.  The
:class:`ProductionStore` protocol is all the pipeline uses, so a server database can be
added later.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import attrs

from securethread.errors import ConfigurationError, JobError, QuotaExceededError
from securethread.formats import ledger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job      BLOB PRIMARY KEY,      -- SHA-256 of the signed job
    job_id   TEXT NOT NULL,
    quota    INTEGER NOT NULL CHECK (quota > 0),
    reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved <= quota),
    signed   BLOB NOT NULL
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
"""

#: Signs a checkpoint over ``(upto, head)``; called inside the write transaction.
CheckpointSigner = Callable[[int, bytes], bytes]


@attrs.frozen
class Committed:
    """What a batch commit wrote, and which pending records it refused as duplicates."""

    records: list[tuple[ledger.PendingRecord, int, bytes]]  # (record, seq, raw)
    duplicates: list[ledger.PendingRecord]


class ProductionStore(Protocol):
    def open_job(self, *, job: bytes, job_id: str, quota: int, signed: bytes) -> None: ...

    def reserve(self, job: bytes, n: int) -> range: ...

    def counts(self, job: bytes) -> tuple[int, int]: ...

    def known_devices(self, job: bytes, kind: str, device_ids: Sequence[str]) -> set[str]: ...

    def commit(
        self, job: bytes, pending: Sequence[ledger.PendingRecord], sign: CheckpointSigner
    ) -> Committed: ...

    def export(self, job: bytes) -> Iterator[tuple[str, bytes]]: ...

    def close(self) -> None: ...


class SQLiteStore:
    """The embedded default :class:`ProductionStore`. One per process (not thread-shared)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open database {str(self.path)!r}: {exc}") from None
        db = self._db
        db.execute("PRAGMA busy_timeout=60000")
        # Switching to WAL and creating the schema need an exclusive lock that SQLite does not
        # wait for (no busy handler); concurrent workers opening the store retry briefly.
        for attempt in range(50):
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise ConfigurationError(
                        f"cannot open database {str(self.path)!r}: {exc}"
                    ) from None
                time.sleep(0.02 * (attempt + 1))
        # durable at COMMIT (https://sqlite.org/pragma.html#pragma_synchronous)
        db.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        self._db.close()

    def open_job(self, *, job: bytes, job_id: str, quota: int, signed: bytes) -> None:
        """Register a job (idempotent); refuse a different job body under the same hash."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT quota, job_id FROM jobs WHERE job = ?", (job,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO jobs (job, job_id, quota, signed) VALUES (?, ?, ?, ?)",
                    (job, job_id, quota, signed),
                )
            elif row != (quota, job_id):
                raise JobError(f"job {job_id} is already open with different terms")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def reserve(self, job: bytes, n: int) -> range:
        """Durably count up to ``n`` slots against the quota; raise if none is left."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT quota, reserved FROM jobs WHERE job = ?", (job,)).fetchone()
            if row is None:
                raise JobError("job is not open in this store")
            quota, reserved = row
            k = min(n, quota - reserved)
            if k <= 0:
                raise QuotaExceededError(f"quota of {quota} devices is exhausted")
            db.execute("UPDATE jobs SET reserved = ? WHERE job = ?", (reserved + k, job))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return range(reserved, reserved + k)

    def counts(self, job: bytes) -> tuple[int, int]:
        """``(quota, reserved)``."""
        row = self._db.execute("SELECT quota, reserved FROM jobs WHERE job = ?", (job,)).fetchone()
        if row is None:
            raise JobError("job is not open in this store")
        return int(row[0]), int(row[1])

    def known_devices(self, job: bytes, kind: str, device_ids: Sequence[str]) -> set[str]:
        if not device_ids:
            return set()
        marks = ",".join("?" * len(device_ids))
        rows = self._db.execute(
            f"SELECT device_id FROM records WHERE job = ? AND kind = ? AND device_id IN ({marks})",
            (job, kind, *device_ids),
        )
        return {r[0] for r in rows}

    def commit(
        self, job: bytes, pending: Sequence[ledger.PendingRecord], sign: CheckpointSigner
    ) -> Committed:
        """Append ``pending`` to the job's chain and a signed checkpoint, in one transaction.

        Records for a device (or slot) already in the ledger under the same kind are
        refused and returned as duplicates (another worker got there first).
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            by_kind: dict[str, list[str]] = {}
            for p in pending:
                by_kind.setdefault(p.kind, []).append(p.device_id)
            taken: set[tuple[str, str]] = set()
            for kind, ids in by_kind.items():
                taken |= {(kind, d) for d in self.known_devices(job, kind, ids)}
            fresh, dups, seen = [], [], set()
            for p in pending:
                key = (p.kind, p.device_id)
                if key in taken or key in seen:
                    dups.append(p)
                else:
                    seen.add(key)
                    fresh.append(p)
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
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Committed(records=[(r, seq, raw) for r, seq, raw, _ in chained], duplicates=dups)

    def export(self, job: bytes) -> Iterator[tuple[str, bytes]]:
        """Records and checkpoints in chain order (streamed, constant memory)."""
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

    def signed_job(self, job: bytes) -> bytes:
        row = self._db.execute("SELECT signed FROM jobs WHERE job = ?", (job,)).fetchone()
        if row is None:
            raise JobError("job is not open in this store")
        return bytes(row[0])
