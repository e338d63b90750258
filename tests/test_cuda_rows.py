"""worker/cuda_rows.py: which products its kernel takes, and (on CUDA) that it is exact."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import reference_tokens
from test_batched_decode import THREE_PROMPTS, Chain, generate_together

from coordinator.demo import ModelSpec
from worker import cuda_rows
from worker.padding import pad_products, set_up

ON_CUDA = cuda_rows.enabled()


def _alone(x: mx.array, layer: nn.Module) -> mx.array:
    """Each row of `x` multiplied on its own, as MLX's one-row product does it."""
    return _rows_alone(x, layer["weight"], layer["scales"], layer["biases"], layer.group_size,
                       layer.bits)


def _rows_alone(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
                group_size: int, bits: int = 4) -> mx.array:
    rows = x.reshape(-1, x.shape[-1])
    out = mx.concatenate([mx.quantized_matmul(
        rows[i:i + 1], weight, scales, biases, transpose=True, group_size=group_size,
        bits=bits) for i in range(rows.shape[0])])
    return out.reshape(*x.shape[:-1], -1)


def _layer(inputs: int, outputs: int, bits: int = 4, bias: bool = False,
           group_size: int = 64) -> nn.Module:
    layer = nn.QuantizedLinear(inputs, outputs, bias=bias, group_size=group_size, bits=bits)
    layer.set_dtype(mx.bfloat16)
    mx.eval(layer.parameters())
    return layer


