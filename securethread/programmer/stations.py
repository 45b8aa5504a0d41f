"""The station API on the appliance: gRPC with mutual TLS, one group-committing line per job.

Stations (the line's programmer hardware and its software) are untrusted clients of the
appliance (``securethread/proto/station.proto``; docs/station.md).  Per device a station asks
for a challenge, has its chip sign it, and sends the chip's answer; the appliance runs the
same :class:`~securethread.programmer.line.ProductionLine` as ``programmer provision``
(identify under the vendor CAs the OEM-signed job names -> count -> issue -> commit ->
release) and returns the device's certificate, provisioning data and license; the station
programs the chip and returns its boot confirmation, which the line verifies and records.
The three calls also go as messages of one ``Socket`` stream per station socket (the same
checks and counts; a device's refusal is a message and the stream goes on; the challenges a
stream leaves unanswered are forgotten when it ends).

**Group commit.**  A commit with fsync and a checkpoint signature per device would cap the
rate far below the token's; so every job has one *batcher* thread that holds the job's
store and line and drains the queue of Provision (then Confirm) calls every few
milliseconds into one :meth:`ProductionLine.provision_batch` (one reservation, one
transaction, one checkpoint), resolving each call's future with its device's outcome.  The
gRPC handler threads only check the caller and the session and wait.  One lock keeps the
token to one batch at a time across jobs (SoftHSMv2 #573: object create/destroy is not
safe from several threads).

**Who may call.**  A station CA key in the programmer token (``station-ca``, SIGNING policy,
made on first use) issues the appliance's TLS server certificate and each station's client
certificate (:func:`add_station`, from the station's CSR: the station makes its own key,
which only authenticates it).  Every call is checked against the station list
(``stations/stations.json``) by the SHA-256 of the peer's certificate, re-read when the file
changes: :func:`remove_station` takes effect on the next call, even on a live connection.
The TLS server key is a file in the state directory (0600): gRPC's TLS stack needs the key
in memory, and it only authenticates the appliance to stations.

**Nothing stranded.**  A device counted and released whose station vanished stays in the
store's releases; a later Provision of the same chip (a new challenge) returns the same
certificate and license without a second count (``RECOVERED``).  Each batch reserves under a
run id of its own, so a chip met again in the same appliance process is recovered, never
refused as "met twice".  A killed appliance is the runner's killed run: the next start burns
the slots the mark covers (S3: over-count, never under).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import io
import json
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, BinaryIO, NoReturn, TypeVar

import attrs
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securethread.errors import (
    AlreadyProvisionedError,
    ConfigurationError,
    Error,
    HSMError,
    JobError,
    QuotaExceededError,
    StoreError,
    VerificationError,
)
from securethread.formats.identity import IdentificationResponse
from securethread.formats.transcript import CertEntry
from securethread.heap import freeze_startup_heap
from securethread.hsm import PinCallback
from securethread.hsm.token import Token
from securethread.keys import SIGNING, Curve
from securethread.keys.ecutil import CryptographyKeyAdapter, spki_der
from securethread.pki import device_id_of, untrusted
from securethread.programmer import layout as L
from securethread.programmer.line import (
    AlreadyDone,
    Provisioned,
    Refused,
    Unreleased,
    describe,
)
from securethread.programmer.provision import run_config
from securethread.programmer.quota_mark import block_for, open_store
from securethread.programmer.runner import RunLock, build_line, verified_manifest
from securethread.proto import MAX_CHIP_MESSAGE, MAX_REQUEST_BYTES
from securethread.proto import station_pb2 as pb
from securethread.proto import station_pb2_grpc as pb_grpc
from securethread.proto.address import check_address
from securethread.workdir import PartyDir, StepResult, check_name

STATION_CA_LABEL = "station-ca"
STATION_DIR = "stations"
CA_CERT = f"{STATION_DIR}/ca.pem"
SERVER_KEY = f"{STATION_DIR}/server-key.pem"
SERVER_CERT = f"{STATION_DIR}/server.pem"
REGISTRY = f"{STATION_DIR}/stations.json"
#: The name in the appliance's server certificate; stations check it whatever address they
#: dial (gRPC's ``grpc.ssl_target_name_override``).
SERVER_NAME = "securethread-appliance"
CHALLENGE_TTL_S = 30.0
IMAGE_CHUNK = 256 << 10
_STATION_CERT_DAYS = 730
_KEEP_S = 60.0  # a dead session is forgotten this long after its challenge expired
_CONNECTED_S = 10.0  # a station that called within this many seconds counts as connected
#: What one station can make the appliance stream (:class:`_ImageLimit`): GetImage calls per
#: IMAGE_WINDOW_S, and streams open at once.  A station fetches a job's image once and keeps it.
IMAGE_FETCHES = 16
IMAGE_WINDOW_S = 60.0
IMAGE_STREAMS = 2
#: Socket streams open at once: per station (the reference station opens one per socket and
#: appliance, ``--parallel`` at most this), and in all, below the server's threads
#: (``max_workers``; the rest serve unary calls and GetImage).
SOCKET_STREAMS = 16
SOCKET_THREADS_SPARE = 16
#: Challenges one Socket stream may hold unanswered (the reference station holds at most 2),
#: and one station over all its calls, unary or streamed (sessions cost the appliance memory
#: and its reaper time until they expire).
STREAM_CHALLENGES = 64
STATION_CHALLENGES = 256


class StationRegistryError(ConfigurationError):
    """A station name or request the station list refuses (unknown, taken, malformed)."""


# --- the station CA and the station list ----------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _fingerprint(der: bytes) -> str:
    """SHA-256 (hex) of a certificate's or a public key's DER: how the station list names them."""
    return hashlib.sha256(der).hexdigest()


def _station_ca(work: PartyDir, token: Token) -> tuple[CryptographyKeyAdapter, x509.Certificate]:
    """The station CA: its key in the programmer token (made on first use), its
    self-signed certificate in ``stations/ca.pem``."""
    if token.has_key(STATION_CA_LABEL):
        key = token.private_key(STATION_CA_LABEL)
    else:
        key = token.generate_ec(STATION_CA_LABEL, curve=Curve.P256, policy=SIGNING)
    signer = CryptographyKeyAdapter(key)
    if work.exists(CA_CERT):
        cert = untrusted.load_certificate_pem(work.read(CA_CERT, "station CA"), what=CA_CERT)
        if cert.public_key() == signer.public_key():
            return signer, cert
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{work.name} station CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, work.name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer.public_key()), False)
        .sign(signer, hashes.SHA256())
    )
    work.write(CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return signer, cert


def _leaf(
    signer: CryptographyKeyAdapter,
    ca: x509.Certificate,
    *,
    subject: str,
    key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    days: int,
    dns: str | None = None,
) -> x509.Certificate:
    """A TLS certificate under the station CA (RFC 5280 §4.2.1.12: server or client auth)."""
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), False)
    return builder.sign(signer, hashes.SHA256())


def _server_credentials(work: PartyDir, token: Token) -> tuple[bytes, bytes, bytes]:
    """(server key PEM, server certificate chain PEM, station CA PEM), made on first use."""
    signer, ca = _station_ca(work, token)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    if work.exists(SERVER_KEY) and work.exists(SERVER_CERT):
        key_pem = work.read(SERVER_KEY, "appliance TLS key")
        cert = untrusted.load_certificate_pem(work.read(SERVER_CERT, "server"), what=SERVER_CERT)
        if cert.issuer == ca.subject and cert.not_valid_after_utc > _now():
            try:
                cert.verify_directly_issued_by(ca)
                return key_pem, cert.public_bytes(serialization.Encoding.PEM), ca_pem
            except Exception:  # another CA's (re-made): issue a new one below
                pass
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert = _leaf(signer, ca, subject=SERVER_NAME, key=key.public_key(),
                 usage=ExtendedKeyUsageOID.SERVER_AUTH, days=365, dns=SERVER_NAME)  # fmt: skip
    work.write(SERVER_KEY, key_pem, mode=0o600)
    work.write(SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), ca_pem


def _read_registry(work: PartyDir) -> dict[str, dict[str, Any]]:
    if not work.exists(REGISTRY):
        return {}
    try:
        data = json.loads(work.read(REGISTRY, "station list"))
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise StationRegistryError(f"{work.path(REGISTRY)} is damaged") from None
    return data


def _write_registry(work: PartyDir, data: dict[str, dict[str, Any]]) -> None:
    work.write(REGISTRY, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)


def station_ca_pem(work: PartyDir) -> bytes:
    """The station CA certificate (PEM) a station needs to check the appliance (``--ca``)."""
    return work.read(CA_CERT, "station CA certificate")


def add_station(
    work: PartyDir, *, name: str, csr_pem: bytes, token: Token | None = None
) -> bytes:
    """Certify station ``name``'s key from its CSR (its own key; a P-256 request whose
    signature verifies); returns the client certificate (PEM).  The station CA signs in the
    token (``token``, else the work directory's programmer token opened here).  A name
    that is in the list (even withdrawn) is refused: a withdrawn name never comes back; so
    is a key certified under another name (even withdrawn): one key, one station."""
    check_name("station name", name)
    csr, key = untrusted.load_csr_with_key(
        csr_pem, what="station certificate request", curves=(Curve.P256,)
    )
    if not csr.is_signature_valid:
        raise VerificationError("station certificate request: the signature does not verify")
    registry = _read_registry(work)
    if name in registry:
        state = "withdrawn" if registry[name].get("removed") else "certified"
        raise StationRegistryError(f"station {name!r} is already {state}; choose another name")
    # Withdrawing a station withdraws its key: the same key under a second name would still
    # be let in after remove-station of the first (entries older than key_sha256: not known).
    key_sha256 = _fingerprint(spki_der(key))
    for other, entry in registry.items():
        if entry.get("key_sha256") == key_sha256:
            state = "withdrawn" if entry.get("removed") else "certified"
            raise StationRegistryError(f"this key was certified as station {other!r} ({state}): "
                                       "a station makes a new key (station keygen) for each name")
    tok = token if token is not None else work.open_token(L.TOKEN, work.pin_callback())
    signer, ca = _station_ca(work, tok)
    cert = _leaf(signer, ca, subject=name, key=key, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                 days=_STATION_CERT_DAYS)  # fmt: skip
    der = cert.public_bytes(serialization.Encoding.DER)
    registry[name] = {"sha256": _fingerprint(der), "key_sha256": key_sha256, "removed": False,
                      "added": _now().strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    _write_registry(work, registry)
    return cert.public_bytes(serialization.Encoding.PEM)


def remove_station(work: PartyDir, *, name: str) -> str:
    """Withdraw station ``name``: every later call with its certificate is refused
    (PERMISSION_DENIED), on a live connection too.  Returns the withdrawn certificate's
    SHA-256 (hex)."""
    check_name("station name", name)
    registry = _read_registry(work)
    if name not in registry:
        raise StationRegistryError(f"no station {name!r} was added")
    if registry[name].get("removed"):
        raise StationRegistryError(f"station {name!r} was withdrawn already")
    registry[name]["removed"] = True
    registry[name]["removed_at"] = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
    _write_registry(work, registry)
    return str(registry[name].get("sha256", ""))


class _Allowed:
    """The active stations by certificate fingerprint, re-read when the list changes."""

    def __init__(self, work: PartyDir) -> None:
        self._work = work
        self._stamp: tuple[int, int] | None = None
        self._by_fp: dict[str, str] = {}
        self._pems: dict[bytes, str] = {}  # peer certificate (PEM, as TLS checked it) -> SHA-256
        self._lock = threading.Lock()

    def fingerprint_of(self, pem: bytes) -> str | None:
        """The SHA-256 of the DER of a peer's certificate (``None``: unreadable), parsed once
        per certificate rather than on each of a device's three calls."""
        found = self._pems.get(pem)
        if found is None:
            try:
                der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
            except ValueError:
                return None
            found = _fingerprint(der)
            if len(self._pems) >= 1024:  # bounded: a certificate seen once is re-parsed later
                self._pems.clear()
            self._pems[pem] = found
        return found

    def name_of(self, fingerprint: str) -> str | None:
        try:
            st = os.stat(self._work.path(REGISTRY))
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0)
        with self._lock:
            if stamp != self._stamp:
                reg = _read_registry(self._work)
                self._by_fp = {
                    str(v.get("sha256")): k for k, v in reg.items() if not v.get("removed")
                }
                self._stamp = stamp
            return self._by_fp.get(fingerprint)


