"""Single-thread rates of the key backend next to raw python-pkcs11, from one run.

    python benchmarks/bench_hsm.py [--reps 7] [--scale 1.0] [--json]

Creates its own SoftHSM2 token directory (a temp dir, removed at the end), opens one token
through the library, and for each operation times the library call and the bare
python-pkcs11 call on the same session and the same kind of key, interleaved round by
round so machine noise hits both sides alike.  Prints each pair's median rate (ops/s over
``--reps`` rounds) and the ratio library/raw (1.00 = no overhead).

Pairs:
  sign      HsmPrivateKey.sign_digest (ECDSA P-256, DER out)  vs  key.sign(digest, ECDSA)
  ecdh      derive_aes + destroy                               vs  derive_key(ECDH1) + destroy
  ecb       derive_ecb + destroy                               vs  derive_key(AES_ECB_...) + destroy
  wrap      HsmSecretKey.wrap (AES-KWP)                        vs  wrap_key(AES_KEY_WRAP_PAD)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABEL = "bench"


def _rate(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def _pairs(token: Any) -> dict[str, tuple[int, Callable[[], Any], Callable[[], Any]]]:
    """name -> (ops per round, library call, raw python-pkcs11 call)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11 import KDF, Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    from securethread.hsm import (
        EPHEMERAL_AGREEMENT,
        SIGNING,
        TEMP_CONFIRM,
        TEMP_DERIVE,
        TEMP_WRAP,
        Curve,
        KeyPolicy,
        Usage,
        point_of,
    )
    from securethread.hsm.policy import private_template, public_template, secret_template

    session = token.session  # the library's own session: both sides use the same one
    digest = hashlib.sha256(b"device certificate tbs").digest()
    peer_point = point_of(ec.generate_private_key(ec.SECP256R1()).public_key())
    ecb_data = secrets.token_bytes(32)

    # --- library side
    signer = token.generate_ec("bench-signer", curve=Curve.P256, policy=SIGNING)
    eph = token.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    base = eph.derive_aes(peer_point, policy=TEMP_DERIVE)
    kek = token.generate_aes("", policy=TEMP_WRAP)
    movable = KeyPolicy(usage=Usage.ENCRYPT, transferable=True, persistent=False)
    target = token.generate_aes("", policy=movable)

    # --- raw side: python-pkcs11 objects made directly, same templates
    raw_signer = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="bench-signer")
    params = session.create_domain_parameters(
        KeyType.EC,
        {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        local=True,
    )
    _, raw_eph = params.generate_keypair(
        store=False,
        public_template=public_template(EPHEMERAL_AGREEMENT),
        private_template=private_template(EPHEMERAL_AGREEMENT),
    )
    derive_template = secret_template(TEMP_DERIVE)
    raw_base = raw_eph.derive_key(
        KeyType.AES,
        256,
        store=False,
        mechanism=Mechanism.ECDH1_DERIVE,
        mechanism_param=(KDF.NULL, None, peer_point),
        template=derive_template,
    )
    raw_kek = session.generate_key(
        KeyType.AES, 256, store=False, template=secret_template(TEMP_WRAP)
    )
    raw_target = session.generate_key(
        KeyType.AES, 256, store=False, template=secret_template(movable)
    )
    confirm_template = secret_template(TEMP_CONFIRM)

    def raw_ecdh() -> None:
        raw_eph.derive_key(
            KeyType.AES,
            256,
            store=False,
            mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(KDF.NULL, None, peer_point),
            template=derive_template,
        ).destroy()

    def raw_ecb() -> None:
        raw_base.derive_key(
            KeyType.AES,
            256,
            store=False,
            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
            mechanism_param=ecb_data,
            template=confirm_template,
        ).destroy()

    return {
        "sign": (
            2000,
            lambda: signer.sign_digest(digest),
            lambda: raw_signer.sign(digest, mechanism=Mechanism.ECDSA),
        ),
        "ecdh": (
            800,
            lambda: eph.derive_aes(peer_point, policy=TEMP_DERIVE).destroy(),
            raw_ecdh,
        ),
        "ecb": (
            1500,
            lambda: base.derive_ecb(ecb_data, policy=TEMP_CONFIRM).destroy(),
            raw_ecb,
        ),
        "wrap": (
            2000,
            lambda: kek.wrap(target),
            lambda: raw_kek.wrap_key(raw_target, mechanism=Mechanism.AES_KEY_WRAP_PAD),
        ),
    }


def run(reps: int, scale: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="securethread-bench-"))
    try:
        from softhsm_config import ensure_tokens

        user_pin = secrets.token_hex(8)
        tdir = ensure_tokens(root, [LABEL], pins={LABEL: (secrets.token_hex(8), user_pin)})
        tdir.activate()  # before the module is loaded in this process

        from securethread.hsm import open_token

        token = open_token(LABEL, pin=lambda label: user_pin)
        try:
            pairs = _pairs(token)
            results: dict[str, Any] = {}
            for name, (n, lib_fn, raw_fn) in pairs.items():
                n = max(10, int(n * scale))
                lib_fn(), raw_fn()  # warm up (handle caches, first-call costs)
                lib_rates, raw_rates = [], []
                for _ in range(reps):
                    lib_rates.append(_rate(lib_fn, n))
                    raw_rates.append(_rate(raw_fn, n))
                lib, raw = statistics.median(lib_rates), statistics.median(raw_rates)
                results[name] = {
                    "library_per_s": round(lib, 1),
                    "raw_per_s": round(raw, 1),
                    "ratio": round(lib / raw, 3),
                    "ops_per_round": n,
                }
        finally:
            token.close()
        return {
            "benchmark": "bench_hsm",
            "token": "SoftHSM2 (temp dir)",
            "reps": reps,
            "statistic": "median ops/s",
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "results": results,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="rounds per pair (median taken)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply ops per round")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = run(args.reps, args.scale)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"single-thread rates, median of {args.reps} rounds "
        f"(load average {report['load_average_1m']} on {report['cpus']} CPUs)"
    )
    print(f"{'operation':<36}{'library/s':>12}{'raw/s':>12}{'lib/raw':>9}")
    names = {
        "sign": "ECDSA P-256 sign (sign_digest)",
        "ecdh": "ECDH derive_aes + destroy",
        "ecb": "AES-ECB derive_ecb + destroy",
        "wrap": "AES-KWP wrap",
    }
    for key, r in report["results"].items():
        print(
            f"{names[key]:<36}{r['library_per_s']:>12,.0f}{r['raw_per_s']:>12,.0f}"
            f"{r['ratio']:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
