"""The RFC 5280 certificate profile securethread issues under, as small policy objects.

One :class:`CertificateProfile` per kind of certificate.  A profile decides the complete
extension set (nothing is copied from a request), checks the subject key, and checks an
existing certificate against itself during validation.  Rules applied to every kind:

* basicConstraints present and critical (RFC 5280 §4.2.1.9: MUST be critical in CA
  certificates; we mark it critical with cA=FALSE in end-entity ones too);
* keyUsage present and critical (§4.2.1.3), the minimum each kind needs; CAs also sign CRLs;
* subjectKeyIdentifier, non-critical, method (1) = SHA-1 of the subjectPublicKey (§4.2.1.2),
  which equals the CKA_ID of the key in its token;
* authorityKeyIdentifier, non-critical, keyIdentifier = the issuer's SKI (§4.2.1.1);
* extendedKeyUsage, non-critical, only in end-entity certificates (§4.2.1.12): a device
  carries id-kp-clientAuth and the project's device purpose, an enclave certificate exactly
  one purpose from the project arc.  CA certificates carry none: OpenSSL and other stock
  verifiers intersect an EKU in a CA certificate with every certificate below it;
* certificatePolicies, non-critical, only in production CAs: the project policy that marks
  the role (§4.2.1.4);
* no other extension (the verifier below refuses unknown ones).

:class:`DeviceProfile` is the per-job part of the device profile (subject and lifetime) that
the OEM puts in the signed job.  docs/pki.md gives the reason for every field.
"""

from __future__ import annotations

import datetime
import enum
import re
import unicodedata
from collections.abc import Mapping

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ..keys.policy import Curve
from . import oids
from ._errors import (
    CARequestError,
    DeviceProfileError,
    NameNotAllowedError,
    UnexpectedExtensionError,
    WrongKeyTypeError,
    WrongPurposeError,
)
from ._names import check_device_id, check_enclave_name, check_job_id, check_role

#: The organisation in enclave subjects and the default for a root created without one.
ORGANIZATION = "securethread"
PRODUCTION_CA_CN = "securethread production CA"

#: RFC 5280 §4.1.2.5: "no well-defined expiration date" -- GeneralizedTime 99991231235959Z.
#: The default notAfter of device certificates (IEEE 802.1AR §8.5 IDevID) and of the CAs
#: above them, which must outlive every device they certify.
NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)

#: X.520 upper bounds (RFC 5280 Appendix A.1): ub-organization-name, ub-organizational-unit-name,
#: ub-common-name, all 64.
UB_NAME = 64


class EnclavePurpose(enum.Enum):
    """What an enclave certificate certifies its key for."""

    IDENTITY = "identity"
    KEY_AGREEMENT = "key-agreement"
    LICENSE_SIGNING = "license-signing"
    LEDGER_SIGNING = "ledger-signing"


