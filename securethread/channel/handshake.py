"""The secure channel: a mutually authenticated ECDH handshake between two enclaves.

Four messages, each canonical CBOR (docs/channel.md has the full format)::

    OEM                                            programmer
    Hello(oem: nonce, ephemeral, cert, derivation)  --->
                    <---  Hello(programmer: nonce, ephemeral, cert, derivation, peer_nonce)
    Finish(oem: session_id, sig, confirm)           --->
                    <---  Finish(programmer: session_id, sig, confirm)

Ephemeral P-256 keys are generated inside each token (EPHEMERAL_AGREEMENT), Z comes from
CKM_ECDH1_DERIVE inside the token (NIST SP 800-56A §5.7.1.2, ECC CDH), and the session keys
are derived from Z inside the token with CKM_AES_ECB_ENCRYPT_DATA over
SHA-256(label || transcript hash), so every key is bound to this handshake (SP 800-56C §4,
"FixedInfo" carried in the transcript).  Each side signs the transcript hash with its
identity key and proves possession of the keys with AES-CMAC (SP 800-38B) in the token
(key confirmation, SP 800-56A §5.9).  The OEM names the programmer it means to reach and
refuses any other before a key is derived.  The classes are state machines that take bytes
and return bytes; :mod:`securethread.channel.transport` carries them over TCP.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    ChannelError,
    ConfigurationError,
    ConfirmationError,
    FormatError,
    ReplayError,
)
from securethread.formats import cbor, fields
from securethread.keys.ecutil import public_from_point, verify_signature
from securethread.keys.policy import (
    EPHEMERAL_AGREEMENT,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_UNWRAP,
    TEMP_WRAP,
    Curve,
)
from securethread.keys.protocol import KeyBackend, PrivateKey, SecretKey

PROTOCOL = "securethread-channel"
VERSION = 2
ROLE_OEM = "oem"
ROLE_PROGRAMMER = "programmer"
ROLES = (ROLE_OEM, ROLE_PROGRAMMER)

#: CKM_ECDH1_DERIVE with CKD_NULL into an AES-256 key, then CKM_AES_ECB_ENCRYPT_DATA.
#: The only derivation SoftHSM 2.6.1 offers (docs/channel.md, "Key derivation"); recorded in
#: the transcript.
DERIVATION_CKD_NULL_ECB = "ckd-null+aes-ecb-encrypt-data"
SUPPORTED_DERIVATIONS = (DERIVATION_CKD_NULL_ECB,)

NONCE_SIZE = 32
SESSION_ID_SIZE = 16
CONFIRM_SIZE = 16  # AES-CMAC output, SP 800-38B §6.2
P256_POINT_SIZE = 65  # uncompressed SEC1 point, X9.62 §4.3.6
MAX_CERT_SIZE = 8 * 1024
MAX_SIGNATURE_SIZE = 160  # DER ECDSA P-384 is at most 104 bytes
MAX_HELLO_SIZE = 12 * 1024
MAX_FINISH_SIZE = 512

_KEY_LABELS = {
    "wrap": b"securethread-channel/v1 key wrap",
    "confirm": b"securethread-channel/v1 key confirm",
    "mac": b"securethread-channel/v1 key transfer-mac",
}
_CONFIRM_LABELS = {
    ROLE_OEM: b"securethread-channel/v1 confirm oem",
    ROLE_PROGRAMMER: b"securethread-channel/v1 confirm programmer",
}
_SIG_CONTEXT = "securethread-channel/v1 finish"
_SESSION_ID_LABEL = b"securethread-channel/v1 session-id"
_EPHEMERAL_LABEL = "securethread-channel-ephemeral"


class ChannelStateError(ChannelError):
    """A method was called, or a message arrived, out of order (or after a failure)."""


class ReflectionError(ReplayError):
    """A peer sent back our own message, nonce, ephemeral key or certificate."""


class WrongPeerError(ChannelError):
    """The peer is certified, but it is not the enclave this side named (no key moved)."""


FINGERPRINT_SIZE = 32  # SHA-256 of the DER certificate


def peer_fingerprint(peer: bytes | x509.Certificate) -> bytes:
    """The SHA-256 fingerprint that names a peer: given as is, or of its DER certificate."""
    if isinstance(peer, x509.Certificate):
        return hashlib.sha256(peer.public_bytes(serialization.Encoding.DER)).digest()
    if isinstance(peer, bytes) and len(peer) == FINGERPRINT_SIZE:
        return peer
    raise ConfigurationError(
        "a peer is named by its identity certificate or its 32-byte SHA-256 fingerprint"
    )


def _other(role: str) -> str:
    return ROLE_PROGRAMMER if role == ROLE_OEM else ROLE_OEM


# --- value objects --------------------------------------------------------------------------


@attrs.frozen
class _Role(fields.Rule):
    """The sender's role: on the wire the message ``type``, ``"<role>-<suffix>"``."""

    suffix: str

    def problem(self, value: Any) -> str | None:
        return None if value in ROLES else f"names an unknown role {value!r}"

    def to_cbor(self, value: Any) -> Any:
        return f"{value}-{self.suffix}"

    def from_cbor(self, raw: Any) -> Any:
        tail = f"-{self.suffix}"
        return raw[: -len(tail)] if type(raw) is str and raw.endswith(tail) else raw


