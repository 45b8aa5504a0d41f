"""The ceremony, one ``securethread`` subcommand per step, each in its own process.

A work directory is taken through oem-init, onboard-programmer, master-image,
transfer-keys and issue-job once per module; tests that change it work on copies.  Checked
through the real console script: each step's output (``--json`` parsed), the transcript
anchors it prints and keeps in the minutes, provisioning in batches and with two workers,
resuming after the process is SIGKILLed mid-run (fault injection), closing the run and
reconciling; and every refusal -- a step out of order or twice, a missing, wrong-kind or
tampered file, a wrong PIN, a missing token -- as one stderr line with its exit code, no
traceback, nothing changed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from securethread.formats import ledger

from .cli_helpers import (
    CLI,
    assert_failure,
    clean_env,
    copy_workdir,
    last_json,
    ok,
    run,
    token_dir,
    verify_ledger,
    workdir_state,
)

pytestmark = pytest.mark.skipif(CLI is None, reason="securethread console script not installed")

CONFIG, TOKEN, VERIFY, QUOTA_EXIT, OTHER = 2, 3, 4, 5, 1  # exit codes (cli.py)
QUOTA, TARGETS = 12, 14
BASE = 0x5EC0_0000_0000_0000
STEPS_TO_JOB = ("oem-init", "onboard-programmer", "master-image", "transfer-keys", "issue-job")


def device_ids(first: int, n: int) -> list[str]:
    return [f"{BASE + first + i:016x}" for i in range(n)]


def step(name: str, work: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    """Run a step with ``--json``; return its parsed JSON (it must succeed)."""
    return last_json(run(name, "--workdir", str(work), *extra, "--json", env=env))


def minutes(work: Path) -> list[tuple[str, str, int, str]]:
    """(step, enclave, record number, anchor) per line of ``minutes.txt``."""
    out = []
    for line in (work / "minutes.txt").read_text().splitlines():
        _stamp, name, enclave, _transcript, _record, seq, head = line.split()
        out.append((name.rstrip(":"), enclave, int(seq.lstrip("#")), head))
    return out


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("firmware") / "sensor-fw.bin"
    path.write_bytes(os.urandom(100_000))
    return path


@pytest.fixture(scope="module")
def early(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory after oem-init only (run in human mode)."""
    work = tmp_path_factory.mktemp("early") / "work"
    out = ok(run("oem-init", "--workdir", str(work))).splitlines()
    assert out[0] == f"oem-init: done in {work}"
    seq, head = minutes(work)[-1][2:]
    assert f"  transcript anchor oem record #{seq}: {head}" in out
    return work


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, firmware: Path) -> tuple[Path, dict[str, Any]]:
    """A work directory after every step up to issue-job; the steps' JSON by name."""
    work = tmp_path_factory.mktemp("job") / "work"
    results = {
        "oem-init": step("oem-init", work),
        "onboard-programmer": step("onboard-programmer", work),
        "master-image": step("master-image", work, "--firmware", str(firmware)),
        "transfer-keys": step("transfer-keys", work),
        "issue-job": step("issue-job", work, "--quota", str(QUOTA), "--targets", str(TARGETS)),
    }
    return work, results