def _key_usage(
    *, digital_signature: bool = False, key_agreement: bool = False, ca: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        # RFC 5280 §4.2.1.3: keyCertSign to sign certificates, cRLSign to sign CRLs (§5).
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


_CURVE_NAMES = {Curve.P256: "P-256", Curve.P384: "P-384"}


@attrs.frozen(kw_only=True)
class CertificateProfile:
    """One kind of certificate: key curve, CA-ness, key usage, key purposes and policy.

    ``purpose`` is the project key purpose naming an end-entity kind (None for CAs);
    ``eku`` the complete extendedKeyUsage list (empty: no extension); ``policy`` the one
    certificatePolicies entry (None: no extension).
    """

    name: str
    curve: Curve
    ca: bool
    path_length: int | None
    key_usage: x509.KeyUsage
    purpose: x509.ObjectIdentifier | None
    eku: tuple[x509.ObjectIdentifier, ...] = ()
    policy: x509.ObjectIdentifier | None = None

    @property
    def expected_extensions(self) -> frozenset[x509.ObjectIdentifier]:
        exts = {
            ExtensionOID.BASIC_CONSTRAINTS,
            ExtensionOID.KEY_USAGE,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER,
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        }
        if self.eku:
            exts.add(ExtensionOID.EXTENDED_KEY_USAGE)
        if self.policy is not None:
            exts.add(ExtensionOID.CERTIFICATE_POLICIES)
        return frozenset(exts)

    def check_subject_key(self, key: object, *, what: str) -> ec.EllipticCurvePublicKey:
        """The key must be EC on this profile's curve (NIST SP 800-57 strength pairing)."""
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise WrongKeyTypeError(
                f"{what}: {self.name} needs an EC {_CURVE_NAMES[self.curve]} key, "
                f"got {type(key).__name__}"
            )
        if key.curve.name != self.curve.value:
            raise WrongKeyTypeError(
                f"{what}: {self.name} needs a {_CURVE_NAMES[self.curve]} key, got {key.curve.name}"
            )
        return key

    def extensions(
        self, subject_key: ec.EllipticCurvePublicKey, issuer_ski: bytes
    ) -> list[tuple[x509.ExtensionType, bool]]:
        """The complete extension list, with criticality, in a fixed order."""
        out: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=self.ca, path_length=self.path_length), True),
            (self.key_usage, True),
            (x509.SubjectKeyIdentifier.from_public_key(subject_key), False),
            (
                x509.AuthorityKeyIdentifier(
                    key_identifier=issuer_ski,
                    authority_cert_issuer=None,
                    authority_cert_serial_number=None,
                ),
                False,
            ),
        ]
        if self.eku:
            out.append((x509.ExtendedKeyUsage(list(self.eku)), False))
        if self.policy is not None:
            out.append(
                (x509.CertificatePolicies([x509.PolicyInformation(self.policy, None)]), False)
            )
        return out

    def check_request(self, csr: x509.CertificateSigningRequest) -> None:
        """Refuse requested extensions: the profile sets every extension itself."""
        for ext in csr.extensions:
            if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca and not self.ca:
                raise CARequestError(f"{self.name} profile cannot issue a CA certificate")
            raise UnexpectedExtensionError(
                f"CSR requests extension {ext.oid.dotted_string}; the {self.name} profile "
                "sets extensions itself"
            )

    def check_certificate(self, cert: x509.Certificate, *, what: str) -> None:
        """Check an issued certificate against the profile (role first, for clear errors)."""
        exts = cert.extensions
        self._check_role(exts, what=what)
        seen = {e.oid for e in exts}
        if seen != self.expected_extensions or len(seen) != len(exts):
            extra = sorted(o.dotted_string for o in seen - self.expected_extensions)
            missing = sorted(o.dotted_string for o in self.expected_extensions - seen)
            raise UnexpectedExtensionError(
                f"{what}: extensions outside the {self.name} profile "
                f"(unexpected {extra}, missing {missing})"
            )
        bc = exts.get_extension_for_class(x509.BasicConstraints)
        if not bc.critical or bc.value.ca != self.ca or bc.value.path_length != self.path_length:
            if bc.value.ca and not self.ca:
                raise WrongPurposeError(f"{what}: is a CA certificate, {self.name} is not")
            raise UnexpectedExtensionError(f"{what}: basicConstraints not as {self.name} requires")
        ku = exts.get_extension_for_class(x509.KeyUsage)
        if not ku.critical or ku.value != self.key_usage:
            raise UnexpectedExtensionError(f"{what}: keyUsage not as {self.name} requires")
        ski = exts.get_extension_for_class(x509.SubjectKeyIdentifier)
        key = self.check_subject_key(cert.public_key(), what=what)
        if ski.critical or ski.value != x509.SubjectKeyIdentifier.from_public_key(key):
            raise UnexpectedExtensionError(f"{what}: subjectKeyIdentifier is not method (1)")
        if exts.get_extension_for_class(x509.AuthorityKeyIdentifier).critical:
            raise UnexpectedExtensionError(f"{what}: authorityKeyIdentifier must not be critical")
        for oid in (ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.CERTIFICATE_POLICIES):
            if oid in seen and exts.get_extension_for_oid(oid).critical:
                raise UnexpectedExtensionError(f"{what}: {oid.dotted_string} must not be critical")

    def _check_role(self, exts: x509.Extensions, *, what: str) -> None:
        """Key purposes (EKU) and role policy say what kind of certificate this is."""
        try:
            eku: list[x509.ObjectIdentifier] | None = list(
                exts.get_extension_for_class(x509.ExtendedKeyUsage).value
            )
        except x509.ExtensionNotFound:
            eku = None
        if self.eku and eku is None:
            raise WrongPurposeError(f"{what}: has no key purpose, needs {self.name}")
        if self.eku and eku != list(self.eku):
            raise WrongPurposeError(
                f"{what}: key purposes {[o.dotted_string for o in eku or ()]} are not those of "
                f"a {self.name} certificate"
            )
        if not self.eku and eku is not None:
            raise WrongPurposeError(
                f"{what}: carries key purposes {[o.dotted_string for o in eku]}; "
                f"a {self.name} certificate carries none"
            )
        if self.policy is not None:
            try:
                policies = exts.get_extension_for_class(x509.CertificatePolicies).value
            except x509.ExtensionNotFound:
                raise WrongPurposeError(
                    f"{what}: is not a {self.name} (no policy {self.policy.dotted_string})"
                ) from None
            if list(policies) != [x509.PolicyInformation(self.policy, None)]:
                raise WrongPurposeError(
                    f"{what}: policies {[p.policy_identifier.dotted_string for p in policies]} "
                    f"are not the {self.name} policy {self.policy.dotted_string}"
                )


