"""Issuance and validation with the software backend: profiles, refusals, specific errors."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securethread.errors import CertificateError, DuplicateObjectError, FormatError
from securethread.hsm import SoftwareBackend
from securethread.pki import (
    BadRequestSignatureError,
    CARequestError,
    CertificateExpiredError,
    CertificateNotYetValidError,
    ChainValidationError,
    DeviceCertificateIssuer,
    DeviceProfile,
    EnclavePurpose,
    IssuerError,
    IssuerKeyMismatchError,
    IssuerNotValidError,
    JobMismatchError,
    NameNotAllowedError,
    ProfileMismatchError,
    SerialNumberError,
    UnexpectedExtensionError,
    ValidityBeyondIssuerError,
    WrongKeyTypeError,
    WrongPurposeError,
    cert_fingerprint,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    device_id_of,
    from_pem,
    job_id_of,
    load_csr,
    load_der,
    oids,
    parse_device_serial,
    to_der,
    to_pem,
    validate_device_chain,
    validate_enclave_certificate,
)
from securethread.pki.profile import (
    DEVICE,
    NO_EXPIRY,
    enclave_request_subject,
    production_ca_request_subject,
)
from securethread.pki.serial import job_tag

UTC = datetime.UTC
DEVICE_ID = "00000000000003e8"
ORG = "Acme Devices"
#: The job's identity (SHA-256 of the signed job); its first 8 octets tag every serial.
JOB_1 = hashlib.sha256(b"signed job-1").digest()
PROFILE = DeviceProfile(organisation=ORG, product="Thermostat")
ARC = "1.3.6.1.4.1.32473.7"  # RFC 5612: the Private Enterprise Number for documentation
#: A job profile with every optional field: the OEM's arc, a URI, both revocation sources.
FULL = DeviceProfile(
    organisation=ORG,
    product="Thermostat",
    uri_template="https://devices.example.com/thermostat/{device_id}",
    crl_url="http://pki.example.com/crl/job-2.crl",
    ocsp_url="http://ocsp.example.com/",
    oem_arc=ARC,
)


@attrs.frozen
class Pki:
    oem: SoftwareBackend
    prog: SoftwareBackend
    root: x509.Certificate
    pca: x509.Certificate
    identity: x509.Certificate
    issuer: DeviceCertificateIssuer
    arc_pca: x509.Certificate  # job-2, certified under the OEM arc
    arc_issuer: DeviceCertificateIssuer  # job-2's, with the FULL profile


def _window(days: int = 30) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(UTC).replace(microsecond=0)
    return now, now + datetime.timedelta(days=days)


def _issuer(
    prog: SoftwareBackend,
    label: str,
    pca: x509.Certificate,
    job_id: str,
    profile: DeviceProfile = PROFILE,
) -> DeviceCertificateIssuer:
    tag = hashlib.sha256(f"signed {job_id}".encode()).digest()
    return DeviceCertificateIssuer(
        prog.private_key(label), pca, job_id=job_id, job_tag=tag, profile=profile
    )


@pytest.fixture(scope="module")
def pki() -> Pki:
    oem, prog = SoftwareBackend("oem"), SoftwareBackend("programmer")
    root = create_root_ca(oem, organisation=ORG, common_name="Acme Root CA")
    rk = oem.private_key("oem-root-ca")
    nb, _ = _window()
    pca = certify_production_ca(
        rk,
        root,
        create_production_ca_csr(prog, label="pca-job-1", job_id="job-1"),
        job_id="job-1",
        not_before=nb,
    )
    identity = certify_enclave(
        rk,
        root,
        create_enclave_csr(
            prog, label="identity", enclave_name="prog-1", purpose=EnclavePurpose.IDENTITY
        ),
        enclave_name="prog-1",
        purpose=EnclavePurpose.IDENTITY,
        role="programmer",
    )
    issuer = _issuer(prog, "pca-job-1", pca, "job-1")
    arc_pca = certify_production_ca(
        rk,
        root,
        create_production_ca_csr(prog, label="pca-job-2", job_id="job-2"),
        job_id="job-2",
        not_before=nb,
        oem_arc=ARC,
    )
    arc_issuer = _issuer(prog, "pca-job-2", arc_pca, "job-2", FULL)
    return Pki(oem, prog, root, pca, identity, issuer, arc_pca, arc_issuer)


@attrs.frozen
class ShortChain:
    """A root and production CA with explicit, short lifetimes (expiry tests)."""

    root: x509.Certificate
    pca: x509.Certificate
    issuer: DeviceCertificateIssuer


@pytest.fixture(scope="module")
def short() -> ShortChain:
    b = SoftwareBackend("short")
    nb, na = _window(30)
    root = create_root_ca(b, organisation=ORG, not_after=nb + datetime.timedelta(days=365))
    pca = certify_production_ca(
        b.private_key("oem-root-ca"),
        root,
        create_production_ca_csr(b, label="pca", job_id="job-s"),
        job_id="job-s",
        not_before=root.not_valid_before_utc,
        not_after=na,
    )
    profile = DeviceProfile(organisation=ORG, not_after=na)
    return ShortChain(root, pca, _issuer(b, "pca", pca, "job-s", profile))


def _root_key(pki: Pki):  # type: ignore[no-untyped-def]
    return pki.oem.private_key("oem-root-ca")


def _device_key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def _csr(subject: x509.Name, key: ec.EllipticCurvePrivateKey, *exts: x509.ExtensionType):
    b = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for e in exts:
        b = b.add_extension(e, critical=True)
    return b.sign(key, hashes.SHA256())


# --- happy paths ----------------------------------------------------------------------------------


def test_device_chain_validates(pki: Pki) -> None:
    cert = pki.issuer.issue(_device_key(), DEVICE_ID, 42)
    assert validate_device_chain(cert, pki.pca, pki.root, job_id="job-1", job_tag=JOB_1) is None
    assert device_id_of(cert) == DEVICE_ID
    assert job_id_of(pki.pca) == "job-1"
    assert parse_device_serial(cert.serial_number).sequence == 42
    assert parse_device_serial(cert.serial_number).belongs_to(JOB_1)
    # RFC 5280 §4.1.2.5 / IEEE 802.1AR: no well-defined expiration, for the whole chain
    assert cert.not_valid_after_utc == pki.pca.not_valid_after_utc == NO_EXPIRY
    assert pki.root.not_valid_after_utc == NO_EXPIRY
    assert cert.not_valid_before_utc == pki.pca.not_valid_before_utc
    assert cert.subject.rfc4514_string() == (
        f"CN={DEVICE_ID},2.5.4.5={DEVICE_ID},OU=Thermostat,O={ORG}"
    )
    assert pki.pca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == ORG
    assert pki.root.subject.rfc4514_string() == f"CN=Acme Root CA,O={ORG}"
    # X.520 serialNumber is a PrintableString (RFC 5280 Appendix A.1)
    sn = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0]
    assert sn._type == x509.name._ASN1Type.PrintableString


def test_serial_refuses_another_jobs_tag(pki: Pki) -> None:
    cert = pki.issuer.issue(_device_key(), DEVICE_ID, 43)
    other = hashlib.sha256(b"another signed job").digest()
    with pytest.raises(SerialNumberError, match="not of job"):
        validate_device_chain(cert, pki.pca, pki.root, job_tag=other)
    from securethread.pki import DeviceChainValidator

    with pytest.raises(SerialNumberError):
        DeviceChainValidator(pki.pca, pki.root, job_tag=other).validate(cert)


def test_common_name_template(pki: Pki) -> None:
    profile = DeviceProfile(organisation=ORG, common_name_template="sensor-{device_id}.v1")
    issuer = _issuer(pki.prog, "pca-job-1", pki.pca, "job-1", profile)
    cert = issuer.issue(_device_key(), "0123456789abcdef", 3)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "sensor-0123456789abcdef.v1"
    assert device_id_of(cert) == "0123456789abcdef"  # from serialNumber, not the CN
    assert not cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    validate_device_chain(cert, pki.pca, pki.root)


def test_device_profile_must_fit_the_production_ca(pki: Pki, short: ShortChain) -> None:
    b = SoftwareBackend("fit")
    _, na = _window(30)
    root = create_root_ca(b, organisation=ORG)
    pca = certify_production_ca(
        b.private_key("oem-root-ca"),
        root,
        create_production_ca_csr(b, label="pca", job_id="job-f"),
        job_id="job-f",
        not_before=root.not_valid_before_utc,
        not_after=na,
    )
    with pytest.raises(ValidityBeyondIssuerError, match="after the production CA"):
        _issuer(b, "pca", pca, "job-f")  # devices to 9999, CA to +30 days
    with pytest.raises(ValidityBeyondIssuerError, match="notBefore"):
        _issuer(
            b,
            "pca",
            pca,
            "job-f",
            DeviceProfile(organisation=ORG, not_after=pca.not_valid_before_utc),
        )
    for tag in (b"", b"short", b"x" * 65):
        with pytest.raises(SerialNumberError):
            DeviceCertificateIssuer(
                b.private_key("pca"), pca, job_id="job-f", job_tag=tag, profile=PROFILE
            )
    with pytest.raises(TypeError):
        DeviceCertificateIssuer(
            b.private_key("pca"), pca, job_id="job-f", job_tag=JOB_1, profile=PROFILE.to_map()
        )  # type: ignore[arg-type]
    assert short.issuer.issue(_device_key(), DEVICE_ID, 1).not_valid_after_utc == (
        short.pca.not_valid_after_utc
    )


@pytest.mark.parametrize("full", [False, True], ids=["default-profile", "full-profile"])
def test_template_matches_certificate_builder(pki: Pki, full: bool) -> None:
    """The spliced TBS is byte-identical to what x509.CertificateBuilder encodes (with the
    device id in serialNumber, CN and -- full profile -- the subjectAltName URI)."""
    key = _device_key()
    issuer, pca, profile = (
        (pki.arc_issuer, pki.arc_pca, FULL) if full else (pki.issuer, pki.pca, PROFILE)
    )
    cert = issuer.issue(key, "0123456789abcdef", 99)
    tag = job_tag(hashlib.sha256(f"signed job-{2 if full else 1}".encode()).digest())
    assert cert.serial_number == int.from_bytes(b"\x02" + tag + bytes(7) + b"\x63")
    ski = pca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    b = (
        x509.CertificateBuilder()
        .subject_name(profile.subject("0123456789abcdef"))
        .issuer_name(pca.subject)
        .public_key(key)
        .serial_number(cert.serial_number)
        .not_valid_before(pca.not_valid_before_utc)
        .not_valid_after(profile.not_after)
    )
    tail = profile.device_extensions("0123456789abcdef")
    for ext, critical in DEVICE.extensions(key, ski, oem_arc=profile.oem_arc, tail=tail):
        b = b.add_extension(ext, critical=critical)
    expected = b.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    assert cert.tbs_certificate_bytes == expected.tbs_certificate_bytes
    assert cert.signature_algorithm_oid == expected.signature_algorithm_oid
    # a second device: every occurrence of the id was spliced
    other = issuer.issue(key, "fedcba9876543210", 100)
    assert b"0123456789abcdef" not in other.tbs_certificate_bytes
    assert other.tbs_certificate_bytes.count(b"fedcba9876543210") == (3 if full else 2)


def test_profiles_have_exact_extensions(pki: Pki) -> None:
    dev = pki.issuer.issue(_device_key(), DEVICE_ID, 1)
    arc_dev = pki.arc_issuer.issue(_device_key(), DEVICE_ID, 1)
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    for cert, ca, plen, eku, policy in [
        (pki.root, True, None, None, None),
        (pki.pca, True, 0, None, None),  # CAs: no EKU; no policy without an OEM arc
        (pki.arc_pca, True, 0, None, x509.ObjectIdentifier(f"{ARC}.2")),
        (pki.identity, False, None, [oids.EKU_ENCLAVE_IDENTITY], None),
        (dev, False, None, [client], None),
        (arc_dev, False, None, [client, x509.ObjectIdentifier(f"{ARC}.1")], None),
    ]:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca is ca and bc.value.path_length == plen
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.key_cert_sign is ca and ku.value.crl_sign is ca
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert not ski.critical
        assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        if eku is None:
            with pytest.raises(x509.ExtensionNotFound):
                cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        else:
            ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
            assert not ext.critical and list(ext.value) == eku
        if policy is None:
            with pytest.raises(x509.ExtensionNotFound):
                cert.extensions.get_extension_for_class(x509.CertificatePolicies)
        else:
            cp = cert.extensions.get_extension_for_class(x509.CertificatePolicies)
            assert not cp.critical
            assert list(cp.value) == [x509.PolicyInformation(policy, None)]
    assert pki.root.public_key().curve.name == "secp384r1"
    assert pki.identity.public_key().curve.name == "secp384r1"
    assert pki.pca.public_key().curve.name == "secp256r1"
    # AKI of each issued cert = issuer SKI (RFC 5280 §4.2.1.1)
    aki = dev.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.pca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    # the default profile names no URI and no revocation source
    for cls in (x509.SubjectAlternativeName, x509.CRLDistributionPoints,
                x509.AuthorityInformationAccess):  # fmt: skip
        with pytest.raises(x509.ExtensionNotFound):
            dev.extensions.get_extension_for_class(cls)


def test_full_profile_names_and_revocation_sources(pki: Pki) -> None:
    """RFC 5280 §4.2.1.6 subjectAltName URI, §4.2.1.13 cRLDistributionPoints (a fullName
    URI, no reasons, no cRLIssuer) and §4.2.2.1 authorityInfoAccess id-ad-ocsp, all
    non-critical, exactly as the job's profile gives them."""
    dev = pki.arc_issuer.issue(_device_key(), DEVICE_ID, 2)
    san = dev.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert list(san.value) == [
        x509.UniformResourceIdentifier(f"https://devices.example.com/thermostat/{DEVICE_ID}")
    ]
    cdp = dev.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not cdp.critical
    (dp,) = cdp.value
    assert dp.full_name == [x509.UniformResourceIdentifier("http://pki.example.com/crl/job-2.crl")]
    assert dp.reasons is None and dp.crl_issuer is None and dp.relative_name is None
    aia = dev.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    assert not aia.critical
    assert list(aia.value) == [
        x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP,
            x509.UniformResourceIdentifier("http://ocsp.example.com/"),
        )
    ]
    validate_device_chain(dev, pki.arc_pca, pki.root, job_id="job-2", profile=FULL)
    # the pyca verifier's stock client policy (RFC 5280 + its defaults) accepts the device:
    # it needs the subjectAltName (the default profile has none, and is refused)
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    verifier = PolicyBuilder().store(Store([pki.root])).build_client_verifier()
    assert verifier.verify(dev, [pki.arc_pca]).subjects == list(san.value)
    with pytest.raises(VerificationError, match="subjectAltName"):
        verifier.verify(pki.issuer.issue(_device_key(), DEVICE_ID, 2), [pki.pca])


