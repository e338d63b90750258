"""The stage runner: runs a shard's layers on a step of sequences, each with its own KV caches."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from protos import codec, worker_pb2
from worker import attention, cuda_rows, fused
from worker.backend import accelerator, row_floor
from worker.batch import DecodeBatch, batchable, fork_cache, trimmable
from worker.constrain import Constraint, ConstraintError, GrammarTokenizer
from worker.lookahead import Lookahead
from worker.padding import rows_for, set_up
from worker.sampling import Sampler
from worker.sent_ahead import SentAhead
from worker.shard import Shard
from worker.verify import Checked, accept, sample_positions, window

# Layers whose graph is built before the device is given it to compute (see _layers); a step
# built ahead goes layer by layer when its input comes (its launch is on the token's path).
# SHARDLINE_EVAL_EVERY / _LAUNCH_EVERY measure others (a count above the layers: all at once)
EVAL_EVERY = max(1, int(os.environ.get("SHARDLINE_EVAL_EVERY", "4")))
LAUNCH_EVERY = max(1, int(os.environ.get("SHARDLINE_LAUNCH_EVERY", "1")))


class StepError(ValueError):
    """A step this stage cannot run (unknown sequence, caches out of step, bad tensor)."""


@dataclass
class Session:
    """One sequence's state on this stage: its caches and, on the last stage, its sampler.

    While the sequence decodes in a DecodeBatch its caches live there and `caches` is None.
    """

    caches: list[Any] | None
    offset: int = 0
    sampler: Sampler | None = None
    # after a step with proposals: the first position a later step may go back to (the
    # rejected proposals' positions are trimmed then)
    floor: int | None = None
    constraint: Constraint | None = None  # the output's grammar (last stage only)

    @property
    def kv_bytes(self) -> int:
        caches = self.caches or []
        return sum(c.nbytes for c in caches if getattr(c, "keys", None) is not None)


@dataclass
class StepOutput:
    """What a step produced: the message for the next stage, or sampled tokens on the last."""

    forward: worker_pb2.StageMessage | None = None
    outputs: list[worker_pb2.SeqOutput] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    device_seconds: float = 0.0  # waiting for the values (StageRunner.finish)
    serialise_seconds: float = 0.0  # building the messages from them
    confirmed: bool = False  # a step sent ahead that its message confirmed: nothing ran


@dataclass
class Deferred:
    """A constrained row's logits, sampled once its grammar's mask is known (_resolve)."""

    logits: mx.array


@dataclass
class Pending:
    """A step whose graph is built and whose evaluation has started (StageRunner.begin)."""

    msg: worker_pb2.StageMessage
    seqs: list[worker_pb2.SeqInput]
    sessions: list[Session]
    rows: list[tuple[mx.array, Any]]
    targets: list[Any]
    groups: list[list[int]]
    inputs: list[mx.array] = field(default_factory=list)  # each sequence's input (its shape)
    marks: list[mx.array] = field(default_factory=list)  # not started: where launches break
    wired: dict[int, mx.array] = field(default_factory=dict)  # row -> its hidden, wire form
    confirmed: bool = False  # its message confirmed a step sent ahead (worker/sent_ahead.py)


class StageRunner:
    """Runs steps for one loaded shard. Call it from one thread only (MLX arrays are per-thread)."""

    def __init__(self, shard: Shard, *, batching: bool = True, lookahead: bool = True) -> None:
        self.shard = shard
        self.sessions: dict[str, Session] = {}
        self.batching = batching and batchable(shard.cache_template)
        self.batches: dict[tuple[str, ...], DecodeBatch] = {}
        # each decode step's successor is built early (worker/lookahead.py)
        self.lookahead = Lookahead(shard.is_first and shard.is_last) \
            if lookahead and Lookahead.suits(shard) else None
        self.sent = SentAhead()  # steps stage 0 sent on ahead of their messages
        self.grammar_tokenizer = GrammarTokenizer(shard.path) if shard.is_last else None
        # token ids index the embedding (first stage) and the samplers' history (last): one
        # outside the vocabulary would read outside those arrays
        self.vocab = getattr(getattr(shard.model, "args", None), "vocab_size", None)
        # few rows' quantized products; short chunks computed as row_floor rows (_padding)
        self.row_floor = set_up(shard.model, row_floor(), cuda_rows.enabled())
        fused.fuse(shard.model)  # q, k, v (gate, up) as one product where bit-exact
        attention.install(accelerator() == "cuda")  # a few positions: no plan per shape

    def close(self) -> None:
        """Let go of the shard, the caches and any guess (a new shard replaces this one); a
        step sent to a closed runner fails."""
        self.sessions.clear()
        self.batches.clear()
        self.sent.clear()
        if self.lookahead is not None:
            self.lookahead.clear()
        self.shard = None

    @property
    def kv_bytes(self) -> int:
        held = sum(s.kv_bytes for s in self.sessions.values())
        return held + sum(b.nbytes for b in self.batches.values())

    # -- sessions and their caches ------------------------------------------------------------
    def release(self, seq_ids: list[str]) -> None:
        if self.lookahead and seq_ids:
            self.lookahead.drop(seq_ids)
        for seq_id in seq_ids:
            self._unbatch(seq_id)
            self.sessions.pop(seq_id, None)

    def _unbatch(self, seq_id: str) -> None:
        """Give every sequence of the batch holding `seq_id` its own caches back."""
        for key, batch in list(self.batches.items()):
            if seq_id in key:
                del self.batches[key]
                for sid, caches in zip(key, batch.split(), strict=True):
                    if sid in self.sessions:
                        self.sessions[sid].caches = caches

    def _own_caches(self, seq_id: str) -> list[Any]:
        session = self.sessions[seq_id]
        if session.caches is None:
            self._unbatch(seq_id)
        return session.caches

    def _batch_caches(self, ids: tuple[str, ...]) -> list[Any]:
        if ids not in self.batches:
            for seq_id in ids:
                self._own_caches(seq_id)
            self.batches[ids] = DecodeBatch(ids, [self.sessions[i].caches for i in ids])
            for seq_id in ids:
                self.sessions[seq_id].caches = None
        return self.batches[ids].caches

    def caches_of(self, ids: tuple[str, ...]) -> list[Any]:
        """The caches a step of sequences `ids` (in this order) runs on."""
        return self._batch_caches(ids) if len(ids) > 1 else self._own_caches(ids[0])

    def _session(self, seq: worker_pb2.SeqInput) -> Session:
        if seq.start:
            self.release([seq.seq_id])
            sampler = Sampler.from_params(seq.sampling) if self.shard.is_last else None
            constraint = self._constraint(seq)
            if seq.fork_from:
                self.sessions[seq.seq_id] = self._fork(seq, sampler)
            else:
                self.sessions[seq.seq_id] = Session(self.shard.new_caches(), sampler=sampler)
            self.sessions[seq.seq_id].constraint = constraint
        session = self.sessions.get(seq.seq_id)
        if session is None:
            raise StepError(f"unknown sequence {seq.seq_id!r} (never started or already released)")
        rewind = session.floor is not None and session.floor <= seq.offset < session.offset
        if seq.offset != session.offset and not rewind:
            raise StepError(
                f"sequence {seq.seq_id!r} is at position {session.offset}, step says {seq.offset}"
            )
        if seq.draft and not 0 < seq.draft < len(seq.token_ids):
            raise StepError(f"sequence {seq.seq_id!r}: {seq.draft} proposals in a chunk of "
                            f"{len(seq.token_ids)} tokens")
        return session

    def _check_tokens(self, seq: worker_pb2.SeqInput) -> None:
        ids = seq.token_ids
        if ids and self.vocab and (min(ids) < 0 or max(ids) >= self.vocab):
            bad = next(t for t in ids if not 0 <= t < self.vocab)
            raise StepError(f"sequence {seq.seq_id!r}: token {bad} is outside the vocabulary "
                            f"(0..{self.vocab - 1})")

    def _constraint(self, seq: worker_pb2.SeqInput) -> Constraint | None:
        if not seq.grammar or not self.shard.is_last:
            return None
        try:
            return Constraint(self.grammar_tokenizer.get(), seq.grammar, seq.output_offset)
        except ConstraintError as e:
            raise StepError(f"sequence {seq.seq_id!r}: {e}") from None

    def _rewind(self, seq: worker_pb2.SeqInput, session: Session) -> None:
        """Drop the positions of proposals the last stage did not confirm (the step checked
        that `seq.offset` is within the last chunk with proposals)."""
        n = session.offset - seq.offset
        if n > 0:
            caches = self._own_caches(seq.seq_id)
            if not trimmable(caches):
                raise StepError(f"sequence {seq.seq_id!r}: its caches cannot go back {n} "
                                "positions (sliding window)")
            for cache in caches:
                cache.trim(n)
            if session.sampler is not None:
                del session.sampler.history[-n:]
            session.offset = seq.offset
        session.floor = seq.offset + 1 if seq.draft else None

    def settle(self, seq_id: str, at: int, offset: int) -> bool:
        """The last stage kept positions up to `offset` of the check that left `seq_id` at
        `at`: drop the rest now, as the next step would (worker/check_ahead.py). False, and
        nothing changed, when the sequence is not where that check left it."""
        session = self.sessions.get(seq_id)
        if session is None or session.floor is None or session.offset != at or \
                not session.floor <= offset <= at:
            return False
        self._rewind(worker_pb2.SeqInput(seq_id=seq_id, offset=offset, draft=1), session)
        return True

    def _fork(self, seq: worker_pb2.SeqInput, sampler: Sampler | None) -> Session:
        """A new session holding the first `fork_length` positions of a live one."""
        source = self.sessions.get(seq.fork_from)
        length = seq.fork_length
        if source is None:
            raise StepError(f"cannot fork from unknown sequence {seq.fork_from!r}")
        if self.lookahead is not None:
            # a step built ahead on the source's batch wrote a position into the batch's caches;
            # taking the source's own caches splits that batch, so roll the guess back first
            # (its rollback trims the batch's caches, which its other rows no longer use)
            self.lookahead.drop([seq.fork_from])
        if not 0 < length <= source.offset:
            raise StepError(f"cannot fork {length} positions of {seq.fork_from!r}, "
                            f"which holds {source.offset}")
        if sampler is not None:
            sampler.history.extend(source.sampler.history[:length])
        caches = self._own_caches(seq.fork_from)
        return Session([fork_cache(c, length) for c in caches], offset=length, sampler=sampler)

    # -- computing ------------------------------------------------------------------------------
    def _input(self, seq: worker_pb2.SeqInput) -> mx.array:
        if self.shard.is_first:
            if not seq.token_ids:
                raise StepError(f"sequence {seq.seq_id!r}: empty chunk")
            return self.shard.family.embed(mx.array(list(seq.token_ids), dtype=mx.int32)[None])
        if not seq.hidden.data:
            raise StepError(f"sequence {seq.seq_id!r}: no hidden state for layer "
                            f"{self.shard.start}")
        return codec.decode(seq.hidden)

    def _layers(self, h: mx.array, caches: list[Any], marks: list[mx.array] | None = None
                ) -> mx.array:
        """The slice's layers on `h`. Every EVAL_EVERY layers the graph so far goes to the
        device (`mx.async_eval`), which computes those while the host builds the rest: on a
        fast GPU building takes longer than computing (the values stay the same). With `marks`
        (a step built ahead, not started) every LAUNCH_EVERY layers is kept for `launch`."""
        masks = self.shard.family.masks(h, self.shard.start, caches)
        layers = self.shard.layers
        every = EVAL_EVERY if marks is None else LAUNCH_EVERY
        for n, (layer, mask, cache) in enumerate(zip(layers, masks, caches, strict=True), 1):
            h = layer(h, mask, cache)
            if n % every == 0 and n < len(layers):
                marks.append(h) if marks is not None else mx.async_eval(h)
        return h

    @staticmethod
    def launch(pending: Pending) -> None:
        """Start a step built ahead: its first layers go to the device first, so the device
        computes them while the rest is launched."""
        for mark in pending.marks:
            mx.async_eval(mark)
        mx.async_eval(pending.targets)
        pending.marks = []

    def _groups(self, seqs: list[worker_pb2.SeqInput]) -> list[list[int]]:
        """Rows computed together: all one-token decode rows in one batch, the rest alone."""
        decode = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1 and not s.start]
        if not self.batching or len(decode) < 2:
            return [[i] for i in range(len(seqs))]
        rest = [[i] for i in range(len(seqs)) if i not in set(decode)]
        return [decode, *rest]

    def run(self, msg: worker_pb2.StageMessage) -> StepOutput:
        """Run one step to the end: `finish(begin(msg))`, then `prepare` its successor."""
        pending = self.begin(msg)
        out = self.finish(pending)
        self.prepare(pending)
        return out

    def prepare(self, pending: Pending) -> None:
        """With nothing else to do: build the decode step that may follow `pending` (a stage
        holding a slice of the model; worker/lookahead.py)."""
        if self.lookahead is not None and self.shard is not None:
            self.lookahead.prepare(self, pending)

    def start_early(self, result: worker_pb2.StageResult, send: bool = False
                    ) -> Pending | None:
        """Stage 0: start the step built ahead on the tokens the last stage just sampled
        (worker/lookahead.py); with `send`, the step if it is to be sent on at once."""
        if self.lookahead is None or self.shard is None:
            return None
        return self.lookahead.start_early(self, result, send)

    def awaits_verdict(self, result: worker_pb2.StageResult) -> bool:
        """Whether the last stage's `result` can start or settle something here (any thread:
        it only reads): stage 0 starts its next decode step on the tokens, and a stage whose
        last step of a sequence checked proposals settles it (`start_early`)."""
        ahead = self.lookahead
        if ahead is None or self.shard is None:
            return False
        begun = ahead.checks.begun
        return (self.shard.is_first and not ahead.whole) or any(
            out.seq_id in begun for out in result.outputs)

    def begin(self, msg: worker_pb2.StageMessage) -> Pending:
        """Check the step, build its graph and start evaluating it (`mx.async_eval`); the host
        is free again while the device computes. A step the lookahead already began (this
        stage holds the whole model) is taken as it is."""
        if self.shard is None:
            raise StepError("this stage's shard was replaced (another plan was loaded)")
        for seq in msg.seqs:  # before a guess takes them as its inputs too
            self._check_tokens(seq)
        self.sent.before(self, msg)  # steps sent ahead that `msg` drops (worker/sent_ahead.py)
        try:
            pending = self.lookahead.take(self, msg) if self.lookahead else None
            if pending is None:
                self.release(list(msg.release))
                seqs = list(msg.seqs)
                if len({s.seq_id for s in seqs}) != len(seqs):
                    raise StepError("a step names the same sequence twice")
                # Check every sequence before touching any cache: a bad step changes nothing.
                sessions = [self._session(seq) for seq in seqs]
                inputs = [self._input(seq) for seq in seqs]
                for seq, session in zip(seqs, sessions, strict=True):
                    self._rewind(seq, session)
                pending = self.build(msg, seqs, sessions, inputs)
        finally:
            self.sent.dropped(self, msg)
        self.sent.after(self, msg, pending)
        if self.lookahead:
            self.lookahead.propose(self, pending)
        return pending

    def build(self, msg: worker_pb2.StageMessage, seqs: list[worker_pb2.SeqInput],
              sessions: list[Session], inputs: list[mx.array],
              history: list[list[int]] | None = None, start: bool = True) -> Pending:
        """The lazy graph of one step over checked sessions, its evaluation started (not
        with `start` false: the lookahead's placeholders are not filled yet).

        `history` overrides the token ids the samplers record (the lookahead passes
        placeholders for tokens not sampled yet)."""
        rows: list[tuple[mx.array, Any]] = [None] * len(seqs)  # (hidden, sampled) per sequence
        targets: list[Any] = []
        groups = self._groups(seqs)
        marks: list[mx.array] | None = None if start else []
        wired: dict[int, mx.array] = {}
        for group in groups:
            ids = tuple(seqs[i].seq_id for i in group)
            caches = self.caches_of(ids)
            h = inputs[group[0]] if len(group) == 1 else mx.concatenate(
                [inputs[i] for i in group], axis=0)
            pad = self._padding(h, caches)
            if pad:
                h = mx.concatenate([h, mx.repeat(h[:, -1:, :], pad, axis=1)], axis=1)
            h = self._layers(h, caches, marks)
            if pad:  # the padded positions leave the caches; their rows stay for the head
                for cache in caches:
                    cache.trim(pad)
            logits = None
            width = window(seqs, group)
            if self.shard.is_last and any(seqs[i].sample for i in group):
                end = h.shape[1] - pad  # a check's logits take the padded rows too
                tail = h[:, end - 1 : end, :] if width == 1 else h[:, end - width :, :]
                logits = self.shard.family.head(tail)[:, :width, :]
                logits = logits[:, -1, :] if width == 1 else logits
            if pad:
                h = h[:, :-pad, :]
            for row, i in enumerate(group):
                sampled = None
                if self.shard.is_last and seqs[i].sample and seqs[i].draft:
                    sampled = self._checked(seqs[i], sessions[i], logits)
                elif self.shard.is_last:
                    ids_in = history[i] if history is not None else seqs[i].token_ids
                    sessions[i].sampler.history.extend(ids_in)
                    if seqs[i].sample and sessions[i].constraint is not None:
                        sampled = Deferred(logits[row : row + 1])
                    elif seqs[i].sample:
                        sampled = sessions[i].sampler.sample(logits[row : row + 1])
                rows[i] = (h if len(group) == 1 else h[row : row + 1], sampled)
                # positions count when a step is begun: the next may be begun before this
                # one has finished (worker/mlx_thread.py)
                sessions[i].offset += len(seqs[i].token_ids)
                if not self.shard.is_last:
                    wired[i] = codec.wire(rows[i][0])  # its bytes, computed with the step
                targets.append(sampled.samples if isinstance(sampled, Checked)
                               else sampled.logits if isinstance(sampled, Deferred)
                               else sampled if sampled is not None
                               else wired.get(i, rows[i][0]))
            if self.shard.is_last and logits is None:
                # A prompt chunk on the last stage only fills caches: like mlx-lm, evaluate
                # those and skip the last layer's attention output and MLP.
                del targets[-len(group) :]
                targets += [c.state for c in caches]
        if start:
            mx.async_eval(targets)
        pending = Pending(msg, seqs, sessions, rows, targets, groups, inputs, marks or [],
                          wired)
        if history is None:  # a guess's tokens are not known yet: Lookahead.take resolves it
            self.resolve(pending)
        return pending

    def _padding(self, h: mx.array, caches: list[Any]) -> int:
        """Positions to add after a chunk of one sequence so the device computes `row_floor`
        rows, where fewer cost more (worker/padding.py `rows_for`); the rows before them do
        not see them (causal attention) and their cache positions are trimmed after the
        layers. 0 where the chunk's own rows cost less, or the caches cannot drop them."""
        pad = rows_for(h.shape[1], self.row_floor) - h.shape[1]
        return pad if pad and h.shape[0] == 1 and trimmable(caches) else 0

    def _checked(self, seq: worker_pb2.SeqInput, session: Session, logits: mx.array) -> Checked:
        try:
            return sample_positions(session.sampler, logits, list(seq.token_ids), seq.draft,
                                    session.constraint)
        except ConstraintError as e:
            raise StepError(f"sequence {seq.seq_id!r}: {e}") from None

    def resolve(self, pending: Pending) -> None:
        """Sample the constrained rows of a begun step. Their masks are computed here, on the
        host, while the device computes the layers the step has been given already."""
        new = []
        for i, (h, sampled) in enumerate(pending.rows):
            if isinstance(sampled, Deferred):
                session = pending.sessions[i]
                try:
                    allowed = session.constraint.allowed(session.sampler.history,
                                                         sampled.logits.shape[-1])
                except ConstraintError as e:
                    raise StepError(f"sequence {pending.seqs[i].seq_id!r}: {e}") from None
                pending.rows[i] = (h, session.sampler.sample(sampled.logits, allowed))
                new.append(pending.rows[i][1])
        if new:
            pending.targets.extend(new)
            mx.async_eval(new)

    def finish(self, pending: Pending) -> StepOutput:
        """Wait for a begun step's values and build its output (the one sync of the step)."""
        self.resolve(pending)
        t0 = time.perf_counter()
        mx.eval(pending.targets)
        t1 = time.perf_counter()
        out = self._output(pending.msg, pending.seqs, pending.rows, pending.wired)
        if pending.confirmed:  # only what it frees and drops goes on
            out.confirmed = True
            out.forward = out.forward if out.forward.release or out.forward.dropped else None
        out.device_seconds, out.serialise_seconds = t1 - t0, time.perf_counter() - t1
        return out

    def _output(self, msg: worker_pb2.StageMessage, seqs: list[worker_pb2.SeqInput],
                rows: list[tuple[mx.array, Any]], wired: dict[int, mx.array]) -> StepOutput:
        out = StepOutput()
        if not self.shard.is_last:
            out.forward = worker_pb2.StageMessage(step_id=msg.step_id, release=msg.release,
                                                  ahead=msg.ahead, dropped=msg.dropped)
        for i, (seq, (h, sampled)) in enumerate(zip(seqs, rows, strict=True)):
            n = len(seq.token_ids)
            if n == 1:
                out.decode_tokens += 1
            else:
                out.prefill_tokens += n
            if out.forward is not None:
                # the incoming hidden state was read when the step began: do not copy it
                seq.ClearField("hidden")
                fwd = out.forward.seqs.add()
                fwd.CopyFrom(seq)
                codec.encode_into(fwd.hidden, h, wired.get(i))
            elif isinstance(sampled, Checked):
                out.outputs.append(accept(seq.seq_id, sampled))
            elif sampled is not None:
                token, logprob, *top = sampled
                out.outputs.append(
                    worker_pb2.SeqOutput(
                        seq_id=seq.seq_id, token=token.item(), logprob=logprob.item()
                    )
                )
                if top:  # SamplingParams.logprobs > 0: the alternatives, best first
                    out.outputs[-1].top_tokens.extend(top[0].tolist())
                    out.outputs[-1].top_logprobs.extend(top[1].tolist())
        return out
