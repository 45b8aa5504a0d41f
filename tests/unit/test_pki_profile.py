"""DeviceProfile: the job-level device certificate profile and its strict map form."""

from __future__ import annotations

import datetime
from typing import Any

import attrs
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
        ({"uri_template": "urn:dev:os:32473-device"}, "URI template"),  # no {device_id}
        ({"uri_template": "urn:x:{device_id}{device_id}"}, "URI template"),
        ({"uri_template": "{device_id}"}, "absolute URI"),  # no scheme
        ({"uri_template": "devices/{device_id}"}, "absolute URI"),
        ({"uri_template": "https://devices.example/{device_id} x"}, "absolute URI"),
        ({"uri_template": "https://devices.example/é/{device_id}"}, "absolute URI"),
        ({"uri_template": "https:///{device_id}"}, "host"),
        ({"uri_template": "urn:{device_id}"}, "URN"),
        ({"uri_template": "urn:x:" + "a" * 250 + "{device_id}"}, "URI"),
        ({"uri_template": 7}, "uri_template must be a string"),
        ({"crl_url": "https://pki.example/job.crl"}, "http://"),
        ({"crl_url": "ldap://pki.example/cn=job"}, "http://"),
        ({"crl_url": "http://"}, "host"),
        ({"crl_url": "http://pki.example/{device_id}.crl"}, "absolute URI"),
        ({"crl_url": ""}, "crl_url"),
        ({"ocsp_url": "https://ocsp.example/"}, "http://"),
        ({"ocsp_url": "http://ocsp example/"}, "absolute URI"),
        ({"oem_arc": "2.25.207020730509700419229912614853397683814"}, "1.3.6.1.4.1"),
        ({"oem_arc": "1.3.6.1.5.5.7.3"}, "1.3.6.1.4.1"),  # a standard arc: .1 = serverAuth
        ({"oem_arc": "1.3.6.1.4.1"}, "1.3.6.1.4.1"),  # no enterprise number
        ({"oem_arc": "1.3.6.1.4.1.2147483648"}, "2147483647"),  # 32 bits: Go cannot parse it
        ({"oem_arc": "1.3.6.1.4.1." + ".".join(["1"] * 11)}, "at most 16 arcs"),
        ({"oem_arc": "1.3.6.1.4.1.01"}, "dotted-decimal"),
        ({"oem_arc": "1.3.6.1.4.1.32473."}, "dotted-decimal"),
        ({"oem_arc": 32473}, "oem_arc must be a string"),
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


def test_names_and_revocation_sources_in_the_map() -> None:
    """The optional fields round-trip; the device URI comes only from the template (an OEM
    arc gives key purpose and policy, not a name)."""
    p = DeviceProfile(
        organisation="Acme",
        crl_url="http://pki.acme.example:8080/crl/job-7.crl",
        ocsp_url="http://[2001:db8::1]/ocsp",
        oem_arc="1.3.6.1.4.1.32473.7",
    )
    assert p.to_map() == _GOOD | {
        "crl_url": "http://pki.acme.example:8080/crl/job-7.crl",
        "ocsp_url": "http://[2001:db8::1]/ocsp",
        "oem_arc": "1.3.6.1.4.1.32473.7",
    }
    assert DeviceProfile.from_map(p.to_map()) == p
    assert p.device_uri(DEVICE_ID) is None and p.device_extensions(DEVICE_ID)[0][0].oid == (
        x509.oid.ExtensionOID.CRL_DISTRIBUTION_POINTS
    )
    assert p.production_ca_policy == x509.ObjectIdentifier("1.3.6.1.4.1.32473.7.2")
    named = attrs.evolve(p, uri_template="https://devices.acme.example/{device_id}?v=1")
    assert named.device_uri(DEVICE_ID) == f"https://devices.acme.example/{DEVICE_ID}?v=1"
    urn = attrs.evolve(p, uri_template="urn:dev:os:32473-{device_id}")  # RFC 9039 §3.4
    assert urn.device_uri(DEVICE_ID) == f"urn:dev:os:32473-{DEVICE_ID}"
    assert DeviceProfile.from_map(named.to_map()) == named
    plain = DeviceProfile(organisation="Acme")
    assert plain.device_uri(DEVICE_ID) is None and plain.production_ca_policy is None
    assert plain.device_extensions(DEVICE_ID) == []
