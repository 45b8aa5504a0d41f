"""Frames of the key channel on a socket pair: format, limits, deadlines (no token)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from securethread.channel.transport import (
    FRAME_LIMITS,
    HEADER,
    MAX_FRAME_SIZE,
    ConnectionDroppedError,
    FramedConnection,
    FrameTooLargeError,
    FrameType,
    PeerRefusedError,
    PeerTimeoutError,
    UnexpectedFrameError,
)
from securethread.errors import ChannelError, ConfigurationError, FormatError

TIMEOUT = 0.2


@pytest.fixture
def pair() -> Iterator[tuple[FramedConnection, socket.socket]]:
    a, b = socket.socketpair()
    link = FramedConnection(a, timeout=TIMEOUT, peer="test peer")
    try:
        yield link, b
    finally:
        link.close()
        b.close()


def test_frame_layout_and_round_trip(pair: tuple[FramedConnection, socket.socket]) -> None:
    link, raw = pair
    link.send(FrameType.TRANSFER, b"payload")
    assert raw.recv(100) == b"\x00\x00\x00\x07\x05payload"  # length (BE, payload only), type
    raw.sendall(HEADER.pack(3, FrameType.ACK) + b"ack")
    assert link.receive(FrameType.ACK) == b"ack"
    raw.sendall(HEADER.pack(0, FrameType.COMMIT))
    assert link.receive(FrameType.COMMIT) == b""


def test_limits_follow_the_messages() -> None:
    assert MAX_FRAME_SIZE == max(FRAME_LIMITS.values()) == 64 * 1024
    assert FRAME_LIMITS[FrameType.OEM_FINISH] == 512
    assert set(FRAME_LIMITS) == set(FrameType)


@pytest.mark.parametrize("kind", list(FrameType))
def test_oversized_frame_is_refused_on_its_header(
    pair: tuple[FramedConnection, socket.socket], kind: FrameType
) -> None:
    link, raw = pair
    raw.sendall(HEADER.pack(FRAME_LIMITS[kind] + 1, kind))  # no payload follows
    expected = kind if kind is not FrameType.ERROR else FrameType.OEM_HELLO
    with pytest.raises(FrameTooLargeError, match=f"{kind.name} frame .* limit"):
        link.receive(expected)


def test_wrong_and_unknown_types(pair: tuple[FramedConnection, socket.socket]) -> None:
    link, raw = pair
    raw.sendall(HEADER.pack(0, 0x42))  # refused on the header; nothing else was sent
    with pytest.raises(UnexpectedFrameError, match="unknown frame type 0x42"):
        link.receive(FrameType.OEM_HELLO)
    raw.sendall(HEADER.pack(1, FrameType.COMMIT) + b"x")
    with pytest.raises(UnexpectedFrameError, match="expected a OEM_FINISH frame .* got COMMIT"):
        link.receive(FrameType.OEM_FINISH)


def test_error_frame_is_shown_without_control_characters(
    pair: tuple[FramedConnection, socket.socket],
) -> None:
    link, raw = pair
    text = b"WrongPeerError: no\x1b]0;pwned\x07 thanks\n"
    raw.sendall(HEADER.pack(len(text), FrameType.ERROR) + text)
    with pytest.raises(PeerRefusedError) as err:
        link.receive(FrameType.PROGRAMMER_HELLO)
    assert str(err.value) == "test peer ended the session: WrongPeerError: no?]0;pwned? thanks?"


def test_send_error_describes_only_the_peers_fault(
    pair: tuple[FramedConnection, socket.socket],
) -> None:
    link, raw = pair
    link.send_error(FormatError("oem hello: truncated"))
    link.send_error(ConfigurationError("secret path /home/x/pins"))
    link.send_error(RuntimeError("bug"))
    link.send_error(ConnectionDroppedError("gone"))  # nothing to say on a dead connection
    frames = []
    for _ in range(3):
        length, kind = HEADER.unpack(raw.recv(HEADER.size))
        frames.append((kind, raw.recv(length)))
    assert frames == [
        (FrameType.ERROR, b"FormatError: oem hello: truncated"),
        (FrameType.ERROR, b"ConfigurationError"),
        (FrameType.ERROR, b"internal error"),
    ]
    raw.setblocking(False)
    with pytest.raises(BlockingIOError):
        raw.recv(1)


def test_deadline_covers_the_whole_frame(pair: tuple[FramedConnection, socket.socket]) -> None:
    link, raw = pair
    with pytest.raises(PeerTimeoutError, match="no complete OEM_HELLO frame from test peer"):
        link.receive(FrameType.OEM_HELLO)
    raw.sendall(HEADER.pack(10, FrameType.OEM_HELLO) + b"half")
    with pytest.raises(PeerTimeoutError):
        link.receive(FrameType.OEM_HELLO)


def test_closed_mid_frame(pair: tuple[FramedConnection, socket.socket]) -> None:
    link, raw = pair
    raw.sendall(HEADER.pack(10, FrameType.TRANSFER) + b"abc")
    raw.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionDroppedError, match="closed the connection .* TRANSFER"):
        link.receive(FrameType.TRANSFER)


def test_errors_are_channel_errors_and_sends_are_bounded() -> None:
    for cls in (FrameTooLargeError, UnexpectedFrameError, PeerTimeoutError, PeerRefusedError):
        assert issubclass(cls, ChannelError)
    a, b = socket.socketpair()
    with FramedConnection(a, timeout=TIMEOUT, peer="p") as link:
        with pytest.raises(ValueError):  # our own message over its limit: a programming error
            link.send(FrameType.COMMIT, bytes(FRAME_LIMITS[FrameType.COMMIT] + 1))
        with pytest.raises(ConfigurationError):
            FramedConnection(b, timeout=0, peer="p")
    b.close()
