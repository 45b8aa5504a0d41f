"""The artefacts of a production job (flow 6) as they cross between the parties.

* **Production-CA request** (programmer -> OEM, ``production-ca-request``): the job id and
  the CSR of a production-CA key the programmer generated in its token for that job, in an
  envelope signed by the programmer's identity key (which the OEM certified at onboarding).
* **Job package** (OEM -> programmer, ``job-package``): the signed job, the production-CA
  certificate, the signed manifest (none for a provisioning job), the device-trust statement
  (:mod:`securethread.formats.device_trust`) the chips will check, and the certificates of
  the silicon-vendor CAs the job names.  The package itself carries no signature: each part
  authenticates itself (officers sign the job, which names the vendor CAs by the hash of
  their keys; the OEM root the CA certificate and the device-trust statement, the
  firmware-signing key the manifest) and the programmer verifies each before using it.
  The encrypted image travels beside it as its own file; the manifest's digest binds it.
"""

from __future__ import annotations

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.errors import FormatError
from securethread.formats import cbor, envelope, fields
from securethread.formats.job import JOB_ID_RE, MAX_PROVISIONED_BY, MAX_VENDORS
from securethread.keys.protocol import PrivateKey

CA_REQUEST_KIND = "production-ca-request"
JOB_PACKAGE_KIND = "job-package"
JOB_PACKAGE_VERSION = 3  # 3: COSE parts (issue 21); 2: the vendor CA certificates
MAX_PACKAGE = 1 << 20
MAX_VENDOR_CERT = 4096


#: A party name as the work directory allows it (securethread.workdir.check_name).
PARTY_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"


@fields.body("production-CA request")
@attrs.frozen
class ProductionCARequest:
    """A programmer asks the OEM to certify a production CA for job ``job_id``."""

    programmer: str = fields.text("programmer", max_len=64, pattern=PARTY_NAME)
    job_id: str = fields.text("job", max_len=64, pattern=JOB_ID_RE)
    csr: bytes = fields.byte_string("csr", min_len=1, max_len=4096)  # DER

    def seal(self, identity_key: PrivateKey) -> bytes:
        return envelope.seal(CA_REQUEST_KIND, fields.encode(self), [identity_key])

    def certificate_request(self) -> x509.CertificateSigningRequest:
        from securethread.pki import load_csr

        return load_csr(self.csr)

    @classmethod
    def open(cls, data: bytes, *, programmer_key: ec.EllipticCurvePublicKey) -> ProductionCARequest:
        """Verify under the programmer's certified identity key, then parse."""
        body = envelope.open_envelope(data, kind=CA_REQUEST_KIND, keys=programmer_key)
        return fields.decode(cls, body)

    @staticmethod
    def peek_programmer(data: bytes) -> str:
        """The programmer the request claims to come from (unverified: to find its key)."""
        body = envelope.peek_body(data)[1]
        name = body.get("programmer")
        if not isinstance(name, str):
            raise FormatError("production-CA request: no programmer name")
        return name


@fields.body("job package")
@attrs.frozen(kw_only=True)
class JobPackage:
    """Signed job, production-CA certificate (DER; none for a "program" job), signed
    manifest, device-trust statement, vendor CA certificates (DER, in the order of the job's
    ``vendors``), a "program" job's ``provisioned_by`` CA certificates and, from an OEM
    that runs an OCSP responder, its root-signed responder request
    (:mod:`securethread.formats.responder`; absent: the package has no such field):
    unverified until each part is checked by its user."""

    job: bytes = fields.byte_string("job", min_len=1, max_len=MAX_PACKAGE)
    #: The production-CA certificate; absent iff a "program" job (it issues no certificate).
    production_ca: bytes | None = fields.byte_string(
        "production-ca", min_len=1, max_len=8192, absent=fields.Absent.OMIT
    )
    #: The signed manifest; absent iff the job is a "provision" job (it names no image).
    manifest: bytes | None = fields.byte_string(
        "manifest", min_len=1, max_len=64 << 10, absent=fields.Absent.OMIT
    )
    device_trust: bytes = fields.byte_string("device-trust", min_len=1, max_len=4096)
    vendors: tuple[bytes, ...] = fields.list_of(
        "vendors", fields.bytes_rule(min_len=1, max_len=MAX_VENDOR_CERT),
        max_len=MAX_VENDORS,  # none for a "program" job: the job names none
    )  # fmt: skip
    ocsp_responder: bytes | None = fields.byte_string(
        "ocsp-responder", min_len=1, max_len=4096, absent=fields.Absent.OMIT
    )
    #: A "program" job: the DER production-CA certificates of the provisioning jobs whose
    #: chips it accepts, in the order of the job's ``provisioned_by`` hashes (none otherwise).
    provisioned_by: tuple[bytes, ...] = fields.list_of(
        "provisioned-by", fields.bytes_rule(min_len=1, max_len=8192),
        max_len=MAX_PROVISIONED_BY, default=(),
    )  # fmt: skip
    kind: str = fields.constant("kind", JOB_PACKAGE_KIND)
    version: int = fields.version(JOB_PACKAGE_VERSION)

    def to_bytes(self) -> bytes:
        return cbor.encode(fields.encode(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> JobPackage:
        """Split a package into its parts; each part is verified by the one who uses it."""
        outer = cbor.decode(data, what="job package", max_size=MAX_PACKAGE)
        if not isinstance(outer, dict) or outer.get("kind") != JOB_PACKAGE_KIND:
            raise FormatError("not a job package")
        return fields.decode(cls, outer)