class _ImageLimit:
    """Per station: at most ``fetches`` GetImage calls in any ``window_s`` and ``streams``
    open at once, so no station can make the appliance stream unbounded data or hold its
    server threads with slow readers (RESOURCE_EXHAUSTED, one line; the image is the job's
    file, so one stream is bounded by it)."""

    def __init__(self, *, fetches: int, window_s: float, streams: int) -> None:
        if fetches < 1 or streams < 1 or window_s <= 0:
            raise ConfigurationError("image limits must be positive")
        self.fetches, self.window_s, self.streams = fetches, window_s, streams
        self._recent: dict[str, collections.deque[float]] = {}
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, station: str) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(station, collections.deque())
            while recent and now - recent[0] >= self.window_s:
                recent.popleft()
            if self._open.get(station, 0) >= self.streams:
                raise _Call(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"station {station} has {self.streams} image streams open already "
                            f"(at most {self.streams} at once)")  # fmt: skip
            if len(recent) >= self.fetches:
                raise _Call(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"station {station} asked for the image {len(recent)} times in "
                            f"{self.window_s:g} s (at most {self.fetches}): fetch it once per "
                            "job and keep it")  # fmt: skip
            recent.append(now)
            self._open[station] = self._open.get(station, 0) + 1

    def leave(self, station: str) -> None:
        with self._lock:
            self._open[station] = max(0, self._open.get(station, 0) - 1)


