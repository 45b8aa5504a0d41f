"""Key policy: what each key may do and whether it may leave its token (pure; no PKCS#11).

Invariant S1 (docs/design.md): every private or secret key is ``CKA_SENSITIVE=True``; it is
``CKA_EXTRACTABLE=False`` unless the caller declares it *transferable* (a key that must
travel, and then only wrapped).  Every key is also ``CKA_MODIFIABLE=False`` and
``CKA_COPYABLE=False`` (PKCS#11 v3.0 §4.4): nobody can widen its usages or clone it with
other attributes later.  Usages are explicit and minimal, one flag per PKCS#11 usage
attribute, so a signing key cannot decrypt, a key-encryption key cannot sign and the
programmer's copy of an image key can do nothing but be wrapped into licenses.  The table
of which key gets what is docs/keys.md.
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
    """What a key may be used for: each flag sets one PKCS#11 usage attribute.

    EC private keys: ``SIGN`` (CKA_SIGN; the public half gets CKA_VERIFY) and ``DERIVE``
    (ECDH).  AES keys: ``ENCIPHER`` (CKA_ENCRYPT), ``DECIPHER`` (CKA_DECRYPT), ``MAC``
    (CKA_SIGN, AES-CMAC; a MAC is checked by recomputing it, so CKA_VERIFY stays off),
    ``WRAP_KEY`` (CKA_WRAP), ``UNWRAP_KEY`` (CKA_UNWRAP), ``DERIVE``
    (CKM_AES_ECB_ENCRYPT_DATA).  ``NONE``: the key can only be wrapped by another key (if
    its policy is transferable).
    """

    NONE = 0
    SIGN = 1
    DERIVE = 2
    ENCIPHER = 4
    DECIPHER = 8
    MAC = 16
    WRAP_KEY = 32
    UNWRAP_KEY = 64
    #: A general AES data key: encrypt, decrypt and CMAC (no named policy uses it).
    ENCRYPT = ENCIPHER | DECIPHER | MAC
    #: A key-encryption key that both wraps and unwraps (no named policy uses it).
    WRAP = WRAP_KEY | UNWRAP_KEY


_EC_USAGES = Usage.SIGN | Usage.DERIVE
_AES_USAGES = (
    Usage.DERIVE | Usage.ENCIPHER | Usage.DECIPHER | Usage.MAC | Usage.WRAP_KEY | Usage.UNWRAP_KEY
)


@attrs.frozen(kw_only=True)
class KeyPolicy:
    """How a private/secret key is created: usages and whether it may leave, wrapped."""

    usage: Usage
    transferable: bool = False
    persistent: bool = True

    def check_private(self) -> None:
        """Refuse usages an EC private key cannot have: it can only sign and derive."""
        if self.usage & ~_EC_USAGES:
            raise KeyPolicyError("an EC private key can only sign and derive")

    def check_secret(self) -> None:
        """Refuse usages an AES key cannot have: ECDSA signing (AES-CMAC is ``Usage.MAC``)."""
        if self.usage & ~_AES_USAGES:
            raise KeyPolicyError("an AES key cannot sign (use Usage.MAC for AES-CMAC)")


#: Long-lived signing keys (CA, firmware signing, ledger, license, identity, officers).
SIGNING = KeyPolicy(usage=Usage.SIGN)
#: Static key-agreement keys (the programmer's license and sealed-transfer keys).
KEY_AGREEMENT = KeyPolicy(usage=Usage.DERIVE)
#: Ephemeral channel keys: never stored, never exported.
EPHEMERAL_AGREEMENT = KeyPolicy(usage=Usage.DERIVE, persistent=False)
#: The OEM's image keys: encrypt images (mastering) and compute the CMAC key check value of
#: a transfer; extractable only so a transfer key can wrap them.  Nothing at the OEM
#: decrypts an image, so no DECIPHER.
IMAGE_KEY = KeyPolicy(usage=Usage.ENCIPHER | Usage.MAC, transferable=True)
#: The programmer's copy of an image key: no usage at all.  Extractable only so that a
#: license KEK can wrap it to a device (AES-KWP, the one thing the programmer does with it);
#: it cannot encrypt, decrypt, MAC, wrap, unwrap or derive.
PROGRAMMER_IMAGE_KEY = KeyPolicy(usage=Usage.NONE, transferable=True)
#: Temporary keys derived inside the token for one operation, each with one usage:
#: the raw ECDH secret (derive the next key from it), a KEK that wraps (OEM side of a
#: transfer, licenses), a KEK that unwraps (programmer side), a CMAC key (confirmation,
#: transfer MACs, key check values).
TEMP_DERIVE = KeyPolicy(usage=Usage.DERIVE, persistent=False)
TEMP_WRAP = KeyPolicy(usage=Usage.WRAP_KEY, persistent=False)
TEMP_UNWRAP = KeyPolicy(usage=Usage.UNWRAP_KEY, persistent=False)
TEMP_CONFIRM = KeyPolicy(usage=Usage.MAC, persistent=False)

#: Every named policy, by name (docs/keys.md uses these names).
NAMED_POLICIES: dict[str, KeyPolicy] = {
    "SIGNING": SIGNING,
    "KEY_AGREEMENT": KEY_AGREEMENT,
    "EPHEMERAL_AGREEMENT": EPHEMERAL_AGREEMENT,
    "IMAGE_KEY": IMAGE_KEY,
    "PROGRAMMER_IMAGE_KEY": PROGRAMMER_IMAGE_KEY,
    "TEMP_DERIVE": TEMP_DERIVE,
    "TEMP_WRAP": TEMP_WRAP,
    "TEMP_UNWRAP": TEMP_UNWRAP,
    "TEMP_CONFIRM": TEMP_CONFIRM,
}

#: The PKCS#11 usage attributes a report carries, in the order pkcs11-tool prints them.
USAGE_ATTRIBUTES = ("encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive")


@attrs.frozen(kw_only=True)
class PolicyReport:
    """What a token (or the software backend) reports about one key object.

    The storage attributes (PKCS#11 v3.0 §4.4), the key attributes (§4.7-4.10) and the
    usage attributes; an attribute a key class does not have (CKA_ENCRYPT on an EC private
    key, say) reads as False.  Audits, transcripts and the S1 tests all read this.
    """

    token: bool
    private: bool
    modifiable: bool
    copyable: bool
    destroyable: bool
    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool
    local: bool
    encrypt: bool
    decrypt: bool
    sign: bool
    verify: bool
    wrap: bool
    unwrap: bool
    derive: bool

    @property
    def usages(self) -> tuple[str, ...]:
        """The usage attributes that are True, e.g. ``("sign",)``."""
        return tuple(name for name in USAGE_ATTRIBUTES if getattr(self, name))

    def attributes(self) -> dict[str, bool]:
        """Every attribute by its hyphenated name (``always-sensitive``...), for records."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in attrs.fields(type(self))}

    def check(self, *, transferable: bool) -> None:
        """Raise :class:`KeyPolicyError` unless the key satisfies invariant S1 and is frozen
        (non-modifiable, non-copyable)."""
        if not self.sensitive:
            raise KeyPolicyError("key is not CKA_SENSITIVE")
        if self.extractable and not transferable:
            raise KeyPolicyError("key is CKA_EXTRACTABLE but not declared transferable")
        if self.modifiable:
            raise KeyPolicyError("key is CKA_MODIFIABLE")
        if self.copyable:
            raise KeyPolicyError("key is CKA_COPYABLE")
