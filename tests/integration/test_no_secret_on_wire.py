"""Nothing secret crosses: the key channel over TCP and the sealed package, with software keys
whose every value the test knows.

Both parties use a :class:`SoftwareBackend` that records the value of every secret key it
ever holds (the image key, each ECDH secret Z, the session wrap/confirm/MAC keys on both
sides, the package KEK, the programmer's session copies and stored copies) and every EC
private key it generates (identities, ephemeral keys).  A recording proxy on 127.0.0.1 sees
every byte of the session; the artefacts each side keeps are written to files.  No frame,
byte stream or file may contain any of those values, raw, reversed, as hex (either case) or
base64, whole or either half.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from securethread.channel.transfer import (
    MemoryPackageRegistry,
    open_package,
    seal_package,
    verify_receipt,
)
from securethread.channel.transport import send_key_session, serve_key_session
from securethread.hsm import IMAGE_KEY, SoftwareBackend
from securethread.pki import EnclavePurpose, certify_enclave, create_enclave_csr, create_root_ca
from tests.integration.channel_net import FrameProxy, serve_in_background


class RecordingBackend(SoftwareBackend):
    """A software backend that remembers every secret value it creates (test-only hook)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.secrets: list[bytes] = []
        self._record_lock = threading.Lock()

    def _add_secret(self, *args: Any, **kwargs: Any) -> Any:
        key = super()._add_secret(*args, **kwargs)
        with self._record_lock:
            self.secrets.append(bytes(key._value))
        return key

    def generate_ec(self, *args: Any, **kwargs: Any) -> Any:
        key = super().generate_ec(*args, **kwargs)
        n = key._key.private_numbers().private_value
        with self._record_lock:
            self.secrets.append(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))
            self.secrets.append(n.to_bytes(key.curve.coordinate_size, "big"))
        return key


def forms(secret: bytes) -> Iterator[bytes]:
    """The ways a leaked key could show up in a byte string."""
    for value in (secret, secret[: len(secret) // 2], secret[len(secret) // 2 :]):
        for v in (value, value[::-1]):
            yield v
            yield v.hex().encode()
            yield v.hex().upper().encode()
    for v in (secret, secret[::-1]):
        yield base64.b64encode(v).rstrip(b"=")
        yield base64.urlsafe_b64encode(v).rstrip(b"=")


def leaks(data: bytes, secrets: list[bytes]) -> list[bytes]:
    """The secrets found in ``data`` in any form."""
    return [s for s in secrets if any(f in data for f in forms(s))]


@pytest.fixture(scope="module")
def parties() -> dict[str, Any]:
    oem, prog = RecordingBackend("oem"), RecordingBackend("programmer")
    root = create_root_ca(oem, label="root")
    out: dict[str, Any] = {"oem": oem, "prog": prog, "root": root}

    def certify(
        backend: SoftwareBackend, label: str, purpose: Any, role: str, signer: Any = None
    ) -> x509.Certificate:
        csr = create_enclave_csr(
            backend, label=label, enclave_name=role, purpose=purpose, signer=signer
        )
        return certify_enclave(
            oem.private_key("root"),
            root,
            csr,
            enclave_name=role,
            purpose=purpose,
            role=role,
            proof_key=signer.public_key() if signer is not None else None,
        )

    out["oem-id"] = certify(oem, "id", EnclavePurpose.IDENTITY, "oem")
    out["prog-id"] = certify(prog, "id", EnclavePurpose.IDENTITY, "programmer")
    out["prog-ka"] = certify(
        prog, "ka", EnclavePurpose.KEY_AGREEMENT, "programmer", signer=prog.private_key("id")
    )
    return out


def test_scanner_finds_a_planted_key() -> None:
    """The check below can fail: a key hidden in any of the forms is found."""
    secret = bytes(range(32))
    for f in forms(secret):
        assert leaks(b"prefix" + f + b"suffix", [secret]) == [secret]
    assert leaks(b"\x00" * 100, [secret]) == []


def test_no_secret_crosses_the_channel_or_the_package(
    parties: dict[str, Any], tmp_path: Path
) -> None:
    oem: RecordingBackend = parties["oem"]
    prog: RecordingBackend = parties["prog"]
    root: x509.Certificate = parties["root"]
    image = oem.generate_aes("image-key", policy=IMAGE_KEY)
    image_value = oem.secrets[-1]

    # --- online: the channel over TCP, through a recording proxy ---------------------------
    side, address = serve_in_background(
        serve_key_session,
        backend=prog,
        identity_key=prog.private_key("id"),
        identity_cert=parties["prog-id"],
        root_cert=root,
        timeout=10,
    )
    proxy = FrameProxy(address)
    sent = send_key_session(
        *proxy.address,
        backend=oem,
        identity_key=oem.private_key("id"),
        identity_cert=parties["oem-id"],
        root_cert=root,
        expected_programmer=parties["prog-id"],
        labels=["image-key"],
        timeout=10,
    )
    got = side.result()
    proxy.wait()
    assert sent.record.committed and got.keys == sent.record.keys
    # What each side keeps (and may hand to an auditor): the signed ack and the records.
    (tmp_path / "ack.cbor").write_bytes(sent.record.ack)
    (tmp_path / "oem-record.txt").write_text(repr(sent))
    (tmp_path / "programmer-record.txt").write_text(repr(got))

    # --- offline: a sealed package and its signed receipt ----------------------------------
    oem.generate_aes("image-key-2", policy=IMAGE_KEY)
    image2_value = oem.secrets[-1]
    package = seal_package(
        oem,
        ["image-key-2"],
        identity_key=oem.private_key("id"),
        identity_cert=parties["oem-id"],
        expected_programmer=parties["prog-id"],
        recipient_cert=parties["prog-ka"],
        root_cert=root,
    )
    receipt = open_package(
        package,
        backend=prog,
        ka_key=prog.private_key("ka"),
        ka_cert=parties["prog-ka"],
        identity_key=prog.private_key("id"),
        identity_cert=parties["prog-id"],
        root_cert=root,
        registry=MemoryPackageRegistry(),
    )
    verify_receipt(
        receipt.signed, package=package, programmer_cert=parties["prog-id"], root_cert=root
    )
    (tmp_path / "package.cbor").write_bytes(package)
    (tmp_path / "receipt.cbor").write_bytes(receipt.signed)

    # --- the test knows every secret both parties ever held ---------------------------------
    secrets = oem.secrets + prog.secrets
    assert image_value in prog.secrets  # the programmer's copies hold exactly the image key
    assert prog.secrets.count(image_value) >= 2  # a session copy, then the stored key
    assert image.key_id == prog.secret_key("image-key").key_id
    # Both sides derived the same Z, wrap, confirm and MAC keys, and the same package Z and
    # KEK: the recording saw the session keys, not only the image keys.
    assert len(set(oem.secrets) & set(prog.secrets) - {image_value, image2_value}) >= 6
    # ... plus the root, identity, key-agreement and three ephemeral private keys.
    assert len(set(secrets)) >= 15

    frames = [payload for _d, _k, payload in proxy.frames]
    assert len(frames) == 8
    streams = [bytes(proxy.raw["oem"]), bytes(proxy.raw["programmer"])]
    files = [p.read_bytes() for p in sorted(tmp_path.iterdir())]
    assert len(files) == 5
    for data in frames + streams + files:
        assert leaks(data, secrets) == []
