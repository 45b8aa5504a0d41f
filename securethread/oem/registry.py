"""The OEM's device registry: every device of every ledger it reconciled, for the field.

``securethread oem registry ingest LEDGER --job J`` stores each device of a reconciled
ledger -- job, device id, certificate serial and SHA-256, chip vendor CA, production CA,
slot, time -- in an embedded SQLite database (``<workdir>/registry.sqlite``) or, with
``--database postgresql://...``, in PostgreSQL (psycopg 3).  What it answers:

* ``check`` of a whole certificate (onboarding scripts): *known* (this exact certificate is
  in a reconciled ledger), *revoked*, *duplicate* (its serial is in a ledger with another
  certificate, or a second certificate with it was seen: a restored store, or one minted
  with the PIN) or *unknown* (in no reconciled ledger).  A certificate the production CA
  really signed (its signature verifies) but that is in no ledger is recorded as a
  *sighting*, which flags its serial from then on -- also for OCSP;
* the status of an (issuer, serial) pair, which is all an OCSP request names (RFC 6960
  §4.1.1): what :mod:`securethread.oem.ocsp` answers relying parties with.

Only a ledger that reconciled is ingested: ``oem reconcile`` records the SHA-256 of the
ledger bytes it verified (``jobs/<job>/reconciliation.json``), and ingest streams the file,
hashes what it reads and commits only if the hash is that one.  So ingest itself repeats no
signature check (reconcile did them all) and runs at database speed.

Durability: one transaction per ledger, keyed by the ledger's SHA-256 (a second ingest of
the same ledger is a no-op that says so).  A process killed anywhere leaves the ledger
wholly in or wholly out; running it again completes it.  SQLite runs in WAL mode with
``synchronous=FULL``, so readers (the OCSP responder) go on during an ingest.

Memory does not grow with the ledger: records stream in, rows leave in batches.

The registry expects a database (or SQLite file) of its own; its tables are ``meta``,
``production_cas``, ``ledgers``, ``devices``, ``revocations`` and ``sightings``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    ConfigurationError,
    Error,
    FormatError,
    LedgerError,
    StoreError,
    VerificationError,
    name_exception,
)
from securethread.formats import ledger
from securethread.formats.job import job_hash
from securethread.workdir import StepOrderError, StepResult, open_file

__all__ = [
    "DEFAULT_DATABASE",
    "CaRecord",
    "CheckResult",
    "DeviceStatus",
    "IngestReport",
    "LedgerMismatchError",
    "Registry",
    "RegistryError",
    "RegistryJob",
    "RegistryLookupError",
    "Status",
]

#: The SQLite file in the OEM's work directory when no ``--database`` is given.
DEFAULT_DATABASE = "registry.sqlite"
SCHEMA_VERSION = "1"
#: Device rows per insert batch (constant memory whatever the ledger's size).
BATCH = 5000
_PG_PREFIXES = ("postgresql://", "postgres://")


class RegistryError(StoreError):
    """The device registry's database cannot be used (unreachable, damaged, another
    schema, or a query failed)."""


class RegistryLookupError(ConfigurationError):
    """What the caller named is not in the registry (a serial, a device, a job)."""


class LedgerMismatchError(LedgerError):
    """The ledger given to ingest is not the ledger the OEM reconciled."""


class Status(enum.Enum):
    """A certificate's standing in the registry (``registry check``)."""

    KNOWN = "known"
    REVOKED = "revoked"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


@attrs.frozen
class RegistryJob:
    """What ingest needs to know about a reconciled job: its id and identity, its production
    CA, and the ledger key whose close record ends the ledger."""

    job_id: str
    job_sha256: bytes
    production_ca: x509.Certificate
    ledger_key: ec.EllipticCurvePublicKey


@attrs.frozen
class IngestReport:
    job_id: str
    ledger_sha256: str
    ingested: bool  # False: this ledger was in the registry already (nothing changed)
    devices: int
    records: int
    programmed: int
    duplicate_serials: int
    duplicates: tuple[str, ...]  # the first few serials seen twice (hex)
    revocations: int  # revocation entries applied from CRLs

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False) | {"duplicates": list(self.duplicates)}


@attrs.frozen
class CaRecord:
    """A production CA the registry knows (one per job)."""

    ca_id: int
    pca_sha256: bytes
    job_id: str
    certificate: x509.Certificate
    revoked_at: int | None
    revoked_reason: str | None


@attrs.frozen
class DeviceStatus:
    """What the registry says about (production CA, serial): OCSP's question.

    ``state``: ``good``, ``revoked``, ``duplicate`` (two certificates with one serial) or
    ``not-issued`` (in no reconciled ledger).  ``at``/``reason`` date a revocation or when
    the duplicate was flagged."""

    state: str
    at: int | None = None
    reason: str | None = None


