"""The hardened loaders for certificates, CSRs and keys from outside (pki/untrusted.py), and
the boundaries that use them.  Vectors are named after the failure they once caused: a
``cryptography`` exception other than securethread.Error escaping from a parser."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
from asn1crypto import x509 as ax
from asn1crypto.csr import CertificationRequest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from securethread.errors import CertificateError, FormatError, URIError
from securethread.formats import cbor
from securethread.hsm.uri import PKCS11URI
from securethread.keys.policy import Curve
from securethread.pki import from_pem, load_csr, load_der
from securethread.pki.untrusted import (
    MalformedCertificateError,
    UnsupportedKeyError,
    guard,
    load_certificate,
    load_certificate_pem,
    load_certificate_with_key,
    load_csr_with_key,
    load_public_key,
    load_public_key_pem,
    pem_der,
)
from securethread.pki.untrusted import load_csr as untrusted_csr

pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

_NOW = datetime.datetime.now(datetime.UTC)
_SIGNER = ec.generate_private_key(ec.SECP256R1())
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _cert(
    key: Any = None, *, cn: str = "0011223344556677", cn_type: Any = None, serial: int = 7
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1()).public_key()
    attr = (
        x509.NameAttribute(NameOID.COMMON_NAME, cn, _type=cn_type)
        if cn_type
        else x509.NameAttribute(NameOID.COMMON_NAME, cn)
    )
    name = x509.Name([attr])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(_NOW)
        .not_valid_after(_NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, True, False, False, False, False),
            critical=True,
        )
        .sign(_SIGNER, hashes.SHA256())
        .public_bytes(DER)
    )


GOOD = _cert()


def _edit(fn: Any) -> bytes:
    """Re-encode GOOD after ``fn`` changed its TBS (the signature no longer matters: the
    loaders parse, validation verifies)."""
    cert = copy.deepcopy(ax.Certificate.load(GOOD))
    fn(cert["tbs_certificate"], cert)
    return bytes(cert.dump(force=True))


def _duplicate_extension(tbs: Any, _c: Any) -> None:
    tbs["extensions"].append(copy.deepcopy(tbs["extensions"][0]))


def _issuer_with_repeated_attribute(tbs: Any, _c: Any) -> None:
    issuer = ax.Name.build({"common_name": "Simulated Silicon Vendor"})
    issuer.chosen[0].append(copy.deepcopy(issuer.chosen[0][0]))  # one RDN, CN twice
    tbs["issuer"] = issuer


def _unknown_signature_algorithm(tbs: Any, cert: Any) -> None:
    cert["signature_algorithm"] = ax.SignedDigestAlgorithm({"algorithm": "1.2.3.4"})
    tbs["signature"] = ax.SignedDigestAlgorithm({"algorithm": "1.2.3.4"})


def _version_4(tbs: Any, _c: Any) -> None:
    tbs["version"] = 3


def _lone_surrogate_in_bmp_name() -> bytes:
    der = _cert(cn="QQ", cn_type=_ASN1Type.BMPString)
    marker = b"\x1e\x04\x00Q\x00Q"
    assert der.count(marker) == 2
    return der.replace(marker, b"\x1e\x04\xd8\x00\x00A")  # U+D800 alone is no character


def _bad_key_usage_bits() -> bytes:
    i = GOOD.index(bytes.fromhex("0603551d0f"))  # id-ce-keyUsage
    j = GOOD.index(b"\x03\x02", i)  # its BIT STRING: unused-bits octet next
    return GOOD[: j + 2] + b"\x09" + GOOD[j + 3 :]  # 9 unused bits: X.690 §8.6.2.2 says 0..7


HOSTILE_CERTIFICATES = {
    "duplicate-extension": (_edit(_duplicate_extension), "DuplicateExtension"),
    "issuer-with-repeated-attribute": (_edit(_issuer_with_repeated_attribute), "duplicate"),
    "unknown-signature-algorithm": (_edit(_unknown_signature_algorithm), "UnsupportedAlgorithm"),
    "version-4": (_edit(_version_4), "InvalidVersion"),
    "lone-surrogate-in-bmp-name": (_lone_surrogate_in_bmp_name(), "malformed"),
    "key-usage-with-9-unused-bits": (_bad_key_usage_bits(), "malformed"),
    "negative-serial": (_edit(lambda tbs, _c: tbs.__setitem__("serial_number", -5)), "serial"),
    "trailing-byte": (GOOD + b"\x00", "malformed"),
    "truncated": (GOOD[:-1], "malformed"),
    "not-der": (b"\x30\x03\x02\x01", "malformed"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CERTIFICATES))
def test_hostile_certificates_raise_malformed(name: str) -> None:
    der, reason = HOSTILE_CERTIFICATES[name]
    with pytest.raises(MalformedCertificateError, match=reason) as info:
        load_certificate(der, what="vendor certificate")
    assert str(info.value).startswith("vendor certificate")
    assert isinstance(info.value, FormatError) and isinstance(info.value, CertificateError)


def test_each_hostile_certificate_trips_raw_cryptography() -> None:
    """The vectors are real: unguarded cryptography raises a non-securethread exception for
    each, at load or at first access of a field (so the loader's forcing matters)."""
    for name, (der, _reason) in HOSTILE_CERTIFICATES.items():
        with pytest.raises(Exception) as info:  # noqa: B017,PT011 - any class will do
            cert = x509.load_der_x509_certificate(der)
            cert.subject.rfc4514_string()
            cert.issuer.public_bytes()
            list(cert.extensions)
            cert.signature_hash_algorithm  # noqa: B018
            if cert.serial_number <= 0 or cert.public_bytes(DER) != der:
                raise ValueError("caught by the loader's explicit checks")
        assert not isinstance(info.value, FormatError), name


def test_good_certificate_loads_and_every_field_reads() -> None:
    cert = load_certificate(GOOD, what="vendor certificate", curves=(Curve.P256,))
    assert cert.public_bytes(DER) == GOOD
    assert cert.subject.rfc4514_string() == "CN=0011223344556677"
    assert load_der(GOOD) == cert
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert load_certificate_pem(pem) == cert
    with pytest.raises(MalformedCertificateError, match="exactly one PEM block"):
        load_certificate_pem(pem + pem)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(), "not an EC"),
        (ed25519.Ed25519PrivateKey.generate().public_key(), "not an EC"),
        (ec.generate_private_key(ec.SECP521R1()).public_key(), "curve secp521r1"),
        (ec.generate_private_key(ec.SECP256K1()).public_key(), "curve secp256k1"),
    ],
    ids=["rsa", "ed25519", "secp521r1", "secp256k1"],
)
def test_non_ec_keys_and_other_curves_are_refused(key: Any, message: str) -> None:
    with pytest.raises(UnsupportedKeyError, match=message):
        load_certificate(_cert(key), what="peer identity certificate")
    with pytest.raises(UnsupportedKeyError, match=message):
        load_public_key(key.public_bytes(DER, SPKI), what="firmware-signing key")


