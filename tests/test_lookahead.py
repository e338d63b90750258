"""Decode-ahead (worker/lookahead.py): guessed steps, on a whole-model stage and on slices of the
model (placeholder inputs), are taken or rolled back, and outputs stay exact."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import reference_tokens

from coordinator.demo import ModelSpec
from protos import codec, inference_pb2, worker_pb2
from worker.lookahead import AHEAD
from worker.shard import load_shard
from worker.stage import StageRunner

PROMPTS = {"a": [(3 * i + 11) % 480 + 10 for i in range(21)],
           "b": [(7 * i + 5) % 480 + 10 for i in range(9)],
           "c": [(5 * i + 1) % 480 + 10 for i in range(13)]}


class Driver:
    """Steps one StageRunner as the coordinator would: prompt, then one decode step per token."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self.tokens: dict[str, list[int]] = {}
        self.logprobs: dict[str, list[float]] = {}
        self.step_id = 0

    def _run(self, seqs, release=()):
        self.step_id += 1
        out = self.runner.run(worker_pb2.StageMessage(step_id=self.step_id, seqs=seqs,
                                                      release=list(release)))
        for o in out.outputs:
            self.tokens[o.seq_id].append(o.token)
            self.logprobs[o.seq_id].append(o.logprob)

    def start(self, seq_id, ids, sampling=None):
        self.tokens[seq_id], self.logprobs[seq_id] = [], []
        sampling = sampling or inference_pb2.SamplingParams()
        self._run([worker_pb2.SeqInput(seq_id=seq_id, token_ids=ids[:-1], start=True,
                                       sampling=sampling)])
        self._run([worker_pb2.SeqInput(seq_id=seq_id, token_ids=ids[-1:], offset=len(ids) - 1,
                                       sample=True)])

    def decode(self, seq_ids, release=()):
        self._run([worker_pb2.SeqInput(
            seq_id=k, token_ids=[self.tokens[k][-1]], sample=True,
            offset=len(PROMPTS[k]) + len(self.tokens[k]) - 1) for k in seq_ids], release)


@pytest.mark.parametrize("spec", [ModelSpec(family="llama"), ModelSpec(family="qwen3"),
                                  ModelSpec(family="llama", bits=4)],
                         ids=lambda s: s.family + (f"-q{s.bits}" if s.bits else ""))
def test_one_stream_decodes_ahead_and_every_guess_is_taken_token_exact(spec, model_dir):
    path = model_dir(spec)
    shard = load_shard(path, 0, spec.num_layers)
    driver = Driver(StageRunner(shard))
    driver.start("a", PROMPTS["a"])
    for _ in range(15):
        driver.decode(["a"])
    ahead = driver.runner.lookahead
    assert ahead.taken == 15 and ahead.dropped == 0
    # once a token has left, the steps after it are begun on lazy tokens, AHEAD deep
    assert [len(chain) for chain in ahead.guesses.values()] == [AHEAD]
    assert driver.tokens["a"] == reference_tokens(path, PROMPTS["a"], 16)


def mixed_steps(d: Driver) -> None:
    """Steps that take guesses and roll them back: a prompt arrives while "a" decodes, a
    batched group decodes, a new prompt and a changed group, a sequence finished mid-guess."""
    sampling = inference_pb2.SamplingParams(temperature=0.8, seed=7, logprobs=3)
    d.start("a", PROMPTS["a"])
    d.start("b", PROMPTS["b"], sampling)  # a prompt instead of "a"'s guessed step
    for _ in range(4):
        d.decode(["a", "b"])  # batched, the same group: guesses are taken
    d.start("c", PROMPTS["c"])  # a new prompt instead of the guessed step
    for _ in range(3):
        d.decode(["a", "b", "c"])  # the group changed
    d.decode(["b", "c"], release=["a"])  # a sequence finished mid-guess