@attrs.frozen
class CheckResult:
    status: Status
    serial: str
    cert_sha256: str
    job_id: str | None = None
    device_id: str | None = None
    production_ca: str | None = None
    vendor_ca: str | None = None
    revoked_at: int | None = None
    revocation_reason: str | None = None
    off_ledger: bool = False  # signed by the production CA, in no reconciled ledger
    certificates_with_serial: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False) | {"status": self.status.value}

    def human(self) -> str:
        what = {
            Status.KNOWN: "known: in a reconciled ledger",
            Status.REVOKED: f"revoked ({self.revocation_reason})",
            Status.DUPLICATE: (
                f"duplicate: {self.certificates_with_serial} certificates carry serial "
                f"{self.serial}"
            ),
            Status.UNKNOWN: "unknown: in no reconciled ledger"
            + (" (signed by the job's production CA: minted off the ledger)" if self.off_ledger
               else ""),
        }[self.status]  # fmt: skip
        job = f"job {self.job_id}, device {self.device_id}" if self.device_id else (
            f"job {self.job_id}" if self.job_id else "no job of this OEM"
        )  # fmt: skip
        return f"{what}; {job}; serial {self.serial}"


# --- the database -------------------------------------------------------------------------------


_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS production_cas (
        ca_id {id},
        pca_sha256 {blob} NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        job_sha256 {blob} NOT NULL,
        subject_sha256 {blob} NOT NULL,
        der {blob} NOT NULL,
        revoked_at BIGINT,
        revoked_reason TEXT)""",
    "CREATE INDEX IF NOT EXISTS production_cas_subject ON production_cas (subject_sha256)",
    """CREATE TABLE IF NOT EXISTS ledgers (
        ledger_sha256 {blob} PRIMARY KEY,
        ca_id BIGINT NOT NULL,
        job_id TEXT NOT NULL,
        head {blob},
        records BIGINT NOT NULL,
        provisioned BIGINT NOT NULL,
        programmed BIGINT NOT NULL,
        ingested_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS devices (
        ca_id BIGINT NOT NULL,
        serial TEXT NOT NULL,
        cert_sha256 {blob} NOT NULL,
        ledger_sha256 {blob} NOT NULL,
        device_id TEXT NOT NULL,
        slot BIGINT NOT NULL,
        vendor_ca {blob},
        provisioned_at BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS devices_serial ON devices (ca_id, serial)",
    """CREATE TABLE IF NOT EXISTS revocations (
        ca_id BIGINT NOT NULL,
        serial TEXT NOT NULL,
        revoked_at BIGINT NOT NULL,
        reason TEXT NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (ca_id, serial))""",
    """CREATE TABLE IF NOT EXISTS sightings (
        cert_sha256 {blob} PRIMARY KEY,
        ca_id BIGINT NOT NULL,
        serial TEXT NOT NULL,
        seen_at BIGINT NOT NULL,
        der {blob} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sightings_serial ON sightings (ca_id, serial)",
)
_DEVICE_COLUMNS = (
    "ca_id",
    "serial",
    "cert_sha256",
    "ledger_sha256",
    "device_id",
    "slot",
    "vendor_ca",
    "provisioned_at",
)


class _Database:
    """One connection, SQLite or PostgreSQL, behind the few calls the registry makes.

    SQL is written once with ``?`` placeholders; PostgreSQL gets ``%s``.  Transactions are
    explicit (``BEGIN``/``COMMIT``) on both, so the registry decides their extent.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith(_PG_PREFIXES)
        try:
            self.conn: Any = self._connect_pg(url) if self.postgres else self._connect_sqlite(url)
        except Error:
            raise
        except Exception as exc:  # sqlite3.Error, psycopg.Error, OSError
            raise RegistryError(f"cannot open the registry {self.where}: {_reason(exc)}") from None
        self.integrity: tuple[type[BaseException], ...] = (
            (self._pg().errors.UniqueViolation,) if self.postgres else (sqlite3.IntegrityError,)
        )

    @property
    def where(self) -> str:
        if self.postgres:
            return "database (PostgreSQL)"
        return f"database {self.url!r}"

    @staticmethod
    def _pg() -> Any:
        try:
            import psycopg
        except ImportError:
            raise ConfigurationError(
                "a PostgreSQL registry needs psycopg 3: pip install 'securethread[pg]'"
            ) from None
        return psycopg

    def _connect_pg(self, url: str) -> Any:
        return self._pg().connect(url, autocommit=True, connect_timeout=15)

    @staticmethod
    def _connect_sqlite(url: str) -> sqlite3.Connection:
        path = url.removeprefix("sqlite:")
        if not Path(path).parent.is_dir():
            raise ConfigurationError(f"registry database {path!r}: no such directory")
        conn = sqlite3.connect(path, isolation_level=None, timeout=60.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers go on while an ingest writes
        conn.execute("PRAGMA synchronous=FULL")  # a commit survives a crash
        conn.execute("PRAGMA cache_size=-16384")  # 16 MiB, whatever the registry's size
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.postgres else text

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self.conn.execute(self.sql(text), tuple(params))
        except self.integrity:
            raise
        except Exception as exc:
            raise RegistryError(f"registry {self.where}: {_reason(exc)}") from None

    def one(self, text: str, params: Sequence[Any] = ()) -> Any:
        return self.execute(text, params).fetchone()

    def all(self, text: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(text, params).fetchall())

    def begin(self) -> None:
        self.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except Exception:  # noqa: S110 - nothing to roll back (the connection died)
            pass

    def insert_devices(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Many device rows: ``executemany`` on SQLite, ``COPY`` on PostgreSQL."""
        try:
            if self.postgres:
                cols = ", ".join(_DEVICE_COLUMNS)
                with self.conn.cursor() as cur, cur.copy(f"COPY devices ({cols}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
            else:
                marks = ", ".join("?" * len(_DEVICE_COLUMNS))
                self.conn.executemany(
                    f"INSERT INTO devices ({', '.join(_DEVICE_COLUMNS)}) VALUES ({marks})", rows
                )
        except Exception as exc:
            raise RegistryError(f"registry {self.where}: {_reason(exc)}") from None

    def create_schema(self) -> None:
        blob = "BYTEA" if self.postgres else "BLOB"
        ident = (
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
            if self.postgres
            else "INTEGER PRIMARY KEY"
        )
        self.begin()
        try:
            for ddl in _DDL:
                self.execute(ddl.format(blob=blob, id=ident))
            self.execute(
                "INSERT INTO meta (name, value) VALUES ('schema', ?) ON CONFLICT DO NOTHING",
                (SCHEMA_VERSION,),
            )
            row = self.one("SELECT value FROM meta WHERE name = 'schema'")
            self.commit()
        except BaseException:
            self.rollback()
            raise
        if row is None or row[0] != SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.where} has schema {row and row[0]!r}, this version needs "
                f"{SCHEMA_VERSION!r}"
            )

    def close(self) -> None:
        self.conn.close()


def _reason(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class HashingReader:
    """A binary reader that hashes everything read through it (SHA-256)."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._hash.update(data)
        return data

    def digest(self) -> bytes:
        return self._hash.digest()


_PROVISIONED = ledger.KIND_PROVISIONED.encode()
#: The canonical CBOR of the key "kind" with the text value "provisioned" (RFC 8949 §3.1:
#: text heads 0x60 + length): every provisioned record holds these bytes, so a record
#: without them is of another kind and is skipped without a walk.
_PROVISIONED_PAIR = b"\x64kind" + bytes([0x60 + len(_PROVISIONED)]) + _PROVISIONED


def _provisioned_fields(raw: bytes) -> dict[bytes, Any] | None:
    """The top-level fields of a provisioned ledger record, by key (bytes), or None for any
    other kind, read straight off its canonical CBOR (RFC 8949 §4.2.1): a map of short text
    keys to unsigned integers and byte or text strings (text values stay bytes here).

    Ingest reads only ledgers whose bytes reconcile verified, which its own decoder checked
    strictly; this walk refuses anything that is not such a map (a
    :class:`~securethread.errors.FormatError`) and costs a fraction of a full decode.
    """
    try:
        ib = raw[0]
        if ib >> 5 != 5 or ib & 0x1F >= 24:
            raise FormatError("ledger record: not a small map")
        pos = 1
        out: dict[bytes, Any] = {}
        for _ in range(ib & 0x1F):
            kb = raw[pos]
            if kb >> 5 != 3 or kb & 0x1F >= 24:
                raise FormatError("ledger record: not a short text key")
            key = raw[pos + 1 : pos + 1 + (kb & 0x1F)]
            pos += 1 + (kb & 0x1F)
            vb = raw[pos]
            info = vb & 0x1F
            if info < 24:
                arg, pos = info, pos + 1
            elif info == 24:
                arg, pos = raw[pos + 1], pos + 2
            elif info == 25:
                arg, pos = (raw[pos + 1] << 8) | raw[pos + 2], pos + 3
            elif info in (26, 27):
                size = 4 if info == 26 else 8
                arg, pos = int.from_bytes(raw[pos + 1 : pos + 1 + size], "big"), pos + 1 + size
            else:
                raise FormatError("ledger record: indefinite length")
            major = vb >> 5
            if major == 0:
                out[key] = arg
            elif major == 2 or major == 3:
                out[key] = raw[pos : pos + arg]
                pos += arg
            else:
                raise FormatError("ledger record: unexpected value type")
            if key == b"kind" and out[key] != _PROVISIONED:
                return None
    except IndexError:
        raise FormatError("ledger record: truncated") from None
    if pos != len(raw) or out.get(b"kind") != _PROVISIONED:
        raise FormatError("ledger record: malformed")
    return out


def serial_text(serial: int) -> str:
    """How the registry stores a serial: lowercase hex, no leading zeros."""
    return format(serial, "x")


def _now() -> int:
    return int(time.time())


# --- the registry -------------------------------------------------------------------------------


class Registry:
    """The device registry over one database connection (not shared between threads)."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    @classmethod
    def open(cls, database: str | os.PathLike[str]) -> Registry:
        """Open (creating its tables if needed) the registry at ``database``: a SQLite file
        path, or a ``postgresql://`` URL."""
        db = _Database(os.fspath(database))
        try:
            db.create_schema()
        except BaseException:
            db.close()
            raise
        return cls(db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def postgres(self) -> bool:
        return self._db.postgres

    # --- production CAs ---------------------------------------------------------------------

    def _ca_id(self, job: str, job_sha256: bytes, pca: x509.Certificate) -> int:
        """The production CA's row (created on first sight), inside the caller's transaction."""
        der = pca.public_bytes(serialization.Encoding.DER)
        digest = hashlib.sha256(der).digest()
        row = self._db.one(
            "SELECT ca_id, job_id FROM production_cas WHERE pca_sha256 = ?", (digest,)
        )
        if row is None:
            self._db.execute(
                "INSERT INTO production_cas (pca_sha256, job_id, job_sha256, subject_sha256, der)"
                " VALUES (?, ?, ?, ?, ?)",
                (digest, job, job_sha256, _sha256(pca.subject.public_bytes()), der),
            )
            row = self._db.one(
                "SELECT ca_id, job_id FROM production_cas WHERE pca_sha256 = ?", (digest,)
            )
        if row[1] != job:
            raise RegistryError(f"the registry holds this production CA for job {row[1]!r}")
        return int(row[0])

    def production_ca(self, pca_sha256: bytes) -> CaRecord | None:
        row = self._db.one(
            "SELECT ca_id, pca_sha256, job_id, der, revoked_at, revoked_reason"
            " FROM production_cas WHERE pca_sha256 = ?",
            (pca_sha256,),
        )
        return None if row is None else _ca_record(row)

    def cas_named(self, subject: x509.Name) -> list[CaRecord]:
        rows = self._db.all(
            "SELECT ca_id, pca_sha256, job_id, der, revoked_at, revoked_reason"
            " FROM production_cas WHERE subject_sha256 = ?",
            (_sha256(subject.public_bytes()),),
        )
        return [_ca_record(r) for r in rows]

    # --- ingest ------------------------------------------------------------------------------

    def has_ledger(self, ledger_sha256: bytes) -> bool:
        row = self._db.one("SELECT 1 FROM ledgers WHERE ledger_sha256 = ?", (ledger_sha256,))
        return row is not None

    def ingest(
        self,
        src: BinaryIO,
        *,
        job: RegistryJob,
        ledger_sha256: bytes,
        crls: Sequence[tuple[bytes, x509.Certificate]] = (),
    ) -> IngestReport:
        """Ingest the reconciled ledger read from ``src`` whose bytes hash to
        ``ledger_sha256`` (what reconcile verified) in one transaction; ``crls`` are
        (CRL, issuer certificate) pairs applied in the same transaction.

        Raises :class:`LedgerMismatchError` (nothing stored) if the bytes differ or the ledger
        is not ``job``'s; a second ingest of one ledger returns ``ingested=False``.
        """
        if self.has_ledger(ledger_sha256):
            return self._already(job, ledger_sha256)
        db = self._db
        db.begin()
        try:
            ca_id = self._ca_id(job.job_id, job.job_sha256, job.production_ca)
            try:
                db.execute(
                    "INSERT INTO ledgers (ledger_sha256, ca_id, job_id, records, provisioned,"
                    " programmed, ingested_at) VALUES (?, ?, ?, 0, 0, 0, ?)",
                    (ledger_sha256, ca_id, job.job_id, _now()),
                )
            except db.integrity:  # another ingest of the same ledger committed first
                db.rollback()
                return self._already(job, ledger_sha256)
            totals = self._stream(src, job, ca_id, ledger_sha256)
            db.execute(
                "UPDATE ledgers SET head = ?, records = ?, provisioned = ?, programmed = ?"
                " WHERE ledger_sha256 = ?",
                (totals.head, totals.records, totals.provisioned, totals.programmed, ledger_sha256),
            )
            duplicates, count = self._duplicates(ca_id, ledger_sha256)
            revoked = sum(self._apply_crl(data, issuer) for data, issuer in crls)
            db.commit()
        except BaseException:
            db.rollback()
            raise
        return IngestReport(
            job_id=job.job_id,
            ledger_sha256=ledger_sha256.hex(),
            ingested=True,
            devices=totals.provisioned,
            records=totals.records,
            programmed=totals.programmed,
            duplicate_serials=count,
            duplicates=duplicates,
            revocations=revoked,
        )

    def _already(self, job: RegistryJob, ledger_sha256: bytes) -> IngestReport:
        row = self._db.one(
            "SELECT records, provisioned, programmed FROM ledgers WHERE ledger_sha256 = ?",
            (ledger_sha256,),
        )
        return IngestReport(
            job_id=job.job_id,
            ledger_sha256=ledger_sha256.hex(),
            ingested=False,
            devices=int(row[1]),
            records=int(row[0]),
            programmed=int(row[2]),
            duplicate_serials=0,
            duplicates=(),
            revocations=0,
        )

    def _stream(
        self, src: BinaryIO, job: RegistryJob, ca_id: int, ledger_sha256: bytes
    ) -> ledger.CloseRecord:
        """Insert the provisioned records' devices in batches; return the close record once
        the bytes read hash to ``ledger_sha256``.

        No signature is checked per record: the hash binds these bytes to the ledger that
        reconcile verified in full.  The close record is still verified (one signature) and
        must count what was read, which also catches a file that is not a ledger export.
        """
        hashed = HashingReader(src)
        try:
            return self._stream_records(hashed, job, ca_id, ledger_sha256)
        except LedgerMismatchError:
            raise
        except (VerificationError, ValueError, KeyError, TypeError, IndexError) as exc:
            # The reconciled ledger parsed and verified in full, so bytes that do not (a
            # flipped byte in CBOR structure, in a record's keys read without a full decode,
            # in a certificate's DER, in the close record's signature) are another file: the
            # same answer wherever the change lies, before the hash at the end could say so.
            raise LedgerMismatchError(
                f"the ledger is not the one reconciled for job {job.job_id} "
                f"({name_exception(exc)})"
            ) from exc

    def _stream_records(
        self, hashed: HashingReader, job: RegistryJob, ca_id: int, ledger_sha256: bytes
    ) -> ledger.CloseRecord:
        export_job, items = ledger.read_export(hashed)  # type: ignore[arg-type]
        if not hmac.compare_digest(job_hash(export_job), job.job_sha256):
            raise LedgerMismatchError(f"the ledger is not job {job.job_id}'s")
        rows: list[tuple[Any, ...]] = []
        records = provisioned = 0
        close: ledger.CloseRecord | None = None
        for tag, payload in items:
            if tag == ledger.TAG_RECORD:
                records += 1
                if _PROVISIONED_PAIR not in payload:
                    continue  # another kind: programmed records give the registry nothing
                body = _provisioned_fields(payload)
                if body is None:
                    continue
                provisioned += 1
                der = body[b"cert"]
                vendor = body.get(b"vendor_ca")
                rows.append(
                    (
                        ca_id,
                        serial_text(x509.load_der_x509_certificate(der).serial_number),
                        hashlib.sha256(der).digest(),
                        ledger_sha256,
                        body[b"device_id"].decode("ascii"),
                        body[b"slot"],
                        vendor if vendor else None,
                        body[b"time"],
                    )
                )
                if len(rows) >= BATCH:
                    self._db.insert_devices(rows)
                    rows.clear()
            elif tag == ledger.TAG_CLOSE:
                close = ledger.open_close(payload, ledger_key=job.ledger_key)
        if rows:
            self._db.insert_devices(rows)
        if not hmac.compare_digest(hashed.digest(), ledger_sha256):
            raise LedgerMismatchError(
                f"the ledger is not the one reconciled for job {job.job_id} (its SHA-256 "
                f"is {hashed.digest().hex()}, reconcile verified {ledger_sha256.hex()})"
            )
        if close is None or (close.records, close.provisioned) != (records, provisioned):
            raise LedgerMismatchError("the ledger's close record does not count its records")
        return close

    def _duplicates(self, ca_id: int, ledger_sha256: bytes) -> tuple[tuple[str, ...], int]:
        """Serials of this ledger that another ledger of the same production CA holds with
        another certificate (only looked for when there is another such ledger)."""
        others = self._db.one(
            "SELECT COUNT(*) FROM ledgers WHERE ca_id = ? AND ledger_sha256 <> ?",
            (ca_id, ledger_sha256),
        )
        if not others[0]:
            return (), 0
        rows = self._db.all(
            "SELECT DISTINCT d.serial FROM devices d JOIN devices e"
            " ON e.ca_id = d.ca_id AND e.serial = d.serial"
            " WHERE d.ca_id = ? AND d.ledger_sha256 = ? AND e.ledger_sha256 <> ?"
            " AND e.cert_sha256 <> d.cert_sha256 ORDER BY d.serial",
            (ca_id, ledger_sha256, ledger_sha256),
        )
        return tuple(r[0] for r in rows[:20]), len(rows)

    # --- revocation -------------------------------------------------------------------------

    def apply_crl(self, data: bytes, issuer: x509.Certificate) -> int:
        """Record the revocations of a CRL that ``issuer`` signed: a production CA's (its
        devices) or the OEM root's (production CAs, and so every device of their jobs).
        Returns how many entries were new here."""
        self._db.begin()
        try:
            n = self._apply_crl(data, issuer)
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise
        return n

    def _apply_crl(self, data: bytes, issuer: x509.Certificate) -> int:
        from securethread.pki import load_crl

        crl = load_crl(data, issuer)  # RevocationError unless issuer signed it
        n = 0
        pca = self.production_ca(_sha256(issuer.public_bytes(serialization.Encoding.DER)))
        if pca is not None:
            for entry in crl:
                n += self._revoke(pca.ca_id, entry.serial_number, _entry_time(entry),
                                  _entry_reason(entry), "crl")  # fmt: skip
            return n
        # The root's CRL: production CAs it lists are revoked (RFC 5280 §6.3: every
        # certificate below them fails).
        listed = {e.serial_number: e for e in crl}
        for ca in self.cas_issued_by(issuer):
            hit = listed.get(ca.certificate.serial_number)
            if hit is not None and ca.revoked_at is None:
                self._db.execute(
                    "UPDATE production_cas SET revoked_at = ?, revoked_reason = ? WHERE ca_id = ?",
                    (_entry_time(hit), _entry_reason(hit), ca.ca_id),
                )
                n += 1
        return n

    def cas_issued_by(self, issuer: x509.Certificate) -> Iterator[CaRecord]:
        rows = self._db.all(
            "SELECT ca_id, pca_sha256, job_id, der, revoked_at, revoked_reason FROM production_cas"
        )
        for row in rows:
            ca = _ca_record(row)
            if ca.certificate.issuer == issuer.subject:
                try:
                    ca.certificate.verify_directly_issued_by(issuer)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                yield ca

    def revoke(
        self,
        *,
        job_id: str,
        job_sha256: bytes,
        production_ca: x509.Certificate,
        serial: int | None = None,
        device_id: str | None = None,
        reason: x509.ReasonFlags = x509.ReasonFlags.unspecified,
        at: int | None = None,
    ) -> tuple[str, bool]:
        """The OEM revokes a device of a job in the registry (OCSP answers revoked from
        now); by serial or device id.  Returns (serial, newly revoked)."""
        if (serial is None) == (device_id is None):
            raise ValueError("name the device by serial or by device id")
        db = self._db
        db.begin()
        try:
            ca_id = self._ca_id(job_id, job_sha256, production_ca)
            if serial is not None:
                row = db.one(
                    "SELECT serial FROM devices WHERE ca_id = ? AND serial = ?",
                    (ca_id, serial_text(serial)),
                )
                what = f"serial {serial_text(serial)}"
            else:
                row = db.one(
                    "SELECT serial FROM devices WHERE ca_id = ? AND device_id = ?",
                    (ca_id, device_id),
                )
                what = f"device {device_id}"
            if row is None:
                raise RegistryLookupError(
                    f"no {what} of job {job_id} in the registry (ingest its ledger first)"
                )
            new = self._revoke(ca_id, int(row[0], 16), _now() if at is None else at,
                               reason.value, "oem")  # fmt: skip
            db.commit()
        except BaseException:
            db.rollback()
            raise
        return row[0], bool(new)

    def _revoke(self, ca_id: int, serial: int, at: int, reason: str, source: str) -> int:
        """One revocation (the first one of a serial stands); 1 if it is new."""
        cur = self._db.execute(
            "INSERT INTO revocations (ca_id, serial, revoked_at, reason, source)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (ca_id, serial_text(serial), at, reason, source),
        )
        return 1 if cur.rowcount == 1 else 0

    # --- questions ----------------------------------------------------------------------------

    def status(self, pca_sha256: bytes, serial: int) -> DeviceStatus:
        """The standing of (production CA, serial): what an OCSP request asks (RFC 6960
        §4.1.1 CertID names no more).  Never ``good`` for a serial in no reconciled ledger."""
        ca = self.production_ca(pca_sha256)
        if ca is None:
            return DeviceStatus("not-issued")
        if ca.revoked_at is not None:
            return DeviceStatus("revoked", ca.revoked_at, ca.revoked_reason)
        s = serial_text(serial)
        rows = self._db.all(
            "SELECT cert_sha256, provisioned_at FROM devices WHERE ca_id = ? AND serial = ?",
            (ca.ca_id, s),
        )
        if not rows:
            return DeviceStatus("not-issued")
        revoked = self._db.one(
            "SELECT revoked_at, reason FROM revocations WHERE ca_id = ? AND serial = ?",
            (ca.ca_id, s),
        )
        if revoked is not None:
            return DeviceStatus("revoked", int(revoked[0]), str(revoked[1]))
        flagged = self._flagged(ca.ca_id, s, rows)
        if flagged is not None:
            return DeviceStatus("duplicate", flagged)
        return DeviceStatus("good")

    def _flagged(self, ca_id: int, serial: str, rows: Sequence[Any]) -> int | None:
        """When the serial was flagged as duplicate (None: it is not): two certificates in
        ledgers, or a sighting of another certificate."""
        if len({bytes(r[0]) for r in rows}) > 1:
            return max(int(r[1]) for r in rows)
        seen = self._db.one(
            "SELECT MIN(seen_at) FROM sightings WHERE ca_id = ? AND serial = ?", (ca_id, serial)
        )
        return None if seen is None or seen[0] is None else int(seen[0])

    def check(self, cert: x509.Certificate, *, now: int | None = None) -> CheckResult:
        """Where a whole certificate stands (``registry check``), recording a certificate the
        production CA signed that is in no reconciled ledger (a sighting: it flags the
        serial as duplicate, for OCSP too, when a ledger holds the serial)."""
        der = cert.public_bytes(serialization.Encoding.DER)
        digest = hashlib.sha256(der).digest()
        serial = serial_text(cert.serial_number)
        base: dict[str, Any] = {"serial": serial, "cert_sha256": digest.hex()}
        for ca in self.cas_named(cert.issuer):
            rows = self._db.all(
                "SELECT cert_sha256, provisioned_at, device_id, vendor_ca FROM devices"
                " WHERE ca_id = ? AND serial = ?",
                (ca.ca_id, serial),
            )
            mine = [r for r in rows if bytes(r[0]) == digest]
            common: dict[str, Any] = base | {
                "job_id": ca.job_id,
                "production_ca": ca.pca_sha256.hex(),
            }
            if mine:
                return self._known(ca, serial, rows, mine[0], common)
            if not _signed_by(cert, ca.certificate):
                continue
            self._sighting(ca.ca_id, serial, digest, der, _now() if now is None else now)
            certs = len({bytes(r[0]) for r in rows}) + 1
            status = Status.DUPLICATE if rows else Status.UNKNOWN
            return CheckResult(status, off_ledger=True, certificates_with_serial=certs, **common)
        return CheckResult(Status.UNKNOWN, **base)

    def _known(
        self, ca: CaRecord, serial: str, rows: Sequence[Any], mine: Any, common: dict[str, Any]
    ) -> CheckResult:
        info = common | {
            "device_id": str(mine[2]),
            "vendor_ca": None if mine[3] is None else bytes(mine[3]).hex(),
        }
        seen = self._db.one(
            "SELECT COUNT(*) FROM sightings WHERE ca_id = ? AND serial = ?", (ca.ca_id, serial)
        )
        certs = len({bytes(r[0]) for r in rows}) + int(seen[0])
        if ca.revoked_at is not None:
            return CheckResult(Status.REVOKED, revoked_at=ca.revoked_at,
                               revocation_reason=ca.revoked_reason,
                               certificates_with_serial=certs, **info)  # fmt: skip
        revoked = self._db.one(
            "SELECT revoked_at, reason FROM revocations WHERE ca_id = ? AND serial = ?",
            (ca.ca_id, serial),
        )
        if revoked is not None:
            return CheckResult(Status.REVOKED, revoked_at=int(revoked[0]),
                               revocation_reason=str(revoked[1]),
                               certificates_with_serial=certs, **info)  # fmt: skip
        status = Status.DUPLICATE if certs > 1 else Status.KNOWN
        return CheckResult(status, certificates_with_serial=certs, **info)

    def _sighting(self, ca_id: int, serial: str, digest: bytes, der: bytes, at: int) -> None:
        self._db.execute(
            "INSERT INTO sightings (cert_sha256, ca_id, serial, seen_at, der)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (digest, ca_id, serial, at, der),
        )

    def counts(self) -> dict[str, int]:
        """Rows per table (for reports and tests)."""
        out = {}
        for table in ("production_cas", "ledgers", "devices", "revocations", "sightings"):
            out[table] = int(self._db.one(f"SELECT COUNT(*) FROM {table}")[0])  # noqa: S608
        return out

    def device_serials(self, job_id: str) -> Iterable[tuple[str, str]]:
        """(device id, serial) of a job's devices, in slot order."""
        rows = self._db.all(
            "SELECT d.device_id, d.serial FROM devices d JOIN production_cas c"
            " ON c.ca_id = d.ca_id WHERE c.job_id = ? ORDER BY d.slot",
            (job_id,),
        )
        return [(str(r[0]), str(r[1])) for r in rows]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _ca_record(row: Any) -> CaRecord:
    return CaRecord(
        ca_id=int(row[0]),
        pca_sha256=bytes(row[1]),
        job_id=str(row[2]),
        certificate=x509.load_der_x509_certificate(bytes(row[3])),
        revoked_at=None if row[4] is None else int(row[4]),
        revoked_reason=None if row[5] is None else str(row[5]),
    )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``cert`` (RFC 5280 §6.1.3 (a)(1))."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _entry_time(entry: x509.RevokedCertificate) -> int:
    return int(entry.revocation_date_utc.timestamp())


def _entry_reason(entry: x509.RevokedCertificate) -> str:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except x509.ExtensionNotFound:
        return x509.ReasonFlags.unspecified.value


# --- at the OEM: the work directory's files ------------------------------------------------------


def load_certificate_file(path: str | os.PathLike[str], what: str) -> x509.Certificate:
    """One certificate from a file, PEM or DER, through the hardened loader."""
    from securethread.pki import from_pem, load_der
    from securethread.workdir import read_file

    data = read_file(path, what, limit=64 << 10)
    return from_pem(data) if data.lstrip().startswith(b"-----BEGIN") else load_der(data)


def database_of(work: Any, database: str | None) -> str:
    """The registry's database: ``database`` (a path or a ``postgresql://`` URL) or the
    SQLite file in the OEM's work directory."""
    if database:
        return database
    return str(work.path(DEFAULT_DATABASE))


def reconciled_ledger(work: Any, job_id: str) -> bytes:
    """The SHA-256 of the ledger bytes ``oem reconcile`` verified for job ``job_id``."""
    from securethread.oem import layout as L

    rel = f"{L.job_dir(job_id)}/reconciliation.json"
    work.require(rel, step=f"registry ingest {job_id}", needs=f"oem reconcile ({job_id})")
    try:
        report = json.loads(work.read(rel, "reconciliation report"))
        return bytes.fromhex(report["ledger_sha256"])
    except (ValueError, KeyError, TypeError):
        raise StepOrderError(
            f"{rel} does not name the SHA-256 of the ledger it reconciled (reconciled by an "
            "older version): reconcile the ledger again into a fresh job record"
        ) from None


def registry_job(work: Any, job_id: str) -> RegistryJob:
    """The job as this OEM issued it (its own ``job.bin``, officer signatures verified as
    reconcile verifies them): id, identity, production CA, and the ledger key of the
    programmer the job names."""
    from securethread.formats.job import verify_job_signatures
    from securethread.formats.onboarding import OfficerBundle
    from securethread.oem import layout as L
    from securethread.oem.reconcile import _programmer_of
    from securethread.pki import from_pem

    jdir = L.job_dir(job_id)
    work.require(f"{jdir}/job.bin", step=f"registry {job_id}", needs=f"issue-job ({job_id})")
    signed = work.read(f"{jdir}/job.bin", "issued job")
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    root_key = root.public_key()
    if not isinstance(root_key, ec.EllipticCurvePublicKey):
        raise ConfigurationError("the OEM root certificate holds no EC key")
    officers = OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), root_key)
    job = verify_job_signatures(
        signed, officers=officers.public_keys(), min_threshold=officers.threshold
    )
    pdir = L.programmer_dir(_programmer_of(work, job.job.programmer))
    ledger_cert = from_pem(work.read(f"{pdir}/ledger-signing.pem", "ledger certificate"))
    key = ledger_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigurationError("the programmer's ledger certificate holds no EC key")
    return RegistryJob(
        job_id=job_id,
        job_sha256=job.sha256,
        production_ca=from_pem(work.read(f"{jdir}/production-ca.pem", "production CA")),
        ledger_key=key,
    )


def _root_crl(work: Any) -> list[tuple[bytes, x509.Certificate]]:
    """The OEM root's own CRL (``oem revoke``), when there is one."""
    from securethread.oem import layout as L
    from securethread.oem.revoke import ROOT_CRL
    from securethread.pki import from_pem

    if not work.exists(ROOT_CRL):
        return []
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    return [(work.read(ROOT_CRL, "root CRL"), root)]


def ingest_ledger(
    workdir: str | os.PathLike[str],
    ledger_path: str | os.PathLike[str],
    *,
    job_id: str,
    database: str | None = None,
    crls: Sequence[str | os.PathLike[str]] = (),
) -> StepResult:
    """``oem registry ingest LEDGER --job J``: the reconciled ledger of job J into the
    registry, with the root's CRL and the job's CRLs given (``--crl``) applied."""
    from securethread.oem import layout as L
    from securethread.workdir import read_file

    work = L.open_oem(workdir)
    expected = reconciled_ledger(work, job_id)
    job = registry_job(work, job_id)
    revocations = _root_crl(work) + [
        (read_file(c, "CRL", limit=16 << 20), job.production_ca) for c in crls
    ]
    src = open_file(ledger_path, "ledger")
    with src, Registry.open(database_of(work, database)) as reg:
        report = reg.ingest(src, job=job, ledger_sha256=expected, crls=revocations)
    return work.finish("oem registry ingest", [], (), report.to_json())


def check_certificate(
    workdir: str | os.PathLike[str],
    cert_path: str | os.PathLike[str],
    *,
    database: str | None = None,
) -> CheckResult:
    """``oem registry check CERT``: where a device certificate (PEM or DER) stands."""
    from securethread.oem import layout as L

    work = L.open_oem(workdir)
    cert = load_certificate_file(cert_path, "certificate")
    with Registry.open(database_of(work, database)) as reg:
        return reg.check(cert)


def apply_crl_file(
    workdir: str | os.PathLike[str],
    crl_path: str | os.PathLike[str],
    *,
    job_id: str | None = None,
    database: str | None = None,
) -> StepResult:
    """``oem registry crl CRL [--job J]``: a CRL's revocations into the registry -- the
    job's production CA's (``--job``) or the OEM root's."""
    from securethread.oem import layout as L
    from securethread.pki import from_pem
    from securethread.workdir import read_file

    work = L.open_oem(workdir)
    data = read_file(crl_path, "CRL", limit=16 << 20)
    with Registry.open(database_of(work, database)) as reg:
        if job_id is None:
            issuer = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
        else:
            job = registry_job(work, job_id)
            issuer = job.production_ca
            reg._db.begin()
            try:
                reg._ca_id(job.job_id, job.job_sha256, job.production_ca)
                reg._db.commit()
            except BaseException:
                reg._db.rollback()
                raise
        n = reg.apply_crl(data, issuer)
    return work.finish(
        "oem registry crl", [], (), {"job": job_id, "issuer": issuer.subject.rfc4514_string(),
                                     "new_revocations": n},
    )  # fmt: skip


def revoke_device(
    workdir: str | os.PathLike[str],
    *,
    job_id: str,
    serial: str | None = None,
    device_id: str | None = None,
    reason: str = "unspecified",
    database: str | None = None,
) -> StepResult:
    """``oem registry revoke --job J (--serial HEX | --device-id ID)``: the OCSP responder
    answers revoked for the device from now on (relying parties that read CRLs need the
    production CA's CRL as well: ``programmer revoke``)."""
    from securethread.oem import layout as L
    from securethread.pki import reason_named

    work = L.open_oem(workdir)
    flag = reason_named(reason)
    number = None
    if serial is not None:
        try:
            number = int(serial.removeprefix("0x"), 16)
        except ValueError:
            raise ConfigurationError(f"--serial {serial!r} is not a hexadecimal serial") from None
    job = registry_job(work, job_id)
    with Registry.open(database_of(work, database)) as reg:
        s, new = reg.revoke(
            job_id=job_id,
            job_sha256=job.job_sha256,
            production_ca=job.production_ca,
            serial=number,
            device_id=device_id,
            reason=flag,
        )
    return work.finish(
        "oem registry revoke", [], (), {"job": job_id, "serial": s, "newly_revoked": new,
                                        "reason": flag.value},
    )  # fmt: skip
