"""The committed stubs in service/api match what protoc makes from protos/textgen/v1/textgen.proto."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from service import protogen
from service.api import textgen_pb2

# Lines that carry the generator's own version, which may differ between two honest installs.
_VERSION_STAMP = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|    \d+,)$",
    re.MULTILINE,
)


def _normalised(text: str) -> str:
    return _VERSION_STAMP.sub("<version>", text)


@pytest.fixture(scope="module")
def fresh_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    protogen.generate(out)
    return out


@pytest.mark.parametrize("name", [*protogen.GENERATED, "__init__.py"])
def test_committed_stubs_match_a_fresh_generation(fresh_stubs: Path, name: str) -> None:
    committed = (protogen.API_DIR / name).read_text(encoding="utf-8")
    fresh = (fresh_stubs / name).read_text(encoding="utf-8")
    assert _normalised(committed) == _normalised(fresh), (
        f"service/api/{name} drifted from protos/{protogen.PROTO_FILE}; run `python -m service.protogen` and commit"
    )


def test_committed_descriptor_equals_the_proto(tmp_path: Path) -> None:
    """Independent of generator versions: the descriptor compiled into the stubs is the .proto's."""
    out = tmp_path / "set.pb"
    protogen.run_protoc([f"-I{protogen.PROTO_ROOT}", f"--descriptor_set_out={out}", protogen.PROTO_FILE])
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (from_proto,) = fds.file
    _clear_json_names(from_proto)  # protoc fills json_name in descriptor sets, never in generated code
    committed = descriptor_pb2.FileDescriptorProto.FromString(textgen_pb2.DESCRIPTOR.serialized_pb)
    assert committed == from_proto


def _clear_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    pending = list(file.message_type)
    while pending:
        message = pending.pop()
        for field in message.field:
            field.ClearField("json_name")
        pending.extend(message.nested_type)


def test_grpc_stub_imports_the_flat_module() -> None:
    text = (protogen.API_DIR / "textgen_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from service.api import textgen_pb2" in text
    assert "from textgen.v1" not in text


def test_a_changed_proto_is_detected(tmp_path: Path) -> None:
    """The drift check can fail: a proto with one more field generates different stubs."""
    proto_root = tmp_path / "protos"
    target = proto_root / protogen.PROTO_FILE
    target.parent.mkdir(parents=True)
    original = (protogen.PROTO_ROOT / protogen.PROTO_FILE).read_text(encoding="utf-8")
    target.write_text(original.replace("message ListModelsRequest {}", "message ListModelsRequest { string x = 1; }"))
    protogen.generate(tmp_path / "out", proto_root=proto_root)
    committed = (protogen.API_DIR / "textgen_pb2.py").read_text(encoding="utf-8")
    assert _normalised((tmp_path / "out" / "textgen_pb2.py").read_text(encoding="utf-8")) != _normalised(committed)
