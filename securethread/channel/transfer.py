"""Key transfer: OEM secrets wrapped into the programmer's token, online or sealed offline.

Online (over a :class:`~securethread.channel.ChannelSession`): the OEM wraps AES keys with
AES-KWP (RFC 5649, CKM_AES_KEY_WRAP_PAD) under the session wrapping key; the message is
AES-CMAC'd (SP 800-38B) with the session transfer-MAC key and carries the session id and a
sequence number; the programmer authenticates it, unwraps every entry into its token
(all-or-nothing) and returns an acknowledgement signed with its identity key that lists what
arrived, with key check values computed inside its token.

Offline (air-gapped): a package sealed to the programmer's certified KEY_AGREEMENT key with
ECDH-ES (SP 800-56A §6.2.2.2, one-pass: ephemeral OEM key, static programmer key), signed by
the OEM identity key in a securethread envelope.  Imported package ids are recorded so a
package imports once.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.channel.handshake import (
    DERIVATION_CKD_NULL_ECB,
    ROLE_OEM,
    ROLE_PROGRAMMER,
    ChannelSession,
)
from securethread.errors import (
    ChannelError,
    ConfigurationError,
    ConfirmationError,
    DuplicateObjectError,
    FormatError,
    ReplayError,
)
from securethread.formats import cbor, envelope
from securethread.keys.ecutil import point_of, public_from_point
from securethread.keys.policy import (
    EPHEMERAL_AGREEMENT,
    TEMP_DERIVE,
    TEMP_WRAP,
    Curve,
    KeyPolicy,
    Usage,
)
from securethread.keys.protocol import KeyBackend, PrivateKey, SecretKey

VERSION = 1
TRANSFER_TYPE = "key-transfer"
ACK_KIND = "key-transfer-ack"
PACKAGE_KIND = "sealed-key-package"
MAX_ENTRIES = 256
MAX_LABEL = 128
MAX_KEY_ID = 64
WRAPPED_AES256_SIZE = 40  # RFC 5649 §4.1: 8-byte AIV block + 32 key bytes
KCV_SIZE = 8
ID_SIZE = 16
MAX_TRANSFER_SIZE = 64 * 1024
MAX_ACK_SIZE = 64 * 1024
MAX_PACKAGE_SIZE = 80 * 1024
_MAC_LABEL = b"securethread-transfer/v1 mac"
_KEK_LABEL = b"securethread-package/v1 kek"
_KCV_BLOCK = bytes(16)
_USAGES = {"encrypt": Usage.ENCRYPT}


class WrongRecipientError(ChannelError):
    """A transfer or sealed package is addressed to another enclave or session."""


# --- entries ---------------------------------------------------------------------------------


def key_check_value(key: SecretKey) -> bytes:
    """AES-CMAC of a zero block, truncated (the CMAC KCV of ANSI X9.24-1:2017 §7.6.2).

    Computed inside the token: it identifies a key without revealing it.
    """
    return key.cmac(_KCV_BLOCK)[:KCV_SIZE]


def _check_label(label: object) -> str:
    if not isinstance(label, str) or not 0 < len(label.encode()) <= MAX_LABEL:
        raise FormatError(f"key label {label!r}: must be 1..{MAX_LABEL} bytes of text")
    return label


def _check_bytes(value: object, what: str, *, size: int | None = None, limit: int = 0) -> bytes:
    if not isinstance(value, bytes):
        raise FormatError(f"{what}: expected bytes")
    if size is not None and len(value) != size:
        raise FormatError(f"{what}: {len(value)} bytes, expected {size}")
    if limit and len(value) > limit:
        raise FormatError(f"{what}: {len(value)} bytes, limit {limit}")
    return value


@attrs.frozen(kw_only=True)
class WrappedEntry:
    """One wrapped AES-256 key, with the label, id and policy it gets on the programmer."""

    label: str = attrs.field(validator=lambda _i, _a, v: _check_label(v))
    key_id: bytes = attrs.field(validator=lambda _i, _a, v: _check_bytes(v, "key_id", limit=64))
    usage: str
    transferable: bool
    wrapped: bytes = attrs.field(
        validator=lambda _i, _a, v: _check_bytes(v, "wrapped key", size=WRAPPED_AES256_SIZE)
    )
    kcv: bytes = attrs.field(validator=lambda _i, _a, v: _check_bytes(v, "kcv", size=KCV_SIZE))

    def __attrs_post_init__(self) -> None:
        if self.usage not in _USAGES:
            raise FormatError(f"key {self.label!r}: unsupported usage {self.usage!r}")
        if not isinstance(self.transferable, bool):
            raise FormatError(f"key {self.label!r}: transferable must be a boolean")

    @property
    def policy(self) -> KeyPolicy:
        """Persistent, sensitive; extractable only if the OEM marked it transferable."""
        return KeyPolicy(usage=_USAGES[self.usage], transferable=self.transferable)

    def to_cbor(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "key_id": self.key_id,
            "usage": self.usage,
            "transferable": self.transferable,
            "wrapped": self.wrapped,
            "kcv": self.kcv,
        }

    @classmethod
    def from_cbor(cls, m: object) -> WrappedEntry:
        keys = {"label", "key_id", "usage", "transferable", "wrapped", "kcv"}
        if not isinstance(m, dict) or set(m) != keys:
            raise FormatError("transfer entry: malformed")
        return cls(**m)


def _entries_from(value: object, what: str) -> tuple[WrappedEntry, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_ENTRIES:
        raise FormatError(f"{what}: needs 1..{MAX_ENTRIES} entries")
    entries = tuple(WrappedEntry.from_cbor(e) for e in value)
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise FormatError(f"{what}: a label appears twice")
    return entries


@attrs.frozen(kw_only=True)
class ImportedKey:
    """What the programmer reports for each imported key (never the key)."""

    label: str
    key_id: bytes
    kcv: bytes
    transferable: bool

    def to_cbor(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "key_id": self.key_id,
            "kcv": self.kcv,
            "transferable": self.transferable,
        }

    @classmethod
    def from_cbor(cls, m: object) -> ImportedKey:
        if not isinstance(m, dict) or set(m) != {"label", "key_id", "kcv", "transferable"}:
            raise FormatError("acknowledgement entry: malformed")
        return cls(
            label=_check_label(m["label"]),
            key_id=_check_bytes(m["key_id"], "key_id", limit=MAX_KEY_ID),
            kcv=_check_bytes(m["kcv"], "kcv", size=KCV_SIZE),
            transferable=bool(m["transferable"]),
        )

    @classmethod
    def of(cls, e: WrappedEntry) -> ImportedKey:
        return cls(label=e.label, key_id=e.key_id, kcv=e.kcv, transferable=e.transferable)


def _wrap_entries(
    backend: KeyBackend,
    kek: SecretKey,
    labels: Sequence[str],
    transferable: bool | Mapping[str, bool],
) -> tuple[WrappedEntry, ...]:
    if not labels or len(labels) > MAX_ENTRIES or len(set(labels)) != len(labels):
        raise ValueError(f"need 1..{MAX_ENTRIES} distinct labels")
    out = []
    for label in labels:
        key = backend.secret_key(label)
        keep = transferable if isinstance(transferable, bool) else transferable.get(label, True)
        out.append(
            WrappedEntry(
                label=label,
                key_id=key.key_id,
                usage="encrypt",
                transferable=keep,
                wrapped=kek.wrap(key),  # RFC 5649 in the token; KeyPolicyError if not extractable
                kcv=key_check_value(key),
            )
        )
    return tuple(out)


def _import_entries(
    backend: KeyBackend, kek: SecretKey, entries: Sequence[WrappedEntry]
) -> tuple[ImportedKey, ...]:
    """Unwrap every entry into the token, or none: on any failure the imported ones go."""
    for e in entries:
        if backend.has_key(e.label):
            raise DuplicateObjectError(f"{backend.name!r} already has a key {e.label!r}")
    done: list[str] = []
    try:
        for e in entries:
            key = kek.unwrap(e.wrapped, label=e.label, key_id=e.key_id, policy=e.policy)
            done.append(e.label)
            if not hmac.compare_digest(key_check_value(key), e.kcv):
                raise ConfirmationError(f"key {e.label!r}: key check value does not match")
            key.policy_report().check(transferable=e.transferable)  # S1
    except BaseException:
        for label in done:
            backend.destroy(label)
        raise
    return tuple(ImportedKey.of(e) for e in entries)


# --- online transfer over a channel session --------------------------------------------------


@attrs.frozen(kw_only=True)
class TransferMessage:
    """Body of a transfer: bound to the session id, ordered by ``sequence``."""

    session_id: bytes = attrs.field(validator=lambda _i, _a, v: _check_bytes(v, "sid", size=16))
    sequence: int
    transfer_id: bytes = attrs.field(
        validator=lambda _i, _a, v: _check_bytes(v, "transfer_id", size=ID_SIZE)
    )
    entries: tuple[WrappedEntry, ...]

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.sequence, int) or isinstance(self.sequence, bool):
            raise FormatError("transfer: sequence must be an integer")
        if not 0 <= self.sequence < 1 << 32:
            raise FormatError("transfer: sequence out of range")

    def body_bytes(self) -> bytes:
        return cbor.encode(
            {
                "sid": self.session_id,
                "seq": self.sequence,
                "transfer_id": self.transfer_id,
                "entries": [e.to_cbor() for e in self.entries],
            }
        )

    @classmethod
    def from_body(cls, body: bytes) -> TransferMessage:
        m = cbor.decode(body, what="transfer body", max_size=MAX_TRANSFER_SIZE)
        if not isinstance(m, dict) or set(m) != {"sid", "seq", "transfer_id", "entries"}:
            raise FormatError("transfer body: malformed")
        return cls(
            session_id=m["sid"],
            sequence=m["seq"],
            transfer_id=m["transfer_id"],
            entries=_entries_from(m["entries"], "transfer"),
        )


def _mac_input(body: bytes) -> bytes:
    return _MAC_LABEL + body


def _split_transfer(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Outer layer: ``{"v", "type", "sid", "body", "mac"}``; nothing in it is acted on
    before the MAC verifies, except refusing a session id that is not ours."""
    outer = cbor.decode(data, what="key transfer", max_size=MAX_TRANSFER_SIZE)
    if not isinstance(outer, dict) or set(outer) != {"v", "type", "sid", "body", "mac"}:
        raise FormatError("key transfer: malformed")
    if outer["v"] != VERSION:
        raise FormatError(f"key transfer: unsupported version {outer['v']!r}")
    if outer["type"] != TRANSFER_TYPE:
        raise FormatError(f"expected a key transfer, got {outer['type']!r}")
    return (
        _check_bytes(outer["sid"], "sid", size=16),
        _check_bytes(outer["body"], "body"),
        _check_bytes(outer["mac"], "mac", size=16),
    )


