"""Chain validation: ``cryptography.x509.verification`` plus the project's explicit checks.

Order: validity at the validation time (specific expiry errors), the profile and role of
each certificate (key purposes, the production-CA policy: an enclave certificate never
passes as a device or CA one, a device never as a CA), then the RFC 5280 §6 path
validation by cryptography's verifier -- signatures, name chaining, basicConstraints,
pathLen, keyUsage -- under an ExtensionPolicy that also pins the key purposes and refuses an
EKU in a CA certificate, and last the job binding (the production CA names the job; the
device serial is a device serial and, when the caller knows the job, carries its tag; with
the job's :class:`DeviceProfile`, the device and CA are exactly what that profile issues).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from cryptography import x509
from cryptography.x509 import verification as xv

from ..errors import CertificateError
from ._errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    ChainValidationError,
    JobMismatchError,
    NameNotAllowedError,
    SerialNumberError,
    ValidityBeyondIssuerError,
    WrongPurposeError,
)
from ._names import check_device_id, check_enclave_name, check_role
from .profile import (
    DEVICE,
    ENCLAVE_PROFILES,
    PRODUCTION_CA,
    CertificateProfile,
    DeviceProfile,
    EnclavePurpose,
    enclave_profile,
    production_ca_job,
    single_attribute,
)
from .serial import job_tag as _job_tag
from .serial import parse_device_serial

_C = xv.Criticality
_DEVICE_PURPOSE = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH


def job_id_of(production_ca_cert: x509.Certificate) -> str:
    """The job id bound into a production CA certificate's subject (its organizationalUnitName,
    read only from a name of the production CA's exact form: O, OU, CN)."""
    return production_ca_job(production_ca_cert.subject, what="production CA certificate")


def device_id_of(device_cert: x509.Certificate) -> str:
    """The 16-hex-digit device id (subject serialNumber, X.520) of a device certificate."""
    value = single_attribute(
        device_cert.subject, x509.NameOID.SERIAL_NUMBER, what="device certificate"
    )
    return check_device_id(value)


# --- cryptography verifier policies -------------------------------------------------------------


def _require_purposes(
    profile: CertificateProfile,
) -> Callable[[xv.Policy, x509.Certificate, x509.ExtendedKeyUsage], None]:
    def check(_: xv.Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage) -> None:
        try:
            profile.check_purposes(list(eku), what="leaf")
        except WrongPurposeError as exc:
            raise ValueError(str(exc)) from None

    return check


def _ca_purpose(_: xv.Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    # CA certificates carry no EKU (an EKU there narrows the whole chain in stock verifiers).
    if eku is not None:
        raise ValueError("a CA certificate carries a key purpose")


def _ee_not_ca(_: xv.Policy, cert: x509.Certificate, bc: x509.BasicConstraints) -> None:
    if bc.ca:
        raise ValueError("end-entity certificate has cA=TRUE")


_CA_POLICY = (
    xv.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, _C.CRITICAL, None)
    .require_present(x509.KeyUsage, _C.CRITICAL, None)
    .require_present(x509.SubjectKeyIdentifier, _C.NON_CRITICAL, None)
    .may_be_present(x509.ExtendedKeyUsage, _C.NON_CRITICAL, _ca_purpose)
)


def _ee_policy(profile: CertificateProfile) -> xv.ExtensionPolicy:
    return (
        xv.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, _C.CRITICAL, _ee_not_ca)
        .require_present(x509.KeyUsage, _C.CRITICAL, None)
        .require_present(x509.AuthorityKeyIdentifier, _C.NON_CRITICAL, None)
        .require_present(x509.ExtendedKeyUsage, _C.NON_CRITICAL, _require_purposes(profile))
    )


# One end-entity policy per key purpose (devices: id-kp-clientAuth), requiring that
# profile's EKU list.
_EE_POLICIES: dict[x509.ObjectIdentifier, xv.ExtensionPolicy] = {
    p.purpose: _ee_policy(p) for p in (DEVICE, *ENCLAVE_PROFILES.values()) if p.purpose is not None
}


