"""Production runs: the worker loop and the process pool behind ``programmer provision``.

A run takes one job's devices through flows 7 and 8, batch by batch: provision a batch
(:class:`~securethread.programmer.line.ProductionLine`), then program the devices of that
batch that received their secrets.  Nothing of the run is kept per device beyond its batch,
so memory is flat however many devices pass.  The run never stops and never loses count:

* **One run per job at a time.**  The leader holds an exclusive ``flock`` on
  ``<store>.lock`` for the whole run; a second run is refused at once with
  :class:`RunLockedError`.
* **A slot is handed out once, ever.**  A run that ends (normally, by a signal's drain, or
  with a worker dead or an error reported) leaves a clean quota mark: the next run reuses
  the slots the run gave back and reclaims those of dead workers.  After a run that was
  killed, or on a store copied back, the next run *burns* them instead (and jumps above
  every slot the mark covers): at most one block of slots is lost, none is counted twice
  (:meth:`~securethread.programmer.store.SQLiteStore.begin_run`, :mod:`.quota_mark`).
* **A store that cannot be silently forgotten** (S7): the store is checked for damage
  (``PRAGMA quick_check``) and against the job's quota mark in the token before it is used
  (:func:`~securethread.programmer.quota_mark.open_store`), and the mark moves once per
  reservation block.
* **Counted devices get programmed.**  Device certificates are written as
  ``<certificates>/<device-id>.pem`` (temporary file, fsync, rename, directory fsync) after
  the batch commit and before the release; a device counted on an earlier run and not
  programmed is programmed now with what it was released then
  (:attr:`RunResult.recovered`).
* **Signals.**  SIGTERM and SIGINT stop the run after the batch in flight (a batch not yet
  counted is dropped, one counted is released and programmed); the run then ends with
  :class:`RunInterruptedError`, whose ``exit_code`` is 128 + the signal number (130 for
  SIGINT, 143 for SIGTERM).  Worker processes run in a session of their own, so the
  terminal's Ctrl-C (sent to the foreground process group) never reaches them, and they
  ignore SIGINT: they stop through the leader; a SIGTERM sent to one worker stops the whole
  run the same way.  A worker dies with its leader (``PR_SET_PDEATHSIG`` on Linux, and a
  watcher of the parent pid): no worker is left running and logged in.
* **A device never stops the line** (see :mod:`securethread.programmer.line`); token or
  store trouble stops the run with that error.

A worker process is a fresh interpreter (``sys.executable``, as multiprocessing's spawn
start method makes one) that gets everything through the one connection it inherits --
what spawn would send (the leader's ``sys.path``, working directory and main module), the
configuration, the token PIN (never the environment or a command line), then batches of
device factories, two at a time.  A worker that dies stops the run with
:class:`WorkerDiedError`; running again resumes.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from multiprocessing import spawn
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path
from typing import Any, Protocol

import attrs
from cryptography import x509

from securethread.errors import (
    ConfigurationError,
    DeviceRefusedError,
    Error,
    JobError,
    StoreError,
)
from securethread.formats import ledger
from securethread.formats.identity import (
    IdentityVerifier,
    ProvisionedIdentityVerifier,
    check_vendor_cas,
)
from securethread.formats.image import Manifest, verify_manifest
from securethread.formats.job import STAGE_PROGRAM, VerifiedJob, check_device_id
from securethread.formats.license import LicenseIssuer
from securethread.hsm import KeyBackend, PinCallback, load_spki, open_token, resolve_pin
from securethread.hsm.pin import PinSet, child_environment
from securethread.hsm.token import Token
from securethread.hsm.uri import PKCS11URI
from securethread.pki import DeviceCertificateIssuer
from securethread.programmer.line import (
    NO_ARCHIVE,
    NO_FAULTS,
    AlreadyDone,
    BootVerifier,
    CertificateArchive,
    DevicePort,
    FaultHook,
    Packager,
    ProductionLine,
    Provisioned,
    Refused,
    Unreleased,
    describe,
)
from securethread.programmer.quota_mark import QuotaMark, block_for, open_store
from securethread.programmer.store import MarkKeeper, ProductionStore, SQLiteStore

# --- what the caller gives ------------------------------------------------------------------------


class PortFactory(Protocol):
    """One device on the line, as picklable data: ``open`` connects to it (``device_id`` is
    what it claims to be, for reports; identification decides who it is)."""

    @property
    def device_id(self) -> str: ...

    def open(self) -> DevicePort: ...


class SbmInterface(Protocol):
    """What the line sends to its chips' Secure Boot Manager and checks from it (picklable:
    built by the caller from the device format, used in every worker)."""

    def packager(self, job_sha256: bytes) -> Packager:
        """Provisioning data for a device of job ``job_sha256`` (the job identity the line
        opened), from the device certificate's DER."""
        ...

    def boot_verifier(self, manifest: Manifest) -> BootVerifier:
        """Checks a device's boot confirmation for ``manifest``; raises."""
        ...


