"""Perplexity, llama.cpp's way (default) or GPTQ/TEAL's, dense or with activation sparsity.

llama.cpp (llama-perplexity): the text tokenized once, BOS first where the model adds one (the caller's tokens:
spqt perplexity's are llama-perplexity's); consecutive non-overlapping chunks of `ctx`
tokens; if the model adds BOS, the first token of each chunk is replaced by BOS; the logits at
positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1 (255 scored tokens for ctx 512);
ppl = exp(mean NLL). Sparse: the first half of each chunk is a dense prefill into the KV cache,
the scored second half runs with the thresholds on, as sparse decoding computes it (the mask is
per token, so one batched pass equals token-by-token decoding).

gptq: windows of `ctx` tokens, every token after the first scored, all with the thresholds on.

Several settings (sparsity levels, modes) are scored in one pass over the text (`perplexities`): a chunk's
dense first half is prefilled once (its keys and values, its last token's logits alone), then each setting
runs the scored half on it, which writes only the cache's later positions. k settings cost k + 1 halves a
chunk instead of 2k (gptq's windows have no dense part: k passes, as before), and each result is the one that
setting alone gives, bit for bit.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spqt.errors import SpqtError
from spqt.generate import Generator, achieved_sparsity, non_finite_error, set_sparse, sparse_linears

METHODS = ("llamacpp", "gptq")


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    scored: int
    chunks: int
    achieved: dict = field(default_factory=dict)


def perplexity(gen: Generator, tokens: list[int], ctx: int = 512, method: str = "llamacpp",
               chunks: int | None = None, batch: int = 1, bos_id: int | None = None, progress: bool = False) -> PerplexityResult:
    """gen: a Generator (its thresholds already chosen, gen.sparsity > 0 means sparse);
    tokens: the whole text's ids. Returns perplexity and the sparsity achieved on scored tokens."""
    return perplexities(gen, tokens, [lambda: None], ctx=ctx, method=method, chunks=chunks, batch=batch,
                        bos_id=bos_id, progress=progress)[0]


NLL_VALUES = 2**24  # logits scored_nll computes at once (positions x vocab: 64 MB of float32, its log-softmax as much)


def scored_nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """The summed negative log-likelihood of targets (B, T) int64 under the logits of the last layer's output hidden
    (B, T, D) (model.forward's head=False), the head run over NLL_VALUES // vocab positions at a time: the logits of a
    whole chunk were positions x vocab floats twice over (the default model's vocab of 49,152, ctx 8,192, gptq, on the
    CPU: 4.7 GB resident, 2.3 GB in slices, 1.7 GB at ctx 1,024; a 128k vocabulary's, batch 16, tens of GB on a GPU)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat = targets.reshape(-1)
    step = max(1, NLL_VALUES // model.config.vocab_size)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)  # (one read at the end: no sync a slice)
    for a in range(0, rows.shape[0], step):
        logits = model.logits(rows[a:a + step].unsqueeze(0))[0]
        total += torch.nn.functional.cross_entropy(logits, flat[a:a + step], reduction="sum").double()
    return float(total)


@torch.inference_mode()
def perplexities(gen: Generator, tokens: list[int], settings: list[Callable[[], None]], ctx: int = 512,
                 method: str = "llamacpp", chunks: int | None = None, batch: int = 1, bos_id: int | None = None,
                 progress: bool = False) -> list[PerplexityResult]:
    """perplexity under each of `settings`, callables that set gen's thresholds (gen.set_sparsity(...)), in one
    pass over the text (module doc); one result a setting, in order. gen is left as the last setting made it;
    the maps' achieved-sparsity counters are left at zero."""
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

    def apply(setting) -> None:
        with torch.inference_mode(False):  # thresholds made here stay usable outside inference mode
            setting()

    model, dev = gen.model, gen.device
    data = torch.tensor(tokens[: n_chunks * ctx], dtype=torch.int64).view(n_chunks, ctx)
    if bos_id is not None:
        data[:, 0] = bos_id
    first = ctx // 2 if method == "llamacpp" else 0
    last = torch.tensor([first - 1], device=dev) if first else None
    nll = [0.0] * len(settings)
    # the maps' counters ([dropped, seen] float64, on the device) run on through the call; a sparse setting takes
    # what its passes added (counts from before the call belong to none)
    maps = [lin for _, _, lin in sparse_linears(model)]
    counted = [None] * len(settings)
    before = torch.stack([lin.counts for lin in maps])
    scored = 0
    if len(settings) == 1:
        apply(settings[0])  # once: the bar names its level, and no pass switches away from it
    desc = f"perplexity s={gen.sparsity:g}" if len(settings) == 1 else f"perplexity, {len(settings)} settings"
    model.setup_cache(batch, ctx, gen.dtype)
    bar = tqdm(total=n_chunks, desc=desc, unit="chunk", disable=not progress)
    try:
        for start in range(0, n_chunks, batch):
            rows = data[start : start + batch].to(dev)
            if rows.shape[0] < batch:  # the cache has a fixed batch: pad with copies, ignore them
                rows = torch.cat([rows, rows[:1].expand(batch - rows.shape[0], -1)])
            used = min(batch, n_chunks - start)
            if first:
                set_sparse(model, False)
                model(rows[:, :first], torch.arange(first, device=dev), kv_len=first, select=last)
            targets = rows[:used, first + 1 :]
            for i, setting in enumerate(settings):
                if len(settings) > 1:
                    apply(setting)
                sparse = gen.sparsity > 0
                set_sparse(model, sparse, track=sparse)
                hidden = model(rows[:, first:], torch.arange(first, ctx, device=dev), kv_len=ctx, head=False)
                nll[i] += scored_nll(model, hidden[:used, :-1], targets)
                if sparse:
                    now = torch.stack([lin.counts for lin in maps])
                    counted[i] = now - before if counted[i] is None else counted[i] + (now - before)
                    before = now
            scored += targets.numel()
            bar.update(used)
    finally:
        bar.close()
        set_sparse(model, False)
        for lin in maps:
            lin.counts.zero_()
        model.setup_cache(1, gen.max_len, gen.dtype)
    if not all(math.isfinite(total) for total in nll):  # a NaN or infinite logit makes the sum so
        raise non_finite_error(gen.dtype, "of the text")
    return [PerplexityResult(math.exp(total / scored), total, scored, n_chunks,
                             achieved_sparsity(model, reset=False, counts=per_map) if per_map is not None else {})
            for total, per_map in zip(nll, counted)]