def _oids_in(der: bytes) -> list[str]:
    """Every OBJECT IDENTIFIER (X.690 §8.19) anywhere in a DER structure, dotted."""
    found: list[str] = []

    def walk(data: bytes) -> None:
        i = 0
        while i < len(data):
            tag, length = data[i], data[i + 1]
            i += 2
            if length & 0x80:
                n = length & 0x7F
                length = int.from_bytes(data[i : i + n], "big")
                i += n
            body = data[i : i + length]
            i += length
            if tag == 0x06:
                arcs, value = [], 0
                for byte in body:
                    value = (value << 7) | (byte & 0x7F)
                    if not byte & 0x80:
                        arcs.append(value)
                        value = 0
                first = min(arcs[0] // 40, 2)
                found.append(".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]])))
            elif tag & 0x20 or tag in (0x03, 0x04) and body[:1] in (b"\x00", b"\x30"):
                # constructed; a BIT/OCTET STRING that wraps DER (extension values, SPKI)
                try:
                    walk(body[1:] if tag == 0x03 else body)
                except IndexError:
                    pass  # not DER inside: plain bytes

    walk(der)
    return found


def test_no_project_oid_reaches_the_field(pki: Pki) -> None:
    """Root, production CAs, devices and their CRLs carry no OID of the project's UUID arc
    and none wider than 31 bits per arc (Go's and GnuTLS's limit; issue 19)."""
    from securethread.pki import refresh_crl

    certs = [
        pki.root,
        pki.pca,
        pki.arc_pca,
        pki.issuer.issue(_device_key(), DEVICE_ID, 3),
        pki.arc_issuer.issue(_device_key(), DEVICE_ID, 3),
    ]
    crls = [
        refresh_crl(pki.prog.private_key("pca-job-2"), pki.arc_pca),
        refresh_crl(_root_key(pki), pki.root),
    ]
    ders = [to_der(c) for c in certs] + [
        x509.load_pem_x509_crl(c).public_bytes(serialization.Encoding.DER) for c in crls
    ]
    found = [oid for der in ders for oid in _oids_in(der)]
    # the walker reaches inside extension values: key purposes, the OEM's purpose and policy
    assert {"1.3.6.1.5.5.7.3.2", f"{ARC}.1", f"{ARC}.2", "2.5.29.20"} <= set(found)
    for oid in found:
        assert not oid.startswith("2.25."), oid
        assert all(int(a) < 1 << 31 for a in oid.split(".")), oid
    # the walker does see the enclave certificates' project arc (internal only)
    assert any(o.startswith(f"{oids.ARC}.") for o in _oids_in(to_der(pki.identity)))


@pytest.mark.parametrize(
    "purpose,curve",
    [
        (EnclavePurpose.LICENSE_SIGNING, "secp256r1"),
        (EnclavePurpose.LEDGER_SIGNING, "secp256r1"),
    ],
)
def test_signing_enclave_certs(pki: Pki, purpose: EnclavePurpose, curve: str) -> None:
    label = f"enclave-{purpose.value}"
    csr = create_enclave_csr(pki.prog, label=label, enclave_name="prog-1", purpose=purpose)
    cert = certify_enclave(
        _root_key(pki), pki.root, csr, enclave_name="prog-1", purpose=purpose, role="programmer"
    )
    assert cert.public_key().curve.name == curve
    validate_enclave_certificate(cert, pki.root, purpose=purpose, role="programmer")
    with pytest.raises(WrongPurposeError):
        validate_enclave_certificate(cert, pki.root, purpose=EnclavePurpose.IDENTITY)


def test_key_agreement_csr_is_signed_by_identity(pki: Pki) -> None:
    ka_csr = create_enclave_csr(
        pki.prog,
        label="ka-1",
        enclave_name="prog-1",
        purpose=EnclavePurpose.KEY_AGREEMENT,
        signer=pki.prog.private_key("identity"),
    )
    assert ka_csr.public_key().curve.name == "secp256r1"
    assert not ka_csr.is_signature_valid  # not self-signed: the KA key cannot sign
    kw = dict(enclave_name="prog-1", purpose=EnclavePurpose.KEY_AGREEMENT, role="programmer")
    with pytest.raises(BadRequestSignatureError):  # proof key missing
        certify_enclave(_root_key(pki), pki.root, ka_csr, **kw)  # type: ignore[arg-type]
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(BadRequestSignatureError):  # wrong identity
        certify_enclave(_root_key(pki), pki.root, ka_csr, proof_key=other, **kw)  # type: ignore[arg-type]
    with pytest.raises(WrongKeyTypeError):  # a P-256 key is not an identity key
        certify_enclave(
            _root_key(pki),
            pki.root,
            ka_csr,
            proof_key=_device_key(),
            **kw,  # type: ignore[arg-type]
        )
    cert = certify_enclave(
        _root_key(pki),
        pki.root,
        ka_csr,
        proof_key=pki.identity.public_key(),
        **kw,  # type: ignore[arg-type]
    )
    validate_enclave_certificate(
        cert, pki.root, purpose=EnclavePurpose.KEY_AGREEMENT, role="programmer"
    )
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_agreement and not ku.digital_signature


def test_key_agreement_csr_needs_identity_signer(pki: Pki) -> None:
    with pytest.raises(BadRequestSignatureError):
        create_enclave_csr(
            pki.prog, label="ka-x", enclave_name="p", purpose=EnclavePurpose.KEY_AGREEMENT
        )
    with pytest.raises(WrongKeyTypeError):
        create_enclave_csr(
            pki.prog,
            label="ka-x",
            enclave_name="p",
            purpose=EnclavePurpose.KEY_AGREEMENT,
            signer=pki.prog.private_key("pca-job-1"),
        )
    with pytest.raises(BadRequestSignatureError):
        create_enclave_csr(
            pki.prog,
            label="ka-x",
            enclave_name="p",
            purpose=EnclavePurpose.IDENTITY,
            signer=pki.prog.private_key("identity"),
        )
    assert not pki.prog.has_key("ka-x")  # nothing generated on refusal


# --- bad requests ---------------------------------------------------------------------------------


def test_bad_csr_signature(pki: Pki) -> None:
    csr = create_production_ca_csr(pki.prog, label="pca-badsig", job_id="job-2")
    der = bytearray(to_der(csr))
    der[-5] ^= 0x01  # inside the signature value
    tampered = load_csr(bytes(der))
    nb, na = _window()
    with pytest.raises(BadRequestSignatureError):
        certify_production_ca(
            _root_key(pki), pki.root, tampered, job_id="job-2", not_before=nb, not_after=na
        )


def test_p256_where_p384_required(pki: Pki) -> None:
    csr = _csr(enclave_request_subject("prog-1"), ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(WrongKeyTypeError, match="P-384"):
        certify_enclave(
            _root_key(pki),
            pki.root,
            csr,
            enclave_name="prog-1",
            purpose=EnclavePurpose.IDENTITY,
            role="programmer",
        )


def test_p384_where_p256_required(pki: Pki) -> None:
    csr = _csr(production_ca_request_subject("job-3"), ec.generate_private_key(ec.SECP384R1()))
    nb, _ = _window()
    with pytest.raises(WrongKeyTypeError, match="P-256"):
        certify_production_ca(_root_key(pki), pki.root, csr, job_id="job-3", not_before=nb)


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
        b"\x04" + b"\x00" * 64,
        None,
    ],
)
def test_device_key_type(pki: Pki, key: object) -> None:
    with pytest.raises(WrongKeyTypeError):
        pki.issuer.issue(key, DEVICE_ID, 1)  # type: ignore[arg-type]


def test_ca_request_from_device_profile(pki: Pki) -> None:
    csr = _csr(
        enclave_request_subject("prog-1"),
        ec.generate_private_key(ec.SECP384R1()),
        x509.BasicConstraints(ca=True, path_length=None),
    )
    with pytest.raises(CARequestError):
        DEVICE.check_request(csr)
    with pytest.raises(CARequestError):
        certify_enclave(
            _root_key(pki),
            pki.root,
            csr,
            enclave_name="prog-1",
            purpose=EnclavePurpose.IDENTITY,
            role="oem",
        )


def test_other_requested_extension_refused(pki: Pki) -> None:
    csr = _csr(
        enclave_request_subject("prog-1"),
        ec.generate_private_key(ec.SECP384R1()),
        x509.KeyUsage(True, True, True, True, True, True, True, False, False),
    )
    with pytest.raises(UnexpectedExtensionError):
        certify_enclave(
            _root_key(pki),
            pki.root,
            csr,
            enclave_name="prog-1",
            purpose=EnclavePurpose.IDENTITY,
            role="oem",
        )


def test_name_the_job_does_not_allow(pki: Pki) -> None:
    csr = create_production_ca_csr(pki.prog, label="pca-job-4", job_id="job-4")
    nb, na = _window()
    with pytest.raises(NameNotAllowedError):
        certify_production_ca(
            _root_key(pki), pki.root, csr, job_id="job-5", not_before=nb, not_after=na
        )
    with pytest.raises(NameNotAllowedError):  # enclave CSR for another name
        certify_enclave(
            _root_key(pki),
            pki.root,
            create_enclave_csr(
                pki.prog, label="id-other", enclave_name="other", purpose=EnclavePurpose.IDENTITY
            ),
            enclave_name="prog-1",
            purpose=EnclavePurpose.IDENTITY,
            role="programmer",
        )


@pytest.mark.parametrize(
    "device_id",
    ["00000000000003E8", "3e8", "00000000000003e8 ", "0x000000000003e8", "", 1000, None, "g" * 16],
)
def test_bad_device_id(pki: Pki, device_id: object) -> None:
    with pytest.raises(NameNotAllowedError):
        pki.issuer.issue(_device_key(), device_id, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("sequence", [-1, 2**64, True, None])
def test_bad_sequence(pki: Pki, sequence: object) -> None:
    with pytest.raises(SerialNumberError):
        pki.issuer.issue(_device_key(), DEVICE_ID, sequence)  # type: ignore[arg-type]


@pytest.mark.parametrize("role", ["OEM", "vendor", "", None])
def test_bad_role(pki: Pki, role: object) -> None:
    csr = create_enclave_csr(
        pki.prog, label=f"id-role-{role}", enclave_name="prog-9", purpose=EnclavePurpose.IDENTITY
    )
    with pytest.raises(NameNotAllowedError):
        certify_enclave(
            _root_key(pki),
            pki.root,
            csr,
            enclave_name="prog-9",
            purpose=EnclavePurpose.IDENTITY,
            role=role,  # type: ignore[arg-type]
        )


def test_validity_beyond_issuer(pki: Pki) -> None:
    b = SoftwareBackend("beyond")
    nb, _ = _window()
    root = create_root_ca(b, organisation=ORG, not_after=nb + datetime.timedelta(days=365))
    rk = b.private_key("oem-root-ca")
    csr = create_production_ca_csr(pki.prog, label="pca-job-6", job_id="job-6")
    cases = [
        (nb, NO_EXPIRY),  # the default outlives a root that ends
        (nb, root.not_valid_after_utc + datetime.timedelta(seconds=1)),  # outlives the root
        (root.not_valid_before_utc - datetime.timedelta(days=1), nb + datetime.timedelta(1)),
        (nb + datetime.timedelta(days=2), nb + datetime.timedelta(days=1)),  # empty
        (nb - datetime.timedelta(days=3), nb - datetime.timedelta(days=2)),  # already over
    ]
    for start, end in cases:
        with pytest.raises(ValidityBeyondIssuerError):
            certify_production_ca(rk, root, csr, job_id="job-6", not_before=start, not_after=end)
    csr = create_enclave_csr(
        pki.prog, label="id-long", enclave_name="prog-2", purpose=EnclavePurpose.IDENTITY
    )
    with pytest.raises(ValidityBeyondIssuerError):
        certify_enclave(
            rk,
            root,
            csr,
            enclave_name="prog-2",
            purpose=EnclavePurpose.IDENTITY,
            role="programmer",
            valid_days=366,
        )
    with pytest.raises(ValidityBeyondIssuerError):  # a root that has already ended
        create_root_ca(b, label="never", not_after=nb - datetime.timedelta(seconds=1))
    assert not b.has_key("never")
    with pytest.raises(ValueError):  # naive datetimes are a programming error
        certify_production_ca(
            rk, pki.root, csr, job_id="job-6", not_before=nb.replace(tzinfo=None), not_after=nb
        )


def _reissue(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, **changes: datetime.datetime
) -> x509.Certificate:
    """``cert`` re-signed by ``key`` with other validity (to make expired issuers)."""
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(changes.get("nb", cert.not_valid_before_utc))
        .not_valid_after(changes.get("na", cert.not_valid_after_utc))
    )
    for ext in cert.extensions:
        b = b.add_extension(ext.value, critical=ext.critical)
    return b.sign(key, hashes.SHA384())


def test_issuer_expired_or_not_yet_valid(pki: Pki) -> None:
    rk = _root_key(pki)
    now = datetime.datetime.now(UTC)
    expired = _reissue(
        pki.root,
        rk.as_cryptography(),
        nb=now - datetime.timedelta(days=9),
        na=now - datetime.timedelta(days=1),
    )
    future = _reissue(pki.root, rk.as_cryptography(), nb=now + datetime.timedelta(days=1))
    csr = create_production_ca_csr(pki.prog, label="pca-job-7", job_id="job-7")
    for issuer_cert in (expired, future):
        with pytest.raises(IssuerNotValidError):
            certify_production_ca(
                rk,
                issuer_cert,
                csr,
                job_id="job-7",
                not_before=now,
                not_after=now + datetime.timedelta(days=1),
            )
    # a production CA whose window has not started cannot issue devices yet
    start = now.replace(microsecond=0) + datetime.timedelta(days=1)
    pca = certify_production_ca(
        rk, pki.root, csr, job_id="job-7", not_before=start, not_after=start + datetime.timedelta(1)
    )
    with pytest.raises(IssuerNotValidError):
        _issuer(
            pki.prog,
            "pca-job-7",
            pca,
            "job-7",
            DeviceProfile(organisation=ORG, not_after=start + datetime.timedelta(1)),
        )


def test_issuer_cert_does_not_match_key(pki: Pki) -> None:
    csr = create_production_ca_csr(pki.prog, label="pca-job-8", job_id="job-8")
    nb, na = _window()
    with pytest.raises(IssuerKeyMismatchError):
        certify_production_ca(
            pki.prog.private_key("identity"),
            pki.root,
            csr,
            job_id="job-8",
            not_before=nb,
            not_after=na,
        )
    with pytest.raises(IssuerKeyMismatchError):
        _issuer(pki.prog, "identity", pki.pca, "job-1")


def test_device_issuer_needs_production_ca_of_the_job(pki: Pki) -> None:
    with pytest.raises(JobMismatchError):
        _issuer(pki.prog, "pca-job-1", pki.pca, "job-2")
    with pytest.raises(IssuerError):  # an enclave certificate is not a CA
        _issuer(pki.prog, "identity", pki.identity, "job-1")


def test_duplicate_label_refused_before_generation(pki: Pki) -> None:
    with pytest.raises(DuplicateObjectError):
        create_root_ca(pki.oem)
    with pytest.raises(DuplicateObjectError):
        create_production_ca_csr(pki.prog, label="pca-job-1", job_id="job-1")


# --- validation -----------------------------------------------------------------------------------


def test_expired_and_not_yet_valid_chain(pki: Pki, short: ShortChain) -> None:
    cert = short.issuer.issue(_device_key(), DEVICE_ID, 3)
    late = short.pca.not_valid_after_utc + datetime.timedelta(seconds=1)
    with pytest.raises(CertificateExpiredError, match="production CA"):
        validate_device_chain(cert, short.pca, short.root, at=late)
    early = short.root.not_valid_before_utc - datetime.timedelta(seconds=1)
    with pytest.raises(CertificateNotYetValidError, match="root"):
        validate_device_chain(cert, short.pca, short.root, at=early)
    # the default profile: valid for the life of the device, decades after the job
    cert = pki.issuer.issue(_device_key(), DEVICE_ID, 3)
    decades = datetime.datetime.now(UTC) + datetime.timedelta(days=50 * 366)
    validate_device_chain(cert, pki.pca, pki.root, at=decades)


def test_swapped_issuer_fails(pki: Pki) -> None:
    rk = _root_key(pki)
    nb, na = _window()
    other = certify_production_ca(
        rk,
        pki.root,
        create_production_ca_csr(pki.prog, label="pca-job-9", job_id="job-9"),
        job_id="job-9",
        not_before=nb,
    )
    cert = pki.issuer.issue(_device_key(), DEVICE_ID, 4)
    with pytest.raises(ChainValidationError):
        validate_device_chain(cert, other, pki.root)
    with pytest.raises(JobMismatchError):
        validate_device_chain(cert, pki.pca, pki.root, job_id="job-9")


def test_foreign_root_fails(pki: Pki) -> None:
    foreign = create_root_ca(SoftwareBackend("foreign"), organisation=ORG)
    cert = pki.issuer.issue(_device_key(), DEVICE_ID, 5)
    with pytest.raises(ChainValidationError):
        validate_device_chain(cert, pki.pca, foreign)
    with pytest.raises(ChainValidationError):
        validate_enclave_certificate(pki.identity, foreign, purpose=EnclavePurpose.IDENTITY)


def test_tampered_byte_fails(pki: Pki) -> None:
    cert = pki.issuer.issue(_device_key(), DEVICE_ID, 6)
    der = bytearray(to_der(cert))
    idx = der.index(DEVICE_ID.encode())
    der[idx] = ord("1")  # still a valid device id, but not the one signed
    tampered = load_der(bytes(der))
    with pytest.raises(ChainValidationError):
        validate_device_chain(tampered, pki.pca, pki.root)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: validate_device_chain(p.identity, p.pca, p.root),  # enclave as device
        lambda p: validate_device_chain(p.pca, p.pca, p.root),  # CA as device
        lambda p: validate_device_chain(
            p.issuer.issue(_device_key(), DEVICE_ID, 1), p.identity, p.root
        ),  # enclave as CA
        lambda p: validate_enclave_certificate(
            p.issuer.issue(_device_key(), DEVICE_ID, 1), p.root, purpose=EnclavePurpose.IDENTITY
        ),  # device as enclave
        lambda p: validate_enclave_certificate(
            p.pca, p.root, purpose=EnclavePurpose.IDENTITY
        ),  # CA as enclave
        lambda p: validate_enclave_certificate(
            p.identity, p.root, purpose=EnclavePurpose.IDENTITY, role="oem"
        ),  # wrong role
    ],
)
def test_wrong_kind_of_certificate(pki: Pki, call: Callable[[Pki], None]) -> None:
    with pytest.raises((WrongPurposeError, UnexpectedExtensionError)):
        call(pki)


