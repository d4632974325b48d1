"""Calibration: unified thresholds hit their target on held-out data (TEAL's |x| and WINA's
|x| * column norm), greedy averages to the target, the same text gives the same thresholds, and
the held-out check recommends a level that --sparsity auto uses."""

import numpy as np
import pytest
import torch

from spqt import sparsity as sp
from spqt.calibrate import MagnitudeHistogram, _input_sizes, calibrate
from spqt.checkpoint import load_spqt
from spqt.generate import Generator


def test_histogram_quantiles(rng):
    x = torch.from_numpy(rng.standard_t(4, 200000).astype(np.float32))
    h = MagnitudeHistogram("cpu")
    h.add(x)
    for s in (0.1, 0.25, 0.5, 0.9):
        t = h.quantile(s)
        got = float((x.abs() <= t).float().mean())
        assert abs(got - s) < 1e-3, f"s={s}: fraction below threshold {got:.4f}"


CRITERIA = ["teal", "wina"]


@pytest.fixture(scope="module", params=CRITERIA)
def calibrated(tiny_spqt, request):
    loaded = load_spqt(tiny_spqt)
    g = np.random.default_rng(123)
    calib = g.integers(0, loaded.config.vocab_size, 16384 + 512).tolist()
    levels = [0.25, 0.5, 0.65]
    # step 0.05: a quarter of the default's greedy trials (the test checks the bookkeeping, not the quality)
    result = calibrate(loaded, calib, levels, device="cpu", max_tokens=16384, greedy_tokens=256, ctx=256,
                       criterion=request.param, held_out_tokens=512, step=0.05)
    loaded.thresholds = result
    return loaded, calib, levels, result, request.param


def test_unified_hits_target_on_held_out_data(calibrated):
    """On text not seen in calibration, the dense model's inputs score below their thresholds at
    the target rate (per layer and input, within 1 point): |x| for TEAL, |x| * c for WINA."""
    from spqt.generate import build_model, sparse_linears

    loaded, _, levels, result, criterion = calibrated
    norms = loaded.ensure_column_norms()
    held_out = torch.from_numpy(np.random.default_rng(999).integers(0, loaded.config.vocab_size, (64, 256)))
    model = build_model(loaded, "cpu", torch.float32)
    seen = {}

    def score(x, layer, kind):
        a = x.abs()
        return a * norms[f"layers.{layer}.{kind}"] if criterion == "wina" else a

    hooks = [lin.input_tap.register_forward_pre_hook(
        lambda mod, args, key=(layer, kind): seen.setdefault(key, []).append(score(args[0], *key)))
        for layer, kind, lin in sparse_linears(model)]
    model.setup_cache(64, 256, torch.float32)
    with torch.no_grad():
        model(held_out, torch.arange(256))
    for h in hooks:
        h.remove()
    for s in levels:
        table = result[criterion]["unified"][sp.level_key(s)]
        for (layer, kind), xs in seen.items():
            x = torch.cat([v.flatten() for v in xs])
            achieved = float((x <= table[layer][sp.INPUT_KINDS.index(kind)]).float().mean())
            assert abs(achieved - s) < 0.01, f"target {s}: layer {layer} {kind} achieved {achieved:.4f}"


def test_greedy_average_equals_target(calibrated):
    """Greedy's per-input sparsities average to the target, weighted by the weights each input
    gates (rows x inputs of the matrices it feeds), and the run measures the same weighting."""
    loaded, calib, levels, result, criterion = calibrated
    c = loaded.config
    share = np.array([(c.q_dim + 2 * c.kv_dim) * c.dim, c.dim * c.q_dim, 2 * c.ffn_dim * c.dim, c.dim * c.ffn_dim],
                     dtype=np.float64)
    assert list(share) == _input_sizes(c)
    share /= share.sum()
    for s in levels:
        allocations = np.array(result[criterion]["greedy_allocations"][sp.level_key(s)])  # (layers, 4)
        assert allocations.shape == (loaded.config.n_layers, 4)
        np.testing.assert_allclose(allocations @ share, s, atol=1e-9)
        assert len(result[criterion]["greedy"][sp.level_key(s)]) == loaded.config.n_layers


