"""The job spec: what an OEM operator writes to issue a production job (TOML).

::

    job_id = "sensor-2026-11-a"        # unique per OEM: a reused id is refused
    programmer = "factory-1"           # a programmer certified by certify-programmer
    stage = "full"                     # optional: "full" (the default), "provision" or
                                       # "program" (docs/formats.md, job stages)
    image = "fw-sensor-1"              # an image mastered by master-image (none in a
                                       # "provision" job)
    device_class = "sensor-v1"         # optional: defaults to the image's device class
                                       # (required in a "provision" job)
    provisioned_by = ["fab-2026-11-a", "fab-ca.pem"]  # "program" jobs only: the provisioning
                                       # jobs whose chips it accepts, each a job id this OEM
                                       # issued or (a name ending in .pem) that job's
                                       # production-CA certificate, relative to the spec
    quota = 1000
    threshold = 2                      # optional: officers who sign (default: the floor)
    vendors = ["vendor-root.pem"]      # the silicon-vendor CAs whose chips the job accepts:
                                       # PEM certificates, relative to the spec (1..64);
                                       # none in a "program" job (its chips show their OEM
                                       # device certificate)

    [targets]                          # one or more of:
    ranges = [["5ec0000000000000", "5ec00000000003e7"]]   # inclusive, 16 hex digits
    list = ["5ec0000000100000"]
    file = "ids.txt"                   # one device id per line, relative to the spec

    [window]                           # when the programmer may issue (UTC)
    not_before = 2026-11-30T00:00:00Z  # optional: default now
    days = 30                          # or not_after = 2026-12-31T00:00:00Z

    [certificate]                      # the device certificate profile (docs/pki.md)
    organisation = "Acme Sensors"
    product = "sensor-v1"              # optional
    common_name = "{device_id}"        # optional
    not_after = 9999-12-31T23:59:59Z   # optional: IDevID-style "no expiry" by default
    uri = "https://devices.acme.example/{device_id}"   # optional: subjectAltName URI
    crl_url = "http://pki.acme.example/sensor-2026-11-a.crl"  # optional: CRL distribution point
    ocsp_url = "http://ocsp.acme.example/"             # optional: OCSP responder (AIA)
    oem_arc = "1.3.6.1.4.1.NNNNN"      # optional: the OEM's enterprise arc (its device key
                                       # purpose <arc>.1 and production-CA policy <arc>.2)

Parsing is strict: unknown keys are errors (a typo must not silently become a default).
"""

from __future__ import annotations

import datetime
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securethread.errors import ConfigurationError, Error, FormatError
from securethread.formats.identity import check_vendor_cas, vendor_ca_id
from securethread.formats.job import (
    MAX_PROVISIONED_BY,
    MAX_VENDORS,
    STAGE_FULL,
    STAGE_PROGRAM,
    STAGE_PROVISION,
    STAGES,
    Targets,
    check_device_id,
    check_job_id,
)
from securethread.pki import DeviceProfile, untrusted
from securethread.workdir import check_name, read_file

MAX_TARGET_FILE = 16 << 20
_TOP = {
    "job_id", "programmer", "stage", "image", "device_class", "quota", "threshold", "vendors",
    "provisioned_by",
}  # fmt: skip
MAX_VENDOR_FILE = 64 << 10
_TABLES = {"targets", "window", "certificate"}
#: The keys of a ``[certificate]`` table: a job spec's, or ``oem prelicense --profile``'s.
CERTIFICATE_KEYS = frozenset(
    {"organisation", "product", "common_name", "not_after", "uri", "crl_url", "ocsp_url",
     "oem_arc"}
)  # fmt: skip


class JobSpecError(ConfigurationError):
    """The job spec file is malformed or incomplete."""


