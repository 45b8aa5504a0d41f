"""DER/PEM export and strict import of certificates and CSRs (RFC 7468 for PEM)."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import FormatError
from . import untrusted

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
    return untrusted.load_certificate(data, what="DER certificate")


def from_pem(data: bytes) -> x509.Certificate:
    """Load exactly one PEM certificate; FormatError on garbage or several."""
    return untrusted.load_certificate_pem(data, what="PEM certificate")


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Load a PKCS#10 request (RFC 2986), DER or PEM; FormatError on garbage."""
    return untrusted.load_csr(data, what="CSR")


def cert_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the DER certificate."""
    return hashlib.sha256(to_der(cert)).digest()
