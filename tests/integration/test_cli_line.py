"""The production line through the real command, the way a factory breaks it: SIGTERM and
SIGINT in the middle of a run, a double-click (two runs of one job), a store deleted, emptied,
restored from an older copy or corrupted.  Every failure is one stderr line with its
documented exit code; nothing is lost (the job still closes and reconciles with every device
counted once and programmed).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securethread.demo import child_env

CLI = [sys.executable, "-m", "securethread.cli"]
QUOTA = 600
EXIT_CONFIG, EXIT_STORE = 2, 6


_env = child_env  # a party's process: no SoftHSM config, no PINs of the test session


def _run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, env=_env())
    if ok:
        assert proc.returncode == 0, (args, proc.stderr)
    return proc


def _json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sites up to an opened job of QUOTA devices (no kills, no demo)."""
    tmp = tmp_path_factory.mktemp("cli-line")
    oem, fac = tmp / "oem", tmp / "factory"
    pins = [tmp / f"officer-{n}" / "pin" for n in (1, 2)]  # each officer's own PIN file
    init = _json(_run("oem", "init", "--workdir", str(oem), "--name", "acme",
                      "--officer-pin-file", f"1={pins[0]}", "--officer-pin-file",
                      f"2={pins[1]}"))  # fmt: skip
    _run("programmer", "init", "--workdir", str(fac), "--name", "f-1")
    fp = _json(_run("programmer", "enrol", "--workdir", str(fac)))["fingerprint"]
    _run("oem", "certify-programmer", "--workdir", str(oem),
         str(fac / "outbox/enrolment-request.bin"), "--fingerprint", fp)  # fmt: skip
    _run("programmer", "install-certs", "--workdir", str(fac),
         str(oem / "outbox/certificates-f-1.bin"), "--root-fingerprint",
         init["root_fingerprint"])  # fmt: skip
    (tmp / "fw.bin").write_bytes(os.urandom(16 << 10))
    _run("oem", "master-image", "--workdir", str(oem), str(tmp / "fw.bin"), "--image-id", "fw",
         "--version", "1", "--security-counter", "1", "--device-class", "c")  # fmt: skip
    package = tmp / "keys.sealed"
    _run("oem", "seal-keys", "--workdir", str(oem), "--to", "f-1", "--image", "fw", "--out",
         str(package))  # fmt: skip
    _run("programmer", "open-keys", "--workdir", str(fac), str(package))
    _run("oem", "confirm-keys", "--workdir", str(oem),
         str(next((fac / "outbox").glob("key-receipt-*.bin"))))  # fmt: skip
    _run("programmer", "request-ca", "--workdir", str(fac), "--job", "j")
    _run("vendor", "init", "--workdir", str(tmp / "vendor"), "--oem-root", str(oem / "root-ca.pem"))
    last = 0x5EC0_0000_0000_0000 + QUOTA - 1
    (tmp / "j.toml").write_text(
        f'job_id = "j"\nprogrammer = "f-1"\nimage = "fw"\nquota = {QUOTA}\n'
        f'vendors = ["{tmp / "vendor" / "root-ca.pem"}"]\n[targets]\n'
        f'ranges = [["5ec0000000000000", "{last:016x}"]]\n[window]\ndays = 1\n'
    )
    _run("oem", "issue-job", "--workdir", str(oem), str(tmp / "j.toml"), "--ca-request",
         str(fac / "outbox/production-ca-request-j.bin"))  # fmt: skip
    for n in (1, 2):  # M-of-N: each officer approves with their own PIN
        _run("oem", "approve-job", "--workdir", str(oem), "--job", "j", "--officer", str(n),
             "--pin-file", str(pins[n - 1]))  # fmt: skip
    _run("oem", "issue-job", "--workdir", str(oem), "--job", "j")
    # Bad input first: a tampered image is refused and the factory's directory is unchanged.
    bad = bytearray((oem / "outbox/image-fw.enc").read_bytes())
    bad[-40] ^= 1
    (tmp / "bad.enc").write_bytes(bytes(bad))
    before = sorted((p.relative_to(fac), p.stat().st_size) for p in fac.rglob("*")
                    if p.is_file() and "/hsm/" not in str(p))  # fmt: skip
    proc = _run("programmer", "open-job", "--workdir", str(fac), str(oem / "outbox/job-j.bin"),
                "--image", str(tmp / "bad.enc"), ok=False)  # fmt: skip
    assert proc.returncode == 4 and "does not match the job's manifest" in _one_line(proc.stderr)
    after = sorted((p.relative_to(fac), p.stat().st_size) for p in fac.rglob("*")
                   if p.is_file() and "/hsm/" not in str(p))  # fmt: skip
    assert after == before
    _run("programmer", "open-job", "--workdir", str(fac), str(oem / "outbox/job-j.bin"),
         "--image", str(oem / "outbox/image-fw.enc"))  # fmt: skip
    again = _run("vendor", "init", "--workdir", str(tmp / "vendor"), "--oem-root",
                 str(oem / "root-ca.pem"), ok=False)  # fmt: skip
    assert again.returncode == EXIT_CONFIG and "already holds a vendor" in again.stderr
    return {"tmp": tmp, "oem": oem, "factory": fac, "vendor": tmp / "vendor"}


