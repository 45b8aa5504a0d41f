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
from securethread.formats import envelope, fields
from securethread.keys.ecutil import fingerprint, load_spki
from securethread.keys.protocol import PrivateKey

ENROLMENT_KIND = "enrolment-request"
BUNDLE_KIND = "certificate-bundle"
OFFICERS_KIND = "officer-keys"

#: The enclave key purposes, in the order they are requested and certified.
PURPOSES = ("identity", "license-signing", "ledger-signing", "key-agreement")
MAX_CERT = 8 << 10
MAX_OFFICERS = 16


@attrs.frozen
class _PerPurpose(fields.Rule):
    """One DER object per enclave key purpose: a map with exactly the :data:`PURPOSES` as
    keys (a ``dict`` in Python, in any order; CBOR sorts the keys)."""

    what: str  # what each value is, for errors ("CSR", "certificate")

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, Mapping) or set(value) != set(PURPOSES):
            return f"must map each of {PURPOSES} to a {self.what}"
        for p in PURPOSES:
            v = value[p]
            if type(v) is not bytes or not 0 < len(v) <= MAX_CERT:
                return f"{p!r} must be a {self.what} of 1..{MAX_CERT} bytes"
        return None

    def to_cbor(self, value: Any) -> Any:
        return dict(value)

    def from_cbor(self, raw: Any) -> Any:
        return raw


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


@fields.body("enrolment request")
@attrs.frozen
class EnrolmentRequest:
    """An enclave asks to be certified: its name and one CSR (DER) per purpose."""

    name: str = fields.text("name", max_len=64)
    csrs: Mapping[str, bytes] = fields.custom("csrs", _PerPurpose("CSR"))

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
        return envelope.seal(ENROLMENT_KIND, fields.encode(self), [identity_key])

    @classmethod
    def open(cls, data: bytes) -> EnrolmentRequest:
        """Parse and check the request's own signature (by its identity key).

        Self-signed: it proves the request is whole and that its maker holds the identity
        key, not who that is -- the caller compares :attr:`fingerprint` with the one it
        was given out of band.
        """
        req = fields.decode(cls, envelope.peek_body(data)[1])
        envelope.open_envelope(data, kind=ENROLMENT_KIND, keys=req.identity_key())
        return req


# --- officer bundle -----------------------------------------------------------------------------


@fields.body("officer bundle")
@attrs.frozen
class OfficerBundle:
    """The officers' job-signing keys (SPKI DER) and the threshold floor for a job."""

    keys: tuple[bytes, ...] = fields.list_of(
        "keys", fields.bytes_rule(min_len=1, max_len=512), min_len=1, max_len=MAX_OFFICERS,
        order=fields.Order.UNIQUE,
    )  # fmt: skip
    threshold: int = fields.integer("threshold", lo=1, hi=MAX_OFFICERS)

    def __attrs_post_init__(self) -> None:
        if self.threshold > len(self.keys):
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
        return envelope.seal(OFFICERS_KIND, fields.encode(self), [root_key])

    @classmethod
    def open(cls, data: bytes, root: ec.EllipticCurvePublicKey) -> OfficerBundle:
        body = envelope.open_envelope(data, kind=OFFICERS_KIND, keys=root)
        return fields.decode(cls, body)


# --- certificate bundle -------------------------------------------------------------------------


@fields.body("certificate bundle")
@attrs.frozen(kw_only=True)
class CertificateBundle:
    """What the OEM sends a newly certified programmer (all DER, officer bundle sealed)."""

    programmer: str = fields.text("programmer", max_len=64)
    root: bytes = fields.byte_string("root", min_len=1, max_len=MAX_CERT)
    oem_identity: bytes = fields.byte_string("oem-identity", min_len=1, max_len=MAX_CERT)
    #: purpose -> certificate DER
    enclave: Mapping[str, bytes] = fields.custom("enclave", _PerPurpose("certificate"))
    officers: bytes = fields.byte_string("officers", min_len=1, max_len=16 << 10)  # sealed
    firmware_signing: bytes = fields.byte_string("firmware-signing", min_len=1, max_len=512)

    def seal(self, root_key: PrivateKey) -> bytes:
        return envelope.seal(BUNDLE_KIND, fields.encode(self), [root_key])

    def root_certificate(self) -> x509.Certificate:
        return _certificate(self.root, "certificate bundle: root")

    def certificate(self, purpose: str) -> x509.Certificate:
        return _certificate(self.enclave[purpose], f"certificate bundle: {purpose} certificate")

    @classmethod
    def open(cls, data: bytes, *, root_fingerprint: bytes) -> CertificateBundle:
        """Verify the bundle under the root it carries, *after* checking that root is the
        one pinned out of band (SHA-256 of its SPKI)."""
        unverified = fields.decode(cls, envelope.peek_body(data)[1])  # shape only
        root = _certificate(unverified.root, "certificate bundle: root")
        root_key = root.public_key()
        if not isinstance(root_key, ec.EllipticCurvePublicKey):
            raise FormatError("certificate bundle: the root has no EC key")
        if not hmac.compare_digest(fingerprint(root_key), root_fingerprint):
            raise CertificateError(
                "certificate bundle: its root is not the OEM root you pinned "
                f"(fingerprint {fingerprint(root_key).hex()})"
            )
        envelope.open_envelope(data, kind=BUNDLE_KIND, keys=root_key)
        bundle = unverified  # the signature covers exactly the body it was read from
        load_spki(bundle.firmware_signing, what="firmware-signing key")
        OfficerBundle.open(bundle.officers, root_key)
        return bundle
