"""Zero-secret programming at the OEM: ``oem prelicense`` and ``oem reconcile-lot``.

``oem prelicense LOT --vendor-ca CA --image I --factory F`` (:func:`prelicense`):

1. verifies the vendor's lot manifest once, under the vendor CA the OEM names on its own
   command line (never one the lot names; :func:`securethread.formats.lot.verify_lot`);
2. makes the lot's production CA key in the OEM token, certified by the root for the lot job
   ``lot.<lot id>`` (the same issue code as a job's production CA), and the lot job's
   device-trust statement, signed by the root like a job's;
3. per chip, in the OEM token: the device certificate (the job's
   :class:`~securethread.pki.DeviceCertificateIssuer`, the profile's SAN, CRLDP and OCSP) and
   a license wrapping image ``I``'s key to the chip's key (ECDH-ES inside the token, the
   programmer's :class:`~securethread.formats.license.LicenseIssuer` code path with the
   OEM's own image key, which never leaves the token: it is only ever wrapped to a chip);
4. writes the programming package for factory ``F`` and this lot, signed by the root, to the
   outbox beside the encrypted image, keeps it and the lot in ``lots/<lot>/``, and records
   the step in the OEM's transcript.

The licenses are signed by a license-signing key in the OEM token certified by the root as a
``programmer``-role enclave ``<oem>-prelicensing`` (the role a chip's SBM accepts for a license
signer, docs/device.md), with a key-agreement key beside it; both are made the first time.

``oem reconcile-lot CONFIRMATIONS --lot L`` (:func:`reconcile_lot`) checks what the factory
returned against the package the OEM kept: every boot confirmation verifies under the chip's
key from the lot, reports the package's image, and names a chip of the lot, each at most once.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing
import os
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509

from securethread.errors import ConfigurationError, FormatError, JobError, VerificationError
from securethread.formats.boot import BootConfirmationError, verify_recorded_boot_confirmation
from securethread.formats.device_trust import DeviceTrust, sign_device_trust
from securethread.formats.identity import check_vendor_cas, vendor_ca_id
from securethread.formats.image import verify_manifest
from securethread.formats.license import LicenseIssuer
from securethread.formats.lot import MAX_LOT_SIZE, LotSizeError, VerifiedLot, verify_lot
from securethread.formats.programming import (
    Confirmations,
    PackageChip,
    ProgrammingPackage,
    lot_job_hash,
    sign_package,
    verify_package,
)
from securethread.formats.transcript import CertEntry, KeyEntry
from securethread.hsm import Token
from securethread.oem import layout as L
from securethread.oem.jobspec import JobSpecError, certificate_table, device_profile
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    EnclavePurpose,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    from_pem,
    to_der,
    untrusted,
)
from securethread.workdir import (
    PartyDir,
    StepResult,
    check_name,
    copy_atomic,
    file_sha256,
    read_file,
    to_pem,
)

__all__ = ["L_KEY_AGREEMENT", "L_LICENSE_SIGNING", "LotReport", "prelicense", "reconcile_lot"]

L_LICENSE_SIGNING = "prelicense-license-signing"
L_KEY_AGREEMENT = "prelicense-key-agreement"
#: At most this many chips per task handed to a worker process (each task opens the token).
_CHUNK = 2000


def lot_dir(lot_id: str) -> str:
    return f"lots/{check_name('lot id', lot_id)}"


def lot_job_id(lot_id: str) -> str:
    """The job id a lot's production CA and device certificates name."""
    return f"lot.{lot_id}"


# --- inputs ---------------------------------------------------------------------------------


def _vendor(path: str | os.PathLike[str]) -> x509.Certificate:
    cert = untrusted.load_certificate_pem(
        read_file(path, "vendor CA certificate", limit=64 << 10),
        what=f"vendor CA certificate {os.fspath(path)!r}",
    )
    check_vendor_cas(
        [to_der(cert)], named={vendor_ca_id(cert)}, what="--vendor-ca certificate"
    )  # a CA certificate (cA, keyCertSign)
    return cert


