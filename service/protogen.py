"""Generates the Python gRPC stubs in ``service/api`` from ``protos/textgen/v1/textgen.proto``.

Run ``python -m service.protogen`` after changing the .proto; commit the result.
``tests/service/test_protos.py`` regenerates into a temporary folder and fails when
the committed stubs drift from the .proto.

protoc names the generated module after the .proto's path (``textgen.v1.textgen_pb2``);
the stubs live flat in the ``service.api`` package instead, so the one absolute import
in ``textgen_pb2_grpc.py`` is rewritten to ``from service.api import textgen_pb2``.
The descriptor keeps the file name ``textgen/v1/textgen.proto``, which is what server
reflection (and so grpcurl) reports.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILE = "textgen/v1/textgen.proto"
API_DIR = REPO_ROOT / "service" / "api"
GENERATED = ("textgen_pb2.py", "textgen_pb2.pyi", "textgen_pb2_grpc.py")
API_INIT = '"""Generated gRPC stubs of textgen.v1 (see service/protogen.py); do not edit by hand."""\n'

_PROTOC_IMPORT = re.compile(r"^from textgen\.v1 import textgen_pb2 as (\w+)$", re.MULTILINE)


class ProtocError(RuntimeError):
    """protoc rejected the .proto or could not write its output."""


def run_protoc(args: list[str]) -> None:
    """Runs grpc_tools.protoc in a child process.

    Never in this process: grpc_tools links its own copy of the protobuf C++ runtime, and
    loading it beside TensorFlow's crashes the interpreter (seen as a segfault in the tests).
    """
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ProtocError(f"protoc {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Writes the stubs (and the package ``__init__.py``) into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        run_protoc(
            [
                f"-I{proto_root}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                str(proto_root / PROTO_FILE),
            ]
        )
        generated_dir = Path(raw) / Path(PROTO_FILE).parent
        written = []
        for name in GENERATED:
            text = (generated_dir / name).read_text(encoding="utf-8")
            if name == "textgen_pb2_grpc.py":
                text, count = _PROTOC_IMPORT.subn(r"from service.api import textgen_pb2 as \1", text)
                if count != 1:
                    raise ProtocError(f"expected one 'from textgen.v1 import textgen_pb2' in {name}, found {count}")
            target = out_dir / name
            target.write_text(text, encoding="utf-8")
            written.append(target)
    init = out_dir / "__init__.py"
    init.write_text(API_INIT, encoding="utf-8")
    written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=API_DIR, help="output folder (default: service/api)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as staging:
        # Generate aside and copy over, so a failed run never leaves half-written stubs.
        files = generate(Path(staging))
        args.out.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, args.out / f.name)
            print(f"wrote {args.out / f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
