"""Flow 6 at the programming centre: ``request-ca``, ``open-job``, ``close-job``.

``request-ca --job J`` generates job J's production-CA key in the token and sends its
CSR, signed by the enclave's identity key.  ``open-job PACKAGE --image FILE`` verifies
everything the OEM sent before using any of it -- the officers' signatures on the job
(threshold floor from the root-signed officer bundle), that the job is for this enclave,
the production-CA certificate under the pinned root and against this token's key, the
manifest under the firmware-signing key and against the job, the vendor CA certificates
against the hashes the job names, the encrypted image against the manifest -- then
installs the CA certificate and opens the job's quota store.
``close-job --job J`` appends the signed close record and exports the ledger.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError, ConfigurationError, ImageError, JobError
from securethread.formats.identity import vendor_ca_id
from securethread.formats.image import Manifest
from securethread.formats.job import (
    VerifiedJob,
    check_job_id,
    verify_job,
)
from securethread.formats.jobpackage import JobPackage, ProductionCARequest
from securethread.formats.onboarding import OfficerBundle
from securethread.formats.transcript import CertEntry, KeyEntry
from securethread.hsm.token import Token
from securethread.keys import load_spki, spki_der
from securethread.pki import (
    cert_fingerprint,
    create_production_ca_csr,
    from_pem,
    install_certificate,
)
from securethread.programmer import layout as L
from securethread.programmer.crl_mark import RevocationAnchor
from securethread.programmer.opened import Anchors, OpenedJob, check_package
from securethread.programmer.quota_mark import open_store
from securethread.programmer.responder import certify_oem_responder
from securethread.programmer.revoke import first_crl, mark_opened
from securethread.programmer.runner import RunLock
from securethread.programmer.store import SQLiteStore
from securethread.workdir import (
    PartyDir,
    StepResult,
    copy_atomic,
    file_sha256,
    read_file,
    to_pem,
)


def request_ca(workdir: str | os.PathLike[str], *, job_id: str) -> StepResult:
    """Generate job ``job_id``'s production-CA key and write its signed request."""
    work = L.open_programmer(workdir)
    check_job_id(job_id)
    work.require(L.cert_path("identity"), step="request-ca", needs="install-certs")
    jdir = L.job_dir(job_id)
    step = f"request-ca {job_id}"
    if (earlier := work.done_before(f"{jdir}/production-ca.csr", step=step)) is not None:
        return earlier
    token = work.open_token(L.TOKEN)
    label = L.production_ca_label(job_id)
    # A job this token opened keeps its production-CA key, whatever files were deleted.
    RevocationAnchor(token, job_id).refuse_new_key()
    # A key left by a request-ca killed before it wrote its CSR is this step's own (its label
    # names this job and no CSR for it exists): remove it and make a fresh one.
    token.destroy(label)
    csr = create_production_ca_csr(token, label=label, job_id=job_id)
    der = csr.public_bytes(serialization.Encoding.DER)
    identity = token.private_key(L.L_IDENTITY)
    request = ProductionCARequest(work.name, job_id, der).seal(identity)
    tx = work.transcript(identity)
    tx.append(
        "production-ca",
        keys=[KeyEntry.from_key(token.private_key(label))],
        details={"job": job_id},
    )
    out = work.write(f"outbox/production-ca-request-{job_id}.bin", request)
    written = [out, f"{jdir}/production-ca.csr"]
    result = work.finish("programmer request-ca", written, [tx], {"job": job_id, "request": out})
    result = work.pending(step, result)
    work.write(f"{jdir}/production-ca.csr", der)  # last: marks the step done
    return result


# --- opening a job ------------------------------------------------------------------------------


def trusted_officers(work: PartyDir) -> OfficerBundle:
    """The officer bundle the pinned OEM root signed (installed by install-certs)."""
    root = _root(work)
    return OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), _ec(root.public_key()))


