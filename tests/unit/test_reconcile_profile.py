"""Reconciliation checks every device certificate against the job's signed device profile.

The production-CA key is in the programmer's token, so its PIN holder can mint a genuine
certificate of the job with other content -- say an OCSP URL of its own responder, or
another name -- and put it in the ledger.  Chain, job tag and serial all check; only the
profile the officers signed tells it apart.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from securethread.errors import LedgerError
from securethread.pki import DeviceCertificateIssuer, ProfileMismatchError

from .ledger_world import JOB_ID, World, device_profile, make_world


@pytest.fixture(scope="module")
def world() -> World:
    return make_world("profile")


@pytest.mark.parametrize(
    "change",
    [
        {"ocsp_url": "http://ocsp.rogue.example/"},
        {"crl_url": "http://crl.rogue.example/job.crl"},
        {"uri_template": "https://devices.rogue.example/{device_id}"},
        {"product": "not-this-product"},
        {"oem_arc": "1.3.6.1.4.1.32473.66"},
    ],
)
def test_a_certificate_minted_under_another_profile_is_named(
    world: World, change: dict[str, Any]
) -> None:
    profile = attrs.evolve(device_profile(world.pca), **change)
    if "oem_arc" in change:  # the issuer itself refuses a CA without that arc's policy
        with pytest.raises(ProfileMismatchError, match="policies"):
            DeviceCertificateIssuer(
                world.backend.private_key("pca"), world.pca, job_id=JOB_ID,
                job_tag=world.job_id, profile=profile,
            )  # fmt: skip
        return
    minted = DeviceCertificateIssuer(
        world.backend.private_key("pca"), world.pca, job_id=JOB_ID, job_tag=world.job_id,
        profile=profile,
    )  # fmt: skip
    recs = [world.provisioned(0), world.provisioned(1, issuer=minted)]
    with pytest.raises(LedgerError, match="ledger record 1.*not the job's") as exc:
        world.check(world.items(recs))
    assert exc.value.index == 1
    # the same record from the job's own profile reconciles
    world.check(world.items([world.provisioned(0), world.provisioned(1)]))
