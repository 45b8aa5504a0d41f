"""The RFC 5280 certificate profile securethread issues under, as small policy objects.

One :class:`CertificateProfile` per kind of certificate.  A profile decides the complete
extension set (nothing is copied from a request), checks the subject key, and checks an
existing certificate against itself during validation.  Rules applied to every kind:

* basicConstraints present and critical (RFC 5280 §4.2.1.9: MUST be critical in CA
  certificates; we mark it critical with cA=FALSE in end-entity ones too);
* keyUsage present and critical (§4.2.1.3), the minimum each kind needs; CAs also sign CRLs;
* subjectKeyIdentifier, non-critical, method (1) = SHA-1 of the subjectPublicKey (§4.2.1.2);
* authorityKeyIdentifier, non-critical, keyIdentifier = the issuer's SKI (§4.2.1.1);
* extendedKeyUsage, non-critical, only in end-entity certificates (§4.2.1.12): a device
  carries id-kp-clientAuth (and, when the job's profile names the OEM's arc, the OEM's device
  purpose after it), an enclave certificate exactly one purpose from the project arc.  CA
  certificates carry none: OpenSSL and other stock verifiers intersect an EKU in a CA
  certificate with every certificate below it;
* certificatePolicies, non-critical, only in production CAs and only under the OEM's arc
  (§4.2.1.4);
* a device's subjectAltName (§4.2.1.6), cRLDistributionPoints (§4.2.1.13) and
  authorityInfoAccess OCSP (§4.2.2.1), non-critical, when the job's profile gives them;
* no other extension (the verifier below refuses unknown ones).

No name, key purpose or policy carries an OID of the project's own (UUID) arc: Go and GnuTLS
cannot parse one (:mod:`.oids`).  :class:`DeviceProfile` is the per-job part of the device
profile (subject, names, revocation sources, lifetime) that the OEM puts in the signed job.
docs/pki.md gives the reason for every field.
"""

from __future__ import annotations

import datetime
import enum
import functools
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
)