def _check_point(point: bytes) -> None:
    public_from_point(Curve.P256, point)  # InvalidPointError if not on P-256 (SP 800-56A §5.6.2.3)


@fields.body("hello")
@attrs.frozen(kw_only=True)
class Hello:
    """First message of each side: who I am, a fresh nonce and an ephemeral P-256 key."""

    role: str = fields.custom("type", _Role("hello"))
    nonce: bytes = fields.byte_string("nonce", size=NONCE_SIZE)
    ephemeral: bytes = fields.byte_string("eph", size=P256_POINT_SIZE)  # uncompressed SEC1
    certificate: bytes = fields.byte_string("cert", min_len=1, max_len=MAX_CERT_SIZE)
    derivation: str = fields.text("derivation", min_len=0, max_len=64)
    #: The programmer echoes the OEM's nonce, so a Hello from an older session is refused
    #: at once; ``None`` in the OEM's Hello (the key left out).
    peer_nonce: bytes | None = fields.byte_string(
        "peer_nonce", size=NONCE_SIZE, absent=fields.Absent.OMIT
    )
    version: int = fields.version(VERSION)

    def __attrs_post_init__(self) -> None:
        _check_point(self.ephemeral)
        if self.role == ROLE_OEM and self.peer_nonce is not None:
            raise FormatError("oem hello: carries a peer nonce")
        if self.role == ROLE_PROGRAMMER and self.peer_nonce is None:
            raise FormatError(f"programmer hello: peer_nonce must be {NONCE_SIZE} bytes")

    @property
    def type(self) -> str:
        return f"{self.role}-hello"

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes, *, role: str) -> Hello:
        m = _decode(data, what=f"{role} hello", max_size=MAX_HELLO_SIZE, type_=f"{role}-hello")
        return fields.decode(cls, m)


@fields.body("finish")
@attrs.frozen(kw_only=True)
class Finish:
    """Second message of each side: transcript signature and key confirmation."""

    role: str = fields.custom("type", _Role("finish"))
    session_id: bytes = fields.byte_string("sid", size=SESSION_ID_SIZE)
    signature: bytes = fields.byte_string("sig", min_len=1, max_len=MAX_SIGNATURE_SIZE)
    confirm: bytes = fields.byte_string("confirm", size=CONFIRM_SIZE)
    version: int = fields.version(VERSION)

    @property
    def type(self) -> str:
        return f"{self.role}-finish"

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes, *, role: str) -> Finish:
        m = _decode(data, what=f"{role} finish", max_size=MAX_FINISH_SIZE, type_=f"{role}-finish")
        return fields.decode(cls, m)


def message_type(data: bytes, *, max_size: int = MAX_HELLO_SIZE) -> str:
    """The ``type`` of a channel message (unverified), so a transport can dispatch it."""
    m = cbor.decode(data, what="channel message", max_size=max_size)
    if not isinstance(m, dict) or not isinstance(m.get("type"), str):
        raise FormatError("channel message: no type")
    return str(m["type"])


