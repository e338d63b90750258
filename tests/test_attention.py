"""Attention of a few query positions composed of plain operations (worker/attention.py): the
same bits as MLX's own attention where it has no fused kernel, routed there on CUDA only."""

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


def test_install_routes_a_few_positions_and_gives_mlx_attention_back():
    assert not attention.routed()
    assert attention.install(True) and attention.routed()
    q, k = mx.ones((1, 2, 3, 8)), mx.ones((1, 2, 7, 8))
    assert mx.array_equal(mx.fast.scaled_dot_product_attention(q, k, k, scale=0.5,
                                                               mask="causal"),
                          FUSED(q, k, k, scale=0.5, mask="causal")).item()
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
