"""Decode-ahead on a stage that holds the whole model: begin step t+1 before it is asked for.

A decode step's only input is the token the step before sampled. A stage that is both first and
last has that token on its own device, still lazy, the moment it has built step t's graph, so it
builds step t+1's graph on it and starts it (`mx.async_eval`) while step t computes and its token
travels to the coordinator and back, as mlx-lm's `generate_step` does. When the coordinator's
step t+1 arrives and names the same sequences with the tokens that were sampled, it is already
running; anything else (a sequence finished, a prompt chunk came first, the group changed) rolls
the guess back: one position trimmed off each cache and off each sampler's history. Results are
the same bits either way (the same kernels on the same values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from protos import worker_pb2

if TYPE_CHECKING:
    from worker.shard import Shard
    from worker.stage import Pending, StageRunner

PLACEHOLDER = -1  # a sampler's history entry for a token not sampled yet


@dataclass
class _Guess:
    after: Pending  # the step whose tokens the guess decodes
    pending: Pending  # the guessed step, begun
    caches: list[list[Any]]  # per group of the guess, the caches it advanced by one position


class Lookahead:
    """One guessed step at a time for one StageRunner (call from its MLX thread only)."""

    def __init__(self) -> None:
        self.guess: _Guess | None = None
        self.taken = 0  # guesses the next step confirmed
        self.dropped = 0  # guesses rolled back
        self.reported = {"taken": 0, "dropped": 0}  # how many of each the metrics counted

    @staticmethod
    def suits(shard: Shard) -> bool:
        """Only a stage with the embedding and the head, and caches that can be trimmed."""
        return shard.is_first and shard.is_last and shard.forkable

    def propose(self, runner: StageRunner, step: Pending) -> None:
        """Begin the decode step after `step` on its lazily sampled tokens, when it can be
        guessed: every sequence decodes one token and samples with no logits processor."""
        if self.guess is not None or not step.seqs:
            return
        for seq, session, (_, sampled) in zip(step.seqs, step.sessions, step.rows, strict=True):
            if (seq.start or not seq.sample or len(seq.token_ids) != 1 or sampled is None
                    or session.sampler is None or session.sampler.has_processors):
                return
        seqs = [worker_pb2.SeqInput(seq_id=s.seq_id, token_ids=[0], offset=s.offset + 1,
                                    sample=True) for s in step.seqs]  # one position each
        family = runner.shard.family
        inputs = [family.embed(sampled[0].reshape(1, 1).astype(mx.int32))
                  for _, sampled in step.rows]
        history = [[PLACEHOLDER] for _ in seqs]
        pending = runner.build(worker_pb2.StageMessage(seqs=seqs), seqs, step.sessions, inputs,
                               history)
        caches = [runner.caches_of(tuple(seqs[i].seq_id for i in g)) for g in pending.groups]
        self.guess = _Guess(step, pending, caches)

    def take(self, runner: StageRunner, msg: worker_pb2.StageMessage) -> Pending | None:
        """The guessed step if `msg` is exactly it (the step before has finished), else None
        after rolling the guess back."""
        guess = self.guess
        if guess is None or not msg.seqs:
            return None  # a bare release: StageRunner.release drops the guess if it must
        self.guess = None
        tokens = [int(sampled[0].item()) for _, sampled in guess.after.rows]
        for session, token in zip(guess.pending.sessions, tokens, strict=True):
            session.sampler.history[-1] = token
        ids = [s.seq_id for s in guess.pending.seqs]
        seqs = list(msg.seqs)
        same = (
            [s.seq_id for s in seqs] == ids
            and not set(msg.release) & set(ids)
            and all(
                list(s.token_ids) == [t] and s.sample and not s.start and not s.fork_from
                and s.offset + 1 == session.offset  # the guess has counted its position
                for s, t, session in zip(seqs, tokens, guess.pending.sessions, strict=True)
            )
        )
        if not same:
            self._roll_back(guess)
            return None
        runner.release(list(msg.release))
        self.taken += 1
        pending = guess.pending
        pending.msg, pending.seqs = msg, seqs
        runner.resolve(pending)  # constrained rows: their masks follow the tokens just known
        return pending

    def drop(self, seq_ids: list[str]) -> None:
        """Roll back the guess if it decodes one of `seq_ids` (about to be released)."""
        guess = self.guess
        if guess is not None and {s.seq_id for s in guess.pending.seqs} & set(seq_ids):
            self.guess = None
            self._roll_back(guess)

    def _roll_back(self, guess: _Guess) -> None:
        self.dropped += 1
        for caches in guess.caches:
            for cache in caches:
                cache.trim(1)
        for session in guess.pending.sessions:
            session.sampler.history.pop()
            session.offset -= 1