@attrs.frozen(kw_only=True)
class KeyLabels:
    """Labels of the programmer token's keys a run uses (certificates under the same labels
    for the license-signing and key-agreement keys)."""

    production_ca: str
    image_key: str | None  # None: a "provision" job licenses nothing
    license_signing: str = "license-signing"
    ledger_signing: str = "ledger-signing"
    key_agreement: str = "key-agreement"


@attrs.frozen(kw_only=True)
class RunConfig:
    """Everything a run needs; picklable (it goes to the worker processes as it is).

    ``job`` was verified by the caller (officers, this programmer, validity); ``manifest`` is
    the job's signed manifest, verified again here under ``firmware_key`` (SPKI DER) and
    against the job; ``image`` the encrypted image file (both None for a "provision" job,
    whose line certifies and releases provisioning data and stops there); ``store`` the
    job's store file
    (``<store>.lock`` is the run lock); ``certificates`` the directory of device certificate
    files; ``production_ca`` (the certificate the job names by its hash) and ``vendor_roots``
    (the vendor CA certificates the job names by their keys' hashes, each once: anything
    else is refused when the line is built) are DER; ``token`` a label or RFC 7512 URI.

    ``workers``: worker processes (``0``: run the line in the calling process -- no process
    isolation, and the memory SoftHSM keeps for every temporary key of the process grows
    with the run); ``recycle_after``: devices a worker process handles before a fresh one
    replaces it (SoftHSM 2.6.1 frees destroyed session objects only when the module is
    finalised, about 0.4 KiB per device: recycling keeps a long run's memory flat);
    ``mark_block``: slots per quota-mark write, and the most a kill burns (default
    :func:`~securethread.programmer.quota_mark.block_for` the quota).
    """

    job: VerifiedJob
    manifest: bytes | None
    firmware_key: bytes
    image: str | None
    store: str
    certificates: str
    production_ca: bytes
    vendor_roots: tuple[bytes, ...]
    sbm: SbmInterface
    labels: KeyLabels
    #: A "program" job: the DER production-CA certificates its ``provisioned_by`` names (in
    #: that order) and the OEM root they chain to (DER); its chips are identified by them.
    provisioned_by: tuple[bytes, ...] = ()
    oem_root: bytes = b""
    token: str = "programmer"
    workers: int = 1
    batch_size: int = 32
    recycle_after: int = 5000
    mark_block: int | None = None
    busy_timeout_s: float = 60.0


# --- what a run returns ---------------------------------------------------------------------------


@attrs.frozen
class DeviceNote:
    """Why one device was refused (``stage``: open, identify, count, release, program)."""

    device_id: str | None
    stage: str
    kind: str
    message: str


MAX_NOTES = 100


@attrs.frozen(kw_only=True)
class RunResult:
    """What a run did.

    ``provisioned``: counted now and released; ``recovered``: counted on an earlier run,
    released again now and sent to programming (no second count); ``programmed``: booted
    the image now (new and recovered); ``already_done``: provisioned and programmed before;
    ``refused``: refused before counting, by reason (``QuotaExceededError`` among them);
    ``not_programmed``: counted, but release or programming failed now, by reason (a later
    run retries them); ``dropped``: devices of a batch a stop request dropped before counting;
    ``unprogrammed``: devices of the job counted and not programmed, store-wide, after the
    run (``unprogrammed_ids``: the first of them); ``reclaimed``: slots of dead runs put
    back at the start; ``burned``: slots burned at the start (the previous run was killed
    or the store is a restored copy: they count against the quota, never used);
    ``quota_used`` counts burned slots; ``interrupted_by``: the signal that stopped the
    run, if one did.
    """

    job_id: str
    devices: int
    provisioned: int
    recovered: int
    programmed: int
    already_done: int
    refused: Mapping[str, int]
    not_programmed: Mapping[str, int]
    dropped: int
    notes: tuple[DeviceNote, ...]
    quota: int
    quota_used: int
    unprogrammed: int
    unprogrammed_ids: tuple[str, ...]
    reclaimed: int
    burned: int
    workers: int
    elapsed_s: float
    provision_s: float
    interrupted_by: str | None = None

    @property
    def devices_per_s(self) -> float | None:
        counted = self.provisioned + self.recovered
        return round(counted / self.elapsed_s, 1) if self.elapsed_s and counted else None

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=True)
        out["refused"] = dict(self.refused)
        out["not_programmed"] = dict(self.not_programmed)
        out["notes"] = [attrs.asdict(n) for n in self.notes]
        out["unprogrammed_ids"] = list(self.unprogrammed_ids)
        out["devices_per_s"] = self.devices_per_s
        return out


