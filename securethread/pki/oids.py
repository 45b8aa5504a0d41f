"""Object identifiers: the project's internal arc and the OEM's own arc.

Certificates a relying party in the field sees (root, production CAs, devices, their CRLs)
carry **no** OID from the project's arc: Go's crypto/x509 and GnuTLS cannot parse an arc
wider than 31 bits, and a UUID arc (``2.25.<128-bit integer>``) is one, so a private OID
anywhere in a name, EKU or policy made those stacks refuse every device (docs/pki.md,
"Object identifiers").  Private OIDs appear in them only under an arc the OEM gives in the
job's certificate profile (``oem_arc``, its IANA Private Enterprise Number arc,
``1.3.6.1.4.1.<PEN>[.n...]``), allocated by :func:`device_purpose` and
:func:`production_ca_policy`.

The UUID-derived arc (ITU-T X.667 / RFC 4122 §4.1: ``2.25.<UUID as integer>``, UUID
``9bbebe0d-e90d-4209-9d7b-977fd9d79e66``) remains for the enclave certificates only, which
never leave the OEM and the programmer and are read by this library alone.  Layout (never
reuse a number):

* ``ARC.1.n`` key purposes (ExtendedKeyUsage, RFC 5280 §4.2.1.12) of enclave certificates;
  ``ARC.1.1`` (device) and ``ARC.1.2`` (production CA) are retired;
* ``ARC.2.n`` name attributes: retired (``ARC.2.1`` job id, ``ARC.2.2`` enclave role; both are
  organizationalUnitName now);
* ``ARC.3.n`` certificate policies: retired (``ARC.3.1`` production CA).
"""

from __future__ import annotations

import re

from cryptography.x509 import ObjectIdentifier

from ._errors import DeviceProfileError

ARC_UUID = "9bbebe0d-e90d-4209-9d7b-977fd9d79e66"
ARC = "2.25.207020730509700419229912614853397683814"

# --- enclave key purposes (EKU), internal ------------------------------------------------
#: An enclave's identity (signing) key.
EKU_ENCLAVE_IDENTITY = ObjectIdentifier(f"{ARC}.1.3")
#: An enclave's static key-agreement key (sealed transfer, licenses).
EKU_ENCLAVE_KEY_AGREEMENT = ObjectIdentifier(f"{ARC}.1.4")
#: An enclave's license-signing key.
EKU_LICENSE_SIGNING = ObjectIdentifier(f"{ARC}.1.5")
#: An enclave's ledger-signing key.
EKU_LEDGER_SIGNING = ObjectIdentifier(f"{ARC}.1.6")

#: Retired, never issued any more and never reused: the device key purpose, the production
#: CA key purpose, the job-id and enclave-role name attributes, the production-CA policy.
RETIRED = frozenset(
    ObjectIdentifier(f"{ARC}.{n}") for n in ("1.1", "1.2", "2.1", "2.2", "3.1")
)

#: The key purposes an enclave certificate can carry.
ENCLAVE_PURPOSES = frozenset(
    {EKU_ENCLAVE_IDENTITY, EKU_ENCLAVE_KEY_AGREEMENT, EKU_LICENSE_SIGNING, EKU_LEDGER_SIGNING}
)

# --- the OEM's arc --------------------------------------------------------------------------

#: IANA Private Enterprise Numbers (RFC 9371 §3): 1.3.6.1.4.1.<PEN>.
ENTERPRISE_ARC = "1.3.6.1.4.1"
#: The widest arc every common stack parses: Go's encoding/asn1 and x/crypto/cryptobyte
#: read each subidentifier into 31 bits (X.690 §8.19.2 sets no limit; they do).
MAX_ARC = (1 << 31) - 1
_MAX_ARCS = 16
_DOTTED = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_DEVICE_PURPOSE_ARC = 1
_PRODUCTION_CA_POLICY_ARC = 2


def portable(oid: ObjectIdentifier) -> bool:
    """True when every stack can parse ``oid``: each subidentifier (X.690 §8.19.4, the first
    two arcs combined) fits 31 bits."""
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    if len(arcs) < 2:
        return False
    first = arcs[0] * 40 + arcs[1]
    return first <= MAX_ARC and all(a <= MAX_ARC for a in arcs[2:])


def check_oem_arc(value: object) -> str:
    """The OEM's arc: ``1.3.6.1.4.1.<PEN>`` or below it, every arc at most 2^31-1.

    Only a Private Enterprise Number arc is accepted: an arc under a standard one (say
    ``1.3.6.1.5.5.7.3``) would make the "private" purpose a standard purpose such as
    id-kp-serverAuth.
    """
    if type(value) is not str or len(value) > 200 or _DOTTED.fullmatch(value) is None:
        raise DeviceProfileError(f"oem_arc {value!r} is not a dotted-decimal OID")
    arcs = [int(a) for a in value.split(".")]
    prefix = [int(a) for a in ENTERPRISE_ARC.split(".")]
    if arcs[: len(prefix)] != prefix or len(arcs) == len(prefix):
        raise DeviceProfileError(
            f"oem_arc {value!r} is not under {ENTERPRISE_ARC}.<enterprise number> (the OEM's "
            "IANA Private Enterprise Number arc)"
        )
    if len(arcs) > _MAX_ARCS or any(a > MAX_ARC for a in arcs):
        raise DeviceProfileError(
            f"oem_arc {value!r}: at most {_MAX_ARCS} arcs, each at most {MAX_ARC} "
            "(the widest Go and GnuTLS parse)"
        )
    return value


def device_purpose(arc: str) -> ObjectIdentifier:
    """``<oem_arc>.1``: the OEM's key purpose marking its devices (after id-kp-clientAuth)."""
    return ObjectIdentifier(f"{check_oem_arc(arc)}.{_DEVICE_PURPOSE_ARC}")


def production_ca_policy(arc: str) -> ObjectIdentifier:
    """``<oem_arc>.2``: the OEM's certificate policy marking its production CAs."""
    return ObjectIdentifier(f"{check_oem_arc(arc)}.{_PRODUCTION_CA_POLICY_ARC}")
