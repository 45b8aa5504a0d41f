"""Two sites for real: the OEM and the programming centre as separate processes, each with
only its own SoftHSM directory, PIN file and work directory, joined by files and one TCP
connection on 127.0.0.1 (``securethread demo`` runs exactly that), then every bad input a
courier, an operator or an attacker on the transport could bring, on both sides: one clear
stderr line, the documented exit code, nothing changed on either side.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from securethread.demo import child_env
from tests.integration.demo_support import DEVICES, demo_copy

CLI = [sys.executable, "-m", "securethread.cli"]
EXIT_CONFIG, EXIT_VERIFY = 2, 4


_env = child_env  # a party's process: no SoftHSM config, no PINs of the test session


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root, summary = demo_copy(tmp_path_factory, "two-sites")  # the session's world, copied
    return {"root": root, "oem": root / "oem", "factory": root / "factory", "summary": summary}


def _state(*dirs: Path) -> dict[str, str]:
    """Every file's digest, and for token directories the object files' names only (SoftHSM
    rewrites a token's own file at each login; an object added or removed is a new name)."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if not p.is_file():
                continue
            rel = str(p.relative_to(d.parent))
            if "/hsm/" in rel:
                if p.suffix == ".object" and p.name != "token.object":
                    out[rel] = "object"
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(sites: dict[str, Any], code: int, *args: str, match: str) -> str:
    """Run a command that must be refused: exit ``code``, one stderr line naming the
    problem (``match``), no traceback, and nothing changed in either party's directory."""
    before = _state(sites["oem"], sites["factory"])
    proc = cli(*args)
    # receive-keys reports where it listens (for port 0) before anything can fail
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("listening on ")]
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match.lower() in lines[0].lower(), lines[0]
    assert _state(sites["oem"], sites["factory"]) == before
    return lines[0]


def _token_labels(conf: Path) -> set[str]:
    code = (
        "import pkcs11, sys\n"
        "from securethread.hsm.module import default_module_path\n"
        "lib = pkcs11.lib(default_module_path())\n"
        "print('\\n'.join(t.label for t in lib.get_tokens()))\n"
    )
    env = dict(_env(), SOFTHSM2_CONF=str(conf))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


# --- the happy path -------------------------------------------------------------------------------


def test_the_chain_completes_across_two_sites(sites: dict[str, Any]) -> None:
    s = sites["summary"]
    assert s["ok"] and s["reconciled"]
    assert s["provisioned"] == s["booted"] == DEVICES
    assert s["quota_used"] == s["quota"] == DEVICES
    assert s["approvals"] == [1, 2]  # both officers, each in a process of their own
    # Only outbox files and the two public CA certificates (the OEM root to the fab, the
    # fab's CA to the OEM, who names it in the job) crossed, each into the other's inbox.
    for line in s["carried"]:
        src, dst = line.split(" -> ")
        assert "/outbox/" in src or src in ("oem/root-ca.pem", "vendor/root-ca.pem")
        assert dst.split("/")[1] == "inbox" and src.split("/")[0] != dst.split("/")[0]
    report = json.loads((sites["oem"] / "jobs" / "demo-job-1" / "reconciliation.json").read_text())
    assert report["reconciled"] and report["programmed"] == DEVICES


def test_each_site_sees_only_its_own_tokens(sites: dict[str, Any]) -> None:
    oem = _token_labels(sites["oem"] / "hsm" / "softhsm2.conf")
    factory = _token_labels(sites["factory"] / "hsm" / "softhsm2.conf")
    assert oem == {"oem", "officer-1", "officer-2"}
    assert factory == {"programmer"}


def _officer_pins(sites: dict[str, Any]) -> dict[str, str]:
    """Each demo officer's PIN, from that officer's own file (DIR/officer-N/pin)."""
    return {
        f"officer-{n}": (sites["root"] / f"officer-{n}" / "pin").read_text().strip()
        for n in (1, 2)
    }