class _SocketLimit:
    """Open ``Socket`` streams: at most ``per_station`` per station and ``total`` in all.
    Each holds a server thread while open, so no station -- nor all of them -- can take the
    threads the unary calls, GetImage and other stations need.  A station over its own limit
    hears RESOURCE_EXHAUSTED; past the total, UNAVAILABLE (try another appliance)."""

    def __init__(self, *, per_station: int, total: int) -> None:
        self.per_station, self.total = per_station, total
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, station: str) -> None:
        with self._lock:
            mine = self._open.get(station, 0)
            if mine >= self.per_station:
                raise _Call(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"station {station} has {mine} socket streams open already (at "
                            f"most {self.per_station} at once)")  # fmt: skip
            if sum(self._open.values()) >= self.total:
                raise _Call(grpc.StatusCode.UNAVAILABLE,
                            f"the appliance serves {self.total} socket streams already: try "
                            "another appliance, or later")  # fmt: skip
            self._open[station] = mine + 1

    def leave(self, station: str) -> None:
        with self._lock:
            self._open[station] = max(0, self._open.get(station, 0) - 1)


# --- sessions and the per-job batcher ------------------------------------------------------


class _Call(Exception):
    """A call's answer as a gRPC status (raised inside the servicer, sent by ``_abort``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define
class _Session:
    job: _Job
    station: str
    challenge: bytes
    expires: float
    used: bool = False
    provisioned: Provisioned | None = None
    nonce: bytes = b""
    confirmed: bool = False
    waiting: bool = False  # its Provision is queued or in a batch


class _AnsweredPort:
    """The line's view of a device whose station already has its answer: ``identify``
    returns it (the line verifies it against the session's challenge, ``challenge_of``),
    ``provision`` keeps what the line releases, for the station's reply."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.claimed = _claimed_id(answer)
        self.released: bytes | None = None

    def identify(self, challenge: bytes) -> bytes:
        return self.answer

    def provision(self, data: bytes) -> None:
        self.released = data

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes:
        raise ConfigurationError("a station device is programmed by its station")


class _ConfirmedPort:
    """A device whose station returned its boot confirmation: ``program`` hands it in."""

    def __init__(self, boot: bytes) -> None:
        self.boot = boot

    def identify(self, challenge: bytes) -> bytes:
        raise ConfigurationError("a station device is identified through its station")

    def provision(self, data: bytes) -> None:
        raise ConfigurationError("a station device is provisioned through its station")

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes:
        return self.boot


@attrs.define
class _JobCounts:
    provisioned: int = 0
    recovered: int = 0
    programmed: int = 0
    already_done: int = 0
    refused: int = 0
    first_at: float | None = None
    last_at: float | None = None


_Work = tuple[str, _Session, bytes, "Future[Any]"]  # ("provision"|"confirm", session, data, fut)


class _Job:
    """One opened job served to stations: its verified run configuration, store, quota mark,
    run lock, line and batcher thread."""

    def __init__(
        self, work: PartyDir, token: Token, job_id: str, token_lock: threading.Lock, *,
        batch_size: int, window_s: float, counts: _JobCounts,
    ) -> None:  # fmt: skip
        self.job_id = job_id
        config = run_config(work, job_id, workers=0, batch_size=batch_size)
        self.config = config
        self.manifest = config.manifest
        self.counts = counts  # this appliance process's, across the job's re-openings
        self.quota = config.job.job.quota
        self.quota_used = 0
        self._token = token
        self._token_lock = token_lock
        self._window = window_s
        self._queue: queue.Queue[_Work | None] = queue.Queue()
        self._challenges: dict[bytes, bytes] = {}
        self.inflight = 0  # calls queued or in a batch
        self.retired = False
        self._last_batch = 0
        self.last_call = time.monotonic()
        self._submit_lock = threading.Lock()
        self.failed: Error | None = None
        self.lock = RunLock(config.store)
        self.lock.acquire(job_id)
        # SQLite connections belong to the thread that made them: the batcher opens, uses
        # and closes the store; this waits until it is open (or failed to open).
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"batcher-{job_id}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            self._thread.join()
            raise self._open_error

    def _open(self) -> None:
        """The job's store checked against its quota mark, a run begun, the line built."""
        config = self.config
        self.store, self.mark = open_store(
            config.store, self._token, job=config.job.sha256, job_id=self.job_id,
            quota=self.quota, signed=config.job.signed, block=block_for(self.quota),
        )  # fmt: skip
        try:
            self.start = self.store.begin_run(config.job.sha256, guard=self.mark)
            self.line = build_line(config, self._token, self.store, guard=self.mark, run=b"",
                                   challenge_of=self._challenges.__getitem__)  # fmt: skip
            self.verify_boot: Any = None  # a "provision" job: no image, no boot to verify
            if config.job.job.programs:
                self.verify_boot = config.sbm.boot_verifier(verified_manifest(config))
            self.quota_used = self.store.state(config.job.sha256).used
        except BaseException:
            self.store.close()
            raise

    def _run(self) -> None:
        try:
            with self._token_lock:
                self._open()
        except BaseException as exc:
            self._open_error = exc
            self.lock.release()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            try:
                self.store.end_run(self.config.job.sha256, guard=self.mark)
            except Error:
                pass  # the next start treats the run as killed: it burns, never re-counts
            finally:
                self.store.close()
                self.lock.release()

    # called from handler threads

    def submit(self, kind: str, session: _Session, data: bytes) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._submit_lock:
            if self.failed is not None or self.retired:
                why = describe(self.failed) if self.failed else "the job was released (idle)"
                fut.set_exception(_Call(grpc.StatusCode.UNAVAILABLE,
                                        f"job {self.job_id}: {why}"))  # fmt: skip
                return fut
            self.inflight += 1
            self.last_call = time.monotonic()
            self._queue.put((kind, session, data, fut))
        return fut

    def retire_if_idle(self, idle: bool) -> bool:
        """Release the job (end the run, close the store, drop the run lock) if nothing is
        queued and ``idle`` (no session of it may still call): close-job and ``programmer
        provision`` can then take the job."""
        with self._submit_lock:
            if self.retired or self.inflight or not idle:
                return False
            self.retired = True
            self._queue.put(None)
        return True

    # the batcher thread

    def _take(self) -> list[_Work] | None:
        first = self._queue.get()
        if first is None:
            return None
        items = [first]
        # Wait for company only when calls came together last time: a lone socket's device
        # is not held back by the window it could never share.
        window = self._window if self._last_batch > 1 else 0.0
        deadline = time.monotonic() + window
        while len(items) < self.config.batch_size:
            left = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # end after this batch
                break
            items.append(nxt)
        self._last_batch = len(items)
        return items

    def _loop(self) -> None:
        while (items := self._take()) is not None:
            prov = [w for w in items if w[0] == "provision"]
            conf = [w for w in items if w[0] == "confirm"]
            try:
                with self._token_lock:
                    if prov:
                        self._provision(prov)
                    if conf:
                        self._confirm(conf)
                    if prov:
                        self.quota_used = self.store.state(self.config.job.sha256).used
            except Error as exc:  # token or store trouble: this job stops taking devices
                self.failed = exc
                for _k, _s, _d, fut in items:
                    if not fut.done():
                        fut.set_exception(_Call(grpc.StatusCode.UNAVAILABLE,
                                                f"job {self.job_id}: {describe(exc)}"))  # fmt: skip
            except BaseException as exc:
                self.failed = Error(f"internal error: {describe(exc)}")
                for _k, _s, _d, fut in items:
                    if not fut.done():
                        fut.set_exception(_Call(grpc.StatusCode.INTERNAL, str(self.failed)))
            finally:
                with self._submit_lock:
                    self.inflight -= len(items)

    def _provision(self, items: list[_Work]) -> None:
        ports: list[tuple[_AnsweredPort, _Session, Future[Any]]] = []
        self._challenges.clear()
        for _kind, session, answer, fut in items:
            if answer in self._challenges:  # the same answer twice: one challenge signed it
                fut.set_exception(_Call(grpc.StatusCode.ALREADY_EXISTS,
                                        "this chip answer was sent already (replay)"))  # fmt: skip
                continue
            self._challenges[answer] = session.challenge
            ports.append((_AnsweredPort(answer), session, fut))
        if not ports:
            return
        # Each batch reserves under a run of its own: a chip met again later in this
        # process (its station vanished before Confirm) is recovered, not refused as met twice.
        self.line._run = os.urandom(8)
        try:
            result = self.line.provision_batch([p for p, _s, _f in ports])
        except JobError as exc:  # the job's window closed
            for _p, _s, fut in ports:
                fut.set_exception(_Call(grpc.StatusCode.FAILED_PRECONDITION, describe(exc)))
            return
        by_port = {id(p): (p, s, f) for p, s, f in ports}
        answered: set[int] = set()
        for dev, prov in result.to_program:
            port, session, fut = by_port[id(dev)]
            answered.add(id(dev))
            session.provisioned = prov
            session.nonce = os.urandom(16)
            self._count(recovered=prov.recovered)
            fut.set_result(
                pb.ProvisionResponse(
                    state=pb.ProvisionResponse.RECOVERED if prov.recovered
                    else pb.ProvisionResponse.PROVISIONED,
                    device_id=prov.device_id,
                    certificate=prov.certificate.public_bytes(serialization.Encoding.DER),
                    provisioning_data=port.released or b"",
                    license=prov.license,
                    manifest=self.manifest or b"",  # none for a "provision" job
                    boot_nonce=session.nonce,
                )
            )  # fmt: skip
        # Refusals carry the device id identification proved (or none), not the port: match
        # those with an id to a port whose answer claims it, the rest in batch order.
        pending = [(p, f) for p, _s, f in ports if id(p) not in answered]
        refusals = [o for o in result.outcomes if isinstance(o, Refused | Unreleased)]
        later: list[Refused | Unreleased] = []
        for outcome in refusals:
            match = next((t for t in pending if t[0].claimed == outcome.device_id), None)
            if outcome.device_id is None or match is None:
                later.append(outcome)
                continue
            pending.remove(match)
            self._refuse(outcome, match[1])
        for outcome, (_p, fut) in zip(later, list(pending), strict=False):
            pending.remove((_p, fut))
            self._refuse(outcome, fut)
        for _p, fut in pending:  # every device has an outcome; never leave a call waiting
            fut.set_exception(_Call(grpc.StatusCode.INTERNAL, "no outcome for this device"))

    def _refuse(self, outcome: Refused | Unreleased, fut: Future[Any]) -> None:
        if isinstance(outcome, AlreadyDone):
            self.counts.already_done += 1
            fut.set_result(pb.ProvisionResponse(state=pb.ProvisionResponse.ALREADY_PROGRAMMED,
                                                device_id=outcome.device_id or ""))  # fmt: skip
            return
        self.counts.refused += 1
        reason = outcome.reason
        if isinstance(reason, QuotaExceededError):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(reason, AlreadyProvisionedError):
            code = grpc.StatusCode.ALREADY_EXISTS
        else:
            code = grpc.StatusCode.INVALID_ARGUMENT
        fut.set_exception(_Call(code, describe(reason)))

    def _confirm(self, items: list[_Work]) -> None:
        if self.verify_boot is None:
            self._confirm_released(items)
            return
        work: list[tuple[_ConfirmedPort, Provisioned]] = []
        nonces: dict[str, bytes] = {}
        futs: dict[str, tuple[_Session, Future[Any]]] = {}
        for _kind, session, boot, fut in items:
            prov = session.provisioned
            assert prov is not None  # the servicer sends provisioned sessions only
            if prov.device_id in futs:  # the same device twice in one batch: one record
                fut.set_exception(_Call(grpc.StatusCode.ALREADY_EXISTS,
                                        f"device {prov.device_id} is being confirmed already"))
                continue
            nonces[prov.device_id] = session.nonce
            futs[prov.device_id] = (session, fut)
            work.append((_ConfirmedPort(boot), prov))

        def verify(cert: x509.Certificate, _line_nonce: bytes, boot: bytes) -> None:
            # The chip signed the nonce the appliance sent it with Provision (the session's).
            self.verify_boot(cert, nonces[device_id_of(cert)], boot)

        self.line._run = os.urandom(8)
        assert self.manifest is not None  # a job that programs (verify_boot is set)
        for device_id, err in self.line.program(
            work, manifest=self.manifest, open_image=lambda: io.BytesIO(b""), verify_boot=verify
        ):
            session, fut = futs[device_id]
            if err is None:
                session.confirmed = True
                self._count(programmed=True)
                fut.set_result(pb.ConfirmResponse(programmed=True))
            else:
                fut.set_exception(_Call(grpc.StatusCode.INVALID_ARGUMENT, describe(err)))

    def _confirm_released(self, items: list[_Work]) -> None:
        """A "provision" job: the station burnt the provisioning data and confirms with no
        boot confirmation (there is no image); what was released is then forgotten
        (:meth:`ProductionLine.released`) and the chip is done here."""
        done: list[Provisioned] = []
        for _kind, session, boot, fut in items:
            prov = session.provisioned
            assert prov is not None  # the servicer sends provisioned sessions only
            if boot:
                fut.set_exception(_Call(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"job {self.job_id} is a 'provision' job: a chip "
                                        "confirms its provisioning data with no boot"))  # fmt: skip
                continue
            done.append(prov)
        self.line.released(done)
        for _kind, session, boot, fut in items:
            if not boot and not fut.done():
                session.confirmed = True
                fut.set_result(pb.ConfirmResponse(programmed=False))

    def _count(self, *, recovered: bool = False, programmed: bool = False) -> None:
        c = self.counts
        now = time.monotonic()
        if c.first_at is None:
            c.first_at = now
        c.last_at = now
        if programmed:
            c.programmed += 1
        elif recovered:
            c.recovered += 1
        else:
            c.provisioned += 1

    def stop(self) -> None:
        """End the batcher after the work queued; it ends the run cleanly and closes."""
        with self._submit_lock:
            self.retired = True
            self._queue.put(None)
        self._thread.join()

    def join(self) -> None:
        self._thread.join()


def _claimed_id(answer: bytes) -> str | None:
    """The device id an answer claims (for matching refusals to calls; proves nothing)."""
    try:
        return IdentificationResponse.from_bytes(answer).device_id
    except Exception:
        return None


# --- the gRPC service ------------------------------------------------------------------------


@attrs.frozen
class JobStatus:
    """One job served to stations, this appliance process: devices provisioned (new),
    recovered, programmed, already done and refused; quota and what is used of it."""

    job_id: str
    provisioned: int
    recovered: int
    programmed: int
    already_done: int
    refused: int
    quota: int
    quota_used: int
    devices_per_s: float | None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class StationStatus:
    """What the station server is doing: stations connected (a call in the last
    10 s), every job served since it started, whether it is draining, and every station
    that called since it started."""

    listen: str
    stations_connected: tuple[str, ...]
    jobs: tuple[JobStatus, ...]
    draining: bool
    stations_seen: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "listen": self.listen,
            "stations_connected": list(self.stations_connected),
            "stations_seen": list(self.stations_seen),
            "jobs": [j.to_json() for j in self.jobs],
            "draining": self.draining,
        }


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _abort(context: grpc.ServicerContext, call: _Call) -> NoReturn:
    context.abort(call.code, call.message)
    raise AssertionError("unreachable")  # context.abort raises


