"""Offline checks from files, for auditors: only public keys and certificates, no token.

Each function reads the files it is given, verifies, and returns a plain summary (what the
``securethread audit`` commands print) or raises the specific :class:`securethread.Error`.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError, ConfigurationError, VerificationError
from securethread.formats.transcript import verify_transcript
from securethread.workdir import read_file

_VERIFY_WITH = {
    "ledger": "audit verify-ledger or audit reconcile",
    "ledger-record": "audit verify-ledger on its ledger",
    "transcript": "audit verify-transcript",
}


def load_certificate_file(path: str | os.PathLike[str], what: str) -> x509.Certificate:
    """One certificate, PEM or DER, parsed by the hardened loader."""
    from securethread.pki import from_pem, load_der

    data = read_file(path, what, limit=64 << 10)
    try:
        return from_pem(data) if data.lstrip().startswith(b"-----BEGIN") else load_der(data)
    except VerificationError as exc:
        raise type(exc)(f"{what} {os.fspath(path)!r}: {exc}") from None


def ec_public_key(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{what} has no EC public key")
    return key


def parse_anchor(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        anchor = bytes.fromhex(text)
    except ValueError:
        anchor = b""
    if len(anchor) != 32:
        raise ConfigurationError("--anchor must be 64 hex digits (a transcript record hash)")
    return anchor


def verify_transcript_file(
    path: str | os.PathLike[str], *, cert: str | os.PathLike[str], anchor: str | None = None
) -> dict[str, Any]:
    """Verify a party's transcript under its identity certificate (and an anchor)."""
    a = parse_anchor(anchor)
    key = ec_public_key(load_certificate_file(cert, "identity certificate"), "the certificate")
    data = read_file(path, "transcript", limit=256 << 20)
    s = verify_transcript(data, public_key=key, anchor=a)
    lines, records = [], []
    for r in s.records:
        keys = ", ".join(k.label for k in r.keys)
        certs = ", ".join(c.subject for c in r.certificates)
        lines.append(
            f"  #{r.seq} {r.timestamp} {r.operation}"
            + (f"  keys: {keys}" if keys else "")
            + (f"  certs: {certs}" if certs else "")
        )
        records.append(
            {
                "seq": r.seq,
                "operation": r.operation,
                "time": r.timestamp,
                "keys": [k.label for k in r.keys],
                "certificates": [c.subject for c in r.certificates],
            }
        )
    lines.append(" (the anchor given is in the chain)" if a else " (no anchor given)")
    return {
        "enclave": s.enclave,
        "records": len(s.records),
        "record_list": records,
        "seq": s.records[-1].seq,
        "head": s.head.hex(),
        "anchor_checked": a is not None,
        "lines": lines,
    }


def inspect_file(path: str | os.PathLike[str], *, record: int | None = None) -> dict[str, Any]:
    """A readable view of any artefact, marked UNVERIFIED: inspect checks no signature."""
    from securethread.audit.inspect import describe

    data = read_file(path, "artefact", limit=256 << 20)
    try:
        view = describe(data, record=record)
    except VerificationError as exc:
        raise type(exc)(f"{os.fspath(path)}: {exc}") from None
    kind = view.get("kind", "artefact")
    view["verified"] = False
    view["note"] = (
        f"UNVERIFIED: inspect checks no signature; verify with {_VERIFY_WITH.get(kind, 'its signer key')}"
    )
    return view
