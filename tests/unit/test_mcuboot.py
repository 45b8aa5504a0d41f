"""The MCUboot image (formats/mcuboot.py): building, the strict parser's edge cases, and the
SBM refusing an image whose manifest is valid but whose MCUboot image is not."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Sequence

import pytest

from securethread.errors import Error, FormatError, ImageError, SignatureError
from securethread.formats.image import ManifestMismatchError, encrypt_image, sign_manifest
from securethread.formats.mcuboot import (
    DEFAULT_HEADER_SIZE,
    HEADER_STRUCT,
    IMAGE_MAGIC,
    TLV_ECDSA_SIG,
    TLV_INFO_MAGIC,
    TLV_KEYHASH,
    TLV_PROT_INFO_MAGIC,
    TLV_SEC_CNT,
    TLV_SHA256,
    ImageVersion,
    McubootFormatError,
    McubootHashError,
    McubootKeyError,
    McubootSignatureError,
    build_image,
    check_unsigned,
    key_hash,
    parse_image,
    resign_image,
    verify_image,
)
from securethread.hsm import SIGNING, Curve, SoftwareBackend
from tests.unit.test_device import CS, World, make_world

FW = bytes(range(256)) * 9 + b"tail"


@pytest.fixture(scope="module")
def backend() -> SoftwareBackend:
    return SoftwareBackend("mcuboot-sw")


@pytest.fixture(scope="module")
def fw_key(backend: SoftwareBackend):  # type: ignore[no-untyped-def]
    return backend.generate_ec("fw", curve=Curve.P256, policy=SIGNING)


@pytest.fixture(scope="module")
def image(fw_key) -> bytes:  # type: ignore[no-untyped-def]
    return build_image(FW, signer=fw_key, version=ImageVersion(1, 2, 3, 4), security_counter=7)


# --- crafting images field by field --------------------------------------------------------


def _area(magic: int, tlvs: Sequence[tuple[int, bytes]], total: int | None = None) -> bytes:
    body = b"".join(struct.pack("<HH", k, len(v)) + v for k, v in tlvs)
    return struct.pack("<HH", magic, 4 + len(body) if total is None else total) + body


def craft(
    *,
    magic: int = IMAGE_MAGIC,
    load: int = 0,
    hdr_size: int = 64,
    prot_size: int | None = None,
    img_size: int | None = None,
    flags: int = 0,
    pad1: int = 0,
    padding: bytes | None = None,
    payload: bytes = FW,
    prot: bytes | None = None,
    tlvs: Sequence[tuple[int, bytes]] | None = None,
    extra: Sequence[tuple[int, bytes]] = (),
    tail: bytes = b"",
) -> bytes:
    """An image with any field overridden; the SHA-256 TLV is right for what is crafted."""
    if prot is None:
        prot = _area(TLV_PROT_INFO_MAGIC, [(TLV_SEC_CNT, (7).to_bytes(4, "little"))])
    hdr = HEADER_STRUCT.pack(
        magic, load, hdr_size, len(prot) if prot_size is None else prot_size,
        len(payload) if img_size is None else img_size, flags, 1, 2, 3, 4, pad1,
    )  # fmt: skip
    hdr += padding if padding is not None else b"\xff" * (hdr_size - len(hdr))
    digest = hashlib.sha256(hdr + payload + prot).digest()
    entries = [(TLV_SHA256, digest), *extra] if tlvs is None else list(tlvs)
    return hdr + payload + prot + _area(TLV_INFO_MAGIC, entries) + tail


def test_crafted_baseline_parses() -> None:
    """The crafting helper makes a valid unsigned image: every edge case below changes one thing."""
    img = parse_image(craft())
    assert (img.header_size, img.image_size, img.security_counter) == (64, len(FW), 7)
    assert img.signature is None and img.key_hash is None
    assert str(img.version) == "1.2.3+4"


# --- building and verifying ---------------------------------------------------------------


def test_build_then_verify(image: bytes, fw_key) -> None:  # type: ignore[no-untyped-def]
    v = verify_image(image, key=fw_key.public_key())
    assert (v.version, v.security_counter, v.header_size, v.image_size) == (
        ImageVersion(1, 2, 3, 4), 7, DEFAULT_HEADER_SIZE, len(FW),
    )  # fmt: skip
    assert image[v.header_size : v.header_size + v.image_size] == FW
    img = parse_image(image)
    assert img.key_hash == key_hash(fw_key.public_key())
    assert v.sha256 == hashlib.sha256(image[: img.hashed_length]).digest() == img.sha256
    # the header as MCUboot's struct image_header lays it out (little-endian)
    assert struct.unpack_from("<IIHHI", image) == (IMAGE_MAGIC, 0, 0x200, 12, len(FW))


def test_load_address_sets_ram_load(fw_key) -> None:  # type: ignore[no-untyped-def]
    img = build_image(
        FW, signer=fw_key, version=ImageVersion(1), security_counter=0, load_address=0x20000000
    )
    v = verify_image(img, key=fw_key.public_key())
    assert v.load_address == 0x20000000 and v.flags == 0x20


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"header_size": 31}, "header size"),
        ({"header_size": 0x10000}, "header size"),
        ({"security_counter": -1}, "security counter"),
        ({"security_counter": 1 << 32}, "security counter"),
        ({"load_address": 1 << 32}, "load address"),
        ({"flags": 0x20}, "needs a load address"),
        ({"flags": 0x4}, "flags"),
        ({"payload": b""}, "does not fit"),
    ],
)
def test_build_refuses(fw_key, kw: dict[str, object], match: str) -> None:  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"version": ImageVersion(1), "security_counter": 1, **kw}
    payload = args.pop("payload", FW)
    with pytest.raises(McubootFormatError, match=match):
        build_image(payload, signer=fw_key, **args)  # type: ignore[arg-type]


def test_build_refuses_p384_key(backend: SoftwareBackend) -> None:
    k = backend.generate_ec("p384", curve=Curve.P384, policy=SIGNING)
    with pytest.raises(McubootKeyError, match="P-256"):
        build_image(FW, signer=k, version=ImageVersion(1), security_counter=1)
    with pytest.raises(McubootKeyError, match="P-256"):
        verify_image(craft(), key=k.public_key())


@pytest.mark.parametrize(
    ("text", "want"),
    [("1", (1, 0, 0, 0)), ("1.2", (1, 2, 0, 0)), ("1.2.3", (1, 2, 3, 0)),
     ("255.255.65535+4294967295", (255, 255, 65535, 4294967295)), ("0.0.0+0", (0, 0, 0, 0))],
)  # fmt: skip
def test_version_syntax(text: str, want: tuple[int, int, int, int]) -> None:
    assert ImageVersion.parse(text) == ImageVersion(*want)


@pytest.mark.parametrize(
    "text", ["", "v1", "1.2.3.4", "1+2", "01.2", "1.2.3+", "256", "1.256", "1.0.65536",
             "1.0.0+4294967296", " 1", "1.2.3-rc1"],
)  # fmt: skip
def test_version_syntax_refused(text: str) -> None:
    with pytest.raises(McubootFormatError, match="version"):
        ImageVersion.parse(text)


# --- the parser's edge cases -----------------------------------------------------------------

SEC = (TLV_SEC_CNT, (7).to_bytes(4, "little"))

BAD = [
    ("empty", b"", "shorter than an MCUboot header"),
    ("short header", craft()[:31], "shorter than an MCUboot header"),
    ("bad magic", craft(magic=0x96F3B83C), "magic"),
    ("header size below the struct", craft(hdr_size=16, padding=b""), "header size"),
    ("header size beyond the image", craft()[:60], "header size"),
    ("pad1 set", craft(pad1=1), "padding"),
    ("mixed padding", craft(padding=b"\xff" * 31 + b"\x00"), "padding"),
    ("encrypted flag", craft(flags=0x4), "flags"),
    ("compressed flag", craft(flags=0x400), "flags"),
    ("RAM_LOAD without address", craft(flags=0x20), "RAM_LOAD"),
    ("address without RAM_LOAD", craft(load=0x1000), "RAM_LOAD"),
    ("zero image size", craft(img_size=0), "image size"),
    ("image size overruns", craft(img_size=1 << 20), "image size"),
    ("protected area bad magic",
     craft(prot=_area(TLV_INFO_MAGIC, [SEC])), "protected TLV area: bad magic"),
    ("protected size differs from header", craft(prot_size=16), "differs from the header"),
    ("protected area overruns", craft(prot=_area(TLV_PROT_INFO_MAGIC, [SEC], total=4000)),
     "overruns the image"),
    ("protected TLV overruns its area",
     craft(prot=struct.pack("<HHHH", TLV_PROT_INFO_MAGIC, 11, TLV_SEC_CNT, 4) + bytes(3)),
     "TLV 0x50 of 4 bytes overruns the area"),
    ("protected area missing", craft(prot=b"", prot_size=12), "protected TLV area"),
    ("TLV area bad magic", craft()[: -(4 + 36)] + _area(0x6906, [(TLV_SHA256, bytes(32))]),
     "TLV area: bad magic"),
    ("trailing bytes", craft(tail=b"\xff"), "after the TLV area"),
    ("TLV area missing", craft()[: -(4 + 36)], "ends before its TLV area"),
    ("TLV header overruns", craft(tail=b"")[:-36] + b"\x10\x00", "overrun"),
    ("no SHA-256 TLV", craft(tlvs=[]), "no SHA-256"),
    ("duplicate SHA-256 TLV", craft(extra=[(TLV_SHA256, bytes(32))]), "duplicate"),
    ("duplicate key hash", craft(extra=[(TLV_KEYHASH, bytes(32)), (TLV_KEYHASH, bytes(32))]),
     "duplicate"),
    ("duplicate signature", craft(extra=[(TLV_ECDSA_SIG, bytes(8)), (TLV_ECDSA_SIG, bytes(8))]),
     "duplicate"),
    ("key hash before the hash",
     craft(tlvs=[(TLV_KEYHASH, bytes(32)), (TLV_SHA256, bytes(32))]), "out of order"),
    ("signature before the key hash",
     craft(extra=[(TLV_ECDSA_SIG, bytes(8)), (TLV_KEYHASH, bytes(32))]), "out of order"),
    ("SHA-256 TLV of 31 bytes", craft(tlvs=[(TLV_SHA256, bytes(31))]), "not 32 bytes"),
    ("key hash of 20 bytes", craft(extra=[(TLV_KEYHASH, bytes(20))]), "not 32 bytes"),
    ("signature of 73 bytes", craft(extra=[(TLV_ECDSA_SIG, bytes(73))]), "impossible length"),
    ("SHA-384 TLV", craft(extra=[(0x11, bytes(48))]), "not accepted"),
    ("public key TLV", craft(extra=[(0x02, bytes(91))]), "not accepted"),
    ("encryption TLV", craft(extra=[(0x32, bytes(113))]), "not accepted"),
    ("security counter unprotected", craft(extra=[SEC]), "not accepted"),
    ("signature in the protected area",
     craft(prot=_area(TLV_PROT_INFO_MAGIC, [SEC, (TLV_ECDSA_SIG, bytes(70))])), "protected"),
    ("hash in the protected area",
     craft(prot=_area(TLV_PROT_INFO_MAGIC, [SEC, (TLV_SHA256, bytes(32))])), "protected"),
    ("duplicate security counter",
     craft(prot=_area(TLV_PROT_INFO_MAGIC, [SEC, SEC])), "duplicate security counter"),
    ("security counter of 8 bytes",
     craft(prot=_area(TLV_PROT_INFO_MAGIC, [(TLV_SEC_CNT, bytes(8))])), "not 4 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_parser_refuses(data: bytes, match: str) -> None:
    with pytest.raises(McubootFormatError, match=match) as info:
        parse_image(data)
    assert isinstance(info.value, ImageError) and isinstance(info.value, FormatError)


def test_parser_accepts_zero_padding_and_other_protected_tlvs() -> None:
    """Zephyr links a zero-filled header gap; imgtool's --pad-header writes 0xff.  A protected
    TLV this SBM does not read (a dependency, 0x40) is hashed, so it is kept, not refused."""
    img = parse_image(craft(padding=bytes(32)))
    assert img.header_size == 64
    dep = (0x40, bytes(12))
    img = parse_image(craft(prot=_area(TLV_PROT_INFO_MAGIC, [dep, SEC])))
    assert img.protected_tlvs == (dep, SEC) and img.security_counter == 7


def test_no_protected_area_means_no_security_counter(fw_key) -> None:  # type: ignore[no-untyped-def]
    data = craft(prot=b"")
    assert parse_image(data).security_counter is None
    with pytest.raises(McubootKeyError, match="no key hash"):
        verify_image(data, key=fw_key.public_key())


# --- verification: hash, key, signature ---------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 1
    return bytes(b)


@pytest.mark.parametrize(
    ("where", "at", "exc"),
    [("header version", 20, McubootHashError), ("header padding", 40, McubootFormatError),
     ("payload", DEFAULT_HEADER_SIZE + 5, McubootHashError),
     ("security counter", DEFAULT_HEADER_SIZE + len(FW) + 8, McubootHashError)],
)  # fmt: skip
def test_tampered_signed_region_refused(  # type: ignore[no-untyped-def]
    image: bytes, fw_key, where: str, at: int, exc: type[Exception]
) -> None:
    with pytest.raises(exc):
        verify_image(_flip(image, at), key=fw_key.public_key())


def test_tampered_hash_signature_and_key(image: bytes, fw_key, backend) -> None:  # type: ignore[no-untyped-def]
    img = parse_image(image)
    tlv = img.hashed_length + 4  # first TLV of the unprotected area: the SHA-256
    with pytest.raises(McubootHashError):
        verify_image(_flip(image, tlv + 4), key=fw_key.public_key())
    with pytest.raises(McubootKeyError, match="another key"):
        verify_image(_flip(image, tlv + 36 + 4), key=fw_key.public_key())
    with pytest.raises(McubootSignatureError):
        verify_image(_flip(image, len(image) - 1), key=fw_key.public_key())
    other = backend.generate_ec("other", curve=Curve.P256, policy=SIGNING)
    with pytest.raises(McubootKeyError):
        verify_image(image, key=other.public_key())
    # the right key hash but a signature made by another key
    forged = _replace_signature(image, other.sign_digest(img.sha256))
    with pytest.raises(McubootSignatureError, match="does not verify") as info:
        verify_image(forged, key=fw_key.public_key())
    assert isinstance(info.value, SignatureError)


def _replace_signature(image: bytes, sig: bytes) -> bytes:
    img = parse_image(image)
    return image[: img.hashed_length] + _area(
        TLV_INFO_MAGIC, [(TLV_SHA256, img.sha256), (TLV_KEYHASH, img.key_hash or b""),
                         (TLV_ECDSA_SIG, sig)],
    )  # fmt: skip


def test_missing_signature_or_security_counter(image: bytes, fw_key) -> None:  # type: ignore[no-untyped-def]
    img = parse_image(image)
    kh = key_hash(fw_key.public_key())
    unsigned = image[: img.hashed_length] + _area(
        TLV_INFO_MAGIC, [(TLV_SHA256, img.sha256), (TLV_KEYHASH, kh)]
    )
    with pytest.raises(McubootSignatureError, match="no ECDSA signature"):
        verify_image(unsigned, key=fw_key.public_key())
    bare = craft(prot=b"")
    digest = parse_image(bare).sha256
    signed = bare[: -(4 + 36)] + _area(
        TLV_INFO_MAGIC,
        [(TLV_SHA256, digest), (TLV_KEYHASH, kh), (TLV_ECDSA_SIG, fw_key.sign_digest(digest))],
    )
    with pytest.raises(McubootFormatError, match="no security counter"):
        verify_image(signed, key=fw_key.public_key())


# --- signing an unsigned image (oem master-image --mcuboot) ---------------------------------


def test_resign_keeps_header_and_protected_tlvs(fw_key) -> None:  # type: ignore[no-untyped-def]
    dep = (0x40, bytes(12))
    unsigned = craft(hdr_size=0x80, prot=_area(TLV_PROT_INFO_MAGIC, [SEC, dep]))  # imgtool's order
    signed = resign_image(
        unsigned, signer=fw_key, version=ImageVersion(1, 2, 3, 4), security_counter=7
    )
    # everything the hash covers is the unsigned image's, byte for byte
    n = parse_image(unsigned).hashed_length
    assert parse_image(signed).hashed_length == n and signed[:n] == unsigned[:n]
    assert verify_image(signed, key=fw_key.public_key()).security_counter == 7


def test_resign_adds_a_missing_security_counter(fw_key) -> None:  # type: ignore[no-untyped-def]
    signed = resign_image(
        craft(prot=b""), signer=fw_key, version=ImageVersion(1, 2, 3, 4), security_counter=9
    )
    assert verify_image(signed, key=fw_key.public_key()).security_counter == 9


@pytest.mark.parametrize(
    ("data", "version", "counter", "match"),
    [
        (craft(), ImageVersion(1, 2, 3, 5), 7, "version"),
        (craft(), ImageVersion(1, 2, 3, 4), 8, "security counter 7 differs"),
        (craft(extra=[(TLV_KEYHASH, bytes(32))]), ImageVersion(1, 2, 3, 4), 7, "already signed"),
        (_flip(craft(), 100), ImageVersion(1, 2, 3, 4), 7, "SHA-256"),
        (b"\x7fELF" + bytes(100), ImageVersion(1), 7, "magic"),
    ],
)
def test_unsigned_input_refused(  # type: ignore[no-untyped-def]
    fw_key, data: bytes, version: ImageVersion, counter: int, match: str
) -> None:
    with pytest.raises(ImageError, match=match):
        check_unsigned(data, version=version, security_counter=counter)
    with pytest.raises(ImageError, match=match):
        resign_image(data, signer=fw_key, version=version, security_counter=counter)


# --- the SBM: a valid manifest around a bad MCUboot image -----------------------------------


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def _container(world: World, plain: bytes, *, version: str = "1.3", counter: int = 3):  # type: ignore[no-untyped-def]
    """What a holder of the image key and the manifest key could ship: the manifest is valid,
    so only the SBM's MCUboot check stands between ``plain`` and flash."""
    out = io.BytesIO()
    m = encrypt_image(
        io.BytesIO(plain), out, key=world.image_key, image_id="fw-main", image_version=version,
        security_counter=counter, device_class="sensor-v1", chunk_size=CS,
    )  # fmt: skip
    return sign_manifest(m, world.fw_key), out.getvalue(), m


