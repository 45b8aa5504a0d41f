"""Zero-secret programming end to end (issue 20): vendor lot -> OEM pre-licensing in its real
SoftHSM token -> a factory with no token -> the OEM reconciles the boot confirmations.

Every party runs the real CLI in a process of its own with only its own files (the demo's
child environment: no SoftHSM configuration, no PINs).  The factory's process has
python-pkcs11 made unimportable and still flashes: it never loads a PKCS#11 module.  A chip
outside the lot gets nothing usable; bad lots and packages are refused with one line and
nothing written; the image key stays sensitive in the OEM token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cbor2 import CBORTag

from securethread.demo import child_env
from securethread.demo.line import SimulatedFab
from securethread.errors import DeviceRefusedError
from securethread.formats import cbor
from securethread.formats.lot import LOT_KIND, LotManifest, _CryptographySigner, sign_lot
from securethread.formats.programming import Confirmations
from securethread.keys.ecutil import point_of
from securethread.pki import from_pem
from securethread.station.flash import flash_package
from securethread.workdir import parse_fingerprint

CLI = [sys.executable, "-m", "securethread.cli"]
#: The factory's process: python-pkcs11 cannot be imported, and no securethread.hsm module
#: may be loaded by the end.
NO_PKCS11 = (
    "import sys; sys.modules['pkcs11'] = None\n"
    "from securethread.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "loaded = [m for m in sys.modules if m.startswith('securethread.hsm')]\n"
    "assert not loaded, loaded\n"
    "sys.exit(rc)\n"
)
FIRST = 0x5EC0_0000_0000_0000
LOT_CHIPS = 6
EXIT_CONFIG, EXIT_VERIFY = 2, 4


def _run(root: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=root)


def _ok(root: Path, *args: str, code: str | None = None) -> dict[str, Any]:
    p = _run(root, *args, "--json", code=code)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def _refused(root: Path, *args: str, exit_code: int, match: str) -> str:
    p = _run(root, *args)
    assert p.returncode == exit_code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert match in lines[0], lines[0]
    return lines[0]


class World:
    """The OEM, a vendor and its lot, pre-licensed for ``factory-1``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        init = _ok(root, "oem", "init", "--workdir", "oem", "--name", "zs-oem", "--officers",
                   "1", "--threshold", "1", "--officer-pin-file", "1=o1.pin")  # fmt: skip
        self.fingerprint = init["root_fingerprint"]
        _ok(root, "vendor", "init", "--workdir", "vendor", "--oem-root", "oem/root-ca.pem")
        (root / "fw.bin").write_bytes(os.urandom(20000))
        _ok(root, "oem", "master-image", "--workdir", "oem", "fw.bin", "--image-id", "fw-1",
            "--version", "1.0.0", "--security-counter", "2",
            "--device-class", "sensor-v1")  # fmt: skip
        _ok(root, "vendor", "lot", "--workdir", "vendor", "--lot-id", "lot-1", "--device-class",
            "sensor-v1", "--devices", str(LOT_CHIPS), "--out", "lot.bin")  # fmt: skip
        self.tx_before = self.transcript_records()
        self.pre = _ok(root, "oem", "prelicense", "--workdir", "oem", "lot.bin", "--vendor-ca",
                       "vendor/root-ca.pem", "--image", "fw-1",
                       "--factory", "factory-1")  # fmt: skip

    @property
    def fab(self) -> SimulatedFab:
        """The vendor's fab (a fresh one each time: one object makes each UID once)."""
        return SimulatedFab(self.root / "vendor")

    def transcript_records(self) -> list[str]:
        from securethread.formats.transcript import verify_transcript

        cert = from_pem((self.root / "oem" / "oem-identity.pem").read_bytes())
        s = verify_transcript(self.root / "oem" / "transcript.bin", public_key=cert.public_key())  # type: ignore[arg-type]
        return [r.operation for r in s.records]

    def flash_args(self, out: str, *, first: int = FIRST, devices: int = LOT_CHIPS,
                   factory: str = "factory-1", lot: str = "lot-1",
                   package: str = "oem/outbox/package-lot-1.bin") -> list[str]:  # fmt: skip
        return ["station", "flash-package", package, "--image", "oem/outbox/image-fw-1.enc",
                "--root", "oem/root-ca.pem", "--root-fingerprint", self.fingerprint,
                "--factory", factory, "--lot", lot, "--chips-from", "vendor",
                "--devices", str(devices), "--first-uid", f"{first:016x}",
                "--out", out]  # fmt: skip

    def files(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("zero-secret"))


