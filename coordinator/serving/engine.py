"""Generation: tokenize, prefill and decode through the pipeline, detokenize, stop."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from coordinator.api.structured import GrammarError, grammar_of
from coordinator.serving.batcher import Microbatcher
from coordinator.serving.metrics import CoordinatorMetrics
from coordinator.serving.pipeline import Pipeline, PipelineError
from coordinator.serving.prefix_cache import PrefixCache
from coordinator.serving.scheduler import QueueFull, Scheduler
from coordinator.serving.speculation import SpecRequest, Speculator
from coordinator.serving.stops import StopMatcher
from protos import inference_pb2, worker_pb2

FINISH_STOP = inference_pb2.FINISH_REASON_STOP
FINISH_LENGTH = inference_pb2.FINISH_REASON_LENGTH
FINISH_CANCELLED = inference_pb2.FINISH_REASON_CANCELLED

T = TypeVar("T")

DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_MAX_WAITING = 64
DEFAULT_RECOVER_TIMEOUT = 120.0  # seconds a request waits for a re-plan after a worker is lost
MAX_RESUMES = 3  # re-plans one request may ride through before it gives up


class RequestError(Exception):
    """A request the engine refuses; `code` is the gRPC status name (SPEC: Errors)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request field at fault, as the client named it (or None)


