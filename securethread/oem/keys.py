"""Flows 4-5 at the OEM: sending an image key to a named programmer.

* ``oem send-keys --to P --image I --connect HOST:PORT``: the authenticated channel over one
  TCP connection (docs/channel.md).  The OEM refuses any peer but programmer P's certified
  identity -- even one certified by the same root -- before any key moves, and records the
  delivery only once P's signed acknowledgement verified and P confirmed the commit.
* ``oem seal-keys --to P --image I --out FILE``: offline, a package sealed to P's certified
  key-agreement key and naming P's identity; ``oem confirm-keys RECEIPT`` verifies P's signed
  receipt for it and records the delivery.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509

from securethread.channel.transfer import seal_package, verify_receipt
from securethread.channel.transport import send_key_session
from securethread.errors import ConfigurationError, KeyNotFoundError, VerificationError
from securethread.formats.transcript import KeyEntry
from securethread.oem import layout as L
from securethread.pki import from_pem
from securethread.workdir import PartyDir, StepResult, read_file, write_atomic


def _programmer_cert(work: PartyDir, name: str, purpose: str) -> x509.Certificate:
    pdir = L.programmer_dir(name)
    work.require(f"{pdir}/identity.pem", step="sending keys", needs=f"certify-programmer ({name})")
    return from_pem(work.read(f"{pdir}/{purpose}.pem", f"{name}'s {purpose} certificate"))


def _image_key(work: PartyDir, oem: object, image_id: str) -> str:
    work.require(
        f"{L.image_dir(image_id)}/manifest.bin",
        step="sending keys",
        needs=f"master-image ({image_id})",
    )
    label = L.image_key_label(image_id)
    try:
        oem.secret_key(label)  # type: ignore[attr-defined]
    except KeyNotFoundError:
        raise ConfigurationError(f"the OEM token has no key {label!r}") from None
    return label


def send_keys(
    workdir: str | os.PathLike[str],
    *,
    to: str,
    image: str,
    host: str,
    port: int,
    timeout: float = 30.0,
) -> StepResult:
    """Send image ``image``'s key to programmer ``to`` listening at ``host:port``."""
    work = L.open_oem(workdir)
    pdir = L.programmer_dir(to)
    expected = _programmer_cert(work, to, "identity")
    step = f"send-keys {image} to {to}"
    if (earlier := work.done_before(f"{pdir}/keys-{image}.ack", step=step)) is not None:
        return earlier
    oem = work.open_token(L.TOKEN)
    label = _image_key(work, oem, image)
    result = send_key_session(
        host,
        port,
        backend=oem,
        identity_key=oem.private_key(L.L_IDENTITY),
        identity_cert=oem.certificate(L.L_IDENTITY),
        root_cert=oem.certificate(L.L_ROOT),
        expected_programmer=expected,
        labels=[label],
        timeout=timeout,
    )
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "key-transfer",
        keys=[KeyEntry.from_key(oem.secret_key(label))],
        artefacts={
            "transfer": result.record.transfer_digest,
            "ack": hashlib.sha256(result.record.ack).digest(),
        },
        details={"programmer": to, "image": image, "session": result.record.session_id.hex()},
    )
    done = work.finish(
        "oem send-keys",
        [f"{pdir}/keys-{image}.ack"],
        [tx],
        {"programmer": to, "image": image, "session": result.record.session_id.hex()},
    )
    done = work.pending(step, done)
    work.write(f"{pdir}/keys-{image}.ack", result.record.ack)  # last: marks the keys sent
    return done


def seal_keys(
    workdir: str | os.PathLike[str], *, to: str, image: str, out: str | os.PathLike[str]
) -> StepResult:
    """Seal image ``image``'s key to programmer ``to``; write the package to ``out``."""
    work = L.open_oem(workdir)
    pdir = L.programmer_dir(to)
    expected = _programmer_cert(work, to, "identity")
    recipient = _programmer_cert(work, to, "key-agreement")
    oem = work.open_token(L.TOKEN)
    label = _image_key(work, oem, image)
    package = seal_package(
        oem,
        [label],
        identity_key=oem.private_key(L.L_IDENTITY),
        identity_cert=oem.certificate(L.L_IDENTITY),
        expected_programmer=expected,
        recipient_cert=recipient,
        root_cert=oem.certificate(L.L_ROOT),
    )
    digest = hashlib.sha256(package).digest()
    # The OEM keeps the package (by digest) to check the receipt against it later.
    kept = work.write(f"{pdir}/sealed/{digest.hex()}.bin", package)
    write_atomic(Path(out), package)
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "key-transfer",
        keys=[KeyEntry.from_key(oem.secret_key(label))],
        artefacts={"sealed-package": digest},
        details={"programmer": to, "image": image, "via": "sealed-package"},
    )
    return work.finish(
        "oem seal-keys",
        [kept, os.fspath(out)],
        [tx],
        {"programmer": to, "image": image, "package": digest.hex()},
    )


def confirm_keys(
    workdir: str | os.PathLike[str], receipt_path: str | os.PathLike[str]
) -> StepResult:
    """Verify a programmer's signed receipt for a package this OEM sealed; record it."""
    work = L.open_oem(workdir)
    data = read_file(receipt_path, "key receipt", limit=64 << 10)
    root = from_pem(work.read(L.ROOT_CA, "OEM root certificate"))
    programmers = work.path("programmers")
    for pdir in sorted(programmers.iterdir()) if programmers.is_dir() else []:
        sealed = pdir / "sealed"
        if not (pdir / "identity.pem").is_file() or not sealed.is_dir():
            continue
        cert = from_pem(read_file(pdir / "identity.pem", "programmer certificate"))
        for package_file in sorted(sealed.iterdir()):
            package = read_file(package_file, "sealed package")
            try:
                receipt = verify_receipt(
                    data, package=package, programmer_cert=cert, root_cert=root
                )
            except VerificationError:
                continue
            return _record_receipt(work, pdir.name, package, receipt, data)
    raise VerificationError(
        "the receipt matches no package this OEM sealed, "
        "or is not signed by the programmer it names"
    )


def _record_receipt(
    work: PartyDir, name: str, package: bytes, receipt: object, data: bytes
) -> StepResult:
    from securethread.channel.transfer import PackageReceipt

    assert isinstance(receipt, PackageReceipt)
    pdir = L.programmer_dir(name)
    images = [k.label.removeprefix("image-") for k in receipt.keys if k.label.startswith("image-")]
    written = [work.write(f"{pdir}/keys-{image}.receipt", data) for image in images]
    oem = work.open_token(L.TOKEN)
    tx = work.transcript(oem.private_key(L.L_IDENTITY))
    tx.append(
        "key-transfer-receipt",
        artefacts={
            "sealed-package": hashlib.sha256(package).digest(),
            "receipt": hashlib.sha256(data).digest(),
        },
        details={"programmer": name, "keys": ",".join(k.label for k in receipt.keys)},
    )
    return work.finish("oem confirm-keys", written, [tx], {"programmer": name, "images": images})