ROOT_CA = CertificateProfile(
    name="OEM root CA",
    curve=Curve.P384,
    ca=True,
    path_length=None,  # root -> production CA -> device needs depth 1 below the root
    key_usage=_key_usage(ca=True),
    purpose=None,
)
PRODUCTION_CA = CertificateProfile(
    name="production CA",
    curve=Curve.P256,
    ca=True,
    path_length=0,  # RFC 5280 §4.2.1.9: may certify end entities only
    key_usage=_key_usage(ca=True),
    purpose=None,
    policy=oids.POLICY_PRODUCTION_CA,
)
DEVICE = CertificateProfile(
    name="device",
    curve=Curve.P256,
    ca=False,
    path_length=None,
    # the device key signs (proof of possession, boot confirmation, the TLS 1.2/1.3
    # CertificateVerify) and agrees (licenses)
    key_usage=_key_usage(digital_signature=True, key_agreement=True),
    purpose=oids.EKU_DEVICE,
    # RFC 5280 §4.2.1.12 id-kp-clientAuth: TLS client authentication (mutual TLS to the
    # OEM's cloud or broker); then the project purpose that marks a securethread device.
    eku=(ExtendedKeyUsageOID.CLIENT_AUTH, oids.EKU_DEVICE),
)
ENCLAVE_PROFILES: dict[EnclavePurpose, CertificateProfile] = {
    EnclavePurpose.IDENTITY: CertificateProfile(
        name="enclave identity",
        curve=Curve.P384,
        ca=False,
        path_length=None,
        key_usage=_key_usage(digital_signature=True),
        purpose=oids.EKU_ENCLAVE_IDENTITY,
        eku=(oids.EKU_ENCLAVE_IDENTITY,),
    ),
    EnclavePurpose.KEY_AGREEMENT: CertificateProfile(
        name="enclave key agreement",
        curve=Curve.P256,
        ca=False,
        path_length=None,
        key_usage=_key_usage(key_agreement=True),
        purpose=oids.EKU_ENCLAVE_KEY_AGREEMENT,
        eku=(oids.EKU_ENCLAVE_KEY_AGREEMENT,),
    ),
    EnclavePurpose.LICENSE_SIGNING: CertificateProfile(
        name="license signing",
        curve=Curve.P256,
        ca=False,
        path_length=None,
        key_usage=_key_usage(digital_signature=True),
        purpose=oids.EKU_LICENSE_SIGNING,
        eku=(oids.EKU_LICENSE_SIGNING,),
    ),
    EnclavePurpose.LEDGER_SIGNING: CertificateProfile(
        name="ledger signing",
        curve=Curve.P256,
        ca=False,
        path_length=None,
        key_usage=_key_usage(digital_signature=True),
        purpose=oids.EKU_LEDGER_SIGNING,
        eku=(oids.EKU_LEDGER_SIGNING,),
    ),
}


def enclave_profile(purpose: object) -> CertificateProfile:
    if not isinstance(purpose, EnclavePurpose):
        raise WrongPurposeError(f"{purpose!r} is not an EnclavePurpose")
    return ENCLAVE_PROFILES[purpose]