@attrs.frozen(kw_only=True)
class JobSpec:
    job_id: str
    programmer: str
    #: "full", "provision" or "program" (:data:`securethread.formats.job.STAGES`).
    stage: str
    image: str | None  # None iff stage "provision"
    device_class: str | None
    quota: int
    threshold: int | None
    targets: Targets
    not_before: datetime.datetime | None
    not_after: datetime.datetime | None
    days: int | None
    certificate: Mapping[str, Any]
    #: The vendor CA certificates ``vendors`` names, in the spec's order (none for "program").
    vendors: tuple[x509.Certificate, ...]
    #: Stage "program": the provisioning jobs it accepts, each a job id (str) or the job's
    #: production-CA certificate, in the spec's order; empty for the other stages.
    provisioned_by: tuple[str | x509.Certificate, ...] = ()

    def device_profile(self, *, default_organisation: str) -> DeviceProfile:
        """The job's device certificate profile ([certificate]; organisation defaults to
        the OEM's name)."""
        return device_profile(self.certificate, default_organisation=default_organisation)

    def window(self, now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
        """The job's validity window, to the second, UTC."""
        nb = (self.not_before or now).astimezone(datetime.UTC).replace(microsecond=0)
        if self.not_after is not None:
            na = self.not_after.astimezone(datetime.UTC).replace(microsecond=0)
        else:
            na = nb + datetime.timedelta(days=self.days or 7)
        if na <= nb:
            raise JobSpecError(f"job window is empty ({nb} .. {na})")
        if na <= now:
            raise JobSpecError(f"job window ended at {na}")
        return nb, na


def load_job_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and check a job spec file (see the module docstring)."""
    p = Path(path)
    raw = read_file(p, "job spec", limit=1 << 20)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"job spec {str(p)!r} is not valid TOML: {exc}") from None
    try:
        return _parse(doc, p.parent)
    except FormatError as exc:
        raise JobSpecError(f"job spec {str(p)!r}: {exc}") from None


def certificate_table(doc: Mapping[str, Any], *, required: bool) -> dict[str, Any]:
    """The ``[certificate]`` table of a TOML document, checked: :data:`CERTIFICATE_KEYS`
    only, each a string but ``not_after`` (a date-time)."""
    certificate = dict(_table(doc, "certificate", set(CERTIFICATE_KEYS), required=required))
    for key, value in certificate.items():
        if key == "not_after":
            certificate[key] = _time(value, "certificate.not_after")
        elif not isinstance(value, str):
            raise JobSpecError(f"certificate.{key} must be a string")
    return certificate


def device_profile(c: Mapping[str, Any], *, default_organisation: str) -> DeviceProfile:
    """The device certificate profile of a checked ``[certificate]`` table
    (:func:`certificate_table`); organisation defaults to ``default_organisation``."""
    kwargs: dict[str, Any] = {"organisation": c.get("organisation", default_organisation)}
    if "product" in c:
        kwargs["product"] = c["product"]
    if "common_name" in c:
        kwargs["common_name_template"] = c["common_name"]
    if "not_after" in c:
        kwargs["not_after"] = c["not_after"].replace(microsecond=0)
    if "uri" in c:
        kwargs["uri_template"] = c["uri"]
    for key in ("crl_url", "ocsp_url", "oem_arc"):
        if key in c:
            kwargs[key] = c[key]
    try:
        return DeviceProfile(**kwargs)
    except Error as exc:
        raise JobSpecError(f"[certificate]: {exc}") from None


def _parse(doc: Mapping[str, Any], base: Path) -> JobSpec:
    unknown = set(doc) - _TOP - _TABLES
    if unknown:
        raise JobSpecError(f"unknown key(s) {sorted(unknown)}")
    stage = doc.get("stage", STAGE_FULL)
    if stage not in STAGES:
        raise JobSpecError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    _check_stage_keys(doc, stage)
    for table in _TABLES - {"certificate"}:
        if table not in doc:
            raise JobSpecError(f"[{table}] is required")
    quota = doc["quota"]
    if type(quota) is not int or quota < 1:
        raise JobSpecError(f"quota must be a positive integer, got {quota!r}")
    threshold = doc.get("threshold")
    if threshold is not None and (type(threshold) is not int or threshold < 1):
        raise JobSpecError(f"threshold must be a positive integer, got {threshold!r}")
    device_class = doc.get("device_class")
    if device_class is not None and not isinstance(device_class, str):
        raise JobSpecError("device_class must be a string")
    window = _table(doc, "window", {"not_before", "not_after", "days"})
    days = window.get("days")
    if days is not None and (type(days) is not int or not 1 <= days <= 36500):
        raise JobSpecError(f"window.days must be 1..36500, got {days!r}")
    if days is not None and "not_after" in window:
        raise JobSpecError("window: give days or not_after, not both")
    if days is None and "not_after" not in window:
        raise JobSpecError("window: days or not_after is required")
    certificate = certificate_table(doc, required=False)
    return JobSpec(
        job_id=check_job_id(doc["job_id"]),
        programmer=check_name("programmer", doc["programmer"]),
        stage=stage,
        image=check_name("image", doc["image"]) if "image" in doc else None,
        device_class=device_class,
        quota=quota,
        threshold=threshold,
        targets=_targets(_table(doc, "targets", {"ranges", "list", "file"}), base),
        not_before=_time(window["not_before"], "window.not_before")
        if "not_before" in window
        else None,
        not_after=_time(window["not_after"], "window.not_after") if "not_after" in window else None,
        days=days,
        certificate=certificate,
        vendors=_vendors(doc["vendors"], base) if "vendors" in doc else (),
        provisioned_by=_provisioned_by(doc["provisioned_by"], base)
        if "provisioned_by" in doc
        else (),
    )


def _check_stage_keys(doc: Mapping[str, Any], stage: str) -> None:
    """The keys a job of ``stage`` needs, and those it must not have (docs/formats.md)."""
    required = {"job_id", "programmer", "quota"}
    refused: set[str] = set()
    if stage == STAGE_PROVISION:
        required |= {"vendors", "device_class"}
        refused = {"image", "provisioned_by"}
    elif stage == STAGE_PROGRAM:
        required |= {"image", "provisioned_by"}
        refused = {"vendors"}
    else:
        required |= {"image", "vendors"}
        refused = {"provisioned_by"}
    where = "" if stage == STAGE_FULL else f" in a {stage!r} job"
    for key in ("job_id", "programmer", "image", "device_class", "quota", "vendors",
                "provisioned_by"):  # fmt: skip
        if key in required and key not in doc:
            raise JobSpecError(f"{key} is required{where}")
    for key in sorted(refused & set(doc)):
        raise JobSpecError(f"a {stage!r} job has no {key}")


def _provisioned_by(entries: object, base: Path) -> tuple[str | x509.Certificate, ...]:
    """``provisioned_by``: job ids of this OEM, or (names ending in ``.pem``) production-CA
    certificate files relative to the spec; 1..MAX_PROVISIONED_BY, none twice."""
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise JobSpecError("provisioned_by must be a list of job ids or certificate file names")
    if not 1 <= len(entries) <= MAX_PROVISIONED_BY:
        raise JobSpecError(f"provisioned_by must name 1..{MAX_PROVISIONED_BY} provisioning jobs")
    if len(set(entries)) != len(entries):
        raise JobSpecError("provisioned_by names a provisioning job twice")
    out: list[str | x509.Certificate] = []
    for entry in entries:
        if not entry.endswith(".pem"):
            out.append(check_job_id(entry))
            continue
        path = base / entry
        out.append(
            untrusted.load_certificate_pem(
                read_file(path, "production-CA certificate", limit=MAX_VENDOR_FILE),
                what=f"production-CA certificate {str(path)!r}",
            )
        )
    return tuple(out)


def _table(
    doc: Mapping[str, Any], name: str, keys: set[str], *, required: bool = True
) -> Mapping[str, Any]:
    table = doc.get(name, {} if not required else None)
    if not isinstance(table, dict):
        raise JobSpecError(f"[{name}] must be a table")
    unknown = set(table) - keys
    if unknown:
        raise JobSpecError(f"[{name}]: unknown key(s) {sorted(unknown)}")
    return table


def _time(value: object, what: str) -> datetime.datetime:
    """A TOML offset date-time (RFC 3339), or a quoted one."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise JobSpecError(f"{what}: {value!r} is not an RFC 3339 date-time") from None
    if not isinstance(value, datetime.datetime) or value.tzinfo is None:
        raise JobSpecError(f"{what} must be a date-time with a time zone (e.g. ...Z)")
    return value.astimezone(datetime.UTC)


def _uid(value: object, what: str) -> int:
    if not isinstance(value, str):
        raise JobSpecError(f"{what}: device ids are strings of 16 hex digits")
    return int(check_device_id(value.lower()), 16)


def _vendors(names: object, base: Path) -> tuple[x509.Certificate, ...]:
    """``vendors``: the vendor CA certificate files (PEM, through the hardened loader),
    each a CA certificate, no CA twice."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise JobSpecError("vendors must be a list of certificate file names")
    if not 1 <= len(names) <= MAX_VENDORS:
        raise JobSpecError(f"vendors must name 1..{MAX_VENDORS} vendor CA certificates")
    certs = []
    for name in names:
        path = base / name  # an absolute name stays absolute (pathlib)
        certs.append(
            untrusted.load_certificate_pem(
                read_file(path, "vendor CA certificate", limit=MAX_VENDOR_FILE),
                what=f"vendor CA certificate {str(path)!r}",
            )
        )
    try:
        # Each a CA certificate, each CA once (a second file with the same key is the same CA).
        check_vendor_cas(
            [c.public_bytes(serialization.Encoding.DER) for c in certs],
            named={vendor_ca_id(c) for c in certs},
            what="vendors: certificate",
        )
    except Error as exc:
        raise JobSpecError(str(exc)) from None
    return tuple(certs)


def _targets(table: Mapping[str, Any], base: Path) -> Targets:
    if not table:
        raise JobSpecError("[targets] needs ranges, list or file")
    ranges = []
    for r in table.get("ranges", []):
        if not isinstance(r, list) or len(r) != 2:
            raise JobSpecError("targets.ranges: each range is [first, last]")
        first, last = _uid(r[0], "targets.ranges"), _uid(r[1], "targets.ranges")
        if first > last:
            raise JobSpecError(f"targets.ranges: {r[0]} is after {r[1]}")
        ranges.append((first, last))
    explicit = set()
    for d in table.get("list", []):
        explicit.add(f"{_uid(d, 'targets.list'):016x}")
    if "file" in table:
        fname = table["file"]
        if not isinstance(fname, str):
            raise JobSpecError("targets.file must be a path")
        text = read_file(base / fname, "targets file", limit=MAX_TARGET_FILE)
        for n, line in enumerate(text.decode("ascii", "replace").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                explicit.add(f"{_uid(line, f'targets file line {n}'):016x}")
    ranges.sort()
    return Targets(ranges=tuple(ranges), explicit=frozenset(explicit))
