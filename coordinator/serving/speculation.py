"""Speculative decoding: cheap proposals that the pipeline checks in one trip (docs/speculation.md).

A proposer guesses the next k tokens of a sequence: prompt lookup (`--speculative ngram`: the
tokens that followed the last occurrence of the sequence's last 1 to 3 tokens) or a small draft
model with the same tokenizer (`--draft-model`, run greedily on this machine, which takes the
prompt in during the prefill and drafts each next round while the pipeline checks the one
before: `DraftProposer`). The engine sends the token it has with the guesses as one step
(`SeqInput.draft`); the last stage samples every position as single steps would and returns
the guesses its own samples confirm, then its own token (worker/verify.py), so the output is
what decoding without guesses gives. Per request the
number of guesses follows the odds that one is confirmed and what a check of k costs on this
cluster (coordinator/serving/spec_depth.py), and no guesses are made while more than
`MAX_STREAMS` requests run (their steps already share each trip), while few are confirmed, or
while steps with guesses bring tokens more slowly than steps without (a draft as costly as the
target, or a device whose check of a few positions costs several single steps).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator.serving import spec_depth

NGRAM_MAX, NGRAM_MIN = 3, 1
MAX_STREAMS = 2  # speculate only while at most this many requests run
LOW_ACCEPTANCE = 0.25  # below these odds of a confirmation (a few rounds in) a request pauses
PAUSE_STEPS = 32  # steps without guesses after a low acceptance (doubling each time, up to
MAX_PAUSE = 512  # this), then it tries one again
ODDS_EMA = 0.05  # weight of each checked guess in the odds that one is confirmed
PRIOR = 2.0  # guesses a request's odds start from
SLOWER = 0.95  # steps with guesses pause when they bring tokens slower than this share of
TIMED = 3  # the pace of steps without, both measured over at least this many steps
TIME_EMA = 0.15  # weight of the latest step in those moving averages
# a draft drafts the next round while the pipeline checks this one when at least these are the
# odds (a guess's odds of a confirmation to the power of the proposals plus one) that it is right
AHEAD_ODDS = 0.25

log = logging.getLogger("shardline.coordinator")


class Proposer(Protocol):
    """Guesses the tokens that follow a sequence."""

    async def propose(self, key: str, tokens: Sequence[int], k: int) -> list[int]: ...

    def ahead(self, key: str, tokens: Sequence[int], proposals: list[int], k: int) -> None:
        """`proposals` after `tokens` go to be checked now: get up to k ready for the round
        after, in case every one is confirmed (no await: it must not hold the check back)."""

    def prefill(self, key: str, tokens: Sequence[int]) -> None:
        """The prompt `tokens` goes to the pipeline now: take it in meanwhile (no await)."""

    async def drop(self, key: str) -> None: ...


@dataclass
class _Grams:
    seen: int = 0  # tokens indexed
    index: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)


class NgramProposer:
    """Prompt lookup: the tokens after the most recent earlier occurrence of the sequence's
    last n tokens (n from 3 down to 1), from the prompt and the text so far."""

    def __init__(self, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> None:
        self.max_n, self.min_n = max_n, min_n
        self._grams: dict[str, _Grams] = {}

    def lookup(self, key: str, tokens: Sequence[int], k: int) -> list[int]:
        grams = self._grams.setdefault(key, _Grams())
        if grams.seen > len(tokens):
            grams = self._grams[key] = _Grams()
        for p in range(grams.seen, len(tokens)):  # n-grams ending before position p
            for n in range(self.min_n, self.max_n + 1):
                if p >= n:
                    grams.index.setdefault(n, {})[tuple(tokens[p - n : p])] = p
        grams.seen = len(tokens)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) > n:
                start = grams.index.get(n, {}).get(tuple(tokens[-n:]))
                if start is not None:
                    return list(tokens[start : start + k])
        return []

    async def propose(self, key: str, tokens: Sequence[int], k: int) -> list[int]:
        return self.lookup(key, tokens, k)

    def ahead(self, key: str, tokens: Sequence[int], proposals: list[int], k: int) -> None:
        pass  # a lookup costs next to nothing when it is needed

    def prefill(self, key: str, tokens: Sequence[int]) -> None:
        pass

    async def drop(self, key: str) -> None:
        self._grams.pop(key, None)


class DraftProposer:
    """A small model with the target's tokenizer, decoding greedily on its own MLX thread; it
    keeps each sequence's KV cache and goes back to the tokens the target confirmed.

    While the pipeline checks a round's proposals, it drafts the next round (`ahead`) as if
    every proposal were confirmed and the target's own token were the draft's next guess; the
    next `propose` takes those when the tokens are exactly that, and otherwise drafts afresh
    from the tokens in common."""

    def __init__(self, path: Path) -> None:
        from worker.mlx_thread import MLXThread

        self.path = path
        self.thread = MLXThread()
        self.model: Any = None
        self._states: dict[str, tuple[list[Any], list[int]]] = {}  # caches, tokens in them
        # per sequence: the tokens a round drafted ahead assumed, and its proposals after them
        self._ahead: dict[str, tuple[list[int], list[int]]] = {}
        self._queued: set[asyncio.Future] = set()  # `ahead` and `prefill` work on the thread
        self._pending: dict[str, int] = {}  # per sequence, such work not queued yet
        self._gone: set[str] = set()  # sequences dropped while some was pending
        self.ahead_taken = self.ahead_missed = 0  # rounds drafted ahead, used and not
        self.tokens_fed = 0  # positions the draft model has computed
        self.device = ("", 0)  # where it computes and the steps that computes at once (`load`)
        self.closed = False

    async def load(self) -> None:
        from worker.mlx_thread import SWITCH_INTERVAL

        await self.thread.run(self._load)
        # this thread builds graphs while the event loop moves the pipeline's messages
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))

    def _load(self) -> None:
        from mlx_lm.models.cache import KVCache, make_prompt_cache
        from mlx_lm.utils import load_model

        from worker import attention, fused
        from worker.backend import accelerator, device_of

        self.model, _ = load_model(self.path)
        self.device = device_of(accelerator() or "cpu")
        attention.install(accelerator() == "cuda")  # its chunks of 2: no plan per shape
        fused.fuse(self.model)  # fewer kernels a step (worker/fused.py), the same bits
        if not all(type(c) is KVCache for c in make_prompt_cache(self.model)):
            raise ValueError(f"draft model {self.path}: sliding-window caches cannot go back "
                             "to the confirmed tokens; choose a model without them")

    def _take_in(self, key: str, tokens: Sequence[int]) -> tuple[list[Any], list[int]]:
        """Bring `key`'s caches back to the longest prefix they share with `tokens` (short of
        the last token, which is always fed: its logits are wanted) and feed the rest but the
        last piece; returns the caches and that piece."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        caches, done = self._states.get(key) or (make_prompt_cache(self.model), [])
        common = 0
        for a, b in zip(done, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)
        if common < len(done):
            for cache in caches:
                cache.trim(len(done) - common)
        todo = list(tokens[common:])
        pieces = [todo[i : i + 512] for i in range(0, len(todo), 512)]  # long prompts
        for piece in pieces[:-1]:
            self._feed(piece, caches)
            mx.eval([c.state for c in caches])
        return caches, pieces[-1]

    def _feed(self, tokens: list[int], caches: list[Any]) -> Any:
        import mlx.core as mx

        self.tokens_fed += len(tokens)
        return self.model(mx.array(tokens)[None], cache=caches)[:, -1, :]

    def _warm(self, key: str, tokens: list[int]) -> None:
        import mlx.core as mx

        caches, last = self._take_in(key, tokens)
        if len(last) > 1:
            self._feed(last[:-1], caches)
            mx.eval([c.state for c in caches])
        self._states[key] = (caches, tokens[:-1])

    def _propose(self, key: str, tokens: Sequence[int], k: int) -> list[int]:
        import mlx.core as mx

        ahead = self._ahead.pop(key, None)
        if ahead is not None:
            if ahead[0] == list(tokens) and len(ahead[1]) >= k:
                self.ahead_taken += 1
                return ahead[1][:k]
            self.ahead_missed += 1
        caches, last = self._take_in(key, tokens)
        # the last piece (after a round, the last proposal and the target's own token) in one
        # pass; each guess is built on the one before while it is still lazy: one sync for all
        logits = self._feed(last, caches)
        guesses = []
        for i in range(k):
            guess = mx.argmax(logits, axis=-1)
            guesses.append(guess)
            if i + 1 < k:
                self.tokens_fed += 1
                logits = self.model(guess[None], cache=caches)[:, -1, :]
                mx.async_eval(logits)
        out = [int(t) for t in mx.concatenate(guesses).tolist()]
        self._states[key] = (caches, list(tokens) + out[:-1])
        return out

    def _draft_ahead(self, key: str, assumed: list[int], k: int) -> None:
        guesses = self._propose(key, assumed, k + 1)  # the target's next token, then k
        self._ahead[key] = (assumed + guesses[:1], guesses[1:])

    async def propose(self, key: str, tokens: Sequence[int], k: int) -> list[int]:
        return await self.thread.run(self._propose, key, list(tokens), k)

    def ahead(self, key: str, tokens: Sequence[int], proposals: list[int], k: int) -> None:
        self._later(self._draft_ahead, key, list(tokens) + list(proposals), k)

    def prefill(self, key: str, tokens: Sequence[int]) -> None:
        if len(tokens) > 1:
            self._later(self._warm, key, list(tokens))

    def _later(self, fn: Any, key: str, *args: Any) -> None:
        """Queue `fn(key, *args)` on the draft's thread two loop turns from now, after the
        pipeline's message has gone out (building a graph holds the GIL)."""
        self._pending[key] = self._pending.get(key, 0) + 1
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._start, fn, key, args)

    def _start(self, fn: Any, key: str, args: tuple) -> None:
        left = self._pending.pop(key) - 1
        if left:
            self._pending[key] = left
        if key in self._gone:  # dropped meanwhile: its caches must not come back
            if not left:
                self._gone.discard(key)
            return
        if self.closed:
            return
        future = self.thread.submit(fn, key, *args)
        self._queued.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        self._queued.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("the draft model failed: %s", future.exception())

    async def settled(self) -> None:
        """Wait until the work `ahead` and `prefill` scheduled is done."""
        while self._pending or self._queued:
            await asyncio.gather(*self._queued, asyncio.sleep(0), return_exceptions=True)

    @property
    def sequences(self) -> int:
        """Sequences whose KV caches the draft holds."""
        return len(self._states)

    async def drop(self, key: str) -> None:
        if key in self._pending:
            self._gone.add(key)
        await self.thread.run(self._forget, key)

    def _forget(self, key: str) -> None:
        self._states.pop(key, None)
        self._ahead.pop(key, None)

    def close(self) -> None:
        self.closed = True
        self.thread.close()


