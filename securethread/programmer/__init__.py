"""What runs at the programming centre, inside the programmer appliance (its token and the
one process that holds its PIN): one module per step.

=====================  ===========================================  ==========================
step                   module                                       CLI
=====================  ===========================================  ==========================
enrolment              :mod:`~securethread.programmer.enrolment`    ``programmer init``,
                                                                    ``enrol``, ``install-certs``
receiving keys         :mod:`~securethread.programmer.keys`         ``receive-keys``,
                                                                    ``open-keys``
jobs                   :mod:`~securethread.programmer.jobs`         ``request-ca``,
                                                                    ``open-job``, ``close-job``
revocation             :mod:`~securethread.programmer.revoke`       ``revoke``
the production line    :mod:`~securethread.programmer.provision`    ``provision``
                       (:mod:`.line`, :mod:`.runner`, :mod:`.store`)
=====================  ===========================================  ==========================
"""

from securethread.programmer.enrolment import enrol, init, install_certs
from securethread.programmer.jobs import close_job, open_job, request_ca
from securethread.programmer.keys import open_keys, receive_keys
from securethread.programmer.provision import job_targets, provision
from securethread.programmer.revoke import revoke

__all__ = [
    "close_job",
    "enrol",
    "init",
    "install_certs",
    "job_targets",
    "open_job",
    "open_keys",
    "provision",
    "receive_keys",
    "request_ca",
    "revoke",
]
