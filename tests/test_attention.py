"""Attention of a few query positions (worker/attention.py): composed of plain operations, the
same bits as MLX's own attention where it has no fused kernel; one position at a time, the
same bits as a decode step of each; routed there on CUDA only."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import reference_tokens
from test_batched_decode import Chain, _prefill

from coordinator.demo import ModelSpec
from protos import worker_pb2
from worker import attention

FUSED = mx.fast.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _restore():
    yield
    attention.install(False)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=str)
@pytest.mark.parametrize("heads,kv_heads,length,keys", [(4, 2, 5, 70), (8, 8, 8, 130),
                                                        (4, 1, 2, 9), (6, 2, 16, 16)])
def test_few_queries_is_bit_identical_to_mlx_attention_on_the_cpu(dtype, heads, kv_heads,
                                                                  length, keys):
    mx.random.seed(length + keys)
    q = mx.random.normal((1, heads, length, 32)).astype(dtype)
    k = mx.random.normal((1, kv_heads, keys, 32)).astype(dtype)
    v = mx.random.normal((1, kv_heads, keys, 32)).astype(dtype)
    window = mx.arange(keys - length, keys)[:, None] - mx.arange(keys)[None] < 4
    for mask in ("causal", None, mx.random.normal((1, 1, length, keys)).astype(dtype),
                 window, mx.broadcast_to(window, (1, heads, length, keys))):
        want = FUSED(q, k, v, scale=0.17, mask=mask)
        got = attention.few_queries(q, k, v, scale=0.17, mask=mask)
        assert got.dtype == want.dtype and mx.array_equal(got, want).item()


@pytest.mark.parametrize("heads,kv_heads,length,keys", [(4, 2, 5, 70), (8, 8, 8, 130),
                                                        (4, 1, 2, 9), (6, 2, 16, 16)])
def test_by_position_gives_each_position_what_a_step_of_that_position_alone_gives(
        heads, kv_heads, length, keys):
    mx.random.seed(length * keys)
    q = mx.random.normal((1, heads, length, 32)).astype(mx.bfloat16)
    k = mx.random.normal((1, kv_heads, keys, 32)).astype(mx.bfloat16)
    v = mx.random.normal((1, kv_heads, keys, 32)).astype(mx.bfloat16)
    got = attention.by_position(q, k, v, scale=0.17)
    assert got.shape == q.shape and got.dtype == q.dtype
    for i in range(length):  # a decode step: one query over the keys so far, no mask
        seen = keys - length + i + 1
        alone = FUSED(q[:, :, i : i + 1], k[:, :, :seen], v[:, :, :seen], scale=0.17)
        assert mx.array_equal(got[:, :, i : i + 1], alone).item()
    causal = FUSED(q, k, v, scale=0.17, mask="causal")
    assert mx.allclose(got, causal, atol=2e-2, rtol=2e-2).item()


def test_install_routes_a_few_positions_and_gives_mlx_attention_back():
    assert not attention.routed()
    assert attention.install(True) and attention.routed()
    mx.random.seed(3)
    q, k = mx.random.normal((1, 2, 3, 8)), mx.random.normal((1, 2, 7, 8))
    window = mx.arange(4, 7)[:, None] - mx.arange(7)[None] < 3
    routed = mx.fast.scaled_dot_product_attention
    assert mx.array_equal(routed(q, k, k, scale=0.5, mask="causal"),
                          attention.by_position(q, k, k, scale=0.5)).item()
    assert mx.array_equal(routed(q, k, k, scale=0.5, mask=window),
                          FUSED(q, k, k, scale=0.5, mask=window)).item()
    assert mx.array_equal(routed(q[:, :, :1], k, k, scale=0.5),  # one position: MLX's own
                          FUSED(q[:, :, :1], k, k, scale=0.5)).item()
    assert not attention.install(False) and mx.fast.scaled_dot_product_attention is FUSED


@pytest.mark.parametrize("where", ["cuda", None])
def test_a_stage_routes_attention_only_on_cuda_and_its_checks_stay_token_exact(
        where, model_dir, monkeypatch):
    import worker.stage

    monkeypatch.setattr(worker.stage, "accelerator", lambda: where)
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    chain = Chain(path, [(0, 2), (2, spec.num_layers)])
    assert attention.routed() == (where == "cuda")
    prompt = [(5 * i + 3) % 480 + 10 for i in range(19)]
    want = reference_tokens(path, prompt, 12)
    tokens = [_prefill(chain, "s", prompt)]
    while len(tokens) < len(want):
        # propose the reference's next tokens, the last one wrong: a check of several
        # positions, then a miss
        n = len(tokens)
        guesses = want[n : n + 3] + [0]
        chain.step_id += 1
        msg = worker_pb2.StageMessage(step_id=chain.step_id, seqs=[worker_pb2.SeqInput(
            seq_id="s", token_ids=[tokens[-1], *guesses], offset=len(prompt) + n - 1,
            sample=True, draft=len(guesses))])
        for runner in chain.runners:
            out = runner.run(msg)
            msg = out.forward
        got = out.outputs[0]
        tokens += [a.token for a in got.accepted] + [got.token]
    assert tokens[: len(want)] == want
