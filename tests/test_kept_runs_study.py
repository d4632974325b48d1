"""scripts/kept_runs_study.py: its chunk counts and column orders (a measurement script; the model run is in RESULTS)."""

import pytest
import torch

from conftest import script_module


@pytest.fixture(scope="module")
def study():
    return script_module("kept_runs_study")


def test_chunk_stats_counts_whole_aligned_chunks(study):
    assert study.CHUNKS == (8, 16, 32)
    k = 72  # two whole 32-chunks and a partial one
    identity = torch.arange(k)
    everything = torch.ones(3, k, dtype=torch.bool)
    assert study.chunk_stats(everything, identity) == [3 * 72, 3 * 72, 3 * 64, 3 * 64]
    # columns 0-15 kept, 16 dropped, 17-71 kept: the 8-chunk 16-23 and the 16- / 32-chunks holding 16 are not whole
    one_gap = torch.ones(1, k, dtype=torch.bool)
    one_gap[0, 16] = False
    assert study.chunk_stats(one_gap, identity) == [71, 64, 48, 32]
    alternate = (torch.arange(k) % 2 == 0).expand(2, k)
    assert study.chunk_stats(alternate, identity) == [72, 0, 0, 0]
    # read in an order that groups the kept columns first: they fill whole chunks
    grouped = torch.cat([torch.arange(0, k, 2), torch.arange(1, k, 2)])
    assert study.chunk_stats(alternate, grouped) == [72, 64, 64, 64]


def test_by_frequency_orders_most_kept_first(study):
    freq = torch.tensor([1, 5, 3, 5, 0, 2, 9, 4])
    order = study.by_frequency(freq)
    assert order.tolist() == [6, 1, 3, 7, 2, 5, 0, 4]  # ties keep their column order
    within = study.by_frequency(freq, group=4)  # sorted inside each group of 4, the groups in place
    assert within.tolist() == [1, 3, 2, 0, 6, 7, 5, 4]
    assert sorted(within.tolist()) == list(range(8))
