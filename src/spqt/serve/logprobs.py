"""A request's logprobs: each answer token's log-probability and the most likely tokens at its step.

The model's own distribution: log-softmax of the step's logits as the model gives them (float64), before the
request's temperature, top-k and top-p, so a token has the same logprob however it was sampled (vLLM's default).
At a sparsity level the steps are the sparse model's, as the answer is. A logprob that would be -inf (a token the
logits rule out) reads as LOWEST, as JSON has no -inf. A token is named by the bytes it stands for alone
(TextTokenizer.token_bytes: a SentencePiece word's leading space kept, a byte piece of a character as that byte) and
by their text (U+FFFD where they hold part of a character); the bytes of an answer's tokens join to its text.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOWEST = -9999.0  # what vLLM writes for -inf


@dataclass(frozen=True)
class Named:
    text: str  # the token's bytes as text, U+FFFD for part of a character
    data: bytes  # the bytes it stands for
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: Named
    top: tuple[Named, ...]  # the step's most likely tokens, most likely first
    offset: int  # where the token's text starts in the answer's text


class StepLogprobs:
    """Generator.generate's on_logits (observe) and, for the token sampled from those logits, take.
    token_bytes: a token id -> the bytes it stands for (TextTokenizer.token_bytes)."""

    def __init__(self, top: int, token_bytes: Callable[[int], bytes]):
        self.top, self.token_bytes = top, token_bytes
        self._logprobs: torch.Tensor | None = None  # (vocab,) float64 of the step observed last

    def observe(self, logits: torch.Tensor) -> None:
        """logits: (1, vocab) float32 of the step that samples the next token."""
        self._logprobs = torch.log_softmax(logits[0].double(), dim=-1)

    def take(self, token: int, offset: int) -> TokenLogprob:
        """The entry of `token`, sampled from the logits observed last; offset: where its text starts."""
        lp = self._logprobs
        values, ids = torch.topk(lp, min(self.top, lp.numel())) if self.top else (lp[:0], lp[:0].long())
        return TokenLogprob(self._named(token, float(lp[token])),
                            tuple(self._named(i, v) for i, v in zip(ids.tolist(), values.tolist())), offset)

    def _named(self, token: int, logprob: float) -> Named:
        data = self.token_bytes(token)
        return Named(data.decode("utf-8", errors="replace"), data, logprob if math.isfinite(logprob) else LOWEST)
