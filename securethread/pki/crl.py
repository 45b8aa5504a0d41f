"""Certificate revocation lists (RFC 5280 §5): the root revokes production CAs, a production
CA revokes its devices.

Every CRL here is a *direct*, complete CRL: its issuer is the issuer of every certificate it
lists, so the root's CRL covers production CAs and the production CA's CRL covers its
devices.  That is the only kind stock TLS servers find: OpenSSL looks CRLs up in its store by
the certificate's issuer name, so an indirect CRL (RFC 5280 §5.2.5) signed by the root is
never consulted for a device -- python ``ssl``, mosquitto's ``crlfile`` and ``openssl
s_server -CRL`` all fail every device with "unable to get certificate CRL"; only
``openssl verify -CRLfile -extended_crl`` accepts one.  The production-CA key lives in the
programmer's token, so device CRLs are signed there (docs/pki.md, "Revocation").

A CRL accumulates: each new one carries the previous one's entries (verified under the same
issuer first), adds the new ones and increments ``cRLNumber`` (§5.2.3).  Entries carry the
revocation date and a reason code (§5.3.1) -- absent for "unspecified", as §5.3.1 asks.
``nextUpdate`` defaults to 99991231235959Z: a relying party must never be locked out because
a production-CA key (or the programmer holding it) is gone; freshness is the distribution's
job (install the CRL with the highest cRLNumber).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from securethread.errors import FormatError
from securethread.keys.protocol import PrivateKey

from ._errors import RevocationError
from .issue import _aware, _check_issuer, _hash, _now
from .profile import DEVICE, NO_EXPIRY, PRODUCTION_CA, CertificateProfile
from .untrusted import PARSE_ERRORS, pem_der

__all__ = [
    "CA_REASONS",
    "DEVICE_REASONS",
    "MAX_CRL_SIZE",
    "Revocation",
    "issue_crl",
    "load_crl",
    "refresh_crl",
    "revoke_devices",
    "revoke_production_ca",
]

R = x509.ReasonFlags
#: Reasons for a device (end-entity) certificate.  certificateHold/removeFromCRL are refused:
#: a revocation here is final (no holds, no delta CRLs); cACompromise/aACompromise are for
#: other kinds of certificate (RFC 5280 §5.3.1).
DEVICE_REASONS = frozenset(
    {
        R.unspecified,
        R.key_compromise,
        R.affiliation_changed,
        R.superseded,
        R.cessation_of_operation,
        R.privilege_withdrawn,
    }
)
#: Reasons for a production CA certificate.
CA_REASONS = frozenset(
    {
        R.unspecified,
        R.ca_compromise,
        R.affiliation_changed,
        R.superseded,
        R.cessation_of_operation,
        R.privilege_withdrawn,
    }
)
#: A CRL of one job's devices: ~40 octets per entry, so 16 MiB holds ~400 000 entries.
MAX_CRL_SIZE = 16 << 20
_MAX_CRL_NUMBER = (1 << 159) - 1  # §5.2.3: at most 20 octets, non-negative


@attrs.frozen(kw_only=True)
class Revocation:
    """One CRL entry: serial, revocation date (UTC, to the second) and reason."""

    serial: int
    revoked_at: datetime.datetime
    reason: x509.ReasonFlags = R.unspecified

    def __attrs_post_init__(self) -> None:
        if type(self.serial) is not int or not 0 < self.serial < 1 << 160:
            raise RevocationError(f"serial {self.serial!r} is not a positive 20-octet integer")
        if not isinstance(self.reason, x509.ReasonFlags):
            raise RevocationError(f"reason {self.reason!r} is not an x509.ReasonFlags")

    def entry(self) -> x509.RevokedCertificate:
        b = (
            x509.RevokedCertificateBuilder()
            .serial_number(self.serial)
            .revocation_date(self.revoked_at)
        )
        if self.reason is not R.unspecified:
            b = b.add_extension(x509.CRLReason(self.reason), critical=False)  # §5.3.1
        return b.build()


def _check_crl_signer(key: PrivateKey, cert: x509.Certificate, at: datetime.datetime) -> bytes:
    ski = _check_issuer(key, cert, at=at, what="CRL issuer")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is None or not ku.crl_sign:  # RFC 5280 §4.2.1.3
        raise RevocationError(f"CRL issuer {cert.subject.rfc4514_string()} lacks keyUsage cRLSign")
    return ski


def issue_crl(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    revoked: Iterable[Revocation],
    *,
    crl_number: int,
    this_update: datetime.datetime | None = None,
    next_update: datetime.datetime = NO_EXPIRY,
) -> x509.CertificateRevocationList:
    """A complete, direct CRL signed in ``ca_key``'s backend (RFC 5280 §5.1).

    Extensions: cRLNumber and authorityKeyIdentifier (both non-critical, both MUST in
    §5.2); no issuingDistributionPoint (the CRL covers everything ``ca_cert`` issued).
    """
    now = _now() if this_update is None else _aware(this_update, "this_update")
    na = _aware(next_update, "next_update")
    if not now < na:
        raise RevocationError(f"nextUpdate {na} is not after thisUpdate {now}")
    if type(crl_number) is not int or not 0 < crl_number <= _MAX_CRL_NUMBER:
        raise RevocationError(f"cRLNumber {crl_number!r} is not a positive 20-octet integer")
    ski = _check_crl_signer(ca_key, ca_cert, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(na)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=ski, authority_cert_issuer=None, authority_cert_serial_number=None
            ),
            critical=False,
        )
    )
    seen: set[int] = set()
    for r in revoked:
        if not isinstance(r, Revocation):
            raise TypeError(f"expected Revocation entries, got {type(r).__name__}")
        if r.serial in seen:
            raise RevocationError(f"serial {r.serial:#x} listed twice")
        if _aware(r.revoked_at, "revoked_at") > now:
            raise RevocationError(f"serial {r.serial:#x} revoked at {r.revoked_at}, after {now}")
        seen.add(r.serial)
        builder = builder.add_revoked_certificate(r.entry())
    return builder.sign(ca_key.as_cryptography(), _hash(ca_key.curve))


def load_crl(data: bytes, issuer_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """Parse a PEM or DER CRL and verify it is ``issuer_cert``'s (name, key identifier,
    signature, cRLNumber present); RevocationError otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RevocationError(f"CRL: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if not raw or len(raw) > MAX_CRL_SIZE:
        raise RevocationError(f"CRL: {len(raw)} octets, outside 1..{MAX_CRL_SIZE}")
    if raw.lstrip().startswith(b"-----BEGIN"):  # one "X509 CRL" block alone (RFC 7468 §6)
        try:
            raw = pem_der(raw, ("X509 CRL",), what="CRL")
        except FormatError as exc:
            raise RevocationError(str(exc)) from None
    try:
        crl = x509.load_der_x509_crl(raw)
        if crl.public_bytes(serialization.Encoding.DER) != raw:
            raise RevocationError("CRL: not in canonical DER")
        issuer = crl.issuer
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        entries = [_revocation(e) for e in crl]
    except x509.ExtensionNotFound as exc:
        raise RevocationError(f"CRL: lacks {exc.oid.dotted_string}") from None
    except PARSE_ERRORS as exc:
        raise RevocationError(f"CRL: malformed ({type(exc).__name__}: {exc})") from None
    del entries, number  # read inside the guard so later reads cannot fail
    if issuer != issuer_cert.subject:
        raise RevocationError(
            f"CRL is issued by {issuer.rfc4514_string()}, "
            f"not {issuer_cert.subject.rfc4514_string()}"
        )
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    if aki.key_identifier != ski.digest or not crl.is_signature_valid(
        issuer_cert.public_key()  # type: ignore[arg-type]
    ):
        raise RevocationError(
            f"CRL signature does not verify under {issuer_cert.subject.rfc4514_string()}"
        )
    return crl


def _revocation(entry: x509.RevokedCertificate) -> Revocation:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        reason = R.unspecified
    return Revocation(
        serial=entry.serial_number, revoked_at=entry.revocation_date_utc, reason=reason
    )


def _next_crl(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    new: Sequence[Revocation],
    *,
    previous_crl: bytes | None,
    at: datetime.datetime,
    next_update: datetime.datetime,
) -> bytes:
    """The previous CRL's entries plus ``new`` (an already revoked serial keeps its first
    entry), cRLNumber + 1, as PEM."""
    entries: dict[int, Revocation] = {}
    number = 1
    if previous_crl is not None:
        prev = load_crl(previous_crl, ca_cert)
        if at < prev.last_update_utc:
            raise RevocationError(
                f"thisUpdate {at} is before the previous CRL's ({prev.last_update_utc})"
            )
        entries = {e.serial_number: _revocation(e) for e in prev}
        number = prev.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    for r in new:
        entries.setdefault(r.serial, r)
    crl = issue_crl(
        ca_key,
        ca_cert,
        sorted(entries.values(), key=lambda r: r.serial),
        crl_number=number,
        this_update=at,
        next_update=next_update,
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def _check_issued_by(
    cert: object, issuer: x509.Certificate, profile: CertificateProfile, what: str
) -> x509.Certificate:
    """``cert`` is a ``profile`` certificate that ``issuer`` signed (a typo in a revocation
    request must not revoke some other certificate's serial)."""
    if not isinstance(cert, x509.Certificate):
        raise RevocationError(f"{what} is a {type(cert).__name__}, not a certificate")
    profile.check_certificate(cert, what=what)
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise RevocationError(
            f"{what} (serial {cert.serial_number:#x}) was not issued by "
            f"{issuer.subject.rfc4514_string()}"
        ) from None
    return cert


def reason_named(name: str) -> x509.ReasonFlags:
    """An RFC 5280 §5.3.1 reason code by its name (``keyCompromise``, ``superseded``, ...)."""
    for flag in x509.ReasonFlags:
        if name.lower() in (flag.value.lower(), flag.name.lower()):
            return flag
    names = ", ".join(f.value for f in x509.ReasonFlags)
    raise RevocationError(f"unknown revocation reason {name!r} (one of: {names})")


def _reason(reason: object, allowed: frozenset[x509.ReasonFlags], what: str) -> x509.ReasonFlags:
    if not isinstance(reason, x509.ReasonFlags) or reason not in allowed:
        raise RevocationError(
            f"reason {reason!r} is not allowed for a {what}: {sorted(r.value for r in allowed)}"
        )
    return reason


def revoke_devices(
    production_ca_key: PrivateKey,
    production_ca_cert: x509.Certificate,
    devices: Sequence[x509.Certificate],
    *,
    reason: x509.ReasonFlags = R.unspecified,
    previous_crl: bytes | None = None,
    at: datetime.datetime | None = None,
    next_update: datetime.datetime = NO_EXPIRY,
) -> bytes:
    """The production CA's next CRL (PEM): ``previous_crl``'s entries plus ``devices``.

    Runs where the production-CA key is (the programmer's token).  Each device certificate
    must be a device certificate this CA issued.  An empty ``devices`` gives the job's first
    (empty) CRL, or re-signs the previous one with the next cRLNumber.
    """
    when = _now() if at is None else _aware(at, "at")
    PRODUCTION_CA.check_certificate(production_ca_cert, what="production CA certificate")
    why = _reason(reason, DEVICE_REASONS, "device certificate")
    certs = [_check_issued_by(d, production_ca_cert, DEVICE, "device certificate") for d in devices]
    new = [Revocation(serial=c.serial_number, revoked_at=when, reason=why) for c in certs]
    return _next_crl(
        production_ca_key,
        production_ca_cert,
        new,
        previous_crl=previous_crl,
        at=when,
        next_update=next_update,
    )


def revoke_production_ca(
    root_key: PrivateKey,
    root_cert: x509.Certificate,
    production_ca_cert: x509.Certificate,
    *,
    reason: x509.ReasonFlags = R.unspecified,
    previous_crl: bytes | None = None,
    at: datetime.datetime | None = None,
    next_update: datetime.datetime = NO_EXPIRY,
) -> bytes:
    """The OEM root's next CRL (PEM): ``previous_crl``'s entries plus ``production_ca_cert``.

    Revoking a production CA revokes every device of its job for verifiers that check the
    whole chain (``-crl_check_all``, ``VERIFY_CRL_CHECK_CHAIN``).
    """
    when = _now() if at is None else _aware(at, "at")
    why = _reason(reason, CA_REASONS, "production CA")
    pca = _check_issued_by(
        production_ca_cert, root_cert, PRODUCTION_CA, "production CA certificate"
    )
    return _next_crl(
        root_key,
        root_cert,
        [Revocation(serial=pca.serial_number, revoked_at=when, reason=why)],
        previous_crl=previous_crl,
        at=when,
        next_update=next_update,
    )


def refresh_crl(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    previous_crl: bytes | None = None,
    *,
    at: datetime.datetime | None = None,
    next_update: datetime.datetime = NO_EXPIRY,
) -> bytes:
    """Re-sign ``previous_crl`` with the next cRLNumber (or, without one, the issuer's first,
    empty CRL: a verifier checking every level needs the root's CRL even when it is empty)."""
    when = _now() if at is None else _aware(at, "at")
    return _next_crl(
        ca_key, ca_cert, [], previous_crl=previous_crl, at=when, next_update=next_update
    )
