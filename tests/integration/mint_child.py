"""Mint a device certificate off the ledger, as the threat model's programmer PIN holder
could: the production-CA key in the programmer's token signs a certificate no ledger record
holds.  ``python -m tests.integration.mint_child FACTORY JOB TEMPLATE SERIAL OUT_CERT OUT_KEY``.

The new certificate copies ``TEMPLATE`` (a ledgered device certificate of the job: subject,
validity, extensions) for a fresh key; ``SERIAL`` is ``twin`` (the template's own serial: a
restored store issuing a slot again) or a slot number (that slot's job-bound serial).  It
runs in its own process: the factory's token directory is the only one it loads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securethread.pki.serial import parse_device_serial, serial_from_tag
from securethread.programmer import layout as L


def main(
    factory: str, job_id: str, template: str, serial: str, out_cert: str, out_key: str
) -> None:
    work = L.open_programmer(factory)
    token = work.open_token(L.TOKEN)
    label = L.production_ca_label(job_id)
    ca_key = token.private_key(label)
    tpl = x509.load_pem_x509_certificate(Path(template).read_bytes())
    if serial == "twin":
        number = tpl.serial_number
    else:
        number = serial_from_tag(parse_device_serial(tpl.serial_number).job_tag, int(serial))
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(tpl.subject)
        .issuer_name(tpl.issuer)
        .public_key(key.public_key())
        .serial_number(number)
        .not_valid_before(tpl.not_valid_before_utc)
        .not_valid_after(tpl.not_valid_after_utc)
    )
    for ext in tpl.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        b = b.add_extension(value, critical=ext.critical)
    cert = b.sign(ca_key.as_cryptography(), hashes.SHA256())
    Path(out_cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(out_key).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:7])
