"""Per-device licenses: the image key, wrapped so that only one device can unwrap it.

Programmer side (:class:`LicenseIssuer`, every step inside the programmer token):

1. Z-key = ECDH(programmer KA key, device public key)  -- CKM_ECDH1_DERIVE, CKD_NULL
   (PKCS#11 v2.40 §2.3.14; NIST SP 800-56A §5.7.1.2); SoftHSM keeps the rightmost 32 bytes of Z;
2. KEK = AES-ECB(Z-key, SHA-256("securethread-license-kek-v1\\0" || device_id || u8 len ||
   image_id || nonce))  -- CKM_AES_ECB_ENCRYPT_DATA, the only in-token KDF SoftHSM 2.6 offers; the
   fixed info binds device, image and a fresh 128-bit nonce (SP 800-56A §5.8 "FixedInfo" in
   spirit; not an approved KDF, a documented limitation of the token);
3. wrapped = AES-KWP(KEK, image key)  -- RFC 5649, CKM_AES_KEY_WRAP_PAD; temporaries destroyed;
4. the body is signed (envelope kind ``license``) by the LICENSE_SIGNING key.

The image key never exists in host memory on the programmer.  Device side
(:func:`open_license`) repeats the derivation in software with its private key.

Wire format (canonical CBOR)::

    {"v": 2, "certificate": <DER license-signing cert>, "envelope": <license envelope>}
    body = {"v": 2, "device_id", "image_id", "image_key_id", "nonce", "ka_public_key",
            "wrapped_key"}

The certificate travels outside the envelope because it is what authenticates the envelope;
it is validated against the OEM root before the envelope's body is parsed (S2).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securethread.errors import (
    CertificateError,
    ConfigurationError,
    DecryptionError,
    FormatError,
    LicenseError,
    SignatureError,
)
from securethread.formats import cbor, fields
from securethread.formats.envelope import (
    open_envelope,
    protected_sign1,
    sig_structure1,
    sign1_frame,
)
from securethread.formats.envelope import sign as envelope_sign
from securethread.formats.identity import DEVICE_ID_RE, check_device_id
from securethread.formats.image import AesGcmKey, Manifest
from securethread.keys.ecutil import fingerprint, spki_der
from securethread.keys.policy import Curve
from securethread.keys.protocol import PrivateKey, SecretKey
from securethread.pki import untrusted

__all__ = [
    "LICENSE_KIND",
    "License",
    "LicenseFormatError",
    "LicenseIssuer",
    "LicenseSignatureError",
    "LicenseSignerError",
    "LicenseUnwrapError",
    "WrongDeviceLicenseError",
    "WrongImageLicenseError",
    "kek_input",
    "open_license",
]

VERSION = 2
LICENSE_KIND = "license"
NONCE_SIZE = 16
MAX_LICENSE_SIZE = 4096
_KEK_LABEL = b"securethread-license-kek-v1\x00"


class LicenseFormatError(LicenseError, FormatError):
    """A license is malformed, oversized or of an unknown version."""


class LicenseSignerError(LicenseError):
    """The license-signing certificate does not validate under the OEM root."""


class LicenseSignatureError(LicenseError, SignatureError):
    """The license signature does not verify under its signer's certificate."""


class WrongDeviceLicenseError(LicenseError):
    """The license is for another device."""


class WrongImageLicenseError(LicenseError):
    """The license is for another image or image key."""


class LicenseUnwrapError(LicenseError, DecryptionError):
    """The wrapped image key does not unwrap with this device's key (RFC 5649 check)."""


def kek_input(device_id: str, image_id: str, nonce: bytes) -> bytes:
    """The 32 bytes AES-ECB-encrypted under the ECDH key to make the KEK.

    Fixed-length fields and a length-prefixed image id make the encoding injective.
    """
    iid = image_id.encode("ascii")
    return hashlib.sha256(
        _KEK_LABEL + device_id.encode("ascii") + bytes((len(iid),)) + iid + nonce
    ).digest()


