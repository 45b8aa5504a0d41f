"""The one place where certificates, CSRs and public keys that crossed a trust boundary are parsed.

``cryptography`` reports malformed input with many unrelated exception classes --
``ValueError``, ``TypeError``, ``UnsupportedAlgorithm``, ``InvalidVersion``,
``DuplicateExtension``, ``UnsupportedGeneralNameType``, ``UnicodeEncodeError`` /
``UnicodeDecodeError`` (names with lone surrogates or bad BMP/Universal strings),
``OverflowError``, ``AttributeError`` -- and much of it *lazily*: loading succeeds and the
error surfaces only when a name, an extension or the key is first read, which can be deep
inside validation or in an error message.  Every loader here therefore reads, inside one
guard, every field the library relies on later (version, serial, validity, both names in
both encodings, every extension, the signature algorithm, the key), and refuses keys that
are not EC on an accepted curve.  An object these loaders return can be read without
surprises; anything else raises :class:`MalformedCertificateError` or
:class:`UnsupportedKeyError` naming what was being parsed.  Both are
:class:`~securethread.errors.FormatError` *and* :class:`~securethread.errors.CertificateError`,
so callers that catch either keep working.

The encodings are strict: one DER certificate, CSR or SubjectPublicKeyInfo with no trailing
bytes that re-encodes to the same octets (X.690 §10 DER; invariant S6), or, where PEM is
allowed, exactly one PEM block of the expected label (RFC 7468) with nothing but whitespace
around it -- no second block, no explanatory text, no trailing data -- whose content is then
held to the same DER rules.  Certificate serial numbers are positive and at most 20 octets
(RFC 5280 §4.1.2.2).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import TypeVar

from cryptography import exceptions as cx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import CertificateError, FormatError
from ..keys.policy import Curve

__all__ = [
    "ALL_CURVES",
    "MAX_SIZE",
    "PARSE_ERRORS",
    "MalformedCertificateError",
    "UnsupportedKeyError",
    "check_key",
    "guard",
    "load_certificate",
    "load_certificate_pem",
    "load_certificate_with_key",
    "load_csr",
    "load_csr_with_key",
    "load_public_key",
    "load_public_key_pem",
    "pem_der",
]

#: Certificates, CSRs and keys securethread exchanges are a few hundred bytes; 16 KiB is
#: far above any of them and bounds the parser's work on hostile input.
MAX_SIZE = 16 * 1024
ALL_CURVES: tuple[Curve, ...] = tuple(Curve)

#: What ``cryptography`` raises for malformed input (at load time or on first access).
#: ``UnicodeError`` and ``InvalidVersion``'s cousins are ``ValueError`` subclasses; the
#: others are unrelated classes.  Nothing but parsing runs inside :func:`guard`, so each
#: of these there is the input's fault, never a programming error of the caller.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    OverflowError,
    AttributeError,
    LookupError,
    cx.UnsupportedAlgorithm,
    cx.InternalError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.AttributeNotFound,
)

_REASON_LIMIT = 160
#: RFC 5280 §4.1.2.2: conforming certificates use serial numbers of at most 20 octets.
MAX_SERIAL_OCTETS = 20
#: One PEM block (RFC 7468 §3) and nothing but whitespace around it.
_PEM = re.compile(
    rb"\A\s*-----BEGIN (?P<label>[\x21-\x2c\x2e-\x7e](?:[- ]?[\x21-\x2c\x2e-\x7e])*)-----"
    rb"(?P<body>[A-Za-z0-9+/=\s]*)"
    rb"-----END (?P=label)-----\s*\Z"
)
_T = TypeVar("_T")


class MalformedCertificateError(FormatError, CertificateError):
    """Bytes that crossed a boundary are not a well-formed certificate, CSR or public key."""


class UnsupportedKeyError(FormatError, CertificateError):
    """A well-formed certificate, CSR or public key holds a key that is not EC on an
    accepted curve (securethread uses P-256 and P-384 only)."""


def _reason(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    if len(text) > _REASON_LIMIT:
        text = text[:_REASON_LIMIT] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn any ``cryptography`` parsing exception raised inside into
    :class:`MalformedCertificateError` naming ``what`` (for reads this module does not force)."""
    try:
        yield
    except PARSE_ERRORS as exc:
        raise MalformedCertificateError(f"{what}: malformed ({_reason(exc)})") from None


def _guarded(what: str, fn: Callable[[], _T]) -> _T:
    with guard(what):
        return fn()


