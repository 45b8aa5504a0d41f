"""The artefacts of programmer onboarding (flow 2): enrolment request, certificate bundle,
officer bundle.

* **Enrolment request** (programmer -> OEM, ``enrolment-request``): the enclave's name and
  one CSR per key purpose, in an envelope signed by the enclave's identity key.  Each CSR
  proves possession of its key (the key-agreement key cannot sign: the identity key signs
  its CSR, see :func:`securethread.pki.create_enclave_csr`).  What the OEM cannot learn from
  the bytes is *whose* appliance made them: it compares the identity key's fingerprint with
  the one the programming centre gave it out of band (``--fingerprint``).
* **Certificate bundle** (OEM -> programmer, ``certificate-bundle``): the OEM root, the
  OEM's identity certificate, the enclave's four certificates, the officer bundle and the
  firmware-signing key, signed by the OEM root.  The programmer pins the root by the
  fingerprint the OEM gave it out of band (``--root-fingerprint``).
* **Officer bundle** (``officer-keys``): the job-signing officers' public keys and the
  minimum number of them that must sign a job, signed by the OEM root.

Bodies are canonical CBOR maps with exactly the documented keys (docs/formats.md).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import CertificateError, FormatError
from securethread.formats import envelope
from securethread.keys.ecutil import fingerprint, load_spki
from securethread.keys.protocol import PrivateKey

ENROLMENT_KIND = "enrolment-request"
BUNDLE_KIND = "certificate-bundle"
OFFICERS_KIND = "officer-keys"

#: The enclave key purposes, in the order they are requested and certified.
PURPOSES = ("identity", "license-signing", "ledger-signing", "key-agreement")
MAX_CERT = 8 << 10
MAX_OFFICERS = 16


def _exact(body: Mapping[str, Any], keys: set[str], what: str) -> None:
    if set(body) != keys:
        raise FormatError(f"{what}: expected fields {sorted(keys)}, got {sorted(body)}")


def _bytes(value: object, what: str, *, limit: int = MAX_CERT) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise FormatError(f"{what} must be 1-{limit} bytes")
    return value


def _text(value: object, what: str, *, limit: int = 64) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise FormatError(f"{what} must be a text string of 1-{limit} characters")
    return value


def _certificate(der: bytes, what: str) -> x509.Certificate:
    from securethread.pki import load_der

    try:
        return load_der(der)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None


def _csr(der: bytes, what: str) -> x509.CertificateSigningRequest:
    from securethread.pki import load_csr

    try:
        return load_csr(der)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None


# --- enrolment request ----------------------------------------------------------------------------


@attrs.frozen
class EnrolmentRequest:
    """An enclave asks to be certified: its name and one CSR (DER) per purpose."""

    name: str
    csrs: Mapping[str, bytes]

    def identity_key(self) -> ec.EllipticCurvePublicKey:
        key = _csr(self.csrs["identity"], "identity CSR").public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise FormatError("identity CSR: not an EC key")
        return key

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the identity key's SPKI: what the operator reads out to the OEM."""
        return fingerprint(self.identity_key())

    def csr(self, purpose: str) -> x509.CertificateSigningRequest:
        return _csr(self.csrs[purpose], f"{purpose} CSR")

    def seal(self, identity_key: PrivateKey) -> bytes:
        body = {"name": self.name, "csrs": dict(self.csrs)}
        return envelope.seal(ENROLMENT_KIND, body, [identity_key])

    @classmethod
    def open(cls, data: bytes) -> EnrolmentRequest:
        """Parse and check the request's own signature (by its identity key).

        Self-signed: it proves the request is whole and that its maker holds the identity
        key, not who that is -- the caller compares :attr:`fingerprint` with the one it
        was given out of band.
        """
        body = envelope.peek_body(data)[1]
        _exact(body, {"name", "csrs"}, "enrolment request")
        name = _text(body["name"], "enrolment request: name")
        csrs = body["csrs"]
        if not isinstance(csrs, dict) or set(csrs) != set(PURPOSES):
            raise FormatError(f"enrolment request: expected one CSR for each of {PURPOSES}")
        req = cls(name, {p: _bytes(csrs[p], f"{p} CSR") for p in PURPOSES})
        envelope.open_envelope(data, kind=ENROLMENT_KIND, keys=req.identity_key())
        return req


# --- officer bundle -----------------------------------------------------------------------------


