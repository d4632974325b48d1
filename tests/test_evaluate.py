"""Perplexity (evaluate.py): several settings scored in one pass over the text give, bit for bit, what each
setting gives alone, computed here the plain way (every chunk's dense first half prefilled for each setting)."""

import math

import pytest
import torch

from spqt.checkpoint import load_spqt
from spqt.evaluate import perplexities, perplexity
from spqt.generate import Generator, achieved_sparsity, set_sparse, sparse_linears


def _whole_nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """evaluate.scored_nll's NLL from the logits of all the positions at once."""
    logits = model.logits(hidden)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   reduction="sum"))


@torch.inference_mode()
def _plain(gen: Generator, tokens: list[int], ctx: int, batch: int, method: str, score=None) -> tuple[float, dict]:
    """(NLL sum, achieved fractions) of gen's current setting, one setting a pass: the dense first half prefilled
    (all its logits computed) then the scored half, chunk by chunk, scored by `score` (None: evaluate.scored_nll, as
    perplexities scores); the maps' counters zeroed first."""
    from spqt.evaluate import scored_nll

    score = score or scored_nll
    model = gen.model
    for _, _, lin in sparse_linears(model):
        lin.counts.zero_()
    n, dev = len(tokens) // ctx, gen.device
    data = torch.tensor(tokens[: n * ctx], device=dev).view(n, ctx)
    first = ctx // 2 if method == "llamacpp" else 0
    sparse = gen.sparsity > 0
    model.setup_cache(batch, ctx, gen.dtype)
    nll = 0.0
    for start in range(0, n, batch):
        rows = data[start : start + batch]
        used = rows.shape[0]
        rows = torch.cat([rows, rows[:1].expand(batch - used, -1)])
        if first:
            set_sparse(model, False)
            model(rows[:, :first], torch.arange(first, device=dev), kv_len=first)
        set_sparse(model, sparse, track=sparse)
        hidden = model(rows[:, first:], torch.arange(first, ctx, device=dev), kv_len=ctx, head=False)[:used, :-1]
        nll += score(model, hidden, rows[:used, first + 1 :])
    achieved = achieved_sparsity(model) if sparse else {}
    set_sparse(model, False)
    model.setup_cache(1, gen.max_len, gen.dtype)
    return nll, achieved


CASES = [("cpu", 32, 2, "llamacpp", "teal"), ("cpu", 33, 8, "llamacpp", "wina"), ("cpu", 32, 3, "gptq", "teal"),
         pytest.param("cuda", 33, 4, "llamacpp", "wina", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,ctx,batch,method,criterion", CASES)
def test_settings_in_one_pass_equal_each_alone(tiny_spqt, rng, device, ctx, batch, method, criterion):
    """A sparse setting, dense, a higher table (TEAL), the first again; counts left on the maps before the call.
    Each result (NLL sum, ppl, achieved fractions) equals the plain computation's for that setting, bit for bit
    (odd ctx, a batch larger than the text's chunks, WINA's scales set between passes); the repeated setting
    gives the same; the counters end at zero; gen takes a new level afterwards (the thresholds made inside are
    not inference tensors). On CUDA the runtime's kernels (fp16), deterministic, give the same equalities."""
    loaded = load_spqt(tiny_spqt)
    gen = (Generator(loaded, "cpu", torch.float32, max_len=64, backend="reference") if device == "cpu"
           else Generator(loaded, "cuda", max_len=64, dense_fallback=False))
    tokens = rng.integers(0, loaded.config.vocab_size, 5 * ctx + 7).tolist()
    low = torch.from_numpy(rng.uniform(0.02, 0.2, (loaded.config.n_layers, 4))).float()
    settings = [lambda: gen.set_sparsity(0.3, table=low, criterion=criterion),
                lambda: gen.set_sparsity(0.0, criterion=criterion),
                lambda: gen.set_sparsity(0.6, table=3 * low, criterion="teal"),
                lambda: gen.set_sparsity(0.3, table=low, criterion=criterion)]
    for _, _, lin in sparse_linears(gen.model):
        lin.counts += torch.tensor([5.0, 9.0], dtype=torch.float64, device=lin.counts.device)  # stale: no setting's
    together = perplexities(gen, tokens, settings, ctx=ctx, method=method, batch=batch)
    assert all(float(lin.counts.abs().sum()) == 0 for _, _, lin in sparse_linears(gen.model))
    for setting, got in zip(settings, together):
        setting()
        nll, achieved = _plain(gen, tokens, ctx, batch, method)
        assert (got.nll_sum, got.achieved) == (nll, achieved)
        assert got.ppl == math.exp(nll / got.scored) and got.chunks == 5
    assert together[1].achieved == {}
    assert 0 < together[0].achieved["all"] < together[2].achieved["all"] < 1
    assert (together[0].nll_sum, together[0].achieved) == (together[3].nll_sum, together[3].achieved)
    gen.set_sparsity(0.5, table=low)
    assert perplexity(gen, tokens, ctx=ctx, method=method, batch=batch).achieved["all"] > 0


def test_the_head_scores_a_slice_of_positions_at_a_time(tiny_spqt, rng, monkeypatch):
    """The scored half's logits are made NLL_VALUES // vocab positions at a time, never a whole chunk's (the default
    model at ctx 8,192, gptq: 4.7 GB resident, 2.3 GB in slices): the head sees at most that many rows, and the NLL
    is the whole logits' cross-entropy within float32's rounding."""
    from spqt import evaluate

    loaded = load_spqt(tiny_spqt)
    gen = Generator(loaded, "cpu", torch.float32, max_len=64, backend="reference")
    tokens = rng.integers(0, loaded.config.vocab_size, 3 * 40 + 5).tolist()
    want = {}
    for method in evaluate.METHODS:
        whole, _ = _plain(gen, tokens, 40, 2, method, score=_whole_nll)
        want[method] = whole
    monkeypatch.setattr(evaluate, "NLL_VALUES", 3 * loaded.config.vocab_size)
    rows, logits = [], gen.model.logits
    # (scored_nll's slices come as one row of positions; a llamacpp prefill's last tokens as (batch, 1))
    monkeypatch.setattr(gen.model, "logits", lambda x: (x.shape[0] == 1 and rows.append(x.shape[1])) or logits(x))
    for method in evaluate.METHODS:
        rows.clear()
        got = perplexity(gen, tokens, ctx=40, method=method, batch=2)
        assert max(rows) == 3 and sum(rows) == got.scored, (method, rows)
        assert got.nll_sum == pytest.approx(want[method], rel=1e-6), method