def _decode(data: bytes, *, what: str, max_size: int, type_: str) -> dict[str, Any]:
    m = cbor.decode(data, what=what, max_size=max_size)
    if not isinstance(m, dict):
        raise FormatError(f"{what}: not a map")
    if not cbor.is_version(m.get("v"), VERSION):
        raise FormatError(f"{what}: unsupported version {m.get('v')!r}")
    if m.get("type") != type_:
        raise ChannelStateError(f"expected a {type_!r} message, got {m.get('type')!r}")
    return m


@attrs.frozen(kw_only=True)
class Transcript:
    """Everything both sides agree on; its SHA-256 is signed, confirmed and keys the session."""

    derivation: str
    oem_certificate: bytes  # SHA-256 of the OEM identity certificate DER
    oem_ephemeral: bytes
    oem_nonce: bytes
    programmer_certificate: bytes
    programmer_ephemeral: bytes
    programmer_nonce: bytes

    def to_bytes(self) -> bytes:
        return cbor.encode(
            {
                "protocol": PROTOCOL,
                "v": VERSION,
                "roles": list(ROLES),
                "derivation": self.derivation,
                ROLE_OEM: {
                    "cert": self.oem_certificate,
                    "eph": self.oem_ephemeral,
                    "nonce": self.oem_nonce,
                },
                ROLE_PROGRAMMER: {
                    "cert": self.programmer_certificate,
                    "eph": self.programmer_ephemeral,
                    "nonce": self.programmer_nonce,
                },
            }
        )

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def of(cls, oem: Hello, programmer: Hello) -> Transcript:
        return cls(
            derivation=oem.derivation,
            oem_certificate=hashlib.sha256(oem.certificate).digest(),
            oem_ephemeral=oem.ephemeral,
            oem_nonce=oem.nonce,
            programmer_certificate=hashlib.sha256(programmer.certificate).digest(),
            programmer_ephemeral=programmer.ephemeral,
            programmer_nonce=programmer.nonce,
        )


def session_id_for(transcript_hash: bytes) -> bytes:
    return hashlib.sha256(_SESSION_ID_LABEL + transcript_hash).digest()[:SESSION_ID_SIZE]


def signed_transcript(role: str, transcript_hash: bytes) -> bytes:
    """What each side signs: domain- and role-separated, so a signature cannot be reflected."""
    return cbor.encode([_SIG_CONTEXT, role, transcript_hash])


def confirmation_input(role: str, transcript_hash: bytes) -> bytes:
    return _CONFIRM_LABELS[role] + transcript_hash


def derivation_input(purpose: str, transcript_hash: bytes) -> bytes:
    """The 32-byte CKM_AES_ECB_ENCRYPT_DATA input: SHA-256(label || transcript hash)."""
    return hashlib.sha256(_KEY_LABELS[purpose] + transcript_hash).digest()


# --- the session ----------------------------------------------------------------------------


class ChannelSession:
    """An established channel: session id, authenticated peer and in-token session keys.

    ``wrap_key`` (AES-KWP) and ``mac_key`` (AES-CMAC) are for :mod:`securethread.transfer`;
    they are session objects in the token and are destroyed by :meth:`close`.
    """

    def __init__(
        self,
        *,
        role: str,
        backend: KeyBackend,
        identity_key: PrivateKey,
        session_id: bytes,
        transcript_hash: bytes,
        derivation: str,
        peer_certificate: x509.Certificate,
        wrap_key: SecretKey,
        mac_key: SecretKey,
    ) -> None:
        self.role = role
        self.peer_role = _other(role)
        self.backend = backend
        self.identity_key = identity_key
        self.session_id = session_id
        self.transcript_hash = transcript_hash
        self.derivation = derivation
        self.peer_certificate = peer_certificate
        self.wrap_key = wrap_key
        self.mac_key = mac_key
        self.next_send_sequence = 0
        self.next_receive_sequence = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"<ChannelSession {self.role} {self.session_id.hex()}>"

    @property
    def peer_fingerprint(self) -> bytes:
        """SHA-256 of the peer's DER identity certificate."""
        return peer_fingerprint(self.peer_certificate)

    @property
    def peer_public_key(self) -> ec.EllipticCurvePublicKey:
        key = self.peer_certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)  # checked in the handshake
        return key

    def require_open(self) -> None:
        if self.closed:
            raise ChannelStateError(f"session {self.session_id.hex()} is closed")

    def close(self) -> None:
        """Destroy the session keys; the session cannot be used afterwards."""
        if not self.closed:
            self.closed = True
            _destroy_quietly(self.wrap_key, self.mac_key)

    def __enter__(self) -> ChannelSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _destroy_quietly(*keys: Any) -> None:
    for k in keys:
        if k is not None:
            try:
                k.destroy()
            except Exception:  # noqa: BLE001,S110 - best effort cleanup of session objects
                pass


