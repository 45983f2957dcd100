"""Regenerate the checked-in gRPC/protobuf Python from proto/ (``make proto``).

``--check`` regenerates into a temporary folder and fails when the checked-in files differ,
so CI catches a contract edited without regenerating.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "monitor" / "_proto"
PROTOS = ["safety_monitor/v1/monitor.proto"]
GENERATED = ["monitor_pb2.py", "monitor_pb2.pyi", "monitor_pb2_grpc.py"]


def generate(out: Path) -> None:
    """Run protoc and flatten the output into ``out`` with package-relative imports."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(PROTO_DIR / p) for p in PROTOS],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        src = Path(tmp) / "safety_monitor" / "v1"
        out.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (src / name).read_text()
            text = re.sub(
                r"^from safety_monitor\.v1 import (\w+) as",
                r"from . import \1 as",
                text,
                flags=re.M,
            )
            (out / name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in files are stale")
    ns = parser.parse_args()
    if not ns.check:
        generate(OUT_DIR)
        print(f"generated {', '.join(GENERATED)} in {OUT_DIR.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in GENERATED if not filecmp.cmp(Path(tmp) / n, OUT_DIR / n, shallow=False)]
    if stale:
        print(f"stale generated files (run `make proto`): {', '.join(stale)}", file=sys.stderr)
        return 1
    print("generated protobuf code is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
