"""MCUboot signed images: build one signed in a token, parse and verify one strictly.

Layout (MCUboot docs/design.md "Image format"; little-endian, as imgtool writes by default)::

    header (hdr_size bytes: the 32-byte struct image_header, then erased-flash padding (0xff))
    payload (img_size bytes: the firmware)
    protected TLV area   info {0x6908, protect_tlv_size} || TLVs       (if protect_tlv_size > 0)
    TLV area             info {0x6907, tlv_tot} || TLVs

The SHA-256 TLV (0x10) is the SHA-256 of header || payload || protected area; the key hash TLV
(0x01) is the SHA-256 of the signing key's SubjectPublicKeyInfo DER (what ``imgtool getpub``
embeds in bootutil's key table); the ECDSA signature TLV (0x22) is a DER ECDSA P-256 signature
whose message hash is that SHA-256 digest, as bootutil's ``bootutil_verify_sig`` checks it.
Here the signature is made by :meth:`PrivateKey.sign_digest`, i.e. inside the OEM token.  The
security counter (0x50, u32) sits in the protected area, as ``imgtool --security-counter`` puts
it and as bootutil requires.

The parser is stricter than bootutil (one encoding per image): header padding one repeated
byte (erased flash) and ``pad1`` zero, only flags this SBM implements, every TLV inside its
area, the areas ending exactly at the end of the image, hash / key hash / signature only
unprotected and at most once, the security counter only protected and at most once, no other
unprotected TLV and those in imgtool's order.  (ECDSA signatures stay malleable, as bootutil
accepts high s; inside securethread the manifest's plaintext digest fixes every byte.)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Sequence

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from securethread.errors import FormatError, ImageError, SignatureError
from securethread.keys.ecutil import spki_der
from securethread.keys.protocol import PrivateKey

__all__ = [
    "DEFAULT_HEADER_SIZE",
    "IMAGE_MAGIC",
    "ImageVersion",
    "McubootFormatError",
    "McubootHashError",
    "McubootImage",
    "McubootKeyError",
    "McubootSignatureError",
    "VerifiedMcubootImage",
    "build_image",
    "check_hash",
    "check_unsigned",
    "key_hash",
    "parse_image",
    "resign_image",
    "verify_image",
]

IMAGE_MAGIC = 0x96F3B83D
HEADER_STRUCT = struct.Struct("<IIHHIIBBHII")  # struct image_header (bootutil/image.h)
TLV_INFO = struct.Struct("<HH")  # struct image_tlv_info: magic, tlv_tot
TLV_HDR = struct.Struct("<HH")  # struct image_tlv: it_type, it_len
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_KEYHASH = 0x01
TLV_PUBKEY = 0x02
TLV_SHA256 = 0x10
TLV_SHA384 = 0x11
TLV_SHA512 = 0x12
TLV_ECDSA_SIG = 0x22
TLV_SEC_CNT = 0x50
#: Types whose place is the unprotected area (MCUboot: they are what the hash covers or checks).
_UNPROTECTED_ONLY = frozenset({TLV_KEYHASH, TLV_PUBKEY, TLV_SHA256, TLV_SHA384, TLV_SHA512})
_SIGNATURE_TYPES = frozenset(range(0x20, 0x26))
#: The unprotected TLVs accepted, in imgtool's order: one byte string per signed image.
_UNPROTECTED_ORDER = (TLV_SHA256, TLV_KEYHASH, TLV_ECDSA_SIG)

#: Header flags (IMAGE_F_*) this SBM implements; encrypted (0x4, 0x8) and compressed images
#: (0x200, 0x400, 0x800) are refused: the container already encrypts, and nothing here inflates.
F_PIC = 0x01
F_NON_BOOTABLE = 0x10
F_RAM_LOAD = 0x20
F_ROM_FIXED = 0x100
ALLOWED_FLAGS = F_PIC | F_NON_BOOTABLE | F_RAM_LOAD | F_ROM_FIXED

#: Zephyr's default header reservation (CONFIG_ROM_START_OFFSET 0x200 on most Cortex-M boards).
DEFAULT_HEADER_SIZE = 0x200
MIN_HEADER_SIZE = HEADER_STRUCT.size
MAX_HEADER_SIZE = 0xFFFF
#: Header padding: erased flash, what ``imgtool --pad-header`` writes (its --erased-val default).
ERASED = b"\xff"
MAX_SIGNATURE_SIZE = 72  # DER ECDSA P-256: 2 + 2 * (2 + 33)

_VERSION_RE = re.compile(r"(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\+(0|[1-9]\d*))?)?)?")


class McubootFormatError(ImageError, FormatError):
    """An MCUboot image is malformed: magic, sizes, flags, TLV areas or TLV entries."""


class McubootHashError(ImageError):
    """The SHA-256 TLV differs from the SHA-256 of header, payload and protected TLVs."""


class McubootKeyError(ImageError, SignatureError):
    """The image names (key hash TLV) another signing key than the one trusted."""


class McubootSignatureError(ImageError, SignatureError):
    """The ECDSA signature TLV is missing or does not verify under the trusted key."""


@attrs.frozen(order=True)
class ImageVersion:
    """struct image_version: major u8, minor u8, revision u16, build_num u32."""

    major: int
    minor: int = 0
    revision: int = 0
    build: int = 0

    def __attrs_post_init__(self) -> None:
        for name, value, bits in (
            ("major", self.major, 8),
            ("minor", self.minor, 8),
            ("revision", self.revision, 16),
            ("build", self.build, 32),
        ):
            if type(value) is not int or not 0 <= value < 1 << bits:
                raise McubootFormatError(f"image version {name} must fit in {bits} bits")

    @classmethod
    def parse(cls, text: str) -> ImageVersion:
        """``major[.minor[.revision[+build]]]``, the syntax ``imgtool sign --version`` takes."""
        m = _VERSION_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise McubootFormatError(
                f"image version {text!r} is not major[.minor[.revision[+build]]] (imgtool syntax)"
            )
        return cls(*(int(g) if g is not None else 0 for g in m.groups()))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}+{self.build}"


@attrs.frozen(kw_only=True)
class McubootImage:
    """A parsed (not yet verified) image: header fields, TLVs and where the hash stops."""

    load_address: int
    header_size: int
    image_size: int
    flags: int
    version: ImageVersion
    protected_tlvs: tuple[tuple[int, bytes], ...]
    sha256: bytes
    key_hash: bytes | None
    signature: bytes | None
    hashed_length: int  # header + payload + protected area: what the SHA-256 TLV covers

    @property
    def security_counter(self) -> int | None:
        for kind, value in self.protected_tlvs:
            if kind == TLV_SEC_CNT:
                return int.from_bytes(value, "little")
        return None


@attrs.frozen(kw_only=True)
class VerifiedMcubootImage:
    """What :func:`verify_image` proved: hash, key and signature hold for these fields."""

    version: ImageVersion
    security_counter: int
    load_address: int
    flags: int
    header_size: int
    image_size: int
    sha256: bytes


# --- building ------------------------------------------------------------------------------


def _tlv(kind: int, value: bytes) -> bytes:
    return TLV_HDR.pack(kind, len(value)) + value


def _area(magic: int, tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    body = b"".join(_tlv(k, v) for k, v in tlvs)
    total = TLV_INFO.size + len(body)
    if total > 0xFFFF:
        raise McubootFormatError("TLV area exceeds 65535 bytes")
    return TLV_INFO.pack(magic, total) + body


def key_hash(key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo DER: imgtool's ``get_public_bytes`` for ECDSA."""
    return hashlib.sha256(spki_der(key)).digest()


