"""A token's raw bytes (OpenAI logprobs `bytes`), which its lone decode may not show."""

from __future__ import annotations

import functools
import re
from typing import Any

SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: the character byte-level BPE shows for each
    byte -> that byte."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
             *range(ord("®"), ord("ÿ") + 1)]
    chars = list(shown)
    n = 0
    for b in range(256):
        if b not in shown:
            shown.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(shown, chars, strict=True)}


class TokenBytes:
    """Maps token ids to their raw bytes: through the byte-level table for byte-level BPE,
    `<0xNN>` pieces for SentencePiece byte fallback, else the UTF-8 of the decoded token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.kind = "text"
        try:
            from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

            detok = tokenizer.detokenizer
            if isinstance(detok, BPEStreamingDetokenizer):
                self.kind = "bpe"
            elif isinstance(detok, SPMStreamingDetokenizer):
                self.kind = "spm"
        except (ImportError, AttributeError):
            pass
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        raw = self._cache.get(token)
        if raw is None:
            raw = self._cache[token] = self._raw(token)
        return raw

    def _raw(self, token: int) -> bytes:
        piece = None
        if self.kind != "text":
            piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and token not in self._added:
            if self.kind == "bpe":
                table = byte_decoder()
                return b"".join(bytes([table[c]]) if c in table else c.encode()
                                for c in piece)
            if self.kind == "spm":
                if m := SPM_BYTE.fullmatch(piece):
                    return bytes([int(m.group(1), 16)])
                return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token]).encode()

    @functools.cached_property
    def _added(self) -> frozenset[int]:
        """Special and added tokens: their text is not byte-level encoded, so they decode."""
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        special = getattr(self.tokenizer, "all_special_ids", None) or ()
        return frozenset([*added, *special])
