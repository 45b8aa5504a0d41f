"""A version field given as CBOR ``true`` is refused by every format, not read as 1.

CBOR ``true`` (simple value 21, RFC 8949 §3.3) decodes to Python ``True``, and ``True == 1``:
a version compared with ``!=`` accepted it.  Every format now checks its version with the one
exact check, :func:`securethread.formats.cbor.is_version`.  Each case takes a valid artefact
of the fuzz world (made by the library on software keys), changes only its version to
``true`` and expects the format's own error.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from securethread.channel.handshake import Finish, Hello
from securethread.channel.transfer import ACK_KIND, KeyReceiver, KeySender
from securethread.errors import Error, FormatError
from securethread.formats import cbor, envelope
from securethread.formats.boot import BootConfirmation, BootConfirmationError
from securethread.formats.device_trust import DeviceTrustFormatError, verify_device_trust
from securethread.formats.identity import IdentificationFormatError, IdentificationResponse
from securethread.formats.image import ImageFormatError, Manifest, read_header
from securethread.formats.license import License, LicenseFormatError, open_license
from securethread.formats.provisioning import ProvisioningData, ProvisioningFormatError
from securethread.formats.transcript import CeremonyRecord
from tests.fuzz.world import TRANSFER_LABEL, World, build


@pytest.fixture(scope="module")
def world() -> World:
    return build()


def true_version(data: bytes) -> bytes:
    """``data`` (a CBOR map with an integer ``"v"``) with only its version changed to
    ``true`` (which Python takes for 1, a version every format had before issue 21)."""
    m = cbor.decode(data)
    assert type(m["v"]) is int and m["v"] >= 1
    return cbor.encode({**m, "v": True})


def test_true_is_not_the_integer_one() -> None:
    assert cbor.decode(cbor.encode(True)) is True and True == 1  # noqa: PLR0133 - the trap
    assert cbor.is_version(1, 1) and not cbor.is_version(True, 1)
    assert not cbor.is_version(1.0, 1) and not cbor.is_version(None, 1)


# --- the channel: hello, finish, transfer, ack, commit ---------------------------------------


@pytest.mark.parametrize(
    ("seed", "role", "parse"),
    [("oem_hello", "oem", Hello.from_bytes), ("programmer_hello", "programmer", Hello.from_bytes),
     ("oem_finish", "oem", Finish.from_bytes),
     ("programmer_finish", "programmer", Finish.from_bytes)],
)  # fmt: skip
def test_channel_hello_and_finish_with_version_true_are_refused(
    world: World, seed: str, role: str, parse: Callable[..., object]
) -> None:
    message = world.seeds[seed][0]
    parse(message, role=role)  # the real one parses
    with pytest.raises(FormatError, match="version True"):
        parse(true_version(message), role=role)


#: What the field layer says of a version ``true`` where 2 is due.
TRUE_V = r"field 'v' must be 2 \(unsupported version True\)"


def test_key_transfer_messages_with_version_true_are_refused(world: World) -> None:
    """Each message refused with version ``true``, then accepted as it was sent."""
    so, sp = world.ctx["channel"].established()
    sender, receiver = KeySender(so), KeyReceiver(sp)
    transfer = sender.send([TRANSFER_LABEL])
    with pytest.raises(FormatError, match="key transfer: " + TRUE_V):
        receiver.receive(true_version(transfer))
    ack = receiver.receive(transfer)
    _kind, body, _signers = envelope.peek_body(ack)
    forged = envelope.seal(ACK_KIND, {**body, "v": True}, [world.pki.prog.private_key("id")])
    with pytest.raises(FormatError, match="acknowledgement: " + TRUE_V):
        sender.verify_ack(forged)  # signed by the programmer, only its version changed
    commit = sender.commit(sender.verify_ack(ack))
    with pytest.raises(FormatError, match="commit: " + TRUE_V):
        receiver.commit(true_version(commit))


# --- artefact formats ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    valid: Callable[[], object]  # the artefact as made: accepted
    true_v: Callable[[], object]  # the same with version true: refused with ``error``
    error: type[Error]


@pytest.fixture(scope="module")
def artefacts(world: World) -> dict[str, Case]:
    ctx, seeds = world.ctx, world.seeds
    dev, m = ctx["device"], ctx["manifest"]
    lic = seeds["license"][0]
    _kind, lic_body, _ = envelope.peek_body(cbor.decode(lic)["envelope"])
    header, _raw = read_header(io.BytesIO(ctx["image"]))
    provisioning = ProvisioningData.from_bytes(seeds["provisioning"][0])
    ident = IdentificationResponse.from_bytes(seeds["identification"][0])
    trust = verify_device_trust(ctx["trust"], oem_root=world.pki.root)
    boot: dict[str, Any] = {
        "v": 2, "device_id": dev.device_id, "image_id": "fw", "image_version": "1",
        "security_counter": 1, "plaintext_sha256": b"p" * 32, "nonce": b"n" * 16,
    }  # fmt: skip
    record = CeremonyRecord(seq=0, prev=b"\0" * 32, time=0, enclave="oem", operation="init")

    def open_lic(data: bytes) -> Callable[[], object]:
        return lambda: open_license(
            data, device_id=dev.device_id, device_key=dev._key, oem_root=world.pki.root,
            image_id=m.image_id, image_key_id=m.image_key_id,
        )  # fmt: skip

    def evolve(obj: Any, error: type[Error]) -> Case:
        return Case(lambda: attrs.evolve(obj), lambda: attrs.evolve(obj, version=True), error)

    return {
        "license container": Case(open_lic(lic), open_lic(true_version(lic)), LicenseFormatError),
        "license body": Case(lambda: License.from_body(lic_body),
                             lambda: License.from_body({**lic_body, "v": True}),
                             LicenseFormatError),
        "manifest": Case(lambda: Manifest.from_body(m.to_body()),
                         lambda: Manifest.from_body({**m.to_body(), "v": True}),
                         ImageFormatError),
        "image header": evolve(header, ImageFormatError),
        "provisioning data": evolve(provisioning, ProvisioningFormatError),
        "identification": evolve(ident, IdentificationFormatError),
        "device trust": evolve(trust, DeviceTrustFormatError),
        "boot confirmation": Case(lambda: BootConfirmation.from_body(boot),
                                  lambda: BootConfirmation.from_body({**boot, "v": True}),
                                  BootConfirmationError),
        "ceremony record": evolve(record, FormatError),
    }  # fmt: skip


ARTEFACTS = [
    "license container", "license body", "manifest", "image header", "provisioning data",
    "identification", "device trust", "boot confirmation", "ceremony record",
]  # fmt: skip


@pytest.mark.parametrize("what", ARTEFACTS)
def test_artefact_with_version_true_is_refused(artefacts: dict[str, Case], what: str) -> None:
    case = artefacts[what]
    case.valid()  # accepted as made: only the version can be what is refused below
    with pytest.raises(case.error, match="version|malformed|wrong type"):
        case.true_v()
