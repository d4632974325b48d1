"""scripts/oracle_selection.py: the per-token top-k oracle masks (a measurement script, tested on the tiny model)."""

import pytest
import torch

from spqt.checkpoint import load_model
from spqt.generate import Generator, set_sparse, sparse_linears
from conftest import script_module


@pytest.fixture(scope="module")
def oracle():
    return script_module("oracle_selection")


@pytest.fixture(scope="module")
def gen(tiny_spqt):
    return Generator(load_model(tiny_spqt), "cpu", max_len=64, backend="reference", dense_fallback=False)


def test_keep_count(oracle):
    assert oracle.keep_count(576, 0.5) == 288
    assert oracle.keep_count(576, 0.4) == 346  # ceil(345.6)
    assert oracle.keep_count(1536, 0.65) == 538  # ceil(537.6)
    assert oracle.keep_count(576, 0.25) == 432
    assert oracle.keep_count(100, 0.0) == 100


@pytest.mark.parametrize("wina", [False, True])
def test_topk_keep_is_the_top_k_of_each_token(oracle, rng, wina):
    x = torch.from_numpy(rng.standard_normal((3, 5, 37))).float()
    scale = torch.from_numpy(rng.uniform(0.5, 2.0, 37)).float() if wina else None
    keep = oracle.keep_count(37, 0.4)
    mask = oracle.topk_keep(x, keep, scale)
    score = x.abs() * (scale if wina else 1)
    assert mask.sum(-1).eq(keep).all()
    # every kept score is at least every dropped one, token by token (continuous data: no ties)
    low_kept = torch.where(mask, score, torch.inf).amin(-1)
    high_dropped = torch.where(mask, -torch.inf, score).amax(-1)
    assert (low_kept > high_dropped).all()
    direct = torch.zeros_like(mask).scatter_(-1, score.argsort(-1, descending=True)[..., :keep], True)
    assert torch.equal(mask, direct)


@pytest.mark.parametrize("criterion", ["teal", "wina"])
@pytest.mark.parametrize("scope", ["token", "chunk"])
def test_masked_map_equals_direct_product(oracle, gen, rng, criterion, scope):
    """One map under the hook: W (x * top-k mask) from the dequantized weights and column norms;
    token scope ranks each token's inputs, chunk scope all entries of a sequence's tokens together."""
    lin = gen.model.layers[1].feed_forward.down
    w = gen.loaded.weights["layers.1.down"].dequantize().float()
    norms = gen.loaded.ensure_column_norms()["layers.1.down"]
    assert torch.allclose(norms, torch.linalg.vector_norm(w.double(), dim=0).float())
    levels = {(layer, kind): 0.5 if (layer, kind) == (1, "down") else 0.0 for layer, kind, _ in sparse_linears(gen.model)}
    scales = {(layer, kind): gen.loaded.ensure_column_norms()[f"layers.{layer}.{kind}"] for layer, kind in levels} \
        if criterion == "wina" else None
    x = torch.from_numpy(rng.standard_normal((2, 7, lin.in_features))).float()
    score = x.abs() * (norms if criterion == "wina" else 1)
    if scope == "token":
        keep = oracle.keep_count(lin.in_features, 0.5)
        order = score.argsort(-1, descending=True)[..., :keep]
        mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True)
    else:
        keep = oracle.keep_count(7 * lin.in_features, 0.5)
        order = score.reshape(2, -1).argsort(-1, descending=True)[:, :keep]
        mask = torch.zeros((2, 7 * lin.in_features), dtype=torch.bool).scatter_(-1, order, True).view(x.shape)
        assert mask.sum(-1).min() < mask.sum(-1).max()  # tokens keep different counts
    expect = (x * mask) @ w.t()
    with oracle.OracleMasks(gen.model, levels, scales, scope) as masks:
        lin.sparse, lin.track = True, False
        try:
            y = lin(x)
        finally:
            lin.sparse = False
    masks.check()
    assert masks.counts[(1, "down")] == [int(mask.sum()), x.numel()]
    assert int(mask.sum()) == x.numel() // 2
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_level_zero_is_the_dense_model(oracle, gen):
    tokens = torch.randint(0, gen.loaded.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)
    gen.model.setup_cache(1, 64, torch.float32)
    dense = gen.model(tokens, pos, kv_len=12)
    levels = {(layer, kind): 0.0 for layer, kind, _ in sparse_linears(gen.model)}
    with oracle.OracleMasks(gen.model, levels) as masks:
        set_sparse(gen.model, True)
        try:
            masked = gen.model(tokens, pos, kv_len=12)
        finally:
            set_sparse(gen.model, False)
    assert masks.counts[(0, "qkv")][1] == 12 * gen.model.layers[0].attention.qkv.in_features  # the hooks ran
    assert torch.equal(dense, masked)


@pytest.mark.parametrize("scope", ["token", "chunk"])
def test_oracle_perplexity_counts_exactly_the_level(oracle, gen, scope):
    tokens = torch.randint(0, gen.loaded.config.vocab_size, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    r = oracle.oracle_perplexity(gen, tokens, 0.4, "wina", scope=scope, ctx=32, chunks=3)
    width = 1 if scope == "token" else 16  # a chunk's scored half: 16 tokens ranked together
    expect = {kind: 1 - oracle.keep_count(width * lin.in_features, 0.4) / (width * lin.in_features)
              for _, kind, lin in sparse_linears(gen.model)}
    for kind, value in expect.items():
        assert r["achieved"][kind] == pytest.approx(value, abs=1e-12)
    assert 0.39 < r["achieved"]["all"] <= 0.4
    assert r["chunks"] == 3 and r["scored_tokens"] == 3 * 15
    dense = oracle.threshold_perplexity(gen, tokens, 0.0, "teal", "unified", ctx=32, chunks=3)
    assert r["ppl"] != dense["ppl"]
    assert all(lin.threshold is None and not lin.sparse for _, _, lin in sparse_linears(gen.model))


@pytest.mark.parametrize("argv", [["--oracles", "teal:uniform:everything"], ["--baselines", "teal:best"],
                                  ["--levels", "0.5,1.5"], ["--data", "/nonexistent/wiki.txt"]])
def test_bad_options_are_one_error_line(oracle, capsys, argv):
    assert oracle.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: error: ")
