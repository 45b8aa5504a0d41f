"""PKCS#11 attribute templates: the one place that turns a :class:`KeyPolicy` into the
attributes of a key object the token creates, derives or unwraps.

Invariant S1 (docs/design.md): every private or secret key is ``CKA_SENSITIVE=True``; it is
``CKA_EXTRACTABLE=False`` unless its policy declares it *transferable* (a key that must
travel, and then only wrapped).  Usages are explicit so a signing key cannot decrypt and a
key-encryption key cannot sign.  Attribute meanings: PKCS#11 v3.0 §4.4 (storage objects),
§4.8-4.10 (keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pkcs11 import Attribute

from ..keys.policy import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    KEY_AGREEMENT,
    SIGNING,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_WRAP,
    Curve,
    KeyPolicy,
    PolicyReport,
    Usage,
)


def secret_template(policy: KeyPolicy) -> dict[Attribute, Any]:
    """Attributes for an AES key (generate, derive or unwrap)."""
    u = policy.usage
    return {
        Attribute.TOKEN: policy.persistent,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: policy.transferable,
        Attribute.ENCRYPT: bool(u & Usage.ENCRYPT),
        Attribute.DECRYPT: bool(u & Usage.ENCRYPT),
        Attribute.SIGN: bool(u & Usage.ENCRYPT),  # AES-CMAC key confirmation
        Attribute.VERIFY: bool(u & Usage.ENCRYPT),
        Attribute.WRAP: bool(u & Usage.WRAP),
        Attribute.UNWRAP: bool(u & Usage.WRAP),
        Attribute.DERIVE: bool(u & Usage.DERIVE),
    }


def private_template(policy: KeyPolicy) -> dict[Attribute, Any]:
    """Attributes for the private half of an EC key pair."""
    policy.check_private()
    u = policy.usage
    return {
        Attribute.TOKEN: policy.persistent,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: policy.transferable,
        Attribute.SIGN: bool(u & Usage.SIGN),
        Attribute.DERIVE: bool(u & Usage.DERIVE),
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
    }


def public_template(policy: KeyPolicy) -> dict[Attribute, Any]:
    """Attributes for the public half of an EC key pair."""
    return {
        Attribute.TOKEN: policy.persistent,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: bool(policy.usage & Usage.SIGN),
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
    }


def report_from_attributes(attrs_: Mapping[Attribute, Any]) -> PolicyReport:
    return PolicyReport(
        sensitive=bool(attrs_[Attribute.SENSITIVE]),
        extractable=bool(attrs_[Attribute.EXTRACTABLE]),
        always_sensitive=bool(attrs_[Attribute.ALWAYS_SENSITIVE]),
        never_extractable=bool(attrs_[Attribute.NEVER_EXTRACTABLE]),
    )


__all__ = [
    "EPHEMERAL_AGREEMENT",
    "IMAGE_KEY",
    "KEY_AGREEMENT",
    "SIGNING",
    "TEMP_CONFIRM",
    "TEMP_DERIVE",
    "TEMP_WRAP",
    "Curve",
    "KeyPolicy",
    "PolicyReport",
    "Usage",
    "private_template",
    "public_template",
    "report_from_attributes",
    "secret_template",
]