def _resign(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, drop: type, add: object = None
) -> x509.Certificate:
    """``cert`` re-signed by ``key`` without extension ``drop`` (and with ``add``)."""
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        if not isinstance(ext.value, drop):
            b = b.add_extension(ext.value, critical=ext.critical)
    if add is not None:
        b = b.add_extension(add, critical=False)  # type: ignore[arg-type]
    return b.sign(key, hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256())


def test_ca_role_is_ca_path_len_zero_and_no_key_purpose(pki: Pki) -> None:
    """A production CA is cA with pathLen 0, no EKU and at most the OEM's policy: one with an
    EKU, the root, or one with the retired project policy or a policy outside an OEM arc is
    refused; the job's profile pins the policy (present with an arc, absent without)."""
    rk = _root_key(pki).as_cryptography()
    retired = x509.ObjectIdentifier(f"{oids.ARC}.1.2")  # the old production-CA key purpose
    with_eku = _resign(
        pki.pca, rk, drop=x509.ExtendedKeyUsage, add=x509.ExtendedKeyUsage([retired])
    )

    def with_policy(oid: str) -> x509.Certificate:
        policy = x509.PolicyInformation(x509.ObjectIdentifier(oid), None)
        return _resign(
            pki.pca, rk, drop=x509.CertificatePolicies, add=x509.CertificatePolicies([policy])
        )

    old_policy = with_policy(f"{oids.ARC}.3.1")  # the wave-2 profile
    not_an_oem_arc = with_policy("2.5.29.32.0")  # anyPolicy
    purpose_not_policy = with_policy(f"{ARC}.1")
    dev = pki.issuer.issue(_device_key(), DEVICE_ID, 12)
    for bad in (with_eku, old_policy, not_an_oem_arc, purpose_not_policy, pki.root):
        with pytest.raises(WrongPurposeError):
            validate_device_chain(dev, bad, pki.root)
    from securethread.pki import DeviceChainValidator

    with pytest.raises(WrongPurposeError, match="carries key purposes"):
        DeviceChainValidator(with_eku, pki.root)
    with pytest.raises(WrongPurposeError, match="pathLen None"):
        DeviceChainValidator(pki.root, pki.root)
    # the job's profile pins the policy both ways
    with pytest.raises(ProfileMismatchError, match="policies"):
        DeviceChainValidator(pki.pca, pki.root, profile=FULL)
    with pytest.raises(ProfileMismatchError, match="policies"):
        DeviceChainValidator(pki.arc_pca, pki.root, profile=PROFILE)
    with pytest.raises(ProfileMismatchError):
        _issuer(pki.prog, "pca-job-1", pki.pca, "job-1", FULL)  # a CA without the arc's policy


