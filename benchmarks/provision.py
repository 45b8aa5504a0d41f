"""Provisioning throughput pieces for ``python -m benchmarks``, and the quota-mark cost.

* ``setup`` (:func:`run_setup`): a subprocess that makes a token directory ``WORK/hsm`` (its
  PINs in the directory's PIN file), the OEM's and the programmer's keys, a mastered image,
  a job of ``quota`` devices and its chips (:func:`make_world`), and pickles
  ``(RunConfig, chips, outsider)`` to ``WORK/setup.pickle``.
* ``fresh`` (:func:`fresh_store`): a subprocess that retires the job's store and quota mark
  (benchmark only: production refuses a lost store, S7), so every repetition starts at zero.
* ``worker`` (:func:`start_workers`): a subprocess that opens the programmer token, builds the
  line as a run does (:func:`securethread.programmer.runner.build_line`, the job's quota mark
  as its guard) and the simulated chips *before* the clock, waits for ``go`` on stdin (so
  several workers start together), then times only ``list(line.provision(ports))``:
  identification, count, certificate, license, ledger commit, release (queued; certificate
  files and programming excluded).  Optionally it then times the HSM floor on the same keys.
* ``markcost``: the same line with and without the quota mark, alternated in one process:
  what the mark (one token object per reservation block) costs in throughput.
* ``peer``: bench_certs' openssl + libp11 loop against the same production CA key.
* :func:`software_runs`: the same pipeline with every key in a SoftwareBackend (in-process).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import pickle
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from securethread.programmer.provision import StandardSbm

ROOT = Path(__file__).resolve().parents[1]
JOB_ID = "bench-job"
IMAGE_ID = "fw-bench"
DEVICE_CLASS = "sensor-v1"
DEVICE_BASE = 0x5EC0_0000_0000_0000
SECURITY_COUNTER = 3
LABELS = {
    "production_ca": f"production-ca-{JOB_ID}",
    "image_key": f"image-{IMAGE_ID}",
    "license_signing": "license-signing",
    "ledger_signing": "ledger-signing",
    "key_agreement": "key-agreement",
}


def clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("SECURETHREAD_", "SOFTHSM2_CONF"))
    }


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


# --- the world a run needs ---------------------------------------------------------------------


def make_world(oem: Any, prog: Any, work: Path, quota: int, *, chips: int = 0) -> Any:
    """OEM keys in ``oem``, the programmer's in ``prog`` (tokens or SoftwareBackends), a
    mastered 4 KiB image in ``work``, a job of ``quota`` devices; returns
    ``(RunConfig, vendor, oem_root_hash)`` (chips: :func:`chip_specs`)."""
    from cryptography.hazmat.primitives import serialization

    from securethread.device.vendor import SiliconVendor
    from securethread.formats.device_trust import DeviceTrust, oem_root_hash, sign_device_trust
    from securethread.formats.identity import vendor_ca_id
    from securethread.formats.image import master_image
    from securethread.formats.job import ProductionJob, Targets, cosign_job, sign_job, verify_job
    from securethread.formats.ledger import sha256
    from securethread.keys.ecutil import spki_der
    from securethread.keys.policy import IMAGE_KEY, SIGNING, Curve
    from securethread.pki import (
        DeviceProfile,
        EnclavePurpose,
        cert_fingerprint,
        certify_enclave,
        certify_production_ca,
        create_enclave_csr,
        create_production_ca_csr,
        create_root_ca,
        install_certificate,
    )
    from securethread.programmer.runner import KeyLabels, RunConfig

    def der(c: Any) -> bytes:
        return bytes(c.public_bytes(serialization.Encoding.DER))

    root = create_root_ca(oem, label="oem-root-ca")
    root_key = oem.private_key("oem-root-ca")

    def enrol(label: str, purpose: Any, vouch: Any = None) -> Any:
        csr = create_enclave_csr(prog, label=label, enclave_name="programmer-1",
                                 purpose=purpose, signer=vouch)  # fmt: skip
        cert = certify_enclave(root_key, root, csr, enclave_name="programmer-1", purpose=purpose,
                               role="programmer",
                               proof_key=vouch.public_key() if vouch else None)  # fmt: skip
        install_certificate(prog, label, cert)
        return cert

    identity = enrol("programmer-identity", EnclavePurpose.IDENTITY)
    enrol(LABELS["license_signing"], EnclavePurpose.LICENSE_SIGNING)
    enrol(LABELS["ledger_signing"], EnclavePurpose.LEDGER_SIGNING)
    enrol(LABELS["key_agreement"], EnclavePurpose.KEY_AGREEMENT,
          prog.private_key("programmer-identity"))  # fmt: skip
    officers = [oem.generate_ec(f"officer-{i}", curve=Curve.P256, policy=SIGNING) for i in (1, 2)]
    fw = oem.generate_ec("firmware-signing", curve=Curve.P256, policy=SIGNING)
    image_key = prog.generate_aes(LABELS["image_key"], policy=IMAGE_KEY)
    image = work / "image.enc"
    with open(image, "wb") as dst:
        manifest = master_image(
            io.BytesIO(os.urandom(4096)), dst, image_key=image_key, signing_key=fw,
            image_id=IMAGE_ID, image_version="1.0.0", security_counter=SECURITY_COUNTER,
            device_class=DEVICE_CLASS,
        )  # fmt: skip
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before = max(now - datetime.timedelta(minutes=5), root.not_valid_before_utc)
    pca = certify_production_ca(
        root_key, root,
        create_production_ca_csr(prog, label=LABELS["production_ca"], job_id=JOB_ID),
        job_id=JOB_ID, not_before=not_before,
    )  # fmt: skip
    install_certificate(prog, LABELS["production_ca"], pca)
    (work / "production-ca.pem").write_bytes(pca.public_bytes(serialization.Encoding.PEM))
    t = int(not_before.timestamp())
    vendor = SiliconVendor()
    job = ProductionJob(
        job_id=JOB_ID, device_class=DEVICE_CLASS,
        targets=Targets(ranges=((DEVICE_BASE, DEVICE_BASE + max(quota, chips) + 1000),)),
        quota=quota, not_before=t, not_after=t + 30 * 86400, image_id=IMAGE_ID,
        manifest_sha256=sha256(manifest), programmer=cert_fingerprint(identity), threshold=2,
        certificate=DeviceProfile(organisation="securethread benchmarks"),
        production_ca=sha256(der(pca)), vendors=(vendor_ca_id(vendor.root_certificate),),
    )  # fmt: skip
    signed = cosign_job(sign_job(job, [officers[0]]), officers[1])
    verified = verify_job(signed, officers=[o.public_key() for o in officers],
                          programmer=cert_fingerprint(identity), min_threshold=2)  # fmt: skip
    trust = sign_device_trust(
        DeviceTrust(job_id=JOB_ID, job_sha256=verified.sha256, device_class=DEVICE_CLASS,
                    firmware_signing_key=fw.public_key(), min_security_counter=SECURITY_COUNTER),
        root_key,
    )  # fmt: skip
    (work / "programmer").mkdir(parents=True, exist_ok=True)
    config = RunConfig(
        job=verified, manifest=manifest, firmware_key=spki_der(fw.public_key()),
        image=str(image), store=str(work / "programmer" / "store.sqlite"),
        certificates=str(work / "programmer" / "devices"), production_ca=der(pca),
        vendor_roots=(der(vendor.root_certificate),), sbm=StandardSbm(der(pca), der(root), trust),
        labels=KeyLabels(**LABELS),
    )  # fmt: skip
    return config, vendor, oem_root_hash(root)


def chip_specs(vendor: Any, root_hash: bytes, first: int, n: int) -> Iterator[Any]:
    """``n`` simulated chips from UID ``DEVICE_BASE + first``, made one by one (lazily)."""
    for i in range(first, first + n):
        yield vendor.make_spec(
            f"{DEVICE_BASE + i:016x}", oem_root_hash=root_hash, flash_size=1 << 16
        )


def activate(work: Path) -> None:
    from softhsm_config import TokenDirectory

    TokenDirectory(work / "hsm").activate()


def setup(work: Path, quota: int) -> None:
    from softhsm_config import ensure_tokens

    ensure_tokens(work / "hsm", ("oem", "programmer"), generate_missing_pins=True).activate()
    from securethread.hsm import open_token

    config, vendor, root_hash = make_world(open_token("oem"), open_token("programmer"),
                                           work, quota, chips=quota + 1)  # fmt: skip
    chips = list(chip_specs(vendor, root_hash, 0, quota))
    outsider = list(chip_specs(vendor, root_hash, quota + 2000, 1))  # outside the targets
    (work / "setup.pickle").write_bytes(pickle.dumps((config, chips, outsider)))


def run_setup(work: Path, quota: int) -> float:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.provision", "setup", str(work), str(quota)],
        env=clean_env(), check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    return time.perf_counter() - t


def _retire(work: Path, token: Any, config: Any) -> None:
    """Benchmark only: forget the job's store and quota mark (production refuses that)."""
    from securethread.programmer.quota_mark import QuotaMark

    for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm"):
        (work / "programmer" / name).unlink(missing_ok=True)
    QuotaMark(token, config.job.sha256).destroy()


