"""Greedy output through 1, 2 and 3 workers equals single-process mlx-lm, token for token."""

from __future__ import annotations

import pytest
from conftest import Serving, reference_tokens, run

from coordinator.demo import FAMILIES, ModelSpec

PROMPT = [(7 * i + 3) % 480 + 10 for i in range(45)]  # 45 tokens, away from special ids
NEW_TOKENS = 32

VARIANTS = [ModelSpec(family=f) for f in FAMILIES] + [
    ModelSpec(family="llama", tied=True),
    ModelSpec(family="qwen2", tied=True),
    ModelSpec(family="phi3", tied=True),
    ModelSpec(family="qwen3", tied=False),
    ModelSpec(family="llama", bits=4),
    ModelSpec(family="llama", bits=8),
    ModelSpec(family="qwen3", bits=4, tied=True),
    ModelSpec(family="gemma3_text", bits=8),
]


def _id(spec: ModelSpec) -> str:
    return f"{spec.family}{'-tied' if spec.tied else ''}{f'-q{spec.bits}' if spec.bits else ''}"


@pytest.mark.parametrize("spec", VARIANTS, ids=_id)
def test_split_generation_matches_single_process_mlx_lm(spec, model_dir, workers):
    path = model_dir(spec)
    expected = reference_tokens(path, PROMPT, NEW_TOKENS)
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
