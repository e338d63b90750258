"""A follow-up turn forks the KV of the prefix it shares with an earlier request."""

from __future__ import annotations

from conftest import Serving, reference_tokens, run

from coordinator.demo import ModelSpec
from coordinator.serving.prefix_cache import PrefixCache

SPEC = ModelSpec(family="llama")


def test_follow_up_turn_prefills_only_the_new_tokens_and_matches_mlx_lm(model_dir, workers):
    path = model_dir(SPEC)
    first = [(11 * i + 7) % 480 + 10 for i in range(40)]

    async def scenario():
        async with Serving(path, workers) as s:
            engine = s.coordinator.engine
            reply, _, _ = await s.generate(first, 16)
            follow = first + reply + [(5 * i + 3) % 480 + 10 for i in range(10)]
            before = engine.prefilled_tokens
            second, _, _ = await s.generate(follow, 20)
            prefilled = engine.prefilled_tokens - before
            cold_before = engine.prefilled_tokens
            unrelated = [400 - i for i in range(30)]
            await s.generate(unrelated, 4)
            cold = engine.prefilled_tokens - cold_before
            return reply, follow, second, prefilled, cold, engine.prefix.hits

    reply, follow, second, prefilled, cold, hits = run(scenario())
    assert reply == reference_tokens(path, first, 16)
    assert second == reference_tokens(path, follow, 20)
    # KV of first + reply[:-1] is reused: only reply[-1] and the 10 new tokens are prefilled.
    assert prefilled == 11 and hits == 1
    assert cold == 30


def test_sliding_window_models_serve_without_the_prefix_cache(model_dir, workers):
    path = model_dir(ModelSpec(family="gemma3_text"))

    async def scenario():
        async with Serving(path, workers[:2]) as s:
            tokens, _, _ = await s.generate(list(range(20, 60)), 8)
            return s.coordinator.engine.prefix, tokens

    prefix, tokens = run(scenario())
    assert prefix is None and tokens == reference_tokens(path, list(range(20, 60)), 8)


def test_prefix_cache_evicts_least_recently_used_first():
    c = PrefixCache(max_tokens=10, min_match=2)
    assert c.insert("a", [1, 2, 3, 4]) == []
    assert c.insert("b", [5, 6, 7, 8]) == []
    assert c.lookup([1, 2, 3, 9]) == ("a", 3)  # a is now most recent
    assert c.insert("c", [9, 9, 9]) == ["b"]
    assert c.lookup([5, 6, 7]) is None
    assert c.lookup([1, 2]) is None  # one reusable position is below min_match
    assert c.insert("huge", list(range(20))) == ["huge"]
