"""The committed dispers/proto/ is exactly what dev/gen_protos.py generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current() -> None:
    pytest.importorskip("grpc_tools")
    if not (Path(sys.executable).parent / "protoc-gen-mypy").exists():
        pytest.skip("mypy-protobuf's protoc plugins are not installed next to this interpreter")
    result = subprocess.run(
        [sys.executable, str(ROOT / "dev" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