@fields.body("license", error=LicenseFormatError)
@attrs.frozen(kw_only=True)
class License:
    """The signed body of a license (validated on construction)."""

    device_id: str = fields.text("device_id", min_len=16, max_len=16, pattern=DEVICE_ID_RE)
    image_id: str = fields.text("image_id", max_len=64, pattern=r"[\x00-\x7f]+")  # ASCII
    image_key_id: bytes = fields.byte_string("image_key_id", min_len=1, max_len=64)
    nonce: bytes = fields.byte_string("nonce", size=NONCE_SIZE)
    ka_public_key: bytes = fields.byte_string("ka_public_key", min_len=32, max_len=200)
    wrapped_key: bytes = fields.byte_string("wrapped_key", size=40)  # RFC 5649 of 32 bytes
    version: int = fields.version(VERSION)

    def to_body(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_body(cls, body: Any) -> License:
        return fields.decode(cls, body)


@fields.body("license container", error=LicenseFormatError)
@attrs.frozen(kw_only=True)
class _Container:
    """What travels: the signer's certificate beside the signed license (unverified)."""

    certificate: bytes = fields.byte_string("certificate", min_len=1, max_len=MAX_LICENSE_SIZE)
    envelope: bytes = fields.byte_string("envelope", min_len=1, max_len=MAX_LICENSE_SIZE)
    version: int = fields.version(VERSION)


def _cert_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigurationError("license certificates must certify EC keys")
    return key


class LicenseIssuer:
    """Issues licenses for one image in one job; constants are computed once here.

    ``ka_key``: the programmer's static KEY_AGREEMENT key (P-256, in the token);
    ``signing_key``: its LICENSE_SIGNING key; ``image_key``: the transferable image key
    imported into the same token.  The image id and key id come from ``manifest`` when
    given (and must agree with ``image_key``), else from ``image_id`` and the key's CKA_ID.
    """

    def __init__(
        self,
        *,
        ka_key: PrivateKey,
        ka_certificate: x509.Certificate,
        signing_key: PrivateKey,
        signing_certificate: x509.Certificate,
        image_key: SecretKey,
        manifest: Manifest | None = None,
        image_id: str | None = None,
    ) -> None:
        ka_pub = ka_key.public_key()
        if spki_der(_cert_key(ka_certificate)) != spki_der(ka_pub):
            raise ConfigurationError("the KA certificate does not certify the KA key")
        sign_pub = signing_key.public_key()
        if spki_der(_cert_key(signing_certificate)) != spki_der(sign_pub):
            raise ConfigurationError("the license certificate does not certify the signing key")
        key_id = bytes(image_key.key_id)
        if manifest is not None:
            if image_id is not None and image_id != manifest.image_id:
                raise ConfigurationError("image_id disagrees with the manifest")
            if manifest.image_key_id != key_id:
                raise ConfigurationError("the image key is not the manifest's image key")
            image_id = manifest.image_id
        if image_id is None:
            raise ConfigurationError("a manifest or an image id is needed")
        # A template license validates every constant field once, here.
        self._template = License(
            device_id="0" * 16,
            image_id=image_id,
            image_key_id=key_id,
            nonce=bytes(NONCE_SIZE),
            ka_public_key=spki_der(ka_pub),
            wrapped_key=bytes(40),
        )
        self.image_id = image_id
        self._ka_key = ka_key
        self._signing_key = signing_key
        self._image_key = image_key
        # The COSE_Sign1 protected header is the same for every license of this signer.
        self._protected = protected_sign1(LICENSE_KIND, sign_pub, fingerprint(sign_pub))
        # Per device only the device id, nonce, wrapped key and envelope change: the maps'
        # other keys and values are encoded once (cbor.Template, the same bytes).
        body = self._template.to_body()
        varying = ("device_id", "nonce", "wrapped_key")
        self._body = cbor.Template({k: v for k, v in body.items() if k not in varying}, varying)
        cert = signing_certificate.public_bytes(serialization.Encoding.DER)
        self._container = cbor.Template({"v": VERSION, "certificate": cert}, ("envelope",))

    def issue(self, device_id: str, device_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """A signed license wrapping the image key to ``device_public_key`` (P-256)."""
        try:
            check_device_id(device_id)
        except FormatError as exc:
            raise LicenseFormatError(str(exc)) from None
        if not isinstance(device_public_key, ec.EllipticCurvePublicKey) or not isinstance(
            device_public_key.curve, ec.SECP256R1
        ):
            raise LicenseFormatError("license: device keys are P-256")
        nonce = os.urandom(NONCE_SIZE)
        info = kek_input(device_id, self.image_id, nonce)  # the device computes the same
        # KEK = AES-ECB(Z, info), Z = ECDH(KA key, device key): both temporaries in the token.
        wrapped = self._ka_key.agree_and_wrap(device_public_key, info, self._image_key)
        if len(wrapped) != 40:  # RFC 5649 of a 32-byte key; the template checked the rest
            raise LicenseFormatError("license: wrapped key must be 40 bytes")
        body = self._body.fill(device_id, nonce, wrapped)
        # envelope.seal with the protected header built once (same bytes, same checks):
        # COSE_Sign1 (RFC 9052 §4.2) over Sig_structure ["Signature1", protected, h'', body].
        sig = envelope_sign(self._signing_key, sig_structure1(self._protected, body))  # low-s
        return self._container.fill(sign1_frame(self._protected, body, sig))


def _aes_ecb(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def open_license(
    data: bytes,
    *,
    device_id: str,
    device_key: ec.EllipticCurvePrivateKey,
    oem_root: x509.Certificate,
    image_id: str,
    image_key_id: bytes,
    at: datetime.datetime | None = None,
) -> AesGcmKey:
    """Device side: authenticate the license, check it is ours, unwrap the image key.

    Order (S2): the signer certificate is validated under the OEM root (purpose
    LICENSE_SIGNING), the envelope signature verified, and only then the body parsed and
    checked for device id, image id and key id, and the key unwrapped (RFC 5649 §4.2 check).
    """
    from securethread.pki import EnclavePurpose, validate_enclave_certificate

    try:
        outer = cbor.decode(data, what="license", max_size=MAX_LICENSE_SIZE)
    except FormatError as exc:
        raise LicenseFormatError(str(exc)) from None
    container = fields.decode(_Container, outer)
    try:
        cert = untrusted.load_certificate(
            container.certificate, what="license: signer certificate", curves=(Curve.P256,)
        )
    except FormatError as exc:
        raise LicenseFormatError(str(exc)) from None
    try:
        validate_enclave_certificate(
            cert, oem_root, purpose=EnclavePurpose.LICENSE_SIGNING, role="programmer", at=at
        )
    except CertificateError as exc:
        raise LicenseSignerError(f"license signer not trusted: {exc}") from exc
    try:
        body = open_envelope(
            container.envelope,
            kind=LICENSE_KIND,
            keys=_cert_key(cert),
            max_size=MAX_LICENSE_SIZE,
        )
    except SignatureError as exc:
        raise LicenseSignatureError(str(exc)) from None
    except FormatError as exc:
        raise LicenseFormatError(str(exc)) from None
    lic = License.from_body(body)
    if lic.device_id != device_id:
        raise WrongDeviceLicenseError(
            f"license is for device {lic.device_id}, this device is {device_id}"
        )
    if lic.image_id != image_id or lic.image_key_id != image_key_id:
        raise WrongImageLicenseError(
            f"license is for image {lic.image_id!r}, not {image_id!r} (or another image key)"
        )
    try:
        ka_pub = untrusted.load_public_key(
            lic.ka_public_key, what="license: KA key", curves=(Curve.P256,)
        )
    except FormatError as exc:
        raise LicenseFormatError(str(exc)) from None
    z = device_key.exchange(ec.ECDH(), ka_pub)
    # SoftHSM's CKD_NULL AES-256 key = the rightmost 32 bytes of Z (docs/hsm.md).
    kek = _aes_ecb(z[-32:], kek_input(lic.device_id, lic.image_id, lic.nonce))
    try:
        key = keywrap.aes_key_unwrap_with_padding(kek, lic.wrapped_key)
    except keywrap.InvalidUnwrap:
        raise LicenseUnwrapError(
            "license does not unwrap with this device's key (issued to another key)"
        ) from None
    if len(key) != 32:
        raise LicenseUnwrapError("license does not carry an AES-256 key")
    return AesGcmKey(key, key_id=lic.image_key_id)
