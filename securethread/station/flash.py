"""Zero-secret programming at the factory: ``securethread station flash-package``.

No token, no PIN, no appliance: the factory holds nothing secret.  It verifies the OEM's
programming package once (:func:`securethread.formats.programming.verify_package`) under the
OEM root whose fingerprint it was given out of band, for its own factory name and the lot of
its order, and checks the encrypted image against the package.  Then, per chip in front of
it: a fresh challenge; the chip proves possession of its key; the key is looked up in the
package (a chip outside the lot finds nothing and gets nothing); the chip's entry is checked
against the answer (same device id, the certified key, the proof verifies under it); the chip
is provisioned and programmed with that entry; its signed boot confirmation is verified
against the nonce sent and kept.  The confirmations go back to the OEM in one file
(:class:`~securethread.formats.programming.Confirmations`), rewritten atomically as chips
finish; a run with the same ``--out`` continues it: a chip already confirmed there is
*already flashed* and gets nothing again.

Every check on the package, the root and the image comes before the first chip: a refused
package touches no chip and writes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import (
    ConfigurationError,
    DeviceRefusedError,
    Error,
    ImageError,
    VerificationError,
    name_exception,
)
from securethread.formats.boot import verify_boot_confirmation
from securethread.formats.identity import (
    ChallengeMismatchError,
    IdentificationResponse,
    KeyMismatchError,
    new_challenge,
    verify_proof_of_possession,
)
from securethread.formats.programming import (
    MAX_PACKAGE_SIZE,
    Confirmations,
    PackageChip,
    VerifiedPackage,
    verify_package,
)
from securethread.formats.provisioning import ProvisioningData
from securethread.keys.ecutil import fingerprint, spki_der
from securethread.keys.policy import Curve
from securethread.pki import untrusted
from securethread.station.adapters import ChipPort, ChipSource
from securethread.workdir import read_file, write_atomic

__all__ = ["FlashResult", "NotInLotError", "flash_package", "open_package"]

#: Confirmations are written to ``--out`` after this many newly flashed chips, and at the end.
SAVE_EVERY = 256


class NotInLotError(DeviceRefusedError):
    """The chip's key is not in the programming package: it is not a chip of the lot."""


class RootFingerprintError(VerificationError):
    """The OEM root certificate given is not the one whose fingerprint was given."""


@attrs.frozen(kw_only=True)
class FlashResult:
    """What one run of the flasher did."""

    lot_id: str
    factory: str
    package_sha256: bytes
    chips: int
    flashed: tuple[str, ...]
    already_flashed: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]  # (device id or socket label, why)
    confirmed_total: int
    out: str
    elapsed_s: float

    @property
    def devices_per_s(self) -> float | None:
        return round(len(self.flashed) / self.elapsed_s, 1) if self.elapsed_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "lot": self.lot_id,
            "factory": self.factory,
            "package_sha256": self.package_sha256.hex(),
            "chips": self.chips,
            "flashed": len(self.flashed),
            "already_flashed": len(self.already_flashed),
            "refused": [{"device": d, "reason": r} for d, r in self.refused],
            "confirmed_total": self.confirmed_total,
            "confirmations": self.out,
            "elapsed_s": round(self.elapsed_s, 3),
            "devices_per_s": self.devices_per_s,
        }


def open_package(
    package: str | os.PathLike[str],
    *,
    oem_root: str | os.PathLike[str],
    root_fingerprint: bytes,
    factory: str,
    lot_id: str,
) -> tuple[VerifiedPackage, x509.Certificate]:
    """The package verified under the pinned OEM root for this factory and lot; the root
    certificate with it (the chips' provisioning data carries it)."""
    root = untrusted.load_certificate_pem(
        read_file(oem_root, "OEM root certificate", limit=64 << 10), what="OEM root certificate"
    )
    key = root.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not hmac.compare_digest(
        fingerprint(key), root_fingerprint
    ):
        raise RootFingerprintError(
            f"the OEM root certificate {os.fspath(oem_root)!r} does not have the fingerprint "
            "given out of band"
        )
    data = read_file(package, "programming package", limit=MAX_PACKAGE_SIZE)
    pkg = verify_package(data, oem_root=root, factory=factory, lot_id=lot_id)
    return pkg, root


def _image_digest(path: str | os.PathLike[str]) -> bytes:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the encrypted image {os.fspath(path)!r}: {exc.strerror}"
        ) from None
    return h.digest()


def _earlier(out: Path, pkg: VerifiedPackage) -> Confirmations:
    """The confirmations of earlier runs of this package (``out``), or none yet."""
    p = pkg.package
    if not out.exists():
        return Confirmations(
            package_sha256=pkg.sha256, factory=p.factory, lot_id=p.lot_id, confirmations={}
        )
    earlier = Confirmations.from_bytes(read_file(out, "confirmations", limit=1 << 30))
    if earlier.package_sha256 != pkg.sha256:
        raise ConfigurationError(
            f"{str(out)!r} holds the confirmations of another package: give a new --out"
        )
    return earlier


