"""Steps sent ahead: stage 0 sends a decode step on before the coordinator's message for it.

Stage 0 begins a decode step the moment the last stage's tokens come (worker/loop.py). When
the coordinator has named that step already (the step before carries its id,
`StageMessage.next_step_id`; coordinator/serving/ahead.py reserves it), stage 0 sends its
output on to stage 1 at once, marked `ahead`, instead of holding it until the coordinator's
message comes: the coordinator's turn leaves the token's path. That message, when it comes,
confirms the step (nothing more goes on: worker/lookahead.py `Lookahead.take`) or it does not
(a stream ended, a sequence joined or left the group, a sequence was forked): stage 0 then
undoes the step and names it in the next message it sends on (`StageMessage.dropped`), and
every later stage undoes it too before it runs that message. So each stage keeps, for every
step that came marked `ahead`, the caches and sessions it advanced, until a later message
touches its sequences without dropping it (stage 0 sends the next step of a group only once
the one before is confirmed). What comes out is the same bits either way. Stage 0 sends ahead
only on a direct link to stage 1 (worker/link.py); on gRPC its message still sends each step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protos import worker_pb2
from worker.check_ahead import take_back

if TYPE_CHECKING:
    from worker.stage import Pending, StageRunner

# SHARDLINE_SEND_AHEAD=1 turns it on; by default stage 0 holds each step for its message: on
# a GPU shared by four workers sending ahead was slower (bench/RESULTS-gpu.md, "Sending ahead
# and spreading on an H100")
ENABLED = os.environ.get("SHARDLINE_SEND_AHEAD", "").strip() == "1"


@dataclass
class _Record:
    seq_ids: frozenset[str]
    caches: list[list[Any]]  # per group of the step, the caches it advanced one position
    sessions: list[Any]


class SentAhead:
    """One stage's records of the steps that came ahead of the coordinator's message (call
    from its MLX thread only)."""

    def __init__(self) -> None:
        self.records: dict[int, _Record] = {}
        self.undone = 0  # steps sent ahead that this stage took back
        self.reported = 0  # of them, counted in the metrics (WorkerMetrics.guesses)

    def before(self, runner: StageRunner, msg: worker_pb2.StageMessage) -> None:
        """Before `msg` runs: undo the steps it drops (the latest first), then forget the
        records of steps whose sequences it touches (confirmed: nothing drops them later)."""
        if not self.records:
            return
        for step_id in sorted(msg.dropped, reverse=True):
            record = self.records.pop(step_id, None)
            if record is None:  # it did not run here (an earlier stage failed it)
                continue
            if runner.lookahead is not None:  # the steps built after it go first
                runner.lookahead.drop(sorted(record.seq_ids))
            take_back(record.caches, record.sessions, 1)
            self.undone += 1
        touched = {s.seq_id for s in msg.seqs} | {s.fork_from for s in msg.seqs} | \
            set(msg.release)
        for step_id in [i for i, r in self.records.items() if r.seq_ids & touched]:
            del self.records[step_id]

    def after(self, runner: StageRunner, msg: worker_pb2.StageMessage,
              pending: Pending) -> None:
        """`msg` has begun as `pending`: keep what undoes it if it came ahead."""
        if msg.ahead and pending.seqs:
            caches = [runner.caches_of(tuple(pending.seqs[i].seq_id for i in group))
                      for group in pending.groups]
            self.records[msg.step_id] = _Record(
                frozenset(s.seq_id for s in pending.seqs), caches, list(pending.sessions))

    @staticmethod
    def dropped(runner: StageRunner, msg: worker_pb2.StageMessage) -> None:
        """Stage 0, as `msg` begins: the steps it sent ahead and has just undone go on with
        `msg` (every later stage undoes them before running it)."""
        ahead = runner.lookahead
        if ahead is not None and ahead.withdrawn:
            msg.dropped.extend(ahead.withdrawn)
            ahead.withdrawn.clear()

    def clear(self) -> None:
        """Forget every record (the runner lets its caches go)."""
        self.records.clear()
