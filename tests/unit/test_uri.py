"""PKCS#11 URIs (RFC 7512): the RFC's examples, percent-encoding, query attributes, refusals."""

from __future__ import annotations

from typing import Any

import pytest

from securethread.errors import ConfigurationError, URIError
from securethread.hsm import PKCS11URI

# RFC 7512 §3, in order, with what each must parse to (attributes not listed stay None).
RFC_EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("pkcs11:", {}),
    ("pkcs11:object=my-pubkey;type=public", {"object": "my-pubkey", "type": "public"}),
    (
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        {"object": "my-key", "type": "private", "pin_source": "file:/etc/token"},
    ),
    (
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
        "id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin",
        {
            "token": "The Software PKCS#11 Softtoken",
            "manufacturer": "Snake Oil, Inc.",
            "model": "1.0",
            "object": "my-certificate",
            "type": "cert",
            "id": bytes.fromhex("69953e5cf4bdec91"),
            "serial": "",
            "pin_source": "file:/etc/token_pin",
        },
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        {"object": "my-sign-key", "type": "private", "module_name": "mypkcs11"},
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        {"object": "my-sign-key", "type": "private", "module_path": "/mnt/libmypkcs11.so.1"},
    ),
    (
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?"
        "pin-value=the-pin",
        {
            "token": "Software PKCS#11 softtoken",
            "manufacturer": "Snake Oil, Inc.",
            "pin_value": "the-pin",
        },
    ),
    ("pkcs11:slot-description=Sun%20Metaslot", {}),
    (
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;"
        "library-description=Soft%20Token%20Library;library-version=1.23",
        {},
    ),
    (
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;"
        "id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
        {
            "token": "My token% created by Joe",
            "id": bytes.fromhex("010203badd cafe 040506".replace(" ", "")),
        },
    ),
    (
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        {"token": "A name with a substring %;", "object": "my-certificate", "type": "cert"},
    ),
    (
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;"
        "object=my-certificate;type=cert",
        {
            "token": "Name with a small A with acute: \u00e1",
            "object": "my-certificate",
            "type": "cert",
        },
    ),
]

_FIELDS = (
    "token",
    "manufacturer",
    "serial",
    "model",
    "object",
    "type",
    "id",
    "slot_id",
    "module_path",
    "module_name",
    "pin_source",
    "pin_value",
)


@pytest.mark.parametrize(("uri", "expected"), RFC_EXAMPLES)
def test_rfc7512_section3_examples(uri: str, expected: dict[str, Any]) -> None:
    parsed = PKCS11URI.parse(uri)
    for name in _FIELDS:
        assert getattr(parsed, name) == expected.get(name), name


def test_rfc_vendor_example_is_refused_unless_x_prefixed() -> None:
    # The last §3 example uses "vendor-aaa"/"vendor-bbb".  securethread refuses attributes it
    # does not know (ignoring one could select the wrong object) and only skips the "x-"
    # vendor namespace; the x- spelling of the same URI parses.
    with pytest.raises(URIError, match="unknown path attribute 'vendor-aaa'"):
        PKCS11URI.parse(
            "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
            "?pin-source=file:/etc/token_pin&vendor-bbb=value-b"
        )
    parsed = PKCS11URI.parse(
        "pkcs11:token=my-token;object=my-certificate;type=cert;x-vendor-aaa=value-a"
        "?pin-source=file:/etc/token_pin&x-vendor-bbb=value-b"
    )
    assert (parsed.token, parsed.object, parsed.type) == ("my-token", "my-certificate", "cert")
    assert parsed.pin_source == "file:/etc/token_pin"


def test_id_percent_encoded_bytes() -> None:
    assert PKCS11URI.parse("pkcs11:id=%01%02").id == b"\x01\x02"
    assert PKCS11URI.parse("pkcs11:id=%00%ff%FF").id == b"\x00\xff\xff"
    assert PKCS11URI.parse("pkcs11:id=ab").id == b"ab"  # unescaped chars are their bytes


def test_scheme_and_attribute_names_are_case_insensitive() -> None:
    parsed = PKCS11URI.parse("PKCS11:Token=oem;OBJECT=root-ca?Module-Path=/lib/x.so")
    assert (parsed.token, parsed.object, parsed.module_path) == ("oem", "root-ca", "/lib/x.so")


