"""Zero-secret programming: the OEM's programming package and the factory's confirmations.

The OEM pre-licenses a vendor's lot (:mod:`securethread.formats.lot`) in its own token and
sends a factory one **programming package** (envelope kind ``programming-package``, a
COSE_Sign1 by the OEM root key, RFC 9052 §4.2) over a canonical CBOR body::

    {"v": 1, "factory": tstr, "lot_id": tstr, "lot_sha256": bstr(32),
     "job_id": tstr, "job_sha256": bstr(32),
     "image_id": tstr, "image_sha256": bstr(32), "manifest": bstr (the signed manifest),
     "production_ca": bstr (DER), "device_trust": bstr (the root-signed statement),
     "chips": [[device_id, key_id bstr(32), certificate bstr (DER), license bstr], ...]}

``factory`` and ``lot_id`` bind the package to one factory and one lot: the flasher is told
both by its order (out of band) and refuses a package naming another.  ``job_sha256`` is the
lot job's identity (:func:`lot_job_hash` of the factory, the lot, the image manifest and the
production CA): the device-trust statement names it and every device certificate's serial
carries its first 8 octets, as for a job (docs/pki.md).  ``key_id`` is the SHA-256 of the
chip's SPKI: the flasher looks a chip up by the key it proves possession of, so a chip
outside the lot finds nothing.  ``image_sha256`` is the SHA-256 of the encrypted image file
``image-<image_id>.enc``.  Chips are in strictly ascending device-id order.

The factory returns a **confirmations** file (canonical CBOR, unsigned: every entry is a
boot confirmation the chip signed with its own key)::

    {"v": 1, "package_sha256": bstr(32), "factory": tstr, "lot_id": tstr,
     "confirmations": [[device_id, boot confirmation bstr], ...]}

with device ids strictly ascending (each chip at most once).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError, ImageError, SignatureError, VerificationError
from securethread.formats import cbor, fields
from securethread.formats.boot import MAX_CONFIRMATION_SIZE
from securethread.formats.device_trust import (
    DeviceTrust,
    DeviceTrustError,
    verify_device_trust,
)
from securethread.formats.envelope import open_signed, seal
from securethread.formats.identity import DEVICE_ID_RE
from securethread.formats.image import NAME_RE, Manifest, verify_manifest
from securethread.formats.job import JOB_ID_RE
from securethread.formats.license import MAX_LICENSE_SIZE
from securethread.formats.lot import MAX_LOT_CHIPS, split_body
from securethread.keys.protocol import PrivateKey
from securethread.pki import untrusted

__all__ = [
    "CONFIRMATIONS_VERSION",
    "MAX_CONFIRMATIONS_SIZE",
    "MAX_PACKAGE_SIZE",
    "PACKAGE_KIND",
    "Confirmations",
    "ConfirmationsFormatError",
    "PackageChip",
    "PackageError",
    "PackageFormatError",
    "PackageSignatureError",
    "ProgrammingPackage",
    "VerifiedPackage",
    "WrongFactoryError",
    "WrongLotError",
    "lot_job_hash",
    "sign_package",
    "verify_package",
]

VERSION = 1
CONFIRMATIONS_VERSION = 1
PACKAGE_KIND = "programming-package"
#: Per chip about 1.5 KB (certificate and license): 250,000 chips in 400 MB.
MAX_PACKAGE_SIZE = 400 << 20
MAX_CERTIFICATE_SIZE = 2048
MAX_CONFIRMATIONS_SIZE = MAX_LOT_CHIPS * (MAX_CONFIRMATION_SIZE + 32)
_NAME = r"[A-Za-z0-9._-]{1,64}"  # workdir.check_name's names (a factory is named like one)
_JOB_DOMAIN = "securethread-lot-job"


class PackageError(VerificationError):
    """A programming package is refused."""


class PackageFormatError(PackageError, FormatError):
    """A programming package is malformed, truncated, oversized or out of order."""


class PackageSignatureError(PackageError, SignatureError):
    """A programming package is not signed by the OEM root, or was altered."""


class WrongFactoryError(PackageError):
    """The programming package is for another factory."""


class WrongLotError(PackageError):
    """The programming package is for another lot."""


class ConfirmationsFormatError(FormatError):
    """A confirmations file is malformed, out of order or lists a chip twice."""


def lot_job_hash(
    *,
    job_id: str,
    factory: str,
    lot_sha256: bytes,
    manifest_sha256: bytes,
    production_ca_sha256: bytes,
) -> bytes:
    """The identity of a lot job: SHA-256 of the canonical CBOR array of what it binds
    (domain-separated from every other hash by its first element)."""
    return hashlib.sha256(
        cbor.encode(
            [_JOB_DOMAIN, VERSION, job_id, factory, lot_sha256, manifest_sha256,
             production_ca_sha256]
        )  # fmt: skip
    ).digest()


@attrs.frozen
class PackageChip:
    """One chip's entry: what the flasher releases to the chip whose key is ``key_id``."""

    device_id: str
    key_id: bytes = attrs.field(repr=False)
    certificate: bytes = attrs.field(repr=False)  # DER, parsed by the hardened loader on use
    license: bytes = attrs.field(repr=False)

    def to_cbor(self) -> list[Any]:
        return [self.device_id, self.key_id, self.certificate, self.license]