def test_the_lot_is_prelicensed_once_and_recorded_in_the_oem_transcript(world: World) -> None:
    assert world.pre["chips"] == LOT_CHIPS and world.pre["factory"] == "factory-1"
    assert world.transcript_records() == [*world.tx_before, "lot-prelicensing"]
    before = world.files()
    _refused(world.root, "oem", "prelicense", "--workdir", "oem", "lot.bin", "--vendor-ca",
             "vendor/root-ca.pem", "--image", "fw-1", "--factory", "factory-1",
             exit_code=EXIT_CONFIG, match="already done")  # fmt: skip
    assert world.files() == before


def test_a_factory_without_a_token_flashes_the_lot_and_the_oem_reconciles(world: World) -> None:
    """No SoftHSM configuration, no PIN, python-pkcs11 unimportable: the lot's first four
    chips are flashed; two chips beyond the lot get nothing; presented again, the four are
    already flashed; the OEM reconciles four confirmed, two missing."""
    r = world.root
    out = _ok(r, *world.flash_args("conf.bin", devices=4), code=NO_PKCS11)
    assert (out["flashed"], out["refused"], out["confirmed_total"]) == (4, [], 4)
    p = _run(r, *world.flash_args("conf.bin", first=FIRST + LOT_CHIPS, devices=2),
             code=NO_PKCS11)  # fmt: skip
    assert p.returncode == EXIT_VERIFY, p.stderr
    beyond = world.flash_args("conf.bin", first=FIRST + LOT_CHIPS, devices=2)
    refused = json.loads(_run(r, *beyond, "--json").stdout)["refused"]
    assert [x["reason"].split(":")[0] for x in refused] == ["NotInLotError"] * 2
    again = _ok(r, *world.flash_args("conf.bin", devices=4), code=NO_PKCS11)
    assert (again["flashed"], again["already_flashed"], again["confirmed_total"]) == (0, 4, 4)
    rec = _ok(r, "oem", "reconcile-lot", "--workdir", "oem", "conf.bin", "--lot", "lot-1")
    assert (rec["licensed"], rec["confirmed"], rec["missing"], rec["refused"]) == (6, 4, 2, [])
    report = json.loads((r / "oem" / "lots" / "lot-1" / "reconciliation.json").read_text())
    assert report["confirmed"] == 4


@pytest.mark.parametrize("field", ["package_sha256", "lot_id", "factory"])
def test_confirmations_of_another_package_lot_or_factory_are_refused(
    world: World, tmp_path: Path, field: str
) -> None:
    """reconcile-lot: a confirmations file naming another package, lot or factory than the
    package this OEM issued is refused with one line (exit 4); the OEM's files stay as they
    were."""
    right = {"package_sha256": bytes.fromhex(world.pre["package_sha256"]),
             "lot_id": "lot-1", "factory": "factory-1"}  # fmt: skip
    wrong = {"package_sha256": b"\x01" * 32, "lot_id": "lot-2", "factory": "factory-2"}
    conf = tmp_path / "conf.bin"
    conf.write_bytes(
        Confirmations(**{**right, field: wrong[field]}, confirmations={}).to_bytes()  # type: ignore[arg-type]
    )
    before = {p: p.read_bytes() for p in (world.root / "oem").rglob("*") if p.is_file()}
    _refused(world.root, "oem", "reconcile-lot", "--workdir", "oem", str(conf), "--lot",
             "lot-1", exit_code=EXIT_VERIFY,
             match="not the package this OEM issued for lot 'lot-1' at 'factory-1'")  # fmt: skip
    after = {p: p.read_bytes() for p in (world.root / "oem").rglob("*") if p.is_file()}
    assert after == before


