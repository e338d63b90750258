"""Speculative decoding (docs/speculation.md): proposals checked by the pipeline change nothing
in what comes out (greedy and seeded sampling, every family, 1 to 3 workers, concurrent streams,
cancellation, a lost worker), and rejected positions leave no trace in any stage's KV."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest
from conftest import GiB, Serving, reference_tokens, run

from coordinator.demo import FAMILIES, ModelSpec, cycle_prompt, draft_model
from coordinator.local import LocalWorkers
from coordinator.serving.speculation import MAX_PAUSE, NgramProposer, Speculator
from protos import inference_pb2, worker_pb2
from worker.shard import load_shard
from worker.stage import StageRunner

# repeats, so prompt lookup finds something to propose
PROMPT = [1, 5, 9, 200, 33, 4, 77, 12, 1, 5, 9, 200, 33, 4, 60, 61, 1, 5, 9]
MAX_TOKENS = 32
SLIDING = {"mistral", "gemma3_text"}  # sliding-window caches cannot go back: no speculation


def spec_for(family: str) -> ModelSpec:
    return ModelSpec(family=family, num_layers=6, quiet_after=3)


async def generate(s: Serving, prompt: list[int], max_tokens: int = MAX_TOKENS, **sampling):
    req = inference_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=inference_pb2.
                                        SamplingParams(max_tokens=max_tokens, **sampling))
    tokens, usage = [], None
    async for msg in s.stub.Generate(req):
        tokens += list(msg.token_ids)
        if msg.HasField("usage"):
            usage = msg.usage
    return tokens, usage


class Always:
    """A proposer whose every guess the target confirms."""

    async def propose(self, key, tokens, k):
        return [1] * k

    def ahead(self, key, tokens, proposals, k):
        pass

    def prefill(self, key, tokens):
        pass

    async def drop(self, key):
        pass


def guessed_share(round_seconds: float, plain_seconds: float, steps: int = 600) -> float:
    """Drive one request's controller for `steps` steps: every guess confirmed, a step with
    k guesses taking `round_seconds`, one without `plain_seconds`; the share of steps that
    carried guesses."""
    req = Speculator(Always(), 4).request("a")

    async def drive():
        guessed = 0
        for _ in range(steps):
            drafts = await req.propose([0], running=1, room=10_000)
            req.record(len(drafts), len(drafts), round_seconds if drafts else plain_seconds)
            guessed += bool(drafts)
        return guessed / steps

    return asyncio.run(drive())


def test_guesses_pause_where_steps_with_them_bring_tokens_slower_than_steps_without():
    # up to 5 tokens a step, all confirmed: 20 ms a step pays against 10 ms without guesses,
    # 60 ms (12 ms a token, a draft as costly as the target) does not: guesses pause, each
    # pause twice as long, so few steps carry them
    assert guessed_share(0.020, 0.010) > 0.95
    slow = guessed_share(0.060, 0.010)
    assert slow < 0.05, slow
    assert guessed_share(0.060, 0.010, steps=MAX_PAUSE * 4) < slow  # longer pauses


def test_the_pace_of_steps_with_guesses_is_their_seconds_over_their_tokens():
    # a round that confirmed nothing brought one token: it weighs as one token, so rounds of
    # 5 tokens in 16 ms and 1 token in 15 ms go at about 31 ms / 6 tokens, not the 9 ms a
    # token an average of each round's own pace would say
    req = Speculator(Always(), 4).request("a")
    for _ in range(20):
        req.record(4, 4, 0.016)
        req.record(4, 0, 0.015)
    assert 0.0045 < req.pace < 0.0060, req.pace


def test_a_slow_first_round_weighs_as_one_round_not_as_most_of_the_average():
    # the first round waits for a draft still taking the prompt in (120 ms for 2 tokens); the
    # next bring 5 tokens in 60 ms, against 31 ms a token without guesses: guessing pays
    req = Speculator(Always(), 4).request("a")
    seconds = iter([0.120] + [0.060] * 1000)

    async def drive():
        guessed = 0
        for _ in range(200):
            drafts = await req.propose([0], running=1, room=10_000)
            confirmed = 1 if req.timed == 0 else len(drafts)
            req.record(len(drafts), confirmed if drafts else 0,
                       next(seconds) if drafts else 0.031)
            guessed += bool(drafts)
        return guessed / 200

    share = asyncio.run(drive())
    assert share > 0.9, share
    assert 0.012 < req.pace < 0.013, req.pace


def test_prompt_lookup_proposes_what_followed_the_last_occurrence():
    p = NgramProposer()
    assert p.lookup("a", [7, 8, 9, 1, 2, 7, 8], 3) == [9, 1, 2]  # after "7 8"
    assert p.lookup("a", [7, 8, 9, 1, 2, 7, 8, 9, 5], 2) == []  # "9 5", "5" never seen
    assert p.lookup("b", [3, 4, 3], 4) == [4, 3]  # after "3", up to the end
    assert p.lookup("c", [1, 2, 3], 2) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_the_same_with_and_without_speculation(family, model_dir, workers):
    path = model_dir(spec_for(family))
    draft = draft_model(path, 3)
    expected = reference_tokens(path, PROMPT, MAX_TOKENS)

    async def scenario():
        out = {}
        for n in (1, 2, 3):
            for name, options in (("ngram", {"speculative": "ngram"}),
                                  ("draft", {"draft_model": str(draft)})):
                async with Serving(path, workers[:n], context=256, **options) as s:
                    out[name, n] = await generate(s, PROMPT)
                    if s.coordinator.draft is not None:
                        ahead[n] = s.coordinator.draft.ahead_taken
        return out

    ahead = {}  # workers -> rounds the draft had drafted while the last was checked
    results = run(scenario())
    for (name, n), (tokens, usage) in results.items():
        assert tokens == expected, (name, n)
        if family in SLIDING:
            assert usage.draft_tokens == 0
        elif name == "draft":  # prompt lookup proposes only where the text repeats
            assert usage.draft_tokens > 0, (name, n)
        assert 0 <= usage.accepted_draft_tokens <= usage.draft_tokens
    if family not in SLIDING:
        drafted = [u for (name, _), (_, u) in results.items() if name == "draft"]
        assert all(u.accepted_draft_tokens > 0 for u in drafted)  # the agreeing draft
        assert sum(ahead.values()) > 0, ahead


def test_prompt_lookup_confirms_repeated_text_and_changes_nothing(model_dir, workers):
    """On a model whose continuation repeats its prompt (ModelSpec.cycle), prompt lookup's
    proposals are confirmed and the output is still mlx-lm's, through 2 workers."""
    path = model_dir(ModelSpec(family="llama", cycle=16))
    prompt = cycle_prompt(24, 16)
    expected = reference_tokens(path, prompt, MAX_TOKENS)

    async def scenario():
        async with Serving(path, workers[:2], context=256, speculative="ngram",
                           num_draft_tokens=4) as s:
            return await generate(s, prompt)

    tokens, usage = run(scenario())
    assert tokens == expected
    assert usage.accepted_draft_tokens >= MAX_TOKENS // 2, usage  # most tokens came as guesses