def test_guesses_roll_back_when_the_next_step_differs_and_outputs_stay_exact(model_dir):
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    plain = Driver(StageRunner(load_shard(path, 0, spec.num_layers), lookahead=False))
    ahead = Driver(StageRunner(load_shard(path, 0, spec.num_layers)))
    for d in (plain, ahead):
        mixed_steps(d)
        d.decode(["b", "c"])
        d.runner.run(worker_pb2.StageMessage(step_id=99, release=["b"]))  # a bare release
        d.decode(["c"])
    runner = ahead.runner
    assert runner.lookahead.taken >= 5 and runner.lookahead.dropped >= 3
    assert ahead.tokens == plain.tokens and ahead.logprobs == plain.logprobs
    assert ahead.tokens["c"] == reference_tokens(path, PROMPTS["c"], len(ahead.tokens["c"]))
    # guesses for "c" are out, each built on the one before; rolled back, the session is
    # exactly the one without guesses
    assert list(runner.lookahead.guesses) == [("c",)]
    assert len(runner.lookahead.guesses[("c",)]) == AHEAD
    runner.lookahead.drop(["c"])
    mine, theirs = runner.sessions["c"], plain.runner.sessions["c"]
    assert mine.offset == theirs.offset == len(PROMPTS["c"]) + len(ahead.tokens["c"]) - 1
    assert mine.sampler.history == theirs.sampler.history
    assert [c.offset for c in mine.caches] == [c.offset for c in theirs.caches]


def test_a_repetition_penalty_is_never_guessed(model_dir):
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    runs = []
    for lookahead in (False, True):
        d = Driver(StageRunner(load_shard(path, 0, spec.num_layers), lookahead=lookahead))
        d.start("a", PROMPTS["a"], inference_pb2.SamplingParams(repetition_penalty=1.3))
        for _ in range(6):
            d.decode(["a"])
        runs.append(d)
    assert runs[1].runner.lookahead.taken == runs[1].runner.lookahead.dropped == 0
    assert runs[0].tokens == runs[1].tokens


class Chain(Driver):
    """Steps a pipeline of StageRunners (slices of the model) as workers would: each step's
    output message is the next stage's input; `run` prepares each stage's guess after it."""

    def __init__(self, runners: list[StageRunner], loop=None) -> None:
        super().__init__(runners[-1])
        self.runners = runners
        # with `loop`, stage 0 gets the last stage's results as worker/loop.py hands them
        # over, through `loop(result)` (which may change them): before the next step
        self.loop = loop

    def _run(self, seqs, release=()):
        self.step_id += 1
        msg = worker_pb2.StageMessage(step_id=self.step_id, seqs=seqs, release=list(release))
        for runner in self.runners:
            out = runner.run(msg)
            msg = out.forward
        if self.loop is not None:
            self.runners[0].start_early(self.loop(worker_pb2.StageResult(
                step_id=self.step_id, outputs=out.outputs)))
        for o in out.outputs:
            self.tokens[o.seq_id].append(o.token)
            self.logprobs[o.seq_id].append(o.logprob)


def chain(path, spec, cuts, lookahead=True):
    bounds = [0, *cuts, spec.num_layers]
    return Chain([StageRunner(load_shard(path, a, b), lookahead=lookahead)
                  for a, b in zip(bounds, bounds[1:], strict=False)])


@pytest.mark.parametrize("spec", [ModelSpec(family="llama"), ModelSpec(family="qwen3"),
                                  ModelSpec(family="llama", bits=4)],
                         ids=lambda s: s.family + (f"-q{s.bits}" if s.bits else ""))
def test_slices_build_each_decode_step_before_it_arrives_token_exact(spec, model_dir):
    path = model_dir(spec)
    pipe = chain(path, spec, [2, 4])
    pipe.start("a", PROMPTS["a"])
    for _ in range(15):
        pipe.decode(["a"])
    # every stage: each decode step after the first was prepared on placeholders and taken
    assert [r.lookahead.taken for r in pipe.runners] == [15, 15, 15]
    assert [r.lookahead.dropped for r in pipe.runners] == [0, 0, 0]
    assert pipe.tokens["a"] == reference_tokens(path, PROMPTS["a"], 16)


