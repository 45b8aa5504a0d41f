"""DER/PEM export and strict import of certificates and CSRs (RFC 7468 for PEM)."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import FormatError

MAX_CERT_SIZE = 16 * 1024


def to_der(obj: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return obj.public_bytes(serialization.Encoding.DER)


def to_pem(obj: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def _bytes(data: object, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError(f"{what}: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise FormatError(f"{what}: empty")
    if len(raw) > MAX_CERT_SIZE:
        raise FormatError(f"{what}: {len(raw)} bytes, over the {MAX_CERT_SIZE}-byte limit")
    return raw


def load_der(data: bytes) -> x509.Certificate:
    """Load one DER certificate; FormatError on anything else (including trailing bytes)."""
    raw = _bytes(data, "DER certificate")
    try:
        cert = x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise FormatError(f"not a DER X.509 certificate: {exc}") from None
    if to_der(cert) != raw:
        raise FormatError("DER certificate is not in canonical encoding")
    return cert


def from_pem(data: bytes) -> x509.Certificate:
    """Load exactly one PEM certificate; FormatError on garbage or several."""
    raw = _bytes(data, "PEM certificate")
    if raw.count(b"-----BEGIN ") != 1:
        raise FormatError("expected exactly one PEM block")
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise FormatError(f"not a PEM X.509 certificate: {exc}") from None


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Load a PKCS#10 request (RFC 2986), DER or PEM; FormatError on garbage."""
    raw = _bytes(data, "CSR")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(raw)
        return x509.load_der_x509_csr(raw)
    except ValueError as exc:
        raise FormatError(f"not a PKCS#10 certificate request: {exc}") from None


def cert_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the DER certificate."""
    return hashlib.sha256(to_der(cert)).digest()
