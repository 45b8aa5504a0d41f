"""Provisioning throughput pieces for ``python -m benchmarks``.

* ``setup``: a subprocess running the demo up to the job (``run_demo(setup_hook=...)``),
  in its own work directory, pickling (LineConfig, chips, outsider) to ``setup.pickle``.
* ``worker``: a subprocess that activates the demo's token directory, opens the programmer
  token, builds the line and the SimulatedDevices *before* the clock, waits for ``go`` on
  stdin (so several workers start together), then times only ``list(line.provision(ports))``
  (programming excluded).  Optionally it then times the HSM floor on the same token/keys.
* ``peer``: bench_certs' openssl + libp11 loop against the same production CA key.
* :func:`software_line`: the same pipeline with every key in a SoftwareBackend (in-process).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("SECURETHREAD_", "SOFTHSM2_CONF"))
    }


SETUP = """
import pickle, sys
from securethread.demo import run_demo
work, quota = sys.argv[1], int(sys.argv[2])
def hook(cfg, chips, outsider):
    with open(work + "/setup.pickle", "wb") as f:
        pickle.dump((cfg, chips, outsider), f)
run_demo(work, devices=quota, setup_hook=hook, firmware_size=4096)
"""


def run_setup(work: Path, quota: int) -> float:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", SETUP, str(work), str(quota)],
        env=clean_env(),
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return time.perf_counter() - t


def fresh_store(work: Path) -> None:
    for name in ("production.sqlite", "production.sqlite-wal", "production.sqlite-shm"):
        (work / "programmer" / name).unlink(missing_ok=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


class WirePort:
    """The programmer's end of the wire to one simulated device.

    The device answers identification itself (its proof-of-possession signature is inside
    the timed loop), but the provisioning data released to it is only queued: checking it
    is the chip's own work (on silicon, in parallel with the line), so
    :func:`time_provision` hands it to the simulated SBM after the clock, times that
    separately and requires every device to accept its data.
    """

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.sent: bytes | None = None

    def identify(self, challenge: bytes) -> bytes:
        return self.dev.identify(challenge)

    def provision(self, data: bytes) -> None:
        self.sent = data


def time_provision(line: Any, ports: list[WirePort]) -> dict[str, Any]:
    from securethread.programmer.line import Provisioned

    t0 = time.perf_counter()
    outcomes = list(line.provision(ports))
    dt = time.perf_counter() - t0
    prov = [o for o in outcomes if isinstance(o, Provisioned)]
    el = [o.elapsed_s for o in prov]
    t1 = time.perf_counter()
    for port in ports:
        if port.sent is None:
            raise RuntimeError(f"device {port.dev.device_id} received nothing")
        port.dev.provision(port.sent)  # raises if the SBM refuses its data
    device_s = time.perf_counter() - t1
    return {
        "n": len(ports),
        "provisioned": len(prov),
        "provision_s": dt,
        "p50_ms": pct(el, 50) * 1e3,
        "p99_ms": pct(el, 99) * 1e3,
        "device_accept_ms": device_s / max(len(ports), 1) * 1e3,
    }


def floor(token: Any, n: int, batch: int) -> dict[str, Any]:
    """The token operations the pipeline makes per device, alone, same token and keys.

    ``floor``: exactly the pipeline's calls (CA sign, ``agree_and_wrap``, license sign,
    1/batch ledger sign) through the library's key handles.  ``floor_p11``: the same
    operations as three python-pkcs11 calls (derive, derive, wrap) plus two destroys, as
    the pipeline made them before ``agree_and_wrap`` went direct (for comparison).
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    from securethread.demo import L_IMAGE, L_KA, L_LEDGER, L_LICENSE, L_PCA
    from securethread.keys.policy import TEMP_DERIVE, TEMP_WRAP

    pca = token.private_key(L_PCA)
    ka = token.private_key(L_KA)
    lic = token.private_key(L_LICENSE)
    led = token.private_key(L_LEDGER)
    image = token.secret_key(L_IMAGE)
    pubs = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(min(n, 64))]
    digests = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]

    def one(i: int) -> None:
        pca.sign_digest(digests[i])
        ka.agree_and_wrap(pubs[i % len(pubs)], digests[i], image)
        lic.sign_digest(digests[i])
        if i % batch == 0:
            led.sign_digest(digests[i])

    def one_p11(i: int) -> None:
        pca.sign_digest(digests[i])
        shared = ka.derive_aes(pubs[i % len(pubs)], policy=TEMP_DERIVE)
        kek = shared.derive_ecb(digests[i], policy=TEMP_WRAP)
        kek.wrap(image)
        kek.destroy()
        shared.destroy()
        lic.sign_digest(digests[i])
        if i % batch == 0:
            led.sign_digest(digests[i])

    out: dict[str, Any] = {"floor_n": n}
    for name, fn in (("floor", one), ("floor_p11", one_p11)):
        fn(0)  # warm-up
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        dt = time.perf_counter() - t
        out[f"{name}_s"] = dt
        out[f"{name}_devices_per_s"] = n / dt
    return out


