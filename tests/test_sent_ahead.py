"""Steps sent ahead (worker/sent_ahead.py, coordinator/serving/ahead.py): stage 0 sends a decode
step on before the coordinator's message for it; every stage undoes it when that message does
not confirm it, and outputs stay exact."""

from __future__ import annotations

import itertools

import pytest
from conftest import reference_tokens
from test_lookahead import PROMPTS, Chain, chain, fork_mid_batch, mixed_steps, served

from coordinator.demo import ModelSpec
from coordinator.serving.ahead import Reservations
from protos import inference_pb2, worker_pb2
from worker.stage import StageRunner

SEND_AHEAD = {"SHARDLINE_SEND_AHEAD": "1"}  # the workers' setting that turns it on


class Ahead(Chain):
    """Steps a pipeline of StageRunners as the workers and the coordinator do when stage 0
    sends steps ahead: each decode step names its successor's id (Reservations), the last
    stage's result goes to stage 0 (`start_early`), and a step stage 0 begins on it goes
    through every stage before the coordinator's message for it, whose result comes first."""

    def __init__(self, runners: list[StageRunner]) -> None:
        super().__init__(runners)
        self.reservations = Reservations()
        self.ids = itertools.count(1)
        self.results: dict[int, worker_pb2.StageResult] = {}
        self.sent = 0  # steps that went through the stages ahead of their message

    def _on(self, msg, start: int):
        """`msg` through the stages from `start` (each builds its next step once its output
        has left, as MLXThread's idle time does); the last stage's result to the coordinator
        and to stage 0, which may send a step ahead on it."""
        for runner in self.runners[start:]:
            pending = runner.begin(msg)
            out = runner.finish(pending)
            runner.prepare(pending)
            if out.forward is None and runner is not self.runners[-1]:
                return  # a confirmation with nothing to free: nothing goes on
            msg = out.forward if out.forward is not None else pending.msg
        if not out.outputs:
            return
        result = worker_pb2.StageResult(step_id=pending.msg.step_id, outputs=out.outputs)
        self.results[result.step_id] = result
        self.reservations.arrived(result, False)
        pending = self.runners[0].start_early(result, send=True)
        if pending is not None:  # sent on at once, before its message
            self.sent += 1
            self._from_first(pending)

    def _from_first(self, pending) -> None:
        first = self.runners[0]
        out = first.finish(pending)
        first.prepare(pending)
        if out.forward is not None:
            self._on(out.forward, 1)

    def _run(self, seqs, release=()):
        step_id, after, early = self.reservations.assign(seqs, list(release), self.ids)
        msg = worker_pb2.StageMessage(step_id=step_id, seqs=seqs, release=list(release),
                                      next_step_id=after)
        first = self.runners[0]
        pending = first.begin(msg)
        if pending.msg is not msg:  # a step begun on the tokens goes on with this message
            self.sent += 1
        self._from_first(pending)
        result = early or self.results.pop(step_id, worker_pb2.StageResult())
        for o in result.outputs:
            self.tokens[o.seq_id].append(o.token)
            self.logprobs[o.seq_id].append(o.logprob)


def ahead_chain(path, spec, cuts):
    return Ahead(chain(path, spec, cuts).runners)


def assert_like(ahead: Chain, plain: Chain) -> None:
    """Every stage of `ahead`, its guesses and the step still out ahead rolled back (as a
    message dropping it would), holds what `plain`'s does."""
    out = worker_pb2.StageMessage(dropped=ahead.runners[-1].sent.records)
    for runner in ahead.runners:
        runner.sent.before(runner, out)
        runner.lookahead.drop(list(runner.sessions))
    for mine, theirs in zip(ahead.runners, plain.runners, strict=True):
        assert set(mine.sessions) == set(theirs.sessions)
        for k in mine.sessions:
            a, b = mine.sessions[k], theirs.sessions[k]
            assert a.offset == b.offset, k
            assert [c.offset for c in mine.caches_of((k,))] == \
                [c.offset for c in theirs.caches_of((k,))]
            if a.sampler is not None:
                assert a.sampler.history == b.sampler.history


@pytest.mark.parametrize("cuts", [[3], [2, 4]], ids=["2 stages", "3 stages"])
def test_one_stream_every_step_is_sent_ahead_and_confirmed_token_exact(cuts, model_dir):
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    pipe = ahead_chain(path, spec, cuts)
    pipe.start("a", PROMPTS["a"])
    for _ in range(12):
        pipe.decode(["a"])
    assert pipe.tokens["a"] == reference_tokens(path, PROMPTS["a"], 13)
    # every decode step went through every stage before its message, which only confirmed
    # it (the prompt's last token named the first), and one more went that is not asked for
    assert pipe.reservations.used == pipe.reservations.early == 12
    assert pipe.sent == pipe.runners[0].lookahead.sent == 13
    assert all(r.sent.undone == 0 for r in pipe.runners)