class _Servicer(pb_grpc.StationServiceServicer):
    def __init__(self, server: StationServer) -> None:
        self._s = server

    def _station(self, context: grpc.ServicerContext, fingerprint: str | None = None) -> str:
        """The calling station's name, checked against the station list now; ``fingerprint``:
        its certificate's, when already read from this call's TLS peer (a stream's)."""
        if fingerprint is None:
            fingerprint = self._fingerprint(context)
        name = self._s._allowed.name_of(fingerprint)
        if name is None:
            _abort(context, _Call(grpc.StatusCode.PERMISSION_DENIED,
                                  "this station is not (or no longer) allowed on this appliance"))
        self._s._seen[name] = time.monotonic()
        return name

    def _fingerprint(self, context: grpc.ServicerContext) -> str:
        """The SHA-256 of the TLS peer's certificate (the same for every message of a
        stream: read once per stream)."""
        # grpc's auth context maps each property to a list of values (grpc/_server.py)
        found: Any = context.auth_context().get("x509_pem_cert")
        certs: list[bytes] = list(found or ())
        if not certs:
            _abort(context, _Call(grpc.StatusCode.PERMISSION_DENIED, "no client certificate"))
        fingerprint = self._s._allowed.fingerprint_of(certs[0])
        if fingerprint is None:
            _abort(context, _Call(grpc.StatusCode.PERMISSION_DENIED, "unreadable certificate"))
        return fingerprint

    # The three per-device calls, as functions of (station, request) raising _Call: the
    # unary handlers end the call with it, Socket answers it as a Refusal and goes on.

    def _challenge(self, station: str, request: pb.ChallengeRequest) -> pb.ChallengeResponse:
        sid = secrets.token_bytes(16)
        challenge = secrets.token_bytes(32)
        ttl = self._s.challenge_ttl_s
        for _attempt in range(3):  # a job released (idle) just now is opened again
            if self._s._draining:
                raise _Call(grpc.StatusCode.UNAVAILABLE, "the appliance is draining (stopping)")
            job = self._s._job(request.job_id)
            with self._s._lock:
                if not job.retired:
                    now = time.monotonic()
                    self._s.admit_challenge(station, sid, now)
                    self._s._sessions[sid] = _Session(job, station, challenge, now + ttl)
                    break
        else:
            raise _Call(grpc.StatusCode.UNAVAILABLE, "the job is being released")
        return pb.ChallengeResponse(session=sid, challenge=challenge,
                                    expires_in_s=max(1, int(ttl)))  # fmt: skip

    def _session(self, sid: bytes, station: str) -> _Session:
        session = self._s._sessions.get(sid)
        if session is None:
            raise _Call(grpc.StatusCode.INVALID_ARGUMENT,
                        "unknown session (ask for a challenge first)")  # fmt: skip
        if session.station != station:
            raise _Call(grpc.StatusCode.PERMISSION_DENIED,
                        "this session belongs to another station")  # fmt: skip
        return session

    def _provision(self, station: str, request: pb.ProvisionRequest) -> pb.ProvisionResponse:
        if len(request.chip_answer) > MAX_CHIP_MESSAGE:
            raise _Call(grpc.StatusCode.INVALID_ARGUMENT, "chip answer too large")
        with self._s._lock:
            session = self._session(request.session, station)
            if session.used:
                raise _Call(grpc.StatusCode.ALREADY_EXISTS,
                            "this session's challenge was answered already (replay)")
            session.used = True  # one answer per challenge, whatever happens next
            late = time.monotonic() > session.expires
            session.waiting = not late
        if late:
            raise _Call(grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the challenge expired before the chip's answer came")
        try:
            response = self._wait(session.job.submit("provision", session, request.chip_answer))
        finally:
            session.waiting = False
        assert isinstance(response, pb.ProvisionResponse)
        return response

    def _confirm(self, station: str, request: pb.ConfirmRequest) -> pb.ConfirmResponse:
        if len(request.boot) > MAX_CHIP_MESSAGE:
            raise _Call(grpc.StatusCode.INVALID_ARGUMENT, "boot confirmation too large")
        with self._s._lock:
            session = self._session(request.session, station)
            if session.provisioned is None:
                raise _Call(grpc.StatusCode.FAILED_PRECONDITION,
                            "nothing was provisioned in this session")  # fmt: skip
            if session.confirmed:
                return pb.ConfirmResponse(programmed=False)
        response = self._wait(session.job.submit("confirm", session, request.boot))
        assert isinstance(response, pb.ConfirmResponse)
        return response

    def _wait(self, fut: Future[Any]) -> Any:
        try:
            return fut.result(timeout=300)
        except FutureTimeout:
            raise _Call(grpc.StatusCode.UNAVAILABLE, "the appliance is overloaded") from None

    def _unary(self, call: Callable[[str, _Req], _Resp], request: _Req,
               context: grpc.ServicerContext) -> _Resp:  # fmt: skip
        """One of the three as a unary call: the station checked, a refusal its status."""
        try:
            return call(self._station(context), request)
        except _Call as refused:
            _abort(context, refused)

    def Challenge(
        self, request: pb.ChallengeRequest, context: grpc.ServicerContext
    ) -> pb.ChallengeResponse:
        return self._unary(self._challenge, request, context)

    def Provision(
        self, request: pb.ProvisionRequest, context: grpc.ServicerContext
    ) -> pb.ProvisionResponse:
        return self._unary(self._provision, request, context)

    def Confirm(
        self, request: pb.ConfirmRequest, context: grpc.ServicerContext
    ) -> pb.ConfirmResponse:
        return self._unary(self._confirm, request, context)

    def Socket(
        self, request_iterator: Iterator[pb.SocketRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SocketResponse]:
        """The three calls as messages of one stream, answered in order.  The station is
        checked on every message (a withdrawn one is refused mid-stream and the stream
        ends); the challenges the stream asked for and left unanswered die with it."""
        peer = self._fingerprint(context)
        first = self._station(context, peer)
        try:
            self._s._sockets.enter(first)
        except _Call as call:
            _abort(context, call)
        asked: set[bytes] = set()
        try:
            for request in request_iterator:
                station = self._station(context, peer)
                kind = request.WhichOneof("call")
                try:
                    if kind == "challenge":
                        if len(asked) >= STREAM_CHALLENGES:
                            asked = self._s.unanswered(asked)
                        if len(asked) >= STREAM_CHALLENGES:
                            raise _Call(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"this stream has {len(asked)} challenges unanswered "
                                        f"(at most {STREAM_CHALLENGES}): answer them first")
                        ch = self._challenge(station, request.challenge)
                        asked.add(ch.session)
                        yield pb.SocketResponse(challenge=ch)
                    elif kind == "provision":
                        try:
                            answer = self._provision(station, request.provision)
                        finally:  # answered (used) now, or refused and still open
                            asked = self._s.unanswered(asked)
                        yield pb.SocketResponse(provision=answer)
                    elif kind == "confirm":
                        yield pb.SocketResponse(confirm=self._confirm(station, request.confirm))
                    else:
                        raise _Call(grpc.StatusCode.INVALID_ARGUMENT,
                                    "a socket request must carry a challenge, provision or "
                                    "confirm call")  # fmt: skip
                except _Call as call:
                    yield pb.SocketResponse(refusal=pb.Refusal(code=call.code.value[0],
                                                               message=call.message))  # fmt: skip
        finally:  # ended, broken or cancelled: its unanswered challenges hold nothing
            self._s.forget_unanswered(asked)
            self._s._sockets.leave(first)

    def GetImage(
        self, request: pb.ImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ImageChunk]:
        station = self._station(context)
        try:
            self._s._images.enter(station)
        except _Call as call:
            _abort(context, call)
        try:
            yield from self._image(request, context)
        finally:  # the stream ended, failed or was cancelled
            self._s._images.leave(station)

    def _image(
        self, request: pb.ImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ImageChunk]:
        try:
            job = self._s._job(request.job_id)
        except _Call as call:
            _abort(context, call)
        if job.config.image is None:  # a "provision" job: there is no image (no chunk)
            return
        with open(job.config.image, "rb") as f:
            while chunk := f.read(IMAGE_CHUNK):
                yield pb.ImageChunk(data=chunk)


class StationServer:
    """The station API of one appliance process (see the module docstring)."""

    def __init__(
        self, work: PartyDir, token: Token, *, listen: str, challenge_ttl_s: float,
        batch_size: int, window_s: float, max_workers: int, idle_s: float = 2.0,
        confirm_ttl_s: float = 600.0, image_fetches: int = IMAGE_FETCHES,
    ) -> None:  # fmt: skip
        check_address(listen, what="--stations", listen=True)  # before the token is touched
        self._work = work
        self.idle_s = idle_s
        self.confirm_ttl_s = confirm_ttl_s
        self._token = token
        self.challenge_ttl_s = challenge_ttl_s
        self._batch_size = batch_size
        self._window = window_s
        self._allowed = _Allowed(work)
        self._jobs: dict[str, _Job] = {}
        self._retiring: dict[str, _Job] = {}
        self._served: dict[str, _Job] = {}  # every job served since the start (status)
        self._sessions: dict[bytes, _Session] = {}
        self._held: dict[str, collections.deque[bytes]] = {}  # per station: admit_challenge
        self._seen: dict[str, float] = {}
        self._images = _ImageLimit(fetches=image_fetches, window_s=IMAGE_WINDOW_S,
                                   streams=IMAGE_STREAMS)  # fmt: skip
        if max_workers <= SOCKET_THREADS_SPARE:
            raise ConfigurationError(f"max_workers must be above {SOCKET_THREADS_SPARE}")
        self._sockets = _SocketLimit(per_station=SOCKET_STREAMS,
                                     total=max_workers - SOCKET_THREADS_SPARE)  # fmt: skip
        self._lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._draining = False
        self._stopped = False
        key_pem, chain_pem, ca_pem = _server_credentials(work, token)
        creds = grpc.ssl_server_credentials(
            [(key_pem, chain_pem)], root_certificates=ca_pem, require_client_auth=True
        )
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="station-api"),
            # a station's message is read whole before any check of ours: bounded here
            options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
        )
        pb_grpc.add_StationServiceServicer_to_server(_Servicer(self), self._server)
        host = listen.rsplit(":", 1)[0] if ":" in listen else listen
        try:
            self.port = self._server.add_secure_port(listen, creds)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ConfigurationError(f"cannot listen on {listen!r} (address in use or invalid)")
        self.listen = f"{host}:{self.port}"
        self._server.start()
        self._reaper = threading.Thread(target=self._reap, name="station-reaper", daemon=True)
        self._reaper.start()

    def _live(self, session: _Session, now: float) -> bool:
        """May this session still call?  An unanswered challenge until it expires; a
        provisioned device until its confirmation comes or ``confirm_ttl_s`` passes (after
        that it is recovered by a later Provision of the chip)."""
        if session.confirmed:
            return False
        if session.provisioned is not None:
            return now < session.expires + self.confirm_ttl_s
        if session.used:
            return session.waiting
        return now < session.expires

    def admit_challenge(self, station: str, sid: bytes, now: float) -> None:
        """Count challenge ``sid`` as one ``station`` holds unanswered, or refuse it if the
        station holds :data:`STATION_CHALLENGES` already (called under the session lock)."""
        held = self._held.get(station)
        if held is None:
            held = self._held[station] = collections.deque()
        if len(held) >= STATION_CHALLENGES:  # forget those answered, expired or dropped
            held = self._held[station] = collections.deque(
                k for k in held if self._answerable(k, now))  # fmt: skip
        if len(held) >= STATION_CHALLENGES:
            raise _Call(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"station {station} holds {len(held)} challenges unanswered (at most "
                        f"{STATION_CHALLENGES}): answer them or let them expire")  # fmt: skip
        held.append(sid)

    def _answerable(self, sid: bytes, now: float) -> bool:
        """Is session ``sid``'s challenge still open to an answer (under the session lock)?"""
        session = self._sessions.get(sid)
        return session is not None and not session.used and now <= session.expires

    def unanswered(self, sessions: set[bytes]) -> set[bytes]:
        """Those of ``sessions`` whose challenge can still be answered."""
        now = time.monotonic()
        with self._lock:
            return {sid for sid in sessions if self._answerable(sid, now)}

    def forget_unanswered(self, sessions: set[bytes]) -> None:
        """Drop the challenges of ``sessions`` that were never answered (a Socket stream
        ended): they can no longer be answered on it, and need not hold their job."""
        with self._lock:
            for sid in sessions:
                session = self._sessions.get(sid)
                if session is not None and not session.used:
                    del self._sessions[sid]

    def _reap(self) -> None:
        """Forget dead sessions; release jobs idle for ``idle_s`` (close-job, or a run of
        ``programmer provision``, can then take them)."""
        while not self._stopped:
            time.sleep(min(0.5, self.idle_s / 2))
            for job in self._reap_once(time.monotonic()):
                job.join()
                with self._jobs_lock:
                    self._retiring.pop(job.job_id, None)

    def _reap_once(self, now: float) -> list[_Job]:
        """One pass of :meth:`_reap`: the jobs it released (to join outside the locks)."""
        retired: list[_Job] = []
        # Both locks: no challenge is handed out for a job while it is being released
        # (Challenge checks ``retired`` under the session lock).
        with self._jobs_lock, self._lock:
            # A dead session is kept a while, so a late answer hears "expired" and a retried
            # Confirm "recorded before", not "unknown session".  Sessions are in the order they
            # were made, hence of expiry (one lifetime for all): only the front, past expiry
            # and that while, is looked at -- not every session of the last minutes on each
            # pass, under the lock every call takes.
            dead = []
            for sid, v in self._sessions.items():
                if now <= v.expires + _KEEP_S:
                    break
                if not self._live(v, now):
                    dead.append(sid)
            for sid in dead:
                del self._sessions[sid]
            # Which jobs a live session holds: looked for only when a job is idle.
            idle = [(k, j) for k, j in self._jobs.items() if now - j.last_call >= self.idle_s]
            live_jobs = ({id(v.job) for v in self._sessions.values() if self._live(v, now)}
                         if idle else set())  # fmt: skip
            for job_id, job in idle:
                if job.retire_if_idle(id(job) not in live_jobs):
                    del self._jobs[job_id]
                    self._retiring[job_id] = job
                    retired.append(job)
        return retired

    def _job(self, job_id: str) -> _Job:
        try:
            check_name("job id", job_id)
        except Error as exc:
            raise _Call(grpc.StatusCode.INVALID_ARGUMENT, describe(exc)) from None
        with self._jobs_lock:
            job = self._jobs.get(job_id)
            if job is None:
                if self._stopped:
                    raise _Call(grpc.StatusCode.UNAVAILABLE, "the appliance is stopping")
                old = self._retiring.pop(job_id, None)
                if old is not None:
                    old.join()  # its run ended, its store closed, its lock released
                try:  # (its batcher takes the token lock to open the store)
                    job = _Job(self._work, self._token, job_id, self._token_lock,
                               counts=self._served[job_id].counts if job_id in self._served
                               else _JobCounts(),
                               batch_size=self._batch_size, window_s=self._window)  # fmt: skip
                except (HSMError, StoreError) as exc:
                    raise _Call(grpc.StatusCode.UNAVAILABLE, describe(exc)) from None
                except Error as exc:
                    raise _Call(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job_id}: {describe(exc)}") from None  # fmt: skip
                self._jobs[job_id] = job
                self._served[job_id] = job  # its counts outlive its release (status)
            return job

    def status(self) -> StationStatus:
        now = time.monotonic()
        jobs = []
        for job in list(self._served.values()):
            c = job.counts
            span = (c.last_at - c.first_at) if c.first_at and c.last_at else 0.0
            done = c.provisioned + c.recovered
            jobs.append(JobStatus(
                job_id=job.job_id, provisioned=c.provisioned, recovered=c.recovered,
                programmed=c.programmed, already_done=c.already_done, refused=c.refused,
                quota=job.quota, quota_used=job.quota_used,
                devices_per_s=round(done / span, 1) if span > 0 and done > 1 else None,
            ))  # fmt: skip
        connected = sorted(n for n, t in self._seen.items() if now - t <= _CONNECTED_S)
        return StationStatus(self.listen, tuple(connected), tuple(jobs), self._draining,
                             tuple(sorted(self._seen)))  # fmt: skip

    def drain(self, timeout_s: float) -> None:
        """Stop taking new devices (Challenge answers UNAVAILABLE); let devices in flight
        -- challenged, queued, provisioned and not yet confirmed -- finish and commit, for
        at most ``timeout_s``; then stop."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                waiting = [s for s in self._sessions.values()
                           if not s.confirmed and (s.provisioned is not None or
                                                   (not s.used and time.monotonic() < s.expires))]
            busy = any(j.inflight for j in self._jobs.values())
            if not waiting and not busy:
                break
            time.sleep(0.02)
        self.stop()

    def stop(self) -> None:
        """Stop serving: calls in flight finish their batch; every job's run ends cleanly."""
        if self._stopped:
            return
        self._stopped = True
        self._draining = True
        self._server.stop(grace=2).wait()
        with self._jobs_lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            retiring, self._retiring = list(self._retiring.values()), {}
        for job in jobs:
            job.stop()
        for job in retiring:
            job.join()

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve_stations(
    work: PartyDir,
    *,
    listen: str,
    pin: PinCallback | None = None,
    token: Token | None = None,
    challenge_ttl_s: float = CHALLENGE_TTL_S,
    batch_size: int = 32,
    window_s: float = 0.003,
    max_workers: int = 128,
    image_fetches: int = IMAGE_FETCHES,
) -> StationServer:
    """Serve the station API of ``work``'s appliance on ``listen`` (``host:port``; port 0
    picks one: :attr:`StationServer.port`).  Jobs are opened on first use (their store, run
    lock and quota mark, as a run of ``programmer provision``)."""
    check_address(listen, what="--stations", listen=True)  # before the token is opened
    tok = token if token is not None else work.open_token(L.TOKEN, pin or work.pin_callback())
    return StationServer(work, tok, listen=listen, challenge_ttl_s=challenge_ttl_s,
                         batch_size=batch_size, window_s=window_s, max_workers=max_workers,
                         image_fetches=image_fetches)  # fmt: skip


