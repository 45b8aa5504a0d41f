"""The two-site demo: ``securethread demo --devices N --workdir DIR``.

It plays every party on one machine the way they are deployed on several::

    DIR/oem/        the OEM's work directory (its own SoftHSM tokens and PIN file)
    DIR/officer-N/  officer N's PIN file, ``pin`` (0600): each officer's own, never the OEM's
    DIR/factory/    the programming centre's appliance state directory (0700: its token, PIN
                    file, stores, transcript), served by ``securethread appliance serve``
    DIR/run/        the appliance's operator socket
    DIR/operator/   the operator's outbox: what the appliance's steps returned
    DIR/vendor/     the simulated silicon vendor (software CA; burns the OEM root's hash)
    DIR/courier/    a log of every file carried between the parties
    DIR/station-K/  station K's key and certificates (``securethread station run``)
    DIR/flash/      the installed image of each chip station 1 programmed, ``<device>.img``
                    (its simulated flash, an MCUboot image: ``imgtool verify`` reads it)

The programming centre runs as deployed: one ``securethread appliance serve`` process
alone holds its token's PIN and state; every programmer step is an operator's
``securethread programmer ... --appliance SOCKET`` process that sends its inputs over the
socket and gets the outbox files back; the appliance is stopped with SIGTERM at the end.
Each party's step runs as its own ``securethread`` process with only that party's work
directory (each process points SoftHSM at its own token directory and reads its own PIN
file; the test-suite's or the caller's PIN variables are removed from the children's
environment).  Nothing passes between the parties but the files of their outboxes, copied
into the receiver's ``inbox/`` as a courier would, and one TCP connection on 127.0.0.1 for
the key channel.  Each officer approves the job in a process of their own that is given
only that officer's PIN file.  The demo and the CLI are the only code that knows more than
one party.

The demo refuses a directory it did not create.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs

from securethread.errors import ConfigurationError, Error

DEMO_MARKER = ".securethread-demo"
OFFICERS = 2  # oem init's default: two officers, both sign every job
PARTS = (
    "oem", "factory", "vendor", "courier", "operator", "run",
    "fab",  # the silicon vendor's appliance (demo --mode fab)
    "flash",  # station-1's chips' installed images
    *(f"officer-{n}" for n in range(1, OFFICERS + 1)),
)  # fmt: skip
SOCKET = "run/appliance.sock"  # relative to the demo directory: sun_path holds 108 bytes
OEM_NAME = "demo-oem"
FACTORY_NAME = "factory-1"
JOB_ID = "demo-job-1"
FLASH_DIR = "flash"  # the first station's chips' installed images, <device_id>.img
IMAGE_ID = "fw-sensor-1"
DEVICE_CLASS = "sensor-v1"
FIRST_UID = 0x5EC0_0000_0000_0000


class DemoStepError(Error):
    """A party's step failed inside the demo; the message is that step's own error line."""


def child_env() -> dict[str, str]:
    """The environment for a party's process: no SoftHSM config, no PINs from outside."""
    return {
        k: v
        for k, v in os.environ.items()
        if k != "SOFTHSM2_CONF" and not k.startswith(("SECURETHREAD_PIN_", "SECURETHREAD_SO_PIN_"))
    }


def officer_pin_file(root: Path, officer: int) -> Path:
    """Where the demo keeps officer ``officer``'s PIN: outside the OEM's work directory."""
    return root / f"officer-{officer}" / "pin"


