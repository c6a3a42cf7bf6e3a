"""Regenerate dispers/proto/ from protos/dispers/proto/*.proto (--check: fail if it would change)."""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("dispers") / "proto"
INIT_TEXT = '"""Generated protobuf and gRPC code (dev/gen_protos.py); never edit by hand."""\n'
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> Path:
    """A protoc plugin installed next to this interpreter (mypy-protobuf's)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} not found next to {sys.executable}; install mypy-protobuf")
    return path


def generate(out: Path) -> list[Path]:
    """Run protoc on every .proto file, writing the package under `out`; return the files."""
    import grpc_tools  # type: ignore[import-untyped]  # dev extra; imported late for --help

    protos = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    for old in _tracked(out / PACKAGE).values():
        old.unlink()  # so a removed .proto leaves no stale module behind
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p) for p in protos),
    ]
    # Relative proto paths keep absolute checkout paths out of the generated code.
    result = subprocess.run(command, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed:\n{result.stderr}")
    (out / PACKAGE / "__init__.py").write_text(INIT_TEXT)
    return sorted(_tracked(out / PACKAGE).values())


def _tracked(directory: Path) -> dict[str, Path]:
    """The files of a generated package: __init__.py and the generated modules and stubs."""
    if not directory.is_dir():
        return {}
    return {
        p.name: p
        for p in directory.iterdir()
        if p.is_file() and (p.name == "__init__.py" or p.name.endswith(GENERATED_SUFFIXES))
    }


def check() -> int:
    """Regenerate into a temp dir and compare with the committed package; 1 if they differ."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = _tracked(Path(tmp) / PACKAGE)
        committed = _tracked(ROOT / PACKAGE)
        problems: list[str] = []
        for name in sorted(fresh.keys() - committed.keys()):
            problems.append(f"missing: {PACKAGE / name}")
        for name in sorted(committed.keys() - fresh.keys()):
            problems.append(f"stale (no .proto generates it): {PACKAGE / name}")
        for name in sorted(fresh.keys() & committed.keys()):
            new = fresh[name].read_text().splitlines(keepends=True)
            old = committed[name].read_text().splitlines(keepends=True)
            if new != old:
                diff = list(difflib.unified_diff(old, new, f"committed/{name}", f"fresh/{name}"))
                changed = sum(1 for line in diff if line[:1] in "+-") - 2
                problems.append(f"differs ({changed} changed lines): {PACKAGE / name}")
                problems.extend("    " + line.rstrip("\n") for line in diff[:40])
    if problems:
        print("dispers/proto is out of date; run `python dev/gen_protos.py`:", file=sys.stderr)
        for line in problems:
            print(line, file=sys.stderr)
        return 1
    print("dispers/proto is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if regenerating would change dispers/proto"
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    written = generate(ROOT)
    print(f"generated {len(written)} files in {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