def test_curve_restriction() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert load_certificate(_cert(p384), what="c") is not None
    with pytest.raises(UnsupportedKeyError, match="secp384r1, not on P256"):
        load_certificate(_cert(p384), what="c", curves=(Curve.P256,))


@pytest.mark.parametrize(
    "data",
    [
        "not bytes",
        b"",
        b"\x30" * 20000,
        ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(DER, SPKI) + b"\x00",
        # id-ecPublicKey on an unknown named curve: cryptography raises UnsupportedAlgorithm.
        bytes.fromhex("3019301306072a8648ce3d020106082a8648ce3d0301ff030200ff"),
    ],
    ids=["str", "empty", "oversize", "trailing", "unknown-curve"],
)
def test_malformed_public_keys(data: Any) -> None:
    with pytest.raises(MalformedCertificateError, match="^firmware-signing key: "):
        load_public_key(data, what="firmware-signing key")


def test_compressed_point_spki_is_not_canonical() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(DER, SPKI)
    assert load_public_key(der, curves=(Curve.P256,)) == key
    compressed = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200") + (
        key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    )
    with pytest.raises(MalformedCertificateError, match="not canonical"):
        load_public_key(compressed)


def test_the_with_key_loaders_return_the_key_they_checked() -> None:
    """Validators return what they proved: the certificate's (the request's) key, typed EC
    and on the curves asked for, so a caller needs no ``isinstance`` of its own."""
    p256 = ec.generate_private_key(ec.SECP256R1())
    cert, key = load_certificate_with_key(_cert(p256.public_key()), curves=(Curve.P256,))
    assert isinstance(key, ec.EllipticCurvePublicKey) and key == p256.public_key()
    assert key == cert.public_key()
    csr, csr_key = load_csr_with_key(_csr(p256).public_bytes(DER), curves=(Curve.P256,))
    assert csr_key == p256.public_key() == csr.public_key()
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(UnsupportedKeyError, match="secp384r1, not on P256"):
        load_certificate_with_key(_cert(p384.public_key()), what="c", curves=(Curve.P256,))
    with pytest.raises(UnsupportedKeyError, match="secp384r1, not on P256"):
        load_csr_with_key(_csr(p384).public_bytes(DER), what="r", curves=(Curve.P256,))