class _Chips:
    """Chips opened once and kept, so the test can look at them after the flasher."""

    def __init__(self, ports: Sequence[Any]) -> None:
        self.ports = list(ports)

    def __len__(self) -> int:
        return len(self.ports)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for p in self.ports:
            yield p.device_id, (lambda p=p: p)


def test_a_chip_outside_the_lot_gets_nothing_usable(world: World, tmp_path: Path) -> None:
    """Over-production is impossible by construction: a chip the lot does not list is
    refused before anything is released, and what the package holds for the lot's chips
    is useless to it (another chip's provisioning data and license are refused by its SBM)."""
    inside = world.fab.chip(FIRST + 5).open()
    outside = world.fab.chip(FIRST + LOT_CHIPS).open()  # the same fab, the same OEM order
    r = flash_package(
        world.root / "oem/outbox/package-lot-1.bin", image=world.root / "oem/outbox/image-fw-1.enc",
        oem_root=world.root / "oem/root-ca.pem", root_fingerprint=parse_fingerprint(
            world.fingerprint), factory="factory-1", lot_id="lot-1",
        chips=_Chips([outside, inside]), out=tmp_path / "c.bin",
    )  # fmt: skip
    assert r.flashed == (inside.device_id,)
    assert [why.split(":")[0] for _d, why in r.refused] == ["NotInLotError"]
    assert outside.state() == (None, None, 0) and inside.flash is not None
    # what the package holds for chip 5, handed to the outsider by a dishonest factory
    from securethread.formats.programming import verify_package

    pkg = verify_package(
        (world.root / "oem/outbox/package-lot-1.bin").read_bytes(),
        oem_root=from_pem((world.root / "oem/root-ca.pem").read_bytes()),
        factory="factory-1", lot_id="lot-1",
    )  # fmt: skip
    entry = next(c for c in pkg.package.chips if c.device_id == inside.device_id)
    with pytest.raises(DeviceRefusedError):
        outside.provision(inside.otp)  # type: ignore[arg-type]
    assert outside.state() == (None, None, 0)
    with pytest.raises(DeviceRefusedError, match="not provisioned"):
        outside.program(pkg.package.manifest, open(world.root / "oem/outbox/image-fw-1.enc",
                        "rb"), entry.license, os.urandom(32))  # fmt: skip
    assert Confirmations.from_bytes((tmp_path / "c.bin").read_bytes()).confirmations.keys() == {
        inside.device_id
    }


def _vendor_key(world: World) -> Any:
    return world.fab.vendor.private_key


