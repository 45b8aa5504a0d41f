"""Image encryption throughput in the token next to its baselines, and peak memory, one run.

    python benchmarks/bench_image.py [--size-mib 64] [--reps 3] [--peak-sizes 64,512] [--json]

Creates its own SoftHSM2 token directory (a temp dir, removed at the end) and an image key in
it.  For the same ``--size-mib`` of random data in 1 MiB chunks, interleaved round by round
(median of ``--reps``):

  encrypt_image    the library: token AES-GCM per chunk + SHA-256 of plaintext and ciphertext
                   (overlapped on a worker thread) + header/AAD/nonce handling
  token raw        bare python-pkcs11 ``key.encrypt(chunk, AES_GCM)`` per 1 MiB chunk, no hashing:
                   the token's own single-call rate, the target's denominator (>= 80 %)
  cryptography     ``AESGCM.encrypt`` on the same chunks (what a software key would do)
  decrypt_image    the device side: cryptography AES-GCM + both digests, manifest checked
  master_image     the OEM step: the MCUboot image built around the data and signed by a P-256
                   key in the token (SHA-256 + one CKM_ECDSA), then encrypt_image and the manifest
  mcuboot_verify   the SBM's check of the decrypted MCUboot image: strict parse, SHA-256 TLV,
                   key hash and ECDSA verification (cryptography)

Peak memory: each of ``--peak-sizes`` runs in a fresh subprocess that streams a generated image
of that size through encrypt_image (token) to a file, then decrypt_image (software key, the
device path) to a discarding sink; it reports ru_maxrss growth over its baseline after setup.
Output is discarded (encrypt) or a file in the temp dir, so the figures are the pipeline's.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABEL = "bench-image"
MIB = 1 << 20


class _Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


class _Pattern(io.RawIOBase):
    """``size`` bytes generated on the fly (a 1 MiB random block with a per-block counter)."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._n = 0
        self._block = os.urandom(MIB)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._left, MIB)
        if n <= 0:
            return 0
        b[:8] = self._n.to_bytes(8, "big")[: min(8, n)]
        if n > 8:
            b[8:n] = self._block[8:n]
        self._left -= n
        self._n += 1
        return n


def _known_token_key(token: Any) -> tuple[Any, bytes]:
    """An IMAGE_KEY in the token whose bytes we know (imported via an ECDH-derived KEK), so
    the device side can decrypt with `cryptography`.  Benchmark/test-only import path."""
    from cryptography.hazmat.primitives import keywrap
    from cryptography.hazmat.primitives.asymmetric import ec

    from securethread.hsm import EPHEMERAL_AGREEMENT, IMAGE_KEY, Curve, KeyPolicy, Usage

    value = os.urandom(32)
    sw = ec.generate_private_key(ec.SECP256R1())
    eph = token.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    kek = eph.derive_aes(sw.public_key(), policy=KeyPolicy(usage=Usage.WRAP, persistent=False))
    shared = sw.exchange(ec.ECDH(), eph.public_key())[-32:]
    label = f"{LABEL}-{secrets.token_hex(4)}"
    key = kek.unwrap(
        keywrap.aes_key_wrap_with_padding(shared, value),
        label=label,
        key_id=os.urandom(16),
        policy=IMAGE_KEY,
    )
    kek.destroy()
    eph.destroy()
    return key, value


def _encrypt(src: Any, dst: Any, key: Any) -> Any:
    from securethread.formats.image import encrypt_image

    return encrypt_image(
        src,
        dst,
        key=key,
        image_id="bench",
        image_version="1",
        security_counter=1,
        device_class="bench",
    )