class RunLockedError(ConfigurationError):
    """Another run of the same job (the same store) is going on."""


class RunInterruptedError(Error):
    """A signal stopped the run after its batch in flight; ``result`` says what was done.

    ``exit_code`` is 128 + the signal number (130 SIGINT, 143 SIGTERM).  Running again
    resumes: nothing counted is lost."""

    def __init__(self, message: str, *, result: RunResult, signum: int) -> None:
        super().__init__(message)
        self.result = result
        self.signum = signum
        self.exit_code = 128 + signum


class WorkerDiedError(Error):
    """A worker process died (killed?); ``result`` says what the others did.  Running again
    resumes: its reserved slots are reclaimed, its counted devices programmed."""

    def __init__(self, message: str, *, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


@attrs.frozen
class Progress:
    """Where a run is, after each batch."""

    handled: int
    provisioned: int
    recovered: int
    programmed: int
    refused: int
    not_programmed: int


# --- per batch: what a line reports ---------------------------------------------------------------


@attrs.define
class _Tally:
    """Counts of a run (or of one batch, sent from a worker to the leader)."""

    devices: int = 0
    provisioned: int = 0
    recovered: int = 0
    programmed: int = 0
    already_done: int = 0
    dropped: int = 0
    refused: dict[str, int] = attrs.Factory(dict)
    not_programmed: dict[str, int] = attrs.Factory(dict)
    notes: list[DeviceNote] = attrs.Factory(list)
    provision_s: float = 0.0

    def note(self, into: dict[str, int], device_id: str | None, stage: str, exc: Error) -> None:
        kind = type(exc).__name__
        into[kind] = into.get(kind, 0) + 1
        if len(self.notes) < MAX_NOTES:
            self.notes.append(DeviceNote(device_id, stage, kind, describe(exc, 300)))

    def add(self, other: _Tally) -> None:
        for name in ("devices", "provisioned", "recovered", "programmed", "already_done",
                     "dropped"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.refused, other.refused),
                             (self.not_programmed, other.not_programmed)):  # fmt: skip
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.notes.extend(other.notes[: max(0, MAX_NOTES - len(self.notes))])
        self.provision_s += other.provision_s

    def progress(self) -> Progress:
        return Progress(
            self.devices - self.dropped,
            self.provisioned,
            self.recovered,
            self.programmed,
            sum(self.refused.values()) + self.already_done,
            sum(self.not_programmed.values()),
        )


def _syncfs() -> Callable[[int], int] | None:
    """syncfs(2) (Linux): one flush of the file system a descriptor is on."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class CertificateFiles:
    """The line's certificate archive: ``<directory>/<device-id>.pem``, written before the
    release.  Per batch: every file to a temporary name, their data flushed (one syncfs(2)
    where there is one, else fsync per file), renamed, and the directory fsynced -- a crash
    leaves each file whole or absent, never empty or cut."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._syncfs = _syncfs()

    def keep(self, certificates: Sequence[tuple[str, bytes]]) -> None:
        if not certificates:
            return
        d = self.directory
        try:
            d.mkdir(parents=True, exist_ok=True)
            done: list[tuple[Path, Path]] = []
            for device_id, der in certificates:
                check_device_id(device_id)  # verified ids only: never a path
                tmp = d / f".{device_id}.pem.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
                    if self._syncfs is None:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                done.append((tmp, d / f"{device_id}.pem"))
            dfd = os.open(d, os.O_RDONLY)
            try:
                if self._syncfs is not None and self._syncfs(dfd) != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
                for tmp, final in done:
                    os.replace(tmp, final)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise StoreError(
                f"cannot write device certificates in {str(d)!r}: {exc.strerror}"
            ) from None


def _image_opener(path: str) -> Callable[[], Any]:
    def open_image() -> Any:
        return open(path, "rb")

    return open_image


def verified_manifest(config: RunConfig) -> Manifest:
    """The job's manifest, verified under the firmware-signing key and against the job
    (a :class:`JobError` for a "provision" job, which has none)."""
    job = config.job
    _image_id, manifest_sha256 = job.job.image()
    if config.manifest is None:
        raise JobError(f"the run of job {job.job.job_id} has no manifest")
    fw_key = load_spki(config.firmware_key, what="firmware-signing key")
    manifest = verify_manifest(config.manifest, key=fw_key)
    if ledger.sha256(config.manifest) != manifest_sha256:
        raise JobError(f"job {job.job.job_id} names another manifest")
    return manifest


