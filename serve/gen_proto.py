"""Generate the gRPC stubs of serve/p5ray.proto into p5ray/proto/ (run after editing the .proto).

    python serve/gen_proto.py

The generated modules are committed and never edited by hand. The .proto is compiled from its copy
at p5ray/proto/p5ray.proto (shipped in the wheel) so the generated classes live in the module
`p5ray.proto.p5ray_pb2`: importable from anywhere, and picklable by reference, as Ray needs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "serve" / "p5ray.proto"
OUT = ROOT / "p5ray" / "proto"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    copy = OUT / PROTO.name
    shutil.copy(PROTO, copy)
    include = Path(protoc.__file__).parent / "_proto"
    source = str(copy.relative_to(ROOT))
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", source]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    (OUT / "__init__.py").write_text('"""Generated gRPC stubs of serve/p5ray.proto (`python serve/gen_proto.py`); do not edit."""\n')
    print(f"wrote {', '.join(sorted(p.name for p in OUT.iterdir() if p.is_file()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