def verified_job(work: PartyDir, signed: bytes, *, now: int | None = None) -> VerifiedJob:
    """Verify ``signed`` as this programmer's job under the officers the root vouches for."""
    officers = trusted_officers(work)
    identity = from_pem(work.read(L.cert_path("identity"), "identity certificate"))
    return verify_job(
        signed,
        officers=officers.public_keys(),
        programmer=cert_fingerprint(identity),
        min_threshold=officers.threshold,
        now=now,
    )


def firmware_key(work: PartyDir) -> ec.EllipticCurvePublicKey:
    return load_spki(work.read(L.FIRMWARE_KEY, "firmware-signing key"), what="firmware-signing key")


def open_job(
    workdir: str | os.PathLike[str],
    package_path: str | os.PathLike[str],
    *,
    image: str | os.PathLike[str] | None,
) -> StepResult:
    """Verify the OEM's job package and encrypted image, then open the job (see module).

    A "provision" job (the silicon vendor's fab) has no image: ``image`` is None, and
    neither a manifest nor an image key is needed (docs/design.md, where provisioning
    happens)."""
    work = L.open_programmer(workdir)
    work.require(L.cert_path("identity"), step="open-job", needs="install-certs")
    package = JobPackage.from_bytes(read_file(package_path, "job package", limit=1 << 20))
    job = verified_job(work, package.job)
    job_id = job.job.job_id
    jdir = L.job_dir(job_id)
    if (image is None) == job.job.programs:
        raise ConfigurationError(
            f"open-job of job {job_id}, a {job.job.stage!r} job, "
            + ("needs its encrypted image (--image FILE)" if image is None else
               "takes no image: the job names none")
        )  # fmt: skip
    if job.job.production_ca is not None:  # a "program" job certifies nothing: no CA
        work.require(
            f"{jdir}/production-ca.csr",
            step=f"open-job {job_id}",
            needs=f"request-ca --job {job_id}",
        )
    if work.exists(f"{jdir}/job.bin"):
        opened = verified_job(work, work.read(f"{jdir}/job.bin", "job"), now=job.job.not_before)
        earlier = work.undelivered(f"open-job {job_id}")
        if opened.sha256 == job.sha256 and earlier is not None:
            # Killed after job.bin, before its answer: finish the token's mark, answer.
            if job.job.production_ca is not None:
                mark_opened(work, work.open_token(L.TOKEN), job_id)
            return earlier
        if opened.sha256 == job.sha256:
            raise JobError(
                f"job {job_id} is already open here (the same signed job, framed differently "
                "or not, opens once)"
            )
        raise JobError(f"job id {job_id} is already open here with another job")
    token = work.open_token(L.TOKEN)
    # The token remembers every job it opened, whatever files were deleted (crl_mark).
    RevocationAnchor(token, job_id).check_opening(job.sha256)
    # Every binding of the package to the signed job, once (opened.py): production CA,
    # manifest, device-trust statement, vendor CAs.
    checked = check_package(
        job=job,
        manifest=package.manifest,
        production_ca=package.production_ca,
        device_trust=package.device_trust,
        vendors=tuple(package.vendors),
        anchors=Anchors.of(work),
        provisioned_by=tuple(package.provisioned_by),
    )
    pca = checked.production_ca
    if pca is not None:
        _this_tokens_key(pca, job, token)
    else:  # a "program" job: no request-ca made its directory
        work.path(jdir).mkdir(parents=True, exist_ok=True)
    vendor_files = [
        (L.vendor_ca_path(job_id, vendor_ca_id(c)), to_pem(c)) for c in checked.vendor_cas
    ] + [  # a "program" job: the production CAs its chips were provisioned under
        (L.provisioned_by_path(job_id, h), to_pem(c))
        for h, c in zip(job.job.provisioned_by, checked.provisioned_by, strict=True)
    ]
    responder_files = (  # OCSP, RFC 6960: the production CA certifies the OEM's responder
        certify_oem_responder(work, token, package, job, pca) if pca is not None else []
    )
    image_files = []
    if checked.manifest is not None and checked.manifest_bytes is not None and image is not None:
        _take_image(work, token, job, checked.manifest, image)
        image_files = [
            work.write(f"{jdir}/manifest.bin", checked.manifest_bytes),
            f"{jdir}/image.enc",
        ]
    if pca is not None and not token.has_certificate(L.production_ca_label(job_id)):
        install_certificate(token, L.production_ca_label(job_id), pca)
    written = [
        *([work.write(f"{jdir}/production-ca.pem", to_pem(pca))] if pca is not None else []),
        *image_files,
        work.write(f"{jdir}/device-trust.bin", package.device_trust),
        *(work.write(rel, pem) for rel, pem in vendor_files),
        *(work.write(rel, pem) for rel, pem in responder_files),
    ]
    # The store and its quota mark in the token (S7): from now on a missing, emptied,
    # replaced or older store for this job is refused, never a fresh quota.
    _open_job_store(work, token, job).close()
    tx = work.transcript(token.private_key(L.L_IDENTITY))
    tx.append(
        "production-run-opened",
        certificates=[CertEntry.from_certificate(pca)] if pca is not None else [],
        artefacts={"job": job.sha256},
        details={"job": job_id, "quota": job.job.quota},
    )
    # The job's first, empty CRL: relying parties can check revocation from the first device
    # (a "program" job issues no certificate: nothing of its own to revoke).
    if pca is not None:
        written.extend(first_crl(work, token, job))
    written.append(f"{jdir}/job.bin")
    result = work.finish(
        "programmer open-job",
        written,
        [tx],
        {"job": job_id, "quota": job.job.quota, "job_sha256": job.sha256.hex()},
    )
    result = work.pending(f"open-job {job_id}", result)
    work.write(f"{jdir}/job.bin", job.signed)  # last: marks the job open
    if pca is not None:  # a "program" job has no CRL to anchor: its quota mark guards it
        mark_opened(work, token, job_id)  # ... and the token: it never opens again here
    return result


