"""The ceremony steps, one function per step, on a work directory that keeps their state.

Each step is what one party does at one sitting, through the library, with the tokens of
``<workdir>/hsm`` (SoftHSM2, see :mod:`softhsm_config`); everything a later step needs is
a file of the work directory (layout in the README and below), so every step can run in
its own process -- the ``securethread`` command has one subcommand per step, and
:func:`securethread.demo.run_demo` is these functions in order.

====================  ===============================  =========================================
step                  needs                            creates (the last file marks it done)
====================  ===============================  =========================================
oem-init              an empty or demo directory       tokens, root CA, OEM identity, firmware-
                                                       signing, officer and image keys
onboard-programmer    oem-init                         programmer identity, license, ledger and
                                                       key-agreement certificates
master-image          oem-init                         encrypted image and signed manifest
transfer-keys         onboard-programmer               image key in the programmer token (ack)
issue-job             master-image, transfer-keys      production CA, signed job
provision             issue-job (run not closed)       devices provisioned and programmed;
                                                       may run again (resumes, never over quota)
export-ledger         issue-job                        the ledger export; closes the run
reconcile             export-ledger                    the OEM's reconciliation report
====================  ===============================  =========================================

A step run before the steps it needs, or a second time where it creates something, raises
:class:`StepOrderError` before it changes anything.  Every step that appends to a ceremony
transcript returns the transcript's new head (:class:`Anchor`) and writes it in the
ceremony minutes (``<workdir>/minutes.txt``): an auditor who keeps an anchor detects later
removal of records from the end of the transcript (``verify-transcript --anchor``).

The silicon vendor is simulated in software (:class:`~securethread.device.SiliconVendor`);
its CA key and root certificate live in ``<workdir>/vendor/`` so that chips made by a later
``provision`` chain to the root the programmer trusts.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.channel.handshake import OemChannel, ProgrammerChannel
from securethread.channel.transfer import KeyReceiver, KeySender
from securethread.device.sbm import (
    ProvisioningData,
    SiliconVendor,
    SimulatedDevice,
    verify_boot_confirmation,
)
from securethread.formats import envelope, ledger
from securethread.formats import image as image_mod
from securethread.formats import transcript as transcript_mod
from securethread.formats.identity import IdentityVerifier
from securethread.formats.image import Manifest, verify_manifest
from securethread.formats.job import (
    ProductionJob,
    Targets,
    cosign_job,
    job_hash,
    sign_job,
    verify_job,
)
from securethread.formats.license import LicenseIssuer
from securethread.formats.reconciliation import ReconciliationReport
from securethread.formats.reconciliation import reconcile as reconcile_ledger
from securethread.formats.transcript import CertEntry, KeyEntry, Transcript
from securethread.programmer.line import ProductionLine, Provisioned, Refused
from securethread.programmer.store import SQLiteStore

from .errors import (
    AlreadyProvisionedError,
    CertificateError,
    ConfigurationError,
    DeviceRefusedError,
    Error,
    FormatError,
    ImageError,
    JobError,
    QuotaExceededError,
)
from .hsm import (
    IMAGE_KEY,
    SIGNING,
    Curve,
    KeyBackend,
    PinCallback,
    PrivateKey,
    Token,
    fingerprint,
    load_spki,
    open_token,
    spki_der,
)
from .pki import (
    DeviceCertificateIssuer,
    EnclavePurpose,
    cert_fingerprint,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    from_pem,
    install_certificate,
    load_der,
    to_pem,
)

# --- names ------------------------------------------------------------------------------------

MARKER = ".securethread-demo"
JOB_ID = "demo-job-1"
IMAGE_ID = "fw-sensor-1"
DEVICE_CLASS = "sensor-v1"
DEVICE_BASE = 0x5EC0_0000_0000_0000
OFFICERS_KIND = "officer-keys"
OFFICER_THRESHOLD = 2
SECURITY_COUNTER = 3

L_ROOT, L_OEM_ID, L_FW, L_IMAGE = "oem-root-ca", "oem-identity", "firmware-signing", "image-key-1"
L_OFFICERS = ("officer-1", "officer-2")
L_PROG_ID, L_LICENSE, L_LEDGER, L_KA = (
    "programmer-identity",
    "license-signing",
    "ledger-signing",
    "key-agreement",
)
L_PCA = "production-ca-" + JOB_ID
TOKENS = ("oem", "programmer")

# The work-directory layout (relative paths).
HSM = "hsm"
ROOT_CA = "oem/root-ca.pem"
OEM_ID = "oem/oem-identity.pem"
OFFICERS = "oem/officers.bin"
FW_SIGNING = "oem/firmware-signing.pem"
FIRMWARE = "oem/firmware.bin"
IMAGE = "oem/image.enc"
MANIFEST = "oem/manifest.bin"
TRANSFER_ACK = "oem/key-transfer-ack.bin"
JOB = "oem/job.bin"
OEM_TX = "oem/transcript.bin"
PROG_ID = "programmer/programmer-identity.pem"
LEDGER_CERT = f"programmer/{L_LEDGER}.pem"
PROG_DB = "programmer/production.sqlite"
PROG_TX = "programmer/transcript.bin"
PCA = "job/production-ca.pem"
DEVICES = "job/devices"
LEDGER = "job/ledger.bin"
RECONCILIATION = "job/reconciliation.json"
SUMMARY = "job/summary.json"
VENDOR_ROOT = "vendor/root-ca.pem"
VENDOR_KEY = "vendor/vendor-key.pem"
MINUTES = "minutes.txt"
SUBDIRS = ("hsm", "oem", "programmer", "job", "vendor")

#: step -> (steps it needs, the file whose presence means it was done).
STEPS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "oem-init": ((), ROOT_CA),
    "onboard-programmer": (("oem-init",), PROG_ID),
    "master-image": (("oem-init",), MANIFEST),
    "transfer-keys": (("onboard-programmer",), TRANSFER_ACK),
    "issue-job": (("master-image", "transfer-keys"), JOB),
    "provision": (("issue-job",), None),
    "export-ledger": (("issue-job",), LEDGER),
    "reconcile": (("export-ledger",), RECONCILIATION),
}


class StepOrderError(ConfigurationError):
    """A ceremony step was run before a step it needs, or again where that is not allowed."""


class WorkerDiedError(Error):
    """A provisioning worker process died (killed?); re-running ``provision`` resumes."""


# --- results ------------------------------------------------------------------------------------


@attrs.frozen
class Anchor:
    """A transcript's head after a step: what an auditor writes down (``--anchor``)."""

    enclave: str
    seq: int
    head: bytes

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "head": self.head.hex()}


