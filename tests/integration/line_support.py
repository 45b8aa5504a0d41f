"""Shared setup for the production-line tests (no pytest here: worker processes import it).

:class:`World` builds, on the session tokens of ``tests/conftest.py`` and under labels no
other test uses, what a programming centre has when it runs a job: an OEM root, two job
officers and a firmware-signing key (``oem`` token); the programmer's identity, license,
ledger and key-agreement keys certified by the root, an image key and a production CA
(``programmer`` token); a mastered image; a device-trust statement; a simulated fab and its
chips.  :meth:`World.job` makes a fresh job (a new identity, so a new quota mark) with its own
store directory and returns the runner's :class:`~securethread.programmer.runner.RunConfig`.

Chips are wrapped so the device side notes, durably, when it received its provisioning data
and when it booted an image (``released.log``, ``programmed.log``): after a kill the tests
check that every device holding secrets is in the ledger, and that resumed runs program the
released ones.  Hostile chips and the fault hook for subprocess tests live here too.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.device.vendor import ChipSpec, SiliconVendor, make_chips
from securethread.formats import ledger
from securethread.formats.device_trust import DeviceTrust, oem_root_hash, sign_device_trust
from securethread.formats.identity import IdentificationResponse, vendor_ca_id
from securethread.formats.image import master_image
from securethread.formats.job import (
    ProductionJob,
    Targets,
    VerifiedJob,
    cosign_job,
    sign_job,
    verify_job,
)
from securethread.keys.ecutil import spki_der
from securethread.keys.policy import IMAGE_KEY, SIGNING, Curve
from securethread.pki import (
    DeviceProfile,
    EnclavePurpose,
    cert_fingerprint,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    install_certificate,
)
from securethread.programmer.provision import StandardSbm
from securethread.programmer.runner import KeyLabels, RunConfig

DEVICE_BASE = 0x5EC0_0000_0000_0000
DEVICE_CLASS = "sensor-v1"
IMAGE_ID = "fw-line-test"
JOB_ID = "line-job"
SECURITY_COUNTER = 3


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --- the chips' SBM, as the runner sees it --------------------------------------------------------


#: The chips of securethread.device follow docs/device.md: the programmer's standard SBM.
SbmForTests = StandardSbm


# --- chips with a durable device-side log ---------------------------------------------------------


def _note(log_dir: str | None, name: str, device_id: str) -> None:
    if log_dir is None:
        return
    fd = os.open(os.path.join(log_dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, device_id.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


class LoggedPort:
    """A simulated chip whose side of the wire notes what it received (before using it)."""

    def __init__(self, dev: Any, log_dir: str | None) -> None:
        self.dev = dev
        self._log = log_dir

    def identify(self, challenge: bytes) -> bytes:
        return bytes(self.dev.identify(challenge))

    def provision(self, data: bytes) -> None:
        _note(self._log, "released.log", self.dev.device_id)  # it saw its secrets
        self.dev.provision(data)

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes:
        boot = bytes(self.dev.program(manifest, image, license, nonce))
        _note(self._log, "programmed.log", self.dev.device_id)
        _note(self._log, "licenses.log", f"{self.dev.device_id}:{ledger.sha256(license).hex()}")
        return boot


@attrs.frozen
class LoggedChip:
    """A :class:`~securethread.programmer.runner.PortFactory` for a simulated chip."""

    spec: ChipSpec
    log_dir: str | None = None

    @property
    def device_id(self) -> str:
        return self.spec.device_id

    def open(self) -> LoggedPort:
        return LoggedPort(self.spec.open(), self.log_dir)


class _HostilePort:
    def __init__(self, chip: HostileChip, inner: Any) -> None:
        self._chip = chip
        self._inner = inner

    def identify(self, challenge: bytes) -> bytes:
        how = self._chip.how
        if how == "garbage":
            return os.urandom(300)
        if how == "raise":
            raise RuntimeError("the adapter lost the device")
        if how == "not-bytes":
            return {"surprise": 1}  # type: ignore[return-value]
        if how == "evil-cert":
            return _evil_identification(self._chip, challenge)
        return bytes(self._inner.identify(challenge))

    def provision(self, data: bytes) -> None:
        if self._chip.how == "release-raise":
            raise ValueError("the device hung up during release")
        self._inner.provision(data)

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes:
        if self._chip.how == "program-raise":
            raise TypeError("the device answered nonsense")
        if self._chip.how == "program-garbage":
            self._inner.program(manifest, image, license, nonce)
            return os.urandom(100)
        return bytes(self._inner.program(manifest, image, license, nonce))


@attrs.frozen
class HostileChip:
    """A chip nobody vouches for.  ``how``: ``garbage`` identification bytes, ``raise`` from
    its port, ``not-bytes``, ``evil-cert`` (a vendor certificate made to break parsers),
    ``open`` (its port cannot be opened); on a genuine chip ``spec``: ``release-raise``,
    ``program-raise``, ``program-garbage`` (a made-up boot confirmation)."""

    device_id: str
    how: str
    spec: ChipSpec | None = None
    vendor_subject: str = ""  # RFC 4514 issuer name for ``evil-cert``

    def open(self) -> _HostilePort:
        if self.how == "open":
            raise OSError("no such device on the bus")
        return _HostilePort(self, self.spec.open() if self.spec is not None else None)


def _evil_identification(chip: HostileChip, challenge: bytes) -> bytes:
    """A well-formed, correctly signed identification response whose vendor certificate
    (issued in the vendor's name, signed by another key) repeats an extension:
    ``cryptography`` parses it lazily and raises ``DuplicateExtension`` when it is read."""
    from asn1crypto import x509 as ax

    from securethread.formats.identity import pop_payload

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer = x509.Name.from_rfc4514_string(chip.vendor_subject) if chip.vendor_subject else (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")])
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, chip.device_id)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    parsed = ax.Certificate.load(_der(cert))
    tbs = parsed["tbs_certificate"]
    tbs["extensions"] = ax.Extensions([tbs["extensions"][0], tbs["extensions"][0]])
    parsed["signature_value"] = key.sign(tbs.dump(force=True), ec.ECDSA(hashes.SHA256()))
    vendor_der = parsed.dump(force=True)
    spki = spki_der(key.public_key())
    return IdentificationResponse(
        challenge=challenge,
        device_id=chip.device_id,
        public_key=spki,
        vendor_certificate=vendor_der,
        signature=key.sign(
            pop_payload(challenge, chip.device_id, spki), ec.ECDSA(hashes.SHA256())
        ),
    ).to_bytes()


# --- the fault hook of the subprocess tests -------------------------------------------------------

_counts: dict[str, int] = {}


@attrs.frozen
class FaultAt:
    """At the ``nth`` passage of ``point`` in one process: ``kill`` this process (SIGKILL),
    ``term`` / ``int`` the leader (SIGTERM / SIGINT, as an operator would), ``term-self``
    (SIGTERM to this process: a worker stopped on its own), ``int-group``
    (SIGINT to the leader's process group and to this process, as a terminal's Ctrl-C),
    ``kill-leader``, or
    ``pause`` until the test opens the gate."""

    point: str
    nth: int = 1
    action: str = "kill"
    leader: int = 0
    gate: str = ""  # ``pause``: write <gate>.paused, wait until <gate> exists

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        _counts[point] = _counts.get(point, 0) + 1
        if _counts[point] != self.nth:
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "term":
            os.kill(self.leader, signal.SIGTERM)
        elif self.action == "int":
            os.kill(self.leader, signal.SIGINT)
        elif self.action == "term-self":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.action == "int-group":
            # A terminal's Ctrl-C: SIGINT to the leader's process group -- and to this
            # process too, as if a worker were in that group.
            os.killpg(os.getpgid(self.leader), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        elif self.action == "kill-leader":
            os.kill(self.leader, signal.SIGKILL)
        elif self.action == "pause":
            Path(self.gate + ".paused").write_text(str(os.getpid()))
            while not os.path.exists(self.gate):
                time.sleep(0.02)


# --- the world ------------------------------------------------------------------------------------


@attrs.frozen
class Job:
    """A fresh job and everything about it a test looks at afterwards."""

    config: RunConfig
    dir: Path
    ledger_key: ec.EllipticCurvePublicKey

    @property
    def store(self) -> Path:
        return Path(self.config.store)

    @property
    def job_hash(self) -> bytes:
        return self.config.job.sha256

    def chips(self, specs: Sequence[ChipSpec]) -> list[LoggedChip]:
        return [LoggedChip(s, str(self.dir)) for s in specs]

    def log(self, name: str) -> list[str]:
        p = self.dir / name
        return p.read_text().split() if p.exists() else []

    def dump(self, devices: Sequence[Any], name: str = "setup.pickle") -> Path:
        """Pickle (config, devices) for a subprocess run (``tests.integration.run_entry``)."""
        path = self.dir / name
        path.write_bytes(pickle.dumps((self.config, list(devices))))
        return path


class World:
    """One OEM, one programmer, one fab: see the module docstring."""

    def __init__(self, oem: Any, prog: Any, root_dir: Path, *, chips: int) -> None:
        self.oem, self.prog = oem, prog
        self.dir = root_dir
        p = "t-" + uuid.uuid4().hex[:10]
        self.labels = KeyLabels(
            production_ca=f"{p}-pca",
            image_key=f"{p}-image",
            license_signing=f"{p}-lic",
            ledger_signing=f"{p}-ledger",
            key_agreement=f"{p}-ka",
        )
        root = create_root_ca(oem, label=f"{p}-root")
        root_key = oem.private_key(f"{p}-root")
        self.root = root
        self.officers = [oem.generate_ec(f"{p}-off{i}", curve=Curve.P256, policy=SIGNING)
                         for i in (1, 2)]  # fmt: skip
        fw = oem.generate_ec(f"{p}-fw", curve=Curve.P256, policy=SIGNING)
        self.firmware_key = spki_der(fw.public_key())

        def enrol(label: str, purpose: EnclavePurpose, vouch: Any = None) -> x509.Certificate:
            csr = create_enclave_csr(
                prog, label=label, enclave_name="programmer-1", purpose=purpose, signer=vouch
            )
            cert = certify_enclave(
                root_key, root, csr, enclave_name="programmer-1", purpose=purpose,
                role="programmer", proof_key=vouch.public_key() if vouch is not None else None,
            )  # fmt: skip
            install_certificate(prog, label, cert)
            return cert

        identity = enrol(f"{p}-id", EnclavePurpose.IDENTITY)
        self.programmer_fp = cert_fingerprint(identity)
        enrol(self.labels.license_signing, EnclavePurpose.LICENSE_SIGNING)
        ledger_cert = enrol(self.labels.ledger_signing, EnclavePurpose.LEDGER_SIGNING)
        self.ledger_key = ledger_cert.public_key()
        enrol(self.labels.key_agreement, EnclavePurpose.KEY_AGREEMENT, prog.private_key(f"{p}-id"))

        image_key = prog.generate_aes(self.labels.image_key, policy=IMAGE_KEY)
        self.image = root_dir / "image.enc"
        with open(self.image, "wb") as dst:
            self.manifest = master_image(
                io.BytesIO(os.urandom(4096)), dst, image_key=image_key, signing_key=fw,
                image_id=IMAGE_ID, image_version="1.0.0", security_counter=SECURITY_COUNTER,
                device_class=DEVICE_CLASS,
            )  # fmt: skip
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self.not_before = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
        pca = certify_production_ca(
            root_key, root,
            create_production_ca_csr(prog, label=self.labels.production_ca, job_id=JOB_ID),
            job_id=JOB_ID, not_before=self.not_before,
        )  # fmt: skip
        install_certificate(prog, self.labels.production_ca, pca)
        self.pca = pca
        self._root_key, self._fw = root_key, fw
        self.vendor = SiliconVendor()
        self.specs = make_chips(
            self.vendor,
            [DEVICE_BASE + i for i in range(chips)],
            oem_root_hash=oem_root_hash(root),
            flash_size=1 << 16,
        )
        self._jobs = 0

    def job(self, *, quota: int, targets: int | None = None, **config: Any) -> Job:
        """A fresh job on this world (targets: the first ``targets`` chip UIDs).  Runs are
        in-process (``workers=0``) unless ``workers`` says otherwise."""
        config.setdefault("workers", 0)
        self._jobs += 1
        n = self._jobs
        targets = quota if targets is None else targets
        t = int(self.not_before.timestamp())
        job = ProductionJob(
            job_id=JOB_ID, device_class=DEVICE_CLASS,
            targets=Targets(ranges=((DEVICE_BASE, DEVICE_BASE + targets - 1),)),
            quota=quota, not_before=t, not_after=t + 7 * 86400 + n, image_id=IMAGE_ID,
            manifest_sha256=ledger.sha256(self.manifest), programmer=self.programmer_fp,
            certificate=DeviceProfile(organisation="Test OEM"),
            production_ca=ledger.sha256(self.pca.public_bytes(serialization.Encoding.DER)),
            vendors=(vendor_ca_id(self.vendor.root_certificate),), threshold=2,
        )  # fmt: skip  (not_after + n: another body, another job identity)
        signed = cosign_job(sign_job(job, [self.officers[0]]), self.officers[1])
        verified: VerifiedJob = verify_job(
            signed, officers=[o.public_key() for o in self.officers],
            programmer=self.programmer_fp, min_threshold=2,
        )  # fmt: skip
        trust = sign_device_trust(
            DeviceTrust(job_id=JOB_ID, job_sha256=verified.sha256, device_class=DEVICE_CLASS,
                        firmware_signing_key=self._fw.public_key(),
                        min_security_counter=SECURITY_COUNTER),
            self._root_key,
        )  # fmt: skip
        sbm = SbmForTests(_der(self.pca), _der(self.root), trust)
        jdir = self.dir / f"job-{n}"
        jdir.mkdir()
        cfg = RunConfig(
            job=verified, manifest=self.manifest, firmware_key=self.firmware_key,
            image=str(self.image), store=str(jdir / "store.sqlite"),
            certificates=str(jdir / "devices"), production_ca=_der(self.pca),
            vendor_roots=(_der(self.vendor.root_certificate),), sbm=sbm,
            labels=self.labels, **config,
        )  # fmt: skip
        assert isinstance(self.ledger_key, ec.EllipticCurvePublicKey)
        return Job(cfg, jdir, self.ledger_key)


# --- checks ---------------------------------------------------------------------------------------


@attrs.frozen
class LedgerView:
    quota: int
    used: int
    provisioned: dict[str, int]  # device id -> provisioning records
    programmed: dict[str, int]
    slots: list[int]
    certificates: dict[str, bytes]  # device id -> DER in its provisioning record
    licenses: dict[str, str]  # device id -> license SHA-256 (hex) in its provisioning record
    burned: int = 0  # slots counted and never to be used (a run after a kill, a restore)


def ledger_view(job: Job) -> LedgerView:
    """The store's ledger, verified (chain and checkpoints), per device."""
    from securethread.programmer.store import SQLiteStore

    store = SQLiteStore(job.store, create=False)
    try:
        state = store.state(job.job_hash)
        quota, used = state.quota, state.used
        items = [i for i in store.export(job.job_hash) if i[0] in ("r", "c")]
    finally:
        store.close()
    prov: dict[str, int] = {}
    prog: dict[str, int] = {}
    slots: list[int] = []
    certs: dict[str, bytes] = {}
    lics: dict[str, str] = {}
    reader = ledger.LedgerReader(job=job.job_hash, ledger_key=job.ledger_key)
    for rec in reader.records_so_far(items):
        into = prov if rec.kind == ledger.KIND_PROVISIONED else prog
        into[rec.device_id] = into.get(rec.device_id, 0) + 1
        if rec.kind == ledger.KIND_PROVISIONED:
            slots.append(rec.slot)
            certs[rec.device_id] = bytes(rec.body["cert"])
            lics[rec.device_id] = bytes(rec.body["license_sha256"]).hex()
    return LedgerView(quota, used, prov, prog, slots, certs, lics, state.burned)


def check_settled(job: Job) -> LedgerView:
    """After a run that ended normally: the ledger verifies; every device that received
    secrets is in it once (S4); every provisioned device is programmed, with the license its
    record names; every slot counted is used by a record or burned (none stranded: a run
    after a kill burns what it cannot prove unreleased); each device's certificate file is
    the certificate in its record."""
    import ssl

    view = ledger_view(job)
    released = set(job.log("released.log"))
    assert released <= set(view.provisioned), released - set(view.provisioned)
    assert all(n == 1 for n in view.provisioned.values())
    assert all(n == 1 for n in view.programmed.values())
    assert set(view.programmed) == set(view.provisioned)
    assert view.used == len(view.provisioned) + view.burned <= view.quota
    assert sorted(view.slots) == sorted(set(view.slots))
    for entry in job.log("licenses.log"):
        device_id, _, digest = entry.partition(":")
        assert view.licenses[device_id] == digest, f"{device_id} got another license"
    devices = Path(job.config.certificates)
    for device_id, der in view.certificates.items():
        pem = (devices / f"{device_id}.pem").read_text()
        assert ssl.PEM_cert_to_DER_cert(pem) == der
    assert not list(devices.glob(".*.tmp"))
    return view


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


# --- runs in a subprocess (tests.integration.run_entry) -------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


@attrs.frozen
class SubRun:
    returncode: int
    result: dict[str, Any] | None
    stderr: str


def start_run(
    setup: Path,
    *,
    fault: str | None = None,
    workers: int | None = None,
    batch: int | None = None,
) -> subprocess.Popen[str]:
    """A run in its own process (and its own session: a process-group signal reaches it and
    its workers only).  The PIN reaches it as the CLI's would, from the environment."""
    argv = [sys.executable, "-m", "tests.integration.run_entry", str(setup)]
    if fault:
        argv += ["--fault", fault]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if batch is not None:
        argv += ["--batch", str(batch)]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> SubRun:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    result = None
    if lines and lines[-1].startswith("{"):
        result = json.loads(lines[-1])
    return SubRun(proc.returncode, result, err)


#: Notices of the token store's start-up repair (securethread/hsm/filestore.py): a kill in an
#: earlier test may leave an empty object file in the shared token, moved aside (with this
#: line on stderr) by the next process to open it a minute later.
_REPAIR_NOTICES = ("moved aside empty object file ", "restored ")


def own_lines(stderr: str) -> list[str]:
    """A run's stderr lines, less the token store's repair notices (not the run's own)."""
    return [x for x in stderr.splitlines() if x and not x.startswith(_REPAIR_NOTICES)]


def run_sub(setup: Path, **kw: Any) -> SubRun:
    return finish(start_run(setup, **kw))