def _take_image(
    work: PartyDir,
    token: Token,
    job: VerifiedJob,
    manifest: Manifest,
    image: str | os.PathLike[str],
) -> None:
    """Keep the encrypted image as ``jobs/<id>/image.enc`` once it matches the manifest and
    the image key is in this token (a job that programs)."""
    image_tmp = work.path(f"{L.job_dir(job.job.job_id)}/.image.enc.tmp")
    try:
        shutil.copyfile(image, image_tmp)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read image {os.fspath(image)!r}: {exc.strerror}"
        ) from None
    try:
        if file_sha256(image_tmp) != manifest.ciphertext_sha256:
            raise ImageError(f"image {os.fspath(image)!r} does not match the job's manifest")
        image_id = job.job.image()[0]
        if not _has_secret_key(token, L.image_key_label(image_id)):
            raise ConfigurationError(
                f"the key of image {image_id!r} is not in this token "
                "(receive-keys or open-keys first)"
            )
        os.replace(image_tmp, work.path(f"{L.job_dir(job.job.job_id)}/image.enc"))
    finally:
        image_tmp.unlink(missing_ok=True)


def _open_job_store(work: PartyDir, token: Token, job: VerifiedJob) -> SQLiteStore:
    """The job's store, checked against (or, at first, marked in) the token's quota mark."""
    store, _mark = open_store(
        work.path(f"{L.job_dir(job.job.job_id)}/store.sqlite"),
        token,
        job=job.sha256,
        job_id=job.job.job_id,
        quota=job.job.quota,
        signed=job.signed,
    )
    return store


def _has_secret_key(token: object, label: str) -> bool:
    from securethread.errors import KeyNotFoundError

    try:
        token.secret_key(label)  # type: ignore[attr-defined]
    except KeyNotFoundError:
        return False
    return True


def _root(work: PartyDir) -> x509.Certificate:
    return from_pem(work.read(L.ROOT_CA, "OEM root certificate"))


