"""Flow 6 at the OEM: ``securethread oem issue-job SPEC --ca-request FILE``.

From a job spec (:mod:`securethread.oem.jobspec`) and the programmer's production-CA
request, the OEM

1. checks what the job names exists here: the programmer is certified and has received the
   image key, the image is mastered, the job id was never used;
2. verifies the request under the programmer's certified identity key and certifies the
   production CA for this job under the root;
3. has the officers sign the job, each with the key in their own token (M-of-N);
4. keeps the signed job (reconciliation later checks the returned ledger against *this*
   job, never the copy the ledger carries) and writes the job package (with the vendor CA
   certificates the job names by their keys' hashes) and the encrypted image to the outbox.
"""

from __future__ import annotations

import datetime
import hashlib
import os

from cryptography import x509

from securethread.errors import ConfigurationError, JobError
from securethread.formats.device_trust import DeviceTrust, sign_device_trust
from securethread.formats.identity import vendor_ca_id
from securethread.formats.job import ProductionJob, cosign_job, job_hash, sign_job
from securethread.formats.jobpackage import JobPackage, ProductionCARequest
from securethread.formats.onboarding import OfficerBundle
from securethread.formats.transcript import CertEntry, KeyEntry
from securethread.oem import layout as L
from securethread.oem.jobspec import load_job_spec
from securethread.pki import (
    cert_fingerprint,
    certify_production_ca,
    from_pem,
    to_der,
    untrusted,
)
from securethread.workdir import PartyDir, StepResult, copy_atomic, read_file, to_pem


