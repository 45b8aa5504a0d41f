"""The station API's generated code is what its .proto generates today: regenerated into a
temporary directory with the pinned grpcio-tools and mypy-protobuf and compared byte for
byte, so the contract (securethread/proto/station.proto) and the code cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from securethread.proto import GENERATED, HERE, generate


def test_the_generated_code_matches_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = generate(tmp_path)
    stale = [n for n in GENERATED if (out / n).read_bytes() != (HERE / n).read_bytes()]
    assert not stale, f"regenerate securethread/proto (securethread.proto.generate()): {stale}"


def test_the_check_sees_a_changed_contract(tmp_path: Path) -> None:
    """The comparison itself: a field added to a copy of the .proto changes the code."""
    pytest.importorskip("grpc_tools")
    import subprocess
    import sys

    src = tmp_path / "src" / "securethread" / "proto"
    src.mkdir(parents=True)
    text = (HERE / "station.proto").read_text()
    (src / "station.proto").write_text(
        text.replace("  bool programmed = 1;\n", "  bool programmed = 1;\n  bool extra = 2;\n")
    )
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path / 'src'}",
         f"--python_out={tmp_path / 'src'}", str(src / "station.proto")],  # fmt: skip
        check=True,
    )
    assert (src / "station_pb2.py").read_bytes() != (HERE / "station_pb2.py").read_bytes()