@fields.body("programming package", error=PackageFormatError)
@attrs.frozen(kw_only=True)
class _Header:
    factory: str = fields.text("factory", max_len=64, pattern=_NAME)
    lot_id: str = fields.text("lot_id", max_len=64, pattern=JOB_ID_RE)
    lot_sha256: bytes = fields.byte_string("lot_sha256", size=32)
    job_id: str = fields.text("job_id", max_len=64, pattern=JOB_ID_RE)
    job_sha256: bytes = fields.byte_string("job_sha256", size=32)
    image_id: str = fields.text("image_id", max_len=64, pattern=NAME_RE)
    image_sha256: bytes = fields.byte_string("image_sha256", size=32)
    manifest: bytes = fields.byte_string("manifest", min_len=1, max_len=4096)
    production_ca: bytes = fields.byte_string("production_ca", min_len=1, max_len=4096)
    device_trust: bytes = fields.byte_string("device_trust", min_len=1, max_len=2048)
    version: int = fields.version(VERSION)


@attrs.frozen(kw_only=True)
class ProgrammingPackage:
    """A package's content (unverified as constructed; :func:`verify_package` checks it)."""

    factory: str
    lot_id: str
    lot_sha256: bytes
    job_id: str
    job_sha256: bytes
    image_id: str
    image_sha256: bytes
    manifest: bytes
    production_ca: bytes
    device_trust: bytes
    chips: tuple[PackageChip, ...] = attrs.field(repr=lambda c: f"<{len(c)} chips>")

    def _header(self) -> _Header:
        return _Header(
            **{a.name: getattr(self, a.name) for a in attrs.fields(_Header) if a.name != "version"}
        )

    def __attrs_post_init__(self) -> None:
        self._header()  # every scalar field passes its rule
        _check_chips([c.to_cbor() for c in self.chips])

    def to_body(self) -> dict[str, Any]:
        return {**fields.encode(self._header()), "chips": [c.to_cbor() for c in self.chips]}

    @classmethod
    def from_body(cls, body: Any) -> ProgrammingPackage:
        rest, raw = split_body(body, "chips", what="programming package", error=PackageFormatError)
        header = fields.decode(_Header, rest)
        chips = _check_chips(raw)
        kw = {a.name: getattr(header, a.name) for a in attrs.fields(_Header) if a.name != "version"}
        return cls(**kw, chips=chips)