def fresh_store(work: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.provision", "fresh", str(work)],
        env=clean_env(), check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip


# --- timing the line ----------------------------------------------------------------------------


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
        return bytes(self.dev.identify(challenge))

    def provision(self, data: bytes) -> None:
        self.sent = data

    def program(self, manifest: bytes, image: Any, license: bytes, nonce: bytes) -> bytes:
        raise AssertionError("the benchmark does not program")


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


class TimedKeeper:
    """The quota mark with a clock around each of its calls (begin, advance, finish: each
    one token write), to measure its share of a run's time in the run itself."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds: dict[str, float] = {"begin": 0.0, "advance": 0.0, "finish": 0.0}
        self.writes = 0

    def _timed(self, name: str, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return getattr(self.inner, name)(*args)
        finally:
            self.seconds[name] += time.perf_counter() - t
            self.writes += 1

    def begin(self, state: Any) -> Any:
        return self._timed("begin", state)

    def advance(self, state: Any, fresh: int) -> Any:
        return self._timed("advance", state, fresh)

    def finish(self, state: Any) -> Any:
        return self._timed("finish", state)


def open_bench_line(
    work: Path,
    token: Any,
    batch: int,
    *,
    guarded: bool = True,
    block: int | None = None,
    timed: list[TimedKeeper] | None = None,
) -> Any:
    """The line a run builds, on the job's store; ``guarded``: with its quota mark (one
    write per ``block`` slots; default: what a run of the job uses, ``block_for(quota)``),
    appended to ``timed`` with a clock around it if given."""
    import attrs

    from securethread.programmer.line import NO_ARCHIVE
    from securethread.programmer.quota_mark import open_store
    from securethread.programmer.runner import build_line
    from securethread.programmer.store import UNGUARDED, SQLiteStore

    config, _chips, _outsider = pickle.loads((work / "setup.pickle").read_bytes())
    config = attrs.evolve(config, batch_size=batch)
    job = config.job
    if guarded:
        store, mark = open_store(config.store, token, job=job.sha256, job_id=job.job.job_id,
                                 quota=job.job.quota, signed=job.signed, block=block)  # fmt: skip
        guard: Any = mark
        if timed is not None:
            guard = TimedKeeper(mark)
            timed.append(guard)
        store.begin_run(job.sha256, guard=guard)
    else:
        store, guard = SQLiteStore(config.store), UNGUARDED
    return build_line(config, token, store, guard=guard, run=os.urandom(8), archive=NO_ARCHIVE)


def floor(token: Any, n: int, batch: int) -> dict[str, Any]:
    """The token operations the pipeline makes per device, alone, same token and keys.

    ``floor``: exactly the pipeline's calls (CA sign, ``agree_and_wrap``, license sign,
    1/batch ledger sign) through the library's key handles.  ``floor_p11``: the same
    operations as three python-pkcs11 calls (derive, derive, wrap) plus two destroys, as
    the pipeline made them before ``agree_and_wrap`` went direct (for comparison).
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    from securethread.keys.policy import TEMP_DERIVE, TEMP_WRAP

    pca = token.private_key(LABELS["production_ca"])
    ka = token.private_key(LABELS["key_agreement"])
    lic = token.private_key(LABELS["license_signing"])
    led = token.private_key(LABELS["ledger_signing"])
    image = token.secret_key(LABELS["image_key"])
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
    activate(work)
    from securethread.hsm import open_token

    token = open_token("programmer")
    _config, chips, _outsider = pickle.loads((work / "setup.pickle").read_bytes())
    line = open_bench_line(work, token, batch)
    ports = [WirePort(c.open()) for c in chips[start:end]]
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    out = time_provision(line, ports)
    if floor_n:
        out.update(floor(token, floor_n, batch))
    return out


