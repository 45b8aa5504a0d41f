"""Flow 3 at the OEM: ``securethread oem master-image FIRMWARE --image-id ID ...``.

The firmware becomes a signed MCUboot image (docs/image.md): header, payload, protected
security counter, SHA-256, key hash and ECDSA-P256 signature TLVs, the signature made inside
the OEM token by the firmware-signing key -- or FIRMWARE is already an unsigned MCUboot image
(``--mcuboot``, e.g. from ``imgtool create``) that is signed the same way.  That image is
encrypted in the OEM token (chunked AES-GCM, docs/image.md) with an image key
generated for this image, and its manifest (version, device class, anti-rollback counter,
digests of plaintext and ciphertext) is signed with the firmware-signing key.  The
plaintext firmware never leaves the OEM; the encrypted image and the manifest go to the
programmer with a job.
"""

from __future__ import annotations

import hashlib
import os

from securethread.errors import ConfigurationError, KeyNotFoundError
from securethread.formats import image as image_mod
from securethread.formats.image import ImageSizeError
from securethread.formats.mcuboot import (
    DEFAULT_HEADER_SIZE,
    MAX_HEADER_SIZE,
    MIN_HEADER_SIZE,
    ImageVersion,
    McubootFormatError,
    check_unsigned,
)
from securethread.formats.transcript import KeyEntry
from securethread.keys import IMAGE_KEY
from securethread.oem import layout as L
from securethread.workdir import StepResult, file_sha256


def master_image(
    workdir: str | os.PathLike[str],
    firmware: str | os.PathLike[str],
    *,
    image_id: str,
    version: str,
    security_counter: int,
    device_class: str,
    load_address: int = 0,
    header_size: int = DEFAULT_HEADER_SIZE,
    mcuboot_input: bool = False,
) -> StepResult:
    """Make ``firmware`` a signed MCUboot image (signed in the token), encrypt it under a new
    image key ``image-<image_id>`` and sign its manifest.  ``version`` is imgtool's
    ``major[.minor[.revision[+build]]]``."""
    work = L.open_oem(workdir)
    idir = L.image_dir(image_id)
    step = f"master-image {image_id}"
    if (earlier := work.done_before(f"{idir}/manifest.bin", step=step)) is not None:
        return earlier
    image_mod.check_name("device class", device_class)
    image_mod.check_name("image version", version)
    try:
        ImageVersion.parse(version)
    except McubootFormatError as exc:
        raise ConfigurationError(f"--version: {exc}") from None
    if type(security_counter) is not int or not 0 <= security_counter <= 0xFFFFFFFF:
        raise ConfigurationError("--security-counter must be an integer in [0, 2^32 - 1]")
    if not 0 <= load_address <= 0xFFFFFFFF:
        raise ConfigurationError("--load-address must be a 32-bit unsigned integer")
    if not MIN_HEADER_SIZE <= header_size <= MAX_HEADER_SIZE:
        raise ConfigurationError(
            f"--header-size must be in [{MIN_HEADER_SIZE}, {MAX_HEADER_SIZE}]"
        )
    if mcuboot_input and (load_address or header_size != DEFAULT_HEADER_SIZE):
        raise ConfigurationError(
            "--load-address and --header-size come from the MCUboot image given with --mcuboot"
        )
    try:
        src = open(firmware, "rb")  # noqa: SIM115 -- closed below
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read firmware {os.fspath(firmware)!r}: {exc.strerror}"
        ) from None
    with src:
        # Bad input is refused before the token is touched (S5: no image key left behind).
        if mcuboot_input:
            check_unsigned(
                src.read(), version=ImageVersion.parse(version), security_counter=security_counter
            )
        elif not src.read(1):
            raise ImageSizeError("refusing to master a zero-length firmware")
        src.seek(0)
    src = open(firmware, "rb")  # noqa: SIM115 -- closed below
    oem = work.open_token(L.TOKEN)
    label = L.image_key_label(image_id)
    # A crash after the key was made but before the manifest was written leaves the key:
    # it is this step's own (label = this image), so a re-run reuses it.
    try:
        image_key = oem.secret_key(label)
    except KeyNotFoundError:
        image_key = oem.generate_aes(label, policy=IMAGE_KEY)
    fw = oem.private_key(L.L_FIRMWARE)
    image_path = work.path(f"{idir}/image.enc")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = image_path.with_name(".image.enc.tmp")
    try:
        with src, open(tmp, "wb") as dst:
            manifest = image_mod.master_image(
                src,
                dst,
                image_key=image_key,
                signing_key=fw,
                image_id=image_id,
                image_version=version,
                security_counter=security_counter,
                device_class=device_class,
                load_address=load_address,
                header_size=header_size,
                mcuboot_input=mcuboot_input,
            )
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, image_path)
    finally:
        tmp.unlink(missing_ok=True)
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "image-mastering",
        keys=[KeyEntry.from_key(image_key), KeyEntry.from_key(fw)],
        artefacts={
            "manifest": hashlib.sha256(manifest).digest(),
            "image": file_sha256(image_path),
        },
        details={"image": image_id, "version": version, "security_counter": security_counter},
    )
    result = work.finish(
        "oem master-image",
        [f"{idir}/image.enc", f"{idir}/manifest.bin"],
        [tx],
        {"image": image_id, "image_bytes": image_path.stat().st_size},
    )
    result = work.pending(step, result)
    work.write(f"{idir}/manifest.bin", manifest)  # last: marks the image mastered
    return result
