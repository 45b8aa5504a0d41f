"""MCUboot interop both ways, on real SoftHSM tokens and MCUboot's own imgtool (from PyPI).

* A device's installed image -- mastered with the firmware-signing key inside the OEM token,
  encrypted, licensed, decrypted and checked by the SBM -- passes ``imgtool verify -k
  <firmware-signing public key>`` and ``imgtool dumpinfo``; its key hash TLV is the one imgtool
  computes for that key.  Tampered copies (payload, header, signature TLV) are refused by
  imgtool and by the parser.
* imgtool's own signing of the same firmware with a software key verifies under our parser, and
  everything the hash covers is byte for byte what the token-signed image has.
* ``imgtool create``'s unsigned image is signed in the token (``master-image --mcuboot``) and
  installed; imgtool verifies the result.  ``oem master-image`` refuses bad MCUboot input and
  options with one stderr line and its exit code, leaving no image behind.
* A demo device's installed image (``securethread demo``'s first station keeps its chips'
  flash, ``station run --keep-flash``) passes ``imgtool verify`` with the OEM's
  firmware-signing public key and ``imgtool dumpinfo``, and carries the demo's firmware.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from imgtool import keys as imgtool_keys

from securethread.demo import FIRST_UID, child_env
from securethread.formats.image import master_image, verify_manifest
from securethread.formats.license import LicenseIssuer
from securethread.formats.mcuboot import (
    McubootHashError,
    McubootKeyError,
    McubootSignatureError,
    parse_image,
    verify_image,
)
from tests.integration import test_mastering as tm
from tests.integration.demo_support import DEVICES, demo_copy

plant = tm.plant  # the key ceremony and onboarding on the session's OEM and programmer tokens

IMGTOOL = [sys.executable, "-m", "imgtool.main"]
FIRMWARE = bytes(range(256)) * 40 + b"interop"


def imgtool(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*IMGTOOL, *map(str, args)], capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def _pem(key: Any, path: Path) -> Path:
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _install(plant: dict[str, Any], signed: bytes, blob: bytes, seq: int) -> bytes:
    """License and program one freshly provisioned device; return its flash."""
    manifest = verify_manifest(signed, key=plant["fw_key"].public_key())
    dev, ident = tm._onboard(plant, seq)
    lic = LicenseIssuer(
        ka_key=plant["ka_key"], ka_certificate=plant["ka_cert"], signing_key=plant["lic_key"],
        signing_certificate=plant["lic_cert"], image_key=plant["prog_image_key"],
        manifest=manifest,
    ).issue(ident.device_id, ident.public_key)  # fmt: skip
    dev.program(signed, io.BytesIO(blob), lic, nonce=os.urandom(16))
    assert dev.flash is not None
    return bytes(dev.flash)


@pytest.fixture(scope="module")
def installed(plant: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("mcuboot")
    signed, blob = tm._master(plant, FIRMWARE, counter=5)  # version 2.5, counter 5
    (tmp / "installed.bin").write_bytes(_install(plant, signed, blob, 1))
    (tmp / "firmware.bin").write_bytes(FIRMWARE)
    return {
        "dir": tmp,
        "image": tmp / "installed.bin",
        "firmware": tmp / "firmware.bin",
        "key": _pem(plant["fw_key"].public_key(), tmp / "firmware-signing.pem"),
    }


def test_imgtool_verifies_the_installed_image(installed: dict[str, Path]) -> None:
    proc = imgtool("verify", "-k", installed["key"], installed["image"])
    assert "Image was correctly validated" in proc.stdout
    assert "Image version: 2.5.0+0" in proc.stdout
    digest = hashlib.sha256(installed["image"].read_bytes()[: _hashed(installed["image"])])
    assert f"Image digest: {digest.hexdigest()}" in proc.stdout


def _hashed(path: Path) -> int:
    return parse_image(path.read_bytes()).hashed_length


def test_imgtool_dumpinfo_reads_header_and_tlvs(installed: dict[str, Path]) -> None:
    out = imgtool("dumpinfo", installed["image"]).stdout
    for line in ("magic:              0x96f3b83d", "hdr_size:           0x200",
                 f"img_size:           {hex(len(FIRMWARE))}", "version:            2.5.0+0",
                 "type: SEC_CNT (0x50)", "type: SHA256 (0x10)", "type: KEYHASH (0x1)",
                 "type: ECDSASIG (0x22)", "data: 0x05 0x00 0x00 0x00"):  # fmt: skip
        assert line in out, line


def test_key_hash_is_imgtools(installed: dict[str, Path]) -> None:
    """bootutil finds its key by this hash: it must be imgtool's hash of the same key."""
    theirs = hashlib.sha256(imgtool_keys.load(str(installed["key"])).get_public_bytes()).digest()
    assert parse_image(installed["image"].read_bytes()).key_hash == theirs