@pytest.mark.parametrize(
    "eku",
    [
        [f"{ARC}.1"],  # the OEM purpose alone
        ["1.3.6.1.5.5.7.3.2", f"{oids.ARC}.1.1"],  # the retired project device purpose
        ["1.3.6.1.5.5.7.3.2", "1.3.6.1.5.5.7.3.1"],  # + serverAuth
        ["1.3.6.1.5.5.7.3.2", f"{ARC}.2"],  # the OEM policy number as a purpose
        ["1.3.6.1.5.5.7.3.2", f"{ARC}.1", f"{ARC}.1"],
        [f"{ARC}.1", "1.3.6.1.5.5.7.3.2"],  # order
    ],
)
def test_device_key_purposes(pki: Pki, eku: list[str]) -> None:
    """A device carries id-kp-clientAuth, then at most the OEM's purpose (<arc>.1)."""
    pk = pki.prog.private_key("pca-job-1").as_cryptography()
    dev = pki.issuer.issue(_device_key(), DEVICE_ID, 13)
    bad = _resign(
        dev,
        pk,
        drop=x509.ExtendedKeyUsage,
        add=x509.ExtendedKeyUsage([x509.ObjectIdentifier(o) for o in eku]),
    )
    with pytest.raises(WrongPurposeError):
        validate_device_chain(bad, pki.pca, pki.root)


