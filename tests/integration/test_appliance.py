"""The programmer appliance as a service and its operators as clients, each a separate
process (docs/appliance.md): the state directory private to the appliance's OS user, one
appliance per state directory, a client of a stopped appliance, SIGTERM draining a run,
SIGKILL mid-run then a restart counting nothing twice, and -- when the tests run as root --
real OS users: the operator cannot read the PIN or the state, yet runs operations through
the socket, and the appliance logs the operator's uid (SO_PEERCRED) per operation.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from securethread.demo import child_env
from tests.integration.demo_support import DEVICES, demo_copy

CLI = [sys.executable, "-m", "securethread.cli"]
EXIT_CONFIG = 2


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=child_env(), cwd=cwd, timeout=timeout
    )


def ok(*args: str, cwd: Path | None = None) -> dict[str, Any]:
    proc = cli(*args, "--json", cwd=cwd)
    assert proc.returncode == 0, (args, proc.stderr)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def one_line(proc: subprocess.CompletedProcess[str], code: int, match: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


class Serving:
    """``securethread appliance serve`` in a process of its own."""

    def __init__(
        self,
        state: Path,
        sock: Path,
        *,
        user: list[str] | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        cmd = [*(user or CLI), "appliance", "serve", "--state", str(state),
               "--socket", str(sock), *extra]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=env or child_env(),
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith("appliance serving "), line + self.proc.stderr.read()
        #: where the hosted station server listens (--stations), from the ready line
        self.stations = line.strip().partition("; stations on ")[2] or None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


@pytest.fixture
def state(tmp_path: Path) -> Path:
    st = tmp_path / "state"
    ok("appliance", "init", "--state", str(st), "--name", "factory-t")
    return st


# --- the state directory and the process --------------------------------------------------------


def test_init_makes_a_private_state_directory(state: Path, tmp_path: Path) -> None:
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "pins").stat().st_mode) == 0o600
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    proc = cli("appliance", "init", "--state", str(open_dir), "--name", "x")
    one_line(proc, EXIT_CONFIG, "mode 0755")
    assert list(open_dir.iterdir()) == []


def test_init_with_a_bad_name_makes_nothing(tmp_path: Path) -> None:
    proc = cli("appliance", "init", "--state", str(tmp_path / "st"), "--name", "bad name")
    one_line(proc, EXIT_CONFIG, "programmer name must be")
    assert not (tmp_path / "st").exists()


def test_serve_names_a_socket_it_cannot_make(state: Path, tmp_path: Path) -> None:
    """Not "OSError: No such file or directory": which socket, and why (exit 2)."""
    for sock, why in ((tmp_path / "no-such-dir" / "app.sock", "No such file or directory"),
                      (tmp_path / ("x" * 120) / "app.sock", "")):  # fmt: skip
        if why == "":  # a path too long for AF_UNIX (108 bytes) in a directory that exists
            sock.parent.mkdir()
        proc = cli("appliance", "serve", "--state", str(state), "--socket", str(sock))
        line = one_line(proc, EXIT_CONFIG, "cannot make the socket")
        assert str(sock) in line and why in line


def test_serve_refuses_a_state_directory_others_can_read(state: Path, tmp_path: Path) -> None:
    os.chmod(state, 0o750)
    proc = cli("appliance", "serve", "--state", str(state), "--socket", str(tmp_path / "s"))
    one_line(proc, EXIT_CONFIG, "others can reach the PIN")
    assert not (tmp_path / "s").exists()


def test_serve_refuses_a_stations_address_grpc_would_misread(state: Path, tmp_path: Path) -> None:
    """gRPC takes a port modulo 65536 (99999 listened on 34463) and logs a failed lookup on
    stderr: the address is checked first -- one line, exit 2, the state untouched (no
    station CA made, no socket)."""
    def files() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()}

    before = files()
    for address, says in (("127.0.0.1:99999", "is not HOST:PORT"),
                          ("127.0.0.1", "is not HOST:PORT"),
                          ("no-such-host.invalid:0", "no address for")):  # fmt: skip
        proc = cli("appliance", "serve", "--state", str(state), "--socket", str(tmp_path / "s"),
                   "--stations", address)  # fmt: skip
        assert address in one_line(proc, EXIT_CONFIG, says)
        assert not (tmp_path / "s").exists()
    assert files() == before


def test_two_appliances_on_one_state_directory(state: Path, tmp_path: Path) -> None:
    first = Serving(state, tmp_path / "a.sock")
    try:
        proc = cli("appliance", "serve", "--state", str(state), "--socket", str(tmp_path / "b"))
        one_line(proc, EXIT_CONFIG, "another appliance")
        assert not (tmp_path / "b").exists()
        # the first one still answers
        view = ok("programmer", "status", "--appliance", str(tmp_path / "a.sock"))
        assert view["appliance"] == "factory-t" and view["jobs"] == []
    finally:
        code, err = first.stop()
    assert code == 0, err
    assert not (tmp_path / "a.sock").exists()  # SIGTERM: a clean stop removes its socket


def test_a_client_of_a_stopped_appliance(state: Path, tmp_path: Path) -> None:
    sock = tmp_path / "app.sock"
    proc = cli("programmer", "enrol", "--appliance", str(sock))
    one_line(proc, EXIT_CONFIG, "no appliance is listening")
    # a socket file left by a killed appliance: the same line, and the next serve reuses it
    s = Serving(state, sock)
    code, _ = s.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL and sock.exists()
    proc = cli("programmer", "status", "--appliance", str(sock))
    one_line(proc, EXIT_CONFIG, "no appliance is listening")
    again = Serving(state, sock)
    try:
        assert ok("programmer", "status", "--appliance", str(sock))["appliance"] == "factory-t"
    finally:
        assert again.stop()[0] == 0
    # and with neither --workdir nor --appliance (nor $SECURETHREAD_APPLIANCE)
    one_line(cli("programmer", "status"), EXIT_CONFIG, "SECURETHREAD_APPLIANCE")


def test_operator_requests_are_bounded(state: Path, tmp_path: Path) -> None:
    """A malformed request gets one error answer; the appliance keeps serving."""
    sock = tmp_path / "app.sock"
    s = Serving(state, sock)
    try:
        for raw in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x02{]", b"\x00\x00\x00\x0b{\"v\": 999}"):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sock))
            c.sendall(raw)
            c.shutdown(socket.SHUT_WR)
            data = c.recv(65536)
            c.close()
            assert b'"ok": false' in data and b"RequestError" in data, data
        assert ok("programmer", "status", "--appliance", str(sock))["appliance"] == "factory-t"
    finally:
        assert s.stop()[0] == 0


# --- OS users: the operator cannot read the state, yet runs every operation ----------------------


def _can_make_users() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("useradd", "groupadd", "setpriv"))


@pytest.fixture
def users() -> Iterator[dict[str, str]]:
    if not _can_make_users():
        pytest.skip("needs root, useradd and setpriv to create the appliance and operator users")
    tag = secrets.token_hex(3)
    names = {"appliance": f"st-app-{tag}", "operator": f"st-op-{tag}",
             "stranger": f"st-x-{tag}", "group": f"st-ops-{tag}"}  # fmt: skip
    subprocess.run(["groupadd", "--system", names["group"]], check=True)
    for who in ("appliance", "operator", "stranger"):
        extra = ["-G", names["group"]] if who == "operator" else []
        subprocess.run(["useradd", "--system", "--no-create-home", *extra, names[who]], check=True)
    try:
        yield names
    finally:
        for who in ("appliance", "operator", "stranger"):
            subprocess.run(["userdel", names[who]], check=False)
        subprocess.run(["groupdel", names["group"]], check=False)


def _python_for_others() -> tuple[list[str], dict[str, str]]:
    """An interpreter other users can execute, and the environment that finds the package:
    this one if every directory on its path lets others through, else the system's
    python3 of the same version with this environment's site-packages (the compiled
    extensions match the version's ABI); skip if there is none."""
    real = Path(os.path.realpath(sys.executable))
    env = child_env()
    if all(p.stat().st_mode & 0o001 for p in real.parents) and real.stat().st_mode & 0o001:
        return [sys.executable], env
    system = Path("/usr/bin/python3")
    probe = subprocess.run(
        [str(system), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True, text=True, check=False,
    ) if system.exists() else None  # fmt: skip
    if probe is None or probe.stdout.strip() != str(tuple(sys.version_info[:2])):
        pytest.skip(f"{real} is not executable by other users and no system python3 of the "
                    "same version is")  # fmt: skip
    import sysconfig

    repo = Path(__file__).resolve().parents[2]
    paths = [str(repo), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return [str(system)], env


def _setpriv(user: str) -> list[str]:
    """Run as ``user`` with its groups; setpriv(1) execs in place (signals reach the
    program itself, unlike runuser's session)."""
    gid = pwd.getpwnam(user).pw_gid
    return ["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups", "--"]


def _as(user: str, python: list[str]) -> list[str]:
    return [*_setpriv(user), *python, "-m", "securethread.cli"]


def test_operator_user_cannot_read_the_state_but_runs_operations(users: dict[str, str]) -> None:
    python, env = _python_for_others()
    base = Path(tempfile.mkdtemp(prefix="st-appliance-", dir="/tmp"))
    try:
        shutil.chown(base, users["appliance"])
        os.chmod(base, 0o755)
        state, run = base / "state", base / "run"
        run.mkdir()
        app_uid = pwd.getpwnam(users["appliance"]).pw_uid
        op_uid = pwd.getpwnam(users["operator"]).pw_uid
        shutil.chown(run, users["appliance"], users["group"])
        os.chmod(run, 0o2750)  # setgid: the socket made in it gets the operators' group
        init = subprocess.run(
            [*_as(users["appliance"], python), "appliance", "init", "--state", str(state),
             "--name", "factory-u"], capture_output=True, text=True, env=env, cwd=base,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        assert state.stat().st_uid == app_uid
        sock = run / "appliance.sock"
        s = Serving(state, sock, user=_as(users["appliance"], python),
                    extra=("--operators", users["group"]), env=env)  # fmt: skip
        try:
            st = sock.stat()
            assert stat.S_IMODE(st.st_mode) == 0o660
            import grp

            assert st.st_gid == grp.getgrnam(users["group"]).gr_gid
            # The operator: reading the PIN file or listing the state fails with EACCES ...
            probe = (
                "import errno, os, sys\n"
                "for p in sys.argv[1:]:\n"
                "    try:\n"
                "        (os.listdir if os.path.isdir(p) else open)(p)\n"
                "        print(p, 'READABLE')\n"
                "    except PermissionError as e:\n"
                "        print(p, errno.errorcode[e.errno])\n"
            )
            out = subprocess.run(
                [*_setpriv(users["operator"]), *python, "-c", probe,
                 str(state / "pins"), str(state), str(state / "hsm")],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert [line.split()[-1] for line in out.stdout.splitlines()] == ["EACCES"] * 3
            # ... yet enrol and status through the socket work, the outbox is the operator's
            outbox = base / "op-outbox"
            outbox.mkdir()
            shutil.chown(outbox, users["operator"])
            for args in (("enrol",), ("status",)):
                proc = subprocess.run(
                    [*_as(users["operator"], python), "programmer", *args, "--appliance",
                     str(sock), "--outbox", str(outbox), "--json"],
                    capture_output=True, text=True, env=env, cwd=base,
                )  # fmt: skip
                assert proc.returncode == 0, proc.stderr
            assert (outbox / "enrolment-request.bin").stat().st_uid == op_uid
            # A user outside the operators' group cannot even connect: one line, exit 2.
            proc = subprocess.run(
                [*_as(users["stranger"], python), "programmer", "status", "--appliance",
                 str(sock)], capture_output=True, text=True, env=env, cwd=base,
            )  # fmt: skip
            one_line(proc, EXIT_CONFIG, "appliance socket")
        finally:
            code, err = s.stop()
        assert code == 0, err
        # The appliance logged who asked, as the kernel saw it (SO_PEERCRED).
        log = [json.loads(x) for x in (state / "operations.log").read_text().splitlines()]
        assert [(e["command"], e["uid"], e["ok"]) for e in log] == [
            ("enrol", op_uid, True),
            ("status", op_uid, True),
        ]
        # ... and in its signed transcript once the identity key existed (from enrol on)
        from securethread.formats.onboarding import EnrolmentRequest
        from securethread.formats.transcript import verify_transcript

        request = EnrolmentRequest.open((outbox / "enrolment-request.bin").read_bytes())
        records = verify_transcript(
            state / "transcript.bin", public_key=request.identity_key()
        ).records
        ops = [dict(r.details) for r in records if r.operation == "operator-request"]
        assert [(d["command"], d["uid"]) for d in ops] == [("enrol", op_uid)]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- a production run: SIGTERM drains, SIGKILL then a restart counts nothing twice ---------------

RUN = 300  # devices of the run that is stopped, killed and resumed
QUOTA = 2 * RUN  # room for the slots a SIGKILL burns (at most a batch per worker and a block)


def _call_status(sock: Path) -> dict[str, Any]:
    from securethread.programmer.operator_api import Request, call

    answer = call(str(sock), Request("status"))
    assert answer.ok, answer.error  # an error answer says why (it has no jobs to read)
    return dict(answer.result)


def _job(view: dict[str, Any], job_id: str) -> dict[str, Any]:
    return next(j for j in view["jobs"] if j["job"] == job_id)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo's two sites (its job done), then a second job opened through the appliance
    by an operator: RUN devices of a quota of QUOTA."""
    from securethread.demo import FIRST_UID, OFFICERS, job_spec, officer_pin_file

    root, summary = demo_copy(tmp_path_factory, "appliance-run")  # the session's, copied
    # the demo ran the factory as deployed: the appliance and two station processes
    assert summary["stations"] == 2 and summary["provisioned"] == summary["booted"] == DEVICES
    assert summary["reconciled"] and summary["appliance"]["jobs"][0]["quota_used"] == DEVICES
    job = "kill-job"
    sock = root / "run" / "appliance.sock"
    app = ("--appliance", str(sock), "--outbox", str(root / "operator" / "outbox"))
    serving = Serving(root / "factory", sock)
    try:
        ok("programmer", "request-ca", *app, "--job", job)
        spec = root / "oem" / f"{job}.toml"
        spec.write_text(job_spec(QUOTA, QUOTA, vendor=str(root / "oem" / "inbox" / "root-ca.pem"),
                                 job_id=job, first_uid=FIRST_UID + (1 << 20)))  # fmt: skip
        request = root / "operator" / "outbox" / f"production-ca-request-{job}.bin"
        draft = ok("oem", "issue-job", "--workdir", str(root / "oem"), str(spec),
                   "--ca-request", str(request))  # fmt: skip
        for n in range(1, OFFICERS + 1):
            ok("oem", "approve-job", "--workdir", str(root / "oem"), "--job", job, "--officer",
               str(n), "--pin-file", str(officer_pin_file(root, n)),
               "--job-hash", draft["job_sha256"])  # fmt: skip
        ok("oem", "issue-job", "--workdir", str(root / "oem"), "--job", job)
        ok("programmer", "open-job", *app, str(root / "oem" / "outbox" / f"job-{job}.bin"),
           "--image", str(root / "oem" / "outbox" / "image-fw-sensor-1.enc"))  # fmt: skip
    finally:
        assert serving.stop()[0] == 0
    return {"root": root, "sock": sock, "app": app, "job": job}


def _provision(f: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "programmer", "provision", *f["app"], "--job", f["job"], "--chips-from",
         str(f["root"] / "vendor"), "--devices", str(RUN), "--workers", "1",
         "--batch-size", "4", "--progress", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip


def _wait_provisioned(f: dict[str, Any], at_least: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        n = int(_job(_call_status(f["sock"]), f["job"])["provisioned"])
        if n >= at_least:
            return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run did not get going")


def test_a_run_verifies_the_opened_job_again(factory: dict[str, Any]) -> None:
    """Every run starts from the job package verified once more (OpenedJob.verify): a
    genuine, root-signed device-trust statement of another job put in place of the job's
    own stops the run before anything is counted (exit 4); the status view names the job refused."""
    f = factory
    state = f["root"] / "factory"
    own = state / "jobs" / f["job"] / "device-trust.bin"
    other = state / "jobs" / "demo-job-1" / "device-trust.bin"
    saved = own.read_bytes()
    before = _job(ok("programmer", "status", "--workdir", str(state)), f["job"])
    try:
        own.write_bytes(other.read_bytes())
        proc = cli("programmer", "provision", "--workdir", str(state), "--job", f["job"],
                   "--chips-from", str(f["root"] / "vendor"), "--devices", "2")  # fmt: skip
        one_line(proc, 4, "device-trust statement does not match the job")
        view = _job(ok("programmer", "status", "--workdir", str(state)), f["job"])
        assert view["state"] == "refused" and "device-trust" in view["error"], view
    finally:
        own.write_bytes(saved)
    assert _job(ok("programmer", "status", "--workdir", str(state)), f["job"]) == before


STATION_UIDS = 400  # the stations' chips: offsets 400.. of the job's range (the line: 0..)


def _stations_run(
    f: dict[str, Any], api: str, names: list[str], per: int
) -> list[subprocess.Popen[str]]:
    from securethread.demo import FIRST_UID

    procs = []
    for k, name in enumerate(names):
        d = f["root"] / name
        first = FIRST_UID + (1 << 20) + STATION_UIDS + k * per
        procs.append(subprocess.Popen(
            [*CLI, "station", "run", "--appliance", api, "--cert", str(d / f"station-{name}.pem"),
             "--key", str(d / "key.pem"), "--ca", str(d / "station-ca.pem"), "--job", f["job"],
             "--chips-from", str(f["root"] / "vendor"), "--devices", str(per),
             "--first-device", str(first), "--parallel", "2", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        ))  # fmt: skip
    return procs


def _one_clear_line(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=300)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert proc.returncode != 0 and lines and "Traceback" not in err, (proc.returncode, err)
    return lines[-1]


def test_two_stations_through_the_appliance_stopped_killed_and_resumed(
    factory: dict[str, Any],
) -> None:
    """Two station processes share the job through the appliance's station API; SIGTERM
    drains them (exit 0), SIGKILL kills the appliance under them; each time the stations
    end with one line, and the runs resumed after a restart count every chip exactly once."""
    f, state, per = factory, factory["root"] / "factory", 40
    names = ["st-a", "st-b"]
    base = _job(ok("programmer", "status", "--workdir", str(state)), f["job"])["provisioned"]
    serving = Serving(state, f["sock"], extra=("--stations", "127.0.0.1:0"))
    try:
        for name in names:
            d = f["root"] / name
            d.mkdir()
            ok("station", "keygen", "--name", name, "--key", str(d / "key.pem"),
               "--csr", str(d / "station.csr"))  # fmt: skip
            ok("programmer", "add-station", *f["app"], str(d / "station.csr"), "--name", name)
            for fn in (f"station-{name}.pem", "station-ca.pem"):
                shutil.copyfile(f["root"] / "operator" / "outbox" / fn, d / fn)
    except BaseException:
        serving.stop()
        raise
    for stop in (signal.SIGTERM, signal.SIGKILL):
        assert serving.stations is not None
        start = _job(_call_status(f["sock"]), f["job"])["provisioned"]
        procs = _stations_run(f, serving.stations, names, per)
        deadline = time.monotonic() + 300
        while _job(_call_status(f["sock"]), f["job"])["provisioned"] < start + 4:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        view = _call_status(f["sock"])
        assert view["stations"] is not None  # the status view sees the station server
        code, err = serving.stop(stop)
        assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL), err
        for p in procs:
            if p.poll() is None or p.returncode != 0:
                _one_clear_line(p)  # stopped under it: one line, no traceback
            else:
                p.communicate()
        cut = _job(ok("programmer", "status", "--workdir", str(state)), f["job"])
        assert cut["provisioned"] < base + 2 * per  # the stations were stopped mid-run
        serving = Serving(state, f["sock"], extra=("--stations", "127.0.0.1:0"))
    try:
        assert serving.stations is not None
        procs = _stations_run(f, serving.stations, names, per)
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
        final = _job(_call_status(f["sock"]), f["job"])
    finally:
        assert serving.stop()[0] == 0
    assert final["provisioned"] == base + 2 * per  # every chip once: none lost, none twice
    assert final["quota_used"] <= QUOTA


def test_sigterm_drains_then_sigkill_and_restart_count_nothing_twice(
    factory: dict[str, Any],
) -> None:
    f = factory
    state = f["root"] / "factory"
    base = _job(ok("programmer", "status", "--workdir", str(state)), f["job"])["provisioned"]
    # 1. SIGTERM mid-run: the batch in flight is committed, the operator hears one line
    #    (exit 143: run it again to resume), the appliance exits 0.
    serving = Serving(state, f["sock"])
    client = _provision(f)
    _wait_provisioned(f, base + 8, client)
    code, err = serving.stop(signal.SIGTERM)
    assert code == 0, err
    out, cerr = client.communicate(timeout=120)
    assert client.returncode == 128 + signal.SIGTERM, cerr
    lines = cerr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in cerr, cerr
    drained = ok("programmer", "status", "--workdir", str(state))
    after_term = _job(drained, f["job"])
    assert base + 8 <= after_term["provisioned"] < base + RUN  # stopped mid-run
    # 2. SIGKILL mid-run (the appliance and its worker): the operator hears one line.
    serving = Serving(state, f["sock"])
    client = _provision(f)
    _wait_provisioned(f, after_term["provisioned"] + 8, client)
    serving.proc.kill()
    serving.proc.wait(timeout=60)
    out, cerr = client.communicate(timeout=120)
    one_line(subprocess.CompletedProcess(client.args, client.returncode, out, cerr), EXIT_CONFIG,
             "closed the connection before it answered")  # fmt: skip
    killed = _job(ok("programmer", "status", "--workdir", str(state)), f["job"])
    assert killed["provisioned"] < base + RUN
    # 3. Restart: the run resumes and ends; every device once, none lost.
    assert any((state / "requests").iterdir())  # the killed request's input files ...
    serving = Serving(state, f["sock"])
    assert not (state / "requests").exists()  # ... removed by the next appliance
    try:
        client = _provision(f)
        out, cerr = client.communicate(timeout=600)
        assert client.returncode == 0, cerr
        final = _job(_call_status(f["sock"]), f["job"])
        assert final["provisioned"] == base + RUN
        assert base + RUN <= final["quota_used"] <= QUOTA
        ok("programmer", "close-job", *f["app"], "--job", f["job"])
    finally:
        assert serving.stop()[0] == 0
    # The OEM reconciles the ledger: each device exactly once, all programmed, quota held.
    ledger = f["root"] / "operator" / "outbox" / f"ledger-{f['job']}.bin"
    rec = ok("oem", "reconcile", "--workdir", str(f["root"] / "oem"), str(ledger),
             "--job", f["job"])  # fmt: skip
    assert rec["ok"], rec
    assert rec["provisioned"] == rec["programmed"] == base + RUN, rec
    assert rec["quota_used"] <= QUOTA


def test_the_readme_walkthrough_as_separate_os_users(users: dict[str, str]) -> None:
    """The README's appliance walkthrough with every ``appliance`` command as the appliance's
    user and every other one -- all the programmer steps, the stations, the OEM -- as an
    operator: the operator runs every operation through the socket and never reads the state."""
    from tests.integration.test_readme_appliance import _block

    python, env = _python_for_others()
    base = Path(tempfile.mkdtemp(prefix="st-walk-", dir="/tmp"))
    try:
        # setgid to the operators' group: the appliance's socket made here gets that group
        shutil.chown(base, group=users["group"])
        os.chmod(base, 0o3777)
        wrapper = base / "st"
        appliance = " ".join(_as(users["appliance"], python))
        operator = " ".join(_as(users["operator"], python))
        wrapper.write_text(
            "#!/bin/bash\n"
            'if [ "$1" = appliance ]; then\n'
            f'  if [ "$2" = serve ]; then exec {appliance} "$@" --operators {users["group"]}; fi\n'
            f'  exec {appliance} "$@"\n'
            "fi\n"
            f'exec {operator} "$@"\n'
        )
        wrapper.chmod(0o755)
        proc = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + _block()], cwd=base,
            env=dict(env, S=str(wrapper)), capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "job job-1 (open): quota 20 used of 20, 0 left, 20 provisioned" in proc.stdout
        assert "reconciled: job job-1: 20 provisioned, 20 programmed" in proc.stdout
        state = base / "factory"
        app_uid = pwd.getpwnam(users["appliance"]).pw_uid
        op_uid = pwd.getpwnam(users["operator"]).pw_uid
        assert state.stat().st_uid == app_uid and stat.S_IMODE(state.stat().st_mode) == 0o700
        assert (base / "outbox" / "ledger-job-1.bin").stat().st_uid == op_uid
        log = [json.loads(x) for x in (state / "operations.log").read_text().splitlines()]
        assert {e["uid"] for e in log} == {op_uid}  # every operation came from the operator
        assert {e["command"] for e in log} >= {
            "enrol", "install-certs", "receive-keys", "request-ca", "open-job", "add-station",
            "status", "close-job",
        }  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