@dataclass
class Chunk:
    """A piece of a streamed response: new text and tokens; the last one has finish and usage."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # Per token: (token id, logprob) of the most likely tokens, when SamplingParams.logprobs > 0.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: int = 0
    usage: inference_pb2.Usage | None = None


class Engine:
    """Runs requests through a pipeline; many may run at once, each with its own sequence id."""

    def __init__(self, tokenizer: Any, pipeline_source: Any, *, vocab_size: int,
                 context: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_running: int = 4, max_waiting: int = DEFAULT_MAX_WAITING,
                 prefix_cache_tokens: int = 0, metrics: CoordinatorMetrics | None = None,
                 recover_timeout: float = DEFAULT_RECOVER_TIMEOUT,
                 speculator: Speculator | None = None) -> None:
        self.tokenizer = tokenizer
        self.speculator = speculator  # proposals checked by the pipeline (speculation.py)
        self.metrics = metrics or CoordinatorMetrics()
        self._source = pipeline_source  # anything with a `.pipeline` attribute (the Cluster)
        self.vocab_size = vocab_size
        self.context = context
        self.prefill_chunk = prefill_chunk
        self._ids = itertools.count()
        self.scheduler = Scheduler(max_running, max_waiting)
        self.prefix = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.prefilled_tokens = 0
        self.recover_timeout = recover_timeout  # 0: a lost worker fails its requests at once
        self.resumed = 0  # requests that continued on a re-planned pipeline
        self.draining = False  # shutting down: new requests are refused, running ones finish
        stages = len(getattr(getattr(pipeline_source, "plan", None), "stages", ()))
        # decode groups and prompt chunks share one cap of `stages` steps in flight
        self.batcher = Microbatcher(pipeline_source, stages, prefill_tokens=prefill_chunk)
        # Tokenizing and chat templates run here, off the event loop, so one huge prompt does
        # not stall every stream; one thread, as a fast tokenizer is not safe to share.
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="shardline-tokenize")

    @property
    def pipeline(self) -> Pipeline:
        pipeline = self._source.pipeline
        if pipeline is None or pipeline.broken:
            reason = pipeline.broken if pipeline else "shards are not loaded"
            raise RequestError("UNAVAILABLE", f"the cluster cannot serve now: {reason}")
        return pipeline

    # -- prompts ----------------------------------------------------------------------------
    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the tokenizer's thread (tokenizing, chat templates); its errors
        are raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def encode_prompt(self, prompt: str, param: str = "prompt") -> list[int]:
        """Token ids of a plain-text prompt; `param` names its field in errors."""
        if not prompt:
            raise RequestError("INVALID_ARGUMENT", f"{param} is empty", param)
        bos = self.tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        return list(self.tokenizer.encode(prompt, add_special_tokens=add_special))

    def check(self, ids: Sequence[int], max_tokens: int | None, *,
              param: str = "prompt_token_ids", max_tokens_param: str = "max_tokens") -> None:
        """Refuse prompts that are empty, out of vocabulary or do not fit the context.

        `param` names the prompt's field as the client sent it (`prompt`, `messages`,
        `prompt_token_ids`) and `max_tokens_param` the field of `max_tokens`; `max_tokens`
        None means the client left it unset (the default, cut to what the context leaves).
        """
        if not ids:
            raise RequestError("INVALID_ARGUMENT", f"{param} is empty", param)
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError("INVALID_ARGUMENT",
                               f"{param}[{bad}] is {ids[bad]}, outside the vocabulary "
                               f"(0..{self.vocab_size - 1})", param)
        if max_tokens is None:
            if len(ids) >= self.context:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"{param} is {len(ids)} tokens, which leaves no room to generate in the "
                    f"context of {self.context} tokens ({max_tokens_param} was not set; its "
                    f"default, {DEFAULT_MAX_TOKENS}, is cut to what the context leaves)", param)
            return
        if max_tokens < 1:
            raise RequestError("INVALID_ARGUMENT",
                               f"{max_tokens_param} must be >= 1, got {max_tokens}",
                               max_tokens_param)
        if len(ids) + max_tokens > self.context:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"{param} is {len(ids)} tokens; with {max_tokens_param} {max_tokens} that "
                f"exceeds the context of {self.context} tokens", param)

    # -- generation -------------------------------------------------------------------------
    def _chunks(self, seq_id: str, ids: list[int], sampling: inference_pb2.SamplingParams,
                fork: tuple[str, int] | None = None) -> list[worker_pb2.SeqInput]:
        """The prompt as steps: all but the last token in chunks, then the last token sampled.

        This mirrors mlx-lm's generate_step, which prefills prompt[:-1] and then runs the last
        token alone, so logits match it bit for bit. With `fork`, the first positions come from
        a cached sequence and only the rest is prefilled.
        """
        out = []
        pos = fork[1] if fork else 0
        body = ids[pos:-1]
        for i in range(0, len(body), self.prefill_chunk):
            piece = body[i : i + self.prefill_chunk]
            out.append(worker_pb2.SeqInput(seq_id=seq_id, token_ids=piece, offset=pos))
            pos += len(piece)
        out.append(worker_pb2.SeqInput(seq_id=seq_id, token_ids=ids[-1:], offset=pos,
                                       sample=True))
        out[0].start = True
        out[0].sampling.CopyFrom(sampling)
        if fork:
            out[0].fork_from, out[0].fork_length = fork
        return out

    async def _prefill(self, chunks: list[worker_pb2.SeqInput],
                       pipeline: Pipeline | None = None) -> worker_pb2.SeqOutput:
        """Run the prompt's chunks through the microbatcher, which keeps up to one step per
        stage in flight, shared with the decode groups (so a lone prompt's chunks fill every
        stage and running streams keep decoding). Returns the last chunk's sampled token; a
        failure is PipelineError, and cancelling drops the chunks not sent yet."""
        futures = self.batcher.prefill(chunks, pipeline)
        try:
            for future in futures:
                out = await future
            return out
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: a failure after the first is not logged

    async def _start(self, seq_id: str, ids: list[int], sampling: inference_pb2.SamplingParams,
                     pipeline: Pipeline | None = None, grammar: str = "",
                     output_offset: int = 0) -> worker_pb2.SeqOutput:
        """Prefill `ids` as a new sequence (from the prefix cache where it can) and join the
        decode microbatches; returns the first sampled token. Under a `grammar` the output
        begins at `output_offset` (tokens of `ids` from there on were produced already)."""
        fork = self.prefix.lookup(ids) if self.prefix else None
        self.prefilled_tokens += len(ids) - (fork[1] if fork else 0)
        chunks = self._chunks(seq_id, ids, sampling, fork)
        chunks[0].grammar, chunks[0].output_offset = grammar, output_offset
        out = await self._prefill(chunks, pipeline)
        self.batcher.join(seq_id)
        return out

    async def generate(self, ids: list[int], sampling: inference_pb2.SamplingParams
                       ) -> AsyncIterator[Chunk]:
        """Stream the completion of `ids` once a running slot is free (recorded in metrics)."""
        async for chunk in self.metrics.observe(self._admit(ids, sampling), len(ids)):
            yield chunk

    async def _admit(self, ids: list[int], sampling: inference_pb2.SamplingParams
                     ) -> AsyncIterator[Chunk]:
        if self.draining:
            raise RequestError("UNAVAILABLE", "the coordinator is shutting down")
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        self.check(ids, max_tokens)
        try:
            grammar_of(sampling)  # compiled once (cached) and checked before any work
        except GrammarError as e:
            raise RequestError("INVALID_ARGUMENT", f"{e.field} {e}", e.field) from None
        try:
            async with self.scheduler.slot():
                async for chunk in self._run(ids, sampling, max_tokens):
                    yield chunk
        except QueueFull as e:
            raise RequestError("RESOURCE_EXHAUSTED", str(e)) from None

    async def drain(self, grace: float) -> int:
        """Refuse new requests and wait up to `grace` seconds for the running and queued ones
        to finish; returns how many are still unfinished then."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.scheduler.running + self.scheduler.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.scheduler.running + self.scheduler.waiting

    def _seq_id(self) -> str:
        return f"{uuid.uuid4().hex[:8]}-{next(self._ids)}"

    async def _wait_serving(self) -> Pipeline | None:
        """The source's serving pipeline, waiting out a recovery under way (none: None)."""
        wait = getattr(self._source, "wait_serving", None)
        if wait is None or self.recover_timeout <= 0:
            return None
        return await wait(self.recover_timeout)

    async def _serving(self) -> Pipeline:
        """The pipeline, waiting out a recovery under way; UNAVAILABLE if there is none."""
        pipeline = self._source.pipeline
        if pipeline is not None and not pipeline.broken:
            return pipeline
        return await self._wait_serving() or self.pipeline  # .pipeline raises UNAVAILABLE

    async def _resume(self, error: PipelineError, pipeline: Pipeline, resumes: int) -> Pipeline:
        """After a step failed: the new pipeline once the cluster has re-planned, or
        UNAVAILABLE. Only a broken pipeline is waited for (a stage's error is final)."""
        if not pipeline.broken or resumes >= MAX_RESUMES or self.recover_timeout <= 0:
            raise RequestError("UNAVAILABLE", str(error)) from None
        fresh = await self._wait_serving()
        if fresh is None or fresh is pipeline:
            now = self._source.pipeline
            why = now.broken if now is not None and now.broken else str(error)
            raise RequestError("UNAVAILABLE", f"the cluster cannot serve now: {why}") from None
        self.resumed += 1
        return fresh

    def _speculating(self, seq_id: str, prompt: list[int]) -> SpecRequest | None:
        """Proposals for this request, where the cluster can go back over rejected ones."""
        if self.speculator is None or not getattr(self._source, "forkable", False):
            return None
        spec = self.speculator.request(seq_id)
        spec.start(prompt, self.scheduler.running)
        return spec

    async def _run(self, ids: list[int], sampling: inference_pb2.SamplingParams,
                   max_tokens: int) -> AsyncIterator[Chunk]:
        pipeline = await self._serving()
        pipeline.users += 1  # it serves this request to the end (a replaced one drains)
        seq_id = self._seq_id()
        eos = set(self.tokenizer.eos_token_ids or ())
        detok = self.tokenizer.detokenizer
        detok.reset()
        stops = StopMatcher(list(sampling.stop))
        spec = self._speculating(seq_id, ids)
        grammar = grammar_of(sampling)
        t0 = time.perf_counter()
        t_first = None
        n = 0
        finish = FINISH_LENGTH
        hit = done = False
        sampled: list[int] = []
        step: asyncio.Future | None = None  # the next decode step, sent before the yield
        out: worker_pb2.SeqOutput | None = None  # the step result not yet streamed
        drafts: list[int] = []  # proposals in the step awaited
        resumes = 0
        try:
            while not done:
                try:
                    if out is None:
                        # The prompt; after a failure, the prompt and every token streamed so
                        # far, on the re-planned pipeline: the client sees a pause, then the
                        # same continuation (sampling keys depend on (seed, position) only).
                        out = await self._start(seq_id, ids + sampled, sampling, pipeline,
                                                grammar, len(ids))
                    while not done:
                        # a step with proposals gives the confirmed ones, then its own token
                        chunks = []
                        for got in [*out.accepted, out]:
                            n += 1
                            if t_first is None:
                                t_first = time.perf_counter()
                            token = got.token
                            sampled.append(token)
                            if token in eos:
                                finish, done = FINISH_STOP, True
                                break
                            detok.add_token(token)
                            text, hit = stops.feed(detok.last_segment)
                            top = ([list(zip(got.top_tokens, got.top_logprobs, strict=True))]
                                   if got.top_tokens else [[]])
                            chunks.append(Chunk(text=text, token_ids=[token],
                                                logprobs=[got.logprob], top_logprobs=top))
                            if hit:
                                finish, done = FINISH_STOP, True
                                break
                            if n >= max_tokens:
                                done = True
                                break
                        if not done:
                            # The next step depends only on the last token: send it now, so
                            # the stages compute while this step's chunks travel to the client.
                            t_step = time.perf_counter()
                            drafts = await spec.propose(
                                ids + sampled, self.scheduler.running, max_tokens - n
                            ) if spec is not None else []
                            step = self.batcher.submit(worker_pb2.SeqInput(
                                seq_id=seq_id, token_ids=[sampled[-1], *drafts],
                                offset=len(ids) + n - 1, sample=True, draft=len(drafts)),
                                pipeline)
                        for chunk in chunks:
                            yield chunk
                        if done:
                            break
                        out = None
                        out = await step
                        step = None
                        if spec is not None:
                            spec.record(len(drafts), len(out.accepted),
                                        time.perf_counter() - t_step)
                except PipelineError as e:
                    if step is not None and not step.done():
                        step.cancel()
                    step = None
                    self.batcher.leave(seq_id)
                    fresh = await self._resume(e, pipeline, resumes)
                    fresh.users += 1
                    await self._let_go(pipeline)
                    pipeline = fresh
                    resumes += 1
                    seq_id, out = self._seq_id(), None
                    if spec is not None:
                        await spec.rekey(seq_id)
        finally:
            if step is not None and not step.done():
                step.cancel()  # dropped if not yet sent; its result is ignored if it was
            # Keep a finished sequence for follow-ups (its KV holds all but the last token),
            # unless it ran on a pipeline a re-plan has replaced (it finished there, draining)
            self.batcher.leave(seq_id)
            kept = done and self.prefix is not None and pipeline is self._source.pipeline
            evicted = self.prefix.insert(seq_id, ids + sampled[:-1]) if kept else [seq_id]
            await asyncio.shield(self.batcher.release(pipeline, evicted))
            if spec is not None:
                await asyncio.shield(spec.close())
            await asyncio.shield(self._let_go(pipeline))
        tail = ""
        if not hit:
            detok.finalize()
            tail, hit = stops.feed(detok.last_segment)
            tail += "" if hit else stops.flush()
            finish = FINISH_STOP if hit else finish
        t_end = time.perf_counter()
        decode_tps = (n - 1) / (t_end - t_first) if t_first and n > 1 else 0.0
        usage = inference_pb2.Usage(
            prompt_tokens=len(ids), completion_tokens=n,
            time_to_first_token_seconds=(t_first or t_end) - t0,
            decode_tokens_per_second=decode_tps,
            draft_tokens=spec.drafted if spec else 0,
            accepted_draft_tokens=spec.accepted if spec else 0,
        )
        yield Chunk(text=tail, finish_reason=finish, usage=usage)

    @staticmethod
    async def _let_go(pipeline: Pipeline) -> None:
        """A request is done with `pipeline`; the last one on a replaced pipeline closes it."""
        pipeline.users -= 1
        if pipeline.retired and not pipeline.users:
            await pipeline.close()
