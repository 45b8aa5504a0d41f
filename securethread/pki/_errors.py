"""PKI-specific errors, all under :class:`securethread.errors.CertificateError`.

Each names one failed check so callers (programmer, device, reconciliation) can react
precisely; the messages say which certificate and which field.
"""

from __future__ import annotations

from ..errors import CertificateError, FormatError, ProfileViolationError

# --- issuance: the request violates the profile ----------------------------------------------


class BadRequestSignatureError(ProfileViolationError):
    """The CSR's signature does not verify (proof of possession failed)."""


class WrongKeyTypeError(ProfileViolationError):
    """The subject key is not an EC key on the curve the profile requires."""


class CARequestError(ProfileViolationError):
    """A non-CA profile was asked for a CA certificate (basicConstraints cA=TRUE)."""


class UnexpectedExtensionError(ProfileViolationError):
    """A request or certificate carries an extension outside the profile."""


class ValidityBeyondIssuerError(ProfileViolationError):
    """The requested validity is not nested in the issuer's (or is empty or over)."""


class NameNotAllowedError(ProfileViolationError):
    """A subject name, device id, job id, role or enclave name is not allowed."""


class ProfileMismatchError(ProfileViolationError):
    """A certificate has the form of its kind but not what its job's device profile issues
    (subject, key purposes, subjectAltName, revocation sources, notAfter, CA policy)."""


# --- the issuer ------------------------------------------------------------------------------


class IssuerError(CertificateError):
    """The issuer certificate or key cannot issue."""


class IssuerNotValidError(IssuerError):
    """The issuer certificate is expired or not yet valid."""


class IssuerKeyMismatchError(IssuerError):
    """The issuer certificate does not certify the issuer key (or a certificate does not
    match the key it is installed with)."""


# --- validation --------------------------------------------------------------------------------


class CertificateExpiredError(CertificateError):
    """A certificate in the chain is past its notAfter at the validation time."""


class CertificateNotYetValidError(CertificateError):
    """A certificate in the chain is before its notBefore at the validation time."""


class WrongPurposeError(CertificateError):
    """The certificate's key purpose (EKU) or role is not the one required."""


class ChainValidationError(CertificateError):
    """Path validation failed (signature, issuer name/key, basic constraints, pathLen...)."""


class JobMismatchError(CertificateError):
    """The certificate belongs to another production job."""


class SerialNumberError(CertificateError):
    """A serial number is not a securethread device serial or does not match its job."""


# --- device profile and revocation ------------------------------------------------------------


class DeviceProfileError(FormatError):
    """A device certificate profile (as built or as embedded in a job) is malformed."""


class RevocationError(CertificateError):
    """A revocation cannot be issued: wrong certificate, issuer or reason, or a previous CRL
    that is not this issuer's."""
