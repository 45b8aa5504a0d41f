"""Test helpers for the key channel over TCP on 127.0.0.1.

A side of the channel runs in a thread (:class:`Background`); :class:`FrameProxy` sits
between the OEM and the programmer, records every frame and can cut both connections after
a given number of frames, the way a network failure would.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from securethread.channel.transport import HEADER, FrameType

Address = tuple[str, int]
LOCALHOST = "127.0.0.1"


class Background:
    """Run ``fn`` in a thread; :meth:`result` joins and returns its value or raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 60) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("background side did not finish")
        if self._error is not None:
            raise self._error
        return self._value

    def error(self, timeout: float = 60) -> BaseException:
        """The exception the side ended with (fails the test if it succeeded)."""
        try:
            value = self.result(timeout)
        except BaseException as exc:  # noqa: BLE001
            return exc
        raise AssertionError(f"expected the side to fail, it returned {value!r}")


def serve_in_background(serve: Callable[..., Any], **kwargs: Any) -> tuple[Background, Address]:
    """Start ``serve`` (serve_key_session) on 127.0.0.1:0; return it and its bound address."""
    bound: queue.Queue[Address] = queue.Queue()
    side = Background(serve, LOCALHOST, 0, ready=bound.put, **kwargs)
    try:
        return side, bound.get(timeout=30)
    except queue.Empty:
        side.result(1)  # raises the reason it never listened
        raise


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    length, kind = HEADER.unpack(recv_exact(sock, HEADER.size))
    return kind, recv_exact(sock, length)


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


class FrameProxy:
    """A TCP proxy on 127.0.0.1 for one connection, frame by frame.

    ``frames`` records ``(direction, type, payload)`` with direction ``"oem"`` (OEM to
    programmer) or ``"programmer"``; ``raw`` holds every byte per direction.  With
    ``drop_after=n`` both connections are cut right after the n-th frame was forwarded; with
    ``stall_after=n`` nothing more is forwarded after the n-th frame, but the connections
    stay open (a peer that stops talking) until one side closes its end.
    """

    def __init__(
        self, upstream: Address, *, drop_after: int | None = None, stall_after: int | None = None
    ) -> None:
        self.upstream = upstream
        self.drop_after = drop_after
        self.stall_after = stall_after
        self._is_cut = False
        self.frames: list[tuple[str, int, bytes]] = []
        self.raw: dict[str, bytearray] = {"oem": bytearray(), "programmer": bytearray()}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server((LOCALHOST, 0), backlog=1)
        self.address: Address = self._listener.getsockname()[:2]
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def types(self) -> list[str]:
        return [FrameType(k).name for _d, k, _p in self.frames]

    def _run(self) -> None:
        client, _ = self._listener.accept()
        self._listener.close()
        server = socket.create_connection(self.upstream)
        self._socks = [client, server]
        pumps = [
            threading.Thread(target=self._pump, args=(client, server, "oem"), daemon=True),
            threading.Thread(target=self._pump, args=(server, client, "programmer"), daemon=True),
        ]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join()
        self.cut()
        self._done.set()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                header = recv_exact(src, HEADER.size)
                length, kind = HEADER.unpack(header)
                payload = recv_exact(src, length)
                if self.stall_after is not None and len(self.frames) >= self.stall_after:
                    continue  # swallowed: read on, so a side that closes is still noticed
                with self._lock:
                    if self._is_cut:
                        return  # read before the cut, never forwarded
                    self.frames.append((direction, kind, payload))
                    self.raw[direction] += header + payload
                    dst.sendall(header + payload)
                    if self.drop_after is not None and len(self.frames) >= self.drop_after:
                        self.cut()
                        return
        except OSError:
            self.cut()

    def cut(self) -> None:
        self._is_cut = True
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def wait(self, timeout: float = 30) -> None:
        self._done.wait(timeout)


def object_census(token: Any) -> Counter[tuple[int, str]]:
    """Every object the token shows this process (token and session objects), by class and
    label: what a session must leave unchanged when it fails."""
    from pkcs11 import Attribute

    out: Counter[tuple[int, str]] = Counter()
    for obj in token.session.get_objects():
        attrs = obj.get_attributes([Attribute.CLASS, Attribute.LABEL])
        out[(int(attrs[Attribute.CLASS]), str(attrs[Attribute.LABEL]))] += 1
    return out


def assert_same_key(oem: Any, programmer: Any, label: str) -> None:
    """The programmer's stored key ``label`` equals the OEM's: licensed to a device key (the
    one use the programmer's copy has), it decrypts what the OEM's key encrypted."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from tests.license_probe import licensed_value

    value = licensed_value(programmer, programmer.secret_key(label))
    nonce = os.urandom(12)
    ct = oem.secret_key(label).encrypt_gcm(nonce, b"firmware", b"")
    assert AESGCM(value).decrypt(nonce, ct, b"") == b"firmware"