@attrs.frozen(kw_only=True)
class TransferRecord:
    """The OEM's audit record: what the programmer acknowledged, under which session."""

    session_id: bytes
    transfer_id: bytes
    sequence: int
    programmer: bytes  # SHA-256 of the programmer identity certificate
    keys: tuple[ImportedKey, ...]
    ack: bytes  # the signed acknowledgement, verifiable offline with the programmer's cert


class KeySender:
    """OEM side: wrap keys from the OEM token for the peer, then check the acknowledgement."""

    def __init__(self, session: ChannelSession) -> None:
        if session.role != ROLE_OEM:
            raise ConfigurationError("only the OEM side of a session sends keys")
        self.session = session
        self._pending: dict[bytes, tuple[bytes, TransferMessage]] = {}

    def send(
        self, labels: Sequence[str], *, transferable: bool | Mapping[str, bool] = True
    ) -> bytes:
        """Wrap the keys ``labels`` under the session; ``transferable`` is the policy the
        programmer gives them (image keys must stay transferable: the programmer re-wraps
        them per device for licenses)."""
        s = self.session
        s.require_open()
        entries = _wrap_entries(s.backend, s.wrap_key, labels, transferable)
        msg = TransferMessage(
            session_id=s.session_id,
            sequence=s.next_send_sequence,
            transfer_id=s.backend.random(ID_SIZE),
            entries=entries,
        )
        body = msg.body_bytes()
        data = cbor.encode(
            {
                "v": VERSION,
                "type": TRANSFER_TYPE,
                "sid": s.session_id,
                "body": body,
                "mac": s.mac_key.cmac(_mac_input(body)),
            }
        )
        if len(data) > MAX_TRANSFER_SIZE:
            raise ValueError("too many keys for one transfer message")
        s.next_send_sequence += 1
        self._pending[msg.transfer_id] = (hashlib.sha256(data).digest(), msg)
        return data

    def verify_ack(self, data: bytes) -> TransferRecord:
        """Check the programmer's signed acknowledgement against what was sent."""
        s = self.session
        body = envelope.open_envelope(
            data, kind=ACK_KIND, keys=s.peer_public_key, max_size=MAX_ACK_SIZE
        )
        if (
            set(body) != {"v", "sid", "seq", "transfer_id", "digest", "keys"}
            or body["v"] != VERSION
        ):
            raise FormatError("acknowledgement: malformed")
        if not isinstance(body["sid"], bytes) or not hmac.compare_digest(body["sid"], s.session_id):
            raise WrongRecipientError("acknowledgement belongs to another session")
        pending = (
            self._pending.get(body["transfer_id"])
            if isinstance(body["transfer_id"], bytes)
            else None
        )
        if pending is None:
            raise ReplayError("acknowledgement for an unknown or already acknowledged transfer")
        digest, msg = pending
        if not isinstance(body["digest"], bytes) or not hmac.compare_digest(body["digest"], digest):
            raise ConfirmationError("acknowledgement is for a different transfer message")
        if not isinstance(body["keys"], list):
            raise FormatError("acknowledgement: keys is not a list")
        got = tuple(ImportedKey.from_cbor(k) for k in body["keys"])
        if got != tuple(ImportedKey.of(e) for e in msg.entries) or body["seq"] != msg.sequence:
            raise ConfirmationError("acknowledged keys differ from the keys sent")
        del self._pending[msg.transfer_id]
        return TransferRecord(
            session_id=s.session_id,
            transfer_id=msg.transfer_id,
            sequence=msg.sequence,
            programmer=hashlib.sha256(
                s.peer_certificate.public_bytes(serialization.Encoding.DER)
            ).digest(),
            keys=got,
            ack=data,
        )


