"""Audit every object of a token against the attribute table of docs/keys.md.

Three independent views of one token, each in its own process (as an auditor would look):

* ``pkcs11-tool --login --list-objects`` (OpenSC) lists every object with its class, key
  type, label, CKA_ID, the usage and access attributes it prints;
* ``pkcs11-tool --list-objects`` without login lists the public (CKA_PRIVATE=False) ones;
* a C_GetAttributeValue reader (python-pkcs11, this file run as a script) reads what
  pkcs11-tool 0.23 does not print: CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_COPYABLE,
  CKA_DESTROYABLE, CKA_SIGN of secret keys -- every attribute of the table, in fact, so each
  value pkcs11-tool does print is cross-checked against it.

Each object is matched by (party, object class, label pattern) to a row of the table
"Objects in the parties' tokens", whose policy names a row of "Attributes by policy"; every
value must be the documented one.  An object no row matches is a finding.  The tables are
parsed from docs/keys.md itself, so the documentation and this audit cannot drift apart.

Usage (e.g. over the demo's token directories)::

    report = audit_token("demo/oem/hsm", "oem", pin)        # every object of token "oem"
    report.check()                                          # AssertionError listing findings
    audit_token(TOKEN_DIR.root, "programmer", pin, prefix="t-1234/").check()
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "keys.md"
OBJECTS_HEADING = "## Objects in the parties' tokens"
ATTRIBUTES_HEADING = "## Attributes by policy"

#: The attribute columns of the table, by their names in records (PolicyReport.attributes()).
ATTRIBUTES = (
    "token",
    "private",
    "modifiable",
    "copyable",
    "destroyable",
    "sensitive",
    "extractable",
    "always-sensitive",
    "never-extractable",
    "local",
    "encrypt",
    "decrypt",
    "sign",
    "verify",
    "wrap",
    "unwrap",
    "derive",
)
OBJECTS = ("private key", "public key", "secret key", "certificate", "data")

#: What pkcs11-tool 0.23 prints, per class ("Usage:" and "Access:" lines): only these values
#: can be cross-checked against the reader.
_TOOL_VISIBLE = {
    "private key": {"decrypt", "sign", "unwrap", "derive", "sensitive", "always-sensitive",
                    "extractable", "never-extractable", "local"},
    "secret key": {"encrypt", "decrypt", "verify", "wrap", "unwrap", "derive", "sensitive",
                   "always-sensitive", "extractable", "never-extractable", "local"},
    "public key": {"encrypt", "verify", "wrap", "local"},
    "certificate": set(),
    "data": set(),
}  # fmt: skip


# --- the table in docs/keys.md -----------------------------------------------------------------


@attrs.frozen
class Placement:
    """A row of "Objects in the parties' tokens": which objects a party's token holds."""

    party: str
    label: str  # fnmatch pattern, e.g. "image-*"
    object: str
    key_type: str
    policy: str


@attrs.frozen
class Expectation:
    """A row of "Attributes by policy": the values of one kind of object; "-" (no such
    attribute for the class) is expected to read as False."""

    policy: str
    object: str
    made_by: str
    values: Mapping[str, bool]


@attrs.frozen
class KeyTable:
    placements: tuple[Placement, ...]
    expectations: tuple[Expectation, ...]

    def expectation(self, policy: str, obj: str, made_by: str | None = None) -> Expectation:
        """The one attribute row for ``policy``/``obj`` (and ``made_by`` if several)."""
        rows = [e for e in self.expectations if e.policy == policy and e.object == obj]
        if made_by is not None:
            rows = [e for e in rows if e.made_by == made_by]
        if len(rows) != 1:
            raise LookupError(f"{len(rows)} rows for {policy} / {obj} / {made_by} in {DOCS.name}")
        return rows[0]


