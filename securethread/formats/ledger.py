"""The production ledger (invariant S4): one record per provisioned and per programmed
device, hash-chained, authenticated by signed checkpoints, closed by a signed close
record, verifiable offline.

Records form one chain per job.  Record 0's ``prev`` is the job identity
(:func:`securethread.formats.job.job_hash`, the hash of the signed job body), so a ledger
cannot be moved to another job.  Each record is canonical CBOR with exact field types; its
hash is SHA-256 over those bytes and the next record commits to it.

Why checkpoints rather than a signature per record: the programmer commits records in
batches (group commit, one database transaction) and signs one checkpoint
``{job, upto, head}`` with its ledger key *inside the same transaction*.  A record is only
durable together with the checkpoint that covers it, and secrets are released only after
that commit, so every record a device's secrets depend on is authenticated -- at the cost
of one token signature per batch instead of one per device.

Why a close record: a checkpoint says "records 0..k end in this head", which stays true
of a ledger cut after record k.  Closing a job appends one last signed statement
``{job, records, provisioned, programmed, head, quota, quota_used}`` after which the store
accepts nothing more for the job.  :func:`verify_ledger` requires it as the last item and
requires it to match what precedes it, so a ledger cut anywhere -- after any checkpoint,
down to zero records -- and an empty ledger whose close record says otherwise are refused,
as are deleted, reordered, duplicated or altered records (the first bad record is named).
A verifier only hands out a record once the checkpoint covering it has verified.

Export format: ``STLEDGR1``, then length-prefixed items ``j`` (the signed job), ``r``
(record), ``c`` (checkpoint), and one ``e`` (the close record) last; see docs/formats.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, LedgerError, VerificationError
from securethread.formats import cbor, envelope, fields
from securethread.formats.job import DEVICE_ID_RE
from securethread.keys.ecutil import fingerprint
from securethread.keys.protocol import PrivateKey

#: Version of the close record (2: COSE_Sign1 framing, issue 21).
LEDGER_VERSION = 2
#: Version of a ledger record (3: checkpoints are COSE_Sign1, issue 21; 2: a provisioned
#: record names the chip's vendor CA, ``vendor_ca``).
RECORD_VERSION = 3
CHECKPOINT_KIND = "ledger-checkpoint"
CLOSE_KIND = "ledger-close"
EXPORT_MAGIC = b"STLEDGR1"
MAX_RECORD_SIZE = 64 << 10
MAX_ENVELOPE_SIZE = 4096
#: Most records one commit (one checkpoint) may cover; a verifier holds at most this many
#: records while it waits for the checkpoint that authenticates them.
MAX_BATCH = 10_000
KIND_PROVISIONED = "provisioned"
KIND_PROGRAMMED = "programmed"
#: A programming job counted a chip provisioned under another job and licensed it.
KIND_LICENSED = "licensed"
#: The kinds that count a device against its job's quota (a job has one of them: "licensed"
#: for a "program" job, "provisioned" otherwise); the close record's ``provisioned`` counts them.
COUNTED_KINDS = frozenset({KIND_PROVISIONED, KIND_LICENSED})
TAG_JOB, TAG_RECORD, TAG_CHECKPOINT, TAG_CLOSE = "j", "r", "c", "e"
_HASH = 32



class LedgerNotClosedError(LedgerError):
    """A ledger ends without its close record: cut short, or exported from an open run."""


class CloseRecordMismatchError(LedgerError):
    """A ledger's close record does not describe the records before it (or is malformed)."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hash(v: object) -> bool:
    return type(v) is bytes and len(v) == _HASH


@attrs.frozen(kw_only=True)
class _Record:
    """The fields every ledger record has (each kind below adds its own)."""

    job: bytes = fields.byte_string("job", size=_HASH)  # the job identity
    seq: int = fields.integer("seq")
    prev: bytes = fields.byte_string("prev", size=_HASH)  # hash of the record before
    time: int = fields.integer("time")
    slot: int = fields.integer("slot")
    device_id: str = fields.text("device_id", min_len=16, max_len=16, pattern=DEVICE_ID_RE)
    version: int = fields.version(RECORD_VERSION)