def _profile(path: str | os.PathLike[str] | None, organisation: str) -> DeviceProfile:
    """The device certificate profile: the ``[certificate]`` table of a TOML file, checked
    as a job spec's (docs/cli.md); without a file, the OEM's name as organisation."""
    c: dict[str, Any] = {}
    if path is not None:
        raw = read_file(path, "certificate profile", limit=1 << 20)
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise JobSpecError(f"profile {os.fspath(path)!r} is not valid TOML: {exc}") from None
        if set(doc) - {"certificate"}:
            raise JobSpecError(f"profile {os.fspath(path)!r}: only a [certificate] table")
        c = certificate_table(doc, required=True)
    return device_profile(c, default_organisation=organisation)


# --- the OEM's licensing enclave --------------------------------------------------------------


def _licensing_keys(work: PartyDir, oem: Token) -> list[CertEntry]:
    """Make the license-signing and key-agreement keys the first time (certified by the
    root as the ``programmer``-role enclave ``<oem>-prelicensing``); return what was made."""
    if oem.has_certificate(L_LICENSE_SIGNING) and oem.has_certificate(L_KEY_AGREEMENT):
        return []
    for label in (L_LICENSE_SIGNING, L_KEY_AGREEMENT):
        if oem.has_key(label):  # made by a run killed before its certificate: start again
            oem.destroy(label)
    root_key, root = oem.private_key(L.L_ROOT), oem.certificate(L.L_ROOT)
    identity = oem.private_key(L.L_IDENTITY)
    name = f"{work.name}-prelicensing"[:64]
    made = []
    for label, purpose, signer in (
        (L_LICENSE_SIGNING, EnclavePurpose.LICENSE_SIGNING, None),
        (L_KEY_AGREEMENT, EnclavePurpose.KEY_AGREEMENT, identity),
    ):
        csr = create_enclave_csr(
            oem, label=label, enclave_name=name, purpose=purpose, signer=signer
        )
        cert = certify_enclave(
            root_key, root, csr, enclave_name=name, purpose=purpose, role="programmer",
            valid_days=3650,
            proof_key=identity.public_key() if signer is not None else None,
        )  # fmt: skip
        oem.store_certificate(label, cert)
        made.append(CertEntry.from_certificate(cert))
    return made


def _production_ca(
    work: PartyDir, oem: Token, lot_id: str, profile: DeviceProfile
) -> tuple[str, x509.Certificate, bool]:
    """The lot's production CA (label, certificate, made now?): made once, kept in
    ``lots/<lot>/production-ca.pem``; a run killed after it reuses it."""
    label, pem = f"lot-ca-{lot_id}", f"{lot_dir(lot_id)}/production-ca.pem"
    if oem.has_key(label):
        if work.exists(pem):
            return label, from_pem(work.read(pem, "lot production CA")), False
        oem.destroy(label)  # a key whose certificate was never written: nothing used it
    root_key, root = oem.private_key(L.L_ROOT), oem.certificate(L.L_ROOT)
    job_id = lot_job_id(lot_id)
    csr = create_production_ca_csr(oem, label=label, job_id=job_id)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    pca = certify_production_ca(
        root_key, root, csr, job_id=job_id,
        not_before=max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc),
        not_after=profile.not_after, organisation=profile.organisation, oem_arc=profile.oem_arc,
    )  # fmt: skip
    work.write(pem, to_pem(pca))
    return label, pca, True


# --- per chip -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Plan:
    """What a worker needs to issue a range of chips (picklable)."""

    workdir: str
    ca_label: str
    production_ca: bytes
    job_id: str
    job_sha256: bytes
    profile: DeviceProfile
    manifest: bytes
    image_label: str


