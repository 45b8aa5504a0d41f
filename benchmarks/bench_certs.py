"""Device certificates per second: the library vs the HSM floor vs an openssl + libp11 loop.

All three sign with the same P-256 production CA key in the same SoftHSM token, in one run:

* library: ``DeviceCertificateIssuer.issue`` (DER template + one in-token ECDSA signature);
* floor:   N bare ECDSA signatures with that key through python-pkcs11 (the token's rate);
* peer:    the factory shell loop of docs/hsm.md -- per device ``openssl ecparam
  -genkey``, ``openssl req -new``, ``openssl x509 -req`` signing through the pkcs11 engine.

Usage: python benchmarks/bench_certs.py --n 500 [--peer-n 30]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
TOKEN = "bench"


def _engine_conf(path: Path, module: str) -> Path:
    conf = path / "engine.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nengines = engine_section\n"
        "[engine_section]\npkcs11 = pkcs11_section\n"
        "[pkcs11_section]\nengine_id = pkcs11\n"
        f"dynamic_path = {ENGINE}\nMODULE_PATH = {module}\ninit = 0\n"
    )
    return conf


def _peer(work: Path, n: int, *, module: str, pca_pem: Path, label: str, pin: str) -> float:
    """The openssl + libp11 engine loop; returns seconds for ``n`` certificates."""
    conf = _engine_conf(work, module)
    ext = work / "device.ext"
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyAgreement\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
    )
    plain_env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    engine_env = dict(plain_env, OPENSSL_CONF=str(conf))  # only for the signing command
    uri = f"pkcs11:token={TOKEN};object={label};type=private;pin-value={pin}"
    key, csr, out = work / "dev.key", work / "dev.csr", work / "dev.pem"

    def run(cmd: list[str], env: dict[str, str]) -> None:
        subprocess.run(cmd, env=env, check=True, capture_output=True)

    start = time.perf_counter()
    for i in range(n):
        run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
            plain_env)  # fmt: skip
        run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/O=securethread/CN={i:016x}",
             "-out", str(csr)], plain_env)  # fmt: skip
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pca_pem),
             "-CAkeyform", "engine", "-engine", "pkcs11", "-CAkey", uri,
             "-set_serial", str(i + 1), "-days", "30", "-sha256",
             "-extfile", str(ext), "-out", str(out)], engine_env)  # fmt: skip
    elapsed = time.perf_counter() - start
    # the peer's last certificate must really chain to the production CA
    subprocess.run(
        ["openssl", "verify", "-partial_chain", "-CAfile", str(pca_pem), str(out)],
        env=plain_env, check=True, capture_output=True,
    )  # fmt: skip
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="certificates for library and floor")
    parser.add_argument("--peer-n", type=int, default=30, help="certificates for the openssl loop")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from softhsm_config import ensure_tokens

    with tempfile.TemporaryDirectory(prefix="bench-certs-") as tmp:
        work = Path(tmp)
        so_pin, pin = secrets.token_hex(8), secrets.token_hex(8)
        ensure_tokens(work / "hsm", [TOKEN], pins={TOKEN: (so_pin, pin)}).activate()
        os.environ[f"SECURETHREAD_PIN_{TOKEN.upper()}"] = pin

        from cryptography.hazmat.primitives.asymmetric import ec
        from pkcs11 import Attribute, Mechanism, ObjectClass

        from securethread.hsm import default_module_path, open_token
        from securethread.pki import (
            DeviceCertificateIssuer,
            DeviceProfile,
            certify_production_ca,
            create_production_ca_csr,
            create_root_ca,
            install_certificate,
            to_pem,
            validate_device_chain,
        )

        module = os.path.realpath(default_module_path())
        tok = open_token(TOKEN)
        root = create_root_ca(tok, label="root")
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        pca = certify_production_ca(
            tok.private_key("root"),
            root,
            create_production_ca_csr(tok, label="pca", job_id="bench-job"),
            job_id="bench-job",
            not_before=now,
        )
        install_certificate(tok, "pca", pca)
        pca_pem = work / "pca.pem"
        pca_pem.write_bytes(to_pem(pca))
        issuer = DeviceCertificateIssuer(
            tok.private_key("pca"),
            pca,
            job_id="bench-job",
            job_tag=hashlib.sha256(b"bench signed job").digest(),
            profile=DeviceProfile(organisation="securethread bench"),
        )
        n = args.n
        keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(n)]
        ids = [f"{i:016x}" for i in range(n)]
        issuer.issue(keys[0], ids[0], 0)  # warm-up: handle lookup, first session use

        start = time.perf_counter()
        certs = [issuer.issue(keys[i], ids[i], i) for i in range(n)]
        t_lib = time.perf_counter() - start
        validate_device_chain(certs[-1], pca, root, job_id="bench-job")
        assert len({c.serial_number for c in certs}) == n

        # HSM floor: the same token key, bare python-pkcs11 C_Sign calls on SHA-256 digests.
        key_obj = tok.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="pca")
        digests = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]
        assert key_obj[Attribute.SIGN]
        start = time.perf_counter()
        for d in digests:
            key_obj.sign(d, mechanism=Mechanism.ECDSA)
        t_floor = time.perf_counter() - start

        t_peer = _peer(work, args.peer_n, module=module, pca_pem=pca_pem, label="pca", pin=pin)
        tok.close()

    lib, floor, peer = n / t_lib, n / t_floor, args.peer_n / t_peer
    print(f"device certificates, P-256 CA key in SoftHSM, n={n} (peer n={args.peer_n})")
    print(f"  library  DeviceCertificateIssuer : {lib:10.1f} certs/s")
    print(f"  floor    bare C_Sign (pkcs11)    : {floor:10.1f} signs/s")
    print(f"  peer     openssl + libp11 loop   : {peer:10.1f} certs/s")
    print(f"  library / peer  = {lib / peer:8.1f}x   (target >= 30x)")
    print(f"  library / floor = {lib / floor:8.1%}   (target >= 60%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