# --- subject names (RFC 5280 §4.1.2.6) ----------------------------------------------------------


def _attr(oid: x509.ObjectIdentifier, value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(oid, value)


def check_organisation(value: object, *, what: str = "organisation") -> str:
    """An organisation (or product) name: 1..64 characters, no control or format characters,
    no leading or trailing space, valid Unicode (UTF8String, RFC 5280 §4.1.2.6)."""
    if type(value) is not str or not 1 <= len(value) <= UB_NAME:
        raise NameNotAllowedError(f"{what} {value!r} must be a string of 1..{UB_NAME} characters")
    if value != value.strip() or any(unicodedata.category(c)[0] == "C" for c in value):
        raise NameNotAllowedError(
            f"{what} {value!r} has control characters or leading/trailing spaces"
        )
    return value


def root_subject(common_name: str, organization: str = ORGANIZATION) -> x509.Name:
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= UB_NAME:
        # X.520 ub-common-name = 64 (RFC 5280 Appendix A.1)
        raise NameNotAllowedError(f"root common name {common_name!r} must be 1..64 characters")
    check_organisation(organization)
    return x509.Name(
        [_attr(NameOID.ORGANIZATION_NAME, organization), _attr(NameOID.COMMON_NAME, common_name)]
    )


def enclave_request_subject(enclave_name: str) -> x509.Name:
    """The name an enclave puts in its CSR; the OEM adds the role it certifies."""
    check_enclave_name(enclave_name)
    return x509.Name(
        [_attr(NameOID.ORGANIZATION_NAME, ORGANIZATION), _attr(NameOID.COMMON_NAME, enclave_name)]
    )


def enclave_subject(enclave_name: str, role: str) -> x509.Name:
    check_enclave_name(enclave_name)
    check_role(role)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            _attr(oids.ATTR_ENCLAVE_ROLE, role),
            _attr(NameOID.COMMON_NAME, enclave_name),
        ]
    )


def production_ca_request_subject(job_id: str) -> x509.Name:
    """The name the programmer puts in its production-CA CSR; the OEM adds its organisation."""
    check_job_id(job_id)
    return x509.Name(
        [_attr(oids.ATTR_JOB_ID, job_id), _attr(NameOID.COMMON_NAME, PRODUCTION_CA_CN)]
    )


def production_ca_subject(job_id: str, organization: str) -> x509.Name:
    """O = the OEM, jobId = the job (one production CA per job), CN = what it is."""
    check_job_id(job_id)
    check_organisation(organization)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATION_NAME, organization),
            _attr(oids.ATTR_JOB_ID, job_id),
            _attr(NameOID.COMMON_NAME, PRODUCTION_CA_CN),
        ]
    )


def organisation_of(cert: x509.Certificate) -> str:
    """The one organizationName of a certificate's subject (the OEM for root and CAs)."""
    return single_attribute(cert.subject, NameOID.ORGANIZATION_NAME, what="certificate")


# --- the job's device profile --------------------------------------------------------------------

DEVICE_ID_FIELD = "{device_id}"
# Literal characters of a CN template: safe in an MQTT user name used in topic patterns (no
# '/', '+', '#'), in RFC 4514 strings (no escapes needed) and in file names.
_TEMPLATE = re.compile(r"[A-Za-z0-9._-]*\{device_id\}[A-Za-z0-9._-]*")
_MAX_TEMPLATE = UB_NAME - 16 + len(DEVICE_ID_FIELD)  # the applied CN fits ub-common-name
_NO_EXPIRY_TS = int(NO_EXPIRY.timestamp())
_MAP_KEYS = frozenset({"organisation", "common_name_template", "not_after"})


def _profile_error(exc: NameNotAllowedError) -> DeviceProfileError:
    return DeviceProfileError(f"device profile: {exc}")


