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
