"""Key transfer: OEM secrets wrapped into the programmer's token, online or sealed offline.

Online (over a :class:`~securethread.channel.ChannelSession`): the OEM wraps AES keys with
AES-KWP (RFC 5649, CKM_AES_KEY_WRAP_PAD) under the session wrapping key; the message is
AES-CMAC'd (SP 800-38B) with the session transfer-MAC key and carries the session id and a
sequence number.  The programmer authenticates it, unwraps every entry as a *session* object
to compute key check values, and returns an acknowledgement signed with its identity key.
Only when the OEM has verified that acknowledgement does it send a commit (MAC'd, bound to
the ack); the programmer then unwraps the same bytes as persistent keys (all-or-nothing) and
confirms.  A session that ends before the commit leaves the programmer's token unchanged.

Offline (air-gapped): a package sealed to the named programmer's certified KEY_AGREEMENT key
with ECDH-ES (SP 800-56A §6.2.2.2, one-pass: ephemeral OEM key, static programmer key),
signed by the OEM identity key in a securethread envelope.  Imported package ids are
recorded so a package imports once; the programmer returns a signed receipt the OEM checks
with :func:`verify_receipt`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
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
    KeyPolicyError,
    ReplayError,
)
from securethread.formats import cbor, envelope, fields
from securethread.keys.ecutil import point_of, public_from_point
from securethread.keys.policy import (
    EPHEMERAL_AGREEMENT,
    PROGRAMMER_IMAGE_KEY,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_UNWRAP,
    TEMP_WRAP,
    Curve,
    KeyPolicy,
)
from securethread.keys.protocol import WRAPPED_AES256_SIZE, KeyBackend, PrivateKey, SecretKey

VERSION = 2
TRANSFER_TYPE = "key-transfer"
ACK_KIND = "key-transfer-ack"
COMMIT_TYPE = "key-transfer-commit"
COMMITTED_TYPE = "key-transfer-committed"
PACKAGE_KIND = "sealed-key-package"
RECEIPT_KIND = "sealed-key-package-receipt"
MAX_ENTRIES = 256
MAX_LABEL = 128
MAX_KEY_ID = 64
KCV_SIZE = 8
ID_SIZE = 16
MAX_TRANSFER_SIZE = 64 * 1024
MAX_ACK_SIZE = 64 * 1024
MAX_PACKAGE_SIZE = 80 * 1024
MAX_COMMIT_SIZE = 256
MAX_RECEIPT_SIZE = 64 * 1024
_MAC_LABEL = b"securethread-transfer/v1 mac"
_KEK_LABEL = b"securethread-package/v1 kek"
_COMMIT_LABELS = {
    COMMIT_TYPE: b"securethread-transfer/v1 commit",
    COMMITTED_TYPE: b"securethread-transfer/v1 committed",
}
_KCV_BLOCK = bytes(16)
#: Session copies the programmer unwraps to compute key check values before anything is
#: stored: AES-CMAC only, never stored, never extractable.
STAGING = TEMP_CONFIRM
#: What an entry's key does at the OEM (an image key encrypts); not what the programmer's
#: copy may do: that is :data:`PROGRAMMER_IMAGE_KEY` whatever the entry says.


class WrongRecipientError(ChannelError):
    """A transfer or sealed package is addressed to another enclave or session."""


# --- entries ---------------------------------------------------------------------------------


def key_check_value(key: SecretKey) -> bytes:
    """AES-CMAC of a zero block, truncated (the CMAC KCV of ANSI X9.24-1:2017 §7.6.2).

    Computed inside the token: it identifies a key without revealing it.
    """
    return key.cmac(_KCV_BLOCK)[:KCV_SIZE]


@attrs.frozen
class _Label(fields.Rule):
    """A PKCS#11 label: text of 1..MAX_LABEL bytes in UTF-8 (CKA_LABEL is bytes)."""

    def problem(self, value: Any) -> str | None:
        if type(value) is not str or not 0 < len(value.encode()) <= MAX_LABEL:
            return f"must be 1..{MAX_LABEL} bytes of text"
        return None


