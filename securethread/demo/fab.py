"""The fab demo: ``securethread demo --mode fab --devices N --workdir DIR`` (issue 20).

Provisioning moves to the silicon vendor's fab; programming stays at the programming centre.
The same programmer software runs at both sites, each with its own token, onboarded by the
OEM the same way; the OEM issues the fab a *provision* job (targets, quota, a production CA in
the fab's token, no image and no image key) and the programming centre a *program* job that
names the provisioning job and carries the image, and at the end reconciles both ledgers
together.  Every step is a ``securethread`` process of its own with only its party's files
(the two-site demo's :class:`~securethread.demo._Sites`, whose first steps -- the OEM's
ceremony, the vendor's order, mastering, M-of-N issue -- every chain shares); files are
carried between the parties' ``inbox/`` directories as a courier would::

    DIR/oem/        the OEM's work directory (its SoftHSM tokens and PIN file)
    DIR/fab/        the silicon vendor's appliance (``programmer --workdir``: its token, PIN,
                    job store, transcript)
    DIR/factory/    the programming centre's appliance (the same, its own token)
    DIR/vendor/     the simulated fab's chips: its CA, and each part's OTP once the fab's
                    line provisioned it (``otp/<uid>.bin``) -- the parts as they travel to
                    the programming centre
    DIR/courier/    a log of every file carried between the parties

Both appliances run in direct mode (``programmer --workdir``), the simplest honest setup for
chips that must carry their OTP from one site to the next (the two-site demo shows the
appliance service and its stations).  The programming centre is also shown a chip the fab
never provisioned: it is refused (it carries no OEM device certificate) and nothing is counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import attrs

from securethread.demo import (  # the demo's image, device class and chip UIDs
    DEVICE_CLASS,
    FIRST_UID,
    IMAGE_ID,
    DemoStepError,
    ModeResult,
    _Sites,
    begin,
    child_env,
    log_stderr,
)

__all__ = ["FabDemoResult", "run", "token_labels"]

FAB = "fab-1"
FACTORY = "factory-1"
PROVISION_JOB = "lot-1-provision"
PROGRAM_JOB = "lot-1-program"


@attrs.frozen(kw_only=True)
class FabDemoResult(ModeResult):
    """What the fab demo did, party by party."""

    MODE: ClassVar[str] = "fab"

    provisioned: int
    fab_quota_used: int
    licensed: int
    programmed: int
    factory_quota_used: int
    blank_refused: int
    reconciliation: dict[str, Any]
    fab_image_keys: int

    @property
    def lines(self) -> list[str]:
        r = self.reconciliation
        return [
            f"fab demo in {self.workdir} ({self.elapsed_s} s)",
            f"  silicon vendor's appliance {FAB!r}: provision job {PROVISION_JOB}, "
            f"{self.provisioned} chips identified against its vendor CA and certified "
            f"(quota {self.fab_quota_used} of {self.devices}); image keys in its token: "
            f"{self.fab_image_keys}",
            f"  programming centre's appliance {FACTORY!r}: program job {PROGRAM_JOB}, "
            f"{self.licensed} chips identified by their OEM device certificates, licensed and "
            f"{self.programmed} programmed (quota {self.factory_quota_used} of {self.devices}); "
            "no certificate issued",
            f"  a chip the fab never provisioned: refused by the programming centre "
            f"({self.blank_refused}), nothing counted",
            f"  OEM joint reconciliation: {'yes' if r.get('reconciled') else 'NO'} -- "
            f"{r.get('provisioned')} provisioned, {r.get('programmed')} programmed, "
            f"{r.get('provisioned_not_programmed')} provisioned and not programmed",
            f"  files carried between the sites: {len(self.carried)} (courier/log.txt)",
        ]


def _provision_spec(devices: int, vendor_ca: Path) -> str:
    last = FIRST_UID + devices  # one more target than the quota: the blank chip below
    return (
        f'job_id = "{PROVISION_JOB}"\nprogrammer = "{FAB}"\nstage = "provision"\n'
        f'device_class = "{DEVICE_CLASS}"\nquota = {devices}\nvendors = ["{vendor_ca}"]\n'
        f'[targets]\nranges = [["{FIRST_UID:016x}", "{last:016x}"]]\n[window]\ndays = 7\n'
    )


def _program_spec(devices: int) -> str:
    last = FIRST_UID + devices
    return (
        f'job_id = "{PROGRAM_JOB}"\nprogrammer = "{FACTORY}"\nstage = "program"\n'
        f'image = "{IMAGE_ID}"\nquota = {devices}\nprovisioned_by = ["{PROVISION_JOB}"]\n'
        f'[targets]\nranges = [["{FIRST_UID:016x}", "{last:016x}"]]\n[window]\ndays = 7\n'
    )


def _onboard(s: _Sites, root: Path, site: str, name: str, root_fp: str) -> None:
    """A programmer installation onboarded by the OEM (the same for the fab and the factory)."""
    s.run("programmer", "init", "--workdir", site, "--name", name)
    enrol = s.run("programmer", "enrol", "--workdir", site)
    request = s.carry(root / site / "outbox" / "enrolment-request.bin", "oem")
    # The fingerprint travels out of band (read over the phone): the demo passes it on.
    s.run("oem", "certify-programmer", "--workdir", "oem", str(request), "--fingerprint",
          enrol["fingerprint"])  # fmt: skip
    bundle = s.carry(root / "oem" / "outbox" / f"certificates-{name}.bin", site)
    s.run("programmer", "install-certs", "--workdir", site, str(bundle), "--root-fingerprint",
          root_fp)  # fmt: skip


def run(
    workdir: str | Path, devices: int, *, log: Callable[[str], None] | None = log_stderr
) -> FabDemoResult:
    """Run the fab chain in ``workdir`` (made or reused as the two-site demo's)."""
    s = begin(FabDemoResult.MODE, workdir, devices, log)
    root = s.root
    oem = root / "oem"
    root_fp = s.oem_init()
    _onboard(s, root, "fab", FAB, root_fp)
    _onboard(s, root, "factory", FACTORY, root_fp)
    vendor_ca = s.vendor_ca()

    # At the fab: a provision job -- a production CA in the fab's token, no image, no key.
    s.run("programmer", "request-ca", "--workdir", "fab", "--job", PROVISION_JOB)
    ca_request = s.carry(root / "fab" / "outbox" / f"production-ca-request-{PROVISION_JOB}.bin",
                         "oem")  # fmt: skip
    spec = oem / f"{PROVISION_JOB}.toml"
    spec.write_text(_provision_spec(devices, vendor_ca))
    s.issue_job(spec, "--ca-request", str(ca_request))
    package = s.carry(oem / "outbox" / f"job-{PROVISION_JOB}.bin", "fab")
    s.run("programmer", "open-job", "--workdir", "fab", str(package))
    fab_run = s.run("programmer", "provision", "--workdir", "fab", "--job", PROVISION_JOB,
                    "--chips-from", "vendor", "--devices", str(devices),
                    "--progress", "none")  # fmt: skip
    s.run("programmer", "close-job", "--workdir", "fab", "--job", PROVISION_JOB)
    fab_ledger = s.carry(root / "fab" / "outbox" / f"ledger-{PROVISION_JOB}.bin", "oem")

    # At the OEM and the programming centre: the image, its key, a program job.
    s.master_image(64 << 10)
    sealed = oem / "outbox" / f"keys-{IMAGE_ID}-{FACTORY}.bin"
    s.run("oem", "seal-keys", "--workdir", "oem", "--to", FACTORY, "--image", IMAGE_ID,
          "--out", str(sealed))  # fmt: skip
    keys = s.carry(sealed, "factory")
    s.run("programmer", "open-keys", "--workdir", "factory", str(keys))
    receipts = sorted((root / "factory" / "outbox").glob("key-receipt-*.bin"))
    if not receipts:
        raise DemoStepError("programmer open-keys wrote no key receipt")
    s.run("oem", "confirm-keys", "--workdir", "oem", str(s.carry(receipts[-1], "oem")))
    spec = oem / f"{PROGRAM_JOB}.toml"
    spec.write_text(_program_spec(devices))
    s.issue_job(spec)  # no production-CA request: a program job certifies nothing
    package = s.carry(oem / "outbox" / f"job-{PROGRAM_JOB}.bin", "factory")
    image = s.carry(oem / "outbox" / f"image-{IMAGE_ID}.enc", "factory")
    s.run("programmer", "open-job", "--workdir", "factory", str(package), "--image", str(image))
    prog = s.run("programmer", "provision", "--workdir", "factory", "--job", PROGRAM_JOB,
                 "--chips-from", "vendor", "--devices", str(devices),
                 "--progress", "none")  # fmt: skip
    refused = s.expect_refused(
        "programmer", "provision", "--workdir", "factory", "--job", PROGRAM_JOB, "--chips-from",
        "vendor", "--first", str(devices), "--devices", "1", "--progress", "none",
        counted="provisioned", what="the chip the fab never provisioned was",
    )  # fmt: skip
    blank = sum(int(n) for n in (refused.get("refused") or {}).values())
    s.run("programmer", "close-job", "--workdir", "factory", "--job", PROGRAM_JOB)
    prog_ledger = s.carry(root / "factory" / "outbox" / f"ledger-{PROGRAM_JOB}.bin", "oem")

    # The OEM reconciles both ledgers together.
    rec = s.run("oem", "reconcile-joint", "--workdir", "oem", str(prog_ledger), "--job",
                PROGRAM_JOB, "--provisioned", f"{PROVISION_JOB}={fab_ledger}")  # fmt: skip
    image_keys = _image_keys(root / "fab")
    ok = (
        rec.get("reconciled") is True
        and rec.get("programmed") == devices
        and blank == 1
        and image_keys == 0
    )
    return FabDemoResult(
        ok=ok,
        workdir=str(root),
        devices=devices,
        provisioned=int(fab_run.get("provisioned", 0)),
        fab_quota_used=int(fab_run.get("quota_used", 0)),
        licensed=int(prog.get("provisioned", 0)),
        programmed=int(prog.get("programmed", 0)),
        factory_quota_used=int(prog.get("quota_used", 0)),
        blank_refused=blank,
        reconciliation={k: rec.get(k) for k in (
            "reconciled", "provisioned", "programmed", "provisioned_not_programmed")},
        fab_image_keys=image_keys,
        carried=tuple(s.carried),
        elapsed_s=s.elapsed(),
    )  # fmt: skip


def token_labels(site: Path) -> dict[str, list[str]]:
    """The labels of the secret and private keys in a programmer installation's token, read
    by a process of its own (its own module load and login, as the party's steps)."""
    code = (
        "import json, sys\nfrom pkcs11 import ObjectClass\n"
        "from securethread.programmer import layout as L\n"
        "t = L.open_programmer(sys.argv[1]).open_token(L.TOKEN)\n"
        "print(json.dumps({'secret': t.labels(ObjectClass.SECRET_KEY),"
        " 'private': t.labels(ObjectClass.PRIVATE_KEY)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True,
                          text=True, env=child_env())  # fmt: skip
    if proc.returncode != 0:
        raise DemoStepError(f"cannot list the keys of {str(site)!r}'s token: "
                            f"{proc.stderr.strip()[-200:]}")  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _image_keys(site: Path) -> int:
    """Image keys in an appliance's token (a fab's must hold none: it can mint, not
    license)."""
    return sum(label.startswith("image-") for label in token_labels(site)["secret"])


if __name__ == "__main__":  # pragma: no cover - by hand: python -m securethread.demo.fab DIR N
    result = run(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    print("\n".join(result.lines))
    print(json.dumps(result.to_json(), sort_keys=True))