class Speculator:
    """The proposer of one `serve`, its settings, and the counters the metrics read."""

    def __init__(self, proposer: Proposer, num_draft_tokens: int, metrics: Any = None,
                 drafts_ahead: Callable[[], bool] = lambda: True) -> None:
        if num_draft_tokens < 1:
            raise ValueError("--num-draft-tokens must be at least 1")
        self.proposer = proposer
        self.num_draft_tokens = num_draft_tokens
        self.metrics = metrics
        self.drafts_ahead = drafts_ahead  # whether the proposer works on the next round now
        self.costs = spec_depth.RoundCosts()  # seconds of a step by its number of guesses
        # steps that waited for the proposer, and the seconds they waited (bench_speculation.py)
        self.proposals_awaited = 0
        self.proposal_seconds = 0.0

    def request(self, key: str) -> SpecRequest:
        return SpecRequest(self, key)


class SpecRequest:
    """One request's guesses: how many to make now, and how many were confirmed."""

    def __init__(self, speculator: Speculator, key: str) -> None:
        self.spec = speculator
        self.key = key
        self.k = speculator.num_draft_tokens
        self.drafted = self.accepted = 0
        self.rounds = 0
        # guesses checked (up to the first miss) and confirmed, moving; a start of PRIOR
        # confirmed ones, so that one miss does not stop drafting ahead
        self._tried = self._confirmed = PRIOR
        self.paused = 0
        self.pause = PAUSE_STEPS  # the next pause's length
        # moving averages of (seconds, tokens brought) per step: steps with guesses (since the
        # last pause) and paused steps without; how many steps each has seen
        self._rounds: tuple[float, float] | None = None
        self._plain: tuple[float, float] | None = None
        self.timed = self.plain_steps = 0
        self._plain_step = False  # the step being proposed is a paused one

    def start(self, prompt: Sequence[int], running: int) -> None:
        """The prompt goes to the pipeline now: the proposer takes it in meanwhile, where
        guesses may follow (`running` requests)."""
        if running <= MAX_STREAMS:
            self.spec.proposer.prefill(self.key, prompt)

    async def propose(self, tokens: Sequence[int], running: int, room: int) -> list[int]:
        """Guesses to send after `tokens`; `room` tokens may still come (the step gives back
        up to k + 1)."""
        self._plain_step = False
        if running > MAX_STREAMS or room <= 1:
            return []
        if self.paused:
            self.paused -= 1
            self._plain_step = True
            return []
        started = time.perf_counter()
        out = await self.spec.proposer.propose(self.key, tokens, min(self.k, room - 1))
        self.spec.proposals_awaited += 1
        self.spec.proposal_seconds += time.perf_counter() - started
        if out and self.odds ** (len(out) + 1) >= AHEAD_ODDS and self.spec.drafts_ahead():
            self.spec.proposer.ahead(self.key, tokens, out, self.spec.num_draft_tokens)
        return out

    def record(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """A step with `drafted` guesses confirmed `accepted` of them; `seconds` from before
        its guesses were made until its result came (its tokens: `accepted` + 1)."""
        if not drafted:
            if self._plain_step and seconds is not None:
                self.plain_steps += 1
                self._plain = _mix(self._plain, seconds, 1, self.plain_steps)
                self.spec.costs.add(0, seconds)
            return
        self.drafted += drafted
        self.accepted += accepted
        self.rounds += 1
        # the guesses after the first miss were not checked: they say nothing of the odds
        tried = accepted + (accepted < drafted)
        keep = (1 - ODDS_EMA) ** tried  # a moving window of about 1 / ODDS_EMA guesses
        self._tried = keep * self._tried + tried
        self._confirmed = keep * self._confirmed + accepted
        full = self.spec.num_draft_tokens
        if seconds is not None:
            self.spec.costs.add(drafted, seconds)
        k = spec_depth.best(self.odds, self.spec.costs, full)
        self.k = k if k is not None else (
            min(full, self.k + 1) if accepted == drafted else max(1, accepted + 1))
        if seconds is not None:
            self.timed += 1
            self._rounds = _mix(self._rounds, seconds, accepted + 1, self.timed)
        if self.rounds >= 3 and self.odds < LOW_ACCEPTANCE:
            self._rest(odds=0.5)
        elif self.timed >= TIMED and self.plain_steps < TIMED:
            self.paused = TIMED - self.plain_steps  # time a few steps without guesses
        elif self.timed >= TIMED and self.pace * SLOWER > self.plain:
            self._rest(odds=self.odds)
        if (m := self.spec.metrics) is not None:
            m.spec_draft.inc(drafted)
            m.spec_accepted.inc(accepted)

    @property
    def odds(self) -> float:
        """Moving odds that a guess is confirmed, from the guesses checked."""
        return self._confirmed / self._tried

    @property
    def pace(self) -> float | None:
        """Seconds per token of recent steps with guesses (a ratio of averages: a round that
        brought one token weighs as one token, not as a round)."""
        return None if self._rounds is None else self._rounds[0] / self._rounds[1]

    @property
    def plain(self) -> float | None:
        """Seconds per token of recent paused steps."""
        return None if self._plain is None else self._plain[0] / self._plain[1]

    def _rest(self, odds: float) -> None:
        """No guesses for the next pause (twice as long each time), then try again afresh."""
        self.paused, self.k, self.rounds = self.pause, 1, 0
        self._tried, self._confirmed = PRIOR, PRIOR * odds  # the odds start again at `odds`
        self.pause = min(2 * self.pause, MAX_PAUSE)
        self._rounds, self.timed = None, 0

    async def rekey(self, key: str) -> None:
        """The sequence continues under a new id (after a re-plan)."""
        await self.spec.proposer.drop(self.key)
        self.key = key

    async def close(self) -> None:
        await self.spec.proposer.drop(self.key)


_WARNED: set[str] = set()  # SHARDLINE_DRAFT_AHEAD values warned of


def drafts_ahead(draft: tuple[str, int], workers: Iterable[str],
                 environ: dict[str, str] | None = None) -> bool:
    """Whether a draft computing on `draft` (its device's name and the steps it computes at
    once: worker/backend.py `device_of`) drafts the next round while the pipeline checks this
    one, the workers computing on the devices named `workers`: unless its device computes one
    step at a time and a worker's stage computes there too. There the draft's steps wait in
    line with that stage's check, which gains nothing (one H100 shared with three workers: the
    same tokens/s within the spread) and spends GPU time on rounds drafted for nothing
    (bench/RESULTS-speculation.md). SHARDLINE_DRAFT_AHEAD=1 or 0 decides instead."""
    env = (os.environ if environ is None else environ).get("SHARDLINE_DRAFT_AHEAD", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env and env not in _WARNED:
        _WARNED.add(env)
        log.warning("SHARDLINE_DRAFT_AHEAD=%r: 1 or 0; deciding by the devices", env)
    name, lanes = draft
    return lanes > 1 or name not in set(workers)


def _mix(average: tuple[float, float] | None, seconds: float, tokens: float, n: int
         ) -> tuple[float, float]:
    """Moving averages of a step's seconds and tokens, the n-th step timed: plain means of the
    first 1 / TIME_EMA steps, so that the first (a draft still taking the prompt in, say) weighs
    no more than the others, then weight TIME_EMA for the latest."""
    if average is None:
        return seconds, tokens
    w = max(TIME_EMA, 1 / n)
    return (1 - w) * average[0] + w * seconds, (1 - w) * average[1] + w * tokens
