"""Token sampling on the last stage: mlx-lm's samplers, reproducible per (seed, position)."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from protos import inference_pb2


@dataclass
class Sampler:
    """How one sequence picks its next token; keeps the token history penalties look at."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int = 0
    top_logprobs: int = 0
    history: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sample = make_sampler(
            temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k
        )
        self._processors = make_logits_processors(repetition_penalty=self.repetition_penalty)

    @property
    def has_processors(self) -> bool:
        """Whether logits processors (repetition penalty) read the token history."""
        return bool(self._processors)

    @property
    def greedy(self) -> bool:
        """Whether it picks the most likely token and reports only its logprob, reading no
        history (so positions can be picked all at once: worker/verify.py)."""
        return self.temperature <= 0 and self.top_logprobs <= 0 and not self._processors

    @classmethod
    def from_params(cls, params: inference_pb2.SamplingParams) -> Sampler:
        """Build from the wire's SamplingParams; unset fields take greedy defaults."""
        penalty = params.repetition_penalty if params.HasField("repetition_penalty") else None
        return cls(
            temperature=params.temperature if params.HasField("temperature") else 0.0,
            top_p=params.top_p if params.HasField("top_p") else 0.0,
            top_k=params.top_k if params.HasField("top_k") else 0,
            min_p=params.min_p if params.HasField("min_p") else 0.0,
            repetition_penalty=penalty if penalty and penalty != 1.0 else None,
            seed=params.seed if params.HasField("seed") else 0,
            top_logprobs=params.logprobs if params.HasField("logprobs") else 0,
        )

    def sample(self, logits: mx.array, allowed: mx.array | None = None) -> tuple[mx.array, ...]:
        """Pick a token from logits of shape (1, vocab); returns (token, its logprob), lazily.

        `allowed` (a (1, vocab) boolean array, worker/constrain.py) leaves only those tokens
        possible: the others' logits become -inf before anything else.

        With `top_logprobs` > 0 it also returns the ids and logprobs of that many most likely
        tokens, best first.

        The random key depends only on (seed, position), so a sequence re-run from its prompt
        and the tokens already produced samples the same continuation.
        """
        if allowed is not None:
            logits = mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
        if self._processors:
            tokens = mx.array(self.history, dtype=mx.int32)
            for processor in self._processors:
                logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self.temperature > 0:
            mx.random.seed((self.seed * 1_000_003 + len(self.history)) % (1 << 63))
        token = self._sample(logprobs)
        chosen = mx.take_along_axis(logprobs, token.reshape(1, 1), axis=-1)
        if self.top_logprobs <= 0:
            return token, chosen
        k = min(self.top_logprobs, logprobs.shape[-1])
        top = mx.argsort(-logprobs[0])[:k]
        return token, chosen, top, logprobs[0, top]
