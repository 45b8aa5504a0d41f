"""The end-to-end production demo on the embedded default (SoftHSM tokens + SQLite).

It runs the whole chain of trust in a work directory, every step through the library:
OEM key ceremony, programmer onboarding, image mastering, secure channel and key
transfer, a signed job with quota N, N simulated devices provisioned and programmed (in
K worker processes), three more refused for quota, one outside the targets refused, one
tampered image refused by a device's SBM, the ledger reconciled and both ceremony
transcripts verified.

Work directory layout (see README): ``hsm/`` (SoftHSM config, tokens, demo PINs),
``oem/`` (root and identity certificates, officer-key bundle, firmware, encrypted image,
manifest, job, OEM transcript), ``programmer/`` (certificates, production database, transcript),
``job/`` (production CA, device certificates, ledger export, reconciliation report).
"""

from __future__ import annotations

import datetime
import io
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import envelope, ledger
from .channel import OemChannel, ProgrammerChannel
from .device import ProvisioningData, SiliconVendor, SimulatedDevice, verify_boot_confirmation
from .errors import ConfigurationError, Error, ImageError, NotTargetedError, QuotaExceededError
from .hsm import IMAGE_KEY, SIGNING, Curve, KeyBackend, Token, fingerprint, open_token, spki_der
from .identity import IdentityVerifier
from .image import Manifest, master_image, verify_manifest
from .job import ProductionJob, Targets, VerifiedJob, cosign_job, sign_job, verify_job
from .license import LicenseIssuer
from .pki import (
    DeviceCertificateIssuer,
    EnclavePurpose,
    cert_fingerprint,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    install_certificate,
    to_pem,
)
from .production import ProductionLine, Provisioned, Refused
from .reconcile import reconcile
from .store import SQLiteStore
from .transcript import CertEntry, KeyEntry, Transcript, verify_transcript
from .transfer import KeyReceiver, KeySender

MARKER = ".securethread-demo"
JOB_ID = "demo-job-1"
IMAGE_ID = "fw-sensor-1"
DEVICE_CLASS = "sensor-v1"
DEVICE_BASE = 0x5EC0_0000_0000_0000
OFFICERS_KIND = "officer-keys"

L_ROOT, L_OEM_ID, L_FW, L_IMAGE = "oem-root-ca", "oem-identity", "firmware-signing", "image-key-1"
L_OFFICERS = ("officer-1", "officer-2")
L_PROG_ID, L_LICENSE, L_LEDGER, L_KA = (
    "programmer-identity",
    "license-signing",
    "ledger-signing",
    "key-agreement",
)
L_PCA = "production-ca-" + JOB_ID


