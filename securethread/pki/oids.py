"""The project's object identifier arc and everything allocated under it.

The arc is UUID-derived (ITU-T X.667 / RFC 4122 §4.1: ``2.25.<UUID as integer>``), so it is
globally unique without registration.  UUID ``9bbebe0d-e90d-4209-9d7b-977fd9d79e66``.
Layout (documented in docs/pki.md; never reuse a number):

* ``ARC.1.n`` key purposes (ExtendedKeyUsage, RFC 5280 §4.2.1.12), one per kind of certificate
* ``ARC.2.n`` name attribute types used in subject names (RFC 5280 §4.1.2.6)
* ``ARC.3.n`` certificate policies (RFC 5280 §4.2.1.4) marking the role of a CA certificate
"""

from __future__ import annotations

from cryptography.x509 import ObjectIdentifier

ARC_UUID = "9bbebe0d-e90d-4209-9d7b-977fd9d79e66"
ARC = "2.25.207020730509700419229912614853397683814"

# --- key purposes (EKU) -------------------------------------------------------------------
#: A device identity certificate issued by a production CA.
EKU_DEVICE = ObjectIdentifier(f"{ARC}.1.1")
#: Retired (never issued any more, never reused): production CA certificates carried it as an
#: EKU, which stock verifiers (OpenSSL) treat as a limit on every certificate below the CA, so
#: a device chain failed ``-purpose sslclient``.  The role is now :data:`POLICY_PRODUCTION_CA`.
EKU_PRODUCTION_CA = ObjectIdentifier(f"{ARC}.1.2")
#: An enclave's identity (signing) key.
EKU_ENCLAVE_IDENTITY = ObjectIdentifier(f"{ARC}.1.3")
#: An enclave's static key-agreement key (sealed transfer, licenses).
EKU_ENCLAVE_KEY_AGREEMENT = ObjectIdentifier(f"{ARC}.1.4")
#: An enclave's license-signing key.
EKU_LICENSE_SIGNING = ObjectIdentifier(f"{ARC}.1.5")
#: An enclave's ledger-signing key.
EKU_LEDGER_SIGNING = ObjectIdentifier(f"{ARC}.1.6")

# --- name attributes ------------------------------------------------------------------------
#: The production job identifier (UTF8String), in production CA and device subjects.
ATTR_JOB_ID = ObjectIdentifier(f"{ARC}.2.1")
#: The enclave's role, "oem" or "programmer" (UTF8String), in enclave subjects.
ATTR_ENCLAVE_ROLE = ObjectIdentifier(f"{ARC}.2.2")

# --- certificate policies -------------------------------------------------------------------
#: "securethread production CA": the one policy in a production CA certificate, marking its
#: role (issues device certificates for one job).  Non-critical; stock verifiers ignore it
#: unless told to require explicit policies.
POLICY_PRODUCTION_CA = ObjectIdentifier(f"{ARC}.3.1")

#: The key purposes an end-entity certificate of the project can carry.
ALL_PURPOSES = frozenset(
    {
        EKU_DEVICE,
        EKU_ENCLAVE_IDENTITY,
        EKU_ENCLAVE_KEY_AGREEMENT,
        EKU_LICENSE_SIGNING,
        EKU_LEDGER_SIGNING,
    }
)
