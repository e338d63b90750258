"""This worker's stable node id, generated once and kept in the cache dir."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def node_id(cache_dir: Path, name: str = "worker") -> str:
    """Read or create the id of the worker called `name` (one id per name and cache dir)."""
    path = cache_dir / f"{name}.id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    new = uuid.uuid4().hex[:16]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new
