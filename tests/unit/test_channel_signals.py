"""A signal ends every wait of the key channel, whenever it arrives (no token).

The bug these guard against: a signal whose C-level handler ran just before a blocking
``poll`` began was answered only when the poll timed out (``receive-keys`` ignored a SIGINT
for its 60 s accept timeout).  Here the signal is sent to a helper thread of this process:
its C-level handler runs there, so the main thread's wait is not interrupted (no ``EINTR``)
-- the state the race leaves behind, made deterministic.  Only the wakeup pipe of
:mod:`securethread.channel.wait` can end such a wait before its timeout.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from securethread.channel import wait as channel_wait
from securethread.channel.transport import (
    HEADER,
    FramedConnection,
    FrameType,
    send_key_session,
    serve_key_session,
)
from securethread.hsm import IMAGE_KEY, SoftwareBackend
from tests.unit import test_channel_software as _software

world = _software.world  # the module-scoped software PKI (both enclaves certified)

#: Each wait's own timeout: a signal must end the wait long before it.
WAIT = 20.0


class Stopped(BaseException):
    """What the raising handler raises (as the CLI's SIGINT and SIGTERM handlers do)."""


@contextmanager
def signal_from_another_thread(
    after: float, handler: Callable[[int, Any], None] | None = None
) -> Iterator[None]:
    """SIGUSR1, ``after`` seconds from now, delivered to a helper thread of this process."""

    def stop(_signum: int, _frame: Any) -> None:
        raise Stopped

    old = signal.signal(signal.SIGUSR1, handler or stop)

    def fire() -> None:
        time.sleep(after)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    helper = threading.Thread(target=fire, name="signal-sender")
    helper.start()
    try:
        yield
    finally:
        helper.join()
        signal.signal(signal.SIGUSR1, old)


def _programmer(w: dict[str, Any]) -> dict[str, Any]:
    prog = w["prog"]
    return {
        "backend": prog,
        "identity_key": prog.private_key("id"),
        "identity_cert": w["programmer-cert"],
        "root_cert": w["root"],
    }


def _wait_accept(w: dict[str, Any]) -> None:
    serve_key_session("127.0.0.1", 0, timeout=WAIT, accept_timeout=WAIT, **_programmer(w))


def _wait_first_frame(w: dict[str, Any]) -> None:
    """The programmer accepted a connection on which nothing comes."""
    clients: list[socket.socket] = []
    try:
        serve_key_session(
            "127.0.0.1", 0, timeout=WAIT, accept_timeout=WAIT,
            ready=lambda addr: clients.append(socket.create_connection(addr)),
            **_programmer(w),
        )  # fmt: skip
    finally:
        for c in clients:
            c.close()


def _wait_connect(w: dict[str, Any]) -> None:
    """The OEM connects to a listener whose backlog is full: the SYN goes unanswered."""
    oem = w["oem"]
    assert isinstance(oem, SoftwareBackend)
    if not oem.has_key("signal-test-key"):
        oem.generate_aes("signal-test-key", policy=IMAGE_KEY)
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname()):  # takes the one backlog place
            send_key_session(
                *full.getsockname(), backend=oem, identity_key=oem.private_key("id"),
                identity_cert=w["oem-cert"], root_cert=w["root"],
                expected_programmer=w["programmer-cert"], labels=["signal-test-key"],
                timeout=WAIT,
            )  # fmt: skip