class _Flasher:
    """The per-chip loop over one verified package (see the module docstring)."""

    def __init__(
        self, pkg: VerifiedPackage, root: x509.Certificate, image: str | os.PathLike[str]
    ) -> None:
        self.pkg = pkg
        self.image = os.fspath(image)
        self.packager = ProvisioningData.packager(
            production_ca_certificate=pkg.production_ca,
            oem_root_certificate=root,
            device_trust=pkg.package.device_trust,
            job_sha256=pkg.package.job_sha256,
        )

    def identify(self, port: ChipPort) -> tuple[PackageChip, ec.EllipticCurvePublicKey]:
        """Challenge, proof of possession, and the chip's entry: found by its key only."""
        challenge = new_challenge()
        r = IdentificationResponse.from_bytes(port.identify(challenge))
        if not hmac.compare_digest(r.challenge, challenge):
            raise ChallengeMismatchError(f"device {r.device_id}: answers another challenge")
        entry = self.pkg.by_key.get(hashlib.sha256(r.public_key).digest())
        if entry is None:
            raise NotInLotError(
                f"device {r.device_id}: its key is not in the programming package (not a "
                "chip of this lot): nothing released"
            )
        if entry.device_id != r.device_id:
            raise NotInLotError(
                f"device {r.device_id}: its key belongs to chip {entry.device_id} of the lot"
            )
        _cert, key = untrusted.load_certificate_with_key(
            entry.certificate, what=f"device {r.device_id} certificate", curves=(Curve.P256,)
        )
        if spki_der(key) != r.public_key:
            raise KeyMismatchError(f"device {r.device_id}: answering key is not the lot's key")
        verify_proof_of_possession(r, key, challenge)
        return entry, key

    def flash(self, port: ChipPort, entry: PackageChip, key: ec.EllipticCurvePublicKey) -> bytes:
        """Provision and program one identified chip; its verified boot confirmation."""
        port.provision(self.packager(entry.certificate))
        nonce = os.urandom(32)
        with open(self.image, "rb") as f:
            conf = port.program(self.pkg.package.manifest, f, entry.license, nonce)
        verify_boot_confirmation(
            conf,
            device_public_key=key,
            device_id=entry.device_id,
            manifest=self.pkg.manifest,
            nonce=nonce,
        )
        return conf


def flash_package(
    package: str | os.PathLike[str],
    *,
    image: str | os.PathLike[str],
    oem_root: str | os.PathLike[str],
    root_fingerprint: bytes,
    factory: str,
    lot_id: str,
    chips: ChipSource,
    out: str | os.PathLike[str],
    progress: Callable[[str, str], None] | None = None,
) -> FlashResult:
    """Flash ``chips`` from ``package`` (see the module docstring); ``out`` is the
    confirmations file to return to the OEM (continued if it exists)."""
    pkg, root = open_package(
        package, oem_root=oem_root, root_fingerprint=root_fingerprint, factory=factory,
        lot_id=lot_id,
    )  # fmt: skip
    if _image_digest(image) != pkg.package.image_sha256:
        raise ImageError(
            f"the encrypted image {os.fspath(image)!r} is not image "
            f"{pkg.package.image_id!r} the package names (SHA-256 differs)"
        )
    out_path = Path(out)
    done = _earlier(out_path, pkg)
    flasher = _Flasher(pkg, root, image)
    t0 = time.perf_counter()
    flashed: list[tuple[str, bytes]] = []
    already: list[str] = []
    refused: list[tuple[str, str]] = []
    seen = set(done.confirmations)
    unsaved = 0
    for label, open_chip in chips:
        try:
            port = open_chip()
            entry, key = flasher.identify(port)
            if entry.device_id in seen:
                already.append(entry.device_id)
                continue
            conf = flasher.flash(port, entry, key)
        except Exception as exc:  # whatever a chip makes fail is that chip's refusal
            if isinstance(exc, Error) and not isinstance(exc, VerificationError):
                raise  # configuration or OS trouble stops the run
            refused.append((getattr(exc, "device_id", None) or label, name_exception(exc)))
            if progress is not None:
                progress(label, "refused")
            continue
        seen.add(entry.device_id)
        flashed.append((entry.device_id, conf))
        unsaved += 1
        if progress is not None:
            progress(entry.device_id, "flashed")
        if unsaved >= SAVE_EVERY:
            done = done.with_more(flashed[-unsaved:])
            write_atomic(out_path, done.to_bytes())
            unsaved = 0
    if unsaved or not out_path.exists():
        done = done.with_more(flashed[len(flashed) - unsaved :] if unsaved else [])
        write_atomic(out_path, done.to_bytes())
    return FlashResult(
        lot_id=pkg.package.lot_id,
        factory=pkg.package.factory,
        package_sha256=pkg.sha256,
        chips=len(chips),
        flashed=tuple(d for d, _c in flashed),
        already_flashed=tuple(already),
        refused=tuple(refused),
        confirmed_total=len(done.confirmations),
        out=str(out_path),
        elapsed_s=time.perf_counter() - t0,
    )
