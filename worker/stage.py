"""The stage runner: runs a shard's layers on a step of sequences, each with its own KV caches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from protos import codec, worker_pb2
from worker.sampling import Sampler
from worker.shard import Shard


def fork_cache(cache: Any, length: int) -> KVCache:
    """A copy of a plain KV cache's first `length` positions (the source is left as it is)."""
    if type(cache) is not KVCache:
        raise StepError(f"{type(cache).__name__} caches cannot be forked")
    out = KVCache()
    out.keys = cache.keys[..., :length, :]
    out.values = cache.values[..., :length, :]
    out.offset = length
    return out


class StepError(ValueError):
    """A step this stage cannot run (unknown sequence, caches out of step, bad tensor)."""


@dataclass
class Session:
    """One sequence's state on this stage: its caches and, on the last stage, its sampler."""

    caches: list[Any]
    offset: int = 0
    sampler: Sampler | None = None

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches if getattr(c, "keys", None) is not None)


@dataclass
class StepOutput:
    """What a step produced: the message for the next stage, or sampled tokens on the last."""

    forward: worker_pb2.StageMessage | None = None
    outputs: list[worker_pb2.SeqOutput] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0


class StageRunner:
    """Runs steps for one loaded shard. Call it from one thread only (MLX arrays are per-thread)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.sessions: dict[str, Session] = {}

    @property
    def kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.sessions.values())

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.sessions.pop(seq_id, None)

    def _session(self, seq: worker_pb2.SeqInput) -> Session:
        if seq.start:
            sampler = Sampler.from_params(seq.sampling) if self.shard.is_last else None
            if seq.fork_from:
                self.sessions[seq.seq_id] = self._fork(seq, sampler)
            else:
                self.sessions[seq.seq_id] = Session(self.shard.new_caches(), sampler=sampler)
        session = self.sessions.get(seq.seq_id)
        if session is None:
            raise StepError(f"unknown sequence {seq.seq_id!r} (never started or already released)")
        if seq.offset != session.offset:
            raise StepError(
                f"sequence {seq.seq_id!r} is at position {session.offset}, step says {seq.offset}"
            )
        return session

    def _fork(self, seq: worker_pb2.SeqInput, sampler: Sampler | None) -> Session:
        """A new session holding the first `fork_length` positions of a live one."""
        source = self.sessions.get(seq.fork_from)
        length = seq.fork_length
        if source is None:
            raise StepError(f"cannot fork from unknown sequence {seq.fork_from!r}")
        if not 0 < length <= source.offset:
            raise StepError(f"cannot fork {length} positions of {seq.fork_from!r}, "
                            f"which holds {source.offset}")
        if sampler is not None:
            sampler.history.extend(source.sampler.history[:length])
        return Session([fork_cache(c, length) for c in source.caches], offset=length,
                       sampler=sampler)

    def _input(self, seq: worker_pb2.SeqInput) -> mx.array:
        if self.shard.is_first:
            if not seq.token_ids:
                raise StepError(f"sequence {seq.seq_id!r}: empty chunk")
            return self.shard.family.embed(mx.array(list(seq.token_ids), dtype=mx.int32)[None])
        if not seq.hidden.data:
            raise StepError(f"sequence {seq.seq_id!r}: no hidden state for layer "
                            f"{self.shard.start}")
        return codec.decode(seq.hidden)

    def _layers(self, h: mx.array, session: Session) -> mx.array:
        family = self.shard.family
        masks = family.masks(h, self.shard.start, session.caches)
        for layer, mask, cache in zip(self.shard.layers, masks, session.caches, strict=True):
            h = layer(h, mask, cache)
        return h

    def run(self, msg: worker_pb2.StageMessage) -> StepOutput:
        """Run one step; every sequence's result is evaluated in a single `mx.eval`."""
        self.release(list(msg.release))
        out = StepOutput()
        # Check every sequence before touching any cache, so a bad step changes nothing.
        inputs = [(seq, self._session(seq), self._input(seq)) for seq in msg.seqs]
        lazy: list[tuple[worker_pb2.SeqInput, Session, mx.array, Any]] = []
        for seq, session, h in inputs:
            h = self._layers(h, session)
            sampled = None
            if self.shard.is_last and seq.sample:
                session.sampler.history.extend(seq.token_ids)
                logits = self.shard.family.head(h[:, -1:, :])[:, -1, :]
                sampled = session.sampler.sample(logits)
            elif self.shard.is_last:
                session.sampler.history.extend(seq.token_ids)
            lazy.append((seq, session, h, sampled))
        mx.eval([sampled if sampled is not None else h for _, _, h, sampled in lazy])
        if not self.shard.is_last:
            out.forward = worker_pb2.StageMessage(step_id=msg.step_id, release=msg.release)
        for seq, session, h, sampled in lazy:
            n = len(seq.token_ids)
            session.offset += n
            if n == 1:
                out.decode_tokens += 1
            else:
                out.prefill_tokens += n
            if out.forward is not None:
                out.forward.seqs.append(
                    worker_pb2.SeqInput(
                        seq_id=seq.seq_id,
                        token_ids=seq.token_ids,
                        hidden=codec.encode(h),
                        start=seq.start,
                        sample=seq.sample,
                        sampling=seq.sampling,
                        offset=seq.offset,
                        fork_from=seq.fork_from,
                        fork_length=seq.fork_length,
                    )
                )
            elif sampled is not None:
                token, logprob = sampled
                out.outputs.append(
                    worker_pb2.SeqOutput(
                        seq_id=seq.seq_id, token=token.item(), logprob=logprob.item()
                    )
                )
        return out