from ..keys.policy import Curve
from . import oids
from ._errors import (
    CARequestError,
    DeviceProfileError,
    NameNotAllowedError,
    ProfileMismatchError,
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

    ``purpose`` is the key purpose naming an end-entity kind (None for CAs); ``eku`` the
    extendedKeyUsage list every certificate of the kind starts with (empty: no extension);
    ``oem_purpose`` / ``oem_policy``: one more key purpose / the one certificatePolicies entry
    under the OEM's arc, when the job's profile names one; ``optional`` the further
    extensions a job's profile may add.
    """

    name: str
    curve: Curve
    ca: bool
    path_length: int | None
    key_usage: x509.KeyUsage
    purpose: x509.ObjectIdentifier | None
    eku: tuple[x509.ObjectIdentifier, ...] = ()
    oem_purpose: bool = False
    oem_policy: bool = False
    optional: frozenset[x509.ObjectIdentifier] = frozenset()

    @property
    def required_extensions(self) -> frozenset[x509.ObjectIdentifier]:
        exts = {
            ExtensionOID.BASIC_CONSTRAINTS,
            ExtensionOID.KEY_USAGE,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER,
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        }
        if self.eku:
            exts.add(ExtensionOID.EXTENDED_KEY_USAGE)
        return frozenset(exts)

    @property
    def allowed_extensions(self) -> frozenset[x509.ObjectIdentifier]:
        policies = {ExtensionOID.CERTIFICATE_POLICIES} if self.oem_policy else set()
        return self.required_extensions | self.optional | policies

    def purposes(self, oem_arc: str | None) -> tuple[x509.ObjectIdentifier, ...]:
        """The extendedKeyUsage list this kind carries under ``oem_arc`` (or no arc)."""
        if self.oem_purpose and oem_arc is not None:
            return (*self.eku, oids.device_purpose(oem_arc))
        return self.eku

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
        self,
        subject_key: ec.EllipticCurvePublicKey,
        issuer_ski: bytes,
        *,
        oem_arc: str | None = None,
        tail: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> list[tuple[x509.ExtensionType, bool]]:
        """The complete extension list, with criticality, in a fixed order; ``tail`` (a
        device's names and revocation sources) goes last."""
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
        eku = self.purposes(oem_arc)
        if eku:
            out.append((x509.ExtendedKeyUsage(list(eku)), False))
        if self.oem_policy and oem_arc is not None:
            policy = oids.production_ca_policy(oem_arc)
            out.append((x509.CertificatePolicies([x509.PolicyInformation(policy, None)]), False))
        for ext, critical in tail:
            if ext.oid not in self.optional:
                raise UnexpectedExtensionError(f"the {self.name} profile has no {ext.oid}")
            out.append((ext, critical))
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
        """Check an issued certificate against the profile (role first, for clear errors).

        The form every job's profile shares; :meth:`DeviceProfile.check_device` and
        :meth:`DeviceProfile.check_production_ca` check the values one job's profile gives.
        """
        exts = cert.extensions
        self._check_role(exts, what=what)
        seen = {e.oid for e in exts}
        if (
            not self.required_extensions <= seen <= self.allowed_extensions
            or len(seen) != len(exts)
        ):
            extra = sorted(o.dotted_string for o in seen - self.allowed_extensions)
            missing = sorted(o.dotted_string for o in self.required_extensions - seen)
            raise UnexpectedExtensionError(
                f"{what}: extensions outside the {self.name} profile "
                f"(unexpected {extra}, missing {missing})"
            )
        ku = exts.get_extension_for_class(x509.KeyUsage)
        if not ku.critical or ku.value != self.key_usage:
            raise UnexpectedExtensionError(f"{what}: keyUsage not as {self.name} requires")
        ski = exts.get_extension_for_class(x509.SubjectKeyIdentifier)
        key = self.check_subject_key(cert.public_key(), what=what)
        if ski.critical or ski.value != x509.SubjectKeyIdentifier.from_public_key(key):
            raise UnexpectedExtensionError(f"{what}: subjectKeyIdentifier is not method (1)")
        for ext in exts:
            if ext.oid != ExtensionOID.BASIC_CONSTRAINTS and ext.oid != ExtensionOID.KEY_USAGE:
                if ext.critical:
                    raise UnexpectedExtensionError(
                        f"{what}: {ext.oid.dotted_string} must not be critical"
                    )
        _check_field_extensions(exts, what=what)

    def _check_role(self, exts: x509.Extensions, *, what: str) -> None:
        """CA-ness, key purposes (EKU) and policy say what kind of certificate this is."""
        try:
            bc = exts.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            raise UnexpectedExtensionError(f"{what}: has no basicConstraints") from None
        if bc.value.ca != self.ca or bc.value.path_length != self.path_length:
            if bc.value.ca and not self.ca:
                raise WrongPurposeError(f"{what}: is a CA certificate, {self.name} is not")
            if not bc.value.ca and self.ca:
                raise WrongPurposeError(f"{what}: is not a CA certificate, {self.name} is")
            raise WrongPurposeError(
                f"{what}: pathLen {bc.value.path_length} is not that of a {self.name} "
                f"({self.path_length})"
            )
        if not bc.critical:
            raise UnexpectedExtensionError(f"{what}: basicConstraints must be critical")
        try:
            eku: list[x509.ObjectIdentifier] | None = list(
                exts.get_extension_for_class(x509.ExtendedKeyUsage).value
            )
        except x509.ExtensionNotFound:
            eku = None
        if self.eku and eku is None:
            raise WrongPurposeError(f"{what}: has no key purpose, needs {self.name}")
        if self.eku:
            assert eku is not None
            self.check_purposes(eku, what=what)
        elif eku is not None:
            raise WrongPurposeError(
                f"{what}: carries key purposes {[o.dotted_string for o in eku]}; "
                f"a {self.name} certificate carries none"
            )
        try:
            policies = list(exts.get_extension_for_class(x509.CertificatePolicies).value)
        except x509.ExtensionNotFound:
            return
        if not self.oem_policy:
            raise WrongPurposeError(f"{what}: a {self.name} certificate carries no policy")
        if (
            len(policies) != 1
            or policies[0].policy_qualifiers is not None
            or _oem_arc_of(policies[0].policy_identifier, oids.production_ca_policy) is None
        ):
            raise WrongPurposeError(
                f"{what}: policies {[p.policy_identifier.dotted_string for p in policies]} "
                f"are not one {self.name} policy under an OEM arc (<oem_arc>.2, no qualifiers)"
            )

    def check_purposes(self, eku: Sequence[x509.ObjectIdentifier], *, what: str) -> None:
        """The EKU list is this kind's: ``eku``, then (devices) at most the OEM's purpose."""
        n = len(self.eku)
        extra = list(eku[n:])
        if list(eku[:n]) != list(self.eku) or (
            extra
            and not (
                self.oem_purpose
                and len(extra) == 1
                and _oem_arc_of(extra[0], oids.device_purpose) is not None
            )
        ):
            raise WrongPurposeError(
                f"{what}: key purposes {[o.dotted_string for o in eku]} are not those of "
                f"a {self.name} certificate"
            )


def _oem_arc_of(
    oid: x509.ObjectIdentifier, allocate: Callable[[str], x509.ObjectIdentifier]
) -> str | None:
    """The OEM arc ``oid`` was allocated under by ``allocate`` (``<arc>.n``), or None."""
    arc, _, _ = oid.dotted_string.rpartition(".")
    try:
        return arc if allocate(arc) == oid else None
    except DeviceProfileError:
        return None


def _check_field_extensions(exts: x509.Extensions, *, what: str) -> None:
    """The shape of a device's subjectAltName, cRLDistributionPoints and authorityInfoAccess
    (each optional): one URI each, as :class:`DeviceProfile` writes them."""
    for ext in exts:
        v = ext.value
        if isinstance(v, x509.SubjectAlternativeName):
            # RFC 5280 §4.2.1.6: the subject is not empty, so the SAN is non-critical
            if len(v) != 1 or not isinstance(next(iter(v)), x509.UniformResourceIdentifier):
                raise UnexpectedExtensionError(f"{what}: subjectAltName is not one URI")
        elif isinstance(v, x509.CRLDistributionPoints):
            # §4.2.1.13: one distribution point, a fullName URI; no reasons, no cRLIssuer
            dps = list(v)
            if (
                len(dps) != 1
                or dps[0].full_name is None
                or len(dps[0].full_name) != 1
                or not isinstance(dps[0].full_name[0], x509.UniformResourceIdentifier)
                or dps[0].reasons is not None
                or dps[0].crl_issuer is not None
            ):
                raise UnexpectedExtensionError(
                    f"{what}: cRLDistributionPoints is not one distribution point with one URI"
                )
        elif isinstance(v, x509.AuthorityInformationAccess):
            # §4.2.2.1: one id-ad-ocsp access description, a URI (RFC 6960 §3.1)
            ads = list(v)
            if (
                len(ads) != 1
                or ads[0].access_method != AuthorityInformationAccessOID.OCSP
                or not isinstance(ads[0].access_location, x509.UniformResourceIdentifier)
            ):
                raise UnexpectedExtensionError(
                    f"{what}: authorityInfoAccess is not one OCSP responder URI"
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
    oem_policy=True,
)
DEVICE = CertificateProfile(
    name="device",
    curve=Curve.P256,
    ca=False,
    path_length=None,
    # the device key signs (proof of possession, boot confirmation, the TLS 1.2/1.3
    # CertificateVerify) and agrees (licenses)
    key_usage=_key_usage(digital_signature=True, key_agreement=True),
    # RFC 5280 §4.2.1.12 id-kp-clientAuth: TLS client authentication (mutual TLS to the
    # OEM's cloud or broker); then, with an OEM arc, the OEM's purpose marking its devices.
    purpose=ExtendedKeyUsageOID.CLIENT_AUTH,
    eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
    oem_purpose=True,
    optional=frozenset(
        {
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
            ExtensionOID.CRL_DISTRIBUTION_POINTS,
            ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        }
    ),
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
    """O=securethread, OU=<role> ("oem" | "programmer"), CN=<enclave name>."""
    check_enclave_name(enclave_name)
    check_role(role)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            _attr(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            _attr(NameOID.COMMON_NAME, enclave_name),
        ]
    )


def production_ca_request_subject(job_id: str) -> x509.Name:
    """The name the programmer puts in its production-CA CSR; the OEM adds its organisation."""
    check_job_id(job_id)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATIONAL_UNIT_NAME, job_id),
            _attr(NameOID.COMMON_NAME, PRODUCTION_CA_CN),
        ]
    )