def test_the_next_step_goes_out_before_a_rounds_tokens_are_streamed(model_dir, workers):
    """A round of confirmed proposals streams several tokens; the pipeline computes the next
    round while they travel (coordinator/serving/engine.py), not after the last has gone."""
    path = model_dir(spec_for("llama"))
    draft = draft_model(path, 3)

    async def scenario():
        async with Serving(path, workers[:2], context=256, draft_model=str(draft)) as s:
            engine = s.coordinator.engine
            sampling = inference_pb2.SamplingParams(max_tokens=MAX_TOKENS)
            idle = []  # per token: no step was in flight when it came out
            async for chunk in engine.generate(PROMPT, sampling):
                if chunk.token_ids:
                    idle.append(engine.batcher.in_flight == 0)
            return idle, engine.speculator.num_draft_tokens

    idle, k = run(scenario())
    assert len(idle) == MAX_TOKENS
    # only the last round's tokens (no step follows them) come out with none in flight
    last = idle.index(True)
    assert all(idle[last:]) and len(idle) - last <= k + 1, idle


def test_seeded_sampling_gives_the_same_text_with_and_without_speculation(model_dir, workers):
    """The last stage samples each proposed position with the key single steps would use,
    so over many seeds the sampled text (and so its distribution) is unchanged, and a seeded
    request is reproducible."""
    path = model_dir(spec_for("llama"))
    draft = draft_model(path, 3)
    seeds = range(24)
    sampling = dict(temperature=1.0, top_p=0.95)

    async def scenario(**options):
        async with Serving(path, workers[:2], context=256, **options) as s:
            return [await generate(s, PROMPT, 12, seed=seed, **sampling) for seed in seeds]

    plain = run(scenario())
    ngram = run(scenario(speculative="ngram"))
    drafted = run(scenario(draft_model=str(draft)))
    assert [t for t, _ in ngram] == [t for t, _ in plain]
    assert [t for t, _ in drafted] == [t for t, _ in plain]
    assert len({tuple(t) for t, _ in plain}) > len(seeds) // 2  # the seeds do sample
    assert sum(u.accepted_draft_tokens for _, u in drafted) > 0