def _wait_send(_w: dict[str, Any]) -> None:
    """A frame to a peer that reads nothing: the send buffer stays full."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        try:
            while True:
                a.send(bytes(1 << 16))
        except BlockingIOError:
            pass
        with FramedConnection(a, timeout=WAIT, peer="silent peer") as link:
            link.send(FrameType.TRANSFER, bytes(1 << 15))
    finally:
        a.close()
        b.close()


WAITS = {
    "accept": _wait_accept,
    "first frame": _wait_first_frame,
    "connect": _wait_connect,
    "send": _wait_send,
}


@pytest.mark.parametrize("which", list(WAITS))
def test_a_signal_ends_the_wait_long_before_its_timeout(
    world: dict[str, Any], which: str
) -> None:
    t0 = time.monotonic()
    with pytest.raises(Stopped), signal_from_another_thread(0.2):
        WAITS[which](world)
    assert time.monotonic() - t0 < WAIT / 2, f"the {which} wait ran into its own timeout"


def test_a_handler_that_only_notes_the_signal_lets_the_wait_go_on() -> None:
    """A handler that does not raise (the provisioning run's stop flag) runs at once, and
    the wait then goes on: the frame that comes later is received."""
    noted: list[float] = []
    sent: list[float] = []
    a, b = socket.socketpair()

    def later() -> None:
        time.sleep(0.6)
        sent.append(time.monotonic())
        b.sendall(HEADER.pack(3, FrameType.ACK) + b"ack")

    sender = threading.Thread(target=later)
    sender.start()
    try:
        with (
            FramedConnection(a, timeout=WAIT, peer="p") as link,
            signal_from_another_thread(0.1, lambda *_: noted.append(time.monotonic())),
        ):
            assert link.receive(FrameType.ACK) == b"ack"
    finally:
        sender.join()
        b.close()
    assert len(noted) == 1 and noted[0] < sent[0]  # handled before the frame came, not after


def test_the_wakeup_pipe_is_removed_after_the_wait() -> None:
    """A wait leaves no wakeup descriptor behind, and one that belongs to someone else (an
    asyncio loop) is left alone: the wait falls back to short polls."""
    a, b = socket.socketpair()
    try:
        with FramedConnection(a, timeout=0.2, peer="p") as link:
            with pytest.raises(Exception, match="no complete ACK frame"):
                link.receive(FrameType.ACK)
        assert signal.set_wakeup_fd(-1) == -1
        theirs_r, theirs_w = socket.socketpair()
        theirs_w.setblocking(False)
        signal.set_wakeup_fd(theirs_w.fileno())
        try:
            with channel_wait.signal_wakeup() as wake:
                assert wake is None
            assert signal.set_wakeup_fd(theirs_w.fileno()) == theirs_w.fileno()
        finally:
            signal.set_wakeup_fd(-1)
            theirs_r.close()
            theirs_w.close()
    finally:
        b.close()


def test_with_someone_elses_wakeup_pipe_a_signal_ends_the_wait_within_a_slice() -> None:
    theirs_r, theirs_w = socket.socketpair()
    theirs_w.setblocking(False)
    signal.set_wakeup_fd(theirs_w.fileno())
    a, b = socket.socketpair()
    t0 = time.monotonic()
    try:
        with pytest.raises(Stopped), signal_from_another_thread(0.1):
            channel_wait.wait_ready(a, deadline=time.monotonic() + WAIT)
        assert time.monotonic() - t0 < WAIT / 2
    finally:
        signal.set_wakeup_fd(-1)
        for s in (a, b, theirs_r, theirs_w):
            s.close()


def test_sigterm_is_not_an_exception_a_best_effort_cleanup_could_swallow() -> None:
    """The CLI's SIGTERM exception, like KeyboardInterrupt, is not an Exception: the
    channel's ``except Exception`` around cleanups lets it through."""
    from securethread.channel.transfer import _destroy_quietly
    from securethread.cli import Interrupted, exit_code

    class Key:
        label = "k"

        def destroy(self) -> None:
            raise Interrupted("stopped by SIGTERM", signal.SIGTERM)

    assert not issubclass(Interrupted, Exception)
    with pytest.raises(Interrupted):
        _destroy_quietly([Key()])  # type: ignore[list-item]
    assert exit_code(Interrupted("stopped by SIGTERM", signal.SIGTERM)) == 143


def test_another_thread_never_borrows_the_main_threads_wakeup_pipe() -> None:
    """Regression: a server thread's wait borrowed the pipe of a wait in the main thread,
    which closed it on return; the thread then polled a closed descriptor (EBADF, and the
    key channel ended with "internal error").  A thread other than the main one gets no
    pipe (it polls in slices), whatever the main thread is doing."""
    seen: list[int | None] = []

    def borrow() -> None:
        with channel_wait.signal_wakeup() as theirs:
            seen.append(theirs)

    with channel_wait.signal_wakeup() as mine:
        assert mine is not None
        t = threading.Thread(target=borrow)
        t.start()
        t.join()
    assert seen == [None]
