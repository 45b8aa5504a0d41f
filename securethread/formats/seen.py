"""What reconciliation remembers per device, kept on disk so memory does not grow with the
job: a temporary SQLite file, one row per provisioned device.

Reconciliation must know, for every later record, whether a device id, a chip key or a
serial was seen before, and a programmed record needs its device's slot and certified key
(the boot confirmation verifies under it).  In Python objects that was ~2.9 KB per device
(3 GB for a 1,000,000-device job); here it is a row in a table whose uniqueness constraints
back the duplicate checks, with SQLite's page cache capped (``cache_size``), so the
process's memory is the same for 100,000 and 1,000,000 devices.

A device's serial encodes (job, slot) and reconciliation checks that it encodes this job
and the record's slot, so "serial seen twice" is "slot seen twice": the slot column is
unique.  The file is scratch: no journal, no fsync, deleted on :meth:`close` (and by the OS
with its directory if the process dies).

Speed (six statements per device cost ~40 us): new devices and programmed marks are kept
in memory for at most :data:`BATCH` devices and written with one ``executemany`` each;
the batch written last stays in memory too (a device's programmed record usually follows
its provisioned one closely).  Questions about older devices go to a fixed-size Bloom
filter per column first (:class:`_Filter`: no false "no"; a "maybe" asks the table), so an
honest ledger asks SQLite almost nothing.  Memory: two batches and the filters' 6 MiB,
whatever the job's size; past a few million devices the filters say "maybe" more often and
the table answers (slower, never wrong).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile

__all__ = ["BATCH", "SeenDevices"]

#: Devices (and programmed marks) kept in memory before one write to the table.
BATCH = 4096


class _Filter:
    """A Bloom filter of one column's values: ``maybe`` is False only for a value never
    added.  Two bit positions per value from Python's hash (SipHash for str and bytes,
    randomised per process: an attacker cannot choose values that collide; an int is its own
    hash, so slots below 2**24 fill a plain bitmap), 2**24 bits: about 1.3 % of answers are
    a false "maybe" at 1,000,000 values."""

    BITS = 1 << 24
    MASK = BITS - 1

    def __init__(self) -> None:
        self._bits = bytearray(self.BITS >> 3)

    def add(self, value: object) -> None:
        h, bits = hash(value), self._bits
        a, b = h & self.MASK, (h >> 32) & self.MASK
        bits[a >> 3] |= 1 << (a & 7)
        bits[b >> 3] |= 1 << (b & 7)

    def maybe(self, value: object) -> bool:
        h, bits = hash(value), self._bits
        a, b = h & self.MASK, (h >> 32) & self.MASK
        return bool(bits[a >> 3] >> (a & 7) & 1 and bits[b >> 3] >> (b & 7) & 1)


class SeenDevices:
    """Device id -> (slot, key point, programmed), with unique slots and key points."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="st-reconcile-", dir=directory)
        self._db = sqlite3.connect(os.path.join(self._dir.name, "seen.sqlite"))
        for pragma in (
            "journal_mode=OFF",  # scratch: a crash needs no recovery, the file is thrown away
            "synchronous=OFF",
            "cache_size=-8192",  # 8 MiB of pages, whatever the job's size
            "temp_store=FILE",
        ):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(
            "CREATE TABLE seen (device_id TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE,"
            " point BLOB NOT NULL UNIQUE, programmed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        self._db.execute("BEGIN")  # one transaction: nothing is ever committed to disk
        self._filters = {c: _Filter() for c in ("device_id", "slot", "point")}
        # not yet in the table: device -> (slot, point); their slots and points
        self._new: dict[str, tuple[int, bytes]] = {}
        self._new_slots: set[int] = set()
        self._new_points: set[bytes] = set()
        # in the table, written last: device -> (slot, point, programmed when written)
        self._recent: dict[str, tuple[int, bytes, bool]] = {}
        self._marks: set[str] = set()  # programmed, not yet written

    def _has(self, column: str, value: object) -> bool:
        if not self._filters[column].maybe(value):
            return False
        q = f"SELECT 1 FROM seen WHERE {column} = ?"  # noqa: S608 - our three column names
        return self._db.execute(q, (value,)).fetchone() is not None

    def has_device(self, device_id: str) -> bool:
        return (
            device_id in self._new
            or device_id in self._recent
            or self._has("device_id", device_id)
        )

    def has_point(self, point: bytes) -> bool:
        return point in self._new_points or self._has("point", point)

    def has_slot(self, slot: int) -> bool:
        return slot in self._new_slots or self._has("slot", slot)

    def add(self, device_id: str, slot: int, point: bytes) -> None:
        """Remember a provisioned device (the caller checked it is new in all three)."""
        self._new[device_id] = (slot, point)
        self._new_slots.add(slot)
        self._new_points.add(point)
        f = self._filters
        f["device_id"].add(device_id)
        f["slot"].add(slot)
        f["point"].add(point)
        if len(self._new) >= BATCH:
            self._write()

    def provisioned(self, device_id: str) -> tuple[int, bytes, bool] | None:
        """(slot, key point, programmed) of a device seen provisioned, else None."""
        marked = device_id in self._marks
        new = self._new.get(device_id)
        if new is not None:
            return new[0], new[1], marked
        recent = self._recent.get(device_id)
        if recent is not None:
            return recent[0], recent[1], recent[2] or marked
        if not self._filters["device_id"].maybe(device_id):
            return None
        row = self._db.execute(
            "SELECT slot, point, programmed FROM seen WHERE device_id = ?", (device_id,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]), bool(row[2]) or marked)

    def mark_programmed(self, device_id: str) -> None:
        """Remember that a device seen provisioned (:meth:`provisioned`) was programmed."""
        self._marks.add(device_id)
        if len(self._marks) >= BATCH:
            self._write()

    def _write(self) -> None:
        """The batch into the table (its constraints: a duplicate here is a bug of the
        caller's checks, raised as sqlite3.IntegrityError), marks included."""
        marks = self._marks
        rows = [(d, s, p, d in marks) for d, (s, p) in self._new.items()]
        self._db.executemany(
            "INSERT INTO seen (device_id, slot, point, programmed) VALUES (?, ?, ?, ?)", rows
        )
        older = [(d,) for d in marks if d not in self._new]
        self._db.executemany("UPDATE seen SET programmed = 1 WHERE device_id = ?", older)
        self._recent = {d: (s, p, m) for d, s, p, m in rows}
        for d, _s, _p, _m in rows:
            marks.discard(d)
        for (d,) in older:
            marks.discard(d)
        self._new, self._new_slots, self._new_points = {}, set(), set()

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> SeenDevices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