def _with_extension(pki: Pki, dev: x509.Certificate, ext: x509.ExtensionType) -> x509.Certificate:
    pk = pki.prog.private_key("pca-job-2").as_cryptography()
    return _resign(dev, pk, drop=type(ext), add=ext)


def test_device_names_and_sources_have_one_uri_each(pki: Pki) -> None:
    dev = pki.arc_issuer.issue(_device_key(), DEVICE_ID, 14)
    uri = x509.UniformResourceIdentifier
    bad = [
        x509.SubjectAlternativeName([uri("urn:dev:os:32473-0000000000000001")]),  # another id
        x509.SubjectAlternativeName([uri(f"urn:a:{DEVICE_ID}"), uri(f"urn:b:{DEVICE_ID}")]),
        x509.SubjectAlternativeName([x509.DNSName(f"{DEVICE_ID}.example.com")]),
        x509.CRLDistributionPoints(
            [
                x509.DistributionPoint([uri("http://a.example/c.crl")], None, None, None),
                x509.DistributionPoint([uri("http://b.example/c.crl")], None, None, None),
            ]
        ),
        x509.CRLDistributionPoints(
            [
                x509.DistributionPoint(
                    [uri("http://a.example/c.crl")],
                    None,
                    frozenset({x509.ReasonFlags.key_compromise}),
                    None,
                )
            ]
        ),
        x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    x509.oid.AuthorityInformationAccessOID.CA_ISSUERS, uri("http://a.example/")
                )
            ]
        ),
    ]
    for ext in bad:
        with pytest.raises(CertificateError):
            validate_device_chain(_with_extension(pki, dev, ext), pki.arc_pca, pki.root)
    # well-formed but not what the job's profile says: refused only against the profile
    other = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                x509.oid.AuthorityInformationAccessOID.OCSP, uri("http://rogue.example/")
            )
        ]
    )
    rogue = _with_extension(pki, dev, other)
    validate_device_chain(rogue, pki.arc_pca, pki.root)
    with pytest.raises(ProfileMismatchError, match="not the job's"):
        validate_device_chain(rogue, pki.arc_pca, pki.root, profile=FULL)
    from securethread.pki import DeviceChainValidator

    validator = DeviceChainValidator(pki.arc_pca, pki.root, job_id="job-2", profile=FULL)
    validator.validate(dev)
    with pytest.raises(ProfileMismatchError):
        validator.validate(rogue)
    # the job's subject and notAfter too
    renamed = DeviceProfile(**{**attrs.asdict(FULL), "product": "Kettle"})
    with pytest.raises(ProfileMismatchError, match="subject"):
        validate_device_chain(dev, pki.arc_pca, pki.root, profile=renamed)


