"""The reference station: drives chips through the appliance's station API.

Per device (``securethread/proto/station.proto``): Challenge -> the chip signs it ->
Provision -> the chip takes its provisioning data and programs the image with its license
-> Confirm with the chip's boot confirmation.  Each socket (a thread) sends these as
messages of one ``Socket`` stream per appliance, so a device costs two round trips and no
call setup; once the appliance answered a chip's Provision, the socket asks on its stream for
the challenge of a chip still to come (one per chip, never more), answered while the chip in
hand programs.  Closing a stream frees the challenges it left unanswered.  The image is
fetched once per appliance and job (GetImage).  Calls go over mutual TLS (the station's own
key and the certificate the appliance issued for it; the appliance checked under the station
CA and by the name ``securethread-appliance`` in its certificate, whatever address is
dialled).

Several appliances: each device goes to the next reachable one (client-side round-robin, as
opentitan-provisioning's stations do); one that does not answer is skipped for a while.  A
device refused by the appliance (its answer does not verify, a replay, too late) is that
device's refusal and the run goes on; a refusal of the station itself (withdrawn, job not
open) or no appliance left ends the run with :class:`StationCallError`, one line.
"""

from __future__ import annotations

import collections
import io
import itertools
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

# gRPC's C core logs handshake failures on stderr itself; the station says them in its one
# line.  Set before grpc is first imported (GRPC_VERBOSITY is read when the core starts).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc  # noqa: E402
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.errors import (
    AlreadyProvisionedError,
    ConfigurationError,
    Error,
    VerificationError,
)
from securethread.proto import MAX_CHIP_MESSAGE
from securethread.proto import station_pb2 as pb
from securethread.proto import station_pb2_grpc as pb_grpc
from securethread.proto.address import check_address
from securethread.station.adapters import ChipFactory, ChipSource
from securethread.workdir import check_name

#: The name in the appliance's TLS certificate (securethread/programmer/stations.py).
SERVER_NAME = "securethread-appliance"
_DOWN_S = 5.0  # an appliance that did not answer is skipped this long
_CALL_TIMEOUT_S = 120.0
MAX_NOTES = 20
#: Sockets of one station: the appliance serves at most this many Socket streams of one
#: station at once (securethread/programmer/stations.py, SOCKET_STREAMS).
MAX_PARALLEL = 16

# exit codes (docs/cli.md): 1 OS/network, 2 configuration, 4 verification, 5 quota
_EXIT = {
    grpc.StatusCode.UNAVAILABLE: 1,
    grpc.StatusCode.DEADLINE_EXCEEDED: 1,
    grpc.StatusCode.FAILED_PRECONDITION: 2,
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.PERMISSION_DENIED: 4,
    grpc.StatusCode.UNAUTHENTICATED: 4,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 5,
}


#: Refusals of the station itself (or of the job), not of one device: the run ends.
_STATION_REFUSED = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.RESOURCE_EXHAUSTED})  # fmt: skip


