"""The OEM's OCSP responder request (OEM -> programmer, in the job package).

At issue-job the OEM generates the job's OCSP responder key in its token and asks the job's
production CA -- whose key is in the programmer's token -- to certify it as its delegated
responder (RFC 6960 §4.2.2.2).  The request is an envelope of kind ``ocsp-responder-request``
signed by the OEM root key, which the programmer pinned at onboarding; its body binds the
CSR to the job::

    {"v": 2, "job_id": tstr, "job_sha256": bstr(32), "csr": bstr (PKCS#10 DER)}

Without the root's signature anyone on the path could slip in a key of their own and get it
certified to answer "good" for the job's devices; without ``job_sha256`` a request of one
job could be replayed into another.  Exactly one signature entry, the root's.

The answer travels back as a plain certificate (``outbox/ocsp-responder-<job>.pem``): it
authenticates itself (the production CA signed it) and the OEM checks it certifies the key
it generated (``oem install-responder``).
"""

from __future__ import annotations

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.formats import envelope, fields
from securethread.formats.job import JOB_ID_RE
from securethread.keys.protocol import PrivateKey

__all__ = ["RESPONDER_REQUEST_KIND", "ResponderRequest"]

RESPONDER_REQUEST_KIND = "ocsp-responder-request"
VERSION = 2
MAX_SIZE = 4096


@fields.body("OCSP responder request")
@attrs.frozen
class ResponderRequest:
    """A root-signed request: certify ``csr``'s key as job ``job_id``'s OCSP responder."""

    job_id: str = fields.text("job_id", max_len=64, pattern=JOB_ID_RE)
    job_sha256: bytes = fields.byte_string("job_sha256", size=32)
    csr: bytes = fields.byte_string("csr", min_len=1, max_len=2048)  # DER
    version: int = fields.version(VERSION)

    def seal(self, root_key: PrivateKey) -> bytes:
        return envelope.seal(RESPONDER_REQUEST_KIND, fields.encode(self), [root_key])

    def certificate_request(self) -> x509.CertificateSigningRequest:
        from securethread.pki import load_csr

        return load_csr(self.csr)

    @classmethod
    def open(cls, data: bytes, *, oem_root: ec.EllipticCurvePublicKey) -> ResponderRequest:
        """Verify under the OEM root key, then parse (S2: nothing is read before)."""
        body = envelope.open_envelope(
            data, kind=RESPONDER_REQUEST_KIND, keys=oem_root, max_size=MAX_SIZE
        )
        return fields.decode(cls, body)