def _flipped(path: Path, at: int, out: Path) -> Path:
    b = bytearray(path.read_bytes())
    b[at if at >= 0 else len(b) + at] ^= 0x01
    out.write_bytes(bytes(b))
    return out


@pytest.mark.parametrize(
    ("what", "at", "verdict", "exc"),
    [("payload", 0x200 + 100, "Image has an invalid hash", McubootHashError),
     ("header", 20, "Image has an invalid hash", McubootHashError),  # version major
     ("signature TLV", -1, "No signature found for the given key", McubootSignatureError)],
)  # fmt: skip
def test_tampered_copy_refused_by_imgtool_and_parser(
    installed: dict[str, Path], what: str, at: int, verdict: str, exc: type[Exception]
) -> None:
    bad = _flipped(installed["image"], at, installed["dir"] / f"bad-{at}.bin")
    proc = imgtool("verify", "-k", installed["key"], bad, ok=False)
    assert proc.returncode != 0 and verdict in proc.stdout + proc.stderr, (what, proc.stdout)
    key = serialization.load_pem_public_key(installed["key"].read_bytes())
    with pytest.raises(exc):
        verify_image(bad.read_bytes(), key=key)  # type: ignore[arg-type]


def test_imgtool_signed_image_verifies_under_our_parser(installed: dict[str, Path]) -> None:
    tmp = installed["dir"]
    imgtool("keygen", "-k", tmp / "sw.pem", "-t", "ecdsa-p256")
    imgtool("sign", "-k", tmp / "sw.pem", "--header-size", "0x200", "--pad-header", "--align",
            "4", "--version", "2.5", "--security-counter", "5", "-S", "0x100000",
            installed["firmware"], tmp / "theirs.bin")  # fmt: skip
    pub = imgtool_keys.load(str(tmp / "sw.pem")).key.public_key()
    theirs = (tmp / "theirs.bin").read_bytes()
    v = verify_image(theirs, key=pub)
    assert (str(v.version), v.security_counter, v.image_size) == ("2.5.0+0", 5, len(FIRMWARE))
    ours = installed["image"].read_bytes()
    n = parse_image(ours).hashed_length
    assert parse_image(theirs).hashed_length == n and theirs[:n] == ours[:n]
    # and the token's signature does not verify under imgtool's key, nor the reverse
    with pytest.raises(McubootKeyError, match="another key"):
        verify_image(ours, key=pub)


def test_imgtool_create_output_signed_in_the_token(
    plant: dict[str, Any], installed: dict[str, Path]
) -> None:
    tmp = installed["dir"]
    imgtool("create", "--header-size", "0x400", "--pad-header", "--align", "4", "--version",
            "2.6.0+7", "--security-counter", "6", "-S", "0x100000", "--custom-tlv", "0xa0",
            "0x0102aabb", installed["firmware"], tmp / "unsigned.bin")  # fmt: skip
    unsigned = (tmp / "unsigned.bin").read_bytes()
    out = io.BytesIO()
    signed = master_image(
        io.BytesIO(unsigned), out, image_key=plant["image_key"], signing_key=plant["fw_key"],
        image_id="fw-main", image_version="2.6.0+7", security_counter=6,
        device_class="sensor-v1", mcuboot_input=True,
    )  # fmt: skip
    flash = _install(plant, signed, out.getvalue(), 2)
    n = parse_image(unsigned).hashed_length
    # imgtool's header, payload and protected TLVs (SEC_CNT, then its custom TLV), kept
    assert flash[:n] == unsigned[:n]
    assert parse_image(flash).protected_tlvs[1] == (0xA0, bytes.fromhex("0102aabb"))
    (tmp / "resigned.bin").write_bytes(flash)
    proc = imgtool("verify", "-k", installed["key"], tmp / "resigned.bin")
    assert "Image version: 2.6.0+7" in proc.stdout


