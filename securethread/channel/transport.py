"""The key channel over TCP: one session per connection, framed, size-limited, timed.

A frame is ``length (4 bytes, big-endian) || type (1 byte) || payload``; ``length`` counts
the payload only.  Each frame type has its own size limit (the message limits of
:mod:`~securethread.channel.handshake` and :mod:`~securethread.channel.transfer`), checked on
the header, before a byte of the payload is read.  Every read has a deadline: the whole frame
(header and payload) must arrive within ``timeout`` seconds, so a peer that trickles bytes is
cut off like one that sends nothing.  Connect and accept are timed too.  Every wait is a
:func:`~securethread.channel.wait.wait_ready` on a non-blocking socket, which a signal ends
at once whenever it arrives (the SIGINT a blocking ``accept`` left unanswered for its whole
timeout: see :mod:`securethread.channel.wait`).

One connection carries one session, in this order::

    OEM                                   programmer
    OEM_HELLO          ------------------>
                       <------------------  PROGRAMMER_HELLO
    OEM_FINISH         ------------------>
                       <------------------  PROGRAMMER_FINISH    (session established)
    TRANSFER           ------------------>                       (session copies only)
                       <------------------  ACK                  (signed)
    COMMIT             ------------------>                       (only for a verified ACK)
                       <------------------  COMMITTED            (keys stored)

The programmer stores nothing before the COMMIT, and the OEM reports success only on a
verified COMMITTED.  A connection that fails before the COMMIT leaves both sides as they
were; a failure after the OEM sent the COMMIT is reported as :class:`CommitUnconfirmedError`
(the programmer's own result says whether it stored the keys).  Either side may send an
ERROR frame (short text, unauthenticated, informative only) before it closes.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs
from cryptography import x509

from securethread.channel.handshake import (
    MAX_FINISH_SIZE,
    MAX_HELLO_SIZE,
    OemChannel,
    ProgrammerChannel,
    peer_fingerprint,
)
from securethread.channel.transfer import (
    MAX_ACK_SIZE,
    MAX_COMMIT_SIZE,
    MAX_ENTRIES,
    MAX_TRANSFER_SIZE,
    ImportedKey,
    KeyReceiver,
    KeySender,
    TransferRecord,
)
from securethread.channel.wait import wait_ready
from securethread.errors import (
    ChannelError,
    ConfigurationError,
    DuplicateObjectError,
    Error,
    VerificationError,
)
from securethread.keys.protocol import KeyBackend, PrivateKey

HEADER = struct.Struct(">IB")  # payload length, frame type
MAX_ERROR_SIZE = 512
#: The largest payload any frame type may carry (a key transfer or its acknowledgement).
MAX_FRAME_SIZE = max(MAX_HELLO_SIZE, MAX_TRANSFER_SIZE, MAX_ACK_SIZE)
#: Seconds for one whole frame to arrive (and for connect, and for a send to drain).
DEFAULT_TIMEOUT = 30.0
#: Seconds the programmer waits for the OEM to connect.
DEFAULT_ACCEPT_TIMEOUT = 600.0
_ERROR_SEND_TIMEOUT = 2.0

Address = tuple[str, int]


class FrameType(enum.IntEnum):
    """The one-byte type of a frame; a session uses them in exactly this order."""

    OEM_HELLO = 0x01
    PROGRAMMER_HELLO = 0x02
    OEM_FINISH = 0x03
    PROGRAMMER_FINISH = 0x04
    TRANSFER = 0x05
    ACK = 0x06
    COMMIT = 0x07
    COMMITTED = 0x08
    ERROR = 0x7F


FRAME_LIMITS: Mapping[FrameType, int] = {
    FrameType.OEM_HELLO: MAX_HELLO_SIZE,
    FrameType.PROGRAMMER_HELLO: MAX_HELLO_SIZE,
    FrameType.OEM_FINISH: MAX_FINISH_SIZE,
    FrameType.PROGRAMMER_FINISH: MAX_FINISH_SIZE,
    FrameType.TRANSFER: MAX_TRANSFER_SIZE,
    FrameType.ACK: MAX_ACK_SIZE,
    FrameType.COMMIT: MAX_COMMIT_SIZE,
    FrameType.COMMITTED: MAX_COMMIT_SIZE,
    FrameType.ERROR: MAX_ERROR_SIZE,
}


# --- errors ----------------------------------------------------------------------------------


class TransportError(ChannelError):
    """The connection carrying the channel failed or carried something it must not."""


class FrameTooLargeError(TransportError):
    """A frame header announced more bytes than its type allows; the payload was not read."""


class UnexpectedFrameError(TransportError):
    """A frame of an unknown type, or of a type that does not come at this point."""


class PeerTimeoutError(TransportError):
    """The peer did not connect, or a whole frame did not arrive, within the timeout."""


class ConnectionDroppedError(TransportError):
    """The connection closed or broke in the middle of the session."""


class PeerUnreachableError(TransportError):
    """No connection could be made to the peer's address."""


