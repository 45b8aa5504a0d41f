"""The end-to-end production demo on the embedded default (SoftHSM tokens + SQLite).

It runs the whole chain of trust in a work directory: OEM key ceremony, programmer
onboarding, image mastering, secure channel and key transfer, a signed job with quota N, N
simulated devices provisioned and programmed (in K worker processes), three more refused
for quota, one outside the targets refused, one tampered image refused by a device's SBM,
the ledger reconciled and both ceremony transcripts verified.

Each of those is one step of :mod:`securethread.ceremony` (the ``securethread`` command
runs the same steps one by one); :func:`run_demo` is just their sequence plus the summary.
The names workers and benchmarks import from here (labels, ``LineConfig``, ``open_line``,
``run_worker``, ``make_chips``...) live in :mod:`securethread.ceremony`.

Work directory layout (see README): ``hsm/`` (SoftHSM config, tokens, demo PINs),
``oem/`` (root and identity certificates, officer-key bundle, firmware, encrypted image,
manifest, job, OEM transcript), ``programmer/`` (certificates, production database, transcript),
``job/`` (production CA, device certificates, ledger export, reconciliation report),
``vendor/`` (the simulated silicon vendor), ``minutes.txt`` (transcript anchors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from . import ceremony
from .ceremony import (
    DEVICE_BASE,
    DEVICE_CLASS,
    IMAGE_ID,
    JOB_ID,
    L_FW,
    L_IMAGE,
    L_KA,
    L_LEDGER,
    L_LICENSE,
    L_OEM_ID,
    L_OFFICERS,
    L_PCA,
    L_PROG_ID,
    L_ROOT,
    MARKER,
    OFFICERS_KIND,
    ChipSpec,
    LineConfig,
    ProvisionProgress,
    _Port,
    _worker_entry,
    make_chips,
    open_line,
    run_worker,
)
from .errors import ConfigurationError, Error, NotTargetedError, QuotaExceededError

#: Chips beyond the quota inside the job's targets, offered to show quota refusals.
OVER_QUOTA = 3


def run_demo(
    workdir: str | os.PathLike[str],
    *,
    devices: int,
    workers: int = 1,
    firmware_size: int = 256 << 10,
    progress: Callable[[str], None] = lambda _msg: None,
    setup_hook: Callable[[LineConfig, list[ChipSpec], list[ChipSpec]], None] | None = None,
    device_progress: Callable[[ProvisionProgress], None] | None = None,
) -> dict[str, Any]:
    """Run the whole chain, step by step (:mod:`securethread.ceremony`); return the summary.

    ``setup_hook`` (tests, benchmarks) receives the line configuration and the chips once
    everything up to the job exists, and the demo stops there.  ``device_progress`` is
    called as devices go through provisioning and programming.
    """
    if devices < 1:
        raise ConfigurationError("--devices must be at least 1")
    if workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    work = ceremony.check_new_workdir(workdir)
    n_in_targets = devices + OVER_QUOTA

    progress("OEM key ceremony")
    ceremony.oem_init(work, restart=True)
    progress("programmer onboarding")
    ceremony.onboard_programmer(work)
    progress("image mastering")
    ceremony.master_image(work, firmware_size=firmware_size)
    progress("secure channel and key transfer")
    ceremony.transfer_keys(work)
    progress("production job")
    ceremony.issue_job(work, quota=devices, targets=n_in_targets)

    if setup_hook is not None:
        cfg = ceremony.line_config(work)
        vendor = ceremony.silicon_vendor(work)
        chips = make_chips(vendor, [DEVICE_BASE + i for i in range(n_in_targets)])
        outsider = make_chips(vendor, [DEVICE_BASE + n_in_targets + 1000])
        setup_hook(cfg, chips, outsider)
        return {"setup": True, "workdir": str(work)}

    progress(f"provisioning {devices} devices (+4 to be refused) with {workers} worker(s)")
    run = ceremony.provision(
        work,
        devices=n_in_targets,
        outsiders=1,
        tamper_first=True,
        workers=workers,
        progress=device_progress,
    ).details

    progress("reconciliation")
    ceremony.export_ledger(work)
    report = ceremony.reconcile(work).details
    ceremony.verify_transcripts(work)

    refused = dict(run["refused"])
    provisioned, booted, prov_s = run["provisioned"], run["booted"], run["provision_s"]
    summary = {
        "devices_requested": devices,
        "provisioned": provisioned,
        "booted": booted,
        "quota": devices,
        "workers": workers,
        "refused_over_quota": refused.get(QuotaExceededError.__name__, 0),
        "refused_not_targeted": refused.get(NotTargetedError.__name__, 0),
        "refused_other": {
            k: v
            for k, v in refused.items()
            if k not in (QuotaExceededError.__name__, NotTargetedError.__name__)
        },
        "tampered_rejected": run["tampered_rejected"],
        "ledger_verified": True,
        "ledger_records": report["records"],
        "reconciled": report["provisioned"] == provisioned and report["programmed"] == booted,
        "transcripts_verified": True,
        "devices_per_s": round(provisioned / prov_s, 1) if prov_s else None,
        "elapsed_s": run["elapsed_s"],
        "workdir": str(work),
    }
    (work / ceremony.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = [
    "DEVICE_BASE",
    "DEVICE_CLASS",
    "IMAGE_ID",
    "JOB_ID",
    "L_FW",
    "L_IMAGE",
    "L_KA",
    "L_LEDGER",
    "L_LICENSE",
    "L_OEM_ID",
    "L_OFFICERS",
    "L_PCA",
    "L_PROG_ID",
    "L_ROOT",
    "MARKER",
    "OFFICERS_KIND",
    "ChipSpec",
    "Error",
    "LineConfig",
    "_Port",
    "_worker_entry",
    "make_chips",
    "open_line",
    "run_demo",
    "run_worker",
]
