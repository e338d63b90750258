"""Grammar-constrained sampling on the last stage: an llguidance mask per sequence and position.

The coordinator compiles a request's structured output (a JSON schema, a regex, a choice, a Lark
grammar) into an llguidance grammar and sends it with the sequence's first chunk
(`SeqInput.grammar`, `SeqInput.output_offset`). The last stage keeps one `Constraint` per such
sequence. Before a position is sampled, the constraint catches up with the sequence's tokens
(the output's tokens advance the grammar; a re-plan replays them) and gives the tokens allowed
next; the sampler sets every other logit to -inf. The stage computes the mask after it has
sent the step's layers to the device, so the host works on it while the device computes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np


class ConstraintError(ValueError):
    """A grammar this stage cannot apply (no tokenizer, a grammar llguidance refuses)."""


class GrammarTokenizer:
    """The model's tokenizer as llguidance sees it (from `tokenizer.json` beside the shard's
    config), built once in a background thread when the shard loads."""

    def __init__(self, model_dir: Path | None) -> None:
        self._tokenizer: Any = None
        self._error = ""
        self._ready = threading.Event()
        if model_dir is None or not (model_dir / "tokenizer.json").is_file():
            self._error = f"{model_dir or 'this shard'} has no tokenizer.json"
            self._ready.set()
            return
        threading.Thread(target=self._build, args=(model_dir,), daemon=True,
                         name="shardline-grammar-tokenizer").start()

    def _build(self, model_dir: Path) -> None:
        try:
            import llguidance

            config = json.loads((model_dir / "config.json").read_text())
            eos = config.get("eos_token_id")
            vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
            eos = eos if isinstance(eos, int | list) and eos else None
            text = (model_dir / "tokenizer.json").read_text()
            try:
                self._tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab, eos_token=eos)
            except TypeError:  # llguidance before 1.7 takes one EOS token only
                one = eos[0] if isinstance(eos, list) else eos
                self._tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab, eos_token=one)
        except Exception as e:  # noqa: BLE001 - any failure makes grammars unavailable, named
            self._error = f"cannot build the grammar tokenizer from {model_dir}: {e}"
        finally:
            self._ready.set()

    def get(self) -> Any:
        """The LLTokenizer (waits for the build); ConstraintError when there is none."""
        self._ready.wait()
        if self._tokenizer is None:
            raise ConstraintError(self._error)
        return self._tokenizer


class Constraint:
    """One sequence's grammar state: an llguidance matcher over its output tokens."""

    def __init__(self, tokenizer: Any, grammar: str, output_offset: int) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar was refused: {self.matcher.get_error()}")
        self.start = output_offset
        self.tokens: list[int] = []  # output tokens the matcher has consumed
        self.vocab = tokenizer.vocab_size

    def _follow(self, history: list[int]) -> None:
        """Bring the matcher to the sequence's tokens: roll back what a trim took off (a
        rejected proposal, a dropped guess), then consume the new ones. A token the grammar
        does not allow (a proposal) and the ones after it are not consumed: the mask is then
        the one after the last allowed token, where such a proposal is rejected anyway."""
        output = history[self.start:]
        n = len(self.tokens)
        if output[:n] != self.tokens:
            pairs = enumerate(zip(output, self.tokens, strict=False))
            same = next((i for i, (a, b) in pairs if a != b), min(len(output), n))
            self.matcher.rollback(n - same)
            del self.tokens[same:]
            n = same
        new = output[n:]
        if new:
            valid = self.matcher.validate_tokens(new)
            if valid and not self.matcher.consume_tokens(new[:valid]):
                raise ConstraintError(f"the grammar stopped: {self.matcher.get_error()}")
            self.tokens.extend(new[:valid])

    def allowed(self, history: list[int], vocab: int) -> mx.array:
        """The tokens allowed after `history` (every token of the sequence so far) as a
        (1, vocab) boolean array; tokens past the tokenizer's own vocabulary never are."""
        self._follow(history)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:vocab].astype(bool)
        if mask.size < vocab:
            mask = np.concatenate([mask, np.zeros(vocab - mask.size, dtype=bool)])
        return mx.array(mask)[None]
