"""The draft model's proposer (coordinator/serving/speculation.py): taking the prompt in while
the pipeline prefills it, and drafting the next round while the pipeline checks this one,
change no proposal; a round drafted ahead is used only when the tokens are what it assumed."""

from __future__ import annotations

import contextlib

from conftest import run

from coordinator.demo import ModelSpec, draft_model
from coordinator.serving.speculation import DraftProposer

PROMPT = [1, 5, 9, 200, 33, 4, 77, 12, 1, 5, 9, 200, 33, 4, 60, 61, 1, 5, 9]


def draft_of(model_dir):
    return draft_model(model_dir(ModelSpec(family="llama", num_layers=6, quiet_after=3)), 3)


@contextlib.asynccontextmanager
async def proposers(draft, n: int):
    """`n` loaded DraftProposers of `draft`, closed afterwards."""
    made = [DraftProposer(draft) for _ in range(n)]
    try:
        for p in made:
            await p.load()
        yield made
    finally:
        for p in made:
            p.close()


def test_the_prompt_is_taken_in_before_the_first_proposals(model_dir):
    draft = draft_of(model_dir)

    async def scenario():
        async with proposers(draft, 2) as (warm, cold):
            warm.prefill("s", PROMPT)
            await warm.settled()
            taken_in = warm.tokens_fed
            tokens = [*PROMPT, 7]
            return taken_in, await warm.propose("s", tokens, 4), await cold.propose("s", tokens, 4)

    taken_in, warm, cold = run(scenario())
    assert taken_in == len(PROMPT) - 1  # all but the last token, whose logits come later
    assert warm == cold and len(warm) == 4


def test_a_loaded_draft_names_its_device_as_workers_do(model_dir):
    from worker.backend import accelerator, device_of

    async def scenario():
        async with proposers(draft_of(model_dir), 1) as (p,):
            return p.device

    assert run(scenario()) == device_of(accelerator() or "cpu")  # what decides drafting ahead


def test_a_round_drafted_ahead_is_what_drafting_afresh_proposes(model_dir):
    draft = draft_of(model_dir)

    async def scenario():
        async with proposers(draft, 2) as (p, fresh):
            first = await p.propose("s", PROMPT, 4)
            p.ahead("s", PROMPT, first, 4)
            await p.settled()
            # every proposal confirmed, and the target's own token what the draft guessed
            guess = (await fresh.propose("g", [*PROMPT, *first], 1))[0]
            tokens = [*PROMPT, *first, guess]
            fed = p.tokens_fed
            hit = await p.propose("s", tokens, 4)
            hit_fed = p.tokens_fed - fed
            hit_fresh = await fresh.propose("h", tokens, 4)
            # next round: two confirmed, then another token than the third proposal
            p.ahead("s", tokens, hit, 4)
            await p.settled()
            other = [*tokens, *hit[:2], (hit[2] + 1) % 512]
            miss = await p.propose("s", other, 3)
            miss_fresh = await fresh.propose("m", other, 3)
            return (hit, hit_fresh, hit_fed, miss, miss_fresh, p.ahead_taken,
                    p.ahead_missed)

    hit, hit_fresh, hit_fed, miss, miss_fresh, taken, missed = run(scenario())
    assert taken == 1 and missed == 1
    assert hit_fed == 0  # ready when asked: the draft computed nothing more
    assert hit == hit_fresh and len(hit) == 4
    assert miss == miss_fresh and len(miss) == 3


def test_a_greedy_check_picks_every_position_at_once_as_single_steps_would():
    """worker/verify.py: a greedy check samples its k + 1 positions in one go; the confirmed
    proposals, the stage's own token, their logprobs and the history are those of k + 1
    single greedy steps."""
    import mlx.core as mx

    from worker.sampling import Sampler
    from worker.verify import accept, sample_positions

    mx.random.seed(3)
    logits = mx.random.normal((1, 5, 512)).astype(mx.bfloat16)
    single = [Sampler().sample(logits[:, j, :]) for j in range(5)]
    picks = [int(t.item()) for t, _ in single]
    chunk = [3, picks[0], picks[1], (picks[2] + 1) % 512, 9]  # the third proposal is wrong
    sampler = Sampler()
    checked = sample_positions(sampler, logits, chunk, 4)
    mx.eval(checked.samples)
    out = accept("s", checked)
    assert checked.together and sampler.history == chunk
    assert [a.token for a in out.accepted] == picks[:2] and out.token == picks[2]
    assert [a.logprob for a in out.accepted] + [out.logprob] == \
        [float(p.item()) for _, p in single[:3]]
    # all confirmed: the stage's own token follows the last proposal
    every = sample_positions(Sampler(), logits, [3, *picks[:4]], 4)
    mx.eval(every.samples)
    last = accept("s", every)
    assert [a.token for a in last.accepted] == picks[:4] and last.token == picks[4]


def test_a_sequence_dropped_while_its_draft_work_waits_leaves_no_caches(model_dir):
    """A request that ends (or moves to a new sequence) right after its proposals went out:
    the round it was to draft ahead, or the prompt it was to take in, is not drafted for it
    afterwards (its caches would stay for good)."""
    draft = draft_of(model_dir)

    async def scenario():
        async with proposers(draft, 1) as (p,):
            first = await p.propose("s", PROMPT, 4)
            held = p.sequences
            p.ahead("s", PROMPT, first, 4)
            p.prefill("t", PROMPT)
            await p.drop("s")
            await p.drop("t")
            await p.settled()
            return held, p.sequences

    assert run(scenario()) == (1, 0)
