"""Ceremony transcripts: an append-only, hash-chained, signed record of every key ceremony.

Each enclave (OEM, programmer) keeps one transcript file.  Every record says which
operation ran, which keys (label, CKA_ID, SPKI fingerprint, creation attributes), which
certificates and which artefacts (by SHA-256) it involved, and when.  Records are chained
(each carries the SHA-256 of the previous record's canonical CBOR) and signed in the token
by the enclave's transcript key, so an auditor with only the public key can verify the
whole ceremony offline with :func:`verify_transcript`.

File layout (see docs/transcript.md)::

    MAGIC || frame_0 || frame_1 || ...
    frame = uint32 big-endian length || COSE_Sign1 (tag 18, RFC 9052 §4.2) of kind
            "ceremony-record": payload = record, kid = SHA-256 of the key's SPKI

``record`` is the canonical CBOR of a :class:`CeremonyRecord`; the signature is ES256/ES384
r||s over the COSE Sig_structure whose protected header names the kind (content type
``application/securethread-ceremony-record+cbor``: domain-separated from every other
signed artefact); see :mod:`securethread.formats.envelope`.  Bootstrapping: the signing
key must exist before the first record, so record 0 (``token-init``) is written right
after that key is generated and names it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    ConfigurationError,
    Error,
    FormatError,
    KeyPolicyError,
    SignatureError,
    TranscriptError,
)
from securethread.formats import cbor, envelope, fields
from securethread.keys.ecutil import fingerprint
from securethread.keys.protocol import PrivateKey, SecretKey

__all__ = [
    "MAGIC",
    "OPERATIONS",
    "RECORD_VERSION",
    "CeremonyRecord",
    "CertEntry",
    "KeyEntry",
    "SignedRecord",
    "Transcript",
    "TranscriptSummary",
    "verify_transcript",
]

#: First bytes of every transcript file: identifies the file kind and format version.
MAGIC = b"securethread-transcript/2\n"
RECORD_VERSION = 2
SIGNATURE_KIND = "ceremony-record"
GENESIS = bytes(32)

#: Operations the OEM and programmer ceremonies record (others are allowed if well-formed).
OPERATIONS = frozenset(
    {
        "token-init",
        "root-ca",
        "signing-key",
        "enclave-onboarding",
        "image-mastering",
        "job-issuance",
        "key-transfer",
        "identity",
        "production-ca",
        "key-import",
        "production-run-opened",
        "production-run-closed",
    }
)

MAX_RECORD_SIZE = 64 * 1024
MAX_FRAME_SIZE = MAX_RECORD_SIZE + 1024
MAX_ENTRIES = 64
MAX_TEXT = 1024
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,63}")
_HEADER = len(MAGIC)

AttrValue = bool | int | str | tuple[str, ...]
DetailValue = int | str


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- validators and converters ----------------------------------------------------------


def _check_text(what: str, value: object, *, limit: int = MAX_TEXT, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{what}: expected text, got {type(value).__name__}")
    if len(value) > limit:
        raise FormatError(f"{what}: longer than {limit} characters")
    if not empty and not value:
        raise FormatError(f"{what}: empty")
    return value


def _check_digest(what: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise FormatError(f"{what}: expected a 32-byte SHA-256 digest")
    return value


#: The last second RFC 3339 can write (its year has four digits, §5.6): 9999-12-31T23:59:59Z.
MAX_TIME = 253_402_300_799


def _pairs(value: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """A mapping as a sorted tuple of pairs: immutable, hashable, one order."""
    items = value.items() if isinstance(value, Mapping) else value
    out: dict[str, Any] = {}
    for k, v in items:
        if not isinstance(k, str):
            raise FormatError(f"name {k!r} is not text")
        if k in out:
            raise FormatError(f"duplicate name {k!r}")
        out[k] = tuple(v) if isinstance(v, list) else v
    return tuple(sorted(out.items()))


# --- value objects ----------------------------------------------------------------------


_ATTR_VALUE = fields.one_of(
    fields.bool_rule(),
    fields.int_rule(lo=-(1 << 64), hi=(1 << 64) - 1),
    fields.text_rule(min_len=0, max_len=256),
    fields.list_rule(fields.text_rule(min_len=0, max_len=64), max_len=MAX_ENTRIES),
)


@fields.body("key entry")
@attrs.frozen(kw_only=True)
class KeyEntry:
    """A key involved in a ceremony step; ``fingerprint`` is None for secret (AES) keys."""

    label: str = fields.text("label", min_len=0, max_len=256)
    key_id: bytes = fields.byte_string("id", max_len=256)
    fingerprint: bytes | None = fields.byte_string("fp", size=32, absent=fields.Absent.NULL)
    attributes: tuple[tuple[str, AttrValue], ...] = fields.map_of(
        "attrs", fields.text_rule(max_len=64), _ATTR_VALUE, max_len=MAX_ENTRIES, default=(),
        converter=_pairs,
    )  # fmt: skip

    @classmethod
    def from_key(
        cls, key: PrivateKey | SecretKey, *, attributes: Mapping[str, Any] | None = None
    ) -> KeyEntry:
        """Describe a backend key with its full attribute set, read from the backend.

        Every storage, key and usage attribute the token reports for the key object
        (``token``, ``private``, ``modifiable``, ``copyable``, ``destroyable``,
        ``sensitive``, ``extractable``, ``always-sensitive``, ``never-extractable``,
        ``local``, ``encrypt``, ``decrypt``, ``sign``, ``verify``, ``wrap``, ``unwrap``,
        ``derive``; docs/transcript.md) is recorded: the backend's ``policy_report()`` is
        the truth the auditor needs, so a caller-given attribute that contradicts it -- or a
        caller-given ``usage`` list other than the usages the token reports -- is refused
        rather than recorded.
        """
        report = key.policy_report()
        reported: dict[str, Any] = report.attributes()
        claimed = (attributes or {}).get("usage")
        if claimed is not None and (
            isinstance(claimed, str) or sorted(claimed) != sorted(report.usages)
        ):
            raise KeyPolicyError(
                f"key {key.label!r}: usage {claimed!r} contradicts the backend, which "
                f"reports {list(report.usages)!r}"
            )
        fp: bytes | None = None
        if isinstance(key, PrivateKey):
            fp = fingerprint(key.public_key())
            reported["curve"] = "P-" + str(key.curve.bits)
            reported["type"] = "ec"
        else:
            reported["type"] = "aes-256"
        merged = dict(attributes or {})
        for name, value in reported.items():
            if name in merged and merged[name] != value:
                raise KeyPolicyError(
                    f"key {key.label!r}: attribute {name}={merged[name]!r} contradicts the "
                    f"backend, which reports {value!r}"
                )
            merged[name] = value
        return cls(
            label=key.label, key_id=bytes(key.key_id), fingerprint=fp, attributes=_pairs(merged)
        )

    @classmethod
    def from_public_key(
        cls,
        public: ec.EllipticCurvePublicKey,
        *,
        label: str,
        key_id: bytes = b"",
        attributes: Mapping[str, Any] | None = None,
    ) -> KeyEntry:
        """Describe another enclave's key known only by its public half (e.g. onboarding)."""
        return cls(
            label=label,
            key_id=bytes(key_id),
            fingerprint=fingerprint(public),
            attributes=_pairs(attributes or {}),
        )

    def to_cbor(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_cbor(cls, m: object) -> KeyEntry:
        return fields.decode(cls, m)


@attrs.frozen
class _Serial(fields.Rule):
    """A certificate serial: an int in Python; minimal big-endian bytes on the wire, since
    RFC 5280 §4.1.2.2 serials reach 20 octets, beyond CBOR's 64-bit integers."""

    def problem(self, value: Any) -> str | None:
        if type(value) is not int or not 0 <= value < 1 << 160:
            return "must be an integer in 0..2^160-1"
        return None

    def to_cbor(self, value: Any) -> Any:
        return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")

    def from_cbor(self, raw: Any) -> Any:
        if type(raw) is not bytes or not raw or (len(raw) > 1 and raw[0] == 0):
            raise FormatError("not minimal big-endian bytes")
        return int.from_bytes(raw, "big")


@fields.body("certificate entry")
@attrs.frozen(kw_only=True)
class CertEntry:
    """A certificate involved in a ceremony step, identified by SHA-256 of its DER."""

    fingerprint: bytes = fields.byte_string("fp", size=32)
    subject: str = fields.text("subject", min_len=0, max_len=MAX_TEXT)
    issuer: str = fields.text("issuer", min_len=0, max_len=MAX_TEXT)
    serial: int = fields.custom("serial", _Serial())

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> CertEntry:
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(
            fingerprint=_sha256(der),
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial=cert.serial_number,
        )

    def to_cbor(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_cbor(cls, m: object) -> CertEntry:
        return fields.decode(cls, m)


@attrs.frozen
class _Time(fields.Rule):
    """A record time :attr:`CeremonyRecord.timestamp` can show: up to :data:`MAX_TIME`."""

    def problem(self, value: Any) -> str | None:
        if type(value) is not int or not 0 <= value <= MAX_TIME:
            return f"must be UTC seconds, not after 9999-12-31T23:59:59Z (RFC 3339 §5.6): {value!r}"
        return None


@fields.body("ceremony record")
@attrs.frozen(kw_only=True)
class CeremonyRecord:
    """One ceremony step.  ``time`` is UTC seconds since the epoch (one canonical form)."""

    seq: int = fields.integer("seq", hi=(1 << 63) - 1)
    prev: bytes = fields.byte_string("prev", size=32)  # SHA-256 of the record before
    time: int = fields.custom("time", _Time())
    enclave: str = fields.text("enclave", max_len=64)
    #: Lowercase words joined by '-' (:data:`OPERATIONS` are the ceremonies' own).
    operation: str = fields.text("op", max_len=64, pattern=_NAME_RE)
    keys: tuple[KeyEntry, ...] = fields.list_of(
        "keys", fields.body_rule(KeyEntry), max_len=MAX_ENTRIES, default=()
    )
    certificates: tuple[CertEntry, ...] = fields.list_of(
        "certs", fields.body_rule(CertEntry), max_len=MAX_ENTRIES, default=()
    )
    artefacts: tuple[tuple[str, bytes], ...] = fields.map_of(
        "artefacts", fields.text_rule(max_len=256), fields.bytes_rule(size=32),
        max_len=MAX_ENTRIES, default=(), converter=_pairs,
    )  # fmt: skip
    details: tuple[tuple[str, DetailValue], ...] = fields.map_of(
        "details", fields.text_rule(max_len=64),
        fields.one_of(fields.text_rule(min_len=0, max_len=MAX_TEXT),
                      fields.int_rule(hi=(1 << 63) - 1)),
        max_len=MAX_ENTRIES, default=(), converter=_pairs,
    )  # fmt: skip
    version: int = fields.version(RECORD_VERSION)

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> CeremonyRecord:
        m = cbor.decode(data, what="ceremony record", max_size=MAX_RECORD_SIZE)
        record = fields.decode(cls, m)
        if record.to_bytes() != bytes(data):  # one record, one byte string, one hash
            raise FormatError("ceremony record: not in canonical form")
        return record

    @property
    def hash(self) -> bytes:
        """SHA-256 over the canonical CBOR: what the next record's ``prev`` must hold."""
        return _sha256(self.to_bytes())

    @property
    def timestamp(self) -> str:
        """``time`` as an RFC 3339 UTC string, for people."""
        return datetime.fromtimestamp(self.time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (bytes as hex) for ``--json`` output."""

        def attr(v: AttrValue) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "seq": self.seq,
            "prev": self.prev.hex(),
            "hash": self.hash.hex(),
            "time": self.timestamp,
            "enclave": self.enclave,
            "operation": self.operation,
            "keys": [
                {
                    "label": k.label,
                    "id": k.key_id.hex(),
                    "fingerprint": k.fingerprint.hex() if k.fingerprint else None,
                    "attributes": {n: attr(v) for n, v in k.attributes},
                }
                for k in self.keys
            ],
            "certificates": [
                {
                    "fingerprint": c.fingerprint.hex(),
                    "subject": c.subject,
                    "issuer": c.issuer,
                    "serial": format(c.serial, "x"),
                }
                for c in self.certificates
            ],
            "artefacts": {n: d.hex() for n, d in self.artefacts},
            "details": dict(self.details),
        }


@attrs.frozen(kw_only=True)
class SignedRecord:
    """A record as stored (a COSE_Sign1): its bytes, the enclave key's r||s signature, the
    signer fingerprint (kid) and the COSE alg (ES256 -7, ES384 -35)."""

    record: bytes = attrs.field(converter=bytes)
    signature: bytes = attrs.field(converter=bytes)
    signer: bytes = attrs.field(validator=lambda _, __, v: _check_digest("signer", v))
    alg: int = -7

    @record.validator
    def _record(self, _: object, value: bytes) -> None:
        if not value or len(value) > MAX_RECORD_SIZE:
            raise FormatError(f"signed record: record of {len(value)} bytes")

    @signature.validator
    def _signature(self, _: object, value: bytes) -> None:
        if not 8 <= len(value) <= 160:
            raise FormatError(f"signed record: signature of {len(value)} bytes")

    @classmethod
    def sign(cls, record: CeremonyRecord, signer: PrivateKey) -> SignedRecord:
        body = record.to_bytes()
        public = signer.public_key()
        tbs = envelope.signed_bytes(SIGNATURE_KIND, body, public)
        return cls(
            record=body,
            signature=envelope.sign(signer, tbs),  # r||s, low-s (S6)
            signer=fingerprint(public),
            alg=envelope.algorithm(public),
        )

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> None:
        """Raise SignatureError unless ``public_key`` signed this record."""
        if self.signer != fingerprint(public_key):
            raise SignatureError("signed by another key (signer fingerprint differs)")
        if self.alg != envelope.algorithm(public_key):
            raise SignatureError("record: COSE alg does not match the transcript key")
        tbs = envelope.signed_bytes(SIGNATURE_KIND, self.record, public_key)
        envelope.verify(public_key, self.signature, tbs, what="record")  # S6: canonical r||s

    def to_bytes(self) -> bytes:
        return envelope.sign1_message(
            SIGNATURE_KIND, self.alg, self.signer, self.record, self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRecord:
        m = envelope.parse_message(data, kind=SIGNATURE_KIND, max_size=MAX_FRAME_SIZE)
        return cls(record=m.payload, signature=m.sigs[0], signer=m.kids[0], alg=m.algs[0])

    def frame(self) -> bytes:
        body = self.to_bytes()
        return len(body).to_bytes(4, "big") + body


# --- verification (pure: bytes in, summary out) -----------------------------------------


Lookup = bytes | str | ec.EllipticCurvePublicKey | x509.Certificate


@attrs.frozen
class TranscriptSummary:
    """A verified transcript: its records and where each key/certificate first appeared."""

    records: tuple[CeremonyRecord, ...]
    signer: bytes
    _first: dict[bytes, int] = attrs.field(repr=False, eq=False, hash=False)

    @property
    def enclave(self) -> str:
        return self.records[0].enclave

    @property
    def head(self) -> bytes:
        """Hash of the last record: write it down to detect later removal of tail records."""
        return self.records[-1].hash

    def find(self, what: Lookup) -> CeremonyRecord | None:
        """The record that introduced a key (SPKI fingerprint, CKA_ID or public key) or a
        certificate (DER SHA-256 or the certificate), or None."""
        index = self._first.get(_lookup_key(what))
        return None if index is None else self.records[index]

    def what_created(self, what: Lookup) -> CeremonyRecord:
        """Like :meth:`find`, but a key or certificate the transcript never mentions is an
        error: the ceremony does not account for it."""
        record = self.find(what)
        if record is None:
            shown = _lookup_key(what).hex()
            raise TranscriptError(
                f"transcript of {self.enclave!r} records no ceremony step for {shown}"
            )
        return record


def _lookup_key(what: Lookup) -> bytes:
    if isinstance(what, ec.EllipticCurvePublicKey):
        return fingerprint(what)
    if isinstance(what, x509.Certificate):
        return _sha256(what.public_bytes(serialization.Encoding.DER))
    if isinstance(what, str):
        try:
            return bytes.fromhex(what)
        except ValueError:
            raise FormatError(f"{what!r} is not a hex fingerprint or key id") from None
    if isinstance(what, bytes | bytearray):
        return bytes(what)
    raise TypeError(f"cannot look up {type(what).__name__}")


def _index(records: tuple[CeremonyRecord, ...]) -> dict[bytes, int]:
    first: dict[bytes, int] = {}
    for i, rec in enumerate(records):
        for k in rec.keys:
            if k.fingerprint is not None:
                first.setdefault(k.fingerprint, i)
            if k.key_id:
                first.setdefault(k.key_id, i)
        for c in rec.certificates:
            first.setdefault(c.fingerprint, i)
    return first


def _read(data_or_path: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(data_or_path, bytes | bytearray | memoryview):
        return bytes(data_or_path)
    try:
        return Path(data_or_path).read_bytes()
    except FileNotFoundError:
        raise TranscriptError(f"transcript {os.fspath(data_or_path)!r} does not exist") from None
    except OSError as exc:
        raise TranscriptError(f"cannot read transcript {os.fspath(data_or_path)!r}: {exc}") from exc


def _walk(
    data: bytes,
    public_key: ec.EllipticCurvePublicKey,
    *,
    start: int = 0,
    prev: CeremonyRecord | None = None,
) -> tuple[list[CeremonyRecord], int]:
    """Verify frames from ``start``; return the records and the end offset."""
    if start == 0:
        if not data.startswith(MAGIC):
            if MAGIC.startswith(data):
                raise TranscriptError("transcript is empty or its header is truncated", index=0)
            raise TranscriptError("not a securethread transcript (bad header)")
        start = _HEADER
    records: list[CeremonyRecord] = []
    pos = start
    index = 0 if prev is None else prev.seq + 1
    while pos < len(data):
        if len(data) - pos < 4:
            raise TranscriptError(f"record {index}: truncated length prefix", index=index)
        n = int.from_bytes(data[pos : pos + 4], "big")
        if not 0 < n <= MAX_FRAME_SIZE:
            raise TranscriptError(f"record {index}: impossible length {n}", index=index)
        if pos + 4 + n > len(data):
            raise TranscriptError(
                f"record {index}: truncated ({len(data) - pos - 4} of {n} bytes; partial write?)",
                index=index,
            )
        raw = data[pos + 4 : pos + 4 + n]
        try:
            signed = SignedRecord.from_bytes(raw)
            signed.verify(public_key)  # S2: authenticate before parsing the record
            record = CeremonyRecord.from_bytes(signed.record)
        except Error as exc:
            raise TranscriptError(f"record {index}: {exc}", index=index) from exc
        _check_link(record, prev, index)
        records.append(record)
        prev = record
        index += 1
        pos += 4 + n
    return records, pos


def _check_link(record: CeremonyRecord, prev: CeremonyRecord | None, index: int) -> None:
    if record.seq != index:
        raise TranscriptError(
            f"record {index}: sequence number {record.seq}, expected {index} "
            "(a record was deleted, reordered or duplicated)",
            index=index,
        )
    expected = GENESIS if prev is None else prev.hash
    if record.prev != expected:
        raise TranscriptError(f"record {index}: does not chain to the previous record", index=index)
    if prev is not None:
        if record.time < prev.time:
            raise TranscriptError(
                f"record {index}: time {record.timestamp} precedes record {prev.seq}'s "
                f"{prev.timestamp}",
                index=index,
            )
        if record.enclave != prev.enclave:
            raise TranscriptError(
                f"record {index}: enclave {record.enclave!r} in a transcript of {prev.enclave!r}",
                index=index,
            )


def verify_transcript(
    data_or_path: bytes | str | os.PathLike[str],
    *,
    public_key: ec.EllipticCurvePublicKey,
    anchor: bytes | None = None,
) -> TranscriptSummary:
    """Verify a whole transcript offline with the enclave's public key.

    Checks every signature, the hash chain, sequence numbers, non-decreasing time and a
    complete final record.  ``anchor`` (a record hash written down during the ceremony,
    e.g. :attr:`TranscriptSummary.head`) must occur in the chain: without it, removing
    records from the *end* cannot be detected.  Raises :class:`TranscriptError` whose
    ``index`` names the first bad record.
    """
    data = _read(data_or_path)
    records, _ = _walk(data, public_key)
    if not records:
        raise TranscriptError("transcript has no records", index=0)
    result = tuple(records)
    if anchor is not None and not any(r.hash == anchor for r in result):
        raise TranscriptError(
            f"anchor {anchor.hex()} is not in the chain (records removed from the end?)",
            index=len(result),
        )
    return TranscriptSummary(result, fingerprint(public_key), _index(result))


# --- the append-only file (I/O edge) ----------------------------------------------------


class Transcript:
    """An enclave's transcript file, appended to with records signed by ``signer``.

    Opening an existing file verifies it under ``signer``'s public key and continues its
    chain; a file that does not verify (including a partial final write) is refused, never
    repaired, so the evidence stays for the auditor.  Appends take an exclusive ``flock``
    and pick up records another process appended meanwhile.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        signer: PrivateKey,
        enclave: str,
        *,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.signer = signer
        self.enclave = _check_text("enclave name", enclave, limit=64, empty=False)
        self._public = signer.public_key()
        self._clock = clock or (lambda: int(time.time()))
        self._last: CeremonyRecord | None = None
        self._size = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                self._catch_up(f.fileno())

    def __repr__(self) -> str:
        return f"<Transcript {self.enclave} {self.path} next={self.next_seq}>"

    @property
    def last(self) -> CeremonyRecord | None:
        """The newest record, or None for a transcript not yet written."""
        return self._last

    @property
    def next_seq(self) -> int:
        return 0 if self._last is None else self._last.seq + 1

    def _catch_up(self, fd: int) -> None:
        """Verify what is on disk beyond what we already verified."""
        size = os.fstat(fd).st_size
        if size == self._size:
            return
        if size < self._size:
            raise TranscriptError(f"transcript {self.path} shrank from {self._size} to {size}")
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                break
            data += chunk
        if not data:
            return  # created but never written: still a new transcript
        records, end = _walk(data, self._public, start=self._size, prev=self._last)
        if self._last is None and not records:
            raise TranscriptError(f"transcript {self.path} has a header but no records", index=0)
        if records and records[-1].enclave != self.enclave:
            raise ConfigurationError(
                f"transcript {self.path} belongs to enclave {records[-1].enclave!r}, "
                f"not {self.enclave!r}"
            )
        if records:
            self._last = records[-1]
        self._size = end

    def append(
        self,
        operation: str,
        *,
        keys: Iterable[KeyEntry] = (),
        certificates: Iterable[CertEntry] = (),
        artefacts: Mapping[str, bytes] | None = None,
        details: Mapping[str, DetailValue] | None = None,
    ) -> CeremonyRecord:
        """Sign and durably append one record (written and fsynced before returning)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        created = self._size == 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._catch_up(fd)
            now = self._clock()
            if self._last is not None and now < self._last.time:
                raise ConfigurationError(
                    f"clock reads {now}, before the last transcript record ({self._last.time})"
                )
            record = CeremonyRecord(
                seq=self.next_seq,
                prev=GENESIS if self._last is None else self._last.hash,
                time=now,
                enclave=self.enclave,
                operation=operation,
                keys=tuple(keys),
                certificates=tuple(certificates),
                artefacts=_pairs(artefacts or {}),
                details=_pairs(details or {}),
            )
            frame = SignedRecord.sign(record, self.signer).frame()
            if self._size == 0:
                frame = MAGIC + frame
            _write_all(fd, frame)
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the flock
        if created:
            _fsync_dir(self.path.parent)
        self._last = record
        self._size += len(frame)
        return record

    def append_unless_last(
        self,
        operation: str,
        *,
        artefacts: Mapping[str, bytes],
        details: Mapping[str, DetailValue],
    ) -> CeremonyRecord:
        """:meth:`append`, unless the newest record is this very one -- the same operation
        over the same artefacts with the same details: a step killed after appending it and
        before it marked itself done, run again, records itself once, not twice.  (If another
        record came in between, the step's record is written again: a second record, never a
        missing one.)"""
        last = self._last
        if (last is not None and last.operation == operation
                and last.artefacts == _pairs(artefacts) and last.details == _pairs(details)):
            return last  # fmt: skip
        return self.append(operation, artefacts=artefacts, details=details)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    """Make a new file's directory entry durable (POSIX: fsync the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