@fields.body("ledger record")
@attrs.frozen(kw_only=True)
class ProvisionedRecord(_Record):
    """A device was provisioned: its certificate, its license's digest, its vendor CA."""

    kind: str = fields.constant("kind", KIND_PROVISIONED)
    cert: bytes = fields.byte_string("cert", max_len=MAX_RECORD_SIZE)  # DER
    license_sha256: bytes = fields.byte_string("license_sha256", size=_HASH)
    vendor_ca: bytes = fields.byte_string("vendor_ca", size=_HASH)


@fields.body("ledger record")
@attrs.frozen(kw_only=True)
class ProvisionOnlyRecord(_Record):
    """A device was provisioned by a "provision" job (the silicon vendor's fab): its
    certificate and its vendor CA; no ``license_sha256`` key, since that job licenses
    nothing.  The same kind as :class:`ProvisionedRecord` (it counts the device the same
    way); :func:`parse_record` tells the two apart by their key sets, and reconciliation
    requires the body its job's stage has."""

    kind: str = fields.constant("kind", KIND_PROVISIONED)
    cert: bytes = fields.byte_string("cert", max_len=MAX_RECORD_SIZE)  # DER
    vendor_ca: bytes = fields.byte_string("vendor_ca", size=_HASH)


@fields.body("ledger record")
@attrs.frozen(kw_only=True)
class ProgrammedRecord(_Record):
    """A device was programmed: its signed boot confirmation."""

    kind: str = fields.constant("kind", KIND_PROGRAMMED)
    boot: bytes = fields.byte_string("boot", max_len=MAX_RECORD_SIZE)


@fields.body("ledger record")
@attrs.frozen(kw_only=True)
class LicensedRecord(_Record):
    """A "program" job counted a chip that was provisioned under another job and licensed
    the image to it: no certificate is issued, so the record names the chip's OEM device
    certificate by its SHA-256 (DER, as the chip showed it), the production CA that issued
    it (SHA-256 of that CA's DER certificate, one of the job's ``provisioned_by``), and the
    license's digest.  Joint reconciliation finds the certificate in the provisioning ledger."""

    kind: str = fields.constant("kind", KIND_LICENSED)
    cert_sha256: bytes = fields.byte_string("cert_sha256", size=_HASH)
    production_ca: bytes = fields.byte_string("production_ca", size=_HASH)
    license_sha256: bytes = fields.byte_string("license_sha256", size=_HASH)


_RECORD_BODIES: dict[str, type] = {
    KIND_PROVISIONED: ProvisionedRecord,
    KIND_PROGRAMMED: ProgrammedRecord,
    KIND_LICENSED: LicensedRecord,
}
#: Every record body: the verifier's one-pass check (:func:`parse_record`) tells them apart
#: by their key sets; a body left out here is still read, the long way.
_RECORD_CLASSES = (ProvisionedRecord, ProvisionOnlyRecord, ProgrammedRecord, LicensedRecord)


