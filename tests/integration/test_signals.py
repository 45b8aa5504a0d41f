"""SIGINT and SIGTERM at the instants that went unanswered, through the real command.

1. A waiting command (``receive-keys`` on ``--listen``, ``send-keys`` waiting for the
   programmer): the signal lands after the interpreter's last check and before the blocking
   wait begins.  ``late_signal.c`` (an ``LD_PRELOAD`` shim) widens that instant to half a
   second and logs that the signal hit it; the command must answer at once -- one line,
   128 + the signal -- not when the wait times out (``receive-keys`` used to answer a
   SIGINT there after its 60 s timeout).
2. Start-up: the console script hands Ctrl-C over from its early handler to the CLI's.  The
   signal is sent at every line of that hand-over, from the moment both early handlers are
   in place up to the command's own work (a trace function sends it), and each is one line:
   putting the previous handlers back before the CLI installed its own left an instant in
   which SIGTERM killed the process silently and SIGINT printed a traceback.
3. A command started with SIGINT ignored (a shell's background job) still answers it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from securethread.demo import child_env

CLI = [sys.executable, "-m", "securethread.cli"]
SIGNALS = [signal.SIGINT, signal.SIGTERM]
#: How long the shim holds each wait back (ms): the signal is sent well inside it.
WINDOW_MS = 500
#: The waiting commands' own timeout: the answer must come long before it.
WAIT_S = 30


def _run(*args: str) -> dict[str, Any]:
    proc = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, env=child_env())
    assert proc.returncode == 0, (args, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An OEM with an image and a programmer it certified (enough for both key commands)."""
    tmp = tmp_path_factory.mktemp("signals")
    oem, fac = tmp / "oem", tmp / "factory"
    root_fp = _run("oem", "init", "--workdir", str(oem), "--name", "acme", "--officers", "1",
                   "--threshold", "1", "--officer-pin-file",
                   f"1={tmp / 'officer-1.pin'}")["root_fingerprint"]  # fmt: skip
    _run("programmer", "init", "--workdir", str(fac), "--name", "f-1")
    fp = _run("programmer", "enrol", "--workdir", str(fac))["fingerprint"]
    _run("oem", "certify-programmer", "--workdir", str(oem),
         str(fac / "outbox/enrolment-request.bin"), "--fingerprint", fp)  # fmt: skip
    _run("programmer", "install-certs", "--workdir", str(fac),
         str(oem / "outbox/certificates-f-1.bin"), "--root-fingerprint", root_fp)  # fmt: skip
    (tmp / "fw.bin").write_bytes(os.urandom(4096))
    _run("oem", "master-image", "--workdir", str(oem), str(tmp / "fw.bin"), "--image-id", "fw",
         "--version", "1", "--security-counter", "1", "--device-class", "c")  # fmt: skip
    return {"tmp": tmp, "oem": oem, "factory": fac}


@pytest.fixture(scope="module")
def late_signal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim, compiled for this machine."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (scripts/install.sh installs gcc)"
    out = tmp_path_factory.mktemp("shim") / "late_signal.so"
    src = Path(__file__).with_name("late_signal.c")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"], check=True)
    return out


