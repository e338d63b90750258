"""Step ids named ahead: each decode step tells stage 0 the id of the step that will follow it.

Stage 0 begins a decode step on the tokens the last stage sends it, before the coordinator's
message for that step comes, and sends it on at once when it knows the id the coordinator will
give it (worker/sent_ahead.py). So every decode step's message names the id reserved for the
next one of the same group (`StageMessage.next_step_id`): the same sequences in the same
order, each one position on, on the token the last stage sampled, nothing released. When the
coordinator sends exactly that step, it takes the reserved id and its result may have come
already; any other step touching those sequences (a stream ended, the group changed, a fork, a
release) gives the reservation up, and stage 0 undoes the step if it sent it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from protos import worker_pb2


@dataclass
class _Reserved:
    step_id: int  # reserved for the step after `after`
    after: int  # the id of the step it follows
    seqs: list[worker_pb2.SeqInput]  # that step's sequences
    tokens: dict[str, int] | None = None  # the last stage's tokens of it, once known


def _decoding(seqs: list[worker_pb2.SeqInput]) -> bool:
    """One token of each sequence, each sampled: a step whose successor can be predicted."""
    return bool(seqs) and all(len(s.token_ids) == 1 and s.sample and not s.start
                              and not s.fork_from and not s.draft for s in seqs)


class Reservations:
    """The ids reserved on one pipeline, and the results that came for them before their
    steps were sent (call on the event loop only)."""

    def __init__(self) -> None:
        self._by_group: dict[tuple[str, ...], _Reserved] = {}
        self._group_after: dict[int, tuple[str, ...]] = {}  # a sent step -> group after it
        self._reserved: set[int] = set()
        self._early: dict[int, worker_pb2.StageResult] = {}  # results of ids not sent yet
        self.used = 0  # steps sent with a reserved id
        self.early = 0  # of them, their result came first

    def assign(self, seqs: list[worker_pb2.SeqInput], release: list[str],
               ids: itertools.count) -> tuple[int, int, worker_pb2.StageResult | None]:
        """A step about to be sent: its id, the id reserved for its successor (0: none) and
        its result if it came already."""
        group = tuple(s.seq_id for s in seqs)
        reserved = self._by_group.get(group)
        step_id, early = 0, None
        if reserved is not None and not release and self._follows(seqs, reserved):
            step_id = reserved.step_id
            early = self._early.pop(step_id, None)
            self.used += 1
            self.early += early is not None
        self.give_up(itertools.chain(group, (s.fork_from for s in seqs if s.fork_from),
                                     release))
        step_id = step_id or next(ids)
        if not _decoding(seqs) or release:
            return step_id, 0, early
        follow = _Reserved(next(ids), step_id, seqs)
        self._by_group[group] = follow
        self._reserved.add(follow.step_id)
        if early is not None:
            follow.tokens = _tokens(early)
        else:
            self._group_after[step_id] = group
        return step_id, follow.step_id, early

    @staticmethod
    def _follows(seqs: list[worker_pb2.SeqInput], reserved: _Reserved) -> bool:
        tokens = reserved.tokens
        return tokens is not None and len(seqs) == len(reserved.seqs) and all(
            list(s.token_ids) == [tokens.get(s.seq_id, -1)] and s.offset == p.offset + 1
            and s.sample == p.sample and not s.start and not s.fork_from and not s.draft
            for s, p in zip(seqs, reserved.seqs, strict=True))

    def arrived(self, result: worker_pb2.StageResult, claimed: bool) -> None:
        """A result of the last stage (`claimed`: a step sent was waiting for it)."""
        group = self._group_after.pop(result.step_id, None)
        if group is not None:
            reserved = self._by_group.get(group)
            if reserved is not None and reserved.after == result.step_id:
                reserved.tokens = _tokens(result)
        if not claimed and result.step_id in self._reserved:
            self._early[result.step_id] = result

    def give_up(self, seq_ids: Iterable[str]) -> None:
        """Drop the reservations of every group holding one of `seq_ids`."""
        wanted = set(seq_ids)
        if not wanted or not self._by_group:
            return
        for group in [g for g in self._by_group if wanted.intersection(g)]:
            reserved = self._by_group.pop(group)
            self._reserved.discard(reserved.step_id)
            self._early.pop(reserved.step_id, None)
            self._group_after.pop(reserved.after, None)

    def clear(self) -> None:
        """Forget everything (the pipeline broke)."""
        self._by_group.clear()
        self._group_after.clear()
        self._reserved.clear()
        self._early.clear()


def _tokens(result: worker_pb2.StageResult) -> dict[str, int] | None:
    if result.error:
        return None
    return {o.seq_id: o.token for o in result.outputs if not o.accepted}
