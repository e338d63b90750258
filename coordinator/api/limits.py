"""What an HTTP client may hold of the coordinator: a body's size and the time to send a request."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

# A request body larger than this is refused (413) before it is read: a prompt that fills the
# largest context is far smaller, and reading and parsing more would cost memory and time.
MAX_BODY_BYTES = 16 << 20
# A client must send its request's headers within this many seconds of connecting (or of the
# answer before, on a kept-alive connection), and then its body within BODY_SECONDS: a client
# that opens connections and never finishes a request (slowloris) holds nothing for longer.
HEAD_SECONDS = 10.0
BODY_SECONDS = 60.0


async def read_body(request: Any) -> bytes:
    """The request's body, refused with 413 when it is (or says it is) over MAX_BODY_BYTES,
    and with 408 when it takes longer than BODY_SECONDS to arrive."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"the request body is {declared} bytes, over the limit of "
                                 f"{MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise HTTPException(413, f"the request body is over the limit of "
                                             f"{MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {BODY_SECONDS:g} "
                                 "seconds") from None
    return b"".join(chunks)


class TimelyH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a connection whose next request's headers have not
    all arrived HEAD_SECONDS after it opened (or after its last answer) gets 408 and is
    closed. uvicorn's own keep-alive timeout stops at the first byte of a request."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self.loop.call_later(HEAD_SECONDS, self._expire, self.cycle)

    def _expire(self, cycle: Any) -> None:
        """No request has begun since the timer was set (the cycle is the same): let go."""
        if self.cycle is not cycle or self.transport.is_closing():
            return
        if cycle is not None and not cycle.response_complete:
            return  # still answering the request before (a long stream)
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")
        self.transport.close()
