"""What runs at the OEM, with the OEM's tokens: one module per ceremony step.

=====================  =======================================  ==========================
step                   module                                   CLI
=====================  =======================================  ==========================
key ceremony           :mod:`~securethread.oem.ceremony`        ``oem init``
onboarding             :mod:`~securethread.oem.onboarding`      ``oem certify-programmer``
mastering              :mod:`~securethread.oem.mastering`       ``oem master-image``
sending keys           :mod:`~securethread.oem.keys`            ``oem send-keys``,
                                                                ``seal-keys``, ``confirm-keys``
jobs                   :mod:`~securethread.oem.jobs`            ``oem issue-job``,
                                                                ``approve-job`` (an officer)
reconciliation         :mod:`~securethread.oem.reconcile`       ``oem reconcile``
joint reconciliation   :mod:`~securethread.oem.joint`           ``oem reconcile-joint``
revocation             :mod:`~securethread.oem.revoke`          ``oem revoke``
=====================  =======================================  ==========================

Every step takes the OEM's work directory (:mod:`securethread.oem.layout`) and what it
received from another party as a file; it verifies what it received before acting.
"""

from securethread.oem.ceremony import init
from securethread.oem.jobs import approve_job, issue_job, prepare_job
from securethread.oem.joint import reconcile_joint
from securethread.oem.keys import confirm_keys, seal_keys, send_keys
from securethread.oem.mastering import master_image
from securethread.oem.onboarding import certify_programmer
from securethread.oem.reconcile import reconcile
from securethread.oem.revoke import revoke

__all__ = [
    "approve_job",
    "certify_programmer",
    "confirm_keys",
    "init",
    "issue_job",
    "master_image",
    "prepare_job",
    "reconcile",
    "reconcile_joint",
    "revoke",
    "seal_keys",
    "send_keys",
]