class KeyReceiver:
    """Programmer side: authenticate a transfer, import it all-or-nothing, sign an ack."""

    def __init__(self, session: ChannelSession) -> None:
        if session.role != ROLE_PROGRAMMER:
            raise ConfigurationError("only the programmer side of a session receives keys")
        self.session = session
        self.imported: list[ImportedKey] = []

    def receive(self, data: bytes) -> bytes:
        """Import the keys of one transfer message; return the signed acknowledgement."""
        s = self.session
        s.require_open()
        sid, body, mac = _split_transfer(data)
        if not hmac.compare_digest(sid, s.session_id):
            raise ReplayError("key transfer belongs to another (older) session")
        # S2: authenticate before parsing the body (CMAC in the token, constant-time compare).
        if not hmac.compare_digest(mac, s.mac_key.cmac(_mac_input(body))):
            raise ChannelError("key transfer: MAC does not verify under this session")
        msg = TransferMessage.from_body(body)
        if not hmac.compare_digest(msg.session_id, s.session_id):
            raise ReplayError("key transfer belongs to another session")
        if msg.sequence < s.next_receive_sequence:
            raise ReplayError(f"key transfer {msg.sequence} was already received")
        if msg.sequence > s.next_receive_sequence:
            raise ChannelError(
                f"key transfer {msg.sequence} out of order (expected {s.next_receive_sequence})"
            )
        # The sequence number is spent once the message is authentic, whatever the outcome,
        # so a refused transfer can never be replayed into success later.
        s.next_receive_sequence += 1
        keys = _import_entries(s.backend, s.wrap_key, msg.entries)
        self.imported.extend(keys)
        return envelope.seal(
            ACK_KIND,
            {
                "v": VERSION,
                "sid": s.session_id,
                "seq": msg.sequence,
                "transfer_id": msg.transfer_id,
                "digest": hashlib.sha256(data).digest(),
                "keys": [k.to_cbor() for k in keys],
            },
            [s.identity_key],
        )


