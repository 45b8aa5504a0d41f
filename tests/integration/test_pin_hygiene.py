"""PINs stay in the processes that need them (issue 22), through the real command:

* ``programmer provision --workers 2`` with ``SECURETHREAD_PIN_PROGRAMMER`` set (a documented
  source): no live worker carries a PIN variable or the PIN in ``/proc/<pid>/environ`` --
  its PINs come through its start pipe;
* every PIN-holding process (the leader, each worker) has RLIMIT_CORE 0 and is not
  dumpable: a process of the same user without CAP_SYS_PTRACE cannot read its
  ``/proc/<pid>/environ`` (prctl(2) PR_SET_DUMPABLE; ptrace(2) "Ptrace access mode
  checking"), while it can read a dumpable one's;
* a PIN file that group or others may read is refused with one line, exit 2, nothing changed.

The two sites are the production-line world of tests/integration/test_cli_line.py (an
opened job of 600 devices), built again for this module.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from securethread.demo import child_env
from tests.integration.test_cli_line import CLI, _provision, line

__all__ = ["line"]  # the fixture, imported

EXIT_CONFIG = 2
#: Run a command with no capabilities (still the same user): on root, what a process of the
#: user without CAP_SYS_PTRACE would see.  Without root there are none to drop.
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []


def _pin(factory: Path) -> str:
    pins = dict(line.split("=", 1) for line in (factory / "pins").read_text().splitlines())
    return pins["programmer"]


def _workers_of(leader: int) -> list[int]:
    """Live worker processes of ``leader`` (their command line ends with its pid)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if b"_worker_main" in b" ".join(argv) and str(leader).encode() in argv[-3:]:
            if state != "Z":
                out.append(int(entry.name))
    return out


def _core_limit(pid: int) -> str:
    for row in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if row.startswith("Max core file size"):
            return " ".join(row.split()[4:6])
    raise AssertionError(f"no core limit for {pid}")


def _readable_without_caps(pid: int) -> bool:
    """Whether a process of the same user without CAP_SYS_PTRACE can read ``pid``'s
    environment: only if ``pid`` is dumpable."""
    proc = subprocess.run([*NO_CAPS, "cat", f"/proc/{pid}/environ"], capture_output=True)
    if b"No such file" in proc.stderr:
        raise FileNotFoundError(f"process {pid} ended")
    if proc.returncode != 0:
        assert b"Permission denied" in proc.stderr, proc.stderr
    return proc.returncode == 0


def test_workers_carry_no_pin_and_cannot_be_dumped(line: dict[str, Path]) -> None:
    pin = _pin(line["factory"])
    env = dict(
        child_env(),
        SECURETHREAD_PIN_PROGRAMMER=pin,
        SECURETHREAD_SO_PIN_PROGRAMMER="so-pin-not-for-workers",
        SECURETHREAD_PIN_OEM="another-tokens-pin",
    )
    cmd = [*NO_CAPS, *_provision(line, 0, 400, "--workers", "2", "--batch-size", "2",
                                 "--progress", "lines")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    environs: dict[int, bytes] = {}
    hardened: dict[int, str] = {}  # worker -> its core limit, once seen non-dumpable
    try:
        assert proc.stderr is not None
        progress = proc.stderr.readline()  # a batch is through: the workers are at work
        assert progress.startswith("[provision]"), progress + proc.stderr.read()
        leader = (_core_limit(proc.pid), _readable_without_caps(proc.pid))
        deadline = time.monotonic() + 60
        while len(hardened) < 2 and time.monotonic() < deadline and proc.poll() is None:
            for pid in _workers_of(proc.pid):
                try:
                    environs.setdefault(pid, Path(f"/proc/{pid}/environ").read_bytes())
                    # A worker just started (workers are recycled) is dumpable until its
                    # boot hardens it, before it reads the message with the PINs.
                    if pid not in hardened and not _readable_without_caps(pid):
                        hardened[pid] = _core_limit(pid)
                except FileNotFoundError:
                    continue  # it ended between the scan and the read
            time.sleep(0.02)
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert len(hardened) >= 2, f"workers seen {sorted(environs)}, non-dumpable {sorted(hardened)}"
    assert set(hardened) <= set(environs)
    for environ in environs.values():
        names = [v.split(b"=", 1)[0] for v in environ.split(b"\0") if v]
        assert b"SOFTHSM2_CONF" in names  # the environment was read, and it is the run's
        assert not [n for n in names if n.upper().startswith(b"SECURETHREAD_PIN_")], names
        assert not [n for n in names if n.upper().startswith(b"SECURETHREAD_SO_PIN_")], names
        assert pin.encode() not in environ and b"another-tokens-pin" not in environ
    assert set(hardened.values()) == {"0 0"}, hardened  # RLIMIT_CORE soft and hard
    assert leader == ("0 0", False)  # the leader holds the PIN too


def test_a_dumpable_process_is_readable_without_caps() -> None:
    """The check above can fail: a process that never held a PIN is readable."""
    sleeper = subprocess.Popen([*NO_CAPS, "sleep", "30"])
    try:
        time.sleep(0.2)
        assert _readable_without_caps(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def _digests(d: Path) -> dict[str, str]:
    """Every file outside the token directory (SoftHSM may rewrite its token file when a
    session opens)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "hsm" not in p.relative_to(d).parts
    }


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o602])
def test_a_pins_file_others_may_read_or_write_is_refused(line: dict[str, Path], mode: int) -> None:
    pins = line["factory"] / "pins"
    before = _digests(line["factory"])
    os.chmod(pins, mode)
    try:
        # request-ca: its order checks pass, then it opens the token (a new key): refused.
        proc = subprocess.run([*CLI, "programmer", "request-ca", "--workdir",
                               str(line["factory"]), "--job", "j-mode"],
                              capture_output=True, text=True, env=child_env())  # fmt: skip
    finally:
        os.chmod(pins, 0o600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "InsecurePinFileError" in lines[0] and str(pins) in lines[0], lines[0]
    assert f"mode {mode:04o}" in lines[0], lines[0]
    assert _digests(line["factory"]) == before
