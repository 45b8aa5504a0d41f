"""Readable views of securethread artefacts for ``securethread inspect``: nothing is verified.

An auditor looking at a file wants to know what it claims before deciding what to verify it
against: a job, manifest, license, officer bundle, key-transfer acknowledgement, ledger export
or one of its records, a ceremony transcript.  :func:`describe` decodes, labels every view
``verified: False`` and raises :class:`FormatError` naming what the bytes are not.  The
verifying counterparts are ``verify-ledger``, ``reconcile`` and ``verify-transcript``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import cbor2

from securethread.errors import ConfigurationError, Error, FormatError
from securethread.formats import cbor, envelope, ledger
from securethread.formats import transcript as transcript_mod
from securethread.formats.job import job_hash
from securethread.formats.jobpackage import JOB_PACKAGE_KIND, JobPackage
from securethread.pki import untrusted


def _show(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex() if len(v) <= 64 else f"<{len(v)} bytes>"
    if isinstance(v, dict):
        return {k: _show(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_show(x) for x in v]
    return v


def _cert_view(der: bytes) -> dict[str, Any]:
    try:
        cert = untrusted.load_certificate(der, what="certificate")
    except Error as exc:
        return {"der": _show(der), "note": f"not a parsable certificate ({exc})"}
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": hashlib.sha256(der).hexdigest(),
    }


def _record_view(body: Mapping[str, Any], *, full: bool) -> dict[str, Any]:
    out = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in body.items() if k != "cert"}
    if full and isinstance(body.get("cert"), bytes):
        out["cert"] = _cert_view(body["cert"])
    return out


def _describe_ledger(data: bytes, record: int | None) -> dict[str, Any]:
    job_signed, items = ledger.read_export(io.BytesIO(data))
    records: list[dict[str, Any]] = []
    checkpoints = 0
    close: Any = None
    for tag, payload in items:
        if tag == "c":
            checkpoints += 1
            continue
        if tag != "r":  # the close record: shown as it claims, unverified
            try:
                close = _show(envelope.peek_body(payload)[1])
            except Error as exc:
                raise FormatError(f"ledger close record: {exc}") from None
            continue
        body = ledger.parse_record(payload, len(records)).body
        records.append(body)
    try:
        _kind, job_body, _signers = envelope.peek_body(job_signed)
        job_id = job_body.get("job_id")
    except Error:
        job_id = None
    if record is not None:
        if not 0 <= record < len(records):
            raise ConfigurationError(f"--record {record}: the ledger has {len(records)} records")
        return {"kind": "ledger-record", "record": _record_view(records[record], full=True)}
    return {
        "kind": "ledger",
        "job_id": job_id,
        "job_sha256": job_hash(job_signed).hex(),
        "checkpoints": checkpoints,
        "close (unverified)": close,
        "records": [_record_view(b, full=False) for b in records],
    }


def _describe_transcript(data: bytes) -> dict[str, Any]:
    from securethread.formats.transcript import CeremonyRecord, SignedRecord

    records: list[dict[str, Any]] = []
    pos = len(transcript_mod.MAGIC)
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        if pos + 4 > len(data) or pos + 4 + n > len(data):
            raise FormatError(f"transcript record {len(records)} is truncated")
        signed = SignedRecord.from_bytes(data[pos + 4 : pos + 4 + n])
        view = CeremonyRecord.from_bytes(signed.record).to_json()
        view["signer"] = signed.signer.hex()
        records.append(view)
        pos += 4 + n
    enclave = records[0].get("enclave") if records else None
    return {"kind": "transcript", "enclave": enclave, "records": records}


def describe(data: bytes, *, record: int | None = None) -> dict[str, Any]:
    """A readable view of an artefact -- job, manifest, license, officer bundle, key-transfer
    acknowledgement, ledger export or one of its records, ceremony transcript -- *without
    verifying anything*: ``verified`` is always False, and a FormatError names what the
    bytes are not."""
    if record is not None and not data.startswith(ledger.EXPORT_MAGIC):
        raise ConfigurationError("--record applies to a ledger export only")
    if data.startswith(ledger.EXPORT_MAGIC):
        view = _describe_ledger(data, record)
    elif data.startswith(transcript_mod.MAGIC):
        view = _describe_transcript(data)
    else:
        view = _describe_cbor(data)
    return {"verified": False, **view}


_LICENSE_KEYS = frozenset({"v", "certificate", "envelope"})


def _describe_cbor(data: bytes) -> dict[str, Any]:
    try:
        obj = cbor.decode(data, what="artefact", max_size=64 << 20, cose_tag=True)
    except Error as exc:
        raise FormatError(f"not a securethread artefact ({exc})") from None
    if isinstance(obj, dict) and set(obj) == _LICENSE_KEYS and isinstance(obj["envelope"], bytes):
        kind, body, signers = envelope.peek_body(obj["envelope"])
        cert = obj["certificate"]
        return {
            "kind": kind,
            "certificate": _cert_view(cert) if isinstance(cert, bytes) else _show(cert),
            "signers": [s.hex() for s in signers],
            "body (unverified)": _show(body),
        }
    if isinstance(obj, cbor2.CBORTag):  # a COSE_Sign1 or COSE_Sign (RFC 9052 §2)
        try:
            kind, body, signers = envelope.peek_body(data)
        except Error as exc:
            raise FormatError(f"not a securethread artefact ({exc})") from None
        signed_by = [s.hex() for s in signers]
        return {"kind": kind, "signers": signed_by, "body (unverified)": _show(body)}
    if isinstance(obj, dict) and obj.get("kind") in (
        ledger.KIND_PROVISIONED,
        ledger.KIND_PROGRAMMED,
        ledger.KIND_LICENSED,
    ):
        body = ledger.parse_record(data, 0).body
        return {"kind": "ledger-record", "record": _record_view(body, full=True)}
    if isinstance(obj, dict) and obj.get("kind") == JOB_PACKAGE_KIND:
        package = JobPackage.from_bytes(data)
        return {
            "kind": JOB_PACKAGE_KIND,
            "job": _describe_cbor(package.job),
            "production-ca": (  # none in a program job's package
                _cert_view(package.production_ca) if package.production_ca is not None else None
            ),
            "manifest": (  # none in a provision job's package
                _describe_cbor(package.manifest) if package.manifest is not None else None
            ),
            "device-trust": _describe_cbor(package.device_trust),
            "vendors": [_cert_view(v) for v in package.vendors],
        }
    raise FormatError("not a securethread artefact (no known kind)")


__all__ = ["describe"]