def _provision(line: dict[str, Path], first: int, devices: int, *extra: str) -> list[str]:
    return [*CLI, "programmer", "provision", "--workdir", str(line["factory"]), "--job", "j",
            "--vendor", str(line["vendor"]), "--first", str(first), "--devices", str(devices),
            *(extra if "--progress" in extra else ("--progress", "none", *extra))]  # fmt: skip


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_cleanly_and_a_rerun_resumes(
    line: dict[str, Path], sig: int
) -> None:
    first = 0 if sig == signal.SIGTERM else 200
    proc = subprocess.Popen(_provision(line, first, 200, "--progress", "lines"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    assert proc.stderr is not None
    progress = proc.stderr.readline()  # the first batch is through: the run is under way
    assert progress.startswith("[provision]"), progress
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    err_lines = [x for x in err.splitlines() if not x.startswith("[provision]")]
    assert proc.returncode == 128 + sig, err
    assert len(err_lines) == 1 and "Traceback" not in err, err
    assert signal.Signals(sig).name in err_lines[0], err_lines
    # Run again: everything counted is programmed, nothing counted twice, nothing lost.
    again = subprocess.run(_provision(line, first, 200, "--json"), capture_output=True, text=True,
                           env=_env())  # fmt: skip
    assert again.returncode == 0, again.stderr
    result = _json(again)
    assert result["unprogrammed"] == 0
    assert result["provisioned"] + result["recovered"] + result["already_done"] == 200
    assert result["already_done"] > 0  # the stopped run had done some


def test_a_second_run_of_the_job_is_refused_at_once(line: dict[str, Path]) -> None:
    """A double-click: while a run holds the job (its flock on ``<store>.lock``, taken here
    as a run would), another ``provision`` of the job is refused at once, changing nothing."""
    lock = line["factory"] / "jobs" / "j" / "store.sqlite.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # (a run that waited for the lock would hang here: the test holds it)
        proc = subprocess.run(
            _provision(line, 400, 5), capture_output=True, text=True, env=_env(), timeout=120
        )
        assert proc.returncode == EXIT_CONFIG, proc.stderr
        assert "one run per job at a time" in _one_line(proc.stderr)
    finally:
        os.close(fd)
    proc = subprocess.run(_provision(line, 400, 5, "--json"), capture_output=True, text=True,
                          env=_env())  # fmt: skip
    assert proc.returncode == 0 and _json(proc)["provisioned"] == 5, proc.stderr


def test_a_forgotten_store_is_refused_until_restored(line: dict[str, Path]) -> None:
    store = line["factory"] / "jobs" / "j" / "store.sqlite"
    saved = line["tmp"] / "store.saved"
    shutil.copyfile(store, saved)
    for damage in ("deleted", "emptied", "corrupted"):
        if damage == "deleted":
            store.unlink()
        elif damage == "emptied":
            store.write_bytes(b"")
        else:
            store.write_bytes(b"this is not an SQLite database" * 100)
        proc = subprocess.run(_provision(line, 590, 1), capture_output=True, text=True, env=_env())
        assert proc.returncode == EXIT_STORE, (damage, proc.stderr)
        _one_line(proc.stderr)
        shutil.copyfile(saved, store)
    proc = subprocess.run(_provision(line, 590, 1), capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr


def _closes(store: Path) -> int:
    db = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM closes").fetchone()[0])
    finally:
        db.close()


def test_a_damaged_store_page_stops_provision_and_close_job(line: dict[str, Path]) -> None:
    """One 4 KiB page of the store overwritten: provision and close-job exit 6 before
    anything is counted or closed (issue 22: it counted 100 devices into it, then closed
    the job without a ledger)."""
    job = line["factory"] / "jobs" / "j"
    store, saved = job / "store.sqlite", line["tmp"] / "store.before-damage"
    assert not Path(f"{store}-wal").exists()  # the last run closed it
    shutil.copyfile(store, saved)
    db = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'records'").fetchone()[0]
    db.close()
    data = bytearray(store.read_bytes())
    data[(page - 1) * 4096 : page * 4096] = bytes(4096)
    store.write_bytes(bytes(data))
    for cmd in (_provision(line, 500, 50),
                [*CLI, "programmer", "close-job", "--workdir", str(line["factory"]), "--job", "j"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())  # fmt: skip
        assert proc.returncode == EXIT_STORE, proc.stderr
        assert "StoreCorruptError" in _one_line(proc.stderr) and "damaged" in proc.stderr
    assert store.read_bytes() == bytes(data)  # nothing counted, nothing closed
    assert not (job / "ledger.bin").exists() and not list(job.glob("devices/*.tmp"))
    shutil.copyfile(saved, store)


def test_close_job_closes_nothing_when_its_ledger_cannot_be_written(
    line: dict[str, Path],
) -> None:
    """The ledger's rename fails (``ledger.bin`` is a directory): the job stays open."""
    job = line["factory"] / "jobs" / "j"
    (job / "ledger.bin").mkdir()
    try:
        proc = _run("programmer", "close-job", "--workdir", str(line["factory"]), "--job", "j",
                    ok=False)  # fmt: skip
        assert proc.returncode == 1, proc.stderr  # an OS error, one line
        assert "Is a directory" in _one_line(proc.stderr)
        assert _closes(job / "store.sqlite") == 0
        assert not (line["factory"] / "outbox/ledger-j.bin").exists()
    finally:
        (job / "ledger.bin").rmdir()


def test_the_job_closes_and_reconciles_after_all_that(line: dict[str, Path]) -> None:
    _run("programmer", "close-job", "--workdir", str(line["factory"]), "--job", "j")
    rec = _json(_run("oem", "reconcile", "--workdir", str(line["oem"]),
                     str(line["factory"] / "outbox/ledger-j.bin"), "--job", "j"))  # fmt: skip
    assert rec["reconciled"] and rec["provisioned"] == rec["programmed"]
    assert rec["quota_used"] <= QUOTA


def test_a_lost_ledger_is_written_again_byte_for_byte(line: dict[str, Path]) -> None:
    """docs/cli.md: close-job again, on a closed job whose ledger files are gone."""
    fac = line["factory"]
    kept, sent = fac / "jobs/j/ledger.bin", fac / "outbox/ledger-j.bin"
    before = kept.read_bytes()
    assert sent.read_bytes() == before and _closes(fac / "jobs/j/store.sqlite") == 1
    again = _run("programmer", "close-job", "--workdir", str(fac), "--job", "j", ok=False)
    assert again.returncode == EXIT_CONFIG and "already done" in _one_line(again.stderr)
    kept.unlink()
    sent.unlink()
    _run("programmer", "close-job", "--workdir", str(fac), "--job", "j")
    # the ledger the OEM reconciled, to the byte: the close record signed at the close
    assert kept.read_bytes() == before == sent.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_a_waiting_command_is_one_line(line: dict[str, Path], sig: int) -> None:
    """Ctrl-C (or SIGTERM) while receive-keys waits for the OEM: one line, 128 + signal."""
    proc = subprocess.Popen(
        [*CLI, "programmer", "receive-keys", "--workdir", str(line["factory"]), "--listen",
         "127.0.0.1:0", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("listening on ")
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert signal.Signals(sig).name in _one_line(err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_starts_is_one_line(sig: int) -> None:
    """The console script's first act: a signal before the CLI is loaded is one line too."""
    code = (
        "import os, signal, time\n"
        "from securethread import _entry\n"
        f"signal.signal({int(sig)}, _entry._stopped_early)\n"
        f"os.kill(os.getpid(), {int(sig)})\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert proc.returncode == 128 + sig
    assert signal.Signals(sig).name in _one_line(proc.stderr)
