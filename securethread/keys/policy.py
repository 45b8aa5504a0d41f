"""Key policy: what each key may do and whether it may leave its token (pure; no PKCS#11).

Invariant S1 (DESIGN.md): every private or secret key is ``CKA_SENSITIVE=True``; it is
``CKA_EXTRACTABLE=False`` unless the caller declares it *transferable* (a key that must
travel, and then only wrapped).  Usages are explicit so a signing key cannot decrypt and
a key-encryption key cannot sign.
"""

from __future__ import annotations

import enum

import attrs

from securethread.errors import KeyPolicyError


class Curve(enum.Enum):
    """The EC curves securethread issues keys on."""

    P256 = "secp256r1"
    P384 = "secp384r1"

    @property
    def bits(self) -> int:
        return 256 if self is Curve.P256 else 384

    @property
    def coordinate_size(self) -> int:
        return self.bits // 8

    @classmethod
    def from_name(cls, name: str) -> Curve:
        for c in cls:
            if name in (c.value, c.name, c.name.lower(), c.name.replace("P", "P-")):
                return c
        raise KeyPolicyError(f"unsupported curve {name!r} (supported: P-256, P-384)")


class Usage(enum.Flag):
    """What a key may be used for; maps onto the PKCS#11 boolean usage attributes."""

    SIGN = enum.auto()
    DERIVE = enum.auto()  # ECDH for EC keys; *_ENCRYPT_DATA derivation for AES keys
    ENCRYPT = enum.auto()  # AES-GCM encrypt/decrypt, AES-CMAC
    WRAP = enum.auto()  # AES-KWP wrap/unwrap (a key-encryption key)


@attrs.frozen(kw_only=True)
class KeyPolicy:
    """How a private/secret key is created: usages and whether it may leave, wrapped."""

    usage: Usage
    transferable: bool = False
    persistent: bool = True

    def check_private(self) -> None:
        """Refuse usages an EC private key cannot have: it can only sign and derive."""
        if self.usage & (Usage.ENCRYPT | Usage.WRAP):
            raise KeyPolicyError("an EC private key can only sign and derive")


#: Long-lived signing keys (CA, firmware signing, ledger, license, identity).
SIGNING = KeyPolicy(usage=Usage.SIGN)
#: Static key-agreement keys (the programmer's license and sealed-transfer keys).
KEY_AGREEMENT = KeyPolicy(usage=Usage.DERIVE)
#: Ephemeral channel keys: never stored, never exported.
EPHEMERAL_AGREEMENT = KeyPolicy(usage=Usage.DERIVE, persistent=False)
#: Image keys: encrypt images, and must travel (wrapped) to the programmer and devices.
IMAGE_KEY = KeyPolicy(usage=Usage.ENCRYPT, transferable=True)
#: Temporary keys derived inside the token for one operation.
TEMP_DERIVE = KeyPolicy(usage=Usage.DERIVE, persistent=False)
TEMP_WRAP = KeyPolicy(usage=Usage.WRAP, persistent=False)
TEMP_CONFIRM = KeyPolicy(usage=Usage.ENCRYPT, persistent=False)


@attrs.frozen
class PolicyReport:
    """What a token reports about one key, for audits and the S1 tests."""

    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool

    def check(self, *, transferable: bool) -> None:
        """Raise :class:`KeyPolicyError` unless the key satisfies invariant S1."""
        if not self.sensitive:
            raise KeyPolicyError("key is not CKA_SENSITIVE")
        if self.extractable and not transferable:
            raise KeyPolicyError("key is CKA_EXTRACTABLE but not declared transferable")
