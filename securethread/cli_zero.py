"""The commands of zero-secret programming (docs/cli.md, "Zero-secret programming"):
``vendor lot``, ``oem prelicense``, ``oem reconcile-lot`` and ``station flash-package``.

Each is a few lines over :mod:`securethread.device.lot`, :mod:`securethread.oem.prelicense`
and :mod:`securethread.station.flash`; the ``add_*`` functions hang them under their role
(called by :func:`securethread.cli.build_parser`).  Exit codes are the CLI's.
"""

from __future__ import annotations

import argparse
from typing import Any

from securethread import cli as C
from securethread.errors import ConfigurationError, DeviceRefusedError, Error

#: The demo's first chip UID (the demo's job targets start there too).
DEFAULT_FIRST_UID = "5ec0000000000000"


def _uids(first: str, devices: int) -> range:
    from securethread.formats.identity import check_device_id

    try:
        base = int(check_device_id(first.lower()), 16)
    except Error:
        raise ConfigurationError(f"--first-uid must be 16 hex digits, got {first!r}") from None
    if devices < 1 or base + devices > 1 << 64:
        raise ConfigurationError("--devices must be at least 1 and stay within 64-bit UIDs")
    return range(base, base + devices)


# --- vendor -----------------------------------------------------------------------------------


def vendor_lot(a: argparse.Namespace) -> int:
    from pathlib import Path

    from securethread.demo.line import SimulatedFab
    from securethread.device.lot import lot_manifest
    from securethread.formats.envelope import content_id
    from securethread.formats.lot import LOT_KIND, MAX_LOT_SIZE
    from securethread.workdir import write_atomic

    uids = _uids(a.first_uid, a.devices)
    fab = SimulatedFab(a.workdir)
    data = lot_manifest(
        fab.vendor, fab.chips(uids), lot_id=a.lot_id, device_class=a.device_class
    )
    write_atomic(Path(a.out), data)
    digest = content_id(data, kind=LOT_KIND, max_size=MAX_LOT_SIZE).hex()
    return C._finish(
        a,
        [f"vendor lot: lot {a.lot_id} of {len(uids)} chips ({uids[0]:016x}..{uids[-1]:016x}), "
         f"signed by the fab's CA: {a.out}", f"  lot SHA-256 (content id): {digest}"],  # fmt: skip
        {"step": "vendor lot", "lot": a.lot_id, "chips": len(uids), "out": a.out,
         "lot_sha256": digest},  # fmt: skip
        None,
    )


def add_vendor_commands(vendor: Any, command: Any) -> None:
    c = command(
        vendor,
        "lot",
        vendor_lot,
        "ship a signed lot manifest: the UIDs and public keys of a lot of simulated chips",
        workdir="the simulated fab's directory (vendor init)",
    )
    c.add_argument("--lot-id", required=True, help="the lot's id (letters, digits, . _ -)")
    c.add_argument("--device-class", required=True, help="the chips' device class")
    c.add_argument("--devices", type=int, required=True, help="chips in the lot")
    c.add_argument(
        "--first-uid", default=DEFAULT_FIRST_UID, help="UID of the first chip (16 hex digits)"
    )
    c.add_argument("--out", required=True, help="where to write the lot manifest")


# --- oem ----------------------------------------------------------------------------------------


def oem_prelicense(a: argparse.Namespace) -> int:
    from securethread.oem.prelicense import prelicense

    r = prelicense(
        a.workdir, a.lot, vendor_ca=a.vendor_ca, image=a.image, factory=a.factory,
        profile=a.profile, workers=a.workers,
    )  # fmt: skip
    d = r.details
    line = (
        f"  lot {d['lot']}: {d['chips']} device certificates and licenses for factory "
        f"{d['factory']} (image {d['image']}); package SHA-256 {d['package_sha256']}"
    )
    return C._step(a, r, [line])


def oem_reconcile_lot(a: argparse.Namespace) -> int:
    from securethread.oem.prelicense import reconcile_lot

    r = reconcile_lot(a.workdir, a.confirmations, lot_id=a.lot)
    d = r.details
    lines = [
        f"  lot {d['lot']} at factory {d['factory']}: {d['licensed']} licensed, "
        f"{d['confirmed']} confirmed, {d['missing']} missing, {len(d['refused'])} refused"
    ]
    lines += [f"  refused {x['device']}: {x['reason']}" for x in d["refused"][:10]]
    return C._step(a, r, lines)


