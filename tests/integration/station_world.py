"""Shared setup for the station API tests: the world builders of the ``stations`` benchmark
(two sites up to opened jobs through the real CLI, the station server in a process of its
own, stations certified by ``programmer add-station``)."""

from benchmarks.bench_stations import (
    CLI,
    FIRST_UID,
    ServerProcess,
    add_station,
    build_sites,
    cli,
    last_json,
    station_args,
)

__all__ = [
    "CLI",
    "FIRST_UID",
    "ServerProcess",
    "add_station",
    "build_sites",
    "cli",
    "last_json",
    "station_args",
]
