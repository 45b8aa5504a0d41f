"""The production ledger (invariant S4): one record per provisioned and per programmed
device, hash-chained, authenticated by signed checkpoints, verifiable offline.

Records form one chain per job.  Record 0's ``prev`` is the SHA-256 of the signed job, so
a ledger cannot be moved to another job.  Each record is canonical CBOR; its hash is
SHA-256 over those bytes and the next record commits to it.

Why checkpoints rather than a signature per record: the programmer commits records in
batches (group commit, one database transaction) and signs one checkpoint
``{job, upto, head}`` with its ledger key *inside the same transaction*.  A record is only
durable together with the checkpoint that covers it, and secrets are released only after
that commit, so every record a device's secrets depend on is authenticated -- at the cost
of one token signature per batch instead of one per device.  The verifier requires that
the last record is covered by a checkpoint, so truncating the tail, deleting, reordering,
duplicating or altering any record is detected and the first bad record is named.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, LedgerError, VerificationError
from securethread.formats import cbor, envelope
from securethread.keys.protocol import PrivateKey

LEDGER_VERSION = 1
CHECKPOINT_KIND = "ledger-checkpoint"
EXPORT_MAGIC = b"STLEDGR1"
MAX_RECORD_SIZE = 64 << 10
KIND_PROVISIONED = "provisioned"
KIND_PROGRAMMED = "programmed"
_RECORD_KEYS = {
    KIND_PROVISIONED: frozenset(
        {"v", "kind", "job", "seq", "prev", "time", "slot", "device_id", "cert", "license_sha256"}
    ),
    KIND_PROGRAMMED: frozenset(
        {"v", "kind", "job", "seq", "prev", "time", "slot", "device_id", "boot"}
    ),
}


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@attrs.frozen(kw_only=True)
class PendingRecord:
    """A record before it has a place in the chain (``seq``/``prev`` come at commit)."""

    kind: str
    slot: int
    device_id: str
    time: int
    cert: bytes = b""  # DER device certificate (provisioned)
    license_sha256: bytes = b""  # (provisioned)
    boot: bytes = b""  # the device's signed boot confirmation (programmed)

    def encode(self, *, job: bytes, seq: int, prev: bytes) -> bytes:
        body: dict[str, Any] = {
            "v": LEDGER_VERSION,
            "kind": self.kind,
            "job": job,
            "seq": seq,
            "prev": prev,
            "time": self.time,
            "slot": self.slot,
            "device_id": self.device_id,
        }
        if self.kind == KIND_PROVISIONED:
            body["cert"] = self.cert
            body["license_sha256"] = self.license_sha256
        else:
            body["boot"] = self.boot
        return cbor.encode(body)


@attrs.frozen
class LedgerRecord:
    """A committed, chained record as read back from a ledger."""

    index: int
    raw: bytes
    body: dict[str, Any]

    @property
    def hash(self) -> bytes:
        return sha256(self.raw)

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def device_id(self) -> str:
        return str(self.body["device_id"])

    @property
    def slot(self) -> int:
        return int(self.body["slot"])


def parse_record(raw: bytes, index: int) -> LedgerRecord:
    try:
        body = cbor.decode(raw, what=f"ledger record {index}", max_size=MAX_RECORD_SIZE)
    except FormatError as exc:
        raise LedgerError(f"ledger record {index} is malformed: {exc}", index=index) from None
    if not isinstance(body, dict) or body.get("kind") not in _RECORD_KEYS:
        raise LedgerError(f"ledger record {index} has an unknown kind", index=index)
    if set(body) != _RECORD_KEYS[body["kind"]] or body["v"] != LEDGER_VERSION:
        raise LedgerError(f"ledger record {index} has unexpected fields", index=index)
    return LedgerRecord(index=index, raw=raw, body=body)


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
    return out


def sign_checkpoint(key: PrivateKey, *, job: bytes, upto: int, head: bytes, time: int) -> bytes:
    """The ledger key's statement "records 0..upto of job end in head"."""
    return envelope.seal(
        CHECKPOINT_KIND, {"job": job, "upto": upto, "head": head, "time": time}, [key]
    )


# --- export format: magic, then length-prefixed items ("r" record | "c" checkpoint) ----------


