"""Checks of proposals built ahead on every stage (worker/check_ahead.py): the next check is
built on placeholders once the last stage's verdict is known, taken when it comes as built,
rolled back when it does not, and the tokens are mlx-lm's either way."""

from __future__ import annotations

import pytest
from conftest import reference_tokens
from test_batched_decode import Chain, _prefill

from coordinator.demo import ModelSpec
from protos import worker_pb2

SPEC = ModelSpec(family="llama")


def check_round(chain: Chain, seq_id: str, tokens: list[int], offset: int, guesses: list[int]
                ) -> worker_pb2.SeqOutput:
    """One check through every stage; then every stage hears the verdict, as the last stage's
    own result and the results the others follow tell them (worker/server.py, loop.py)."""
    chain.step_id += 1
    msg = worker_pb2.StageMessage(step_id=chain.step_id, seqs=[worker_pb2.SeqInput(
        seq_id=seq_id, token_ids=[tokens[-1], *guesses], offset=offset, sample=True,
        draft=len(guesses))])
    for runner in chain.runners:
        out = runner.run(msg)
        msg = out.forward
    result = worker_pb2.StageResult(step_id=chain.step_id, outputs=out.outputs)
    for runner in chain.runners:
        runner.start_early(result)
    return out.outputs[0]


@pytest.mark.parametrize("cuts", [[(0, 2), (2, 4), (4, 6)], [(0, 6)]], ids=["3 stages", "1"])
def test_checks_built_ahead_are_taken_and_the_tokens_are_mlx_lms(model_dir, cuts):
    path = model_dir(SPEC)
    chain = Chain(path, cuts)
    prompt = [(7 * i + 3) % 480 + 10 for i in range(21)]
    want = reference_tokens(path, prompt, 30)
    tokens = [_prefill(chain, "s", prompt)]
    rounds = 0
    while len(tokens) < len(want):
        n = len(tokens)
        # three proposals: all right every third round, else the second one wrong
        guesses = want[n : n + 3] + [0] * 3
        guesses = guesses[:3] if rounds % 3 == 0 else [guesses[0], 0, guesses[2]]
        got = check_round(chain, "s", tokens, len(prompt) + n - 1, guesses)
        tokens += [a.token for a in got.accepted] + [got.token]
        rounds += 1
    assert tokens[: len(want)] == want
    for runner in chain.runners:
        checks = runner.lookahead.checks
        assert checks.taken == rounds - 1 and checks.dropped == 0, (checks.taken, rounds)


def test_a_step_other_than_the_check_built_rolls_it_back(model_dir):
    path = model_dir(SPEC)
    chain = Chain(path, [(0, 3), (3, 6)])
    prompt = [(11 * i + 5) % 480 + 10 for i in range(17)]
    want = reference_tokens(path, prompt, 28)
    tokens = [_prefill(chain, "s", prompt)]
    kinds = iter(["check3", "check3", "check2", "plain", "check2", "check2", "check1"] * 6)
    while len(tokens) < len(want):
        n, kind = len(tokens), next(kinds)
        offset = len(prompt) + n - 1
        if kind == "plain":  # proposals paused: a one-token step where a check was built
            tokens.append(chain.step([worker_pb2.SeqInput(
                seq_id="s", token_ids=[tokens[-1]], offset=offset, sample=True)])["s"])
            continue
        k = int(kind[-1])
        got = check_round(chain, "s", tokens, offset, (want[n : n + k] + [0] * k)[:k])
        tokens += [a.token for a in got.accepted] + [got.token]
    assert tokens[: len(want)] == want
    for runner in chain.runners:
        assert runner.lookahead.checks.dropped > 0 and runner.lookahead.checks.taken > 0
    # a release rolls back what is built: the sequence is gone on every stage
    chain.step_id += 1
    for runner in chain.runners:
        runner.run(worker_pb2.StageMessage(step_id=chain.step_id, release=["s"]))
        assert "s" not in runner.sessions and not runner.lookahead.checks.built


def test_every_worker_of_a_pipeline_takes_checks_it_built_ahead(model_dir, workers):
    """Through 3 workers, prompt lookup on a model that repeats its prompt (every proposal
    confirmed): each worker hears the verdicts (the last its own, the others by following its
    results) and most checks find their graph built."""
    import asyncio
    import dataclasses
    import urllib.request

    from conftest import Serving, run
    from prometheus_client.parser import text_string_to_metric_families

    from coordinator.demo import cycle_prompt

    spec = dataclasses.replace(SPEC, quiet_after=0, cycle=16)
    path = model_dir(spec)
    prompt = cycle_prompt(40, 16)
    want = reference_tokens(path, prompt, 60)

    def taken(port: int) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == "shardline_lookahead_steps_total" and \
                        sample.labels.get("outcome") == "taken":
                    return sample.value
        return 0.0

    async def scenario():
        async with Serving(path, workers, context=256, speculative="ngram",
                           num_draft_tokens=4) as s:
            ports = [w.info.metrics_port for w in s.coordinator.cluster.workers]
            before = [taken(p) for p in ports]
            tokens, _, _ = await s.generate(prompt, 60)
            # the metrics follow each step on its worker's MLX thread: poll until settled
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                after = [taken(p) for p in ports]
                if min(a - b for a, b in zip(after, before, strict=True)) >= 5 or \
                        asyncio.get_running_loop().time() > deadline:
                    return tokens, before, after
                await asyncio.sleep(0.05)

    tokens, before, after = run(scenario())
    assert tokens == want
    # 60 tokens in rounds of 5: about 12 checks; each worker took most of them built ahead
    assert all(a - b >= 5 for a, b in zip(after, before, strict=True)), (before, after)