@attrs.frozen(kw_only=True)
class PendingRecord:
    """A record before it has a place in the chain (``seq``/``prev`` come at commit).

    ``vendor_ca`` (provisioned): the SHA-256 of the SubjectPublicKeyInfo of the silicon-vendor
    CA that certified the chip (:func:`securethread.formats.identity.vendor_ca_id`), one of
    the job's ``vendors``; reconciliation checks it against the job."""

    kind: str
    slot: int
    device_id: str
    time: int
    cert: bytes = b""  # DER device certificate (provisioned)
    #: (provisioned, licensed) empty for a "provision" job's record, which has no license:
    #: it is then a :class:`ProvisionOnlyRecord`
    license_sha256: bytes = b""
    vendor_ca: bytes = b""  # (provisioned)
    boot: bytes = b""  # the device's signed boot confirmation (programmed)
    cert_sha256: bytes = b""  # the chip's OEM device certificate's hash (licensed)
    production_ca: bytes = b""  # its production CA's certificate hash (licensed)

    def encode(self, *, job: bytes, seq: int, prev: bytes) -> bytes:
        """The record's canonical bytes at place ``seq`` after ``prev`` (validated first)."""
        rec: _Record
        if self.kind == KIND_PROVISIONED and not self.license_sha256:
            rec = ProvisionOnlyRecord(
                job=job, seq=seq, prev=prev, time=self.time, slot=self.slot,
                device_id=self.device_id, cert=self.cert, vendor_ca=self.vendor_ca,
            )  # fmt: skip
        elif self.kind == KIND_PROVISIONED:
            rec = ProvisionedRecord(
                job=job, seq=seq, prev=prev, time=self.time, slot=self.slot,
                device_id=self.device_id, cert=self.cert, license_sha256=self.license_sha256,
                vendor_ca=self.vendor_ca,
            )  # fmt: skip
        elif self.kind == KIND_LICENSED:
            rec = LicensedRecord(
                job=job, seq=seq, prev=prev, time=self.time, slot=self.slot,
                device_id=self.device_id, cert_sha256=self.cert_sha256,
                production_ca=self.production_ca, license_sha256=self.license_sha256,
            )  # fmt: skip
        else:
            rec = ProgrammedRecord(
                job=job, seq=seq, prev=prev, time=self.time, slot=self.slot,
                device_id=self.device_id, boot=self.boot,
            )  # fmt: skip
        return cbor.encode(fields.encode(rec))


class LedgerRecord:
    """A committed, chained record as read back from a ledger: its place, its bytes, their
    SHA-256 (what the next record commits to), its kind and its map, as signed.  Read-only
    by convention; a plain slotted class because a verifier makes one per record (an attrs
    instance costs four times as much to build)."""

    __slots__ = ("body", "hash", "index", "kind", "raw")

    def __init__(self, index: int, raw: bytes, body: dict[str, Any]) -> None:
        self.index = index
        self.raw = raw
        self.body = body
        self.hash = hashlib.sha256(raw).digest()
        self.kind: str = body["kind"]

    def __repr__(self) -> str:
        return f"LedgerRecord(index={self.index}, kind={self.kind!r})"

    @property
    def device_id(self) -> str:
        return str(self.body["device_id"])

    @property
    def slot(self) -> int:
        return int(self.body["slot"])

    @property
    def time(self) -> int:
        return int(self.body["time"])

    @property
    def vendor_ca(self) -> bytes:
        """The chip's vendor CA (provisioned records; empty for programmed ones)."""
        return bytes(self.body.get("vendor_ca", b""))


def _record_matcher() -> fields.Match:
    global _match_record
    if _match_record is None:
        _match_record = fields.matcher(_RECORD_CLASSES)
    return _match_record


_match_record: fields.Match | None = None


def parse_record(raw: bytes, index: int) -> LedgerRecord:
    """Decode one record and check its shape and exact field types (not its place).

    One pass for a well-formed record (:func:`cbor.decode_matching` with the record bodies'
    :func:`fields.matcher`); anything it does not accept goes the long way below, which
    names the problem."""
    hit = cbor.decode_matching(raw, _match_record or _record_matcher(), max_size=MAX_RECORD_SIZE)
    if hit is not None:
        return LedgerRecord(index, raw, hit[0])
    try:
        body = cbor.decode(raw, what=f"ledger record {index}", max_size=MAX_RECORD_SIZE)
    except FormatError as exc:
        raise LedgerError(f"ledger record {index} is malformed: {exc}", index=index) from None
    kind = body.get("kind") if isinstance(body, dict) else None
    cls = _RECORD_BODIES.get(kind) if type(kind) is str else None
    if cls is ProvisionedRecord and "license_sha256" not in body:
        cls = ProvisionOnlyRecord  # a "provision" job's record (its own strict key set)
    if cls is None:
        raise LedgerError(f"ledger record {index} has an unknown kind", index=index)
    try:
        fields.check(cls, body)  # the map is kept: readers use it as it was signed
    except FormatError as exc:
        raise LedgerError(f"ledger record {index}: {exc}", index=index) from None
    return LedgerRecord(index, raw, body)