def build_line(
    config: RunConfig,
    token: KeyBackend,
    store: ProductionStore,
    *,
    guard: MarkKeeper,
    run: bytes,
    faults: FaultHook = NO_FAULTS,
    archive: CertificateArchive | None = None,
    challenge_of: Callable[[bytes], bytes] | None = None,
) -> ProductionLine:
    """The production line of ``config`` on ``token`` and ``store`` (what each worker runs;
    ``archive`` defaults to the certificate files of ``config.certificates``).
    ``challenge_of`` gives the challenge an identification answer must sign when the
    challenge was issued before the line met the device (the station API hands out its
    own); by default it is the line's fresh one."""
    job = config.job
    labels = config.labels
    if not job.job.programs:  # a "provision" job: certify and release; no image, no license
        return _provision_line(config, token, store, guard=guard, run=run, faults=faults,
                               archive=archive, challenge_of=challenge_of)  # fmt: skip
    manifest = verified_manifest(config)
    if job.job.stage == STAGE_PROGRAM:
        return _program_line(
            config, token, store, manifest, guard=guard, run=run, faults=faults,
            challenge_of=challenge_of,
        )  # fmt: skip
    licenses = _license_issuer(token, labels, manifest, job_id=job.job.job_id)
    return _vendor_line(config, token, store, licenses, guard=guard, run=run, faults=faults,
                        archive=archive, challenge_of=challenge_of)  # fmt: skip


def _license_issuer(
    token: KeyBackend, labels: KeyLabels, manifest: Manifest, *, job_id: str
) -> LicenseIssuer:
    """The licenses of a job that programs: the image key (and the license keys) in the
    token."""
    if labels.image_key is None:
        raise JobError(f"job {job_id} programs: its run needs the image key's label")
    return LicenseIssuer(
        ka_key=token.private_key(labels.key_agreement),
        ka_certificate=token.certificate(labels.key_agreement),
        signing_key=token.private_key(labels.license_signing),
        signing_certificate=token.certificate(labels.license_signing),
        image_key=token.secret_key(labels.image_key),
        manifest=manifest,
    )


def _vendor_line(
    config: RunConfig,
    token: KeyBackend,
    store: ProductionStore,
    licenses: LicenseIssuer | None,
    *,
    guard: MarkKeeper,
    run: bytes,
    faults: FaultHook,
    archive: CertificateArchive | None,
    challenge_of: Callable[[bytes], bytes] | None,
) -> ProductionLine:
    """The line of a job that provisions (stage "full", or "provision" with ``licenses``
    None): chips identified under the vendor CAs the job names, certified by its
    production CA."""
    job, labels = config.job, config.labels
    if ledger.sha256(config.production_ca) != job.job.production_ca_sha256():
        raise JobError(f"job {job.job.job_id} names another production-CA certificate")
    pca = x509.load_der_x509_certificate(config.production_ca)
    # The vendor roots must be exactly the CAs the officer-signed job names: a root the
    # caller adds is refused here, whoever built the configuration.
    roots = check_vendor_cas(config.vendor_roots, named=job.job.vendors, what="run vendor CA")
    verifier = IdentityVerifier(roots)
    return ProductionLine(
        job=job,
        store=store,
        identify=lambda resp, ch: verifier.verify(
            resp, challenge=ch if challenge_of is None else challenge_of(resp)
        ),
        issuer=DeviceCertificateIssuer(
            token.private_key(labels.production_ca),
            pca,
            job_id=job.job.job_id,
            job_tag=job.sha256,
            profile=job.job.certificate,
        ),
        licenses=licenses,
        ledger_key=token.private_key(labels.ledger_signing),
        packager=config.sbm.packager(job.sha256),
        batch_size=config.batch_size,
        guard=guard,
        run=run,
        faults=faults,
        archive=archive if archive is not None else CertificateFiles(config.certificates),
    )


def _provision_line(
    config: RunConfig,
    token: KeyBackend,
    store: ProductionStore,
    *,
    guard: MarkKeeper,
    run: bytes,
    faults: FaultHook,
    archive: CertificateArchive | None,
    challenge_of: Callable[[bytes], bytes] | None,
) -> ProductionLine:
    """The line of a "provision" job (the silicon vendor's fab): no manifest, no image key,
    no license -- the token need not hold any image key for it to run."""
    if config.manifest is not None or config.image is not None or config.labels.image_key:
        raise JobError(
            f"job {config.job.job.job_id} is a 'provision' job: its run takes no image, "
            "manifest or image key"
        )
    return _vendor_line(config, token, store, None, guard=guard, run=run, faults=faults,
                        archive=archive, challenge_of=challenge_of)  # fmt: skip


