"""One verified job: every signature and binding of a job package checked once, into one
object the later code trusts (python-tuf's trusted metadata set).

:func:`check_package` is the whole check, bytes in, typed objects out, no I/O: the job under
the officers the pinned root vouches for (threshold floor, this enclave, the window), the
manifest under the firmware-signing key and against the job, the production-CA certificate
the job names (issued by the pinned root for this job), the device-trust statement (root-signed,
saying what the job and manifest say), and the vendor CA certificates (exactly the CAs the job
names).  ``open-job`` runs it on the package the OEM sent; :meth:`OpenedJob.verify` runs it on
what ``open-job`` kept in the work directory -- files the operator could have edited -- and
checks the encrypted image against the manifest.  The production run (:func:`.provision.run_config`,
the station server), the status view and ``close-job`` all start from an :class:`OpenedJob`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError, ImageError, JobError
from securethread.formats.device_trust import DeviceTrust, verify_device_trust
from securethread.formats.identity import check_vendor_cas
from securethread.formats.image import Manifest, verify_manifest
from securethread.formats.job import VerifiedJob, verify_job
from securethread.formats.onboarding import OfficerBundle
from securethread.keys import load_spki, spki_der
from securethread.pki import cert_fingerprint, from_pem, load_der, untrusted
from securethread.programmer import layout as L
from securethread.workdir import PartyDir, file_sha256


@attrs.frozen
class Anchors:
    """What this programmer trusts a job package under: the pinned OEM root and its key
    (checked EC once, here), the officer bundle it signed, the firmware-signing key, and
    this enclave's identity."""

    root: x509.Certificate
    root_key: ec.EllipticCurvePublicKey
    officers: OfficerBundle
    firmware_key: ec.EllipticCurvePublicKey
    identity: x509.Certificate

    @classmethod
    def of(cls, work: PartyDir) -> Anchors:
        root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
        key = root.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CertificateError("expected an EC public key")
        return cls(
            root=root,
            root_key=key,
            officers=OfficerBundle.open(work.read(L.OFFICERS, "officer bundle"), key),
            firmware_key=load_spki(
                work.read(L.FIRMWARE_KEY, "firmware-signing key"), what="firmware-signing key"
            ),
            identity=from_pem(work.read(L.cert_path("identity"), "identity certificate")),
        )


@attrs.frozen
class CheckedPackage:
    """What :func:`check_package` proved: each part verified and bound to the signed job."""

    job: VerifiedJob
    manifest: Manifest | None  # None iff a "provision" job (no image)
    manifest_bytes: bytes | None
    production_ca: x509.Certificate | None  # None iff a "program" job (no certificates)
    device_trust: DeviceTrust
    device_trust_bytes: bytes
    vendor_cas: tuple[x509.Certificate, ...]
    #: A "program" job: the production CAs of the jobs whose chips it accepts, in the order
    #: of its ``provisioned_by`` (each issued by the pinned root); empty otherwise.
    provisioned_by: tuple[x509.Certificate, ...] = ()


def check_job(signed: bytes, anchors: Anchors, *, now: int | None = None) -> VerifiedJob:
    """The signed job, as this programmer's, under the officers the root vouches for."""
    return verify_job(
        signed,
        officers=anchors.officers.public_keys(),
        programmer=cert_fingerprint(anchors.identity),
        min_threshold=anchors.officers.threshold,
        now=now,
    )


def check_manifest(
    data: bytes | None, job: VerifiedJob, anchors: Anchors, *, where: str
) -> Manifest | None:
    """The manifest under the firmware-signing key, the one the job names, for its image;
    None for a "provision" job, whose package must carry none (it names no image)."""
    if data is None or not job.job.programs:
        if data is None and not job.job.programs:
            return None
        have = "carries no" if data is None else "carries a"
        raise JobError(
            f"job {job.job.job_id} is a {job.job.stage!r} job and {where} {have} manifest"
        )
    image_id, manifest_sha256 = job.job.image()
    manifest = verify_manifest(data, key=anchors.firmware_key)
    if hashlib.sha256(data).digest() != manifest_sha256:
        raise JobError(f"job {job.job.job_id} names another manifest than {where}")
    if manifest.image_id != image_id:
        raise JobError(f"the manifest is for image {manifest.image_id!r}, the job for {image_id!r}")
    return manifest