def _throughput(token: Any, size_mib: int, reps: int) -> dict[str, Any]:
    import pkcs11
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from securethread.formats.image import AesGcmKey, decrypt_image, master_image
    from securethread.formats.mcuboot import ImageVersion, build_image, verify_image
    from securethread.hsm import SIGNING, Curve

    key, value = _known_token_key(token)
    raw_key = token.session.get_key(object_class=ObjectClass.SECRET_KEY, label=key.label)
    assert raw_key[Attribute.SENSITIVE]
    soft = AesGcmKey(value, key_id=key.key_id)
    aead = AESGCM(value)
    data = os.urandom(size_mib * MIB)
    chunks = [data[i : i + MIB] for i in range(0, len(data), MIB)]
    nonce_prefix = os.urandom(8)
    aad = os.urandom(61)

    def raw_token() -> None:
        for i, c in enumerate(chunks):
            raw_key.encrypt(
                c,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=pkcs11.GCMParams(nonce_prefix + i.to_bytes(4, "big"), aad, 128),
            )

    def crypto() -> None:
        for i, c in enumerate(chunks):
            aead.encrypt(nonce_prefix + i.to_bytes(4, "big"), c, aad)

    def library() -> None:
        _encrypt(io.BytesIO(data), _Null(), key)

    enc = io.BytesIO()
    manifest = _encrypt(io.BytesIO(data), enc, key)
    blob = enc.getvalue()

    def device() -> None:
        decrypt_image(io.BytesIO(blob), _Null(), key=soft, manifest=manifest)  # type: ignore[arg-type]

    fw = token.generate_ec(f"{LABEL}-fw-{secrets.token_hex(4)}", curve=Curve.P256, policy=SIGNING)
    signed = build_image(data, signer=fw, version=ImageVersion(1), security_counter=1)

    def master() -> None:
        master_image(
            io.BytesIO(data), _Null(), image_key=key, signing_key=fw, image_id="bench",  # type: ignore[arg-type]
            image_version="1", security_counter=1, device_class="bench",
        )  # fmt: skip

    def mcuboot() -> None:
        verify_image(signed, key=fw.public_key())

    sides = {
        "encrypt_image": library,
        "token_raw": raw_token,
        "cryptography": crypto,
        "decrypt_image": device,
        "master_image": master,
        "mcuboot_verify": mcuboot,
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    library()  # warm up
    raw_token()
    for _ in range(reps):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rates = {k: size_mib / statistics.median(v) for k, v in times.items()}
    token.destroy(key.label)
    token.destroy(fw.label)
    return {
        "size_mib": size_mib,
        "reps": reps,
        "mib_per_s": {k: round(v, 1) for k, v in rates.items()},
        "encrypt_image/token_raw": round(rates["encrypt_image"] / rates["token_raw"], 3),
        "encrypt_image/cryptography": round(rates["encrypt_image"] / rates["cryptography"], 4),
        "token_raw/cryptography": round(rates["token_raw"] / rates["cryptography"], 4),
        "master_image/encrypt_image": round(rates["master_image"] / rates["encrypt_image"], 3),
    }


def _reset_peak() -> None:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0, /proc/self/clear_refs "5").

    Needed because ru_maxrss after fork+exec still carries the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _maxrss_mib() -> float:
    """Peak RSS since the last :func:`_reset_peak` (VmHWM), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child_peak(size_mib: int, workdir: str) -> dict[str, Any]:
    """Runs in a fresh process: RSS growth of encrypt (token) and decrypt (software)."""
    from securethread.formats.image import AesGcmKey, decrypt_image
    from securethread.hsm import open_token

    token = open_token(LABEL)
    key, value = _known_token_key(token)
    soft = AesGcmKey(value, key_id=key.key_id)
    # warm everything up on a small image, so the baseline includes code and thread pools
    tiny = io.BytesIO()
    m = _encrypt(io.BytesIO(os.urandom(3 * MIB)), tiny, key)
    decrypt_image(io.BytesIO(tiny.getvalue()), _Null(), key=soft, manifest=m)  # type: ignore[arg-type]
    del tiny
    _reset_peak()
    base = _maxrss_mib()
    path = Path(workdir) / f"image-{size_mib}.enc"
    t = time.perf_counter()
    with open(path, "wb") as f:
        m = _encrypt(_Pattern(size_mib * MIB), f, key)
    enc_s = time.perf_counter() - t
    after_enc = _maxrss_mib()
    sha = hashlib.sha256()

    class _Hash(_Null):
        def write(self, b: Any) -> int:
            sha.update(b)
            return len(b)

    _reset_peak()
    base_dec = _maxrss_mib()
    t = time.perf_counter()
    with open(path, "rb") as src:
        decrypt_image(src, _Hash(), key=soft, manifest=m)  # type: ignore[arg-type]
    dec_s = time.perf_counter() - t
    after_dec = _maxrss_mib()
    assert sha.digest() == m.plaintext_sha256
    path.unlink()
    token.destroy(key.label)
    return {
        "size_mib": size_mib,
        "baseline_rss_mib": round(base, 1),
        "encrypt_rss_growth_mib": round(after_enc - base, 1),
        "decrypt_rss_growth_mib": round(after_dec - base_dec, 1),
        "encrypt_mib_per_s": round(size_mib / enc_s, 1),
        "decrypt_mib_per_s": round(size_mib / dec_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-sizes", default="64,512")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child-peak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_peak:
        print(json.dumps(_child_peak(args.child_peak, args.workdir)))
        return 0

    root = Path(tempfile.mkdtemp(prefix="securethread-bench-image-"))
    try:
        from softhsm_config import ensure_tokens

        user_pin = secrets.token_hex(8)
        tdir = ensure_tokens(root, [LABEL], pins={LABEL: (secrets.token_hex(8), user_pin)})
        tdir.activate()  # before the module is loaded in this process
        from securethread.hsm import env_var_for, open_token

        env = {**os.environ, env_var_for(LABEL): user_pin}  # inherited by the children only

        token = open_token(LABEL, pin=lambda label: user_pin)
        report: dict[str, Any] = {"throughput": _throughput(token, args.size_mib, args.reps)}
        token.close()
        peaks = []
        for size in [int(s) for s in args.peak_sizes.split(",") if s]:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child-peak",
                    str(size),
                    "--workdir",
                    str(root),
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        report["peak_memory"] = peaks
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if args.json:
        print(json.dumps(report))
        return 0
    t = report["throughput"]
    r = t["mib_per_s"]
    print(f"image throughput, {t['size_mib']} MiB in 1 MiB chunks, median of {t['reps']}:")
    print(f"  encrypt_image (token, hashed)  {r['encrypt_image']:9.1f} MiB/s")
    print(f"  token raw AES-GCM (no hashing) {r['token_raw']:9.1f} MiB/s")
    print(f"  cryptography AESGCM            {r['cryptography']:9.1f} MiB/s")
    print(f"  decrypt_image (device, sw key) {r['decrypt_image']:9.1f} MiB/s")
    print(f"  master_image (MCUboot + encrypt) {r['master_image']:7.1f} MiB/s")
    print(f"  MCUboot verify (device)        {r['mcuboot_verify']:9.1f} MiB/s")
    print(
        f"  ratio encrypt_image / token raw    {t['encrypt_image/token_raw']:.3f}  (target >= 0.8)"
    )
    print(f"  ratio encrypt_image / cryptography {t['encrypt_image/cryptography']:.4f}")
    print(f"  ratio master_image / encrypt_image {t['master_image/encrypt_image']:.3f}")
    print("peak RSS growth (fresh process per size):")
    for p in report["peak_memory"]:
        print(
            f"  {p['size_mib']:5d} MiB image: encrypt +{p['encrypt_rss_growth_mib']:.1f} MiB, "
            f"decrypt +{p['decrypt_rss_growth_mib']:.1f} MiB "
            f"(baseline {p['baseline_rss_mib']:.1f} MiB; {p['encrypt_mib_per_s']:.0f} / "
            f"{p['decrypt_mib_per_s']:.0f} MiB/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