def test_slice_guesses_roll_back_when_the_next_step_differs_and_outputs_stay_exact(model_dir):
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    plain, ahead = chain(path, spec, [3], lookahead=False), chain(path, spec, [3])
    for d in (plain, ahead):
        mixed_steps(d)
        d.decode(["c"])  # a group split: "b"'s and "c"'s guess rolled back
        d.decode(["b"])
        d.decode(["b", "c"])
    assert ahead.tokens == plain.tokens and ahead.logprobs == plain.logprobs
    assert ahead.tokens["c"] == reference_tokens(path, PROMPTS["c"], len(ahead.tokens["c"]))
    for runner in ahead.runners:
        assert runner.lookahead.taken >= 5 and runner.lookahead.dropped >= 3
        # the guess still out, rolled back: the sessions are exactly those without guesses
        assert list(runner.lookahead.guesses) == [("b", "c")]
        runner.lookahead.drop(["b"])
    for ahead_runner, plain_runner in zip(ahead.runners, plain.runners, strict=True):
        for k in "bc":
            mine, theirs = ahead_runner.sessions[k], plain_runner.sessions[k]
            assert mine.offset == theirs.offset
            assert [c.offset for c in ahead_runner.caches_of((k,))] == \
                [c.offset for c in plain_runner.caches_of((k,))]
            if mine.sampler is not None:
                assert mine.sampler.history == theirs.sampler.history


def test_stage_0_starts_steps_on_the_last_stage_tokens_and_rolls_back_any_other_step(
        model_dir):
    # stage 0 starts its guess on the tokens as sampled (worker/loop.py); the coordinator's
    # next message confirms it, or, when it is another step (a group changed, a sequence
    # finished, another token), rolls it back and runs what it says
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    wrong = {"n": 0}

    def sometimes_wrong(result):
        wrong["n"] += 1
        if wrong["n"] % 5 == 0:  # as if the coordinator had sent another token
            result.outputs[0].token = (result.outputs[0].token + 1) % 512
        return result

    plain = chain(path, spec, [3], lookahead=False)
    ahead = chain(path, spec, [3])
    ahead.loop = sometimes_wrong
    for d in (plain, ahead):
        mixed_steps(d)
        for _ in range(6):
            d.decode(["b", "c"])
    assert ahead.tokens == plain.tokens and ahead.logprobs == plain.logprobs
    assert ahead.tokens["c"] == reference_tokens(path, PROMPTS["c"], len(ahead.tokens["c"]))
    first, last = ahead.runners
    assert first.lookahead.early >= 8 and last.lookahead.early == 0
    assert first.lookahead.dropped >= last.lookahead.dropped + 2  # the wrong tokens
    first.lookahead.drop(["b", "c"])
    for k in "bc":
        assert [c.offset for c in first.caches_of((k,))] == \
            [c.offset for c in plain.runners[0].caches_of((k,))]


def test_a_step_whose_tensor_does_not_fit_the_placeholder_is_checked_as_usual(model_dir):
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    pipe = chain(path, spec, [3])
    pipe.start("a", PROMPTS["a"])
    pipe.decode(["a"])
    last = pipe.runners[1]
    assert list(last.lookahead.guesses) == [("a",)]
    bad = worker_pb2.SeqInput(seq_id="a", token_ids=[pipe.tokens["a"][-1]], sample=True,
                              offset=len(PROMPTS["a"]) + 1)
    bad.hidden.CopyFrom(codec.encode(mx.zeros((1, 1, 7), dtype=mx.bfloat16)))
    with pytest.raises(Exception, match="shape|size|broadcast"):
        last.run(worker_pb2.StageMessage(step_id=50, seqs=[bad]))
    assert last.lookahead.dropped == 1 and not last.lookahead.guesses


def test_sliding_window_caches_never_guess(model_dir):
    sliding = ModelSpec(family="gemma3_text")  # its sliding-window caches are not trimmed
    path = model_dir(sliding)
    assert StageRunner(load_shard(path, 0, sliding.num_layers)).lookahead is None
    assert StageRunner(load_shard(path, 0, 2)).lookahead is None