def _table_after(text: str, heading: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise LookupError(f"{DOCS.name} has no heading {heading!r}") from None
    rows = []
    header: list[str] | None = None
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            if header is not None:
                break
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
        elif not set("".join(cells)) <= set("-: "):
            if len(cells) != len(header):
                raise ValueError(f"{DOCS.name}: row {line!r} has {len(cells)} cells")
            rows.append(dict(zip(header, cells, strict=True)))
    if not rows:
        raise LookupError(f"{DOCS.name}: no table under {heading!r}")
    return rows


def _flag(value: str, where: str) -> bool:
    if value in ("yes", "no", "-"):
        return value == "yes"
    raise ValueError(f"{DOCS.name}: {where}: {value!r} is not yes, no or -")


def load_table(path: Path = DOCS) -> KeyTable:
    """Both tables of docs/keys.md, checked for shape (a malformed row is an error)."""
    text = path.read_text()
    placements = []
    for r in _table_after(text, OBJECTS_HEADING):
        if r["object"] not in OBJECTS:
            raise ValueError(f"{path.name}: unknown object {r['object']!r}")
        placements.append(
            Placement(
                party=r["party"],
                label=r["label"],
                object=r["object"],
                key_type=r["key type"],
                policy=r["policy"],
            )
        )
    expectations = []
    for r in _table_after(text, ATTRIBUTES_HEADING):
        if r["object"] not in OBJECTS:
            raise ValueError(f"{path.name}: unknown object {r['object']!r}")
        values = {
            a: _flag(r[a.replace("-", " ")], f"{r['policy']}/{r['object']}/{a}") for a in ATTRIBUTES
        }
        expectations.append(
            Expectation(policy=r["policy"], object=r["object"], made_by=r["made by"], values=values)
        )
    return KeyTable(tuple(placements), tuple(expectations))


# --- the three views of a token ----------------------------------------------------------------


@attrs.frozen
class ListedObject:
    """One object as a lister saw it."""

    object: str
    key_type: str
    label: str
    key_id: str  # hex; "" for data objects
    values: Mapping[str, bool]  # what this view shows

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.object, self.label, self.key_id)


_HEADERS = (
    (re.compile(r"^Private Key Object; (\w+)"), "private key"),
    (re.compile(r"^Public Key Object; (\w+)"), "public key"),
    (re.compile(r"^Secret Key Object; (\w+)"), "secret key"),
    (re.compile(r"^Certificate Object[;,] type = (X\.509)"), "certificate"),
    (re.compile(r"^Data object"), "data"),
)


def parse_listing(text: str) -> list[ListedObject]:
    """The objects of a ``pkcs11-tool --list-objects`` output (OpenSC 0.23 format)."""
    out: list[ListedObject] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            shown = current["usage"] | current["access"]
            values = {a: a in shown for a in _TOOL_VISIBLE[current["object"]]}
            out.append(
                ListedObject(
                    object=current["object"],
                    key_type=current["type"],
                    label=current["label"],
                    key_id=current["id"],
                    values=values,
                )
            )

    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            for pattern, name in _HEADERS:
                m = pattern.match(line)
                if m:
                    close()
                    kind = m.group(1) if m.groups() else "-"
                    current = {"object": name, "type": kind, "label": "", "id": ""}
                    current.update(usage=set(), access=set())
                    break
            else:
                raise ValueError(f"unexpected pkcs11-tool line {line!r}")
            continue
        assert current is not None, line
        field, _, value = line.strip().partition(":")
        value = value.strip()
        if field == "label":
            current["label"] = value[1:-1] if current["object"] == "data" else value
        elif field == "ID":
            current["id"] = value.lower()
        elif field in ("Usage", "Access"):
            items = {v.strip().replace(" ", "-") for v in value.split(",")} - {"none"}
            current[field.lower()] = items
    close()
    return out


def _conf(token_dir: str | os.PathLike[str]) -> Path:
    p = Path(token_dir)
    conf = p if p.is_file() else p / "softhsm2.conf"
    if not conf.is_file():
        raise FileNotFoundError(f"no softhsm2.conf at {p}")
    return conf


def _module(module: str | None) -> str:
    if module is not None:
        return module
    from securethread.hsm import default_module_path

    return default_module_path()


