"""Every signed artefact of a demo run, decoded and verified by pycose (RFC 9052).

One ``securethread demo`` world; every file of both sites is searched for COSE messages,
inside containers too (license maps, ledger exports, transcripts, nested byte strings).  The
public keys are the ones a relying party holds: every certificate and SPKI of the run,
found the same way (device keys from the device certificates in the ledger).  pycose, which
nobody here wrote, must decode each message and verify each signature with the key its kid
names; the job must be a COSE_Sign with one COSE_Signature per officer.

pycose 1.1.0's ``CoseMessage.decode`` checks ``isinstance(value, list)`` and cbor2 6 returns
tag contents as tuples, so the test hands pycose the decoded array as lists through its own
``from_cose_obj`` (the header parsing, Sig_structure and ECDSA are pycose's).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.headers import KID, Algorithm, ContentType
from pycose.keys.ec2 import EC2Key
from pycose.messages.cosemessage import CoseMessage
from pycose.messages.sign1message import Sign1Message
from pycose.messages.signmessage import SignMessage

from securethread.formats import ledger
from securethread.formats import transcript as tr
from tests.integration.demo_support import DEVICES, demo_copy


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, summary = demo_copy(tmp_path_factory, "cose")  # the session's demo world, copied
    assert summary["ok"]
    return root


def _thaw(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_thaw(x) for x in v]
    if isinstance(v, dict | cbor2.frozendict):
        return {k: _thaw(x) for k, x in v.items()}
    return v


class _World:
    """COSE messages and public keys (by SHA-256 of the SPKI) found in a demo run."""

    def __init__(self) -> None:
        self.messages: dict[bytes, str] = {}  # message bytes -> where found
        self.keys: dict[bytes, ec.EllipticCurvePublicKey] = {}

    def add_key(self, key: Any) -> None:
        if isinstance(key, ec.EllipticCurvePublicKey):
            spki = key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self.keys[hashlib.sha256(spki).digest()] = key

    def walk(self, data: bytes, where: str, depth: int = 0) -> None:
        if depth > 6 or len(data) < 2:
            return
        if data.startswith(b"-----BEGIN"):
            self._pem(data)
            return
        if data.startswith(ledger.EXPORT_MAGIC):
            job, items = ledger.read_export(io.BytesIO(data))
            self.walk(job, f"{where}: job", depth + 1)
            for i, (_tag, payload) in enumerate(items):
                self.walk(payload, f"{where}: item {i}", depth + 1)
            return
        if data.startswith(tr.MAGIC):
            pos = len(tr.MAGIC)
            while pos + 4 <= len(data):
                n = int.from_bytes(data[pos : pos + 4], "big")
                self.walk(data[pos + 4 : pos + 4 + n], f"{where}: record", depth + 1)
                pos += 4 + n
            return
        if data[0] == 0x30:
            try:
                self.add_key(x509.load_der_x509_certificate(data).public_key())
            except ValueError:
                try:
                    self.add_key(serialization.load_der_public_key(data))
                except ValueError:
                    pass
            return
        try:
            value = cbor2.loads(data)
        except Exception:  # noqa: BLE001 - not CBOR: some other file
            return
        if cbor2.dumps(value) != data:
            return  # a prefix of something else decoded by chance
        if isinstance(value, cbor2.CBORTag) and value.tag in (18, 98):
            self.messages[data] = where
            self.walk(value.value[2], f"{where}: payload", depth + 1)
            return
        self._values(value, where, depth)

    def _values(self, value: Any, where: str, depth: int) -> None:
        if isinstance(value, bytes):
            self.walk(value, where, depth + 1)
        elif isinstance(value, dict | cbor2.frozendict):
            for k, v in value.items():
                self._values(v, f"{where}.{k}", depth)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                self._values(v, f"{where}[{i}]", depth)

    def _pem(self, data: bytes) -> None:
        for cert in _pem_certs(data):
            self.add_key(cert.public_key())
        if b"PUBLIC KEY" in data:
            self.add_key(serialization.load_pem_public_key(data))


def _pem_certs(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def _world(root: Path) -> _World:
    w = _World()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "hsm" not in path.parts and path.suffix not in (".sqlite", ".lock"):
            w.walk(path.read_bytes(), str(path.relative_to(root)))
    return w


def _cose_key(key: ec.EllipticCurvePublicKey) -> EC2Key:
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cose = EC2Key.from_pem_public_key(pem.decode())
    assert isinstance(cose, EC2Key)
    return cose


def _kind(ctype: str) -> str:
    return ctype.removeprefix("application/securethread-").removesuffix("+cbor")


def _verify_all(w: _World, *, every_key: bool = True) -> dict[str, int]:
    """Verify every message of ``w`` with pycose; the count of verified messages by kind.
    ``every_key``: a message whose signer's key is not in ``w`` fails the test."""
    kinds: dict[str, int] = {}
    for data, where in w.messages.items():
        tag = cbor2.loads(data)
        msg = CoseMessage._COSE_MSG_ID[tag.tag].from_cose_obj(_thaw(tag.value), True)
        kind = _kind(msg.phdr[ContentType])
        if isinstance(msg, Sign1Message):
            assert msg.phdr[Algorithm].identifier in (-7, -35), where
            assert msg.uhdr == {}, where
            signers: list[Any] = [msg]
        else:
            assert isinstance(msg, SignMessage) and kind == "job", where
            # the job has its two officers; each officer's approval, that officer alone
            assert len(msg.signers) == (1 if "approvals" in where else 2), where
            signers = list(msg.signers)
        if not every_key and any(s.phdr[KID] not in w.keys for s in signers):
            continue
        for signer in signers:
            kid = signer.phdr[KID]
            assert kid in w.keys, f"{where}: no public key for kid {kid.hex()[:16]}"
            signer.key = _cose_key(w.keys[kid])
            assert signer.verify_signature(), where
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def test_pycose_verifies_every_signed_artefact_of_a_demo_run(demo: Path) -> None:
    kinds = _verify_all(_world(demo))
    # Every kind the run keeps on disk was found and verified (each at least once).
    expected = {
        "job", "manifest", "device-trust", "ledger-checkpoint", "ledger-close",
        "boot-confirmation", "ceremony-record", "enrolment-request", "certificate-bundle",
        "officer-keys", "key-transfer-ack", "production-ca-request", "ocsp-responder-request",
    }  # fmt: skip
    assert expected <= set(kinds), (sorted(expected - set(kinds)), kinds)
    assert kinds["ceremony-record"] >= 20 and kinds["boot-confirmation"] >= DEVICES