def worker(work: Path, start: int, end: int, batch: int, floor_n: int) -> dict[str, Any]:
    import attrs

    from softhsm_config import TokenDirectory

    TokenDirectory(work / "hsm").activate()
    from securethread.demo import open_line
    from securethread.hsm import open_token

    cfg, chips, outsider = pickle.loads((work / "setup.pickle").read_bytes())
    cfg = attrs.evolve(cfg, batch_size=batch)
    from securethread.errors import HSMError

    for attempt in range(10):  # SoftHSM login can fail (GeneralError) when two processes race
        try:
            token = open_token("programmer")
            break
        except HSMError:
            if attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))
    line, _manifest = open_line(cfg, token)
    ports = [WirePort(c.build()) for c in chips[start:end]]
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    out = time_provision(line, ports)
    if floor_n:
        out.update(floor(token, floor_n, batch))
    return out


class _Timer:
    """Accumulates wall time per stage name (perf_counter; ~0.1 us per call)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t

        return timed


class _TimedKey:
    """A key handle whose token calls are timed; everything else is delegated."""

    def __init__(self, key: Any, timer: _Timer) -> None:
        self._key = key
        self.sign_digest = timer.wrap("token calls", key.sign_digest)
        self.sign = timer.wrap("token calls", key.sign)
        if hasattr(key, "agree_and_wrap"):
            self.agree_and_wrap = timer.wrap("token calls", key.agree_and_wrap)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key, name)


class _TimedIssue:
    """Stands in for the certificate issuer or the license maker, with a timed ``issue``."""

    def __init__(self, issue: Any) -> None:
        self.issue = issue


def profile(work: Path, n: int, batch: int) -> dict[str, Any]:
    """Where a device's time goes: stages timed without a profiler, then cProfile's top.

    Stages are nested: "token calls" is part of "certificate", "license" and "store"
    (the checkpoint signature); the JSON gives both the stage totals and the token share.
    """
    import cProfile
    import pstats

    import attrs

    from softhsm_config import TokenDirectory

    TokenDirectory(work / "hsm").activate()
    from securethread.demo import open_line
    from securethread.hsm import open_token

    cfg, chips, _outsider = pickle.loads((work / "setup.pickle").read_bytes())
    cfg = attrs.evolve(cfg, batch_size=batch)
    token = open_token("programmer")
    fresh_store(work)
    timer = _Timer()
    line, _m = open_line(cfg, token)
    issuer, licenses = line._issuer, line._licenses  # type: ignore[attr-defined]
    issuer._key = _TimedKey(issuer._key, timer)
    licenses._ka_key = _TimedKey(licenses._ka_key, timer)
    licenses._signing_key = _TimedKey(licenses._signing_key, timer)
    line._ledger_key = _TimedKey(line._ledger_key, timer)  # type: ignore[attr-defined]
    line._identify = timer.wrap("identity verification", line._identify)  # type: ignore[attr-defined]
    issue_cert = timer.wrap("certificate", issuer.issue)
    issue_lic = timer.wrap("license", licenses.issue)
    line._issuer = _TimedIssue(issue_cert)  # type: ignore[attr-defined]
    line._licenses = _TimedIssue(issue_lic)  # type: ignore[attr-defined]
    store = line._store  # type: ignore[attr-defined]
    for name in ("reserve", "commit", "known_devices"):
        setattr(store, name, timer.wrap("store", getattr(store, name)))
    line._packager = timer.wrap("release (packaging)", line._packager)  # type: ignore[attr-defined]
    ports = [WirePort(c.build()) for c in chips[:n]]
    for p in ports:
        p.identify = timer.wrap("device answers (simulated chip)", p.identify)  # type: ignore[method-assign]
    t = time.perf_counter()
    list(line.provision(ports))
    total = time.perf_counter() - t
    stages = {k: round(v / n * 1e6, 1) for k, v in sorted(timer.s.items(), key=lambda kv: -kv[1])}
    top_level = ("identity verification", "device answers (simulated chip)", "certificate",
                 "license", "store", "release (packaging)")  # fmt: skip
    other = total - sum(timer.s.get(k, 0.0) for k in top_level)
    stages["other (pipeline glue)"] = round(other / n * 1e6, 1)

    # cProfile over a second run of the same devices (fresh store, new chips).
    fresh_store(work)
    line2, _m = open_line(cfg, token)
    ports2 = [WirePort(c.build()) for c in chips[:n]]
    prof = cProfile.Profile()
    prof.enable()
    list(line2.provision(ports2))
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]  # type: ignore[attr-defined]
    top = [
        {
            "function": f"{Path(fn).name}:{ln}({name})",
            "tottime_us_per_device": round(tt / n * 1e6, 1),
            "calls_per_device": round(nc / n, 2),
        }
        for (fn, ln, name), (_cc, nc, tt, _ct, _callers) in rows
    ]
    return {
        "devices": n,
        "wall_us_per_device": round(total / n * 1e6, 1),
        "stages_us_per_device": stages,
        "cprofile_top_tottime": top,
        "note": "stages timed without the profiler; 'token calls' is inside certificate, "
        "license and store; cProfile (second run) inflates pure-Python time",
    }


def peer(work: Path, n: int) -> dict[str, Any]:
    import tempfile

    from softhsm_config import TokenDirectory

    TokenDirectory(work / "hsm").activate()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_certs

    from securethread.demo import L_PCA
    from securethread.hsm import default_module_path, env_var_for

    bench_certs.TOKEN = "programmer"
    pin = os.environ[env_var_for("programmer")]
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        dt = bench_certs._peer(
            Path(tmp),
            n,
            module=os.path.realpath(default_module_path()),
            pca_pem=work / "job" / "production-ca.pem",
            label=L_PCA,
            pin=pin,
        )
    return {"peer_n": n, "peer_s": dt, "peer_devices_per_s": n / dt}


def start_workers(
    work: Path, shares: list[tuple[int, int]], batch: int, floor_n: int
) -> list[dict[str, Any]]:
    """Start one subprocess per share, wait until all are ready, release them together."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.provision",
                "worker",
                str(work),
                str(a),
                str(b),
                str(batch),
                str(floor_n),
            ],
            env=clean_env(),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for a, b in shares
    ]
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"worker failed: {line!r} {p.stderr.read() if p.stderr else ''}")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"worker exited {p.returncode}: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --- the same pipeline on a SoftwareBackend -------------------------------------------------