def _issue(plan: _Plan, oem: Token, chips: Sequence[tuple[str, bytes, int]]) -> list[bytes]:
    """Certificate and license of each ``(device_id, point, sequence)``, in the token;
    returns CBOR-ready pairs flattened as ``[cert, license, cert, license, ...]``."""
    from securethread.formats.lot import LotChip, key_id_of_point

    fw_key = untrusted.load_public_key_pem(
        PartyDir.open(plan.workdir, L.PARTY).read(L.FIRMWARE_KEY, "firmware-signing key"),
        what="firmware-signing key",
    )
    manifest = verify_manifest(plan.manifest, key=fw_key)
    pca = x509.load_der_x509_certificate(plan.production_ca)
    issuer = DeviceCertificateIssuer(
        oem.private_key(plan.ca_label), pca, job_id=plan.job_id, job_tag=plan.job_sha256,
        profile=plan.profile,
    )  # fmt: skip
    licenses = LicenseIssuer(
        ka_key=oem.private_key(L_KEY_AGREEMENT),
        ka_certificate=oem.certificate(L_KEY_AGREEMENT),
        signing_key=oem.private_key(L_LICENSE_SIGNING),
        signing_certificate=oem.certificate(L_LICENSE_SIGNING),
        image_key=oem.secret_key(plan.image_label),
        manifest=manifest,
    )
    out: list[bytes] = []
    for device_id, point, seq in chips:
        key = LotChip(device_id, point, key_id_of_point(point)).public_key()
        out.append(to_der(issuer.issue(key, device_id, seq)))
        out.append(licenses.issue(device_id, key))
    return out


def _worker(plan: _Plan, chips: Sequence[tuple[str, bytes, int]]) -> list[bytes]:
    """A worker process: its own module load and login (docs/hsm.md: parallel work
    belongs in worker processes)."""
    oem = L.open_oem(plan.workdir).open_token(L.TOKEN)
    return _issue(plan, oem, chips)