@pytest.fixture
def work(job: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A copy of the job's work directory, for a test that changes it."""
    return copy_workdir(job[0], tmp_path / "work")


# --- the steps in order -------------------------------------------------------------------------


def test_steps_up_to_the_job(job: tuple[Path, dict[str, Any]], firmware: Path) -> None:
    work, results = job
    anchored = {
        "oem-init": {"oem"},
        "onboard-programmer": {"oem", "programmer"},
        "master-image": {"oem"},
        "transfer-keys": {"oem", "programmer"},
        "issue-job": {"oem", "programmer"},
    }
    expected_minutes = []
    for name in STEPS_TO_JOB:
        r = results[name]
        assert r["step"] == name
        assert Path(r["workdir"]) == work.resolve()
        for rel in r["written"]:
            assert (work / rel).is_file(), rel
        assert set(r["anchors"]) == anchored[name]
        for enclave in sorted(r["anchors"], key=lambda e: e != "oem"):
            a = r["anchors"][enclave]
            assert len(bytes.fromhex(a["head"])) == 32
            expected_minutes.append((name, enclave, a["seq"], a["head"]))
    assert sorted(minutes(work)) == sorted(expected_minutes)
    # the firmware given is what was mastered
    assert (work / "oem/firmware.bin").read_bytes() == firmware.read_bytes()
    assert results["master-image"]["firmware_bytes"] == firmware.stat().st_size
    manifest = last_json(run("--json", "inspect", str(work / "oem/manifest.bin")))
    body = manifest["body (unverified)"]
    assert body["plaintext_sha256"] == hashlib.sha256(firmware.read_bytes()).hexdigest()
    # the job names the quota, the targets and the manifest
    r = results["issue-job"]
    assert (r["quota"], r["targets"], r["job"]) == (QUOTA, TARGETS, "demo-job-1")
    assert r["job_sha256"] == hashlib.sha256((work / "oem/job.bin").read_bytes()).hexdigest()
    got = last_json(run("--json", "inspect", str(work / "oem/job.bin")))["body (unverified)"]
    assert got["quota"] == QUOTA
    assert results["transfer-keys"]["keys"] == ["image-key-1"]


@pytest.mark.parametrize("enclave", ["oem", "programmer"])
def test_every_anchor_verifies_the_transcript(
    job: tuple[Path, dict[str, Any]], enclave: str
) -> None:
    work, _results = job
    transcript = str(work / enclave / "transcript.bin")
    cert = str(work / enclave / f"{enclave}-identity.pem")
    anchors = [head for _step, e, _seq, head in minutes(work) if e == enclave]
    assert anchors
    full = last_json(run("--json", "verify-transcript", transcript, "--cert", cert))
    assert full["head"] == anchors[-1]
    for head in anchors:
        got = last_json(
            run("--json", "verify-transcript", transcript, "--cert", cert, "--anchor", head)
        )
        assert got["anchor_checked"] is True


# --- provisioning, closing the run, reconciliation ----------------------------------------------


def test_provision_in_batches_then_close_and_reconcile(work: Path) -> None:
    r = step("provision", work, "--devices", "5")
    assert (r["devices"], r["provisioned"], r["booted"], r["already_provisioned"]) == (5, 5, 5, 0)
    assert (r["refused"], r["unprogrammed"], r["quota"], r["quota_used"]) == ({}, [], QUOTA, 5)
    assert r["anchors"] == {}
    assert sorted(p.stem for p in (work / "job/devices").iterdir()) == device_ids(0, 5)

    # The same batch, larger: the first five are reported as already provisioned.
    proc = run("provision", "--workdir", str(work), "--devices", "7", "--progress", "lines")
    out = ok(proc)
    assert "7 devices: 2 provisioned, 2 booted, 5 already provisioned; refused: none" in out
    assert f"quota: 7 of {QUOTA} used" in out
    progress = proc.stderr.splitlines()
    assert progress and all(line.startswith("[provision] ") for line in progress)
    assert progress[-1] == "[provision] 7/7 devices: 2 provisioned, 5 refused, 2 booted"

    # Over the quota: the report on stdout, the reason on stderr, exit 5.
    proc = run("provision", "--workdir", str(work), "--devices", str(TARGETS), "--json")
    assert proc.returncode == QUOTA_EXIT, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    assert (r["provisioned"], r["already_provisioned"], r["quota_used"]) == (5, 7, QUOTA)
    assert r["refused"] == {"QuotaExceededError": TARGETS - QUOTA}
    assert proc.stderr.splitlines() == [
        f"securethread provision: QuotaExceededError: {TARGETS - QUOTA} device(s) refused: "
        f"the job's quota of {QUOTA} devices is used up"
    ]

    # A chip outside the job's targets: refused, exit 4.
    proc = run("provision", "--workdir", str(work), "--first", str(TARGETS), "--devices", "1")
    assert proc.returncode == VERIFY, proc.stderr
    assert "0 provisioned" in proc.stdout
    [line] = proc.stderr.splitlines()
    assert line.startswith("securethread provision: DeviceRefusedError: 1 device(s) refused")
    assert "NotTargetedError" in line

    closed = step("export-ledger", work)
    assert closed["ledger_verified"] is True
    assert (closed["records"], closed["provisioned"], closed["programmed"]) == (24, 12, 12)
    assert set(closed["anchors"]) == {"programmer"}
    v = verify_ledger(work)
    assert (v["provisioned"], v["programmed"]) == (QUOTA, QUOTA)

    rec = step("reconcile", work)
    assert rec["reconciled"] is True
    assert (rec["provisioned"], rec["programmed"], rec["quota"]) == (QUOTA, QUOTA, QUOTA)
    assert set(rec["anchors"]) == {"oem"}
    kept = json.loads((work / "job/reconciliation.json").read_text())
    assert kept == {k: v for k, v in rec.items() if k in kept}
    offline = last_json(
        run(
            "--json",
            "reconcile",
            str(work / "job/ledger.bin"),
            "--root",
            str(work / "oem/root-ca.pem"),
            "--officers",
            str(work / "oem/officers.bin"),
            "--programmer-cert",
            str(work / "programmer/programmer-identity.pem"),
            "--ledger-cert",
            str(work / "programmer/ledger-signing.pem"),
            "--production-ca",
            str(work / "job/production-ca.pem"),
        )
    )
    assert offline == kept

    # The run is closed: nothing more is provisioned, exported or reconciled.
    before = workdir_state(work)
    for argv, needle in (
        (["provision", "--devices", "1"], "production run was closed"),
        (["export-ledger"], "export-ledger was already run"),
        (["reconcile"], "reconcile was already run"),
    ):
        proc = run(*argv, "--workdir", str(work))
        assert_failure(proc, CONFIG, argv[0], "StepOrderError", needle)
    assert workdir_state(work) == before


def test_provision_with_two_workers(work: Path) -> None:
    argv = ["--devices", str(QUOTA), "--workers", "2", "--batch-size", "4", "--progress", "bar"]
    assert CLI is not None
    proc = subprocess.run(  # bytes: text mode would turn the bar's carriage returns into newlines
        [CLI, "provision", "--workdir", str(work), *argv, "--json"],
        capture_output=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.decode().splitlines()[-1])
    assert (r["workers"], r["provisioned"], r["booted"], r["refused"]) == (2, QUOTA, QUOTA, {})
    # one bar, redrawn in place on stderr, fed by both worker processes
    bar = proc.stderr.decode()
    assert bar.startswith("\r") and bar.endswith("\n") and bar.count("\n") == 1, bar
    final = bar.split("\r")[-1].strip()
    assert final.startswith("provision [" + "#" * 30 + "]")
    n = QUOTA
    assert final.endswith(f"{n}/{n} devices: {n} provisioned, 0 refused, {n} booted")
    assert sorted(p.stem for p in (work / "job/devices").iterdir()) == device_ids(0, QUOTA)
    assert step("export-ledger", work)["provisioned"] == QUOTA


def ledger_devices(work: Path) -> dict[str, collections.Counter[str]]:
    """kind -> how many records each device has in the exported ledger."""
    out: dict[str, collections.Counter[str]] = {
        "provisioned": collections.Counter(),
        "programmed": collections.Counter(),
    }
    with open(work / "job/ledger.bin", "rb") as src:
        _job, items = ledger.read_export(src)
        payloads = [payload for tag, payload in items if tag == "r"]
    for i, raw in enumerate(payloads):
        rec = ledger.parse_record(raw, i)
        out[rec.kind][rec.device_id] += 1
    return out


@pytest.mark.parametrize(
    ("fault", "workers"),
    [
        ("after-reserve:2", 1),
        ("mid-release:4", 1),
        ("before-commit:3", 1),
        ("after-commit:1", 2),
    ],
)
def test_provision_resumes_after_a_kill(work: Path, fault: str, workers: int) -> None:
    """SIGKILL part way (fault injection), run again: every device ends provisioned exactly
    once, the quota is never exceeded, the ledger verifies."""
    n = 8
    argv = ["provision", "--workdir", str(work), "--devices", str(n), "--batch-size", "3"]
    argv += ["--workers", str(workers), "--json"]
    killed = run(*argv, env=clean_env(SECURETHREAD_FAULT_INJECT=fault))
    assert "Traceback" not in killed.stderr
    if workers == 1:
        assert killed.returncode == -9, killed.stderr  # the command itself was killed
    else:
        assert_failure(killed, OTHER, "provision", "WorkerDiedError", "run provision again")

    r = last_json(run(*argv))
    assert r["provisioned"] + r["already_provisioned"] == n
    assert r["already_provisioned"] > 0  # the first run got that far
    assert r["refused"] == {}
    assert r["quota_used"] <= QUOTA
    closed = step("export-ledger", work)
    assert closed["ledger_verified"] is True
    counts = ledger_devices(work)
    assert dict(counts["provisioned"]) == {d: 1 for d in device_ids(0, n)}
    assert all(c == 1 for c in counts["programmed"].values())
    never = sorted(set(counts["provisioned"]) - set(counts["programmed"]))
    assert never == r["unprogrammed"]  # killed between provisioning and programming
    assert (closed["provisioned"], closed["programmed"]) == (n, n - len(never))


# --- refusals: out of order, twice -------------------------------------------------------------


ORDER_EARLY = [
    (["transfer-keys"], "transfer-keys needs onboard-programmer first"),
    (["issue-job", "--quota", "3"], "issue-job needs master-image first"),
    (["provision", "--devices", "2"], "provision needs issue-job first"),
    (["export-ledger"], "export-ledger needs issue-job first"),
    (["reconcile"], "reconcile needs export-ledger first"),
    (["oem-init"], "oem-init was already run"),
]
ORDER_JOB = [
    (["oem-init"], "oem-init was already run"),
    (["onboard-programmer"], "onboard-programmer was already run"),
    (["master-image"], "master-image was already run"),
    (["transfer-keys"], "transfer-keys was already run"),
    (["issue-job", "--quota", "3"], "issue-job was already run"),
    (["reconcile"], "reconcile needs export-ledger first"),
]


@pytest.mark.parametrize(
    ("where", "argv", "needle"),
    [pytest.param("early", a, n, id=f"early-{a[0]}") for a, n in ORDER_EARLY]
    + [pytest.param("job", a, n, id=f"job-{a[0]}") for a, n in ORDER_JOB],
)
@pytest.mark.parametrize("json_mode", [False, True], ids=["human", "json"])
def test_step_out_of_order_or_twice(
    early: Path,
    job: tuple[Path, dict[str, Any]],
    where: str,
    argv: list[str],
    needle: str,
    json_mode: bool,
) -> None:
    work = early if where == "early" else job[0]
    before = workdir_state(work)
    extra = ["--json"] if json_mode else []
    proc = run(*argv, "--workdir", str(work), *extra)
    assert_failure(proc, CONFIG, argv[0], "StepOrderError", needle)
    assert workdir_state(work) == before


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_step_in_a_directory_that_is_no_work_directory(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "there"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("keep me\n")
    before = workdir_state(tmp_path)
    proc = run("provision", "--workdir", str(target), "--devices", "1")
    needle = "is not a directory" if kind == "file" else "not a securethread work directory"
    assert_failure(proc, CONFIG, "provision", needle)
    assert workdir_state(tmp_path) == before


def test_oem_init_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a ceremony\n")
    before = workdir_state(tmp_path)
    proc = run("oem-init", "--workdir", str(tmp_path))
    assert_failure(proc, CONFIG, "oem-init", "not empty and not a securethread demo")
    assert workdir_state(tmp_path) == before


# --- refusals: bad files, PINs, tokens ---------------------------------------------------------


def flip(rel: str) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        data = bytearray((work / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (work / rel).write_bytes(bytes(data))

    return edit


def cut(rel: str) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        data = (work / rel).read_bytes()
        (work / rel).write_bytes(data[: len(data) // 2])

    return edit


def remove(rel: str) -> Callable[[Path], None]:
    return lambda work: (work / rel).unlink()


def replace(rel: str, by: str) -> Callable[[Path], None]:
    return lambda work: shutil.copyfile(work / by, work / rel)


def garbage(rel: str) -> Callable[[Path], None]:
    return lambda work: (work / rel).write_text(
        "-----BEGIN X-----\nnot base64 !!\n-----END X-----\n"
    )


def drop_token(label: str) -> Callable[[Path], None]:
    return lambda work: shutil.rmtree(token_dir(work, label))


def nothing(work: Path) -> None:
    return None


PROVISION = ["provision", "--devices", "2"]
# id, edit of the work directory, argv, extra environment, exit code, stderr needles
BAD: list[tuple[str, Callable[[Path], None], list[str], dict[str, str], int, tuple[str, ...]]] = [
    (
        "wrong-programmer-pin",
        nothing,
        PROVISION,
        {"SECURETHREAD_PIN_PROGRAMMER": "wrong-pin-0000"},
        TOKEN,
        ("PinIncorrectError", "'programmer'"),
    ),
    (
        "wrong-programmer-pin-export",
        nothing,
        ["export-ledger"],
        {"SECURETHREAD_PIN_PROGRAMMER": "wrong-pin-0000"},
        TOKEN,
        ("PinIncorrectError",),
    ),
    ("no-pin", remove("hsm/pins.env"), PROVISION, {}, CONFIG, ("PinMissingError", "programmer")),
    (
        "missing-programmer-token",
        drop_token("programmer"),
        PROVISION,
        {},
        CONFIG,
        ("TokenNotFoundError", "'programmer'"),
    ),
    (
        "missing-token-export",
        drop_token("programmer"),
        ["export-ledger"],
        {},
        CONFIG,
        ("TokenNotFoundError",),
    ),
    (
        "no-softhsm-conf",
        remove("hsm/softhsm2.conf"),
        PROVISION,
        {},
        CONFIG,
        ("no SoftHSM configuration",),
    ),
    ("tampered-job", flip("oem/job.bin"), PROVISION, {}, VERIFY, ()),
    (
        "manifest-as-job",
        replace("oem/job.bin", "oem/manifest.bin"),
        PROVISION,
        {},
        VERIFY,
        ("expected a 'job' artefact",),
    ),
    ("tampered-manifest", flip("oem/manifest.bin"), PROVISION, {}, VERIFY, ()),
    (
        "tampered-image",
        flip("oem/image.enc"),
        PROVISION,
        {},
        VERIFY,
        ("ImageError", "does not match its manifest"),
    ),
    (
        "truncated-image",
        cut("oem/image.enc"),
        PROVISION,
        {},
        VERIFY,
        ("does not match its manifest",),
    ),
    (
        "tampered-officer-bundle",
        flip("oem/officers.bin"),
        PROVISION,
        {},
        VERIFY,
        ("officer-keys",),
    ),
    (
        "other-root",
        replace("oem/root-ca.pem", "oem/oem-identity.pem"),
        PROVISION,
        {},
        VERIFY,
        ("officer-keys", "signature"),
    ),
    (
        "missing-root",
        remove("oem/root-ca.pem"),
        PROVISION,
        {},
        CONFIG,
        ("StepOrderError", "needs oem-init first", "oem/root-ca.pem"),
    ),
    (
        "missing-firmware-signing-key",
        remove("oem/firmware-signing.pem"),
        PROVISION,
        {},
        CONFIG,
        ("cannot read firmware-signing key",),
    ),
    (
        "garbage-firmware-signing-key",
        garbage("oem/firmware-signing.pem"),
        PROVISION,
        {},
        VERIFY,
        ("not a PEM public key",),
    ),
    (
        "missing-production-ca",
        remove("job/production-ca.pem"),
        PROVISION,
        {},
        CONFIG,
        ("cannot read production CA certificate",),
    ),
    (
        "job-as-production-ca",
        replace("job/production-ca.pem", "oem/job.bin"),
        PROVISION,
        {},
        VERIFY,
        ("production CA certificate",),
    ),
    (
        "garbage-ledger-cert",
        garbage("programmer/ledger-signing.pem"),
        ["export-ledger"],
        {},
        VERIFY,
        ("ledger-signing certificate", "PEM"),
    ),
    ("zero-devices", nothing, ["provision", "--devices", "0"], {}, CONFIG, ("--devices",)),
    (
        "zero-workers",
        nothing,
        [*PROVISION, "--workers", "0"],
        {},
        CONFIG,
        ("--workers must be at least 1",),
    ),
    (
        "negative-first",
        nothing,
        [*PROVISION, "--first", "-1"],
        {},
        CONFIG,
        ("--first must be at least 0",),
    ),
    (
        "beyond-64-bit-uids",
        nothing,
        [*PROVISION, "--first", str(1 << 64)],
        {},
        CONFIG,
        ("64-bit chip UIDs",),
    ),
    ("zero-quota", nothing, ["issue-job", "--quota", "0"], {}, CONFIG, ("--quota",)),
]


@pytest.mark.parametrize(
    ("edit", "argv", "env", "code", "needles"),
    [pytest.param(e, a, v, c, n, id=i) for i, e, a, v, c, n in BAD],
)
def test_bad_input(
    work: Path,
    edit: Callable[[Path], None],
    argv: list[str],
    env: dict[str, str],
    code: int,
    needles: tuple[str, ...],
) -> None:
    edit(work)
    before = workdir_state(work)
    proc = run(*argv, "--workdir", str(work), env=clean_env(**env))
    line = assert_failure(proc, code, argv[0], *needles)
    assert "wrong-pin-0000" not in line  # never echo a PIN
    assert workdir_state(work) == before
    assert not (work / "vendor").exists()  # the fab was not even set up


@pytest.mark.parametrize(
    ("argv", "env", "code", "needles"),
    [
        pytest.param(
            ["master-image", "--firmware", "/nonexistent/fw.bin"],
            {},
            CONFIG,
            ("cannot read firmware", "/nonexistent/fw.bin"),
            id="missing-firmware",
        ),
        pytest.param(
            ["master-image", "--firmware", "/"],
            {},
            CONFIG,
            ("cannot read firmware",),
            id="firmware-is-a-directory",
        ),
        pytest.param(
            ["master-image", "--firmware", "{empty}"],
            {},
            VERIFY,
            ("ImageSizeError", "zero-length"),
            id="empty-firmware",
        ),
        pytest.param(
            ["onboard-programmer"],
            {"SECURETHREAD_PIN_OEM": "wrong-pin-0000"},
            TOKEN,
            ("PinIncorrectError", "'oem'"),
            id="wrong-oem-pin",
        ),
        pytest.param(
            ["master-image"],
            {"SECURETHREAD_PIN_OEM": "wrong-pin-0000"},
            TOKEN,
            ("PinIncorrectError",),
            id="wrong-oem-pin-mastering",
        ),
    ],
)
def test_bad_input_early(
    early: Path,
    tmp_path: Path,
    argv: list[str],
    env: dict[str, str],
    code: int,
    needles: tuple[str, ...],
) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    argv = [a.replace("{empty}", str(tmp_path / "empty.bin")) for a in argv]
    before = workdir_state(early)
    proc = run(*argv, "--workdir", str(early), env=clean_env(**env))
    assert_failure(proc, code, argv[0], *needles)
    assert workdir_state(early) == before


def test_missing_oem_token(early: Path, tmp_path: Path) -> None:
    work = copy_workdir(early, tmp_path / "work")
    drop_token("oem")(work)
    before = workdir_state(work)
    proc = run("master-image", "--workdir", str(work))
    assert_failure(proc, CONFIG, "master-image", "TokenNotFoundError", "'oem'")
    assert workdir_state(work) == before


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        pytest.param(replace("vendor/root-ca.pem", "oem/root-ca.pem"), "does not match", id="root"),
        pytest.param(garbage("vendor/vendor-key.pem"), "vendor key", id="key"),
    ],
)
def test_provision_refuses_an_altered_vendor(
    work: Path, edit: Callable[[Path], None], needle: str
) -> None:
    """The simulated fab is kept in vendor/ from the first provision on; altered, it is
    refused before anything is provisioned."""
    assert step("provision", work, "--devices", "1")["provisioned"] == 1
    edit(work)
    before = workdir_state(work)
    proc = run("provision", "--workdir", str(work), "--devices", "3")
    assert_failure(proc, VERIFY, "provision", needle)
    assert workdir_state(work) == before


def test_pin_prompt_on_a_terminal(work: Path) -> None:
    """No PIN in the environment or pins.env: asked on the terminal, never echoed; the
    worker processes get it too."""
    pty = pytest.importorskip("pty")
    pins = dict(line.split("=", 1) for line in (work / "hsm/pins.env").read_text().split())
    pin = pins["SECURETHREAD_PIN_PROGRAMMER"]
    (work / "hsm/pins.env").unlink()
    assert CLI is not None
    argv = [CLI, "provision", "--workdir", str(work), "--devices", "3", "--workers", "2"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command on a terminal, without the test's PINs
        try:
            os.execve(CLI, argv, clean_env())
        finally:
            os._exit(127)
    out, answered = b"", False
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        out += chunk
        if not answered and b"PIN for token 'programmer': " in out:
            os.write(fd, pin.encode() + b"\n")
            answered = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert answered
    assert pin not in text
    assert "3 devices: 3 provisioned, 3 booted" in text