def software_line(work: Path, quota: int) -> tuple[Any, Any, list[Any]]:
    """Full in-process setup on one SoftwareBackend: returns (cfg, backend, chips)."""
    import datetime

    from cryptography.hazmat.primitives import serialization

    from securethread import demo
    from securethread.device.sbm import SiliconVendor
    from securethread.formats.image import master_image
    from securethread.formats.job import ProductionJob, Targets, cosign_job, sign_job
    from securethread.formats.ledger import sha256
    from securethread.hsm import IMAGE_KEY, SIGNING, Curve, SoftwareBackend, spki_der
    from securethread.pki import (
        EnclavePurpose,
        cert_fingerprint,
        certify_enclave,
        certify_production_ca,
        create_enclave_csr,
        create_production_ca_csr,
        create_root_ca,
        install_certificate,
    )

    b = SoftwareBackend("software")
    root = create_root_ca(b, label=demo.L_ROOT)
    root_key = b.private_key(demo.L_ROOT)
    p_csr = create_enclave_csr(
        b, label=demo.L_PROG_ID, enclave_name="programmer-1", purpose=EnclavePurpose.IDENTITY
    )
    p_cert = certify_enclave(root_key, root, p_csr, enclave_name="programmer-1",
                             purpose=EnclavePurpose.IDENTITY, role="programmer")  # fmt: skip
    install_certificate(b, demo.L_PROG_ID, p_cert)
    p_id = b.private_key(demo.L_PROG_ID)
    for lbl, purpose in (
        (demo.L_LICENSE, EnclavePurpose.LICENSE_SIGNING),
        (demo.L_LEDGER, EnclavePurpose.LEDGER_SIGNING),
        (demo.L_KA, EnclavePurpose.KEY_AGREEMENT),
    ):
        ka = purpose is EnclavePurpose.KEY_AGREEMENT
        csr = create_enclave_csr(b, label=lbl, enclave_name="programmer-1", purpose=purpose,
                                 signer=p_id if ka else None)  # fmt: skip
        proof = p_id.public_key() if ka else None
        cert = certify_enclave(root_key, root, csr, enclave_name="programmer-1", purpose=purpose,
                               role="programmer", proof_key=proof)  # fmt: skip
        install_certificate(b, lbl, cert)
    fw = b.generate_ec(demo.L_FW, curve=Curve.P256, policy=SIGNING)
    officers = [b.generate_ec(lbl, curve=Curve.P256, policy=SIGNING) for lbl in demo.L_OFFICERS]
    image_key = b.generate_aes(demo.L_IMAGE, policy=IMAGE_KEY)
    manifest_bytes = master_image(
        io.BytesIO(os.urandom(4096)), io.BytesIO(), image_key=image_key, signing_key=fw,
        image_id=demo.IMAGE_ID, image_version="1.0.0", security_counter=3,
        device_class=demo.DEVICE_CLASS,
    )  # fmt: skip
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
    not_after = now + datetime.timedelta(days=7)
    pca = certify_production_ca(
        root_key, root, create_production_ca_csr(b, label=demo.L_PCA, job_id=demo.JOB_ID),
        job_id=demo.JOB_ID, not_before=not_before, not_after=not_after,
    )  # fmt: skip
    install_certificate(b, demo.L_PCA, pca)
    job = ProductionJob(
        job_id=demo.JOB_ID, device_class=demo.DEVICE_CLASS,
        targets=Targets(ranges=((demo.DEVICE_BASE, demo.DEVICE_BASE + quota - 1),)),
        quota=quota, not_before=int(not_before.timestamp()), not_after=int(not_after.timestamp()),
        image_id=demo.IMAGE_ID, manifest_sha256=sha256(manifest_bytes),
        programmer=cert_fingerprint(p_cert), threshold=2,
    )  # fmt: skip
    job_signed = cosign_job(sign_job(job, [officers[0]]), officers[1])
    vendor = SiliconVendor()
    chips = demo.make_chips(vendor, [demo.DEVICE_BASE + i for i in range(quota)])
    (work / "programmer").mkdir(parents=True, exist_ok=True)
    cfg = demo.LineConfig(
        workdir=str(work), job_signed=job_signed,
        officer_keys=tuple(spki_der(k.public_key()) for k in officers),
        programmer_fp=cert_fingerprint(p_cert),
        root_der=root.public_bytes(serialization.Encoding.DER),
        production_ca_der=pca.public_bytes(serialization.Encoding.DER),
        vendor_root_der=vendor.root_certificate.public_bytes(serialization.Encoding.DER),
        manifest=manifest_bytes, firmware_signing_spki=spki_der(fw.public_key()),
    )  # fmt: skip
    return cfg, b, chips


def software_runs(work: Path, n: int, reps: int) -> list[dict[str, Any]]:
    from securethread.demo import open_line

    cfg, backend, chips = software_line(work, n)
    out = []
    for _ in range(reps):
        fresh_store(work)
        line, _m = open_line(cfg, backend)
        ports = [WirePort(c.build()) for c in chips[:n]]
        out.append(time_provision(line, ports))
        line._store.close()  # type: ignore[attr-defined]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    for a in ("work", "start", "end", "batch", "floor_n"):
        w.add_argument(a)
    pe = sub.add_parser("peer")
    pe.add_argument("work")
    pe.add_argument("n", type=int)
    pr = sub.add_parser("profile")
    pr.add_argument("work")
    pr.add_argument("n", type=int)
    pr.add_argument("batch", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        res = worker(Path(args.work), int(args.start), int(args.end), int(args.batch),
                     int(args.floor_n))  # fmt: skip
    elif args.cmd == "profile":
        res = profile(Path(args.work), args.n, args.batch)
    else:
        res = peer(Path(args.work), args.n)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
