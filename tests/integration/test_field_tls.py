"""Device certificates in the field: stock verifiers and TLS servers accept them (issue 14).

A real chain in the session SoftHSM tokens -- OEM root in "oem", the job's production CA
key generated in "programmer" and certified by the root -- and device certificates issued
by DeviceCertificateIssuer for simulated chips.  Then, on 127.0.0.1 with servers started
here: ``openssl verify -x509_strict -purpose sslclient`` (now and 20 years on), mutual TLS
to ``openssl s_server`` (TLS 1.2 and 1.3), to a python ``ssl`` server and to mosquitto
(``require_certificate``, ``use_identity_as_username``, an ACL on ``%u``), and revocation:
the production CA's CRL (signed in the programmer token) makes every one of them refuse
the revoked device and still accept the others; the root's CRL (signed in the OEM token)
revokes a whole production CA.  The devices carry the issue-19 profile (a subjectAltName URI,
a CRL distribution point and an OCSP URL, no private OID); test_field_interop.py takes a
demo world through Go, GnuTLS, pkilint and pyca's stock verifier.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
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

from securethread.hsm import Token
from securethread.keys.protocol import PrivateKey
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    certify_production_ca,
    create_production_ca_csr,
    create_root_ca,
    install_certificate,
    refresh_crl,
    revoke_devices,
    revoke_production_ca,
    to_pem,
)

UTC = datetime.UTC
ORG = "Acme Field Devices"
TWENTY_YEARS = datetime.timedelta(days=20 * 366)
TIMEOUT = 20.0  # seconds: generous bound for a server to come up or a client to finish


def _need(binary: str) -> str:
    """The binary's path; a missing binary fails under CI (scripts/install.sh installs it)."""
    path = shutil.which(binary)
    if path is None:
        msg = f"{binary} is not installed (bash scripts/install.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@attrs.frozen