def test_slot_id_and_module_query_attributes() -> None:
    parsed = PKCS11URI.parse(
        "pkcs11:token=oem;slot-id=42;object=root%20ca;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=%2Frun%2Fpin"
    )
    assert parsed.slot_id == 42
    assert parsed.object == "root ca"
    assert parsed.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert parsed.pin_source == "/run/pin"


def test_str_never_contains_the_pin_value() -> None:
    secret = "s3cr3t-PIN-value"
    parsed = PKCS11URI.parse(f"pkcs11:token=oem;object=k?pin-value={secret}")
    assert parsed.pin_value == secret
    assert secret not in str(parsed)
    assert "pin-value" not in str(parsed)
    assert secret not in repr(parsed)
    assert str(parsed) == "pkcs11:token=oem;object=k"


@pytest.mark.parametrize(
    "uri",
    [
        "pkcs11:token=oem;object=root-ca;type=private",
        "pkcs11:token=My%20token%25%20created%20by%20Joe;id=%01%02%03%BA%DD",
        "pkcs11:token=A%3Bb%3Fc%26d;object=%C3%A1;slot-id=7",
        "pkcs11:object=k?module-path=/opt/my%20lib/p11.so&pin-source=file:/etc/pin",
        "pkcs11:serial=0123abcd;model=SoftHSM%20v2?module-name=softhsm2",
    ],
)
def test_str_round_trips(uri: str) -> None:
    parsed = PKCS11URI.parse(uri)
    assert PKCS11URI.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("token=oem;object=k", "must start with 'pkcs11:'"),
        ("", "must start with 'pkcs11:'"),
        ("pkcs12:token=oem", "must start with 'pkcs11:'"),
        ("pkcs11:token=oem;colour=red", "unknown path attribute 'colour'"),
        ("pkcs11:token=oem?colour=red", "unknown query attribute 'colour'"),
        ("pkcs11:token=oem?token=oem", "unknown query attribute 'token'"),
        ("pkcs11:pin-value=1234", "unknown path attribute 'pin-value'"),
        ("pkcs11:token=oem;token=programmer", "'token' given twice"),
        ("pkcs11:object=a;OBJECT=b", "'object' given twice"),
        ("pkcs11:token=oem?pin-source=/a&pin-source=/b", "'pin-source' given twice"),
        ("pkcs11:token=oem?module-path=/a&module-path=/b", "'module-path' given twice"),
        ("pkcs11:token=%zzoem", "bad percent-encoding in 'token'"),
        ("pkcs11:token=oem%2", "bad percent-encoding in 'token'"),
        ("pkcs11:token=oem%", "bad percent-encoding in 'token'"),
        ("pkcs11:id=%0g", "bad percent-encoding in 'id'"),
        ("pkcs11:token=oem?pin-value=%G1", "bad percent-encoding in 'pin-value'"),
        ("pkcs11:token=%FF%FE", "token is not UTF-8"),
        ("pkcs11:slot-id=1a", "slot-id '1a' is not a decimal number"),
        ("pkcs11:slot-id=-1", "slot-id '-1' is not a decimal number"),
        ("pkcs11:slot-id=", "slot-id '' is not a decimal number"),
        ("pkcs11:slot-id=0x10", "is not a decimal number"),
        ("pkcs11:slot-id=%C2%B2", "is not a decimal number"),  # superscript two
        ("pkcs11:slot-id=%D9%A1", "is not a decimal number"),  # Arabic-Indic digit one
        ("pkcs11:type=secret", "unknown object type 'secret'"),
        ("pkcs11:token", "path attribute 'token' has no '='"),
        ("pkcs11:token=oem?pin-source", "query attribute 'pin-source' has no '='"),
        ("pkcs11:token=oem?pin-source=/p&pin-value=1234", "mutually exclusive"),
    ],
)
def test_malformed_uris_raise_uri_error(uri: str, message: str) -> None:
    with pytest.raises(URIError, match=message) as info:
        PKCS11URI.parse(uri)
    assert isinstance(info.value, ConfigurationError)


def test_pin_value_never_in_error_messages() -> None:
    with pytest.raises(URIError) as info:
        PKCS11URI.parse("pkcs11:token=oem?pin-value=hunter2&pin-source=/p")
    assert "hunter2" not in str(info.value)


def test_non_string_rejected() -> None:
    with pytest.raises(URIError, match="must be a string"):
        PKCS11URI.parse(b"pkcs11:token=oem")  # type: ignore[arg-type]
