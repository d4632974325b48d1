"""The conversion pipeline (checkpoint.quantize_source) against the plain functions it runs."""

import torch

from spqt.checkpoint import LINEAR_GROUPS, QuantizedWeight, quantize_source
from spqt.mixes import group_types
from spqt.quant import quantize
from spqt.sources import open_source
from spqt.sparsity import column_norms
from conftest import make_hf_checkpoint


def test_pipeline_equals_the_plain_functions(tmp_path):
    """Workers, read-ahead and queue change nothing: every matrix's blocks are quantize()'s, its
    column norms column_norms()'s (run here on torch's own threads), other tensors as read, in the
    order the file has always had (the metadata lists them in it)."""
    source = open_source(make_hf_checkpoint(tmp_path / "m", n_layers=2, tie=False))
    threads = torch.get_num_threads()
    model = quantize_source(source, "q4_k_m", "zigzag")  # a mix: each matrix its own type
    assert torch.get_num_threads() == threads
    types = group_types("q4_k_m", 2)
    assert len(set(types.values())) > 1
    order = ["tok_embeddings", "norm", "output"]
    for i in range(2):
        order += [f"layers.{i}.attention_norm", f"layers.{i}.ffn_norm"] + [f"layers.{i}.{g}" for g in LINEAR_GROUPS]
    assert list(model.weights) == order
    assert list(model.column_norms) == [n for n in order if n in types]
    assert list(model.parts) == [n for n in order if n in types] + ["output"]  # the head, quantized last
    assert torch.equal(model.weights["tok_embeddings"], source.tensor("tok_embeddings").to(torch.float16))
    head = model.weights["output"]  # llama.cpp's output.weight recipe: Q6_K
    assert (head.fmt, head.layout) == ("q6_k", "zigzag")
    assert torch.equal(head.blocks, quantize(source.tensor("output"), "q6_k", "zigzag"))
    for name, fmt in types.items():
        i, group = name.split(".")[1], name.split(".")[2]
        w = torch.cat([source.tensor(f"layers.{i}.{m}") for m in LINEAR_GROUPS[group]])
        q = model.weights[name]
        assert (q.fmt, q.layout, q.shape) == (fmt, "zigzag", tuple(w.shape))
        assert torch.equal(q.blocks, quantize(w, fmt, "zigzag")), name
        assert torch.equal(model.column_norms[name], column_norms(QuantizedWeight(q.blocks, fmt, "zigzag", q.shape)))
