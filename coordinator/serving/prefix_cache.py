"""Prefix cache: finished sequences kept live on the stages so a follow-up can fork their KV.

A multi-turn chat resends the whole history each turn; forking the longest cached prefix means
only the new part is prefilled. Entries are evicted least-recently-used first once their tokens
exceed the budget; the engine frees evicted sequences on every stage.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Token lists of sequences still held on the stages, by sequence id, in LRU order.

    >>> c = PrefixCache(max_tokens=100, min_match=2)
    >>> c.insert("s1", [1, 2, 3, 4])
    []
    >>> c.lookup([1, 2, 3, 9, 9])
    ('s1', 3)
    """

    def __init__(self, max_tokens: int, min_match: int = 16) -> None:
        self.max_tokens = max_tokens
        self.min_match = min_match
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.hits = 0
        self.queries = 0

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[str, int] | None:
        """The entry sharing the longest prefix with `ids`, and how many positions to reuse.

        At least the last prompt token is always left to run, since it yields the first token.
        """
        self.queries += 1
        best, best_len = None, 0
        for seq_id, tokens in self._entries.items():
            n = min(common_prefix(tokens, ids), len(ids) - 1)
            if n > best_len:
                best, best_len = seq_id, n
        if best is None or best_len < self.min_match:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        return best, best_len

    def insert(self, seq_id: str, tokens: Sequence[int]) -> list[str]:
        """Keep `seq_id`; returns the sequence ids evicted to stay within the budget."""
        if len(tokens) > self.max_tokens:
            return [seq_id]
        self._entries[seq_id] = tuple(tokens)
        evicted = []
        while self.tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            evicted.append(old)
        return evicted

    def clear(self) -> list[str]:
        """Forget every entry (e.g. after a re-plan); returns their ids."""
        ids = list(self._entries)
        self._entries.clear()
        return ids
