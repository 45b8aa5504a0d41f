"""What a station drives: one chip in one socket (docs/station.md, "Plugging in a programmer").

A real programmer's software implements :class:`ChipPort` for the chip in a socket (three
calls the chip's SBM answers: identify, provision, program) and :class:`ChipSource` for the
sockets it has; the reference station (``securethread station run``) does the rest.  The
simulated chips of a vendor directory are one such source (:class:`SimulatedChips`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol


class ChipPort(Protocol):
    """One chip, as its SBM answers (docs/device.md); the same shape as the appliance
    line's DevicePort, so one adapter serves both.  Raise to refuse: the station reports
    the device as failed and goes on."""

    def identify(self, challenge: bytes) -> bytes:
        """The chip's signed identification over ``challenge`` (the appliance's)."""
        ...

    def provision(self, data: bytes) -> None:
        """Give the chip its provisioning data (the SBM verifies it before keeping it)."""
        ...

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes:
        """Program the image; returns the chip's signed boot confirmation over ``nonce``."""
        ...


class ChipSource(Protocol):
    """The chips a station has in its sockets, in order: ``(label, open)`` pairs; ``open``
    connects to the chip (the label is for reports: identification decides who it is)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[str, ChipFactory]]: ...


class ChipFactory(Protocol):
    def __call__(self) -> ChipPort: ...


class _Fab(Protocol):
    """A simulated fab (securethread.demo.line.SimulatedFab): the part with a UID."""

    def chip(self, uid: int) -> _Spec: ...


class _Spec(Protocol):
    @property
    def device_id(self) -> str: ...

    def open(self) -> ChipPort: ...


class SimulatedChips:
    """Chips ``uids`` of a simulated fab, opened one at a time (the chip with a UID is the
    same chip on every run, so a resumed run meets the chips it did)."""

    def __init__(self, fab: _Fab, uids: Sequence[int]) -> None:
        self._fab = fab
        self._uids = list(uids)

    def __len__(self) -> int:
        return len(self._uids)

    def __iter__(self) -> Iterator[tuple[str, ChipFactory]]:
        for uid in self._uids:
            yield f"{uid:016x}", _Opener(self._fab, uid)


class _Opener:
    def __init__(self, fab: _Fab, uid: int) -> None:
        self._fab = fab
        self._uid = uid

    def __call__(self) -> ChipPort:
        return self._fab.chip(self._uid).open()


__all__ = ["ChipFactory", "ChipPort", "ChipSource", "SimulatedChips"]