def test_steps_sent_ahead_are_undone_in_every_stage_when_not_confirmed(model_dir):
    # a prompt while a group decodes, a group that grows, a stream that ends, a group that
    # splits, a bare release: each leaves a step sent ahead unconfirmed, which every stage
    # takes back before the message that dropped it
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    plain, ahead = chain(path, spec, [2, 4], lookahead=False), ahead_chain(path, spec, [2, 4])
    for d in (plain, ahead):
        mixed_steps(d)
        for _ in range(3):
            d.decode(["b", "c"])
        d.decode(["c"])
        d.decode(["b"])
        d._run([], release=["b"])  # a bare release
        for _ in range(3):
            d.decode(["c"])
    assert ahead.tokens == plain.tokens and ahead.logprobs == plain.logprobs
    assert ahead.tokens["c"] == reference_tokens(path, PROMPTS["c"], len(ahead.tokens["c"]))
    assert ahead.sent >= 8
    undone = [r.sent.undone for r in ahead.runners]
    assert undone[0] == 0 and min(undone[1:]) >= 3, undone  # stage 0's own: rolled back
    assert ahead.runners[0].lookahead.dropped >= 3
    assert_like(ahead, plain)


def test_sampled_streams_sent_ahead_keep_their_random_draws(model_dir):
    # a step undone on the last stage takes its sampler's position back: the draws after it
    # are those a pipeline without steps sent ahead makes
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    sampling = inference_pb2.SamplingParams(temperature=0.9, seed=3, logprobs=2)
    plain, ahead = chain(path, spec, [3], lookahead=False), ahead_chain(path, spec, [3])
    for d in (plain, ahead):
        d.start("a", PROMPTS["a"], sampling)
        d.start("b", PROMPTS["b"], sampling)
        for _ in range(3):
            d.decode(["a", "b"])
        d.decode(["a"], release=["b"])  # "b" ended: the step sent for both is undone
        for _ in range(3):
            d.decode(["a"])
    assert ahead.tokens == plain.tokens and ahead.logprobs == plain.logprobs
    assert ahead.runners[-1].sent.undone >= 1
    assert_like(ahead, plain)


def test_a_fork_from_a_sequence_with_a_step_sent_ahead_undoes_it_first(model_dir):
    # "c" reuses "a"'s first positions (the prefix cache) while a step for ("a", "b") went
    # through every stage ahead of its message: every stage takes it back before the fork
    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    shared = 10
    prompt_c = PROMPTS["a"][:shared] + PROMPTS["c"][:7]
    plain, ahead = chain(path, spec, [3], lookahead=False), ahead_chain(path, spec, [3])
    for d in (plain, ahead):
        fork_mid_batch(d, prompt_c, shared, 3)
    assert ahead.tokens == plain.tokens
    assert ahead.tokens["c"] == reference_tokens(path, prompt_c, 1)
    assert ahead.tokens["a"] == reference_tokens(path, PROMPTS["a"], len(ahead.tokens["a"]))
    assert ahead.runners[1].sent.undone >= 1
    assert_like(ahead, plain)


def _outcomes(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "shardline_lookahead_steps" for s in f.samples
            if s.name.endswith("_total")}


def test_streams_that_end_apart_undo_their_steps_sent_ahead_in_every_stage(model_dir):
    # three streams decode as one group; as each ends (its own max_tokens), the step stage 0
    # sent on for the whole group is not confirmed: every later stage takes it back, and the
    # streams left, and a stream after them, stay exact
    import asyncio

    from conftest import GiB, Serving, run, until

    from coordinator.local import LocalWorkers

    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    local = LocalWorkers(3, memory=[GiB] * 3, names=["s0", "s1", "s2"])
    local.env.update(SEND_AHEAD)
    addresses = local.start()
    lengths = {"a": 6, "b": 11, "c": 16}

    async def scenario():
        rounds = []
        async with Serving(path, addresses) as s:
            ports = [w.info.metrics_port for w in s.coordinator.cluster.workers]
            # whether stage 0 sent a step on before the coordinator's message changing the
            # group came is a race each stream's end may lose: a few rounds, until seen twice
            for _ in range(4):
                together = await asyncio.gather(*(s.generate(PROMPTS[k], n)
                                                  for k, n in lengths.items()))
                rounds.append((together, await s.generate(PROMPTS["b"], 8)))
                # the releases of the last streams reach every stage after their answers
                undone = await until(lambda: all(_outcomes(p).get("undone", 0) >= 2
                                                 for p in ports[1:]), timeout=5)
                if undone:
                    break
            return rounds, [_outcomes(p) for p in ports], undone

    try:
        rounds, counts, undone = run(scenario())
    finally:
        local.stop()
    for together, after in rounds:
        for (k, n), (tokens, _, _) in zip(lengths.items(), together, strict=True):
            assert tokens == reference_tokens(path, PROMPTS[k], n), k
        assert after[0] == reference_tokens(path, PROMPTS["b"], 8)
    assert undone, counts
    assert counts[0]["sent"] >= 10 and counts[0].get("undone", 0) == 0, counts