def list_with_pkcs11_tool(
    token_dir: str | os.PathLike[str],
    token_label: str,
    pin: str | None,
    *,
    module: str | None = None,
) -> list[ListedObject]:
    """Run ``pkcs11-tool --list-objects`` on the token, logged in when ``pin`` is given."""
    cmd = ["pkcs11-tool", "--module", _module(module), "--token-label", token_label]
    if pin is not None:
        cmd += ["--login", "--pin", pin]
    cmd.append("--list-objects")
    env = {**os.environ, "SOFTHSM2_CONF": str(_conf(token_dir))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pkcs11-tool failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_listing(proc.stdout)


def read_attributes(
    token_dir: str | os.PathLike[str],
    token_label: str,
    pin: str,
    *,
    module: str | None = None,
) -> list[ListedObject]:
    """Every object's attributes by C_GetAttributeValue, in a child process (PIN on stdin)."""
    env = {**os.environ, "SOFTHSM2_CONF": str(_conf(token_dir))}
    request = json.dumps({"module": _module(module), "token": token_label, "pin": pin})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--read-attributes"],
        input=request,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"attribute reader failed: {proc.stderr.strip()}")
    return [
        ListedObject(
            object=o["object"],
            key_type=o["key_type"],
            label=o["label"],
            key_id=o["id"],
            values=o["values"],
        )
        for o in json.loads(proc.stdout)
    ]


