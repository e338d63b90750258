"""worker/cuda_host.py: a stage's outputs reach the host with the same bytes either way."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest

from protos import codec, worker_pb2
from worker import cuda_host

ON_CUDA = cuda_host.available()
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="page-locked buffers need MLX's CUDA backend")


def _hidden(rows: int = 1, width: int = 64, dtype: mx.Dtype = mx.bfloat16) -> mx.array:
    return mx.random.normal((1, rows, width), key=mx.random.key(rows + width)).astype(dtype)


def _sent(wired: cuda_host.Wired, array: mx.array) -> bytes:
    mx.eval(wired.target)
    return codec.encode_into(worker_pb2.Tensor(), array, wired.source).data


def test_off_the_gpu_the_bytes_are_mlx_own() -> None:
    outbound = cuda_host.HostIO(cuda=False)
    h = _hidden()
    wired = outbound.wire(h)
    assert wired.target is wired.source  # the wire form, read by MLX
    assert _sent(wired, h) == codec.encode(h).data


def test_the_environment_turns_the_buffers_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDLINE_HOST_BUFFERS", "0")
    host = cuda_host.HostIO(cuda=True)
    assert (host.inputs, host.outputs) == (False, False)
    monkeypatch.setenv("SHARDLINE_HOST_BUFFERS", "out")
    host = cuda_host.HostIO(cuda=True)
    assert (host.inputs, host.outputs) == (False, ON_CUDA)
    monkeypatch.delenv("SHARDLINE_HOST_BUFFERS")
    host = cuda_host.HostIO(cuda=True)  # on a machine without CUDA: MLX's way, whatever said
    assert (host.inputs, host.outputs) == (ON_CUDA, ON_CUDA)


@cuda_only
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_buffer_carries_the_bytes_both_ways(dtype: mx.Dtype, rows: int) -> None:
    h = _hidden(rows, 4096 + 8, dtype)  # not a multiple of 16 bytes a row for fp16/bf16
    buffer = cuda_host.HostBuffer(tuple(h.shape), dtype)
    mx.eval(buffer.write(h))
    assert buffer.bytes.tobytes() == codec.encode(h).data
    back = buffer.read()
    mx.eval(back)
    assert mx.array_equal(back, h).item()


@cuda_only
def test_buffers_go_back_to_the_pool_with_their_step() -> None:
    outbound = cuda_host.HostIO(cuda=True)
    first = outbound.wire(_hidden())
    address = first.source.ctypes.data
    assert _sent(first, _hidden()) == codec.encode(_hidden()).data
    second = outbound.wire(_hidden(1, 64) * 2)
    assert second.source.ctypes.data != address  # the first is still in use
    del first
    gc.collect()
    third = outbound.wire(_hidden() * 3)
    assert third.source.ctypes.data == address  # taken again once its step went
    assert _sent(third, _hidden() * 3) == codec.encode(_hidden() * 3).data


@cuda_only
def test_large_outputs_take_mlx_way() -> None:
    outbound = cuda_host.HostIO(cuda=True)
    big = _hidden(cuda_host.MAX_BYTES // (2 * 64) + 1)
    wired = outbound.wire(big)
    assert wired.target is wired.source
    assert _sent(wired, big) == codec.encode(big).data


def test_off_the_gpu_inputs_are_mlx_own() -> None:
    host = cuda_host.HostIO(cuda=False)
    h = _hidden(3)
    tensor = codec.encode(h)
    assert mx.array_equal(host.decode(tensor), h).item()
    slot, view = host.placeholder((1, 3, 64), mx.bfloat16)
    assert codec.fill(view, tensor)
    assert mx.array_equal(slot, h).item()


@cuda_only
def test_inputs_read_what_was_written_before_the_launch() -> None:
    host = cuda_host.HostIO(cuda=True)
    slots = [host.placeholder((1, 1, 64), mx.bfloat16) for _ in range(cuda_host.SPARE + 4)]
    sums = [slot * 2 for slot, _ in slots]  # built before any value is written
    values = [_hidden(1, 64) + i for i in range(len(slots))]
    for (_, view), value in zip(slots, values, strict=True):
        assert codec.fill(view, codec.encode(value))
    mx.eval(sums)
    for got, value in zip(sums, values, strict=True):
        assert mx.array_equal(got, value * 2).item()


@cuda_only
def test_a_buffer_is_written_again_only_after_its_read() -> None:
    host = cuda_host.HostIO(cuda=True)
    values = [_hidden(1, 64) + i for i in range(3 * cuda_host.SPARE)]
    decoded = [host.decode(codec.encode(v)) * 1 for v in values]  # all built, none launched
    assert host.made <= cuda_host.SPARE + 1  # buffers came back and were taken again
    mx.eval(decoded)
    for got, value in zip(decoded, values, strict=True):
        assert mx.array_equal(got, value).item()
    with pytest.raises(ValueError):
        host.decode(worker_pb2.Tensor(data=b"\0" * 6, shape=[1, 1, 64], dtype="bfloat16"))