# --- the state machines ---------------------------------------------------------------------


class _State(enum.Enum):
    INIT = "init"
    HELLO_SENT = "hello-sent"
    FINISH_SENT = "finish-sent"
    ESTABLISHED = "established"
    FAILED = "failed"


_T = TypeVar("_T")


class _Endpoint:
    role: str

    def __init__(
        self,
        backend: KeyBackend,
        *,
        identity_key: PrivateKey,
        identity_cert: x509.Certificate,
        root_cert: x509.Certificate,
        at: datetime | None = None,
    ) -> None:
        if identity_cert.public_key() != identity_key.public_key():
            raise ConfigurationError("identity_cert does not certify identity_key")
        self.backend = backend
        self.identity_key = identity_key
        self.identity_cert = identity_cert
        self.root_cert = root_cert
        self.at = at
        self._cert_der = identity_cert.public_bytes(serialization.Encoding.DER)
        self._state = _State.INIT
        self._ephemeral: PrivateKey | None = None
        self._keys: dict[str, SecretKey] = {}
        self._own_hello: Hello | None = None
        self._peer_hello: Hello | None = None
        self._peer_cert: x509.Certificate | None = None
        self._th = b""
        self._session: ChannelSession | None = None

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def session(self) -> ChannelSession:
        """The established session; raises until the handshake has completed."""
        if self._state is not _State.ESTABLISHED or self._session is None:
            raise ChannelStateError(f"{self.role}: handshake not complete ({self.state})")
        return self._session

    def _expect(self, state: _State, what: str) -> None:
        if self._state is not state:
            raise ChannelStateError(f"{self.role}: cannot {what} in state {self.state!r}")

    def _guard(self, fn: Callable[[], _T]) -> _T:
        """Run one step; on any failure abort the handshake and destroy its temporary keys."""
        try:
            return fn()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Give up: destroy the ephemeral key and every derived key; no later step works."""
        self._state = _State.FAILED
        _destroy_quietly(self._ephemeral, *self._keys.values())
        self._ephemeral = None
        self._keys = {}

    def _check_type(self, data: bytes, expected: str) -> None:
        """A peer never sends a message with our role: if it does, it was reflected."""
        try:
            t = message_type(data, max_size=MAX_HELLO_SIZE)
        except FormatError:
            return  # the strict parser reports it
        if t.startswith(self.role + "-"):
            raise ReflectionError(f"{self.role}: received our own {t!r} message back")
        if t != expected and t in {f"{r}-{k}" for r in ROLES for k in ("hello", "finish")}:
            raise ChannelStateError(f"{self.role}: expected {expected!r}, got {t!r}")

    def _new_ephemeral(self) -> tuple[bytes, bytes]:
        from securethread.keys.ecutil import point_of

        self._ephemeral = self.backend.generate_ec(
            _EPHEMERAL_LABEL, curve=Curve.P256, policy=EPHEMERAL_AGREEMENT
        )
        return self.backend.random(NONCE_SIZE), point_of(self._ephemeral.public_key())

    def _check_reflection(self, peer: Hello) -> None:
        own = self._own_hello
        if own is not None and (
            hmac.compare_digest(peer.nonce, own.nonce) or peer.ephemeral == own.ephemeral
        ):
            raise ReflectionError(f"{self.role}: peer hello repeats our nonce or ephemeral key")
        if peer.certificate == self._cert_der:
            raise ReflectionError(f"{self.role}: peer presents our own certificate")

    def _check_peer_hello(self, peer: Hello) -> x509.Certificate:
        self._check_reflection(peer)
        if peer.derivation not in SUPPORTED_DERIVATIONS:
            raise ChannelError(f"unsupported key derivation {peer.derivation!r}")
        from securethread.pki import EnclavePurpose, untrusted, validate_enclave_certificate

        cert = untrusted.load_certificate(peer.certificate, what="peer identity certificate")
        # Chain to the pinned OEM root, purpose IDENTITY, and the *other* role: an OEM
        # that accepted role "oem" could be talking to itself (reflection).
        validate_enclave_certificate(
            cert,
            self.root_cert,
            purpose=EnclavePurpose.IDENTITY,
            role=_other(self.role),
            at=self.at,
        )
        return cert

    def _key_schedule(self, oem: Hello, programmer: Hello) -> None:
        """ECDH and the session keys, all inside the token; ephemeral and Z destroyed here."""
        assert self._ephemeral is not None and self._peer_hello is not None
        self._th = Transcript.of(oem, programmer).digest()
        # SP 800-56A §5.7.1.2 (ECC CDH) via CKM_ECDH1_DERIVE, PKCS#11 v2.40 §2.3.14, CKD_NULL.
        shared = self._ephemeral.derive_aes(
            public_from_point(Curve.P256, self._peer_hello.ephemeral), policy=TEMP_DERIVE
        )
        try:
            # SP 800-108 style PRF = AES-256 keyed by Z (CKM_AES_ECB_ENCRYPT_DATA, PKCS#11
            # v2.40 §2.10.7) over SHA-256(label || transcript hash): one key per purpose.
            # Least privilege: the OEM's session KEK only wraps, the programmer's only unwraps.
            kek = TEMP_WRAP if self.role == ROLE_OEM else TEMP_UNWRAP
            policies = {"wrap": kek, "confirm": TEMP_CONFIRM, "mac": TEMP_CONFIRM}
            for purpose, policy in policies.items():
                self._keys[purpose] = shared.derive_ecb(
                    derivation_input(purpose, self._th), policy=policy
                )
        finally:
            _destroy_quietly(shared, self._ephemeral)
            self._ephemeral = None

    def _finish(self) -> Finish:
        th = self._th
        return Finish(
            role=self.role,
            session_id=session_id_for(th),
            signature=self.identity_key.sign(signed_transcript(self.role, th)),
            confirm=self._keys["confirm"].cmac(confirmation_input(self.role, th)),
        )

    def _verify_finish(self, data: bytes) -> None:
        peer_role = _other(self.role)
        self._check_type(data, f"{peer_role}-finish")
        fin = Finish.from_bytes(data, role=peer_role)
        if not hmac.compare_digest(fin.session_id, session_id_for(self._th)):
            raise ReplayError(f"{peer_role} finish belongs to another session")
        assert self._peer_cert is not None
        peer_key = self._peer_cert.public_key()
        assert isinstance(peer_key, ec.EllipticCurvePublicKey)
        verify_signature(
            peer_key,
            fin.signature,
            signed_transcript(peer_role, self._th),
            what=f"{peer_role} transcript signature",
        )
        expected = self._keys["confirm"].cmac(confirmation_input(peer_role, self._th))
        if not hmac.compare_digest(fin.confirm, expected):
            raise ConfirmationError(f"{peer_role} key confirmation does not match")

    def _establish(self) -> ChannelSession:
        assert self._peer_cert is not None and self._own_hello is not None
        _destroy_quietly(self._keys.pop("confirm"))
        self._session = ChannelSession(
            role=self.role,
            backend=self.backend,
            identity_key=self.identity_key,
            session_id=session_id_for(self._th),
            transcript_hash=self._th,
            derivation=self._own_hello.derivation,
            peer_certificate=self._peer_cert,
            wrap_key=self._keys["wrap"],
            mac_key=self._keys["mac"],
        )
        self._keys = {}
        self._state = _State.ESTABLISHED
        return self._session


class OemChannel(_Endpoint):
    """The OEM (initiator) side: ``start()`` → ``receive_hello()`` → ``receive_finish()``.

    The OEM names the programmer it means to reach (``expected_peer``: its identity
    certificate or that certificate's SHA-256): another enclave is refused with
    :class:`WrongPeerError` before any key is derived, even one certified by the same root.
    """

    role = ROLE_OEM

    def __init__(
        self,
        backend: KeyBackend,
        *,
        identity_key: PrivateKey,
        identity_cert: x509.Certificate,
        root_cert: x509.Certificate,
        expected_peer: bytes | x509.Certificate,
        at: datetime | None = None,
    ) -> None:
        self.expected_peer = peer_fingerprint(expected_peer)
        super().__init__(
            backend,
            identity_key=identity_key,
            identity_cert=identity_cert,
            root_cert=root_cert,
            at=at,
        )

    def start(self) -> bytes:
        """Generate the ephemeral key in the token and return the OEM Hello."""
        self._expect(_State.INIT, "start")

        def step() -> bytes:
            nonce, point = self._new_ephemeral()
            self._own_hello = Hello(
                role=ROLE_OEM,
                nonce=nonce,
                ephemeral=point,
                certificate=self._cert_der,
                derivation=SUPPORTED_DERIVATIONS[0],
            )
            self._state = _State.HELLO_SENT
            return self._own_hello.to_bytes()

        return self._guard(step)

    def receive_hello(self, data: bytes) -> bytes:
        """Check the programmer's Hello, derive the session keys; return the OEM Finish."""
        self._expect(_State.HELLO_SENT, "receive a hello")

        def step() -> bytes:
            assert self._own_hello is not None
            self._check_type(data, "programmer-hello")
            peer = Hello.from_bytes(data, role=ROLE_PROGRAMMER)
            assert peer.peer_nonce is not None
            if not hmac.compare_digest(peer.peer_nonce, self._own_hello.nonce):
                raise ReplayError("programmer hello answers another session's nonce")
            if peer.derivation != self._own_hello.derivation:
                raise ChannelError(
                    f"programmer chose derivation {peer.derivation!r}, "
                    f"offered {self._own_hello.derivation!r}"
                )
            self._peer_cert = self._check_peer_hello(peer)
            got = hashlib.sha256(peer.certificate).digest()
            if not hmac.compare_digest(got, self.expected_peer):
                raise WrongPeerError(
                    f"peer is programmer {self._peer_cert.subject.rfc4514_string()!r} "
                    f"(certificate SHA-256 {got.hex()[:16]}...), not the named programmer "
                    f"(certificate SHA-256 {self.expected_peer.hex()[:16]}...)"
                )
            self._peer_hello = peer
            self._key_schedule(self._own_hello, peer)
            self._state = _State.FINISH_SENT
            return self._finish().to_bytes()

        return self._guard(step)

    def receive_finish(self, data: bytes) -> ChannelSession:
        """Verify the programmer's signature and confirmation; return the session."""
        self._expect(_State.FINISH_SENT, "receive a finish")

        def step() -> ChannelSession:
            self._verify_finish(data)
            return self._establish()

        return self._guard(step)


class ProgrammerChannel(_Endpoint):
    """The programmer (responder) side: ``receive_hello()`` → ``receive_finish()``."""

    role = ROLE_PROGRAMMER

    def receive_hello(self, data: bytes) -> bytes:
        """Check the OEM's Hello, derive the session keys; return the programmer Hello."""
        self._expect(_State.INIT, "receive a hello")

        def step() -> bytes:
            self._check_type(data, "oem-hello")
            peer = Hello.from_bytes(data, role=ROLE_OEM)
            self._peer_cert = self._check_peer_hello(peer)
            self._peer_hello = peer
            nonce, point = self._new_ephemeral()
            self._own_hello = Hello(
                role=ROLE_PROGRAMMER,
                nonce=nonce,
                ephemeral=point,
                certificate=self._cert_der,
                derivation=peer.derivation,
                peer_nonce=peer.nonce,
            )
            self._check_reflection(peer)  # now also against our own nonce and key
            self._key_schedule(peer, self._own_hello)
            self._state = _State.HELLO_SENT
            return self._own_hello.to_bytes()

        return self._guard(step)

    def receive_finish(self, data: bytes) -> bytes:
        """Verify the OEM's signature and confirmation; return the programmer Finish.

        After this the session is available as :attr:`session`.
        """
        self._expect(_State.HELLO_SENT, "receive a finish")

        def step() -> bytes:
            self._verify_finish(data)
            out = self._finish().to_bytes()
            self._establish()
            return out

        return self._guard(step)
