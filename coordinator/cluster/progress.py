"""Progress bars on the coordinator's terminal: one per worker while its shard travels."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class TransferBars:
    """A tqdm bar per worker (bytes, rate, time left); none when stderr is not a terminal,
    where the one-line summaries of coordinator/cluster/shipping.py stand alone."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bars: dict[int, Any] = {}

    def _bar(self, transfer: Any) -> Any:
        bar = self._bars.get(id(transfer))
        if bar is None:
            bar = tqdm(total=transfer.total, desc=transfer.worker, unit="B", unit_scale=True,
                       unit_divisor=1024, position=len(self._bars), leave=False,
                       dynamic_ncols=True)
            self._bars[id(transfer)] = bar
        return bar

    def advance(self, transfer: Any, n: int) -> None:
        if self.enabled and transfer.total:
            self._bar(transfer).update(n)

    def finish(self, transfer: Any) -> None:
        bar = self._bars.pop(id(transfer), None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class HashBar:
    """A bar while the coordinator hashes a model it has not hashed before (shown only once
    bytes are hashed: a model whose hashes are kept shows nothing)."""

    def __init__(self, name: str, total: int, enabled: bool = True) -> None:
        self.name, self.total = name, total
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def advance(self, n: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc=f"hashing {self.name}", unit="B",
                             unit_scale=True, unit_divisor=1024, leave=False,
                             dynamic_ncols=True)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
