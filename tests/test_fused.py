"""worker/fused.py: q, k, v (and gate, up) multiplied as one product give the same bits."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from coordinator.demo import ModelSpec
from worker import cuda_rows, fused
from worker.padding import set_up
from worker.shard import load_shard


def _bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _two(model_dir, spec: ModelSpec):
    path = model_dir(spec)
    return load_shard(path, 0, spec.num_layers), load_shard(path, 0, spec.num_layers)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "qwen3"])
def test_each_layer_gives_what_its_own_product_gave(model_dir, family):
    plain, joined = _two(model_dir, ModelSpec(family=family, bits=4))
    before = _bytes(joined.model)
    layers = len(joined.layers)
    assert fused.fuse(joined.model) == 2 * layers
    assert fused.fuse(joined.model) == 0  # fused once
    assert _bytes(joined.model) == before  # the parts hold nothing of their own
    attn = joined.layers[0].self_attn
    assert isinstance(attn.q_proj, fused.FusedPart) and "q_proj_fused" in attn
    hidden = joined.model.args.hidden_size
    mx.random.seed(7)
    for rows in (1, 2, 5, 19):  # a decode step, a check, a prompt chunk
        x = mx.random.normal((1, rows, hidden)).astype(mx.bfloat16)
        for name in ("q_proj", "k_proj", "v_proj"):
            want = getattr(plain.layers[0].self_attn, name)(x)
            got = getattr(attn, name)(x)
            assert got.shape == want.shape and mx.array_equal(got, want).item(), (name, rows)
        for name in ("gate_proj", "up_proj"):
            want = getattr(plain.layers[1].mlp, name)(x)
            got = getattr(joined.layers[1].mlp, name)(x)
            assert mx.array_equal(got, want).item(), (name, rows)


def test_one_input_is_multiplied_once(model_dir, monkeypatch):
    _, shard = _two(model_dir, ModelSpec(family="llama", bits=4))
    fused.fuse(shard.model)
    calls = []
    matmul = mx.quantized_matmul

    def counted(x, w, *args, **kwargs):
        calls.append((x.size // x.shape[-1], w.shape[0]))
        return matmul(x, w, *args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", counted)
    attn = shard.layers[0].self_attn
    x = mx.ones((1, 1, shard.model.args.hidden_size), dtype=mx.bfloat16)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    widths = [q.shape[-1], k.shape[-1], v.shape[-1]]
    assert calls == [(1, sum(widths))]  # one product of one row for the three
    calls.clear()
    chunk = mx.ones((1, 12, shard.model.args.hidden_size), dtype=mx.bfloat16)
    attn.q_proj(chunk), attn.k_proj(chunk), attn.v_proj(chunk)
    assert calls == [(12, w) for w in widths]  # a chunk: each its own rows, as before


def test_layers_that_differ_stay_apart():
    class Owner(nn.Module):
        def __init__(self, bits: int) -> None:
            super().__init__()
            self.gate_proj = nn.QuantizedLinear(128, 64, bias=False, bits=4)
            self.up_proj = nn.QuantizedLinear(128, 64, bias=False, bits=bits)

    assert fused.fuse(Owner(8)) == 0
    mixed = Owner(4)
    mixed.up_proj = nn.Linear(128, 64)  # not quantized
    assert fused.fuse(mixed) == 0
    assert fused.fuse(Owner(4)) == 1
    odd = Owner(4)
    odd.up_proj = nn.QuantizedLinear(128, 60, bias=False, bits=4)  # features not 8k
    assert fused.fuse(odd) == 0


def test_rows_the_few_rows_kernel_takes_are_multiplied_as_one(model_dir, monkeypatch):
    # the kernel (a CPU stand-in here: each row alone) computes each feature alone, so a
    # check's rows use the concatenated product too
    calls = []

    def product(x, weight, scales, biases, group_size):
        calls.append((x.size // x.shape[-1], weight.shape[0]))
        rows = x.reshape(-1, x.shape[-1])
        out = mx.concatenate([mx.quantized_matmul(rows[i : i + 1], weight, scales, biases,
                                                  group_size=group_size, bits=4)
                              for i in range(rows.shape[0])])
        return out.reshape(*x.shape[:-1], -1)

    monkeypatch.setattr(cuda_rows, "rows_product", product)
    monkeypatch.setattr(cuda_rows, "warm", lambda group_size: None)
    plain, joined = _two(model_dir, ModelSpec(family="llama", bits=4, hidden_size=512,
                                              intermediate_size=1024))
    assert set_up(joined.model, 8, True) == 1
    fused.fuse(joined.model)
    attn = joined.layers[0].self_attn
    x = mx.random.normal((1, 4, 512)).astype(mx.bfloat16)
    got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert calls == [(4, sum(g.shape[-1] for g in got))]
    want = [getattr(plain.layers[0].self_attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert all(mx.array_equal(g, w).item() for g, w in zip(got, want, strict=True))


def test_a_shard_that_takes_fused_layers_from_the_last_one_loads_and_fuses_the_rest(model_dir):
    # a re-plan loads a new slice taking the layers it shares from the loaded one
    # (worker/server.py); those are fused already
    spec = ModelSpec(family="llama", bits=4)
    path = model_dir(spec)
    old = load_shard(path, 0, 2)
    fused.fuse(old.model)
    new = load_shard(path, 1, 3, reuse=old, same=frozenset({"layers.1"}))
    assert new.layers[0] is old.layers[1]
    assert fused.fuse(new.model) == 2  # layer 2's groups; layer 1's were fused before
    plain = load_shard(path, 1, 3)
    x = mx.random.normal((1, 1, spec.hidden_size)).astype(mx.bfloat16)
    for got, want in zip(new.layers, plain.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert mx.array_equal(getattr(got.self_attn, name)(x),
                                  getattr(want.self_attn, name)(x)).item()