def test_without_a_direct_link_stage_0_starts_early_but_its_message_sends_each_step(
        model_dir):
    # on gRPC alone (links off, or TLS) nothing can carry a step ahead of its message
    from conftest import GiB, Serving, run

    from coordinator.local import LocalWorkers

    spec = ModelSpec(family="llama")
    path = model_dir(spec)
    local = LocalWorkers(2, memory=[GiB] * 2, names=["g0", "g1"])
    local.env.update(SEND_AHEAD, SHARDLINE_LINK="0")
    addresses = local.start()

    async def scenario():
        async with Serving(path, addresses) as s:
            tokens = await s.generate(PROMPTS["a"], 12)
            return tokens, [_outcomes(w.info.metrics_port) for w in s.coordinator.cluster.workers]

    try:
        (tokens, _, _), (first, last) = run(scenario())
    finally:
        local.stop()
    assert tokens == reference_tokens(path, PROMPTS["a"], 12)
    assert first["early"] >= 5 and first["sent"] == 0, first
    assert last.get("undone", 0) == 0


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_serve_token_exact_stage_0_sending_steps_on_before_their_messages(
        workers, model_dir):
    spec = ModelSpec(family="llama")
    first, *rest = served(model_dir(spec), workers, [f"w{i}" for i in range(workers)],
                          SEND_AHEAD)
    assert first["sent"] >= 5 and first["early"] >= first["sent"], first
    assert all(counts["sent"] == 0 for counts in rest), rest


def _decode(tokens: dict[str, int], offset: int) -> list[worker_pb2.SeqInput]:
    return [worker_pb2.SeqInput(seq_id=k, token_ids=[t], offset=offset, sample=True)
            for k, t in tokens.items()]


def _result(step_id: int, tokens: dict[str, int]) -> worker_pb2.StageResult:
    return worker_pb2.StageResult(step_id=step_id, outputs=[
        worker_pb2.SeqOutput(seq_id=k, token=t) for k, t in tokens.items()])


def test_the_coordinator_names_each_decode_step_and_takes_a_result_that_came_first():
    r, ids = Reservations(), itertools.count(1)
    step, after, early = r.assign(_decode({"a": 5, "b": 6}, 10), [], ids)
    assert (step, early) == (1, None) and after == 2
    r.arrived(_result(1, {"a": 7, "b": 8}), True)
    r.arrived(_result(2, {"a": 9, "b": 1}), False)  # stage 0 sent step 2 ahead
    # the predicted step takes the reserved id and the result that came for it
    step, after, early = r.assign(_decode({"a": 7, "b": 8}, 11), [], ids)
    assert step == 2 and after == 3 and early.outputs[0].token == 9
    # another token than the last stage sampled, a changed group, a release, a fork: a
    # fresh id, and a result that came for the reserved one is not taken
    r.arrived(_result(3, {"a": 2, "b": 2}), False)
    step, _, early = r.assign(_decode({"a": 9, "b": 7}, 12), [], ids)
    assert step not in (3,) and early is None
    r.arrived(_result(step, {"a": 4, "b": 4}), True)
    step, after, early = r.assign(_decode({"a": 4}, 13), [], ids)
    assert early is None and after  # ("a",) alone: named anew
    r.arrived(_result(step, {"a": 3}), True)
    r.give_up(["a"])  # released
    step, _, early = r.assign(_decode({"a": 3}, 14), [], ids)
    assert step != after and early is None
    r.arrived(_result(step, {"a": 6}), True)
    fork = worker_pb2.SeqInput(seq_id="c", token_ids=[1, 2], start=True, fork_from="a",
                               fork_length=4)
    _, nothing, _ = r.assign([fork], [], ids)
    assert nothing == 0  # a prompt chunk names no successor
    step, _, early = r.assign(_decode({"a": 6}, 15), [], ids)
    assert early is None and r.used == 1