# --- the command ----------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securethread.cli", *map(str, args)],
        capture_output=True, text=True, env=child_env(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def oem_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("oem-cli")
    oem = tmp / "oem"
    proc = _cli("oem", "init", "--workdir", oem, "--name", "acme", "--officers", "1",
                "--threshold", "1", "--officer-pin-file", f"1={tmp / 'officer-1.pin'}")
    assert proc.returncode == 0, proc.stderr
    return oem


@pytest.mark.parametrize(
    ("extra", "source", "code", "message"),
    [
        (["--version", "1.2.3.4"], "raw", 2, "--version: image version '1.2.3.4' is not"),
        (["--header-size", "16"], "raw", 2, "--header-size must be in"),
        (["--load-address", "0x1z"], "raw", 2, "is not a decimal or 0x"),
        (["--security-counter", "4294967296"], "raw", 2, "--security-counter must be"),
        (["--mcuboot"], "raw", 4, "bad MCUboot image magic"),
        (["--mcuboot", "--version", "1.0.0+1"], "unsigned", 4, "differs from --version"),
        (["--mcuboot", "--security-counter", "4"], "unsigned", 4, "security counter 3 differs"),
        (["--mcuboot", "--header-size", "0x400"], "unsigned", 2, "come from the MCUboot image"),
        ([], "empty", 4, "zero-length firmware"),
    ],
)  # fmt: skip
def test_master_image_refuses_bad_input(
    oem_dir: Path, installed: dict[str, Path], extra: list[str], source: str, code: int,
    message: str,
) -> None:
    tmp = installed["dir"]
    unsigned = tmp / "unsigned-cli.bin"
    if not unsigned.exists():
        imgtool("create", "--header-size", "0x200", "--pad-header", "--align", "4", "--version",
                "1", "--security-counter", "3", "-S", "0x100000", installed["firmware"],
                unsigned)  # fmt: skip
    (tmp / "empty.bin").write_bytes(b"")
    path = {"raw": installed["firmware"], "unsigned": unsigned, "empty": tmp / "empty.bin"}
    # defaults first: argparse takes the last of a repeated option
    # an image id with letters no hex digit has: the token's UUID-named files never match it
    proc = _cli("oem", "master-image", "--workdir", oem_dir, path[source], "--image-id", "refused",
                "--device-class", "c", "--version", "1", "--security-counter", "3",
                *extra)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # refused before the token was touched: no image directory, no image key to reuse
    assert not list(oem_dir.rglob("*refused*")), list(oem_dir.rglob("*refused*"))


def test_master_image_signs_an_unsigned_mcuboot_image(
    oem_dir: Path, installed: dict[str, Path]
) -> None:
    tmp = installed["dir"]
    imgtool("create", "--header-size", "0x200", "--pad-header", "--align", "4", "--version",
            "3.1.4+1", "--security-counter", "9", "-S", "0x100000", installed["firmware"],
            tmp / "unsigned-ok.bin")  # fmt: skip
    proc = _cli("oem", "master-image", "--workdir", oem_dir, tmp / "unsigned-ok.bin",
                "--image-id", "fw-ok", "--version", "3.1.4+1", "--security-counter", "9",
                "--device-class", "c", "--mcuboot", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["image"] == "fw-ok"
    assert any((oem_dir / "images").rglob("manifest.bin"))


# --- a demo device's installed image (issue 21): the session's demo world ------------------


@pytest.fixture(scope="module")
def demo_flash(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The session's demo world (tests/integration/demo_support.py), copied: its first
    station ran with ``--keep-flash``, so each chip it programmed left its flash behind."""
    root, summary = demo_copy(tmp_path_factory, "mcuboot-demo")
    assert summary["ok"] and summary["stations"] >= 1
    return {"root": root, "summary": summary}


def test_imgtool_verifies_a_demo_devices_installed_image(demo_flash: dict[str, Any]) -> None:
    root, summary = demo_flash["root"], demo_flash["summary"]
    flash = Path(summary["flash"])
    assert flash == root / "flash"
    # station 1 drove the first share of the chips, from the demo's first UID
    stations = summary["stations"]
    share = DEVICES // stations + (1 if DEVICES % stations else 0)
    expected = {f"{FIRST_UID + i:016x}.img" for i in range(share)}
    assert {p.name for p in flash.iterdir()} == expected
    key = root / "oem" / "firmware-signing.pem"  # the OEM's firmware-signing public key
    firmware = (root / "oem" / "firmware.bin").read_bytes()
    for image in sorted(flash.iterdir()):
        proc = imgtool("verify", "-k", key, image)
        assert "Image was correctly validated" in proc.stdout, proc.stdout
        assert "Image version: 1.0.0+0" in proc.stdout
        out = imgtool("dumpinfo", image).stdout
        for line in (f"img_size:           {hex(len(firmware))}", "type: KEYHASH (0x1)",
                     "type: ECDSASIG (0x22)", "data: 0x03 0x00 0x00 0x00"):  # fmt: skip
            assert line in out, line  # the demo masters version 1.0.0, security counter 3
        parsed = parse_image(image.read_bytes())
        data = image.read_bytes()
        assert data[parsed.header_size : parsed.header_size + parsed.image_size] == firmware
    # and a flipped payload byte of one of them is refused by imgtool
    bad = _flipped(sorted(flash.iterdir())[0], 0x200 + 7, root / "bad.img")
    proc = imgtool("verify", "-k", key, bad, ok=False)
    assert proc.returncode != 0 and "Image has an invalid hash" in proc.stdout + proc.stderr
