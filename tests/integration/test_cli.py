"""The ``securethread`` console script, run for real in subprocesses.

One demo (``--devices 12``) runs once per module in a temp work directory with its own
SoftHSM tokens; every subcommand is then run on its artefacts: success paths (human and
``--json``) and bad inputs (missing files, files of the wrong kind, tampered artefacts).
Every failure must exit with the code class documented in :mod:`securethread.cli`
(2 configuration, 3 token, 4 verification), print exactly one line on stderr naming the
problem, never a traceback, and change nothing on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_SCRIPT = Path(sys.executable).parent / "securethread"
CLI = str(_SCRIPT) if _SCRIPT.exists() else shutil.which("securethread")
OPENSSL = shutil.which("openssl")
TRANSCRIPT_MAGIC = b"securethread-transcript/1\n"
DEVICES = 12

pytestmark = pytest.mark.skipif(CLI is None, reason="securethread console script not installed")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the conftest's token directory and PINs."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SECURETHREAD_", "SOFTHSM2_CONF"))
    }
    env.update(extra)
    return env


def run(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert CLI is not None
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else clean_env(),
        timeout=timeout,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    out = ok(proc)
    return json.loads(out.strip().splitlines()[-1])


def assert_failure(
    proc: subprocess.CompletedProcess[str], code: int, command: str, *needles: str
) -> str:
    """Exit ``code``, one stderr line ``securethread <command>: ...`` containing ``needles``."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{text}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith(f"securethread {command}: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert proc.stdout == "", proc.stdout
    return line


Snapshot = dict[str, tuple[str, int, int]]


def snapshot(*roots: Path, mtimes: bool = True) -> Snapshot:
    """path -> (sha256, size, mtime_ns) of every file under ``roots``, plus directories.
    ``mtimes=False`` for token directories: SoftHSM rewrites its ``generation`` file (same
    bytes) whenever a token is opened."""
    out: Snapshot = {}
    for root in roots:
        if not root.exists():
            continue
        items = [root, *root.rglob("*")] if root.is_dir() else [root]
        for p in items:
            st = p.stat()
            if p.is_dir():
                out[str(p)] = ("dir", 0, 0)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p)] = (digest, st.st_size, st.st_mtime_ns if mtimes else 0)
    return out


# --- the demo ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demo:
    work: Path
    summary: dict[str, Any]
    stderr: str

    def __truediv__(self, rel: str) -> Path:
        return self.work / rel

    def p(self, rel: str) -> str:
        return str(self.work / rel)


