"""The operators' side of the appliance: one framed request per UNIX-socket connection.

An operator's ``securethread programmer CMD --appliance SOCKET`` sends the command, its
options and the bytes of its input files; the appliance (:mod:`.appliance`) runs the step on
its own state directory and answers with events (``listening`` for receive-keys), then one
result: the step's JSON, the lines to print, its error if any, and the files the step put in
its outbox.  The operator never names a path inside the state directory and never sees the
PIN (docs/appliance.md).

Wire format (version 1), every frame a 4-byte big-endian length and that many bytes::

    request:  header  {"v": 1, "command": str, "options": {...}, "files": [[name, size], ...]}
              then one frame per file, in order
    answer:   zero or more {"type": "event", ...}, then
              {"type": "result", "ok": bool, "result": {...}, "lines": [...],
               "error": {"type", "message", "exit_code"} | null, "files": [[name, size], ...]}
              then one frame per file

Limits: a header of at most 1 MiB, at most 16 files, each at most 256 MiB, in all 512 MiB.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from securethread.errors import ConfigurationError, Error, FormatError

VERSION = 1
MAX_HEADER = 1 << 20
MAX_FILES = 16
MAX_FILE = 256 << 20
MAX_TOTAL = 512 << 20
#: The environment variable naming the appliance's socket (``--appliance`` wins).
ENV_SOCKET = "SECURETHREAD_APPLIANCE"
_LEN = struct.Struct(">I")

OptionValue = str | int | float | bool | None | list[str]


class ApplianceUnavailableError(ConfigurationError):
    """No appliance answers on the socket (not started, stopped, killed mid-answer)."""


class RequestError(FormatError):
    """A request or an answer on the operator socket is malformed or over a limit."""


class RemoteError(Error):
    """The appliance ran the operation and it failed there: its error type, message and
    the exit code the CLI documents for it."""

    def __init__(self, remote_type: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.exit_code = exit_code


@attrs.frozen
class Request:
    """One operation: a command name, its options, its input files (name -> bytes)."""

    command: str
    options: Mapping[str, OptionValue] = attrs.field(factory=dict)
    files: Sequence[tuple[str, bytes]] = ()


@attrs.frozen
class Answer:
    """The appliance's answer: the step's JSON, lines to print, error, outbox files."""

    ok: bool
    result: Mapping[str, Any]
    lines: Sequence[str] = ()
    error: Mapping[str, Any] | None = None
    files: Sequence[tuple[str, bytes]] = ()
    #: called once the answer was sent (the step's result record is then dropped)
    delivered: Callable[[], None] | None = attrs.field(default=None, eq=False)


# --- frames ---------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: int) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > limit:
        raise RequestError(f"a frame of {n} bytes is over the limit of {limit}")
    return _recv_exact(sock, n)


def send_frame(sock: socket.socket, data: bytes) -> None:
    if len(data) < 65536:
        sock.sendall(_LEN.pack(len(data)) + data)
    else:
        sock.sendall(_LEN.pack(len(data)))
        sock.sendall(data)


def _send_json(sock: socket.socket, obj: Mapping[str, Any]) -> None:
    send_frame(sock, json.dumps(obj, sort_keys=True, default=str).encode())


def _recv_json(sock: socket.socket) -> dict[str, Any]:
    raw = recv_frame(sock, MAX_HEADER)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("a header on the operator socket is not JSON") from None
    if not isinstance(obj, dict):
        raise RequestError("a header on the operator socket is not a JSON object")
    return obj


def _file_list(value: object) -> list[tuple[str, int]]:
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise RequestError(f"files: expected a list of at most {MAX_FILES} [name, size]")
    out: list[tuple[str, int]] = []
    total = 0
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or type(item[1]) is not int
        ):
            raise RequestError("files: each entry is [name, size]")
        name, size = item
        if not 0 < len(name) <= 128 or "/" in name or name.startswith(".") or "\0" in name:
            raise RequestError(f"files: {name!r} is not a plain file name")
        if not 0 <= size <= MAX_FILE:
            raise RequestError(f"files: {name!r} is over the limit of {MAX_FILE} bytes")
        total += size
        out.append((name, size))
    if total > MAX_TOTAL:
        raise RequestError(f"files: {total} bytes in all is over the limit of {MAX_TOTAL}")
    if len({n for n, _ in out}) != len(out):
        raise RequestError("files: a name appears twice")
    return out


def _recv_files(sock: socket.socket, listed: list[tuple[str, int]]) -> list[tuple[str, bytes]]:
    files = []
    for name, size in listed:
        data = recv_frame(sock, size)
        if len(data) != size:
            raise RequestError(f"file {name!r}: {len(data)} bytes, {size} announced")
        files.append((name, data))
    return files


def _send_files(sock: socket.socket, files: Sequence[tuple[str, bytes]]) -> None:
    for _name, data in files:
        send_frame(sock, data)


# --- the appliance's side -------------------------------------------------------------------------


def read_request(sock: socket.socket) -> Request:
    """The one request of a connection, every field and limit checked."""
    try:
        head = _recv_json(sock)
        if head.get("v") != VERSION:
            raise RequestError(f"request version {head.get('v')!r}; this appliance speaks 1")
        command, options = head.get("command"), head.get("options", {})
        if not isinstance(command, str) or not 0 < len(command) <= 64:
            raise RequestError("request: command is not a short string")
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise RequestError("request: options is not an object")
        for k, v in options.items():
            ok = v is None or isinstance(v, str | int | float | bool) or (
                isinstance(v, list) and all(isinstance(x, str) for x in v)
            )
            if not ok:
                raise RequestError(f"request: option {k!r} has a value of another kind")
        files = _recv_files(sock, _file_list(head.get("files", [])))
    except EOFError:
        raise RequestError("the operator closed the connection inside its request") from None
    return Request(command, options, files)


def send_event(sock: socket.socket, event: str, **fields: Any) -> None:
    _send_json(sock, {"type": "event", "event": event, **fields})


def send_answer(sock: socket.socket, answer: Answer) -> None:
    _send_json(
        sock,
        {
            "type": "result",
            "ok": answer.ok,
            "result": dict(answer.result),
            "lines": list(answer.lines),
            "error": None if answer.error is None else dict(answer.error),
            "files": [[n, len(d)] for n, d in answer.files],
        },
    )
    _send_files(sock, answer.files)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end: SO_PEERCRED, socket(7), as the
    kernel recorded them at connect(2) -- nothing the client says."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


# --- the operator's side --------------------------------------------------------------------------


def socket_path(explicit: str | None) -> str:
    """The socket from ``--appliance``, else ``$SECURETHREAD_APPLIANCE``."""
    path = explicit or os.environ.get(ENV_SOCKET)
    if not path:
        raise ConfigurationError(f"name the appliance's socket (--appliance or ${ENV_SOCKET})")
    return path


def call(
    path: str,
    request: Request,
    *,
    on_event: Callable[[Mapping[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> Answer:
    """Send ``request`` to the appliance at ``path``; return its answer.  Raises
    :class:`ApplianceUnavailableError` when no appliance answers (one clear line, exit 2)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10.0)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ApplianceUnavailableError(
                f"no appliance is listening on {path!r} (is 'securethread appliance serve' "
                "running?)"
            ) from None
        except PermissionError:
            raise ApplianceUnavailableError(
                f"not allowed to connect to the appliance socket {path!r} (operators are "
                "members of the appliance's --operators group)"
            ) from None
        except OSError as exc:
            raise ApplianceUnavailableError(
                f"cannot connect to the appliance socket {path!r}: {exc.strerror}"
            ) from None
        sock.settimeout(timeout)
        files = [(n, d) for n, d in request.files]
        _file_list([[n, len(d)] for n, d in files])  # the same limits as the appliance's
        try:
            _send_json(
                sock,
                {
                    "v": VERSION,
                    "command": request.command,
                    "options": dict(request.options),
                    "files": [[n, len(d)] for n, d in files],
                },
            )
            _send_files(sock, files)
            while True:
                head = _recv_json(sock)
                if head.get("type") == "event":
                    if on_event is not None:
                        on_event(head)
                    continue
                if head.get("type") != "result":
                    raise RequestError("the appliance answered with an unknown message")
                got = _recv_files(sock, _file_list(head.get("files", [])))
                err = head.get("error")
                return Answer(
                    ok=bool(head.get("ok")),
                    result=head.get("result") or {},
                    lines=[str(x) for x in head.get("lines") or []],
                    error=err if isinstance(err, dict) else None,
                    files=got,
                )
        except (EOFError, ConnectionResetError, BrokenPipeError):
            raise ApplianceUnavailableError(
                f"the appliance on {path!r} closed the connection before it answered (it was "
                "stopped or killed; run the command again once it is back: a step is done "
                "once or not at all)"
            ) from None
    finally:
        sock.close()


def write_outbox(outbox: str | os.PathLike[str], files: Sequence[tuple[str, bytes]]) -> list[str]:
    """Write the files an answer carried into the operator's outbox directory."""
    from securethread.workdir import write_atomic

    out = Path(outbox)
    written = []
    for name, data in files:
        write_atomic(out / name, data)
        written.append(str(out / name))
    return written


__all__ = [
    "ENV_SOCKET",
    "Answer",
    "ApplianceUnavailableError",
    "RemoteError",
    "Request",
    "RequestError",
    "call",
    "peer_credentials",
    "read_request",
    "send_answer",
    "send_event",
    "socket_path",
    "write_outbox",
]
