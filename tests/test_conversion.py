"""The conversion pipeline (checkpoint.quantize_source) against the plain functions it runs, and the
tokenizer built in a child process (tokenizer_spec.ChildTokenizer) against the in-process build."""

import json
import os

import pytest
import torch

from spqt.checkpoint import LINEAR_GROUPS, QuantizedWeight, quantize_source
from spqt.errors import SpqtError
from spqt.mixes import group_types
from spqt.quant import quantize
from spqt.sources import open_source
from spqt.sparsity import column_norms
from spqt.tokenizer_spec import CHILD_MIN_BYTES, ChildTokenizer, _child_main, gguf_tokenizer, start_gguf_tokenizer
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
    assert list(model.column_norms) == list(model.parts) == [n for n in order if n in types]
    for name in ("tok_embeddings", "output"):
        assert torch.equal(model.weights[name], source.tensor(name).to(torch.float16))
    for name, fmt in types.items():
        i, group = name.split(".")[1], name.split(".")[2]
        w = torch.cat([source.tensor(f"layers.{i}.{m}") for m in LINEAR_GROUPS[group]])
        q = model.weights[name]
        assert (q.fmt, q.layout, q.shape) == (fmt, "zigzag", tuple(w.shape))
        assert torch.equal(q.blocks, quantize(w, fmt, "zigzag")), name
        assert torch.equal(model.column_norms[name], column_norms(QuantizedWeight(q.blocks, fmt, "zigzag", q.shape)))


def test_small_or_other_files_build_their_tokenizer_in_process(tmp_path):
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF" + bytes(100))
    other = tmp_path / "big.bin"
    with open(other, "wb") as f:
        f.truncate(CHILD_MIN_BYTES)  # sparse: no disk used
    assert start_gguf_tokenizer(small) is None and start_gguf_tokenizer(other) is None
    assert start_gguf_tokenizer(tmp_path / "missing.gguf") is None


@pytest.mark.slow
def test_child_tokenizer_equals_in_process(default_gguf, tmp_path, capsys):
    """The default model's tokenizer from the child process is the in-process one; a file the
    child cannot read, or a child that dies, ends in one SpqtError line."""
    child = start_gguf_tokenizer(default_gguf)
    assert isinstance(child, ChildTokenizer)
    assert gguf_tokenizer(default_gguf) == child()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(300))
    assert _child_main([str(junk)]) == 2  # what the child answers, run here
    answer = json.loads(capsys.readouterr().out)
    assert answer["error"].startswith(f"{junk}: cannot build the tokenizer from its GGUF metadata")
    killed = ChildTokenizer(junk)
    killed._proc.kill()
    with pytest.raises(SpqtError, match="exited with code -9") as e:
        killed()
    assert "\n" not in str(e.value)
    dropped = ChildTokenizer(junk)
    dropped.cancel()
    assert dropped._proc.returncode is not None  # killed and reaped