def _check_chips(raw: Any) -> tuple[PackageChip, ...]:
    """Every entry's shape and sizes, ids strictly ascending, no key id twice."""
    if type(raw) is not list:
        raise PackageFormatError("programming package: field 'chips' must be a list")
    if not 1 <= len(raw) <= MAX_LOT_CHIPS:
        raise PackageFormatError(
            f"programming package: {len(raw)} chips, must be 1..{MAX_LOT_CHIPS}"
        )
    out = []
    keys: set[bytes] = set()
    previous = ""
    match = DEVICE_ID_RE.fullmatch
    for i, entry in enumerate(raw):
        if type(entry) is not list or len(entry) != 4:
            raise PackageFormatError(
                f"programming package: chip {i} is not [device_id, key_id, certificate, license]"
            )
        device_id, key_id, cert, lic = entry
        if type(device_id) is not str or match(device_id) is None:
            raise PackageFormatError(f"programming package: chip {i}: bad device id")
        if device_id <= previous:
            raise PackageFormatError(
                f"programming package: chip {device_id} is listed twice or out of order"
            )
        previous = device_id
        if type(key_id) is not bytes or len(key_id) != 32 or key_id in keys:
            raise PackageFormatError(
                f"programming package: chip {device_id}: key id is not 32 bytes or is reused"
            )
        keys.add(key_id)
        if type(cert) is not bytes or not 1 <= len(cert) <= MAX_CERTIFICATE_SIZE:
            raise PackageFormatError(f"programming package: chip {device_id}: bad certificate")
        if type(lic) is not bytes or not 1 <= len(lic) <= MAX_LICENSE_SIZE:
            raise PackageFormatError(f"programming package: chip {device_id}: bad license")
        out.append(PackageChip(device_id, key_id, cert, lic))
    return tuple(out)


def sign_package(package: ProgrammingPackage, root_key: PrivateKey) -> bytes:
    """The OEM signs ``package`` with its root key (the key the factory pins out of band)."""
    return seal(PACKAGE_KIND, package.to_body(), [root_key])


@attrs.frozen
class VerifiedPackage:
    """A package verified under the OEM root, for this factory and lot: what the flasher
    and the OEM's reconciliation trust.  ``sha256`` is its content id."""

    package: ProgrammingPackage
    sha256: bytes
    manifest: Manifest
    trust: DeviceTrust
    production_ca: x509.Certificate = attrs.field(repr=False)
    by_key: Mapping[bytes, PackageChip] = attrs.field(repr=False, eq=False)

    def __len__(self) -> int:
        return len(self.package.chips)


def verify_package(
    data: bytes, *, oem_root: x509.Certificate, factory: str, lot_id: str
) -> VerifiedPackage:
    """Verify a programming package under ``oem_root`` (S2: before the body is parsed), then
    that it is for ``factory`` and ``lot_id`` and its anchors agree: the device-trust
    statement verifies under the root and names the lot job, whose hash the package's
    fields give; the production CA is that job's; the manifest verifies under the
    firmware-signing key the statement names and is for the lot's image and device class.
    """
    from securethread.pki import job_id_of

    if type(data) is not bytes:
        raise PackageFormatError("programming package: not bytes")
    if len(data) > MAX_PACKAGE_SIZE:
        raise PackageFormatError(
            f"programming package: {len(data)} bytes, more than {MAX_PACKAGE_SIZE}"
        )
    root_key = oem_root.public_key()
    if not isinstance(root_key, ec.EllipticCurvePublicKey):
        raise PackageFormatError("programming package: the OEM root has no EC key")
    try:
        opened = open_signed(data, kind=PACKAGE_KIND, keys=root_key, max_size=MAX_PACKAGE_SIZE)
    except SignatureError as exc:
        raise PackageSignatureError(f"programming package: {exc}") from None
    except FormatError as exc:
        raise PackageFormatError(f"programming package: {exc}") from None
    pkg = ProgrammingPackage.from_body(opened.body)
    if pkg.factory != factory:
        raise WrongFactoryError(
            f"programming package is for factory {pkg.factory!r}, this is {factory!r}"
        )
    if pkg.lot_id != lot_id:
        raise WrongLotError(f"programming package is for lot {pkg.lot_id!r}, not {lot_id!r}")
    try:
        trust = verify_device_trust(pkg.device_trust, oem_root=oem_root)
        pca = untrusted.load_certificate(pkg.production_ca, what="production CA certificate")
        manifest = verify_manifest(pkg.manifest, key=trust.firmware_signing_key)
    except (DeviceTrustError, ImageError, FormatError) as exc:
        raise PackageFormatError(f"programming package: {exc}") from None
    expected = lot_job_hash(
        job_id=pkg.job_id,
        factory=pkg.factory,
        lot_sha256=pkg.lot_sha256,
        manifest_sha256=hashlib.sha256(pkg.manifest).digest(),
        production_ca_sha256=hashlib.sha256(pkg.production_ca).digest(),
    )
    if not hmac.compare_digest(expected, pkg.job_sha256) or trust.job_sha256 != expected:
        raise PackageFormatError("programming package: its lot job hash does not match")
    if trust.job_id != pkg.job_id or job_id_of(pca) != pkg.job_id:
        raise PackageFormatError("programming package: device trust or production CA is for "
                                 "another job")  # fmt: skip
    if manifest.image_id != pkg.image_id or manifest.device_class != trust.device_class:
        raise PackageFormatError("programming package: the manifest is for another image or "
                                 "device class")  # fmt: skip
    return VerifiedPackage(
        package=pkg,
        sha256=opened.content_id,
        manifest=manifest,
        trust=trust,
        production_ca=pca,
        by_key={c.key_id: c for c in pkg.chips},
    )


