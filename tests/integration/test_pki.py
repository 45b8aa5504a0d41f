"""The PKI against real SoftHSM tokens, the real ``openssl verify`` and ``pkcs11-tool``."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import VerificationError

from securethread.errors import CertificateError, DuplicateObjectError, Error
from securethread.hsm import Token, default_module_path
from securethread.hsm.token import key_id_for
from securethread.pki import (
    CertificateExpiredError,
    ChainValidationError,
    DeviceCertificateIssuer,
    DeviceProfile,
    EnclavePurpose,
    IssuerKeyMismatchError,
    build_verifier,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    install_certificate,
    job_tag,
    load_der,
    parse_device_serial,
    to_der,
    to_pem,
    validate_device_chain,
    validate_enclave_certificate,
)

UTC = datetime.UTC
DEVICE_PURPOSE = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH  # a device's key purpose
OPENSSL = shutil.which("openssl")
PKCS11_TOOL = shutil.which("pkcs11-tool")


@attrs.frozen
class Chain:
    root_label: str
    pca_label: str
    identity_label: str
    ka_label: str
    job_id: str
    root: x509.Certificate
    pca: x509.Certificate
    other_pca: x509.Certificate
    identity: x509.Certificate
    ka: x509.Certificate
    issuer: DeviceCertificateIssuer
    device: x509.Certificate
    job_identity: bytes
    short_root: x509.Certificate  # a root, production CA and device with short lifetimes
    short_pca: x509.Certificate
    short_device: x509.Certificate
    dir: Path


@pytest.fixture(scope="module")
def chain(oem: Token, programmer: Token, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    import uuid

    tag = uuid.uuid4().hex[:8]
    root_label, pca_label = f"root-{tag}", f"pca-{tag}"
    id_label, ka_label, job_id = f"id-{tag}", f"ka-{tag}", f"job-{tag}"
    root = create_root_ca(oem, label=root_label, organisation="Acme Devices")
    rk = oem.private_key(root_label)
    now = datetime.datetime.now(UTC).replace(microsecond=0)
    pca = certify_production_ca(
        rk,
        root,
        create_production_ca_csr(programmer, label=pca_label, job_id=job_id),
        job_id=job_id,
        not_before=root.not_valid_before_utc,
    )
    install_certificate(programmer, pca_label, pca)
    other_pca = certify_production_ca(
        rk,
        root,
        create_production_ca_csr(programmer, label=f"pca2-{tag}", job_id=f"job2-{tag}"),
        job_id=f"job2-{tag}",
        not_before=root.not_valid_before_utc,
    )
    identity = certify_enclave(
        rk,
        root,
        create_enclave_csr(
            programmer, label=id_label, enclave_name="prog-1", purpose=EnclavePurpose.IDENTITY
        ),
        enclave_name="prog-1",
        purpose=EnclavePurpose.IDENTITY,
        role="programmer",
    )
    install_certificate(programmer, id_label, identity)
    ka = certify_enclave(
        rk,
        root,
        create_enclave_csr(
            programmer,
            label=ka_label,
            enclave_name="prog-1",
            purpose=EnclavePurpose.KEY_AGREEMENT,
            signer=programmer.private_key(id_label),
        ),
        enclave_name="prog-1",
        purpose=EnclavePurpose.KEY_AGREEMENT,
        role="programmer",
        proof_key=identity.public_key(),
    )
    install_certificate(programmer, ka_label, ka)
    job_identity = hashlib.sha256(f"signed job {job_id}".encode()).digest()
    profile = DeviceProfile(organisation="Acme Devices")
    issuer = DeviceCertificateIssuer(
        programmer.private_key(pca_label), pca, job_id=job_id, job_tag=job_identity, profile=profile
    )
    device_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    device = issuer.issue(device_key, "00000000000003e8", 1)
    # a chain with explicit short lifetimes: the root for a year, the CA and device 30 days
    short_root = create_root_ca(
        oem, label=f"sroot-{tag}", organisation="Acme Devices",
        not_after=now + datetime.timedelta(days=365),
    )  # fmt: skip
    na = now + datetime.timedelta(days=30)
    short_pca = certify_production_ca(
        oem.private_key(f"sroot-{tag}"),
        short_root,
        create_production_ca_csr(programmer, label=f"spca-{tag}", job_id=f"sjob-{tag}"),
        job_id=f"sjob-{tag}",
        not_before=short_root.not_valid_before_utc,
        not_after=na,
    )
    short_device = DeviceCertificateIssuer(
        programmer.private_key(f"spca-{tag}"),
        short_pca,
        job_id=f"sjob-{tag}",
        job_tag=job_identity,
        profile=DeviceProfile(organisation="Acme Devices", not_after=na),
    ).issue(device_key, "00000000000003e9", 2)
    d = tmp_path_factory.mktemp("pki")
    for name, cert in [
        ("root", root),
        ("pca", pca),
        ("other_pca", other_pca),
        ("identity", identity),
        ("ka", ka),
        ("device", device),
        ("short_root", short_root),
        ("short_pca", short_pca),
        ("short_device", short_device),
    ]:
        (d / f"{name}.pem").write_bytes(to_pem(cert))
    return Chain(
        root_label, pca_label, id_label, ka_label, job_id,
        root, pca, other_pca, identity, ka, issuer, device, job_identity,
        short_root, short_pca, short_device, d,
    )  # fmt: skip


def _openssl_verify(
    d: Path,
    leaf: str,
    *,
    untrusted: str | None = None,
    attime: int | None = None,
    root: str = "root.pem",
    purpose: str | None = None,
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None, "openssl binary is required"
    cmd = [OPENSSL, "verify", "-x509_strict", "-CAfile", str(d / root)]
    if purpose is not None:
        cmd += ["-purpose", purpose]
    if untrusted is not None:
        cmd += ["-untrusted", str(d / untrusted)]
    if attime is not None:
        cmd += ["-attime", str(attime)]
    cmd.append(str(d / leaf))
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_chains_pass_openssl_strict_and_library(chain: Chain) -> None:
    ok = _openssl_verify(chain.dir, "device.pem", untrusted="pca.pem", purpose="sslclient")
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    for leaf in ("identity.pem", "ka.pem"):
        ok = _openssl_verify(chain.dir, leaf)
        assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    validate_device_chain(
        chain.device, chain.pca, chain.root, job_id=chain.job_id, job_tag=chain.job_identity
    )
    validate_enclave_certificate(
        chain.identity, chain.root, purpose=EnclavePurpose.IDENTITY, role="programmer"
    )
    validate_enclave_certificate(
        chain.ka, chain.root, purpose=EnclavePurpose.KEY_AGREEMENT, role="programmer"
    )
    now = datetime.datetime.now(UTC)
    v = build_verifier(chain.root, purpose=DEVICE_PURPOSE, at=now).verify(
        chain.device, [chain.pca]
    )
    assert v.chain == [chain.device, chain.pca, chain.root]


def test_tampered_byte_fails_both(chain: Chain) -> None:
    der = bytearray(to_der(chain.device))
    i = der.index(b"00000000000003e8")
    der[i] = ord("1")
    tampered = load_der(bytes(der))
    (chain.dir / "tampered.pem").write_bytes(to_pem(tampered))
    res = _openssl_verify(chain.dir, "tampered.pem", untrusted="pca.pem")
    assert res.returncode != 0 and "signature failure" in (res.stdout + res.stderr)
    with pytest.raises(ChainValidationError):
        validate_device_chain(tampered, chain.pca, chain.root)
    with pytest.raises(VerificationError):
        build_verifier(chain.root, purpose=DEVICE_PURPOSE, at=datetime.datetime.now(UTC)).verify(
            tampered, [chain.pca]
        )


def test_swapped_issuer_fails_both(chain: Chain) -> None:
    res = _openssl_verify(chain.dir, "device.pem", untrusted="other_pca.pem")
    assert res.returncode != 0, res.stdout
    with pytest.raises(ChainValidationError):
        validate_device_chain(chain.device, chain.other_pca, chain.root)
    with pytest.raises(VerificationError):
        build_verifier(chain.root, purpose=DEVICE_PURPOSE, at=datetime.datetime.now(UTC)).verify(
            chain.device, [chain.other_pca]
        )


def test_default_chain_outlives_the_job_by_decades(chain: Chain) -> None:
    later = datetime.datetime.now(UTC) + datetime.timedelta(days=20 * 366)
    ok = _openssl_verify(
        chain.dir, "device.pem", untrusted="pca.pem", attime=int(later.timestamp()),
        purpose="sslclient",
    )  # fmt: skip
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    validate_device_chain(chain.device, chain.pca, chain.root, at=later)
    ok = _openssl_verify(chain.dir, "identity.pem", attime=int(later.timestamp()))
    assert ok.returncode != 0  # enclave certificates keep their 2-year validity


def test_expired_fails_both(chain: Chain) -> None:
    """A chain made with explicit, short lifetimes expires for both verifiers."""

    def verify_short(at: datetime.datetime | None = None) -> subprocess.CompletedProcess[str]:
        return _openssl_verify(
            chain.dir, "short_device.pem", untrusted="short_pca.pem", root="short_root.pem",
            attime=None if at is None else int(at.timestamp()),
        )  # fmt: skip

    assert verify_short().returncode == 0
    late = chain.short_pca.not_valid_after_utc + datetime.timedelta(days=1)
    res = verify_short(late)
    assert res.returncode != 0 and "expired" in (res.stdout + res.stderr)
    with pytest.raises(CertificateExpiredError):
        validate_device_chain(chain.short_device, chain.short_pca, chain.short_root, at=late)
    with pytest.raises(VerificationError):
        build_verifier(chain.short_root, purpose=DEVICE_PURPOSE, at=late).verify(
            chain.short_device, [chain.short_pca]
        )
    late_root = chain.short_root.not_valid_after_utc + datetime.timedelta(days=1)
    assert verify_short(late_root).returncode != 0
    with pytest.raises(CertificateExpiredError, match="root"):
        validate_device_chain(chain.short_device, chain.short_pca, chain.short_root, at=late_root)


def _list_objects(token: str) -> list[dict[str, str]]:
    """Parse ``pkcs11-tool --list-objects`` into one dict per object."""
    assert PKCS11_TOOL is not None, "pkcs11-tool (opensc) is required"
    pin = os.environ[f"SECURETHREAD_PIN_{token.upper()}"]
    res = subprocess.run(
        [
            PKCS11_TOOL, "--module", default_module_path(), "--token-label", token,
            "--login", "--pin", pin, "--list-objects",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    objects: list[dict[str, str]] = []
    for line in res.stdout.splitlines():
        m = re.match(r"^(Private Key|Public Key|Certificate|Secret Key|Data) Object", line)
        if m:
            objects.append({"class": m.group(1)})
        elif objects and ":" in line and line.startswith(" "):
            k, _, v = line.strip().partition(":")
            objects[-1].setdefault(k.strip(), v.strip())
    return objects


def test_pkcs11_tool_pairs_each_ca_key_with_its_certificate(
    chain: Chain, oem: Token, programmer: Token
) -> None:
    for token, label, cert in [
        ("oem", chain.root_label, chain.root),
        ("programmer", chain.pca_label, chain.pca),
        ("programmer", chain.identity_label, chain.identity),
        ("programmer", chain.ka_label, chain.ka),
    ]:
        objs = [o for o in _list_objects(token) if o.get("label") == label]
        by_class = {o["class"]: o for o in objs}
        assert set(by_class) == {"Private Key", "Public Key", "Certificate"}, objs
        ids = {o["ID"] for o in objs}
        # One CKA_ID for both halves and the certificate: a random value in the creation
        # template (a non-modifiable key cannot get its SKI as CKA_ID later, docs/keys.md).
        backend = oem if token == "oem" else programmer
        assert ids == {backend.private_key(label).key_id.hex()}, (label, ids)
        assert backend.certificate(label) == cert
        # ...which is not the certificate's subjectKeyIdentifier: that is SHA-1 of the public
        # point (RFC 5280 §4.2.1.2 method 1), computable from the certificate alone
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert ski == key_id_for(cert.public_key()) and ski.hex() not in ids
    # the token hands back the very certificate we issued, and the key never left
    assert oem.certificate(chain.root_label) == chain.root
    report = programmer.private_key(chain.pca_label).policy_report()
    assert report.sensitive and not report.extractable and report.never_extractable


def test_ten_thousand_device_serials(chain: Chain) -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(50)]
    serials: set[int] = set()
    tag = job_tag(chain.job_identity)
    certs = []
    for seq in range(10_000):
        cert = chain.issuer.issue(keys[seq % 50], f"{seq:016x}", seq)
        serials.add(cert.serial_number)
        parsed = parse_device_serial(cert.serial_number)
        assert parsed.job_tag == tag and parsed.sequence == seq
        if seq % 1000 == 0:
            certs.append(cert)
    assert len(serials) == 10_000
    assert all(0 < s < 1 << 159 for s in serials)  # positive, at most 20 octets
    for cert in certs:
        validate_device_chain(
            cert, chain.pca, chain.root, job_id=chain.job_id, job_tag=chain.job_identity
        )


def _object_count(token: Token) -> int:
    return len(list(token.session.get_objects()))


def test_refusals_write_nothing_to_the_token(chain: Chain, oem: Token, programmer: Token) -> None:
    before = (_object_count(oem), _object_count(programmer))
    with pytest.raises(DuplicateObjectError):
        create_root_ca(oem, label=chain.root_label)
    with pytest.raises(Error):
        create_root_ca(oem, label="never-root", not_after=datetime.datetime(2000, 1, 1, tzinfo=UTC))
    with pytest.raises(Error):
        create_root_ca(oem, label="never-root", common_name="x" * 65)
    with pytest.raises(Error):
        create_enclave_csr(
            programmer, label="never-ka", enclave_name="p", purpose=EnclavePurpose.KEY_AGREEMENT
        )
    with pytest.raises(Error):
        create_enclave_csr(
            programmer, label="never-id", enclave_name="bad name", purpose=EnclavePurpose.IDENTITY
        )
    with pytest.raises(Error):
        create_production_ca_csr(programmer, label="never-pca", job_id="job/../x")
    with pytest.raises(IssuerKeyMismatchError):
        install_certificate(programmer, chain.pca_label, chain.other_pca)
    with pytest.raises(CertificateError):
        DeviceCertificateIssuer(
            programmer.private_key(chain.identity_label),
            chain.pca,
            job_id=chain.job_id,
            job_tag=chain.job_identity,
            profile=DeviceProfile(organisation="Acme Devices"),
        )
    assert (_object_count(oem), _object_count(programmer)) == before
