"""The package layout is the deployment (docs/design.md): role packages never import each
other, shared packages import no role, and the device and audit packages work without
python-pkcs11.  Every import statement counts, including those inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "securethread"
# station: the untrusted line's client of the appliance (it meets programmer/ only in the
# station API's contract, securethread/proto)
ROLES = ("oem", "programmer", "device", "audit", "station")
SHARED = ("formats", "channel", "keys", "hsm", "pki", "errors", "workdir", "proto")


def _imports(path: Path, package: list[str] | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    if package is None:
        package = list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _role_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "securethread" and parts[1] in ROLES:
        return parts[1]
    return None


def _files(top: str) -> list[Path]:
    p = PKG / top
    return sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]


@pytest.mark.parametrize("role", ROLES)
def test_a_role_package_never_imports_another_role(role: str) -> None:
    bad = []
    for f in _files(role):
        for mod in _imports(f):
            other = _role_of(mod)
            if other is not None and other != role:
                bad.append(f"{f.relative_to(PKG.parent)} imports {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("role", ROLES)
def test_a_role_package_never_imports_the_cli_or_the_demo(role: str) -> None:
    """The CLI and the demo know every party; a role that needs the exit codes takes them
    from securethread.errors (exit_code_for, describe)."""
    bad = [
        f"{f.relative_to(PKG.parent)} imports {mod}"
        for f in _files(role)
        for mod in _imports(f)
        if mod.split(".")[:2] in (["securethread", "demo"], ["securethread", "cli"])
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("shared", SHARED)
def test_shared_packages_import_no_role(shared: str) -> None:
    bad = [
        f"{f.relative_to(PKG.parent)} imports {mod}"
        for f in _files(shared)
        for mod in _imports(f)
        if _role_of(mod) is not None
        or mod.split(".")[:2] in (["securethread", "demo"], ["securethread", "cli"])
    ]
    assert not bad, "\n".join(bad)


def test_the_boundary_check_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: a function-level import of another role is caught."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from securethread.oem import layout\n    from ..audit import x\n")
    found = _imports(f, ["securethread", "device"])
    assert {_role_of(m) for m in found} >= {"oem", "audit"}


@pytest.mark.parametrize(
    "package",
    ["securethread.device", "securethread.audit", "securethread.formats", "securethread.station"],
)
def test_imports_without_python_pkcs11(package: str) -> None:
    """An auditor or device-side user needs only ``cryptography``: importing python-pkcs11
    is made to fail, and the package must still import (with every submodule)."""
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.modules['pkcs11'] = None\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'securethread.hsm.token' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
