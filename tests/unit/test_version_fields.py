"""A version field given as CBOR ``true`` is refused by every format, not read as 1.

CBOR ``true`` (simple value 21, RFC 8949 §3.3) decodes to Python ``True``, and ``True == 1``:
a version compared with ``!=`` accepted it.  Every format now checks its version with the one
exact check, :func:`securethread.formats.cbor.is_version`.  Each case below takes a valid
artefact, changes only its version to ``true`` and expects the format's own error.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from securethread.channel.handshake import Finish, Hello
from securethread.channel.transfer import ACK_KIND, KeyReceiver, KeySender
from securethread.errors import Error, FormatError
from securethread.formats import cbor, envelope
from securethread.formats.boot import BootConfirmation, BootConfirmationError
from securethread.formats.device_trust import DeviceTrust, DeviceTrustFormatError
from securethread.formats.identity import IdentificationFormatError, IdentificationResponse
from securethread.formats.image import ImageFormatError, Manifest, read_header
from securethread.formats.license import License, LicenseFormatError, open_license
from securethread.formats.provisioning import ProvisioningFormatError
from securethread.formats.transcript import CeremonyRecord
from securethread.hsm import IMAGE_KEY
from tests.unit import test_channel_software as _channel
from tests.unit.test_channel_formats import oem_hello
from tests.unit.test_device import World, make_world

world = _channel.world  # the software PKI of both enclaves (module scope)


@pytest.fixture(scope="module")
def device_world() -> World:
    return make_world()


def true_version(data: bytes) -> bytes:
    """``data`` (a CBOR map with ``"v": 1``) with only its version changed to ``true``."""
    m = cbor.decode(data)
    assert type(m["v"]) is int and m["v"] == 1
    return cbor.encode({**m, "v": True})


def test_true_is_not_the_integer_one() -> None:
    assert cbor.decode(cbor.encode(True)) is True and True == 1  # noqa: PLR0133 - the trap
    assert cbor.is_version(1, 1) and not cbor.is_version(True, 1)
    assert not cbor.is_version(1.0, 1) and not cbor.is_version(None, 1)


# --- the channel: hello, finish, transfer, ack, commit ---------------------------------------


def _session(w: dict[str, Any]) -> tuple[KeySender, KeyReceiver, bytes, str]:
    """A fresh session on the software backends, and the handshake's last message."""
    o, p = _channel.channels(w)
    finish_p = p.receive_finish(o.receive_hello(p.receive_hello(o.start())))
    so = o.receive_finish(finish_p)
    label = f"v-test-{os.urandom(4).hex()}"
    w["oem"].generate_aes(label, policy=IMAGE_KEY)
    return KeySender(so), KeyReceiver(p.session), finish_p, label


def _true_signed(ack: bytes, signer: Any) -> bytes:
    """A signed ack with its body's version ``true``, signed again by its signer."""
    _kind, body, _signers = envelope.peek_body(ack)
    return envelope.seal(ACK_KIND, {**body, "v": True}, [signer])


def test_channel_hello_with_version_true_is_refused() -> None:
    for role, hello in (
        ("oem", oem_hello()),
        ("programmer", oem_hello(role="programmer", peer_nonce=b"\x02" * 32)),
    ):
        with pytest.raises(FormatError, match="version True"):
            Hello.from_bytes(true_version(hello.to_bytes()), role=role)


def test_channel_finish_with_version_true_is_refused(world: dict[str, Any]) -> None:
    _sender, _receiver, finish_p, _label = _session(world)
    assert Finish.from_bytes(finish_p, role="programmer")  # the real one parses
    with pytest.raises(FormatError, match="version True"):
        Finish.from_bytes(true_version(finish_p), role="programmer")
    f = Finish(role="oem", session_id=b"s" * 16, signature=b"\x30" * 70, confirm=b"c" * 16)
    with pytest.raises(FormatError, match="version True"):
        Finish.from_bytes(true_version(f.to_bytes()), role="oem")