def test_pin_files_hold_only_the_party_user_pins(sites: dict[str, Any]) -> None:
    """Each party's pins file holds its own user PINs, no SO PIN -- and the OEM's holds no
    officer's: officers are people, each with their own PIN file (0600) outside the OEM's
    work directory, whose PIN appears in no file of it."""
    for party, labels in (("oem", {"oem"}), ("factory", {"programmer"})):
        pins = sites[party] / "pins"
        assert stat.S_IMODE(pins.stat().st_mode) == 0o600
        names = {line.split("=")[0] for line in pins.read_text().splitlines()}
        assert names == labels  # user PINs of this party's tokens, no SO PIN
        assert "SO" not in pins.read_text().upper().replace("SO_", "")
    officers = _officer_pins(sites)
    for n in (1, 2):
        assert stat.S_IMODE((sites["root"] / f"officer-{n}" / "pin").stat().st_mode) == 0o600
    for path in (p for p in sites["oem"].rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not any(pin.encode() in data for pin in officers.values()), path


def test_an_officer_token_holds_one_job_signing_key(sites: dict[str, Any]) -> None:
    """M-of-N: each officer's key is in its own token under its own PIN, and the demo's job
    carries one signature by each officer, each given by a process of its own."""
    pins = {**_officer_pins(sites), **dict(
        line.split("=") for line in (sites["oem"] / "pins").read_text().splitlines()
    )}  # fmt: skip
    assert len({pins["officer-1"], pins["officer-2"], pins["oem"]}) == 3
    approvals = sites["oem"] / "jobs" / "demo-job-1" / "approvals"
    assert sorted(p.name for p in approvals.iterdir()) == ["officer-1.bin", "officer-2.bin"]


def test_opening_the_other_party_token_fails(sites: dict[str, Any]) -> None:
    code = "from securethread.hsm import open_token\nopen_token('programmer', pin=lambda _l: 'x')\n"
    env = dict(_env(), SOFTHSM2_CONF=str(sites["oem"] / "hsm" / "softhsm2.conf"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "TokenNotFoundError" in proc.stderr


# --- the demo's own directory ---------------------------------------------------------------------


def test_demo_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    proc = cli("demo", "--devices", "1", "--workdir", str(mine))
    assert proc.returncode == EXIT_CONFIG
    assert "not created by securethread demo" in proc.stderr
    assert (mine / "precious.txt").read_text() == "keep me"


def test_demo_refuses_a_real_party_directory(sites: dict[str, Any]) -> None:
    before = _state(sites["oem"])
    proc = cli("demo", "--devices", "1", "--workdir", str(sites["oem"]))
    assert proc.returncode == EXIT_CONFIG and "refusing to touch it" in proc.stderr
    assert _state(sites["oem"]) == before


# --- bad inputs, OEM side -------------------------------------------------------------------------


def _tampered(path: Path, tmp: Path, at: int = -40) -> Path:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    out = tmp / ("tampered-" + path.name)
    out.write_bytes(bytes(data))
    return out


def _truncated(path: Path, tmp: Path) -> Path:
    out = tmp / ("truncated-" + path.name)
    out.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return out


def test_oem_refuses_a_tampered_enrolment_request(sites: dict[str, Any], tmp_path: Path) -> None:
    req = _tampered(sites["oem"] / "inbox" / "enrolment-request.bin", tmp_path)
    fp = "00" * 32
    refused(sites, EXIT_VERIFY, "oem", "certify-programmer", "--workdir", str(sites["oem"]),
            str(req), "--fingerprint", fp, match="enrolment")  # fmt: skip


def test_oem_refuses_an_enrolment_with_another_fingerprint(sites: dict[str, Any]) -> None:
    req = sites["oem"] / "inbox" / "enrolment-request.bin"
    refused(sites, EXIT_VERIFY, "oem", "certify-programmer", "--workdir", str(sites["oem"]),
            str(req), "--fingerprint", "ab" * 32, match="not the fingerprint")  # fmt: skip


def test_oem_refuses_a_malformed_fingerprint(sites: dict[str, Any]) -> None:
    req = sites["oem"] / "inbox" / "enrolment-request.bin"
    refused(sites, EXIT_CONFIG, "oem", "certify-programmer", "--workdir", str(sites["oem"]),
            str(req), "--fingerprint", "xyz", match="64 hex digits")  # fmt: skip


def test_oem_refuses_certifying_a_programmer_twice(sites: dict[str, Any]) -> None:
    req = sites["oem"] / "inbox" / "enrolment-request.bin"
    fp = sites["summary"]["fingerprint"] if "fingerprint" in sites["summary"] else None
    if fp is None:
        from securethread.formats.onboarding import EnrolmentRequest

        fp = EnrolmentRequest.open(req.read_bytes()).fingerprint.hex()
    refused(sites, EXIT_CONFIG, "oem", "certify-programmer", "--workdir", str(sites["oem"]),
            str(req), "--fingerprint", fp, match="already done")  # fmt: skip


def test_oem_refuses_a_reused_job_id(sites: dict[str, Any]) -> None:
    spec = sites["oem"] / "demo-job-1.toml"
    req = sites["oem"] / "inbox" / "production-ca-request-demo-job-1.bin"
    refused(sites, EXIT_VERIFY, "oem", "issue-job", "--workdir", str(sites["oem"]), str(spec),
            "--ca-request", str(req), match="already used")  # fmt: skip


def test_issue_job_killed_before_the_outbox_is_finished_on_rerun(sites: dict[str, Any]) -> None:
    """A job recorded (jobs/<id>/job.bin) whose package never reached the outbox: running
    the same spec again writes the package from the record, signing nothing again."""
    package = sites["oem"] / "outbox" / "job-demo-job-1.bin"
    original = package.read_bytes()
    package.unlink()
    spec = sites["oem"] / "demo-job-1.toml"
    req = sites["oem"] / "inbox" / "production-ca-request-demo-job-1.bin"
    proc = cli("oem", "issue-job", "--workdir", str(sites["oem"]), str(spec), "--ca-request",
               str(req))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert package.read_bytes() == original


def test_oem_refuses_a_ca_request_of_the_wrong_kind(sites: dict[str, Any], tmp_path: Path) -> None:
    spec = tmp_path / "job2.toml"
    spec.write_text((sites["oem"] / "demo-job-1.toml").read_text().replace("demo-job-1", "job-2"))
    wrong = sites["oem"] / "inbox" / "enrolment-request.bin"
    refused(sites, EXIT_VERIFY, "oem", "issue-job", "--workdir", str(sites["oem"]), str(spec),
            "--ca-request", str(wrong), match="production-ca-request")  # fmt: skip


def test_oem_refuses_a_ca_request_for_another_job(sites: dict[str, Any], tmp_path: Path) -> None:
    spec = tmp_path / "job3.toml"
    spec.write_text((sites["oem"] / "demo-job-1.toml").read_text().replace("demo-job-1", "job-3"))
    req = sites["oem"] / "inbox" / "production-ca-request-demo-job-1.bin"
    refused(sites, EXIT_VERIFY, "oem", "issue-job", "--workdir", str(sites["oem"]), str(spec),
            "--ca-request", str(req), match="for job")  # fmt: skip


def test_oem_refuses_a_bad_job_spec(sites: dict[str, Any], tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('job_id = "j"\nprogrammer = "factory-1"\nimage = "fw"\nquota = 1\nquotta = 2\n')
    req = sites["oem"] / "inbox" / "production-ca-request-demo-job-1.bin"
    refused(sites, EXIT_CONFIG, "oem", "issue-job", "--workdir", str(sites["oem"]), str(spec),
            "--ca-request", str(req), match="unknown key")  # fmt: skip


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_oem_refuses_a_damaged_ledger(sites: dict[str, Any], tmp_path: Path, damage: str) -> None:
    ledger = sites["oem"] / "inbox" / "ledger-demo-job-1.bin"
    bad = (_tampered if damage == "tampered" else _truncated)(ledger, tmp_path)
    # The job was reconciled already: a fresh OEM reconcile of it is refused as done, so the
    # damaged ledger goes through the auditor's reconcile (same checks, from files).
    o, f = sites["oem"], sites["factory"]
    refused(sites, EXIT_VERIFY, "audit", "reconcile", str(bad), "--job",
            str(o / "jobs/demo-job-1/job.bin"), "--root", str(o / "root-ca.pem"),
            "--officers", str(o / "officers.bin"), "--programmer-cert",
            str(o / "programmers/factory-1/identity.pem"), "--ledger-cert",
            str(f / "certs/ledger-signing.pem"), "--production-ca",
            str(o / "jobs/demo-job-1/production-ca.pem"), "--manifest",
            str(o / "images/fw-sensor-1/manifest.bin"), match="ledger")  # fmt: skip


def test_oem_refuses_to_reconcile_twice(sites: dict[str, Any]) -> None:
    ledger = sites["oem"] / "inbox" / "ledger-demo-job-1.bin"
    refused(sites, EXIT_CONFIG, "oem", "reconcile", "--workdir", str(sites["oem"]), str(ledger),
            "--job", "demo-job-1", match="already done")  # fmt: skip


def test_oem_command_on_the_programmer_directory(sites: dict[str, Any]) -> None:
    refused(sites, EXIT_CONFIG, "oem", "master-image", "--workdir", str(sites["factory"]),
            str(sites["oem"] / "firmware.bin"), "--image-id", "x", "--version", "1",
            "--security-counter", "1", "--device-class", "c",
            match="programmer's work directory")  # fmt: skip


def test_oem_send_keys_to_an_unknown_programmer(sites: dict[str, Any]) -> None:
    refused(sites, EXIT_CONFIG, "oem", "send-keys", "--workdir", str(sites["oem"]), "--to",
            "factory-9", "--image", "fw-sensor-1", "--connect", "127.0.0.1:9",
            match="certify-programmer")  # fmt: skip


def test_oem_send_keys_to_nobody_listening(sites: dict[str, Any], tmp_path: Path) -> None:
    """No key moves and nothing is recorded when the programmer is not there."""
    ack = sites["oem"] / "programmers/factory-1/keys-fw-sensor-1.ack"
    saved = tmp_path / "ack"
    shutil.move(ack, saved)  # let send-keys run again
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nobody listens there
        refused(sites, EXIT_VERIFY, "oem", "send-keys", "--workdir", str(sites["oem"]), "--to",
                "factory-1", "--image", "fw-sensor-1", "--connect", f"127.0.0.1:{port}",
                "--timeout", "3", match="127.0.0.1")  # fmt: skip
    finally:
        shutil.move(saved, ack)


# --- bad inputs, factory side ---------------------------------------------------------------------


def test_programmer_refuses_a_bundle_under_another_root(sites: dict[str, Any]) -> None:
    bundle = sites["factory"] / "inbox" / "certificates-factory-1.bin"
    refused(sites, EXIT_CONFIG, "programmer", "install-certs", "--workdir", str(sites["factory"]),
            str(bundle), "--root-fingerprint", "cd" * 32, match="already done")  # fmt: skip


def test_programmer_refuses_a_tampered_job_package(sites: dict[str, Any], tmp_path: Path) -> None:
    pkg = _tampered(sites["factory"] / "inbox" / "job-demo-job-1.bin", tmp_path, at=200)
    image = sites["factory"] / "inbox" / "image-fw-sensor-1.enc"
    refused(sites, EXIT_VERIFY, "programmer", "open-job", "--workdir", str(sites["factory"]),
            str(pkg), "--image", str(image), match="")  # fmt: skip


def test_programmer_refuses_an_artefact_of_the_wrong_kind(sites: dict[str, Any]) -> None:
    wrong = sites["factory"] / "inbox" / "certificates-factory-1.bin"
    image = sites["factory"] / "inbox" / "image-fw-sensor-1.enc"
    refused(sites, EXIT_VERIFY, "programmer", "open-job", "--workdir", str(sites["factory"]),
            str(wrong), "--image", str(image), match="job package")  # fmt: skip


def test_programmer_refuses_opening_a_job_twice(sites: dict[str, Any]) -> None:
    pkg = sites["factory"] / "inbox" / "job-demo-job-1.bin"
    image = sites["factory"] / "inbox" / "image-fw-sensor-1.enc"
    refused(sites, EXIT_VERIFY, "programmer", "open-job", "--workdir", str(sites["factory"]),
            str(pkg), "--image", str(image), match="already open")  # fmt: skip


def test_programmer_refuses_provisioning_a_closed_job(sites: dict[str, Any]) -> None:
    refused(sites, EXIT_VERIFY, "programmer", "provision", "--workdir", str(sites["factory"]),
            "--job", "demo-job-1", "--vendor", str(sites["root"] / "vendor"), "--devices", "1",
            match="closed")  # fmt: skip


def test_artefacts_for_another_programmer_are_refused(sites: dict[str, Any]) -> None:
    """A second programming centre, certified by the same OEM: the first one's certificate
    bundle and job package are refused there, naming why, with nothing changed."""
    root = sites["root"] / "second"
    fac2 = root / "factory-2"
    assert cli("programmer", "init", "--workdir", str(fac2), "--name", "factory-2").returncode == 0
    enrol = cli("programmer", "enrol", "--workdir", str(fac2), "--json")
    fp = json.loads(enrol.stdout.strip().splitlines()[-1])["fingerprint"]
    ok = cli("oem", "certify-programmer", "--workdir", str(sites["oem"]),
             str(fac2 / "outbox/enrolment-request.bin"), "--fingerprint", fp)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    root_fp = sites["summary"].get("root_fingerprint") or _root_fingerprint(sites["oem"])
    both = (sites["oem"], fac2)
    # factory-1's bundle at factory-2
    before = _state(*both)
    proc = cli("programmer", "install-certs", "--workdir", str(fac2),
               str(sites["factory"] / "inbox/certificates-factory-1.bin"), "--root-fingerprint",
               root_fp)  # fmt: skip
    assert proc.returncode == EXIT_VERIFY and "for programmer 'factory-1'" in _line(proc)
    assert _state(*both) == before
    # with its own bundle, then factory-1's job package
    assert cli("programmer", "install-certs", "--workdir", str(fac2),
               str(sites["oem"] / "outbox/certificates-factory-2.bin"), "--root-fingerprint",
               root_fp).returncode == 0  # fmt: skip
    assert cli("programmer", "request-ca", "--workdir", str(fac2), "--job",
               "demo-job-1").returncode == 0  # fmt: skip
    before = _state(*both)
    proc = cli("programmer", "open-job", "--workdir", str(fac2),
               str(sites["factory"] / "inbox/job-demo-job-1.bin"), "--image",
               str(sites["factory"] / "inbox/image-fw-sensor-1.enc"))  # fmt: skip
    assert proc.returncode == EXIT_VERIFY and "another programmer" in _line(proc)
    assert _state(*both) == before


# The ledger re-signed by another programmer the same OEM certified (in its own process:
# that programmer's token and PIN file), then checked under the re-signer's own key.
_RESIGN = """
import sys
from securethread.formats import envelope, ledger
from securethread.formats.job import job_hash
from securethread.workdir import PartyDir

src, dst, factory = sys.argv[1:4]
key = PartyDir.open(factory, "programmer").open_token("programmer").private_key("ledger-signing")
with open(src, "rb") as f:
    job, items = ledger.read_export(f)
    out = []
    for tag, payload in items:
        if tag in (ledger.TAG_CHECKPOINT, ledger.TAG_CLOSE):
            kind, body, _signers = envelope.peek_body(payload)
            payload = envelope.seal(kind, body, [key])
        out.append((tag, payload))
with open(dst, "wb") as f:
    ledger.write_export(f, job, out)
with open(dst, "rb") as f:
    job, items = ledger.read_export(f)
    ledger.verify_ledger(items, job=job_hash(job), ledger_key=key.public_key())
"""


def test_audit_verify_ledger_refuses_a_ledger_re_signed_by_another_programmer(
    sites: dict[str, Any], tmp_path: Path
) -> None:
    """A third programming centre, certified by the same OEM, re-signs factory-1's ledger with
    its own ledger key: the chain and signatures are whole under that key, and the ledger
    certificate is the OEM root's, for ledger signing -- but it is not factory-1's.  The
    auditor names the programmer it expects, and verify-ledger refuses (exit 4, one line)."""
    oem, fac = sites["oem"], sites["factory"]
    fac3 = sites["root"] / "third" / "factory-3"
    assert cli("programmer", "init", "--workdir", str(fac3), "--name", "factory-3").returncode == 0
    enrol = cli("programmer", "enrol", "--workdir", str(fac3), "--json")
    fp = json.loads(enrol.stdout.strip().splitlines()[-1])["fingerprint"]
    assert cli("oem", "certify-programmer", "--workdir", str(oem),
               str(fac3 / "outbox/enrolment-request.bin"), "--fingerprint",
               fp).returncode == 0  # fmt: skip
    root_fp = sites["summary"].get("root_fingerprint") or _root_fingerprint(oem)
    assert cli("programmer", "install-certs", "--workdir", str(fac3),
               str(oem / "outbox/certificates-factory-3.bin"), "--root-fingerprint",
               root_fp).returncode == 0  # fmt: skip
    ledger = oem / "inbox" / "ledger-demo-job-1.bin"
    resigned = tmp_path / "ledger-resigned.bin"
    proc = subprocess.run(
        [sys.executable, "-c", _RESIGN, str(ledger), str(resigned), str(fac3)],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # whole and signed, under factory-3's ledger key
    root, expected = str(oem / "root-ca.pem"), str(oem / "programmers/factory-1/identity.pem")
    # factory-3's ledger certificate offered with it: not the expected programmer's
    refused(sites, EXIT_VERIFY, "audit", "verify-ledger", str(resigned), "--programmer-cert",
            expected, "--ledger-cert", str(fac3 / "certs/ledger-signing.pem"), "--root", root,
            match="the programmer expected is")  # fmt: skip
    # factory-1's ledger certificate offered with it: the signatures are not its own
    refused(sites, EXIT_VERIFY, "audit", "verify-ledger", str(resigned), "--programmer-cert",
            expected, "--ledger-cert", str(fac / "certs/ledger-signing.pem"), "--root", root,
            match="does not verify")  # fmt: skip
    # expecting factory-3 instead: the job it carries names factory-1
    refused(sites, EXIT_VERIFY, "audit", "verify-ledger", str(resigned), "--programmer-cert",
            str(oem / "programmers/factory-3/identity.pem"), "--ledger-cert",
            str(fac3 / "certs/ledger-signing.pem"), "--root", root,
            match="names another programmer")  # fmt: skip
    # and factory-1's own ledger, with the expectation, verifies
    ok = cli("audit", "verify-ledger", str(ledger), "--programmer-cert", expected, "--ledger-cert",
             str(fac / "certs/ledger-signing.pem"), "--root", root, "--json")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["programmer"] == "factory-1" and summary["job_id"] == "demo-job-1"


def test_audit_verify_ledger_needs_the_expected_programmer(sites: dict[str, Any]) -> None:
    ledger = sites["oem"] / "inbox" / "ledger-demo-job-1.bin"
    refused(sites, EXIT_CONFIG, "audit", "verify-ledger", str(ledger), "--ledger-cert",
            str(sites["factory"] / "certs/ledger-signing.pem"), "--root",
            str(sites["oem"] / "root-ca.pem"), match="--programmer-cert")  # fmt: skip


def _line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _root_fingerprint(oem: Path) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((oem / "root-ca.pem").read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def test_programmer_command_on_the_oem_directory(sites: dict[str, Any]) -> None:
    refused(sites, EXIT_CONFIG, "programmer", "request-ca", "--workdir", str(sites["oem"]),
            "--job", "j", match="oem's work directory")  # fmt: skip


def test_programmer_receive_keys_times_out(sites: dict[str, Any]) -> None:
    refused(sites, EXIT_VERIFY, "programmer", "receive-keys", "--workdir", str(sites["factory"]),
            "--listen", "127.0.0.1:0", "--timeout", "1", match="no OEM connected")  # fmt: skip


def test_programmer_refuses_a_peer_that_sends_garbage(sites: dict[str, Any]) -> None:
    """A peer on the port that is not the OEM: one clear line, no key stored."""
    before = _state(sites["oem"], sites["factory"])
    proc = subprocess.Popen(
        [*CLI, "programmer", "receive-keys", "--workdir", str(sites["factory"]), "--listen",
         "127.0.0.1:0", "--timeout", "10"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()
    port = int(line.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"\xff\xff\xff\xff\x01" + b"x" * 64)  # a 4 GiB frame announced
        time.sleep(0.5)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_VERIFY, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _state(sites["oem"], sites["factory"]) == before


def test_steps_out_of_order_on_a_fresh_programmer(tmp_path: Path) -> None:
    work = tmp_path / "fac"
    assert cli("programmer", "init", "--workdir", str(work), "--name", "f2").returncode == 0
    before = _state(work)
    proc = cli("programmer", "request-ca", "--workdir", str(work), "--job", "j")
    assert proc.returncode == EXIT_CONFIG and "needs install-certs first" in proc.stderr
    assert _state(work) == before
    proc = cli("programmer", "init", "--workdir", str(work), "--name", "f2")
    assert proc.returncode == EXIT_CONFIG and "init was run" in proc.stderr


def test_json_errors_are_json(sites: dict[str, Any]) -> None:
    proc = cli("programmer", "request-ca", "--workdir", str(sites["oem"]), "--job", "j", "--json")
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["ok"] is False and err["error"]["exit_code"] == EXIT_CONFIG
    assert err["error"]["type"] == "WrongWorkdirError"


def test_usage_errors_are_one_line(sites: dict[str, Any]) -> None:
    proc = cli("oem", "issue-job", "--workdir", str(sites["oem"]))
    assert proc.returncode == EXIT_CONFIG
    assert len(proc.stderr.strip().splitlines()) == 1 and "usage error" in proc.stderr


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("securethread ")


def test_every_option_has_help() -> None:
    from securethread.cli import build_parser

    def walk(parser: Any) -> None:
        for action in parser._actions:
            if action.dest not in ("help", "version") and action.option_strings:
                assert action.help, f"{parser.prog} {action.option_strings} has no help"
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):
                for sub in choices.values():
                    walk(sub)

    walk(build_parser())


# --- the README's library example runs as written ----------------------------------------------


def test_readme_python_example_runs(sites: dict[str, Any], tmp_path: Path) -> None:
    """Every ```python block of the README, run as written against a demo directory."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    assert blocks, "the README has no Python example"
    (tmp_path / "demo-work").symlink_to(sites["root"])
    for i, code in enumerate(blocks):
        script = tmp_path / f"readme_{i}.py"
        script.write_text(code)
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=_env(), cwd=tmp_path
        )
        assert proc.returncode == 0, f"README block {i}:\n{proc.stderr}"
        assert "devices provisioned" in proc.stdout or i > 0


# --- the demo's tokens and certificates, audited with tools nobody here wrote ---------------------


def test_demo_tokens_pass_the_key_attribute_audit(sites: dict[str, Any]) -> None:
    """Every key object of both parties' tokens, listed by pkcs11-tool, matches docs/keys.md."""
    from tests.integration.key_audit import audit_token

    for conf_dir in (sites["oem"], sites["factory"]):
        pins = dict(line.split("=") for line in (conf_dir / "pins").read_text().splitlines())
        if conf_dir == sites["oem"]:
            pins.update(_officer_pins(sites))  # the officers' tokens, with their own PINs
        for label, pin in pins.items():
            audit_token(conf_dir / "hsm", label, pin).check()


def _devices(sites: dict[str, Any]) -> list[Path]:
    certs = sorted((sites["factory"] / "jobs" / "demo-job-1" / "devices").glob("*.pem"))
    assert len(certs) == DEVICES
    return certs


def _openssl_verify(
    sites: dict[str, Any], *extra: str, certs: list[Path]
) -> subprocess.CompletedProcess[str]:
    o = sites["oem"]
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile",
         str(o / "root-ca.pem"), "-untrusted", str(o / "jobs/demo-job-1/production-ca.pem"),
         *extra, *map(str, certs)],
        capture_output=True, text=True,
    )  # fmt: skip


def test_every_demo_device_certificate_is_a_tls_client_for_life(sites: dict[str, Any]) -> None:
    certs = _devices(sites)
    now = _openssl_verify(sites, certs=certs)
    assert now.returncode == 0 and now.stdout.count(": OK") == DEVICES, now.stdout + now.stderr
    later = str(int(time.time()) + 20 * 365 * 86400)
    years = _openssl_verify(sites, "-attime", later, certs=certs)
    assert years.returncode == 0 and years.stdout.count(": OK") == DEVICES, years.stderr


def test_a_demo_device_connects_to_mosquitto_with_its_identity(
    sites: dict[str, Any], tmp_path: Path
) -> None:
    """A device provisioned by the demo's line, with its key and certificate (+ production
    CA), publishes to mosquitto (Debian) requiring a client certificate; the broker takes the
    device id (the certificate's CN) as the user name."""
    from securethread.demo.line import SimulatedFab
    from tests.integration.test_field_tls import (
        _free_port,
        _need,
        _server_identity,
        _stop,
        _wait_for,
    )

    cert = _devices(sites)[0]
    device_id = cert.stem
    chip = SimulatedFab(sites["root"] / "vendor").chip(int(device_id, 16))
    key = serialization.load_der_private_key(chip.private_key_der, None)
    (tmp_path / "dev.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )  # fmt: skip
    pca = sites["oem"] / "jobs" / "demo-job-1" / "production-ca.pem"
    (tmp_path / "chain.pem").write_bytes(cert.read_bytes() + pca.read_bytes())
    _server_identity(tmp_path)
    port, log = _free_port(), tmp_path / "mosquitto.log"
    conf = [
        "per_listener_settings false", "allow_anonymous false", f"listener {port} 127.0.0.1",
        f"cafile {sites['oem'] / 'root-ca.pem'}", f"certfile {tmp_path / 'server.pem'}",
        f"keyfile {tmp_path / 'server.key'}", "require_certificate true",
        "use_identity_as_username true", "persistence false", f"log_dest file {log}",
        "log_type all", *(["user root"] if os.geteuid() == 0 else []),
    ]  # fmt: skip
    (tmp_path / "m.conf").write_text("\n".join(conf) + "\n")
    broker = subprocess.Popen([_need("mosquitto"), "-c", str(tmp_path / "m.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(log, " running", broker)
        pub = subprocess.run(
            [_need("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "--cafile",
             str(tmp_path / "server.pem"), "--cert", str(tmp_path / "chain.pem"), "--key",
             str(tmp_path / "dev.key"), "-V", "mqttv5", "-d", "-q", "1",
             "-t", f"devices/{device_id}/hello", "-m", "booted"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        _stop(broker)
    assert pub.returncode == 0, pub.stdout + pub.stderr
    assert "received CONNACK (0)" in pub.stdout, pub.stdout
    assert f"u'{device_id}'" in log.read_text(), log.read_text()


def test_revocation_by_the_programmer_and_by_the_oem(sites: dict[str, Any], tmp_path: Path) -> None:
    """Runs last: it adds CRLs to both directories."""
    first, second = _devices(sites)[:2]
    # The job's first, empty CRL from open-job: every device passes with CRL checking on.
    empty = sites["factory"] / "outbox" / "crl-demo-job-1.pem"
    ok = _openssl_verify(sites, "-crl_check", "-CRLfile", str(empty), certs=[first, second])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    crl = tmp_path / "devices.crl.pem"
    proc = cli("programmer", "revoke", "--workdir", str(sites["factory"]), "--job", "demo-job-1",
               "--device", str(first), "--reason", "keyCompromise", "--out", str(crl))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    revoked = _openssl_verify(sites, "-crl_check", "-CRLfile", str(crl), certs=[first])
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr
    assert (
        _openssl_verify(sites, "-crl_check", "-CRLfile", str(crl), certs=[second]).returncode == 0
    )
    # The OEM revokes the job's production CA: with the whole chain checked, no device passes.
    root_crl = tmp_path / "root.crl.pem"
    proc = cli("oem", "revoke", "--workdir", str(sites["oem"]), "--job", "demo-job-1",
               "--reason", "cACompromise", "--out", str(root_crl))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    both = _openssl_verify(sites, "-crl_check_all", "-CRLfile", str(crl), "-CRLfile",
                           str(root_crl), certs=[second])  # fmt: skip
    assert both.returncode != 0 and "revoked" in both.stdout + both.stderr
    # A bad reason is one line, nothing written.
    before = _state(sites["oem"], sites["factory"])
    proc = cli("oem", "revoke", "--workdir", str(sites["oem"]), "--job", "demo-job-1",
               "--reason", "because", "--out", str(tmp_path / "x.pem"))  # fmt: skip
    assert proc.returncode == EXIT_CONFIG and len(proc.stderr.strip().splitlines()) == 1
    assert _state(sites["oem"], sites["factory"]) == before and not (tmp_path / "x.pem").exists()
