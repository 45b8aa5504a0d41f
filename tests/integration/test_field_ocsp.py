"""The field refuses what the ledger does not know (issue 19): a two-site demo world, its
ledger in the OEM's registry, the OEM's OCSP responder (``oem ocsp``, signing in the OEM
token), and nginx as the relying party.

``securethread demo`` has the OEM install the responder certificate the production CA issued
at open-job (``oem install-responder``) and ingest the reconciled ledger (``oem registry
ingest``, once: a second run changes nothing).  One device is revoked in the
registry; one certificate is minted off the ledger with the production-CA key in the
programmer's token and its PIN (``mint_child``), as the threat model's PIN holder could.

* ``openssl ocsp`` against ``oem ocsp``: good / revoked / revoked (non-issued, 1970,
  certificateHold) for the three, the response verified under the OEM root;
* nginx (Debian's, started here as an unprivileged master with its pid, logs and temp files
  in a temp directory): ``ssl_verify_client on``, ``ssl_client_certificate`` = root +
  production CA, ``ssl_ocsp on``, ``ssl_ocsp_responder`` = the OEM's responder: the ledgered
  device gets in (HTTP 200), the revoked one and the minted one are refused (400, "certificate
  status revoked" in nginx's log) -- all three chain to the OEM root, only OCSP tells them
  apart;
* ``oem registry check``: exit 0 "known" for the device, exit 4 "unknown"/off-ledger for the
  minted one, exit 4 "duplicate" for a second certificate minted with a ledgered serial (a
  restored store), after which OCSP refuses that serial too;
* bad input: a ledger that was not reconciled, a tampered one, a responder certificate for
  another key -- one stderr line, the documented exit code, nothing changed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.demo import FIRST_UID, JOB_ID, child_env
from securethread.demo.line import SimulatedFab
from securethread.formats import ledger
from tests.integration.demo_support import DEVICES, demo_copy

CLI = [sys.executable, "-m", "securethread.cli"]
ROOT = Path(__file__).resolve().parents[2]
PEM = serialization.Encoding.PEM
EXIT_CONFIG, EXIT_VERIFY = 2, 4
#: What nginx logs when OCSP answers "revoked" for the client certificate.
REFUSED = "client SSL certificate verify error: certificate revoked"


def _need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").is_file()
                                    else None)  # fmt: skip
    if path is None:
        msg = f"{binary} is not installed (bash scripts/install.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=child_env(), timeout=timeout
    )


def ok(*args: str) -> dict[str, Any]:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.oem = root / "oem"
        self.factory = root / "factory"
        self.files = root / "field"
        self.files.mkdir()
        self.ledger = next((self.oem / "inbox").glob(f"ledger-{JOB_ID}*.bin"))
        self.ocsp_url = ""
        self.devices: list[tuple[Path, Path]] = []  # (cert, key) per device, device-id order
        fab = SimulatedFab(root / "vendor")
        with open(self.ledger, "rb") as src:
            _job, items = ledger.read_export(src)
            for tag, raw in items:
                if tag != "r":
                    continue
                rec = ledger.parse_record(raw, 0)
                if rec.kind != ledger.KIND_PROVISIONED:
                    continue
                cert = x509.load_der_x509_certificate(rec.body["cert"])
                chip = fab.chip(int(rec.device_id, 16))
                key = serialization.load_der_private_key(chip.private_key_der, None)
                # Named by the chip's index, not its slot: stations take slots in the order
                # their devices arrive, so slot 0 need not be the first chip.
                index = int(rec.device_id, 16) - FIRST_UID
                c = self.files / f"device-{index}.pem"
                k = self.files / f"device-{index}.key"
                c.write_bytes(cert.public_bytes(PEM))
                k.write_bytes(
                    key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
                )  # fmt: skip
                self.devices.append((c, k))
        self.devices.sort(key=lambda ck: int(ck[0].stem.split("-")[1]))
        self.pca = self.oem / "jobs" / JOB_ID / "production-ca.pem"
        self.root_ca = self.oem / "root-ca.pem"
        self.chain = self.files / "client-ca.pem"
        self.chain.write_bytes(self.root_ca.read_bytes() + self.pca.read_bytes())

    def mint(self, name: str, serial: str) -> tuple[Path, Path]:
        """A certificate minted with the production-CA key and the programmer's PIN."""
        cert, key = self.files / f"{name}.pem", self.files / f"{name}.key"
        proc = subprocess.run(
            [sys.executable, "-m", "tests.integration.mint_child", str(self.factory), JOB_ID,
             str(self.devices[0][0]), serial, str(cert), str(key)],
            capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return cert, key


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root, summary = demo_copy(tmp_path_factory, "field-ocsp")  # the session's world, copied
    # the demo installed the responder certificate open-job returned and ingested the ledger
    assert summary["registry"] == {"devices": DEVICES, "ingested": True}
    w = World(root)
    assert (w.oem / "jobs" / JOB_ID / "ocsp-responder.pem").is_file()
    again = ok("oem", "registry", "ingest", str(w.ledger), "--job", JOB_ID, "--workdir", str(w.oem))
    assert not again["ingested"] and again["devices"] == DEVICES  # once
    device_id = f"{FIRST_UID + 1:016x}"
    ok("oem", "registry", "revoke", "--job", JOB_ID, "--device-id", device_id,
       "--reason", "keyCompromise", "--workdir", str(w.oem))  # fmt: skip
    server = subprocess.Popen(
        [*CLI, "oem", "ocsp", "--listen", "127.0.0.1:0", "--workdir", str(w.oem)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        assert line.startswith("listening on "), line + server.stderr.read()
        w.ocsp_url = f"http://127.0.0.1:{int(line.rsplit(':', 1)[1])}"
        yield w
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
        assert server.returncode == 143, err  # SIGTERM: the documented exit code
        assert "Traceback" not in err


# --- openssl ocsp -------------------------------------------------------------------------------


def openssl_ocsp(w: World, cert: Path) -> str:
    proc = subprocess.run(
        [_need("openssl"), "ocsp", "-issuer", str(w.pca), "-cert", str(cert), "-url", w.ocsp_url,
         "-CAfile", str(w.root_ca), "-resp_text"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Response verify OK" in proc.stderr, proc.stderr
    return proc.stdout


def test_openssl_ocsp_good_revoked_and_off_ledger(world: World) -> None:
    assert f"{world.devices[0][0]}: good" in openssl_ocsp(world, world.devices[0][0])
    revoked = openssl_ocsp(world, world.devices[1][0])
    assert f"{world.devices[1][0]}: revoked" in revoked and "Reason: keyCompromise" in revoked
    minted, _key = world.mint("minted-ocsp", str(DEVICES + 5))
    out = openssl_ocsp(world, minted)
    assert f"{minted}: revoked" in out and "Reason: certificateHold" in out
    assert "Revocation Time: Jan  1 00:00:00 1970 GMT" in out
    # the production CA itself, answered by the root's responder
    proc = subprocess.run(
        [_need("openssl"), "ocsp", "-issuer", str(world.root_ca), "-cert", str(world.pca),
         "-url", world.ocsp_url, "-CAfile", str(world.root_ca)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and f"{world.pca}: good" in proc.stdout, proc.stderr


def _ocsp_status(url: str, cert_path: Path, issuer_path: Path) -> str:
    """The response status, or the certificate status of a successful response."""
    from cryptography.x509 import ocsp

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    issuer = x509.load_pem_x509_certificate(issuer_path.read_bytes())
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    try:
        conn.request("POST", "/", req.public_bytes(serialization.Encoding.DER),
                     {"Content-Type": "application/ocsp-request"})  # fmt: skip
        resp = ocsp.load_der_ocsp_response(conn.getresponse().read())
    finally:
        conn.close()
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return resp.response_status.name.lower()
    return resp.certificate_status.name.lower()


def test_a_responder_installed_after_the_server_started_is_answered(world: World) -> None:
    # oem ocsp started before the job's responder was installed (a job issued later): it
    # answers for the job once install-responder put it in, without a restart; SIGHUP
    # reloads too and the server goes on serving
    installed = world.oem / "jobs" / JOB_ID / "ocsp-responder.pem"
    aside = world.files / "ocsp-responder-aside.pem"
    shutil.move(installed, aside)
    device = world.devices[3][0]
    server = subprocess.Popen(
        [*CLI, "oem", "ocsp", "--listen", "127.0.0.1:0", "--workdir", str(world.oem)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        assert line.startswith("listening on "), line + server.stderr.read()
        url = f"http://127.0.0.1:{int(line.rsplit(':', 1)[1])}"
        assert _ocsp_status(url, device, world.pca) == "unauthorized"  # not this job's, yet
        ok("oem", "install-responder", str(aside), "--job", JOB_ID, "--workdir", str(world.oem))
        deadline, status = time.monotonic() + 10, ""
        while time.monotonic() < deadline:  # a reload is at most a second away
            status = _ocsp_status(url, device, world.pca)
            if status == "good":
                break
            time.sleep(0.2)
        assert status == "good"
        server.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert server.poll() is None  # SIGHUP reloads, it does not stop the server
        assert _ocsp_status(url, device, world.pca) == "good"
    finally:
        if not installed.exists():
            shutil.move(aside, installed)
        server.terminate()
        _out, err = server.communicate(timeout=30)
    assert server.returncode == 143, err
    assert "Traceback" not in err
    assert "oem ocsp: reloaded (SIGHUP): responders for 1 job(s) and the root" in err, err
    assert "reloaded (a request named an issuer not loaded)" in err or (
        "reloaded (responder files changed)" in err
    ), err


# --- nginx ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _unprivileged() -> Iterator[tuple[list[str], str | None]]:
    """How to run a server as an unprivileged user: as root, a throwaway OS user."""
    if os.geteuid() != 0:
        yield [], None
        return
    user = "stnx" + uuid.uuid4().hex[:8]
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        yield ["runuser", "-u", user, "--"], user
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=60)


def _server_certificate(d: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker.test")])
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (d / "server.pem").write_bytes(cert.public_bytes(PEM))
    (d / "server.key").write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def nginx(world: World) -> Iterator[tuple[int, Path]]:
    binary = _need("nginx")
    with _unprivileged() as (run_as, user):
        d = Path(tempfile.mkdtemp(prefix="st-nginx-"))
        try:
            _server_certificate(d)
            shutil.copy(world.chain, d / "client-ca.pem")
            port = _free_port()
            temp = "\n".join(
                f"  {k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi",
                                                       "uwsgi", "scgi")
            )  # fmt: skip
            (d / "nginx.conf").write_text(f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
{temp}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    ssl_verify_client on;
    ssl_client_certificate {d}/client-ca.pem;
    ssl_verify_depth 2;
    ssl_ocsp on;
    ssl_ocsp_responder {world.ocsp_url};
    location / {{ return 200 "welcome $ssl_client_s_dn\\n"; }}
  }}
}}
""")
            if user is not None:
                subprocess.run(["chown", "-R", f"{user}:{user}", str(d)], check=True, timeout=60)
            proc = subprocess.Popen(
                [*run_as, binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-e",
                 str(d / "error.log"), "-g", "daemon off;"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=1
                    ):
                        break
                    if proc.poll() is not None:
                        pytest.fail(f"nginx exited: {proc.communicate()}")
                    time.sleep(0.1)
                master = subprocess.run(
                    ["ps", "-o", "user=", "-p", str(proc.pid if not run_as else _child(proc))],
                    capture_output=True, text=True, timeout=10,
                ).stdout.strip()  # fmt: skip
                assert master != "root", "nginx's master runs unprivileged"
                yield port, d
            finally:
                proc.terminate()
                proc.communicate(timeout=30)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _child(proc: subprocess.Popen[str]) -> int:
    """The nginx master started by runuser (its only child)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True, timeout=10
    ).stdout.split()
    return int(out[0]) if out else proc.pid


def connect(port: int, cert: Path, key: Path) -> tuple[int, str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the client's side is not under test
    ctx.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def test_nginx_lets_a_ledgered_device_in(world: World, nginx: tuple[int, Path]) -> None:
    port, _d = nginx
    status, body = connect(port, *world.devices[0])
    assert status == 200 and body.startswith("welcome "), body
    assert f"{FIRST_UID:016x}" in body  # nginx saw the device's subject
    status, body = connect(port, *world.devices[2])
    assert status == 200, body


def test_nginx_refuses_a_revoked_device(world: World, nginx: tuple[int, Path]) -> None:
    port, d = nginx
    seen = len((d / "error.log").read_text())
    status, body = connect(port, *world.devices[1])
    assert status == 400 and "SSL certificate error" in body, body
    assert REFUSED in (d / "error.log").read_text()[seen:]


def test_nginx_refuses_a_device_minted_off_the_ledger(
    world: World, nginx: tuple[int, Path]
) -> None:
    port, d = nginx
    cert, key = world.mint("minted-nginx", str(DEVICES + 7))
    # it chains to the OEM root like any device: only the ledger knows it is not one
    proc = subprocess.run(
        [_need("openssl"), "verify", "-CAfile", str(world.root_ca), "-untrusted",
         str(world.pca), "-purpose", "sslclient", str(cert)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = len((d / "error.log").read_text())
    status, body = connect(port, cert, key)
    assert status == 400 and "SSL certificate error" in body, body
    assert REFUSED in (d / "error.log").read_text()[seen:]


# --- registry check, and bad input ----------------------------------------------------------------


def test_registry_check_for_onboarding_scripts(world: World) -> None:
    known = cli("oem", "registry", "check", str(world.devices[0][0]), "--workdir", str(world.oem),
                "--json")  # fmt: skip
    assert known.returncode == 0, known.stderr
    k = json.loads(known.stdout)
    assert k["status"] == "known" and k["job_id"] == JOB_ID
    assert k["device_id"] == f"{FIRST_UID:016x}"
    revoked = cli("oem", "registry", "check", str(world.devices[1][0]), "--workdir",
                  str(world.oem), "--json")  # fmt: skip
    assert revoked.returncode == EXIT_VERIFY and json.loads(revoked.stdout)["status"] == "revoked"
    minted, _ = world.mint("minted-check", str(DEVICES + 9))
    m = cli("oem", "registry", "check", str(minted), "--workdir", str(world.oem), "--json")
    assert m.returncode == EXIT_VERIFY
    assert json.loads(m.stdout)["status"] == "unknown" and json.loads(m.stdout)["off_ledger"]
    assert len(m.stderr.strip().splitlines()) == 1 and "unknown" in m.stderr
    # a restored store: slot 3's serial again, another chip
    twin, _ = world.mint("twin", "twin")
    tw = cli("oem", "registry", "check", str(twin), "--workdir", str(world.oem), "--json")
    assert tw.returncode == EXIT_VERIFY and json.loads(tw.stdout)["status"] == "duplicate"
    # from now on OCSP refuses the serial, for both certificates
    out = openssl_ocsp(world, world.devices[0][0])
    assert ": revoked" in out and "Reason: certificateHold" in out


def _tree(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "hsm" not in p.parts and p.name not in ("minutes.txt",)
        and not p.name.startswith("registry.sqlite")
    }  # fmt: skip


def test_a_ledger_changed_anywhere_is_not_the_reconciled_one(
    world: World, tmp_path: Path
) -> None:
    """A byte flipped anywhere -- CBOR structure, a certificate's DER, a signature, the close
    record -- is one LedgerMismatchError, never a parse error of its own or a crash, and the
    registry stores nothing (ingest streams: the change can be met before the hash is)."""
    from securethread.oem.registry import LedgerMismatchError, ingest_ledger

    original = world.ledger.read_bytes()
    db = tmp_path / "flips.sqlite"
    positions = sorted({*range(0, len(original), max(1, len(original) // 61)), len(original) - 1})
    for at in positions:
        data = bytearray(original)
        data[at] ^= 0x04
        tampered = tmp_path / "flipped.bin"
        tampered.write_bytes(bytes(data))
        with pytest.raises(LedgerMismatchError, match="not the one reconciled|not job"):
            ingest_ledger(world.oem, tampered, job_id=JOB_ID, database=str(db))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 0


def test_bad_input_is_one_line_and_changes_nothing(world: World, tmp_path: Path) -> None:
    before = _tree(world.oem)
    data = bytearray(world.ledger.read_bytes())
    data[len(data) // 3] ^= 0x04
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(bytes(data))
    db = tmp_path / "other.sqlite"
    cases = [
        (["registry", "ingest", str(tampered), "--job", JOB_ID, "--database", str(db)],
         EXIT_VERIFY, "LedgerMismatchError"),
        (["registry", "ingest", str(world.ledger), "--job", "no-such-job"], EXIT_CONFIG,
         "StepOrderError"),
        (["install-responder", str(world.devices[0][0]), "--job", JOB_ID], EXIT_VERIFY, ""),
        (["registry", "revoke", "--job", JOB_ID, "--serial", "zz"], EXIT_CONFIG, "--serial"),
        (["registry", "revoke", "--job", JOB_ID, "--serial", "1234"], EXIT_CONFIG,
         "RegistryLookupError"),
        (["registry", "check", str(tmp_path / "missing.pem")], EXIT_CONFIG, ""),
        (["ocsp", "--listen", "127.0.0.1:99999"], EXIT_CONFIG, "HOST:PORT"),
    ]  # fmt: skip
    for args, code, what in cases:
        proc = cli("oem", *args, "--workdir", str(world.oem))
        assert proc.returncode == code, (args, proc.returncode, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert what in proc.stderr, proc.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 0
    assert _tree(world.oem) == before