# --- the operator's steps (programmer add-station / remove-station) -------------------------


def add_station_step(
    workdir: str | os.PathLike[str], *, name: str, csr_pem: bytes, token: Token | None = None
) -> StepResult:
    """``programmer add-station``: certify the station; its certificate and the station CA
    go to the outbox (``station-<name>.pem``, ``station-ca.pem``) for the station.  The
    appliance's transcript records it (``station-added``, with the certificate)."""
    work = L.open_programmer(workdir)
    tok = token if token is not None else work.open_token(L.TOKEN, work.pin_callback())
    pem = add_station(work, name=name, csr_pem=csr_pem, token=tok)
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    written = [work.write(f"outbox/station-{name}.pem", pem),
               work.write("outbox/station-ca.pem", station_ca_pem(work))]  # fmt: skip
    tx = work.transcript(tok.private_key(L.L_IDENTITY))
    tx.append("station-added", certificates=[CertEntry.from_certificate(cert)],
              details={"station": name})  # fmt: skip
    return work.finish("programmer add-station", written, [tx],
                       {"station": name, "fingerprint": _fingerprint(der)})  # fmt: skip


def remove_station_step(
    workdir: str | os.PathLike[str], *, name: str, token: Token | None = None
) -> StepResult:
    """``programmer remove-station``: withdraw the station (refused from its next call);
    the appliance's transcript records it (``station-removed``, with the SHA-256 of the
    certificate withdrawn), signed in the token (``token``, else opened here)."""
    work = L.open_programmer(workdir)
    tok = token if token is not None else work.open_token(L.TOKEN, work.pin_callback())
    fingerprint = remove_station(work, name=name)
    tx = work.transcript(tok.private_key(L.L_IDENTITY))
    tx.append("station-removed", artefacts={"certificate": bytes.fromhex(fingerprint)},
              details={"station": name})  # fmt: skip
    return work.finish("programmer remove-station", [REGISTRY], [tx], {"station": name})


