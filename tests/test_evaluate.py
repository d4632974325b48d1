"""Perplexity (evaluate.py): several settings scored in one pass over the text give, bit for bit, what each
setting gives alone, and each its own achieved sparsity."""

import pytest
import torch

from spqt.checkpoint import load_spqt
from spqt.evaluate import perplexities, perplexity
from spqt.generate import Generator


@pytest.mark.parametrize("method", ["llamacpp", "gptq"])
def test_settings_in_one_pass_equal_each_alone(tiny_spqt, rng, method):
    """Dense, two threshold tables and dense again, in one pass (each chunk's first half prefilled once under
    llama.cpp's method, the settings' scored halves one after another on it) against perplexity() per setting:
    the same NLL sums and achieved fractions, bit for bit; a later setting's passes do not see an earlier one's
    counts, and a dense setting reports none. Random text and thresholds, a partial last batch."""
    loaded = load_spqt(tiny_spqt)
    gen = Generator(loaded, "cpu", torch.float32, max_len=64, backend="reference")
    tokens = rng.integers(0, loaded.config.vocab_size, 5 * 32 + 7).tolist()
    layers = loaded.config.n_layers
    low = torch.from_numpy(rng.uniform(0.02, 0.2, (layers, 4))).float()
    tables = [low, 3 * low]  # the second drops more
    settings = [lambda: gen.set_sparsity(0.0), lambda: gen.set_sparsity(0.3, table=tables[0]),
                lambda: gen.set_sparsity(0.6, table=tables[1]), lambda: gen.set_sparsity(0.0)]
    together = perplexities(gen, tokens, settings, ctx=32, method=method, batch=2)
    for setting, got in zip(settings, together):
        setting()
        alone = perplexity(gen, tokens, ctx=32, method=method, batch=2)
        assert (got.nll_sum, got.scored, got.chunks, got.achieved) == (alone.nll_sum, alone.scored, alone.chunks,
                                                                         alone.achieved)
    assert together[0].achieved == {} and together[3].achieved == {}
    assert 0 < together[1].achieved["all"] < together[2].achieved["all"] < 1
    assert together[0].nll_sum == together[3].nll_sum and together[1].nll_sum != together[0].nll_sum