def _issue_all(
    plan: _Plan, oem: Token, lot: VerifiedLot, workers: int
) -> list[tuple[bytes, bytes]]:
    chips = [(c.device_id, c.point, i) for i, c in enumerate(lot.manifest.chips)]
    if workers <= 1 or len(chips) < 2 * workers:
        flat = _issue(plan, oem, chips)
    else:
        size = min(_CHUNK, -(-len(chips) // workers))
        parts = [chips[i : i + size] for i in range(0, len(chips), size)]
        ctx = multiprocessing.get_context("spawn")  # never fork a process with the module loaded
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            flat = [x for part in pool.map(_worker, [plan] * len(parts), parts) for x in part]
    return list(zip(flat[0::2], flat[1::2], strict=True))


# --- the step -------------------------------------------------------------------------------------


def prelicense(
    workdir: str | os.PathLike[str],
    lot_path: str | os.PathLike[str],
    *,
    vendor_ca: str | os.PathLike[str],
    image: str,
    factory: str,
    profile: str | os.PathLike[str] | None = None,
    workers: int = 1,
) -> StepResult:
    """Pre-license a vendor's lot for ``factory`` (see the module docstring).

    Every check on the inputs comes before the token is opened: a refused lot changes
    nothing.  A lot is pre-licensed once; run again after a kill before the package, it
    reuses the lot's production CA and starts the chips again (nothing left the OEM before
    the package); after a kill once all is written, before its answer was out, it gives that
    answer (``PartyDir.done_before``)."""
    t0 = time.perf_counter()
    work = L.open_oem(workdir)
    check_name("factory", factory)
    if not 1 <= workers <= 64:
        raise ConfigurationError(f"--workers must be 1..64, got {workers}")
    data = read_file(lot_path, "lot manifest", limit=MAX_LOT_SIZE + 1)
    if len(data) > MAX_LOT_SIZE:
        raise LotSizeError(f"lot manifest: more than {MAX_LOT_SIZE} bytes")
    t_lot = time.perf_counter()
    lot = verify_lot(data, vendor_cas=[_vendor(vendor_ca)])
    t_lot = time.perf_counter() - t_lot
    ldir = lot_dir(lot.lot_id)
    step = f"prelicense of lot {lot.lot_id}"
    if (earlier := work.done_before(f"{ldir}/package.bin", step=step)) is not None:
        return earlier  # done, and killed before its answer was out: that answer
    idir = L.image_dir(image)
    work.require(f"{idir}/manifest.bin", step="prelicense", needs=f"master-image ({image})")
    manifest_bytes = work.read(f"{idir}/manifest.bin", "manifest")
    fw_key = untrusted.load_public_key_pem(
        work.read(L.FIRMWARE_KEY, "firmware-signing key"), what="firmware-signing key"
    )
    manifest = verify_manifest(manifest_bytes, key=fw_key)
    if manifest.device_class != lot.manifest.device_class:
        raise JobError(
            f"lot {lot.lot_id} is of device class {lot.manifest.device_class!r}, image "
            f"{image!r} is for {manifest.device_class!r}"
        )
    prof = _profile(profile, work.name)

    oem = work.open_token(L.TOKEN)
    image_label = L.image_key_label(image)
    oem.secret_key(image_label)  # KeyNotFoundError names it before anything is made
    made = _licensing_keys(work, oem)
    ca_label, pca, new_ca = _production_ca(work, oem, lot.lot_id, prof)
    job_id = lot_job_id(lot.lot_id)
    job_sha256 = lot_job_hash(
        job_id=job_id,
        factory=factory,
        lot_sha256=lot.sha256,
        manifest_sha256=hashlib.sha256(manifest_bytes).digest(),
        production_ca_sha256=hashlib.sha256(to_der(pca)).digest(),
    )
    root_key, root = oem.private_key(L.L_ROOT), oem.certificate(L.L_ROOT)
    trust = sign_device_trust(
        DeviceTrust(
            job_id=job_id,
            job_sha256=job_sha256,
            device_class=manifest.device_class,
            firmware_signing_key=fw_key,
            min_security_counter=manifest.security_counter,
        ),
        root_key,
    )
    plan = _Plan(
        workdir=os.fspath(work.root), ca_label=ca_label, production_ca=to_der(pca),
        job_id=job_id, job_sha256=job_sha256, profile=prof, manifest=manifest_bytes,
        image_label=image_label,
    )  # fmt: skip
    t_issue = time.perf_counter()
    issued = _issue_all(plan, oem, lot, workers)
    t_issue = time.perf_counter() - t_issue
    enc = work.path(f"{idir}/image.enc")
    package = ProgrammingPackage(
        factory=factory,
        lot_id=lot.lot_id,
        lot_sha256=lot.sha256,
        job_id=job_id,
        job_sha256=job_sha256,
        image_id=image,
        image_sha256=_file_sha256(enc),
        manifest=manifest_bytes,
        production_ca=to_der(pca),
        device_trust=trust,
        chips=tuple(
            PackageChip(c.device_id, c.key_id, cert, lic)
            for c, (cert, lic) in zip(lot.manifest.chips, issued, strict=True)
        ),
    )
    signed = sign_package(package, root_key)
    checked = verify_package(signed, oem_root=root, factory=factory, lot_id=lot.lot_id)

    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "lot-prelicensing",
        keys=[KeyEntry.from_key(oem.private_key(ca_label))] if new_ca else [],
        certificates=[*made, CertEntry.from_certificate(pca)],
        artefacts={
            "lot": lot.sha256,
            "package": checked.sha256,
            "device-trust": hashlib.sha256(trust).digest(),
        },
        details={
            "lot": lot.lot_id,
            "factory": factory,
            "image": image,
            "chips": len(lot),
            "job": job_id,
            "vendor-ca": vendor_ca_id(lot.vendor).hex(),
        },
    )
    out_pkg, out_img = f"outbox/package-{lot.lot_id}.bin", f"outbox/image-{image}.enc"
    written = [
        work.write(f"{ldir}/lot.bin", data),
        work.write(f"{ldir}/vendor-ca.pem", to_pem(lot.vendor)),
        work.write(f"{ldir}/device-trust.bin", trust),
        work.write(
            f"{ldir}/prelicense.json",
            json.dumps({"factory": factory, "image": image, "chips": len(lot)}).encode(),
        ),
        work.write(out_pkg, signed),
    ]
    copy_atomic(enc, work.path(out_img))
    written += [out_img, f"{ldir}/package.bin"]
    result = work.finish(
        "oem prelicense",
        written,
        [tx],
        {
            "lot": lot.lot_id,
            "factory": factory,
            "image": image,
            "chips": len(lot),
            "job": job_id,
            "package": out_pkg,
            "package_sha256": checked.sha256.hex(),
            "lot_sha256": lot.sha256.hex(),
            "workers": workers,
            "lot_verify_s": round(t_lot, 3),
            "issue_s": round(t_issue, 3),
            "elapsed_s": round(time.perf_counter() - t0, 3),
        },
    )
    result = work.pending(step, result)  # the answer recorded before the step is marked done
    # Last: marks the lot pre-licensed, and is the OEM's record of it (reconcile-lot reads it).
    work.write(f"{ldir}/package.bin", signed)
    return result


def _file_sha256(path: Path) -> bytes:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {str(path)!r}: {exc.strerror}") from None


# --- reconciliation ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LotReport:
    """What the factory's confirmations prove about a pre-licensed lot."""

    lot_id: str
    factory: str
    licensed: int
    confirmed: tuple[str, ...]
    missing: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]  # (device id, why)

    @property
    def ok(self) -> bool:
        return not self.refused

    def to_json(self) -> dict[str, Any]:
        return {
            "lot": self.lot_id,
            "factory": self.factory,
            "licensed": self.licensed,
            "confirmed": len(self.confirmed),
            "missing": len(self.missing),
            "refused": [{"device": d, "reason": r} for d, r in self.refused],
            "missing_devices": list(self.missing[:100]),
        }


