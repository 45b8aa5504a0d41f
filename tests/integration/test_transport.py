"""The key channel over real TCP on 127.0.0.1 between the real SoftHSM tokens.

The programmer side (``serve_key_session``) runs in a thread, or in its own process, the OEM
side (``send_key_session``) in the test; faults come from a frame-aware proxy that cuts the
connection, from raw sockets that send oversized, garbage or slow frames, and from a second
programmer certified by the same root.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import uuid
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.channel.handshake import MAX_HELLO_SIZE, WrongPeerError
from securethread.channel.transport import (
    CommitUnconfirmedError,
    ConnectionDroppedError,
    FrameTooLargeError,
    FrameType,
    PeerRefusedError,
    PeerTimeoutError,
    PeerUnreachableError,
    ReceiveResult,
    SendResult,
    TransportError,
    UnexpectedFrameError,
    send_key_session,
    serve_key_session,
)
from securethread.errors import (
    ConfigurationError,
    DuplicateObjectError,
    FormatError,
    KeyNotFoundError,
    ReplayError,
)
from securethread.formats import envelope
from securethread.hsm import IMAGE_KEY, Token
from tests.integration import test_channel as _channel_tests
from tests.integration.channel_net import (
    LOCALHOST,
    Background,
    FrameProxy,
    assert_same_key,
    frame,
    object_census,
    read_frame,
    serve_in_background,
)
from tests.integration.test_channel import Enclave, Pki

pki = _channel_tests.pki  # the session-scoped PKI fixture

FAST = 0.3  # seconds: the timeout in the slow-peer tests (no test asserts a duration)


def image_keys(oem: Token, n: int = 2) -> list[str]:
    labels = [f"tk-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    for lb in labels:
        oem.generate_aes(lb, policy=IMAGE_KEY)
    return labels


def programmer_side(pki: Pki, enclave: Enclave | None = None, **kw: Any) -> dict[str, Any]:
    e = enclave or pki.programmer
    args: dict[str, Any] = dict(
        backend=e.token,
        identity_key=e.token.private_key(e.identity),
        identity_cert=e.cert,
        root_cert=pki.root,
        timeout=10,
    )
    args.update(kw)
    return args


def serve(
    pki: Pki, enclave: Enclave | None = None, **kw: Any
) -> tuple[Background, tuple[str, int]]:
    return serve_in_background(serve_key_session, **programmer_side(pki, enclave, **kw))


def send(pki: Pki, address: tuple[str, int], labels: list[str], **kw: Any) -> SendResult:
    args: dict[str, Any] = dict(
        backend=pki.oem.token,
        identity_key=pki.oem.token.private_key(pki.oem.identity),
        identity_cert=pki.oem.cert,
        root_cert=pki.root,
        expected_programmer=pki.programmer.cert,
        labels=labels,
        timeout=10,
    )
    args.update(kw)
    return send_key_session(address[0], address[1], **args)


# --- the good path -------------------------------------------------------------------------


def test_key_session_over_tcp(pki: Pki, oem: Token, programmer: Token) -> None:
    labels = image_keys(oem, 2)
    before = object_census(programmer)
    side, address = serve(pki)
    proxy = FrameProxy(address)
    sent = send(pki, proxy.address, labels)
    got: ReceiveResult = side.result()
    assert proxy.types() == [
        "OEM_HELLO",
        "PROGRAMMER_HELLO",
        "OEM_FINISH",
        "PROGRAMMER_FINISH",
        "TRANSFER",
        "ACK",
        "COMMIT",
        "COMMITTED",
    ]
    record = sent.record
    assert record.committed and [k.label for k in record.keys] == labels
    assert record.programmer == got_fp(pki.programmer.cert)
    assert got.confirmed and got.keys == record.keys and got.ack == record.ack
    assert got.session_id == record.session_id and got.oem == got_fp(pki.oem.cert)
    assert got.transfer_digest == record.transfer_digest
    # The ack verifies offline with the programmer's certificate alone.
    key = pki.programmer.cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    body = envelope.open_envelope(record.ack, kind="key-transfer-ack", keys=key)
    assert body["sid"] == record.session_id
    # Exactly the new keys are left in the programmer token: no session object survives.
    after = object_census(programmer)
    assert after - before == {(4, lb): 1 for lb in labels}  # CKO_SECRET_KEY
    assert not before - after
    for lb in labels:
        programmer.secret_key(lb).policy_report().check(transferable=True)
        assert_same_key(oem, programmer, lb)


def got_fp(cert: x509.Certificate) -> bytes:
    from securethread.pki import cert_fingerprint

    return cert_fingerprint(cert)


def test_key_session_between_processes(pki: Pki, oem: Token, programmer: Token) -> None:
    """The programmer in its own process with its own token session: only TCP between."""
    labels = image_keys(oem, 1)
    der = serialization.Encoding.DER
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(
        target=_programmer_process,
        args=(out, pki.programmer.identity, pki.programmer.cert.public_bytes(der)),
        kwargs={"root_der": pki.root.public_bytes(der)},
    )
    proc.start()
    try:
        kind, value = out.get(timeout=60)
        assert kind == "listening", value
        sent = send(pki, value, labels)
        kind, value = out.get(timeout=60)
        assert kind == "stored", value
    finally:
        proc.join(60)
    assert proc.exitcode == 0
    assert value == labels == [k.label for k in sent.record.keys]
    assert_same_key(oem, programmer, labels[0])  # written by the other process


def _programmer_process(out: Any, identity: str, cert_der: bytes, *, root_der: bytes) -> None:
    from securethread.hsm import open_token

    token = open_token("programmer")
    try:
        result = serve_key_session(
            LOCALHOST,
            0,
            backend=token,
            identity_key=token.private_key(identity),
            identity_cert=x509.load_der_x509_certificate(cert_der),
            root_cert=x509.load_der_x509_certificate(root_der),
            timeout=30,
            accept_timeout=60,
            ready=lambda address: out.put(("listening", address)),
        )
        out.put(("stored", [k.label for k in result.keys]))
    except Exception as exc:  # report to the parent instead of hanging it
        out.put(("error", repr(exc)))
        raise
    finally:
        token.close()


# --- the OEM names its peer ------------------------------------------------------------------


def test_oem_refuses_a_programmer_it_did_not_name(
    pki: Pki, oem: Token, programmer: Token, spare: Token
) -> None:
    """prog-2 in the spare token is certified by the same root; the OEM named prog-1."""
    labels = image_keys(oem, 1)
    before = object_census(spare)
    side, address = serve(pki, pki.other_programmer)
    proxy = FrameProxy(address)
    with pytest.raises(WrongPeerError, match="not the named programmer"):
        send(pki, proxy.address, labels)
    assert isinstance(side.error(), PeerRefusedError)
    proxy.wait()
    # Refused on the programmer's hello: no OEM finish, no transfer ever left the OEM.
    assert proxy.types() == ["OEM_HELLO", "PROGRAMMER_HELLO", "ERROR"]
    assert object_census(spare) == before
    assert not spare.has_key(labels[0]) and not programmer.has_key(labels[0])
    # The same OEM, naming prog-2, reaches it.
    side, address = serve(pki, pki.other_programmer)
    sent = send(pki, address, labels, expected_programmer=got_fp(pki.other_programmer.cert))
    assert side.result().keys == sent.record.keys
    assert spare.has_key(labels[0])


def test_oem_checks_its_own_inputs_before_connecting(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)
    closed = _closed_port()
    with pytest.raises(ConfigurationError):
        send(pki, closed, labels, expected_programmer=b"\x00" * 31)
    with pytest.raises(KeyNotFoundError):
        send(pki, closed, labels + ["no-such-key"])
    with pytest.raises(ConfigurationError):
        send(pki, closed, [])
    with pytest.raises(ConfigurationError):
        send(pki, closed, labels, timeout=0)
    with pytest.raises(PeerUnreachableError):
        send(pki, closed, labels)


def _closed_port() -> tuple[str, int]:
    s = socket.create_server((LOCALHOST, 0))
    host, port = s.getsockname()[:2]
    s.close()
    return str(host), int(port)


# --- connections dropped at every message -----------------------------------------------------


@pytest.mark.parametrize(
    "drop_after",
    [1, 2, 3, 4, 5, 6],
    ids=["oem-hello", "programmer-hello", "oem-finish", "programmer-finish", "transfer", "ack"],
)
def test_connection_dropped_leaves_both_sides_unchanged(
    pki: Pki, oem: Token, programmer: Token, drop_after: int
) -> None:
    labels = image_keys(oem, 2)
    before, oem_before = object_census(programmer), object_census(oem)
    side, address = serve(pki)
    proxy = FrameProxy(address, drop_after=drop_after)
    with pytest.raises(TransportError) as oem_error:
        send(pki, proxy.address, labels)
    # After the ack the OEM has sent its commit, which the cut swallowed.
    expected = CommitUnconfirmedError if drop_after == 6 else ConnectionDroppedError
    assert isinstance(oem_error.value, expected | ConnectionDroppedError), oem_error.value
    assert isinstance(side.error(), ConnectionDroppedError)
    assert len(proxy.frames) == drop_after
    assert object_census(programmer) == before  # no key, no session object left behind
    assert object_census(oem) == oem_before  # no ephemeral or session key left either
    # A fresh session on a fresh connection goes through.
    side, address = serve(pki)
    sent = send(pki, address, labels)
    assert side.result().keys == sent.record.keys
    assert all(programmer.has_key(lb) for lb in labels)


def test_commit_delivered_but_not_confirmed(pki: Pki, oem: Token, programmer: Token) -> None:
    """Cut after the COMMIT: the programmer stored the keys, the OEM cannot know it, says so
    (CommitUnconfirmedError with the acknowledged record), and a retry is refused by the
    programmer as keys it already holds."""
    labels = image_keys(oem, 1)
    side, address = serve(pki)
    proxy = FrameProxy(address, drop_after=7)
    with pytest.raises(CommitUnconfirmedError) as unconfirmed:
        send(pki, proxy.address, labels)
    assert [k.label for k in unconfirmed.value.record.keys] == labels
    assert not unconfirmed.value.record.committed
    stored: ReceiveResult = side.result()
    assert [k.label for k in stored.keys] == labels and programmer.has_key(labels[0])
    side, address = serve(pki)
    with pytest.raises(PeerRefusedError, match="already has a key"):
        send(pki, address, labels)
    assert isinstance(side.error(), DuplicateObjectError)


def test_replayed_oem_frames_are_refused(pki: Pki, oem: Token, programmer: Token) -> None:
    """A recorded OEM side replayed to a fresh programmer: the old finish belongs to another
    session (fresh nonce and ephemeral key on the programmer side)."""
    labels = image_keys(oem, 1)
    side, address = serve(pki)
    proxy = FrameProxy(address)
    send(pki, proxy.address, labels)
    side.result()
    recorded = {k: p for d, k, p in proxy.frames if d == "oem"}
    before = object_census(programmer)
    side, address = serve(pki)
    with socket.create_connection(address) as s:
        s.sendall(frame(FrameType.OEM_HELLO, recorded[FrameType.OEM_HELLO]))
        assert read_frame(s)[0] == FrameType.PROGRAMMER_HELLO
        s.sendall(frame(FrameType.OEM_FINISH, recorded[FrameType.OEM_FINISH]))
        kind, text = read_frame(s)
    assert isinstance(side.error(), ReplayError)
    assert kind == FrameType.ERROR and b"ReplayError" in text
    assert object_census(programmer) == before


# --- oversized, garbage and slow frames -------------------------------------------------------


def _raw_client_error(
    pki: Pki, programmer: Token, data: bytes, *, timeout: float = 10
) -> tuple[BaseException, bytes | None]:
    """Send ``data`` to a fresh programmer session; its error and any ERROR frame back."""
    before = object_census(programmer)
    side, address = serve(pki, timeout=timeout)
    reply = None
    with socket.create_connection(address) as s:
        s.sendall(data)
        try:
            kind, payload = read_frame(s)
            reply = payload if kind == FrameType.ERROR else None
        except OSError:
            pass
    error = side.error()
    assert object_census(programmer) == before
    return error, reply


@pytest.mark.parametrize("length", [MAX_HELLO_SIZE + 1, 1 << 31])
def test_programmer_refuses_an_oversized_frame_unread(
    pki: Pki, programmer: Token, length: int
) -> None:
    # Only the header is sent, and the socket stays open: the refusal cannot wait for a body.
    before = object_census(programmer)
    side, address = serve(pki, timeout=30)
    with socket.create_connection(address) as s:
        s.sendall(_header(length, FrameType.OEM_HELLO))
        error = side.error()
        kind, text = read_frame(s)
    assert isinstance(error, FrameTooLargeError), error
    assert kind == FrameType.ERROR and b"FrameTooLargeError" in text
    assert object_census(programmer) == before


def _header(length: int, kind: int) -> bytes:
    from securethread.channel.transport import HEADER

    return HEADER.pack(length, kind)


def test_oem_refuses_an_oversized_frame_unread(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)

    def fake_programmer(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            read_frame(conn)
            conn.sendall(_header(MAX_HELLO_SIZE + 1, FrameType.PROGRAMMER_HELLO))
            conn.recv(1)  # hold the connection open until the OEM gives up

    with _fake_peer(fake_programmer) as address:
        with pytest.raises(FrameTooLargeError):
            send(pki, address, labels, timeout=30)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (frame(FrameType.OEM_HELLO, bytes(range(200))), FormatError),  # not CBOR
        (frame(FrameType.OEM_HELLO, b"\xa0"), FormatError),  # an empty map
        (frame(0x42, b"hello"), UnexpectedFrameError),  # no such frame type
        (frame(FrameType.TRANSFER, b"\x00" * 16), UnexpectedFrameError),  # out of order
        (frame(FrameType.COMMIT, b"\x00" * 16), UnexpectedFrameError),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", UnexpectedFrameError),  # type '/'
        (_header(MAX_HELLO_SIZE + 1, FrameType.OEM_HELLO) + bytes(64), FrameTooLargeError),
    ],
    ids=["not-cbor", "empty-map", "unknown-type", "transfer-first", "commit-first", "http", "big"],
)
def test_programmer_refuses_garbage(
    pki: Pki, programmer: Token, data: bytes, error: type[Exception]
) -> None:
    got, reply = _raw_client_error(pki, programmer, data)
    assert isinstance(got, error), got
    if reply is not None:  # best effort: a reset may beat it when unread bytes are left
        assert error.__name__.encode() in reply


def test_oem_refuses_garbage_and_reports_a_refusal(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)

    def replying(payload: bytes, kind: int) -> Any:
        def fake_programmer(listener: socket.socket) -> None:
            conn, _ = listener.accept()
            with conn:
                read_frame(conn)
                conn.sendall(frame(kind, payload))
                try:
                    conn.recv(1)
                except OSError:
                    pass

        return fake_programmer

    with _fake_peer(replying(os.urandom(100), FrameType.PROGRAMMER_HELLO)) as address:
        with pytest.raises(FormatError):
            send(pki, address, labels)
    with _fake_peer(replying(b"\x01", FrameType.OEM_HELLO)) as address:
        with pytest.raises(UnexpectedFrameError, match="expected a PROGRAMMER_HELLO"):
            send(pki, address, labels)
    # An ERROR frame is shown, stripped of control characters.
    with _fake_peer(replying(b"busy\x1b[2J\n now", FrameType.ERROR)) as address:
        with pytest.raises(PeerRefusedError, match=r"busy\?\[2J\? now"):
            send(pki, address, labels)


class _fake_peer:
    """A listening socket on 127.0.0.1 whose one connection ``handler`` serves in a thread."""

    def __init__(self, handler: Any) -> None:
        self.listener = socket.create_server((LOCALHOST, 0), backlog=1)
        self.side = Background(handler, self.listener)

    def __enter__(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        self.side.result(30)
        self.listener.close()


@pytest.mark.parametrize("sent", [b"", _header(100, FrameType.OEM_HELLO)[:3], None])
def test_programmer_times_out_on_a_slow_oem(
    pki: Pki, programmer: Token, sent: bytes | None
) -> None:
    before = object_census(programmer)
    side, address = serve(pki, timeout=FAST)
    with socket.create_connection(address) as s:
        if sent is None:  # trickle a frame, one byte per half timeout: the frame's deadline
            try:
                for b in _header(100, FrameType.OEM_HELLO) + bytes(100):
                    s.sendall(bytes([b]))
                    time.sleep(FAST / 2)
            except OSError:
                pass  # the programmer gave up and closed
        else:
            s.sendall(sent)
        error = side.error()
    assert isinstance(error, PeerTimeoutError), error
    assert object_census(programmer) == before


def test_programmer_times_out_waiting_for_the_commit(
    pki: Pki, oem: Token, programmer: Token
) -> None:
    """The OEM's commit never comes (the network stalls after the ack): the programmer gives
    up, destroys its session copies and stores nothing; the OEM cannot know whether its
    commit arrived and says so."""
    labels = image_keys(oem, 1)
    before = object_census(programmer)
    # Long enough for every step before the commit, even on a loaded machine.
    side, address = serve(pki, timeout=2)
    proxy = FrameProxy(address, stall_after=6)
    with pytest.raises(CommitUnconfirmedError):
        send(pki, proxy.address, labels, timeout=30)
    assert isinstance(side.error(), PeerTimeoutError)
    assert object_census(programmer) == before
    assert not programmer.has_key(labels[0])


def test_oem_times_out_on_a_silent_programmer(pki: Pki, oem: Token) -> None:
    labels = image_keys(oem, 1)

    def silent(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                conn.recv(1 << 16)
                conn.recv(1)  # until the OEM gives up and closes
            except OSError:
                pass

    with _fake_peer(silent) as address:
        with pytest.raises(PeerTimeoutError, match="PROGRAMMER_HELLO"):
            send(pki, address, labels, timeout=FAST)


def test_programmer_times_out_when_no_oem_connects(pki: Pki) -> None:
    side, _address = serve(pki, accept_timeout=FAST)
    assert isinstance(side.error(), PeerTimeoutError)


def test_programmer_listen_errors(pki: Pki) -> None:
    busy = socket.create_server((LOCALHOST, 0))
    try:
        with pytest.raises(ConfigurationError, match="cannot listen"):
            serve_key_session(LOCALHOST, busy.getsockname()[1], **programmer_side(pki))
    finally:
        busy.close()
    with pytest.raises(ConfigurationError):
        serve_key_session(LOCALHOST, 0, **programmer_side(pki, timeout=-1))