def prepare(workdir: str | os.PathLike[str]) -> Path:
    """Create ``workdir`` for the demo; refuse a directory the demo did not create.

    A directory holding the demo's marker is the demo's own: its parts are cleared and the
    demo starts over.  Anything else that exists and is not empty is refused untouched.
    """
    root = Path(workdir).resolve()
    if root.exists() and not root.is_dir():
        raise ConfigurationError(f"{str(root)!r} is not a directory")
    if root.exists() and any(root.iterdir()):
        if not (root / DEMO_MARKER).is_file():
            raise ConfigurationError(
                f"{str(root)!r} is not empty and was not created by securethread demo; "
                "refusing to touch it"
            )
        unexpected = sorted(p.name for p in root.iterdir()
                            if p.name not in (*PARTS, DEMO_MARKER) and not _station_dir(p.name))
        if unexpected:
            raise ConfigurationError(
                f"{str(root)!r} holds files the demo did not create ({', '.join(unexpected)}); "
                "refusing to touch it"
            )
        for part in [*PARTS, *(p.name for p in root.iterdir() if _station_dir(p.name))]:
            shutil.rmtree(root / part, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("created by securethread demo\n")
    (root / "courier").mkdir()
    return root


def _station_dir(name: str) -> bool:
    """``station-K``: a station's directory (:func:`_run_stations`)."""
    return name.startswith("station-") and name[len("station-"):].isdigit()


class _Sites:
    """Runs each party's CLI steps in its own process; carries files between them."""

    def __init__(self, root: Path, log: Callable[[str], None] | None) -> None:
        self.root = root
        self.log = log or (lambda _m: None)
        self.env = child_env()
        self.carried: list[str] = []
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the chain started, as the summaries print them."""
        return round(time.monotonic() - self.t0, 2)

    def run(self, party: str, *args: str) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "securethread.cli", party, *args, "--json"]
        self.log(f"[{party}] securethread {party} {' '.join(args)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.root)
        return self._result(party, args, proc.returncode, proc.stdout, proc.stderr)

    def start(self, party: str, *args: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "securethread.cli", party, *args, "--json"]
        self.log(f"[{party}] securethread {party} {' '.join(args)} &")
        return subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.root,
        )

    def start_appliance(self, *, stations: bool) -> tuple[subprocess.Popen[str], str | None]:
        """``appliance serve`` in the background, once it listens on :data:`SOCKET` (and,
        with ``stations``, serves the station API on 127.0.0.1: its address is returned)."""
        (self.root / "run").mkdir(exist_ok=True)
        extra = ["--stations", "127.0.0.1:0"] if stations else []
        cmd = [sys.executable, "-m", "securethread.cli", "appliance", "serve",
               "--state", "factory", "--socket", SOCKET, *extra]  # fmt: skip
        self.log(f"[appliance] securethread appliance serve --state factory --socket {SOCKET} "
                 f"{' '.join(extra)} &")  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env,
            cwd=self.root,
        )  # fmt: skip
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if not line.startswith("appliance serving "):
            proc.kill()
            rest = (line + proc.stderr.read()).strip().splitlines()
            raise DemoStepError(f"the appliance did not start: {(rest or ['no output'])[-1]}")
        api = line.strip().rpartition("; stations on ")[2] if "; stations on " in line else None
        return proc, api

    def stop_appliance(self, proc: subprocess.Popen[str]) -> None:
        """SIGTERM: the appliance finishes what it does and exits 0."""
        if proc.poll() is None:
            proc.terminate()
        try:
            _out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise DemoStepError("the appliance did not stop within 120 s of SIGTERM") from None
        if proc.returncode != 0:
            why = err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}"
            raise DemoStepError(f"the appliance stopped badly: {why}")

    def finish(
        self, party: str, args: Sequence[str], proc: subprocess.Popen[str]
    ) -> dict[str, Any]:
        out, err = proc.communicate(timeout=600)
        return self._result(party, args, proc.returncode, out, err)

    def _result(
        self, party: str, args: Sequence[str], code: int, out: str, err: str
    ) -> dict[str, Any]:
        result = _answer(out)
        if code != 0:
            raise DemoStepError(f"{party} {' '.join(args[:1])} failed: {_why(code, err)}")
        return result

    def expect_refused(self, party: str, *args: str, counted: str, what: str) -> dict[str, Any]:
        """Run a step that must refuse every chip it is given: exit 4 (verification) with
        ``counted`` 0 in its answer, else :class:`DemoStepError` naming ``what``; the answer."""
        proc = self.start(party, *args)
        out, err = proc.communicate(timeout=600)
        result = _answer(out)
        if proc.returncode != 4 or result.get(counted) != 0:
            raise DemoStepError(f"{what} not refused: {_why(proc.returncode, err)}")
        return result

    def carry(self, src: Path, to: str) -> Path:
        """Copy ``src`` (an outbox file) into party ``to``'s inbox, as a courier would."""
        inbox = self.root / to / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        dst = inbox / src.name
        shutil.copyfile(src, dst)
        rel = f"{src.relative_to(self.root)} -> {dst.relative_to(self.root)}"
        self.carried.append(rel)
        with open(self.root / "courier" / "log.txt", "a") as f:
            f.write(rel + "\n")
        return dst

    # The steps every chain begins with, the same for each mode.

    def oem_init(self) -> str:
        """flow 1: ``oem init`` with the demo's officers, each new PIN in that officer's own
        file only; the root fingerprint (read to the other parties over the phone)."""
        officers = [f"{n}={officer_pin_file(self.root, n)}" for n in range(1, OFFICERS + 1)]
        init = self.run(
            "oem", "init", "--workdir", "oem", "--name", OEM_NAME,
            *(arg for o in officers for arg in ("--officer-pin-file", o)),
        )  # fmt: skip
        return str(init["root_fingerprint"])

    def vendor_ca(self) -> Path:
        """The silicon vendor takes the OEM's order (chips burnt with the OEM root's hash);
        its device-identity CA goes to the OEM, who names it in what it issues (the line
        accepts chips of the fabs the OEM signed for, never one the operator brings): the
        OEM's copy."""
        order = self.carry(self.root / "oem" / "root-ca.pem", "vendor")
        self.run("vendor", "init", "--workdir", "vendor", "--oem-root", str(order))
        return self.carry(self.root / "vendor" / "root-ca.pem", "oem")

    def master_image(self, size: int) -> None:
        """flow 3 at the OEM: ``size`` random bytes of firmware mastered as image
        :data:`IMAGE_ID` for :data:`DEVICE_CLASS`."""
        firmware = self.root / "oem" / "firmware.bin"
        firmware.write_bytes(os.urandom(size))
        self.run(
            "oem", "master-image", "--workdir", "oem", str(firmware), "--image-id", IMAGE_ID,
            "--version", "1.0.0", "--security-counter", "3", "--device-class", DEVICE_CLASS,
        )  # fmt: skip

    def issue_job(self, spec: Path, *extra: str) -> dict[str, Any]:
        """flow 6 at the OEM: the job of ``spec`` drafted, approved by each officer in a
        process of their own with only their own PIN file (M-of-N), issued; the answer of
        the issuing ``issue-job``."""
        draft = self.run("oem", "issue-job", "--workdir", "oem", str(spec), *extra)
        job_id = draft["job"]
        for n in range(1, OFFICERS + 1):
            self.run(
                "oem", "approve-job", "--workdir", "oem", "--job", job_id, "--officer", str(n),
                "--pin-file", str(officer_pin_file(self.root, n)), "--job-hash",
                draft["job_sha256"],
            )  # fmt: skip
        return self.run("oem", "issue-job", "--workdir", "oem", "--job", job_id)


def _answer(out: str) -> dict[str, Any]:
    """A step's ``--json`` answer: the last JSON line of its output (none: empty)."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _why(code: int, err: str) -> str:
    """A failed step's reason: the last line it printed on stderr, or its exit code."""
    return err.strip().splitlines()[-1] if err.strip() else f"exit code {code}"


def log_stderr(message: str) -> None:
    """The chains' default log: each step's command line on stderr."""
    print(message, file=sys.stderr, flush=True)


def begin(
    mode: str, workdir: str | os.PathLike[str], devices: int, log: Callable[[str], None] | None
) -> _Sites:
    """Chain ``mode`` starts: ``devices`` checked, then ``workdir`` prepared
    (:func:`prepare`: nothing is made for a refused count) and its parties' runner."""
    if devices < 1:
        raise ConfigurationError(f"--devices must be at least 1 (--mode {mode})")
    return _Sites(prepare(workdir), log)


@attrs.frozen(kw_only=True)
class ModeResult:
    """What a mode's chain did (``demo --mode fab|zero-secret``): these fields and its own."""

    MODE: ClassVar[str]

    ok: bool
    workdir: str
    devices: int
    carried: tuple[str, ...]
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self) | {"carried": list(self.carried), "mode": self.MODE}


