"""Device identification: challenge, response, and every check the programmer makes."""

from __future__ import annotations

import datetime
import os

import attrs
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.device.sbm import SiliconVendor, SimulatedDevice
from securethread.errors import DeviceRefusedError
from securethread.formats import cbor
from securethread.formats.identity import (
    ChallengeMismatchError,
    DeviceIdMismatchError,
    IdentificationFormatError,
    IdentificationResponse,
    IdentityVerifier,
    KeyMismatchError,
    ProofOfPossessionError,
    UnknownVendorError,
    VendorCertificateError,
    new_challenge,
    pop_payload,
    verify_identification,
)


@pytest.fixture(scope="module")
def vendor() -> SiliconVendor:
    return SiliconVendor()


@pytest.fixture(scope="module")
def verifier(vendor: SiliconVendor) -> IdentityVerifier:
    return IdentityVerifier(
        [SiliconVendor("Another Vendor").root_certificate, vendor.root_certificate]
    )


def _response(dev: SimulatedDevice, challenge: bytes) -> IdentificationResponse:
    return IdentificationResponse.from_bytes(dev.identify(challenge))


def _der(cert) -> bytes:  # type: ignore[no-untyped-def]
    return cert.public_bytes(serialization.Encoding.DER)


def test_identify_and_verify(vendor: SiliconVendor, verifier: IdentityVerifier) -> None:
    dev = vendor.make_chip()
    ch = new_challenge()
    ident = verifier.verify(dev.identify(ch), challenge=ch)
    assert ident.device_id == dev.device_id
    assert ident.public_key == dev.public_key
    assert ident.vendor_certificate == dev.vendor_certificate
    same = verify_identification(
        dev.identify(ch), challenge=ch, vendor_roots=[vendor.root_certificate]
    )
    assert same.device_id == dev.device_id


def test_response_round_trip(vendor: SiliconVendor) -> None:
    raw = vendor.make_chip().identify(new_challenge())
    assert IdentificationResponse.from_bytes(raw).to_bytes() == raw


def test_stale_challenge(vendor: SiliconVendor, verifier: IdentityVerifier) -> None:
    dev = vendor.make_chip()
    old = dev.identify(new_challenge())
    with pytest.raises(ChallengeMismatchError, match=dev.device_id):
        verifier.verify(old, challenge=new_challenge())


def test_echoed_challenge_but_old_signature(
    vendor: SiliconVendor, verifier: IdentityVerifier
) -> None:
    """A replayer who rewrites the echoed challenge still lacks the device's signature."""
    dev = vendor.make_chip()
    r = _response(dev, new_challenge())
    fresh = new_challenge()
    replay = attrs.evolve(r, challenge=fresh).to_bytes()
    with pytest.raises(ProofOfPossessionError):
        verifier.verify(replay, challenge=fresh)


def test_unknown_vendor(vendor: SiliconVendor) -> None:
    dev = SiliconVendor("Counterfeit Fab").make_chip()
    ch = new_challenge()
    with pytest.raises(UnknownVendorError):
        IdentityVerifier([vendor.root_certificate]).verify(dev.identify(ch), challenge=ch)


def test_vendor_cert_forged_under_same_name(
    vendor: SiliconVendor, verifier: IdentityVerifier
) -> None:
    forger = SiliconVendor(vendor.name)  # same issuer name, another key
    dev = forger.make_chip()
    ch = new_challenge()
    with pytest.raises(VendorCertificateError, match="signature"):
        verifier.verify(dev.identify(ch), challenge=ch)


def test_vendor_cert_outside_validity(vendor: SiliconVendor, verifier: IdentityVerifier) -> None:
    dev = vendor.make_chip()
    ch = new_challenge()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365 * 30)
    with pytest.raises(VendorCertificateError, match="validity"):
        verifier.verify(dev.identify(ch), challenge=ch, at=later)


