"""Regenerate the Python code for proto/**/*.proto with grpcio-tools. Never hand-edit the output.

Run: `make proto` (or `python proto/generate.py`). The generated imports are rewritten from
`specpipe.v1` to `specpipe.proto.specpipe.v1`, because the `proto/` folder installs as
`specpipe.proto` (DESIGN §6). tests/proto checks the checked-in code is up to date.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
# (source, has a service): grpc stubs only where there is a service.
SOURCES = [("specpipe/v1/specpipe.proto", True), ("specpipe/worker/v1/worker.proto", False)]


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    include = Path(protoc.__file__).resolve().parent / "_proto"
    written = []
    for source, has_service in SOURCES:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
        args += [f"--grpc_python_out={out_dir}"] if has_service else []
        if protoc.main(args + [source]) != 0:
            raise SystemExit(f"protoc failed on {source}")
        stem = out_dir / source.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi") + (("_pb2_grpc.py",) if has_service else ()):
            path = stem.with_name(stem.name + suffix)
            text = re.sub(r"^from specpipe\.", "from specpipe.proto.specpipe.", path.read_text(), flags=re.M)
            path.write_text(text)
            written.append(path)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