def add_oem_commands(oem: Any, command: Any, *, workdir: str) -> None:
    c = command(
        oem,
        "prelicense",
        oem_prelicense,
        "zero-secret programming: verify a vendor's lot, issue every chip's certificate and "
        "license in the OEM token, write the programming package for one factory",
        workdir=workdir,
    )
    c.add_argument("lot", help="the vendor's signed lot manifest")
    c.add_argument(
        "--vendor-ca", required=True,
        help="the vendor CA certificate (PEM) the lot must be signed by: the OEM's choice",
    )  # fmt: skip
    c.add_argument("--image", required=True, help="the mastered image to license")
    c.add_argument("--factory", required=True, help="the factory the package is for")
    c.add_argument(
        "--profile", help="a TOML file with the device certificate profile ([certificate] "
        "table, as in a job spec); default: the OEM's name as organisation",
    )  # fmt: skip
    c.add_argument(
        "--workers", type=int, default=1, help="worker processes, each with its own login"
    )
    c = command(
        oem,
        "reconcile-lot",
        oem_reconcile_lot,
        "reconcile a factory's boot confirmations against a pre-licensed lot",
        workdir=workdir,
    )
    c.add_argument("confirmations", help="the factory's confirmations file")
    c.add_argument("--lot", required=True, help="the lot id")


# --- station ----------------------------------------------------------------------------------


def station_flash_package(a: argparse.Namespace) -> int:
    from securethread.demo.line import SimulatedFab
    from securethread.station import SimulatedChips
    from securethread.station.flash import flash_package
    from securethread.workdir import parse_fingerprint

    uids = _uids(a.first_uid, a.devices)
    chips = SimulatedChips(SimulatedFab(a.chips_from), uids)
    r = flash_package(
        a.package, image=a.image, oem_root=a.root, root_fingerprint=parse_fingerprint(
            a.root_fingerprint), factory=a.factory, lot_id=a.lot, chips=chips, out=a.out,
    )  # fmt: skip
    human = [
        f"station flash-package: lot {r.lot_id} at {r.factory}: {len(r.flashed)} flashed, "
        f"{len(r.already_flashed)} already flashed, {len(r.refused)} refused of {r.chips} "
        f"in {r.elapsed_s:.2f} s; {r.confirmed_total} confirmations in {r.out}",
        *(f"  refused {d}: {why}" for d, why in r.refused[:10]),
    ]
    problem = DeviceRefusedError(f"{len(r.refused)} chip(s) refused") if r.refused else None
    return C._finish(a, human, {"step": "station flash-package", **r.to_json()}, problem)


def add_station_commands(station: Any, command: Any) -> None:
    c = command(
        station,
        "flash-package",
        station_flash_package,
        "zero-secret programming: flash simulated chips from an OEM programming package (no "
        "token, no PIN, no appliance) and write their boot confirmations",
        workdir=None,
    )
    c.add_argument("package", help="the OEM's programming package")
    c.add_argument("--image", required=True, help="the encrypted image the package names")
    c.add_argument("--root", required=True, help="the OEM root certificate (PEM)")
    c.add_argument(
        "--root-fingerprint", required=True,
        help="the OEM root key's SHA-256 fingerprint, given out of band (oem init prints it)",
    )  # fmt: skip
    c.add_argument("--factory", required=True, help="this factory's name (its order)")
    c.add_argument("--lot", required=True, help="the lot of this factory's order")
    c.add_argument("--chips-from", required=True, metavar="DIR", help="the simulated fab")
    c.add_argument("--devices", type=int, required=True, help="chips in front of the flasher")
    c.add_argument(
        "--first-uid", default=DEFAULT_FIRST_UID, help="UID of the first chip (16 hex digits)"
    )
    c.add_argument(
        "--out", required=True,
        help="the confirmations file to return to the OEM (an existing one is continued)",
    )  # fmt: skip