class PeerRefusedError(TransportError):
    """The peer ended the session with an ERROR frame (its reason is in the message)."""


class CommitUnconfirmedError(TransportError):
    """The OEM sent the commit, but no valid confirmation came back.

    The programmer may or may not have stored the keys (its own result says which);
    ``record`` is the acknowledged, uncommitted transfer.  Retrying is safe: the programmer
    either stores the keys then or refuses them as already present.
    """

    def __init__(self, message: str, *, record: TransferRecord) -> None:
        super().__init__(message)
        self.record = record


# --- frames ----------------------------------------------------------------------------------


def _printable(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


class FramedConnection:
    """One TCP connection carrying frames; every read and every write has a deadline."""

    def __init__(self, sock: socket.socket, *, timeout: float, peer: str) -> None:
        self.sock = sock
        self.timeout = _positive(timeout, "timeout")
        self.peer = peer
        sock.setblocking(False)  # every wait is wait_ready's, which a signal ends
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a socketpair in a test): nothing to tune

    def __enter__(self) -> FramedConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, kind: FrameType, payload: bytes) -> None:
        if len(payload) > FRAME_LIMITS[kind]:
            raise ValueError(f"{kind.name} payload of {len(payload)} bytes is over its limit")
        try:
            done = self._send_all(
                HEADER.pack(len(payload), kind) + payload, time.monotonic() + self.timeout
            )
        except OSError as exc:
            raise ConnectionDroppedError(
                f"connection to {self.peer} lost while sending {kind.name}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        if not done:
            raise PeerTimeoutError(
                f"{self.peer} did not take the {kind.name} frame within {self.timeout:g} s"
            )

    def _send_all(self, data: bytes, deadline: float) -> bool:
        """Send all of ``data`` before ``deadline``; False if the peer did not take it."""
        view = memoryview(data)
        while view:
            if not wait_ready(self.sock, write=True, deadline=deadline):
                return False
            try:
                view = view[self.sock.send(view) :]
            except (BlockingIOError, InterruptedError):
                continue  # not writable after all: wait again
        return True

    def receive(self, expected: FrameType) -> bytes:
        """The payload of the next frame, which must be of type ``expected``.

        The type and the announced length are checked on the header, before the payload is
        read; an ERROR frame from the peer raises :class:`PeerRefusedError`.
        """
        deadline = time.monotonic() + self.timeout
        length, code = HEADER.unpack(self._read_exact(HEADER.size, deadline, expected))
        try:
            kind = FrameType(code)
        except ValueError:
            raise UnexpectedFrameError(
                f"unknown frame type 0x{code:02x} from {self.peer} (expected {expected.name})"
            ) from None
        if kind is not expected and kind is not FrameType.ERROR:
            raise UnexpectedFrameError(
                f"expected a {expected.name} frame from {self.peer}, got {kind.name}"
            )
        if length > FRAME_LIMITS[kind]:
            raise FrameTooLargeError(
                f"{kind.name} frame from {self.peer} announces {length} bytes, "
                f"limit {FRAME_LIMITS[kind]}"
            )
        payload = self._read_exact(length, deadline, expected)
        if kind is FrameType.ERROR:
            raise PeerRefusedError(f"{self.peer} ended the session: {_printable(payload)}")
        return payload

    def _read_exact(self, n: int, deadline: float, expected: FrameType) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if not wait_ready(self.sock, deadline=deadline):
                raise self._timeout(expected)
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 16))
            except (BlockingIOError, InterruptedError):
                continue  # not readable after all: wait again
            except OSError as exc:
                raise ConnectionDroppedError(
                    f"connection to {self.peer} lost while waiting for {expected.name}: "
                    f"{exc.strerror or type(exc).__name__}"
                ) from None
            if not chunk:
                raise ConnectionDroppedError(
                    f"{self.peer} closed the connection while we waited for {expected.name}"
                )
            buf += chunk
        return bytes(buf)

    def _timeout(self, expected: FrameType) -> PeerTimeoutError:
        return PeerTimeoutError(
            f"no complete {expected.name} frame from {self.peer} within {self.timeout:g} s"
        )

    def send_error(self, exc: BaseException) -> None:
        """Best effort: tell the peer why the session ends.  Only what concerns the peer is
        described (its bad data, a wrong peer, the protocol, keys already present); other
        trouble on this side is named by class only."""
        if isinstance(exc, ConnectionDroppedError | PeerRefusedError | CommitUnconfirmedError):
            return  # nobody to tell, or the peer already said why
        if isinstance(exc, VerificationError | DuplicateObjectError):
            text = f"{type(exc).__name__}: {exc}"
        elif isinstance(exc, Error):
            text = type(exc).__name__
        else:
            text = "internal error"
        payload = text.encode("utf-8", errors="replace")[:MAX_ERROR_SIZE]
        deadline = time.monotonic() + min(self.timeout, _ERROR_SEND_TIMEOUT)
        try:
            self._send_all(HEADER.pack(len(payload), FrameType.ERROR) + payload, deadline)
        except OSError:
            pass


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


