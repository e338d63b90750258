"""Admission: a bounded number of running sequences and a bounded waiting queue.

A request waits for a running slot (its KV memory is reserved on every stage by the plan's
`max_sequences`); when the waiting queue is full it is refused with RESOURCE_EXHAUSTED instead of
piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class QueueFull(Exception):
    """Every running slot is taken and the waiting queue is full."""


class Scheduler:
    """FIFO admission of requests into `max_running` slots with at most `max_waiting` queued.

    >>> async def demo():
    ...     s = Scheduler(max_running=1, max_waiting=0)
    ...     async with s.slot():
    ...         return s.running, s.waiting
    >>> asyncio.run(demo())
    (1, 0)
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self._queue: list[asyncio.Future] = []

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def _acquire(self) -> None:
        if self.running < self.max_running and not self._queue:
            self.running += 1
            return
        if len(self._queue) >= self.max_waiting:
            raise QueueFull(
                f"the server is full: {self.running} requests running and {self.waiting} "
                f"waiting (limit {self.max_waiting}); retry later"
            )
        ticket = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        try:
            await ticket  # _release hands the slot over directly (running stays counted)
        except asyncio.CancelledError:
            if ticket in self._queue:
                self._queue.remove(ticket)
            elif ticket.done() and not ticket.cancelled():
                self._release()  # the slot was handed to us as we were cancelled
            raise

    def _release(self) -> None:
        while self._queue:
            ticket = self._queue.pop(0)
            if not ticket.done():
                ticket.set_result(None)
                return
        self.running -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body; QueueFull if it cannot even wait."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()
