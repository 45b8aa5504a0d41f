"""Test-only entry: the library's token work through one PKCS#11 module, in a process of its own.

``python -m tests.integration.p11kit_probe MODULE TOKEN PIN [--derive]``

Opens TOKEN through MODULE (p11-kit-client.so, p11-kit-proxy.so, SoftHSM), then as a
programming centre and an OEM would: creates a root CA and a job's production CA in the
token, issues a device certificate with DeviceCertificateIssuer and a CRL revoking it (every
signature made in the token), signs from four threads at once (the module must be safe to
share: CKF_OS_LOCKING_OK, docs/hsm.md), and with ``--derive`` makes a license key wrap
(ECDH -> KEK -> RFC 5649 wrap, ``agree_and_wrap``) that the simulated device unwraps in
software and checks against the token's image key.  Prints one JSON object: what was done,
the PEMs, and for a refused step the error's type and message.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import threading
import uuid
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from securethread.errors import Error
from securethread.hsm import open_token
from securethread.hsm.module import shares_function_table
from securethread.keys.policy import IMAGE_KEY, KEY_AGREEMENT, SIGNING, Curve
from securethread.pki import (
    DeviceCertificateIssuer,
    DeviceProfile,
    certify_production_ca,
    create_production_ca_csr,
    create_root_ca,
    revoke_devices,
    to_pem,
    validate_device_chain,
)


def _pki(token: Any, tag: str) -> dict[str, Any]:
    root = create_root_ca(token, label=f"root-{tag}", organisation="p11-kit OEM")
    csr = create_production_ca_csr(token, label=f"pca-{tag}", job_id=f"job-{tag}")
    pca = certify_production_ca(
        token.private_key(f"root-{tag}"),
        root,
        csr,
        job_id=f"job-{tag}",
        not_before=root.not_valid_before_utc,
    )
    profile = DeviceProfile(
        organisation="p11-kit OEM", uri_template="https://devices.example.com/{device_id}"
    )
    issuer = DeviceCertificateIssuer(
        token.private_key(f"pca-{tag}"),
        pca,
        job_id=f"job-{tag}",
        job_tag=hashlib.sha256(tag.encode()).digest(),
        profile=profile,
    )
    chip = ec.generate_private_key(ec.SECP256R1())
    device = issuer.issue(chip.public_key(), "00000000000000a1", 0)
    validate_device_chain(device, pca, root, job_id=f"job-{tag}", profile=profile)
    crl = revoke_devices(
        token.private_key(f"pca-{tag}"), pca, [device], reason=x509.ReasonFlags.key_compromise
    )
    return {
        "root": to_pem(root).decode(),
        "pca": to_pem(pca).decode(),
        "device": to_pem(device).decode(),
        "crl": crl.decode(),
    }


def _threads(token: Any, tag: str) -> int:
    """Four threads, 300 signatures each, on one token; returns how many failed."""
    key = token.generate_ec(f"threads-{tag}", curve=Curve.P256, policy=SIGNING)
    public = key.public_key()
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(300):
                data = f"{n}:{i}".encode()
                public.verify(key.sign(data), data, ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:  # noqa: BLE001 - counted and reported
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(failures)


def _derive(token: Any, tag: str) -> dict[str, Any]:
    """A license's key wrap in the token; the device side in software must recover the key
    the token encrypts with."""
    agreement = token.generate_ec(f"ka-{tag}", curve=Curve.P256, policy=KEY_AGREEMENT)
    image_key = token.generate_aes(f"image-{tag}", policy=IMAGE_KEY)
    chip = ec.generate_private_key(ec.SECP256R1())
    kdf_input = os.urandom(32)
    wrapped = agreement.agree_and_wrap(chip.public_key(), kdf_input, image_key)
    # the device: Z = ECDH(chip, agreement key), KEK = AES-ECB(Z, kdf_input), unwrap
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    z = chip.exchange(ec.ECDH(), agreement.public_key())
    enc = Cipher(algorithms.AES(z), modes.ECB()).encryptor()
    kek = enc.update(kdf_input) + enc.finalize()
    key = aes_key_unwrap_with_padding(kek, wrapped)
    nonce = os.urandom(12)
    sealed = image_key.encrypt_gcm(nonce, b"firmware block", b"")
    return {"wrapped": len(wrapped), "opens": AESGCM(key).decrypt(nonce, sealed, b"") == (
        b"firmware block"
    )}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("module")
    ap.add_argument("token")
    ap.add_argument("pin")
    ap.add_argument("--derive", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    token = open_token(args.token, module_path=args.module, pin=lambda label: args.pin)
    tag = uuid.uuid4().hex[:8]
    out["pki"] = _pki(token, tag)
    out["thread_failures"] = _threads(token, tag)
    try:
        out["derive"] = _derive(token, tag)
    except Error as exc:
        if args.derive:
            raise
        out["derive_refused"] = {"type": type(exc).__name__, "message": str(exc)}
    out["labels"] = token.labels()
    out["shares_table"] = shares_function_table(args.module)
    out["at"] = datetime.datetime.now(datetime.UTC).isoformat()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