# --- results ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SendResult:
    """What the OEM records after a session: the committed transfer and where it went."""

    record: TransferRecord  # committed=True; record.ack verifies offline (programmer cert)
    peer: Address


@attrs.frozen(kw_only=True)
class ReceiveResult:
    """What the programmer records: the keys now stored in its token, and their evidence.

    ``confirmed`` is False if the COMMITTED frame could not be sent: the keys are stored,
    and the OEM reports :class:`CommitUnconfirmedError`.
    """

    session_id: bytes
    oem: bytes  # SHA-256 of the OEM identity certificate
    keys: tuple[ImportedKey, ...]
    transfer_digest: bytes  # SHA-256 of the key-transfer message
    ack: bytes  # the signed acknowledgement the OEM holds
    peer: Address
    confirmed: bool


# --- the two sides on a connected socket -------------------------------------------------------


def run_programmer_session(
    link: FramedConnection,
    *,
    backend: KeyBackend,
    identity_key: PrivateKey,
    identity_cert: x509.Certificate,
    root_cert: x509.Certificate,
    peer: Address,
    at: datetime | None = None,
) -> ReceiveResult:
    """The programmer's side of one session on a connected ``link``.

    On any failure before the OEM's commit, the handshake keys and the session copies are
    destroyed and nothing is stored; the error propagates (the OEM gets an ERROR frame).
    """
    chan = ProgrammerChannel(
        backend,
        identity_key=identity_key,
        identity_cert=identity_cert,
        root_cert=root_cert,
        at=at,
    )
    try:
        link.send(FrameType.PROGRAMMER_HELLO, chan.receive_hello(link.receive(FrameType.OEM_HELLO)))
        finish = chan.receive_finish(link.receive(FrameType.OEM_FINISH))
        link.send(FrameType.PROGRAMMER_FINISH, finish)
        with chan.session as session:
            receiver = KeyReceiver(session)
            try:
                transfer = link.receive(FrameType.TRANSFER)
                ack = receiver.receive(transfer)
                link.send(FrameType.ACK, ack)
                committed = receiver.commit(link.receive(FrameType.COMMIT))
            finally:
                receiver.abort()  # session copies of an uncommitted transfer
    except BaseException as exc:
        chan.abort()
        link.send_error(exc)
        raise
    # The keys are stored: from here on a failure to confirm does not undo anything.
    confirmed = True
    try:
        link.send(FrameType.COMMITTED, committed)
    except TransportError:
        confirmed = False
    return ReceiveResult(
        session_id=session.session_id,
        oem=session.peer_fingerprint,
        keys=tuple(receiver.imported),
        transfer_digest=hashlib.sha256(transfer).digest(),
        ack=ack,
        peer=peer,
        confirmed=confirmed,
    )