@attrs.frozen(kw_only=True)
class DeviceProfile:
    """The job-level part of the device certificate profile, signed by the OEM in the job.

    ``organisation`` (subject O), ``product`` (subject OU, optional), the common-name
    template (exactly one ``{device_id}``; the default makes CN = the device id, which
    brokers such as mosquitto take as the user name) and the devices' notAfter (default
    99991231235959Z).  Valid once constructed; :meth:`to_map`/:meth:`from_map` are the
    strict form embedded in the job (exact keys and types).
    """

    organisation: str
    product: str | None = None
    common_name_template: str = DEVICE_ID_FIELD
    not_after: datetime.datetime = NO_EXPIRY

    def __attrs_post_init__(self) -> None:
        try:
            check_organisation(self.organisation)
            if self.product is not None:
                check_organisation(self.product, what="product")
        except NameNotAllowedError as exc:
            raise _profile_error(exc) from None
        t = self.common_name_template
        if (
            type(t) is not str
            or len(t) > _MAX_TEMPLATE
            or _TEMPLATE.fullmatch(t) is None
            or t.count(DEVICE_ID_FIELD) != 1
        ):
            raise DeviceProfileError(
                f"device profile: common-name template {t!r} must hold {DEVICE_ID_FIELD} once, "
                f"otherwise only [A-Za-z0-9._-], at most {_MAX_TEMPLATE} characters"
            )
        na = self.not_after
        if not isinstance(na, datetime.datetime) or na.tzinfo is None:
            raise DeviceProfileError("device profile: not_after must be a timezone-aware datetime")
        if na.microsecond or na.utcoffset() != datetime.timedelta(0):
            raise DeviceProfileError(
                "device profile: not_after must be UTC, to the second (RFC 5280 §4.1.2.5)"
            )
        if not 0 < na.timestamp() <= _NO_EXPIRY_TS:
            raise DeviceProfileError(
                f"device profile: not_after {na} is outside 1970 .. 9999-12-31T23:59:59Z"
            )

    def common_name(self, device_id: str) -> str:
        check_device_id(device_id)
        return self.common_name_template.replace(DEVICE_ID_FIELD, device_id)

    def subject(self, device_id: str) -> x509.Name:
        """O, [OU], serialNumber (X.520 §6.2.9, PrintableString) = device id, CN."""
        attrs_ = [_attr(NameOID.ORGANIZATION_NAME, self.organisation)]
        if self.product is not None:
            attrs_.append(_attr(NameOID.ORGANIZATIONAL_UNIT_NAME, self.product))
        attrs_.append(_attr(NameOID.SERIAL_NUMBER, check_device_id(device_id)))
        attrs_.append(_attr(NameOID.COMMON_NAME, self.common_name(device_id)))
        return x509.Name(attrs_)

    def to_map(self) -> dict[str, str | int]:
        """The canonical map (``product`` only when set; ``not_after`` in Unix seconds)."""
        out: dict[str, str | int] = {
            "organisation": self.organisation,
            "common_name_template": self.common_name_template,
            "not_after": int(self.not_after.timestamp()),
        }
        if self.product is not None:
            out["product"] = self.product
        return out

    @classmethod
    def from_map(cls, m: object) -> DeviceProfile:
        """Strict inverse of :meth:`to_map`: exact keys, exact types, bounded values."""
        if not isinstance(m, Mapping) or not all(type(k) is str for k in m):
            raise DeviceProfileError("device profile: not a map with string keys")
        keys = set(m)
        if keys != _MAP_KEYS and keys != _MAP_KEYS | {"product"}:
            raise DeviceProfileError(
                f"device profile: keys {sorted(keys ^ (_MAP_KEYS | {'product'}))} "
                "missing or unexpected"
            )
        for k in keys - {"not_after"}:
            if type(m[k]) is not str:
                raise DeviceProfileError(f"device profile: {k} must be a string")
        na = m["not_after"]
        if type(na) is not int or not 0 < na <= _NO_EXPIRY_TS:
            raise DeviceProfileError(
                f"device profile: not_after must be Unix seconds in 1 .. {_NO_EXPIRY_TS}"
            )
        return cls(
            organisation=m["organisation"],
            product=m.get("product"),
            common_name_template=m["common_name_template"],
            not_after=datetime.datetime.fromtimestamp(na, datetime.UTC),
        )


def single_attribute(name: x509.Name, oid: x509.ObjectIdentifier, *, what: str) -> str:
    """The one value of ``oid`` in ``name``; NameNotAllowedError if absent or repeated."""
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise NameNotAllowedError(f"{what}: subject must carry exactly one {oid.dotted_string}")
    return values[0].value