def test_calibration_is_deterministic(calibrated):
    """The same text gives the same thresholds (the histograms; greedy then runs in a fixed order)."""
    loaded, calib, levels, result, criterion = calibrated
    again = calibrate(loaded, calib[:-512], levels, modes=("unified",), device="cpu", max_tokens=16384, ctx=256,
                      criterion=criterion, held_out_tokens=0)
    assert again[criterion]["unified"] == result[criterion]["unified"]


def test_held_out_check_recommends_a_measured_level(calibrated):
    """The recommendation is the highest measured level within +5 % of dense on the held-out
    tokens, and --sparsity auto (sparsity.auto_level) returns it."""
    loaded, calib, levels, result, criterion = calibrated
    rec = result["recommended"]
    assert rec["held_out_tokens"] == 512 and len(rec["held_out"]) == 2 * len(levels)
    within = [r for r in rec["held_out"] if r["ppl"] <= rec["dense_ppl"] * (1 + sp.MAX_LOSS)]
    assert rec["sparsity"] == max([r["sparsity"] for r in within], default=0.0)
    for r in rec["held_out"]:  # weight-weighted achieved sparsity near the target on unseen tokens
        assert abs(r["achieved"] - r["sparsity"]) < 0.1, r
    assert sp.auto_level(result, None, None) == (rec["criterion"] or criterion, rec["mode"] or "unified", rec["sparsity"])
    rows = [r for r in rec["held_out"] if r["mode"] == "greedy"]
    assert sp.auto_level(result, criterion, "greedy")[2] == sp.recommend(rows, rec["dense_ppl"])["sparsity"]


def test_missing_level_is_a_clear_error(calibrated):
    from spqt.errors import SpqtError

    loaded, criterion = calibrated[0], calibrated[-1]
    # the command keeps what a calibration of the criterion would replace: its levels, both modes
    with pytest.raises(SpqtError, match=f"no {criterion} unified thresholds for sparsity 0.4 .*; run spqt calibrate "
                                        f"--criterion {criterion} --mode both --sparsity 0.25,0.4,0.5,0.65 --data TEXT... on its "):
        Generator(loaded, "cpu", sparsity=0.4, max_len=64, criterion=criterion)
    other = "wina" if criterion == "teal" else "teal"  # a level the model has under its criterion only: named
    with pytest.raises(SpqtError, match=f"no {other} greedy thresholds for sparsity 0.5 \\(it has: none; "
                                        f"{criterion} unified and {criterion} greedy have 0.5\\)"):
        Generator(loaded, "cpu", sparsity=0.5, mode="greedy", max_len=64, criterion=other)
    with pytest.raises(SpqtError, match="sparsity must be in"):
        Generator(loaded, "cpu", sparsity=1.5, max_len=64)


def test_merge_recommends_across_criteria():
    """A second criterion's calibration on the same held-out tokens joins the first's rows; one
    without a held-out check drops its own stale rows; legacy thresholds become TEAL's."""
    from spqt.calibrate import merge

    def rec(crit, ppls, sha="abc"):
        rows = [{"criterion": crit, "mode": "unified", "sparsity": s, "ppl": p} for s, p in ppls]
        return {**sp.recommend(rows, 10.0), "max_loss": 0.05, "dense_ppl": 10.0, "held_out_sha256": sha, "ctx": 512,
                "held_out": rows}

    first = merge({"unified": {"0.5": [[1.0] * 4]}}, {"wina": {"unified": {}}, "recommended": rec("wina", [(0.25, 10.3), (0.5, 10.9)])})
    assert first["teal"] == {"unified": {"0.5": [[1.0] * 4]}} and first["recommended"]["sparsity"] == 0.25
    both = merge(first, {"teal": {"unified": {}}, "recommended": rec("teal", [(0.25, 10.1), (0.4, 10.45)])})
    assert (both["recommended"]["criterion"], both["recommended"]["sparsity"]) == ("teal", 0.4)
    assert len(both["recommended"]["held_out"]) == 4
    other_text = merge(first, {"teal": {"unified": {}}, "recommended": rec("teal", [(0.25, 10.1)], sha="def")})
    assert len(other_text["recommended"]["held_out"]) == 1
    unchecked = merge(both, {"teal": {"unified": {}}})
    assert (unchecked["recommended"]["criterion"], unchecked["recommended"]["sparsity"]) == ("wina", 0.25)