@fields.body("transfer entry")
@attrs.frozen(kw_only=True)
class WrappedEntry:
    """One wrapped AES-256 key, with the label, id and policy it gets on the programmer."""

    label: str = fields.custom("label", _Label())
    key_id: bytes = fields.byte_string("key_id", max_len=MAX_KEY_ID)
    usage: str = fields.constant("usage", "encrypt")  # the only usage transferred
    transferable: bool = fields.boolean("transferable")
    wrapped: bytes = fields.byte_string("wrapped", size=WRAPPED_AES256_SIZE)
    kcv: bytes = fields.byte_string("kcv", size=KCV_SIZE)

    @property
    def policy(self) -> KeyPolicy:
        """The programmer's policy for the key: PROGRAMMER_IMAGE_KEY, no usage at all (all
        the programmer does with it is wrap it into licenses); persistent, sensitive, and
        extractable -- to a wrapping key only -- if the OEM marked it transferable."""
        return attrs.evolve(PROGRAMMER_IMAGE_KEY, transferable=self.transferable)

    def to_cbor(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_cbor(cls, m: object) -> WrappedEntry:
        return fields.decode(cls, m)


def _entries(key: str) -> Any:
    """1..MAX_ENTRIES wrapped entries (the labels checked distinct by :func:`_distinct`)."""
    return fields.list_of(key, fields.body_rule(WrappedEntry), min_len=1, max_len=MAX_ENTRIES)


def _distinct(entries: Sequence[WrappedEntry], what: str) -> None:
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise FormatError(f"{what}: a label appears twice")


@fields.body("acknowledgement entry")
@attrs.frozen(kw_only=True)
class ImportedKey:
    """What the programmer reports for each imported key (never the key)."""

    label: str = fields.custom("label", _Label())
    key_id: bytes = fields.byte_string("key_id", max_len=MAX_KEY_ID)
    kcv: bytes = fields.byte_string("kcv", size=KCV_SIZE)
    transferable: bool = fields.boolean("transferable")  # exactly true or false

    def to_cbor(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_cbor(cls, m: object) -> ImportedKey:
        return fields.decode(cls, m)

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


def _check_free(
    backend: KeyBackend, entries: Sequence[WrappedEntry], present: frozenset[str] = frozenset()
) -> None:
    for e in entries:
        if e.label not in present and backend.has_key(e.label):
            raise DuplicateObjectError(f"{backend.name!r} already has a key {e.label!r}")


def _already_imported(
    backend: KeyBackend, rewrap: SecretKey, entries: Sequence[WrappedEntry]
) -> frozenset[str]:
    """The labels of ``entries`` whose key the token already holds: the very same key, as
    an earlier import of the same package stored it (a run killed after it stored the keys,
    before it recorded the package).

    The programmer's copy has no usage (:data:`PROGRAMMER_IMAGE_KEY`), so the token cannot
    compute its key check value; instead it is wrapped again under ``rewrap``, a wrapping copy
    of the package's own KEK: AES-KWP is deterministic (RFC 5649 §4.1, fixed AIV), so the same
    40 bytes as the entry's mean the same key under the same KEK.  A key with the label and
    another value, another id, another policy, or one that cannot be wrapped (not
    transferable) cannot be told from someone else's: :class:`DuplicateObjectError`.
    """
    present = set()
    for e in entries:
        if not backend.has_key(e.label):
            continue
        key = backend.secret_key(e.label)
        try:
            same = hmac.compare_digest(key.key_id, e.key_id) and hmac.compare_digest(
                rewrap.wrap(key), e.wrapped
            )
            key.policy_report().check(transferable=e.transferable)  # S1, as the import sets it
        except KeyPolicyError:
            same = False
        if not same:
            raise DuplicateObjectError(f"{backend.name!r} already has a key {e.label!r}")
        present.add(e.label)
    return frozenset(present)


def _destroy_quietly(keys: Sequence[SecretKey]) -> None:
    for k in keys:
        try:
            k.destroy()
        except Exception:  # noqa: BLE001,S110 - best effort cleanup of session objects
            pass


def _stage_entries(
    backend: KeyBackend,
    kek: SecretKey,
    entries: Sequence[WrappedEntry],
    present: frozenset[str] = frozenset(),
) -> list[SecretKey]:
    """Unwrap every entry as a *session* object and check its key check value.

    Nothing persistent is created: the copies prove that the wrapped bytes open under
    ``kek`` (RFC 5649 §3 integrity check) to the key the OEM meant (KCV), and the caller
    destroys them.  The persistent keys come later from the same bytes (:func:`_commit_entries`).
    Labels in ``present`` hold these very keys already (:func:`_already_imported`).
    """
    _check_free(backend, entries, present)
    staged: list[SecretKey] = []
    try:
        for e in entries:
            copy = kek.unwrap(e.wrapped, label="", key_id=b"", policy=STAGING)
            staged.append(copy)
            if not hmac.compare_digest(key_check_value(copy), e.kcv):
                raise ConfirmationError(f"key {e.label!r}: key check value does not match")
    except BaseException:
        _destroy_quietly(staged)
        raise
    return staged


def _commit_entries(
    backend: KeyBackend,
    kek: SecretKey,
    entries: Sequence[WrappedEntry],
    present: frozenset[str] = frozenset(),
) -> tuple[ImportedKey, ...]:
    """Unwrap every entry into the token as a persistent key, or none: on any failure the
    ones already stored go.  Labels in ``present`` hold these very keys already
    (:func:`_already_imported`): kept, not stored again."""
    _check_free(backend, entries, present)
    done: list[str] = []
    try:
        for e in entries:
            if e.label in present:
                continue
            key = kek.unwrap(e.wrapped, label=e.label, key_id=e.key_id, policy=e.policy)
            done.append(e.label)
            key.policy_report().check(transferable=e.transferable)  # S1
    except BaseException:
        for label in done:
            backend.destroy(label)
        raise
    return tuple(ImportedKey.of(e) for e in entries)


# --- online transfer over a channel session --------------------------------------------------


_SID_SIZE = 16  # the channel's session id (handshake.SESSION_ID_SIZE)
_MAC_SIZE = 16  # AES-CMAC, SP 800-38B §6.2
_DIGEST_SIZE = 32  # SHA-256
_SEQUENCE_MAX = (1 << 32) - 1


@fields.body("transfer body")
@attrs.frozen(kw_only=True)
class TransferMessage:
    """Body of a transfer: bound to the session id, ordered by ``sequence``."""

    session_id: bytes = fields.byte_string("sid", size=_SID_SIZE)
    sequence: int = fields.integer("seq", hi=_SEQUENCE_MAX)
    transfer_id: bytes = fields.byte_string("transfer_id", size=ID_SIZE)
    entries: tuple[WrappedEntry, ...] = _entries("entries")

    def __attrs_post_init__(self) -> None:
        _distinct(self.entries, "transfer")

    def body_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_body(cls, body: bytes) -> TransferMessage:
        m = cbor.decode(body, what="transfer body", max_size=MAX_TRANSFER_SIZE)
        return fields.decode(cls, m)


@fields.body("key transfer")
@attrs.frozen(kw_only=True)
class TransferFrame:
    """The outer key-transfer message: the body's bytes and their MAC under the session.
    Nothing in it is acted on before the MAC verifies, except refusing a session id that
    is not ours (S2)."""

    message: str = fields.constant("type", TRANSFER_TYPE)
    session_id: bytes = fields.byte_string("sid", size=_SID_SIZE)
    body: bytes = fields.byte_string("body", max_len=MAX_TRANSFER_SIZE)
    mac: bytes = fields.byte_string("mac", size=_MAC_SIZE)
    version: int = fields.version(VERSION)

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferFrame:
        m = cbor.decode(data, what="key transfer", max_size=MAX_TRANSFER_SIZE)
        return fields.decode(cls, m)


def _mac_input(body: bytes) -> bytes:
    return _MAC_LABEL + body


@fields.body("acknowledgement")
@attrs.frozen(kw_only=True)
class Acknowledgement:
    """Body of the programmer's signed acknowledgement (envelope ``key-transfer-ack``): the
    transfer it checked, the SHA-256 of that message, and what each key will be."""

    session_id: bytes = fields.byte_string("sid", size=_SID_SIZE)
    sequence: int = fields.integer("seq", hi=_SEQUENCE_MAX)
    transfer_id: bytes = fields.byte_string("transfer_id", size=ID_SIZE)
    digest: bytes = fields.byte_string("digest", size=_DIGEST_SIZE)
    keys: tuple[ImportedKey, ...] = fields.list_of(
        "keys", fields.body_rule(ImportedKey), min_len=1, max_len=MAX_ENTRIES
    )
    version: int = fields.version(VERSION)


def _commit_mac_input(label: bytes, sid: bytes, transfer_id: bytes, ack_digest: bytes) -> bytes:
    # Own labels for the OEM's commit and the programmer's reply: neither can be reflected
    # as the other, nor as a transfer MAC ("... v1 mac").
    return label + cbor.encode([sid, transfer_id, ack_digest])


@fields.body("key transfer commit")
@attrs.frozen(kw_only=True)
class CommitMessage:
    """The OEM's commit (``key-transfer-commit``) or the programmer's confirmation
    (``key-transfer-committed``): bound to the session, the transfer and the SHA-256 of
    the signed acknowledgement, MAC'd under the session with a label of its own type."""

    message: str = fields.text("type", max_len=32, pattern=f"{COMMIT_TYPE}|{COMMITTED_TYPE}")
    session_id: bytes = fields.byte_string("sid", size=_SID_SIZE)
    transfer_id: bytes = fields.byte_string("transfer_id", size=ID_SIZE)
    ack: bytes = fields.byte_string("ack", size=_DIGEST_SIZE)
    mac: bytes = fields.byte_string("mac", size=_MAC_SIZE)
    version: int = fields.version(VERSION)

    def mac_input(self) -> bytes:
        return _commit_mac_input(
            _COMMIT_LABELS[self.message], self.session_id, self.transfer_id, self.ack
        )


def _commit_message(type_: str, session: ChannelSession, transfer_id: bytes, ack: bytes) -> bytes:
    unsigned = CommitMessage(
        message=type_, session_id=session.session_id, transfer_id=transfer_id, ack=ack,
        mac=bytes(_MAC_SIZE),
    )  # fmt: skip
    signed = attrs.evolve(unsigned, mac=session.mac_key.cmac(unsigned.mac_input()))
    return cbor.encode(fields.encode(signed))


def _verify_commit_message(
    data: bytes, type_: str, session: ChannelSession, transfer_id: bytes, ack: bytes
) -> None:
    """Check a commit (or committed) message: session, transfer, ack digest and MAC."""
    m = fields.decode(CommitMessage, cbor.decode(data, what=type_, max_size=MAX_COMMIT_SIZE))
    if m.message != type_:
        raise FormatError(f"expected a {type_!r} message, got {m.message!r}")
    if not hmac.compare_digest(m.session_id, session.session_id):
        raise ReplayError(f"{type_} belongs to another session")
    if not hmac.compare_digest(m.mac, session.mac_key.cmac(m.mac_input())):
        raise ChannelError(f"{type_}: MAC does not verify under this session")
    if not hmac.compare_digest(m.transfer_id, transfer_id) or not hmac.compare_digest(m.ack, ack):
        raise ConfirmationError(f"{type_} is for another transfer or acknowledgement")


@attrs.frozen(kw_only=True)
class TransferRecord:
    """The OEM's audit record: what the programmer acknowledged, under which session.

    ``committed`` is True once the programmer confirmed it stored the keys
    (:meth:`KeySender.verify_committed`); before that nothing is stored on its side.
    """

    session_id: bytes
    transfer_id: bytes
    sequence: int
    programmer: bytes  # SHA-256 of the programmer identity certificate
    keys: tuple[ImportedKey, ...]
    transfer_digest: bytes  # SHA-256 of the key-transfer message
    ack: bytes  # the signed acknowledgement, verifiable offline with the programmer's cert
    committed: bool = False


class KeySender:
    """OEM side: wrap keys for the peer, check its acknowledgement, then commit.

    ``send`` → (programmer ``receive``) → ``verify_ack`` → ``commit`` → (programmer
    ``commit``) → ``verify_committed``.  The programmer stores nothing before the commit,
    and the OEM sends the commit only for an acknowledgement that verified.
    """

    def __init__(self, session: ChannelSession) -> None:
        if session.role != ROLE_OEM:
            raise ConfigurationError("only the OEM side of a session sends keys")
        self.session = session
        self._pending: dict[bytes, tuple[bytes, TransferMessage]] = {}
        self._acknowledged: dict[bytes, TransferRecord] = {}
        self._committing: dict[bytes, TransferRecord] = {}

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
        data = TransferFrame(
            session_id=s.session_id, body=body, mac=s.mac_key.cmac(_mac_input(body))
        ).to_bytes()
        if len(data) > MAX_TRANSFER_SIZE:
            raise ValueError("too many keys for one transfer message")
        s.next_send_sequence += 1
        self._pending[msg.transfer_id] = (hashlib.sha256(data).digest(), msg)
        return data

    def verify_ack(self, data: bytes) -> TransferRecord:
        """Check the programmer's signed acknowledgement against what was sent."""
        s = self.session
        ack = fields.decode(
            Acknowledgement,
            envelope.open_envelope(
                data, kind=ACK_KIND, keys=s.peer_public_key, max_size=MAX_ACK_SIZE
            ),
        )
        if not hmac.compare_digest(ack.session_id, s.session_id):
            raise WrongRecipientError("acknowledgement belongs to another session")
        pending = self._pending.get(ack.transfer_id)
        if pending is None:
            raise ReplayError("acknowledgement for an unknown or already acknowledged transfer")
        digest, msg = pending
        if not hmac.compare_digest(ack.digest, digest):
            raise ConfirmationError("acknowledgement is for a different transfer message")
        got = ack.keys
        if got != tuple(ImportedKey.of(e) for e in msg.entries) or ack.sequence != msg.sequence:
            raise ConfirmationError("acknowledged keys differ from the keys sent")
        del self._pending[msg.transfer_id]
        record = TransferRecord(
            session_id=s.session_id,
            transfer_id=msg.transfer_id,
            sequence=msg.sequence,
            programmer=s.peer_fingerprint,
            keys=got,
            transfer_digest=digest,
            ack=data,
        )
        self._acknowledged[msg.transfer_id] = record
        return record

    def commit(self, record: TransferRecord) -> bytes:
        """The commit message for an acknowledged transfer: the programmer may now store
        its keys.  MAC'd under the session (only this OEM can send it), bound to the ack."""
        self.session.require_open()
        if self._acknowledged.get(record.transfer_id) != record:
            raise ChannelError("commit: the transfer was not acknowledged in this session")
        del self._acknowledged[record.transfer_id]
        self._committing[record.transfer_id] = record
        return _commit_message(
            COMMIT_TYPE, self.session, record.transfer_id, hashlib.sha256(record.ack).digest()
        )

    def verify_committed(self, data: bytes) -> TransferRecord:
        """Check the programmer's confirmation that it stored the keys; the final record."""
        m = cbor.decode(data, what=COMMITTED_TYPE, max_size=MAX_COMMIT_SIZE)
        tid = m.get("transfer_id") if isinstance(m, dict) else None
        record = self._committing.get(tid) if isinstance(tid, bytes) else None
        if record is None:
            raise ReplayError("confirmation for a transfer that awaits no commit")
        _verify_commit_message(
            data,
            COMMITTED_TYPE,
            self.session,
            record.transfer_id,
            hashlib.sha256(record.ack).digest(),
        )
        del self._committing[record.transfer_id]
        return attrs.evolve(record, committed=True)


@attrs.frozen
class _Staged:
    message: TransferMessage
    ack_digest: bytes
    copies: list[SecretKey]


class KeyReceiver:
    """Programmer side: authenticate a transfer, check it in session objects, sign an ack;
    store the keys only when the OEM commits.

    ``receive`` leaves nothing persistent in the token: each key is unwrapped as a session
    object to compute its key check value.  ``commit`` (after the OEM verified the ack)
    unwraps the same bytes, under the same live session key, as persistent keys,
    all-or-nothing, and destroys the session copies.  ``abort`` (or a dropped connection
    before the commit) leaves the token as it was.
    """

    def __init__(self, session: ChannelSession) -> None:
        if session.role != ROLE_PROGRAMMER:
            raise ConfigurationError("only the programmer side of a session receives keys")
        self.session = session
        self.imported: list[ImportedKey] = []
        self._staged: _Staged | None = None

    @property
    def staged(self) -> bool:
        """True while a transfer is acknowledged but not committed."""
        return self._staged is not None

    def receive(self, data: bytes) -> bytes:
        """Check one transfer message in session objects; return the signed acknowledgement."""
        s = self.session
        s.require_open()
        if self._staged is not None:
            raise ChannelError("key transfer: the previous transfer awaits its commit")
        frame = TransferFrame.from_bytes(data)
        if not hmac.compare_digest(frame.session_id, s.session_id):
            raise ReplayError("key transfer belongs to another (older) session")
        # S2: authenticate before parsing the body (CMAC in the token, constant-time compare).
        if not hmac.compare_digest(frame.mac, s.mac_key.cmac(_mac_input(frame.body))):
            raise ChannelError("key transfer: MAC does not verify under this session")
        msg = TransferMessage.from_body(frame.body)
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
        copies = _stage_entries(s.backend, s.wrap_key, msg.entries)
        try:
            body = Acknowledgement(
                session_id=s.session_id,
                sequence=msg.sequence,
                transfer_id=msg.transfer_id,
                digest=hashlib.sha256(data).digest(),
                keys=tuple(ImportedKey.of(e) for e in msg.entries),
            )
            ack = envelope.seal(ACK_KIND, fields.encode(body), [s.identity_key])
        except BaseException:
            _destroy_quietly(copies)
            raise
        self._staged = _Staged(message=msg, ack_digest=hashlib.sha256(ack).digest(), copies=copies)
        return ack

    def commit(self, data: bytes) -> bytes:
        """On the OEM's commit, store the acknowledged keys; return the confirmation.

        Any failure (a bad commit, a label taken meanwhile) stores nothing and ends the
        staged transfer; the session copies are destroyed either way.
        """
        s = self.session
        s.require_open()
        staged = self._staged
        if staged is None:
            raise ChannelError("commit: no acknowledged transfer awaits a commit")
        self._staged = None
        try:
            tid = staged.message.transfer_id
            _verify_commit_message(data, COMMIT_TYPE, s, tid, staged.ack_digest)
            # The reply first: once the keys are stored, nothing may fail any more.
            reply = _commit_message(COMMITTED_TYPE, s, tid, staged.ack_digest)
            keys = _commit_entries(s.backend, s.wrap_key, staged.message.entries)
        finally:
            _destroy_quietly(staged.copies)
        self.imported.extend(keys)
        return reply

    def abort(self) -> None:
        """Drop an acknowledged but uncommitted transfer: nothing was stored."""
        staged, self._staged = self._staged, None
        if staged is not None:
            _destroy_quietly(staged.copies)


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
                Attribute.COPYABLE: False,
                Attribute.LABEL: self._label(package_id),
                Attribute.APPLICATION: self.APPLICATION,
                Attribute.VALUE: cbor.encode({"package_id": package_id, "at": int(time.time())}),
            }
        )