@attrs.frozen
class OfficerBundle:
    """The officers' job-signing keys (SPKI DER) and the threshold floor for a job."""

    keys: tuple[bytes, ...]
    threshold: int

    def __attrs_post_init__(self) -> None:
        if not 0 < len(self.keys) <= MAX_OFFICERS or len(set(self.keys)) != len(self.keys):
            raise FormatError(f"officer bundle: 1-{MAX_OFFICERS} distinct keys required")
        if type(self.threshold) is not int or not 1 <= self.threshold <= len(self.keys):
            raise FormatError(
                f"officer bundle: threshold must be 1..{len(self.keys)}, got {self.threshold!r}"
            )

    def public_keys(self) -> dict[bytes, ec.EllipticCurvePublicKey]:
        """Fingerprint -> key, as :func:`securethread.formats.job.verify_job` takes them."""
        out = {}
        for der in self.keys:
            key = load_spki(der, what="officer key")
            out[fingerprint(key)] = key
        return out

    def seal(self, root_key: PrivateKey) -> bytes:
        return envelope.seal(
            OFFICERS_KIND, {"keys": list(self.keys), "threshold": self.threshold}, [root_key]
        )

    @classmethod
    def open(cls, data: bytes, root: ec.EllipticCurvePublicKey) -> OfficerBundle:
        body = envelope.open_envelope(data, kind=OFFICERS_KIND, keys=root)
        _exact(body, {"keys", "threshold"}, "officer bundle")
        keys = body["keys"]
        if not isinstance(keys, list):
            raise FormatError("officer bundle: keys is not a list")
        return cls(tuple(_bytes(k, "officer key", limit=512) for k in keys), body["threshold"])


# --- certificate bundle -------------------------------------------------------------------------


@attrs.frozen
class CertificateBundle:
    """What the OEM sends a newly certified programmer (all DER, officer bundle sealed)."""

    programmer: str
    root: bytes
    oem_identity: bytes
    enclave: Mapping[str, bytes]  # purpose -> certificate DER
    officers: bytes  # the sealed officer bundle
    firmware_signing: bytes  # SPKI DER

    def seal(self, root_key: PrivateKey) -> bytes:
        body = {
            "programmer": self.programmer,
            "root": self.root,
            "oem-identity": self.oem_identity,
            "enclave": dict(self.enclave),
            "officers": self.officers,
            "firmware-signing": self.firmware_signing,
        }
        return envelope.seal(BUNDLE_KIND, body, [root_key])

    def root_certificate(self) -> x509.Certificate:
        return _certificate(self.root, "certificate bundle: root")

    def certificate(self, purpose: str) -> x509.Certificate:
        return _certificate(self.enclave[purpose], f"certificate bundle: {purpose} certificate")

    @classmethod
    def open(cls, data: bytes, *, root_fingerprint: bytes) -> CertificateBundle:
        """Verify the bundle under the root it carries, *after* checking that root is the
        one pinned out of band (SHA-256 of its SPKI)."""
        body = envelope.peek_body(data)[1]
        _exact(
            body,
            {"programmer", "root", "oem-identity", "enclave", "officers", "firmware-signing"},
            "certificate bundle",
        )
        root_der = _bytes(body["root"], "certificate bundle: root")
        root = _certificate(root_der, "certificate bundle: root")
        root_key = root.public_key()
        if not isinstance(root_key, ec.EllipticCurvePublicKey):
            raise FormatError("certificate bundle: the root has no EC key")
        if not hmac.compare_digest(fingerprint(root_key), root_fingerprint):
            raise CertificateError(
                "certificate bundle: its root is not the OEM root you pinned "
                f"(fingerprint {fingerprint(root_key).hex()})"
            )
        envelope.open_envelope(data, kind=BUNDLE_KIND, keys=root_key)
        enclave = body["enclave"]
        if not isinstance(enclave, dict) or set(enclave) != set(PURPOSES):
            raise FormatError(
                f"certificate bundle: expected one certificate for each of {PURPOSES}"
            )
        bundle = cls(
            programmer=_text(body["programmer"], "certificate bundle: programmer"),
            root=root_der,
            oem_identity=_bytes(body["oem-identity"], "certificate bundle: OEM identity"),
            enclave={p: _bytes(enclave[p], f"certificate bundle: {p}") for p in PURPOSES},
            officers=_bytes(body["officers"], "certificate bundle: officers", limit=16 << 10),
            firmware_signing=_bytes(body["firmware-signing"], "firmware-signing key", limit=512),
        )
        load_spki(bundle.firmware_signing, what="firmware-signing key")
        OfficerBundle.open(bundle.officers, root_key)
        return bundle