# --- offline sealed packages -----------------------------------------------------------------


class PackageRegistry(Protocol):
    """Where a programmer records the ids of packages it imported (replay protection)."""

    def seen(self, package_id: bytes) -> bool: ...

    def record(self, package_id: bytes) -> None: ...


class MemoryPackageRegistry:
    """In-memory registry, for tests and for callers that persist ids themselves."""

    def __init__(self) -> None:
        self._ids: set[bytes] = set()

    def seen(self, package_id: bytes) -> bool:
        return package_id in self._ids

    def record(self, package_id: bytes) -> None:
        self._ids.add(package_id)


class TokenPackageRegistry:
    """Imported package ids as private CKO_DATA objects in the programmer's token.

    The record lives with the keys it protects (a restored host cannot forget it) and needs
    the user login to create or delete (PKCS#11 v2.40 §4.5, CKO_DATA; CKA_PRIVATE).
    """

    APPLICATION = "securethread-package-registry"

    def __init__(self, token: Any) -> None:
        self.token = token

    def _label(self, package_id: bytes) -> str:
        return f"securethread-package:{package_id.hex()}"

    def seen(self, package_id: bytes) -> bool:
        from pkcs11 import Attribute, ObjectClass

        template = {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: self._label(package_id)}
        return any(True for _ in self.token.session.get_objects(template))

    def record(self, package_id: bytes) -> None:
        from pkcs11 import Attribute, ObjectClass

        self.token.session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: False,
                Attribute.LABEL: self._label(package_id),
                Attribute.APPLICATION: self.APPLICATION,
                Attribute.VALUE: cbor.encode({"package_id": package_id, "at": int(time.time())}),
            }
        )