@pytest.mark.parametrize("case", ["other-vendor", "tampered", "truncated", "twice", "reused"])
def test_bad_lots_are_refused_with_one_line_and_nothing_written(
    world: World, case: str, tmp_path: Path
) -> None:
    from securethread.device import SiliconVendor
    from securethread.formats.envelope import seal
    from securethread.formats.identity import vendor_ca_id

    good = (world.root / "lot.bin").read_bytes()
    specs = world.fab.chips([FIRST + 100 + i for i in range(3)])
    keys = [s.open().public_key for s in specs]
    ids = [s.device_id for s in specs]
    if case == "other-vendor":
        rogue = SiliconVendor(world.fab.vendor.name)
        data = sign_lot(LotManifest.build(lot_id="lot-x", device_class="sensor-v1",
                        vendor_ca=rogue.root_certificate, chips=zip(ids, keys, strict=True)),
                        rogue.private_key)  # fmt: skip
        match = "LotSignerError"
    elif case == "tampered":
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x01
        data, match = bytes(flipped), "Lot"
    elif case == "truncated":
        data, match = good[:-40], "LotFormatError"
    else:
        pts = [point_of(k) for k in keys]
        chips = ([[ids[0], pts[0]], [ids[0], pts[1]]] if case == "twice"
                 else [[ids[0], pts[0]], [ids[1], pts[0]]])  # fmt: skip
        body = {"v": 1, "lot_id": "lot-x", "device_class": "sensor-v1",
                "vendor_ca": vendor_ca_id(world.fab.root_certificate), "chips": chips}  # fmt: skip
        data = seal(LOT_KIND, body, [_CryptographySigner(_vendor_key(world))])  # type: ignore[list-item]
        match = "DuplicateChipError" if case == "twice" else "ReusedKeyError"
    bad = tmp_path / "bad-lot.bin"
    bad.write_bytes(data)
    before, tx = world.files(), world.transcript_records()
    _refused(world.root, "oem", "prelicense", "--workdir", "oem", str(bad), "--vendor-ca",
             "vendor/root-ca.pem", "--image", "fw-1", "--factory", "factory-1",
             exit_code=EXIT_VERIFY, match=match)  # fmt: skip
    assert world.files() == before and world.transcript_records() == tx


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"factory": "factory-2"}, "WrongFactoryError"),
        ({"lot": "lot-2"}, "WrongLotError"),
    ],
)
def test_a_package_for_another_factory_or_lot_is_refused(
    world: World, change: dict[str, str], match: str
) -> None:
    before = world.files()
    args = world.flash_args("other.bin", **change)  # type: ignore[arg-type]
    _refused(world.root, *args, exit_code=EXIT_VERIFY, match=match)
    assert world.files() == before  # no confirmations file, no chip touched


def test_a_package_not_signed_by_the_pinned_root_is_refused(world: World, tmp_path: Path) -> None:
    raw = cbor.decode((world.root / "oem/outbox/package-lot-1.bin").read_bytes(), cose_tag=True)
    prot, unprot, payload, sig = raw.value
    body = cbor.decode(payload)
    body["factory"] = "factory-9"  # the root's signature no longer covers it
    forged = tmp_path / "forged.bin"
    forged.write_bytes(cbor.encode(CBORTag(raw.tag, [prot, unprot, cbor.encode(body), sig])))
    args = world.flash_args(str(tmp_path / "o.bin"), package=str(forged), factory="factory-9")
    _refused(world.root, *args, exit_code=EXIT_VERIFY, match="PackageSignatureError")
    wrong_fp = world.flash_args(str(tmp_path / "o.bin"))
    wrong_fp[wrong_fp.index("--root-fingerprint") + 1] = "00" * 32
    _refused(world.root, *wrong_fp, exit_code=EXIT_VERIFY, match="RootFingerprintError")
    assert not (tmp_path / "o.bin").exists()


KEY_PROBE = """
import json, sys
from securethread.oem import layout as L
from securethread.oem.prelicense import L_KEY_AGREEMENT, L_LICENSE_SIGNING
oem = L.open_oem(sys.argv[1]).open_token(L.TOKEN)
out = {}
for label in ("image-fw-1", L_LICENSE_SIGNING, L_KEY_AGREEMENT, "lot-ca-lot-1"):
    k = oem.secret_key(label) if label.startswith("image-") else oem.private_key(label)
    out[label] = k.policy_report().attributes()
import pkcs11
try:
    oem.secret_key("image-fw-1")._obj()[pkcs11.Attribute.VALUE]
    out["value"] = "read"
except pkcs11.exceptions.PKCS11Error as exc:
    out["value"] = type(exc).__name__
print(json.dumps(out))
"""


