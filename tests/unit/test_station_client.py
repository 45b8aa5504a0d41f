"""The reference station's pure parts: keys and CSRs, the credential check before any call,
the station API's addresses, the progress bar's width, the result's figures.  (The station
against a real appliance: tests/integration/test_stations.py.)"""

from __future__ import annotations

import datetime
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securethread.errors import ConfigurationError, RollbackError, VerificationError
from securethread.proto.address import check_address
from securethread.station.adapters import SimulatedChips
from securethread.station.client import (
    StationCredentials,
    StationResult,
    _percentile,
    _unavailable,
    check_target,
    keygen,
    progress_bar,
    run_station,
)


def _issue(csr_pem: bytes, ca_key: ec.EllipticCurvePrivateKey, ca_name: str) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(csr.subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)]))
        .public_key(csr.public_key()).serial_number(7)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    n = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert.public_bytes(serialization.Encoding.PEM)


def test_keygen_makes_a_p256_key_and_a_csr_it_signed() -> None:
    key_pem, csr_pem = keygen("line-3.a")
    key = serialization.load_pem_private_key(key_pem, None)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert csr.is_signature_valid and csr.public_key() == key.public_key()
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "line-3.a"


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "sp ace"])
def test_keygen_refuses_a_bad_name(name: str) -> None:
    with pytest.raises(ConfigurationError, match="station name"):
        keygen(name)


def test_credentials_are_checked_before_any_call(tmp_path: Path) -> None:
    ca_key, ca_pem = _ca("station CA")
    key_pem, csr_pem = keygen("s1")
    cert_pem = _issue(csr_pem, ca_key, "station CA")
    StationCredentials(cert_pem, key_pem, ca_pem).check()  # the right set passes
    other_key, _ = keygen("s2")
    with pytest.raises(VerificationError, match="not the key of the certificate"):
        StationCredentials(cert_pem, other_key, ca_pem).check()
    _, other_ca = _ca("station CA")  # same name, another key
    with pytest.raises(VerificationError, match="not issued by the station CA"):
        StationCredentials(cert_pem, key_pem, other_ca).check()
    for name, data in (("cert", b"junk"), ("key", key_pem), ("ca", ca_pem)):
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigurationError, match="--cert is not a PEM certificate"):
        StationCredentials.from_files(cert=str(tmp_path / "cert"), key=str(tmp_path / "key"),
                                      ca=str(tmp_path / "ca"))  # fmt: skip


def test_the_progress_bar_never_reaches_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=(80, 24): os.terminal_size(
        (200, 50)))  # fmt: skip
    update, close = progress_bar(1000, enabled=True)
    for _ in range(50):
        update(1, {"already_done": 7})
    close()
    frames = [f for f in re.split(r"[\r\n]", out.getvalue()) if f.strip()]
    assert frames and max(len(f) for f in frames) <= 79
    assert "done 7 before" in frames[-1] and "/1000" in frames[-1]
    silent = io.StringIO()
    monkeypatch.setattr(sys, "stderr", silent)
    update, close = progress_bar(10, enabled=False)
    update(1, {})
    close()
    assert silent.getvalue() == ""


def test_result_figures() -> None:
    assert _percentile([], 0.5) is None
    # nearest rank: of 1..100 ms, p99 is the 99th value and p50 the 50th (p99 of 100 values
    # used to be their largest, so one slow first device was the benchmark's p99)
    ms = [0.001 * i for i in range(1, 101)]
    assert [_percentile(ms, q) for q in (0.99, 0.50, 1.0)] == [99.0, 50.0, 100.0]
    assert _percentile([0.004], 0.99) == 4.0
    r = StationResult(job_id="j", appliances=("a:1",), devices=10, provisioned=6, recovered=2,
                      programmed=8, already_done=2, refused={}, notes=(), elapsed_s=2.0,
                      p50_ms=1.0, p99_ms=2.0, quota_exhausted=False)  # fmt: skip
    assert r.devices_per_s == 4.0 and r.to_json()["appliances"] == ["a:1"]


class _Chip:
    """A chip as the station sees it (identify, provision, program) with readable flash; its
    SBM's checks are tests/unit/test_device.py's: here only when the image is kept."""

    device_id = "5ec0000000000007"

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.flash: bytes | None = None

    def identify(self, challenge: bytes) -> bytes:
        return challenge

    def provision(self, data: bytes) -> None:
        pass

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes:
        if self.refuse:
            raise RollbackError("image counter below the fuses")
        self.flash = b"installed:" + image.read()
        return b"boot:" + nonce


class _Fab:
    def __init__(self, chip: _Chip) -> None:
        self._chip = chip

    def chip(self, uid: int) -> _Fab:
        return self

    @property
    def device_id(self) -> str:
        return self._chip.device_id

    def open(self) -> _Chip:
        return self._chip


