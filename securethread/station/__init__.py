"""The station: the untrusted line's client of the appliance's station API.

A station is a programmer's hardware and software driving chips in its sockets.  It holds
nothing secret (its TLS key only authenticates it) and trusts the appliance only as far as
TLS under the station CA goes; the chip's SBM checks everything it is given.  This package
imports formats/ and device/ only, never programmer/ (tests/unit/test_layout.py):

* :mod:`.adapters` -- the :class:`~.adapters.ChipPort` protocol a real programmer's
  software implements, and the simulated chips of a vendor directory;
* :mod:`.client` -- the gRPC client (mutual TLS, client-side round-robin over appliances),
  key and CSR generation, and :func:`~.client.run_station`, the per-device loop.
"""

from securethread.station.adapters import ChipPort, ChipSource, SimulatedChips
from securethread.station.client import (
    ApplianceClient,
    StationCallError,
    StationCredentials,
    StationResult,
    keygen,
    run_station,
)

__all__ = [
    "ApplianceClient",
    "ChipPort",
    "ChipSource",
    "SimulatedChips",
    "StationCallError",
    "StationCredentials",
    "StationResult",
    "keygen",
    "run_station",
]