@attrs.frozen
class StepResult:
    """What a step did: files written, transcript anchors, step-specific details.

    ``problem`` is set when the step ran to its end but did not do everything asked (some
    devices refused); the CLI reports it and exits non-zero.
    """

    step: str
    workdir: Path
    written: tuple[str, ...] = ()
    anchors: tuple[Anchor, ...] = ()
    details: Mapping[str, Any] = attrs.field(factory=dict)
    problem: Error | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "workdir": str(self.workdir),
            "written": list(self.written),
            "anchors": {a.enclave: a.to_json() for a in self.anchors},
            **self.details,
        }


# --- the work directory -------------------------------------------------------------------------


def _resolve(workdir: str | os.PathLike[str]) -> Path:
    work = Path(workdir).resolve()
    if work.exists() and not work.is_dir():
        raise ConfigurationError(f"work directory {str(work)!r} is not a directory")
    return work


def _is_done(work: Path, step: str) -> bool:
    marker = STEPS[step][1]
    return marker is not None and (work / marker).exists()


def check_step(workdir: str | os.PathLike[str], step: str) -> Path:
    """Refuse ``step`` in ``workdir`` if a step it needs was not done or it was done already.

    Returns the resolved work directory; changes nothing.
    """
    work = _resolve(workdir)
    if step != "oem-init":
        if not work.is_dir() or not (work / MARKER).exists():
            raise StepOrderError(
                f"cannot run {step}: {str(work)!r} is not a securethread work directory "
                "(run oem-init first)"
            )
    needs, _marker = STEPS[step]
    pending = list(needs)
    while pending:
        need = pending.pop(0)
        if not _is_done(work, need):
            raise StepOrderError(
                f"{step} needs {need} first ({STEPS[need][1]} does not exist in {work})"
            )
        pending.extend(STEPS[need][0])
    if _is_done(work, step):
        raise StepOrderError(f"{step} was already run in {work} ({STEPS[step][1]} exists)")
    if step == "provision" and _is_done(work, "export-ledger"):
        raise StepOrderError(f"cannot provision: the production run was closed ({LEDGER} exists)")
    return work


def check_new_workdir(workdir: str | os.PathLike[str]) -> Path:
    """Refuse a work directory that is a file, or not empty and not a securethread one."""
    work = _resolve(workdir)
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise ConfigurationError(
            f"work directory {str(work)!r} is not empty and not a securethread demo"
        )
    return work