def _csr(key: Any, *, duplicate: bool = False) -> x509.CertificateSigningRequest:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prog1")])
    )
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256())


def test_csr_loading() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = _csr(key)
    der, pem = csr.public_bytes(DER), csr.public_bytes(serialization.Encoding.PEM)
    assert untrusted_csr(der) == csr and load_csr(pem) == csr
    with pytest.raises(MalformedCertificateError, match="exactly one PEM block"):
        load_csr(pem + pem)
    with pytest.raises(MalformedCertificateError, match="^CSR: "):
        load_csr(der + b"\x00")
    with pytest.raises(MalformedCertificateError):
        load_csr(der[:-3])
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(UnsupportedKeyError, match="not an EC key"):
        load_csr(_csr(rsa_key).public_bytes(DER))
    dup = copy.deepcopy(CertificationRequest.load(der))
    exts = dup["certification_request_info"]["attributes"][0]["values"][0]  # extensionRequest
    exts.append(copy.deepcopy(exts[0]))
    with pytest.raises(MalformedCertificateError, match="DuplicateExtension"):
        load_csr(bytes(dup.dump(force=True)))


def test_guard_converts_parsing_errors_only() -> None:
    with pytest.raises(MalformedCertificateError, match="^thing: malformed \\(ValueError: x\\)"):
        with guard("thing"):
            raise ValueError("x")
    with pytest.raises(RuntimeError):
        with guard("thing"):
            raise RuntimeError("a bug stays a bug")


# --- the boundaries ---------------------------------------------------------------------------


def test_identification_with_hostile_vendor_certificate_is_a_refusal() -> None:
    from securethread.formats.identity import (
        IdentificationFormatError,
        IdentificationResponse,
        IdentityVerifier,
    )

    vendor_root = x509.load_der_x509_certificate(_cert())
    verifier = IdentityVerifier([vendor_root])
    challenge = bytes(32)
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(DER, SPKI)
    for name, (der, _reason) in HOSTILE_CERTIFICATES.items():
        if not 64 <= len(der) <= 2048:
            continue
        response = IdentificationResponse(
            challenge=challenge, device_id="0011223344556677", public_key=key,
            vendor_certificate=der, signature=b"\x30" * 70,
        ).to_bytes()  # fmt: skip
        with pytest.raises(IdentificationFormatError, match="vendor certificate"):
            verifier.verify(response, challenge=challenge)
        assert name


def test_license_with_hostile_signer_certificate_is_a_license_error() -> None:
    from securethread.formats.license import LicenseFormatError, open_license

    rsa_cert = _cert(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())
    for der in (rsa_cert, HOSTILE_CERTIFICATES["duplicate-extension"][0]):
        data = cbor.encode({"v": 2, "certificate": der, "envelope": b"\xa0"})
        with pytest.raises(LicenseFormatError, match="license: signer certificate"):
            open_license(
                data, device_id="0011223344556677", device_key=_SIGNER,
                oem_root=x509.load_der_x509_certificate(GOOD), image_id="fw",
                image_key_id=b"k",
            )  # fmt: skip


def test_provisioning_data_with_hostile_certificate_is_a_format_refusal() -> None:
    from securethread.device.sbm import ProvisioningData, ProvisioningFormatError

    keys = ("device_certificate", "production_ca_certificate", "oem_root_certificate")
    fields: dict[str, Any] = {k: GOOD for k in (*keys, "device_trust")}
    fields["v"] = 3
    for name, (der, _reason) in HOSTILE_CERTIFICATES.items():
        data = cbor.encode({**fields, "production_ca_certificate": der})
        with pytest.raises(ProvisioningFormatError, match="field 'production_ca_certificate'"):
            ProvisioningData.from_bytes(data)
        assert name


def test_inspect_shows_a_hostile_certificate_as_unparsable() -> None:
    from securethread.audit.inspect import describe
    from securethread.formats import envelope

    signer = _Signer()
    env = envelope.seal("license", {"v": 2}, [signer])  # type: ignore[list-item]
    der = HOSTILE_CERTIFICATES["lone-surrogate-in-bmp-name"][0]
    view = describe(cbor.encode({"v": 2, "certificate": der, "envelope": env}))
    assert "not a parsable certificate" in view["certificate"]["note"]


class _Signer:
    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("pkcs11:token=\ud800", "non-character"),
        ("pkcs11:object=a?pin-source=\udcff", "non-character"),
        ("pkcs11:slot-id=" + "9" * 5000, "slot-id"),
        ("pkcs11:slot-id=18446744073709551616", "below 2\\^64"),
    ],
    ids=["lone-surrogate-path", "lone-surrogate-query", "5000-digit-slot", "slot-2^64"],
)
def test_pkcs11_uri_hostile_text(uri: str, message: str) -> None:
    with pytest.raises(URIError, match=message):
        PKCS11URI.parse(uri)
    assert PKCS11URI.parse("pkcs11:slot-id=18446744073709551615").slot_id == 2**64 - 1


