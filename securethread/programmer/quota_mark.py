"""The quota mark: a witness of a job's production store, kept in the programmer token (S7).

The store (:mod:`securethread.programmer.store`) is a file anyone at the programming centre
can delete, empty, or replace with a copy; on its own a deleted store would look like a job
nobody had started, with its whole quota fresh.  So opening a job leaves a *quota mark*
beside the production-CA key: private data objects (CKO_DATA, PKCS#11 v3.0 §4.5) in the
programmer token, readable only after login, holding

    {"v": 1, "job": job identity, "job_id": ..., "store": the store's random id,
     "gen": generation, "committed": devices counted, "reserved": slots handed out,
     "limit": reservations the mark covers}

The counts are lower bounds of what the store durably holds: a mark is written inside the
store's write transaction from values the store has already committed.  Before a store is
used for an opened job it is compared with the mark (:meth:`QuotaMark.check`) and refused --
never started afresh -- if it is missing, empty or has no record of the job
(:class:`~securethread.errors.StoreMissingError`), is another store
(:class:`~securethread.errors.StoreReplacedError`: another store id), or is older than the
mark (:class:`~securethread.errors.StoreRolledBackError`: fewer devices counted or fewer
slots handed out than the mark says).

When the mark is written.  A token object costs a file write (milliseconds in SoftHSM), so
never per device: when a run starts, when the store's reservations pass the mark's
``limit`` (then the new limit is ``block`` slots further, default 256: one write per
``block`` devices), and when a run ends.  Data objects cannot be changed, so each write
creates generation ``gen + 1`` and then destroys all but the two newest; a write cut short
leaves the previous generation, still a valid lower bound.

What the mark detects: a store deleted, emptied, replaced by another store, or by a copy
taken before the last mark write.  A file replaced while a run has the store open is not
seen by that run (it goes on with the file it opened, and the mark follows that file), so
the next run refuses the replacement.  What it cannot detect: a copy taken after the last
mark write (within the current block of a run that was then killed: restoring it would
count again at most the ``block`` slots reserved since); the token and the store restored
together from one backup; a mark destroyed by someone holding the token's PIN (the store
is then adopted as it is, S7 assumes the appliance); a power cut losing the newest mark
file (SoftHSM does not fsync: the previous generation remains).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from securethread.errors import (
    FormatError,
    QuotaMarkError,
    StoreMissingError,
    StoreReplacedError,
    StoreRolledBackError,
)
from securethread.formats import cbor
from securethread.hsm.data import DataObject, create_data, destroy_data, find_data
from securethread.hsm.token import Token
from securethread.programmer.store import SQLiteStore, StoreState

APPLICATION = "securethread/quota-mark"
VERSION = 1
DEFAULT_BLOCK = 256
_KEYS = frozenset({"v", "job", "job_id", "store", "gen", "committed", "reserved", "limit"})


def mark_label(job: bytes) -> str:
    """The data objects' label: one mark per job identity."""
    return "quota-mark-" + job.hex()


def _uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


