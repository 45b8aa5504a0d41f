"""Socket waits that a signal always ends (the key channel's accept, connect, send, receive).

CPython runs a Python signal handler only between bytecodes; its C-level handler merely notes
the signal.  A signal that lands after the interpreter's last check but before a blocking
system call starts -- ``socket.accept()`` with a timeout is ``poll(2)`` then ``accept(2)`` --
is noted and then waits, with the process, for the whole timeout: nothing interrupts a
``poll`` that had not begun, and PEP 475 retries on ``EINTR`` only run the handler when the
call *was* interrupted.  (``receive-keys`` answered such a SIGINT after its 60 s accept
timeout.)  This is the race ``pselect(2)`` and the self-pipe trick exist for.

The fix is the self-pipe: :func:`signal.set_wakeup_fd` makes the C-level handler also write a
byte to a pipe, whenever the signal comes, and every wait here polls that pipe beside its
socket.  The pipe is installed *before* the socket is polled, and a signal noted before the
installation is run by the interpreter's check right after it, so no instant is left in
which a signal can go unanswered.  Once the pipe is readable the handler runs as soon as the
poll returns (and raises, for the CLI's SIGINT and SIGTERM); a handler that only notes the
signal lets the wait go on.

Where this process's wakeup descriptor belongs to someone else (an asyncio loop), or outside
the main thread (where Python runs no handler), the wait is sliced into polls of at most
:data:`SLICE` seconds instead: a signal is then answered within that bound.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Iterator

#: The longest single poll when no wakeup pipe of ours can be installed (seconds).
SLICE = 0.25

_installed: int | None = None  # read end of the wakeup pipe this module installed


@contextlib.contextmanager
def signal_wakeup() -> Iterator[int | None]:
    """The read end of a pipe that any signal with a Python handler makes readable, for the
    time of one wait; None where that cannot be had (see the module docstring).  Nested
    waits share the outer pipe."""
    global _installed
    # The thread check comes first: the pipe belongs to the main thread's wait, which closes
    # it when it ends, so another thread must never borrow it (a wait in a server thread
    # polled a descriptor the main thread had just closed: EBADF).
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    if _installed is not None:
        yield _installed
        return
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)  # set_wakeup_fd requires it: a full pipe must not block
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        old = None
    if old != -1:  # another owner (asyncio), or none could be set: theirs stays
        if old is not None:
            signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
        yield None
        return
    _installed = r
    try:
        yield r
    finally:
        _installed = None
        signal.set_wakeup_fd(-1)
        os.close(r)
        os.close(w)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 512):
            pass


def wait_ready(sock: socket.socket, *, write: bool = False, deadline: float | None) -> bool:
    """Wait until ``sock`` is readable (``write``: writable), or until ``deadline``
    (:func:`time.monotonic`; None: for ever); False at the deadline.

    A signal ends the poll at once; its handler runs before this returns or raises through
    it.  The socket's own mode is not changed.
    """
    event = selectors.EVENT_WRITE if write else selectors.EVENT_READ
    with signal_wakeup() as wake, selectors.DefaultSelector() as sel:
        sel.register(sock, event)
        if wake is not None:
            sel.register(wake, selectors.EVENT_READ)
        while True:
            if deadline is None:
                remaining = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
            if wake is None:
                remaining = SLICE if remaining is None else min(remaining, SLICE)
            for key, _events in sel.select(remaining):
                if key.fileobj is sock:
                    return True
            if wake is not None:
                _drain(wake)  # the handler ran (and did not raise): wait on
