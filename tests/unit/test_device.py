"""The simulated device's SBM: provisioning (OTP write-once) and secure programming.

Every refusal is checked to leave flash, OTP and the anti-rollback fuses unchanged.  Pure
logic: OEM and programmer keys live in software backends (same protocol as the tokens);
the token path is in tests/integration/test_mastering.py.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.device.sbm import (
    BootConfirmationError,
    DeviceTrustRefusedError,
    NotProvisionedError,
    OemRootMismatchError,
    ProvisioningData,
    ProvisioningError,
    ProvisioningFormatError,
    SiliconVendor,
    SimulatedDevice,
    WrongDeviceClassError,
    verify_boot_confirmation,
)
from securethread.errors import (
    AlreadyProvisionedError,
    DeviceRefusedError,
    ImageError,
    LicenseError,
    RollbackError,
    VerificationError,
)
from securethread.formats import cbor
from securethread.formats.device_trust import (
    DeviceTrust,
    DeviceTrustFormatError,
    oem_root_hash,
    sign_device_trust,
)
from securethread.formats.image import (
    ChunkAuthenticationError,
    ImageSizeError,
    Manifest,
    ManifestSignatureError,
    TruncatedImageError,
    encrypt_image,
    sign_manifest,
    verify_manifest,
)
from securethread.formats.license import (
    LicenseIssuer,
    LicenseSignatureError,
    WrongDeviceLicenseError,
    WrongImageLicenseError,
)
from securethread.formats.mcuboot import ImageVersion, build_image
from securethread.hsm import IMAGE_KEY, SIGNING, Curve, SoftwareBackend
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    EnclavePurpose,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
)
from tests import cose_edit

CS = 4096
DEVICE_CLASS = "sensor-v1"
JOB = "job-1"


@dataclass
class World:
    """An OEM, a programmer and a silicon vendor, all in software."""

    oem: SoftwareBackend
    prog: SoftwareBackend
    root_cert: Any
    fw_key: Any
    image_key: Any
    ka_cert: Any
    lic_cert: Any
    pca_cert: Any
    devcerts: DeviceCertificateIssuer
    vendor: SiliconVendor
    seq: int = 0

    @property
    def root_hash(self) -> bytes:
        """What the fab burns into the parts this OEM orders."""
        return oem_root_hash(self.root_cert)

    def trust(self, *, signer: Any = None, **over: Any) -> bytes:
        """The device-trust statement the OEM signs with its root key when it issues JOB."""
        fields: dict[str, Any] = dict(
            job_id=JOB,
            job_sha256=hashlib.sha256(JOB.encode()).digest(),  # as the device certificates' tag
            device_class=DEVICE_CLASS,
            firmware_signing_key=self.fw_key.public_key(),
            min_security_counter=2,
        )
        fields.update(over)
        return sign_device_trust(DeviceTrust(**fields), signer or self.oem.private_key("root"))

    def master(
        self,
        data: bytes,
        *,
        counter: int = 3,
        device_class: str = DEVICE_CLASS,
        image_id: str = "fw-main",
        key: Any = None,
        signer: Any = None,
    ) -> tuple[bytes, bytes, Manifest]:
        out = io.BytesIO()
        # the plaintext is a signed MCUboot image, as oem master-image makes it
        signed = build_image(
            data,
            signer=signer or self.fw_key,
            version=ImageVersion.parse(f"1.{counter}"),
            security_counter=counter,
        )
        m = encrypt_image(
            io.BytesIO(signed),
            out,
            key=key or self.image_key,
            image_id=image_id,
            image_version=f"1.{counter}",
            security_counter=counter,
            device_class=device_class,
            chunk_size=CS,
        )
        return sign_manifest(m, signer or self.fw_key), out.getvalue(), m

    def issuer(self, manifest: Manifest, image_key: Any = None) -> LicenseIssuer:
        return LicenseIssuer(
            ka_key=self.prog.private_key("ka"),
            ka_certificate=self.ka_cert,
            signing_key=self.prog.private_key("lic"),
            signing_certificate=self.lic_cert,
            image_key=image_key or self.image_key,
            manifest=manifest,
        )

    def provisioning(self, dev: SimulatedDevice, **over: Any) -> ProvisioningData:
        self.seq += 1
        fields: dict[str, Any] = dict(
            device_certificate=self.devcerts.issue(dev.public_key, dev.device_id, self.seq),
            production_ca_certificate=self.pca_cert,
            oem_root_certificate=self.root_cert,
        )
        fields.update(over)
        if "device_trust" not in fields:
            fields["device_trust"] = self.trust()
        return ProvisioningData(**fields)

    def part(self, *, flash_size: int = 1 << 20, rollback_floor: int = 0) -> SimulatedDevice:
        """A part this OEM ordered: its root hash burnt at the fab, OTP still blank."""
        return self.vendor.make_chip(
            oem_root_hash=self.root_hash, flash_size=flash_size, rollback_floor=rollback_floor
        )

    def chip(self, *, provisioned: bool = True, flash_size: int = 1 << 20) -> SimulatedDevice:
        dev = self.part(flash_size=flash_size)
        if provisioned:
            dev.provision(self.provisioning(dev).to_bytes())
        return dev


def make_world() -> World:
    oem, prog = SoftwareBackend("oem"), SoftwareBackend("programmer")
    root_cert = create_root_ca(oem, label="root")
    root_key = oem.private_key("root")
    fw_key = oem.generate_ec("fw", curve=Curve.P256, policy=SIGNING)
    image_key = oem.generate_aes("image", policy=IMAGE_KEY)
    P = EnclavePurpose
    ident_csr = create_enclave_csr(prog, label="id", enclave_name="prog1", purpose=P.IDENTITY)
    ident = certify_enclave(
        root_key, root_cert, ident_csr, enclave_name="prog1", purpose=P.IDENTITY, role="programmer"
    )
    lic_csr = create_enclave_csr(prog, label="lic", enclave_name="prog1", purpose=P.LICENSE_SIGNING)
    lic_cert = certify_enclave(
        root_key,
        root_cert,
        lic_csr,
        enclave_name="prog1",
        purpose=P.LICENSE_SIGNING,
        role="programmer",
    )
    ident_key = ident.public_key()
    assert isinstance(ident_key, ec.EllipticCurvePublicKey)
    ka_csr = create_enclave_csr(
        prog,
        label="ka",
        enclave_name="prog1",
        purpose=P.KEY_AGREEMENT,
        signer=prog.private_key("id"),
    )
    ka_cert = certify_enclave(
        root_key,
        root_cert,
        ka_csr,
        enclave_name="prog1",
        purpose=P.KEY_AGREEMENT,
        role="programmer",
        proof_key=ident_key,
    )
    pca_csr = create_production_ca_csr(prog, label="pca", job_id=JOB)
    pca_cert = certify_production_ca(
        root_key,
        root_cert,
        pca_csr,
        job_id=JOB,
        not_before=root_cert.not_valid_before_utc,
    )
    devcerts = DeviceCertificateIssuer(
        prog.private_key("pca"),
        pca_cert,
        job_id=JOB,
        job_tag=hashlib.sha256(JOB.encode()).digest(),  # stands in for the signed job's hash
        profile=DeviceProfile(organisation="securethread"),
    )
    return World(
        oem, prog, root_cert, fw_key, image_key, ka_cert, lic_cert, pca_cert, devcerts,
        SiliconVendor(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def firmware(world: World) -> tuple[bytes, bytes, bytes, Manifest]:
    data = os.urandom(5 * CS + 123)
    signed, blob, m = world.master(data)
    return data, signed, blob, m


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


def _refused(dev: SimulatedDevice, exc: type[Exception], fn: Callable[[], object]) -> Exception:
    before = dev.state()
    with pytest.raises(exc) as info:
        fn()
    assert dev.state() == before, "a refusal changed flash, OTP or fuses"
    return info.value


# --- provisioning --------------------------------------------------------------------------


def test_provisioning_data_round_trip(world: World) -> None:
    dev = world.part()
    pd = world.provisioning(dev)
    raw = pd.to_bytes()
    assert ProvisioningData.from_bytes(raw) == pd
    assert ProvisioningData.from_bytes(raw).to_bytes() == raw


def test_provision_writes_otp_once(world: World) -> None:
    dev = world.part()
    assert dev.otp is None
    raw = world.provisioning(dev).to_bytes()
    dev.provision(raw)
    assert dev.otp == raw
    assert dev.rollback_counter == 2
    _refused(dev, AlreadyProvisionedError, lambda: dev.provision(raw))
    _refused(dev, AlreadyProvisionedError, lambda: dev.provision(b"garbage"))


def test_provision_refuses_certificate_of_another_chip(world: World) -> None:
    dev, other = world.part(), world.part()
    raw = world.provisioning(other).to_bytes()
    _refused(dev, ProvisioningError, lambda: dev.provision(raw))
    # right key, but certified under another chip's id
    world.seq += 1
    cert = world.devcerts.issue(dev.public_key, other.device_id, world.seq)
    raw = world.provisioning(dev, device_certificate=cert).to_bytes()
    err = _refused(dev, ProvisioningError, lambda: dev.provision(raw))
    assert "device id" in str(err)


def test_provision_refuses_foreign_root(world: World) -> None:
    dev = world.part()
    foreign_root = create_root_ca(SoftwareBackend("rogue"), label="root")
    raw = world.provisioning(dev, oem_root_certificate=foreign_root).to_bytes()
    err = _refused(dev, OemRootMismatchError, lambda: dev.provision(raw))
    assert "burnt at the fab" in str(err)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: {**d, "v": 1},  # the old layout's version
        lambda d: {**d, "v": 2},  # the encoding before issue 21
        lambda d: {**d, "v": 4},
        lambda d: {**d, "device_certificate": b"not a certificate"},
        lambda d: {**d, "oem_root_certificate": "text"},
        lambda d: {**d, "device_trust": b""},
        lambda d: {**d, "device_trust": "text"},
        lambda d: {**d, "device_trust": bytes(4096)},
        lambda d: {k: v for k, v in d.items() if k != "device_trust"},
        lambda d: {**d, "extra": 1},
        # version 1's unauthenticated anchors are not accepted beside the statement
        lambda d: {**d, "device_class": DEVICE_CLASS},
    ],
)
def test_provision_refuses_malformed(world: World, mutate: Callable[[dict], dict]) -> None:  # type: ignore[type-arg]
    dev = world.part()
    d = cbor.decode(world.provisioning(dev).to_bytes())
    raw = cbor.encode(mutate(d))
    _refused(dev, ProvisioningFormatError, lambda: dev.provision(raw))


def test_provision_refuses_oversized_and_p384_firmware_key(world: World) -> None:
    dev = world.part()
    _refused(dev, ProvisioningFormatError, lambda: dev.provision(bytes(1 << 20)))
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(DeviceTrustFormatError, match="P-256"):
        world.trust(firmware_signing_key=p384)


# --- programming ---------------------------------------------------------------------------


def test_program_boots_and_confirms(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    data, signed, blob, m = firmware
    dev = world.chip()
    nonce = os.urandom(16)
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    conf = dev.program(signed, io.BytesIO(blob), lic, nonce=nonce)
    assert dev.firmware == data
    assert dev.flashed is not None and dev.flashed.plaintext_sha256 == m.plaintext_sha256
    assert dev.rollback_counter == m.security_counter
    verify_boot_confirmation(
        conf, device_public_key=dev.public_key, device_id=dev.device_id, manifest=m, nonce=nonce
    )
    # the programmer notices a replayed confirmation, another device's, or another image's
    with pytest.raises(BootConfirmationError, match="nonce"):
        verify_boot_confirmation(
            conf,
            device_public_key=dev.public_key,
            device_id=dev.device_id,
            manifest=m,
            nonce=os.urandom(16),
        )
    other = world.vendor.make_chip()
    with pytest.raises(BootConfirmationError, match="signature"):
        verify_boot_confirmation(
            conf, device_public_key=other.public_key, device_id=dev.device_id, manifest=m,
            nonce=nonce,
        )  # fmt: skip
    with pytest.raises(BootConfirmationError, match="security_counter"):
        verify_boot_confirmation(
            conf,
            device_public_key=dev.public_key,
            device_id=dev.device_id,
            manifest=attrs.evolve(m, security_counter=99),
            nonce=nonce,
        )
    with pytest.raises(BootConfirmationError):
        verify_boot_confirmation(
            _flip(conf, len(conf) - 5), device_public_key=dev.public_key,
            device_id=dev.device_id, manifest=m, nonce=nonce,
        )  # fmt: skip


def test_not_provisioned_device_programs_nothing(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, blob, m = firmware
    dev = world.chip(provisioned=False)
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    _refused(
        dev,
        NotProvisionedError,
        lambda: dev.program(signed, io.BytesIO(blob), lic, nonce=bytes(16)),
    )


class _Boom(io.BytesIO):
    """An image stream that fails the test if anyone reads it."""

    def read(self, *a: Any) -> bytes:
        raise AssertionError("the SBM read the image before verifying the manifest/license")


def test_manifest_by_another_key_refused_before_decrypting(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, _, blob, m = firmware
    dev = world.chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    rogue = world.oem.generate_ec(
        "rogue-fw-" + os.urandom(4).hex(), curve=Curve.P256, policy=SIGNING
    )
    bad = sign_manifest(m, rogue)
    _refused(dev, ManifestSignatureError, lambda: dev.program(bad, _Boom(), lic, nonce=bytes(16)))


def test_every_manifest_bit_refused(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, _, m = firmware
    dev = world.chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    for pos in range(0, len(signed), 3):
        bad = _flip(signed, pos)
        attempt = functools.partial(dev.program, bad, _Boom(), lic, nonce=bytes(16))
        _refused(dev, ImageError, attempt)


def _program(dev: SimulatedDevice, world: World, signed: bytes, blob: bytes, m: Manifest) -> bytes:
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    return dev.program(signed, io.BytesIO(blob), lic, nonce=bytes(16))


def test_tampered_image_refused(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, blob, m = firmware
    dev = world.chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    block = CS + 16
    h = len(blob) - m.ciphertext_length
    chunks = [blob[h + i : h + i + block] for i in range(0, m.ciphertext_length, block)]
    cases: list[tuple[type[Exception], bytes]] = [
        (ChunkAuthenticationError, _flip(blob, h + 10)),  # chunk body
        (ChunkAuthenticationError, _flip(blob, h + block - 1)),  # chunk 0's tag
        (ChunkAuthenticationError, _flip(blob, len(blob) - 1)),  # final tag
        (ImageError, _flip(blob, 12)),  # header
        (TruncatedImageError, blob[:-1]),
        (TruncatedImageError, blob[:h] + b"".join(chunks[:-1])),  # missing final chunk
        (ImageError, blob + chunks[1]),  # extra chunk after the final one
        (ChunkAuthenticationError, blob[:h] + b"".join([chunks[1], chunks[0], *chunks[2:]])),
    ]
    for exc, bad in cases:
        _refused(
            dev, exc, functools.partial(dev.program, signed, io.BytesIO(bad), lic, nonce=bytes(16))
        )
    assert dev.flash is None


def test_license_for_another_device_refused(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, blob, m = firmware
    a, b = world.chip(), world.chip()
    lic_a = world.issuer(m).issue(a.device_id, a.public_key)
    _refused(b, WrongDeviceLicenseError, lambda: b.program(signed, _Boom(), lic_a, nonce=bytes(16)))


def test_license_for_another_image_refused(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, blob, m = firmware
    dev = world.chip()
    other_key = world.oem.generate_aes("img-" + os.urandom(4).hex(), policy=IMAGE_KEY)
    _, _, m2 = world.master(b"other firmware", image_id="fw-other", key=other_key)
    lic = world.issuer(m2, other_key).issue(dev.device_id, dev.public_key)
    _refused(
        dev, WrongImageLicenseError, lambda: dev.program(signed, _Boom(), lic, nonce=bytes(16))
    )
    # same image id, another image key
    _, _, m3 = world.master(b"other firmware", key=other_key)
    lic = world.issuer(m3, other_key).issue(dev.device_id, dev.public_key)
    _refused(
        dev, WrongImageLicenseError, lambda: dev.program(signed, _Boom(), lic, nonce=bytes(16))
    )


def test_license_with_bad_signature_refused(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, blob, m = firmware
    dev = world.chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    outer = cbor.decode(lic)
    sig = bytearray(cose_edit.signature(outer["envelope"]))
    sig[-1] ^= 1
    env = cose_edit.with_signature(outer["envelope"], bytes(sig))
    bad = cbor.encode({**outer, "envelope": env})
    _refused(dev, LicenseSignatureError, lambda: dev.program(signed, _Boom(), bad, nonce=bytes(16)))


def test_rollback_refused(world: World) -> None:
    dev = world.chip()
    new_signed, new_blob, new_m = world.master(b"v5 firmware" * 100, counter=5)
    old_signed, old_blob, old_m = world.master(b"v4 firmware" * 100, counter=4)
    too_old_signed, too_old_blob, too_old_m = world.master(b"v1 firmware", counter=1)
    # below the OTP minimum (2) even on a fresh device
    err = _refused(
        dev, RollbackError, lambda: _program(dev, world, too_old_signed, too_old_blob, too_old_m)
    )
    assert "below" in str(err)
    _program(dev, world, new_signed, new_blob, new_m)
    assert dev.rollback_counter == 5
    # replaying the older (validly signed) image after the newer one booted
    _refused(dev, RollbackError, lambda: _program(dev, world, old_signed, old_blob, old_m))
    assert dev.firmware == b"v5 firmware" * 100
    # re-programming the same counter is allowed (e.g. a repair)
    _program(dev, world, new_signed, new_blob, new_m)


def test_image_for_another_device_class_refused(world: World) -> None:
    dev = world.chip()
    signed, blob, m = world.master(b"gateway firmware", device_class="gateway-v2")
    _refused(dev, WrongDeviceClassError, lambda: _program(dev, world, signed, blob, m))


def test_image_larger_than_flash_refused(world: World) -> None:
    dev = world.chip(flash_size=2 * CS)
    signed, blob, m = world.master(os.urandom(2 * CS + 1))
    _refused(dev, ImageSizeError, lambda: _program(dev, world, signed, blob, m))


def test_bad_nonce_refused(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, blob, m = firmware
    dev = world.chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    _refused(dev, DeviceRefusedError, lambda: dev.program(signed, _Boom(), lic, nonce=b"short"))


def test_all_refusals_are_securethread_errors() -> None:
    for exc in (WrongDeviceClassError, NotProvisionedError, ProvisioningError, LicenseError):
        assert issubclass(exc, VerificationError)


def test_vendor_makes_unique_chips(world: World) -> None:
    ids = {world.vendor.make_chip().device_id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 16 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    with pytest.raises(DeviceRefusedError):
        world.vendor.certify("NOT-HEX", ec.generate_private_key(ec.SECP256R1()).public_key())


def test_verify_manifest_used_by_sbm_is_the_library_call(world: World, firmware) -> None:  # type: ignore[no-untyped-def]
    _, signed, _, m = firmware
    assert verify_manifest(signed, key=world.fw_key.public_key()) == m


def test_silicon_vendor_reloads_from_its_saved_key() -> None:
    from securethread.device.sbm import SiliconVendor
    from securethread.errors import CertificateError
    from securethread.formats.identity import IdentityVerifier

    vendor = SiliconVendor()
    again = SiliconVendor.from_key(vendor.private_key, vendor.root_certificate)
    chip = again.make_chip()
    challenge = os.urandom(32)
    ident = IdentityVerifier([vendor.root_certificate]).verify(
        chip.identify(challenge), challenge=challenge
    )
    assert ident.device_id == chip.device_id
    with pytest.raises(CertificateError, match="does not match"):
        SiliconVendor.from_key(ec.generate_private_key(ec.SECP256R1()), vendor.root_certificate)


def test_packager_encodes_exactly_what_to_bytes_does(world: World) -> None:
    from cryptography.hazmat.primitives import serialization

    dev = world.part()
    data = world.provisioning(dev)
    package = ProvisioningData.packager(
        production_ca_certificate=data.production_ca_certificate,
        oem_root_certificate=data.oem_root_certificate,
        device_trust=data.device_trust,
        job_sha256=hashlib.sha256(JOB.encode()).digest(),
    )
    der = data.device_certificate.public_bytes(serialization.Encoding.DER)
    assert package(der) == data.to_bytes()
    dev.provision(package(der))  # and the SBM takes it
    with pytest.raises(ProvisioningFormatError, match="not DER"):
        package(data.device_certificate)  # type: ignore[arg-type]
    # The programmer learns at line set-up, not per device, that a statement is unusable.
    with pytest.raises(DeviceTrustRefusedError, match="device trust"):
        ProvisioningData.packager(
            production_ca_certificate=data.production_ca_certificate,
            oem_root_certificate=data.oem_root_certificate,
            device_trust=world.trust(signer=world.prog.private_key("pca")),
            job_sha256=hashlib.sha256(JOB.encode()).digest(),
        )
    with pytest.raises(ProvisioningError, match="job"):
        ProvisioningData.packager(
            production_ca_certificate=data.production_ca_certificate,
            oem_root_certificate=data.oem_root_certificate,
            device_trust=world.trust(job_id="job-2"),
            job_sha256=hashlib.sha256(JOB.encode()).digest(),
        )
    with pytest.raises(ProvisioningError, match="another signed job"):
        ProvisioningData.packager(
            production_ca_certificate=data.production_ca_certificate,
            oem_root_certificate=data.oem_root_certificate,
            device_trust=data.device_trust,
            job_sha256=hashlib.sha256(b"another signed job").digest(),
        )
