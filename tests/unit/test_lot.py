"""The lot manifest and the zero-secret formats, strictly (software keys; no token).

A lot is one COSE_Sign1 by the vendor CA over every chip: verified only under a CA the
caller names; tampered, truncated, oversized, a chip twice, a key twice, out of order, a
point off the curve, a body naming another CA: each its own error, rooted at
``securethread.Error``.  The confirmations file and the package's chip list are canonical.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.device import SiliconVendor
from securethread.errors import Error, VerificationError
from securethread.formats import cbor, lot
from securethread.formats.envelope import seal
from securethread.formats.identity import vendor_ca_id
from securethread.formats.lot import (
    LOT_KIND,
    DuplicateChipError,
    LotFormatError,
    LotManifest,
    LotSignatureError,
    LotSignerError,
    LotSizeError,
    ReusedKeyError,
    sign_lot,
    verify_lot,
)
from securethread.formats.programming import (
    Confirmations,
    ConfirmationsFormatError,
    PackageFormatError,
    ProgrammingPackage,
    _check_chips,
)
from securethread.keys.ecutil import fingerprint, point_of

VENDOR = SiliconVendor("Lot Test Fab")
KEYS = [ec.derive_private_key(1000 + i, ec.SECP256R1()).public_key() for i in range(8)]


def _ids(n: int) -> list[str]:
    return [f"5ec0{i:012x}" for i in range(n)]


def _lot(n: int = 5, vendor: SiliconVendor = VENDOR) -> bytes:
    m = LotManifest.build(
        lot_id="lot-7", device_class="sensor-v1", vendor_ca=vendor.root_certificate,
        chips=zip(_ids(n), KEYS[:n], strict=True),
    )  # fmt: skip
    return sign_lot(m, vendor.private_key)


def _signed_body(chips: list[Any], *, vendor_ca: bytes | None = None, **extra: Any) -> bytes:
    """A lot body as given, signed by the vendor: what a faulty or hostile vendor could ship."""
    body = {
        "v": 1,
        "lot_id": "lot-7",
        "device_class": "sensor-v1",
        "vendor_ca": vendor_ca or vendor_ca_id(VENDOR.root_certificate),
        "chips": chips,
        **extra,
    }
    return seal(LOT_KIND, body, [lot._CryptographySigner(VENDOR.private_key)])  # type: ignore[list-item]


def test_a_lot_verifies_under_its_vendor_and_finds_chips_by_key() -> None:
    v = verify_lot(_lot(), vendor_cas=[SiliconVendor("Other").root_certificate,
                                       VENDOR.root_certificate])  # fmt: skip
    assert len(v) == 5 and v.lot_id == "lot-7"
    assert [c.device_id for c in v.manifest.chips] == _ids(5)
    for device_id, key in zip(_ids(5), KEYS, strict=False):
        chip = v.by_key[fingerprint(key)]  # the key id is the SPKI fingerprint
        assert chip.device_id == device_id and chip.point == point_of(key)
        assert chip.public_key().public_numbers() == key.public_numbers()
    assert v.by_key.get(fingerprint(KEYS[7])) is None  # a key outside the lot: nothing
    assert v.vendor == VENDOR.root_certificate


def test_the_encoding_is_canonical_whatever_order_the_vendor_lists_chips_in() -> None:
    m1 = LotManifest.build(
        lot_id="lot-7", device_class="sensor-v1", vendor_ca=VENDOR.root_certificate,
        chips=list(zip(_ids(4), KEYS, strict=False))[::-1],
    )  # fmt: skip
    v = verify_lot(_lot(4), vendor_cas=[VENDOR.root_certificate])
    assert m1.to_body() == v.manifest.to_body()
    assert cbor.encode(m1.to_body()) == cbor.encode(v.manifest.to_body())


def test_a_lot_signed_by_a_vendor_ca_the_oem_did_not_name_is_refused() -> None:
    rogue = SiliconVendor("Lot Test Fab")  # the same name, another key
    with pytest.raises(LotSignerError, match="not a vendor CA the OEM names"):
        verify_lot(_lot(vendor=rogue), vendor_cas=[VENDOR.root_certificate])


def test_a_tampered_lot_is_refused() -> None:
    data = bytearray(_lot())
    i = data.index(point_of(KEYS[2])) + 10  # a byte inside chip 2's key
    data[i] ^= 1
    with pytest.raises(LotSignatureError):
        verify_lot(bytes(data), vendor_cas=[VENDOR.root_certificate])


@pytest.mark.parametrize("cut", [1, 70, 500])
def test_a_truncated_lot_is_refused(cut: int) -> None:
    with pytest.raises(LotFormatError):
        verify_lot(_lot()[:-cut], vendor_cas=[VENDOR.root_certificate])


def test_a_chip_listed_twice_is_refused() -> None:
    ids = _ids(3)
    data = _signed_body([[ids[0], point_of(KEYS[0])], [ids[1], point_of(KEYS[1])],
                         [ids[1], point_of(KEYS[2])]])  # fmt: skip
    with pytest.raises(DuplicateChipError, match=f"chip {ids[1]} is listed twice"):
        verify_lot(data, vendor_cas=[VENDOR.root_certificate])


def test_a_key_given_to_two_chips_is_refused() -> None:
    ids = _ids(3)
    data = _signed_body([[ids[0], point_of(KEYS[0])], [ids[1], point_of(KEYS[1])],
                         [ids[2], point_of(KEYS[0])]])  # fmt: skip
    with pytest.raises(ReusedKeyError, match=f"chips {ids[0]} and {ids[2]}"):
        verify_lot(data, vendor_cas=[VENDOR.root_certificate])
    with pytest.raises(ReusedKeyError):  # the vendor's own builder refuses it as well
        LotManifest.build(
            lot_id="l", device_class="c", vendor_ca=VENDOR.root_certificate,
            chips=[(ids[0], KEYS[0]), (ids[1], KEYS[0])],
        )  # fmt: skip


def test_chips_out_of_order_are_refused() -> None:
    ids = _ids(2)
    data = _signed_body([[ids[1], point_of(KEYS[1])], [ids[0], point_of(KEYS[0])]])
    with pytest.raises(LotFormatError, match="out of order"):
        verify_lot(data, vendor_cas=[VENDOR.root_certificate])


def test_a_point_off_the_curve_is_refused() -> None:
    bad = bytearray(point_of(KEYS[0]))
    bad[-1] ^= 1  # y changed: not on P-256
    data = _signed_body([[_ids(1)[0], bytes(bad)]])
    with pytest.raises(LotFormatError, match="not a point on P-256"):
        verify_lot(data, vendor_cas=[VENDOR.root_certificate])


@pytest.mark.parametrize(
    "chip",
    [
        ["5EC0000000000000", point_of(KEYS[0])],  # upper-case hex
        ["5ec0000000000000", point_of(KEYS[0])[:64]],  # short point
        ["5ec0000000000000", b"\x02" + point_of(KEYS[0])[1:33] + bytes(32)],  # not uncompressed
        ["5ec0000000000000"],
        "5ec0000000000000",
    ],
)
def test_malformed_chips_are_refused(chip: Any) -> None:
    with pytest.raises(LotFormatError):
        verify_lot(_signed_body([chip]), vendor_cas=[VENDOR.root_certificate])


def test_a_body_naming_another_vendor_ca_than_its_signer_is_refused() -> None:
    data = _signed_body([[_ids(1)[0], point_of(KEYS[0])]], vendor_ca=bytes(32))
    with pytest.raises(LotSignerError, match="names vendor CA"):
        verify_lot(data, vendor_cas=[VENDOR.root_certificate])


def test_unknown_fields_are_refused() -> None:
    data = _signed_body([[_ids(1)[0], point_of(KEYS[0])]], extra_field=1)
    with pytest.raises(LotFormatError, match="unknown field"):
        verify_lot(data, vendor_cas=[VENDOR.root_certificate])


def test_an_oversized_lot_is_refused_before_anything_is_parsed() -> None:
    with pytest.raises(LotSizeError):
        verify_lot(bytes(lot.MAX_LOT_SIZE + 1), vendor_cas=[VENDOR.root_certificate])


def test_a_lot_with_too_many_chips_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lot, "MAX_LOT_CHIPS", 3)
    with pytest.raises(LotSizeError, match="4 chips"):
        verify_lot(_lot(4), vendor_cas=[VENDOR.root_certificate])


def test_every_lot_error_is_a_verification_error() -> None:
    for cls in (LotFormatError, LotSizeError, LotSignerError, LotSignatureError,
                DuplicateChipError, ReusedKeyError):  # fmt: skip
        assert issubclass(cls, VerificationError) and issubclass(cls, Error)


# --- the factory's confirmations and the package's chips ---------------------------------------


def _conf(entries: dict[str, bytes]) -> Confirmations:
    return Confirmations(
        package_sha256=bytes(32), factory="factory-1", lot_id="lot-7", confirmations=entries
    )


def test_confirmations_round_trip_in_canonical_order() -> None:
    c = _conf({"5ec0000000000002": b"b", "5ec0000000000001": b"a"})
    data = c.to_bytes()
    back = Confirmations.from_bytes(data)
    assert back == c and back.to_bytes() == data
    assert list(cbor.decode(data)["confirmations"]) == [["5ec0000000000001", b"a"],
                                                         ["5ec0000000000002", b"b"]]  # fmt: skip
    more = c.with_more([("5ec0000000000003", b"c")])
    assert len(more.confirmations) == 3
    with pytest.raises(ConfirmationsFormatError, match="twice"):
        c.with_more([("5ec0000000000001", b"x")])


@pytest.mark.parametrize(
    "entries",
    [
        [["5ec0000000000001", b"a"], ["5ec0000000000001", b"b"]],  # a chip twice
        [["5ec0000000000002", b"a"], ["5ec0000000000001", b"b"]],  # out of order
        [["5ec0000000000001", b""]],  # empty
        [["5ec000000000001", b"a"]],  # 15 digits
    ],
)
def test_confirmations_are_strict(entries: list[Any]) -> None:
    raw = cbor.decode(_conf({}).to_bytes())
    raw["confirmations"] = entries
    with pytest.raises(ConfirmationsFormatError):
        Confirmations.from_bytes(cbor.encode(raw))


def test_truncated_confirmations_are_refused() -> None:
    data = _conf({"5ec0000000000001": b"a" * 40}).to_bytes()
    with pytest.raises(ConfirmationsFormatError):
        Confirmations.from_bytes(data[:-5])


def test_the_package_chip_list_is_strict() -> None:
    ok = [["5ec0000000000001", bytes(32), b"c", b"l"], ["5ec0000000000002", b"\1" * 32, b"c", b"l"]]
    assert len(_check_chips(ok)) == 2
    for bad in (
        [ok[0], ok[0]],  # a chip twice
        [ok[1], ok[0]],  # out of order
        [ok[0], ["5ec0000000000002", bytes(32), b"c", b"l"]],  # one key id for two chips
        [ok[0][:3]],  # no license
        [],  # empty
    ):
        with pytest.raises(PackageFormatError):
            _check_chips(bad)
    with pytest.raises(PackageFormatError, match="missing field 'chips'"):
        ProgrammingPackage.from_body({"v": 1})


@pytest.mark.parametrize(
    ("decode", "error", "what", "field"),
    [
        (LotManifest.from_body, LotFormatError, "lot manifest", "chips"),
        (ProgrammingPackage.from_body, PackageFormatError, "programming package", "chips"),
        (lambda b: Confirmations.from_bytes(cbor.encode(b)), ConfirmationsFormatError,
         "confirmations", "confirmations"),
    ],  # fmt: skip
    ids=["lot", "package", "confirmations"],
)
def test_each_body_with_a_list_is_a_map_holding_that_list(
    decode: Any, error: type[Error], what: str, field: str
) -> None:
    """Not a map, or a map without its list: that format's own error, naming the field."""
    with pytest.raises(error, match=f"^{what}: must be a CBOR map$"):
        decode([1, 2])
    with pytest.raises(error, match=f"^{what}: missing field '{field}'$"):
        decode({"v": 1})