def _program_line(
    config: RunConfig,
    token: KeyBackend,
    store: ProductionStore,
    manifest: Manifest,
    *,
    guard: MarkKeeper,
    run: bytes,
    faults: FaultHook,
    challenge_of: Callable[[bytes], bytes] | None,
) -> ProductionLine:
    """The line of a "program" job: chips identified by the OEM device certificates they
    were provisioned with, under the production CAs the officer-signed job names (each
    certificate checked against the job's hashes here, whoever built the configuration, and
    under the OEM root by the verifier); licenses and the image; no certificate is issued."""
    job = config.job
    named = tuple(sorted(ledger.sha256(der) for der in config.provisioned_by))
    if named != job.job.provisioned_by:
        raise JobError(
            f"job {job.job.job_id}: the run's production-CA certificates are not exactly "
            "the ones its provisioned_by names"
        )
    verifier = ProvisionedIdentityVerifier(
        [x509.load_der_x509_certificate(der) for der in config.provisioned_by],
        x509.load_der_x509_certificate(config.oem_root),
    )
    labels = config.labels
    if labels.image_key is None:
        raise JobError(f"job {job.job.job_id}: a 'program' run needs the image key's label")
    return ProductionLine(
        job=job,
        store=store,
        identify=lambda resp, ch: verifier.verify(
            resp, challenge=ch if challenge_of is None else challenge_of(resp)
        ),
        issuer=None,
        licenses=_license_issuer(token, labels, manifest, job_id=job.job.job_id),
        ledger_key=token.private_key(labels.ledger_signing),
        packager=None,
        batch_size=config.batch_size,
        guard=guard,
        run=run,
        faults=faults,
        archive=NO_ARCHIVE,  # no certificate is issued: the fab's ledger has them
    )


class _Line:
    """A worker's line: its token session, its store connection, the pipeline."""

    def __init__(
        self,
        config: RunConfig,
        token: Token,
        store: SQLiteStore,
        mark: QuotaMark,
        run_id: bytes,
        faults: FaultHook,
    ) -> None:
        self.line = build_line(config, token, store, guard=mark, run=run_id, faults=faults)
        self._program: tuple[bytes, BootVerifier, Callable[[], Any]] | None = None
        if config.job.job.programs:  # a "provision" job's line stops at the release
            assert config.manifest is not None and config.image is not None  # build_line
            self._program = (
                config.manifest,
                config.sbm.boot_verifier(verified_manifest(config)),
                _image_opener(config.image),
            )

    def batch(self, factories: Sequence[PortFactory], stop: Callable[[], bool]) -> _Tally:
        """Provision one batch, then program its released devices."""
        t = _Tally(devices=len(factories))
        t0 = time.perf_counter()
        ports: list[DevicePort] = []
        for f in factories:
            try:
                ports.append(f.open())
            except Exception as exc:  # a device we cannot even talk to: its refusal
                t.note(t.refused, _claimed_id(f), "open",
                       DeviceRefusedError(f"cannot open the device: {describe(exc)}"))  # fmt: skip
        result = self.line.provision_batch(ports, stop=stop)
        if result.stopped:
            t.dropped = len(factories)
            return t
        for o in result.outcomes:
            if isinstance(o, Provisioned):
                if o.recovered:
                    t.recovered += 1
                else:
                    t.provisioned += 1
            elif isinstance(o, Unreleased):
                t.note(t.not_programmed, o.device_id, "release", o.reason)
            elif isinstance(o, AlreadyDone):
                t.already_done += 1
            elif isinstance(o, Refused):
                stage = "count" if o.kind == "QuotaExceededError" else "identify"
                t.note(t.refused, o.device_id, stage, o.reason)
        t.provision_s = time.perf_counter() - t0
        if self._program is None:  # provisioning data burnt: nothing follows here
            self.line.released([prov for _dev, prov in result.to_program])
            return t
        manifest, verify_boot, open_image = self._program
        for device_id, err in self.line.program(
            result.to_program,
            manifest=manifest,
            open_image=open_image,
            verify_boot=verify_boot,
        ):
            if err is None:
                t.programmed += 1
            else:
                t.note(t.not_programmed, device_id, "program", err)
        return t


def _claimed_id(factory: object) -> str | None:
    try:
        value = factory.device_id  # type: ignore[attr-defined]
    except Exception:
        return None
    return value if isinstance(value, str) and len(value) <= 64 else None


