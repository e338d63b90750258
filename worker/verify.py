"""Checking proposed tokens on the last stage: sample every position, keep the confirmed prefix.

A step whose sequence carries `SeqInput.draft = k` runs a chunk `[t, d1 .. dk]`: the token
sampled last and k proposals (coordinator/serving/speculation.py). The last stage samples each of
the
k + 1 positions with the sequence's own sampler, exactly as k + 1 steps of one token would (same
history, same (seed, position) key), and keeps the proposals up to the first that differs from
its own sample, then its own token there. So the tokens are those of decoding without
proposals, greedy or sampled, seeded or not; proposals only decide how many come per trip.
Proposals are deterministic (prompt lookup, a greedy draft model): the target's sample equals
a proposal with the target's probability of it, the acceptance of the standard rule for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from protos import worker_pb2
from worker.constrain import Constraint
from worker.sampling import Sampler


@dataclass
class Checked:
    """The lazily sampled positions of one chunk with proposals: per position (token, logprob,
    *top), or, picked all at once (greedy), one (tokens, logprobs) pair of arrays."""

    drafts: list[int]
    samples: list[tuple[mx.array, ...]]
    together: bool = False


def sample_positions(sampler: Sampler, logits: mx.array, chunk: list[int], k: int,
                     constraint: Constraint | None = None) -> Checked:
    """Sample the last k + 1 positions of `chunk` from `logits` (shape (1, k + 1, vocab)),
    extending the sampler's history position by position; under a grammar each position has
    the mask that follows the proposals before it (a proposal the grammar refuses is rejected
    there, whatever comes after it)."""
    head = len(chunk) - k
    sampler.history.extend(chunk[:head])
    if sampler.greedy and constraint is None:
        # what k + 1 greedy steps pick (the same reductions, row by row), in a few ops, not
        # a few per position
        logprobs = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        sampler.history.extend(chunk[head:])
        return Checked(drafts=list(chunk[head:]), samples=[(tokens, chosen)], together=True)
    samples = []
    for j in range(k + 1):
        allowed = constraint.allowed(sampler.history, logits.shape[-1]) if constraint else None
        samples.append(sampler.sample(logits[:, j, :], allowed))
        if j < k:
            sampler.history.append(chunk[head + j])
    return Checked(drafts=list(chunk[head:]), samples=samples)


def _output(seq_id: str, sample: tuple[mx.array, ...]) -> worker_pb2.SeqOutput:
    token, logprob, *top = sample
    out = worker_pb2.SeqOutput(seq_id=seq_id, token=int(token.item()),
                               logprob=float(logprob.item()))
    if top:
        out.top_tokens.extend(top[0].tolist())
        out.top_logprobs.extend(top[1].tolist())
    return out


def accept(seq_id: str, checked: Checked) -> worker_pb2.SeqOutput:
    """After evaluation: the confirmed proposals (in `accepted`) and the stage's own token."""
    confirmed: list[worker_pb2.SeqOutput] = []
    if checked.together:
        tokens, logprobs = (a.tolist() for a in checked.samples[0])
        outs = [worker_pb2.SeqOutput(seq_id=seq_id, token=t, logprob=p)
                for t, p in zip(tokens, logprobs, strict=True)]
        n = next((j for j, d in enumerate(checked.drafts) if outs[j].token != d),
                 len(checked.drafts))
        outs[n].accepted.extend(outs[:n])
        return outs[n]
    for draft, sample in zip(checked.drafts, checked.samples, strict=False):
        out = _output(seq_id, sample)
        if out.token != draft:
            out.accepted.extend(confirmed)
            return out
        confirmed.append(out)
    last = _output(seq_id, checked.samples[-1])
    last.accepted.extend(confirmed)
    return last


def window(seqs: list[Any], group: list[int]) -> int:
    """Positions whose logits a group of rows needs: one, or k + 1 for a chunk with k
    proposals (such a chunk always runs alone)."""
    return max(seqs[i].draft for i in group) + 1 if len(group) == 1 else 1
