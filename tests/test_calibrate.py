"""Calibration: unified thresholds hit their target on held-out data, greedy averages to the target,
and the same text gives the same thresholds."""

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


@pytest.fixture(scope="module")
def calibrated(tiny_spqt):
    loaded = load_spqt(tiny_spqt)
    g = np.random.default_rng(123)
    calib = g.integers(0, loaded.config.vocab_size, 16384).tolist()
    levels = [0.25, 0.5, 0.65]
    result = calibrate(loaded, calib, levels, device="cpu", max_tokens=16384, greedy_tokens=256, ctx=256)
    loaded.thresholds = result
    return loaded, calib, levels, result


def test_unified_hits_target_on_held_out_data(calibrated):
    """On text not seen in calibration, the dense model's inputs fall below their thresholds at
    the target rate (per layer and input, within 1 point)."""
    from spqt.generate import build_model, sparse_linears

    loaded, _, levels, result = calibrated
    held_out = torch.from_numpy(np.random.default_rng(999).integers(0, loaded.config.vocab_size, (64, 256)))
    model = build_model(loaded, "cpu", torch.float32)
    seen = {}
    hooks = [lin.input_tap.register_forward_pre_hook(lambda mod, args, key=(layer, kind): seen.setdefault(key, []).append(args[0]))
             for layer, kind, lin in sparse_linears(model)]
    model.setup_cache(64, 256, torch.float32)
    with torch.no_grad():
        model(held_out, torch.arange(256))
    for h in hooks:
        h.remove()
    for s in levels:
        table = result["unified"][sp.level_key(s)]
        for (layer, kind), xs in seen.items():
            x = torch.cat([v.flatten() for v in xs]).abs()
            achieved = float((x <= table[layer][sp.INPUT_KINDS.index(kind)]).float().mean())
            assert abs(achieved - s) < 0.01, f"target {s}: layer {layer} {kind} achieved {achieved:.4f}"


def test_greedy_average_equals_target(calibrated):
    loaded, _, levels, result = calibrated
    share = np.array(_input_sizes(loaded.config), dtype=np.float64)
    share /= share.sum()
    for s in levels:
        allocations = np.array(result["greedy_allocations"][sp.level_key(s)])  # (layers, 4)
        assert allocations.shape == (loaded.config.n_layers, 4)
        np.testing.assert_allclose(allocations @ share, s, atol=1e-9)
        assert len(result["greedy"][sp.level_key(s)]) == loaded.config.n_layers


def test_calibration_is_deterministic(calibrated):
    loaded, calib, levels, result = calibrated
    again = calibrate(loaded, calib, levels, device="cpu", max_tokens=16384, greedy_tokens=256, ctx=256)
    assert again == result


def test_missing_level_is_a_clear_error(calibrated):
    from spqt.errors import SpqtError

    loaded = calibrated[0]
    with pytest.raises(SpqtError, match="no unified thresholds for sparsity 0.4"):
        Generator(loaded, "cpu", sparsity=0.4, max_len=64)
    with pytest.raises(SpqtError, match="sparsity must be in"):
        Generator(loaded, "cpu", sparsity=1.5, max_len=64)
