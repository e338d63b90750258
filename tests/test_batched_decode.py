"""Batched decode in a stage is exact per sequence, whatever the batch's mix of lengths."""

from __future__ import annotations

import pytest
from conftest import reference_tokens

from coordinator.demo import ModelSpec
from protos import worker_pb2
from worker.shard import load_shard
from worker.stage import StageRunner

SPECS = [ModelSpec(family=f) for f in ("llama", "qwen3", "gemma2", "gemma3_text", "phi3")]
SPECS.append(ModelSpec(family="llama", bits=4))


class Chain:
    """Stage runners of one model in a row, driven directly (no network)."""

    def __init__(self, path, bounds):
        self.runners = [StageRunner(load_shard(path, a, b)) for a, b in bounds]
        self.step_id = 0

    def step(self, seqs):
        self.step_id += 1
        msg = worker_pb2.StageMessage(step_id=self.step_id, seqs=seqs)
        for runner in self.runners:
            out = runner.run(msg)
            msg = out.forward
        return {o.seq_id: o.token for o in out.outputs}


def _prefill(chain, seq_id, ids):
    if len(ids) > 1:
        chain.step([worker_pb2.SeqInput(seq_id=seq_id, token_ids=ids[:-1], start=True)])
    first = worker_pb2.SeqInput(seq_id=seq_id, token_ids=ids[-1:], offset=len(ids) - 1,
                                sample=True, start=len(ids) == 1)
    return chain.step([first])[seq_id]


# three prompts of 21, 3 and 9 tokens: prefill chunks of 20, 2 and 8, then a batch of 3
THREE_PROMPTS = {"a": [(3 * i + 11) % 480 + 10 for i in range(21)],
                 "b": [(7 * i + 5) % 480 + 10 for i in range(3)],
                 "c": [(5 * i + 1) % 480 + 10 for i in range(9)]}


def generate_together(chain, prompts, count):
    """Each prompt prefilled alone, then decoded in one batch until each has `count` tokens
    (greedy): the tokens by sequence."""
    tokens = {k: [_prefill(chain, k, ids)] for k, ids in prompts.items()}
    while min(len(t) for t in tokens.values()) < count:
        out = chain.step([
            worker_pb2.SeqInput(seq_id=k, token_ids=[tokens[k][-1]], sample=True,
                                offset=len(prompts[k]) + len(tokens[k]) - 1) for k in tokens])
        for k in tokens:
            tokens[k].append(out[k])
    return tokens


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family + (f"-q{s.bits}" if s.bits else ""))
def test_batched_decode_matches_each_sequence_alone(spec, model_dir):
    path = model_dir(spec)
    prompts = {"a": [(3 * i + 11) % 480 + 10 for i in range(41)],
               "b": [(7 * i + 5) % 480 + 10 for i in range(9)],
               "c": [(5 * i + 1) % 480 + 10 for i in range(23)],
               "d": [(11 * i + 2) % 480 + 10 for i in range(3)]}
    lengths = {"a": 14, "b": 10, "c": 14, "d": 8}
    chain = Chain(path, [(0, 2), (2, 6)])
    tokens = {k: [_prefill(chain, k, prompts[k])] for k in ("a", "b", "c")}
    steps = 0
    while any(len(tokens[k]) < lengths[k] for k in tokens):
        steps += 1
        if steps == 4:  # a newcomer joins mid-way: the batch is rebuilt
            tokens["d"] = [_prefill(chain, "d", prompts["d"])]
        live = [k for k in tokens if len(tokens[k]) < lengths[k]]
        out = chain.step([
            worker_pb2.SeqInput(seq_id=k, token_ids=[tokens[k][-1]], sample=True,
                                offset=len(prompts[k]) + len(tokens[k]) - 1) for k in live])
        for k in live:
            tokens[k].append(out[k])
    batched = sum(len(r.batches) for r in chain.runners)
    assert chain.runners[0].batching and batched > 0
    for k, ids in prompts.items():
        assert tokens[k] == reference_tokens(path, ids, lengths[k]), f"sequence {k} diverged"


def product_rows(monkeypatch) -> list[tuple[int, int]]:
    """From now on, the rows of every quantized matrix product, in order, and how many of them
    one matrix holds (fewer: a batch of matrices)."""
    import mlx.core as mx

    rows: list[tuple[int, int]] = []
    product = mx.quantized_matmul

    def counted(a, *args, **kwargs):
        rows.append((a.size // a.shape[-1], a.shape[-2] if a.ndim > 1 else 1))
        return product(a, *args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", counted)
    return rows


def test_a_few_sequences_products_padded_as_one_matrix_stay_exact(model_dir, monkeypatch):
    """Where a quantized product of a few rows costs more than one of more rows (CUDA; worker/
    padding.py), every product of a batch of 3 sequences, and of a short prompt chunk, is
    computed as one matrix, of 6 rows from 3 (floor 6 here); each sequence's tokens stay
    mlx-lm's."""

    path = model_dir(ModelSpec(family="llama", bits=4))
    prompts = THREE_PROMPTS
    expected = {k: reference_tokens(path, ids, 8) for k, ids in prompts.items()}
    monkeypatch.setenv("SHARDLINE_PAD_ROWS", "6")
    rows = product_rows(monkeypatch)
    chain = Chain(path, [(0, 2), (2, 6)])
    tokens = generate_together(chain, prompts, 8)
    assert tokens == expected
    assert rows.count((6, 6)) > 0 and (2, 2) in rows, sorted(set(rows))
    # 3 to 5 rows are padded to 6; 2 rows (a prompt's chunk) cost less as they are
    assert not [r for r in rows if 3 <= r[0] < 6 or r[1] != r[0]], sorted(set(rows))


def test_quantized_layers_multiply_rows_as_one_padded_matrix(monkeypatch):
    """worker/padding.py on its own, floor 8: 5 rows are computed as 8, 2 rows as they are,
    8 one-row vectors (8 sequences) as one matrix of 8 rows, each giving the values of the
    layers as they were; `pad_products(model, 1)` turns it off again."""
    import mlx.core as mx
    import mlx.nn as nn

    from worker.padding import pad_products, rows_for

    assert [rows_for(n, 8) for n in range(1, 10)] == [1, 2, 3, 8, 8, 8, 8, 8, 9]
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    nn.quantize(model, group_size=32, bits=4)
    inputs = [mx.random.normal(shape) for shape in ((1, 5, 64), (1, 2, 64), (8, 1, 64))]
    plain = [model(x) for x in inputs]
    rows = product_rows(monkeypatch)
    assert pad_products(model, 8) == 2
    for x, want, seen in zip(inputs, plain, ([(8, 8)] * 2, [(2, 2)] * 2, [(8, 8)] * 2),
                             strict=True):
        rows.clear()
        got = model(x)
        assert got.shape == want.shape and mx.array_equal(got, want).item()
        assert rows == seen
    assert pad_products(model, 1) == 0
    rows.clear()
    assert mx.array_equal(model(inputs[2]), plain[2]).item() and rows == [(8, 1), (8, 1)]
