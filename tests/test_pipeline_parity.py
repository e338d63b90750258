"""Greedy output through 1, 2 and 3 workers equals single-process mlx-lm, token for token."""

from __future__ import annotations

import pytest
from conftest import Serving, reference_tokens, run

from coordinator.demo import FAMILIES, ModelSpec

PROMPT = [(7 * i + 3) % 480 + 10 for i in range(45)]  # 45 tokens, away from special ids
NEW_TOKENS = 32

# Every family plain and 4-bit; tied and untied heads; 8-bit on a tied and an untied family.
VARIANTS = (
    [ModelSpec(family=f) for f in FAMILIES]
    + [ModelSpec(family=f, bits=4) for f in FAMILIES]
    + [
        ModelSpec(family="llama", tied=True),
        ModelSpec(family="qwen2", tied=True),
        ModelSpec(family="phi3", tied=True),
        ModelSpec(family="qwen3", tied=True),
        ModelSpec(family="llama", bits=8),
        ModelSpec(family="qwen3", bits=8, tied=True),
        ModelSpec(family="gemma3_text", bits=8),
    ]
)


def _id(spec: ModelSpec) -> str:
    return f"{spec.family}{'-tied' if spec.tied else ''}{f'-q{spec.bits}' if spec.bits else ''}"


@pytest.mark.parametrize("spec", VARIANTS, ids=_id)
def test_split_generation_matches_single_process_mlx_lm(spec, model_dir, workers):
    path = model_dir(spec)
    expected = reference_tokens(path, PROMPT, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS, "the reference must not stop early"
    assert len(set(expected)) >= 6, "the test model must not just repeat a token"

    async def through(n: int):
        async with Serving(path, workers[:n]) as s:
            layers = [(w.layer_start, w.layer_end) for w in s.coordinator.cluster.state().workers]
            tokens, _, _ = await s.generate(PROMPT, NEW_TOKENS)
            return layers, tokens

    for n in (1, 2, 3):
        layers, tokens = run(through(n))
        assert len(layers) == n and layers[0][0] == 0 and layers[-1][1] == spec.num_layers
        assert tokens == expected, f"{n} worker(s) with layers {layers} diverged"


def test_generation_stops_on_eos_like_mlx_lm(model_dir, workers, tmp_path):
    """A model whose EOS is a token greedy decoding reaches stops there, as mlx-lm does."""
    import json
    import shutil

    from protos import inference_pb2

    source = model_dir(ModelSpec(family="llama"))
    tokens = reference_tokens(source, PROMPT, NEW_TOKENS)
    cut = next(i for i in range(8, len(tokens)) if tokens[i] not in tokens[:i])
    path = tmp_path / "eos-model"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [tokens[cut]]
    (path / "config.json").write_text(json.dumps(config))
    expected = reference_tokens(path, PROMPT, NEW_TOKENS)
    assert expected == tokens[:cut]

    async def through(n: int):
        async with Serving(path, workers[:n]) as s:
            return await s.generate(PROMPT, NEW_TOKENS)

    for n in (1, 3):
        got, finish, _ = run(through(n))
        assert got == expected, f"{n} worker(s)"
        assert finish == inference_pb2.FINISH_REASON_STOP
