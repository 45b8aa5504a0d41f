"""The programmer appliance as a service: ``securethread appliance init|serve``.

The threat model trusts one thing at the programming centre, the appliance: the programmer
token plus the one process that holds its PIN (docs/threat-model.md).  This module is that
process.  Its state directory (the programmer's work directory: token directory, PIN file,
job stores, quota marks, revocation state, transcript) belongs to the appliance's own OS user
and is refused if anyone else can read it; the process logs in to the token once, keeps core
dumps off (:func:`securethread.hsm.pin.harden_process`), refuses to start while another
appliance serves the same state directory (``flock``), and answers operators on a UNIX
socket (mode 0660, the operators' group) with the existing steps of
:mod:`securethread.programmer`, one request per connection (:mod:`.operator_api`).  Each
operation's caller -- the uid, gid and pid the kernel recorded at connect(2), SO_PEERCRED --
is written to the signed transcript once the enclave has its identity key, and to
``operations.log`` always.

SIGTERM (or SIGINT) stops it: a production run in flight finishes its batch, commits it and
answers its operator; a hosted station server drains its devices in flight; then the process
exits 0.  A SIGKILL loses nothing: the job store and the token's quota mark make the next
run burn what the killed one held, never count it twice (docs/appliance.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import queue
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from securethread.errors import ConfigurationError, Error, describe, exit_code_for
from securethread.formats.job import Targets
from securethread.heap import freeze_startup_heap
from securethread.programmer import layout as L
from securethread.programmer.operator_api import (
    Answer,
    Request,
    RequestError,
    peer_credentials,
    read_request,
    send_answer,
    send_event,
)
from securethread.programmer.runner import PortFactory, Progress
from securethread.proto.address import check_address
from securethread.workdir import PartyDir, StepResult, check_name, write_atomic

LOCK = "appliance.lock"
OPERATIONS_LOG = "operations.log"
REQUESTS = "requests"
#: Seconds a stopping appliance gives its station server to finish devices in flight.
DRAIN_S = 30.0


class ApplianceBusyError(ConfigurationError):
    """Another appliance already serves this state directory."""


class StateDirectoryError(ConfigurationError):
    """The state directory is missing, not the appliance user's, or readable by others."""


class ChipSource(Protocol):
    """Where a production run's chips come from (the caller's: the appliance knows the
    line's protocol, never a particular chip); ``files`` is the directory holding the input
    files the operator sent."""

    def __call__(
        self, files: Path, targets: Targets, /, *, first: int, devices: int
    ) -> Iterable[PortFactory]: ...


# --- the state directory ------------------------------------------------------------------------