def _reader_main() -> None:
    """The child process of :func:`read_attributes` (python-pkcs11 only, no securethread)."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    req = json.loads(sys.stdin.read())
    session = (
        pkcs11.lib(req["module"]).get_token(token_label=req["token"]).open(user_pin=req["pin"])
    )
    storage = [
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.MODIFIABLE,
        Attribute.COPYABLE,
        Attribute.DESTROYABLE,
    ]
    key = [*storage, Attribute.LOCAL, Attribute.DERIVE]
    secret = [
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.NEVER_EXTRACTABLE,
    ]
    per_class = {
        ObjectClass.PRIVATE_KEY: (
            "private key",
            [*key, *secret, Attribute.SIGN, Attribute.DECRYPT, Attribute.UNWRAP],
        ),
        ObjectClass.PUBLIC_KEY: (
            "public key",
            [*key, Attribute.VERIFY, Attribute.ENCRYPT, Attribute.WRAP],
        ),
        ObjectClass.SECRET_KEY: (
            "secret key",
            [*key, *secret, Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN]
            + [Attribute.VERIFY, Attribute.WRAP, Attribute.UNWRAP],
        ),
        ObjectClass.CERTIFICATE: ("certificate", storage),
        ObjectClass.DATA: ("data", storage),
    }
    out = []
    for obj in session.get_objects():
        try:
            # python-pkcs11 gives a data object no object_class: read CKA_CLASS itself.
            cls = ObjectClass(obj[Attribute.CLASS])
        except pkcs11.ObjectHandleInvalid:
            continue
        if cls not in per_class:
            continue
        name, wanted = per_class[cls]
        try:
            got = obj.get_attributes([Attribute.LABEL, *wanted])
            if cls == ObjectClass.DATA:
                key_type, key_id = "-", ""
            elif cls == ObjectClass.CERTIFICATE:
                key_type, key_id = "X.509", bytes(obj[Attribute.ID]).hex()
            else:
                key_type, key_id = obj[Attribute.KEY_TYPE].name, bytes(obj[Attribute.ID]).hex()
        except pkcs11.ObjectHandleInvalid:
            continue  # destroyed by another process meanwhile
        values = {a.name.lower().replace("_", "-"): bool(got[a]) for a in wanted}
        out.append(
            {
                "object": name,
                "key_type": key_type,
                "label": got[Attribute.LABEL],
                "id": key_id,
                "values": values,
            }
        )
    session.close()
    json.dump(out, sys.stdout)


# --- the audit ---------------------------------------------------------------------------------


@attrs.frozen
class AuditedObject:
    object: str
    key_type: str
    label: str
    key_id: str
    values: Mapping[str, bool]  # every attribute of the table (absent ones False)
    placement: Placement | None


@attrs.frozen
class AuditReport:
    token_label: str
    party: str
    objects: tuple[AuditedObject, ...]
    findings: tuple[str, ...]

    def check(self) -> None:
        """Raise AssertionError naming every finding (none: the token matches the docs)."""
        if self.findings:
            raise AssertionError(
                f"token {self.token_label!r} ({self.party}) differs from {DOCS.name}:\n  "
                + "\n  ".join(self.findings)
            )


def _by_key(objs: Iterable[ListedObject], what: str, findings: list[str]) -> dict[Any, Any]:
    """Objects by (class, label, CKA_ID).  Two data objects may share one: the quota mark and
    a CA's revocation state keep two generations under one label
    (securethread.programmer.quota_mark, securethread.hsm.records); they are audited against
    the same row.  Two keys or certificates may not."""
    out: dict[Any, ListedObject] = {}
    generations = ("quota-mark-", "revocation-")
    for o in objs:
        if o.key in out and not (o.object == "data" and o.label.startswith(generations)):
            findings.append(f"{what}: two objects {o.key} (cannot tell them apart)")
        out[o.key] = o
    return out


def party_of(token_label: str) -> str:
    """The party whose rows apply to a token: ``officer-2`` -> ``officer``."""
    return "officer" if re.fullmatch(r"officer-\d+", token_label) else token_label


def audit_token(
    token_dir: str | os.PathLike[str],
    token_label: str,
    pin: str,
    *,
    party: str | None = None,
    prefix: str = "",
    module: str | None = None,
    table: KeyTable | None = None,
) -> AuditReport:
    """Audit every object of token ``token_label`` in ``token_dir`` (the directory of its
    softhsm2.conf, or the file) against docs/keys.md.

    ``party``: whose rows apply (default :func:`party_of` the token label).  ``prefix``:
    audit only objects whose label starts with it, matching the rest against the table
    (tests share tokens); the default audits every object.  ``module``: the PKCS#11 module
    (default: the library's).  Returns the report; ``report.check()`` raises on findings.
    """
    table = table or load_table()
    party = party or party_of(token_label)
    findings: list[str] = []

    def ours(objs: Iterable[ListedObject]) -> list[ListedObject]:
        return [o for o in objs if o.label.startswith(prefix)]

    tool = _by_key(
        ours(list_with_pkcs11_tool(token_dir, token_label, pin, module=module)),
        "pkcs11-tool",
        findings,
    )
    public = {
        o.key for o in ours(list_with_pkcs11_tool(token_dir, token_label, None, module=module))
    }
    read = _by_key(
        ours(read_attributes(token_dir, token_label, pin, module=module)), "reader", findings
    )
    for k in sorted(set(tool) ^ set(read)):
        seen = "pkcs11-tool" if k in tool else "C_GetAttributeValue"
        findings.append(f"{k}: only {seen} lists it")
    audited = []
    for k in sorted(set(tool) & set(read)):
        t, r = tool[k], read[k]
        name = f"{r.object} {r.label!r}"
        values = {a: bool(r.values.get(a, False)) for a in ATTRIBUTES}
        for a, shown in t.values.items():
            if shown != values[a]:
                findings.append(f"{name}: pkcs11-tool shows {a}={shown}, the token {values[a]}")
        if (k in public) == values["private"]:
            findings.append(f"{name}: CKA_PRIVATE={values['private']} but listed without login")
        if t.key_type != r.key_type:
            findings.append(f"{name}: pkcs11-tool key type {t.key_type}, token {r.key_type}")
        rows = [
            p
            for p in table.placements
            if p.party == party
            and p.object == r.object
            and fnmatch.fnmatchcase(r.label[len(prefix) :], p.label)
        ]
        placement = rows[0] if len(rows) == 1 else None
        audited.append(AuditedObject(r.object, r.key_type, r.label, r.key_id, values, placement))
        if not rows:
            findings.append(f"{name}: no row for party {party!r} in {DOCS.name}")
            continue
        if len(rows) > 1:
            findings.append(f"{name}: {len(rows)} rows match ({[p.label for p in rows]})")
            continue
        if placement is None:
            continue
        if placement.key_type != r.key_type:
            findings.append(f"{name}: key type {r.key_type}, documented {placement.key_type}")
        try:
            expected = table.expectation(placement.policy, placement.object)
        except LookupError as exc:
            findings.append(f"{name}: {exc}")
            continue
        for a in ATTRIBUTES:
            if values[a] != expected.values[a]:
                findings.append(
                    f"{name}: {a}={values[a]}, {placement.policy} documents {expected.values[a]}"
                )
    return AuditReport(token_label, party, tuple(audited), tuple(findings))


def missing_rows(report: AuditReport, wanted: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Which (label, object) pairs the audit did not see (test helper)."""
    seen = {(o.label, o.object) for o in report.objects}
    return [w for w in wanted if w not in seen]


if __name__ == "__main__" and sys.argv[1:] == ["--read-attributes"]:
    _reader_main()
