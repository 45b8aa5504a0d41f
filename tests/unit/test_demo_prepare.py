"""``securethread demo`` starts over in a directory of its own -- every part it made, the
stations' directories and the kept flash included -- and refuses anything else untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from securethread.demo import DEMO_MARKER, prepare
from securethread.errors import ConfigurationError


def test_a_demo_directory_is_cleared_with_its_stations_and_flash(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    prepare(root)
    for part in ("oem", "station-1", "station-12", "flash"):
        (root / part).mkdir()
        (root / part / "f").write_text("x")
    prepare(root)  # a second run: the demo's own parts go
    assert sorted(p.name for p in root.iterdir()) == [DEMO_MARKER, "courier"]


@pytest.mark.parametrize("name", ["station-x", "station-", "notes.txt"])
def test_a_part_the_demo_did_not_make_is_refused_untouched(tmp_path: Path, name: str) -> None:
    root = tmp_path / "demo"
    prepare(root)
    (root / "flash").mkdir()
    (root / name).write_text("mine")
    with pytest.raises(ConfigurationError, match=f"did not create \\({name}\\)"):
        prepare(root)
    assert (root / name).read_text() == "mine" and (root / "flash").is_dir()