def _kek_input(
    package_id: bytes, recipient: bytes, eph: bytes, sender: bytes, programmer: bytes
) -> bytes:
    # SP 800-56C §4.1 FixedInfo: which package, for which key-agreement key and which
    # programmer identity, which ephemeral key, from whom.
    fixed = cbor.encode([package_id, recipient, eph, sender, programmer])
    return hashlib.sha256(_KEK_LABEL + fixed).digest()


@fields.body("package")
@attrs.frozen(kw_only=True)
class SealedPackage:
    """Body of a sealed package (inside a signed ``sealed-key-package`` envelope)."""

    package_id: bytes = fields.byte_string("package_id", size=ID_SIZE)
    recipient: bytes = fields.byte_string("recipient", size=_DIGEST_SIZE)  # the KA cert's SHA-256
    programmer: bytes = fields.byte_string("programmer", size=_DIGEST_SIZE)  # identity cert's
    sender_certificate: bytes = fields.byte_string("sender_cert", max_len=8192)
    ephemeral: bytes = fields.byte_string("eph", size=65)  # uncompressed P-256 point
    derivation: str = fields.text("derivation", min_len=0, max_len=64)
    created: int = fields.integer("created", lo=-(1 << 64))  # unix time
    entries: tuple[WrappedEntry, ...] = _entries("entries")
    version: int = fields.version(VERSION)

    def __attrs_post_init__(self) -> None:
        public_from_point(Curve.P256, self.ephemeral)  # InvalidPointError
        if self.derivation != DERIVATION_CKD_NULL_ECB:
            raise FormatError(f"package: unsupported derivation {self.derivation!r}")
        _distinct(self.entries, "package")

    def to_cbor(self) -> dict[str, Any]:
        return fields.encode(self)

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> SealedPackage:
        return fields.decode(cls, m)


