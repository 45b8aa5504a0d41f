"""The device-certificate template (pki.fastcheck) accepts exactly the certificates full
validation would, of the job's production CA: any byte changed outside the per-device fields,
a field that is not well formed, another device id in one place, or a signature that does not
verify gives None (the caller then validates in full)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.synth_ledger import SynthWorld, make_world
from securethread.pki import DeviceChainValidator
from securethread.pki.fastcheck import DeviceTemplate

DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def world() -> SynthWorld:
    return make_world(16, label="fastcheck")


def _device(w: SynthWorld, slot: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return w.issuer.issue(key, w.device_id(slot), slot)


@pytest.fixture(scope="module")
def template(world: SynthWorld) -> DeviceTemplate:
    sample = _device(world, 0)
    DeviceChainValidator(world.pca, world.root, job_id=world.job.job_id).validate(sample)
    tpl = DeviceTemplate.learn(sample, world.pca, device_id=world.device_id(0))
    assert tpl is not None
    return tpl


def test_a_device_of_the_job_matches_with_its_own_fields(
    world: SynthWorld, template: DeviceTemplate
) -> None:
    for slot in (1, 7, 15):
        cert = _device(world, slot)
        m = template.match(cert.public_bytes(DER))
        assert m is not None
        assert m.device_id == world.device_id(slot) and m.serial == cert.serial_number
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert m.point == key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )


def test_every_single_byte_change_is_refused(world: SynthWorld, template: DeviceTemplate) -> None:
    der = bytearray(_device(world, 3).public_bytes(DER))
    accepted = []
    for i in range(len(der)):
        mutated = bytearray(der)
        mutated[i] ^= 0x01
        if template.match(bytes(mutated)) is not None:
            accepted.append(i)
    # a changed bit anywhere (fields included: the signature covers them) never matches
    assert accepted == []


def test_other_certificates_do_not_match(world: SynthWorld, template: DeviceTemplate) -> None:
    other = make_world(4, job_id="fastcheck-other", label="fastcheck-other")
    foreign = other.issuer.issue(
        ec.generate_private_key(ec.SECP256R1()).public_key(), other.device_id(0), 0
    )
    assert template.match(foreign.public_bytes(DER)) is None
    # the job's own certificate re-signed by another key: the structure matches, the
    # signature does not verify
    cert = _device(world, 4)
    forged = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        forged = forged.add_extension(ext.value, critical=ext.critical)
    signed = forged.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    assert template.match(signed.public_bytes(DER)) is None
    assert template.match(b"") is None and template.match(b"\x30\x03\x02\x01\x01") is None
    assert template.match(cert.public_bytes(DER) + b"\x00") is None
