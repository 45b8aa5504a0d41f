"""The simulated side of the production line: the silicon vendor's directory and its chips.

A real line talks to real chips through a programming adapter; here the chips are
:class:`securethread.device.ChipSpec` simulations made by a software fab that lives in a
directory of its own::

    <vendor>/root-ca.pem     the fab's device-identity CA certificate (the OEM names it in
                             a job spec's ``vendors``; the line trusts it only through a job)
    <vendor>/vendor-key.pem  the fab's CA key (0600; a simulation's key, kept to reload it)
    <vendor>/chip-seed       seed the simulated chip keys derive from (0600), so that the
                             chip with a given UID is the same chip in every run (a resumed
                             run meets the chips it already counted)
    <vendor>/order.json      the OEM's order: the SHA-256 of the OEM root (burnt in OTP)
    <vendor>/otp/<uid>.bin   the OTP of a chip provisioned at the fab (:func:`keep_otp`): the
                             chip with that UID leaves the fab provisioned, and a programming
                             centre meets it so (it identifies by its OEM device certificate)

This module knows two parties (the fab and the programmer's line), which is why it lives
beside the demo and the CLI, not in either role package.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.device import ChipSpec, SiliconVendor
from securethread.errors import ConfigurationError, FormatError
from securethread.formats.device_trust import oem_root_hash
from securethread.workdir import StepResult, read_file, to_pem, write_atomic

VENDOR_ROOT = "root-ca.pem"
VENDOR_KEY = "vendor-key.pem"
CHIP_SEED = "chip-seed"
ORDER = "order.json"
OTP_DIR = "otp"
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def create_vendor(directory: str | os.PathLike[str], *, oem_root: str | os.PathLike[str]) -> Path:
    """Set up a simulated fab in ``directory`` that takes the OEM's order (its root)."""
    from securethread.pki import from_pem

    d = Path(directory)
    if d.exists() and any(p.name != "inbox" for p in d.iterdir()):
        raise ConfigurationError(f"{str(d)!r} already holds a vendor")
    root = from_pem(read_file(oem_root, "OEM root certificate"))
    vendor = SiliconVendor()
    key_pem = vendor.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(d / VENDOR_KEY, key_pem, mode=0o600)
    write_atomic(d / CHIP_SEED, secrets.token_bytes(32), mode=0o600)
    write_atomic(d / ORDER, json.dumps({"oem_root_sha256": oem_root_hash(root).hex()}).encode())
    write_atomic(d / VENDOR_ROOT, to_pem(vendor.root_certificate))  # last: marks it made
    return d


class SimulatedFab:
    """A fab directory made by :func:`create_vendor`, reloaded."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from securethread.pki import from_pem

        d = Path(directory)
        if not (d / VENDOR_ROOT).is_file():
            raise ConfigurationError(f"{str(d)!r} is not a simulated vendor directory")
        self.root_certificate = from_pem(read_file(d / VENDOR_ROOT, "vendor root"))
        try:
            key = serialization.load_pem_private_key(read_file(d / VENDOR_KEY, "vendor key"), None)
        except ValueError:
            raise FormatError(f"{str(d / VENDOR_KEY)!r} is not a PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FormatError(f"{str(d / VENDOR_KEY)!r} is not an EC key")
        self.vendor = SiliconVendor.from_key(key, self.root_certificate)
        self._dir = d
        self._seed = read_file(d / CHIP_SEED, "chip seed")
        try:
            order = json.loads(read_file(d / ORDER, "vendor order"))
            self.oem_root_hash = bytes.fromhex(order["oem_root_sha256"])
        except (ValueError, KeyError, TypeError):
            raise FormatError(f"{str(d / ORDER)!r} is damaged") from None

    def chip(self, uid: int) -> ChipSpec:
        """The part with this UID: its key derives from the fab's seed and the UID."""
        device_id = f"{uid:016x}"
        digest = hmac.new(self._seed, device_id.encode(), hashlib.sha512).digest()
        key = ec.derive_private_key(
            int.from_bytes(digest, "big") % (_P256_N - 1) + 1, ec.SECP256R1()
        )
        spec = self.vendor.make_spec(device_id, key=key, oem_root_hash=self.oem_root_hash)
        otp = self._dir / OTP_DIR / f"{device_id}.bin"
        if otp.is_file():  # provisioned at the fab: it leaves with its OTP written
            return attrs.evolve(spec, otp=read_file(otp, "chip OTP"))
        return spec

    def chips(self, uids: Sequence[int]) -> list[ChipSpec]:
        return [self.chip(u) for u in uids]