def test_default_mode_is_greedy_where_calibrated():
    table = [[0.1, 0.1, 0.1, 0.1]]
    both = {"teal": {"unified": {"0.5": table}, "greedy": {"0.5": table}}, "wina": {"unified": {"0.5": table}}}
    assert sp.default_mode(both, "teal") == "greedy"
    assert sp.default_mode(both, "wina") == "unified"  # no greedy tables for this criterion
    assert sp.default_mode({"unified": {"0.5": table}}, "teal") == "unified"  # legacy TEAL layout
    assert sp.default_mode({"teal": {"global": {"0.5": table}}}, "teal") == "global"  # --mode global alone


def test_allocate_finds_the_least_cost_levels():
    """The knapsack over block levels: mean exactly the target, and no other choice of levels
    with that mean costs less (brute force over 4 blocks x 6 levels)."""
    import itertools

    from spqt.calibrate import allocate
    from spqt.errors import SpqtError

    g = np.random.default_rng(5)
    costs = torch.from_numpy(np.cumsum(g.random((4, 6)), axis=1))
    costs[:, 0] = 0.0
    for target in (0.05, 0.1, 0.125):
        pick = allocate(costs, target, step=0.05)
        assert sum(pick) * 0.05 / 4 == pytest.approx(target)
        best = min(sum(float(costs[b, l]) for b, l in enumerate(ls))
                   for ls in itertools.product(range(6), repeat=4) if sum(ls) == sum(pick))
        assert sum(float(costs[b, l]) for b, l in enumerate(pick)) == pytest.approx(best)
    with pytest.raises(SpqtError, match="cannot reach"):
        allocate(costs, 0.3, step=0.05)


def test_global_mode_allocates_blocks_to_the_target(tiny_spqt):
    """Global: every block's level is one of the grid's, they average exactly to the target, each
    block's thresholds and per-input allocation are greedy's at that block level, and the measured
    costs start at 0 (dense) and never fall as the level rises. (Greedy is asked for every grid
    level, so that every block's thresholds can be compared; global's targets are 0.25 and 0.5.)"""
    from spqt.calibrate import GLOBAL_MAX, GLOBAL_STEP, global_grid
    from spqt.errors import SpqtError

    loaded = load_spqt(tiny_spqt)
    calib = np.random.default_rng(7).integers(0, loaded.config.vocab_size, 4096).tolist()
    grid = global_grid()
    result = calibrate(loaded, calib, grid, modes=("greedy", "global"), device="cpu", max_tokens=4096,
                       greedy_tokens=256, ctx=256, criterion="teal", held_out_tokens=0, step=0.05,
                       sensitivity_tokens=512)
    levels = [0.25, 0.5]
    out, record = result["teal"], result["_calibration"]["global"]
    share = np.array(_input_sizes(loaded.config), dtype=np.float64)
    share /= share.sum()
    rise = np.array(record["nll_rise"])
    assert rise.shape == (loaded.config.n_layers, 1 + len(global_grid()))
    assert (rise[:, 0] == 0).all() and (np.diff(rise, axis=1) >= 0).all()
    for s in levels:
        key = sp.level_key(s)
        block_levels = record["block_levels"][key]
        assert np.mean(block_levels) == pytest.approx(s)
        assert all(lv == 0 or round(lv / GLOBAL_STEP, 6).is_integer() for lv in block_levels)
        np.testing.assert_allclose(np.array(out["global_allocations"][key]) @ share, block_levels, atol=1e-9)
        for b, lv in enumerate(block_levels):
            expected = [-1.0] * 4 if lv == 0 else out["greedy"][sp.level_key(lv)][b]
            assert out["global"][key][b] == expected
        table = sp.select(result, s, "global", loaded.config.n_layers, "teal")
        assert table.shape == (loaded.config.n_layers, 4)
        assert sp.levels(result, s, "global", loaded.config.n_layers, "teal").tolist() == out["global_allocations"][key]
    with pytest.raises(SpqtError, match="cannot reach sparsity 0.9"):  # refused before any pass
        calibrate(loaded, calib, [GLOBAL_MAX + 0.1], modes=("global",), device="cpu", held_out_tokens=0)