def _cert_fp(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def seal_package(
    backend: KeyBackend,
    labels: Sequence[str],
    *,
    identity_key: PrivateKey,
    identity_cert: x509.Certificate,
    expected_programmer: x509.Certificate,
    recipient_cert: x509.Certificate,
    root_cert: x509.Certificate,
    transferable: bool | Mapping[str, bool] = True,
    at: datetime | None = None,
) -> bytes:
    """Seal the keys ``labels`` to the named programmer, signed by the OEM identity key.

    ``expected_programmer`` is the programmer's IDENTITY certificate (it signs the receipt);
    ``recipient_cert`` its KEY_AGREEMENT certificate, which must be certified by the same
    root for the same enclave (subject).  Both fingerprints are in the package and in the
    KEK derivation, so only that programmer can open it.
    """
    from securethread.pki import EnclavePurpose, validate_enclave_certificate

    validate_enclave_certificate(
        expected_programmer, root_cert, purpose=EnclavePurpose.IDENTITY, role=ROLE_PROGRAMMER, at=at
    )
    validate_enclave_certificate(
        recipient_cert, root_cert, purpose=EnclavePurpose.KEY_AGREEMENT, role=ROLE_PROGRAMMER, at=at
    )
    if recipient_cert.subject != expected_programmer.subject:
        raise WrongRecipientError(
            f"key-agreement certificate of {recipient_cert.subject.rfc4514_string()!r} does not "
            f"belong to the named programmer {expected_programmer.subject.rfc4514_string()!r}"
        )
    recipient_pub = recipient_cert.public_key()
    if not isinstance(recipient_pub, ec.EllipticCurvePublicKey):
        raise FormatError("recipient certificate does not hold an EC key")
    package_id = backend.random(ID_SIZE)
    recipient, programmer = _cert_fp(recipient_cert), _cert_fp(expected_programmer)
    # SP 800-56A §6.2.2.2 (One-Pass Diffie-Hellman, C(1e, 1s)): ephemeral key in the token.
    eph = backend.generate_ec(
        "securethread-package-ephemeral", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT
    )
    eph_point = point_of(eph.public_key())
    z = kek = None
    try:
        z = eph.derive_aes(recipient_pub, policy=TEMP_DERIVE)
        kek = z.derive_ecb(
            _kek_input(package_id, recipient, eph_point, _cert_fp(identity_cert), programmer),
            policy=TEMP_WRAP,
        )
        entries = _wrap_entries(backend, kek, labels, transferable)
    finally:
        for k in (kek, z, eph):
            if k is not None:
                k.destroy()
    body = SealedPackage(
        package_id=package_id,
        recipient=recipient,
        programmer=programmer,
        sender_certificate=identity_cert.public_bytes(serialization.Encoding.DER),
        ephemeral=eph_point,
        derivation=DERIVATION_CKD_NULL_ECB,
        created=int(time.time()),
        entries=entries,
    )
    return envelope.seal(PACKAGE_KIND, body.to_cbor(), [identity_key])


def _read_package(
    data: bytes, root_cert: x509.Certificate, at: datetime | None
) -> tuple[SealedPackage, x509.Certificate]:
    """Authenticate a sealed package: sender chain to the root (role oem), then signature."""
    from securethread.pki import EnclavePurpose, untrusted, validate_enclave_certificate

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
    return SealedPackage.from_cbor(body), sender_cert


@fields.body("package receipt")
@attrs.frozen(kw_only=True)
class ReceiptBody:
    """Body of a receipt (envelope ``sealed-key-package-receipt``)."""

    package_id: bytes = fields.byte_string("package_id", size=ID_SIZE)
    package_digest: bytes = fields.byte_string("package", size=_DIGEST_SIZE)  # the file's
    sender: bytes = fields.byte_string("sender", size=_DIGEST_SIZE)  # OEM identity cert's
    programmer: bytes = fields.byte_string("programmer", size=_DIGEST_SIZE)  # identity cert's
    recipient: bytes = fields.byte_string("recipient", size=_DIGEST_SIZE)  # its KA cert's
    opened: int = fields.integer("opened", lo=-(1 << 64))  # unix time
    keys: tuple[ImportedKey, ...] = fields.list_of(
        "keys", fields.body_rule(ImportedKey), min_len=1, max_len=MAX_ENTRIES
    )
    version: int = fields.version(VERSION)


@attrs.frozen(kw_only=True)
class PackageReceipt(ReceiptBody):
    """The programmer's signed statement of what a sealed package put into its token.

    ``signed`` is the artefact (envelope ``sealed-key-package-receipt``, signed by the
    programmer's identity key) the OEM checks offline with :func:`verify_receipt`.
    """

    signed: bytes = b""

    def body(self) -> dict[str, Any]:
        return fields.encode(self)  # the ReceiptBody fields: ``signed`` is not in the body

    @classmethod
    def from_body(cls, m: Mapping[str, Any], signed: bytes) -> PackageReceipt:
        body = fields.decode(ReceiptBody, m)
        return cls(**attrs.asdict(body, recurse=False), signed=signed)


def open_package(
    data: bytes,
    *,
    backend: KeyBackend,
    ka_key: PrivateKey,
    ka_cert: x509.Certificate,
    identity_key: PrivateKey,
    identity_cert: x509.Certificate,
    root_cert: x509.Certificate,
    registry: PackageRegistry,
    at: datetime | None = None,
    answer: Callable[[PackageReceipt], None] | None = None,
) -> PackageReceipt:
    """Verify a sealed package (signature, OEM chain, recipient, freshness), import it and
    return the receipt signed with ``identity_key``.

    Refused with :class:`WrongRecipientError` if it names another programmer identity or
    key-agreement key; nothing is stored unless every key checks out.  ``answer`` gets the
    receipt once the keys are stored and before the package is recorded as imported: a
    caller keeps its result there, so that a run stopped at any instant either recorded
    nothing, or left keys a new run recognises as this package's own (the same label and
    value: kept, not refused), or left its answer.  A failure after the keys are stored
    leaves them for that new run.
    """
    if ka_cert.public_key() != ka_key.public_key():
        raise ConfigurationError("ka_cert does not certify ka_key")
    if identity_cert.public_key() != identity_key.public_key():
        raise ConfigurationError("identity_cert does not certify identity_key")
    pkg, sender_cert = _read_package(data, root_cert, at)
    recipient, programmer = _cert_fp(ka_cert), _cert_fp(identity_cert)
    if not hmac.compare_digest(pkg.programmer, programmer):
        raise WrongRecipientError("sealed package is addressed to another programmer")
    if not hmac.compare_digest(pkg.recipient, recipient):
        raise WrongRecipientError("sealed package is addressed to another enclave")
    if registry.seen(pkg.package_id):
        raise ReplayError(f"sealed package {pkg.package_id.hex()} was already imported")
    receipt = PackageReceipt(
        package_id=pkg.package_id,
        package_digest=hashlib.sha256(data).digest(),
        sender=_cert_fp(sender_cert),
        programmer=programmer,
        recipient=recipient,
        opened=int(time.time()),
        keys=tuple(ImportedKey.of(e) for e in pkg.entries),
    )
    z = kek = None
    try:
        z = ka_key.derive_aes(public_from_point(Curve.P256, pkg.ephemeral), policy=TEMP_DERIVE)
        kek_input = _kek_input(pkg.package_id, recipient, pkg.ephemeral, receipt.sender, programmer)
        kek = z.derive_ecb(kek_input, policy=TEMP_UNWRAP)
        # Checked in session objects first (key check values), then stored all-or-nothing;
        # keys an earlier run of this package stored are recognised, not stored again.
        present = _earlier_keys(backend, z, kek_input, pkg.entries)
        _destroy_quietly(_stage_entries(backend, kek, pkg.entries, present))
        signed = envelope.seal(RECEIPT_KIND, receipt.body(), [identity_key])
        _commit_entries(backend, kek, pkg.entries, present)
    finally:
        for k in (kek, z):
            if k is not None:
                k.destroy()
    receipt = attrs.evolve(receipt, signed=signed)
    if answer is not None:
        answer(receipt)
    registry.record(pkg.package_id)  # last: from now on the package is refused as a replay
    return receipt


def _earlier_keys(
    backend: KeyBackend, z: SecretKey, kek_input: bytes, entries: Sequence[WrappedEntry]
) -> frozenset[str]:
    """:func:`_already_imported` with a wrapping copy of the package KEK (derived from ``z``
    like the unwrapping one, SP 800-56C), made only if a label is taken."""
    if not any(backend.has_key(e.label) for e in entries):
        return frozenset()
    rewrap = z.derive_ecb(kek_input, policy=TEMP_WRAP)
    try:
        return _already_imported(backend, rewrap, entries)
    finally:
        rewrap.destroy()


def verify_receipt(
    data: bytes,
    *,
    package: bytes,
    programmer_cert: x509.Certificate,
    root_cert: x509.Certificate,
    at: datetime | None = None,
) -> PackageReceipt:
    """OEM side, offline: check that the programmer named by ``programmer_cert`` (its
    IDENTITY certificate) signed a receipt for exactly this sealed ``package`` and the keys
    in it.  Raises; returns the verified receipt."""
    from securethread.pki import EnclavePurpose, validate_enclave_certificate

    validate_enclave_certificate(
        programmer_cert, root_cert, purpose=EnclavePurpose.IDENTITY, role=ROLE_PROGRAMMER, at=at
    )
    key = programmer_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # IDENTITY profile: EC P-384
    body = envelope.open_envelope(data, kind=RECEIPT_KIND, keys=key, max_size=MAX_RECEIPT_SIZE)
    receipt = PackageReceipt.from_body(body, data)
    pkg, sender_cert = _read_package(package, root_cert, at)
    if not hmac.compare_digest(receipt.package_digest, hashlib.sha256(package).digest()):
        raise ConfirmationError("receipt is for another sealed package")
    if receipt.package_id != pkg.package_id or receipt.sender != _cert_fp(sender_cert):
        raise ConfirmationError("receipt names another package id or sender")
    programmer = _cert_fp(programmer_cert)
    if receipt.programmer != programmer or pkg.programmer != programmer:
        raise WrongRecipientError("receipt or package names another programmer")
    if receipt.recipient != pkg.recipient:
        raise ConfirmationError("receipt names another key-agreement certificate")
    if receipt.keys != tuple(ImportedKey.of(e) for e in pkg.entries):
        raise ConfirmationError("receipted keys differ from the keys in the package")
    return receipt