class Field:
    dir: Path
    root: x509.Certificate
    pca: x509.Certificate
    device_ids: list[str]
    revoked: int  # index of the device the production CA's CRL revokes
    orphan_id: str  # a device of a second job whose production CA the root revoked
    job_id: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _server_identity(d: Path) -> None:
    """A self-signed server certificate for 127.0.0.1 (the devices trust it as their CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker.test")])
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (d / "server.pem").write_bytes(to_pem(cert))
    (d / "server.key").write_bytes(_key_pem(key))


def _job(
    root_key: PrivateKey,
    programmer: Token,
    root: x509.Certificate,
    *,
    job_id: str,
    pca_label: str,
    device_ids: list[str],
    d: Path,
    prefix: str,
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """One job: production CA key in the programmer token, certified by the root; devices."""
    csr = create_production_ca_csr(programmer, label=pca_label, job_id=job_id)
    pca = certify_production_ca(
        root_key,
        root,
        csr,
        job_id=job_id,
        not_before=root.not_valid_before_utc,
    )
    install_certificate(programmer, pca_label, pca)
    # stands in for formats.job.job_hash(signed job): the job's identity
    job_identity = hashlib.sha256(f"signed job {job_id} {uuid.uuid4()}".encode()).digest()
    issuer = DeviceCertificateIssuer(
        programmer.private_key(pca_label),
        pca,
        job_id=job_id,
        job_tag=job_identity,
        # the job's profile without an OEM arc: a URI and both revocation sources, no private
        # OID anywhere (the demo world of test_field_interop has the arc)
        profile=DeviceProfile(
            organisation=ORG,
            product="Thermostat",
            uri_template="https://devices.acme-field.example/thermostat/{device_id}",
            crl_url=f"http://pki.acme-field.example/crl/{job_id}.crl",
            ocsp_url="http://ocsp.acme-field.example/",
        ),
    )
    (d / f"{prefix}pca.pem").write_bytes(to_pem(pca))
    certs = []
    for slot, device_id in enumerate(device_ids):
        chip_key = ec.generate_private_key(ec.SECP256R1())  # the simulated chip's key
        cert = issuer.issue(chip_key.public_key(), device_id, slot)
        certs.append(cert)
        (d / f"{device_id}.pem").write_bytes(to_pem(cert))
        (d / f"{device_id}.key").write_bytes(_key_pem(chip_key))
        (d / f"{device_id}-chain.pem").write_bytes(to_pem(cert) + to_pem(pca))
    return pca, certs


@pytest.fixture(scope="module")
def field(oem: Token, programmer: Token, tmp_path_factory: pytest.TempPathFactory) -> Field:
    tag = uuid.uuid4().hex[:8]
    d = tmp_path_factory.mktemp("field")
    label = f"field-root-{tag}"
    root = create_root_ca(oem, label=label, organisation=ORG, common_name="Acme Root CA")
    root_key = oem.private_key(label)
    (d / "root.pem").write_bytes(to_pem(root))
    ids = [f"{0x0A11CE00 + i:016x}" for i in range(3)]
    pca, devices = _job(
        root_key, programmer, root, job_id=f"field-{tag}", pca_label=f"field-pca-{tag}",
        device_ids=ids, d=d, prefix="",
    )  # fmt: skip
    orphan = f"{0x0BAD0000:016x}"
    other_pca, _ = _job(
        root_key, programmer, root, job_id=f"field2-{tag}", pca_label=f"field-pca2-{tag}",
        device_ids=[orphan], d=d, prefix="other-",
    )  # fmt: skip
    revoked = 2
    # (b) the production CA revokes a device, signed with its key in the programmer token
    pca_crl = revoke_devices(
        programmer.private_key(f"field-pca-{tag}"),
        pca,
        [devices[revoked]],
        reason=x509.ReasonFlags.key_compromise,
    )
    other_crl = refresh_crl(programmer.private_key(f"field-pca2-{tag}"), other_pca)
    # (a) the OEM root revokes the second job's production CA, signed in the OEM token
    root_crl = revoke_production_ca(
        root_key, root, other_pca, reason=x509.ReasonFlags.ca_compromise
    )
    (d / "pca.crl").write_bytes(pca_crl)
    (d / "all.crl").write_bytes(pca_crl + other_crl + root_crl)
    _server_identity(d)
    return Field(d, root, pca, ids, revoked, orphan, f"field-{tag}")


# --- openssl verify -------------------------------------------------------------------------------


def _verify(
    f: Field, device_id: str, *extra: str, pca: str = "pca.pem"
) -> subprocess.CompletedProcess[str]:
    cmd = [
        _need("openssl"), "verify", "-x509_strict", "-purpose", "sslclient",
        "-CAfile", "root.pem", "-untrusted", pca, *extra, f"{device_id}.pem",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=f.dir, capture_output=True, text=True, timeout=TIMEOUT)


def test_openssl_verify_sslclient_now_and_in_twenty_years(field: Field) -> None:
    later = int((datetime.datetime.now(UTC) + TWENTY_YEARS).timestamp())
    for device_id in field.device_ids:
        for extra in ((), ("-attime", str(later))):
            res = _verify(field, device_id, *extra)
            assert res.returncode == 0, res.stdout + res.stderr
            assert res.stdout.strip() == f"{device_id}.pem: OK"


def test_openssl_verify_crl_check(field: Field) -> None:
    good, bad = field.device_ids[0], field.device_ids[field.revoked]
    ok = _verify(field, good, "-crl_check", "-CRLfile", "pca.crl")
    assert ok.returncode == 0 and ok.stdout.strip() == f"{good}.pem: OK", ok.stdout + ok.stderr
    res = _verify(field, bad, "-crl_check", "-CRLfile", "pca.crl")
    assert res.returncode != 0
    assert "error 23 at 0 depth lookup: certificate revoked" in res.stdout + res.stderr
    # every level (root's CRL for the production CAs, each CA's for its devices)
    ok = _verify(field, good, "-crl_check_all", "-CRLfile", "all.crl")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    res = _verify(
        field, field.orphan_id, "-crl_check_all", "-CRLfile", "all.crl", pca="other-pca.pem"
    )
    assert "error 23 at 1 depth lookup: certificate revoked" in res.stdout + res.stderr
    # crl_check fails closed when the issuer's CRL is missing
    res = _verify(field, field.orphan_id, "-crl_check", "-CRLfile", "pca.crl", pca="other-pca.pem")
    assert res.returncode != 0 and "unable to get certificate CRL" in res.stdout + res.stderr


# --- servers --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(path: Path, text: str, proc: subprocess.Popen[Any], *, seen: int = 0) -> None:
    """Until ``text`` appears in the log ``path`` more than ``seen`` times (a server is
    ready, a subscription acknowledged) or the process exits."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) > seen:
            return
        if proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}): {path.read_text(errors='replace')}")
        time.sleep(0.02)
    pytest.fail(f"server not ready after {TIMEOUT}s: {path.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@attrs.frozen
class TlsResult:
    echoed: bool
    client: str
    server: str


def _s_server_round(f: Field, device_id: str, version: str, *crl: str) -> TlsResult:
    """One mutual-TLS connection of ``device_id`` to ``openssl s_server -Verify 2``."""
    openssl = _need("openssl")
    port = _free_port()
    log = f.dir / f"s_server-{uuid.uuid4().hex[:6]}.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1",
                "-cert", "server.pem", "-key", "server.key", "-CAfile", "root.pem",
                "-Verify", "2", "-verify_return_error", f"-{version}", "-rev", *crl,
            ],
            cwd=f.dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _wait_for(log, "ACCEPT", server)
        client = subprocess.Popen(
            [
                openssl, "s_client", "-connect", f"127.0.0.1:{port}", f"-{version}", "-quiet",
                "-cert", f"{device_id}.pem", "-key", f"{device_id}.key",
                "-cert_chain", "pca.pem", "-CAfile", "server.pem",
            ],
            cwd=f.dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"device says hello\n")
            client.stdin.flush()
            # -rev: the server answers each line reversed, only after a verified handshake
            ready, _, _ = select.select([client.stdout], [], [], TIMEOUT)
            line = client.stdout.readline() if ready else b""
            client.terminate()  # -quiet implies -ign_eof: s_client would wait for more
            _out, err = client.communicate(timeout=TIMEOUT)
        finally:
            _stop(client)
        server.wait(timeout=TIMEOUT)
    finally:
        _stop(server)
    return TlsResult(
        line == b"device says hello"[::-1] + b"\n", err.decode(errors="replace"), log.read_text()
    )


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_openssl_s_server_mutual_tls(field: Field, version: str) -> None:
    for device_id in field.device_ids:
        r = _s_server_round(field, device_id, version)
        assert r.echoed, r.client + r.server
        # the server verified the whole chain (depth 2 = the OEM root) and saw the device
        subject = f"O = {ORG}, OU = Thermostat, serialNumber = {device_id}, CN = {device_id}"
        assert f"depth=0 {subject}\nverify return:1" in r.server, r.server
        assert f"depth=2 O = {ORG}, CN = Acme Root CA\nverify return:1" in r.server


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_openssl_s_server_with_the_crl(field: Field, version: str) -> None:
    crl = ("-CRL", "pca.crl", "-crl_check")
    good = _s_server_round(field, field.device_ids[0], version, *crl)
    assert good.echoed, good.client + good.server
    bad = _s_server_round(field, field.device_ids[field.revoked], version, *crl)
    assert not bad.echoed
    assert "verify error:num=23:certificate revoked" in bad.server, bad.server