class StationCallError(Error):
    """The appliance refused the station (or none answered): ``code`` is the gRPC status
    name, ``exit_code`` the CLI's (docs/cli.md)."""

    def __init__(self, message: str, *, code: str, exit_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


class _DeviceRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Unreachable(Exception):
    """This appliance did not answer before anything was counted: try the next."""


# --- keys and credentials ----------------------------------------------------------------------


def keygen(name: str) -> tuple[bytes, bytes]:
    """A fresh P-256 key for station ``name`` (PEM, PKCS#8) and its CSR (PEM) for
    ``programmer add-station``.  The key authenticates the station and nothing more."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
        raise ConfigurationError("station name must be 1-64 characters of [A-Za-z0-9._-]")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@attrs.frozen
class StationCredentials:
    """The station's certificate and key, and the appliance's station CA (all PEM)."""

    certificate: bytes = attrs.field(repr=False)
    key: bytes = attrs.field(repr=False)
    ca: bytes = attrs.field(repr=False)

    @classmethod
    def from_files(cls, *, cert: str, key: str, ca: str) -> StationCredentials:
        from securethread.workdir import read_file

        out = cls(read_file(cert, "station certificate", limit=1 << 16),
                  read_file(key, "station key", limit=1 << 16),
                  read_file(ca, "station CA certificate", limit=1 << 16))  # fmt: skip
        for what, data, marker in (("--cert", out.certificate, b"CERTIFICATE"),
                                   ("--key", out.key, b"PRIVATE KEY"),
                                   ("--ca", out.ca, b"CERTIFICATE")):  # fmt: skip
            if b"-----BEGIN " not in data or marker not in data:
                raise ConfigurationError(f"{what} is not a PEM {marker.decode().lower()}")
        out.check()
        return out

    def check(self) -> None:
        """Before any call: the key is the certificate's, and the certificate is issued by
        the station CA given (else the appliance would close the connection unexplained)."""
        try:
            cert = x509.load_pem_x509_certificate(self.certificate)
            ca = x509.load_pem_x509_certificate(self.ca)
            key = serialization.load_pem_private_key(self.key, None)
        except ValueError as exc:
            raise ConfigurationError(f"station credentials: cannot read them: {exc}") from None
        if key.public_key() != cert.public_key():
            raise VerificationError("--key is not the key of the certificate in --cert")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise VerificationError(
                "--cert is not issued by the station CA in --ca (add-station issues both)"
            ) from None


# --- one appliance ---------------------------------------------------------------------------


def _describe_rpc(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    text = " ".join(str(details or "").split())
    return code, text[:300]


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Refusal(Exception):
    """A Socket request the appliance refused (a ``Refusal`` answer): the unary call's
    status, the stream going on."""

    def __init__(self, code: grpc.StatusCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = " ".join(text.split())[:300]


class _Stream:
    """One socket's ``Socket`` stream to one appliance.  Requests are written in order and
    answered in that order, so several may be in flight (a challenge asked ahead rides in
    front of the chip's Confirm); :meth:`result` reads up to a request's answer, keeping
    the earlier ones for their own readers.  Used by one socket thread at a time."""

    def __init__(self, stub: pb_grpc.StationServiceStub) -> None:
        self._out: queue.SimpleQueue[pb.SocketRequest | None] = queue.SimpleQueue()
        self._answers: Any = stub.Socket(iter(self._out.get, None))
        self._sent = 0
        self._read = 0
        self._kept: dict[int, pb.SocketResponse] = {}
        self.waiting_since: float | None = None  # reading an answer since (the watchdog's)
        self.broken = False
        # challenges asked ahead on this stream: (job id, when asked, ticket)
        self.ahead: collections.deque[tuple[str, float, int]] = collections.deque()

    def send(self, request: pb.SocketRequest) -> int:
        """Write ``request``; its ticket for :meth:`result`."""
        ticket = self._sent
        self._sent += 1
        self._out.put(request)
        return ticket

    def result(self, ticket: int) -> Any:
        """The answer to request ``ticket`` (a ChallengeResponse, ProvisionResponse or
        ConfirmResponse); raises :class:`_Refusal`, or ``grpc.RpcError`` when the stream
        broke (it is then :attr:`broken`: every answer still due on it is lost)."""
        while self._read <= ticket:
            self.waiting_since = time.monotonic()
            try:
                self._kept[self._read] = next(self._answers)
            except grpc.RpcError:
                self.broken = True
                raise
            except StopIteration:  # ended without a status: as if the connection dropped
                self.broken = True
                raise _StreamEnded() from None
            finally:
                self.waiting_since = None
            self._read += 1
        answer = self._kept.pop(ticket)
        which = answer.WhichOneof("answer")
        if which is None:
            raise _Refusal(grpc.StatusCode.UNKNOWN, "the appliance's answer carried nothing")
        if which == "refusal":
            raise _Refusal(_CODES.get(answer.refusal.code, grpc.StatusCode.UNKNOWN),
                           answer.refusal.message)  # fmt: skip
        return getattr(answer, which)

    def close(self) -> None:
        """Done writing: the appliance forgets the challenges asked on it and not answered."""
        self._out.put(None)

    def cancel(self) -> None:
        self.broken = True
        self._answers.cancel()


class _StreamEnded(grpc.RpcError):
    """The appliance ended a Socket stream without a status."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the appliance ended the stream"


class ApplianceClient:
    """The station API of one appliance at ``target`` (``host:port``).  Each socket thread
    has a ``Socket`` stream of its own to it (:meth:`device`)."""

    def __init__(self, target: str, creds: StationCredentials) -> None:
        self.target = target
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.certificate
        )
        self._channel = grpc.secure_channel(
            target, channel_creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
        )
        self._stub = pb_grpc.StationServiceStub(self._channel)
        self._images: dict[str, bytes] = {}
        self._image_lock = threading.Lock()
        self._local = threading.local()  # this thread's stream
        self._streams: list[_Stream] = []
        self._lock = threading.Lock()  # the stream list and every stream's ``ahead``
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            streams, self._streams = self._streams, []
        for stream in streams:
            stream.close()
        self._channel.close()

    def _fail(self, code: grpc.StatusCode, text: str, doing: str, counted: bool) -> Exception:
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and not counted:
            return _Unreachable(f"appliance {self.target}: {doing}: {_unavailable(text)}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and doing != "Provision":
            # Only a Provision's is the job's quota; elsewhere it is one of the appliance's
            # bounds on a station: its image fetches (GetImage), or its streams or challenges
            # (a challenge, or the stream that carries it).
            limit = "IMAGE_LIMIT" if doing == "GetImage" else "STATION_LIMIT"
            return StationCallError(f"appliance {self.target} refused {doing}: {text}",
                                    code=limit, exit_code=1)  # fmt: skip
        if code in _STATION_REFUSED:
            return StationCallError(f"appliance {self.target} refused {doing}: {text}",
                                    code=code.name, exit_code=_EXIT.get(code, 1))  # fmt: skip
        return _DeviceRefused(code.name, f"{doing}: {code.name}: {text}")

    def _rpc_failed(self, exc: grpc.RpcError, doing: str, counted: bool) -> Exception:
        code, text = _describe_rpc(exc)
        return self._fail(code, text, doing, counted)

    def image(self, job_id: str) -> bytes:
        """The job's encrypted image, fetched once from this appliance."""
        with self._image_lock:
            data = self._images.get(job_id)
            if data is None:
                buf = io.BytesIO()
                try:
                    for chunk in self._stub.GetImage(pb.ImageRequest(job_id=job_id),
                                                     timeout=_CALL_TIMEOUT_S):  # fmt: skip
                        buf.write(chunk.data)
                except grpc.RpcError as exc:
                    raise self._rpc_failed(exc, "GetImage", counted=False) from None
                data = self._images[job_id] = buf.getvalue()
            return data

    # -- this thread's stream

    def _stream(self) -> _Stream:
        stream: _Stream | None = getattr(self._local, "stream", None)
        if stream is None or stream.broken:
            stream = _Stream(self._stub)
            self._local.stream = stream
            with self._lock:
                self._streams = [s for s in self._streams if not s.broken] + [stream]
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                                      name=f"watchdog-{self.target}")  # fmt: skip
                    self._watchdog.start()
        return stream

    def _watch(self) -> None:
        """Cancel a stream whose answer is overdue (an appliance that hangs): its reader
        then hears CANCELLED, as a unary call's deadline would have said."""
        while not self._closed.wait(1.0):
            now = time.monotonic()
            with self._lock:
                late = [s for s in self._streams
                        if s.waiting_since is not None and now - s.waiting_since > _CALL_TIMEOUT_S]
            for stream in late:  # fmt: skip
                stream.cancel()

    def _call(self, stream: _Stream, ticket: int, doing: str, counted: bool) -> Any:
        try:
            return stream.result(ticket)
        except _Refusal as ref:
            raise self._fail(ref.code, ref.text, doing, counted) from None
        except grpc.RpcError as exc:  # the stream broke: what it asked ahead is lost with it
            raise self._rpc_failed(exc, doing, counted) from None

    def ask_ahead(self, job_id: str) -> None:
        """Ask now, on this thread's stream, for the challenge of this job's next device,
        without waiting: its round trip overlaps the chip in hand's programming instead of
        delaying the next chip."""
        stream = self._stream()
        ticket = stream.send(pb.SocketRequest(challenge=pb.ChallengeRequest(job_id=job_id)))
        with self._lock:
            stream.ahead.append((job_id, time.monotonic(), ticket))

    def ahead(self, job_id: str) -> int:
        """Challenges asked ahead for ``job_id`` (on any thread's stream) not yet taken."""
        with self._lock:
            return sum(1 for s in self._streams if not s.broken
                       for j, _t, _n in s.ahead if j == job_id)  # fmt: skip

    def _challenge(self, stream: _Stream, job_id: str) -> Any:
        """A challenge asked ahead on ``stream`` if one is at hand with at least half its
        lifetime left (a chip slow to answer is not then refused as late), else a fresh
        one.  One that was refused or aged is dropped (the appliance forgets it when the
        stream ends); the fresh request's refusal is the one reported."""
        with self._lock:
            found = next((a for a in stream.ahead if a[0] == job_id), None)
            if found is not None:
                stream.ahead.remove(found)
        if found is not None:
            _job, asked, ticket = found
            try:
                ch = stream.result(ticket)
            except _Refusal:
                pass
            except grpc.RpcError as exc:
                raise self._rpc_failed(exc, "Challenge", counted=False) from None
            else:
                if time.monotonic() - asked < ch.expires_in_s / 2:
                    return ch
        ticket = stream.send(pb.SocketRequest(challenge=pb.ChallengeRequest(job_id=job_id)))
        return self._call(stream, ticket, "Challenge", counted=False)

    def device(self, job_id: str, open_chip: ChipFactory,
               next_chip: Callable[[ApplianceClient], None] | None = None) -> str:  # fmt: skip
        """One device through this thread's stream; returns ``provisioned``, ``recovered``
        or ``already_done``, or raises :class:`_DeviceRefused` (the device's refusal),
        :class:`_Unreachable` (nothing counted: try another appliance) or
        :class:`StationCallError` (the station's).  ``next_chip`` is called once the
        appliance answered Provision (to :meth:`ask_ahead` for a chip still to come: its
        answer is at hand before the next chip opens)."""
        image = self.image(job_id)
        chip = open_chip()
        stream = self._stream()
        ch = self._challenge(stream, job_id)
        try:
            answer = chip.identify(ch.challenge)
        except Exception as exc:
            raise _DeviceRefused("CHIP", f"the chip did not answer its challenge: {exc}") from None
        _check_size(answer, "answer to its challenge")
        # The appliance may have counted it before it went away: never retried elsewhere;
        # a later run against it recovers the device (RECOVERED, no second count).
        ticket = stream.send(pb.SocketRequest(
            provision=pb.ProvisionRequest(session=ch.session, chip_answer=answer)))
        prov = self._call(stream, ticket, "Provision", counted=True)
        if next_chip is not None:  # answered while this chip programs
            next_chip(self)
        if prov.state == pb.ProvisionResponse.ALREADY_PROGRAMMED:
            return "already_done"
        try:
            if prov.provisioning_data:  # none for a "program" job: the chip has its fab's
                chip.provision(prov.provisioning_data)
        except AlreadyProvisionedError:
            pass  # a recovered chip that kept what it was given the first time
        except Exception as exc:
            raise _DeviceRefused("CHIP", f"the chip refused its provisioning data: {exc}") from None
        boot = b""  # a "provision" job (no manifest, no license): confirmed with no boot
        try:
            if prov.manifest:
                boot = chip.program(prov.manifest, io.BytesIO(image), prov.license,
                                    prov.boot_nonce)  # fmt: skip
        except Exception as exc:
            raise _DeviceRefused("CHIP", f"the chip refused its image: {exc}") from None
        _check_size(boot, "boot confirmation")
        ticket = stream.send(pb.SocketRequest(
            confirm=pb.ConfirmRequest(session=ch.session, boot=boot)))
        self._call(stream, ticket, "Confirm", counted=True)
        return "recovered" if prov.state == pb.ProvisionResponse.RECOVERED else "provisioned"


def _check_size(data: bytes, what: str) -> None:
    """A chip's message the appliance would refuse for its size is that chip's refusal here,
    never sent: above 64 KiB gRPC itself would end the stream with RESOURCE_EXHAUSTED, which
    on a Provision reads as the job's quota used up."""
    if len(data) > MAX_CHIP_MESSAGE:
        raise _DeviceRefused("CHIP", f"the chip's {what} is {len(data)} bytes (at most "
                                     f"{MAX_CHIP_MESSAGE})")  # fmt: skip


def _unavailable(text: str) -> str:
    low = text.lower()
    # An appliance stopped or killed during the handshake resets the connection ("Handshake
    # read failed (recvmsg:Connection reset by peer)"): not reachable, not a certificate fault.
    if "connection reset" in low or "connection refused" in low:
        return f"not reachable (the connection was refused or reset: is it running?): {text}"
    if "handshake" in low or "certificate" in low or "ssl" in low or "tls" in low:
        return ("the TLS handshake failed (is this station's certificate one this appliance "
                f"issued, and --ca its station CA?): {text}")  # fmt: skip
    if "socket closed" in low:
        return ("the connection was closed (the appliance refuses this station's certificate, "
                f"or it stopped): {text}")  # fmt: skip
    return f"not reachable: {text}"


class _Balancer:
    """Round-robin over the appliances; one that did not answer is skipped for a while."""

    def __init__(self, clients: Sequence[ApplianceClient]) -> None:
        self._clients = list(clients)
        self._cycle = itertools.cycle(range(len(self._clients)))
        self._down: dict[int, float] = {}
        self._lock = threading.Lock()
        self.last_error = ""
        self.tls_failed = False

    def pick(self, avoid: set[int]) -> tuple[int, ApplianceClient] | None:
        with self._lock:
            now = time.monotonic()
            for _ in range(len(self._clients)):
                i = next(self._cycle)
                if i not in avoid and self._down.get(i, 0.0) <= now:
                    return i, self._clients[i]
            return None

    def down(self, i: int, reason: str) -> None:
        with self._lock:
            self._down[i] = time.monotonic() + _DOWN_S
            self.last_error = reason
            self.tls_failed = self.tls_failed or "TLS handshake" in reason


# --- a run ------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StationResult:
    """What a station run did: ``provisioned`` (counted now), ``recovered`` (counted on an
    earlier run, programmed now), ``programmed`` (both), ``already_done`` (provisioned and
    programmed before: a resumed run), ``refused`` by gRPC status (or ``CHIP``), the
    first notes, and per-device latency (chip opened to Confirm answered)."""

    job_id: str
    appliances: tuple[str, ...]
    devices: int
    provisioned: int
    recovered: int
    programmed: int
    already_done: int
    refused: dict[str, int]
    notes: tuple[str, ...]
    elapsed_s: float
    p50_ms: float | None
    p99_ms: float | None
    quota_exhausted: bool
    #: each device's latency in ms, in the order they finished (not in :meth:`to_json`)
    latencies_ms: tuple[float, ...] = attrs.field(default=(), repr=False)

    @property
    def devices_per_s(self) -> float | None:
        done = self.programmed
        return round(done / self.elapsed_s, 1) if self.elapsed_s > 0 and done else None

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        del out["latencies_ms"]
        out["appliances"] = list(self.appliances)
        out["notes"] = list(self.notes)
        out["devices_per_s"] = self.devices_per_s
        return out


def _percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile in ms: the smallest value with at least ``q`` of the
    values at or below it (p99 of 100 values is the 99th, not the largest)."""
    if not values:
        return None
    s = sorted(values)
    return round(s[max(0, math.ceil(q * len(s)) - 1)] * 1000, 2)


@attrs.define
class _Tally:
    outcomes: dict[str, int] = attrs.Factory(dict)
    refused: dict[str, int] = attrs.Factory(dict)
    notes: list[str] = attrs.Factory(list)
    latencies: list[float] = attrs.Factory(list)
    quota: bool = False
    fatal: BaseException | None = None


def check_target(target: str) -> str:
    """``target`` if it is an appliance's station API address, ``HOST:PORT``; else one
    :class:`ConfigurationError` naming it (before any call: gRPC would report a bad address
    as each device's failure to connect)."""
    return check_address(target, what="--appliance")


def run_station(
    creds: StationCredentials,
    appliances: Sequence[str],
    *,
    job_id: str,
    chips: ChipSource,
    parallel: int = 4,
    progress: Callable[[int, dict[str, int]], None] | None = None,
) -> StationResult:
    """Drive ``chips`` through the appliances (``parallel`` sockets at once); see the
    module docstring.  Raises :class:`StationCallError` when the station itself is refused
    or no appliance answers; the result says what was done up to then otherwise."""
    if not appliances:
        raise ConfigurationError("give at least one --appliance HOST:PORT")
    for target in appliances:
        check_target(target)
    if len(set(appliances)) != len(appliances):
        raise ConfigurationError("an --appliance is given twice")
    check_name("job id", job_id)
    if not 1 <= parallel <= MAX_PARALLEL:
        raise ConfigurationError(f"--parallel must be 1 to {MAX_PARALLEL} (an appliance serves "
                                 f"at most {MAX_PARALLEL} sockets of one station at once)")
    clients = [ApplianceClient(t, creds) for t in appliances]
    balancer = _Balancer(clients)
    tally = _Tally()
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.perf_counter()
    unstarted = [len(chips)]  # chips no socket has begun

    def next_chip(client: ApplianceClient) -> None:
        # One challenge asked ahead per chip still to come, at most: none is left over at
        # the end of a run (an unanswered challenge holds the job open until it expires).
        with lock:
            if not stop.is_set() and unstarted[0] > sum(c.ahead(job_id) for c in clients):
                client.ask_ahead(job_id)

    def one(label: str, open_chip: ChipFactory) -> None:
        tried: set[int] = set()
        with lock:
            unstarted[0] -= 1
        while not stop.is_set():
            picked = balancer.pick(tried)
            if picked is None:
                raise StationCallError(
                    f"no appliance answered ({balancer.last_error})", code="UNAVAILABLE",
                    exit_code=4 if balancer.tls_failed else 1,
                )  # fmt: skip
            i, client = picked
            try:
                # A device's latency runs from its chip's opening to its Confirm: the image,
                # fetched once per appliance and job, is not any one device's.
                client.image(job_id)
                started = time.perf_counter()
                outcome = client.device(job_id, open_chip, next_chip)
            except _Unreachable as exc:
                balancer.down(i, str(exc))
                tried.add(i)
                continue
            except _DeviceRefused as exc:
                with lock:
                    tally.refused[exc.code] = tally.refused.get(exc.code, 0) + 1
                    if len(tally.notes) < MAX_NOTES:
                        tally.notes.append(f"{label}: {exc}")
                return
            with lock:
                tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1
                if outcome != "already_done":
                    tally.latencies.append(time.perf_counter() - started)
            return

    def done(exc: BaseException | None) -> None:
        with lock:
            if isinstance(exc, StationCallError) and exc.code == "RESOURCE_EXHAUSTED":
                tally.quota = True
                stop.set()
            elif exc is not None and tally.fatal is None:
                tally.fatal = exc
                stop.set()
            if progress is not None:
                progress(1, dict(tally.outcomes))

    feed: Iterator[tuple[str, ChipFactory]] = iter(chips)
    feed_lock = threading.Lock()

    def socket() -> None:
        # One socket: takes the next chip until there is none (or the run stops), so a
        # device needs no other thread's turn to start.
        while not stop.is_set():
            with feed_lock:
                item = next(feed, None)
            if item is None:
                return
            try:
                one(*item)
            except BaseException as exc:  # noqa: BLE001 -- the run's outcome, raised below
                done(exc)
            else:
                done(None)

    try:
        sockets = [threading.Thread(target=socket, name=f"socket-{n}", daemon=True)
                   for n in range(parallel)]  # fmt: skip
        for t in sockets:
            t.start()
        for t in sockets:
            t.join()
    finally:
        for c in clients:
            c.close()
    if tally.fatal is not None:
        raise tally.fatal
    o = tally.outcomes
    return StationResult(
        job_id=job_id,
        appliances=tuple(appliances),
        devices=len(chips),
        provisioned=o.get("provisioned", 0),
        recovered=o.get("recovered", 0),
        programmed=o.get("provisioned", 0) + o.get("recovered", 0),
        already_done=o.get("already_done", 0),
        refused=dict(tally.refused),
        notes=tuple(tally.notes),
        elapsed_s=round(time.perf_counter() - t0, 3),
        p50_ms=_percentile(tally.latencies, 0.50),
        p99_ms=_percentile(tally.latencies, 0.99),
        quota_exhausted=tally.quota,
        latencies_ms=tuple(round(x * 1000, 3) for x in tally.latencies),
    )


def progress_bar(total: int, *, enabled: bool) -> tuple[Callable[[int, dict[str, int]], None],
                                                        Callable[[], None]]:  # fmt: skip
    """A tqdm bar on stderr (total, rate, ETA) that never wraps at 80 columns; nothing when
    ``enabled`` is false (``--json``, or stderr is not a terminal)."""
    if not enabled:
        return (lambda _n, _o: None), (lambda: None)
    from tqdm import tqdm

    width = min(79, shutil.get_terminal_size((80, 24)).columns - 1)
    bar = tqdm(total=total, unit="dev", ncols=width, file=sys.stderr, dynamic_ncols=False,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                          "{rate_fmt}]")  # fmt: skip

    def update(n: int, outcomes: dict[str, int]) -> None:
        bar.update(n)
        already = outcomes.get("already_done", 0)
        bar.set_description_str(f"done {already} before" if already else "station", refresh=False)

    return update, bar.close


__all__ = [
    "ApplianceClient",
    "SERVER_NAME",
    "StationCallError",
    "StationCredentials",
    "StationResult",
    "check_target",
    "keygen",
    "progress_bar",
    "run_station",
]
