"""The quota mark: a witness of a job's production store, kept in the programmer token (S7),
and the bound on every slot the store hands out (S3 whatever copy of the store is used).

The store (:mod:`securethread.programmer.store`) is a file anyone at the programming centre
can delete, empty, or replace with a copy; on its own a deleted store would look like a job
nobody had started, with its whole quota fresh, and a copy put back would hand out again the
slots (so the serials: docs/pki.md) that the newer file had used.  So opening a job leaves a
*quota mark* beside the production-CA key: private data objects (CKO_DATA, PKCS#11 v3.0
§4.5) in the programmer token, readable only after login, holding

    {"v": 2, "job": job identity, "job_id": ..., "store": the store's random id,
     "gen": generation, "committed": devices counted, "reserved": slots handed out,
     "limit": every slot ever handed out is below it, "clean": the last run ended cleanly,
     "head": the ledger's last record hash, "nonce": names this generation's writer}

``committed`` and ``reserved`` are lower bounds of what the store durably holds (a mark is
written inside the store's write transaction from values the store has already committed).
Before a store is used for an opened job it is compared with the mark
(:meth:`QuotaMark.check`) and refused -- never started afresh -- if it is missing, empty or
has no record of the job (:class:`~securethread.errors.StoreMissingError`), is another store
(:class:`~securethread.errors.StoreReplacedError`: another store id), or is older than the
mark (:class:`~securethread.errors.StoreRolledBackError`: fewer devices counted or fewer
slots handed out than the mark says).

A slot is never handed out twice.  ``limit`` is above every slot any copy of the store was
ever allowed to hand out.  A run ending cleanly (normal end, a SIGTERM/SIGINT drain) writes
a *clean* mark whose limit is the store's high-water mark, with its counts and ledger head;
a run starting on a store that matches a clean mark exactly (one writer, same counts, same
head: the same records, so the same used slots) may reuse its free slots and reclaim dead
runs' reservations (:meth:`QuotaMark.begin`).  Any other start -- the last run was killed,
or the store is a copy the mark cannot vouch for -- burns them: the store's high-water mark
jumps to the mark's limit, its free slots and reservations are dropped, all counted as used
(RunResult.burned, the close record's ``quota_used``).  A killed run or a restored copy
loses its batches in flight and at most one block of slots besides; it never re-counts one.
PKCS#11 has no compare-and-swap, so two runs on two copies at once are told apart after the
fact: a writer re-reads the mark after creating its generation and, if it meets another
object of its generation or a newer one, destroys its own and tries again above the other
(a store whose mark another writer moved jumps above that writer's slots,
:meth:`QuotaMark.advance`).

When the mark is written.  A token object costs a file write (about 3.8 ms in SoftHSM 2.6.1),
so never per device: when a run starts, when the store's fresh reservations pass the mark's
``limit`` (then the new limit is ``block`` slots further: one write per ``block`` devices),
and when a run ends.  ``block`` is derived from the quota (:func:`block_for`: a sixteenth
of it, at most 256): a kill burns the batches in flight and at most one block besides, and
a job of 4,096 devices or more spends about 2 % of its run in the mark
(docs/performance.md).  Data objects
cannot be changed, so each write creates generation ``gen + 1`` and then destroys all but
the two newest; a write cut short leaves the previous generation, still a valid bound.

What the mark cannot stop: the token and the store restored together from one backup (or
plain file copies of a SoftHSM token directory and the store, taken together and put back
together).  The pair is then self-consistent: the mark vouches for the old store, and the
slots handed out since are handed out again -- as often as the pair is restored; close-job
and the OEM's reconciliation of each ledger alone cannot tell.  Plain PKCS#11 on SoftHSM
cannot prevent it (its state is files the operator can copy).  What stops it in a
deployment is the appliance's state out of the operators' reach: the token directory and the
store in a state directory only the appliance's OS user can read and write, and an HSM whose
state the operators cannot copy back (a network HSM or smart card keeps its objects inside).
How the OEM sees it: two devices in the field with one job-bound serial (job tag and slot),
or a certificate in no ledger -- the OEM registry that flags them is the planned remedy.
Also out of reach: a mark destroyed by someone holding the token's PIN (the store is then
adopted as it is: S7 assumes the appliance); a power cut losing the newest mark file
(SoftHSM does not fsync: the previous generation remains, the run then burns one block).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import attrs

from securethread.errors import (
    FormatError,
    QuotaMarkError,
    StoreMissingError,
    StoreReplacedError,
    StoreRolledBackError,
)
from securethread.formats import cbor, fields
from securethread.formats.job import JOB_ID_RE
from securethread.hsm.data import DataObject, create_data, destroy_data, find_data
from securethread.hsm.token import Token
from securethread.programmer.store import Grant, SQLiteStore, StoreState

APPLICATION = "securethread/quota-mark"
VERSION = 2
MAX_BLOCK = 256
_WRITE_ATTEMPTS = 20


def mark_label(job: bytes) -> str:
    """The data objects' label: one mark per job identity."""
    return "quota-mark-" + job.hex()