def test_job_id_is_read_only_from_a_production_ca_name(pki: Pki) -> None:
    """The job is the production CA's organizationalUnitName; a device (OU = product) or an
    enclave (OU = role) never yields a job id."""
    assert job_id_of(pki.pca) == "job-1" and job_id_of(pki.arc_pca) == "job-2"
    assert pki.pca.subject.rfc4514_string() == (
        f"CN=securethread production CA,OU=job-1,O={ORG}"
    )
    for cert in (pki.issuer.issue(_device_key(), DEVICE_ID, 15), pki.identity, pki.root):
        with pytest.raises(NameNotAllowedError, match="not a production CA name"):
            job_id_of(cert)


def test_cryptography_verifier_enforces_purpose_on_its_own(pki: Pki) -> None:
    """The ExtensionPolicy alone (no explicit checks) refuses an enclave cert as a device."""
    from cryptography.x509.verification import VerificationError

    from securethread.pki import build_verifier

    now = datetime.datetime.now(UTC)
    dev = pki.issuer.issue(_device_key(), DEVICE_ID, 8)
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    build_verifier(pki.root, purpose=client, at=now).verify(dev, [pki.pca])
    arc_dev = pki.arc_issuer.issue(_device_key(), DEVICE_ID, 8)
    build_verifier(pki.root, purpose=client, at=now).verify(arc_dev, [pki.arc_pca])
    with pytest.raises(VerificationError):
        build_verifier(pki.root, purpose=client, at=now).verify(pki.identity, [])
    with pytest.raises(VerificationError):
        build_verifier(pki.root, purpose=oids.EKU_ENCLAVE_IDENTITY, at=now).verify(dev, [pki.pca])


