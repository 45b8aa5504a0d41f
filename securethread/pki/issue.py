"""Issuance: the OEM root, enclave certificates, production CAs and device certificates.

Every certificate is signed inside its issuer's backend (``PrivateKey.as_cryptography()``
with ``x509.CertificateBuilder``).  Every check runs before a key is generated or an object
is stored, so a refused request leaves the token untouched (S5).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.keys.ecutil import CryptographyKeyAdapter, spki_der
from securethread.keys.protocol import KeyBackend, PrivateKey

from ..errors import DuplicateObjectError
from ..keys.policy import KEY_AGREEMENT, SIGNING, Curve
from . import oids
from ._errors import (
    BadRequestSignatureError,
    IssuerError,
    IssuerKeyMismatchError,
    IssuerNotValidError,
    JobMismatchError,
    NameNotAllowedError,
    ValidityBeyondIssuerError,
    WrongKeyTypeError,
)
from ._names import _DEVICE_ID, check_job_id, check_role
from .profile import (
    DEVICE,
    NO_EXPIRY,
    ORGANIZATION,
    PRODUCTION_CA,
    ROOT_CA,
    CertificateProfile,
    DeviceProfile,
    EnclavePurpose,
    enclave_profile,
    enclave_request_subject,
    enclave_subject,
    organisation_of,
    production_ca_request_subject,
    production_ca_subject,
    root_subject,
)
from .serial import MAX_SEQUENCE, SERIAL_SIZE, random_serial, serial_from_tag
from .serial import job_tag as _job_tag
from .validate import job_id_of

MAX_VALID_DAYS = 36500


def _now() -> datetime.datetime:
    # RFC 5280 §4.1.2.5: validity is encoded to the second, without fractions.
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _check_days(valid_days: object) -> int:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int):
        raise ValidityBeyondIssuerError(f"valid_days must be an int, not {valid_days!r}")
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise ValidityBeyondIssuerError(f"valid_days {valid_days} outside 1..{MAX_VALID_DAYS}")
    return valid_days


def _aware(value: datetime.datetime, what: str) -> datetime.datetime:
    if not isinstance(value, datetime.datetime) or value.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
    return value.astimezone(datetime.UTC).replace(microsecond=0)


def _check_label_free(backend: KeyBackend, label: str) -> None:
    if backend.has_key(label) or backend.has_certificate(label):
        raise DuplicateObjectError(f"{backend.name!r} already has an object labelled {label!r}")


def _ski(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        raise IssuerError("issuer certificate has no subjectKeyIdentifier") from None


def _check_issuer(
    key: PrivateKey, cert: x509.Certificate, *, at: datetime.datetime, what: str
) -> bytes:
    """The issuer cert must certify ``key``, be a CA and be valid at ``at``; returns its SKI."""
    if not isinstance(cert, x509.Certificate):
        raise IssuerError(f"{what}: issuer certificate is a {type(cert).__name__}")
    if spki_der(key.public_key()) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise IssuerKeyMismatchError(
            f"{what}: issuer certificate {cert.subject.rfc4514_string()} does not certify "
            f"key {key.label!r}"
        )
    if at < cert.not_valid_before_utc:
        raise IssuerNotValidError(
            f"{what}: issuer certificate not valid before {cert.not_valid_before_utc}"
        )
    if at > cert.not_valid_after_utc:
        raise IssuerNotValidError(
            f"{what}: issuer certificate expired at {cert.not_valid_after_utc}"
        )
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise IssuerError(f"{what}: issuer certificate is not a CA certificate")
    return _ski(cert)


def _check_csr(
    csr: x509.CertificateSigningRequest,
    profile: CertificateProfile,
    *,
    expected_subject: x509.Name,
    proof_key: ec.EllipticCurvePublicKey | None = None,
) -> ec.EllipticCurvePublicKey:
    """Proof of possession first (PKCS#10, RFC 2986 §3), then key, name and extensions."""
    if not isinstance(csr, x509.CertificateSigningRequest):
        raise BadRequestSignatureError(f"request is a {type(csr).__name__}, not a CSR")
    if proof_key is None:
        if not csr.is_signature_valid:
            raise BadRequestSignatureError("CSR signature does not verify under its own key")
    else:
        _verify_with(proof_key, csr)
    key = profile.check_subject_key(csr.public_key(), what="CSR subject key")
    if csr.subject != expected_subject:
        raise NameNotAllowedError(
            f"CSR subject {csr.subject.rfc4514_string()!r} is not the allowed "
            f"{expected_subject.rfc4514_string()!r}"
        )
    profile.check_request(csr)
    return key


def _verify_with(proof_key: ec.EllipticCurvePublicKey, csr: x509.CertificateSigningRequest) -> None:
    from cryptography.exceptions import InvalidSignature

    if not isinstance(proof_key, ec.EllipticCurvePublicKey):
        raise BadRequestSignatureError("proof key is not an EC public key")
    algorithm = csr.signature_hash_algorithm
    if not isinstance(algorithm, hashes.SHA256 | hashes.SHA384):
        raise BadRequestSignatureError("CSR is not signed with ECDSA-SHA256/384")
    try:
        proof_key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        raise BadRequestSignatureError(
            "CSR signature does not verify under the enclave's identity key"
        ) from None


def _hash(curve: Curve) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384 keys, SHA-256 for P-256 (RFC 5758 §3.2, matched strength)."""
    return hashes.SHA384() if curve is Curve.P384 else hashes.SHA256()


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(key.as_cryptography(), _hash(key.curve))


def _build(
    profile: CertificateProfile,
    *,
    subject: x509.Name,
    issuer: x509.Name,
    subject_key: ec.EllipticCurvePublicKey,
    issuer_ski: bytes,
    serial: int,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    oem_arc: str | None = None,
    tail: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.CertificateBuilder:
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in profile.extensions(subject_key, issuer_ski, oem_arc=oem_arc, tail=tail):
        b = b.add_extension(ext, critical=critical)
    return b


# --- the OEM root ------------------------------------------------------------------------------


def create_root_ca(
    backend: KeyBackend,
    *,
    label: str = "oem-root-ca",
    organisation: str = ORGANIZATION,
    common_name: str = "securethread OEM Root CA",
    not_after: datetime.datetime = NO_EXPIRY,
) -> x509.Certificate:
    """Generate the OEM root key (P-384) in ``backend``, self-sign, store the cert beside it.

    ``organisation`` is the OEM (subject O; production CAs inherit it).  ``not_after``
    defaults to 99991231235959Z: the root must stay valid as long as the devices below it
    (RFC 5280 §4.1.2.5).
    """
    subject = root_subject(common_name, organisation)
    now = _now()
    na = _aware(not_after, "not_after")
    if na <= now:
        raise ValidityBeyondIssuerError(f"root notAfter {na} is not in the future")
    _check_label_free(backend, label)
    key = backend.generate_ec(label, curve=Curve.P384, policy=SIGNING)
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public).digest
    cert = _sign(
        _build(
            ROOT_CA,
            subject=subject,
            issuer=subject,
            subject_key=public,
            issuer_ski=ski,
            serial=random_serial(),
            not_before=now,
            not_after=na,
        ),
        key,
    )
    backend.store_certificate(label, cert)
    return cert


# --- enclaves ------------------------------------------------------------------------------------

_ENCLAVE_KEYS = {
    EnclavePurpose.IDENTITY: (Curve.P384, SIGNING),
    EnclavePurpose.LICENSE_SIGNING: (Curve.P256, SIGNING),
    EnclavePurpose.LEDGER_SIGNING: (Curve.P256, SIGNING),
    EnclavePurpose.KEY_AGREEMENT: (Curve.P256, KEY_AGREEMENT),
}


class _ProxySigner(CryptographyKeyAdapter):
    """Signs with one key while presenting another public key to the CSR builder.

    A key-agreement key cannot sign (its policy has no CKA_SIGN), so its CSR carries the
    KA public key and is signed by the enclave's identity key: possession is proved by
    the identity key, which the OEM has already certified.
    """

    __slots__ = ("_presented",)

    def __init__(self, signer: PrivateKey, presented: ec.EllipticCurvePublicKey) -> None:
        super().__init__(signer)
        self._presented = presented

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._presented


def create_enclave_csr(
    backend: KeyBackend,
    *,
    label: str,
    enclave_name: str,
    purpose: EnclavePurpose,
    signer: PrivateKey | None = None,
) -> x509.CertificateSigningRequest:
    """Generate an enclave key for ``purpose`` in ``backend`` and return its CSR.

    IDENTITY: P-384 signing key; LICENSE_SIGNING / LEDGER_SIGNING: P-256 signing keys, each
    CSR self-signed.  KEY_AGREEMENT: a P-256 key that cannot sign, so ``signer`` (the
    enclave's IDENTITY key) signs the CSR; ``certify_enclave`` then needs ``proof_key``.
    """
    profile = enclave_profile(purpose)
    subject = enclave_request_subject(enclave_name)
    if purpose is EnclavePurpose.KEY_AGREEMENT:
        if signer is None:
            raise BadRequestSignatureError(
                "a key-agreement key cannot sign its CSR: pass the enclave's identity key as signer"
            )
        if signer.curve is not Curve.P384:
            raise WrongKeyTypeError("the CSR signer must be the enclave's P-384 identity key")
    elif signer is not None:
        raise BadRequestSignatureError(f"a {profile.name} CSR is signed by its own key; no signer")
    _check_label_free(backend, label)
    curve, policy = _ENCLAVE_KEYS[purpose]
    key = backend.generate_ec(label, curve=curve, policy=policy)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if signer is None:
        return builder.sign(key.as_cryptography(), _hash(curve))
    return builder.sign(_ProxySigner(signer, key.public_key()), _hash(signer.curve))


def certify_enclave(
    root_key: PrivateKey,
    root_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    *,
    enclave_name: str,
    purpose: EnclavePurpose,
    role: str,
    valid_days: int = 730,
    proof_key: ec.EllipticCurvePublicKey | None = None,
) -> x509.Certificate:
    """The OEM root certifies an enclave key (onboarding, DESIGN flow 2).

    For KEY_AGREEMENT the CSR must verify under ``proof_key`` (the enclave's certified
    identity key); for other purposes under its own key, and ``proof_key`` is not used.
    """
    profile = enclave_profile(purpose)
    check_role(role)
    subject = enclave_subject(enclave_name, role)
    _check_days(valid_days)
    now = _now()
    issuer_ski = _check_issuer(root_key, root_cert, at=now, what="certify enclave")
    if purpose is EnclavePurpose.KEY_AGREEMENT:
        if proof_key is None:
            raise BadRequestSignatureError(
                "a key-agreement CSR is signed by the identity key: pass it as proof_key"
            )
        enclave_profile(EnclavePurpose.IDENTITY).check_subject_key(proof_key, what="proof key")
    else:
        proof_key = None
    key = _check_csr(
        csr, profile, expected_subject=enclave_request_subject(enclave_name), proof_key=proof_key
    )
    not_after = now + datetime.timedelta(days=valid_days)
    if not_after > root_cert.not_valid_after_utc:
        raise ValidityBeyondIssuerError(
            f"enclave certificate would end {not_after}, "
            f"after the root ({root_cert.not_valid_after_utc})"
        )
    return _sign(
        _build(
            profile,
            subject=subject,
            issuer=root_cert.subject,
            subject_key=key,
            issuer_ski=issuer_ski,
            serial=random_serial(),
            not_before=now,
            not_after=not_after,
        ),
        root_key,
    )


def install_certificate(backend: KeyBackend, label: str, cert: x509.Certificate) -> None:
    """Store ``cert`` beside key ``label`` (same label and CKA_ID), refusing a mismatch."""
    if spki_der(backend.public_key(label)) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise IssuerKeyMismatchError(
            f"certificate {cert.subject.rfc4514_string()} does not certify key {label!r}"
        )
    backend.store_certificate(label, cert)


# --- production CA -------------------------------------------------------------------------------


def create_production_ca_csr(
    backend: KeyBackend, *, label: str, job_id: str
) -> x509.CertificateSigningRequest:
    """Generate the job's production CA key (P-256) in the programmer token; return its CSR.

    The CSR names the job; the OEM adds its organisation when it certifies the key."""
    subject = production_ca_request_subject(job_id)
    _check_label_free(backend, label)
    key = backend.generate_ec(label, curve=Curve.P256, policy=SIGNING)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key.as_cryptography(), hashes.SHA256())
    )


def certify_production_ca(
    root_key: PrivateKey,
    root_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    *,
    job_id: str,
    not_before: datetime.datetime,
    not_after: datetime.datetime = NO_EXPIRY,
    organisation: str | None = None,
    oem_arc: str | None = None,
) -> x509.Certificate:
    """Certify a job's production CA: pathLen 0, the OEM and the job in its subject.

    ``not_before`` is the job's start; ``not_after`` defaults to 99991231235959Z because the
    CA must stay valid as long as the devices it certified (the job window is enforced by
    the programmer refusing to issue outside it, not by the CA's expiry).  The validity must
    lie inside the root's.  ``organisation`` defaults to the root's.  ``oem_arc`` (the job
    profile's): the CA carries the OEM's production-CA policy ``<oem_arc>.2``; without it,
    no certificatePolicies.
    """
    if oem_arc is not None:
        oids.check_oem_arc(oem_arc)
    org = organisation_of(root_cert) if organisation is None else organisation
    subject = production_ca_subject(job_id, org)
    nb, na = _aware(not_before, "not_before"), _aware(not_after, "not_after")
    now = _now()
    issuer_ski = _check_issuer(root_key, root_cert, at=now, what="certify production CA")
    if nb >= na:
        raise ValidityBeyondIssuerError(f"production CA window is empty ({nb} .. {na})")
    if na <= now:
        raise ValidityBeyondIssuerError(f"production CA window ended at {na}")
    if nb < root_cert.not_valid_before_utc or na > root_cert.not_valid_after_utc:
        raise ValidityBeyondIssuerError(
            f"production CA window {nb} .. {na} is not inside the root's "
            f"{root_cert.not_valid_before_utc} .. {root_cert.not_valid_after_utc}"
        )
    key = _check_csr(csr, PRODUCTION_CA, expected_subject=production_ca_request_subject(job_id))
    return _sign(
        _build(
            PRODUCTION_CA,
            subject=subject,
            issuer=root_cert.subject,
            subject_key=key,
            issuer_ski=issuer_ski,
            serial=random_serial(),
            not_before=nb,
            not_after=na,
            oem_arc=oem_arc,
        ),
        root_key,
    )


# --- devices (hot path) ---------------------------------------------------------------------------

# RFC 5758 §3.2: AlgorithmIdentifier ecdsa-with-SHA256, parameters absent.
_ECDSA_SHA256_ALG = bytes.fromhex("300a06082a8648ce3d040302")


def _der_header(tag: int, length: int) -> bytes:
    """X.690 §8.1.3 definite-length header."""
    if length < 0x80:
        return bytes((tag, length))
    n = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | n)) + length.to_bytes(n, "big")


def _assemble(tbs: bytes | bytearray, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    (RFC 5280 §4.1); the BIT STRING has no unused bits."""
    bits = _der_header(0x03, len(signature) + 1) + b"\x00" + signature
    body_len = len(tbs) + len(_ECDSA_SHA256_ALG) + len(bits)
    return b"".join((_der_header(0x30, body_len), tbs, _ECDSA_SHA256_ALG, bits))


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


class DeviceCertificateIssuer:
    """Issues device certificates from a job's production CA (DESIGN flow 7).

    Everything constant -- issuer, validity, subject but the device id, extensions but SKI,
    algorithm -- is encoded once here into a DER template of the TBSCertificate; ``issue``
    splices in the per-device fields, all fixed-length (serial, the device id in
    serialNumber, CN and the subjectAltName URI, public point, SKI), hashes and has the
    token sign.  The template is checked against ``x509.CertificateBuilder`` output at
    construction.

    ``job_tag`` is the job's identity (SHA-256 of the signed job, 8+ octets; the first 8
    enter every serial); ``profile`` the job's :class:`DeviceProfile`.  Devices get notBefore
    = the production CA's and notAfter = the profile's, which must not outlive the CA.
    """

    __slots__ = (
        "_key",
        "ca_cert",
        "job_id",
        "job_tag",
        "profile",
        "_serial_prefix",
        "_template",
        "_offsets",
        "_id_offsets",
        "_nb_ts",
        "_na_ts",
    )

    def __init__(
        self,
        ca_key: PrivateKey,
        ca_cert: x509.Certificate,
        *,
        job_id: str,
        job_tag: bytes,
        profile: DeviceProfile,
    ) -> None:
        check_job_id(job_id)
        if not isinstance(profile, DeviceProfile):
            raise TypeError(f"profile must be a DeviceProfile, not {type(profile).__name__}")
        tag = _job_tag(job_tag)
        _check_issuer(ca_key, ca_cert, at=_now(), what="device issuer")
        PRODUCTION_CA.check_certificate(ca_cert, what="production CA certificate")
        if job_id_of(ca_cert) != job_id:
            raise JobMismatchError(
                f"production CA certificate is for job {job_id_of(ca_cert)!r}, not {job_id!r}"
            )
        profile.check_production_ca(ca_cert, what="production CA certificate")
        if profile.not_after > ca_cert.not_valid_after_utc:
            raise ValidityBeyondIssuerError(
                f"device notAfter {profile.not_after} is after the production CA's "
                f"({ca_cert.not_valid_after_utc})"
            )
        if profile.not_after <= ca_cert.not_valid_before_utc:
            raise ValidityBeyondIssuerError(
                f"device notAfter {profile.not_after} is not after the production CA's "
                f"notBefore ({ca_cert.not_valid_before_utc})"
            )
        self._key = ca_key
        self.ca_cert = ca_cert
        self.job_id = job_id
        self.job_tag = tag
        self.profile = profile
        self._serial_prefix = serial_from_tag(tag, 0).to_bytes(SERIAL_SIZE, "big")[:9]
        self._nb_ts = ca_cert.not_valid_before_utc.timestamp()
        self._na_ts = profile.not_after.timestamp()
        self._make_template()

    def _prototype(self, device_id: str, key: ec.EllipticCurvePublicKey, seq: int) -> bytes:
        ca = self.ca_cert
        builder = _build(
            DEVICE,
            subject=self.profile.subject(device_id),
            issuer=ca.subject,
            subject_key=key,
            issuer_ski=_ski(ca),
            serial=serial_from_tag(self.job_tag, seq),
            not_before=ca.not_valid_before_utc,
            not_after=self.profile.not_after,
            oem_arc=self.profile.oem_arc,
            tail=self.profile.device_extensions(device_id),
        )
        throwaway = ec.generate_private_key(ec.SECP256R1())
        return builder.sign(throwaway, hashes.SHA256()).tbs_certificate_bytes

    def _make_template(self) -> None:
        id_count = 2 if self.profile.uri_template is None else 3
        for _ in range(8):  # a random marker colliding with constant bytes: retry
            dev_id = os.urandom(8).hex()
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
            seq = int.from_bytes(os.urandom(8), "big")
            tbs = self._prototype(dev_id, key, seq)
            point = _point(key)
            marker = dev_id.encode("ascii")
            fields = (
                serial_from_tag(self.job_tag, seq).to_bytes(SERIAL_SIZE, "big"),
                point,
                hashlib.sha1(point).digest(),  # noqa: S324 - RFC 5280 §4.2.1.2 method (1)
            )
            # the device id appears in the subject serialNumber, (inside) the CN and (inside)
            # the subjectAltName URI when the profile has one
            if all(tbs.count(f) == 1 for f in fields) and tbs.count(marker) == id_count:
                at = [tbs.index(marker)]
                while len(at) < id_count:
                    at.append(tbs.index(marker, at[-1] + 16))
                self._id_offsets = tuple(at)
                self._offsets = tuple(tbs.index(f) for f in fields)
                self._template = bytes(tbs)
                break
        else:  # pragma: no cover - probability ~2^-100
            raise RuntimeError("could not locate device fields in the TBS template")
        # Self-check: the spliced template must equal the builder's encoding byte for byte.
        dev_id = os.urandom(8).hex()
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        if self._tbs(key, dev_id, 12345) != self._prototype(dev_id, key, 12345):
            raise RuntimeError("device certificate template does not match the builder")

    def _tbs(self, key: ec.EllipticCurvePublicKey, device_id: str, sequence: int) -> bytearray:
        point = _point(key)
        o_serial, o_point, o_ski = self._offsets
        did = device_id.encode("ascii")
        tbs = bytearray(self._template)
        tbs[o_serial : o_serial + SERIAL_SIZE] = self._serial_prefix + sequence.to_bytes(8, "big")
        for o_id in self._id_offsets:
            tbs[o_id : o_id + 16] = did
        tbs[o_point : o_point + 65] = point
        tbs[o_ski : o_ski + 20] = hashlib.sha1(point).digest()  # noqa: S324
        return tbs

    def issue(
        self, device_public_key: ec.EllipticCurvePublicKey, device_id: str, sequence: int
    ) -> x509.Certificate:
        """Certify a device's P-256 key as ``device_id``, serial = (job tag, ``sequence``)."""
        if type(device_id) is not str or _DEVICE_ID.fullmatch(device_id) is None:
            raise NameNotAllowedError(
                f"device id {device_id!r} is not 16 lowercase hex digits (a 64-bit chip UID)"
            )
        if (
            not isinstance(device_public_key, ec.EllipticCurvePublicKey)
            or device_public_key.curve.name != "secp256r1"
        ):
            DEVICE.check_subject_key(device_public_key, what=f"device {device_id} key")
        if type(sequence) is not int or not 0 <= sequence <= MAX_SEQUENCE:
            serial_from_tag(self.job_tag, sequence)  # raises SerialNumberError naming it
        now = time.time()
        if not self._nb_ts <= now <= self._na_ts:
            raise IssuerNotValidError(
                f"production CA of job {self.job_id!r} cannot issue now "
                f"(devices valid {self.ca_cert.not_valid_before_utc} .. {self.profile.not_after})"
            )
        tbs = self._tbs(device_public_key, device_id, sequence)
        signature = self._key.sign_digest(hashlib.sha256(tbs).digest())
        return x509.load_der_x509_certificate(_assemble(tbs, signature))