def production_ca_subject(job_id: str, organization: str) -> x509.Name:
    """O = the OEM, OU = the job (one production CA per job), CN = what it is.

    The job id is an organizationalUnitName (X.520 §6.4.2, UTF8String): a standard attribute
    every stack parses; :func:`job_id_of` reads it only from a name of exactly this form.
    """
    check_job_id(job_id)
    check_organisation(organization)
    return x509.Name(
        [
            _attr(NameOID.ORGANIZATION_NAME, organization),
            _attr(NameOID.ORGANIZATIONAL_UNIT_NAME, job_id),
            _attr(NameOID.COMMON_NAME, PRODUCTION_CA_CN),
        ]
    )


def production_ca_job(name: x509.Name, *, what: str) -> str:
    """The job of a production CA subject: exactly O, OU = the job id, CN = "securethread
    production CA", one value each (so no other name -- a device's OU = product, an
    enclave's OU = role -- is ever read as a job)."""
    rdns = list(name.rdns)
    oids_ = [tuple(a.oid for a in rdn) for rdn in rdns]
    expected = [
        (NameOID.ORGANIZATION_NAME,),
        (NameOID.ORGANIZATIONAL_UNIT_NAME,),
        (NameOID.COMMON_NAME,),
    ]
    if oids_ != expected or next(iter(rdns[2])).value != PRODUCTION_CA_CN:
        raise NameNotAllowedError(
            f"{what}: subject {name.rfc4514_string()!r} is not a production CA name "
            f"(O=<OEM>, OU=<job id>, CN={PRODUCTION_CA_CN})"
        )
    value = next(iter(rdns[1])).value
    return check_job_id(value)


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
_OPTIONAL_KEYS = frozenset({"product", "uri_template", "crl_url", "ocsp_url", "oem_arc"})
#: An absolute URI (RFC 3986 §4.3) in the characters RFC 3986 §2 allows unescaped, plus
#: %-escapes: an IA5String (RFC 5280 §4.2.1.6) that needs no quoting anywhere.
_URI = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*):"
    r"(?P<rest>(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"
)
_URN = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,30}[A-Za-z0-9]:.+")  # RFC 8141 §2: NID ":" NSS
_HTTP_AUTHORITY = re.compile(r"//([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/.*)?")
_MAX_URI = 255