def build_image(
    payload: bytes,
    *,
    signer: PrivateKey,
    version: ImageVersion,
    security_counter: int,
    load_address: int = 0,
    header_size: int = DEFAULT_HEADER_SIZE,
    flags: int = 0,
    protected_tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """Header + ``payload`` + protected TLVs (security counter first) + hash, key hash, signature.

    The ECDSA signature is ``signer.sign_digest(SHA-256(...))``: made inside the token for a
    PKCS#11 key.  A non-zero ``load_address`` sets IMAGE_F_RAM_LOAD, as imgtool does.
    """
    if not isinstance(signer.public_key().curve, ec.SECP256R1):
        raise McubootKeyError("the firmware-signing key must be P-256 (TLV 0x22, SHA-256)")
    if not MIN_HEADER_SIZE <= header_size <= MAX_HEADER_SIZE:
        raise McubootFormatError(
            f"header size {header_size} is outside [{MIN_HEADER_SIZE}, {MAX_HEADER_SIZE}]"
        )
    if not 1 <= len(payload) <= 0xFFFFFFFF - header_size:
        raise McubootFormatError(f"firmware of {len(payload)} bytes does not fit an MCUboot image")
    if type(load_address) is not int or not 0 <= load_address <= 0xFFFFFFFF:
        raise McubootFormatError("load address must be a 32-bit unsigned integer")
    if type(security_counter) is not int or not 0 <= security_counter <= 0xFFFFFFFF:
        raise McubootFormatError("security counter must be a 32-bit unsigned integer")
    if load_address:
        flags |= F_RAM_LOAD
    elif flags & F_RAM_LOAD:
        raise McubootFormatError("IMAGE_F_RAM_LOAD needs a load address")
    if flags & ~ALLOWED_FLAGS:
        raise McubootFormatError(f"image flags {flags:#x} name features this SBM lacks")
    # imgtool writes SEC_CNT first; one given (an unsigned image's) keeps its place
    counter = (TLV_SEC_CNT, security_counter.to_bytes(4, "little"))
    prot = [counter if kind == TLV_SEC_CNT else (kind, v) for kind, v in protected_tlvs]
    if counter not in prot:
        prot.insert(0, counter)
    prot_area = _area(TLV_PROT_INFO_MAGIC, prot)
    header = HEADER_STRUCT.pack(
        IMAGE_MAGIC,
        load_address,
        header_size,
        len(prot_area),
        len(payload),
        flags,
        version.major,
        version.minor,
        version.revision,
        version.build,
        0,
    ).ljust(header_size, ERASED)
    signed = hashlib.sha256(header)
    signed.update(payload)
    signed.update(prot_area)
    digest = signed.digest()
    sig = signer.sign_digest(digest)
    tlvs = _area(
        TLV_INFO_MAGIC,
        [
            (TLV_SHA256, digest),
            (TLV_KEYHASH, key_hash(signer.public_key())),
            (TLV_ECDSA_SIG, sig),
        ],
    )
    return b"".join((header, payload, prot_area, tlvs))


def resign_image(
    data: bytes, *, signer: PrivateKey, version: ImageVersion, security_counter: int
) -> bytes:
    """Sign an unsigned image (``imgtool create`` / ``sign`` without a key) in the token.

    Its header fields, payload and protected TLVs are kept; its version must be ``version``;
    a security counter it carries must be ``security_counter`` (one is added otherwise); its
    own SHA-256 TLV must hold; a signature or key hash already present is refused.
    """
    img = check_unsigned(data, version=version, security_counter=security_counter)
    return build_image(
        data[img.header_size : img.header_size + img.image_size],
        signer=signer,
        version=img.version,
        security_counter=security_counter,
        load_address=img.load_address,
        header_size=img.header_size,
        flags=img.flags,
        protected_tlvs=img.protected_tlvs,
    )


def check_unsigned(data: bytes, *, version: ImageVersion, security_counter: int) -> McubootImage:
    """The checks :func:`resign_image` makes before it signs (no key needed)."""
    img = parse_image(data)
    if img.signature is not None or img.key_hash is not None:
        raise McubootFormatError("the MCUboot image is already signed; give the unsigned image")
    check_hash(data, img)
    if img.version != version:
        raise McubootFormatError(
            f"the MCUboot image's version {img.version} differs from --version {version}"
        )
    if img.security_counter is not None and img.security_counter != security_counter:
        raise McubootFormatError(
            f"the MCUboot image's security counter {img.security_counter} differs from "
            f"--security-counter {security_counter}"
        )
    return img


# --- parsing -------------------------------------------------------------------------------


def _entries(data: bytes, start: int, end: int, what: str) -> list[tuple[int, bytes]]:
    out = []
    off = start
    while off < end:
        if end - off < TLV_HDR.size:
            raise McubootFormatError(f"{what}: a TLV header overruns the area")
        kind, n = TLV_HDR.unpack_from(data, off)
        off += TLV_HDR.size
        if n > end - off:
            raise McubootFormatError(f"{what}: TLV {kind:#x} of {n} bytes overruns the area")
        out.append((kind, data[off : off + n]))
        off += n
    return out


def _area_at(data: bytes, off: int, magic: int, what: str) -> tuple[int, int]:
    if len(data) - off < TLV_INFO.size:
        raise McubootFormatError(f"image ends before its {what}")
    got, total = TLV_INFO.unpack_from(data, off)
    if got != magic:
        raise McubootFormatError(f"{what}: bad magic {got:#06x} (want {magic:#06x})")
    if total < TLV_INFO.size or total > len(data) - off:
        raise McubootFormatError(f"{what}: length {total} overruns the image")
    return off + TLV_INFO.size, off + total


def parse_image(data: bytes) -> McubootImage:
    """Parse an MCUboot image exactly (no trailing bytes); hash and signature not yet checked."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("an MCUboot image is bytes")
    data = bytes(data)
    if len(data) < HEADER_STRUCT.size:
        raise McubootFormatError("image is shorter than an MCUboot header")
    (magic, load, hdr_size, prot_size, img_size, flags, major, minor, rev, build, pad1) = (
        HEADER_STRUCT.unpack_from(data)
    )
    if magic != IMAGE_MAGIC:
        raise McubootFormatError(f"bad MCUboot image magic {magic:#010x}")
    if hdr_size < HEADER_STRUCT.size or hdr_size > len(data):
        raise McubootFormatError(f"header size {hdr_size} is out of range")
    padding = data[HEADER_STRUCT.size : hdr_size]
    if pad1 != 0 or padding.strip(padding[:1]):
        raise McubootFormatError("header padding is not one repeated byte (erased flash)")
    if flags & ~ALLOWED_FLAGS:
        raise McubootFormatError(f"image flags {flags:#x} name features this SBM lacks")
    if bool(flags & F_RAM_LOAD) != (load != 0):
        raise McubootFormatError("load address and the RAM_LOAD flag disagree")
    if img_size == 0 or img_size > len(data) - hdr_size:
        raise McubootFormatError(f"image size {img_size} is out of range")
    off = hdr_size + img_size
    prot: list[tuple[int, bytes]] = []
    if prot_size:
        start, end = _area_at(data, off, TLV_PROT_INFO_MAGIC, "protected TLV area")
        if end - off != prot_size:
            raise McubootFormatError("protected TLV area length differs from the header's")
        prot = _entries(data, start, end, "protected TLV area")
        off = end
    hashed = off
    start, end = _area_at(data, off, TLV_INFO_MAGIC, "TLV area")
    if end != len(data):
        raise McubootFormatError("bytes after the TLV area")
    unprot = _entries(data, start, end, "TLV area")
    seen: set[int] = set()
    for kind, value in prot:
        if kind in _UNPROTECTED_ONLY or kind in _SIGNATURE_TYPES:
            raise McubootFormatError(f"TLV {kind:#x} is not allowed in the protected area")
        if kind == TLV_SEC_CNT:
            if kind in seen:
                raise McubootFormatError("duplicate security counter TLV")
            if len(value) != 4:
                raise McubootFormatError("security counter TLV is not 4 bytes")
            seen.add(kind)
    found: dict[int, bytes] = {}
    for kind, value in unprot:
        if kind not in _UNPROTECTED_ORDER:
            raise McubootFormatError(f"unprotected TLV {kind:#x} is not accepted")
        if kind in found:
            raise McubootFormatError(f"duplicate TLV {kind:#x} in the TLV area")
        if any(_UNPROTECTED_ORDER.index(k) > _UNPROTECTED_ORDER.index(kind) for k in found):
            raise McubootFormatError("TLV area out of order (hash, key hash, signature)")
        found[kind] = value
    if TLV_SHA256 not in found:
        raise McubootFormatError("no SHA-256 TLV")
    for kind, size in ((TLV_SHA256, 32), (TLV_KEYHASH, 32)):
        if kind in found and len(found[kind]) != size:
            raise McubootFormatError(f"TLV {kind:#x} is not {size} bytes")
    sig = found.get(TLV_ECDSA_SIG)
    if sig is not None and not 8 <= len(sig) <= MAX_SIGNATURE_SIZE:
        raise McubootFormatError("ECDSA signature TLV has an impossible length")
    return McubootImage(
        load_address=load,
        header_size=hdr_size,
        image_size=img_size,
        flags=flags,
        version=ImageVersion(major, minor, rev, build),
        protected_tlvs=tuple(prot),
        sha256=found[TLV_SHA256],
        key_hash=found.get(TLV_KEYHASH),
        signature=sig,
        hashed_length=hashed,
    )


def check_hash(data: bytes, img: McubootImage) -> bytes:
    """The SHA-256 TLV against header || payload || protected area; returns the digest."""
    digest = hashlib.sha256(memoryview(data)[: img.hashed_length]).digest()
    if not hmac.compare_digest(digest, img.sha256):
        raise McubootHashError("MCUboot image SHA-256 TLV does not match the image")
    return digest


def verify_image(data: bytes, *, key: ec.EllipticCurvePublicKey) -> VerifiedMcubootImage:
    """Parse, then hash, key hash and ECDSA signature under ``key``; a security counter is
    required (the SBM's rollback check reads it).  Raises, never returns a bool."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise McubootKeyError("MCUboot ECDSA signature TLV 0x22 here is P-256 only")
    img = parse_image(data)
    digest = check_hash(data, img)
    if img.key_hash is None:
        raise McubootKeyError("MCUboot image carries no key hash TLV")
    if not hmac.compare_digest(img.key_hash, key_hash(key)):
        raise McubootKeyError("MCUboot image is signed for another key (key hash TLV)")
    if img.signature is None:
        raise McubootSignatureError("MCUboot image carries no ECDSA signature TLV")
    try:
        key.verify(img.signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature:
        raise McubootSignatureError(
            "MCUboot image signature does not verify under the firmware-signing key"
        ) from None
    counter = img.security_counter
    if counter is None:
        raise McubootFormatError("MCUboot image carries no security counter TLV")
    return VerifiedMcubootImage(
        version=img.version,
        security_counter=counter,
        load_address=img.load_address,
        flags=img.flags,
        header_size=img.header_size,
        image_size=img.image_size,
        sha256=digest,
    )