def _raw(data: object, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedCertificateError(f"{what}: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise MalformedCertificateError(f"{what}: empty")
    if len(raw) > MAX_SIZE:
        raise MalformedCertificateError(f"{what}: {len(raw)} bytes, over the {MAX_SIZE}-byte limit")
    return raw


def pem_der(raw: bytes, labels: Collection[str], *, what: str) -> bytes:
    """The DER inside exactly one PEM block labelled one of ``labels`` (RFC 7468 §2-§3),
    with nothing around it but whitespace: a second block, text before it or data after it
    is refused, as is base64 that does not decode exactly."""
    if raw.count(b"-----BEGIN") != 1 or raw.count(b"-----END") != 1:
        raise MalformedCertificateError(f"{what}: expected exactly one PEM block")
    m = _PEM.match(raw)
    if m is None:
        raise MalformedCertificateError(
            f"{what}: not one PEM block alone (text before it, data after it, or a bad line)"
        )
    label = m.group("label").decode("ascii")
    if label not in labels:
        raise MalformedCertificateError(
            f"{what}: a PEM block of {label!r}, not {' or '.join(map(repr, labels))}"
        )
    body = b"".join(m.group("body").split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedCertificateError(f"{what}: PEM content is not base64") from None
    if not der or base64.b64encode(der) != body:
        raise MalformedCertificateError(f"{what}: PEM content is not canonical base64")
    return der


def check_key(
    key: object, *, what: str, curves: Collection[Curve] = ALL_CURVES
) -> ec.EllipticCurvePublicKey:
    """``key`` must be an EC public key on one of ``curves``; UnsupportedKeyError otherwise."""
    allowed = ", ".join(c.name for c in curves)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UnsupportedKeyError(
            f"{what}: holds a {type(key).__name__.lstrip('_')}, not an EC key ({allowed})"
        )
    name = key.curve.name
    if not any(c.value == name for c in curves):
        raise UnsupportedKeyError(f"{what}: key is on curve {name}, not on {allowed}")
    return key


def _force_name(name: x509.Name) -> None:
    # RFC 5280 §4.1.2.4/§4.1.2.6: both encodings are read later (issuer lookup by DER,
    # RFC 4514 text in messages and transcripts); each attribute value is decoded here.
    name.public_bytes()
    name.rfc4514_string()
    for rdn in name.rdns:
        for attribute in rdn:
            attribute.value  # noqa: B018 - forces the lazy decode


def _force_extensions(extensions: x509.Extensions) -> None:
    for ext in extensions:  # DuplicateExtension and per-extension errors surface here
        ext.value  # noqa: B018
        ext.critical  # noqa: B018


def _force_certificate(
    cert: x509.Certificate, what: str, curves: Collection[Curve]
) -> ec.EllipticCurvePublicKey:
    with guard(what):
        cert.version  # noqa: B018 - InvalidVersion
        serial = cert.serial_number
        cert.not_valid_before_utc  # noqa: B018
        cert.not_valid_after_utc  # noqa: B018
        _force_name(cert.subject)
        _force_name(cert.issuer)
        _force_extensions(cert.extensions)
        cert.signature_algorithm_oid  # noqa: B018
        cert.signature_hash_algorithm  # noqa: B018 - UnsupportedAlgorithm
        cert.signature_algorithm_parameters  # noqa: B018
        cert.tbs_certificate_bytes  # noqa: B018
        cert.signature  # noqa: B018
        key = cert.public_key()
    if serial <= 0:  # cryptography only warns; RFC 5280 §4.1.2.2 requires a positive integer
        raise MalformedCertificateError(f"{what}: serial number is not positive")
    octets = serial.bit_length() // 8 + 1  # DER INTEGER content: a leading 0 bit for sign
    if octets > MAX_SERIAL_OCTETS:  # RFC 5280 §4.1.2.2: MUST NOT be longer than 20 octets
        raise MalformedCertificateError(
            f"{what}: serial number of {octets} octets, over the {MAX_SERIAL_OCTETS} "
            "RFC 5280 allows"
        )
    return check_key(key, what=what, curves=curves)


def load_certificate(
    data: object, *, what: str = "certificate", curves: Collection[Curve] = ALL_CURVES
) -> x509.Certificate:
    """Parse one canonical DER X.509 certificate (RFC 5280 §4.1) from an untrusted source.

    Raises MalformedCertificateError (not DER, trailing bytes, non-canonical, a field that
    does not parse) or UnsupportedKeyError (not EC on ``curves``); ``what`` names the
    certificate in the message ("license signer certificate", ...).
    """
    return load_certificate_with_key(data, what=what, curves=curves)[0]


def load_certificate_with_key(
    data: object, *, what: str = "certificate", curves: Collection[Curve] = ALL_CURVES
) -> tuple[x509.Certificate, ec.EllipticCurvePublicKey]:
    """:func:`load_certificate`, and the certificate's key as it checked it (EC on
    ``curves``), so a caller needs no second, unchecked ``cert.public_key()``."""
    raw = _raw(data, what)
    cert = _guarded(what, lambda: x509.load_der_x509_certificate(raw))
    key = _force_certificate(cert, what, curves)
    if _guarded(what, lambda: cert.public_bytes(serialization.Encoding.DER)) != raw:
        raise MalformedCertificateError(f"{what}: DER is not in canonical encoding")
    return cert, key


def load_certificate_pem(
    data: object, *, what: str = "PEM certificate", curves: Collection[Curve] = ALL_CURVES
) -> x509.Certificate:
    """Parse exactly one PEM certificate (RFC 7468 §5) from an untrusted source: its DER
    as :func:`load_certificate` (canonical, nothing trailing)."""
    der = pem_der(_raw(data, what), ("CERTIFICATE",), what=what)
    return load_certificate(der, what=what, curves=curves)


def load_csr(
    data: object, *, what: str = "certificate request", curves: Collection[Curve] = ALL_CURVES
) -> x509.CertificateSigningRequest:
    """Parse one PKCS#10 request (RFC 2986 §4), canonical DER or a single PEM block.

    Reads subject, attributes, requested extensions, signature algorithm and key, and checks
    that the signature can be evaluated (not that it verifies: issuance decides against
    which key, see pki.issue).
    """
    return load_csr_with_key(data, what=what, curves=curves)[0]


def load_csr_with_key(
    data: object, *, what: str = "certificate request", curves: Collection[Curve] = ALL_CURVES
) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    """:func:`load_csr`, and the requested key as it checked it (EC on ``curves``)."""
    raw = _raw(data, what)
    if raw.lstrip().startswith(b"-----BEGIN"):  # RFC 7468 §7 names both labels
        raw = pem_der(raw, ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"), what=what)
    with guard(what):
        csr = x509.load_der_x509_csr(raw)
        _force_name(csr.subject)
        _force_extensions(csr.extensions)
        for attribute in csr.attributes:
            attribute.value  # noqa: B018
        csr.signature_algorithm_oid  # noqa: B018
        csr.signature_hash_algorithm  # noqa: B018
        csr.signature_algorithm_parameters  # noqa: B018
        csr.tbs_certrequest_bytes  # noqa: B018
        csr.signature  # noqa: B018
        key = check_key(csr.public_key(), what=what, curves=curves)
        csr.is_signature_valid  # noqa: B018 - UnsupportedAlgorithm / InternalError
        der = csr.public_bytes(serialization.Encoding.DER)
    if der != raw:
        raise MalformedCertificateError(f"{what}: DER is not in canonical encoding")
    return csr, key


def load_public_key_pem(
    data: object, *, what: str = "public key", curves: Collection[Curve] = ALL_CURVES
) -> ec.EllipticCurvePublicKey:
    """One PEM ``PUBLIC KEY`` block (RFC 7468 §13) alone; its DER checked as
    :func:`load_public_key` (canonical SubjectPublicKeyInfo, nothing trailing)."""
    der = pem_der(_raw(data, what), ("PUBLIC KEY",), what=what)
    return load_public_key(der, what=what, curves=curves)


def load_public_key(
    data: object, *, what: str = "public key", curves: Collection[Curve] = ALL_CURVES
) -> ec.EllipticCurvePublicKey:
    """Parse one canonical DER SubjectPublicKeyInfo (RFC 5280 §4.1.2.7; RFC 5480 for EC)
    holding an EC key on ``curves``: uncompressed point, named curve, nothing trailing."""
    raw = _raw(data, what)
    key = _guarded(what, lambda: serialization.load_der_public_key(raw))
    ec_key = check_key(key, what=what, curves=curves)
    encoded = _guarded(
        what,
        lambda: ec_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    if encoded != raw:
        raise MalformedCertificateError(f"{what}: SubjectPublicKeyInfo is not canonical DER")
    return ec_key
