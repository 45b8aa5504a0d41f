"""CRLs (RFC 5280 §5) with the software backend: content, accumulation, refusals."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError
from securethread.hsm import SoftwareBackend
from securethread.keys.protocol import PrivateKey
from securethread.pki import (
    NO_EXPIRY,
    DeviceCertificateIssuer,
    DeviceProfile,
    EnclavePurpose,
    Revocation,
    RevocationError,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    issue_crl,
    load_crl,
    refresh_crl,
    revoke_devices,
    revoke_production_ca,
)

UTC = datetime.UTC
R = x509.ReasonFlags


@attrs.frozen
class World:
    b: SoftwareBackend
    root: x509.Certificate
    pca: x509.Certificate
    other_pca: x509.Certificate
    identity: x509.Certificate
    devices: list[x509.Certificate]
    foreign_device: x509.Certificate

    def pca_key(self) -> PrivateKey:
        return self.b.private_key("pca")

    def root_key(self) -> PrivateKey:
        return self.b.private_key("oem-root-ca")


def _pca(b: SoftwareBackend, root: x509.Certificate, label: str, job: str) -> x509.Certificate:
    nb = datetime.datetime.now(UTC).replace(microsecond=0)
    csr = create_production_ca_csr(b, label=label, job_id=job)
    return certify_production_ca(b.private_key("oem-root-ca"), root, csr, job_id=job, not_before=nb)


def _issuer(
    b: SoftwareBackend, label: str, pca: x509.Certificate, job: str
) -> DeviceCertificateIssuer:
    return DeviceCertificateIssuer(
        b.private_key(label),
        pca,
        job_id=job,
        job_tag=hashlib.sha256(job.encode()).digest(),
        profile=DeviceProfile(organisation="Acme"),
    )


@pytest.fixture(scope="module")
def w() -> World:
    b = SoftwareBackend("crl")
    root = create_root_ca(b, organisation="Acme")
    pca, other = _pca(b, root, "pca", "job-1"), _pca(b, root, "pca2", "job-2")
    identity = certify_enclave(
        b.private_key("oem-root-ca"),
        root,
        create_enclave_csr(b, label="id", enclave_name="p1", purpose=EnclavePurpose.IDENTITY),
        enclave_name="p1",
        purpose=EnclavePurpose.IDENTITY,
        role="programmer",
    )
    issuer = _issuer(b, "pca", pca, "job-1")
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(3)]
    devices = [issuer.issue(k, f"{i + 1:016x}", i) for i, k in enumerate(keys)]
    foreign = _issuer(b, "pca2", other, "job-2").issue(keys[0], f"{1:016x}", 0)
    return World(b, root, pca, other, identity, devices, foreign)


def test_device_crl_content(w: World) -> None:
    at = datetime.datetime.now(UTC).replace(microsecond=0)
    pem = revoke_devices(w.pca_key(), w.pca, w.devices[:2], reason=R.key_compromise, at=at)
    assert pem.startswith(b"-----BEGIN X509 CRL-----")
    crl = load_crl(pem, w.pca)
    assert crl.issuer == w.pca.subject and crl.is_signature_valid(w.pca.public_key())  # type: ignore[arg-type]
    assert crl.last_update_utc == at and crl.next_update_utc == NO_EXPIRY
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA256)  # P-256 production CA
    number = crl.extensions.get_extension_for_class(x509.CRLNumber)
    assert number.value.crl_number == 1 and not number.critical
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    ski = w.pca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == ski.digest and not aki.critical
    assert len(crl.extensions) == 2  # no issuingDistributionPoint: a complete, direct CRL
    assert sorted(e.serial_number for e in crl) == sorted(d.serial_number for d in w.devices[:2])
    for e in crl:
        assert e.revocation_date_utc == at
        assert e.extensions.get_extension_for_class(x509.CRLReason).value.reason is R.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(w.devices[2].serial_number) is None


def test_crls_accumulate_and_count(w: World) -> None:
    t0 = datetime.datetime.now(UTC).replace(microsecond=0)
    first = revoke_devices(w.pca_key(), w.pca, [w.devices[0]], reason=R.superseded, at=t0)
    t1 = t0 + datetime.timedelta(hours=1)
    second = revoke_devices(
        w.pca_key(), w.pca, w.devices[:2], previous_crl=first, at=t1, reason=R.key_compromise
    )
    crl = load_crl(second, w.pca)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    by_serial = {e.serial_number: e for e in crl}
    # an already revoked device keeps its first entry (date and reason)
    kept = by_serial[w.devices[0].serial_number]
    assert kept.revocation_date_utc == t0
    assert kept.extensions.get_extension_for_class(x509.CRLReason).value.reason is R.superseded
    added = by_serial[w.devices[1].serial_number]
    assert added.revocation_date_utc == t1
    # unspecified: the reasonCode extension is absent (RFC 5280 §5.3.1)
    third = revoke_devices(
        w.pca_key(), w.pca, [w.devices[2]], previous_crl=load_crl(second, w.pca).public_bytes(
            serialization.Encoding.DER
        ), at=t1
    )  # fmt: skip
    entry = load_crl(third, w.pca).get_revoked_certificate_by_serial_number(
        w.devices[2].serial_number
    )
    assert entry is not None and len(entry.extensions) == 0
    refreshed = load_crl(refresh_crl(w.pca_key(), w.pca, third, at=t1), w.pca)
    assert refreshed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4
    assert len(refreshed) == 3


def test_root_crl_revokes_a_production_ca(w: World) -> None:
    empty = load_crl(refresh_crl(w.root_key(), w.root), w.root)
    assert len(empty) == 0 and isinstance(empty.signature_hash_algorithm, hashes.SHA384)
    pem = revoke_production_ca(w.root_key(), w.root, w.other_pca, reason=R.ca_compromise)
    crl = load_crl(pem, w.root)
    entry = crl.get_revoked_certificate_by_serial_number(w.other_pca.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is R.ca_compromise


@pytest.mark.parametrize(
    "reason",
    [R.ca_compromise, R.aa_compromise, R.certificate_hold, R.remove_from_crl, "keyCompromise", 1],
)
def test_device_reasons(w: World, reason: object) -> None:
    with pytest.raises(RevocationError, match="reason"):
        revoke_devices(w.pca_key(), w.pca, [w.devices[0]], reason=reason)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", [R.key_compromise, R.certificate_hold, R.remove_from_crl])
def test_production_ca_reasons(w: World, reason: x509.ReasonFlags) -> None:
    with pytest.raises(RevocationError, match="reason"):
        revoke_production_ca(w.root_key(), w.root, w.pca, reason=reason)


def test_only_what_the_issuer_issued_can_be_revoked(w: World) -> None:
    with pytest.raises(RevocationError, match="not issued by"):
        revoke_devices(w.pca_key(), w.pca, [w.foreign_device])
    with pytest.raises(CertificateError):  # an enclave certificate is not a device
        revoke_devices(w.pca_key(), w.pca, [w.identity])
    with pytest.raises(CertificateError):  # a CA is not a device
        revoke_devices(w.pca_key(), w.pca, [w.other_pca])
    with pytest.raises(RevocationError):
        revoke_devices(w.pca_key(), w.pca, [w.devices[0].public_bytes(serialization.Encoding.DER)])  # type: ignore[list-item]
    foreign_root = create_root_ca(SoftwareBackend("foreign"), organisation="Acme")
    with pytest.raises(RevocationError, match="not issued by"):
        revoke_production_ca(w.root_key(), foreign_root, w.pca)
    with pytest.raises(CertificateError):  # the key is not the certificate's
        revoke_devices(w.root_key(), w.pca, [w.devices[0]])
    with pytest.raises(CertificateError):  # a device certificate is not a production CA
        revoke_devices(w.pca_key(), w.devices[0], [w.devices[1]])


def test_previous_crl_must_be_the_issuers(w: World) -> None:
    mine = revoke_devices(w.pca_key(), w.pca, [w.devices[0]])
    theirs = revoke_devices(w.b.private_key("pca2"), w.other_pca, [])
    with pytest.raises(RevocationError, match="issued by"):
        revoke_devices(w.pca_key(), w.pca, [], previous_crl=theirs)
    der = bytearray(load_crl(mine, w.pca).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 1  # inside the signature
    for bad in (bytes(der), b"", b"garbage", mine + mine, b"-----BEGIN X509 CRL-----\nAA\n"):
        with pytest.raises(RevocationError):
            revoke_devices(w.pca_key(), w.pca, [], previous_crl=bad)
    early = load_crl(mine, w.pca).last_update_utc - datetime.timedelta(seconds=1)
    with pytest.raises(RevocationError, match="before the previous"):
        revoke_devices(w.pca_key(), w.pca, [], previous_crl=mine, at=early)


def test_issue_crl_refusals(w: World) -> None:
    now = datetime.datetime.now(UTC).replace(microsecond=0)
    r = Revocation(serial=5, revoked_at=now)
    key = w.pca_key()
    with pytest.raises(RevocationError, match="twice"):
        issue_crl(key, w.pca, [r, r], crl_number=1)
    with pytest.raises(RevocationError, match="after"):
        issue_crl(
            key, w.pca, [attrs.evolve(r, revoked_at=now + datetime.timedelta(1))],
            crl_number=1, this_update=now,
        )  # fmt: skip
    for n in (0, -1, 1 << 160, True):
        with pytest.raises(RevocationError, match="cRLNumber"):
            issue_crl(key, w.pca, [], crl_number=n)
    with pytest.raises(RevocationError, match="nextUpdate"):
        issue_crl(key, w.pca, [], crl_number=1, this_update=now, next_update=now)
    for serial in (0, -3, 1 << 160, "5"):
        with pytest.raises(RevocationError, match="serial"):
            Revocation(serial=serial, revoked_at=now)  # type: ignore[arg-type]
    # a CA certificate without cRLSign (RFC 5280 §4.2.1.3) cannot sign CRLs
    ku = x509.KeyUsage(False, False, False, False, False, True, False, False, False)
    no_crl_sign = (
        x509.CertificateBuilder()
        .subject_name(w.pca.subject)
        .issuer_name(w.pca.issuer)
        .public_key(w.pca.public_key())
        .serial_number(w.pca.serial_number)
        .not_valid_before(w.pca.not_valid_before_utc)
        .not_valid_after(w.pca.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(
            w.pca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value,
            critical=False,
        )
        .sign(w.root_key().as_cryptography(), hashes.SHA384())
    )
    with pytest.raises(RevocationError, match="cRLSign"):
        issue_crl(key, no_crl_sign, [], crl_number=1)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda pem: pem + pem,
        lambda pem: pem + b"junk",
        lambda pem: pem + b"\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        lambda pem: b"CRL follows\n" + pem,
        lambda pem: pem.replace(b"X509 CRL", b"CERTIFICATE"),
    ],
    ids=["two blocks", "junk after it", "a certificate after it", "text before it", "label"],
)
def test_a_crl_pem_is_one_block_alone(w: World, spoil: Any) -> None:
    """RFC 7468 §6: one "X509 CRL" block, nothing but whitespace around it."""
    pem = revoke_devices(w.pca_key(), w.pca, w.devices[:1], reason=R.unspecified)
    assert load_crl(b"\n" + pem + b"\n", w.pca).issuer == w.pca.subject
    with pytest.raises(RevocationError, match="^CRL: "):
        load_crl(spoil(pem), w.pca)
