"""The artefacts of a production job (flow 6) as they cross between the parties.

* **Production-CA request** (programmer -> OEM, ``production-ca-request``): the job id and
  the CSR of a production-CA key the programmer generated in its token for that job, in an
  envelope signed by the programmer's identity key (which the OEM certified at onboarding).
* **Job package** (OEM -> programmer, ``job-package``): the signed job, the production-CA
  certificate, the signed manifest, the device-trust statement
  (:mod:`securethread.formats.device_trust`) the chips will check, and the certificates of
  the silicon-vendor CAs the job names.  The package itself carries no signature: each part
  authenticates itself (officers sign the job, which names the vendor CAs by the hash of
  their keys; the OEM root the CA certificate and the device-trust statement, the
  firmware-signing key the manifest) and the programmer verifies each before using it.
  The encrypted image travels beside it as its own file; the manifest's digest binds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError
from securethread.formats import cbor, envelope
from securethread.formats.job import MAX_VENDORS
from securethread.keys.protocol import PrivateKey

CA_REQUEST_KIND = "production-ca-request"
JOB_PACKAGE_KIND = "job-package"
JOB_PACKAGE_VERSION = 2  # 2: the vendor CA certificates
MAX_PACKAGE = 1 << 20
MAX_VENDOR_CERT = 4096


def _exact(body: Mapping[str, Any], keys: set[str], what: str) -> None:
    if set(body) != keys:
        raise FormatError(f"{what}: expected fields {sorted(keys)}, got {sorted(body)}")


def _bytes(value: object, what: str, *, limit: int) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise FormatError(f"{what} must be 1-{limit} bytes")
    return value


@attrs.frozen
class ProductionCARequest:
    """A programmer asks the OEM to certify a production CA for job ``job_id``."""

    programmer: str
    job_id: str
    csr: bytes  # DER

    def seal(self, identity_key: PrivateKey) -> bytes:
        body = {"programmer": self.programmer, "job": self.job_id, "csr": self.csr}
        return envelope.seal(CA_REQUEST_KIND, body, [identity_key])

    def certificate_request(self) -> x509.CertificateSigningRequest:
        from securethread.pki import load_csr

        return load_csr(self.csr)

    @classmethod
    def open(cls, data: bytes, *, programmer_key: ec.EllipticCurvePublicKey) -> ProductionCARequest:
        """Verify under the programmer's certified identity key, then parse."""
        body = envelope.open_envelope(data, kind=CA_REQUEST_KIND, keys=programmer_key)
        _exact(body, {"programmer", "job", "csr"}, "production-CA request")
        programmer, job_id = body["programmer"], body["job"]
        if not isinstance(programmer, str) or not isinstance(job_id, str):
            raise FormatError("production-CA request: programmer and job must be text")
        return cls(programmer, job_id, _bytes(body["csr"], "production-CA CSR", limit=4096))

    @staticmethod
    def peek_programmer(data: bytes) -> str:
        """The programmer the request claims to come from (unverified: to find its key)."""
        body = envelope.peek_body(data)[1]
        name = body.get("programmer")
        if not isinstance(name, str):
            raise FormatError("production-CA request: no programmer name")
        return name


@attrs.frozen
class JobPackage:
    """Signed job, production-CA certificate (DER), signed manifest, device-trust statement,
    vendor CA certificates (DER, in the order of the job's ``vendors``) and, from an OEM
    that runs an OCSP responder, its root-signed responder request
    (:mod:`securethread.formats.responder`; absent: the package has no such field):
    unverified until each part is checked by its user."""

    job: bytes
    production_ca: bytes
    manifest: bytes
    device_trust: bytes
    vendors: tuple[bytes, ...]
    ocsp_responder: bytes | None = None

    def to_bytes(self) -> bytes:
        outer = {
            "kind": JOB_PACKAGE_KIND,
            "v": JOB_PACKAGE_VERSION,
            "job": self.job,
            "production-ca": self.production_ca,
            "manifest": self.manifest,
            "device-trust": self.device_trust,
            "vendors": list(self.vendors),
        }
        if self.ocsp_responder is not None:
            outer["ocsp-responder"] = self.ocsp_responder
        return cbor.encode(outer)

    @classmethod
    def from_bytes(cls, data: bytes) -> JobPackage:
        """Split a package into its parts; each part is verified by the one who uses it."""
        outer = cbor.decode(data, what="job package", max_size=MAX_PACKAGE)
        if not isinstance(outer, dict) or outer.get("kind") != JOB_PACKAGE_KIND:
            raise FormatError("not a job package")
        fields = {"kind", "v", "job", "production-ca", "manifest", "device-trust", "vendors"}
        _exact(outer, fields | ({"ocsp-responder"} & set(outer)), "job package")
        if type(outer["v"]) is not int or outer["v"] != JOB_PACKAGE_VERSION:
            raise FormatError(f"job package: unsupported version {outer['v']!r}")
        vendors = outer["vendors"]
        if not isinstance(vendors, list) or not 1 <= len(vendors) <= MAX_VENDORS:
            raise FormatError(f"job package: vendors must list 1..{MAX_VENDORS} certificates")
        return cls(
            job=_bytes(outer["job"], "job package: job", limit=MAX_PACKAGE),
            production_ca=_bytes(outer["production-ca"], "job package: production CA", limit=8192),
            manifest=_bytes(outer["manifest"], "job package: manifest", limit=64 << 10),
            device_trust=_bytes(outer["device-trust"], "job package: device trust", limit=4096),
            vendors=tuple(
                _bytes(v, "job package: vendor CA certificate", limit=MAX_VENDOR_CERT)
                for v in vendors
            ),
            ocsp_responder=(
                _bytes(outer["ocsp-responder"], "job package: OCSP responder request", limit=4096)
                if "ocsp-responder" in outer
                else None
            ),
        )