def test_validation_refuses_non_certificates(pki: Pki) -> None:
    with pytest.raises(CertificateError):
        validate_device_chain(to_der(pki.pca), pki.pca, pki.root)  # type: ignore[arg-type]


# --- encodings ------------------------------------------------------------------------------------


def test_pem_der_roundtrip(pki: Pki) -> None:
    assert from_pem(to_pem(pki.root)) == pki.root
    assert load_der(to_der(pki.root)) == pki.root
    assert len(cert_fingerprint(pki.root)) == 32


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\x30\x03\x02\x01\x01", "text", b"\x30" * 20000],
)
def test_garbage_is_format_error(data: object) -> None:
    with pytest.raises(FormatError):
        load_der(data)  # type: ignore[arg-type]
    with pytest.raises(FormatError):
        from_pem(data)  # type: ignore[arg-type]
    with pytest.raises(FormatError):
        load_csr(data)  # type: ignore[arg-type]


def test_trailing_bytes_and_double_pem(pki: Pki) -> None:
    with pytest.raises(FormatError):
        load_der(to_der(pki.root) + b"\x00")
    with pytest.raises(FormatError):
        from_pem(to_pem(pki.root) + to_pem(pki.pca))


# --- DeviceChainValidator (many devices of one job) ---------------------------------------------