def reconcile_lot(
    workdir: str | os.PathLike[str], confirmations: str | os.PathLike[str], *, lot_id: str
) -> StepResult:
    """Check a factory's confirmations against the package this OEM issued for ``lot_id``
    and the lot it verified; write ``lots/<lot>/reconciliation.json``.  A confirmation that
    does not verify, names a chip outside the lot or reports another image is *refused*
    (listed, and the step fails with exit code 4); a licensed chip with no confirmation is
    *missing*."""
    work = L.open_oem(workdir)
    ldir = lot_dir(lot_id)
    work.require(f"{ldir}/package.bin", step="reconcile-lot", needs=f"prelicense ({lot_id})")
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    lot = verify_lot(
        work.read(f"{ldir}/lot.bin", "lot manifest"),
        vendor_cas=[from_pem(work.read(f"{ldir}/vendor-ca.pem", "vendor CA"))],
    )
    pkg_bytes = read_file(work.path(f"{ldir}/package.bin"), "programming package", limit=1 << 30)
    factory = _recorded_factory(work, ldir)
    package = verify_package(pkg_bytes, oem_root=root, factory=factory, lot_id=lot_id)
    conf = Confirmations.from_bytes(read_file(confirmations, "confirmations", limit=1 << 30))
    if (conf.package_sha256, conf.lot_id, conf.factory) != (package.sha256, lot_id, factory):
        raise VerificationError(
            f"the confirmations are for package {conf.package_sha256.hex()[:16]}… of lot "
            f"{conf.lot_id!r} at factory {conf.factory!r}, not the package this OEM issued "
            f"for lot {lot_id!r} at {factory!r} ({package.sha256.hex()[:16]}…)"
        )
    licensed = {c.device_id for c in package.package.chips}
    confirmed, refused = [], []
    for device_id, data in sorted(conf.confirmations.items()):
        chip = lot.by_id.get(device_id)
        if chip is None or device_id not in licensed:
            refused.append((device_id, "not a chip of the lot the OEM pre-licensed"))
            continue
        try:
            verify_recorded_boot_confirmation(
                data,
                device_public_key=chip.public_key(),
                device_id=device_id,
                manifest=package.manifest,
            )
        except (BootConfirmationError, FormatError) as exc:
            refused.append((device_id, str(exc)))
            continue
        confirmed.append(device_id)
    report = LotReport(
        lot_id=lot_id,
        factory=factory,
        licensed=len(licensed),
        confirmed=tuple(confirmed),
        missing=tuple(sorted(licensed - set(confirmed))),
        refused=tuple(refused),
    )
    written = [
        work.write(
            f"{ldir}/reconciliation.json",
            json.dumps(report.to_json(), indent=2, sort_keys=True).encode(),
        )
    ]
    problem = (
        VerificationError(f"{len(refused)} confirmation(s) refused (first: {refused[0][0]}: "
                          f"{refused[0][1]})")  # fmt: skip
        if refused
        else None
    )
    return work.finish("oem reconcile-lot", written, (), report.to_json(), problem)


def _recorded_factory(work: PartyDir, ldir: str) -> str:
    """The factory the OEM pre-licensed the lot for (its own record; the package's root
    signature, verified next, must name the same)."""
    try:
        factory = json.loads(work.read(f"{ldir}/prelicense.json", "pre-licensing record"))
        return check_name("factory", factory["factory"])
    except (ValueError, KeyError, TypeError):
        raise ConfigurationError(f"{ldir}/prelicense.json is damaged") from None
