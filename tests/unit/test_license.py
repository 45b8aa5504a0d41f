"""Per-device licenses: issue on the programmer, open on the device, refuse everything else.

Pure logic with the software backend (same protocol as the token); the token path, including
that temporaries are destroyed, is in tests/integration/test_mastering.py.
"""

from __future__ import annotations

import io
import os

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from securethread.errors import ConfigurationError, LicenseError, SignatureError
from securethread.formats import cbor
from securethread.formats.envelope import open_envelope, seal
from securethread.formats.image import decrypt_image
from securethread.formats.license import (
    License,
    LicenseFormatError,
    LicenseSignatureError,
    LicenseSignerError,
    LicenseUnwrapError,
    WrongDeviceLicenseError,
    WrongImageLicenseError,
    kek_input,
    open_license,
)
from securethread.formats.mcuboot import verify_image as verify_mcuboot
from securethread.hsm import SIGNING, Curve, SoftwareBackend
from securethread.pki import EnclavePurpose, certify_enclave, create_enclave_csr, create_root_ca
from tests import cose_edit

from .test_device import World, make_world


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def image(world: World):  # type: ignore[no-untyped-def]
    data = os.urandom(10_000)
    signed, blob, m = world.master(data)
    return data, blob, m


def _open(world: World, lic: bytes, dev, m, **kw):  # type: ignore[no-untyped-def]
    args = dict(
        device_id=dev.device_id,
        device_key=dev._key,
        oem_root=world.root_cert,
        image_id=m.image_id,
        image_key_id=m.image_key_id,
    )
    args.update(kw)
    return open_license(lic, **args)


def test_issue_and_open(world: World, image) -> None:  # type: ignore[no-untyped-def]
    data, blob, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    key = _open(world, lic, dev, m)
    assert key.key_id == m.image_key_id
    out = io.BytesIO()
    decrypt_image(io.BytesIO(blob), out, key=key, manifest=m)
    # the plaintext is the MCUboot image world.master signed around the firmware
    v = verify_mcuboot(out.getvalue(), key=world.fw_key.public_key())
    assert out.getvalue()[v.header_size : v.header_size + v.image_size] == data