def start_workers(
    work: Path, shares: list[tuple[int, int]], batch: int, floor_n: int
) -> list[dict[str, Any]]:
    """Start one subprocess per share, wait until all are ready, release them together."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.provision", "worker", str(work),
             str(a), str(b), str(batch), str(floor_n)],
            env=clean_env(), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
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


def markcost(work: Path, n: int, reps: int, batch: int, block: int = 0) -> dict[str, Any]:
    """Throughput of the same line with and without its quota mark, alternated (A/B);
    ``block``: slots per mark write (0: ``block_for`` the quota, as a run uses)."""
    activate(work)
    from securethread.hsm import open_token
    from securethread.programmer.quota_mark import block_for

    token = open_token("programmer")
    block = block or block_for(n)
    config, chips, _outsider = pickle.loads((work / "setup.pickle").read_bytes())
    rates: dict[str, list[float]] = {"with_mark": [], "without_mark": []}
    shares: list[float] = []
    writes = 0
    for _ in range(reps):
        for guarded, key in ((True, "with_mark"), (False, "without_mark")):
            _retire(work, token, config)
            timed: list[TimedKeeper] = []
            line = open_bench_line(work, token, batch, guarded=guarded, block=block, timed=timed)
            ports = [WirePort(c.open()) for c in chips[:n]]
            res = time_provision(line, ports)
            assert res["provisioned"] == n, res
            rates[key].append(n / res["provision_s"])
            if guarded:  # begin and end (the clean mark) are part of the run's cost
                mark = timed[0]
                line._store.end_run(config.job.sha256, guard=mark)
                total = res["provision_s"] + mark.seconds["begin"] + mark.seconds["finish"]
                shares.append(100 * sum(mark.seconds.values()) / total)
                writes = mark.writes
            line._store.close()
    with_m = statistics.median(rates["with_mark"])
    without = statistics.median(rates["without_mark"])
    return {
        "devices": n,
        "batch_size": batch,
        "block": block,
        "reps": reps,
        "with_mark_devices_per_s": round(with_m, 1),
        "without_mark_devices_per_s": round(without, 1),
        "drop_percent": round(100 * (1 - with_m / without), 2),
        "mark_writes": writes,
        "mark_share_percent": round(statistics.median(shares), 2),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    }


#: The profile's stage for every CBOR encode/decode (nested inside the other stages).
CBOR_STAGE = "CBOR encode/decode (nested)"


class _Timer:
    """Accumulates wall time per stage name (perf_counter; ~0.1 us per call).  A call
    inside another call of the same stage (in the same thread) is not counted again."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self._active = threading.local()

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            active: set[str] = self._active.__dict__.setdefault("names", set())
            if name in active:
                return fn(*a, **k)
            active.add(name)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t
                active.discard(name)

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
    (the checkpoint signature and the quota mark); the JSON gives both.
    """
    import cProfile
    import pstats

    activate(work)
    from securethread.hsm import open_token

    token = open_token("programmer")
    config, chips, _outsider = pickle.loads((work / "setup.pickle").read_bytes())
    _retire(work, token, config)
    timer = _Timer()
    line = open_bench_line(work, token, batch)
    issuer, licenses = line._issuer, line._licenses
    issuer._key = _TimedKey(issuer._key, timer)
    licenses._ka_key = _TimedKey(licenses._ka_key, timer)
    licenses._signing_key = _TimedKey(licenses._signing_key, timer)
    line._ledger_key = _TimedKey(line._ledger_key, timer)
    line._identify = timer.wrap("identity verification", line._identify)
    line._issuer = _TimedIssue(timer.wrap("certificate", issuer.issue))
    line._licenses = _TimedIssue(timer.wrap("license", licenses.issue))
    store = line._store
    for name in ("reserve", "commit", "known_devices", "unprogrammed", "give_back"):
        setattr(store, name, timer.wrap("store", getattr(store, name)))
    line._packager = timer.wrap("release (packaging)", line._packager)
    # Every CBOR encode/decode of the line, wherever it runs (nested in the stages above):
    # the codec's share of a device's time (issue 21: cbor2 instead of a home-made codec).
    # Both the strict layer (cbor.encode/decode with their walks) and cbor2 itself, which
    # hot paths call directly (Sig_structures, COSE frames, cbor.Template, the ledger's
    # one-pass record check); a cbor2 call inside cbor.encode counts once.
    import cbor2

    from securethread.formats import cbor as cbor_mod

    patched = [(cbor_mod, "encode"), (cbor_mod, "decode"), (cbor_mod, "decode_matching"),
               (cbor2, "dumps"), (cbor2, "loads")]  # fmt: skip
    codec = [(mod, name, getattr(mod, name)) for mod, name in patched]
    for mod, name, fn in codec:
        setattr(mod, name, timer.wrap(CBOR_STAGE, fn))
    ports = [WirePort(c.open()) for c in chips[:n]]
    for p in ports:
        p.identify = timer.wrap("device answers (simulated chip)", p.identify)  # type: ignore[method-assign]
    t = time.perf_counter()
    try:
        list(line.provision(ports))
    finally:
        for mod, name, fn in codec:
            setattr(mod, name, fn)
    total = time.perf_counter() - t
    stages = {k: round(v / n * 1e6, 1) for k, v in sorted(timer.s.items(), key=lambda kv: -kv[1])}
    top_level = ("identity verification", "device answers (simulated chip)", "certificate",
                 "license", "store", "release (packaging)")  # fmt: skip
    other = total - sum(timer.s.get(k, 0.0) for k in top_level)
    stages["other (pipeline glue)"] = round(other / n * 1e6, 1)

    # cProfile over a second run of the same devices (fresh store).
    store.close()
    _retire(work, token, config)
    line2 = open_bench_line(work, token, batch)
    ports2 = [WirePort(c.open()) for c in chips[:n]]
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
        "cbor_share_percent": round(100 * timer.s.get(CBOR_STAGE, 0.0) / total, 1),
        "stages_us_per_device": stages,
        "cprofile_top_tottime": top,
        "note": "stages timed without the profiler; 'token calls' and 'CBOR encode/decode' "
        "are inside the other stages; cProfile (second run) inflates pure-Python time",
    }


def peer(work: Path, n: int) -> dict[str, Any]:
    import tempfile

    activate(work)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_certs

    from securethread.hsm import default_module_path, resolve_pin

    bench_certs.TOKEN = "programmer"
    pin = resolve_pin("programmer")
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        dt = bench_certs._peer(
            Path(tmp), n, module=os.path.realpath(default_module_path()),
            pca_pem=work / "production-ca.pem", label=LABELS["production_ca"], pin=pin,
        )  # fmt: skip
    return {"peer_n": n, "peer_s": dt, "peer_devices_per_s": n / dt}


# --- the same pipeline on a SoftwareBackend -------------------------------------------------------


def software_runs(work: Path, n: int, reps: int) -> list[dict[str, Any]]:
    """The same line with every key in one SoftwareBackend (no quota mark: no token)."""
    from securethread.keys.software import SoftwareBackend
    from securethread.programmer.line import NO_ARCHIVE
    from securethread.programmer.runner import build_line
    from securethread.programmer.store import UNGUARDED, SQLiteStore

    backend = SoftwareBackend("software")
    config, vendor, root_hash = make_world(backend, backend, work, n)
    chips = list(chip_specs(vendor, root_hash, 0, n))
    out = []
    for _ in range(reps):
        for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm"):
            (work / "programmer" / name).unlink(missing_ok=True)
        store = SQLiteStore(config.store)
        line = build_line(config, backend, store, guard=UNGUARDED, run=b"sw", archive=NO_ARCHIVE)
        out.append(time_provision(line, [WirePort(c.open()) for c in chips]))
        store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("work")
    s.add_argument("quota", type=int)
    sub.add_parser("fresh").add_argument("work")
    w = sub.add_parser("worker")
    for a in ("work", "start", "end", "batch", "floor_n"):
        w.add_argument(a)
    mc = sub.add_parser("markcost", help="A/B: the line with and without its quota mark")
    mc.add_argument("--devices", type=int, default=2000)
    mc.add_argument("--reps", type=int, default=5)
    mc.add_argument("--batch", type=int, default=32)
    mc.add_argument("--block", type=int, default=0, help="slots per mark write (0: the run's)")
    pe = sub.add_parser("peer")
    pe.add_argument("work")
    pe.add_argument("n", type=int)
    pr = sub.add_parser("profile")
    pr.add_argument("work")
    pr.add_argument("n", type=int)
    pr.add_argument("batch", type=int)
    args = ap.parse_args(argv)
    res: Any = {}
    if args.cmd == "setup":
        setup(Path(args.work), args.quota)
    elif args.cmd == "fresh":
        work = Path(args.work)
        activate(work)
        from securethread.hsm import open_token

        config, _c, _o = pickle.loads((work / "setup.pickle").read_bytes())
        _retire(work, open_token("programmer"), config)
    elif args.cmd == "worker":
        res = worker(Path(args.work), int(args.start), int(args.end), int(args.batch),
                     int(args.floor_n))  # fmt: skip
    elif args.cmd == "markcost":
        import shutil
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="bench-markcost-"))
        try:
            run_setup(work, args.devices)
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.provision", "_markcost", str(work),
                 str(args.devices), str(args.reps), str(args.batch), str(args.block)],
                env=clean_env(), cwd=ROOT, check=True, capture_output=True, text=True,
            )  # fmt: skip
            res = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    elif args.cmd == "profile":
        res = profile(Path(args.work), args.n, args.batch)
    else:
        res = peer(Path(args.work), args.n)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_markcost":  # the timed process of markcost
        w_, n_, r_, b_, k_ = sys.argv[2:7]
        print(json.dumps(markcost(Path(w_), int(n_), int(r_), int(b_), int(k_))), flush=True)
        raise SystemExit(0)
    raise SystemExit(main())
