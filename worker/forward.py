"""One Forward stream on a worker: its steps in, through the MLX thread, and their outputs on.

Steps come on the stream from the previous stage (or the coordinator), or on a direct link
from the previous stage (worker/link.py), whose frames the MLX thread reads and begins itself.
Outputs go to the next stage, on its Forward stream or on a direct link the MLX thread writes
as each step finishes; the last stage's go to the plan's Results stream, or back on this one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos import worker_pb2
from worker import link, sent_ahead
from worker.metrics import step_kind
from worker.mlx_thread import StepTimes


class ForwardStream:
    """The state of one Forward call (worker/server.py `WorkerService.Forward`)."""

    def __init__(self, service: Any, loaded: Any) -> None:
        self.service = service
        self.loaded = loaded
        self.spec = loaded.spec
        self.downstream: Any = None  # the Forward call to the next stage (None: the last)
        self._link_out: link.LinkWriter | None = None
        self.loop = asyncio.get_running_loop()
        # What this stream answers: the last stage's results when no Results stream is open
        # for the plan, a downstream failure, or None at the end.
        self.back: asyncio.Queue[worker_pb2.StageResult | BaseException | None] = \
            asyncio.Queue()
        self._started: set[str] = set()  # sequences this stream started, not released
        # held while a step is counted in and queued, and when the stream closes: a step the
        # MLX thread reads from the link after `close` is dropped, one before it is released
        self._lock = threading.Lock()
        self._closed = False
        self.checks = asyncio.Event()  # a step with proposals came (worker/check_ahead.py)
        self.steps: asyncio.Queue[tuple[Any, asyncio.Future, StepTimes] | None] = \
            asyncio.Queue()
        self.link_in: asyncio.Future | None = None  # the socket of a link offered upstream
        self._link_ended: asyncio.Future = self.loop.create_future()
        self._link_sock: Any = None
        self._on_grpc = False  # steps came on the stream (a link set up too late ends unheard)

    @property
    def link_out(self) -> link.LinkWriter | None:
        """The direct link to the next stage (None: steps go on `downstream`)."""
        return self._link_out

    @link_out.setter
    def link_out(self, writer: link.LinkWriter | None) -> None:
        self._link_out = writer
        if writer is not None:
            writer.on_error = lambda e: self.back.put_nowait(
                ConnectionError(f"next stage {self.spec.next_address}: link: {e}"))

    # -- in -----------------------------------------------------------------------------
    def _count(self, msg: worker_pb2.StageMessage) -> None:
        self._started.difference_update(msg.release)
        self._started.update(seq.seq_id for seq in msg.seqs if seq.start)

    @property
    def started(self) -> list[str]:
        """The sequences this stream started and has not released (after `close`: all it
        ever will)."""
        with self._lock:
            return sorted(self._started)

    def _arrived(self, msg: worker_pb2.StageMessage, future: asyncio.Future,
                 times: StepTimes, linked: bool = False) -> None:
        """On the loop, for each step in arrival order: the stream's bookkeeping."""
        check = any(seq.draft for seq in msg.seqs)
        self.service.parts.arrived(times.arrived, "check" if check else "decode")
        if linked:
            self.service.metrics.link_steps.labels("in").inc()
        if check and not self.checks.is_set():
            self.checks.set()
        self.steps.put_nowait((msg, future, times))

    def _queue(self, msg: worker_pb2.StageMessage, arrived: float, here: bool,
               announce: Any = None) -> tuple[asyncio.Future, StepTimes]:
        """Queue `msg` on the MLX thread (`here`: from that thread, a link's frame, with
        `announce` called on the loop once it finished)."""
        mlx, runner = self.service.mlx, self.loaded.runner
        if self.link_out is not None:
            send = self._sender(msg)
        else:  # the last stage: copies of its tokens to the stages following them on links
            send = self._to_followers(msg) if self.downstream is None else None
        if msg.error:  # an earlier stage failed this step: free what it frees, pass it on
            msg, after = worker_pb2.StageMessage(step_id=msg.step_id, release=msg.release,
                                                 dropped=msg.dropped), None
        else:
            after = self.service.record
        if here:
            return mlx.queue_step(self.loop, runner, msg, arrived, after, send, announce)
        return mlx.step(runner, msg, arrived, after, send)

    async def pump(self, requests: Any) -> None:
        """Hand each incoming step to the MLX thread as soon as it arrives (it begins the next
        while the device computes the one before) and send the outputs on in order."""
        sender = asyncio.create_task(self._send_all())
        taker = asyncio.create_task(self._take_link()) if self.link_in is not None else None
        try:
            async for msg in requests:
                arrived = time.perf_counter()
                if self.link_in is not None:  # steps on the stream: the link is not used
                    self.link_in.cancel()
                    self._on_grpc = True
                with self._lock:
                    self._count(msg)
                future, times = self._queue(msg, arrived, False)
                self._arrived(msg, future, times)
            if taker is not None:
                self.link_in.cancel()  # (a link taken already is not undone)
                await self._link_ended  # every frame the link brought is queued
            self.steps.put_nowait(None)
            await sender
        except grpc.aio.AioRpcError as e:
            await self.back.put(ConnectionError(f"previous stage: {e.details()}"))
        except DecodeError as e:  # a message that is not a StageMessage: the stream ends
            await self.back.put(e)
        finally:
            sender.cancel()
            if taker is not None:
                taker.cancel()

    async def _take_link(self) -> None:
        try:
            sock = await asyncio.shield(self.link_in)
        except asyncio.CancelledError:  # not taken: the stream stays on gRPC
            if not self._link_ended.done():
                self._link_ended.set_result(None)
            if not self.link_in.cancelled():
                raise
            return
        self._link_sock = sock
        limit = self.spec.max_message_bytes or (1 << 31)
        reader = link.LinkReader(sock, limit, self._frame, self._link_end)
        self.service.mlx.watch(sock, reader.read)

    def _frame(self, data: bytes, arrived: float) -> None:
        """On the MLX thread: a step from the link, queued at once, accounted on the loop."""
        msg = worker_pb2.StageMessage.FromString(data)
        step: list = []  # (future, times), for the loop once the step finished
        with self._lock:
            if self._closed:  # the stream is over: its sequences are being released
                return
            self._count(msg)
            step.extend(self._queue(msg, arrived, True, lambda: self._arrived(msg, *step, True)))

    def _link_end(self, error: BaseException | None) -> None:
        """On the MLX thread: the link ended; once every step it brought has finished (and
        reached the loop), the stream may end too."""
        def ended() -> None:
            if error is not None and not self._on_grpc:
                self.back.put_nowait(DecodeError(str(error)) if isinstance(error, DecodeError)
                                     else ConnectionError(f"previous stage: link: {error}"))
            if not self._link_ended.done():
                self._link_ended.set_result(None)
        self.service.mlx.after_steps(self.loop, ended)

    # -- out ----------------------------------------------------------------------------
    def _sender(self, msg: worker_pb2.StageMessage) -> Any:
        """What the MLX thread calls with a finished step's (output, error): its output, or
        the error, goes on the link to the next stage (what `_send_all` does on gRPC)."""
        def send(out: Any, error: BaseException | None) -> bool:
            text = msg.error or (self.service.error_text(self.spec, error) if error else "")
            forward = out.forward if out is not None and not text else _failed(msg, text)
            if forward is None:  # a step sent ahead, confirmed: nothing goes on
                return True
            t1 = time.perf_counter()
            self.link_out.send(forward)
            if msg.seqs:
                self.service.metrics.transfer.observe(time.perf_counter() - t1)
            self.service.metrics.link_steps.labels("out").inc()
            return True
        return send

    def ahead(self) -> tuple[Any, Any, Any] | None:
        """Stage 0's MLX thread, about to begin a step on the last stage's tokens: how it
        would send it on before the coordinator's message (worker/sent_ahead.py): on the
        direct link to stage 1, with its metrics. None without a link (the message sends
        it then)."""
        if self.link_out is None or self._closed or not sent_ahead.ENABLED:
            return None
        return self.loop, self.service.record, self._sender

    def _to_followers(self, msg: worker_pb2.StageMessage) -> Any:
        """What the last stage's MLX thread calls with a finished step: its tokens to every
        stage following the plan on a direct link (worker/loop.py), as they are sampled."""
        def send(out: Any, error: BaseException | None) -> bool:
            writers = self.service.followers(self.spec.plan_id)
            if writers and out is not None and out.outputs and error is None \
                    and not msg.error:
                result = worker_pb2.StageResult(step_id=msg.step_id)
                result.outputs.extend(out.outputs)
                for writer in writers:
                    writer.send(result)
                self.service.metrics.link_steps.labels("follow").inc(len(writers))
            return False  # the result itself goes to the coordinator from the loop
        return send

    async def _send_all(self) -> None:
        """Send each step's output on, in arrival order: to the next stage (unless the MLX
        thread wrote it on a link), or (last stage) to the plan's Results stream or back on
        this one."""
        service, spec, downstream = self.service, self.spec, self.downstream
        try:
            while (item := await self.steps.get()) is not None:
                msg, future, times = item
                out = None
                error = msg.error
                try:
                    out = await future
                except Exception as e:  # noqa: BLE001 - the step fails, the stream goes on
                    error = error or service.error_text(spec, e)
                if error:
                    out = None
                kind = step_kind(msg, out.prefill_tokens if out is not None
                                 and not out.confirmed else None)
                if self.link_out is not None:  # written (and built ahead) on the MLX thread
                    service.parts.sent(times, kind)
                elif downstream is not None:
                    forward = out.forward if out is not None else _failed(msg, error)
                    t1 = time.perf_counter()
                    if forward is not None:  # (None: confirmed a step sent ahead)
                        await downstream.write(forward)
                    if msg.seqs:
                        service.metrics.transfer.observe(time.perf_counter() - t1)
                    service.parts.sent(times, kind)
                    if self.steps.empty():
                        service.mlx.idle()  # written: the MLX thread may build ahead
                elif msg.seqs or error:
                    result = worker_pb2.StageResult(step_id=msg.step_id, error=error)
                    if out is not None:
                        result.outputs.extend(out.outputs)
                    service.deliver(spec.plan_id, result, self.back)
                    service.parts.sent(times, kind)
                else:
                    service.parts.sent(times, None)
            if self.link_out is not None:
                await self.link_out.close()
            if downstream is not None:
                await downstream.done_writing()
            else:
                await self.back.put(None)
        except grpc.aio.AioRpcError as e:
            await self.back.put(ConnectionError(f"next stage {spec.next_address}: "
                                                f"{e.details()}"))

    async def watch(self) -> None:
        """Follow the next stage's answers: results it sends back (no Results stream is open
        for the plan), its end, or its failure."""
        try:
            async for result in self.downstream:
                await self.back.put(result)
            await self.back.put(None)
        except grpc.aio.AioRpcError as e:
            await self.back.put(ConnectionError(f"next stage {self.spec.next_address}: "
                                                f"{e.details()}"))

    def close(self) -> None:
        """The call is over: the links go (the MLX thread closes the one it reads)."""
        with self._lock:
            self._closed = True
        if self.link_in is not None:
            if self.link_in.done() and not self.link_in.cancelled() \
                    and self._link_sock is None:
                self.link_in.result().close()  # taken, never watched
            self.link_in.cancel()
        if self._link_sock is not None:
            self.service.mlx.unwatch(self._link_sock)
        if self.link_out is not None:
            self.link_out.abort()
        if self.downstream is not None:
            self.downstream.cancel()


def _failed(msg: worker_pb2.StageMessage, error: str) -> worker_pb2.StageMessage:
    """What goes on for a step that failed here or before: its error, and what it frees and
    drops (every stage still frees those)."""
    return worker_pb2.StageMessage(step_id=msg.step_id, error=error, release=msg.release,
                                   dropped=msg.dropped)