def test_concurrent_streams_a_cancellation_and_the_metrics(model_dir, workers):
    path = model_dir(spec_for("qwen3"))
    draft = draft_model(path, 3)
    prompts = [PROMPT, PROMPT[3:], [2, 3, 4, 2, 3, 4, 2, 3]]
    expected = [reference_tokens(path, p, MAX_TOKENS) for p in prompts]

    async def scenario():
        async with Serving(path, workers[:3], context=256, draft_model=str(draft)) as s:
            # a request cancelled mid-stream, with proposals in flight
            call = s.stub.Generate(inference_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, sampling=inference_pb2.SamplingParams(max_tokens=200)))
            got = 0
            async for msg in call:
                got += len(msg.token_ids)
                if got >= 5:
                    call.cancel()
                    break
            results = await asyncio.gather(*(generate(s, p) for p in prompts))
            two = await asyncio.gather(*(generate(s, p) for p in prompts[:2]))
            text = s.coordinator.metrics.registry
            drafted = text.get_sample_value("shardline_spec_decode_draft_tokens_total")
            accepted = text.get_sample_value("shardline_spec_decode_accepted_tokens_total")
            return results, two, drafted, accepted

    results, two, drafted, accepted = run(scenario())
    assert [t for t, _ in results] == expected
    assert [t for t, _ in two] == expected[:2]
    assert sum(u.draft_tokens for _, u in two) > 0  # two streams still speculate
    assert drafted >= sum(u.draft_tokens for _, u in results + two)
    assert 0 < accepted <= drafted


def test_a_worker_lost_mid_draft_resumes_exactly(model_dir, cache_dir):
    path = model_dir(spec_for("llama"))
    draft = draft_model(path, 3)
    expected = reference_tokens(path, PROMPT, 120)
    local = LocalWorkers(3, memory=[1 * GiB, 2 * GiB, 3 * GiB], cache_dir=cache_dir,
                         names=["k1", "k2", "k3"])
    addresses = local.start()

    async def scenario():
        async with Serving(path, addresses, context=256, draft_model=str(draft)) as s:
            got: list[int] = []
            req = inference_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, sampling=inference_pb2.SamplingParams(max_tokens=120))
            usage = None
            async for msg in s.stub.Generate(req):
                got += list(msg.token_ids)
                if len(got) >= 6 and local.procs[1].poll() is None:
                    local.procs[1].kill()
                if msg.HasField("usage"):
                    usage = msg.usage
            return got, usage, s.coordinator.engine.resumed

    try:
        got, usage, resumed = run(scenario())
    finally:
        local.stop()
    assert got == expected and resumed == 1 and usage.draft_tokens > 0


def test_rejected_positions_leave_the_kv_of_the_confirmed_tokens_only(model_dir):
    """A stage that ran a chunk with proposals and then went back holds exactly the KV that
    running the confirmed tokens one at a time gives."""
    path = model_dir(spec_for("llama"))
    shard = load_shard(path, 0, 6)
    prompt = [1, 5, 9, 200, 33]
    sampling = inference_pb2.SamplingParams()

    def step(runner, seqs):
        return runner.run(worker_pb2.StageMessage(seqs=seqs))

    def start(runner):
        return step(runner, [worker_pb2.SeqInput(seq_id="s", token_ids=prompt, start=True,
                                                 sampling=sampling, sample=True)])

    spec = StageRunner(shard, batching=False, lookahead=False)
    first = start(spec).outputs[0].token
    # what greedy decoding gives next, one token at a time
    plain = StageRunner(shard, batching=False, lookahead=False)
    start(plain)
    tokens, token = [], first
    for i in range(3):
        token = step(plain, [worker_pb2.SeqInput(seq_id="s", token_ids=[token],
                                                 offset=len(prompt) + i, sample=True)]
                     ).outputs[0].token
        tokens.append(token)
    # proposals: the true next token, then two wrong ones
    wrong = [(tokens[1] + 1) % 512, (tokens[1] + 2) % 512]
    out = step(spec, [worker_pb2.SeqInput(seq_id="s", token_ids=[first, tokens[0], *wrong],
                                          offset=len(prompt), sample=True, draft=3)]).outputs[0]
    assert [a.token for a in out.accepted] == [tokens[0]] and out.token == tokens[1]
    # the next step starts after the confirmed tokens: the rest is trimmed
    nxt = step(spec, [worker_pb2.SeqInput(seq_id="s", token_ids=[out.token],
                                          offset=len(prompt) + 2, sample=True)]).outputs[0]
    assert nxt.token == tokens[2]
    for a, b in zip(spec.sessions["s"].caches, plain.sessions["s"].caches, strict=True):
        assert a.offset == b.offset == len(prompt) + 3
        ka, kb = a.state[0][..., : a.offset, :], b.state[0][..., : b.offset, :]
        assert mx.array_equal(ka, kb).item()
    # going back further than the last chunk with proposals is refused
    with pytest.raises(ValueError, match="position"):
        step(spec, [worker_pb2.SeqInput(seq_id="s", token_ids=[1], offset=2, sample=True)])