def _prepare_workdir(work: Path, *, restart: bool) -> None:
    """Create the work directory; with ``restart``, clear a previous demo's directory."""
    check_new_workdir(work)
    if work.exists() and any(work.iterdir()):
        if restart:
            for sub in SUBDIRS:
                shutil.rmtree(work / sub, ignore_errors=True)
            (work / MINUTES).unlink(missing_ok=True)
    for sub in ("oem", "programmer", "job/devices"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("created by securethread demo\n")


def _write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (a crash leaves the old file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


def load_certificate(data: bytes) -> x509.Certificate:
    """One certificate, PEM or DER (FormatError otherwise)."""
    return from_pem(data) if data.lstrip().startswith(b"-----BEGIN") else load_der(data)


def _cert(path: Path, what: str) -> x509.Certificate:
    try:
        return load_certificate(_read(path, what))
    except FormatError as exc:
        raise FormatError(f"{what} {str(path)!r}: {exc}") from None


def _public_key(path: Path, what: str) -> ec.EllipticCurvePublicKey:
    data = _read(path, what)
    try:
        der = serialization.load_pem_public_key(data).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{what} {str(path)!r}: not a PEM public key ({exc})") from None
    return load_spki(der, what=what)


def _activate(work: Path) -> None:
    from softhsm_config import TokenDirectory

    conf = work / HSM / "softhsm2.conf"
    if not conf.is_file():
        raise ConfigurationError(f"no SoftHSM configuration at {str(conf)!r}")
    TokenDirectory(work / HSM).activate()


def _open(work: Path, pin: PinCallback | None, *labels: str) -> list[Token]:
    _activate(work)
    return [open_token(label, pin=pin) for label in labels]


def _oem_transcript(work: Path, oem: Token) -> Transcript:
    return Transcript(work / OEM_TX, oem.private_key(L_OEM_ID), "oem")


def _programmer_transcript(work: Path, prog: Token) -> Transcript:
    return Transcript(work / PROG_TX, prog.private_key(L_PROG_ID), "programmer")


def _finish(
    work: Path,
    step: str,
    written: Sequence[str],
    transcripts: Sequence[Transcript] = (),
    details: Mapping[str, Any] | None = None,
    problem: Error | None = None,
) -> StepResult:
    """Write the transcripts' new heads in the ceremony minutes; build the result."""
    anchors = tuple(
        Anchor(t.enclave, t.last.seq, t.last.hash) for t in transcripts if t.last is not None
    )
    if anchors:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with open(work / MINUTES, "a") as f:
            for a in anchors:
                f.write(f"{stamp} {step}: {a.enclave} transcript record #{a.seq} {a.head.hex()}\n")
    return StepResult(step, work, tuple(written), anchors, dict(details or {}), problem)


# --- flow 1: the OEM key ceremony ----------------------------------------------------------------


def oem_init(
    workdir: str | os.PathLike[str], *, pin: PinCallback | None = None, restart: bool = False
) -> StepResult:
    """Tokens, OEM root CA, OEM identity, firmware-signing, officer and image keys.

    Creates ``workdir`` (or uses an empty one, or -- with ``restart`` -- clears a previous
    demo's); PINs come from the environment or are generated into ``hsm/pins.env``.
    """
    from softhsm_config import ensure_tokens

    work = _resolve(workdir)
    if not restart:
        if work.exists() and any(work.iterdir()) and (work / MARKER).exists():
            check_step(work, "oem-init")
    _prepare_workdir(work, restart=restart)
    ensure_tokens(work / HSM, TOKENS, generate_missing_pins=True)
    (oem,) = _open(work, pin, "oem")

    root = create_root_ca(oem, label=L_ROOT)
    root_key = oem.private_key(L_ROOT)
    oem_id_cert = _enroll(
        oem, L_OEM_ID, root_key, root, "oem-mastering", EnclavePurpose.IDENTITY, role="oem"
    )
    oem_tx = _oem_transcript(work, oem)
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
    _write(work / OFFICERS, officer_bundle)
    oem_tx.append(
        "signing-key",
        keys=[KeyEntry.from_key(k) for k in officers],
        artefacts={"officer-bundle": ledger.sha256(officer_bundle)},
        details={"use": "job-signing", "threshold": OFFICER_THRESHOLD},
    )
    image_key = oem.generate_aes(L_IMAGE, policy=IMAGE_KEY)
    oem_tx.append("signing-key", keys=[KeyEntry.from_key(image_key)], details={"use": "image"})
    fw_pem = fw.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(work / FW_SIGNING, fw_pem)
    _write(work / OEM_ID, to_pem(oem_id_cert))
    _write(work / ROOT_CA, to_pem(root))  # last: marks the step done
    return _finish(
        work,
        "oem-init",
        [f"{HSM}/softhsm2.conf", OFFICERS, FW_SIGNING, OEM_ID, ROOT_CA, OEM_TX],
        [oem_tx],
    )


def _enroll(
    token: Token,
    label: str,
    root_key: PrivateKey,
    root: x509.Certificate,
    enclave: str,
    purpose: EnclavePurpose,
    role: str,
    vouch: PrivateKey | None = None,
) -> x509.Certificate:
    """A key generated in ``token`` for ``purpose``, certified by the OEM root, installed."""
    csr = create_enclave_csr(
        token, label=label, enclave_name=enclave, purpose=purpose, signer=vouch
    )
    cert = certify_enclave(
        root_key,
        root,
        csr,
        enclave_name=enclave,
        purpose=purpose,
        role=role,
        proof_key=vouch.public_key() if vouch is not None else None,
    )
    install_certificate(token, label, cert)
    return cert


# --- flow 2: programmer onboarding ---------------------------------------------------------------


def onboard_programmer(
    workdir: str | os.PathLike[str], *, pin: PinCallback | None = None
) -> StepResult:
    """The programmer's identity, license-, ledger-signing and key-agreement keys, each
    generated in its token and certified by the OEM root."""
    work = check_step(workdir, "onboard-programmer")
    oem, prog = _open(work, pin, "oem", "programmer")
    oem_tx = _oem_transcript(work, oem)
    root_key = oem.private_key(L_ROOT)
    root = oem.certificate(L_ROOT)

    p_cert = _enroll(
        prog, L_PROG_ID, root_key, root, "programmer-1", EnclavePurpose.IDENTITY, role="programmer"
    )
    p_id = prog.private_key(L_PROG_ID)
    prog_tx = _programmer_transcript(work, prog)
    prog_tx.append("token-init", details={"token": "programmer", "module": prog.module_path})
    prog_tx.append(
        "identity",
        keys=[KeyEntry.from_key(p_id)],
        certificates=[CertEntry.from_certificate(p_cert)],
    )
    oem_tx.append("enclave-onboarding", certificates=[CertEntry.from_certificate(p_cert)])
    written = []
    for lbl, purpose in (
        (L_LICENSE, EnclavePurpose.LICENSE_SIGNING),
        (L_LEDGER, EnclavePurpose.LEDGER_SIGNING),
        (L_KA, EnclavePurpose.KEY_AGREEMENT),
    ):
        # The key-agreement key cannot sign its own request: the identity key vouches for it.
        vouch = p_id if purpose is EnclavePurpose.KEY_AGREEMENT else None
        cert = _enroll(prog, lbl, root_key, root, "programmer-1", purpose, "programmer", vouch)
        _write(work / f"programmer/{lbl}.pem", to_pem(cert))
        written.append(f"programmer/{lbl}.pem")
        prog_tx.append(
            "identity",
            keys=[KeyEntry.from_key(prog.private_key(lbl))],
            certificates=[CertEntry.from_certificate(cert)],
            details={"purpose": purpose.name},
        )
        oem_tx.append("enclave-onboarding", certificates=[CertEntry.from_certificate(cert)])
    _write(work / PROG_ID, to_pem(p_cert))  # last: marks the step done
    return _finish(
        work, "onboard-programmer", [*written, PROG_ID, PROG_TX, OEM_TX], [oem_tx, prog_tx]
    )


# --- flow 3: image mastering ---------------------------------------------------------------------


def master_image(
    workdir: str | os.PathLike[str],
    *,
    firmware: str | os.PathLike[str] | None = None,
    firmware_size: int = 256 << 10,
    pin: PinCallback | None = None,
) -> StepResult:
    """Encrypt the firmware in the OEM token and sign its manifest.

    ``firmware`` is the plaintext image (copied to ``oem/firmware.bin``); without it a
    random image of ``firmware_size`` bytes stands in.
    """
    work = check_step(workdir, "master-image")
    if firmware is not None:
        src_path = Path(firmware)
        try:
            with open(src_path, "rb"):
                pass
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read firmware {str(src_path)!r}: {exc.strerror}"
            ) from None
    (oem,) = _open(work, pin, "oem")
    image_key = oem.secret_key(L_IMAGE)
    fw = oem.private_key(L_FW)
    fw_tmp = work / (FIRMWARE + ".tmp")
    img_tmp = work / (IMAGE + ".tmp")
    try:
        if firmware is None:
            _write(fw_tmp, os.urandom(firmware_size))
        else:
            shutil.copyfile(firmware, fw_tmp)
        with open(fw_tmp, "rb") as src, open(img_tmp, "wb") as dst:
            manifest_bytes = image_mod.master_image(
                src,
                dst,
                image_key=image_key,
                signing_key=fw,
                image_id=IMAGE_ID,
                image_version="1.0.0",
                security_counter=SECURITY_COUNTER,
                device_class=DEVICE_CLASS,
            )
            dst.flush()
            os.fsync(dst.fileno())
        image_sha = _file_sha256(img_tmp)
        os.replace(fw_tmp, work / FIRMWARE)
        os.replace(img_tmp, work / IMAGE)
    finally:
        fw_tmp.unlink(missing_ok=True)
        img_tmp.unlink(missing_ok=True)
    oem_tx = _oem_transcript(work, oem)
    oem_tx.append(
        "image-mastering",
        keys=[KeyEntry.from_key(image_key), KeyEntry.from_key(fw)],
        artefacts={"manifest": ledger.sha256(manifest_bytes), "image": image_sha},
    )
    _write(work / MANIFEST, manifest_bytes)  # last: marks the step done
    return _finish(
        work,
        "master-image",
        [FIRMWARE, IMAGE, MANIFEST, OEM_TX],
        [oem_tx],
        {"firmware_bytes": (work / FIRMWARE).stat().st_size},
    )


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


# --- flows 4-5: secure channel and key transfer --------------------------------------------------


def transfer_keys(workdir: str | os.PathLike[str], *, pin: PinCallback | None = None) -> StepResult:
    """Mutually authenticated channel between the tokens; the image key moves wrapped."""
    work = check_step(workdir, "transfer-keys")
    oem, prog = _open(work, pin, "oem", "programmer")
    root = oem.certificate(L_ROOT)
    oem_tx = _oem_transcript(work, oem)
    prog_tx = _programmer_transcript(work, prog)
    oc = OemChannel(
        oem,
        identity_key=oem.private_key(L_OEM_ID),
        identity_cert=oem.certificate(L_OEM_ID),
        root_cert=root,
    )
    pc = ProgrammerChannel(
        prog,
        identity_key=prog.private_key(L_PROG_ID),
        identity_cert=prog.certificate(L_PROG_ID),
        root_cert=root,
    )
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
        keys=[KeyEntry.from_key(oem.secret_key(L_IMAGE))],
        artefacts={"transfer": ledger.sha256(transfer_msg), "ack": ledger.sha256(ack)},
        details={"session": record.session_id.hex()},
    )
    prog_tx.append(
        "key-import",
        keys=[KeyEntry.from_key(prog.secret_key(L_IMAGE))],
        artefacts={"transfer": ledger.sha256(transfer_msg), "ack": ledger.sha256(ack)},
    )
    _write(work / TRANSFER_ACK, ack)  # last: marks the step done
    return _finish(
        work,
        "transfer-keys",
        [TRANSFER_ACK, OEM_TX, PROG_TX],
        [oem_tx, prog_tx],
        {"keys": [L_IMAGE], "session": record.session_id.hex()},
    )


