"""The zero-secret demo: ``securethread demo --mode zero-secret --devices N --workdir DIR``.

The vendor ships a signed lot manifest; the OEM pre-licenses the lot in its own token; a
factory with no token, no PIN and no appliance flashes the chips from the programming package
and returns their boot confirmations; the OEM reconciles them against the lot.  Every step is
a ``securethread`` process of its own with only its party's files (the two-site demo's
:class:`~securethread.demo._Sites`: no SoftHSM configuration or PIN from outside), files
are carried between the parties' ``inbox/`` directories as a courier would::

    DIR/oem/        the OEM's work directory (its SoftHSM tokens and PIN file)
    DIR/vendor/     the simulated silicon vendor: its CA, its chips, its lot manifest
    DIR/factory/    the factory: nothing but files (package, image, confirmations)
    DIR/courier/    a log of every file carried between the parties

The factory also tries to over-produce: two chips of the same fab beyond the lot are put in
front of the flasher and get nothing (the package has no entry for their keys).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import attrs

from securethread.demo import (  # the demo's image, device class and chip UIDs
    DEVICE_CLASS,
    FIRST_UID,
    IMAGE_ID,
    OEM_NAME,
    ModeResult,
    begin,
    log_stderr,
)

__all__ = ["ZeroSecretDemoResult", "run"]

FACTORY = "factory-1"
LOT_ID = "lot-1"
OUTSIDE = 2  # chips beyond the lot the factory tries to flash


@attrs.frozen(kw_only=True)
class ZeroSecretDemoResult(ModeResult):
    """What the zero-secret demo did, party by party."""

    MODE: ClassVar[str] = "zero-secret"

    lot: str
    prelicensed: int
    flashed: int
    outside_refused: int
    reconciliation: dict[str, Any]
    package_sha256: str
    prelicense_s: float
    flash_devices_per_s: float | None
    transcript_records: int

    @property
    def lines(self) -> list[str]:
        r = self.reconciliation
        return [
            f"zero-secret demo in {self.workdir} ({self.elapsed_s} s)",
            f"  vendor: lot {self.lot} of {self.devices} chips, one signature by its CA",
            f"  OEM {OEM_NAME!r}: verified the lot once, issued {self.prelicensed} device "
            f"certificates and licenses in its own token ({self.prelicense_s} s); package "
            f"{self.package_sha256[:16]}… for {FACTORY}",
            f"  factory {FACTORY!r}: no token, no PIN, no appliance; flashed {self.flashed} "
            f"chips ({self.flash_devices_per_s} devices/s); {self.outside_refused} chips "
            "beyond the lot got nothing",
            f"  OEM reconciliation: {r.get('licensed')} licensed, {r.get('confirmed')} "
            f"confirmed, {r.get('missing')} missing, {len(r.get('refused', []))} refused",
            f"  OEM transcript verified offline: {self.transcript_records} records; files "
            f"carried: {len(self.carried)} (courier/log.txt)",
        ]


def run(
    workdir: str | Path, devices: int, *, log: Callable[[str], None] | None = log_stderr
) -> ZeroSecretDemoResult:
    """Run the zero-secret chain in ``workdir`` (made or reused as the two-site demo's)."""
    s = begin(ZeroSecretDemoResult.MODE, workdir, devices, log)
    root = s.root
    oem, factory = root / "oem", root / "factory"
    factory.mkdir(exist_ok=True)
    fingerprint = s.oem_init()  # read to the factory over the phone

    # The vendor takes the OEM's order and ships a signed lot manifest; its CA goes to the OEM.
    vendor_ca = s.vendor_ca()
    lot_file = root / "vendor" / "outbox" / f"lot-{LOT_ID}.bin"
    lot_file.parent.mkdir(parents=True, exist_ok=True)
    s.run("vendor", "lot", "--workdir", "vendor", "--lot-id", LOT_ID, "--device-class",
          DEVICE_CLASS, "--devices", str(devices), "--first-uid", f"{FIRST_UID:016x}",
          "--out", str(lot_file))  # fmt: skip
    lot = s.carry(lot_file, "oem")

    # The OEM masters the image and pre-licenses the lot in its own token.
    s.master_image(64 << 10)
    t1 = time.monotonic()
    pre = s.run("oem", "prelicense", "--workdir", "oem", str(lot), "--vendor-ca",
                str(vendor_ca), "--image", IMAGE_ID, "--factory", FACTORY)  # fmt: skip
    prelicense_s = round(time.monotonic() - t1, 2)
    package = s.carry(oem / "outbox" / f"package-{LOT_ID}.bin", "factory")
    image = s.carry(oem / "outbox" / f"image-{IMAGE_ID}.enc", "factory")
    root_cert = s.carry(oem / "root-ca.pem", "factory")

    # The factory: files only.  The chips of the lot, then two beyond it.
    confirmations = factory / "outbox" / f"confirmations-{LOT_ID}.bin"
    confirmations.parent.mkdir(parents=True, exist_ok=True)
    common = ["flash-package", str(package), "--image", str(image), "--root", str(root_cert),
              "--root-fingerprint", fingerprint, "--factory", FACTORY, "--lot", LOT_ID,
              "--chips-from", "vendor", "--out", str(confirmations)]  # fmt: skip
    flashed = s.run("station", *common, "--devices", str(devices),
                    "--first-uid", f"{FIRST_UID:016x}")  # fmt: skip
    outside = len(s.expect_refused(
        "station", *common, "--devices", str(OUTSIDE), "--first-uid",
        f"{FIRST_UID + devices:016x}", counted="flashed", what="the chips beyond the lot were",
    ).get("refused", []))  # fmt: skip

    # Back at the OEM: reconcile, and an auditor verifies the OEM's transcript offline.
    returned = s.carry(confirmations, "oem")
    rec = s.run("oem", "reconcile-lot", "--workdir", "oem", str(returned), "--lot", LOT_ID)
    tx = s.run("audit", "verify-transcript", str(oem / "transcript.bin"), "--cert",
               str(oem / "oem-identity.pem"))  # fmt: skip
    ok = (
        rec.get("ok") is True
        and rec.get("confirmed") == devices
        and outside == OUTSIDE
        and flashed.get("flashed") == devices
    )
    return ZeroSecretDemoResult(
        ok=ok,
        workdir=str(root),
        lot=LOT_ID,
        devices=devices,
        prelicensed=int(pre.get("chips", 0)),
        flashed=int(flashed.get("flashed", 0)),
        outside_refused=outside,
        reconciliation={k: rec.get(k) for k in ("licensed", "confirmed", "missing", "refused")},
        package_sha256=str(pre.get("package_sha256", "")),
        prelicense_s=prelicense_s,
        flash_devices_per_s=flashed.get("devices_per_s"),
        transcript_records=int(tx.get("records", 0)),
        carried=tuple(s.carried),
        elapsed_s=s.elapsed(),
    )


if __name__ == "__main__":  # pragma: no cover - by hand: python -m securethread.demo.zero_secret
    result = run(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    print("\n".join(result.lines))
