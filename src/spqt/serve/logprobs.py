"""A request's logprobs: each answer token's log-probability and the most likely tokens at its step; with an echo,
each prompt token's too (Generator.score: at a sparsity level every prompt position with the thresholds on).

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
    logprob: float | None  # None: the prompt's first token, which nothing predicts


@dataclass(frozen=True)
class TokenLogprob:
    token: Named
    top: tuple[Named, ...] | None  # the step's most likely tokens, most likely first (None: the prompt's first token)
    offset: int  # where the token's text starts in the text returned (the echoed prompt's, then the answer's)


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
        return self._entry(token, float(lp[token]), ids.tolist(), values.tolist(), offset)

    def prompt(self, prompt: list[int], scores, offsets: list[int]) -> list[TokenLogprob]:
        """The entries of a prompt's tokens (an echo's): the first with no logprob (nothing predicts it), each
        other's from scores (spqt.generate.PromptScores of the prompt, its top k at least self.top); offsets: where
        each token's text starts."""
        first = TokenLogprob(self._named(prompt[0], None), None, offsets[0])
        top_ids, top_values = scores.top_ids[:, :self.top].tolist(), scores.top_logprobs[:, :self.top].tolist()
        return [first] + [self._entry(token, logprob, ids, values, offset) for token, logprob, ids, values, offset
                          in zip(prompt[1:], scores.logprobs.tolist(), top_ids, top_values, offsets[1:])]

    def _entry(self, token: int, logprob: float, top_ids: list[int], top_values: list[float],
               offset: int) -> TokenLogprob:
        return TokenLogprob(self._named(token, logprob),
                            tuple(self._named(i, v) for i, v in zip(top_ids, top_values)), offset)

    def _named(self, token: int, logprob: float | None) -> Named:
        data = self.token_bytes(token)
        if logprob is not None and not math.isfinite(logprob):
            logprob = LOWEST
        return Named(data.decode("utf-8", errors="replace"), data, logprob)