def keep_otp(directory: str | os.PathLike[str], device_id: str, otp: bytes) -> None:
    """Record that the fab's provisioning run wrote ``otp`` into chip ``device_id``
    (``SimulatedDevice.otp`` after its release): the simulated part keeps it from now on."""
    from securethread.formats.identity import check_device_id

    if type(otp) is not bytes or not otp:
        raise ConfigurationError(f"chip {device_id}: no OTP to keep (not provisioned)")
    write_atomic(Path(directory) / OTP_DIR / f"{check_device_id(device_id)}.bin", otp)


class _FabPort:
    """A chip on the fab's line: once it took its provisioning data, the fab keeps its OTP
    (:func:`keep_otp`), so the part leaves the fab provisioned."""

    def __init__(self, dev: Any, directory: str) -> None:
        self._dev, self._dir = dev, directory

    def identify(self, challenge: bytes) -> bytes:
        return bytes(self._dev.identify(challenge))

    def provision(self, data: bytes) -> None:
        self._dev.provision(data)
        keep_otp(self._dir, self._dev.device_id, self._dev.otp)

    def program(self, manifest: bytes, image: Any, license: bytes, nonce: bytes) -> bytes:
        raise ConfigurationError("a chip on the fab's line is not programmed there")


@attrs.frozen
class FabChip:
    """A :class:`~securethread.programmer.runner.PortFactory` for a part of the simulated
    fab in ``directory``, on that fab's own line (a "provision" job): see :class:`_FabPort`."""

    spec: ChipSpec
    directory: str

    @property
    def device_id(self) -> str:
        return self.spec.device_id

    def open(self) -> _FabPort:
        return _FabPort(self.spec.open(), self.directory)


def first_uid(targets: Any) -> int:
    """The UID of a job's first chip: the start of its first target range."""
    return int(targets.ranges[0][0]) if targets.ranges else int(min(targets.explicit), 16)


def simulated_chips(
    chips_from: str | os.PathLike[str], targets: Any, *, first: int, devices: int
) -> list[ChipSpec]:
    """Chips ``first`` .. ``first + devices - 1`` of the job's first target range, from the
    simulated fab in ``chips_from`` (the appliance's chip source for in-process runs)."""
    for name, value, low in (("--devices", devices, 1), ("--first", first, 0)):
        if value < low:
            raise ConfigurationError(f"{name} must be at least {low}")
    fab = SimulatedFab(chips_from)
    base = first_uid(targets)
    if base + first + devices > 1 << 64:
        raise ConfigurationError("--first and --devices reach beyond 64-bit chip UIDs")
    return fab.chips([base + first + i for i in range(devices)])


#: The files of a simulated fab an operator sends the appliance for a run (docs/appliance.md).
FAB_FILES = (VENDOR_ROOT, VENDOR_KEY, CHIP_SEED, ORDER)


def provision_simulated(
    workdir: str | os.PathLike[str],
    *,
    job_id: str,
    chips_from: str | os.PathLike[str],
    devices: int,
    first: int = 0,
    workers: int = 1,
    batch_size: int = 32,
    progress: Callable[[Any], None] | None = None,
) -> StepResult:
    """``programmer provision``: chips ``first`` .. ``first + devices - 1`` of the job's
    first target range, from the simulated fab in ``chips_from``, through the programmer's
    line.  The fab only supplies the chips: the line accepts them only if the job names the
    fab's CA (a fab the OEM did not name has its chips refused at identification)."""
    from securethread.programmer import job_targets, provision
    from securethread.programmer.provision import job_programs

    for name, value, low in (("--devices", devices, 1), ("--first", first, 0)):
        if value < low:
            raise ConfigurationError(f"{name} must be at least {low}")
    SimulatedFab(chips_from)  # the fab directory before the job: the order of the errors
    specs = simulated_chips(
        chips_from, job_targets(workdir, job_id), first=first, devices=devices
    )
    # A "provision" job runs at the fab itself: the parts leave it with their OTP written.
    chips: Sequence[Any] = specs
    if not job_programs(workdir, job_id):
        chips = [FabChip(spec, os.fspath(chips_from)) for spec in specs]
    return provision(
        workdir,
        job_id=job_id,
        chips=chips,
        workers=workers,
        batch_size=batch_size,
        progress=progress,
    )


__all__ = [
    "FAB_FILES",
    "FabChip",
    "SimulatedFab",
    "create_vendor",
    "first_uid",
    "keep_otp",
    "provision_simulated",
    "simulated_chips",
]