def test_chain_validator_accepts_and_refuses_like_the_function(pki: Pki, short: ShortChain) -> None:
    from securethread.pki import DeviceChainValidator

    v = DeviceChainValidator(pki.pca, pki.root, job_id="job-1")
    good = pki.issuer.issue(_device_key(), DEVICE_ID, 11)
    assert v.validate(good) is None
    der = bytearray(to_der(good))
    der[der.index(DEVICE_ID.encode())] = ord("1")
    with pytest.raises(ChainValidationError):
        v.validate(load_der(bytes(der)))
    with pytest.raises(WrongPurposeError):
        v.validate(pki.identity)
    with pytest.raises(JobMismatchError):
        DeviceChainValidator(pki.pca, pki.root, job_id="job-2")
    with pytest.raises(ChainValidationError):
        DeviceChainValidator(pki.pca, create_root_ca(SoftwareBackend("x")))
    late = short_late = datetime.datetime.now(UTC) + datetime.timedelta(days=400)
    with pytest.raises(CertificateExpiredError):
        DeviceChainValidator(short.pca, short.root, at=short_late)
    DeviceChainValidator(pki.pca, pki.root, at=late)  # the default chain never expires
    # a device certificate from another job's CA (same root) fails
    rk = _root_key(pki)
    nb, na = _window()
    other = certify_production_ca(
        rk,
        pki.root,
        create_production_ca_csr(pki.prog, label="pca-job-10", job_id="job-10"),
        job_id="job-10",
        not_before=nb,
    )
    foreign = _issuer(pki.prog, "pca-job-10", other, "job-10")
    with pytest.raises(ChainValidationError):
        v.validate(foreign.issue(_device_key(), DEVICE_ID, 1))
