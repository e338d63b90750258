"""This worker's stable node id, generated once and kept in the cache dir."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from protos.discovery import is_node_id

log = logging.getLogger("shardline.worker")


def node_id(cache_dir: Path, name: str = "worker") -> str:
    """Read or create the id of the worker called `name` (one id per name and cache dir).

    The id lives in `cache_dir/NAME.id`; a missing, empty or unreadable file, or one that
    holds no valid node id, gets a fresh id written atomically."""
    path = cache_dir / f"{name}.id"
    try:
        text = path.read_bytes().decode("ascii").strip()
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError):
        text = ""
    if text and is_node_id(text):
        return text
    if text is not None:
        log.warning("node id file %s is empty or corrupt: writing a new id", path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    new = uuid.uuid4().hex[:16]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new
