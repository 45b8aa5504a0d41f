"""What a station drives: one chip in one socket (docs/station.md, "Plugging in a programmer").

A real programmer's software implements :class:`ChipPort` for the chip in a socket (three
calls the chip's SBM answers: identify, provision, program) and :class:`ChipSource` for the
sockets it has; the reference station (``securethread station run``) does the rest.  The
simulated chips of a vendor directory are one such source (:class:`SimulatedChips`); it can
keep each chip's installed image (``station run --keep-flash DIR``), which a simulated chip's
flash otherwise loses when the process ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
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

    def open(self) -> _SimulatedChip: ...


class _SimulatedChip(ChipPort, Protocol):
    """A simulated chip (securethread.device.SimulatedDevice): a port whose flash can be read."""

    @property
    def device_id(self) -> str: ...

    @property
    def flash(self) -> bytes | None: ...


class SimulatedChips:
    """Chips ``uids`` of a simulated fab, opened one at a time (the chip with a UID is the
    same chip on every run, so a resumed run meets the chips it did).  With ``keep_flash``,
    each chip that programmed its image leaves it in ``<keep_flash>/<device_id>.img``."""

    def __init__(
        self, fab: _Fab, uids: Sequence[int], *, keep_flash: str | os.PathLike[str] | None = None
    ) -> None:
        self._fab = fab
        self._uids = list(uids)
        self._keep = None if keep_flash is None else Path(keep_flash)

    def __len__(self) -> int:
        return len(self._uids)

    def __iter__(self) -> Iterator[tuple[str, ChipFactory]]:
        for uid in self._uids:
            yield f"{uid:016x}", _Opener(self._fab, uid, self._keep)


class _Opener:
    def __init__(self, fab: _Fab, uid: int, keep: Path | None) -> None:
        self._fab = fab
        self._uid = uid
        self._keep = keep

    def __call__(self) -> ChipPort:
        chip = self._fab.chip(self._uid).open()
        return chip if self._keep is None else _KeptFlash(chip, self._keep)


class _KeptFlash:
    """A simulated chip whose installed image -- the MCUboot image its SBM verified,
    decrypted and wrote to flash (docs/device.md) -- is written to ``<dir>/<device_id>.img``
    once :meth:`program` succeeded, so tools such as ``imgtool verify`` can read it later."""

    def __init__(self, chip: _SimulatedChip, directory: Path) -> None:
        self._chip = chip
        self._dir = directory

    def identify(self, challenge: bytes) -> bytes:
        return self._chip.identify(challenge)

    def provision(self, data: bytes) -> None:
        self._chip.provision(data)

    def program(self, manifest: bytes, image: BinaryIO, license: bytes, nonce: bytes) -> bytes:
        from securethread.workdir import write_atomic

        boot = self._chip.program(manifest, image, license, nonce)
        installed = self._chip.flash
        if installed is None:  # a confirmation without an image in flash: a bug in the SBM
            raise RuntimeError(f"chip {self._chip.device_id}: programmed but its flash is empty")
        write_atomic(self._dir / f"{self._chip.device_id}.img", installed)
        return boot


__all__ = ["ChipFactory", "ChipPort", "ChipSource", "SimulatedChips"]