def test_the_image_key_stays_sensitive_in_the_oem_token(world: World) -> None:
    """Pre-licensing wraps the image key to each chip's key inside the token: the key is
    CKA_SENSITIVE, its value cannot be read, and it is frozen; the OEM's licensing keys
    and the lot's production CA never leave the token at all."""
    p = subprocess.run([sys.executable, "-c", KEY_PROBE, str(world.root / "oem")],
                       capture_output=True, text=True, env=child_env())  # fmt: skip
    assert p.returncode == 0, p.stderr
    a = json.loads(p.stdout)
    image = a["image-fw-1"]
    assert image["sensitive"] and image["always-sensitive"] and not image["modifiable"]
    assert not image["copyable"] and not image["decrypt"]
    # extractable only under a wrapping key (IMAGE_KEY, docs/keys.md): never in plaintext
    assert a["value"] == "AttributeSensitive"
    for label in ("prelicense-license-signing", "prelicense-key-agreement", "lot-ca-lot-1"):
        assert a[label]["sensitive"] and not a[label]["extractable"], label
        assert a[label]["never-extractable"] and a[label]["local"], label


def test_a_prelicensing_killed_before_its_package_is_done_again_with_the_same_ca(
    world: World,
) -> None:
    """The state a kill between the lot's production CA and the package leaves (the CA's key
    in the token, its certificate in ``lots/<lot>/``, no package): the next run reuses that
    CA, issues the lot again and writes the package the factory flashes."""
    r = world.root
    _ok(r, "vendor", "lot", "--workdir", "vendor", "--lot-id", "lot-9", "--device-class",
        "sensor-v1", "--devices", "2", "--first-uid", f"{FIRST + 900:016x}", "--out",
        "lot9.bin")  # fmt: skip
    args = ("oem", "prelicense", "--workdir", "oem", "lot9.bin", "--vendor-ca",
            "vendor/root-ca.pem", "--image", "fw-1", "--factory", "factory-1")  # fmt: skip
    first = _ok(r, *args)
    ldir = r / "oem" / "lots" / "lot-9"
    ca = (ldir / "production-ca.pem").read_bytes()
    for name in ("package.bin", "prelicense.json"):
        (ldir / name).unlink()
    (r / "oem" / "outbox" / "package-lot-9.bin").unlink()
    again = _ok(r, *args)
    assert (ldir / "production-ca.pem").read_bytes() == ca
    assert again["package_sha256"] != first["package_sha256"]  # new licenses (fresh nonces)
    conf = world.flash_args("conf9.bin", first=FIRST + 900, devices=2, lot="lot-9",
                            package="oem/outbox/package-lot-9.bin")  # fmt: skip
    assert _ok(r, *conf, code=NO_PKCS11)["flashed"] == 2


def test_a_prelicensing_killed_before_its_answer_answers_the_next_run(
    world: World, tmp_path: Path
) -> None:
    """``oem prelicense`` SIGKILLed once everything is written, before it printed (as
    tests/integration/test_step_answers.py does to every other step): the next run prints
    that answer byte for byte, signs no second transcript record and leaves the package the
    killed run wrote; the run after is refused as done, one line."""
    from tests.integration.test_step_answers import _killed_before_printing

    r = world.root
    _ok(r, "vendor", "lot", "--workdir", "vendor", "--lot-id", "lot-8", "--device-class",
        "sensor-v1", "--devices", "2", "--first-uid", f"{FIRST + 800:016x}", "--out",
        "lot8.bin")  # fmt: skip
    args = ("oem", "prelicense", "--workdir", str(r / "oem"), str(r / "lot8.bin"),
            "--vendor-ca", str(r / "vendor" / "root-ca.pem"), "--image", "fw-1",
            "--factory", "factory-1")  # fmt: skip
    records = len(world.transcript_records())
    lost = _killed_before_printing(tmp_path, *args)
    assert lost["ok"] and lost["lot"] == "lot-8" and lost["chips"] == 2
    package = (r / "oem" / "outbox" / "package-lot-8.bin").read_bytes()
    assert (r / "oem" / "lots" / "lot-8" / "package.bin").read_bytes() == package
    assert len(world.transcript_records()) == records + 1
    again = _run(r, *args, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == lost  # the answer it lost
    assert (r / "oem" / "outbox" / "package-lot-8.bin").read_bytes() == package
    assert len(world.transcript_records()) == records + 1
    _refused(r, *args, exit_code=EXIT_CONFIG, match="already done")
