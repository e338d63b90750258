"""The committed generated gRPC code matches the .proto sources; the tensor codec is exact."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from protos import build, codec

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path):
    fresh = build.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = ROOT / "protos" / path.name
        assert committed.exists(), f"{path.name} is not committed; run python -m protos.build"
        assert committed.read_text() == path.read_text(), (
            f"protos/{path.name} is stale; run python -m protos.build and commit"
        )


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32, mx.int32])
def test_tensor_round_trip_is_bit_exact(dtype):
    mx.random.seed(1)
    a = (mx.random.normal((2, 5, 7)) * 100).astype(dtype)
    b = codec.decode(codec.encode(a))
    assert b.dtype == a.dtype and b.shape == a.shape
    if dtype == mx.bfloat16:
        assert mx.array_equal(a.view(mx.uint16), b.view(mx.uint16)).item()
    else:
        assert mx.array_equal(a, b).item()


def test_tensor_with_wrong_size_is_refused():
    t = codec.encode(mx.ones((2, 3), dtype=mx.float32))
    t.shape[:] = [4, 3]
    with pytest.raises(ValueError, match="values for shape"):
        codec.decode(t)


# The public messages as SPEC.md writes them (field numbers are normative).
SPEC_MESSAGES = """
SamplingParams { optional float temperature = 1; optional float top_p = 2; optional int32 top_k = 3; optional float min_p = 4; optional float repetition_penalty = 5; optional uint64 seed = 6; optional int32 max_tokens = 7; repeated string stop = 8; optional int32 logprobs = 9; }
GenerateRequest { string model = 1; string prompt = 2; repeated int32 prompt_token_ids = 3; SamplingParams sampling = 4; string request_id = 5; }
ChatMessage { string role = 1; string content = 2; }
ChatRequest { string model = 1; repeated ChatMessage messages = 2; SamplingParams sampling = 3; string request_id = 4; }
GenerateResponse { string request_id = 1; string text = 2; repeated int32 token_ids = 3; repeated float logprobs = 4; FinishReason finish_reason = 5; Usage usage = 6; }
Usage { int32 prompt_tokens = 1; int32 completion_tokens = 2; double time_to_first_token_seconds = 3; double decode_tokens_per_second = 4; }
ModelInfo { string id = 1; int32 num_layers = 2; int64 weight_bytes = 3; }
ListModelsResponse { repeated ModelInfo models = 1; }
ClusterState { string model = 1; repeated WorkerState workers = 2; string partition = 3; }
WorkerState { string id = 1; string name = 2; string address = 3; int64 memory_bytes = 4; string backend = 5; int32 layer_start = 6; int32 layer_end = 7; string status = 8; }
"""  # noqa: E501


def test_public_messages_have_the_spec_fields_numbers_and_types():
    from google.protobuf.descriptor import FieldDescriptor

    from protos import inference_pb2

    scalar = {v: k[len("TYPE_"):].lower() for k, v in vars(FieldDescriptor).items()
              if k.startswith("TYPE_")}
    for line in SPEC_MESSAGES.strip().splitlines():
        name, body = line.split(" {")
        message = inference_pb2.DESCRIPTOR.message_types_by_name[name]
        for field in body.rstrip("; }").split(";"):
            words = field.split()
            label, (kind, fname, _, number) = words[0], words[-4:]
            got = message.fields_by_name[fname]
            assert got.number == int(number), f"{name}.{fname}"
            if got.message_type or got.enum_type:
                assert (got.message_type or got.enum_type).name == kind, f"{name}.{fname}"
            else:
                assert scalar[got.type] == kind, f"{name}.{fname}"
            assert (label == "repeated") == got.is_repeated
            assert (label == "optional") == got.has_presence or got.message_type is not None
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert service.full_name == "shardline.v1.Inference"
    rpcs = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming)
            for m in service.methods}
    assert rpcs == {"Generate": ("GenerateRequest", "GenerateResponse", True),
                    "Chat": ("ChatRequest", "GenerateResponse", True),
                    "ListModels": ("ListModelsRequest", "ListModelsResponse", False),
                    "GetCluster": ("GetClusterRequest", "ClusterState", False)}
    finish = inference_pb2.DESCRIPTOR.enum_types_by_name["FinishReason"]
    assert {v.name: v.number for v in finish.values} == {
        "FINISH_REASON_UNSPECIFIED": 0, "FINISH_REASON_STOP": 1, "FINISH_REASON_LENGTH": 2,
        "FINISH_REASON_CANCELLED": 3}