def write_export(out: BinaryIO, job_signed: bytes, items: Iterable[tuple[str, bytes]]) -> int:
    """Write a ledger export: the signed job, then records and checkpoints in order."""
    out.write(EXPORT_MAGIC)
    _write_item(out, b"j", job_signed)
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
    first = _read_item(src)
    if first is None or first[0] != "j":
        raise FormatError("ledger export does not start with its job")

    def items() -> Iterator[tuple[str, bytes]]:
        while (item := _read_item(src)) is not None:
            if item[0] not in ("r", "c"):
                raise FormatError(f"ledger export: unknown item {item[0]!r}")
            yield item

    return first[1], items()


def _read_item(src: BinaryIO) -> tuple[str, bytes] | None:
    head = src.read(5)
    if not head:
        return None
    if len(head) < 5:
        raise FormatError("ledger export truncated")
    (n,) = struct.unpack(">I", head[1:])
    if n > 4 << 20:
        raise FormatError("ledger export item too large")
    payload = src.read(n)
    if len(payload) != n:
        raise FormatError("ledger export truncated")
    return head[:1].decode("ascii", "replace"), payload


# --- offline verification --------------------------------------------------------------------


@attrs.frozen
class LedgerSummary:
    records: int
    provisioned: int
    programmed: int
    checkpoints: int
    head: bytes


def iter_verified(
    items: Iterable[tuple[str, bytes]], *, job: bytes, ledger_key: ec.EllipticCurvePublicKey
) -> Iterator[LedgerRecord]:
    """Yield records of a ledger in order, verifying chain and checkpoints as it goes.

    Constant memory: nothing but the running head is kept.  A record is yielded before
    the checkpoint covering it is seen; the generator raises at the end if any record is
    left uncovered, so consumers must run it to completion before trusting the result.
    """
    prev = job
    expected = 0
    covered = -1
    for tag, payload in items:
        if tag == "r":
            rec = parse_record(payload, expected)
            body = rec.body
            seq = body["seq"]
            if seq != expected:
                what = "missing" if isinstance(seq, int) and seq > expected else "out of order"
                raise LedgerError(
                    f"ledger record {expected} is {what} (found seq {seq!r})", index=expected
                )
            if body["job"] != job:
                raise LedgerError(
                    f"ledger record {expected} belongs to another job", index=expected
                )
            if body["prev"] != prev:
                bad = max(expected - 1, 0)
                raise LedgerError(
                    f"ledger record {bad} does not match the hash committed by record "
                    f"{expected} (altered, deleted or reordered)",
                    index=bad,
                )
            prev = sha256(payload)
            expected += 1
            yield rec
        else:
            try:
                cp = envelope.open_envelope(payload, kind=CHECKPOINT_KIND, keys=ledger_key)
            except VerificationError as exc:
                raise LedgerError(
                    f"checkpoint after record {expected - 1} does not verify: {exc}",
                    index=max(expected - 1, 0),
                ) from None
            if cp.get("job") != job or cp.get("upto") != expected - 1:
                raise LedgerError(
                    f"checkpoint after record {expected - 1} covers another range or job",
                    index=max(expected - 1, 0),
                )
            if cp.get("head") != prev:
                raise LedgerError(
                    f"ledger record {expected - 1} does not match its signed checkpoint",
                    index=expected - 1,
                )
            covered = expected - 1
    if covered != expected - 1:
        raise LedgerError(
            f"ledger records {covered + 1}..{expected - 1} are not covered by a signed checkpoint",
            index=covered + 1,
        )


def verify_ledger(
    items: Iterable[tuple[str, bytes]], *, job: bytes, ledger_key: ec.EllipticCurvePublicKey
) -> LedgerSummary:
    """Verify a whole ledger offline with the ledger public key; raise :class:`LedgerError`
    naming the first bad record."""
    n = prov = prog = 0
    checkpoints = 0

    def counting(it: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        nonlocal checkpoints
        for item in it:
            if item[0] == "c":
                checkpoints += 1
            yield item

    head = job
    for rec in iter_verified(counting(items), job=job, ledger_key=ledger_key):
        n += 1
        if rec.kind == KIND_PROVISIONED:
            prov += 1
        else:
            prog += 1
        head = rec.hash
    return LedgerSummary(
        records=n, provisioned=prov, programmed=prog, checkpoints=checkpoints, head=head
    )
