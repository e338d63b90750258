"""A stage's direct link to the next: its steps go socket to socket, MLX thread to MLX thread.

Through gRPC a step's output goes from the MLX thread to the event loop, into gRPC's threads,
over the socket, out of the next worker's gRPC threads to its event loop and on to its MLX
thread: four hand-offs between threads for one hop. A link carries the same StageMessages in
length-prefixed frames over a plain TCP socket that the sending MLX thread writes and the
receiving MLX thread reads itself (worker/mlx_thread.py `watch`). The Forward stream stays
open beside it for everything else: its end, its cancellation, the answers coming back.

Setting one up (docs/architecture.md, "The direct link"): a stage opening Forward to the next
asks for a link in its metadata (`x-shardline-link: 1`). The next stage answers at once in
its initial metadata with `PORT TOKEN` (or `none`: links off, or TLS on, whose encryption
the link does not have). The asking stage connects to PORT on the next stage's host and sends
`SLNK1`, the token and, when the cluster has a secret, HMAC-SHA256(secret, token) in hex; the
next stage answers `OK`, and every StageMessage of the stream goes on the link from then on.
A token is good once and for LINK_WAIT seconds, and only the Forward call that asked for it
(signed with the cluster secret when there is one) learns it; anything else on the port is
closed. Whatever fails on the way (no answer, a port a firewall blocks) leaves the stream on
gRPC. `SHARDLINE_LINK=0` turns links off; `SHARDLINE_LINK_PORT` fixes the port (for a
firewall that opens listed ports only; by default the system picks a free one).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from protos import worker_pb2

log = logging.getLogger("shardline.worker")

LINK_KEY = "x-shardline-link"
HELLO = b"SLNK1"
_TOKEN_LEN, _PROOF_LEN = 32, 64
LINK_WAIT = 10.0  # seconds a token offered waits for its connection
CONNECT_WAIT = 5.0  # seconds the asking stage waits for the answer, then the connection


def enabled() -> bool:
    """Links are on unless `SHARDLINE_LINK=0`."""
    return os.environ.get("SHARDLINE_LINK", "").strip() != "0"


def _proof(secret: bytes | None, token: str) -> bytes:
    if not secret:
        return b"0" * _PROOF_LEN
    return hmac.new(secret, b"shardline-link\n" + token.encode(), hashlib.sha256
                    ).hexdigest().encode()


def frame(msg: worker_pb2.StageMessage | worker_pb2.StageResult) -> bytes:
    """A message as a link carries it: 4 bytes of length (big-endian), the message."""
    data = msg.SerializeToString()
    return len(data).to_bytes(4, "big") + data


class LinkListener:
    """The port where this worker's next-stage side takes links (one per worker, opened on
    the first request)."""

    def __init__(self, host: str, secret: bytes | None) -> None:
        self.host = host
        self.secret = secret
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._waiting: dict[str, asyncio.Future] = {}

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else 0

    def _open(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, int(os.environ.get("SHARDLINE_LINK_PORT", "0") or 0)))
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def offer(self, context: Any, allowed: bool = True) -> asyncio.Future | None:
        """Answer a Forward call that asked for a link: a token in its initial metadata and a
        future of the socket that brings it (None, after answering `none`, when links are
        off or not `allowed`)."""
        if not (allowed and enabled()):
            await context.send_initial_metadata(((LINK_KEY, "none"),))
            return None
        if self._sock is None:
            self._open()
        token = secrets.token_hex(_TOKEN_LEN // 2)
        future = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        asyncio.get_running_loop().call_later(LINK_WAIT, self._expire, token)
        await context.send_initial_metadata(((LINK_KEY, f"{self.port} {token}"),))
        return future

    def _expire(self, token: str) -> None:
        future = self._waiting.pop(token, None)
        if future is not None and not future.done():
            future.cancel()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError:
                return  # closed
            loop.create_task(self._hello(conn))

    async def _hello(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        want = len(HELLO) + _TOKEN_LEN + _PROOF_LEN
        data = b""
        try:
            async with asyncio.timeout(CONNECT_WAIT):
                while len(data) < want:
                    chunk = await loop.sock_recv(conn, want - len(data))
                    if not chunk:
                        break
                    data += chunk
            token = data[len(HELLO):len(HELLO) + _TOKEN_LEN].decode("ascii", "replace")
            future = self._waiting.pop(token, None) if data.startswith(HELLO) else None
            if future is None or future.done() or not hmac.compare_digest(
                    data[len(HELLO) + _TOKEN_LEN:], _proof(self.secret, token)):
                raise ConnectionError("not a link this worker offered")
            await loop.sock_sendall(conn, b"OK")
            if future.done():  # the call that asked ended meanwhile
                raise ConnectionError("too late")
        except (OSError, TimeoutError, ConnectionError):
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        future.set_result(conn)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()


async def connect(call: Any, address: str, secret: bytes | None) -> socket.socket | None:
    """The asking side: the socket of the link the worker at gRPC `address` offered on
    `call` (a Forward, or a Results call following the last stage's tokens), or None (the
    call stays on gRPC)."""
    try:
        async with asyncio.timeout(CONNECT_WAIT):  # (wait_for can swallow a cancellation)
            metadata = await call.initial_metadata()
        offer = dict(metadata or ()).get(LINK_KEY, "none")
        if offer == "none":
            return None
        port, token = offer.split()
        host = address.rsplit(":", 1)[0].strip("[]")
        loop = asyncio.get_running_loop()
        info = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        family, _, _, _, where = info[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_WAIT):
                await loop.sock_connect(sock, where)
                await loop.sock_sendall(sock, HELLO + token.encode() + _proof(secret, token))
                answer = await loop.sock_recv(sock, 2)
            if answer != b"OK":
                raise ConnectionError("the next stage refused the link")
        except BaseException:
            sock.close()
            raise
    except (OSError, ValueError, TimeoutError, ConnectionError) as e:
        log.info("no direct link to %s (steps go through gRPC): %s", address, e)
        return None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class LinkWriter:
    """Writes frames from the MLX thread without blocking it: what the socket does not take
    at once waits in order for the event loop to write (the MLX thread then queues behind)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        self.sock = sock
        self.loop = loop or asyncio.get_running_loop()
        self.error: BaseException | None = None
        self.on_error: Callable[[BaseException], None] | None = None  # called on the loop
        self._lock = threading.Lock()
        self._backlog: list[bytes] = []
        self._flushing: asyncio.Future | None = None

    def send(self, msg: worker_pb2.StageMessage | worker_pb2.StageResult) -> float:
        """Send `msg` (any thread); returns when it was handed to the socket or queued."""
        data = frame(msg)
        with self._lock:
            if self.error is not None:
                return time.perf_counter()
            if self._backlog:
                self._backlog.append(data)
                return time.perf_counter()
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self.error = e
                self.loop.call_soon_threadsafe(self._failed, e)
                return time.perf_counter()
            if sent < len(data):
                self._backlog.append(data[sent:])
                self.loop.call_soon_threadsafe(self._start_flush)
        return time.perf_counter()

    def _start_flush(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        while True:
            with self._lock:
                if not self._backlog or self.error is not None:
                    self._backlog.clear()
                    return
                data = self._backlog[0]
            try:
                await self.loop.sock_sendall(self.sock, data)
            except OSError as e:
                with self._lock:
                    self.error = e
                self._failed(e)
                return
            with self._lock:
                self._backlog.pop(0)

    def _failed(self, error: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(error)

    async def close(self) -> None:
        """Every frame written, then the write side shut (the next stage reads the end)."""
        flushing = self._flushing
        if flushing is not None and not flushing.done():
            await asyncio.shield(flushing)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def abort(self) -> None:
        with self._lock:
            self.error = self.error or ConnectionError("closed")
            self._backlog.clear()
        if self._flushing is not None:
            self._flushing.cancel()
        self.sock.close()


class LinkReader:
    """Reads frames on the MLX thread (worker/mlx_thread.py `watch` calls `read` whenever the
    socket has bytes): each whole frame goes to `on_frame(data, arrived)`, and the link's
    end (None, or the error) to `on_end` once."""

    def __init__(self, sock: socket.socket, limit: int, on_frame: Callable[[bytes, float], Any],
                 on_end: Callable[[BaseException | None], Any]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.limit = limit
        self.on_frame = on_frame
        self.on_end = on_end
        self._buf = bytearray()
        self._ended = False

    def read(self) -> bool:
        """Take what the socket has; False once the link ended (its socket may be closed)."""
        if self._ended:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        except OSError as e:
            return self._end(e)
        if not data:
            return self._end(None if not self._buf else ConnectionError("a frame cut short"))
        buf = self._buf
        buf += data
        start = 0
        arrived = time.perf_counter()
        try:
            while len(buf) - start >= 4:
                size = int.from_bytes(buf[start:start + 4], "big")
                if size > self.limit:
                    return self._end(ValueError(f"a frame of {size} bytes (limit {self.limit})"))
                if len(buf) - start - 4 < size:
                    break
                try:
                    self.on_frame(bytes(buf[start + 4:start + 4 + size]), arrived)
                except Exception as e:  # noqa: BLE001 - a frame that is no step ends the link
                    return self._end(e)
                start += 4 + size
        finally:
            del buf[:start]
        return True

    def _end(self, error: BaseException | None) -> bool:
        if not self._ended:
            self._ended = True
            self.on_end(error)
        return False
