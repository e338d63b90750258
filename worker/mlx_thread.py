"""The one thread that runs a worker's MLX work, with pipeline steps overlapped two deep.

MLX arrays are bound to the thread that built them, so loading, caches, forward passes and
sampling all run here. A pipeline step runs in two halves (worker/stage.py): `begin` builds its
graph and starts the device, `finish` waits for the values and builds the output. When the next
step is already queued, this thread begins it before finishing the one before, so the host
builds step g+1's graph while the device computes step g. Once a step's output has left the
worker (`idle`), and nothing is queued or begun, it builds the decode steps most likely to come
next (`StageRunner.prepare`, worker/lookahead.py), so that a step only launches when it arrives
(on stage 0, when the last stage's tokens arrive: `early`). Not before the output has left:
building a graph holds the GIL, which the event loop needs to send it.

With direct links (worker/link.py) this thread also moves the steps: it reads the frames of
the links it `watch`es (waiting on their sockets and its queue at once) and begins each step
the moment it is whole, and a step's `send` writes its output on the next stage's link as it
finishes, so neither passes through the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from worker.stage import Pending, StageRunner, StepOutput

log = logging.getLogger("shardline.worker")

DEPTH = 2  # steps begun and not yet finished, at most
# Seconds between GIL hand-overs in a process where an MLX thread builds graphs while an event
# loop moves messages: Python's default (5 ms) would hold a message back for up to that long
# whenever the MLX thread builds (`sys.setswitchinterval`; worker/cli.py, the draft model).
SWITCH_INTERVAL = 0.0005
READY = 8  # finished steps whose successors may still be prepared, at most
_CLOSE = object()
_IDLE = object()


@dataclass
class StepTimes:
    """Where one step's time went on this stage (seconds; see WorkerMetrics.parts)."""

    arrived: float  # perf_counter when the message was in hand on the event loop
    receive: float = 0.0  # arrival until this thread began it
    host: float = 0.0  # building the graph, or filling a prepared one and launching it
    device: float = 0.0  # waiting for the device's values
    serialise: float = 0.0  # building the output messages from the values
    done: float = 0.0  # perf_counter when the output was ready
    bytes_in: int = 0  # hidden-state bytes the message brought (read before the step runs)
    sent: float = 0.0  # perf_counter when this thread wrote the output on a link (else 0)


@dataclass
class _Early:
    runner: StageRunner
    result: Any  # a StageResult of the last stage (worker/loop.py)
    # stage 0: returns how to send a step begun on the result's tokens on ahead of its
    # message, (loop, after, sender(msg) -> send), or None: it cannot (worker/sent_ahead.py)
    ahead: Any = None


@dataclass
class _Step:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None
    runner: StageRunner
    msg: Any
    times: StepTimes
    after: Any = None  # called on this thread with (msg, output, times) once it finished
    pending: Pending | None = None
    # called on this thread with (output, None) or (None, error) once it finished, before
    # the future settles: the output goes on a direct link (worker/link.py); True when it
    # was the step's output that went (not a copy)
    send: Any = None
    announce: Any = None  # posted to the loop before the future settles (a link's step)


@dataclass
class _Watch:
    sock: socket.socket
    read: Any  # called when the socket is readable; False: the link ended


@dataclass
class _Unwatch:
    sock: socket.socket


