"""Reconciliation, registry ingest and OCSP at scale: ``python -m benchmarks.bench_registry
[--quick] [--json] [--sizes N,M] [--pg-url URL | --no-pg]``.

For each size (full: 100,000 and 1,000,000 devices; quick: 10,000 and 100,000) a closed
ledger is synthesised with software keys (:mod:`benchmarks.synth_ledger`: real formats, a
device certificate and a boot confirmation per device, two records per device), then each
phase runs in a fresh process of its own, which reports its wall time and its peak RSS
(``VmHWM``) and CPU time (the main process's, and the reconcile pool's workers'):

reconcile     ``audit reconcile`` of the ledger file (every check, streaming; the production
              CA's signature of a template-matched certificate covered by the ledger, the
              default), devices/s
ingest        ``Registry.ingest`` of the reconciled ledger into a new SQLite file, and into a
              new database of a PostgreSQL server (one this benchmark starts with initdb in a
              temporary directory unless ``--pg-url`` names one), records/s
ocsp          after the largest SQLite ingest: the OCSP responder over HTTP on 127.0.0.1,
              its key in a SoftHSM token (as ``oem ocsp`` signs), one client posting requests
              for random ledgered serials one after another; responses/s

Beside the wall-clock rates each phase reports its CPU time per device or record and the
load average when it started: on a shared machine the wall-clock rate moves 2-3x with the
others' load, the CPU time much less.  ``cpu_bound_devices_per_s`` is what reconcile's CPU
seconds would allow on all this machine's cores with nothing else running (an estimate, not
a measurement).

Targets (issue 19): ingest >= 50,000 records/s on SQLite, reconcile >= 10,000 devices/s,
peak RSS of each phase the same at both sizes within 10 %.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss does not on
    Linux: a child reports at least its parent's peak at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- the phases, each in its own process --------------------------------------------------------


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its reaped children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def phase_reconcile(d: Path) -> dict[str, Any]:
    from securethread.audit.files import reconcile_files

    pub = json.loads((d / "public.json").read_text())
    load = os.getloadavg()[0]
    c0 = _cpu()
    t = time.perf_counter()
    report = reconcile_files(
        d / "ledger.bin",
        job=pub["job"],
        root=pub["root"],
        officers=pub["officers"],
        programmer_cert=pub["programmer_cert"],
        ledger_cert=pub["ledger_cert"],
        production_ca=pub["production_ca"],
        manifest=pub["manifest"],
    )
    s = time.perf_counter() - t
    c1 = _cpu()  # the pool's workers are reaped by now: their CPU is the children's
    return {"seconds": s, "devices": report["provisioned"], "records": report["records"],
            "maxrss_mib": _maxrss_mib(), "cpu_main_s": c1[0] - c0[0],
            "cpu_workers_s": c1[1] - c0[1], "load_before": load}  # fmt: skip


def _registry_job(d: Path) -> tuple[Any, bytes]:
    from cryptography import x509

    from securethread.oem.registry import RegistryJob

    meta = json.loads((d / "job.json").read_text())
    pub = json.loads((d / "public.json").read_text())
    ledger_cert = x509.load_pem_x509_certificate(Path(pub["ledger_cert"]).read_bytes())
    job = RegistryJob(
        job_id=meta["job_id"],
        job_sha256=bytes.fromhex(meta["job_sha256"]),
        production_ca=x509.load_pem_x509_certificate(Path(pub["production_ca"]).read_bytes()),
        ledger_key=ledger_cert.public_key(),  # type: ignore[arg-type]
    )
    return job, bytes.fromhex(meta["ledger_sha256"])


def phase_ingest(d: Path, database: str) -> dict[str, Any]:
    from securethread.oem.registry import Registry

    job, digest = _registry_job(d)
    load = os.getloadavg()[0]
    with Registry.open(database) as reg, open(d / "ledger.bin", "rb") as src:
        c0 = _cpu()[0]
        t = time.perf_counter()
        report = reg.ingest(src, job=job, ledger_sha256=digest)
        s = time.perf_counter() - t
        cpu = _cpu()[0] - c0
        assert report.ingested and reg.counts()["devices"] == report.devices
    return {"seconds": s, "devices": report.devices, "records": report.records,
            "maxrss_mib": _maxrss_mib(), "cpu_s": cpu, "load_before": load}  # fmt: skip


class _SoftKey:
    """A synthetic production-CA key from a PEM file, as the PrivateKey protocol's subset
    that :func:`certify_responder` uses (benchmark only: the real one is in a token)."""

    def __init__(self, pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization

        from securethread.hsm import Curve

        self._key: Any = serialization.load_pem_private_key(pem, None)
        self.curve = Curve.P256
        self.label = "pca"

    def public_key(self) -> Any:
        return self._key.public_key()

    def as_cryptography(self) -> Any:
        return self._key


def phase_ocsp(d: Path, database: str, n: int) -> dict[str, Any]:
    """Responses/s of the HTTP responder signing in a SoftHSM token."""
    import http.client
    import secrets

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    from softhsm_config import ensure_tokens

    pin = secrets.token_hex(8)
    tokens = Path(tempfile.mkdtemp(prefix="bench-ocsp-"))
    try:
        ensure_tokens(tokens, ["oem"], pins={"oem": (secrets.token_hex(8), pin)}).activate()
        from securethread.hsm import SIGNING, Curve, open_token
        from securethread.oem.ocsp import OcspServer, Responder, ResponderIdentity
        from securethread.oem.registry import Registry
        from securethread.pki.responder import certify_responder, responder_csr

        token = open_token("oem", pin=lambda _label: pin)
        pub = json.loads((d / "public.json").read_text())
        pca = x509.load_pem_x509_certificate(Path(pub["production_ca"]).read_bytes())
        key = token.generate_ec("ocsp-bench", curve=Curve.P256, policy=SIGNING)
        ca_key = _SoftKey((d / "pca-key.pem").read_bytes())
        cert = certify_responder(ca_key, pca, responder_csr(key), job_id="bench")  # type: ignore[arg-type]
        registry = Registry.open(database)
        server = OcspServer(
            ("127.0.0.1", 0), Responder([ResponderIdentity(pca, cert, key, "bench")], registry)
        )
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        serials = [int(s, 16) for s in json.loads((d / "serials.json").read_text())]
        rng = random.Random(19)
        bodies = []
        for _ in range(n):
            req = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
                _sha1(pca.subject.public_bytes()),
                _sha1(pca.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)),
                rng.choice(serials), hashes.SHA1(),
            ).build()  # fmt: skip
            bodies.append(req.public_bytes(serialization.Encoding.DER))
        port = server.server_address[1]
        good = 0
        try:
            t = time.perf_counter()
            for body in bodies:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/", body, {"Content-Type": "application/ocsp-request"})
                resp = ocsp.load_der_ocsp_response(conn.getresponse().read())
                conn.close()
                good += resp.certificate_status is ocsp.OCSPCertStatus.GOOD
            s = time.perf_counter() - t
        finally:
            server.shutdown()
            thread.join()
            server.server_close()
            registry.close()
            token.close()
        assert good == n, f"{good} of {n} answered good"
        return {"seconds": s, "responses": n, "maxrss_mib": _maxrss_mib()}
    finally:
        shutil.rmtree(tokens, ignore_errors=True)


def _sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()  # noqa: S324 - RFC 6960 §4.1.1 CertID default


def _child(*args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_registry", "phase", *args],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"phase {args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- the driver --------------------------------------------------------------------------------


def synthesise(n: int, d: Path, log: Any) -> float:
    """A closed, reconcilable ledger of ``n`` devices and what the phases need, in ``d``."""
    from cryptography.hazmat.primitives import serialization

    from benchmarks.synth_ledger import make_world, write_ledger
    from securethread.formats import ledger

    t = time.perf_counter()
    w = make_world(n, label=f"bench-{n}")
    with open(d / "ledger.bin", "wb") as out:
        write_ledger(w, out, n, batch=32, workers=os.cpu_count() or 1)
    pub = w.write_public_files(d / "public")
    (d / "public.json").write_text(json.dumps(pub))
    (d / "job.json").write_text(json.dumps({
        "job_id": w.job.job_id, "job_sha256": w.job_sha256.hex(),
        "ledger_sha256": _file_sha256(d / "ledger.bin").hex(),
    }))  # fmt: skip
    pca_key = w.pca_key._key  # type: ignore[attr-defined]  # synthetic: for the OCSP phase
    (d / "pca-key.pem").write_bytes(
        pca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    )  # fmt: skip
    serials = []
    with open(d / "ledger.bin", "rb") as src:  # a sample of the ledger's serials, for OCSP
        _job, items = ledger.read_export(src)
        rng = random.Random(n)
        for tag, raw in items:
            if tag == "r" and rng.random() < 2000 / (2 * n):
                rec = ledger.parse_record(raw, 0)
                if rec.kind == ledger.KIND_PROVISIONED:
                    from cryptography import x509

                    serials.append(
                        format(x509.load_der_x509_certificate(rec.body["cert"]).serial_number, "x")
                    )
    (d / "serials.json").write_text(json.dumps(serials))
    s = time.perf_counter() - t
    log(f"  synthesised {n} devices in {s:.1f} s ({(d / 'ledger.bin').stat().st_size >> 20} MiB)")
    return s


def _file_sha256(p: Path) -> bytes:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


@contextlib.contextmanager
def _postgres(url: str | None, enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
    elif url:
        yield url
    else:
        from tests.integration.pg_support import postgres_server

        with postgres_server() as started:
            yield started


def _new_pg_database(url: str) -> str:
    from tests.integration.pg_support import fresh_database

    return fresh_database(url)


def _ingest_point(r: dict[str, Any]) -> dict[str, Any]:
    return {"records_per_s": round(r["records"] / r["seconds"]),
            "devices_per_s": round(r["devices"] / r["seconds"]),
            "seconds": round(r["seconds"], 2), "maxrss_mib": r["maxrss_mib"],
            "records_per_cpu_s": round(r["records"] / r["cpu_s"]),
            "load_before": round(r["load_before"], 2)}  # fmt: skip


def run(
    sizes: list[int],
    *,
    pg_url: str | None,
    pg: bool,
    ocsp_n: int,
    log: Any,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Every phase at every size; ``keep``: ledgers are kept in ``keep/<n>`` and a ledger
    found there is used instead of synthesising one (the 1,000,000-device one takes
    minutes)."""
    points: list[dict[str, Any]] = []
    ocsp_result: dict[str, Any] | None = None
    with _postgres(pg_url, pg) as server:
        for n in sizes:
            if keep is None:
                d = Path(tempfile.mkdtemp(prefix=f"bench-registry-{n}-"))
            else:
                d = keep / str(n)
                d.mkdir(parents=True, exist_ok=True)
            try:
                log(f"{n} devices")
                reuse = keep is not None and (d / "serials.json").is_file()
                point: dict[str, Any] = {
                    "devices": n,
                    "synth_s": None if reuse else round(synthesise(n, d, log), 1),
                }
                if reuse:
                    log(f"  the ledger synthesised before in {d}")
                r = _child("reconcile", str(d))
                cpu_us = (r["cpu_main_s"] + r["cpu_workers_s"]) / r["devices"] * 1e6
                point["reconcile"] = {"devices_per_s": round(r["devices"] / r["seconds"], 1),
                                      "seconds": round(r["seconds"], 1),
                                      "maxrss_mib": r["maxrss_mib"],
                                      "cpu_us_per_device": round(cpu_us, 1),
                                      "main_cpu_us_per_device":
                                          round(r["cpu_main_s"] / r["devices"] * 1e6, 1),
                                      "cpu_bound_devices_per_s": round(
                                          (os.cpu_count() or 1) * 1e6 / cpu_us),
                                      "load_before": round(r["load_before"], 2)}  # fmt: skip
                log(f"  reconcile: {point['reconcile']}")
                db = str(d / "registry.sqlite")
                for old in (db, db + "-wal", db + "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(old)
                r = _child("ingest", str(d), db)
                point["ingest_sqlite"] = _ingest_point(r)
                log(f"  ingest SQLite: {point['ingest_sqlite']}")
                if n == max(sizes):
                    r = _child("ocsp", str(d), db, str(ocsp_n))
                    ocsp_result = {"registry_devices": n, "responses": r["responses"],
                                   "responses_per_s": round(r["responses"] / r["seconds"], 1),
                                   "maxrss_mib": r["maxrss_mib"],
                                   "how": "one client, HTTP/1.0 POST per request, SoftHSM "
                                          "ECDSA P-256 signature per response"}  # fmt: skip
                    log(f"  OCSP: {ocsp_result}")
                if server is not None:
                    r = _child("ingest", str(d), _new_pg_database(server))
                    point["ingest_postgresql"] = _ingest_point(r)
                    log(f"  ingest PostgreSQL: {point['ingest_postgresql']}")
                points.append(point)
            finally:
                if keep is None:
                    shutil.rmtree(d, ignore_errors=True)
    out: dict[str, Any] = {"points": points, "ocsp": ocsp_result}
    small, large = points[0], points[-1]

    def flat(phase: str) -> float | None:
        if phase not in small or phase not in large:
            return None
        return round(float(large[phase]["maxrss_mib"]) / float(small[phase]["maxrss_mib"]), 3)

    rss = {p: flat(p) for p in ("reconcile", "ingest_sqlite", "ingest_postgresql")}
    out["rss_large_over_small"] = rss
    out["targets_met"] = {
        "ingest_sqlite>=50000_records_per_s": large["ingest_sqlite"]["records_per_s"] >= 50_000,
        "reconcile>=10000_devices_per_s": large["reconcile"]["devices_per_s"] >= 10_000,
        "rss_flat_10%": all(v is None or v <= 1.10 for v in rss.values()),
    }
    out["cpus"] = os.cpu_count()
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "phase":
        kind, d = argv[1], Path(argv[2])
        if kind == "reconcile":
            r = phase_reconcile(d)
        elif kind == "ingest":
            r = phase_ingest(d, argv[3])
        else:
            r = phase_ocsp(d, argv[3], int(argv[4]))
        print(json.dumps(r))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_registry",
                                 description=__doc__.splitlines()[0])  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="10,000 and 100,000 devices")
    ap.add_argument("--sizes", help="comma-separated device counts (overrides --quick)")
    ap.add_argument("--pg-url", help="a PostgreSQL server to use (default: start one)")
    ap.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    ap.add_argument("--ocsp-requests", type=int, default=2000)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--keep", type=Path, help="keep (and reuse) the ledgers in DIR/<devices>")
    a = ap.parse_args(argv)
    if a.sizes:
        sizes = [int(s) for s in a.sizes.split(",")]
    else:
        sizes = [10_000, 100_000] if a.quick else [100_000, 1_000_000]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    r = run(sizes, pg_url=a.pg_url, pg=not a.no_pg, ocsp_n=a.ocsp_requests, log=log,
            keep=a.keep)  # fmt: skip
    r["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(r))
        return 0
    for p in r["points"]:
        print(f"{p['devices']:>9} devices: reconcile {p['reconcile']['devices_per_s']} dev/s "
              f"(peak {p['reconcile']['maxrss_mib']} MiB); ingest SQLite "
              f"{p['ingest_sqlite']['records_per_s']} rec/s (peak "
              f"{p['ingest_sqlite']['maxrss_mib']} MiB)"
              + (f"; PostgreSQL {p['ingest_postgresql']['records_per_s']} rec/s (peak "
                 f"{p['ingest_postgresql']['maxrss_mib']} MiB)" if "ingest_postgresql" in p
                 else ""))  # fmt: skip
    if r["ocsp"]:
        print(f"OCSP: {r['ocsp']['responses_per_s']} responses/s")
    print(f"peak RSS large/small: {r['rss_large_over_small']}")
    for k, v in r["targets_met"].items():
        print(f"target {k:38s} {'met' if v else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