def _check_uri(value: object, *, what: str, http_only: bool) -> str:
    """An absolute URI as RFC 5280 §4.2.1.6 wants it (scheme and scheme-specific part; an
    authority is a host name or IP address).  ``http_only``: a revocation source, fetched
    over plain HTTP (RFC 5280 §4.2.1.13, RFC 6960 Appendix A.1): over HTTPS, checking
    the server's certificate would need revocation information first."""
    if type(value) is not str or not 1 <= len(value) <= _MAX_URI:
        raise DeviceProfileError(
            f"device profile: {what} must be a URI of 1..{_MAX_URI} characters"
        )
    m = _URI.fullmatch(value)
    if m is None:
        raise DeviceProfileError(
            f"device profile: {what} {value!r} is not an absolute URI (RFC 3986) in unescaped "
            "ASCII"
        )
    scheme, rest = m["scheme"], m["rest"]
    if http_only and scheme != "http":
        raise DeviceProfileError(
            f"device profile: {what} {value!r} must be an http:// URL (RFC 5280 §4.2.1.13, "
            "RFC 6960 Appendix A: HTTPS would need revocation information to fetch it)"
        )
    if scheme in ("http", "https") and _HTTP_AUTHORITY.fullmatch(rest) is None:
        raise DeviceProfileError(f"device profile: {what} {value!r} has no host name")
    if scheme == "urn" and _URN.fullmatch(rest) is None:
        raise DeviceProfileError(f"device profile: {what} {value!r} is not a URN (RFC 8141)")
    return value


def _profile_error(exc: NameNotAllowedError) -> DeviceProfileError:
    return DeviceProfileError(f"device profile: {exc}")