LAYOUT = (
    ".securethread-demo",
    "hsm/softhsm2.conf",
    "hsm/pins.env",
    "oem/root-ca.pem",
    "oem/oem-identity.pem",
    "oem/firmware.bin",
    "oem/image.enc",
    "oem/manifest.bin",
    "oem/job.bin",
    "oem/transcript.bin",
    "programmer/programmer-identity.pem",
    "programmer/license-signing.pem",
    "programmer/ledger-signing.pem",
    "programmer/key-agreement.pem",
    "programmer/production.sqlite",
    "programmer/transcript.bin",
    "job/production-ca.pem",
    "job/ledger.bin",
    "job/reconciliation.json",
    "job/summary.json",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    work = tmp_path_factory.mktemp("cli-demo") / "work"
    proc = run("demo", "--devices", str(DEVICES), "--workdir", str(work), "--json", timeout=300)
    summary = last_json(proc)
    return Demo(work, summary, proc.stderr)


def test_demo_summary(demo: Demo) -> None:
    s = demo.summary
    assert s["devices_requested"] == DEVICES
    assert s["provisioned"] == DEVICES
    assert s["booted"] == DEVICES
    assert s["quota"] == DEVICES
    assert s["workers"] == 1
    assert s["refused_over_quota"] == 3
    assert s["refused_not_targeted"] == 1
    assert s["refused_other"] == {}
    assert s["tampered_rejected"] == 1
    assert s["ledger_verified"] is True
    assert s["reconciled"] is True
    assert s["transcripts_verified"] is True
    assert isinstance(s["devices_per_s"], int | float) and s["devices_per_s"] > 0
    # one "provisioned" and one "programmed" record per device
    assert s["ledger_records"] == 2 * DEVICES
    assert Path(s["workdir"]) == demo.work.resolve()
    # the summary the CLI printed is the one the demo kept on disk
    assert json.loads((demo / "job/summary.json").read_text()) == s
    # with --json, progress goes to stderr and stdout carries only the JSON
    assert "[demo] reconciliation" in demo.stderr
    assert "Traceback" not in demo.stderr


def test_demo_layout(demo: Demo) -> None:
    for rel in LAYOUT:
        assert (demo / rel).is_file(), rel
        assert (demo / rel).stat().st_size > 0, rel
    devices = sorted(p.stem for p in (demo / "job/devices").iterdir())
    assert len(devices) == DEVICES
    assert devices == [f"{0x5EC0_0000_0000_0000 + i:016x}" for i in range(DEVICES)]
    assert json.loads((demo / "job/reconciliation.json").read_text())["reconciled"] is True
    assert (demo / "hsm/pins.env").stat().st_mode & 0o077 == 0


def test_demo_writes_the_officer_bundle(demo: Demo) -> None:
    """``reconcile --officers`` needs the root-signed officer-key bundle."""
    assert (demo / "oem/officers.bin").is_file()


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
@pytest.mark.parametrize("index", [0, DEVICES - 1])
def test_device_certificates_verify_with_openssl(demo: Demo, index: int) -> None:
    assert OPENSSL is not None
    device = demo / f"job/devices/{0x5EC0_0000_0000_0000 + index:016x}.pem"
    chain = [OPENSSL, "verify", "-x509_strict", "-CAfile", demo.p("oem/root-ca.pem")]
    proc = subprocess.run(
        [*chain, "-untrusted", demo.p("job/production-ca.pem"), str(device)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{device}: OK"
    # without the production CA the chain is incomplete: the device is not signed by the root
    proc = subprocess.run(
        [*chain, str(device)], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode != 0
    text = subprocess.run(
        [OPENSSL, "x509", "-noout", "-text", "-in", str(device)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert f"CN = {device.stem}" in text
    assert "CA:FALSE" in text
    assert "prime256v1" in text


def test_demo_with_two_workers_then_restart(tmp_path: Path) -> None:
    work = tmp_path / "work"
    s = last_json(
        run("demo", "--workers", "2", "--devices", str(DEVICES), "--workdir", str(work), "--json")
    )
    assert s["workers"] == 2
    assert s["provisioned"] == DEVICES
    assert s["booted"] == DEVICES
    assert s["refused_over_quota"] == 3
    assert s["refused_not_targeted"] == 1
    assert s["refused_other"] == {}
    assert s["tampered_rejected"] == 1
    assert s["reconciled"] is True
    assert len(list((work / "job/devices").iterdir())) == DEVICES
    v = last_json(
        run(
            "--json",
            "verify-ledger",
            str(work / "job/ledger.bin"),
            "--ledger-cert",
            str(work / "programmer/ledger-signing.pem"),
        )
    )
    assert (v["provisioned"], v["programmed"]) == (DEVICES, DEVICES)

    # A demo directory is restarted from scratch (human output this time).
    out = ok(run("demo", "--devices", "2", "--workdir", str(work)))
    assert "[demo] OEM key ceremony" in out
    assert "provisioned 2/2 devices, 2 booted the encrypted image" in out
    assert "ledger verified and reconciled: True" in out
    assert len(list((work / "job/devices").iterdir())) == 2


# --- success paths on the demo's artefacts --------------------------------------------------


@pytest.fixture
def unchanged(demo: Demo) -> Any:
    """Asserts the test left the demo directory exactly as it found it."""
    before = snapshot(demo.work)
    yield
    assert snapshot(demo.work) == before


def json_args(mode: str, command: Sequence[str]) -> list[str]:
    if mode == "global":
        return ["--json", *command]
    if mode == "sub":
        return [*command, "--json"]
    return list(command)


def test_verify_ledger(demo: Demo, unchanged: None) -> None:
    cmd = ["verify-ledger", demo.p("job/ledger.bin")]
    cmd += ["--ledger-cert", demo.p("programmer/ledger-signing.pem")]
    recon = json.loads((demo / "job/reconciliation.json").read_text())
    out = ok(run(*cmd))
    assert out.startswith(
        f"ledger verified: {2 * DEVICES} records ({DEVICES} provisioned, {DEVICES} programmed), "
        f"{recon['checkpoints']} signed checkpoints"
    )
    for mode in ("global", "sub"):
        got = last_json(run(*json_args(mode, cmd)))
        assert got == {
            "ledger_verified": True,
            "records": 2 * DEVICES,
            "provisioned": DEVICES,
            "programmed": DEVICES,
            "checkpoints": recon["checkpoints"],
        }


def reconcile_args(demo: Demo, **override: str) -> list[str]:
    opts = {
        "ledger": demo.p("job/ledger.bin"),
        "root": demo.p("oem/root-ca.pem"),
        "officers": demo.p("oem/officers.bin"),
        "programmer-cert": demo.p("programmer/programmer-identity.pem"),
        "ledger-cert": demo.p("programmer/ledger-signing.pem"),
        "production-ca": demo.p("job/production-ca.pem"),
    }
    opts.update({k.replace("_", "-"): v for k, v in override.items()})
    args = ["reconcile", opts.pop("ledger")]
    for k, v in opts.items():
        args += [f"--{k}", v]
    return args


def test_reconcile(demo: Demo, unchanged: None) -> None:
    out = ok(run(*reconcile_args(demo)))
    assert out.startswith(f"job demo-job-1: ledger of {2 * DEVICES} records verified")
    assert f"provisioned {DEVICES} of quota {DEVICES}; programmed {DEVICES}" in out
    got = last_json(run("--json", *reconcile_args(demo)))
    # the OEM's offline reconciliation agrees with the one the demo ran in-process
    assert got == json.loads((demo / "job/reconciliation.json").read_text())
    assert got["reconciled"] is True
    assert (got["provisioned"], got["programmed"], got["quota"]) == (DEVICES, DEVICES, DEVICES)


@pytest.mark.parametrize(
    ("enclave", "transcript", "cert", "operations"),
    [
        (
            "oem",
            "oem/transcript.bin",
            "oem/oem-identity.pem",
            {"token-init", "root-ca", "key-transfer", "job-issuance", "reconciliation"},
        ),
        (
            "programmer",
            "programmer/transcript.bin",
            "programmer/programmer-identity.pem",
            {"token-init", "key-import", "production-ca", "production-run-closed"},
        ),
    ],
)
def test_verify_transcript(
    demo: Demo,
    unchanged: None,
    enclave: str,
    transcript: str,
    cert: str,
    operations: set[str],
) -> None:
    cmd = ["verify-transcript", demo.p(transcript), "--cert", demo.p(cert)]
    got = last_json(run(*cmd, "--json"))
    assert got["transcript_verified"] is True
    assert got["enclave"] == enclave
    records = got["records"]
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[0]["operation"] == "token-init"
    assert operations <= {r["operation"] for r in records}
    out = ok(run(*cmd)).splitlines()
    assert out[0] == f"transcript of {enclave!r}: {len(records)} records verified"
    assert len(out) == 1 + len(records)
    assert all(line.startswith(f"  #{i} ") for i, line in enumerate(out[1:]))


def test_inspect_job(demo: Demo, unchanged: None) -> None:
    got = last_json(run("--json", "inspect", demo.p("oem/job.bin")))
    assert got["kind"] == "job"
    body = got["body (unverified)"]
    assert body["job_id"] == "demo-job-1"
    assert body["quota"] == DEVICES
    assert body["image_id"] == "fw-sensor-1"
    assert len(got["signers"]) == 2  # co-signed by both officers
    human = json.loads(ok(run("inspect", demo.p("oem/job.bin"))))
    assert human == got


def test_inspect_manifest(demo: Demo, unchanged: None) -> None:
    got = last_json(run("inspect", demo.p("oem/manifest.bin"), "--json"))
    assert got["kind"] == "manifest"
    body = got["body (unverified)"]
    assert body["image_id"] == "fw-sensor-1"
    assert body["device_class"] == "sensor-v1"
    assert body["plaintext_length"] == (demo / "oem/firmware.bin").stat().st_size
    firmware_sha = hashlib.sha256((demo / "oem/firmware.bin").read_bytes()).hexdigest()
    assert body["plaintext_sha256"] == firmware_sha
    assert len(got["signers"]) == 1


def test_inspect_ledger(demo: Demo, unchanged: None) -> None:
    got = last_json(run("--json", "inspect", demo.p("job/ledger.bin")))
    assert got["kind"] == "ledger"
    records = got["records"]
    assert len(records) == 2 * DEVICES
    assert [r["seq"] for r in records] == list(range(2 * DEVICES))
    devices = {p.stem for p in (demo / "job/devices").iterdir()}
    for kind in ("provisioned", "programmed"):
        assert {r["device_id"] for r in records if r["kind"] == kind} == devices
    assert all("cert" not in r for r in records)
    human = ok(run("inspect", demo.p("job/ledger.bin"))).splitlines()
    assert [json.loads(line) for line in human] == records


# --- bad inputs ---------------------------------------------------------------------------

CONFIG, VERIFY = 2, 4  # exit codes (cli.py); 3 (token error) is not reachable here


def flip_middle(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def transcript_frames(data: bytes) -> list[bytes]:
    assert data.startswith(TRANSCRIPT_MAGIC)
    frames, i = [], len(TRANSCRIPT_MAGIC)
    while i < len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        frames.append(data[i : i + 4 + n])
        i += 4 + n
    assert i == len(data)
    return frames


def rewrite_transcript(src: Path, dst: Path, edit: Callable[[list[bytes]], list[bytes]]) -> Path:
    frames = transcript_frames(src.read_bytes())
    assert len(frames) > 6
    dst.write_bytes(TRANSCRIPT_MAGIC + b"".join(edit(frames)))
    return dst


def alter_record(frames: list[bytes]) -> list[bytes]:
    f = bytearray(frames[5])
    f[len(f) // 2] ^= 0x01
    return [*frames[:5], bytes(f), *frames[6:]]


# Each case: (id, argv builder, exit code, substrings of the one stderr line).
Args = Callable[[Demo, Path], list[str]]


def _vl(ledger: str | Callable[[Demo, Path], Path], cert: str) -> Args:
    def build(d: Demo, tmp: Path) -> list[str]:
        path = str(ledger(d, tmp)) if callable(ledger) else d.p(ledger)
        return ["verify-ledger", path, "--ledger-cert", d.p(cert)]

    return build


def _vt(transcript: str | Callable[[Demo, Path], Path], cert: str) -> Args:
    def build(d: Demo, tmp: Path) -> list[str]:
        path = str(transcript(d, tmp)) if callable(transcript) else d.p(transcript)
        return ["verify-transcript", path, "--cert", d.p(cert)]

    return build


def _rc(**override: str | Callable[[Demo, Path], Path]) -> Args:
    def build(d: Demo, tmp: Path) -> list[str]:
        opts = {k: (str(v(d, tmp)) if callable(v) else d.p(v)) for k, v in override.items()}
        return reconcile_args(d, **opts)

    return build


def _in(target: str | Callable[[Demo, Path], Path]) -> Args:
    def build(d: Demo, tmp: Path) -> list[str]:
        return ["inspect", str(target(d, tmp)) if callable(target) else d.p(target)]

    return build


LEDGER, LCERT = "job/ledger.bin", "programmer/ledger-signing.pem"
OEM_TX, OEM_CERT = "oem/transcript.bin", "oem/oem-identity.pem"


def tampered_ledger(d: Demo, tmp: Path) -> Path:
    return flip_middle(d / LEDGER, tmp / "ledger.bin")


def truncated_ledger(d: Demo, tmp: Path) -> Path:
    return truncate(d / LEDGER, tmp / "ledger.bin")


def tx_edit(edit: Callable[[list[bytes]], list[bytes]]) -> Callable[[Demo, Path], Path]:
    return lambda d, tmp: rewrite_transcript(d / OEM_TX, tmp / "transcript.bin", edit)


def missing(d: Demo, tmp: Path) -> Path:
    return tmp / "does-not-exist.bin"


def garbage_pem(d: Demo, tmp: Path) -> Path:
    p = tmp / "garbage.pem"
    p.write_text("-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n")
    return p


def empty(d: Demo, tmp: Path) -> Path:
    p = tmp / "empty.bin"
    p.write_bytes(b"")
    return p


BAD_INPUTS: list[tuple[str, Args, int, tuple[str, ...]]] = [
    # verify-ledger
    ("vl-missing-ledger", _vl(missing, LCERT), CONFIG, ("cannot read ledger", "does-not-exist")),
    ("vl-ledger-is-dir", _vl("job", LCERT), CONFIG, ("cannot read ledger",)),
    ("vl-missing-cert", _vl(LEDGER, "nope.pem"), CONFIG, ("cannot read ledger certificate",)),
    ("vl-manifest-as-ledger", _vl("oem/manifest.bin", LCERT), VERIFY, ("not a", "ledger")),
    ("vl-wrong-cert", _vl(LEDGER, "programmer/license-signing.pem"), VERIFY, ("not verify",)),
    ("vl-job-as-cert", _vl(LEDGER, "oem/job.bin"), VERIFY, ("certificate",)),
    ("vl-firmware-as-cert", _vl(LEDGER, "oem/firmware.bin"), VERIFY, ("certificate",)),
    ("vl-tampered", _vl(tampered_ledger, LCERT), VERIFY, ("LedgerError", "record")),
    ("vl-truncated", _vl(truncated_ledger, LCERT), VERIFY, ("truncated",)),
    ("vl-empty", _vl(empty, LCERT), VERIFY, ("not a", "ledger")),
    # reconcile
    ("rc-missing-ledger", _rc(ledger=missing), CONFIG, ("cannot read ledger",)),
    ("rc-missing-officers", _rc(officers=missing), CONFIG, ("cannot read officer bundle",)),
    ("rc-missing-root", _rc(root=missing), CONFIG, ("cannot read OEM root certificate",)),
    ("rc-missing-pca", _rc(production_ca=missing), CONFIG, ("production CA",)),
    ("rc-job-as-officers", _rc(officers="oem/job.bin"), VERIFY, ("officer-keys",)),
    ("rc-manifest-as-ledger", _rc(ledger="oem/manifest.bin"), VERIFY, ("not a", "ledger")),
    ("rc-wrong-root", _rc(root=OEM_CERT), VERIFY, ("officer-keys", "signature")),
    ("rc-garbage-root", _rc(root=garbage_pem), VERIFY, ("PEM",)),
    (
        "rc-wrong-programmer",
        _rc(programmer_cert="programmer/license-signing.pem"),
        VERIFY,
        ("another programmer",),
    ),
    (
        "rc-wrong-ledger-cert",
        _rc(ledger_cert="programmer/license-signing.pem"),
        VERIFY,
        ("not verify",),
    ),
    ("rc-root-as-pca", _rc(production_ca="oem/root-ca.pem"), VERIFY, ("certificate",)),
    ("rc-tampered", _rc(ledger=tampered_ledger), VERIFY, ("LedgerError",)),
    # verify-transcript
    ("vt-missing", _vt(missing, OEM_CERT), CONFIG, ("cannot read transcript",)),
    ("vt-missing-cert", _vt(OEM_TX, "nope.pem"), CONFIG, ("cannot read signer certificate",)),
    (
        "vt-wrong-cert",
        _vt(OEM_TX, "programmer/programmer-identity.pem"),
        VERIFY,
        ("record 0", "another key"),
    ),
    ("vt-ledger-as-transcript", _vt(LEDGER, OEM_CERT), VERIFY, ("not a securethread transcript",)),
    ("vt-manifest-as-cert", _vt(OEM_TX, "oem/manifest.bin"), VERIFY, ("certificate",)),
    (
        "vt-record-deleted",
        _vt(tx_edit(lambda f: [*f[:3], *f[4:]]), OEM_CERT),
        VERIFY,
        ("record 3", "deleted"),
    ),
    (
        "vt-records-swapped",
        _vt(tx_edit(lambda f: [*f[:3], f[4], f[3], *f[5:]]), OEM_CERT),
        VERIFY,
        ("record 3",),
    ),
    (
        "vt-record-duplicated",
        _vt(tx_edit(lambda f: [*f[:4], f[3], *f[4:]]), OEM_CERT),
        VERIFY,
        ("record 4",),
    ),
    ("vt-record-altered", _vt(tx_edit(alter_record), OEM_CERT), VERIFY, ("record 5",)),
    (
        "vt-truncated",
        _vt(lambda d, tmp: truncate(d / OEM_TX, tmp / "transcript.bin"), OEM_CERT),
        VERIFY,
        ("TranscriptError",),
    ),
    ("vt-empty", _vt(empty, OEM_CERT), VERIFY, ("TranscriptError",)),
    # inspect
    ("in-missing", _in(missing), CONFIG, ("cannot read artefact",)),
    ("in-directory", _in("job"), CONFIG, ("cannot read artefact",)),
    ("in-firmware", _in("oem/firmware.bin"), VERIFY, ("not a securethread artefact",)),
    ("in-pem", _in("oem/root-ca.pem"), VERIFY, ("not a securethread artefact",)),
    ("in-transcript", _in(OEM_TX), VERIFY, ("not a securethread artefact",)),
    ("in-empty", _in(empty), VERIFY, ("not a securethread artefact",)),
    ("in-truncated-ledger", _in(truncated_ledger), VERIFY, ("truncated",)),
]


@pytest.mark.parametrize("json_mode", ["human", "json"])
@pytest.mark.parametrize(
    ("build", "code", "needles"),
    [pytest.param(b, c, n, id=i) for i, b, c, n in BAD_INPUTS],
)
def test_bad_input(
    demo: Demo,
    tmp_path: Path,
    build: Args,
    code: int,
    needles: tuple[str, ...],
    json_mode: str,
) -> None:
    args = build(demo, tmp_path)
    before = snapshot(demo.work, tmp_path)
    argv = ["--json", *args] if json_mode == "json" else args
    assert_failure(run(*argv), code, args[0], *needles)
    assert snapshot(demo.work, tmp_path) == before


def test_tampered_transcript_tail_is_not_detectable_without_anchor(
    demo: Demo, tmp_path: Path
) -> None:
    """Documented limit (verify_transcript needs an anchor for this; the CLI takes none):
    dropping the last record leaves a valid, shorter transcript.  The count shows it."""
    full = last_json(run("--json", *_vt(OEM_TX, OEM_CERT)(demo, tmp_path)))
    short = last_json(run("--json", *_vt(tx_edit(lambda f: f[:-1]), OEM_CERT)(demo, tmp_path)))
    assert len(short["records"]) == len(full["records"]) - 1


# --- demo and init-tokens refusals --------------------------------------------------------


def test_demo_refuses_a_non_demo_directory(tmp_path: Path) -> None:
    work = tmp_path / "precious"
    work.mkdir()
    (work / "notes.txt").write_text("not a demo\n")
    (work / "sub").mkdir()
    (work / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = snapshot(work)
    line = assert_failure(
        run("demo", "--devices", "2", "--workdir", str(work)),
        CONFIG,
        "demo",
        "not empty and not a securethread demo",
        str(work),
    )
    assert "ConfigurationError" in line
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("option", "needle"), [(("--devices", "0"), "--devices"), (("--workers", "0"), "--workers")]
)
def test_demo_refuses_bad_counts(tmp_path: Path, option: tuple[str, str], needle: str) -> None:
    work = tmp_path / "work"
    argv = ["demo", "--devices", "2", "--workdir", str(work), *option]
    assert_failure(run(*argv), CONFIG, "demo", needle)
    assert not work.exists()


def test_demo_refuses_a_file_as_workdir(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("keep me\n")
    before = snapshot(tmp_path)
    assert_failure(
        run("demo", "--devices", "2", "--workdir", str(target)), CONFIG, "demo", str(target)
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "pins",
    [
        pytest.param({}, id="no-pins"),
        pytest.param({"SECURETHREAD_PIN_OEM": "user-1234"}, id="no-so-pin"),
        pytest.param({"SECURETHREAD_SO_PIN_OEM": "so-1234"}, id="no-user-pin"),
    ],
)
def test_init_tokens_without_pins(tmp_path: Path, pins: dict[str, str]) -> None:
    hsm = tmp_path / "hsm"
    line = assert_failure(
        run("init-tokens", str(hsm), "oem", env=clean_env(**pins)),
        CONFIG,
        "init-tokens",
        "PinMissingError",
        "SECURETHREAD_SO_PIN_OEM",
        "SECURETHREAD_PIN_OEM",
    )
    assert "user-1234" not in line and "so-1234" not in line  # never echo a PIN
    assert not hsm.exists()
    assert list(tmp_path.iterdir()) == []


def test_init_tokens_default_labels_need_every_pin(tmp_path: Path) -> None:
    """Default labels are oem and programmer: PINs for oem alone are not enough, and
    nothing is written before every PIN is known."""
    env = clean_env(SECURETHREAD_SO_PIN_OEM="so-oem-1234", SECURETHREAD_PIN_OEM="user-oem-1234")
    assert_failure(
        run("init-tokens", str(tmp_path / "hsm"), env=env),
        CONFIG,
        "init-tokens",
        "'programmer'",
    )
    assert list(tmp_path.iterdir()) == []


def test_init_tokens_refuses_a_file_as_directory(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("keep me\n")
    before = snapshot(tmp_path)
    env = clean_env(SECURETHREAD_SO_PIN_OEM="so-oem-1234", SECURETHREAD_PIN_OEM="user-oem-1234")
    assert_failure(run("init-tokens", str(target), "oem", env=env), CONFIG, "init-tokens")
    assert snapshot(tmp_path) == before


def test_init_tokens_creates_then_is_idempotent(tmp_path: Path) -> None:
    hsm = tmp_path / "hsm"
    env = clean_env(SECURETHREAD_SO_PIN_OEM="so-oem-1234", SECURETHREAD_PIN_OEM="user-oem-1234")
    out = ok(run("init-tokens", str(hsm), "oem", env=env))
    conf = hsm / "softhsm2.conf"
    assert out.strip() == f"SOFTHSM2_CONF={conf}"
    assert str(hsm / "tokens") in conf.read_text()
    tokens = [p for p in (hsm / "tokens").iterdir() if p.is_dir()]
    assert len(tokens) == 1, tokens
    assert (tokens[0] / "token.object").is_file()
    assert not (hsm / "pins.env").exists()  # PINs from the environment are never written
    before = snapshot(hsm, mtimes=False)

    again = last_json(run("--json", "init-tokens", str(hsm), "oem", env=env))
    assert again == {"softhsm2_conf": str(conf)}
    assert snapshot(hsm, mtimes=False) == before  # same token, not re-initialised


def test_init_tokens_generate_pins(tmp_path: Path) -> None:
    hsm = tmp_path / "hsm"
    ok(run("init-tokens", str(hsm), "alpha", "beta", "--generate-pins"))
    pins = dict(line.split("=", 1) for line in (hsm / "pins.env").read_text().splitlines() if line)
    assert set(pins) == {
        "SECURETHREAD_SO_PIN_ALPHA",
        "SECURETHREAD_PIN_ALPHA",
        "SECURETHREAD_SO_PIN_BETA",
        "SECURETHREAD_PIN_BETA",
    }
    assert (hsm / "pins.env").stat().st_mode & 0o077 == 0
    assert len([p for p in (hsm / "tokens").iterdir() if p.is_dir()]) == 2
    before = snapshot(hsm, mtimes=False)
    ok(run("init-tokens", str(hsm), "alpha", "beta"))  # stored PINs suffice the second time
    assert snapshot(hsm, mtimes=False) == before


# --- usage errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["verify-ledger"], id="missing-args"),
        pytest.param(["no-such-command"], id="unknown-command"),
        pytest.param(["demo", "--devices", "x", "--workdir", "w"], id="bad-int"),
    ],
)
def test_usage_errors_exit_2_without_traceback(argv: list[str]) -> None:
    proc = run(*argv)
    assert proc.returncode == CONFIG
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[-1].startswith("securethread")
    assert "error:" in proc.stderr.splitlines()[-1]


def test_usage_error_prints_one_line() -> None:
    proc = run("verify-ledger")
    assert proc.returncode == CONFIG
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
