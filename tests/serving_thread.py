"""A coordinator on its own event loop in a thread, for blocking clients (openai, Client)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

from conftest import Serving


class ServingThread:
    """`with ServingThread(model, addresses) as s:` serves on s.grpc_address and s.http_url."""

    def __init__(self, model: Path, addresses: Sequence[str], **options) -> None:
        self.serving = Serving(model, addresses, **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ServingThread:
        self.thread.start()
        self.call(self.serving.__aenter__())
        c = self.serving.coordinator
        self.coordinator = c
        self.grpc_address = f"127.0.0.1:{c.grpc_port}"
        self.http_url = f"http://127.0.0.1:{c.http_port}"
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.serving.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def http(method: str, url: str, body: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    """One plain HTTP call (stdlib only): (status, JSON body)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