def _chunks(devices: Iterable[PortFactory], size: int) -> Iterator[list[PortFactory]]:
    batch: list[PortFactory] = []
    for d in devices:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- signals and the run lock ---------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT in the leader (or by the leader in a worker)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _catch_signals(flag: _StopFlag) -> Iterator[None]:
    """SIGINT and SIGTERM set ``flag`` instead of interrupting (main thread only: Python
    runs signal handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        if flag.signum is None:
            flag.signum = signum

    old = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class RunLock:
    """An exclusive ``flock`` on ``<store>.lock`` for the run (released when the process
    dies, so a killed run never leaves it behind)."""

    def __init__(self, store: str) -> None:
        self.path = Path(store + ".lock")
        self._fd: int | None = None

    def acquire(self, job_id: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the run lock {str(self.path)!r}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (process {holder})" if holder.isdigit() else ""
            raise RunLockedError(
                f"another run of job {job_id} is going on{who}: one run per job at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# --- the leader -----------------------------------------------------------------------------------


def _block(config: RunConfig) -> int:
    """Slots per quota-mark write: the configured block, else derived from the quota."""
    return block_for(config.job.job.quota) if config.mark_block is None else config.mark_block


def _check_config(config: RunConfig) -> None:
    if not isinstance(config.job, VerifiedJob):
        raise TypeError("RunConfig.job must be a VerifiedJob")
    if type(config.workers) is not int or config.workers < 0:
        raise ConfigurationError(f"workers must be 0 or more, not {config.workers!r}")
    for name, value in (("batch_size", config.batch_size), ("mark_block", _block(config)),
                        ("recycle_after", config.recycle_after)):  # fmt: skip
        if type(value) is not int or value < 1:
            raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")
    check_vendor_cas(config.vendor_roots, named=config.job.job.vendors, what="run vendor CA")


class _AskOnce:
    def __init__(self, ask: PinCallback) -> None:
        self._ask = ask
        self._pins: dict[str, str] = {}

    def __call__(self, label: str) -> str:
        if label not in self._pins:
            self._pins[label] = self._ask(label)
        return self._pins[label]


def _pins_for_workers(token: str, pin: PinCallback | None) -> PinSet:
    """The PIN the workers log in with: resolved once here, sent through their start pipe
    (never the environment)."""
    uri = PKCS11URI.parse(token) if token.lower().startswith("pkcs11:") else None
    label = uri.token if uri is not None else token
    value = resolve_pin(
        label or "",
        callback=pin,
        pin_value=uri.pin_value if uri is not None else None,
        pin_source=uri.pin_source if uri is not None else None,
    )
    return PinSet({label or "": value})


def run(
    config: RunConfig,
    devices: Iterable[PortFactory],
    *,
    pin: PinCallback | None = None,
    progress: Callable[[Progress], None] | None = None,
    faults: FaultHook = NO_FAULTS,
) -> RunResult:
    """Provision and program ``devices`` (consumed lazily, batch by batch) under
    ``config.job``; see the module docstring.

    Raises :class:`RunLockedError` (another run of the job), a
    :class:`~securethread.errors.StoreGuardError` (the store does not match the token's
    quota mark; nothing changed), :class:`~securethread.errors.StoreError`,
    :class:`~securethread.errors.HSMError` (token trouble, wrong PIN),
    :class:`~securethread.errors.ConfigurationError`, :class:`RunInterruptedError` or
    :class:`WorkerDiedError` (both carry the partial :class:`RunResult`).  ``faults`` is
    a test hook (crash tests); production passes nothing.
    """
    _check_config(config)
    job = config.job
    if pin is not None:
        pin = _AskOnce(pin)  # the leader's login and the workers' PIN: one prompt
    lock = RunLock(config.store)
    stop = _StopFlag()
    with _catch_signals(stop):  # from here on a signal ends the run with a result
        lock.acquire(job.job.job_id)
        try:
            token = open_token(config.token, pin=pin)
            store, mark = open_store(
                config.store,
                token,
                job=job.sha256,
                job_id=job.job.job_id,
                quota=job.job.quota,
                signed=job.signed,
                block=_block(config),
                busy_timeout_s=config.busy_timeout_s,
            )
            try:
                return _run_open(
                    config, devices, token, store, mark, pin, progress, faults, stop
                )
            finally:
                store.close()
        finally:
            lock.release()


def _run_open(
    config: RunConfig,
    devices: Iterable[PortFactory],
    token: Token,
    store: SQLiteStore,
    mark: QuotaMark,
    pin: PinCallback | None,
    progress: Callable[[Progress], None] | None,
    faults: FaultHook,
    stop: _StopFlag,
) -> RunResult:
    job = config.job
    start = store.begin_run(job.sha256, guard=mark)
    run_id = os.urandom(8)
    tally = _Tally()
    died: str | None = None
    t0 = time.perf_counter()

    def report(t: _Tally) -> None:
        tally.add(t)
        if progress is not None:
            progress(tally.progress())

    try:
        if stop():
            pass  # a signal came while the run started: nothing is done
        elif config.workers == 0:
            line = _Line(config, token, store, mark, run_id, faults)
            for chunk in _chunks(devices, config.batch_size):
                if stop():
                    break
                report(line.batch(chunk, stop))
        else:
            pins = _pins_for_workers(config.token, pin)
            died = _run_pool(config, devices, pins, run_id, faults, stop, report)
    except Error:
        # No process of the run hands out slots any more (the pool waited for its
        # workers): the end is clean, the slots reserved and never released are reused.
        with suppress(Error):
            store.end_run(job.sha256, guard=mark)
        raise
    elapsed = time.perf_counter() - t0
    store.end_run(job.sha256, guard=mark)
    state = store.state(job.sha256)
    n_unprog, ids = store.unprogrammed_summary(job.sha256)
    signame = signal.Signals(stop.signum).name if stop.signum is not None else None
    result = RunResult(
        job_id=job.job.job_id,
        devices=tally.devices,
        provisioned=tally.provisioned,
        recovered=tally.recovered,
        programmed=tally.programmed,
        already_done=tally.already_done,
        refused=dict(tally.refused),
        not_programmed=dict(tally.not_programmed),
        dropped=tally.dropped,
        notes=tuple(tally.notes),
        quota=state.quota,
        quota_used=state.used,
        unprogrammed=n_unprog,
        unprogrammed_ids=tuple(ids),
        reclaimed=start.reclaimed,
        burned=start.burned,
        workers=config.workers,
        elapsed_s=round(elapsed, 3),
        provision_s=round(tally.provision_s, 3),
        interrupted_by=signame,
    )
    if died is not None:
        raise WorkerDiedError(f"{died}; run again to resume", result=result)
    if stop.signum is not None:
        raise RunInterruptedError(
            f"stopped by {signame} after the batch in flight: {result.provisioned} provisioned, "
            f"{result.recovered} recovered, {result.programmed} programmed; run again to resume",
            result=result,
            signum=stop.signum,
        )
    return result


# --- the process pool -----------------------------------------------------------------------------

_PREFETCH = 2  # batches a worker holds: the one it works on and the next

#: How a worker process starts: it reads what multiprocessing's spawn start method would
#: give it (the leader's sys.path, working directory, main module), then everything else,
#: from the connection it inherits (fd argv[1]); argv[2] is the leader's pid.
_BOOT = (
    "import sys\n"
    "from multiprocessing import spawn\n"
    "from multiprocessing.connection import Connection\n"
    "fd, leader = int(sys.argv[1]), int(sys.argv[2])\n"
    "conn = Connection(fd)\n"
    "spawn.prepare(conn.recv())\n"
    # no core file, not dumpable, before the message carrying the PINs is read
    "from securethread.hsm.pin import harden_process\n"
    "harden_process()\n"
    "from securethread.programmer.runner import _worker_main\n"
    "_worker_main(conn, leader)\n"
)


@attrs.define
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    outstanding: int = 0
    sent: int = 0  # devices sent to it
    ready: bool = False
    finished: bool = False
    stop_sent: bool = False
    retiring: bool = False  # recycled: a fresh worker takes its place

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            pass  # it died: its connection's end of file tells the leader


def _start_worker(payload: tuple[Any, ...]) -> _Worker:
    """A worker process in a session of its own: the terminal's Ctrl-C (sent to the
    foreground process group) never reaches it; it stops through the leader.  Its
    environment holds no PIN variable, whatever the leader's does: its PINs come through
    the pipe (hsm.pin.child_environment)."""
    parent, child = Pipe(duplex=True)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(child.fileno()), str(os.getpid())],
            pass_fds=(child.fileno(),),
            start_new_session=True,
            env=child_environment(),
        )
    finally:
        child.close()
    w = _Worker(proc, parent)
    prep = spawn.get_preparation_data("securethread-worker")
    prep.pop("authkey", None)  # no multiprocessing managers here: no key to share
    try:
        parent.send(prep)
    except OSError:
        pass
    w.send(payload)
    return w


def _run_pool(
    config: RunConfig,
    devices: Iterable[PortFactory],
    pins: PinSet,
    run_id: bytes,
    faults: FaultHook,
    stop: _StopFlag,
    report: Callable[[_Tally], None],
) -> str | None:
    """Feed batches to ``config.workers`` worker processes until the devices run out, a stop
    is requested, a worker fails or dies.  Returns why a worker died, or ``None``; raises
    the first fatal error a worker reported."""
    feed = _chunks(devices, config.batch_size)
    exhausted = False
    fatal: BaseException | None = None
    died: str | None = None
    payload = (config, pins, run_id, faults)
    workers = [_start_worker(payload) for _ in range(config.workers)]

    def stopping() -> bool:
        return stop() or fatal is not None or died is not None

    def send_work(w: _Worker) -> None:
        nonlocal exhausted
        if w.finished or not w.ready:
            return
        worn = w.sent >= config.recycle_after
        while not stopping() and not exhausted and not worn and w.outstanding < _PREFETCH:
            chunk = next(feed, None)
            if chunk is None:
                exhausted = True
                break
            w.send(("batch", chunk))
            w.outstanding += 1
            w.sent += len(chunk)
            worn = w.sent >= config.recycle_after
        if stopping() and not w.stop_sent:
            w.send(("stop",))  # it finishes its batch in flight and drops the others
            w.stop_sent = True
        elif (exhausted or worn) and w.outstanding == 0 and not w.stop_sent:
            w.send(("end",))  # no more work for this process
            w.stop_sent = True
            w.retiring = worn and not exhausted

    try:
        while not all(w.finished for w in workers):
            live = [w for w in workers if not w.finished]
            for ready in wait([w.conn for w in live], timeout=0.2):
                w = next(w for w in live if w.conn is ready)
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    w.finished = True
                    code = w.proc.wait()
                    died = died or f"worker process {w.proc.pid} died (exit {code})"
                    continue
                kind = msg[0]
                if kind == "ready":
                    w.ready = True
                elif kind == "done":
                    w.outstanding -= 1
                    report(msg[1])
                    if msg[2] is not None and stop.signum is None:
                        stop.signum = msg[2]  # a worker was sent SIGTERM: the run stops
                elif kind == "fatal":
                    fatal = fatal or msg[1]
                elif kind == "bye":
                    w.finished = True
                    w.proc.wait()
                    if w.retiring and not stopping():
                        workers.append(_start_worker(payload))
            for w in list(workers):
                send_work(w)
    finally:
        for w in workers:
            if not w.stop_sent:
                w.send(("stop",))
                w.stop_sent = True
        for w in workers:
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.conn.close()
    if fatal is not None:
        raise fatal
    return died


# --- a worker process --------------------------------------------------------------------------


def _die_with(leader: int) -> None:
    """Be killed when the leader dies: PR_SET_PDEATHSIG (Linux), then a watcher thread
    (any OS, and the case where the leader died before prctl ran)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1 (prctl(2))
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == leader:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    if os.getppid() != leader:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="securethread-leader-watch", daemon=True).start()