@attrs.frozen(kw_only=True)
class DeviceProfile:
    """The job-level part of the device certificate profile, signed by the OEM in the job.

    ``organisation`` (subject O), ``product`` (subject OU, optional), the common-name
    template (exactly one ``{device_id}``; the default makes CN = the device id, which
    brokers such as mosquitto take as the user name) and the devices' notAfter (default
    99991231235959Z).  The names and sources a relying party uses, each optional:
    ``uri_template`` (the subjectAltName URI naming the device, exactly one ``{device_id}``;
    without it no subjectAltName, which verifiers that require one refuse),
    ``crl_url`` (cRLDistributionPoints: where the job's production CA publishes its CRL),
    ``ocsp_url`` (authorityInfoAccess: the OEM's OCSP responder) and ``oem_arc`` (the OEM's
    Private Enterprise Number arc: its device purpose and production-CA policy,
    :mod:`.oids`).  Valid once constructed; :meth:`to_map`/:meth:`from_map` are the strict
    form embedded in the job (exact keys and types).
    """

    organisation: str
    product: str | None = None
    common_name_template: str = DEVICE_ID_FIELD
    not_after: datetime.datetime = NO_EXPIRY
    uri_template: str | None = None
    crl_url: str | None = None
    ocsp_url: str | None = None
    oem_arc: str | None = None

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
        if self.oem_arc is not None:
            oids.check_oem_arc(self.oem_arc)
        u = self.uri_template
        if u is not None:
            if type(u) is not str or u.count(DEVICE_ID_FIELD) != 1:
                raise DeviceProfileError(
                    f"device profile: URI template {u!r} must hold {DEVICE_ID_FIELD} once"
                )
            _check_uri(u.replace(DEVICE_ID_FIELD, "0" * 16), what="URI template", http_only=False)
        if self.crl_url is not None:
            _check_uri(self.crl_url, what="crl_url", http_only=True)
        if self.ocsp_url is not None:
            _check_uri(self.ocsp_url, what="ocsp_url", http_only=True)

    @property
    def production_ca_policy(self) -> x509.ObjectIdentifier | None:
        """The policy the job's production CA carries (``<oem_arc>.2``), None without an arc."""
        return None if self.oem_arc is None else oids.production_ca_policy(self.oem_arc)

    def common_name(self, device_id: str) -> str:
        check_device_id(device_id)
        return self.common_name_template.replace(DEVICE_ID_FIELD, device_id)

    def device_uri(self, device_id: str) -> str | None:
        """The URI naming ``device_id`` in its subjectAltName (None: no subjectAltName)."""
        t = self.uri_template
        return None if t is None else t.replace(DEVICE_ID_FIELD, check_device_id(device_id))

    def subject(self, device_id: str) -> x509.Name:
        """O, [OU], serialNumber (X.520 §6.2.9, PrintableString) = device id, CN."""
        attrs_ = [_attr(NameOID.ORGANIZATION_NAME, self.organisation)]
        if self.product is not None:
            attrs_.append(_attr(NameOID.ORGANIZATIONAL_UNIT_NAME, self.product))
        attrs_.append(_attr(NameOID.SERIAL_NUMBER, check_device_id(device_id)))
        attrs_.append(_attr(NameOID.COMMON_NAME, self.common_name(device_id)))
        return x509.Name(attrs_)

    def device_extensions(self, device_id: str) -> list[tuple[x509.ExtensionType, bool]]:
        """subjectAltName, cRLDistributionPoints, authorityInfoAccess (those the profile
        gives, in that order), all non-critical."""
        out: list[tuple[x509.ExtensionType, bool]] = []
        uri = self.device_uri(device_id)
        if uri is not None:
            out.append(_san(uri))
        if self.crl_url is not None:
            # §4.2.1.13: a fullName URI, no reasons (all), no cRLIssuer (a direct CRL)
            dp = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(self.crl_url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            out.append((x509.CRLDistributionPoints([dp]), False))
        if self.ocsp_url is not None:
            # §4.2.2.1, RFC 6960 §3.1: id-ad-ocsp with the responder's URI
            ocsp = x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(self.ocsp_url)
            )
            out.append((x509.AuthorityInformationAccess([ocsp]), False))
        return out

    def check_device(self, cert: x509.Certificate, device_id: str, *, what: str) -> None:
        """``cert`` says exactly what this profile issues for ``device_id``: subject, key
        purposes, names, revocation sources and notAfter (after the form checks of
        :data:`DEVICE`).  Reconciliation's hot path: the constant parts are built once per
        profile (~10 us per device instead of ~70 us building them each time)."""
        expected = _expected_for(self)
        if cert.subject.public_bytes() != device_id.encode("ascii").join(expected.subject_der):
            raise ProfileMismatchError(
                f"{what}: subject {cert.subject.rfc4514_string()!r} is not the job's "
                f"{self.subject(device_id).rfc4514_string()!r}"
            )
        actual = [
            (e.value, e.critical)
            for e in cert.extensions
            if e.oid == ExtensionOID.EXTENDED_KEY_USAGE or e.oid in DEVICE.optional
        ]
        uri = self.device_uri(device_id)
        names = [] if uri is None else [_san(uri)]
        if actual != [expected.eku, *names, *expected.sources]:
            raise ProfileMismatchError(
                f"{what}: key purposes, subjectAltName or revocation sources are not the job's "
                f"(expected {[str(v) for v, _ in self.device_extensions(device_id)]})"
            )
        if cert.not_valid_after_utc != self.not_after:
            raise ProfileMismatchError(
                f"{what}: notAfter {cert.not_valid_after_utc} is not the job's {self.not_after}"
            )

    def check_production_ca(self, cert: x509.Certificate, *, what: str) -> None:
        """The production CA carries this profile's policy (``<oem_arc>.2``) or, without an
        arc, none."""
        try:
            policies = [
                p.policy_identifier
                for p in cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
            ]
        except x509.ExtensionNotFound:
            policies = []
        want = [] if self.production_ca_policy is None else [self.production_ca_policy]
        if policies != want:
            raise ProfileMismatchError(
                f"{what}: policies {[p.dotted_string for p in policies]} are not the job's "
                f"{[p.dotted_string for p in want]}"
            )

    def to_map(self) -> dict[str, str | int]:
        """The canonical map (optional keys only when set; ``not_after`` in Unix seconds)."""
        out: dict[str, str | int] = {
            "organisation": self.organisation,
            "common_name_template": self.common_name_template,
            "not_after": int(self.not_after.timestamp()),
        }
        for key in sorted(_OPTIONAL_KEYS):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_map(cls, m: object) -> DeviceProfile:
        """Strict inverse of :meth:`to_map`: exact keys, exact types, bounded values."""
        if not isinstance(m, Mapping) or not all(type(k) is str for k in m):
            raise DeviceProfileError("device profile: not a map with string keys")
        keys = set(m)
        if not _MAP_KEYS <= keys <= _MAP_KEYS | _OPTIONAL_KEYS:
            raise DeviceProfileError(
                f"device profile: keys {sorted(_MAP_KEYS - keys)} missing, "
                f"{sorted(keys - _MAP_KEYS - _OPTIONAL_KEYS)} unexpected"
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
            common_name_template=m["common_name_template"],
            not_after=datetime.datetime.fromtimestamp(na, datetime.UTC),
            **{k: m[k] for k in keys & _OPTIONAL_KEYS},
        )