class MLXThread:
    """A plain thread with a queue: a call costs one wake-up of this thread and one
    `call_soon_threadsafe` back to the loop (no executor or chained futures per step)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._begun: deque[_Step] = deque()
        self._ready: deque[_Step] = deque(maxlen=READY)  # finished, successors not prepared
        self.on_prepared: Any = None  # called with the seconds each prepare took
        self.overlapped = 0  # steps begun while the one before was still computing
        # Direct links (worker/link.py): while one is watched, this thread waits on their
        # sockets and on `_wake` (a byte for each item queued) instead of on the queue alone.
        self._selector = selectors.DefaultSelector()
        self._wake, self._wake_w = socket.socketpair()
        self._wake.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake, selectors.EVENT_READ, self._drain)
        self._links = 0
        self._thread = threading.Thread(target=self._loop, name="shardline-mlx", daemon=True)
        self._thread.start()

    def _next(self) -> Any:
        """The next queued item, or None (meaning: finish the oldest begun step) when steps are
        begun and nothing is queued, or when DEPTH steps are begun already."""
        if not self._begun:
            return self._get(True)  # blocks: nothing is begun
        if len(self._begun) >= DEPTH:
            return None
        try:
            return self._get(False)
        except queue.Empty:
            return None

    def _get(self, block: bool) -> Any:
        polled = False
        while True:
            if not self._links:  # (the last link may have ended while polling)
                return self._queue.get() if block else self._queue.get_nowait()
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                if polled and not block:
                    raise
            for key, _ in self._selector.select(None if block else 0):
                key.data(key.fileobj)
            polled = True

    def _drain(self, sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _put(self, item: Any) -> None:
        self._queue.put(item)
        if self._links:  # (set on this thread before it first waits on the selector)
            try:
                self._wake_w.send(b"\0")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def _watch(self, item: _Watch) -> None:
        def readable(sock: socket.socket) -> None:
            if not item.read():
                self._unwatch(sock)

        self._links += 1
        self._selector.register(item.sock, selectors.EVENT_READ, readable)

    def _unwatch(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
            self._links -= 1
        except (KeyError, ValueError):
            pass  # not watched (any more, or not yet: closed all the same)
        sock.close()

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                self._finish(self._begun.popleft())
                continue
            if item is _CLOSE:
                break
            if item is _IDLE:  # prepare the likely next steps, oldest first
                while self._ready and not self._begun and self._queue.empty():
                    self._prepare(self._ready.popleft())
                continue
            if isinstance(item, _Step):
                self._begin(item)
                continue
            if isinstance(item, _Watch):
                self._watch(item)
                continue
            if isinstance(item, _Unwatch):
                self._unwatch(item.sock)
                continue
            if isinstance(item, _Early):
                self._early(item)
                continue
            loop, future, fn, args = item
            if future.cancelled():
                continue
            while self._begun:  # a plain call sees every step before it finished
                self._finish(self._begun.popleft())
            self._ready.clear()  # (a call may load another shard)
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
        while self._begun:
            step = self._begun.popleft()
            if step.future is not None:
                step.loop.call_soon_threadsafe(step.future.cancel)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # the links still watched, and the wake-up pair
        self._wake_w.close()
        while True:  # closed: whatever is still queued will not run
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Watch | _Unwatch):
                item.sock.close()
            elif item is not _CLOSE and item is not _IDLE and not isinstance(item, _Early):
                loop, future = (item.loop, item.future) if isinstance(item, _Step) else item[:2]
                loop.call_soon_threadsafe(future.cancel)

    def _early(self, item: _Early) -> None:
        """A check built ahead, a guess started (prepare time); or, stage 0 with a direct
        link to stage 1, a step begun to finish and send on like one that came."""
        t0 = time.perf_counter()
        pending = None
        how = item.ahead() if item.ahead is not None else None
        try:
            pending = item.runner.start_early(item.result, how is not None)
        except Exception:  # noqa: BLE001 - the coordinator's message runs it then
            log.exception("starting a step on the last stage's tokens failed")
        if pending is None:
            if self.on_prepared is not None:
                self.on_prepared(time.perf_counter() - t0)
            return
        loop, after, sender = how
        step = _Step(loop, None, item.runner, pending.msg, StepTimes(t0), after, pending,
                     sender(pending.msg))
        step.times.host = time.perf_counter() - t0
        self.overlapped += bool(self._begun)
        self._begun.append(step)

    def _begin(self, step: _Step) -> None:
        self.overlapped += bool(self._begun)
        t0 = time.perf_counter()
        step.times.receive = t0 - step.times.arrived
        step.times.bytes_in = sum(len(seq.hidden.data) for seq in step.msg.seqs)
        try:
            step.pending = step.runner.begin(step.msg)
        except BaseException as e:  # noqa: BLE001 - the step's error, in order with the rest
            step.times.host = time.perf_counter() - t0
            self._begun.append(step)
            step.pending = e  # type: ignore[assignment]
            return
        step.times.host = time.perf_counter() - t0
        self._begun.append(step)

    def _prepare(self, step: _Step) -> None:
        t0 = time.perf_counter()
        try:
            step.runner.prepare(step.pending)
        except Exception:  # noqa: BLE001 - a guess that cannot be built is no guess
            log.exception("preparing the next step failed")
        if self.on_prepared is not None:
            self.on_prepared(time.perf_counter() - t0)

    def _finish(self, step: _Step) -> None:
        if isinstance(step.pending, BaseException):
            self._failed(step, step.pending)
            return
        try:
            out: StepOutput = step.runner.finish(step.pending)
        except BaseException as e:  # noqa: BLE001
            self._failed(step, e)
            return
        step.times.device, step.times.serialise = out.device_seconds, out.serialise_seconds
        step.times.done = time.perf_counter()
        sent = self._send(step, out, None)  # first: the next stage waits for it
        if step.after is not None:
            try:
                step.after(step.msg, out, step.times)
            except Exception:  # noqa: BLE001 - metrics must not stop the stage
                log.exception("recording a step failed")
        self._settle(step, out, None)
        if out.decode_tokens and not out.prefill_tokens:
            self._ready.append(step)
            if sent:  # its output has left: build ahead once nothing else waits (`idle`)
                self._queue.put(_IDLE)
        elif out.confirmed and self._ready:  # (a step sent ahead: what follows it may be
            self._queue.put(_IDLE)  # built now, if its prepare gave way to this message)

    def _failed(self, step: _Step, error: BaseException) -> None:
        step.times.done = time.perf_counter()
        self._send(step, None, error)
        self._settle(step, None, error)

    @staticmethod
    def _settle(step: _Step, out: StepOutput | None, error: BaseException | None) -> None:
        if step.future is not None:  # (None: a step sent ahead, nothing on the loop awaits it)
            step.loop.call_soon_threadsafe(_settle, step.future, out, error, step.announce)

    @staticmethod
    def _send(step: _Step, out: StepOutput | None, error: BaseException | None) -> bool:
        """Whether the step's output itself went on a link (its send ends here)."""
        if step.send is not None:
            try:
                if step.send(out, error):
                    step.times.sent = time.perf_counter()
                    return True
            except Exception:  # noqa: BLE001 - the link reports its own failure
                log.exception("sending a step on the link failed")
        return False

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on this thread (after every step queued before it) and return it."""
        return await self.submit(fn, *args)

    def submit(self, fn: Any, *args: Any) -> asyncio.Future:
        """Queue `fn(*args)` on this thread now; the future resolves with what it returns."""
        if self._closed:
            raise RuntimeError("the MLX thread is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put((loop, future, fn, args))
        return future

    def step(self, runner: StageRunner, msg: Any, arrived: float, after: Any = None,
             send: Any = None) -> tuple[asyncio.Future, StepTimes]:
        """Queue one pipeline step; the future resolves with its StepOutput (in queue order
        with the other steps) or its error. `after(msg, output, times)` runs on this thread
        once the step finished (metrics), then `send(output, error)` (a direct link)."""
        if self._closed:
            raise RuntimeError("the MLX thread is closed")
        loop = asyncio.get_running_loop()
        times = StepTimes(arrived)
        future = loop.create_future()
        self._put(_Step(loop, future, runner, msg, times, after, send=send))
        return future, times

    def queue_step(self, loop: asyncio.AbstractEventLoop, runner: StageRunner, msg: Any,
                   arrived: float, after: Any = None, send: Any = None,
                   announce: Any = None) -> tuple[asyncio.Future, StepTimes]:
        """On this thread (a link's frame, worker/link.py): queue a step as `step` does;
        `announce()` is called on the loop once it finished, just before its future settles
        (one wake-up of the loop a step, after the step, not while it launches)."""
        times = StepTimes(arrived)
        future = loop.create_future()
        self._queue.put(_Step(loop, future, runner, msg, times, after, send=send,
                              announce=announce))
        return future, times

    def after_steps(self, loop: asyncio.AbstractEventLoop, callback: Any) -> None:
        """On this thread: call `callback` on the loop once every step queued so far has
        finished and settled (a link's end, after its last step)."""
        future = loop.create_future()
        self._queue.put((loop, future, loop.call_soon_threadsafe, (callback,)))

    def watch(self, sock: socket.socket, read: Any) -> None:
        """Have this thread call `read()` whenever `sock` has bytes, in turn with its queue,
        until `read` returns False or `unwatch`; this thread closes `sock` then."""
        self._put(_Watch(sock, read))

    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching `sock` (after every item queued before) and close it."""
        self._put(_Unwatch(sock))

    def idle(self) -> None:
        """The worker has sent every output so far: the thread may build steps ahead."""
        if self._ready:
            self._put(_IDLE)

    def early(self, runner: StageRunner, result: Any, ahead: Any = None) -> None:
        """Stage 0: the last stage sampled `result`'s tokens; start the step built ahead on
        them (in queue order with the steps; StageRunner.start_early), and send it on if
        `ahead()` says how (worker/sent_ahead.py)."""
        if self._closed:
            return
        if threading.get_ident() == self._thread.ident:  # (a link's frame: no wake-up)
            self._queue.put(_Early(runner, result, ahead))
        else:
            self._put(_Early(runner, result, ahead))

    def close(self) -> None:
        self._closed = True
        self._put(_CLOSE)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None,
            announce: Any = None) -> None:
    if announce is not None:  # (one wake-up of the loop for both)
        try:
            announce()
        except Exception:  # noqa: BLE001 - the future settles all the same
            log.exception("accounting a step failed")
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
