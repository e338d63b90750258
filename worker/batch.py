"""Batched decode: several sequences' caches merged (left-padded) so one forward serves them all.

A decode step of B sequences reads the stage's weights once instead of B times. The merged
caches stay merged while the same sequences keep decoding together; a change of membership,
a prefill chunk, a fork or a release splits them back into per-sequence caches first. Also
the helpers on one sequence's caches: forking (the prefix cache) and whether they trim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_lm.models.cache import KVCache


class DecodeBatch:
    """Per-layer batch caches (BatchKVCache / BatchRotatingKVCache) of sequences `ids`, in order."""

    def __init__(self, ids: Sequence[str], caches_by_seq: Sequence[list[Any]]) -> None:
        self.ids = tuple(ids)
        layers = len(caches_by_seq[0])
        self.caches = [
            caches_by_seq[0][i].merge([caches[i] for caches in caches_by_seq])
            for i in range(layers)
        ]

    def split(self) -> list[list[Any]]:
        """Each sequence's own caches again, in `ids` order."""
        return [[c.extract(row) for c in self.caches] for row in range(len(self.ids))]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches if getattr(c, "keys", None) is not None)


def batchable(caches: Sequence[Any]) -> bool:
    """Whether these cache kinds can be merged into a batch (plain or rotating KV caches)."""
    return all(hasattr(c, "merge") and not getattr(c, "bits", None) for c in caches)


def fork_cache(cache: Any, length: int) -> KVCache:
    """A copy of a plain KV cache's first `length` positions (the source is left as it is)."""
    if type(cache) is not KVCache:
        raise ValueError(f"{type(cache).__name__} caches cannot be forked")
    out = KVCache()
    out.keys = cache.keys[..., :length, :]
    out.values = cache.values[..., :length, :]
    out.offset = length
    return out


def trimmable(caches: list[Any]) -> bool:
    """Whether every one of `caches` can drop its last positions (no sliding window)."""
    return all(getattr(c, "is_trimmable", lambda: False)() for c in caches)