# --- flow 6: the production job ------------------------------------------------------------------


def issue_job(
    workdir: str | os.PathLike[str],
    *,
    quota: int,
    targets: int | None = None,
    pin: PinCallback | None = None,
) -> StepResult:
    """A production CA for the job (key in the programmer token, certified by the root) and
    the job: ``quota`` devices among ``targets`` chip UIDs from ``DEVICE_BASE``, signed by
    two officers; the programmer verifies it and opens its production run."""
    targets = quota if targets is None else targets
    if quota < 1:
        raise ConfigurationError("--quota must be at least 1")
    if targets < 1:
        raise ConfigurationError("--targets must be at least 1")
    work = check_step(workdir, "issue-job")
    manifest_bytes = _read(work / MANIFEST, "manifest")
    p_cert = _cert(work / PROG_ID, "programmer identity certificate")
    oem, prog = _open(work, pin, "oem", "programmer")
    root = oem.certificate(L_ROOT)
    root_key = oem.private_key(L_ROOT)
    officers = [oem.private_key(lbl) for lbl in L_OFFICERS]
    p_fp = cert_fingerprint(p_cert)

    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    # The job's window starts no earlier than the root (a CA cannot predate its issuer).
    not_before = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
    not_after = now + datetime.timedelta(days=7)
    pca_csr = create_production_ca_csr(prog, label=L_PCA, job_id=JOB_ID)
    pca = certify_production_ca(
        root_key, root, pca_csr, job_id=JOB_ID, not_before=not_before, not_after=not_after
    )
    install_certificate(prog, L_PCA, pca)
    _write(work / PCA, to_pem(pca))
    job = ProductionJob(
        job_id=JOB_ID,
        device_class=DEVICE_CLASS,
        targets=Targets(ranges=((DEVICE_BASE, DEVICE_BASE + targets - 1),)),
        quota=quota,
        not_before=int(not_before.timestamp()),
        not_after=int(not_after.timestamp()),
        image_id=IMAGE_ID,
        manifest_sha256=ledger.sha256(manifest_bytes),
        programmer=p_fp,
        threshold=OFFICER_THRESHOLD,
    )
    job_signed = cosign_job(sign_job(job, [officers[0]]), officers[1])
    oem_tx = _oem_transcript(work, oem)
    prog_tx = _programmer_transcript(work, prog)
    oem_tx.append(
        "job-issuance",
        keys=[KeyEntry.from_key(k) for k in officers],
        certificates=[CertEntry.from_certificate(pca)],
        artefacts={"job": ledger.sha256(job_signed)},
        details={"job": JOB_ID, "quota": quota},
    )
    prog_tx.append(
        "production-ca",
        keys=[KeyEntry.from_key(prog.private_key(L_PCA))],
        certificates=[CertEntry.from_certificate(pca)],
        details={"job": JOB_ID},
    )
    # The programmer trusts the officers through the bundle the OEM root signed.
    officer_keys = _officer_keys(work / OFFICERS, root)
    verified = verify_job(
        job_signed,
        officers=[load_spki(k) for k in officer_keys],
        programmer=p_fp,
        min_threshold=OFFICER_THRESHOLD,
    )
    prog_tx.append(
        "production-run-opened", artefacts={"job": verified.sha256}, details={"job": JOB_ID}
    )
    _write(work / JOB, job_signed)  # last: marks the step done
    return _finish(
        work,
        "issue-job",
        [PCA, JOB, OEM_TX, PROG_TX],
        [oem_tx, prog_tx],
        {"job": JOB_ID, "quota": quota, "targets": targets, "job_sha256": verified.sha256.hex()},
    )