def _san(uri: str) -> tuple[x509.ExtensionType, bool]:
    # RFC 5280 §4.2.1.6: non-critical, the subject name is not empty
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False


@attrs.frozen
class _Expected:
    """What a profile's device certificates carry, but the device id: the subject's DER split
    at the id, the EKU and the revocation sources."""

    subject_der: tuple[bytes, ...]
    eku: tuple[x509.ExtensionType, bool]
    sources: tuple[tuple[x509.ExtensionType, bool], ...]


@functools.lru_cache(maxsize=64)
def _expected_for(profile: DeviceProfile) -> _Expected:
    for _ in range(8):  # a random id colliding with the organisation or product: retry
        probe = os.urandom(8).hex()
        der = profile.subject(probe).public_bytes()
        if der.count(probe.encode("ascii")) == 2:  # serialNumber and inside the CN
            break
    else:  # pragma: no cover - probability ~2^-100
        raise RuntimeError("could not locate the device id in the subject")
    sources = tuple(
        (ext, critical)
        for ext, critical in profile.device_extensions(probe)
        if not isinstance(ext, x509.SubjectAlternativeName)
    )
    eku = x509.ExtendedKeyUsage(list(DEVICE.purposes(profile.oem_arc)))
    return _Expected(tuple(der.split(probe.encode("ascii"))), (eku, False), sources)


def single_attribute(name: x509.Name, oid: x509.ObjectIdentifier, *, what: str) -> str:
    """The one value of ``oid`` in ``name``; NameNotAllowedError if absent or repeated."""
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise NameNotAllowedError(f"{what}: subject must carry exactly one {oid.dotted_string}")
    return values[0].value
