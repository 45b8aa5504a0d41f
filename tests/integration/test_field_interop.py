"""Every certificate and CRL of a demo run, against TLS stacks and linters nobody here wrote
(issue 19).

One ``securethread demo`` world per session (the OEM's job names an OEM arc, a device URI,
a CRL distribution point and an OCSP URL), one device revoked with ``programmer revoke`` and
the job's production CA revoked with ``oem revoke`` (the root's CRL).  Then:

* Go's crypto/x509 (tests/go/fieldcheck, standard library only, built offline) parses every
  certificate and CRL and verifies each device for client authentication, now and 20 years
  on; a Go crypto/tls server (RequireAndVerifyClientCert) lets every device in and, with the
  CRL, refuses the revoked one; a certificate of the wave-2 profile (a UUID-arc attribute
  in its issuer) is refused by Go, as the issue found;
* GnuTLS: ``gnutls-serv --require-client-cert --verify-client-cert`` with a ``gnutls-cli``
  device presenting its own certificate and key, with the CRL; ``certtool --verify`` of each
  chain with and without the CRL, ``certtool --verify-crl`` of each CRL;
* pkilint's RFC 5280 certificate, issuer/subject chain and CRL linters: no finding at NOTICE
  or above;
* pyca cryptography's stock ``PolicyBuilder().store(Store([root])).build_client_verifier()``.

The device keys come from the demo fab's seed (``SimulatedFab``), as a device holds its own.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.demo import child_env
from securethread.pki import from_pem, to_pem
from tests.integration.demo_support import DEVICES, demo_copy
from tests.integration.test_field_tls import _free_port, _need, _server_identity, _stop

REVOKED = 2  # the device the production CA's CRL revokes
JOB = "demo-job-1"
TIMEOUT = 60.0
CLI = [sys.executable, "-m", "securethread.cli"]
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
TWENTY_YEARS = 20 * 366 * 86400
GO_PROGRAM = Path(__file__).resolve().parents[1] / "go" / "fieldcheck" / "main.go"


@attrs.frozen
class World:
    dir: Path  # scratch files: keys, chains, CRLs, the server identity
    root: Path
    pca: Path
    devices: list[Path]
    empty_crl: Path  # the job's first CRL, from open-job
    device_crl: Path  # revokes devices[REVOKED]
    root_crl: Path  # the root's: revokes the production CA

    def key(self, i: int) -> Path:
        return self.dir / f"{self.devices[i].stem}.key"

    def chain(self, i: int) -> Path:
        return self.dir / f"{self.devices[i].stem}-chain.pem"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=child_env(), timeout=900
    )


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from securethread.demo.line import SimulatedFab

    demo, _summary = demo_copy(tmp_path_factory, "interop")  # the session's world, copied
    d = demo.parent / "files"
    d.mkdir()
    oem, factory = demo / "oem", demo / "factory"
    pca = oem / "jobs" / JOB / "production-ca.pem"
    devices = sorted((factory / "jobs" / JOB / "devices").glob("*.pem"))
    assert len(devices) == DEVICES
    fab = SimulatedFab(demo / "vendor")
    for dev in devices:
        key = serialization.load_der_private_key(fab.chip(int(dev.stem, 16)).private_key_der, None)
        (d / f"{dev.stem}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )  # fmt: skip
        (d / f"{dev.stem}-chain.pem").write_bytes(dev.read_bytes() + pca.read_bytes())
    empty_crl, device_crl, root_crl = d / "pca-empty.crl", d / "pca-revoked.crl", d / "root.crl"
    # the job's first CRL, from open-job (the outbox copy is replaced by later revocations)
    empty_crl.write_bytes((factory / "outbox" / f"crl-{JOB}.pem").read_bytes())
    proc = _cli("programmer", "revoke", "--workdir", str(factory), "--job", JOB,
                "--device", str(devices[REVOKED]), "--reason", "keyCompromise",
                "--out", str(device_crl))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = _cli("oem", "revoke", "--workdir", str(oem), "--job", JOB,
                "--reason", "superseded", "--out", str(root_crl))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _server_identity(d)
    return World(d, oem / "root-ca.pem", pca, devices, empty_crl, device_crl, root_crl)


def _certificates(w: World) -> list[Path]:
    return [w.root, w.pca, *w.devices]


def _crls(w: World) -> list[Path]:
    return [w.empty_crl, w.device_crl, w.root_crl]


# --- Go crypto/x509 and crypto/tls --------------------------------------------------------------


@pytest.fixture(scope="session")
def fieldcheck(world: World) -> Path:
    """The Go program, built offline from the standard library (a binary, so that the TLS
    server is one process the test can stop)."""
    go = _need("go")
    cache = world.dir / "go"
    env = dict(
        child_env(), GOCACHE=str(cache / "cache"), GOPATH=str(cache / "path"), GOPROXY="off",
        GOFLAGS="", GO111MODULE="on", CGO_ENABLED="0", GOTOOLCHAIN="local",
    )  # fmt: skip
    out = cache / "fieldcheck"
    proc = subprocess.run(
        [go, "build", "-o", str(out), str(GO_PROGRAM)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def _go_verify(fieldcheck: Path, w: World, *args: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(fieldcheck), "verify", "-root", str(w.root), "-intermediate", str(w.pca), *args],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_go_parses_and_verifies_every_certificate_and_crl(world: World, fieldcheck: Path) -> None:
    later = str(int(time.time()) + TWENTY_YEARS)
    for at in ((), ("-at", later)):
        results = _go_verify(fieldcheck, world, *at, *map(str, _certificates(world)))
        assert [r["file"] for r in results] == list(map(str, _certificates(world)))
        assert all(r["parsed"] and r["verified"] for r in results), results
    devices = results[2:]
    for dev, r in zip(world.devices, devices, strict=True):
        assert r["uris"] == [f"https://devices.demo-oem.example/sensor-v1/{dev.stem}"]
        assert r["crl_dp"] == [f"http://pki.demo-oem.example/crl/{JOB}.crl"]
        assert r["ocsp"] == ["http://ocsp.demo-oem.example/"]
    # every CRL parses and its signature verifies under its issuer
    crls = _go_verify(fieldcheck, world, *(a for c in _crls(world) for a in ("-crl", str(c))))
    assert [(r["parsed"], r["verified"], r.get("entries", 0)) for r in crls] == [
        (True, True, 0), (True, True, 1), (True, True, 1)
    ]
    assert crls[2]["subject"].startswith("CN=")  # the root's CRL, verified under the root


def test_go_refuses_the_revoked_device_with_the_crl(world: World, fieldcheck: Path) -> None:
    results = _go_verify(fieldcheck, world, "-crl", str(world.device_crl),
                         *map(str, world.devices))  # fmt: skip
    devices = results[1:]  # after the CRL's own line
    assert [r["revoked"] for r in devices] == [i == REVOKED for i in range(DEVICES)], devices
    # fails closed without the issuer's CRL, as OpenSSL's crl_check does
    (r,) = _go_verify(fieldcheck, world, "-crl", str(world.root_crl), str(world.devices[0]))[1:]
    assert not r["verified"] and "no CRL of the issuer" in r["error"]


def _wave2_certificate(d: Path) -> Path:
    """A chain of the wave-2 profile: the job id under the project's UUID arc in the
    production CA's name, so in every device's issuer."""
    root_key, ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1()
    )
    job_attr = x509.ObjectIdentifier("2.25.207020730509700419229912614853397683814.2.1")
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old root")])
    ca_name = x509.Name([x509.NameAttribute(job_attr, "job-1"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "production CA")])  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(root_name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )  # fmt: skip
    path = d / f"wave2-{uuid.uuid4().hex[:6]}.pem"
    path.write_bytes(to_pem(cert))
    return path


def test_go_refused_the_wave2_profile(world: World, fieldcheck: Path) -> None:
    """The control: the same Go program cannot parse a name with a UUID-arc attribute."""
    (r,) = _go_verify(fieldcheck, world, str(_wave2_certificate(world.dir)))
    assert not r["parsed"] and "invalid RDNSequence" in r["error"], r


@attrs.frozen
class GoServer:
    port: int
    proc: subprocess.Popen[str]

    def results(self) -> list[dict[str, Any]]:
        """Its handshake reports, one line each (written before it greets a client)."""
        _stop(self.proc)
        out = self.proc.stdout.read() if self.proc.stdout else ""
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def go_server(world: World, fieldcheck: Path) -> Iterator[GoServer]:
    proc = subprocess.Popen(
        [str(fieldcheck), "serve", "-root", str(world.root), "-cert",
         str(world.dir / "server.pem"), "-key", str(world.dir / "server.key"),
         "-crl", str(world.device_crl)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "READY 127.0.0.1:PORT"
        assert line.startswith("READY "), (line, proc.stderr.read() if proc.stderr else "")
        yield GoServer(int(line.split(":")[-1]), proc)
    finally:
        _stop(proc)


def _tls_client(w: World, i: int, port: int) -> bytes:
    """The device (an OpenSSL client, through python ssl) presents its chain and key."""
    ctx = ssl.create_default_context(cafile=w.dir / "server.pem")
    ctx.load_cert_chain(w.chain(i), w.key(i))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"hello\n")
            return tls.recv(256)
    except (ssl.SSLError, OSError):
        return b""


def test_a_go_tls_server_lets_every_device_in_and_refuses_the_revoked_one(
    world: World, go_server: GoServer
) -> None:
    greetings = [_tls_client(world, i, go_server.port) for i in range(DEVICES)]
    for i, dev in enumerate(world.devices):
        expected = b"" if i == REVOKED else f"welcome {dev.stem}, you said hello\n".encode()
        assert greetings[i] == expected, (i, greetings[i])
    results = go_server.results()
    assert len(results) == DEVICES
    assert [r["verified"] for r in results] == [i != REVOKED for i in range(DEVICES)], results
    assert "certificate revoked" in results[REVOKED]["error"]


# --- GnuTLS ---------------------------------------------------------------------------------------


def _gnutls_round(w: World, i: int, *crl: str) -> tuple[str, str]:
    """One ``gnutls-cli`` device against ``gnutls-serv`` requiring and verifying its certificate."""
    port = _free_port()
    log = w.dir / f"gnutls-serv-{uuid.uuid4().hex[:6]}.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [_need("gnutls-serv"), "--require-client-cert", "--verify-client-cert",
             "--x509cafile", str(w.root), "--x509certfile", str(w.dir / "server.pem"),
             "--x509keyfile", str(w.dir / "server.key"), *crl, "--echo", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                time.sleep(0.05)
        client = subprocess.run(
            [_need("gnutls-cli"), "--x509certfile", str(w.chain(i)), "--x509keyfile",
             str(w.key(i)), "--x509cafile", str(w.dir / "server.pem"), "-p", str(port),
             "127.0.0.1"],
            input="hello from the device\n", capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        # The client can be done before the server logged its verdict on the client's
        # certificate (a busy CPU): wait for it -- the echoed command, or a second handshake
        # error after the probe's -- before stopping the server.
        while time.monotonic() < deadline:
            text = log.read_text()
            if "Processing" in text or text.count("Error in handshake") >= 2:
                break
            assert server.poll() is None, text
            time.sleep(0.05)
    finally:
        _stop(server)
    return client.stdout + client.stderr, log.read_text()


def test_gnutls_serv_lets_every_device_in(world: World) -> None:
    for i, dev in enumerate(world.devices):
        client, server = _gnutls_round(world, i)
        assert "hello from the device" in client.split("Simple Client Mode")[-1], client
        assert "The certificate is trusted" in server, server
        assert f"serialNumber={dev.stem}" in server


def test_gnutls_serv_refuses_the_revoked_device_with_the_crl(world: World) -> None:
    crl = ("--x509crlfile", str(world.device_crl))
    client, server = _gnutls_round(world, 0, *crl)
    assert "hello from the device" in client.split("Simple Client Mode")[-1], client
    client, server = _gnutls_round(world, REVOKED, *crl)
    assert "hello from the device" not in client.split("Simple Client Mode")[-1]
    assert "Error in the certificate" in server, server


def _certtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_need("certtool"), *args], capture_output=True, text=True, timeout=TIMEOUT
    )


def test_certtool_verifies_every_chain_and_crl(world: World) -> None:
    for i in range(DEVICES):
        base = ["--verify", "--verify-profile", "medium", "--load-ca-certificate",
                str(world.root), "--infile", str(world.chain(i)),
                f"--verify-purpose={CLIENT_AUTH}"]  # fmt: skip
        plain = _certtool(*base)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        assert "Chain verification output: Verified." in plain.stdout
        checked = _certtool(*base, "--load-crl", str(world.device_crl))
        if i == REVOKED:
            assert checked.returncode != 0 and "The certificate chain is revoked" in checked.stdout
        else:
            assert checked.returncode == 0, checked.stdout + checked.stderr
    for crl, issuer in ((world.empty_crl, world.pca), (world.device_crl, world.pca),
                        (world.root_crl, world.root)):  # fmt: skip
        res = _certtool("--verify-crl", "--load-ca-certificate", str(issuer), "--infile", str(crl))
        assert res.returncode == 0 and "Verification output: Verified." in res.stdout, res.stdout


# --- pkilint ------------------------------------------------------------------------------------


def _lint(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = Path(sys.executable).parent / tool
    if not path.exists():
        msg = "pkilint is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return subprocess.run(
        [str(path), "lint", "-s", "NOTICE", *args], capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip


def test_pkilint_finds_nothing_at_notice_or_above(world: World) -> None:
    for cert in _certificates(world):
        res = _lint("lint_pkix_cert", str(cert))
        assert res.returncode == 0 and res.stdout.strip() == "", (cert, res.stdout)
    for issuer, subject in [(world.root, world.pca), *((world.pca, d) for d in world.devices)]:
        res = _lint("lint_pkix_signer_signee_cert_chain", str(issuer), str(subject))
        assert res.returncode == 0 and res.stdout.strip() == "", (subject, res.stdout)
    for crl, kind in ((world.empty_crl, "CRL"), (world.device_crl, "CRL"),
                      (world.root_crl, "ARL")):  # fmt: skip
        res = _lint("lint_crl", "-t", kind, "-p", "PKIX", str(crl))
        assert res.returncode == 0 and res.stdout.strip() == "", (crl, res.stdout)


def test_pkilint_does_report_a_finding(world: World) -> None:
    """The control: pkilint reports what it finds (here a URN it cannot parse as a URI)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier("urn:dev:os:32473-0000000000000001")]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path = world.dir / "lint-control.pem"
    path.write_bytes(to_pem(cert))
    res = _lint("lint_pkix_cert", str(path))
    assert res.returncode != 0 and "pkix.invalid_uri_syntax" in res.stdout, res.stdout


# --- pyca cryptography's stock client verifier ----------------------------------------------


def test_pyca_default_client_verifier_accepts_every_device(world: World) -> None:
    from cryptography.x509.verification import PolicyBuilder, Store

    root, pca = from_pem(world.root.read_bytes()), from_pem(world.pca.read_bytes())
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=TWENTY_YEARS)
    for when in (None, later):
        builder = PolicyBuilder().store(Store([root]))
        if when is not None:
            builder = builder.time(when)
        verifier = builder.build_client_verifier()
        for dev in world.devices:
            verified = verifier.verify(from_pem(dev.read_bytes()), [pca])
            assert verified.subjects == [
                x509.UniformResourceIdentifier(
                    f"https://devices.demo-oem.example/sensor-v1/{dev.stem}"
                )
            ]
