"""Regenerate the committed gRPC modules from the .proto sources: `python -m protos.build`."""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = ("inference.proto", "worker.proto")
ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto into `out_dir/protos/`; return the generated files."""
    from grpc_tools import protoc

    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    for name in PROTOS:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / "protos" / name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def main() -> int:
    files = generate(ROOT)
    print("\n".join(str(f.relative_to(ROOT)) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
