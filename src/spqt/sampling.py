"""Choosing the next token from a step's logits: greedy or sampled, and what shapes the logits first.

The order: logit_bias added; the penalties, as vLLM applies them (repetition over the prompt's and the answer's
tokens, all of them, where llama.cpp's repeat_penalty takes the last 64; frequency and presence over the answer's, as
OpenAI and vLLM define them); then temperature (0: greedy, the argmax of the shaped logits), top-k, top-p and min-p
(min-p last, as transformers and vLLM's first sampler apply it), each on the distribution after the temperature, as
transformers and vLLM apply them (llama.cpp's default chain divides by the temperature last). A grammar (structured
output, spqt.grammar) masks the tokens that would leave it last, after the penalties. Logprobs a caller reads
(generate's on_logits) are the model's own, before any of this.
"""

import math
from dataclasses import dataclass, field

import torch

from spqt.errors import SpqtError
from spqt.grammar import AfterThinking, Grammar

MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability (0: off)
    repetition_penalty: float = 1.0  # a seen token's logit divided by it where positive, multiplied where not
    frequency_penalty: float = 0.0  # subtracted once for each time a token is in the answer so far
    presence_penalty: float = 0.0  # subtracted once where a token is in the answer so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    grammar: Grammar | AfterThinking | None = None  # structured output: only tokens that keep the text in it

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SpqtError(f"sampling needs a finite temperature >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpqtError(f"top-p must be in (0, 1] (1: off), got {self.top_p}")
        if self.top_k < -1:  # (-1: vLLM's "disabled", as 0)
            raise SpqtError(f"top-k must be >= 0 (0 or -1: off), got {self.top_k}")
        if not -(2**63) <= self.seed < 2**64:  # torch.Generator's seeds (the server's range too)
            raise SpqtError(f"the seed must be in [-2^63, 2^64), got {self.seed}")
        if not 0 <= self.min_p <= 1:
            raise SpqtError(f"min-p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise SpqtError(f"the repetition penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SpqtError(f"the {name.replace('_', ' ')} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias.items():
            if token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise SpqtError(f"logit bias {bias} of token {token}: token ids are >= 0, biases in "
                                f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")

    def shapes_logits(self) -> bool:
        """Whether the logits change before the choice (bias, penalties or a grammar): a greedy choice is then not
        the model's own argmax, so it needs the step's logits on the host side (no in-graph greedy token)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or \
            bool(self.presence_penalty) or self.grammar is not None


class LogitShaper:
    """Sampling's logit_bias, penalties and grammar over one generation: the bias as a vector, how often each token is
    in the answer (counts, float32 (vocab,)) and which tokens the prompt or the answer hold (seen, bool (vocab,)), on
    the logits' device, updated by add() without a host sync; the grammar's walk (matcher), on the host: with a grammar
    each call reads its mask from the host and each add() its token."""

    def __init__(self, s: Sampling, prompt: list[int], vocab: int, device: str | torch.device):
        self.s = s
        bad = [t for t in s.logit_bias if t >= vocab]
        if bad:
            raise SpqtError(f"logit bias of token {bad[0]}, outside the model's vocabulary of {vocab}")
        self.bias = None
        if s.logit_bias:
            self.bias = torch.zeros(vocab, dtype=torch.float32)
            self.bias[list(s.logit_bias)] = torch.tensor(list(s.logit_bias.values()), dtype=torch.float32)
            self.bias = self.bias.to(device)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if prompt:
            self.seen[torch.tensor(prompt, device=device)] = True
        self.matcher = s.grammar.matcher() if s.grammar is not None else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, vocab) float32 -> the shaped logits (a new tensor)."""
        s, logits = self.s, logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if s.repetition_penalty != 1.0:  # (a tiny penalty's quotient overflowed float32: an inf made the sample NaN)
            raised = (logits / s.repetition_penalty).clamp(max=torch.finfo(torch.float32).max)
            shrunk = torch.where(logits > 0, raised, logits * s.repetition_penalty)
            logits = torch.where(self.seen, shrunk, logits)
        if s.frequency_penalty:
            logits = logits - s.frequency_penalty * self.counts
        if s.presence_penalty:
            logits = logits - s.presence_penalty * (self.counts > 0).float()
        if self.matcher is not None:
            logits = logits.masked_fill(~self.matcher.allowed(logits.device), float("-inf"))
        return logits

    def add(self, token: torch.Tensor | int) -> None:
        """The answer's next token (an int, or a (1,) / 0-d tensor on the logits' device)."""
        at = torch.as_tensor(token, device=self.counts.device).view(-1)
        self.counts.index_add_(0, at, torch.ones(at.shape, dtype=torch.float32, device=at.device))
        self.seen.index_fill_(0, at, True)
        if self.matcher is not None:
            if at.numel() != 1:
                raise ValueError("a grammar walks one generation: one token at a time")
            self.matcher.consume(int(at[0]))


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits: (B, vocab) float32 (shaped already where Sampling.shapes_logits) -> (B,) int64."""
    if s.temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that 1 / T is inf in float32 (CUDA
        return logits.argmax(-1)  # divides by multiplying with it) or T itself rounds to 0: greedy
    # Shifted to a top logit of 0 first: the rest only go towards -inf, where a tiny temperature (1e-37) made
    # logits / temperature overflow float32 and the probabilities NaN. Softmax is shift-invariant, but not its
    # rounding: a seeded sample may differ from the unshifted one's in a rare near-tie. A temperature above float32's
    # largest value is that value: as inf (1e39 in float32) it made a grammar's -inf logits -inf / inf = NaN
    logits = (logits - logits.amax(-1, keepdim=True)) / min(s.temperature, torch.finfo(torch.float32).max)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:  # the fewest most likely tokens whose mass reaches top_p (transformers', vLLM's, llama.cpp's)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cat([torch.zeros_like(sorted_p[..., :1]), sorted_p.cumsum(-1)[..., :-1]], dim=-1)
        sorted_p = sorted_p.masked_fill(before >= s.top_p, 0.0)  # (the first's mass before is 0 < top_p: kept)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if s.min_p:  # of the most likely token's probability after top-k / top-p (which always keep it)
        probs = probs.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
