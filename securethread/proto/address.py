"""``HOST:PORT`` of the station API, as both ends check it before gRPC sees it.

gRPC reads an address its own way: a port above 65535 is taken modulo 65536 (``--stations
127.0.0.1:99999`` listened on 34463), and an address it cannot use is each call's failure to
connect, not one refusal.  So the appliance (``--stations``) and the station
(``--appliance``) check the form first and name what is wrong in one line."""

from __future__ import annotations

import re
import socket

from securethread.errors import ConfigurationError

# a DNS name or IPv4 address, or an IPv6 address in brackets (gRPC's target form); a port
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):([0-9]{1,5})")


def check_address(text: str, *, what: str, listen: bool = False) -> str:
    """``text`` if it is ``HOST:PORT`` (port 1-65535, or 0 -- any free one -- where to
    ``listen``; an IPv6 host in brackets), else one :class:`ConfigurationError` naming
    ``what``.  A host to listen on must also resolve (else gRPC logs its lookup failure
    on stderr before the refusal)."""
    found = _ADDRESS.fullmatch(text)
    lowest = 0 if listen else 1
    if found is None or not lowest <= int(found.group(2)) <= 65535:
        raise ConfigurationError(f"{what} {text!r} is not HOST:PORT (a port {lowest}-65535; an "
                                 "IPv6 address in brackets)")  # fmt: skip
    if listen:
        host = found.group(1).strip("[]")
        try:
            socket.getaddrinfo(host, int(found.group(2)), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise ConfigurationError(f"{what} {text!r}: no address for {host!r}") from None
    return text
