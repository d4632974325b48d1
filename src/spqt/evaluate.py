"""Perplexity, llama.cpp's way (default) or GPTQ/TEAL's, dense or with activation sparsity.

llama.cpp (llama-perplexity): the text tokenized once; consecutive non-overlapping chunks of `ctx`
tokens; if the model adds BOS, the first token of each chunk is replaced by BOS; the logits at
positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1 (255 scored tokens for ctx 512);
ppl = exp(mean NLL). Sparse: the first half of each chunk is a dense prefill into the KV cache,
the scored second half runs with the thresholds on, as sparse decoding computes it (the mask is
per token, so one batched pass equals token-by-token decoding).

gptq: windows of `ctx` tokens, every token after the first scored, all with the thresholds on.
"""

import math
from dataclasses import dataclass, field

import torch

from spqt.errors import SpqtError
from spqt.generate import Generator, achieved_sparsity, set_sparse

METHODS = ("llamacpp", "gptq")


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    scored: int
    chunks: int
    achieved: dict = field(default_factory=dict)


@torch.inference_mode()
def perplexity(gen: Generator, tokens: list[int], ctx: int = 512, method: str = "llamacpp",
               chunks: int | None = None, batch: int = 1, bos_id: int | None = None, progress: bool = False) -> PerplexityResult:
    """gen: a Generator (its thresholds already chosen, gen.sparsity > 0 means sparse);
    tokens: the whole text's ids. Returns perplexity and the sparsity achieved on scored tokens."""
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise SpqtError(f"unknown perplexity method {method!r}; choose one of {', '.join(METHODS)}")
    if ctx < 4 or ctx > gen.loaded.config.max_seq_len:
        raise SpqtError(f"--ctx must be between 4 and the model's context {gen.loaded.config.max_seq_len}")
    n_chunks = len(tokens) // ctx
    if chunks:
        n_chunks = min(n_chunks, chunks)
    if n_chunks == 0:
        raise SpqtError(f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}")
    model, dev = gen.model, gen.device
    model.setup_cache(batch, ctx, gen.dtype)
    data = torch.tensor(tokens[: n_chunks * ctx], dtype=torch.int64).view(n_chunks, ctx)
    if bos_id is not None:
        data[:, 0] = bos_id
    first = ctx // 2 if method == "llamacpp" else 0
    sparse = gen.sparsity > 0
    nll, scored = 0.0, 0
    bar = tqdm(total=n_chunks, desc=f"perplexity s={gen.sparsity:g}", unit="chunk", disable=not progress)
    for start in range(0, n_chunks, batch):
        rows = data[start : start + batch].to(dev)
        if rows.shape[0] < batch:  # the cache has a fixed batch: pad with copies, ignore them
            rows = torch.cat([rows, rows[:1].expand(batch - rows.shape[0], -1)])
        used = min(batch, n_chunks - start)
        if first:
            set_sparse(model, False)
            model(rows[:, :first], torch.arange(first, device=dev), kv_len=first)
        set_sparse(model, sparse, track=sparse)
        logits = model(rows[:, first:], torch.arange(first, ctx, device=dev), kv_len=ctx)[:used, :-1]
        targets = rows[:used, first + 1 :]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        scored += targets.numel()
        bar.update(used)
    bar.close()
    achieved = achieved_sparsity(model) if sparse else {}
    set_sparse(model, False)
    model.setup_cache(1, gen.max_len, gen.dtype)
    return PerplexityResult(math.exp(nll / scored), nll, scored, n_chunks, achieved)
