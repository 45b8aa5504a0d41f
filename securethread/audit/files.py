"""Offline checks from files, for auditors: only public keys and certificates, no token.

Each function reads the files it is given, verifies, and returns a plain summary (what the
``securethread audit`` commands print) or raises the specific :class:`securethread.Error`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError, ConfigurationError, VerificationError
from securethread.formats.transcript import verify_transcript
from securethread.workdir import read_file

if TYPE_CHECKING:
    from securethread.formats.job import ProductionJob

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
    lines.append(
        "  anchor: the one given is in the chain"
        if a
        else "  anchor: none given (cut tails are only caught with one)"
    )
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
    how = _VERIFY_WITH.get(kind, "its signer's key")
    view["note"] = f"UNVERIFIED: inspect checks no signature; verify with {how}"
    return view


def _open_export(path: str | os.PathLike[str]) -> Any:
    try:
        return open(path, "rb")  # noqa: SIM115 -- the caller closes it
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read ledger {os.fspath(path)!r}: {exc.strerror}"
        ) from None


def verify_ledger_file(
    path: str | os.PathLike[str],
    *,
    ledger_cert: str | os.PathLike[str],
    root: str | os.PathLike[str],
    programmer_cert: str | os.PathLike[str],
) -> dict[str, Any]:
    """Verify a closed ledger export *of the programmer the auditor expects*:
    ``programmer_cert`` is its identity certificate (as the OEM certified it).

    The ledger certificate must validate under the OEM root for ledger signing and belong to
    that programmer (:func:`~securethread.formats.reconciliation.ledger_signer`, the check
    reconciliation makes), the job the export carries must name that programmer, then the
    chain, every checkpoint and the close record verify.  A ledger re-signed by another
    programmer the same OEM certified is refused.  Whether it is the ledger *of the job the
    OEM issued* (officers, quota, devices) is what :func:`reconcile_files` checks.
    """
    from securethread.formats import ledger
    from securethread.formats.job import job_hash
    from securethread.formats.reconciliation import LedgerSignerError, ledger_signer
    from securethread.pki import cert_fingerprint

    root_cert = load_certificate_file(root, "OEM root certificate")
    expected = load_certificate_file(programmer_cert, "programmer certificate")
    cert = load_certificate_file(ledger_cert, "ledger certificate")
    enclave, key = ledger_signer(root_cert, expected, cert)
    with _open_export(path) as src:
        job_bytes, items = ledger.read_export(src)
        job = _export_job(job_bytes)
        if job.programmer != cert_fingerprint(expected):
            raise LedgerSignerError(
                f"the ledger is of job {job.job_id}, which names another programmer "
                f"({job.programmer.hex()[:16]}) than the one expected ({enclave})"
            )
        s = ledger.verify_ledger(items, job=job_hash(job_bytes), ledger_key=key)
    return {
        "records": s.records,
        "provisioned": s.provisioned,
        "programmed": s.programmed,
        "checkpoints": s.checkpoints,
        "head": s.head.hex(),
        "job_sha256": job_hash(job_bytes).hex(),
        "job_id": job.job_id,
        "programmer": enclave,
        "programmer_sha256": cert_fingerprint(expected).hex(),
        "closed": s.close is not None,
    }


def _export_job(job_bytes: bytes) -> ProductionJob:
    """The job a ledger export carries, as it claims (its officers' signatures are checked by
    reconciliation, not here): what the ledger key's checkpoints commit to."""
    from securethread.errors import FormatError
    from securethread.formats import envelope
    from securethread.formats.job import JOB_KIND
    from securethread.formats.job import ProductionJob as Job

    kind, body, _signers = envelope.peek_body(job_bytes)
    if kind != JOB_KIND:
        raise FormatError(f"the ledger export carries a {kind!r}, not a job")
    return Job.from_obj(body)


def reconcile_files(
    path: str | os.PathLike[str],
    *,
    job: str | os.PathLike[str],
    root: str | os.PathLike[str],
    officers: str | os.PathLike[str],
    programmer_cert: str | os.PathLike[str],
    ledger_cert: str | os.PathLike[str],
    production_ca: str | os.PathLike[str],
    manifest: str | os.PathLike[str] | None = None,
    every_signature: bool = False,
) -> dict[str, Any]:
    """Reconcile a ledger export against the job as the OEM issued it, from public files:
    the signed job, the OEM root, the officer bundle it signed, the programmer's identity
    and ledger certificates, the job's production CA and (for boot confirmations) the
    signed manifest; raises naming the first problem.  ``every_signature``: verify the
    production CA's signature of every device certificate, also those the ledger covers
    (:class:`~securethread.formats.reconciliation.CertificateSignatures`)."""
    from securethread.formats.onboarding import OfficerBundle
    from securethread.formats.reconciliation import CertificateSignatures, reconcile_export

    root_cert = load_certificate_file(root, "OEM root certificate")
    bundle = OfficerBundle.open(
        read_file(officers, "officer bundle", limit=64 << 10), ec_public_key(root_cert, "root")
    )
    if manifest is None:
        raise ConfigurationError("reconciliation needs the job's signed manifest (--manifest)")
    with _open_export(path) as src:
        report = reconcile_export(
            src,
            issued_job=read_file(job, "issued job", limit=1 << 20),
            officers=bundle.public_keys(),
            min_threshold=bundle.threshold,
            root_cert=root_cert,
            programmer_cert=load_certificate_file(programmer_cert, "programmer certificate"),
            ledger_cert=load_certificate_file(ledger_cert, "ledger certificate"),
            production_ca_cert=load_certificate_file(production_ca, "production-CA certificate"),
            manifest=read_file(manifest, "manifest", limit=64 << 10),
            certificate_signatures=CertificateSignatures.VERIFIED
            if every_signature
            else CertificateSignatures.COVERED,
        )
    import attrs

    return attrs.asdict(report)