def _ec(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError("expected an EC public key")
    return key


def _this_tokens_key(pca: x509.Certificate, job: VerifiedJob, token: object) -> None:
    """The production-CA certificate must certify the key this token generated for the job."""
    mine = token.public_key(L.production_ca_label(job.job.job_id))  # type: ignore[attr-defined]
    if spki_der(mine) != spki_der(_ec(pca.public_key())):
        raise CertificateError(
            "the production-CA certificate certifies another key than this token's"
        )


# --- closing a job --------------------------------------------------------------------------------


def close_job(workdir: str | os.PathLike[str], *, job_id: str) -> StepResult:
    """Close job ``job_id``: the ledger key signs the close record (totals, last record,
    quota used -- burned slots included) in the store's closing transaction, and the job is
    marked closed only once its ledger is in ``jobs/<job>/ledger.bin``, verified as the OEM
    will verify it.  After this the job issues nothing.

    A failure at any point leaves the job open (run close-job again) or closed with its
    ledger written.  A closed job whose ``ledger.bin`` or outbox copy is missing gets them
    written again from its store, byte for byte the same (the close record signed at the
    close is kept in the store): that is how a lost ledger is regenerated."""
    from securethread.formats import ledger

    work = L.open_programmer(workdir)
    jdir = L.job_dir(job_id)
    ledger_rel, out_rel = f"{jdir}/ledger.bin", f"outbox/ledger-{job_id}.bin"
    work.require(f"{jdir}/job.bin", step=f"close-job {job_id}", needs=f"open-job ({job_id})")
    if work.exists(ledger_rel) and work.exists(out_rel):
        if (earlier := work.done_before(ledger_rel, step=f"close-job {job_id}")) is not None:
            return earlier
    # The opened job verified once (opened.py), at its own start: a job closes after its
    # window; the image is not needed to close it.
    opened = OpenedJob.verify(work, job_id, step="close-job", within_window=False, image=False)
    job, signed = opened.job, opened.job.signed
    ledger_key = _ec(
        from_pem(work.read(L.cert_path("ledger-signing"), "ledger certificate")).public_key()
    )
    token = work.open_token(L.TOKEN)
    summaries: list[ledger.LedgerSummary] = []

    def keep(items: Iterator[tuple[str, bytes]]) -> None:
        """Inside the closing transaction: the ledger written, verified, in place."""
        path = work.path(ledger_rel)
        tmp = path.with_name(".ledger.bin.tmp")
        try:
            with open(tmp, "wb") as out:
                ledger.write_export(out, signed, items)
                out.flush()
                os.fsync(out.fileno())
            with open(tmp, "rb") as src:
                _job, read = ledger.read_export(src)
                summaries.append(ledger.verify_ledger(read, job=job.sha256, ledger_key=ledger_key))
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    # The store is checked (quick_check, quota mark) before the close counts on it.
    store = _open_job_store(work, token, job)
    try:
        # Not while a run of the job is going on (the run lock of programmer provision).
        lock = RunLock(str(work.path(f"{jdir}/store.sqlite")))
        lock.acquire(job_id)
        try:
            sign = ledger.close_signer(
                token.private_key(L.L_LEDGER), job=job.sha256, time=int(time.time())
            )
            store.close_job(job.sha256, sign, keep=keep)
        finally:
            lock.release()
    finally:
        store.close()
    summary = summaries[-1]
    tx = work.transcript(token.private_key(L.L_IDENTITY))
    tx.append(
        "production-run-closed",
        artefacts={"ledger": file_sha256(work.path(ledger_rel))},
        details={"job": job_id, "provisioned": summary.provisioned},
    )
    result = work.finish(
        "programmer close-job",
        [ledger_rel, out_rel],
        [tx],
        {
            "job": job_id,
            "ledger": out_rel,
            "records": summary.records,
            "provisioned": summary.provisioned,
            "programmed": summary.programmed,
            "quota_used": summary.close.quota_used if summary.close is not None else None,
        },
    )
    result = work.pending(f"close-job {job_id}", result)
    copy_atomic(work.path(ledger_rel), work.path(out_rel))  # last: marks the step done
    return result


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "close_job",
    "firmware_key",
    "open_job",
    "request_ca",
    "trusted_officers",
    "verified_job",
]