# --- a process of its own (tests, benchmarks; the appliance service hosts it otherwise) ------


def main(argv: list[str] | None = None) -> int:
    """``python -m securethread.programmer.stations --workdir W --listen H:P``: serve until
    SIGTERM/SIGINT (then drain for ``--drain`` seconds); prints one JSON line with the port."""
    ap = argparse.ArgumentParser(prog="python -m securethread.programmer.stations")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--challenge-ttl", type=float, default=CHALLENGE_TTL_S)
    ap.add_argument("--drain", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-fetches", type=int, default=IMAGE_FETCHES)
    args = ap.parse_args(argv)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    try:
        work = L.open_programmer(args.workdir)
        server = serve_stations(work, listen=args.listen, challenge_ttl_s=args.challenge_ttl,
                                batch_size=args.batch_size,
                                image_fetches=args.image_fetches)  # fmt: skip
    except Error as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 2
    freeze_startup_heap()
    print(json.dumps({"port": server.port, "listen": server.listen}), flush=True)
    while not stop.wait(0.5):
        pass
    server.drain(args.drain)
    print(json.dumps(server.status().to_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "JobStatus",
    "StationRegistryError",
    "StationServer",
    "StationStatus",
    "add_station",
    "add_station_step",
    "remove_station",
    "remove_station_step",
    "serve_stations",
    "station_ca_pem",
]