class _Inbox:
    """The leader's messages to a worker, read ahead so that a stop is seen between
    batches and after a batch's identification."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: list[tuple[Any, ...]] = []
        self.stopped = False  # stop after the batch in flight
        self.ended = False  # no more batches will come
        self.signum: int | None = None  # SIGTERM sent to this worker

    def _take(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "stop":
            self.stopped = True
        elif msg[0] == "end":
            self.ended = True
        else:
            self.pending.append(msg)

    def stop(self) -> bool:
        while not self.stopped and self.conn.poll(0):
            self._take(self.conn.recv())
        return self.stopped or self.signum is not None

    def next(self) -> tuple[Any, ...] | None:
        while not self.pending and not self.stopped and not self.ended:
            self._take(self.conn.recv())
        return self.pending.pop(0) if self.pending else None


def _worker_main(conn: Connection, leader: int) -> None:
    _die_with(leader)
    inbox = _Inbox(conn)

    def on_term(signum: int, _frame: object) -> None:
        inbox.signum = signum

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the leader decides when to stop
    signal.signal(signal.SIGTERM, on_term)
    store: SQLiteStore | None = None
    try:
        config, pins, run_id, faults = conn.recv()
        token = open_token(config.token, pin=pins)
        store = SQLiteStore(config.store, create=False, busy_timeout_s=config.busy_timeout_s)
        mark = QuotaMark(token, config.job.sha256, block=_block(config))
        line = _Line(config, token, store, mark, run_id, faults)
        conn.send(("ready",))
        while (msg := inbox.next()) is not None:
            if inbox.stop():
                tally = _Tally(devices=len(msg[1]), dropped=len(msg[1]))
            else:
                tally = line.batch(msg[1], inbox.stop)
            # A SIGTERM sent to this worker alone stops the whole run, through the leader.
            conn.send(("done", tally, inbox.signum))
        while inbox.pending:  # batches received with or after the stop: not started
            n = len(inbox.pending.pop(0)[1])
            conn.send(("done", _Tally(devices=n, dropped=n), inbox.signum))
        conn.send(("bye",))
    except EOFError:
        pass  # the leader is gone
    except Error as exc:
        _send_fatal(conn, exc)
    except Exception as exc:
        _send_fatal(conn, Error(f"worker {os.getpid()}: internal error: {describe(exc)}"))
    finally:
        if store is not None:
            store.close()
        conn.close()


def _send_fatal(conn: Connection, exc: Error) -> None:
    try:
        conn.send(("fatal", exc))
    except Exception:  # an exception that does not pickle: its message does
        try:
            conn.send(("fatal", Error(f"{type(exc).__name__}: {exc}")))
        except OSError:
            pass
    try:
        conn.send(("bye",))
    except OSError:
        pass


__all__ = [
    "CertificateFiles",
    "build_line",
    "verified_manifest",
    "DeviceNote",
    "KeyLabels",
    "PortFactory",
    "Progress",
    "RunConfig",
    "RunInterruptedError",
    "RunLock",
    "RunLockedError",
    "RunResult",
    "SbmInterface",
    "WorkerDiedError",
    "run",
]
