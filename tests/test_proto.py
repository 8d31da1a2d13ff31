"""The committed gRPC stubs are exactly what `make proto` generates from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("scoring_pb2.py", "scoring_pb2.pyi", "scoring_pb2_grpc.py")


def test_generated_stubs_have_not_drifted(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto/adpa/v1").glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "adpa/v1" / name).read_text()
        committed = (ROOT / "proto/adpa/v1" / name).read_text()
        assert fresh == committed, f"proto/adpa/v1/{name} is stale: run `make proto` and commit the result"