def check_production_ca(der: bytes, job: VerifiedJob, anchors: Anchors) -> x509.Certificate:
    """The production-CA certificate the signed job names, issued by the pinned root for
    this job (RFC 5280 §6.1.3 (a)(1): the signature under the issuer's key)."""
    from securethread.pki import job_id_of

    job_id = job.job.job_id
    if hashlib.sha256(der).digest() != job.job.production_ca_sha256():
        raise CertificateError(
            "the package's production-CA certificate is not the one the job names"
        )
    pca = load_der(der)
    root = anchors.root
    algorithm = pca.signature_hash_algorithm
    if algorithm is None:
        raise CertificateError("the job's production-CA certificate is not signed by the OEM root")
    try:
        anchors.root_key.verify(pca.signature, pca.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except Exception:
        raise CertificateError(
            "the job's production-CA certificate is not signed by the OEM root"
        ) from None
    if pca.issuer != root.subject:
        raise CertificateError("the job's production-CA certificate names another issuer")
    if job_id_of(pca) != job_id:
        raise CertificateError(
            f"the production-CA certificate is for job {job_id_of(pca)!r}, not {job_id!r}"
        )
    return pca


def check_device_trust(
    data: bytes, job: VerifiedJob, manifest: Manifest | None, anchors: Anchors
) -> DeviceTrust:
    """The root-signed statement the chips check (docs/device.md) must say what the job and
    manifest say: a chip would refuse anything else, after its slot was counted.  A
    provision job has no manifest: its statement's rollback floor is 0."""
    trust = verify_device_trust(data, oem_root=anchors.root)
    if (
        trust.job_id != job.job.job_id
        or trust.job_sha256 != job.sha256
        or trust.device_class != job.job.device_class
        or trust.min_security_counter != (manifest.security_counter if manifest else 0)
        or spki_der(trust.firmware_signing_key) != spki_der(anchors.firmware_key)
    ):
        raise JobError("the device-trust statement does not match the job and its manifest")
    return trust


def check_package(
    *,
    job: VerifiedJob,
    manifest: bytes | None,
    production_ca: bytes | None,
    device_trust: bytes,
    vendors: tuple[bytes, ...],
    anchors: Anchors,
    provisioned_by: tuple[bytes, ...] = (),
    where: dict[str, str] | None = None,
) -> CheckedPackage:
    """Every binding of a job package to its verified ``job`` (module docstring); ``where``
    names the parts in errors (the package's, or the work directory's files)."""
    names = {"manifest": "the package's", "vendors": "the package's vendor CA", **(where or {})}
    if (production_ca is None) != (job.job.production_ca is None):
        have = "carries no" if production_ca is None else "carries a"
        raise JobError(
            f"job {job.job.job_id} is a {job.job.stage!r} job and its package {have} "
            "production-CA certificate"
        )
    pca = None if production_ca is None else check_production_ca(production_ca, job, anchors)
    m = check_manifest(manifest, job, anchors, where=names["manifest"])
    trust = check_device_trust(device_trust, job, m, anchors)
    cas = check_vendor_cas(vendors, named=job.job.vendors, what=names["vendors"])
    named = check_provisioned_by(provisioned_by, job, anchors)
    return CheckedPackage(job, m, manifest, pca, trust, device_trust, cas, named)


def check_provisioned_by(
    certificates: tuple[bytes, ...], job: VerifiedJob, anchors: Anchors
) -> tuple[x509.Certificate, ...]:
    """A "program" job's production CAs: exactly the certificates whose SHA-256 the
    officer-signed job lists in ``provisioned_by``, in that order, each issued by the pinned
    root (RFC 5280 §6.1.3 (a)(1)); its chips are identified by the device certificates these
    CAs issued (formats/identity.py ProvisionedIdentityVerifier)."""
    named = job.job.provisioned_by
    got = tuple(hashlib.sha256(der).digest() for der in certificates)
    if got != named:
        raise JobError(
            f"job {job.job.job_id}: the production-CA certificates given are not exactly the "
            f"{len(named)} its provisioned_by names (in order)"
        )
    out = []
    for der in certificates:
        ca = load_der(der)
        algorithm = ca.signature_hash_algorithm
        try:
            if algorithm is None:
                raise ValueError("not ECDSA")
            anchors.root_key.verify(ca.signature, ca.tbs_certificate_bytes, ec.ECDSA(algorithm))
            if ca.issuer != anchors.root.subject:
                raise ValueError("another issuer")
        except Exception:
            raise CertificateError(
                f"job {job.job.job_id}: provisioned_by certificate "
                f"{ca.subject.rfc4514_string()!r} is not issued by the OEM root"
            ) from None
        out.append(ca)
    return tuple(out)


@attrs.frozen
class OpenedJob:
    """A job this programmer opened, verified again from its work directory: the package's
    checks (:func:`check_package`) on the files open-job kept, and the encrypted image
    against the manifest.  ``closed``: close-job was run (the job issues nothing more).
    A "provision" job has neither manifest nor image (``image`` None)."""

    work: PartyDir
    job_id: str
    package: CheckedPackage
    anchors: Anchors
    image: Path | None
    closed: bool

    @property
    def job(self) -> VerifiedJob:
        return self.package.job

    @property
    def manifest(self) -> Manifest:
        """The job's manifest; a :class:`JobError` for a provision job (it has none)."""
        if self.package.manifest is None:
            raise JobError(f"job {self.job_id} is a 'provision' job: it has no manifest")
        return self.package.manifest

    @property
    def manifest_bytes(self) -> bytes:
        """The signed manifest's bytes; a :class:`JobError` for a provision job."""
        if self.package.manifest_bytes is None:
            raise JobError(f"job {self.job_id} is a 'provision' job: it has no manifest")
        return self.package.manifest_bytes

    @property
    def production_ca_der(self) -> bytes:
        """The job's production CA (DER); a :class:`JobError` for a "program" job."""
        if self.package.production_ca is None:
            raise JobError(f"job {self.job_id} is a 'program' job: it has no production CA")
        return self.package.production_ca.public_bytes(serialization.Encoding.DER)

    @property
    def provisioned_by_ders(self) -> tuple[bytes, ...]:
        """A "program" job's production CAs (DER, in its ``provisioned_by`` order)."""
        cas = self.package.provisioned_by
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in cas)

    @property
    def vendor_ca_ders(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in self.package.vendor_cas)

    @property
    def oem_root_der(self) -> bytes:
        return self.anchors.root.public_bytes(serialization.Encoding.DER)

    @classmethod
    def verify(
        cls,
        work: PartyDir,
        job_id: str,
        *,
        step: str = "provision",
        now: int | None = None,
        within_window: bool = True,
        image: bool = True,
    ) -> OpenedJob:
        """Verify opened job ``job_id`` of ``work`` (see the class).  ``within_window=False``
        checks the job at its own start (close-job and the status view work after the
        window); ``image=False`` skips hashing the encrypted image (status view)."""
        jdir = L.job_dir(job_id)
        work.require(f"{jdir}/job.bin", step=f"{step} {job_id}", needs=f"open-job ({job_id})")
        anchors = Anchors.of(work)
        signed = work.read(f"{jdir}/job.bin", "job")
        if within_window:
            job = check_job(signed, anchors, now=now)
        else:
            from securethread.formats.job import verify_job_signatures

            start = verify_job_signatures(
                signed,
                officers=anchors.officers.public_keys(),
                min_threshold=anchors.officers.threshold,
            ).job.not_before
            job = check_job(signed, anchors, now=start)
        pca_der = None
        if job.job.production_ca is not None:  # a "program" job issues no certificate
            pca_pem = work.read(f"{jdir}/production-ca.pem", "production CA")
            pca_der = from_pem(pca_pem).public_bytes(serialization.Encoding.DER)
            if hashlib.sha256(pca_der).digest() != job.job.production_ca_sha256():
                raise JobError(
                    f"{jdir}/production-ca.pem is not the production CA job {job_id} names"
                )
        provisioned_by = tuple(
            from_pem(work.read(rel, "provisioned-by production CA")).public_bytes(
                serialization.Encoding.DER
            )
            for rel in (L.provisioned_by_path(job_id, h) for h in job.job.provisioned_by)
        )
        vendors = []
        for ca_id in job.job.vendors:
            rel = L.vendor_ca_path(job_id, ca_id)
            cert = untrusted.load_certificate_pem(work.read(rel, "vendor CA certificate"), what=rel)
            vendors.append(cert.public_bytes(serialization.Encoding.DER))
        package = check_package(
            job=job,
            manifest=work.read(f"{jdir}/manifest.bin", "manifest") if job.job.programs else None,
            production_ca=pca_der,
            device_trust=work.read(f"{jdir}/device-trust.bin", "device trust"),
            vendors=tuple(vendors),
            anchors=anchors,
            provisioned_by=provisioned_by,
            where={"manifest": f"{jdir}/manifest.bin", "vendors": f"{jdir}/vendors/"},
        )
        path = None
        if package.manifest is not None:  # a job that programs: the image it writes
            path = work.path(f"{jdir}/image.enc")
            if image and file_sha256(path) != package.manifest.ciphertext_sha256:
                raise ImageError(
                    f"{jdir}/image.enc does not match its manifest (altered or truncated)"
                )
        return cls(work, job_id, package, anchors, path, work.exists(f"{jdir}/ledger.bin"))

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "job_sha256": self.job.sha256.hex(),
            "quota": self.job.job.quota,
            "stage": self.job.job.stage,
            "image": self.job.job.image_id,
            "closed": self.closed,
        }


__all__ = [
    "Anchors",
    "CheckedPackage",
    "OpenedJob",
    "check_device_trust",
    "check_job",
    "check_manifest",
    "check_package",
    "check_production_ca",
]
