"""What a device gets from a key the programmer holds: the one use the programmer's copy of an
image key has (PROGRAMMER_IMAGE_KEY: no usage, extractable only to be wrapped).

Tests that used to decrypt with the programmer's copy to show it is the OEM's key now license
it to a fresh software device key, exactly as the license hot path does (ECDH -> AES-ECB KEK ->
AES-KWP wrap, ``agree_and_wrap``), and open the license as the device would.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securethread.keys import EPHEMERAL_AGREEMENT, Curve, KeyBackend, SecretKey


def licensed_value(backend: KeyBackend, key: SecretKey) -> bytes:
    """The 32 key bytes a device unwraps from a license of ``key`` made in ``backend``.

    The backend's agreement key is a session key made here and destroyed; the device side is
    plain ``cryptography`` (SP 800-56A ECDH, CKD_NULL truncation, AES-ECB KEK, RFC 5649).
    """
    ka = backend.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    try:
        device = ec.generate_private_key(ec.SECP256R1())
        kdf_input = os.urandom(32)
        wrapped = ka.agree_and_wrap(device.public_key(), kdf_input, key)
        z = device.exchange(ec.ECDH(), ka.public_key())
    finally:
        ka.destroy()
    enc = Cipher(algorithms.AES(z[-32:]), modes.ECB()).encryptor()
    kek = enc.update(kdf_input) + enc.finalize()
    return keywrap.aes_key_unwrap_with_padding(kek, wrapped)