@attrs.frozen(kw_only=True)
class Mark:
    """One generation of a job's quota mark."""

    job: bytes
    job_id: str
    store_id: bytes
    generation: int
    committed: int
    reserved: int
    limit: int

    def to_bytes(self) -> bytes:
        return cbor.encode(
            {
                "v": VERSION,
                "job": self.job,
                "job_id": self.job_id,
                "store": self.store_id,
                "gen": self.generation,
                "committed": self.committed,
                "reserved": self.reserved,
                "limit": self.limit,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Mark:
        d = cbor.decode(data, what="quota mark", max_size=1024)
        if not isinstance(d, dict) or set(d) != _KEYS or d["v"] != VERSION:
            raise FormatError("quota mark: unexpected fields or version")
        if not all(_uint(d[k]) for k in ("gen", "committed", "reserved", "limit")):
            raise FormatError("quota mark: counts are not unsigned integers")
        if type(d["job"]) is not bytes or type(d["store"]) is not bytes:
            raise FormatError("quota mark: job and store ids are byte strings")
        if type(d["job_id"]) is not str:
            raise FormatError("quota mark: job id is not text")
        return cls(
            job=d["job"],
            job_id=d["job_id"],
            store_id=d["store"],
            generation=d["gen"],
            committed=d["committed"],
            reserved=d["reserved"],
            limit=d["limit"],
        )


class QuotaMark:
    """The quota mark of job ``job`` in ``token``: checks stores against it and keeps it
    ahead of the store (a :class:`~securethread.programmer.store.MarkKeeper`)."""

    def __init__(self, token: Token, job: bytes, *, block: int = DEFAULT_BLOCK) -> None:
        if type(block) is not int or block < 1:
            raise ValueError("the mark's block must be a positive number of slots")
        self._token = token
        self.job = job
        self.block = block
        self.label = mark_label(job)

    def _objects(self) -> list[tuple[DataObject, Mark | None]]:
        out: list[tuple[DataObject, Mark | None]] = []
        for obj in find_data(self._token, label=self.label, application=APPLICATION):
            mark: Mark | None = None
            if obj.value is not None:
                try:
                    mark = Mark.from_bytes(obj.value)
                except FormatError:
                    mark = None
            if mark is not None and mark.job != self.job:
                mark = None
            out.append((obj, mark))
        return out

    def read(self) -> Mark | None:
        """The newest readable generation; ``None`` if the job never left a mark here.

        Raises :class:`QuotaMarkError` if objects exist but none can be read."""
        objs = self._objects()
        marks = [m for _o, m in objs if m is not None]
        if objs and not marks:
            raise QuotaMarkError(
                f"token {self._token.name!r}: the quota mark {self.label!r} is unreadable; "
                "restore the token from its backup"
            )
        return max(marks, key=lambda m: m.generation, default=None)

    def check(self, state: StoreState | None, *, store: str) -> Mark | None:
        """Refuse a store ``state`` (``None``: no store, an empty one, or one without the
        job) that the mark says cannot be this job's store; return the mark (``None`` if
        the job left none)."""
        mark = self.read()
        if mark is not None:
            _compare(mark, state, store)
        return mark

    def advance(self, state: StoreState, upto: int) -> int:
        """Write a new generation from ``state`` covering reservations up to ``upto``
        slots (plus one block); destroy all but the two newest.  Checks ``state`` against
        the current mark first (another store, an older one: refused)."""
        objs = self._objects()
        current = max(
            (m for _o, m in objs if m is not None), key=lambda m: m.generation, default=None
        )
        if current is not None:
            _compare(current, state, "the production store")
        limit = min(state.quota, max(upto, state.reserved) + self.block)
        new = Mark(
            job=self.job,
            job_id=state.job_id,
            store_id=state.store_id,
            generation=0 if current is None else current.generation + 1,
            committed=state.committed,
            reserved=state.reserved,
            limit=max(limit, upto),
        )
        create_data(self._token, label=self.label, application=APPLICATION, value=new.to_bytes())
        for obj, mark in objs:
            if mark is None or current is None or mark.generation < current.generation:
                destroy_data(self._token, obj)
        return new.limit

    def destroy(self) -> None:
        """Remove the mark (when the job's store is retired with the job)."""
        for obj, _mark in self._objects():
            destroy_data(self._token, obj)


def _compare(mark: Mark, state: StoreState | None, store: str) -> None:
    counted = (
        f"the token's quota mark for job {mark.job_id} says {mark.committed} device(s) were "
        f"counted and {mark.reserved} slot(s) handed out in store {mark.store_id.hex()}"
    )
    restore = f"restore {store} (with its -wal file) from the backup of store {mark.store_id.hex()}"
    if state is None:
        raise StoreMissingError(
            f"{store} is missing, empty or has no record of job {mark.job_id}, but {counted}; "
            f"{restore} -- a fresh quota is never started for an opened job"
        )
    if state.store_id != mark.store_id:
        raise StoreReplacedError(
            f"{store} is store {state.store_id.hex()}, not the one job {mark.job_id} was "
            f"opened in: {counted}; {restore}"
        )
    if state.committed < mark.committed or state.reserved < mark.reserved:
        raise StoreRolledBackError(
            f"{store} is older than the token's quota mark: it has {state.committed} "
            f"device(s) counted and {state.reserved} slot(s) handed out, but {counted}; "
            f"restore the latest copy of {store} (with its -wal file)"
        )


def open_store(
    path: str | Path,
    token: Token,
    *,
    job: bytes,
    job_id: str,
    quota: int,
    signed: bytes,
    block: int = DEFAULT_BLOCK,
    busy_timeout_s: float = 60.0,
) -> tuple[SQLiteStore, QuotaMark]:
    """Open job ``job``'s store at ``path``, checked against its quota mark (S7).

    A job that left a mark needs its store as the mark knows it (else one of the
    :class:`~securethread.errors.StoreGuardError` errors, nothing changed); a job without
    one is opened in the store (created if need be) and marked now.  This is what opening
    a job and starting a run both call."""
    mark = QuotaMark(token, job, block=block)
    where = repr(str(path))
    state = SQLiteStore.inspect(path, job, busy_timeout_s=busy_timeout_s)
    existing = mark.check(state, store=where)
    store = SQLiteStore(path, create=existing is None, busy_timeout_s=busy_timeout_s)
    try:
        if existing is None:
            store.open_job(job=job, job_id=job_id, quota=quota, signed=signed)
            store.sync_mark(job, guard=mark)
    except BaseException:
        store.close()
        raise
    return store, mark


__all__ = ["APPLICATION", "DEFAULT_BLOCK", "Mark", "QuotaMark", "mark_label", "open_store"]