def served(path, workers: int, names: list[str], env: dict[str, str] | None = None):
    """Greedy generations through `workers` local workers (`env` added to their environment):
    one alone, then three together; each worker's shardline_lookahead_steps_total by
    outcome."""
    import asyncio
    import urllib.request

    from conftest import GiB, Serving, run
    from prometheus_client.parser import text_string_to_metric_families

    from coordinator.local import LocalWorkers

    local = LocalWorkers(workers, memory=[GiB] * workers, names=names)
    local.env.update(env or {})
    addresses = local.start()

    async def scenario():
        async with Serving(path, addresses) as s:
            alone = await s.generate(PROMPTS["a"], 12)
            together = await asyncio.gather(*(s.generate(PROMPTS[k], 10) for k in "abc"))
            ports = [w.info.metrics_port for w in s.coordinator.cluster.workers]
            return alone, together, [urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode() for port in ports]

    try:
        alone, together, texts = run(scenario())
    finally:
        local.stop()
    assert alone[0] == reference_tokens(path, PROMPTS["a"], 12)
    for k, (tokens, _, _) in zip("abc", together, strict=True):
        assert tokens == reference_tokens(path, PROMPTS[k], 10)
    return [{s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
             if f.name == "shardline_lookahead_steps" for s in f.samples
             if s.name.endswith("_total")} for text in texts]


def test_one_worker_serves_token_exact_with_its_guesses_counted_in_metrics(model_dir):
    spec = ModelSpec(family="llama")
    [counts] = served(model_dir(spec), 1, ["whole"])
    assert counts["taken"] >= 11 + 1  # every lone decode step, and batched ones
    assert counts["dropped"] >= 1  # a finished stream's guess, at least


def test_two_workers_serve_token_exact_each_taking_steps_it_built_ahead(model_dir):
    # each stage builds its next step while the token goes round (MLXThread.idle): a step
    # whose message came first is built as it comes, so only some need be taken
    spec = ModelSpec(family="llama")
    for counts in served(model_dir(spec), 2, ["first", "second"]):
        assert counts["taken"] >= 1, counts


def test_three_workers_serve_token_exact_stage_0_starting_steps_on_the_last_stage_tokens(
        model_dir):
    # stage 0 follows the last stage's results (worker/loop.py): steps it built ahead start
    # when the tokens are sampled, and the coordinator's message confirms them
    spec = ModelSpec(family="llama")
    first, *rest = served(model_dir(spec), 3, ["first", "second", "third"])
    assert first["early"] >= 5 and first["taken"] >= 5, first
    assert first.get("sent", 0) == 0, first  # sending ahead is off unless asked for
    assert all(counts["early"] == 0 for counts in rest), rest


def fork_mid_batch(d: Driver, prompt_c: list[int], shared: int, after: int) -> None:
    """"a" and "b" decode as a batch (a step for both built ahead after each); "c" starts
    from "a"'s first `shared` positions (the prefix cache); the batch decodes `after` more."""
    d.start("a", PROMPTS["a"])
    d.start("b", PROMPTS["b"])
    for _ in range(3):
        d.decode(["a", "b"])
    d.tokens["c"], d.logprobs["c"] = [], []
    d._run([worker_pb2.SeqInput(seq_id="c", token_ids=prompt_c[shared:-1], start=True,
                                offset=shared, fork_from="a", fork_length=shared)])
    d._run([worker_pb2.SeqInput(seq_id="c", token_ids=prompt_c[-1:], sample=True,
                                offset=len(prompt_c) - 1)])
    for _ in range(after):
        d.decode(["a", "b"])


@pytest.mark.parametrize("cuts", [[], [3]], ids=["whole", "slices"])
def test_a_fork_from_a_sequence_with_a_step_built_ahead_leaves_its_batch_exact(cuts, model_dir):
    # "c" reuses the first positions of "a" (the prefix cache) while a step for the batch
    # ("a", "b") is built ahead: that step is rolled back before the batch is split, so no
    # guessed position stays behind in "a"'s or "b"'s caches
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    shared = 10
    prompt_c = PROMPTS["a"][:shared] + PROMPTS["c"][:7]
    runs = []
    for lookahead in (False, True):
        d = chain(path, spec, cuts, lookahead=lookahead)
        fork_mid_batch(d, prompt_c, shared, 4)
        runs.append(d)
    plain, ahead = runs
    assert ahead.tokens == plain.tokens and ahead.logprobs == plain.logprobs
    assert ahead.tokens["a"] == reference_tokens(path, PROMPTS["a"], len(ahead.tokens["a"]))
    assert ahead.tokens["b"] == reference_tokens(path, PROMPTS["b"], len(ahead.tokens["b"]))
    assert ahead.tokens["c"] == reference_tokens(path, prompt_c, 1)
    assert all(r.lookahead.taken >= 4 for r in ahead.runners)