def _python_round(
    f: Field,
    device_id: str,
    *,
    crl: str | None = None,
    flags: ssl.VerifyFlags | None = None,
) -> tuple[dict[str, Any] | None, BaseException | None]:
    """One connection of ``device_id`` to a python ``ssl`` server with CERT_REQUIRED."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(f.dir / "server.pem", f.dir / "server.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(f.dir / "root.pem")
    if crl is not None:
        server_ctx.load_verify_locations(f.dir / crl)
    if flags is not None:
        server_ctx.verify_flags |= flags
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"welcome")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client_ctx = ssl.create_default_context(cafile=f.dir / "server.pem")
    # the device presents its certificate and its job's production CA
    client_ctx.load_cert_chain(f.dir / f"{device_id}-chain.pem", f.dir / f"{device_id}.key")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.recv(16)
    except (ssl.SSLError, OSError):
        pass  # the server's verdict is what counts
    t.join(TIMEOUT)
    listener.close()
    assert not t.is_alive()
    return seen.get("peer"), seen.get("error")  # type: ignore[return-value]


def test_python_ssl_server_cert_required(field: Field) -> None:
    for device_id in field.device_ids:
        peer, error = _python_round(field, device_id)
        assert error is None, error
        assert peer is not None
        subject = dict(rdn[0] for rdn in peer["subject"])
        assert subject == {
            "organizationName": ORG,
            "organizationalUnitName": "Thermostat",
            "serialNumber": device_id,
            "commonName": device_id,
        }
        uri = f"https://devices.acme-field.example/thermostat/{device_id}"
        assert peer["subjectAltName"] == (("URI", uri),)
        assert peer["crlDistributionPoints"] == ("http://pki.acme-field.example/crl/"
                                                 f"{field.job_id}.crl",)  # fmt: skip
        assert peer["OCSP"] == ("http://ocsp.acme-field.example/",)


def test_python_ssl_server_with_the_crl(field: Field) -> None:
    leaf = ssl.VERIFY_CRL_CHECK_LEAF
    peer, error = _python_round(field, field.device_ids[0], crl="pca.crl", flags=leaf)
    assert error is None and peer is not None
    peer, error = _python_round(field, field.device_ids[field.revoked], crl="pca.crl", flags=leaf)
    assert peer is None and isinstance(error, ssl.SSLError)
    assert "certificate revoked" in str(error)
    # the whole chain: the root's CRL revokes the second job's production CA
    chain = ssl.VERIFY_CRL_CHECK_CHAIN
    peer, error = _python_round(field, field.device_ids[0], crl="all.crl", flags=chain)
    assert error is None and peer is not None
    peer, error = _python_round(field, field.orphan_id, crl="all.crl", flags=chain)
    assert peer is None and "certificate revoked" in str(error)


# --- mosquitto ------------------------------------------------------------------------------------


@attrs.frozen
class Broker:
    port: int
    log: Path


@pytest.fixture(scope="module")
def broker(field: Field) -> Iterator[Broker]:
    """mosquitto (Debian) requiring a client certificate, the CN as user name, an ACL on it
    and the production CA's CRL."""
    mosquitto = _need("mosquitto")
    port = _free_port()
    d = field.dir
    reader = field.device_ids[1]
    (d / "acl").write_text(
        "# every device may publish only under its own user name (= certificate CN)\n"
        "pattern write devices/%u/#\n"
        f"user {reader}\n"
        "topic read devices/#\n"
    )
    log = d / "mosquitto.log"
    conf = [
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {d / 'acl'}",
        f"listener {port} 127.0.0.1",
        f"cafile {d / 'root.pem'}",
        f"certfile {d / 'server.pem'}",
        f"keyfile {d / 'server.key'}",
        f"crlfile {d / 'pca.crl'}",
        "require_certificate true",
        "use_identity_as_username true",
        "persistence false",
        f"log_dest file {log}",
        "log_type all",
    ]
    if os.geteuid() == 0:
        conf.append("user root")  # else mosquitto drops to its own user and cannot read d
    (d / "mosquitto.conf").write_text("\n".join(conf) + "\n")
    proc = subprocess.Popen(
        [mosquitto, "-c", str(d / "mosquitto.conf")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(log, " running", proc)
        yield Broker(port, log)
    finally:
        _stop(proc)


def _mqtt_args(f: Field, b: Broker, device_id: str) -> list[str]:
    return [
        "-h", "127.0.0.1", "-p", str(b.port), "--cafile", str(f.dir / "server.pem"),
        "--cert", str(f.dir / f"{device_id}-chain.pem"), "--key", str(f.dir / f"{device_id}.key"),
        "-V", "mqttv5", "-d",
    ]  # fmt: skip


def _publish(
    f: Field, b: Broker, device_id: str, topic: str, message: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        _need("mosquitto_pub"),
        *_mqtt_args(f, b, device_id),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        message,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def test_mosquitto_takes_the_device_id_as_user_name(field: Field, broker: Broker) -> None:
    writer, reader = field.device_ids[0], field.device_ids[1]
    subacks = broker.log.read_text().count("Sending SUBACK")
    sub = subprocess.Popen(
        [_need("mosquitto_sub"), *_mqtt_args(field, broker, reader),
         "-t", "devices/#", "-v", "-C", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # the broker acknowledged the subscription (mosquitto_sub's own output is buffered)
        _wait_for(broker.log, "Sending SUBACK", sub, seen=subacks)
        # another device's topic: refused by the ACL (%u is this device's id), not delivered
        denied = _publish(field, broker, writer, f"devices/{reader}/temperature", "forged")
        assert "received CONNACK (0)" in denied.stdout, denied.stdout + denied.stderr
        assert "RC:135" in denied.stdout  # PUBACK reason 135: not authorized (MQTT 5 §3.4.2.1)
        own = _publish(field, broker, writer, f"devices/{writer}/temperature", "21.5")
        assert own.returncode == 0 and "received CONNACK (0)" in own.stdout, own.stdout
        assert "RC:135" not in own.stdout
        out, _ = sub.communicate(timeout=TIMEOUT)
    finally:
        _stop(sub)
    # -C 1: the first message delivered is the device's own; the forged one never was
    messages = [line for line in out.splitlines() if line.startswith("devices/")]
    assert messages == [f"devices/{writer}/temperature 21.5"], out
    log = broker.log.read_text()
    assert f"u'{writer}'" in log and f"u'{reader}'" in log  # the broker's user names


def test_mosquitto_refuses_the_revoked_device(field: Field, broker: Broker) -> None:
    bad = field.device_ids[field.revoked]
    res = _publish(field, broker, bad, f"devices/{bad}/temperature", "19")
    assert res.returncode != 0 and "CONNACK" not in res.stdout, res.stdout
    good = field.device_ids[0]
    res = _publish(field, broker, good, f"devices/{good}/temperature", "20")
    assert res.returncode == 0 and "received CONNACK (0)" in res.stdout, res.stdout
    assert "certificate verify failed" in broker.log.read_text()
