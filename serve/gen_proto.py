"""Generate the gRPC stubs of serve/p5ray.proto into p5ray/proto/ (run after editing the .proto).

    python serve/gen_proto.py

The generated modules are committed and never edited by hand; the one import protoc writes as a
top-level import is rewritten as a package import so `p5ray.proto.p5ray_pb2_grpc` imports anywhere.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "serve" / "p5ray.proto"
OUT = ROOT / "p5ray" / "proto"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", str(PROTO)]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    grpc_file = OUT / "p5ray_pb2_grpc.py"
    text = re.sub(r"^import p5ray_pb2 as", "from p5ray.proto import p5ray_pb2 as", grpc_file.read_text(), flags=re.M)
    grpc_file.write_text(text)
    shutil.copy(PROTO, OUT / PROTO.name)  # shipped in the wheel for clients and reflection
    (OUT / "__init__.py").write_text('"""Generated gRPC stubs of serve/p5ray.proto (`python serve/gen_proto.py`); do not edit."""\n')
    print(f"wrote {', '.join(sorted(p.name for p in OUT.iterdir() if p.is_file()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