def check_state_dir(root: Path) -> None:
    """Refuse a state directory another user owns or that its group or others can enter
    (the PIN file and the stores are the appliance's alone)."""
    try:
        st = root.stat()
    except OSError as exc:
        raise StateDirectoryError(f"state directory {str(root)!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirectoryError(f"state directory {str(root)!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise StateDirectoryError(
            f"state directory {str(root)!r} belongs to uid {st.st_uid}, not to the appliance's "
            f"user (uid {os.geteuid()})"
        )
    if st.st_mode & 0o077:
        raise StateDirectoryError(
            f"state directory {str(root)!r} has mode {stat.S_IMODE(st.st_mode):04o}: others "
            "can reach the PIN and the stores; make it 0700 (chmod 0700)"
        )


def init(state: str | os.PathLike[str], *, name: str) -> StepResult:
    """``appliance init``: make the state directory (0700) with the programmer's token."""
    from securethread.programmer import enrolment

    check_name("programmer name", name)  # before the directory is made
    root = Path(state).resolve()
    if root.exists():
        check_state_dir(root)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700)
    os.chmod(root, 0o700)
    result = enrolment.init(root, name=name)
    return attrs.evolve(result, step="appliance init")


# --- the service ----------------------------------------------------------------------------------


@attrs.define
class _RunMeter:
    """devices/s of the production run in flight and of the last one (status view)."""

    started: float | None = None
    handled: int = 0
    job: str | None = None
    last_rate: float | None = None

    def rate(self) -> float | None:
        if self.started is None:
            return self.last_rate
        elapsed = time.monotonic() - self.started
        return round(self.handled / elapsed, 1) if elapsed > 0 else None


class _Stop(BaseException):
    """Raised by the signal handler inside an interruptible wait (receive-keys)."""


@attrs.frozen
class _Pending:
    conn: socket.socket
    request: Request
    peer: tuple[int, int, int]


class Appliance:
    """One appliance process on one state directory (see the module docstring)."""

    def __init__(
        self,
        state: str | os.PathLike[str],
        *,
        socket_path: str | os.PathLike[str],
        operators: str | None = None,
        stations: str | None = None,
        chips: ChipSource | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if stations is not None:  # refused before the state is touched
            check_address(stations, what="--stations", listen=True)
        self.root = Path(state).resolve()
        self.socket_path = Path(socket_path).absolute()
        self.operators = operators
        self.stations_listen = stations
        self.chips = chips
        self.log = log or (lambda _m: None)
        self.meter = _RunMeter()
        self._stop = threading.Event()
        self._interruptible = False
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._stations: Any = None
        self._token: Any = None
        self.work: PartyDir | None = None

    # start and stop

    def _acquire(self) -> None:
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise ApplianceBusyError(
                f"another appliance (process {holder or '?'}) already serves state directory "
                f"{str(self.root)!r}; one appliance per state directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _bind(self) -> socket.socket:
        path = self.socket_path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigurationError(f"{str(path)!r} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()  # a dead appliance's socket
            else:
                raise ConfigurationError(f"another process is listening on {str(path)!r}")
            finally:
                probe.close()
        gid = None
        if self.operators is not None:
            try:
                gid = grp.getgrnam(self.operators).gr_gid
            except KeyError:
                raise ConfigurationError(
                    f"no group named {self.operators!r} (--operators)"
                ) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # never, not even for an instant, open to everyone
        try:
            sock.bind(str(path))
        except OSError as exc:  # no such directory, not writable, a path too long for AF_UNIX
            sock.close()
            raise ConfigurationError(f"cannot make the socket {str(path)!r}: "
                                     f"{exc.strerror or exc}") from None  # fmt: skip
        finally:
            os.umask(old)
        if gid is not None and path.stat().st_gid != gid:  # a setgid directory gave it already
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                sock.close()
                path.unlink()
                raise ConfigurationError(
                    f"cannot give the socket {str(path)!r} the group {self.operators!r}: the "
                    "appliance's user is not a member of it (add it, or make the socket's "
                    "directory setgid to that group)"
                ) from None
        os.chmod(path, 0o660)
        sock.listen(64)
        return sock

    def serve(self, *, ready: Callable[[Appliance], None] | None = None) -> int:
        """Serve until SIGTERM/SIGINT; return 0 after a clean stop."""
        from securethread.hsm.pin import harden_process

        harden_process()  # before the PIN is read: no core file, no ptrace
        work = L.open_programmer(self.root)
        check_state_dir(self.root)
        self._acquire()
        self.work = work
        # input files of requests a killed appliance never finished: nobody answers them now
        shutil.rmtree(self.root / REQUESTS, ignore_errors=True)
        # Log in once; this process keeps the session (every step reuses it).
        self._token = work.open_token(L.TOKEN)
        self._listener = self._bind()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.stations_listen is not None:
                self._stations = _start_stations(self, self.stations_listen)
            threading.Thread(target=self._accept, name="operators", daemon=True).start()
            self.log(f"appliance {work.name!r} serving {str(self.socket_path)!r}")
            freeze_startup_heap()
            if ready is not None:
                ready(self)
            while not self._stop.is_set():
                try:
                    pending = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                self._handle(pending)
            self._shutdown()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return 0

    @property
    def stations_address(self) -> str | None:
        """``host:port`` where the hosted station server listens (port 0 resolved)."""
        if self._stations is None:
            return None
        host = str(self.stations_listen).rpartition(":")[0]
        return f"{host}:{self._stations.port}"

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop.set()
        if self._interruptible:
            raise _Stop(signal.Signals(signum).name)

    def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        if self._stations is not None:
            self._stations.drain(DRAIN_S)  # devices in flight counted, issued and committed
            self._stations.stop()
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            self._refuse(pending, "the appliance is stopping; run the command again later")
        self.log("appliance stopped")

    # operators

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by the shutdown
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(60.0)
            peer = peer_credentials(conn)
            request = read_request(conn)
            conn.settimeout(None)
        except (RequestError, OSError) as exc:
            with contextlib.suppress(OSError):
                send_answer(conn, _error_answer(exc))
            conn.close()
            return
        if request.command == "status":  # read-only: answered at once, even during a run
            self._log_operation(peer, request.command, True)
            with contextlib.closing(conn):
                try:
                    send_answer(conn, Answer(True, self.status()))
                except Error as exc:
                    send_answer(conn, _error_answer(exc))
            return
        if self._stop.is_set():
            self._refuse(_Pending(conn, request, peer), "the appliance is stopping")
            return
        self._queue.put(_Pending(conn, request, peer))

    def _refuse(self, pending: _Pending, why: str) -> None:
        with contextlib.closing(pending.conn), contextlib.suppress(OSError):
            send_answer(pending.conn, _error_answer(_StoppingError(why)))

    def _handle(self, pending: _Pending) -> None:
        """Run one operation in this (the main) thread: the token, the runner's signal
        handling and the transcript live here."""
        conn, request, peer = pending.conn, pending.request, pending.peer
        scratch = self.root / REQUESTS / os.urandom(8).hex()
        scratch.mkdir(parents=True, mode=0o700)
        answer: Answer
        try:
            for name, data in request.files:
                write_atomic(scratch / name, data, mode=0o600)
            answer = self._operation(conn, request, scratch)
        except _Stop:
            answer = _error_answer(_StoppingError("the appliance was stopped during the step"))
        except (Error, OSError) as exc:
            answer = _error_answer(exc)
            if getattr(exc, "signum", None) is not None:
                self._stop.set()  # a production run stopped by SIGTERM: stop after answering
        except Exception as exc:  # a bug must not take the appliance down with it
            answer = _error_answer(exc)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(Error, OSError):
            self._log_operation(peer, request.command, answer.ok, signed=True)
        with contextlib.closing(conn), contextlib.suppress(OSError):
            send_answer(conn, answer)
            if answer.delivered is not None:  # sent: a second run is refused as done
                answer.delivered()

    def _log_operation(
        self, peer: tuple[int, int, int], command: str, ok: bool, *, signed: bool = False
    ) -> None:
        pid, uid, gid = peer
        entry = {"time": int(time.time()), "uid": uid, "gid": gid, "pid": pid,
                 "command": command, "ok": ok}  # fmt: skip
        with open(self.root / OPERATIONS_LOG, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        assert self.work is not None
        if signed and self.work.exists(L.ENROLMENT):  # the identity key exists from enrol on
            tx = self.work.transcript(self._token.private_key(L.L_IDENTITY))
            tx.append(
                "operator-request",
                details={"command": command, "uid": uid, "gid": gid, "pid": pid,
                         "ok": int(ok)},  # fmt: skip
            )

    def _operation(self, conn: socket.socket, request: Request, scratch: Path) -> Answer:
        op = _OPERATIONS.get(request.command)
        if op is None:
            raise ConfigurationError(f"the appliance has no operation {request.command!r}")
        return op(self, conn, _Options(request.options), scratch)

    # the status view

    def status(self) -> dict[str, Any]:
        """Jobs (quota used and left, open or closed), stations connected, devices/s."""
        assert self.work is not None
        jobs = tuple(job_view(self.work, d.name) for d in _job_dirs(self.work))
        stations: dict[str, Any] | None = None
        if self._stations is not None:
            stations = dict(self._stations.status().to_json())
        rate = self.meter.rate()
        if rate is None and stations is not None:
            rates = [j.get("devices_per_s") for j in stations.get("jobs") or []]
            rate = sum(r for r in rates if r) or None
        view = StatusView(appliance=self.work.name, jobs=jobs, stations=stations,
                          running=self.meter.job, devices_per_s=rate)  # fmt: skip
        return {"step": "programmer status", "pid": os.getpid(), **view.to_json()}


class _StoppingError(ConfigurationError):
    """The appliance is stopping and did not run the operation."""


def _error_answer(exc: BaseException) -> Answer:
    payload: dict[str, Any] = {}
    partial = getattr(exc, "result", None)
    if partial is not None and hasattr(partial, "to_json"):
        payload = dict(partial.to_json())
    line = describe(exc)
    return Answer(
        False,
        payload,
        error={"type": type(exc).__name__, "message": line, "exit_code": exit_code_for(exc)},
    )


def _job_dirs(work: PartyDir) -> list[Path]:
    jobs = work.path("jobs")
    return sorted(d for d in jobs.iterdir() if d.is_dir()) if jobs.is_dir() else []


@attrs.frozen
class JobView:
    """One job in the status view: ``state`` is requested (production CA asked for), open,
    closed, or refused (its kept files no longer verify: ``error`` says why)."""

    job: str
    state: str
    quota: int | None = None
    quota_used: int | None = None
    quota_left: int | None = None
    provisioned: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class StatusView:
    """The status view (``programmer status``): the jobs, the station server's status
    (``None`` without one), the job running in-process and its devices/s."""

    appliance: str
    jobs: tuple[JobView, ...]
    stations: Mapping[str, Any] | None = None
    running: str | None = None
    devices_per_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "appliance": self.appliance,
            "jobs": [j.to_json() for j in self.jobs],
            "stations": None if self.stations is None else dict(self.stations),
            "running": self.running,
            "devices_per_s": self.devices_per_s,
        }


def job_view(work: PartyDir, job_id: str) -> JobView:
    """Job ``job_id`` of ``work`` for the status view, verified as every step does
    (:class:`~securethread.programmer.opened.OpenedJob`; also after its window, without
    hashing the image)."""
    from securethread.programmer.opened import OpenedJob
    from securethread.programmer.store import SQLiteStore

    jdir = L.job_dir(job_id)
    if not work.exists(f"{jdir}/job.bin"):
        return JobView(job_id, "requested")
    try:
        job = OpenedJob.verify(work, job_id, step="status", within_window=False, image=False).job
    except Error as exc:  # one job's files altered: say so, show the others
        return JobView(job_id, "refused", error=f"{type(exc).__name__}: {exc}")
    state = SQLiteStore.inspect(work.path(f"{jdir}/store.sqlite"), job.sha256)
    used = state.used if state is not None else 0
    return JobView(
        job_id,
        "closed" if work.exists(f"{jdir}/ledger.bin") else "open",
        quota=job.job.quota,
        quota_used=used,
        quota_left=job.job.quota - used,
        provisioned=state.committed if state is not None else 0,
    )


def status(workdir: str | os.PathLike[str]) -> StepResult:
    """``programmer status --workdir``: the status view of a work directory read directly
    (no stations, no run rate: those belong to a serving appliance)."""
    work = L.open_programmer(workdir)
    view = StatusView(work.name, tuple(job_view(work, d.name) for d in _job_dirs(work)))
    return work.finish("programmer status", [], (), view.to_json())


def status_lines(view: Mapping[str, Any]) -> list[str]:
    """The status view for people."""
    lines = [f"appliance {view.get('appliance')!r}"]
    for j in view.get("jobs") or []:
        if j.get("state") == "requested":
            lines.append(f"  job {j['job']}: production CA requested, not open")
        elif j.get("state") == "refused":
            lines.append(f"  job {j['job']}: REFUSED, its files do not verify ({j['error']})")
        else:
            lines.append(
                f"  job {j['job']} ({j['state']}): quota {j['quota_used']} used of {j['quota']}, "
                f"{j['quota_left']} left, {j['provisioned']} provisioned"
            )
    st = view.get("stations")
    if isinstance(st, Mapping):
        names = list(st.get("stations_connected") or [])
        lines.append(f"  stations connected: {len(names)}"
                     + (f" ({', '.join(names)})" if names else "")
                     + f" on {st.get('listen')}" + (" (draining)" if st.get("draining") else ""))
        for j in st.get("jobs") or []:
            lines.append(f"    job {j.get('job_id')} on the stations: {j.get('provisioned')} "
                         f"provisioned, {j.get('programmed')} programmed, "
                         f"{j.get('devices_per_s') or '-'} devices/s")  # fmt: skip
    elif st is None:
        lines.append("  stations connected: none (no station server)")
    rate = view.get("devices_per_s")
    lines.append(f"  devices/s: {rate if rate is not None else '-'}"
                 + (f" (job {view['running']} running)" if view.get("running") else ""))
    return lines


# --- the operations -------------------------------------------------------------------------------


class _Options:
    """The operator's options, read with the type each operation expects."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def text(self, name: str, default: str | None = None) -> str:
        v = self.raw.get(name, default)
        if not isinstance(v, str):
            raise ConfigurationError(f"option {name!r} must be given as text")
        return v

    def integer(self, name: str, default: int | None = None) -> int:
        v = self.raw.get(name, default)
        if type(v) is not int:
            raise ConfigurationError(f"option {name!r} must be an integer")
        return v

    def number(self, name: str, default: float) -> float:
        v = self.raw.get(name, default)
        if type(v) not in (int, float):
            raise ConfigurationError(f"option {name!r} must be a number")
        return float(v)

    def texts(self, name: str) -> list[str]:
        v = self.raw.get(name, [])
        if not isinstance(v, list):
            raise ConfigurationError(f"option {name!r} must be a list")
        return [str(x) for x in v]


def _input(scratch: Path, name: str) -> Path:
    p = scratch / name
    if not p.is_file():
        raise ConfigurationError(f"the request carries no file {name!r}")
    return p


def _answer(app: Appliance, result: StepResult, extra: Iterable[tuple[str, bytes]] = ()) -> Answer:
    """The step's JSON with the outbox files it wrote (what operators carry to the OEM)."""
    files = [
        (Path(rel).name, (app.root / rel).read_bytes())
        for rel in result.written
        if rel.startswith("outbox/") and (app.root / rel).is_file()
    ]
    files += list(extra)
    payload = result.to_json()
    payload.pop("workdir", None)  # operators get the step's result, not the state's paths
    problem = result.problem
    error = None
    if problem is not None:
        error = {"type": type(problem).__name__, "message": describe(problem),
                 "exit_code": exit_code_for(problem)}  # fmt: skip
    return Answer(problem is None, payload, error=error, files=files, delivered=result.delivered)


def _op_enrol(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import enrol

    return _answer(app, enrol(app.root))


def _op_install_certs(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import install_certs

    fp = o.text("root_fingerprint")
    return _answer(app, install_certs(app.root, _input(s, "bundle"), root_fingerprint=fp))


def _op_receive_keys(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import receive_keys

    host, port = o.text("host"), o.integer("port")

    def ready(addr: tuple[str, int]) -> None:
        send_event(conn, "listening", host=addr[0], port=addr[1])

    app._interruptible = True
    try:
        result = receive_keys(app.root, host=host, port=port,
                              timeout=o.number("timeout", 300.0), ready=ready)  # fmt: skip
    finally:
        app._interruptible = False
    return _answer(app, result)


def _op_open_keys(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import open_keys

    return _answer(app, open_keys(app.root, _input(s, "package")))


def _op_request_ca(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import request_ca

    return _answer(app, request_ca(app.root, job_id=o.text("job")))


def _op_open_job(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import open_job

    image = _input(s, "image") if (s / "image").is_file() else None  # none: a provision job
    return _answer(app, open_job(app.root, _input(s, "package"), image=image))


def _op_provision(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import job_targets, provision

    if app.chips is None:
        raise ConfigurationError("this appliance has no chip source for in-process runs")
    job_id = o.text("job")
    first, devices = o.integer("first", 0), o.integer("devices")
    for name, value, low in (("--devices", devices, 1), ("--first", first, 0)):
        if value < low:
            raise ConfigurationError(f"{name} must be at least {low}")
    chips = app.chips(s, job_targets(app.root, job_id), first=first, devices=devices)
    app.meter.started, app.meter.handled, app.meter.job = time.monotonic(), 0, job_id

    def progress(p: Progress) -> None:
        app.meter.handled = p.handled

    try:
        result = provision(app.root, job_id=job_id, chips=chips, workers=o.integer("workers", 1),
                           batch_size=o.integer("batch_size", 32), progress=progress)  # fmt: skip
    finally:
        app.meter.last_rate, app.meter.started, app.meter.job = app.meter.rate(), None, None
    return _answer(app, result)


def _op_close_job(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import close_job
    from securethread.programmer.runner import RunLockedError

    job_id = o.text("job")
    # The hosted station server releases a job a moment after its stations' last call
    # (stations.py, idle_s): wait that long for it, never for a run of another process.
    deadline = time.monotonic() + (3 * float(getattr(app._stations, "idle_s", 0.0)) + 1.0
                                   if app._stations is not None else 0.0)  # fmt: skip
    while True:
        try:
            return _answer(app, close_job(app.root, job_id=job_id))
        except RunLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _op_revoke(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer import revoke

    devices = [_input(s, f"device-{i}.pem") for i in range(o.integer("devices"))]
    out = s / "crl.pem"
    result = revoke(app.root, job_id=o.text("job"), devices=devices, out=out,
                    reason=o.text("reason", "unspecified"))  # fmt: skip
    return _answer(app, result, [("crl.pem", out.read_bytes())])


def _op_add_station(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer.stations import add_station_step

    csr = _input(s, "station.csr").read_bytes()
    return _answer(app, add_station_step(app.root, name=o.text("name"), csr_pem=csr,
                                         token=app._token))  # fmt: skip


def _op_remove_station(app: Appliance, conn: socket.socket, o: _Options, s: Path) -> Answer:
    from securethread.programmer.stations import remove_station_step

    return _answer(app, remove_station_step(app.root, name=o.text("name"), token=app._token))


_Op = Callable[[Appliance, socket.socket, _Options, Path], Answer]
_OPERATIONS: dict[str, _Op] = {
    "enrol": _op_enrol,
    "install-certs": _op_install_certs,
    "receive-keys": _op_receive_keys,
    "open-keys": _op_open_keys,
    "request-ca": _op_request_ca,
    "open-job": _op_open_job,
    "provision": _op_provision,
    "close-job": _op_close_job,
    "revoke": _op_revoke,
    "add-station": _op_add_station,
    "remove-station": _op_remove_station,
}
#: Every operation an operator can ask for (status is answered outside the queue).
OPERATIONS = (*_OPERATIONS, "status")


def _start_stations(app: Appliance, listen: str) -> Any:
    from securethread.programmer.stations import serve_stations

    assert app.work is not None
    return serve_stations(app.work, listen=listen, token=app._token)


__all__ = [
    "OPERATIONS",
    "Appliance",
    "ApplianceBusyError",
    "ChipSource",
    "JobView",
    "StateDirectoryError",
    "StatusView",
    "check_state_dir",
    "init",
    "job_view",
    "status",
    "status_lines",
]