def _kek_input(package_id: bytes, recipient: bytes, eph: bytes, sender: bytes) -> bytes:
    # SP 800-56C §4.1 FixedInfo: who it is for, which package, which ephemeral key, from whom.
    return hashlib.sha256(_KEK_LABEL + cbor.encode([package_id, recipient, eph, sender])).digest()


@attrs.frozen(kw_only=True)
class SealedPackage:
    """Body of a sealed package (inside a signed ``sealed-key-package`` envelope)."""

    package_id: bytes = attrs.field(
        validator=lambda _i, _a, v: _check_bytes(v, "package_id", size=ID_SIZE)
    )
    recipient: bytes = attrs.field(
        validator=lambda _i, _a, v: _check_bytes(v, "recipient", size=32)
    )
    sender_certificate: bytes = attrs.field(
        validator=lambda _i, _a, v: _check_bytes(v, "sender_cert", limit=8192)
    )
    ephemeral: bytes = attrs.field(validator=lambda _i, _a, v: _check_bytes(v, "eph", size=65))
    derivation: str
    created: int
    entries: tuple[WrappedEntry, ...]

    def __attrs_post_init__(self) -> None:
        public_from_point(Curve.P256, self.ephemeral)  # InvalidPointError
        if self.derivation != DERIVATION_CKD_NULL_ECB:
            raise FormatError(f"package: unsupported derivation {self.derivation!r}")
        if not isinstance(self.created, int) or isinstance(self.created, bool):
            raise FormatError("package: created must be an integer")

    def to_cbor(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "package_id": self.package_id,
            "recipient": self.recipient,
            "sender_cert": self.sender_certificate,
            "eph": self.ephemeral,
            "derivation": self.derivation,
            "created": self.created,
            "entries": [e.to_cbor() for e in self.entries],
        }

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> SealedPackage:
        keys = {
            "v",
            "package_id",
            "recipient",
            "sender_cert",
            "eph",
            "derivation",
            "created",
            "entries",
        }
        if set(m) != keys or m["v"] != VERSION:
            raise FormatError("package: malformed or unsupported version")
        return cls(
            package_id=m["package_id"],
            recipient=m["recipient"],
            sender_certificate=m["sender_cert"],
            ephemeral=m["eph"],
            derivation=m["derivation"],
            created=m["created"],
            entries=_entries_from(m["entries"], "package"),
        )


