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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .cli_helpers import (
    CLI,
    assert_failure,
    clean_env,
    last_json,
    ok,
    run,
    snapshot,
    verify_ledger,
)

OPENSSL = shutil.which("openssl")
TRANSCRIPT_MAGIC = b"securethread-transcript/1\n"
DEVICES = 12

pytestmark = pytest.mark.skipif(CLI is None, reason="securethread console script not installed")


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
    "oem/firmware-signing.pem",
    "oem/key-transfer-ack.bin",
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
    "vendor/root-ca.pem",
    "vendor/vendor-key.pem",
    "minutes.txt",
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
    assert (demo / "vendor/vendor-key.pem").stat().st_mode & 0o077 == 0


def minutes(work: Path) -> dict[str, list[tuple[str, int, str]]]:
    """The ceremony minutes: enclave -> [(step, record number, anchor hex)] in order."""
    out: dict[str, list[tuple[str, int, str]]] = {}
    for line in (work / "minutes.txt").read_text().splitlines():
        _stamp, step, enclave, _transcript, _record, seq, head = line.split()
        assert seq.startswith("#") and len(head) == 64, line
        out.setdefault(enclave, []).append((step.rstrip(":"), int(seq[1:]), head))
    return out


def test_demo_keeps_minutes_of_every_step(demo: Demo) -> None:
    m = minutes(demo.work)
    assert [step for step, _, _ in m["oem"]] == [
        "oem-init",
        "onboard-programmer",
        "master-image",
        "transfer-keys",
        "issue-job",
        "reconcile",
    ]
    assert [step for step, _, _ in m["programmer"]] == [
        "onboard-programmer",
        "transfer-keys",
        "issue-job",
        "export-ledger",
    ]
    for entries in m.values():
        seqs = [seq for _, seq, _ in entries]
        assert seqs == sorted(set(seqs))


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
    v = verify_ledger(work)
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
    # the head is the anchor the last ceremony step wrote in the minutes
    step, seq, head = minutes(demo.work)[enclave][-1]
    assert (seq, head) == (len(records) - 1, got["head"])
    assert got["anchor_checked"] is False
    out = ok(run(*cmd)).splitlines()
    assert out[0] == f"transcript of {enclave!r}: {len(records)} records verified"
    assert len(out) == 2 + len(records)
    assert all(line.startswith(f"  #{i} ") for i, line in enumerate(out[1:-1]))
    assert out[-1] == f"head: record #{seq} {head} (no anchor given)"
    # every anchor of the minutes is in the chain
    for _step, _seq, anchor in minutes(demo.work)[enclave]:
        got = last_json(run(*cmd, "--anchor", anchor, "--json"))
        assert got["anchor_checked"] is True


def test_inspect_job(demo: Demo, unchanged: None) -> None:
    got = last_json(run("--json", "inspect", demo.p("oem/job.bin")))
    assert got["kind"] == "job"
    body = got["body (unverified)"]
    assert body["job_id"] == "demo-job-1"
    assert body["quota"] == DEVICES
    assert body["image_id"] == "fw-sensor-1"
    assert len(got["signers"]) == 2  # co-signed by both officers
    assert got["verified"] is False
    header, *rest = ok(run("inspect", demo.p("oem/job.bin"))).splitlines()
    assert header.startswith(f"job {demo.p('oem/job.bin')}: UNVERIFIED")
    assert json.loads("\n".join(rest)) == got


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
    assert got["verified"] is False
    assert got["job_id"] == "demo-job-1"
    recon = json.loads((demo / "job/reconciliation.json").read_text())
    assert got["checkpoints"] == recon["checkpoints"]
    header, *human = ok(run("inspect", demo.p("job/ledger.bin"))).splitlines()
    assert "UNVERIFIED" in header and "verify-ledger" in header
    assert [json.loads(line) for line in human] == records


def test_inspect_ledger_record(demo: Demo, unchanged: None, tmp_path: Path) -> None:
    """One record of the export in full (``--record``), or a record on its own."""
    from securethread.formats import ledger

    got = last_json(run("--json", "inspect", demo.p("job/ledger.bin"), "--record", "0"))
    assert got["kind"] == "ledger-record"
    assert got["verified"] is False
    rec = got["record"]
    assert (rec["seq"], rec["kind"], rec["slot"]) == (0, "provisioned", 0)
    assert rec["cert"]["subject"].startswith(f"CN={rec['device_id']}")
    assert rec["cert"]["issuer"]
    # the same record extracted to a file of its own
    with open(demo / "job/ledger.bin", "rb") as src:
        _job, items = ledger.read_export(src)
        raw = next(payload for tag, payload in items if tag == "r")
    (tmp_path / "record.cbor").write_bytes(raw)
    alone = last_json(run("--json", "inspect", str(tmp_path / "record.cbor")))
    assert alone == got
    header = ok(run("inspect", str(tmp_path / "record.cbor"))).splitlines()[0]
    assert header.startswith("ledger-record ") and "UNVERIFIED" in header


def test_inspect_transcript(demo: Demo, unchanged: None) -> None:
    got = last_json(run("--json", "inspect", demo.p(OEM_TX)))
    assert got["kind"] == "transcript"
    assert got["verified"] is False
    assert got["enclave"] == "oem"
    ops = [r["operation"] for r in got["records"]]
    assert ops[0] == "token-init" and ops[-1] == "reconciliation"
    assert got["records"][-1]["hash"] == minutes(demo.work)["oem"][-1][2]
    header = ok(run("inspect", demo.p(OEM_TX))).splitlines()[0]
    assert "UNVERIFIED" in header and "verify-transcript" in header