def run_oem_session(
    link: FramedConnection,
    *,
    backend: KeyBackend,
    identity_key: PrivateKey,
    identity_cert: x509.Certificate,
    root_cert: x509.Certificate,
    expected_programmer: bytes | x509.Certificate,
    labels: Sequence[str],
    transferable: bool | Mapping[str, bool] = True,
    peer: Address,
    at: datetime | None = None,
) -> SendResult:
    """The OEM's side of one session on a connected ``link``: handshake with the named
    programmer only, transfer ``labels``, verify the signed ack, commit, verify the
    confirmation."""
    chan = OemChannel(
        backend,
        identity_key=identity_key,
        identity_cert=identity_cert,
        root_cert=root_cert,
        expected_peer=expected_programmer,
        at=at,
    )
    try:
        link.send(FrameType.OEM_HELLO, chan.start())
        link.send(
            FrameType.OEM_FINISH, chan.receive_hello(link.receive(FrameType.PROGRAMMER_HELLO))
        )
        with chan.receive_finish(link.receive(FrameType.PROGRAMMER_FINISH)) as session:
            sender = KeySender(session)
            link.send(FrameType.TRANSFER, sender.send(labels, transferable=transferable))
            record = sender.verify_ack(link.receive(FrameType.ACK))
            link.send(FrameType.COMMIT, sender.commit(record))
            # The whole COMMIT frame left: from here on the programmer may have stored the
            # keys, and only a verified COMMITTED says it did (an ERROR frame is no proof).
            try:
                final = sender.verify_committed(link.receive(FrameType.COMMITTED))
            except Error as exc:
                raise CommitUnconfirmedError(
                    f"commit sent to {link.peer} but not confirmed ({exc}); the programmer "
                    "may hold the keys: check its result before recording the transfer",
                    record=record,
                ) from exc
    except BaseException as exc:
        chan.abort()
        link.send_error(exc)
        raise
    return SendResult(record=final, peer=peer)


# --- the entry points ----------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or type(exc).__name__}"
        ) from None