def _write_pem(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(to_pem(cert))


def _prepare_workdir(workdir: Path) -> None:
    """Create the work directory; restart a previous demo's directory from scratch."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise ConfigurationError(
                f"work directory {str(workdir)!r} is not empty and not a securethread demo"
            )
        for sub in ("hsm", "oem", "programmer", "job"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    for sub in ("oem", "programmer", "job/devices"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by securethread demo\n")


@attrs.frozen
class ChipSpec:
    """A simulated chip as data, so worker processes can rebuild it."""

    device_id: str
    private_key_der: bytes
    vendor_certificate_der: bytes

    def build(self) -> SimulatedDevice:
        key = serialization.load_der_private_key(self.private_key_der, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return SimulatedDevice(
            device_id=self.device_id,
            private_key=key,
            vendor_certificate=x509.load_der_x509_certificate(self.vendor_certificate_der),
        )


def make_chips(vendor: SiliconVendor, uids: Sequence[int]) -> list[ChipSpec]:
    """Chips with chosen UIDs (the fab assigns them), keys generated "on chip"."""
    out = []
    for uid in uids:
        device_id = f"{uid:016x}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = vendor.certify(device_id, key.public_key())
        out.append(
            ChipSpec(
                device_id=device_id,
                private_key_der=key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                vendor_certificate_der=cert.public_bytes(serialization.Encoding.DER),
            )
        )
    return out


# --- the programmer's production line, as workers rebuild it ---------------------------------


@attrs.frozen
class LineConfig:
    """Everything a worker process needs to rebuild the programmer's line (picklable)."""

    workdir: str
    job_signed: bytes
    officer_keys: tuple[bytes, ...]  # SPKI DER
    programmer_fp: bytes
    root_der: bytes
    production_ca_der: bytes
    vendor_root_der: bytes
    manifest: bytes
    firmware_signing_spki: bytes
    batch_size: int = 32
    #: Where simulated devices note that they received their provisioning data (tests use it
    #: to check after a crash that every device holding secrets is in the ledger).
    release_log: str | None = None


def open_line(cfg: LineConfig, token: KeyBackend) -> tuple[ProductionLine, Manifest]:
    """Build the programmer's production line from the keys in ``token``."""
    from .hsm import load_spki

    root = x509.load_der_x509_certificate(cfg.root_der)
    pca = x509.load_der_x509_certificate(cfg.production_ca_der)
    officers = {fingerprint(k): k for k in (load_spki(d) for d in cfg.officer_keys)}
    job = verify_job(cfg.job_signed, officers=officers, programmer=cfg.programmer_fp)
    fw_key = load_spki(cfg.firmware_signing_spki)
    manifest = verify_manifest(cfg.manifest, key=fw_key)
    issuer = DeviceCertificateIssuer(token.private_key(L_PCA), pca, job_id=job.job.job_id)
    licenses = LicenseIssuer(
        ka_key=token.private_key(L_KA),
        ka_certificate=token.certificate(L_KA),
        signing_key=token.private_key(L_LICENSE),
        signing_certificate=token.certificate(L_LICENSE),
        image_key=token.secret_key(L_IMAGE),
        manifest=manifest,
    )
    verifier = IdentityVerifier([x509.load_der_x509_certificate(cfg.vendor_root_der)])
    package = ProvisioningData.packager(
        production_ca_certificate=pca,
        oem_root_certificate=root,
        firmware_signing_key=fw_key,
        min_security_counter=manifest.security_counter,
        device_class=job.job.device_class,
    )

    line = ProductionLine(
        job=job,
        store=SQLiteStore(Path(cfg.workdir) / "programmer" / "production.sqlite"),
        identify=lambda resp, ch: verifier.verify(resp, challenge=ch),
        issuer=issuer,
        licenses=licenses,
        ledger_key=token.private_key(L_LEDGER),
        packager=package,
        batch_size=cfg.batch_size,
    )
    return line, manifest


class _Port:
    """Adapts a SimulatedDevice to the pipeline's DevicePort."""

    def __init__(self, dev: SimulatedDevice, release_log: str | None = None) -> None:
        self.dev = dev
        self._log = release_log

    def identify(self, challenge: bytes) -> bytes:
        return self.dev.identify(challenge)

    def provision(self, data: bytes) -> None:
        if self._log is not None:  # the device side saw its secrets: note it durably first
            fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, self.dev.device_id.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        self.dev.provision(data)

    def program(self, manifest: bytes, image: Any, license: bytes, nonce: bytes) -> bytes:
        return self.dev.program(manifest, image, license, nonce=nonce)


def run_worker(
    cfg: LineConfig, chips: Sequence[ChipSpec], tamper_first: bool = False
) -> dict[str, Any]:
    """Provision and program ``chips`` on this process's line; return counts."""
    token = open_token("programmer")
    line, manifest = open_line(cfg, token)
    work = Path(cfg.workdir)
    image_path = work / "oem" / "image.enc"
    ports = {c.device_id: _Port(c.build(), cfg.release_log) for c in chips}
    counts: dict[str, Any] = {"provisioned": 0, "booted": 0, "refused": {}, "tampered": 0}
    t0 = time.perf_counter()
    provisioned: list[Provisioned] = []
    for o in line.provision(ports.values()):
        if isinstance(o, Refused):
            counts["refused"][o.kind] = counts["refused"].get(o.kind, 0) + 1
            continue
        provisioned.append(o)
        _write_pem(work / "job" / "devices" / f"{o.device_id}.pem", o.certificate)
    counts["provisioned"] = len(provisioned)
    t_prov = time.perf_counter() - t0
    if tamper_first and provisioned:
        first = provisioned[0]
        data = bytearray(image_path.read_bytes())
        data[-20] ^= 0x01  # one bit in the last chunk's ciphertext
        try:
            ports[first.device_id].program(
                cfg.manifest, io.BytesIO(bytes(data)), first.license, b"n" * 16
            )
        except ImageError:
            counts["tampered"] = 1

    def verify_boot(cert: x509.Certificate, nonce: bytes, boot: bytes) -> None:
        from .pki import device_id_of

        pub = cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        verify_boot_confirmation(
            boot,
            device_public_key=pub,
            device_id=device_id_of(cert),
            manifest=manifest,
            nonce=nonce,
        )

    for _device_id, err in line.program(
        [(ports[p.device_id], p) for p in provisioned],
        manifest=cfg.manifest,
        open_image=lambda: open(image_path, "rb"),
        verify_boot=verify_boot,
    ):
        if err is None:
            counts["booted"] += 1
        else:
            counts["refused"][type(err).__name__] = counts["refused"].get(type(err).__name__, 0) + 1
    counts["provision_s"] = t_prov
    counts["total_s"] = time.perf_counter() - t0
    return counts


def _worker_entry(args: tuple[LineConfig, list[ChipSpec], bool]) -> dict[str, Any]:
    return run_worker(*args)


# --- the demo --------------------------------------------------------------------------------


def run_demo(
    workdir: str | os.PathLike[str],
    *,
    devices: int,
    workers: int = 1,
    firmware_size: int = 256 << 10,
    progress: Callable[[str], None] = lambda _msg: None,
    setup_hook: Callable[[LineConfig, list[ChipSpec], list[ChipSpec]], None] | None = None,
) -> dict[str, Any]:
    """Run the whole chain; return the summary (the CLI prints it).

    ``setup_hook`` (tests, benchmarks) receives the line configuration and the chips once
    everything up to the job exists, and the demo stops there.
    """
    from softhsm_config import ensure_tokens

    if devices < 1:
        raise ConfigurationError("--devices must be at least 1")
    if workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    work = Path(workdir).resolve()
    _prepare_workdir(work)
    tdir = ensure_tokens(work / "hsm", ("oem", "programmer"), generate_missing_pins=True)
    tdir.activate()
    oem: Token = open_token("oem")
    prog: Token = open_token("programmer")

    # Flow 1: OEM key ceremony.
    progress("OEM key ceremony")
    root = create_root_ca(oem, label=L_ROOT)
    oem_id_csr = create_enclave_csr(
        oem, label=L_OEM_ID, enclave_name="oem-mastering", purpose=EnclavePurpose.IDENTITY
    )
    root_key = oem.private_key(L_ROOT)
    oem_id_cert = certify_enclave(
        root_key,
        root,
        oem_id_csr,
        enclave_name="oem-mastering",
        purpose=EnclavePurpose.IDENTITY,
        role="oem",
    )
    install_certificate(oem, L_OEM_ID, oem_id_cert)
    oem_tx = Transcript(work / "oem" / "transcript.bin", oem.private_key(L_OEM_ID), "oem")
    oem_tx.append("token-init", details={"token": "oem", "module": oem.module_path})
    oem_tx.append(
        "root-ca",
        keys=[KeyEntry.from_key(root_key)],
        certificates=[CertEntry.from_certificate(root)],
    )
    oem_tx.append(
        "identity",
        keys=[KeyEntry.from_key(oem.private_key(L_OEM_ID))],
        certificates=[CertEntry.from_certificate(oem_id_cert)],
    )
    fw = oem.generate_ec(L_FW, curve=Curve.P256, policy=SIGNING)
    oem_tx.append("signing-key", keys=[KeyEntry.from_key(fw)], details={"use": "firmware"})
    officers = [oem.generate_ec(lbl, curve=Curve.P256, policy=SIGNING) for lbl in L_OFFICERS]
    officer_bundle = envelope.seal(
        OFFICERS_KIND, {"keys": [spki_der(k.public_key()) for k in officers]}, [root_key]
    )
    (work / "oem" / "officers.bin").write_bytes(officer_bundle)
    oem_tx.append(
        "signing-key",
        keys=[KeyEntry.from_key(k) for k in officers],
        artefacts={"officer-bundle": ledger.sha256(officer_bundle)},
        details={"use": "job-signing", "threshold": 2},
    )
    image_key = oem.generate_aes(L_IMAGE, policy=IMAGE_KEY)
    oem_tx.append("signing-key", keys=[KeyEntry.from_key(image_key)], details={"use": "image"})
    _write_pem(work / "oem" / "root-ca.pem", root)
    _write_pem(work / "oem" / "oem-identity.pem", oem_id_cert)

    # Flow 2: programmer onboarding.
    progress("programmer onboarding")
    p_csr = create_enclave_csr(
        prog, label=L_PROG_ID, enclave_name="programmer-1", purpose=EnclavePurpose.IDENTITY
    )
    p_cert = certify_enclave(
        root_key,
        root,
        p_csr,
        enclave_name="programmer-1",
        purpose=EnclavePurpose.IDENTITY,
        role="programmer",
    )
    install_certificate(prog, L_PROG_ID, p_cert)
    p_fp = cert_fingerprint(p_cert)
    p_id = prog.private_key(L_PROG_ID)
    prog_tx = Transcript(work / "programmer" / "transcript.bin", p_id, "programmer")
    prog_tx.append("token-init", details={"token": "programmer", "module": prog.module_path})
    prog_tx.append(
        "identity",
        keys=[KeyEntry.from_key(p_id)],
        certificates=[CertEntry.from_certificate(p_cert)],
    )
    oem_tx.append("enclave-onboarding", certificates=[CertEntry.from_certificate(p_cert)])
    for lbl, purpose in (
        (L_LICENSE, EnclavePurpose.LICENSE_SIGNING),
        (L_LEDGER, EnclavePurpose.LEDGER_SIGNING),
        (L_KA, EnclavePurpose.KEY_AGREEMENT),
    ):
        ka = purpose is EnclavePurpose.KEY_AGREEMENT
        csr = create_enclave_csr(
            prog,
            label=lbl,
            enclave_name="programmer-1",
            purpose=purpose,
            signer=p_id if ka else None,
        )
        cert = certify_enclave(
            root_key,
            root,
            csr,
            enclave_name="programmer-1",
            purpose=purpose,
            role="programmer",
            proof_key=p_id.public_key() if ka else None,
        )
        install_certificate(prog, lbl, cert)
        _write_pem(work / "programmer" / f"{lbl}.pem", cert)
        prog_tx.append(
            "identity",
            keys=[KeyEntry.from_key(prog.private_key(lbl))],
            certificates=[CertEntry.from_certificate(cert)],
            details={"purpose": purpose.name},
        )
        oem_tx.append("enclave-onboarding", certificates=[CertEntry.from_certificate(cert)])
    _write_pem(work / "programmer" / "programmer-identity.pem", p_cert)

    # Flow 3: image mastering.
    progress("image mastering")
    firmware = os.urandom(firmware_size)
    (work / "oem" / "firmware.bin").write_bytes(firmware)
    with (
        open(work / "oem" / "firmware.bin", "rb") as src,
        open(work / "oem" / "image.enc", "wb") as dst,
    ):
        manifest_bytes = master_image(
            src,
            dst,
            image_key=image_key,
            signing_key=fw,
            image_id=IMAGE_ID,
            image_version="1.0.0",
            security_counter=3,
            device_class=DEVICE_CLASS,
        )
    (work / "oem" / "manifest.bin").write_bytes(manifest_bytes)
    oem_tx.append(
        "image-mastering",
        keys=[KeyEntry.from_key(image_key), KeyEntry.from_key(fw)],
        artefacts={
            "manifest": ledger.sha256(manifest_bytes),
            "image": ledger.sha256((work / "oem" / "image.enc").read_bytes()),
        },
    )

    # Flows 4-5: secure channel and key transfer.
    progress("secure channel and key transfer")
    oc = OemChannel(
        oem, identity_key=oem.private_key(L_OEM_ID), identity_cert=oem_id_cert, root_cert=root
    )
    pc = ProgrammerChannel(prog, identity_key=p_id, identity_cert=p_cert, root_cert=root)
    m2 = pc.receive_hello(oc.start())
    m4 = pc.receive_finish(oc.receive_hello(m2))
    o_sess = oc.receive_finish(m4)
    p_sess = pc.session
    sender = KeySender(o_sess)
    transfer_msg = sender.send([L_IMAGE], transferable=True)
    ack = KeyReceiver(p_sess).receive(transfer_msg)
    record = sender.verify_ack(ack)
    o_sess.close()
    p_sess.close()
    oem_tx.append(
        "key-transfer",
        keys=[KeyEntry.from_key(image_key)],
        artefacts={"transfer": ledger.sha256(transfer_msg), "ack": ledger.sha256(ack)},
        details={"session": record.session_id.hex()},
    )
    prog_tx.append(
        "key-import",
        keys=[KeyEntry.from_key(prog.secret_key(L_IMAGE))],
        artefacts={"transfer": ledger.sha256(transfer_msg), "ack": ledger.sha256(ack)},
    )

    # Flow 6: production job and production CA.
    progress("production job")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    # The job's window starts no earlier than the root (a CA cannot predate its issuer).
    not_before = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
    not_after = now + datetime.timedelta(days=7)
    pca_csr = create_production_ca_csr(prog, label=L_PCA, job_id=JOB_ID)
    pca = certify_production_ca(
        root_key, root, pca_csr, job_id=JOB_ID, not_before=not_before, not_after=not_after
    )
    install_certificate(prog, L_PCA, pca)
    _write_pem(work / "job" / "production-ca.pem", pca)
    n_in_targets = devices + 3
    job = ProductionJob(
        job_id=JOB_ID,
        device_class=DEVICE_CLASS,
        targets=Targets(ranges=((DEVICE_BASE, DEVICE_BASE + n_in_targets - 1),)),
        quota=devices,
        not_before=int(not_before.timestamp()),
        not_after=int(not_after.timestamp()),
        image_id=IMAGE_ID,
        manifest_sha256=ledger.sha256(manifest_bytes),
        programmer=p_fp,
        threshold=2,
    )
    job_signed = cosign_job(sign_job(job, [officers[0]]), officers[1])
    (work / "oem" / "job.bin").write_bytes(job_signed)
    oem_tx.append(
        "job-issuance",
        keys=[KeyEntry.from_key(k) for k in officers],
        certificates=[CertEntry.from_certificate(pca)],
        artefacts={"job": ledger.sha256(job_signed)},
        details={"job": JOB_ID, "quota": devices},
    )
    prog_tx.append(
        "production-ca",
        keys=[KeyEntry.from_key(prog.private_key(L_PCA))],
        certificates=[CertEntry.from_certificate(pca)],
        details={"job": JOB_ID},
    )
    # The programmer trusts the officers through the bundle the OEM root signed.
    bundle = envelope.open_envelope(officer_bundle, kind=OFFICERS_KIND, keys=root.public_key())  # type: ignore[arg-type]
    officer_keys = tuple(bundle["keys"])
    verified: VerifiedJob = verify_job(
        job_signed,
        officers=[serialization.load_der_public_key(k) for k in officer_keys],  # type: ignore[misc]
        programmer=p_fp,
        min_threshold=2,
    )
    prog_tx.append(
        "production-run-opened", artefacts={"job": verified.sha256}, details={"job": JOB_ID}
    )

    # Flows 7-8: provisioning and programming.
    vendor = SiliconVendor()
    chips = make_chips(vendor, [DEVICE_BASE + i for i in range(n_in_targets)])
    outsider = make_chips(vendor, [DEVICE_BASE + n_in_targets + 1000])
    cfg = LineConfig(
        workdir=str(work),
        job_signed=job_signed,
        officer_keys=officer_keys,
        programmer_fp=p_fp,
        root_der=root.public_bytes(serialization.Encoding.DER),
        production_ca_der=pca.public_bytes(serialization.Encoding.DER),
        vendor_root_der=vendor.root_certificate.public_bytes(serialization.Encoding.DER),
        manifest=manifest_bytes,
        firmware_signing_spki=spki_der(fw.public_key()),
    )
    if setup_hook is not None:
        setup_hook(cfg, chips, outsider)
        return {"setup": True, "workdir": str(work)}
    progress(f"provisioning {devices} devices (+4 to be refused) with {workers} worker(s)")
    all_chips = chips + outsider
    shares = [all_chips[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    if workers == 1:
        results = [run_worker(cfg, shares[0], True)]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            results = pool.map(_worker_entry, [(cfg, s, i == 0) for i, s in enumerate(shares)])
    elapsed = time.perf_counter() - t0
    refused: dict[str, int] = {}
    for r in results:
        for k, v in r["refused"].items():
            refused[k] = refused.get(k, 0) + v
    provisioned = sum(r["provisioned"] for r in results)
    booted = sum(r["booted"] for r in results)

    # Flow 9: reconciliation, on the OEM side, from the exported ledger.
    progress("reconciliation")
    store = SQLiteStore(work / "programmer" / "production.sqlite")
    ledger_path = work / "job" / "ledger.bin"
    with open(ledger_path, "wb") as out:
        ledger.write_export(out, job_signed, store.export(verified.sha256))
    store.close()
    prog_tx.append(
        "production-run-closed",
        artefacts={"ledger": ledger.sha256(ledger_path.read_bytes())},
        details={"job": JOB_ID, "provisioned": provisioned},
    )
    ledger_cert = prog.certificate(L_LEDGER)
    with open(ledger_path, "rb") as src:
        job_bytes, items = ledger.read_export(src)
        report = reconcile(
            job_bytes,
            items,
            officers={fingerprint(k.public_key()): k.public_key() for k in officers},
            programmer=p_fp,
            ledger_key=ledger_cert.public_key(),  # type: ignore[arg-type]
            root_cert=root,
            production_ca_cert=pca,
        )
    (work / "job" / "reconciliation.json").write_text(report.to_json() + "\n")
    oem_tx.append(
        "reconciliation",
        artefacts={"ledger": ledger.sha256(ledger_path.read_bytes())},
        details={"provisioned": report.provisioned, "programmed": report.programmed},
    )
    verify_transcript(oem_tx.path, public_key=oem_id_cert.public_key())  # type: ignore[arg-type]
    verify_transcript(prog_tx.path, public_key=p_cert.public_key())  # type: ignore[arg-type]
    prov_s = max(r["provision_s"] for r in results)
    summary = {
        "devices_requested": devices,
        "provisioned": provisioned,
        "booted": booted,
        "quota": devices,
        "workers": workers,
        "refused_over_quota": refused.get(QuotaExceededError.__name__, 0),
        "refused_not_targeted": refused.get(NotTargetedError.__name__, 0),
        "refused_other": {
            k: v
            for k, v in refused.items()
            if k not in (QuotaExceededError.__name__, NotTargetedError.__name__)
        },
        "tampered_rejected": sum(r["tampered"] for r in results),
        "ledger_verified": True,
        "ledger_records": report.records,
        "reconciled": report.provisioned == provisioned and report.programmed == booted,
        "transcripts_verified": True,
        "devices_per_s": round(provisioned / prov_s, 1) if prov_s else None,
        "elapsed_s": round(elapsed, 2),
        "workdir": str(work),
    }
    (work / "job" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["ChipSpec", "LineConfig", "make_chips", "open_line", "run_demo", "run_worker", "Error"]