def test_inspect_key_transfer_ack_and_officer_bundle(demo: Demo, unchanged: None) -> None:
    ack = last_json(run("--json", "inspect", demo.p("oem/key-transfer-ack.bin")))
    assert ack["kind"] == "key-transfer-ack"
    assert [k["label"] for k in ack["body (unverified)"]["keys"]] == ["image-key-1"]
    bundle = last_json(run("--json", "inspect", demo.p("oem/officers.bin")))
    assert bundle["kind"] == "officer-keys"
    assert len(bundle["body (unverified)"]["keys"]) == 2


def test_inspect_license(tmp_path: Path) -> None:
    """A license (made here with software keys: the demo keeps none) in readable form."""
    from tests.unit.test_device import make_world

    world = make_world()
    _signed, _blob, manifest = world.master(os.urandom(1000))
    chip = world.vendor.make_chip()
    path = tmp_path / "license.bin"
    path.write_bytes(world.issuer(manifest).issue(chip.device_id, chip.public_key))
    got = last_json(run("--json", "inspect", str(path)))
    assert got["kind"] == "license"
    assert got["verified"] is False
    assert got["body (unverified)"]["device_id"] == chip.device_id
    assert got["body (unverified)"]["image_id"] == manifest.image_id
    assert "license" in got["certificate"]["subject"].lower() or got["certificate"]["subject"]
    assert len(got["signers"]) == 1
    assert "UNVERIFIED" in ok(run("inspect", str(path))).splitlines()[0]


# --- bad inputs ---------------------------------------------------------------------------

CONFIG, VERIFY = 2, 4  # exit codes (cli.py); 3 (token error): see test_cli_steps.py


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


def truncated_transcript(d: Demo, tmp: Path) -> Path:
    return truncate(d / OEM_TX, tmp / "transcript.bin")


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
    (
        "vt-anchor-not-hex",
        lambda d, tmp: [*_vt(OEM_TX, OEM_CERT)(d, tmp), "--anchor", "xyz"],
        CONFIG,
        ("--anchor must be 64 hex digits",),
    ),
    (
        "vt-anchor-too-short",
        lambda d, tmp: [*_vt(OEM_TX, OEM_CERT)(d, tmp), "--anchor", "ab" * 16],
        CONFIG,
        ("--anchor",),
    ),
    (
        "vt-anchor-of-other-transcript",
        lambda d, tmp: [
            *_vt(OEM_TX, OEM_CERT)(d, tmp),
            "--anchor",
            minutes(d.work)["programmer"][-1][2],
        ],
        VERIFY,
        ("not in the chain",),
    ),
    # reconcile: either the files or --workdir
    (
        "rc-files-and-workdir",
        lambda d, tmp: [*reconcile_args(d), "--workdir", str(d.work)],
        CONFIG,
        ("either --workdir",),
    ),
    ("rc-no-ledger", lambda d, tmp: ["reconcile"], CONFIG, ("missing LEDGER", "--root")),
    (
        "rc-no-root",
        lambda d, tmp: [
            a for a in reconcile_args(d) if a not in ("--root", d.p("oem/root-ca.pem"))
        ],
        CONFIG,
        ("missing --root",),
    ),
    # inspect
    ("in-missing", _in(missing), CONFIG, ("cannot read artefact",)),
    ("in-directory", _in("job"), CONFIG, ("cannot read artefact",)),
    ("in-firmware", _in("oem/firmware.bin"), VERIFY, ("not a securethread artefact",)),
    ("in-pem", _in("oem/root-ca.pem"), VERIFY, ("not a securethread artefact",)),
    ("in-truncated-transcript", _in(truncated_transcript), VERIFY, ("truncated",)),
    (
        "in-record-out-of-range",
        lambda d, tmp: ["inspect", d.p(LEDGER), "--record", "999"],
        CONFIG,
        ("--record 999",),
    ),
    (
        "in-record-of-a-job",
        lambda d, tmp: ["inspect", d.p("oem/job.bin"), "--record", "0"],
        CONFIG,
        ("ledger export only",),
    ),
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


def test_transcript_tail_cut_is_caught_by_the_anchor(demo: Demo, tmp_path: Path) -> None:
    """Records cut cleanly from the end leave a valid, shorter chain: without an anchor it
    verifies (the documented limit), with the anchor the last step wrote down it fails."""
    full = last_json(run("--json", *_vt(OEM_TX, OEM_CERT)(demo, tmp_path)))
    cut = _vt(tx_edit(lambda f: f[:-2]), OEM_CERT)(demo, tmp_path)
    short = last_json(run("--json", *cut))
    assert len(short["records"]) == len(full["records"]) - 2
    anchor = minutes(demo.work)["oem"][-1][2]
    assert anchor == full["head"]
    before = snapshot(demo.work, tmp_path)
    line = assert_failure(
        run(*cut, "--anchor", anchor), VERIFY, "verify-transcript", "TranscriptError", anchor
    )
    assert "not in the chain" in line
    assert snapshot(demo.work, tmp_path) == before
    # an anchor written down before the cut records still verifies the shorter transcript
    earlier = minutes(demo.work)["oem"][-3][2]
    assert last_json(run("--json", *cut, "--anchor", earlier))["anchor_checked"] is True


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