def test_key_transfer_messages_with_version_true_are_refused(world: dict[str, Any]) -> None:
    """Each message refused with version ``true``, then accepted as it was sent."""
    sender, receiver, _finish, label = _session(world)
    transfer = sender.send([label])
    with pytest.raises(FormatError, match="key transfer: unsupported version True"):
        receiver.receive(true_version(transfer))
    ack = receiver.receive(transfer)
    with pytest.raises(FormatError, match="acknowledgement: malformed"):
        sender.verify_ack(_true_signed(ack, world["prog"].private_key("id")))
    commit = sender.commit(sender.verify_ack(ack))
    with pytest.raises(FormatError, match="commit: unsupported version True"):
        receiver.commit(true_version(commit))


# --- artefact formats ---------------------------------------------------------------------


Case = tuple[Callable[[], object], Callable[[], object], type[Error]]


@pytest.fixture(scope="module")
def artefacts(device_world: World) -> dict[str, Case]:
    """Per format: (the valid artefact parsed, the same with version ``true``, its error)."""
    dw = device_world
    dev = dw.part()
    data = dw.provisioning(dev)
    ident = IdentificationResponse.from_bytes(dev.identify(os.urandom(32)))
    _signed, blob, m = dw.master(os.urandom(2000))
    header, _raw = read_header(io.BytesIO(blob))
    trust: dict[str, Any] = dict(
        job_id="j", job_sha256=hashlib.sha256(b"j").digest(), device_class="c",
        firmware_signing_key=dw.fw_key.public_key(), min_security_counter=1,
    )  # fmt: skip
    boot = {
        "v": 1, "device_id": dev.device_id, "image_id": "fw", "image_version": "1",
        "security_counter": 1, "plaintext_sha256": b"p" * 32, "nonce": b"n" * 16,
    }  # fmt: skip
    record = CeremonyRecord(seq=0, prev=b"\0" * 32, time=0, enclave="oem", operation="init")
    chip = dw.vendor.make_chip()
    lic = dw.issuer(m).issue(chip.device_id, chip.public_key)
    _kind, lic_body, _ = envelope.peek_body(cbor.decode(lic)["envelope"])

    def open_lic(data: bytes) -> Callable[[], object]:
        return lambda: open_license(
            data, device_id=chip.device_id, device_key=chip._key, oem_root=dw.root_cert,
            image_id=m.image_id, image_key_id=m.image_key_id,
        )  # fmt: skip

    return {
        "license container": (open_lic(lic), open_lic(true_version(lic)), LicenseFormatError),
        "license body": (lambda: License.from_body(lic_body),
                         lambda: License.from_body({**lic_body, "v": True}), LicenseFormatError),
        "manifest": (lambda: Manifest.from_body(m.to_body()),
                     lambda: Manifest.from_body({**m.to_body(), "v": True}), ImageFormatError),
        "image header": (lambda: attrs.evolve(header),
                         lambda: attrs.evolve(header, version=True), ImageFormatError),
        "provisioning data": (lambda: attrs.evolve(data),
                              lambda: attrs.evolve(data, version=True), ProvisioningFormatError),
        "identification": (lambda: attrs.evolve(ident),
                           lambda: attrs.evolve(ident, version=True), IdentificationFormatError),
        "device trust": (lambda: DeviceTrust(**trust),
                         lambda: DeviceTrust(**trust, version=True), DeviceTrustFormatError),
        "boot confirmation": (lambda: BootConfirmation.from_body(boot),
                              lambda: BootConfirmation.from_body({**boot, "v": True}),
                              BootConfirmationError),
        "ceremony record": (lambda: attrs.evolve(record),
                            lambda: attrs.evolve(record, version=True), FormatError),
    }  # fmt: skip


ARTEFACTS = [
    "license container", "license body", "manifest", "image header", "provisioning data",
    "identification", "device trust", "boot confirmation", "ceremony record",
]  # fmt: skip


@pytest.mark.parametrize("what", ARTEFACTS)
def test_artefact_with_version_true_is_refused(artefacts: dict[str, Case], what: str) -> None:
    valid, true_v, error = artefacts[what]
    valid()  # accepted as made: only the version can be what is refused below
    with pytest.raises(error, match="version|malformed|wrong type"):
        true_v()
