"""Flows 7-8 at the programming centre: ``securethread programmer provision --job J``.

Builds the run of an opened job from the programmer's own work directory -- everything is
verified again before the line starts: the job (officers' signatures at the bundle's
threshold floor, this enclave, the validity window), the manifest (firmware-signing key,
the job's hash), the encrypted image (the manifest's digest), the production-CA certificate
(the one the job names), the vendor CA certificates open-job kept (exactly the CAs the job
names: which fabs the line trusts is the OEM's decision, never the caller's), the
device-trust statement -- and hands the devices to the runner
(:mod:`securethread.programmer.runner`: one run per job at a time, the store checked against
the token's quota mark, batches counted before release and programmed at once, signals).

The devices come from the caller as picklable port factories: the programmer package knows
the line's protocol, never a particular chip (the CLI and the demo bring simulated ones).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    DeviceRefusedError,
    Error,
    JobError,
    QuotaExceededError,
)
from securethread.formats.boot import verify_boot_confirmation
from securethread.formats.identity import check_vendor_cas
from securethread.formats.image import Manifest
from securethread.formats.job import Targets, VerifiedJob
from securethread.formats.provisioning import ProvisioningData
from securethread.keys import spki_der
from securethread.pki import device_id_of, untrusted
from securethread.programmer import layout as L
from securethread.programmer.jobs import verified_job
from securethread.programmer.line import BootVerifier, Packager
from securethread.programmer.opened import OpenedJob
from securethread.programmer.runner import KeyLabels, PortFactory, Progress, RunConfig, run
from securethread.workdir import PartyDir, StepResult


@attrs.frozen
class StandardSbm:
    """The runner's SBM interface for chips that follow docs/device.md: provisioning data
    v2 (:mod:`securethread.formats.provisioning`) and signed boot confirmations
    (:mod:`securethread.formats.boot`).  Picklable: it goes to every worker."""

    production_ca: bytes
    oem_root: bytes
    device_trust: bytes

    def packager(self, job_sha256: bytes) -> Packager:
        return ProvisioningData.packager(
            production_ca_certificate=x509.load_der_x509_certificate(self.production_ca),
            oem_root_certificate=x509.load_der_x509_certificate(self.oem_root),
            device_trust=self.device_trust,
            job_sha256=job_sha256,
        )

    def boot_verifier(self, manifest: Manifest) -> BootVerifier:
        def verify(cert: x509.Certificate, nonce: bytes, boot: bytes) -> None:
            key = cert.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise DeviceRefusedError("device certificate without an EC key")
            verify_boot_confirmation(
                boot,
                device_public_key=key,
                device_id=device_id_of(cert),
                manifest=manifest,
                nonce=nonce,
            )

        return verify


def job_targets(workdir: str | os.PathLike[str], job_id: str) -> Targets:
    """The targets of opened job ``job_id`` (its signed job verified again)."""
    work = L.open_programmer(workdir)
    jdir = L.job_dir(job_id)
    work.require(f"{jdir}/job.bin", step=f"provision {job_id}", needs=f"open-job ({job_id})")
    return verified_job(work, work.read(f"{jdir}/job.bin", "job")).job.targets


def job_programs(workdir: str | os.PathLike[str], job_id: str) -> bool:
    """Whether opened job ``job_id`` programs its devices (False: a "provision" job, whose
    line stops once the provisioning data is burnt); its signed job verified again."""
    work = L.open_programmer(workdir)
    jdir = L.job_dir(job_id)
    work.require(f"{jdir}/job.bin", step=f"provision {job_id}", needs=f"open-job ({job_id})")
    return verified_job(work, work.read(f"{jdir}/job.bin", "job")).job.programs


def job_vendor_cas(work: PartyDir, job: VerifiedJob) -> tuple[bytes, ...]:
    """The vendor CA certificates (DER) of opened job ``job``, each checked again against
    the hash the job names: the files are the operator's to edit, the job is not."""
    ders = []
    for ca_id in job.job.vendors:
        rel = L.vendor_ca_path(job.job.job_id, ca_id)
        cert = untrusted.load_certificate_pem(work.read(rel, "vendor CA certificate"), what=rel)
        ders.append(cert.public_bytes(serialization.Encoding.DER))
    check_vendor_cas(ders, named=job.job.vendors, what=f"{L.job_dir(job.job.job_id)}/vendors/")
    return tuple(ders)