def chain(
    pending: Iterable[PendingRecord], *, job: bytes, start_seq: int, prev: bytes
) -> list[tuple[PendingRecord, int, bytes, bytes]]:
    """Give pending records their place: ``(record, seq, raw, hash)`` each."""
    out = []
    seq = start_seq
    for rec in pending:
        raw = rec.encode(job=job, seq=seq, prev=prev)
        prev = sha256(raw)
        out.append((rec, seq, raw, prev))
        seq += 1
    if len(out) > MAX_BATCH:
        raise ValueError(f"one commit may hold at most {MAX_BATCH} ledger records")
    return out


@fields.body("ledger checkpoint")
@attrs.frozen(kw_only=True)
class Checkpoint:
    """The body of a checkpoint: "records 0..upto of job end in head" (unversioned)."""

    job: bytes = fields.byte_string("job", size=_HASH)
    upto: int = fields.integer("upto")
    head: bytes = fields.byte_string("head", size=_HASH)
    time: int = fields.integer("time")


def sign_checkpoint(key: PrivateKey, *, job: bytes, upto: int, head: bytes, time: int) -> bytes:
    """The ledger key's statement "records 0..upto of job end in head"."""
    cp = Checkpoint(job=job, upto=upto, head=head, time=time)
    return envelope.seal(CHECKPOINT_KIND, fields.encode(cp), [key])


# --- the close record ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LedgerTotals:
    """What a store knows about a job's ledger when it closes it."""

    records: int
    provisioned: int
    programmed: int
    head: bytes  # hash of the last record; the job identity if there is none
    quota: int
    quota_used: int  # slots counted against the quota (>= provisioned: a crash wastes slots)


