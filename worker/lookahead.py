"""Decode-ahead: a stage builds its next decode step's graph before that step's input arrives.

Building a step's graph (tens of small ops per layer) costs host time that, on a fast GPU, is
longer than the device's time for the step. mlx-lm hides it by building step t+1 while step t
computes; a stage of a pipeline can do the same whenever it can guess step t+1:

- A stage that holds the whole model (first and last) has step t's sampled token on its own
  device, still lazy, the moment it has built step t, so it builds step t+1 on it and starts it
  (`mx.async_eval`) while step t computes (`propose`, as mlx-lm's `generate_step` does). Once
  step t's token has left, it builds step t+2 on step t+1's lazy token too (`prepare`, up to
  AHEAD steps), so the host never waits for the token's trip to the coordinator and back.
- Any other stage builds step t+1 while it waits (`prepare`, called by worker/mlx_thread.py
  when it has nothing else to do): the same sequences, one position further, on placeholder
  inputs (protos/codec.py `placeholder`): a token id on the first stage, a hidden state on
  the others. When the message arrives its values are written into the placeholders and the
  graph, already built, is started at once: the stage's time on the token's path is launching
  and computing, not building.

When the next step names the same sequences, each decoding one token at the guessed position,
the guess is taken; anything else (a sequence finished, a prompt chunk came first, the group
changed, speculation) rolls it back, with every guess built on it: one position per guess
trimmed off each cache and off each sampler's history. Results are the same bits either way
(the same kernels on the same values).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from protos import codec, worker_pb2
from worker.check_ahead import ChecksAhead, take_back

if TYPE_CHECKING:
    from worker.shard import Shard
    from worker.stage import Pending, StageRunner

log = logging.getLogger("shardline.worker")

PLACEHOLDER = -1  # a sampler's history entry for a token not sampled yet
# guessed steps in flight per group on a whole-model stage (a slice: 1); 1 turns the second off
AHEAD = max(1, int(os.environ.get("SHARDLINE_DECODE_AHEAD", "2")))
# a slice of the model builds its next step ahead; SHARDLINE_PREPARE_SLICES=0 measures without
# (bench/OVERHEAD.md, "Building ahead on slices")
PREPARE_SLICES = os.environ.get("SHARDLINE_PREPARE_SLICES", "").strip() != "0"


@dataclass
class _Guess:
    after: Pending  # the step whose successor the guess is
    pending: Pending  # the guessed step: built (and begun, on a whole-model stage)
    caches: list[list[Any]]  # per group of the guess, the caches it advanced by one position
    views: list[np.ndarray] | None = None  # the placeholders' buffers (None: lazy tokens)
    slots: list[int] | None = None  # per sequence, where its sampler's history holds PLACEHOLDER
    early: list[int] | None = None  # the tokens written in and started on before the message
    sent: int = 0  # the step id it went on to the next stage with, ahead of its message


def placeholders_work() -> bool:
    """Whether a graph built on a placeholder reads what is written into it afterwards (true
    wherever MLX arrays live in host-visible memory: CPU, Apple silicon, CUDA managed memory)."""
    global _WORKS
    if _WORKS is None:
        try:  # float32 as is, bf16 through a view of its bits (codec.placeholder)
            works = True
            for dtype in (mx.float32, mx.bfloat16):
                slot, view = codec.placeholder((1, 4), dtype)
                out = slot * 2
                view[...] = 0x4040 if dtype == mx.bfloat16 else 3  # 3.0 in bf16's bits
                works = works and bool(mx.all(out == 6).item())
            _WORKS = works
        except Exception:  # noqa: BLE001 - no placeholders, then: slices do not prepare
            _WORKS = False
        if not _WORKS:
            log.warning("placeholder inputs do not work on this backend: stages that hold a "
                        "slice of the model build each step when it arrives")
    return _WORKS


_WORKS: bool | None = None


class Lookahead:
    """Guessed steps, at most one per group of sequences, for one StageRunner (call from its
    MLX thread only)."""

    def __init__(self, whole: bool) -> None:
        self.whole = whole  # first and last: guesses build on lazy tokens (propose)
        # per group of sequences, its guessed steps in order (each built on the one before)
        self.guesses: dict[tuple[str, ...], list[_Guess]] = {}
        self.taken = 0  # guesses the next step confirmed
        self.dropped = 0  # guesses rolled back
        self.early = 0  # guesses started on the last stage's tokens (stage 0 of a pipeline)
        self.sent = 0  # of those, sent on before the coordinator's message (sent_ahead.py)
        self.sends = False  # stage 0 has a direct link to send steps on ahead with
        self.withdrawn: list[int] = []  # steps sent ahead and rolled back, to name downstream
        self.checks = ChecksAhead()  # checks of proposals built ahead (worker/check_ahead.py)
        self.reported = dict.fromkeys(("taken", "dropped", "early", "sent"), 0)  # in metrics

    @staticmethod
    def suits(shard: Shard) -> bool:
        """A stage whose caches can be trimmed; a slice of the model only where placeholders
        work on this backend."""
        return shard.forkable and ((shard.is_first and shard.is_last) or placeholders_work())

    @staticmethod
    def _guessable(runner: StageRunner, step: Pending) -> bool:
        """Every sequence of `step` decoded one token (sampling with no logits processor on
        the last stage), and this step is the latest of each on this stage."""
        if not step.seqs:
            return False
        for seq, session, (_, sampled) in zip(step.seqs, step.sessions, step.rows, strict=True):
            if seq.start or seq.draft or len(seq.token_ids) != 1 or \
                    runner.sessions.get(seq.seq_id) is not session or \
                    session.offset != seq.offset + 1:
                return False
            if runner.shard.is_last and (not seq.sample or sampled is None or
                                         session.sampler is None or
                                         session.sampler.has_processors):
                return False
        return True

    def propose(self, runner: StageRunner, step: Pending) -> None:
        """A step just begun: noted if it checks proposals; on a whole-model stage, unless a
        guess already follows it, begin the decode step after `step` on its lazily sampled
        tokens."""
        self.checks.note(step)
        if self.whole:
            self._extend(runner, step, 1)

    def prepare(self, runner: StageRunner, step: Pending) -> None:
        """Nothing else to do, `step`'s output has left: on a whole-model stage, begin guessed
        steps up to AHEAD after it, each on the lazy tokens of the one before; on a slice of
        the model, build the decode step after `step` on placeholder inputs, not yet
        evaluated."""
        if runner.shard is None:
            return
        if self.whole:
            self._extend(runner, step, AHEAD)
            return
        if not PREPARE_SLICES:
            return
        key = tuple(s.seq_id for s in step.seqs)
        chain = self.guesses.get(key)
        if chain and not (chain[-1].sent and chain[-1].pending is step):
            return  # (after a step sent ahead, its successor is built before it is confirmed)
        if not self._guessable(runner, step):
            return
        if runner.shard.is_first:
            slots = [codec.placeholder((1, 1), mx.int32) for _ in step.seqs]
            inputs = [runner.shard.family.embed(slot) for slot, _ in slots]
        else:
            slots = [codec.placeholder(x.shape, x.dtype) for x in step.inputs]
            inputs = [slot for slot, _ in slots]
        self._build(runner, step, key, inputs, [view for _, view in slots])

    def _extend(self, runner: StageRunner, step: Pending, depth: int) -> None:
        """Begin guesses after `step` (or after its group's last guess) until `depth` are in
        flight."""
        key = tuple(s.seq_id for s in step.seqs)
        chain = self.guesses.get(key, [])
        while len(chain) < depth:
            tail = chain[-1].pending if chain else step
            if not self._guessable(runner, tail):
                return
            family = runner.shard.family
            inputs = [family.embed(sampled[0].reshape(1, 1).astype(mx.int32))
                      for _, sampled in tail.rows]
            if not self._build(runner, tail, key, inputs, None):
                return
            chain = self.guesses[key]

    def _build(self, runner: StageRunner, step: Pending, key: tuple[str, ...],
               inputs: list[mx.array], views: list[np.ndarray] | None) -> bool:
        seqs = [worker_pb2.SeqInput(seq_id=s.seq_id, token_ids=[0], offset=s.offset + 1,
                                    sample=s.sample) for s in step.seqs]  # one position each
        history = [[PLACEHOLDER] for _ in seqs] if runner.shard.is_last else None
        try:
            pending = runner.build(worker_pb2.StageMessage(seqs=seqs), seqs, step.sessions,
                                   inputs, history, start=views is None)
        except Exception:  # noqa: BLE001 - caches may be half advanced: end these sequences
            log.exception("building a guessed step failed; releasing its sequences")
            runner.release(list(key))
            return False
        caches = [runner.caches_of(tuple(seqs[i].seq_id for i in g)) for g in pending.groups]
        slots = [len(s.sampler.history) - 1 if s.sampler is not None else -1
                 for s in step.sessions]
        self.guesses.setdefault(key, []).append(_Guess(step, pending, caches, views, slots))
        return True

    def take(self, runner: StageRunner, msg: worker_pb2.StageMessage) -> Pending | None:
        """The guessed step if `msg` is exactly it (its inputs written into the placeholders
        and its evaluation started; if it was sent ahead already, what confirming it runs:
        `_confirm`), else None after rolling back every guess that shares a sequence with
        it."""
        if msg.seqs and self.checks.built:
            check = self.checks.take(runner, msg)
            if check is not None:
                return check
        if not msg.seqs or not self.guesses:
            return None  # a bare release: StageRunner.release drops guesses if it must
        seqs = list(msg.seqs)
        ids = tuple(s.seq_id for s in seqs)
        chain = self.guesses.pop(ids, None)
        for key in [k for k in self.guesses if set(k) & set(ids)]:
            self._roll_back(self.guesses.pop(key))
        if not chain:
            return None
        guess = chain[0]
        if self.whole:
            tokens = [int(sampled[0].item()) for _, sampled in guess.after.rows]
        elif guess.early is not None:  # started already: the message must be what it ran on
            tokens = guess.early
        else:
            tokens = [s.token_ids[0] if len(s.token_ids) == 1 else None for s in seqs]
        same = guess.sent in (0, msg.step_id) and not set(msg.release) & set(ids) and all(
            list(s.token_ids) == [t] and s.sample == g.sample and not s.start
            and not s.fork_from and not s.draft
            and s.offset + len(chain) == session.offset  # the guesses counted their positions
            for s, t, g, session in zip(seqs, tokens, guess.pending.seqs,
                                        guess.pending.sessions, strict=True))
        if same and guess.views is not None and guess.early is None:
            same = self._fill(runner, guess.views, seqs)
        if not same:
            self._roll_back(chain)
            return None
        if len(chain) > 1:
            self.guesses[ids] = chain[1:]
        for session, token, slot in zip(guess.pending.sessions, tokens, guess.slots,
                                        strict=True):
            if session.sampler is not None:
                session.sampler.history[slot] = token
        runner.release(list(msg.release))
        self.taken += 1
        if guess.sent:
            return self._confirm(msg, guess, chain[1:])
        pending = guess.pending
        pending.msg, pending.seqs = msg, seqs
        if guess.views is not None and guess.early is None:
            runner.launch(pending)
        runner.resolve(pending)  # constrained rows: their masks follow the tokens just known
        return pending

    def start_early(self, runner: StageRunner, result: worker_pb2.StageResult,
                    send: bool = False) -> Pending | None:
        """The last stage's result of a step: checks of proposals in it settle and the next
        is built (`ChecksAhead.verdict`). Stage 0 of a pipeline: if the tokens sampled are
        the inputs of the guess after step `result.step_id`, write them in and start it; with
        `send` (a direct link to stage 1) and its id named already, return it to be sent on
        at once (worker/sent_ahead.py)."""
        if runner.shard is None:
            return None
        self.checks.verdict(runner, result)
        if self.whole or not runner.shard.is_first:
            return None
        self.sends = send
        chain = self.guesses.get(tuple(o.seq_id for o in result.outputs)) or ()
        guess = next((g for g in chain if g.early is None), None)  # after those begun
        if guess is None or guess.views is None or \
                guess.after.msg.step_id != result.step_id or \
                any(o.accepted for o in result.outputs):
            return None
        guess.early = [o.token for o in result.outputs]
        for view, token in zip(guess.views, guess.early, strict=True):
            view[...] = token
        runner.launch(guess.pending)
        self.early += 1
        step_id = guess.after.msg.next_step_id
        return self._send(guess, step_id) if send and step_id else None

    def _send(self, guess: _Guess, step_id: int) -> Pending:
        """A guess begun on the last stage's tokens, as the step `step_id` to send on now."""
        msg = worker_pb2.StageMessage(step_id=step_id, ahead=True)
        for seq, token in zip(guess.pending.seqs, guess.early, strict=True):
            out = msg.seqs.add()
            out.CopyFrom(seq)
            out.token_ids[:] = [token]
        guess.sent = step_id
        guess.pending.msg, guess.pending.seqs = msg, list(msg.seqs)
        self.sent += 1
        return guess.pending

    def _confirm(self, msg: worker_pb2.StageMessage, guess: _Guess,
                 rest: list[_Guess]) -> Pending:
        """`msg` confirms `guess`, sent ahead already: the step after it, if it began on the
        last stage's tokens before `msg` named it, goes on now; else nothing runs (only what
        `msg` frees goes on)."""
        guess.pending.msg.next_step_id = msg.next_step_id
        after = rest[0] if rest else None
        if self.sends and msg.next_step_id and after is not None and \
                after.early is not None and not after.sent:
            pending = self._send(after, msg.next_step_id)
            pending.msg.release.extend(msg.release)
            pending.msg.dropped.extend(self.withdrawn)  # (rolled back by `msg` just now)
            self.withdrawn.clear()
            return pending
        return replace(guess.pending, msg=msg, seqs=[], sessions=[], rows=[], targets=[],
                       groups=[], inputs=[], marks=[], wired={}, confirmed=True)

    @staticmethod
    def _fill(runner: StageRunner, views: list[np.ndarray],
              seqs: list[worker_pb2.SeqInput]) -> bool:
        """Write the step's inputs into the placeholders; False if one does not fit (a
        tensor of another shape or dtype: the step then runs, and is checked, as built)."""
        if runner.shard.is_first:
            for view, seq in zip(views, seqs, strict=True):
                view[...] = seq.token_ids[0]
            return True
        return all(codec.fill(view, seq.hidden) for view, seq in zip(views, seqs, strict=True))

    def drop(self, seq_ids: list[str]) -> None:
        """Roll back every guess that decodes one of `seq_ids` (about to be released)."""
        self.checks.drop(seq_ids)
        for key in [k for k in self.guesses if set(k) & set(seq_ids)]:
            self._roll_back(self.guesses.pop(key))

    def clear(self) -> None:
        """Forget every guess without rolling back (the runner lets its caches go)."""
        self.checks.clear()
        self.guesses.clear()

    def _roll_back(self, chain: list[_Guess]) -> None:
        """Undo a group's guesses, the last built first."""
        for guess in reversed(chain):
            self.dropped += 1
            take_back(guess.caches, guess.pending.sessions, 1)
            if guess.sent:  # the later stages ran it too
                self.withdrawn.append(guess.sent)