def issue_job(
    workdir: str | os.PathLike[str],
    spec_path: str | os.PathLike[str],
    *,
    ca_request: str | os.PathLike[str],
) -> StepResult:
    """Issue the job described by ``spec_path`` (see the module docstring)."""
    work = L.open_oem(workdir)
    spec = load_job_spec(spec_path)
    jdir = L.job_dir(spec.job_id)
    if work.exists(f"{jdir}/job.bin"):
        same_spec = work.read(f"{jdir}/spec.toml", "job spec") == read_file(spec_path, "job spec")
        if same_spec and not work.exists(f"outbox/job-{spec.job_id}.bin"):
            # Issued, then killed before the package reached the outbox: finish that, from
            # what was recorded (the same job, nothing signed again).
            written = _write_package(work, spec.job_id, spec.image)
            return work.finish("oem issue-job", written, (), {"job": spec.job_id})
        raise JobError(f"job id {spec.job_id!r} was already used by this OEM ({jdir} exists)")
    pdir = L.programmer_dir(spec.programmer)
    work.require(
        f"{pdir}/identity.pem", step="issue-job", needs=f"certify-programmer ({spec.programmer})"
    )
    idir = L.image_dir(spec.image)
    work.require(f"{idir}/manifest.bin", step="issue-job", needs=f"master-image ({spec.image})")
    if not (
        work.exists(f"{pdir}/keys-{spec.image}.ack")
        or work.exists(f"{pdir}/keys-{spec.image}.receipt")
    ):
        raise ConfigurationError(
            f"issue-job needs the key of image {spec.image!r} delivered to {spec.programmer!r} "
            "first (send-keys, or seal-keys and confirm-keys)"
        )
    manifest_bytes = work.read(f"{idir}/manifest.bin", "manifest")
    programmer_cert = from_pem(work.read(f"{pdir}/identity.pem", "programmer certificate"))
    request = ProductionCARequest.open(
        read_file(ca_request, "production-CA request", limit=64 << 10),
        programmer_key=programmer_cert.public_key(),  # type: ignore[arg-type]
    )
    if request.programmer != spec.programmer:
        raise JobError(
            f"the production-CA request comes from {request.programmer!r}, the job is for "
            f"{spec.programmer!r}"
        )
    if request.job_id != spec.job_id:
        raise JobError(
            f"the production-CA request is for job {request.job_id!r}, not {spec.job_id!r}"
        )
    csr = request.certificate_request()
    from securethread.formats.image import verify_manifest

    fw_key = untrusted.load_public_key_pem(
        work.read(L.FIRMWARE_KEY, "firmware-signing key"), what="firmware-signing key"
    )
    manifest = verify_manifest(manifest_bytes, key=fw_key)
    device_class = spec.device_class or manifest.device_class
    if device_class != manifest.device_class:
        raise JobError(
            f"the job's device class {device_class!r} is not the image's "
            f"({manifest.device_class!r})"
        )

    oem = work.open_token(L.TOKEN)
    root_key = oem.private_key(L.L_ROOT)
    root = oem.certificate(L.L_ROOT)
    officers = OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), root.public_key())  # type: ignore[arg-type]
    threshold = spec.threshold or officers.threshold
    if not officers.threshold <= threshold <= len(officers.keys):
        raise JobError(
            f"threshold {threshold} is outside {officers.threshold}..{len(officers.keys)} "
            "(the officer bundle's floor .. the number of officers)"
        )
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before, not_after = spec.window(now)
    not_before = max(not_before, root.not_valid_before_utc)
    profile = spec.device_profile(default_organisation=work.name)
    # The production CA lives as long as the devices it certifies (docs/pki.md): the job
    # window limits issuing, enforced by the programmer, not certificate expiry.
    pca = certify_production_ca(
        root_key,
        root,
        csr,
        job_id=spec.job_id,
        not_before=not_before,
        not_after=profile.not_after,
        organisation=profile.organisation,
    )
    job = ProductionJob(
        job_id=spec.job_id,
        device_class=device_class,
        targets=spec.targets,
        quota=spec.quota,
        not_before=int(not_before.timestamp()),
        not_after=int(not_after.timestamp()),
        image_id=spec.image,
        manifest_sha256=hashlib.sha256(manifest_bytes).digest(),
        programmer=cert_fingerprint(programmer_cert),
        threshold=threshold,
        certificate=profile,
        production_ca=cert_fingerprint(pca),
        vendors=tuple(vendor_ca_id(c) for c in spec.vendors),
    )
    signers = []
    for i in range(threshold):
        token = work.open_token(L.officer_token(i + 1))
        signers.append(token.private_key(L.L_OFFICER))
    signed = sign_job(job, signers[:1])
    for officer in signers[1:]:
        signed = cosign_job(signed, officer)
    # What the chips will trust for this job, signed by the root they have burnt in
    # (docs/device.md): the job, its device class, the firmware-signing key, the floor.
    trust = sign_device_trust(
        DeviceTrust(
            job_id=spec.job_id,
            job_sha256=job_hash(signed),
            device_class=device_class,
            firmware_signing_key=fw_key,
            min_security_counter=manifest.security_counter,
        ),
        root_key,
    )

    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "job-issuance",
        keys=[KeyEntry.from_key(k) for k in signers],
        certificates=[CertEntry.from_certificate(pca)],
        artefacts={"job": job_hash(signed), "device-trust": hashlib.sha256(trust).digest()},
        details={"job": spec.job_id, "quota": spec.quota, "programmer": spec.programmer},
    )
    written = [
        work.write(f"{jdir}/spec.toml", read_file(spec_path, "job spec")),
        work.write(f"{jdir}/production-ca.pem", to_pem(pca)),
        work.write(f"{jdir}/device-trust.bin", trust),
        *(work.write(_vendor_file(jdir, c), to_pem(c)) for c in spec.vendors),
        work.write(f"{jdir}/job.bin", signed),  # the job is issued: recorded before it leaves
    ]
    written += _write_package(work, spec.job_id, spec.image)
    return work.finish(
        "oem issue-job",
        written,
        [tx],
        {
            "job": spec.job_id,
            "quota": spec.quota,
            "threshold": threshold,
            "package": f"outbox/job-{spec.job_id}.bin",
            "image": f"outbox/image-{spec.image}.enc",
        },
    )


def _vendor_file(jdir: str, cert: x509.Certificate) -> str:
    """The job's record of a vendor CA it names (the package ships these to the programmer)."""
    return f"{jdir}/vendors/{vendor_ca_id(cert).hex()}.pem"


def _write_package(work: PartyDir, job_id: str, image_id: str) -> list[str]:
    """The job package and the encrypted image, into the outbox, from the job as recorded."""
    jdir, idir = L.job_dir(job_id), L.image_dir(image_id)
    package = JobPackage(
        job=work.read(f"{jdir}/job.bin", "job"),
        production_ca=to_der(from_pem(work.read(f"{jdir}/production-ca.pem", "production CA"))),
        manifest=work.read(f"{idir}/manifest.bin", "manifest"),
        device_trust=work.read(f"{jdir}/device-trust.bin", "device trust"),
        vendors=tuple(
            to_der(from_pem(p.read_bytes()))
            for p in sorted(work.path(f"{jdir}/vendors").glob("*.pem"))
        ),
    )
    image = f"outbox/image-{image_id}.enc"
    copy_atomic(work.path(f"{idir}/image.enc"), work.path(image))
    return [image, work.write(f"outbox/job-{job_id}.bin", package.to_bytes())]


__all__ = ["issue_job"]