def _cert_fp(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def seal_package(
    backend: KeyBackend,
    labels: Sequence[str],
    *,
    identity_key: PrivateKey,
    identity_cert: x509.Certificate,
    recipient_cert: x509.Certificate,
    root_cert: x509.Certificate,
    transferable: bool | Mapping[str, bool] = True,
    at: datetime | None = None,
) -> bytes:
    """Seal the keys ``labels`` to the programmer whose KEY_AGREEMENT certificate is
    ``recipient_cert`` (validated against the OEM root), signed by the OEM identity key."""
    from securethread.pki import EnclavePurpose, validate_enclave_certificate

    validate_enclave_certificate(
        recipient_cert, root_cert, purpose=EnclavePurpose.KEY_AGREEMENT, role=ROLE_PROGRAMMER, at=at
    )
    recipient_pub = recipient_cert.public_key()
    if not isinstance(recipient_pub, ec.EllipticCurvePublicKey):
        raise FormatError("recipient certificate does not hold an EC key")
    package_id = backend.random(ID_SIZE)
    recipient = _cert_fp(recipient_cert)
    # SP 800-56A §6.2.2.2 (One-Pass Diffie-Hellman, C(1e, 1s)): ephemeral key in the token.
    eph = backend.generate_ec(
        "securethread-package-ephemeral", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT
    )
    eph_point = point_of(eph.public_key())
    z = kek = None
    try:
        z = eph.derive_aes(recipient_pub, policy=TEMP_DERIVE)
        kek = z.derive_ecb(
            _kek_input(package_id, recipient, eph_point, _cert_fp(identity_cert)), policy=TEMP_WRAP
        )
        entries = _wrap_entries(backend, kek, labels, transferable)
    finally:
        for k in (kek, z, eph):
            if k is not None:
                k.destroy()
    body = SealedPackage(
        package_id=package_id,
        recipient=recipient,
        sender_certificate=identity_cert.public_bytes(serialization.Encoding.DER),
        ephemeral=eph_point,
        derivation=DERIVATION_CKD_NULL_ECB,
        created=int(time.time()),
        entries=entries,
    )
    return envelope.seal(PACKAGE_KIND, body.to_cbor(), [identity_key])


@attrs.frozen(kw_only=True)
class PackageReceipt:
    """What a sealed package put into the programmer's token."""

    package_id: bytes
    sender: bytes  # SHA-256 of the OEM identity certificate
    keys: tuple[ImportedKey, ...]


def open_package(
    data: bytes,
    *,
    backend: KeyBackend,
    ka_key: PrivateKey,
    ka_cert: x509.Certificate,
    root_cert: x509.Certificate,
    registry: PackageRegistry,
    at: datetime | None = None,
) -> PackageReceipt:
    """Verify a sealed package (signature, OEM chain, recipient, freshness) and import it."""
    from securethread.pki import EnclavePurpose, untrusted, validate_enclave_certificate

    if ka_cert.public_key() != ka_key.public_key():
        raise ConfigurationError("ka_cert does not certify ka_key")
    if not isinstance(data, bytes) or len(data) > MAX_PACKAGE_SIZE:
        raise FormatError(f"sealed package: not bytes or over {MAX_PACKAGE_SIZE} bytes")
    # The signer is named inside the body: read its certificate (unverified), validate it
    # against the pinned root, and only then verify the envelope with its key (S2).
    _kind, claimed, _signers = envelope.peek_body(data)
    sender_der = claimed.get("sender_cert") if isinstance(claimed, dict) else None
    if not isinstance(sender_der, bytes):
        raise FormatError("sealed package: no sender certificate")
    sender_cert = untrusted.load_certificate(sender_der, what="sealed package: sender certificate")
    validate_enclave_certificate(
        sender_cert, root_cert, purpose=EnclavePurpose.IDENTITY, role=ROLE_OEM, at=at
    )
    sender_pub = sender_cert.public_key()
    assert isinstance(sender_pub, ec.EllipticCurvePublicKey)  # EC: checked by the loader
    body = envelope.open_envelope(
        data, kind=PACKAGE_KIND, keys=sender_pub, max_size=MAX_PACKAGE_SIZE
    )
    pkg = SealedPackage.from_cbor(body)
    recipient = _cert_fp(ka_cert)
    if not hmac.compare_digest(pkg.recipient, recipient):
        raise WrongRecipientError("sealed package is addressed to another enclave")
    if registry.seen(pkg.package_id):
        raise ReplayError(f"sealed package {pkg.package_id.hex()} was already imported")
    z = kek = None
    try:
        z = ka_key.derive_aes(public_from_point(Curve.P256, pkg.ephemeral), policy=TEMP_DERIVE)
        kek = z.derive_ecb(
            _kek_input(pkg.package_id, recipient, pkg.ephemeral, _cert_fp(sender_cert)),
            policy=TEMP_WRAP,
        )
        keys = _import_entries(backend, kek, pkg.entries)
    finally:
        for k in (kek, z):
            if k is not None:
                k.destroy()
    try:
        registry.record(pkg.package_id)
    except BaseException:
        for imported in keys:
            backend.destroy(imported.label)
        raise
    return PackageReceipt(package_id=pkg.package_id, sender=_cert_fp(sender_cert), keys=keys)
