"""Checks built ahead: a stage builds a sequence's next check of proposals before it arrives.

A step with k proposals (`SeqInput.draft`, docs/speculation.md) comes at an offset only the
last stage's verdict fixes: the confirmed proposals stay, the rest of the chunk's positions go.
So unlike a one-token decode step (worker/lookahead.py), a stage could not build the next check
ahead, and every round paid each stage's graph building on the token's path. Every stage
learns the verdict as soon as the last stage has it: the last stage from its own result, the
others from the results they follow (worker/loop.py). With it a stage drops the rejected
positions at once (what the next step would have done) and builds the next check, assumed to
carry as many proposals as this one, on placeholder inputs (protos/codec.py): k + 1 token ids
on the first stage, k + 1 hidden positions on the others. When the step comes and is that
check, its values are written in and the built graph launched; anything else rolls it back.

On the last stage only greedy, unconstrained checks are built ahead (a sampled check's
positions depend on the proposals before them). Outputs are the same bits either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from protos import codec, worker_pb2
from worker.verify import Checked

if TYPE_CHECKING:
    from worker.stage import Pending, StageRunner


@dataclass
class _Check:
    """A begun check step of one sequence: what the next one is built from."""

    step_id: int
    offset: int
    k: int
    sample: bool
    width: int  # hidden size of the input (not the first stage)
    dtype: Any


@dataclass
class _Built:
    pending: Pending
    view: np.ndarray
    offset: int
    k: int
    caches: list[Any]


class ChecksAhead:
    """Per sequence: its last check begun on this stage, and the next one built ahead (call
    from the runner's MLX thread only)."""

    def __init__(self) -> None:
        self.begun: dict[str, _Check] = {}
        self.built: dict[str, _Built] = {}
        self.taken = self.dropped = 0

    def note(self, pending: Pending) -> None:
        """A step was just begun: remember a check of one sequence, forget older ones."""
        for seq in pending.seqs:
            self.begun.pop(seq.seq_id, None)
        if len(pending.seqs) == 1 and pending.seqs[0].draft:
            seq, x = pending.seqs[0], pending.inputs[0]
            self.begun[seq.seq_id] = _Check(pending.msg.step_id, seq.offset, seq.draft,
                                            seq.sample, x.shape[-1], x.dtype)

    def verdict(self, runner: StageRunner, result: worker_pb2.StageResult) -> None:
        """The last stage's result of a step: for each check of it this stage ran last, drop
        the rejected positions and build the next check on placeholders."""
        for out in result.outputs:
            check = self.begun.get(out.seq_id)
            if check is None or check.step_id != result.step_id or out.seq_id in self.built:
                continue
            del self.begun[out.seq_id]
            offset = check.offset + len(out.accepted) + 1
            if runner.settle(out.seq_id, check.offset + check.k + 1, offset):
                self._build(runner, out.seq_id, check, offset)

    def _build(self, runner: StageRunner, seq_id: str, check: _Check, offset: int) -> None:
        session = runner.sessions[seq_id]
        if runner.shard.is_last and (session.sampler is None or not session.sampler.greedy
                                     or session.constraint is not None):
            return
        n = check.k + 1
        seq = worker_pb2.SeqInput(seq_id=seq_id, token_ids=[0] * n, offset=offset,
                                  sample=check.sample, draft=check.k)
        if runner.shard.is_first:
            slot, view = codec.placeholder((1, n), mx.int32)
            x = runner.shard.family.embed(slot)
        else:
            x, view = codec.placeholder((1, n, check.width), check.dtype)
        pending = runner.build(worker_pb2.StageMessage(seqs=[seq]), [seq], [session], [x],
                               start=False)
        self.built[seq_id] = _Built(pending, view, offset, check.k, runner.caches_of((seq_id,)))

    def take(self, runner: StageRunner, msg: worker_pb2.StageMessage) -> Pending | None:
        """The check built ahead if `msg` is exactly it (its values written in, its
        evaluation started), else None after rolling back any built for its sequences."""
        if len(msg.seqs) == 1 and msg.seqs[0].seq_id in self.built:
            seq, built = msg.seqs[0], self.built.pop(msg.seqs[0].seq_id)
            fits = (seq.draft == built.k and len(seq.token_ids) == built.k + 1
                    and seq.offset == built.offset and not seq.start and not seq.fork_from
                    and seq.seq_id not in msg.release
                    and seq.sample == built.pending.seqs[0].sample)
            if fits and runner.shard.is_first:
                built.view[...] = np.asarray(seq.token_ids, dtype=built.view.dtype)[None]
            elif fits:
                fits = codec.fill(built.view, seq.hidden)
            if fits:
                return self._launch(runner, msg, built)
            self._roll_back(built)
        self.drop([s.seq_id for s in msg.seqs])
        return None

    def _launch(self, runner: StageRunner, msg: worker_pb2.StageMessage,
                built: _Built) -> Pending:
        pending = built.pending
        seqs = list(msg.seqs)
        session = pending.sessions[0]
        tokens = list(seqs[0].token_ids)
        _, sampled = pending.rows[0]
        if isinstance(sampled, Checked):  # the last stage: the proposals are known now
            session.sampler.history[-len(tokens):] = tokens
            sampled.drafts = tokens[1:]
        runner.release(list(msg.release))
        pending.msg, pending.seqs = msg, seqs
        runner.launch(pending)
        self.taken += 1
        return pending

    def drop(self, seq_ids: list[str]) -> None:
        """Roll back the checks built ahead for these sequences."""
        for seq_id in seq_ids:
            built = self.built.pop(seq_id, None)
            if built is not None:
                self._roll_back(built)

    def clear(self) -> None:
        """Forget everything without rolling back (the runner lets its caches go)."""
        self.begun.clear()
        self.built.clear()

    def _roll_back(self, built: _Built) -> None:
        self.dropped += 1
        take_back([built.caches], built.pending.sessions, built.k + 1)


def take_back(caches: list[list[Any]], sessions: list[Any], n: int) -> None:
    """Undo `n` positions a step built ahead wrote: off each of its groups' caches, each of
    its sessions' sampler history and offset."""
    for group in caches:
        for cache in group:
            cache.trim(n)
    for session in sessions:
        if session.sampler is not None:
            del session.sampler.history[-n:]
        session.offset -= n