def _program(world: World, plain: bytes, exc: type[Exception], **kw: object) -> Exception:
    signed, blob, m = _container(world, plain, **kw)  # type: ignore[arg-type]
    dev = world.chip()
    lic = world.issuer(m).issue(dev.device_id, dev.public_key)
    before = dev.state()
    with pytest.raises(exc) as info:
        dev.program(signed, io.BytesIO(blob), lic, nonce=os.urandom(16))
    assert dev.state() == before and dev.flash is None
    return info.value


def _good(world: World, counter: int = 3, version: str = "1.3") -> bytes:
    return build_image(
        FW, signer=world.fw_key, version=ImageVersion.parse(version), security_counter=counter
    )


def test_sbm_installs_a_good_image(world: World) -> None:
    plain = _good(world)
    signed, blob, m = _container(world, plain)
    dev = world.chip()
    dev.program(signed, io.BytesIO(blob), world.issuer(m).issue(dev.device_id, dev.public_key),
                nonce=os.urandom(16))  # fmt: skip
    assert dev.flash == plain and dev.firmware == FW


@pytest.mark.parametrize(
    ("what", "exc"),
    [("raw firmware", McubootFormatError), ("payload", McubootHashError),
     ("header", McubootHashError), ("TLV", McubootSignatureError),
     ("trailing byte", McubootFormatError)],
)  # fmt: skip
def test_sbm_refuses_a_tampered_image(world: World, what: str, exc: type[Exception]) -> None:
    good = _good(world)
    plain = {
        "raw firmware": FW,
        "payload": _flip(good, DEFAULT_HEADER_SIZE + 1),
        "header": _flip(good, 20),  # version 1.3 -> 0.3
        "TLV": _flip(good, len(good) - 2),
        "trailing byte": good + b"\xff",
    }[what]
    err = _program(world, plain, exc)
    assert isinstance(err, Error)


def test_sbm_refuses_an_image_signed_by_another_key(world: World) -> None:
    rogue = SoftwareBackend("rogue").generate_ec("fw", curve=Curve.P256, policy=SIGNING)
    plain = build_image(FW, signer=rogue, version=ImageVersion(1, 3), security_counter=3)
    _program(world, plain, McubootKeyError)


def test_sbm_refuses_counter_or_version_unlike_the_manifest(world: World) -> None:
    err = _program(world, _good(world, counter=4), ManifestMismatchError)
    assert "security counter 4" in str(err)
    err = _program(world, _good(world, version="1.4"), ManifestMismatchError)
    assert "version 1.4.0+0" in str(err)