def test_pycose_verifies_licenses_and_sealed_packages() -> None:
    """What a demo run does not keep on disk (a license goes to its device, the sealed key
    package over the channel): the same check on the artefacts the fuzz world makes with
    the library."""
    from tests.fuzz.world import build

    w = _World()
    for name, seeds in build().seeds.items():
        for i, seed in enumerate(seeds):
            if isinstance(seed, bytes):
                w.walk(seed, f"{name}[{i}]")
    kinds = _verify_all(w, every_key=False)
    assert kinds.get("license", 0) >= 1 and kinds.get("sealed-key-package", 0) >= 1, kinds


def test_pycose_refuses_a_tampered_checkpoint_and_job(demo: Path) -> None:
    """The control: the same verifier with one payload bit flipped says no."""
    w = _world(demo)
    done = set()
    for data in w.messages:
        tag = cbor2.loads(data)
        msg = CoseMessage._COSE_MSG_ID[tag.tag].from_cose_obj(_thaw(tag.value), True)
        kind = _kind(msg.phdr[ContentType])
        if kind not in ("job", "ledger-checkpoint") or kind in done:
            continue
        done.add(kind)
        msg.payload = bytes([msg.payload[0] ^ 1]) + msg.payload[1:]
        signers = msg.signers if isinstance(msg, SignMessage) else [msg]
        for s in signers:
            s.key = _cose_key(w.keys[s.phdr[KID]])
            with pytest.raises(Exception):  # noqa: B017 - pycose raises its own assertion
                assert s.verify_signature()
    assert done == {"job", "ledger-checkpoint"}
