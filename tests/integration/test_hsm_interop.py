"""Interop with OpenSC's pkcs11-tool: it sees our keys by label and CKA_ID, and signs with them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from securethread.hsm import SIGNING, Curve, HsmPrivateKey, Token, default_module_path

PKCS11_TOOL = shutil.which("pkcs11-tool")
pytestmark = pytest.mark.skipif(PKCS11_TOOL is None, reason="opensc (pkcs11-tool) not installed")


def _tool(*args: str) -> str:
    assert PKCS11_TOOL is not None
    proc = subprocess.run(
        [
            PKCS11_TOOL,
            "--module",
            default_module_path(),
            "--login",
            "--pin",
            os.environ["SECURETHREAD_PIN_OEM"],
            "--token-label",
            "oem",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(params=[Curve.P256, Curve.P384], ids=lambda c: c.name)
def key(oem: Token, label: str, request: pytest.FixtureRequest) -> Iterator[HsmPrivateKey]:
    k = oem.generate_ec(label, curve=request.param, policy=SIGNING)
    yield k
    oem.destroy(label)


def _object_blocks(listing: str) -> list[str]:
    blocks: list[str] = []
    current: list[str] = []
    for line in listing.splitlines():
        if line and not line.startswith(" ") and current:
            blocks.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def test_list_objects_shows_label_and_id(key: HsmPrivateKey) -> None:
    listing = _tool("--list-objects")
    ours = [b for b in _object_blocks(listing) if f"label:      {key.label}" in b]
    kinds = sorted(b.splitlines()[0].split(";")[0] for b in ours)
    assert kinds == ["Private Key Object", "Public Key Object"], listing
    for block in ours:
        assert f"ID:         {key.key_id.hex()}" in block, block
    private = next(b for b in ours if b.startswith("Private Key Object"))
    assert "sign" in private.split("Usage:")[1].splitlines()[0]


def test_pkcs11_tool_signature_verifies_under_exported_key(
    key: HsmPrivateKey, tmp_path: Path
) -> None:
    message = b"signed by pkcs11-tool with a securethread key"
    h = hashes.SHA256() if key.curve is Curve.P256 else hashes.SHA384()
    digest = hashlib.new(h.name, message).digest()
    (tmp_path / "digest").write_bytes(digest)
    _tool(
        "--sign",
        "--mechanism",
        "ECDSA",
        "--id",
        key.key_id.hex(),
        "--input-file",
        str(tmp_path / "digest"),
        "--output-file",
        str(tmp_path / "sig"),
        "--signature-format",
        "openssl",
    )
    sig = (tmp_path / "sig").read_bytes()
    public = key.public_key()
    public.verify(sig, digest, ec.ECDSA(utils.Prehashed(h)))
    public.verify(sig, message, ec.ECDSA(h))
    # And the check can fail: the same signature over another message does not verify.
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        public.verify(sig, message + b"!", ec.ECDSA(h))