def block_for(quota: int) -> int:
    """Slots per mark write for a job of ``quota`` devices: a sixteenth of the quota, at
    least 1, at most 256.  A kill burns the batches in flight and at most one block besides;
    a block of 256 keeps the mark near 2 % of a run (3.5 % at 125; docs/performance.md)."""
    return max(1, min(MAX_BLOCK, quota // 16))


_COUNT = (1 << 63) - 1  # counts fit SQLite's signed 64-bit integers


@fields.body("quota mark")
@attrs.frozen(kw_only=True)
class Mark:
    """One generation of a job's quota mark."""

    job: bytes = fields.byte_string("job", size=32)  # the job identity
    job_id: str = fields.text("job_id", max_len=64, pattern=JOB_ID_RE)
    store_id: bytes = fields.byte_string("store", max_len=64)
    generation: int = fields.integer("gen", hi=_COUNT)
    committed: int = fields.integer("committed", hi=_COUNT)
    reserved: int = fields.integer("reserved", hi=_COUNT)
    limit: int = fields.integer("limit", hi=_COUNT)
    clean: bool = fields.boolean("clean", default=False)
    head: bytes = fields.byte_string("head", max_len=64, default=b"")
    nonce: bytes = fields.byte_string("nonce", max_len=64, default=b"")
    version: int = fields.version(VERSION)

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Mark:
        return fields.decode(cls, cbor.decode(data, what="quota mark", max_size=1024))


class MarkObjects(Protocol):
    """Where the mark's generations live: private data objects of a token."""

    @property
    def name(self) -> str: ...

    def find(self, label: str) -> list[DataObject]: ...

    def create(self, label: str, value: bytes) -> DataObject: ...

    def destroy(self, obj: DataObject) -> None: ...


@attrs.frozen
class TokenObjects:
    """The mark's objects in a PKCS#11 token (:mod:`securethread.hsm.data`)."""

    token: Token

    @property
    def name(self) -> str:
        return self.token.name

    def find(self, label: str) -> list[DataObject]:
        return find_data(self.token, label=label, application=APPLICATION)

    def create(self, label: str, value: bytes) -> DataObject:
        return create_data(self.token, label=label, application=APPLICATION, value=value)

    def destroy(self, obj: DataObject) -> None:
        destroy_data(self.token, obj)


@attrs.define
class MemoryObjects:
    """The mark's objects in memory: the same rules without a token, for unit tests of the
    store's slot accounting (copies of a store meet one keeper, as they would one token)."""

    name: str = "memory"
    objects: dict[int, DataObject] = attrs.Factory(dict)
    _next: int = 0

    def find(self, label: str) -> list[DataObject]:
        return [o for o in self.objects.values() if o.label == label]

    def create(self, label: str, value: bytes) -> DataObject:
        self._next += 1
        obj = DataObject(label=label, value=value, handle=self._next)
        self.objects[self._next] = obj
        return obj

    def destroy(self, obj: DataObject) -> None:
        self.objects.pop(obj.handle, None)


@attrs.frozen
class _View:
    """The mark's objects as read at one instant: ``newest`` are the readable marks of the
    highest generation (more than one: two writers raced)."""

    objects: list[tuple[DataObject, Mark | None]]
    newest: list[Mark]

    @property
    def current(self) -> Mark | None:
        return max(self.newest, key=lambda m: (m.limit, m.nonce), default=None)

    @property
    def top(self) -> int:
        """Above every slot a writer of the newest generation may hand out."""
        return max((m.limit for m in self.newest), default=0)

    def written_by(self, nonce: bytes) -> bool:
        """The newest generation is one object, written for the store that wrote ``nonce``."""
        return len(self.newest) == 1 and bool(nonce) and self.newest[0].nonce == nonce


class QuotaMark:
    """The quota mark of job ``job`` in ``token``: checks stores against it and bounds the
    slots they hand out (a :class:`~securethread.programmer.store.MarkKeeper`)."""

    def __init__(
        self, token: Token | MarkObjects, job: bytes, *, block: int = MAX_BLOCK
    ) -> None:
        if type(block) is not int or block < 1:
            raise ValueError("the mark's block must be a positive number of slots")
        self._objects: MarkObjects = TokenObjects(token) if isinstance(token, Token) else token
        self.job = job
        self.block = block
        self.label = mark_label(job)

    def _view(self) -> _View:
        objs: list[tuple[DataObject, Mark | None]] = []
        for obj in self._objects.find(self.label):
            mark: Mark | None = None
            if obj.value is not None:
                try:
                    mark = Mark.from_bytes(obj.value)
                except FormatError:
                    mark = None
            if mark is not None and mark.job != self.job:
                mark = None
            objs.append((obj, mark))
        marks = [m for _o, m in objs if m is not None]
        if objs and not marks:
            raise QuotaMarkError(
                f"token {self._objects.name!r}: the quota mark {self.label!r} is unreadable; "
                "restore the token from its backup"
            )
        gen = max((m.generation for m in marks), default=-1)
        return _View(objs, [m for m in marks if m.generation == gen])

    def read(self) -> Mark | None:
        """The newest readable generation; ``None`` if the job never left a mark here.

        Raises :class:`QuotaMarkError` if objects exist but none can be read."""
        return self._view().current

    def check(self, state: StoreState | None, *, store: str) -> Mark | None:
        """Refuse a store ``state`` (``None``: no store, an empty one, or one without the
        job) that the mark says cannot be this job's store; return the mark (``None`` if
        the job left none)."""
        mark = self.read()
        if mark is not None:
            _compare(mark, state, store)
        return mark

    # --- the MarkKeeper protocol: called inside the store's write transaction ------------

    def begin(self, state: StoreState) -> Grant:
        """A run starts: the store reuses its free and reserved slots only if it is the one
        the newest, clean mark describes; else it starts fresh slots at the mark's limit."""

        def make(view: _View) -> tuple[bool, int, int, bool]:
            cur = view.current
            proven = cur is None or (
                len(view.newest) == 1
                and cur.clean
                and (cur.store_id, cur.committed, cur.reserved, cur.head)
                == (state.store_id, state.committed, state.reserved, state.head)
            )
            floor = state.reserved if proven else min(state.quota, max(state.reserved, view.top))
            return proven, floor, min(state.quota, floor + self.block), False

        return self._write(state, make)

    def advance(self, state: StoreState, fresh: int) -> Grant:
        """Cover ``fresh`` more slots (plus one block).  If another writer moved the mark
        since this store last did (a copy run at the same time), the store's fresh slots
        start above that writer's limit."""

        def make(view: _View) -> tuple[bool, int, int, bool]:
            mine = view.current is None or view.written_by(state.mark_nonce)
            floor = state.reserved if mine else min(state.quota, max(state.reserved, view.top))
            return False, floor, min(state.quota, floor + fresh + self.block), False

        return self._write(state, make)

    def finish(self, state: StoreState) -> Grant:
        """A run ended cleanly: if this store wrote the newest generation, a clean mark with
        its counts and head and ``limit`` = its high-water mark; else a mark that keeps the
        other writer's limit (the next run burns)."""

        def make(view: _View) -> tuple[bool, int, int, bool]:
            mine = view.current is None or view.written_by(state.mark_nonce)
            if mine:
                return True, state.reserved, state.reserved, True
            limit = max(view.top, state.mark_limit, state.reserved)
            return False, state.reserved, limit, False

        return self._write(state, make)

    def _write(
        self, state: StoreState, make: Callable[[_View], tuple[bool, int, int, bool]]
    ) -> Grant:
        """Write the next generation that ``make`` computes from the current view ->
        (reuse, floor, limit, clean), then confirm that no other writer took the same
        generation or a newer one (else undo and compute again from what it wrote)."""
        for attempt in range(_WRITE_ATTEMPTS):
            view = self._view()
            if view.current is not None:
                _compare(view.current, state, "the production store")
            reuse, floor, limit, clean = make(view)
            gen = max((m.generation + 1 for m in view.newest), default=0)
            new = Mark(
                job=self.job,
                job_id=state.job_id,
                store_id=state.store_id,
                generation=gen,
                committed=state.committed,
                reserved=state.reserved,
                limit=limit,
                clean=clean,
                head=state.head,
                nonce=os.urandom(8),
            )
            obj = self._objects.create(self.label, new.to_bytes())
            after = self._view()
            if after.newest != [new]:  # another writer has this generation or a newer one
                self._objects.destroy(obj)
                time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
                continue
            for o, m in view.objects:  # keep the two newest generations
                if m is None or m.generation < gen - 1:
                    self._objects.destroy(o)
            return Grant(floor=floor, limit=limit, nonce=new.nonce, reuse=reuse)
        raise QuotaMarkError(
            f"the quota mark of job {state.job_id} keeps changing under this run: another "
            "run of the job (on a copy of its store?) is writing it at the same time"
        )

    def destroy(self) -> None:
        """Remove the mark (when the job's store is retired with the job)."""
        for obj, _mark in self._view().objects:
            self._objects.destroy(obj)


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
    block: int | None = None,
    busy_timeout_s: float = 60.0,
) -> tuple[SQLiteStore, QuotaMark]:
    """Open job ``job``'s store at ``path``, checked (``PRAGMA quick_check``) and compared
    with its quota mark (S7); ``block`` defaults to :func:`block_for` the quota.

    A job that left a mark needs its store as the mark knows it (else one of the
    :class:`~securethread.errors.StoreGuardError` errors, nothing changed); a job without
    one is opened in the store (created if need be) and marked now.  This is what opening
    a job, starting a run and closing a job call."""
    mark = QuotaMark(token, job, block=block_for(quota) if block is None else block)
    where = repr(str(path))
    state = SQLiteStore.inspect(path, job, busy_timeout_s=busy_timeout_s)
    existing = mark.check(state, store=where)
    store = SQLiteStore(path, create=existing is None, busy_timeout_s=busy_timeout_s)
    try:
        if existing is None:
            store.open_job(job=job, job_id=job_id, quota=quota, signed=signed)
            store.end_run(job, guard=mark)
    except BaseException:
        store.close()
        raise
    return store, mark


__all__ = [
    "APPLICATION",
    "MAX_BLOCK",
    "Mark",
    "MarkObjects",
    "MemoryObjects",
    "QuotaMark",
    "TokenObjects",
    "block_for",
    "mark_label",
    "open_store",
]