def test_licenses_are_fresh_per_issue(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    issuer = world.issuer(m)
    a, b = issuer.issue(dev.device_id, dev.public_key), issuer.issue(dev.device_id, dev.public_key)
    assert a != b  # fresh nonce -> fresh KEK -> fresh wrapping


def test_license_is_a_standard_envelope(world: World, image) -> None:  # type: ignore[no-untyped-def]
    """The issuer's pre-computed signer fingerprint produces what envelope.seal would."""
    _, _, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    outer = cbor.decode(lic)
    body = open_envelope(outer["envelope"], kind="license", keys=world.lic_cert.public_key())
    parsed = License.from_body(body)
    assert parsed.device_id == dev.device_id and parsed.image_id == m.image_id
    assert len(parsed.wrapped_key) == 40  # RFC 5649: 32-byte key + 8-byte AIV block


def test_license_for_device_a_useless_on_device_b(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    a, b = world.vendor.make_chip(), world.vendor.make_chip()
    lic_a = world.issuer(m).issue(a.device_id, a.public_key)
    with pytest.raises(WrongDeviceLicenseError):
        _open(world, lic_a, b, m)
    # Even if B claims A's id, it lacks A's private key.
    with pytest.raises(LicenseUnwrapError):
        _open(world, lic_a, b, m, device_id=a.device_id)
    # A license naming B but wrapped to A's key (a confused or malicious host) fails on B.
    crossed = world.issuer(m).issue(b.device_id, a.public_key)
    with pytest.raises(LicenseUnwrapError):
        _open(world, crossed, b, m)


def test_license_for_another_image(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    with pytest.raises(WrongImageLicenseError):
        _open(world, lic, dev, m, image_id="fw-other")
    with pytest.raises(WrongImageLicenseError):
        _open(world, lic, dev, m, image_key_id=b"another key id")


def _resign(world: World, lic: bytes, mutate, signer=None) -> bytes:  # type: ignore[no-untyped-def]
    outer = cbor.decode(lic)
    body = open_envelope(outer["envelope"], kind="license", keys=world.lic_cert.public_key())
    env = seal("license", mutate(body), [signer or world.prog.private_key("lic")])
    return cbor.encode({**outer, "envelope": env})


def test_kek_binds_device_image_and_nonce(world: World, image) -> None:  # type: ignore[no-untyped-def]
    """Re-signed licenses whose bound fields were edited no longer unwrap (KEK input changed)."""
    _, _, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    with pytest.raises(LicenseUnwrapError):
        _open(world, _resign(world, lic, lambda b: {**b, "nonce": os.urandom(16)}), dev, m)
    edited = _resign(world, lic, lambda b: {**b, "image_id": "fw-other"})
    with pytest.raises(LicenseUnwrapError):
        _open(world, edited, dev, m, image_id="fw-other")
    assert kek_input(dev.device_id, "a", bytes(16)) != kek_input(dev.device_id, "b", bytes(16))


def test_bad_signature(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    outer = cbor.decode(lic)
    sig = bytearray(cose_edit.signature(outer["envelope"]))
    sig[8] ^= 0x40
    env = cose_edit.with_signature(outer["envelope"], bytes(sig))
    bad = cbor.encode({**outer, "envelope": env})
    with pytest.raises(LicenseSignatureError) as exc:
        _open(world, bad, dev, m)
    assert isinstance(exc.value, SignatureError)
    # signed by a key that is not the certified license key
    rogue = SoftwareBackend("rogue").generate_ec("r", curve=Curve.P256, policy=SIGNING)
    with pytest.raises(LicenseSignatureError):
        _open(world, _resign(world, lic, lambda b: b, signer=rogue), dev, m)


def test_every_body_bit_detected(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    outer = cbor.decode(lic)
    env = outer["envelope"]

    for pos in range(len(env)):
        b = bytearray(env)
        b[pos] ^= 1
        with pytest.raises(LicenseError):
            _open(world, cbor.encode({**outer, "envelope": bytes(b)}), dev, m)


def test_signer_not_certified_by_oem_root(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    foreign_root = create_root_ca(SoftwareBackend("other-oem"), label="root")
    with pytest.raises(LicenseSignerError):
        _open(world, lic, dev, m, oem_root=foreign_root)


def test_signer_certified_for_another_purpose(world: World, image) -> None:  # type: ignore[no-untyped-def]
    """A ledger-signing certificate (same root, same programmer) cannot sign licenses."""
    _, _, m = image
    dev = world.vendor.make_chip()
    root_key = world.oem.private_key("root")
    label = "ledger-" + os.urandom(4).hex()
    csr = create_enclave_csr(
        world.prog, label=label, enclave_name="prog1", purpose=EnclavePurpose.LEDGER_SIGNING
    )
    cert = certify_enclave(
        root_key,
        world.root_cert,
        csr,
        enclave_name="prog1",
        purpose=EnclavePurpose.LEDGER_SIGNING,
        role="programmer",
    )
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    outer = cbor.decode(lic)
    forged = _resign(world, lic, lambda b: b, signer=world.prog.private_key(label))
    forged = cbor.encode({**cbor.decode(forged), "certificate": cert.public_bytes(Encoding.DER)})
    assert outer["certificate"] != cbor.decode(forged)["certificate"]
    with pytest.raises(LicenseSignerError):
        _open(world, forged, dev, m)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00", bytes(5000), cbor.encode({"v": 1}), cbor.encode([1])],
)
def test_malformed_license(world: World, image, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    with pytest.raises(LicenseFormatError):
        _open(world, raw, dev, m)


def test_malformed_container_fields(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    outer = cbor.decode(world.issuer(m).issue(dev.device_id, dev.public_key))
    for bad in (
        {**outer, "v": 1},  # the encoding before issue 21
        {**outer, "v": 3},
        {**outer, "certificate": b"nope"},
        {**outer, "envelope": 1},
    ):
        with pytest.raises(LicenseFormatError):
            _open(world, cbor.encode(bad), dev, m)


@pytest.mark.parametrize(
    ("field", "value"),
    [("v", 1), ("v", 3), ("device_id", "XYZ"), ("nonce", b"short"), ("wrapped_key", bytes(41)),
     ("x", 1)],  # fmt: skip
)
def test_signed_but_malformed_body(world: World, image, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    dev = world.vendor.make_chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    with pytest.raises(LicenseFormatError):
        _open(world, _resign(world, lic, lambda b: {**b, field: value}), dev, m)


def test_issuer_refuses_bad_inputs(world: World, image) -> None:  # type: ignore[no-untyped-def]
    _, _, m = image
    issuer = world.issuer(m)
    dev = world.vendor.make_chip()
    with pytest.raises(LicenseFormatError, match="16 lowercase hex"):
        issuer.issue(dev.device_id.upper(), dev.public_key)
    with pytest.raises(LicenseFormatError, match="P-256"):
        issuer.issue(dev.device_id, ec.generate_private_key(ec.SECP384R1()).public_key())


def test_issuer_configuration_checked(world: World, image) -> None:  # type: ignore[no-untyped-def]
    from securethread.formats.license import LicenseIssuer

    _, _, m = image
    base = dict(
        ka_key=world.prog.private_key("ka"),
        ka_certificate=world.ka_cert,
        signing_key=world.prog.private_key("lic"),
        signing_certificate=world.lic_cert,
        image_key=world.image_key,
    )
    with pytest.raises(ConfigurationError, match="KA certificate"):
        LicenseIssuer(**{**base, "ka_certificate": world.lic_cert}, manifest=m)
    with pytest.raises(ConfigurationError, match="license certificate"):
        LicenseIssuer(**{**base, "signing_certificate": world.ka_cert}, manifest=m)
    with pytest.raises(ConfigurationError, match="image key"):
        LicenseIssuer(**base, manifest=attrs.evolve(m, image_key_id=b"other"))
    with pytest.raises(ConfigurationError, match="manifest or an image id"):
        LicenseIssuer(**base)
    ok = LicenseIssuer(**base, image_id="fw-main")
    assert ok.image_id == "fw-main"