def job_spec(
    quota: int, targets: int, *, vendor: str, job_id: str = JOB_ID, first_uid: int = FIRST_UID
) -> str:
    """The demo's job spec (TOML, docs/cli.md): ``targets`` chip UIDs from ``first_uid``."""
    last = first_uid + targets - 1
    return (
        f'job_id = "{job_id}"\nprogrammer = "{FACTORY_NAME}"\nimage = "{IMAGE_ID}"\n'
        f'quota = {quota}\nvendors = ["{vendor}"]\n\n[targets]\n'
        f'ranges = [["{first_uid:016x}", "{last:016x}"]]\n\n[window]\ndays = 7\n\n'
        '[certificate]\norganisation = "Demo OEM Ltd"\nproduct = "sensor-v1"\n'
        'common_name = "{device_id}"\n'
        # RFC 5612's enterprise number for documentation (a real OEM gives its own arc) and
        # RFC 2606 names: what a relying party reads from a device (docs/pki.md)
        'oem_arc = "1.3.6.1.4.1.32473.1"\n'
        'uri = "https://devices.demo-oem.example/sensor-v1/{device_id}"\n'
        f'crl_url = "http://pki.demo-oem.example/crl/{job_id}.crl"\n'
        'ocsp_url = "http://ocsp.demo-oem.example/"\n'
    )


