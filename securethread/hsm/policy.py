"""Key policy: the one place that decides the PKCS#11 attributes of every key we create.

Invariant S1 (DESIGN.md): every private or secret key is ``CKA_SENSITIVE=True``; it is
``CKA_EXTRACTABLE=False`` unless the caller declares it *transferable* (a key that must
travel, and then only wrapped).  Usages are explicit so a signing key cannot decrypt and
a key-encryption key cannot sign.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs
from pkcs11 import Attribute

from ..errors import KeyPolicyError


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

    def secret_template(self) -> dict[Attribute, Any]:
        """Attributes for an AES key (generate, derive or unwrap)."""
        u = self.usage
        return {
            Attribute.TOKEN: self.persistent,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: self.transferable,
            Attribute.ENCRYPT: bool(u & Usage.ENCRYPT),
            Attribute.DECRYPT: bool(u & Usage.ENCRYPT),
            Attribute.SIGN: bool(u & Usage.ENCRYPT),  # AES-CMAC key confirmation
            Attribute.VERIFY: bool(u & Usage.ENCRYPT),
            Attribute.WRAP: bool(u & Usage.WRAP),
            Attribute.UNWRAP: bool(u & Usage.WRAP),
            Attribute.DERIVE: bool(u & Usage.DERIVE),
        }

    def private_template(self) -> dict[Attribute, Any]:
        """Attributes for the private half of an EC key pair."""
        u = self.usage
        if u & (Usage.ENCRYPT | Usage.WRAP):
            raise KeyPolicyError("an EC private key can only sign and derive")
        return {
            Attribute.TOKEN: self.persistent,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: self.transferable,
            Attribute.SIGN: bool(u & Usage.SIGN),
            Attribute.DERIVE: bool(u & Usage.DERIVE),
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
        }

    def public_template(self) -> dict[Attribute, Any]:
        return {
            Attribute.TOKEN: self.persistent,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: bool(self.usage & Usage.SIGN),
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
            Attribute.DERIVE: False,
        }


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


def report_from_attributes(attrs_: Mapping[Attribute, Any]) -> PolicyReport:
    return PolicyReport(
        sensitive=bool(attrs_[Attribute.SENSITIVE]),
        extractable=bool(attrs_[Attribute.EXTRACTABLE]),
        always_sensitive=bool(attrs_[Attribute.ALWAYS_SENSITIVE]),
        never_extractable=bool(attrs_[Attribute.NEVER_EXTRACTABLE]),
    )