# --- confirmations ----------------------------------------------------------------------


@fields.body("confirmations", error=ConfirmationsFormatError)
@attrs.frozen(kw_only=True)
class _ConfirmationsHeader:
    package_sha256: bytes = fields.byte_string("package_sha256", size=32)
    factory: str = fields.text("factory", max_len=64, pattern=_NAME)
    lot_id: str = fields.text("lot_id", max_len=64, pattern=JOB_ID_RE)
    version: int = fields.version(CONFIRMATIONS_VERSION)


@attrs.frozen(kw_only=True)
class Confirmations:
    """What the factory returns: each chip's boot confirmation, by device id (unverified:
    the OEM checks every one under the chip's key from the lot)."""

    package_sha256: bytes
    factory: str
    lot_id: str
    confirmations: Mapping[str, bytes] = attrs.field(repr=lambda c: f"<{len(c)} confirmations>")

    def __attrs_post_init__(self) -> None:
        _ConfirmationsHeader(
            package_sha256=self.package_sha256, factory=self.factory, lot_id=self.lot_id
        )
        _check_confirmations(sorted([k, v] for k, v in self.confirmations.items()))

    def with_more(self, more: Iterable[tuple[str, bytes]]) -> Confirmations:
        """These and ``more`` (device ids not yet present)."""
        merged = dict(self.confirmations)
        for device_id, conf in more:
            if device_id in merged:
                raise ConfirmationsFormatError(f"confirmations: chip {device_id} twice")
            merged[device_id] = conf
        return attrs.evolve(self, confirmations=merged)

    def to_bytes(self) -> bytes:
        header = _ConfirmationsHeader(
            package_sha256=self.package_sha256, factory=self.factory, lot_id=self.lot_id
        )
        return cbor.encode(
            {
                **fields.encode(header),
                "confirmations": [[k, self.confirmations[k]] for k in sorted(self.confirmations)],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Confirmations:
        try:
            raw = cbor.decode(data, what="confirmations", max_size=MAX_CONFIRMATIONS_SIZE)
        except FormatError as exc:
            raise ConfirmationsFormatError(str(exc)) from None
        rest, listed = split_body(
            raw, "confirmations", what="confirmations", error=ConfirmationsFormatError
        )
        entries = _check_confirmations(listed)
        header = fields.decode(_ConfirmationsHeader, rest)
        return cls(
            package_sha256=header.package_sha256,
            factory=header.factory,
            lot_id=header.lot_id,
            confirmations=entries,
        )


def _check_confirmations(raw: Any) -> dict[str, bytes]:
    if type(raw) is not list or len(raw) > MAX_LOT_CHIPS:
        raise ConfirmationsFormatError(
            f"confirmations: field 'confirmations' must be a list of at most {MAX_LOT_CHIPS}"
        )
    out: dict[str, bytes] = {}
    previous = ""
    for i, entry in enumerate(raw):
        if type(entry) is not list or len(entry) != 2:
            raise ConfirmationsFormatError(f"confirmations: entry {i} is not [device_id, bytes]")
        device_id, conf = entry
        if type(device_id) is not str or DEVICE_ID_RE.fullmatch(device_id) is None:
            raise ConfirmationsFormatError(f"confirmations: entry {i}: bad device id")
        if device_id <= previous:
            raise ConfirmationsFormatError(
                f"confirmations: chip {device_id} is listed twice or out of order"
            )
        previous = device_id
        if type(conf) is not bytes or not 1 <= len(conf) <= MAX_CONFIRMATION_SIZE:
            raise ConfirmationsFormatError(f"confirmations: chip {device_id}: bad confirmation")
        out[device_id] = conf
    return out