class _Model(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = list(layers)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stand in for the CUDA kernel on any device: record each call's rows, then compute
    what the kernel computes (each row alone)."""
    calls: list[int] = []

    def product(x, weight, scales, biases, group_size):
        calls.append(x.size // x.shape[-1])
        return _rows_alone(x, weight, scales, biases, group_size)

    monkeypatch.setattr(cuda_rows, "rows_product", product)
    return calls


def test_a_few_rows_of_4_bit_bf16_weights_go_through_the_kernel(kernel_calls):
    layer = _layer(512, 256, bias=True)
    xs = {rows: mx.random.normal((rows, 1, 512)).astype(mx.bfloat16) for rows in (1, 3, 8, 9)}
    # 9 rows: MLX's own product, as the layer computed it before
    expected = {rows: _alone(x, layer) + layer["bias"] if rows <= 8
                else nn.QuantizedLinear.__call__(layer, x) for rows, x in xs.items()}
    assert pad_products(_Model(layer), 1, kernel=True) == 1
    for rows, x in xs.items():
        out = layer(x)
        assert out.shape == (rows, 1, 256)
        assert mx.array_equal(out, expected[rows]).item(), rows
    assert kernel_calls == [3, 8]  # one row by MLX's product (SHARDLINE_ROWS_MIN, default 2)


def test_one_row_goes_through_the_kernel_where_set(kernel_calls, monkeypatch):
    monkeypatch.setattr(cuda_rows, "MIN_ROWS", 1)  # SHARDLINE_ROWS_MIN=1
    layer = _layer(512, 256)
    x = mx.random.normal((1, 1, 512)).astype(mx.bfloat16)
    assert pad_products(_Model(layer), 1, kernel=True) == 1
    assert mx.array_equal(layer(x), _alone(x, layer)).item()
    assert kernel_calls == [1]


def test_the_kernel_is_not_used_off_cuda_nor_for_other_weights(kernel_calls):
    plain, eight_bit, narrow = _layer(512, 256), _layer(512, 256, bits=8), _layer(64, 64)
    model = _Model(plain, eight_bit, narrow)
    pad_products(model, 1)  # kernel off: as a CPU or Metal worker sets it up
    plain(mx.random.normal((4, 1, 512)).astype(mx.bfloat16))
    assert kernel_calls == []
    # an 8-bit layer and one narrower than a warp's 512 elements keep MLX's products, and a
    # chunk is then still padded for them; float32 rows are not the kernel's either. The
    # kernel is still built at set-up for the layer it covers.
    assert set_up(model, 8, True) == 8
    assert kernel_calls == [2, 4]
    kernel_calls.clear()
    eight_bit(mx.random.normal((4, 1, 512)).astype(mx.bfloat16))
    narrow(mx.random.normal((4, 1, 64)).astype(mx.bfloat16))
    plain(mx.random.normal((4, 1, 512)))
    assert kernel_calls == []
    assert set_up(_Model(_layer(512, 256), _layer(1024, 512)), 8, True) == 1


def test_the_head_of_a_quantized_embedding_goes_through_the_kernel(kernel_calls):
    embedding = nn.QuantizedEmbedding(300, 512, group_size=64, bits=4)
    embedding.set_dtype(mx.bfloat16)
    x = mx.random.normal((2, 3, 512)).astype(mx.bfloat16)
    expected = _alone(x, embedding)
    assert set_up(_Model(embedding), 1, True) == 1
    assert kernel_calls == [2, 4]  # each build of the kernel made before any step
    kernel_calls.clear()
    assert mx.array_equal(embedding.as_linear(x), expected).item()
    assert kernel_calls == [6]


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on CUDA only")
@pytest.mark.parametrize("rows", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(1024, 512), (512, 1536), (1030, 512)])
def test_each_row_is_what_that_row_alone_gives(rows: int, shape: tuple[int, int]):
    layer = _layer(shape[1], shape[0])
    x = mx.random.normal((rows, shape[1])).astype(mx.bfloat16)
    got = cuda_rows.rows_product(x, layer["weight"], layer["scales"], layer["biases"], 64)
    assert mx.array_equal(got, _alone(x, layer)).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on CUDA only")
@pytest.mark.parametrize("group_size", [32, 128])
def test_other_group_sizes_are_exact_too(group_size: int):
    layer = _layer(1024, 768, group_size=group_size)
    cuda_rows.warm(group_size)
    x = mx.random.normal((5, 1024)).astype(mx.bfloat16)
    got = cuda_rows.rows_product(x, layer["weight"], layer["scales"], layer["biases"],
                                 group_size)
    assert mx.array_equal(got, _alone(x, layer)).item()


def test_a_kernel_that_cannot_be_built_leaves_mlx_products(kernel_calls, monkeypatch, caplog):
    def fails(group_size: int) -> None:
        raise RuntimeError("nvrtc: error: invalid value for --gpu-architecture")

    monkeypatch.setattr(cuda_rows, "warm", fails)
    layer = _layer(512, 256)
    assert set_up(_Model(layer), 8, True) == 8
    assert "could not be built" in caplog.text
    x = mx.random.normal((3, 1, 512)).astype(mx.bfloat16)
    layer(x)
    assert kernel_calls == []


@pytest.mark.skipif(ON_CUDA, reason="on CUDA a batch of sequences is not bit-exact against "
                    "one sequence's steps outside the products too (bench/RESULTS-gpu.md, "
                    "'Tests on the GPU'); the stand-in kernel proves the routing on the CPU")
def test_a_pipeline_with_the_kernel_standing_in_stays_exact(model_dir, monkeypatch,
                                                             kernel_calls):
    """Two stages set up as on CUDA with the kernel (a stand-in computing each row alone; the
    tiny model's 64-wide layers let in): nothing is padded, one sequence's steps, a batch of
    3 sequences and a 2-token prompt chunk go through the kernel, and every sequence's tokens
    are mlx-lm's."""
    monkeypatch.setattr(cuda_rows, "enabled", lambda: True)
    monkeypatch.setattr(cuda_rows, "WARP_ELEMENTS", 64)
    path = model_dir(ModelSpec(family="llama", bits=4))
    expected = {k: reference_tokens(path, ids, 8) for k, ids in THREE_PROMPTS.items()}
    chain = Chain(path, [(0, 2), (2, 6)])
    assert [runner.row_floor for runner in chain.runners] == [1, 1]
    kernel_calls.clear()  # the builds at set-up
    assert generate_together(chain, THREE_PROMPTS, 8) == expected
    assert set(kernel_calls) == {2, 3, 8}, sorted(set(kernel_calls))


def test_rows_past_the_split_go_in_calls_of_that_many(monkeypatch):
    # SHARDLINE_ROWS_SPLIT: a kernel that stands in for the CUDA one (each row alone) records
    # the rows of each call and the bucket it was built for
    calls = []

    def kernel(inputs, template, **_):
        x, weight, scales, biases = inputs
        calls.append((x.shape[0], dict(template)["MB"]))
        return [_rows_alone(x, weight, scales, biases, dict(template)["GS"])]

    monkeypatch.setattr(cuda_rows, "_get_kernel", lambda: kernel)
    monkeypatch.setattr(cuda_rows, "SPLIT", 4)
    layer = _layer(512, 256)
    x = mx.random.normal((7, 1, 512)).astype(mx.bfloat16)
    got = cuda_rows.rows_product(x, layer["weight"], layer["scales"], layer["biases"], 64)
    assert calls == [(4, 4), (3, 4)]
    assert got.shape == (7, 1, 256) and mx.array_equal(got, _alone(x, layer)).item()
    calls.clear()
    monkeypatch.setattr(cuda_rows, "BUCKETS", (1, 2, 3, 4))
    cuda_rows.rows_product(x[:1], layer["weight"], layer["scales"], layer["biases"], 64)
    assert calls == [(1, 1)]