def build_verifier(
    root_cert: x509.Certificate, *, purpose: x509.ObjectIdentifier, at: datetime.datetime
) -> xv.ClientVerifier:
    """cryptography's RFC 5280 verifier with the library's policy for one leaf purpose
    (devices: id-kp-clientAuth; enclaves: their key purpose)."""
    ee = _EE_POLICIES.get(purpose)
    if ee is None:
        raise WrongPurposeError(f"{purpose.dotted_string} is not an end-entity key purpose")
    return (
        xv.PolicyBuilder()
        .store(xv.Store([root_cert]))
        .time(at)
        .max_chain_depth(1 if purpose == DEVICE.purpose else 0)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=ee)
        .build_client_verifier()
    )


# --- explicit checks ------------------------------------------------------------------------------


def _at(at: datetime.datetime | None) -> datetime.datetime:
    if at is None:
        return datetime.datetime.now(datetime.UTC)
    if at.tzinfo is None:
        raise ValueError("validation time must be timezone-aware")
    return at


def _check_type(cert: object, what: str) -> x509.Certificate:
    if not isinstance(cert, x509.Certificate):
        raise CertificateError(f"{what} is a {type(cert).__name__}, not a certificate")
    return cert


def check_validity(cert: x509.Certificate, at: datetime.datetime, *, what: str) -> None:
    """RFC 5280 §6.1.3 (a)(2): ``at`` must lie in [notBefore, notAfter]."""
    if at < cert.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"{what} is not valid before {cert.not_valid_before_utc} (checked at {at})"
        )
    if at > cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"{what} expired at {cert.not_valid_after_utc} (checked at {at})"
        )


def _verify(
    verifier: xv.ClientVerifier,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    expected: list[x509.Certificate],
) -> None:
    try:
        chain = verifier.verify(leaf, intermediates).chain
    except xv.VerificationError as exc:
        raise ChainValidationError(f"path validation failed: {exc}") from None
    if chain != expected:  # pragma: no cover - only the given certificates are offered
        raise ChainValidationError("path validation chose an unexpected chain")


def validate_device_chain(
    device_cert: x509.Certificate,
    production_ca_cert: x509.Certificate,
    root_cert: x509.Certificate,
    *,
    at: datetime.datetime | None = None,
    job_id: str | None = None,
    job_tag: bytes | None = None,
    profile: DeviceProfile | None = None,
) -> None:
    """Validate root -> production CA -> device; raise a CertificateError subclass.

    ``job_id`` / ``job_tag`` (the job's identity, SHA-256 of the signed job): also require
    the production CA to be that job's and the device serial to carry that job's tag;
    ``profile`` (the job's device profile): the device and CA exactly as it issues them.
    """
    device = _check_type(device_cert, "device certificate")
    ca = _check_type(production_ca_cert, "production CA certificate")
    root = _check_type(root_cert, "root certificate")
    when = _at(at)
    check_validity(root, when, what="root certificate")
    check_validity(ca, when, what="production CA certificate")
    check_validity(device, when, what="device certificate")
    PRODUCTION_CA.check_certificate(ca, what="production CA certificate")
    DEVICE.check_certificate(device, what="device certificate")
    _verify(
        build_verifier(root, purpose=_DEVICE_PURPOSE, at=when), device, [ca], [device, ca, root]
    )
    ca_job = job_id_of(ca)
    if job_id is not None and ca_job != job_id:
        raise JobMismatchError(f"production CA is for job {ca_job!r}, not {job_id!r}")
    if profile is not None:
        profile.check_production_ca(ca, what="production CA certificate")
    _check_job_binding(
        device, ca, ca_job, None if job_tag is None else _job_tag(job_tag), profile
    )


def _check_job_binding(
    device: x509.Certificate,
    ca: x509.Certificate,
    ca_job: str,
    tag: bytes | None,
    profile: DeviceProfile | None,
) -> None:
    """The device names a device id (its subjectAltName URI too, when it has one) and has a
    device serial (of the job's tag, when the caller knows the job); the device's validity
    is nested in the CA's; with the job's profile, it is exactly what the profile issues."""
    device_id = device_id_of(device)
    single_attribute(device.subject, x509.NameOID.COMMON_NAME, what="device certificate")
    try:
        san = device.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)  # one: DEVICE checked
        if uri.count(device_id) != 1:
            raise NameNotAllowedError(
                f"device certificate: subjectAltName {uri!r} does not name device {device_id}"
            )
    if profile is not None:
        profile.check_device(device, device_id, what="device certificate")
    if tag is not None and parse_device_serial(device.serial_number).job_tag != tag:
        raise SerialNumberError(f"device serial {device.serial_number:#x} is not of job {ca_job!r}")
    if tag is None:
        parse_device_serial(device.serial_number)
    if (
        device.not_valid_before_utc < ca.not_valid_before_utc
        or device.not_valid_after_utc > ca.not_valid_after_utc
    ):
        raise ValidityBeyondIssuerError("device certificate validity exceeds its production CA's")