def run_config(
    work: PartyDir, job_id: str, *, workers: int, batch_size: int
) -> RunConfig:
    """The run of job ``job_id``, from this work directory: the job package verified once
    (:meth:`~securethread.programmer.opened.OpenedJob.verify`), its verified parts handed on."""
    jdir = L.job_dir(job_id)
    work.require(f"{jdir}/job.bin", step=f"provision {job_id}", needs=f"open-job ({job_id})")
    if work.exists(f"{jdir}/ledger.bin"):
        raise JobError(f"job {job_id} was closed (close-job); it provisions no more devices")
    return opened_run_config(OpenedJob.verify(work, job_id), workers=workers, batch_size=batch_size)


def opened_run_config(opened: OpenedJob, *, workers: int, batch_size: int) -> RunConfig:
    """The run of an :class:`OpenedJob` (nothing verified again here)."""
    job, jdir = opened.job, L.job_dir(opened.job_id)
    devices = opened.work.path(f"{jdir}/devices")
    devices.mkdir(exist_ok=True)
    # a "program" job certifies nothing: no production CA; its chips' CAs instead
    pca_der = opened.production_ca_der if job.job.production_ca is not None else b""
    programs = job.job.programs  # a "provision" job: no manifest, image or image key
    return RunConfig(
        job=job,
        manifest=opened.manifest_bytes if programs else None,
        firmware_key=spki_der(opened.anchors.firmware_key),
        image=str(opened.image) if programs else None,
        store=str(opened.work.path(f"{jdir}/store.sqlite")),
        certificates=str(devices),
        production_ca=pca_der,
        vendor_roots=opened.vendor_ca_ders,
        provisioned_by=opened.provisioned_by_ders,
        oem_root=opened.oem_root_der,
        sbm=StandardSbm(pca_der, opened.oem_root_der, opened.package.device_trust_bytes),
        labels=KeyLabels(
            production_ca=L.production_ca_label(opened.job_id),
            image_key=L.image_key_label(job.job.image()[0]) if programs else None,
        ),
        token=L.TOKEN,
        workers=workers,
        batch_size=batch_size,
    )


def provision(
    workdir: str | os.PathLike[str],
    *,
    job_id: str,
    chips: Iterable[PortFactory],
    workers: int = 1,
    batch_size: int = 32,
    progress: Callable[[Progress], None] | None = None,
) -> StepResult:
    """Provision and program ``chips`` under opened job ``job_id``; run again to resume.

    The line accepts chips certified by the vendor CAs the job names, and no other: the
    caller chooses which chips are on the line, never which fabs are trusted.  The
    step's ``problem`` is set (and the CLI exits non-zero) when devices were refused or the
    quota is used up; a signal or a dead worker ends it with the runner's error, whose
    partial result is kept in the transcript.
    """
    work = L.open_programmer(workdir)
    config = run_config(work, job_id, workers=workers, batch_size=batch_size)
    pin = work.pin_callback()
    work.activate()
    result = run(config, chips, pin=pin, progress=progress)
    details: dict[str, Any] = {
        **result.to_json(),
        "booted": result.programmed,
        "job": job_id,
    }
    return work.finish(
        "programmer provision", [f"{L.job_dir(job_id)}/devices"], (), details, _problem(result)
    )


def _problem(result: Any) -> Error | None:
    refused: dict[str, int] = dict(result.refused)
    over = refused.pop(QuotaExceededError.__name__, 0)
    if over:
        return QuotaExceededError(
            f"{over} device(s) refused: the job's quota of {result.quota} devices is used up"
        )
    bad = sum(refused.values()) + sum(result.not_programmed.values())
    if bad:
        kinds = ", ".join(
            f"{n} {k}" for k, n in sorted({**refused, **result.not_programmed}.items())
        )
        first = next(
            (n.message for n in result.notes if n.kind != QuotaExceededError.__name__), None
        )
        return DeviceRefusedError(
            f"{bad} device(s) refused or not programmed ({kinds})"
            + (f"; first: {first}" if first else "")
        )
    return None


__all__ = [
    "StandardSbm",
    "job_programs",
    "job_targets",
    "job_vendor_cas",
    "opened_run_config",
    "provision",
    "run_config",
]
