"""Long-running processes (the appliance, its station server, a station) set their heap once
started: :func:`freeze_startup_heap`.

Python's cyclic collector walks every tracked object of the oldest generation on each full
collection.  In a service, nearly all of those were made at start-up and live until the
end -- modules, gRPC's and protobuf's descriptors, cryptography's and the token's objects --
and the collections they cost fall on devices in flight.  ``gc.freeze()`` (Python >= 3.7)
moves everything alive at that moment to a permanent generation the collector skips, so a
collection walks only what devices allocate.  Measured with the station benchmark's one
socket (benchmarks/bench_stations.py; docs/station.md): the station's per-device p50 and
p99 both dropped, the p99 by the most.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left over, then freeze what is alive (call once, when ready to
    serve: objects made later are collected as usual)."""
    gc.collect()
    gc.freeze()


__all__ = ["freeze_startup_heap"]