@fields.body("ledger close record", error=CloseRecordMismatchError)
@attrs.frozen(kw_only=True)
class CloseRecord:
    """The ledger key's final statement about a job's ledger; valid once constructed."""

    job: bytes = fields.byte_string("job", size=_HASH)
    records: int = fields.integer("records")
    provisioned: int = fields.integer("provisioned")
    programmed: int = fields.integer("programmed")
    head: bytes = fields.byte_string("head", size=_HASH)
    quota: int = fields.integer("quota", lo=1)
    quota_used: int = fields.integer("quota_used")
    time: int = fields.integer("time")
    version: int = fields.version(LEDGER_VERSION)

    def __attrs_post_init__(self) -> None:
        if self.provisioned + self.programmed != self.records:
            raise CloseRecordMismatchError("ledger close record: counts do not add up")
        if not self.programmed <= self.provisioned <= self.quota_used <= self.quota:
            raise CloseRecordMismatchError(
                "ledger close record: programmed <= provisioned <= quota used <= quota fails"
            )

    @classmethod
    def of(cls, totals: LedgerTotals, *, job: bytes, time: int) -> CloseRecord:
        return cls(job=job, time=time, **attrs.asdict(totals))

    def to_obj(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> CloseRecord:
        return fields.decode(cls, obj)


def sign_close(key: PrivateKey, record: CloseRecord) -> bytes:
    """The ledger key signs the close record (an envelope of kind ``ledger-close``)."""
    return envelope.seal(CLOSE_KIND, record.to_obj(), [key])


#: Signs the close record for a store's totals, inside the store's closing transaction.
CloseSigner = Callable[[LedgerTotals], bytes]


def close_signer(key: PrivateKey, *, job: bytes, time: int) -> CloseSigner:
    """A :data:`CloseSigner` for ``SQLiteStore.close_job``: the ledger key signs the close
    record of ``job`` built from the store's totals, dated ``time``."""

    def sign(totals: LedgerTotals) -> bytes:
        return sign_close(key, CloseRecord.of(totals, job=job, time=time))

    return sign


def open_close(data: bytes, *, ledger_key: ec.EllipticCurvePublicKey) -> CloseRecord:
    """Verify a close record under the ledger key and parse it."""
    body = envelope.open_envelope(
        data, kind=CLOSE_KIND, keys=ledger_key, max_size=MAX_ENVELOPE_SIZE
    )
    return CloseRecord.from_obj(body)


# --- export format: magic, then length-prefixed items ----------------------------------------


def write_export(out: BinaryIO, job_signed: bytes, items: Iterable[tuple[str, bytes]]) -> int:
    """Write a ledger export: the signed job, then records, checkpoints and the close record
    in order (as :meth:`SQLiteStore.export` yields them)."""
    out.write(EXPORT_MAGIC)
    _write_item(out, TAG_JOB.encode(), job_signed)
    n = 0
    for tag, payload in items:
        _write_item(out, tag.encode(), payload)
        n += 1
    return n


def _write_item(out: BinaryIO, tag: bytes, payload: bytes) -> None:
    out.write(tag + struct.pack(">I", len(payload)) + payload)


def read_export(src: BinaryIO) -> tuple[bytes, Iterator[tuple[str, bytes]]]:
    """Read the header of an export; returns the signed job and a lazy item iterator."""
    if src.read(len(EXPORT_MAGIC)) != EXPORT_MAGIC:
        raise FormatError("not a securethread ledger export")
    items = _items(src)
    first = next(items, None)
    if first is None:
        raise FormatError("ledger export does not start with its job")
    return first[1], items


_ITEM_HEAD = struct.Struct(">cI")  # tag, payload length (big-endian uint32)
_TAG_NAMES = {t.encode(): t for t in (TAG_JOB, TAG_RECORD, TAG_CHECKPOINT, TAG_CLOSE)}
_FIRST_TAGS = frozenset({TAG_JOB})
_LATER_TAGS = frozenset({TAG_RECORD, TAG_CHECKPOINT, TAG_CLOSE})
_MAX_ITEM = 4 << 20
_READ_CHUNK = 64 << 10


def _items(src: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """The export's items after its magic, the job first: read in chunks of
    :data:`_READ_CHUNK` bytes (one read per few hundred records instead of two per record;
    memory stays one chunk plus one item)."""
    buf, pos, allowed = b"", 0, _FIRST_TAGS
    while True:
        if len(buf) - pos < 5:
            buf, pos = buf[pos:], 0
            while len(buf) < 5 and (more := src.read(_READ_CHUNK)):
                buf += more
            if len(buf) < 5:
                if buf:
                    raise FormatError("ledger export truncated")
                return
        raw_tag, n = _ITEM_HEAD.unpack_from(buf, pos)
        if n > _MAX_ITEM:
            raise FormatError("ledger export item too large")
        end = pos + 5 + n
        if end > len(buf):
            buf, pos, end = buf[pos:], 0, 5 + n
            while len(buf) < end:
                more = src.read(max(_READ_CHUNK, end - len(buf)))
                if not more:
                    raise FormatError("ledger export truncated")
                buf += more
        tag = _TAG_NAMES.get(raw_tag) or raw_tag.decode("ascii", "replace")
        if tag not in allowed:
            if allowed is _FIRST_TAGS:
                raise FormatError("ledger export does not start with its job")
            raise FormatError(f"ledger export: unknown item {tag!r}")
        allowed = _LATER_TAGS
        yield tag, buf[pos + 5 : end]
        pos = end


# --- offline verification --------------------------------------------------------------------


@attrs.frozen
class LedgerSummary:
    records: int
    provisioned: int
    programmed: int
    checkpoints: int
    head: bytes
    close: CloseRecord | None = None


class LedgerReader:
    """Streams a ledger export's items and hands out each record only after the signed
    checkpoint covering it has verified (constant memory but for one batch).

    :meth:`records` reads a closed ledger and raises at the end unless its close record is
    present, last and consistent; :meth:`records_so_far` is the programmer's own check of
    a run that may still be open (it proves nothing about completeness).  Consumers must
    run either to completion before trusting anything.  Afterwards ``checkpoints``,
    ``close`` and the counts describe what was read.
    """

    def __init__(self, *, job: bytes, ledger_key: ec.EllipticCurvePublicKey) -> None:
        if not _hash(job):
            raise ValueError("job must be a 32-byte job identity")
        self.job = job
        self.ledger_key = ledger_key
        self._keys = {fingerprint(ledger_key): ledger_key}  # its key id, computed once
        self.checkpoints = 0
        self.provisioned = 0
        self.programmed = 0
        self.count = 0
        self.head = job
        self.close: CloseRecord | None = None

    def records(self, items: Iterable[tuple[str, bytes]]) -> Iterator[LedgerRecord]:
        """Verified records of a closed ledger; raises if it is not closed (S4)."""
        yield from self._read(items)
        if self.close is None:
            where = f"after record {self.count - 1}" if self.count else "with no record"
            raise LedgerNotClosedError(
                f"ledger ends {where} without its signed close record "
                "(cut short, or the job was never closed)",
                index=self.count,
            )

    def records_so_far(self, items: Iterable[tuple[str, bytes]]) -> Iterator[LedgerRecord]:
        """Verified records of a ledger that may still be open (no completeness claim)."""
        yield from self._read(items)

    def _read(self, items: Iterable[tuple[str, bytes]]) -> Iterator[LedgerRecord]:
        pending: list[LedgerRecord] = []
        prev = self.job
        for tag, payload in items:
            if self.close is not None:
                raise LedgerError("ledger has items after its close record", index=self.count)
            if tag == TAG_RECORD:
                if len(pending) >= MAX_BATCH:
                    raise LedgerError(
                        f"more than {MAX_BATCH} ledger records without a checkpoint",
                        index=self.count,
                    )
                rec = self._link(payload, self.count + len(pending), prev)
                prev = rec.hash
                pending.append(rec)
            elif tag == TAG_CHECKPOINT:
                self._checkpoint(payload, self.count + len(pending) - 1, prev, fresh=bool(pending))
                for rec in pending:
                    self.count += 1
                    if rec.kind == KIND_PROGRAMMED:
                        self.programmed += 1
                    else:  # a counted kind (COUNTED_KINDS)
                        self.provisioned += 1
                    self.head = rec.hash
                    yield rec
                pending.clear()
            elif tag == TAG_CLOSE:
                if pending:
                    break  # reported below as uncovered records
                self.close = self._close(payload)
            else:
                raise LedgerError(f"ledger: unknown item {tag!r}", index=self.count)
        if pending:
            raise LedgerError(
                f"ledger records {self.count}..{self.count + len(pending) - 1} are not covered "
                "by a signed checkpoint",
                index=self.count,
            )

    def _link(self, payload: bytes, expected: int, prev: bytes) -> LedgerRecord:
        rec = parse_record(payload, expected)
        seq = rec.body["seq"]
        if seq != expected:
            what = "missing" if seq > expected else "out of order"
            raise LedgerError(
                f"ledger record {expected} is {what} (found seq {seq!r})", index=expected
            )
        if rec.body["job"] != self.job:
            raise LedgerError(f"ledger record {expected} belongs to another job", index=expected)
        if rec.body["prev"] != prev:
            bad = max(expected - 1, 0)
            raise LedgerError(
                f"ledger record {bad} does not match the hash committed by record "
                f"{expected} (altered, deleted or reordered)",
                index=bad,
            )
        return rec

    def _checkpoint(self, payload: bytes, upto: int, head: bytes, *, fresh: bool) -> None:
        where = max(upto, 0)
        try:
            body = envelope.open_envelope(
                payload, kind=CHECKPOINT_KIND, keys=self._keys, max_size=MAX_ENVELOPE_SIZE
            )
        except VerificationError as exc:
            raise LedgerError(
                f"checkpoint after record {upto} does not verify: {exc}", index=where
            ) from None
        try:
            cp = fields.decode(Checkpoint, body)
        except FormatError as exc:
            raise LedgerError(
                f"checkpoint after record {upto} is malformed: {exc}", index=where
            ) from None
        if not fresh or cp.job != self.job or cp.upto != upto:
            raise LedgerError(
                f"checkpoint after record {upto} covers another range or job", index=where
            )
        if cp.head != head:
            raise LedgerError(
                f"ledger record {upto} does not match its signed checkpoint", index=where
            )
        self.checkpoints += 1

    def _close(self, payload: bytes) -> CloseRecord:
        try:
            close = open_close(payload, ledger_key=self.ledger_key)
        except CloseRecordMismatchError:
            raise
        except VerificationError as exc:
            raise LedgerError(
                f"ledger close record does not verify: {exc}", index=self.count
            ) from None
        got = (self.job, self.count, self.provisioned, self.programmed, self.head)
        said = (close.job, close.records, close.provisioned, close.programmed, close.head)
        if said != got:
            raise CloseRecordMismatchError(
                f"ledger close record says {close.records} records ({close.provisioned} "
                f"provisioned, {close.programmed} programmed) for job {close.job.hex()[:16]}, "
                f"the ledger has {self.count} ({self.provisioned}, {self.programmed}) for "
                f"{self.job.hex()[:16]}, or another last record (cut or altered)",
                index=min(close.records, self.count),
            )
        return close

    def summary(self) -> LedgerSummary:
        return LedgerSummary(
            records=self.count,
            provisioned=self.provisioned,
            programmed=self.programmed,
            checkpoints=self.checkpoints,
            head=self.head,
            close=self.close,
        )


def iter_verified(
    items: Iterable[tuple[str, bytes]], *, job: bytes, ledger_key: ec.EllipticCurvePublicKey
) -> Iterator[LedgerRecord]:
    """Yield the records of a closed ledger, each after its checkpoint verified; raise at the
    end unless the close record is present and consistent (see :class:`LedgerReader`)."""
    return LedgerReader(job=job, ledger_key=ledger_key).records(items)


def verify_ledger(
    items: Iterable[tuple[str, bytes]], *, job: bytes, ledger_key: ec.EllipticCurvePublicKey
) -> LedgerSummary:
    """Verify a whole closed ledger offline with the ledger public key; raise
    :class:`LedgerError` naming the first bad record, :class:`LedgerNotClosedError` if it
    does not end in its close record, :class:`CloseRecordMismatchError` if that record
    describes another ledger."""
    reader = LedgerReader(job=job, ledger_key=ledger_key)
    for _rec in reader.records(items):
        pass
    return reader.summary()


def verify_open_ledger(
    items: Iterable[tuple[str, bytes]], *, job: bytes, ledger_key: ec.EllipticCurvePublicKey
) -> LedgerSummary:
    """The programmer's check of its own ledger while the run may still be open: chain,
    checkpoints and (if present) the close record.  Says nothing about completeness: never
    use it to accept a ledger someone returned (use :func:`verify_ledger`)."""
    reader = LedgerReader(job=job, ledger_key=ledger_key)
    for _rec in reader.records_so_far(items):
        pass
    return reader.summary()
