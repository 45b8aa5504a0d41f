"""The docs cite only what the repository holds: every test the threat model names exists, and
no doc or source file cites design notes that live outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")
    }


def test_every_test_the_threat_model_names_exists() -> None:
    text = (ROOT / "docs" / "threat-model.md").read_text()
    last_file: Path | None = None
    missing = []
    for m in re.finditer(r"`((?:tests/[\w/]+\.py)?)(?:::(\w+))?[^`]*`", text):
        path, name = m.group(1), m.group(2)
        if path:
            last_file = ROOT / path
            if not last_file.exists():
                missing.append(path)
                continue
        if name:
            if last_file is None or name not in _tests_in(last_file):
                missing.append(f"{last_file}::{name}")
    assert not missing, missing


def test_no_citation_of_files_outside_the_repository() -> None:
    bad = []
    for path in [*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("securethread/**/*.py"),
                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/**/*.py")]:  # fmt: skip
        if path.name == "test_docs.py":
            continue
        for word in ("DESIGN.md", "SOFTHSM_NOTES", "STYLE.md"):
            if word in path.read_text():
                bad.append(f"{path.relative_to(ROOT)} cites {word}")
    assert not bad, bad