def validate_enclave_certificate(
    cert: x509.Certificate,
    root_cert: x509.Certificate,
    *,
    purpose: EnclavePurpose,
    role: str | None = None,
    at: datetime.datetime | None = None,
) -> None:
    """Validate root -> enclave certificate for ``purpose`` (and ``role`` if given)."""
    leaf = _check_type(cert, "enclave certificate")
    root = _check_type(root_cert, "root certificate")
    profile = enclave_profile(purpose)
    if role is not None:
        check_role(role)
    when = _at(at)
    check_validity(root, when, what="root certificate")
    check_validity(leaf, when, what="enclave certificate")
    profile.check_certificate(leaf, what="enclave certificate")
    assert profile.purpose is not None
    _verify(build_verifier(root, purpose=profile.purpose, at=when), leaf, [], [leaf, root])
    actual = single_attribute(
        leaf.subject, x509.NameOID.ORGANIZATIONAL_UNIT_NAME, what="enclave certificate"
    )
    check_role(actual)
    if role is not None and actual != role:
        raise WrongPurposeError(f"enclave certificate has role {actual!r}, not {role!r}")
    check_enclave_name(
        single_attribute(leaf.subject, x509.NameOID.COMMON_NAME, what="enclave certificate")
    )


class DeviceChainValidator:
    """Validates many device certificates of one job (reconciliation's hot path).

    The production CA is validated against the root once, here: validity at ``at``,
    profile, ``verify_directly_issued_by`` (issuer name and signature, RFC 5280 §6.1.3 (a)),
    job.  Per device, cryptography's verifier runs with the validated production CA as its
    trust anchor (one signature check instead of two), then the same explicit checks as
    :func:`validate_device_chain` (with ``profile``, the job's: exactly what it issues).
    """

    __slots__ = ("production_ca", "root", "job_id", "at", "profile", "_tag", "_verifier")

    def __init__(
        self,
        production_ca_cert: x509.Certificate,
        root_cert: x509.Certificate,
        *,
        at: datetime.datetime | None = None,
        job_id: str | None = None,
        job_tag: bytes | None = None,
        profile: DeviceProfile | None = None,
    ) -> None:
        ca = _check_type(production_ca_cert, "production CA certificate")
        root = _check_type(root_cert, "root certificate")
        when = _at(at)
        check_validity(root, when, what="root certificate")
        check_validity(ca, when, what="production CA certificate")
        PRODUCTION_CA.check_certificate(ca, what="production CA certificate")
        try:
            ca.verify_directly_issued_by(root)
        except (ValueError, TypeError) as exc:
            raise ChainValidationError(f"production CA is not issued by the root: {exc}") from None
        except Exception as exc:  # cryptography.exceptions.InvalidSignature
            raise ChainValidationError(
                f"production CA signature does not verify under the root ({type(exc).__name__})"
            ) from None
        ca_job = job_id_of(ca)
        if job_id is not None and ca_job != job_id:
            raise JobMismatchError(f"production CA is for job {ca_job!r}, not {job_id!r}")
        if profile is not None:
            profile.check_production_ca(ca, what="production CA certificate")
        self.production_ca, self.root, self.job_id, self.at = ca, root, ca_job, when
        self.profile = profile
        self._tag = None if job_tag is None else _job_tag(job_tag)
        self._verifier = (
            xv.PolicyBuilder()
            .store(xv.Store([ca]))
            .time(when)
            .max_chain_depth(0)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICIES[_DEVICE_PURPOSE])
            .build_client_verifier()
        )

    def validate(self, device_cert: x509.Certificate) -> None:
        """Validate one device certificate of this job; raise a CertificateError subclass."""
        device = _check_type(device_cert, "device certificate")
        ca = self.production_ca
        check_validity(device, self.at, what="device certificate")
        DEVICE.check_certificate(device, what="device certificate")
        _verify(self._verifier, device, [], [device, ca])
        _check_job_binding(device, ca, self.job_id, self._tag, self.profile)