def _accept_one(listener: socket.socket, timeout: float | None) -> tuple[socket.socket, Any] | None:
    """The first connection to ``listener`` within ``timeout`` seconds (None: for ever);
    None if nobody connected in time."""
    listener.setblocking(False)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if not wait_ready(listener, deadline=deadline):
            return None
        try:
            conn, remote = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue  # gone before we took it (accept(2): ECONNABORTED): wait again
        return conn, remote


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port`` within ``timeout`` seconds (each address
    :func:`socket.getaddrinfo` gives, in turn, as :func:`socket.create_connection` does)."""
    deadline = time.monotonic() + timeout
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PeerUnreachableError(
            f"cannot connect to {host}:{port}: {exc.strerror or type(exc).__name__}"
        ) from None
    why = "no address"
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):  # connect(2): pending
                if not wait_ready(sock, write=True, deadline=deadline):
                    raise PeerTimeoutError(f"no answer from {host}:{port} within {timeout:g} s")
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except BaseException:
            sock.close()
            raise
        if code == 0:
            return sock
        sock.close()
        why = os.strerror(code)
    raise PeerUnreachableError(f"cannot connect to {host}:{port}: {why}")


def serve_key_session(
    host: str,
    port: int,
    *,
    backend: KeyBackend,
    identity_key: PrivateKey,
    identity_cert: x509.Certificate,
    root_cert: x509.Certificate,
    timeout: float = DEFAULT_TIMEOUT,
    accept_timeout: float | None = DEFAULT_ACCEPT_TIMEOUT,
    ready: Callable[[Address], None] | None = None,
    at: datetime | None = None,
) -> ReceiveResult:
    """Programmer: listen on ``host:port`` (port 0: any free port), accept exactly one
    connection, run one session on it and return what was stored.

    ``ready`` is called with the bound address once the socket listens (before accepting).
    ``accept_timeout`` None waits for ever.  The listening socket is closed as soon as one
    connection is accepted, so a second OEM (or a port scanner) cannot join the session.
    """
    timeout = _positive(timeout, "timeout")
    if accept_timeout is not None:
        accept_timeout = _positive(accept_timeout, "accept_timeout")
    if identity_cert.public_key() != identity_key.public_key():
        raise ConfigurationError("identity_cert does not certify identity_key")
    listener = _listen(host, port)
    try:
        bound = listener.getsockname()
        if ready is not None:
            ready((str(bound[0]), int(bound[1])))
        accepted = _accept_one(listener, accept_timeout)
        if accepted is None:
            raise PeerTimeoutError(
                f"no OEM connected to {host}:{bound[1]} within {accept_timeout:g} s"
            )
        conn, remote = accepted
    finally:
        listener.close()
    peer = (str(remote[0]), int(remote[1]))
    with FramedConnection(conn, timeout=timeout, peer=f"OEM at {peer[0]}:{peer[1]}") as link:
        return run_programmer_session(
            link,
            backend=backend,
            identity_key=identity_key,
            identity_cert=identity_cert,
            root_cert=root_cert,
            peer=peer,
            at=at,
        )


def send_key_session(
    host: str,
    port: int,
    *,
    backend: KeyBackend,
    identity_key: PrivateKey,
    identity_cert: x509.Certificate,
    root_cert: x509.Certificate,
    expected_programmer: bytes | x509.Certificate,
    labels: Sequence[str],
    transferable: bool | Mapping[str, bool] = True,
    timeout: float = DEFAULT_TIMEOUT,
    at: datetime | None = None,
) -> SendResult:
    """OEM: connect to the programmer at ``host:port`` and move the keys ``labels`` to it,
    refusing any programmer but ``expected_programmer`` (its identity certificate or that
    certificate's SHA-256).  Returns only once the programmer confirmed it stored them."""
    timeout = _positive(timeout, "timeout")
    expected = peer_fingerprint(expected_programmer)
    if identity_cert.public_key() != identity_key.public_key():
        raise ConfigurationError("identity_cert does not certify identity_key")
    labels = list(labels)
    if not 0 < len(labels) <= MAX_ENTRIES or len(set(labels)) != len(labels):
        raise ConfigurationError(f"send 1..{MAX_ENTRIES} distinct key labels, not {labels!r}")
    for label in labels:
        backend.secret_key(label)  # KeyNotFoundError before anyone is contacted
    conn = _connect(host, port, timeout)
    remote = conn.getpeername()
    peer = (str(remote[0]), int(remote[1]))
    with FramedConnection(conn, timeout=timeout, peer=f"programmer at {host}:{port}") as link:
        return run_oem_session(
            link,
            backend=backend,
            identity_key=identity_key,
            identity_cert=identity_cert,
            root_cert=root_cert,
            expected_programmer=expected,
            labels=labels,
            transferable=transferable,
            peer=peer,
            at=at,
        )
