"""A request's logprobs: each answer token's log-probability and the most likely tokens at its step.

The model's own distribution: log-softmax of the step's logits as the model gives them (float64), before the
request's temperature, top-k and top-p, so a token has the same logprob however it was sampled (vLLM's default).
At a sparsity level the steps are the sparse model's, as the answer is. A logprob that would be -inf (a token the
logits rule out) reads as LOWEST, as JSON has no -inf.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOWEST = -9999.0  # what vLLM writes for -inf


@dataclass(frozen=True)
class TokenLogprob:
    text: str  # the token's text alone (U+FFFD for part of a character)
    logprob: float
    top: tuple[tuple[str, float], ...]  # (text, logprob) of the step's most likely tokens, most likely first
    offset: int  # where the token's text starts in the answer's text


class StepLogprobs:
    """Generator.generate's on_logits (observe) and, for the token sampled from those logits, take."""

    def __init__(self, top: int, decode: Callable[[list[int]], str]):
        self.top, self.decode = top, decode
        self._logprobs: torch.Tensor | None = None

    def observe(self, logits: torch.Tensor) -> None:
        """logits: (1, vocab) float32 of the step that samples the next token."""
        self._logprobs = torch.log_softmax(logits[0].double(), dim=-1)

    def take(self, token: int, offset: int) -> TokenLogprob:
        """The entry of `token`, sampled from the logits observed last; offset: where its text starts."""
        lp = self._logprobs
        values, ids = torch.topk(lp, min(self.top, lp.numel())) if self.top else (lp[:0], lp[:0].long())
        top = tuple((self.decode([i]), _finite(v)) for i, v in zip(ids.tolist(), values.tolist()))
        return TokenLogprob(self.decode([token]), _finite(float(lp[token])), top, offset)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOWEST
