"""Sampling with speculation keeps the target model's distribution (docs/speculation.md): over
many seeds, the token sampled at a checked position follows the target's probabilities, whether
the draft's proposal there was confirmed or not (a chi-square test on a vocabulary cut to the
target's 4 likeliest tokens)."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
from conftest import Serving, run
from test_speculation import PROMPT, generate, spec_for

from coordinator.demo import draft_model
from coordinator.serving.speculation import MAX_STREAMS  # speculating up to this many

SEEDS = 320
TOP_K = 4  # the vocabulary each position samples from: the target's 4 likeliest tokens
CHI2_3DOF_P001 = 16.27  # chi-square with 3 degrees of freedom: exceeded by chance 1 in 1000


def target_probabilities(net, prefix: list[int]) -> dict[int, float]:
    """The target's (`net`, loaded by single-process mlx-lm) next-token probabilities after
    `prefix` at temperature 1, cut to its TOP_K likeliest tokens."""
    logits = net(mx.array(prefix)[None])[0, -1].astype(mx.float32)
    top = np.argsort(-np.array(logits))[:TOP_K]
    p = np.array(mx.softmax(logits[mx.array(top)]))
    return {int(t): float(q) for t, q in zip(top, p, strict=True)}


def test_a_checked_position_samples_the_target_distribution(model_dir, workers):
    path = model_dir(spec_for("llama"))
    draft = draft_model(path, 3)

    async def scenario():
        async with Serving(path, workers[:2], context=256, draft_model=str(draft)) as s:
            out = []
            for start in range(0, SEEDS, MAX_STREAMS):  # checks batched across streams
                out += await asyncio.gather(*(
                    generate(s, PROMPT, 3, seed=seed, temperature=1.0, top_k=TOP_K)
                    for seed in range(start, start + MAX_STREAMS)))
            return out

    results = run(scenario())
    drafted = sum(u.draft_tokens for _, u in results)
    confirmed = sum(u.accepted_draft_tokens for _, u in results)
    # the second token comes from a check: proposals were made, some confirmed, some not
    assert drafted >= SEEDS // 2 and 0 < confirmed < drafted, (drafted, confirmed)

    # chi-square over ranks: each sample's second token ranked among the target's TOP_K
    # after the prompt and its first token; expected counts sum each sample's probabilities
    from mlx_lm.utils import load_model

    net, _ = load_model(path)
    expected, observed = np.zeros(TOP_K), np.zeros(TOP_K)
    probabilities = {}
    for tokens, _ in results:
        first, second = tokens[0], tokens[1]
        if first not in probabilities:
            probabilities[first] = target_probabilities(net, [*PROMPT, first])
        ranked = sorted(probabilities[first].items(), key=lambda kv: -kv[1])
        assert second in dict(ranked), (first, second, ranked)
        expected += [q for _, q in ranked]
        observed[[t for t, _ in ranked].index(second)] += 1
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_3DOF_P001, (chi2, observed, expected)