def _answered(proc: subprocess.Popen[str], sig: int, log: Path) -> None:
    """Send ``sig`` into the shim's window; the command must answer it now, in one line."""
    time.sleep(WINDOW_MS / 5000)  # the command is inside the shim's pause before its wait
    proc.send_signal(sig)
    try:
        _out, err = proc.communicate(timeout=WAIT_S / 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{signal.Signals(sig).name} was not answered while the command waited")
    assert "in the window" in log.read_text(), "the signal missed the instant under test"
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    lines = [x for x in lines if not x.startswith("listening on ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"Interrupted: stopped by {signal.Signals(sig).name}" in lines[0]


def _shim_env(shim: Path, log: Path) -> dict[str, str]:
    return dict(
        child_env(), LD_PRELOAD=str(shim), LATE_SIGNAL_MS=str(WINDOW_MS), LATE_SIGNAL_LOG=str(log)
    )


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_just_before_receive_keys_waits_is_answered_at_once(
    sites: dict[str, Path], late_signal: Path, sig: int, tmp_path: Path
) -> None:
    log = tmp_path / "window.log"
    proc = subprocess.Popen(
        [*CLI, "programmer", "receive-keys", "--workdir", str(sites["factory"]), "--listen",
         "127.0.0.1:0", "--timeout", str(WAIT_S)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_shim_env(late_signal, log),
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("listening on ")
    _answered(proc, sig, log)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_just_before_send_keys_waits_is_answered_at_once(
    sites: dict[str, Path], late_signal: Path, sig: int, tmp_path: Path
) -> None:
    """The OEM sent its hello to a programmer that never answers: it waits for the reply."""
    log = tmp_path / "window.log"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            [*CLI, "oem", "send-keys", "--workdir", str(sites["oem"]), "--to", "f-1", "--image",
             "fw", "--connect", f"127.0.0.1:{port}", "--timeout", str(WAIT_S)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_shim_env(late_signal, log),
        )  # fmt: skip
        listener.settimeout(WAIT_S)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT_S)
            assert conn.recv(5)  # the OEM_HELLO header: next, the OEM waits for the reply
            _answered(proc, sig, log)
    assert not (sites["oem"] / "programmers/f-1/keys-fw.ack").exists()


# --- start-up: the hand-over from the console script's early handler to the CLI's -----------

_AT_EVERY_LINE = """
import os, signal, sys
from securethread import _entry

target, sig = int(sys.argv[1]), int(sys.argv[2])
seen = 0
armed = False  # from the line after both early handlers are in place (before: SIG_DFL)


def traced(frame, event, arg):
    name = frame.f_code.co_filename.replace(os.sep, "/")
    if frame.f_code.co_name == "main" and name.endswith(("securethread/_entry.py",
                                                          "securethread/cli.py")):
        return line
    return None


def _handler_line(path):
    # the hand-over ends where the CLI runs the command: cli.main's "args.handler(args)"
    with open(path) as f:
        return next(n for n, text in enumerate(f, 1) if "args.handler(args)" in text)


def line(frame, event, arg):
    global seen, armed
    armed = armed or all(
        signal.getsignal(s) is _entry._stopped_early for s in (signal.SIGINT, signal.SIGTERM)
    )
    path = frame.f_code.co_filename
    if path.endswith("cli.py") and frame.f_lineno > _handler_line(path):
        return None
    if event == "line" and armed:
        seen += 1
        if seen == target:
            sys.settrace(None)
            os.kill(os.getpid(), sig)
    return line


sys.argv = ["securethread", "audit", "inspect", os.devnull + "-missing"]
sys.settrace(traced)
code = _entry.main()
sys.settrace(None)
if target == 0:  # counting run: how many lines the hand-over has
    print(f"lines={seen}", file=sys.stderr)
sys.exit(code)
"""


def _startup(target: int, sig: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _AT_EVERY_LINE, str(target), str(int(sig))],
        capture_output=True, text=True, env=child_env(), timeout=60,
    )  # fmt: skip


def test_a_signal_at_every_line_of_the_start_up_hand_over_is_one_line() -> None:
    untouched = _startup(0, signal.SIGTERM)  # no signal: count the lines of the hand-over
    assert untouched.returncode == 2 and "lines=" in untouched.stderr, untouched.stderr
    lines = int(untouched.stderr.rsplit("lines=", 1)[1])
    assert lines >= 5
    for target in range(1, lines + 1):
        sig = SIGNALS[target % 2]
        proc = _startup(target, sig)
        assert proc.returncode == 128 + sig, (target, proc.returncode, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in proc.stderr, (target, proc.stderr)
        assert signal.Signals(sig).name in err[0], (target, err)


def test_sigint_is_answered_even_when_the_command_starts_with_it_ignored(
    sites: dict[str, Path],
) -> None:
    """A shell starts a background job with SIGINT ignored, and Python then leaves it ignored:
    the CLI installs its own handler, so the documented exit 130 holds all the same."""
    proc = subprocess.Popen(
        [*CLI, "programmer", "receive-keys", "--workdir", str(sites["factory"]), "--listen",
         "127.0.0.1:0", "--timeout", str(WAIT_S)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("listening on ")
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=WAIT_S / 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("SIGINT was ignored")
    assert proc.returncode == 130 and "stopped by SIGINT" in err, err