class Rows:
    """Wraps a layer and records the positions each call computes."""

    def __init__(self, layer):
        self.layer, self.seen = layer, []

    def __call__(self, h, *args, **kwargs):
        self.seen.append(h.shape[1])
        return self.layer(h, *args, **kwargs)


@pytest.mark.parametrize("split", [6, 3], ids=["one stage", "two stages"])
def test_a_short_chunk_padded_to_eight_rows_gives_the_same_tokens_and_kv(model_dir, monkeypatch,
                                                                         split):
    """Where few rows cost more than eight (worker/backend.py `row_floor`, CUDA), a stage
    computes a prompt chunk or a check of proposals as eight positions: the tokens, the
    accepted proposals and every stage's KV are those of the chunk computed as it is."""
    path = model_dir(spec_for("llama"))
    sampling = inference_pb2.SamplingParams()

    def chain(rows: str):
        monkeypatch.setenv("SHARDLINE_PAD_ROWS", rows)
        runners = [StageRunner(load_shard(path, a, b), batching=False, lookahead=False)
                   for a, b in ((0, split), (split, 6)) if a < b]
        layers = runners[0].shard.family.inner.layers
        first = layers[0] = Rows(layers[0])
        return runners, first

    def step(runners, seq):
        msg = worker_pb2.StageMessage(seqs=[seq])
        for runner in runners:
            out = runner.run(msg)
            msg = out.forward
        return out.outputs[0]

    results = []
    for rows in ("1", "8"):
        runners, first = chain(rows)
        prompt = [1, 5, 9, 200, 33]
        out = step(runners, worker_pb2.SeqInput(seq_id="s", token_ids=prompt, start=True,
                                                 sampling=sampling, sample=True))
        tokens = [out.token]
        # a check of three proposals: whatever is confirmed, the rest is trimmed next step
        out = step(runners, worker_pb2.SeqInput(seq_id="s", token_ids=[out.token, 7, 8, 9],
                                                 offset=5, sample=True, draft=3))
        tokens += [a.token for a in out.accepted] + [out.token]
        out = step(runners, worker_pb2.SeqInput(seq_id="s", token_ids=[out.token],
                                                 offset=5 + len(tokens) - 1, sample=True))
        tokens.append(out.token)
        caches = [c for r in runners for c in r.sessions["s"].caches]
        results.append((tokens, caches, first.seen))
    (plain, plain_kv, plain_rows), (padded, padded_kv, padded_rows) = results
    assert plain_rows == [5, 4, 1] and padded_rows == [8, 8, 1]
    assert padded == plain
    for a, b in zip(padded_kv, plain_kv, strict=True):
        assert a.offset == b.offset == 5 + len(plain) - 1
        for x, y in zip(a.state[:2], b.state[:2], strict=True):
            assert mx.array_equal(x[..., : a.offset, :], y[..., : b.offset, :]).item()


def test_a_draft_model_with_another_tokenizer_is_refused(model_dir, workers, tmp_path):
    import shutil

    path = model_dir(spec_for("llama"))
    other = tmp_path / "other"
    shutil.copytree(draft_model(path, 3), other)
    tok = (other / "tokenizer.json").read_text()
    (other / "tokenizer.json").write_text(tok.replace('"<|eos|>"', '"<|end|>"', 1))

    async def scenario():
        s = Serving(path, workers[:1], context=256, draft_model=str(other))
        try:
            await s.__aenter__()
        finally:
            await s.coordinator.stop()

    with pytest.raises(ValueError, match="tokenizer"):
        run(scenario())


def test_the_grpc_usage_and_http_usage_count_proposals(model_dir, workers):
    import json
    import urllib.request

    path = model_dir(spec_for("llama"))

    async def scenario():
        async with Serving(path, workers[:2], context=256, speculative="ngram") as s:
            body = json.dumps({"prompt": "the cat the cat the cat the cat", "max_tokens": 16,
                               "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{s.coordinator.http_port}"
                                         "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            raw = await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=30).read())
            return json.loads(raw)

    usage = run(scenario())["usage"]
    details = usage.get("completion_tokens_details")
    assert details is not None, usage
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] > 0


def test_bad_speculation_flags_are_refused(model_dir, workers):
    path = model_dir(spec_for("llama"))

    async def scenario(**options):
        s = Serving(path, workers[:1], context=256, **options)
        try:
            await s.__aenter__()
        finally:
            await s.coordinator.stop()

    with pytest.raises(ValueError, match="choose one"):
        run(scenario(speculative="ngram", draft_model=str(path)))
    with pytest.raises(ValueError, match="at least 1"):
        run(scenario(speculative="ngram", num_draft_tokens=0))
