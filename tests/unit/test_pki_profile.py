"""DeviceProfile: the job-level device certificate profile and its strict map form."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from securethread.errors import FormatError
from securethread.pki import NO_EXPIRY, DeviceProfile, DeviceProfileError

UTC = datetime.UTC
DEVICE_ID = "0123456789abcdef"


def test_defaults_and_map() -> None:
    p = DeviceProfile(organisation="Acme Devices")
    assert p.common_name_template == "{device_id}" and p.product is None
    assert p.not_after == NO_EXPIRY == datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert p.to_map() == {
        "organisation": "Acme Devices",
        "common_name_template": "{device_id}",
        "not_after": 253402300799,  # 99991231235959Z
    }
    assert DeviceProfile.from_map(p.to_map()) == p
    full = DeviceProfile(
        organisation="Société Générale d'Objets",
        product="Thermostat T-1000",
        common_name_template="thermo-{device_id}",
        not_after=datetime.datetime(2045, 1, 1, tzinfo=UTC),
    )
    m = full.to_map()
    assert m["product"] == "Thermostat T-1000" and m["not_after"] == 2366841600
    assert DeviceProfile.from_map(m) == full


def test_subject_order_and_string_types() -> None:
    p = DeviceProfile(organisation="Acme", product="Sensor", common_name_template="s-{device_id}")
    name = p.subject(DEVICE_ID)
    assert [a.oid for a in name] == [
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.SERIAL_NUMBER,
        NameOID.COMMON_NAME,
    ]
    assert [a.value for a in name] == ["Acme", "Sensor", DEVICE_ID, f"s-{DEVICE_ID}"]
    # X.520 serialNumber is PrintableString; O/OU/CN are UTF8String (RFC 5280 §4.1.2.6)
    types = [a._type for a in name]
    assert types[2] == x509.name._ASN1Type.PrintableString
    assert types[0] == types[1] == types[3] == x509.name._ASN1Type.UTF8String


def test_longest_template_fits_ub_common_name() -> None:
    template = "a" * 48 + "{device_id}"  # 48 + 16 = 64 = ub-common-name
    cn = DeviceProfile(organisation="A", common_name_template=template).common_name(DEVICE_ID)
    assert len(cn) == 64
    with pytest.raises(DeviceProfileError):
        DeviceProfile(organisation="A", common_name_template="a" + template)


_GOOD: dict[str, Any] = {
    "organisation": "Acme",
    "common_name_template": "{device_id}",
    "not_after": 253402300799,
}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"organisation": None}, "organisation"),
        ({"organisation": ""}, "organisation"),
        ({"organisation": "x" * 65}, "organisation"),
        ({"organisation": 7}, "organisation"),
        ({"organisation": b"Acme"}, "organisation"),
        ({"organisation": " Acme"}, "spaces"),
        ({"organisation": "Acme\n"}, "control"),
        ({"organisation": "Ac\u200bme"}, "control"),  # zero-width space (Cf)
        ({"organisation": "\ud800"}, "control"),  # lone surrogate (Cs)
        ({"product": ""}, "product"),
        ({"product": 3}, "product"),
        ({"common_name_template": "device"}, "template"),
        ({"common_name_template": "{device_id}{device_id}"}, "template"),
        ({"common_name_template": "devices/{device_id}"}, "template"),  # MQTT topic level
        ({"common_name_template": "+{device_id}"}, "template"),
        ({"common_name_template": "#{device_id}"}, "template"),
        ({"common_name_template": "{device_id} x"}, "template"),
        ({"common_name_template": "{job_id}-{device_id}"}, "template"),
        ({"common_name_template": "{DEVICE_ID}"}, "template"),
        ({"not_after": "99991231235959Z"}, "not_after"),
        ({"not_after": 253402300800}, "not_after"),  # year 10000
        ({"not_after": 0}, "not_after"),
        ({"not_after": -1}, "not_after"),
        ({"not_after": True}, "not_after"),
        ({"not_after": 1.5e9}, "not_after"),
    ],
)
def test_from_map_refuses(change: dict[str, Any], why: str) -> None:
    m = {k: v for k, v in (_GOOD | change).items() if v is not None}
    with pytest.raises(DeviceProfileError, match=why) as info:
        DeviceProfile.from_map(m)
    assert isinstance(info.value, FormatError)


@pytest.mark.parametrize(
    "m",
    [
        {},
        {k: v for k, v in _GOOD.items() if k != "not_after"},
        _GOOD | {"extra": "x"},
        _GOOD | {"Product": "x"},
        _GOOD | {1: "x"},
        [("organisation", "Acme")],
        "organisation=Acme",
        None,
    ],
)
def test_from_map_refuses_shapes(m: object) -> None:
    with pytest.raises(DeviceProfileError):
        DeviceProfile.from_map(m)


@pytest.mark.parametrize(
    "not_after",
    [
        datetime.datetime(2040, 1, 1),  # naive
        datetime.datetime(2040, 1, 1, 0, 0, 0, 5, tzinfo=UTC),  # fractions of a second
        datetime.datetime(2040, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        datetime.datetime(1960, 1, 1, tzinfo=UTC),
        "2040-01-01",
    ],
)
def test_construction_refuses_bad_not_after(not_after: Any) -> None:
    with pytest.raises(DeviceProfileError):
        DeviceProfile(organisation="Acme", not_after=not_after)


@pytest.mark.parametrize("device_id", ["0123456789ABCDEF", "0123", 123, None])
def test_subject_needs_a_device_id(device_id: Any) -> None:
    from securethread.pki import NameNotAllowedError

    with pytest.raises(NameNotAllowedError):
        DeviceProfile(organisation="Acme").subject(device_id)