@pytest.mark.parametrize("refuse", [False, True])
def test_keep_flash_writes_the_installed_image_only_once_programmed(
    tmp_path: Path, refuse: bool
) -> None:
    chip = _Chip(refuse)
    [(label, open_chip)] = list(SimulatedChips(_Fab(chip), [7], keep_flash=tmp_path / "flash"))
    port = open_chip()
    assert label == "0000000000000007" and port.identify(b"c") == b"c"
    if refuse:
        with pytest.raises(RollbackError):
            port.program(b"m", io.BytesIO(b"fw"), b"l", b"n")
        assert not (tmp_path / "flash").exists()  # a refused image leaves nothing behind
    else:
        assert port.program(b"m", io.BytesIO(b"fw"), b"l", b"n") == b"boot:n"
        assert (tmp_path / "flash" / f"{chip.device_id}.img").read_bytes() == b"installed:fw"
    [(_, plain)] = list(SimulatedChips(_Fab(chip), [7]))
    assert plain() is chip  # without keep_flash the chip is driven as it is


def test_station_run_refuses_a_keep_flash_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "securethread.cli", "station", "run", "--appliance",
         "127.0.0.1:1", "--cert", "c.pem", "--key", "k.pem", "--ca", "ca.pem", "--job", "j",
         "--chips-from", str(tmp_path / "vendor"), "--devices", "1",
         "--keep-flash", str(tmp_path / "taken")],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and "--keep-flash" in proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "taken").read_text() == "not a directory"


def test_station_keygen_never_replaces_a_key(tmp_path: Path) -> None:
    """A station's key may be certified already: a second keygen onto it is refused (exit
    2, one line, the key as it was), and so is a CSR path that is the key's."""
    def keygen_cli(key: str, csr: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "securethread.cli", "station", "keygen",
                               "--name", "st-1", "--key", key, "--csr", csr],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)  # fmt: skip

    assert keygen_cli("k.pem", "c.csr").returncode == 0
    key = (tmp_path / "k.pem").read_bytes()
    for args, says in ((("k.pem", "d.csr"), "exists: a station keeps its key"),
                       (("n.pem", "./n.pem"), "the same file")):  # fmt: skip
        proc = keygen_cli(*args)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert (tmp_path / "k.pem").read_bytes() == key
    assert not (tmp_path / "d.csr").exists() and not (tmp_path / "n.pem").exists()


@pytest.mark.parametrize(
    ("grpc_text", "tls"),
    [
        # the appliance killed during a reconnection's handshake (seen under load)
        ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
         "Handshake read failed (recvmsg:Connection reset by peer (104))", False),
        ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
         "Connection refused", False),
        ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
         "Ssl handshake failed: SSL_ERROR_SSL: error:1000007d:SSL routines:"
         "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED", True),
    ],
)
def test_a_reset_during_the_handshake_is_an_unreachable_appliance(
    grpc_text: str, tls: bool
) -> None:
    """Only a certificate fault is reported as the TLS handshake failing (exit 4); an
    appliance that went away mid-handshake is not reachable (exit 1, run again)."""
    assert ("TLS handshake failed" in _unavailable(grpc_text)) is tls


@pytest.mark.parametrize("target", ["127.0.0.1:5000", "appliance-1.factory.example:443",
                                    "[::1]:5000", "[fe80::1]:65535"])  # fmt: skip
def test_an_appliance_address_is_host_colon_port(target: str) -> None:
    assert check_target(target) == target


_BAD_TARGETS = ["", "127.0.0.1", "127.0.0.1:", "127.0.0.1:notaport", "127.0.0.1:0",
                "127.0.0.1:65536", "a:1,b:2", ":5000", "::1:5000", "-x:5000", "host:5000/path",
                "host :5000"]  # fmt: skip


@pytest.mark.parametrize("target", _BAD_TARGETS)
def test_a_bad_appliance_address_is_refused_naming_it(target: str) -> None:
    with pytest.raises(ConfigurationError, match="is not HOST:PORT") as info:
        check_target(target)
    assert repr(target) in str(info.value)


def test_where_to_listen_may_take_port_0_and_must_resolve() -> None:
    assert check_address("127.0.0.1:0", what="--stations", listen=True) == "127.0.0.1:0"
    assert check_address("[::1]:0", what="--stations", listen=True) == "[::1]:0"
    assert check_address("localhost:50051", what="--stations", listen=True)
    with pytest.raises(ConfigurationError, match="--appliance '127.0.0.1:0' is not HOST:PORT"):
        check_address("127.0.0.1:0", what="--appliance")  # a station dials a real port
    for bad in ("127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1"):
        with pytest.raises(ConfigurationError, match="--stations .* is not HOST:PORT"):
            check_address(bad, what="--stations", listen=True)
    with pytest.raises(ConfigurationError, match="no address for 'no-such-host.invalid'"):
        check_address("no-such-host.invalid:0", what="--stations", listen=True)


def test_station_run_refuses_bad_addresses_and_job_ids_before_any_call() -> None:
    """Refused before a channel is made: no appliance need be running."""
    creds = StationCredentials(b"", b"", b"")  # never used: every check comes first
    chips = SimulatedChips.__new__(SimulatedChips)

    def run(appliances: list[str], job: str = "j") -> None:
        run_station(creds, appliances, job_id=job, chips=chips, parallel=1)

    with pytest.raises(ConfigurationError, match="is not HOST:PORT"):
        run(["127.0.0.1:1", "not an address"])
    with pytest.raises(ConfigurationError, match="given twice"):
        run(["127.0.0.1:1", "127.0.0.1:1"])
    for job in ("", "../j", "j/k", ".j"):
        with pytest.raises(ConfigurationError, match="job id must be"):
            run(["127.0.0.1:1"], job)