def _officer_keys(path: Path, root: x509.Certificate) -> tuple[bytes, ...]:
    """The officers' SPKIs from the bundle the OEM root signed (verified)."""
    root_key = root.public_key()
    if not isinstance(root_key, ec.EllipticCurvePublicKey):
        raise CertificateError("the OEM root certificate has no EC key")
    bundle = envelope.open_envelope(
        _read(path, "officer bundle"), kind=OFFICERS_KIND, keys=root_key
    )
    keys = bundle.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, bytes) for k in keys):
        raise FormatError("officer bundle: keys is not a list of public keys")
    return tuple(keys)


# --- the simulated silicon vendor ----------------------------------------------------------------


def silicon_vendor(workdir: str | os.PathLike[str]) -> SiliconVendor:
    """This work directory's simulated fab: created on first use, then reloaded from
    ``vendor/`` (its CA key, demo only, mode 0600, and its root certificate)."""
    work = Path(workdir)
    key_path, root_path = work / VENDOR_KEY, work / VENDOR_ROOT
    if not root_path.exists():
        vendor = SiliconVendor()
        root_path.parent.mkdir(exist_ok=True)
        _write(key_path, _vendor_key_pem(vendor), mode=0o600)
        _write(root_path, to_pem(vendor.root_certificate))
        return vendor
    root = _cert(work / VENDOR_ROOT, "silicon vendor root certificate")
    try:
        key = serialization.load_pem_private_key(_read(work / VENDOR_KEY, "vendor key"), None)
    except ValueError as exc:
        raise FormatError(f"vendor key {str(key_path)!r}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FormatError(f"vendor key {str(key_path)!r} is not an EC private key")
    try:
        return SiliconVendor.from_key(key, root)
    except CertificateError:
        raise CertificateError(
            f"vendor key {str(key_path)!r} does not match {VENDOR_ROOT}"
        ) from None


def _vendor_key_pem(vendor: SiliconVendor) -> bytes:
    return vendor.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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


# --- the programmer's production line, as workers rebuild it -------------------------------------


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


def line_config(workdir: str | os.PathLike[str], *, batch_size: int = 32) -> LineConfig:
    """The programmer's view of the job, from the work directory, verified.

    Checks the officer bundle under the OEM root, the job (officers, threshold, this
    programmer, validity), the manifest (firmware-signing key, the hash the job names) and
    the encrypted image (the manifest's digest); then the vendor root (created on first use).
    """
    work = _resolve(workdir)
    root = _cert(work / ROOT_CA, "OEM root certificate")
    officer_keys = _officer_keys(work / OFFICERS, root)
    p_cert = _cert(work / PROG_ID, "programmer identity certificate")
    job_signed = _read(work / JOB, "job")
    job = verify_job(
        job_signed,
        officers=[load_spki(k, what="officer key") for k in officer_keys],
        programmer=cert_fingerprint(p_cert),
        min_threshold=OFFICER_THRESHOLD,
    )
    fw_key = _public_key(work / FW_SIGNING, "firmware-signing key")
    manifest_bytes = _read(work / MANIFEST, "manifest")
    manifest = verify_manifest(manifest_bytes, key=fw_key)
    if ledger.sha256(manifest_bytes) != job.job.manifest_sha256:
        raise JobError(f"job {job.job.job_id} names another manifest than {MANIFEST}")
    try:
        image_sha = _file_sha256(work / IMAGE)
    except OSError as exc:
        where = str(work / IMAGE)
        raise ConfigurationError(f"cannot read image {where!r}: {exc.strerror}") from None
    if image_sha != manifest.ciphertext_sha256:
        raise ImageError(f"{IMAGE} does not match its manifest (altered or truncated)")
    pca = _cert(work / PCA, "production CA certificate")
    vendor_root = silicon_vendor(work).root_certificate
    der = serialization.Encoding.DER
    return LineConfig(
        workdir=str(work),
        job_signed=job_signed,
        officer_keys=officer_keys,
        programmer_fp=cert_fingerprint(p_cert),
        root_der=root.public_bytes(der),
        production_ca_der=pca.public_bytes(der),
        vendor_root_der=vendor_root.public_bytes(der),
        manifest=manifest_bytes,
        firmware_signing_spki=spki_der(fw_key),
        batch_size=batch_size,
    )


def open_line(cfg: LineConfig, token: KeyBackend) -> tuple[ProductionLine, Manifest]:
    """Build the programmer's production line from the keys in ``token``."""
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
        store=SQLiteStore(Path(cfg.workdir) / PROG_DB),
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


#: Per-device events a worker reports: "provisioned", "refused", "booted", "not-booted".
DeviceEvent = Callable[[str], None]


def run_worker(
    cfg: LineConfig,
    chips: Sequence[ChipSpec],
    tamper_first: bool = False,
    *,
    on_device: DeviceEvent | None = None,
) -> dict[str, Any]:
    """Provision and program ``chips`` on this process's line; return counts."""
    note = on_device or (lambda _event: None)
    token = open_token("programmer")
    line, manifest = open_line(cfg, token)
    work = Path(cfg.workdir)
    image_path = work / IMAGE
    ports = {c.device_id: _Port(c.build(), cfg.release_log) for c in chips}
    counts: dict[str, Any] = {"provisioned": 0, "booted": 0, "refused": {}, "tampered": 0}
    t0 = time.perf_counter()
    provisioned: list[Provisioned] = []
    for o in line.provision(ports.values()):
        if isinstance(o, Refused):
            counts["refused"][o.kind] = counts["refused"].get(o.kind, 0) + 1
            note("refused")
            continue
        provisioned.append(o)
        (work / DEVICES / f"{o.device_id}.pem").write_bytes(to_pem(o.certificate))
        note("provisioned")
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
            note("booted")
        else:
            counts["refused"][type(err).__name__] = counts["refused"].get(type(err).__name__, 0) + 1
            note("not-booted")
    counts["provision_s"] = t_prov
    counts["total_s"] = time.perf_counter() - t0
    return counts


# Worker processes report progress through a queue given at process start.
_progress_queue: Any = None


def _pool_init(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def _worker_entry(args: tuple[LineConfig, list[ChipSpec], bool]) -> dict[str, Any]:
    queue = _progress_queue
    if queue is None:
        return run_worker(*args)
    pending: dict[str, int] = {}
    last = time.monotonic()

    def note(event: str) -> None:
        nonlocal last
        pending[event] = pending.get(event, 0) + 1
        if time.monotonic() - last >= 0.1:
            queue.put(dict(pending))
            pending.clear()
            last = time.monotonic()

    try:
        return run_worker(*args, on_device=note)
    finally:
        if pending:
            queue.put(dict(pending))


# --- flows 7-8: provisioning and programming -----------------------------------------------------


@attrs.frozen
class ProvisionProgress:
    """Where a provisioning run is: ``handled`` of ``total`` devices went through flow 7."""

    total: int
    provisioned: int = 0
    refused: int = 0
    booted: int = 0
    not_booted: int = 0

    @property
    def handled(self) -> int:
        return self.provisioned + self.refused


class _Tally:
    def __init__(self, total: int, report: Callable[[ProvisionProgress], None] | None) -> None:
        self._counts = {"provisioned": 0, "refused": 0, "booted": 0, "not-booted": 0}
        self._total = total
        self._report = report
        self._lock = threading.Lock()

    def add(self, events: Mapping[str, int]) -> None:
        with self._lock:
            for k, v in events.items():
                self._counts[k] += v
            c = self._counts
            snapshot = ProvisionProgress(
                self._total, c["provisioned"], c["refused"], c["booted"], c["not-booted"]
            )
        if self._report is not None:
            self._report(snapshot)

    def note(self, event: str) -> None:
        self.add({event: 1})


def provision(
    workdir: str | os.PathLike[str],
    *,
    devices: int,
    first: int = 0,
    workers: int = 1,
    batch_size: int = 32,
    outsiders: int = 0,
    tamper_first: bool = False,
    progress: Callable[[ProvisionProgress], None] | None = None,
    pin: PinCallback | None = None,
) -> StepResult:
    """Provision and program a batch of simulated chips against the job (flows 7 and 8).

    The batch is the chips with UIDs ``DEVICE_BASE + first`` .. ``+ first + devices - 1``
    (chips beyond the job's targets are refused), plus ``outsiders`` chips outside the
    targets; ``tamper_first`` offers the first provisioned device a tampered image once
    (its SBM must refuse it).  ``workers`` processes share the batch.  Re-running a batch
    after a crash resumes it: devices already in the ledger are refused as already
    provisioned, and the store never counts past the quota.
    """
    for name, value, low in (
        ("--devices", devices, 1),
        ("--workers", workers, 1),
        ("--batch-size", batch_size, 1),
        ("--first", first, 0),
    ):
        if value < low:
            raise ConfigurationError(f"{name} must be at least {low}")
    if DEVICE_BASE + first + devices > 1 << 64:
        raise ConfigurationError("--first and --devices reach beyond 64-bit chip UIDs")
    work = check_step(workdir, "provision")
    _open(work, pin, "programmer")  # logs in now: a wrong PIN stops us before anything
    cfg = line_config(work, batch_size=batch_size)
    officers = [load_spki(k) for k in cfg.officer_keys]
    job = verify_job(cfg.job_signed, officers=officers, programmer=cfg.programmer_fp).job
    vendor = silicon_vendor(work)
    last_target = max(last for _first, last in job.targets.ranges)
    uids = [DEVICE_BASE + first + i for i in range(devices)]
    uids += [last_target + 1001 + i for i in range(outsiders)]
    chips = make_chips(vendor, uids)
    tally = _Tally(len(chips), progress)
    shares = [chips[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    if workers == 1:
        results = [run_worker(cfg, shares[0], tamper_first, on_device=tally.note)]
    else:
        results = _run_pool(cfg, shares, tamper_first, tally)
    elapsed = time.perf_counter() - t0

    refused: dict[str, int] = {}
    for r in results:
        for k, v in r["refused"].items():
            refused[k] = refused.get(k, 0) + v
    provisioned = sum(r["provisioned"] for r in results)
    booted = sum(r["booted"] for r in results)
    prov_s = max(r["provision_s"] for r in results)
    store = SQLiteStore(work / PROG_DB)
    try:
        jh = job_hash(cfg.job_signed)
        ids = [c.device_id for c in chips]
        in_ledger = store.known_devices(jh, ledger.KIND_PROVISIONED, ids)
        unprogrammed = in_ledger - store.known_devices(jh, ledger.KIND_PROGRAMMED, ids)
        quota, used = store.counts(jh)
    finally:
        store.close()
    already = refused.pop(AlreadyProvisionedError.__name__, 0)
    details = {
        "devices": len(chips),
        "first": first,
        "workers": workers,
        "provisioned": provisioned,
        "already_provisioned": already,
        "booted": booted,
        "refused": refused,
        "tampered_rejected": sum(r["tampered"] for r in results),
        "unprogrammed": sorted(unprogrammed),
        "quota": quota,
        "quota_used": used,
        "provision_s": prov_s,
        "elapsed_s": round(elapsed, 2),
        "devices_per_s": round(provisioned / prov_s, 1) if prov_s and provisioned else None,
    }
    return _finish(work, "provision", [PROG_DB, DEVICES], (), details, _provision_problem(details))


def _run_pool(
    cfg: LineConfig, shares: list[list[ChipSpec]], tamper_first: bool, tally: _Tally
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    stop = threading.Event()

    def drain() -> None:
        # Polls rather than waiting for an end marker: putting one would take the queue's
        # write lock, which a worker killed mid-put would hold for ever.
        while True:
            if queue.empty():
                if stop.is_set():
                    return
                time.sleep(0.05)
                continue
            tally.add(queue.get())

    reader = threading.Thread(target=drain, name="securethread-progress", daemon=True)
    reader.start()
    try:
        with ProcessPoolExecutor(
            len(shares), mp_context=ctx, initializer=_pool_init, initargs=(queue,)
        ) as pool:
            jobs = [
                pool.submit(_worker_entry, (cfg, s, tamper_first and i == 0))
                for i, s in enumerate(shares)
            ]
            return [j.result() for j in jobs]
    except BrokenProcessPool:
        raise WorkerDiedError(
            "a provisioning worker process died; run provision again to resume"
        ) from None
    finally:
        stop.set()
        reader.join(timeout=5)


def _provision_problem(d: Mapping[str, Any]) -> Error | None:
    refused: Mapping[str, int] = d["refused"]
    over = refused.get(QuotaExceededError.__name__, 0)
    if over:
        return QuotaExceededError(
            f"{over} device(s) refused: the job's quota of {d['quota']} devices is used up"
        )
    others = sum(refused.values())
    if others:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(refused.items()))
        return DeviceRefusedError(f"{others} device(s) refused or not booted ({kinds})")
    return None


# --- closing the run and reconciliation (flow 9) -------------------------------------------------


def export_ledger(workdir: str | os.PathLike[str], *, pin: PinCallback | None = None) -> StepResult:
    """The programmer exports its ledger (verified before it leaves) and closes the run."""
    work = check_step(workdir, "export-ledger")
    job_signed = _read(work / JOB, "job")
    ledger_key = _cert(work / LEDGER_CERT, "ledger-signing certificate").public_key()
    (prog,) = _open(work, pin, "programmer")
    prog_tx = _programmer_transcript(work, prog)
    jh = job_hash(job_signed)
    tmp = work / (LEDGER + ".tmp")
    store = SQLiteStore(work / PROG_DB)
    try:
        with open(tmp, "wb") as out:
            ledger.write_export(out, job_signed, store.export(jh))
            out.flush()
            os.fsync(out.fileno())
        with open(tmp, "rb") as src:
            _job, items = ledger.read_export(src)
            summary = ledger.verify_ledger(items, job=jh, ledger_key=ledger_key)  # type: ignore[arg-type]
        os.replace(tmp, work / LEDGER)
    finally:
        store.close()
        tmp.unlink(missing_ok=True)
    prog_tx.append(
        "production-run-closed",
        artefacts={"ledger": _file_sha256(work / LEDGER)},
        details={"job": JOB_ID, "provisioned": summary.provisioned},
    )
    return _finish(
        work,
        "export-ledger",
        [LEDGER, PROG_TX],
        [prog_tx],
        {
            "ledger_verified": True,
            **{k: getattr(summary, k) for k in ("records", "provisioned", "programmed")},
            "checkpoints": summary.checkpoints,
        },
    )


def reconcile_files(
    ledger_export: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str],
    officers: str | os.PathLike[str],
    programmer_cert: str | os.PathLike[str],
    ledger_cert: str | os.PathLike[str],
    production_ca: str | os.PathLike[str],
) -> ReconciliationReport:
    """Reconcile a ledger export offline, from files (certificates PEM or DER): the OEM root,
    the officer-key bundle it signed, the programmer's identity and ledger-signing
    certificates and the job's production CA.  Raises naming the first problem."""
    root_cert = _cert(Path(root), "OEM root certificate")
    officer_keys = _officer_keys(Path(officers), root_cert)
    trusted = {fingerprint(k): k for k in (load_spki(d, what="officer key") for d in officer_keys)}
    programmer = cert_fingerprint(_cert(Path(programmer_cert), "programmer certificate"))
    ledger_key = _cert(Path(ledger_cert), "ledger certificate").public_key()
    if not isinstance(ledger_key, ec.EllipticCurvePublicKey):
        raise CertificateError("the ledger certificate has no EC key")
    pca = _cert(Path(production_ca), "production CA certificate")
    try:
        src = open(ledger_export, "rb")
    except OSError as exc:
        where = os.fspath(ledger_export)
        raise ConfigurationError(f"cannot read ledger {where!r}: {exc.strerror}") from None
    with src:
        job_bytes, items = ledger.read_export(src)
        return reconcile_ledger(
            job_bytes,
            items,
            officers=trusted,
            programmer=programmer,
            ledger_key=ledger_key,
            root_cert=root_cert,
            production_ca_cert=pca,
        )


def reconcile(workdir: str | os.PathLike[str], *, pin: PinCallback | None = None) -> StepResult:
    """The OEM reconciles the exported ledger against its job and root, keeps the report and
    records it in its transcript."""
    work = check_step(workdir, "reconcile")
    report = reconcile_files(
        work / LEDGER,
        root=work / ROOT_CA,
        officers=work / OFFICERS,
        programmer_cert=work / PROG_ID,
        ledger_cert=work / LEDGER_CERT,
        production_ca=work / PCA,
    )
    (oem,) = _open(work, pin, "oem")
    oem_tx = _oem_transcript(work, oem)
    oem_tx.append(
        "reconciliation",
        artefacts={"ledger": _file_sha256(work / LEDGER)},
        details={"provisioned": report.provisioned, "programmed": report.programmed},
    )
    _write(work / RECONCILIATION, (report.to_json() + "\n").encode())  # last: marks it done
    return _finish(
        work,
        "reconcile",
        [RECONCILIATION, OEM_TX],
        [oem_tx],
        {**attrs.asdict(report), "reconciled": True},
    )


def verify_transcripts(workdir: str | os.PathLike[str]) -> dict[str, Anchor]:
    """Verify both enclaves' transcripts offline (public keys only); return their heads."""
    work = _resolve(workdir)
    out = {}
    for enclave, rel, cert in (("oem", OEM_TX, OEM_ID), ("programmer", PROG_TX, PROG_ID)):
        key = _cert(work / cert, f"{enclave} identity certificate").public_key()
        s = transcript_mod.verify_transcript(work / rel, public_key=key)  # type: ignore[arg-type]
        out[enclave] = Anchor(enclave, s.records[-1].seq, s.head)
    return out


__all__ = [
    "Anchor",
    "ChipSpec",
    "LineConfig",
    "ProvisionProgress",
    "STEPS",
    "StepOrderError",
    "StepResult",
    "WorkerDiedError",
    "check_step",
    "export_ledger",
    "issue_job",
    "line_config",
    "make_chips",
    "master_image",
    "oem_init",
    "onboard_programmer",
    "open_line",
    "provision",
    "reconcile",
    "reconcile_files",
    "run_worker",
    "silicon_vendor",
    "transfer_keys",
    "verify_transcripts",
]
