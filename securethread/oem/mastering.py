"""Flow 3 at the OEM: ``securethread oem master-image FIRMWARE --image-id ID ...``.

The image is encrypted in the OEM token (chunked AES-GCM, docs/image.md) with an image key
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
) -> StepResult:
    """Encrypt ``firmware`` under a new image key ``image-<image_id>``; sign its manifest."""
    work = L.open_oem(workdir)
    idir = L.image_dir(image_id)
    work.refuse_done(f"{idir}/manifest.bin", step=f"master-image {image_id}")
    image_mod.check_name("device class", device_class)
    image_mod.check_name("image version", version)
    try:
        src = open(firmware, "rb")  # noqa: SIM115 -- closed below
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read firmware {os.fspath(firmware)!r}: {exc.strerror}"
        ) from None
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
    written = [f"{idir}/image.enc", work.write(f"{idir}/manifest.bin", manifest)]
    return work.finish(
        "oem master-image",
        written,
        [tx],
        {"image": image_id, "image_bytes": image_path.stat().st_size},
    )