# --- serial numbers: at most 20 octets (RFC 5280 §4.1.2.2) -------------------------------------


def _signed_with_serial(serial: int) -> bytes:
    """GOOD with another serial, signed again: a certificate valid in every other respect."""
    cert = copy.deepcopy(ax.Certificate.load(GOOD))
    cert["tbs_certificate"]["serial_number"] = serial
    tbs = cert["tbs_certificate"].dump(force=True)
    cert["signature_value"] = _SIGNER.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return bytes(cert.dump(force=True))


@pytest.mark.parametrize(
    ("serial", "octets"), [(1 << 159, 21), ((1 << 160) - 1, 21), (1 << 200, 26)]
)
def test_a_serial_over_20_octets_is_refused(serial: int, octets: int) -> None:
    der = _signed_with_serial(serial)
    raw = x509.load_der_x509_certificate(der)  # cryptography parses it, signature and all
    assert raw.serial_number == serial
    _SIGNER.public_key().verify(raw.signature, raw.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(MalformedCertificateError, match=f"serial number of {octets} octets"):
        load_certificate(der, what="vendor certificate")
    with pytest.raises(MalformedCertificateError, match=f"serial number of {octets} octets"):
        load_certificate_pem(raw.public_bytes(serialization.Encoding.PEM))


def test_a_serial_of_exactly_20_octets_loads() -> None:
    serial = (1 << 159) - 1  # 159 bits: 20 octets with the sign bit
    assert load_certificate(_signed_with_serial(serial)).serial_number == serial


# --- PEM: one block of the expected label, nothing around it but whitespace (RFC 7468) ----------


def _pem_cases(pem: bytes, other: bytes) -> dict[str, bytes]:
    """``pem`` spoiled in each way a PEM loader must refuse; ``other`` is a second block."""
    body = pem.split(b"\n", 1)[1].rsplit(b"-----END", 1)[0]
    return {
        "two blocks": pem + pem,
        "a block of another kind after it": pem + other,
        "junk after it": pem + b"junk",
        "junk on the next line": pem + b"\nsomething else\n",
        "text before it": b"Certificate:\n    Data: ...\n" + pem,
        "a NUL after it": pem + b"\x00",
        "a bad base64 character": pem.replace(body[:4], b"!" + body[1:4], 1),
        "base64 cut short": pem.replace(body, body[:-6] + b"\n", 1),
    }


def _pem_loaders() -> dict[str, tuple[bytes, bytes, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem = load_der(GOOD).public_bytes(serialization.Encoding.PEM)
    key_pem = key.public_key().public_bytes(serialization.Encoding.PEM, SPKI)
    csr_pem = _csr(key).public_bytes(serialization.Encoding.PEM)
    return {
        "certificate": (cert_pem, key_pem, load_certificate_pem),
        "from_pem": (cert_pem, key_pem, from_pem),
        "public key": (key_pem, cert_pem, load_public_key_pem),
        "CSR": (csr_pem, cert_pem, load_csr),
    }


PEM_LOADERS = _pem_loaders()
SPOILED = sorted(_pem_cases(b"-----BEGIN X-----\nAAAA\n-----END X-----\n", b""))


@pytest.mark.parametrize("spoiled", SPOILED)
@pytest.mark.parametrize("loader", sorted(PEM_LOADERS))
def test_pem_loaders_refuse_extra_blocks_and_trailing_data(loader: str, spoiled: str) -> None:
    pem, other, load = PEM_LOADERS[loader]
    load(b"\n " + pem + b"\n\n")  # the block alone, whitespace around it: accepted
    with pytest.raises(MalformedCertificateError):
        load(_pem_cases(pem, other)[spoiled])


@pytest.mark.parametrize("loader", sorted(PEM_LOADERS))
def test_pem_loaders_refuse_a_block_of_another_label(loader: str) -> None:
    pem, other, load = PEM_LOADERS[loader]
    with pytest.raises(MalformedCertificateError, match="a PEM block of"):
        load(other)


def test_pem_der_returns_the_der_of_the_one_block() -> None:
    pem = load_der(GOOD).public_bytes(serialization.Encoding.PEM)
    assert pem_der(pem, ("CERTIFICATE",), what="c") == GOOD
    assert pem_der(pem.replace(b"\n", b"\r\n"), ("CERTIFICATE",), what="c") == GOOD