def test_vendor_cert_for_another_device(vendor: SiliconVendor, verifier: IdentityVerifier) -> None:
    """Device A presents B's certificate and signs with ... whichever key: the id binding fails."""
    a, b = vendor.make_chip(), vendor.make_chip()
    ch = new_challenge()
    r = _response(a, ch)
    forged = attrs.evolve(r, vendor_certificate=_der(b.vendor_certificate)).to_bytes()
    with pytest.raises(DeviceIdMismatchError):
        verifier.verify(forged, challenge=ch)


def test_answering_key_is_not_the_certified_key(
    vendor: SiliconVendor, verifier: IdentityVerifier
) -> None:
    dev = vendor.make_chip()
    ch = new_challenge()
    impostor = ec.generate_private_key(ec.SECP256R1())
    spki = impostor.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sig = impostor.sign(pop_payload(ch, dev.device_id, spki), ec.ECDSA(hashes.SHA256()))
    r = attrs.evolve(_response(dev, ch), public_key=spki, signature=sig)
    with pytest.raises(KeyMismatchError):
        verifier.verify(r.to_bytes(), challenge=ch)


def test_bad_proof_of_possession(vendor: SiliconVendor, verifier: IdentityVerifier) -> None:
    dev = vendor.make_chip()
    ch = new_challenge()
    r = _response(dev, ch)
    # signature over another challenge (domain-separated payload differs)
    other = _response(dev, new_challenge())
    with pytest.raises(ProofOfPossessionError):
        verifier.verify(attrs.evolve(r, signature=other.signature).to_bytes(), challenge=ch)


def test_vendor_cert_not_end_entity(vendor: SiliconVendor, verifier: IdentityVerifier) -> None:
    """A vendor-signed certificate without digitalSignature (here: a CA profile) is refused."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    dev = vendor.make_chip()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dev.device_id)]))
        .issuer_name(vendor.root_certificate.subject)
        .public_key(dev.public_key)
        .serial_number(1)
        .not_valid_before(dev.vendor_certificate.not_valid_before_utc)
        .not_valid_after(dev.vendor_certificate.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(vendor._key, hashes.SHA256())
    )
    ch = new_challenge()
    bad = attrs.evolve(_response(dev, ch), vendor_certificate=_der(cert)).to_bytes()
    with pytest.raises(VendorCertificateError, match="end-entity"):
        verifier.verify(bad, challenge=ch)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xa0",
        bytes(5000),
        cbor.encode({"v": 1}),
        cbor.encode([1, 2, 3]),
    ],
)
def test_malformed_responses(verifier: IdentityVerifier, raw: bytes) -> None:
    with pytest.raises(IdentificationFormatError):
        verifier.verify(raw, challenge=bytes(32))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", 1),  # the encoding before issue 21
        ("v", 3),
        ("device_id", "ABCDEF0123456789"),
        ("device_id", "0123"),
        ("challenge", b"short"),
        ("public_key", b""),
        ("vendor_certificate", b"x" * 100),
        ("sig", 7),
    ],
)
def test_bad_fields(
    vendor: SiliconVendor, verifier: IdentityVerifier, field: str, value: object
) -> None:
    ch = new_challenge()
    d = cbor.decode(vendor.make_chip().identify(ch))
    d[field] = value
    with pytest.raises(IdentificationFormatError):
        verifier.verify(cbor.encode(d), challenge=ch)


def test_errors_are_device_refusals() -> None:
    for exc in (
        ChallengeMismatchError,
        UnknownVendorError,
        VendorCertificateError,
        DeviceIdMismatchError,
        KeyMismatchError,
        ProofOfPossessionError,
        IdentificationFormatError,
    ):
        assert issubclass(exc, DeviceRefusedError)


def test_device_refuses_silly_challenges(vendor: SiliconVendor) -> None:
    dev = vendor.make_chip()
    for ch in (b"", b"x" * 15, os.urandom(65)):
        with pytest.raises(DeviceRefusedError):
            dev.identify(ch)