def run_demo(
    workdir: str | os.PathLike[str],
    *,
    devices: int = 100,
    workers: int = 1,
    stations: int = 2,
    firmware_size: int = 256 << 10,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole chain of trust across the two sites; return the summary.

    ``stations`` station processes (``securethread station run``) share the job through the
    appliance's station API; with 0 the appliance runs the in-process line
    (``programmer provision --appliance``, ``workers`` processes)."""
    if devices < 1 or workers < 1 or stations < 0:
        raise ConfigurationError(
            "--devices and --workers must be at least 1, --stations at least 0"
        )
    stations = min(stations, devices)  # a station drives at least one chip
    root = prepare(workdir)
    t0 = time.monotonic()
    s = _Sites(root, log)

    # flow 1 and 2: the OEM's ceremony (each officer's new PIN goes to that officer's own
    # file only); the factory enrols; certificates go back.
    root_fp = s.oem_init()
    s.run("appliance", "init", "--state", "factory", "--name", FACTORY_NAME)
    appliance, station_api = s.start_appliance(stations=stations > 0)
    try:
        return _with_appliance(
            s, root, root_fp, devices, workers, firmware_size, t0, stations, station_api
        )
    finally:
        s.stop_appliance(appliance)


def _with_appliance(
    s: _Sites, root: Path, root_fp: str, devices: int, workers: int, firmware_size: int,
    t0: float, stations: int, station_api: str | None,
) -> dict[str, Any]:
    oem, fac, ops = root / "oem", root / "factory", root / "operator" / "outbox"
    app = ("--appliance", SOCKET, "--outbox", "operator/outbox")
    enrol = s.run("programmer", "enrol", *app)
    request = s.carry(ops / "enrolment-request.bin", "oem")
    # The fingerprint travels out of band (read over the phone): the demo passes it on.
    s.run(
        "oem",
        "certify-programmer",
        "--workdir",
        "oem",
        str(request),
        "--fingerprint",
        enrol["fingerprint"],
    )
    bundle = s.carry(oem / "outbox" / f"certificates-{FACTORY_NAME}.bin", "factory")
    s.run(
        "programmer",
        "install-certs",
        *app,
        str(bundle),
        "--root-fingerprint",
        root_fp,
    )

    # The silicon vendor takes the OEM's order; its CA goes to the OEM, who names it in the job.
    vendor_ca = s.vendor_ca()

    # flow 3: mastering at the OEM.
    s.master_image(firmware_size)

    # flows 4-5: the key channel over TCP on 127.0.0.1.
    args = ("receive-keys", *app, "--listen", "127.0.0.1:0", "--timeout", "60")
    receiver = s.start("programmer", *args)
    port = _listening_port(receiver)
    sent = s.run(
        "oem", "send-keys", "--workdir", "oem", "--to", FACTORY_NAME, "--image", IMAGE_ID,
        "--connect", f"127.0.0.1:{port}",
    )  # fmt: skip
    received = s.finish("programmer", args, receiver)

    # flow 6: the job.
    s.run("programmer", "request-ca", *app, "--job", JOB_ID)
    ca_request = s.carry(ops / f"production-ca-request-{JOB_ID}.bin", "oem")
    spec = oem / f"{JOB_ID}.toml"
    spec.write_text(job_spec(devices, devices, vendor=str(vendor_ca)))
    # M-of-N: each officer approves in a process of their own, with their own PIN file only.
    issued = s.issue_job(spec, "--ca-request", str(ca_request))
    package = s.carry(oem / "outbox" / f"job-{JOB_ID}.bin", "factory")
    image = s.carry(oem / "outbox" / f"image-{IMAGE_ID}.enc", "factory")
    s.run("programmer", "open-job", *app, str(package), "--image", str(image))
    # The production CA certified the OEM's OCSP responder key at open-job (docs/pki.md).
    responder = s.carry(ops / f"ocsp-responder-{JOB_ID}.pem", "oem")
    s.run("oem", "install-responder", "--workdir", "oem", str(responder), "--job", JOB_ID)

    # flows 7-8: the line -- stations, each a process of its own with its own certificate,
    # sharing the job's quota through the station API; or the appliance's in-process line.
    if stations and station_api is not None:
        prov = _run_stations(s, root, app, devices, stations, station_api)
    else:
        prov = s.run(
            "programmer", "provision", *app, "--job", JOB_ID, "--chips-from",
            str(root / "vendor"), "--devices", str(devices), "--workers", str(workers),
            "--progress", "none",
        )  # fmt: skip

    # flow 9: the ledger goes back; the OEM reconciles against the job it issued.
    status = s.run("programmer", "status", *app)
    s.run("programmer", "close-job", *app, "--job", JOB_ID)
    ledger = s.carry(ops / f"ledger-{JOB_ID}.bin", "oem")
    rec = s.run("oem", "reconcile", "--workdir", "oem", str(ledger), "--job", JOB_ID)
    # The field: every reconciled device into the OEM's registry (oem ocsp answers from it).
    registry = s.run("oem", "registry", "ingest", "--workdir", "oem", str(ledger), "--job", JOB_ID)

    # An auditor with public files only.
    transcripts = {}
    for party, cert in (
        ("oem", oem / "oem-identity.pem"),
        ("factory", fac / "certs" / "identity.pem"),
    ):
        v = s.run(
            "audit", "verify-transcript", str(root / party / "transcript.bin"), "--cert", str(cert)
        )
        transcripts[party] = {"records": v["records"], "head": v["head"]}
    # ... the ledger of the programmer the OEM certified (its identity from the OEM's records)
    s.run(
        "audit", "verify-ledger", str(ledger), "--programmer-cert",
        str(oem / "programmers" / FACTORY_NAME / "identity.pem"), "--ledger-cert",
        str(fac / "certs" / "ledger-signing.pem"), "--root", str(oem / "root-ca.pem"),
    )  # fmt: skip

    elapsed = round(time.monotonic() - t0, 2)
    ok = prov.get("ok", False) and rec.get("ok", False)
    summary: dict[str, Any] = {
        "ok": bool(ok),
        "workdir": str(root),
        "oem": str(oem),
        "factory": str(fac),
        "vendor": str(root / "vendor"),
        "job": JOB_ID,
        "devices": devices,
        "workers": workers,
        "stations": stations,
        "flash": str(root / FLASH_DIR) if stations else None,
        "appliance": {"socket": str(root / SOCKET), "state": str(fac),
                      "jobs": status.get("jobs")},  # fmt: skip
        "provisioned": prov.get("provisioned"),
        "booted": prov.get("booted"),
        "quota": rec.get("quota"),
        "quota_used": rec.get("quota_used"),
        "devices_per_s": prov.get("devices_per_s"),
        "reconciled": bool(rec.get("ok")),
        "registry": {"devices": registry.get("devices"), "ingested": registry.get("ingested")},
        "key_channel": {"port": port, "session": sent.get("session"), "ack": received.get("ok")},
        "approvals": issued.get("approvals"),
        "transcripts": transcripts,
        "carried": s.carried,
        "elapsed_s": elapsed,
    }
    summary["lines"] = [
        f"two-site demo in {root} ({elapsed} s)",
        f"  OEM {OEM_NAME!r}: {oem}",
        f"  programming centre {FACTORY_NAME!r}: appliance on {root / SOCKET} "
        f"(state {fac}, 0700); operators' outbox {ops}",
        f"  silicon vendor (simulated): {root / 'vendor'}",
        f"  files carried between the sites: {len(s.carried)} (see courier/log.txt); "
        f"key channel: TCP 127.0.0.1:{port}",
        f"  line: {stations} station process(es) over the station API on {station_api}"
        if stations
        else "  line: the appliance's in-process line (programmer provision --appliance)",
        *(
            [f"  installed images of station-1's chips (imgtool verify): {root / FLASH_DIR}"]
            if stations
            else []
        ),
        f"  job {JOB_ID}: {prov.get('provisioned')} provisioned, {prov.get('booted')} booted "
        f"({prov.get('devices_per_s')} devices/s), "
        f"quota {rec.get('quota_used')} of {rec.get('quota')}; approved by officers "
        f"{', '.join(map(str, issued.get('approvals') or []))}, each in a process of their own",
        f"  reconciled by the OEM: {'yes' if rec.get('ok') else 'NO'}; ledger and both transcripts "
        "verified offline",
        f"  OEM registry: {registry.get('devices')} devices of job {JOB_ID}; OCSP responder "
        f"certificate installed ('securethread oem ocsp --workdir {oem} --listen HOST:PORT')",
        *(
            f"  {p} transcript head: #{t['records'] - 1} {t['head']}"
            for p, t in transcripts.items()
        ),
    ]
    return summary


def _run_stations(
    s: _Sites, root: Path, app: Sequence[str], devices: int, stations: int, api: str
) -> dict[str, Any]:
    """K station processes share the job: each gets a key, a certificate from the appliance
    (``programmer add-station``), and its share of the chips; all run at once."""
    share = [devices // stations + (1 if k < devices % stations else 0) for k in range(stations)]
    procs, args_of = [], []
    first = FIRST_UID
    for k in range(1, stations + 1):
        name, d = f"station-{k}", root / f"station-{k}"
        d.mkdir(exist_ok=True)
        s.run("station", "keygen", "--name", name, "--key", str(d / "key.pem"),
              "--csr", str(d / "station.csr"))  # fmt: skip
        s.run("programmer", "add-station", *app, str(d / "station.csr"), "--name", name)
        for f in (f"station-{name}.pem", "station-ca.pem"):
            shutil.copyfile(root / "operator" / "outbox" / f, d / f)
        # the first station keeps its chips' installed images, for imgtool (docs/station.md)
        keep = ("--keep-flash", str(root / FLASH_DIR)) if k == 1 else ()
        args = ("run", "--appliance", api, "--cert", str(d / f"station-{name}.pem"),
                "--key", str(d / "key.pem"), "--ca", str(d / "station-ca.pem"),
                "--job", JOB_ID, "--chips-from", str(root / "vendor"),
                "--devices", str(share[k - 1]), "--first-device", str(first), *keep)  # fmt: skip
        first += share[k - 1]
        args_of.append(args)
        procs.append(s.start("station", *args))
    results = [s.finish("station", a, p) for a, p in zip(args_of, procs, strict=True)]
    provisioned = sum(int(r.get("provisioned", 0)) + int(r.get("recovered", 0)) for r in results)
    programmed = sum(int(r.get("programmed", 0)) for r in results)
    rates = [r.get("devices_per_s") for r in results]
    return {
        "ok": all(r.get("ok") for r in results),
        "provisioned": provisioned,
        "booted": programmed,
        "devices_per_s": round(sum(x for x in rates if x), 1) or None,
        "stations": [{"station": f"station-{k + 1}", **r} for k, r in enumerate(results)],
    }


def _listening_port(proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """The port a ``receive-keys --listen 127.0.0.1:0`` process reports on stderr."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if line.startswith("listening on "):
            return int(line.rsplit(":", 1)[1])
    proc.kill()
    out, err = proc.communicate()
    why = (err or out).strip().splitlines()[-1:] or ["no output"]
    raise DemoStepError(f"programmer receive-keys did not start listening: {why[0]}")
