"""What reconciliation remembers per device, kept on disk so memory does not grow with the
job: a temporary SQLite file, one row per provisioned device.

Reconciliation must know, for every later record, whether a device id, a chip key or a
serial was seen before, and a programmed record needs its device's slot and certified key
(the boot confirmation verifies under it).  In Python objects that was ~2.9 KB per device
(3 GB for a 1,000,000-device job); here it is a row in a table whose uniqueness constraints
answer the duplicate questions, with SQLite's page cache capped (``cache_size``), so the
process's memory is the same for 100,000 and 1,000,000 devices.

A device's serial encodes (job, slot) and reconciliation checks that it encodes this job
and the record's slot, so "serial seen twice" is "slot seen twice": the slot column is
unique.  The file is scratch: no journal, no fsync, deleted on :meth:`close` (and by the OS
with its directory if the process dies).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile

__all__ = ["SeenDevices"]


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

    def _has(self, column: str, value: object) -> bool:
        q = f"SELECT 1 FROM seen WHERE {column} = ?"  # noqa: S608 - our three column names
        return self._db.execute(q, (value,)).fetchone() is not None

    def has_device(self, device_id: str) -> bool:
        return self._has("device_id", device_id)

    def has_point(self, point: bytes) -> bool:
        return self._has("point", point)

    def has_slot(self, slot: int) -> bool:
        return self._has("slot", slot)

    def add(self, device_id: str, slot: int, point: bytes) -> None:
        """Remember a provisioned device (the caller checked it is new in all three)."""
        self._db.execute(
            "INSERT INTO seen (device_id, slot, point) VALUES (?, ?, ?)", (device_id, slot, point)
        )

    def provisioned(self, device_id: str) -> tuple[int, bytes, bool] | None:
        """(slot, key point, programmed) of a device seen provisioned, else None."""
        row = self._db.execute(
            "SELECT slot, point, programmed FROM seen WHERE device_id = ?", (device_id,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]), bool(row[2]))

    def mark_programmed(self, device_id: str) -> None:
        self._db.execute("UPDATE seen SET programmed = 1 WHERE device_id = ?", (device_id,))

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> SeenDevices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
