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


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """A weight with NaN or inf (a damaged checkpoint) has no quantized form and would poison every activation:
    `spqt quantize` says which tensor in one line, exit 2, and writes nothing; `spqt.quantize` refuses such a
    matrix; a finite one whose float32 sum overflows is not damaged."""
    import numpy as np
    import pytest
    from safetensors.torch import load_file, save_file

    from spqt.cli import main
    from spqt.errors import SpqtError

    folder = make_hf_checkpoint(tmp_path / "m", n_layers=2)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5:7] = torch.tensor([float("nan"), float("inf")])
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out.spqt"
    capsys.readouterr()
    assert main(["quantize", str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spqt: error: the checkpoint's tensor layers.1.w2 holds 2 NaN or infinite values"), err
    assert not list(tmp_path.glob("out*"))
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    w[1, 2] = np.nan
    with pytest.raises(SpqtError, match="holds 1 NaN or infinite values"):
        quantize(w, "q4_k", "zigzag")
    big = torch.full((2, 256), 3e38)  # finite; its sum is inf
    assert quantize(big, "q8_0", "row").shape == (2, 8, 34)
    # a float64 value past float32's range is infinite as encoded: refused, numpy and torch, not blocks of inf
    w64 = np.random.default_rng(1).standard_normal((4, 300))
    w64[2, 7] = 1e300
    for given in (w64, torch.from_numpy(w64)):
        with pytest.raises(SpqtError, match="holds 1 NaN or infinite values"):
            quantize(given, "q8_0", "zigzag")


def test_a_pytorch_bin_checkpoint_is_read_safely(tmp_path, capsys):
    """An older Hugging Face repository's pytorch_model*.bin (no .safetensors): the same tensors as the safetensors
    checkpoint, read with torch.load's weights_only (a pickle that would run code is refused, not run), memory-mapped
    where the format allows and read whole where not (the legacy format); a damaged file: one error line."""
    import json
    import pickle

    from safetensors.torch import load_file

    from spqt.cli import main

    reference = open_source(make_hf_checkpoint(tmp_path / "st"))
    for name, legacy in (("zip", False), ("legacy", True)):
        folder = make_hf_checkpoint(tmp_path / name)
        weights = next(folder.glob("*.safetensors"))
        state = load_file(weights)
        weights.unlink()
        keys = sorted(state)
        state["model.position_ids"] = torch.arange(8)  # an int64 buffer beside the weights: not read, no refusal
        for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :] + ["model.position_ids"])):
            torch.save({k: state[k] for k in part}, folder / f"pytorch_model-0000{i + 1}-of-00002.bin",
                       _use_new_zipfile_serialization=not legacy)
        if not legacy:  # the index names the files: a stray pytorch_model.bin beside them is not read
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
                k: f"pytorch_model-0000{1 + (k not in keys[: len(keys) // 2])}-of-00002.bin" for k in state}}))
            torch.save({"model.norm.weight": torch.zeros(64)}, folder / "pytorch_model.bin")
        source = open_source(folder)
        assert source.names == reference.names and source.config == reference.config
        for n in reference.names:
            assert torch.equal(source.tensor(n), reference.tensor(n)), (name, n)
        source.tensor("norm").mul_(2)  # a copy each read, as from safetensors
        assert torch.equal(source.tensor("norm"), reference.tensor("norm"))
    assert main(["quantize", str(tmp_path / "zip"), "-o", str(tmp_path / "zip.spqt")]) == 0

    class Hostile:
        def __reduce__(self):
            return (print, ("this ran",))

    bad = tmp_path / "zip" / "pytorch_model-00001-of-00002.bin"
    for payload in (lambda f: f.write_bytes(pickle.dumps({"model.norm.weight": Hostile()})),
                    lambda f: f.write_bytes(f.read_bytes()[:100]) if f.exists() else None):
        torch.save({"x": torch.ones(2)}, bad)
        payload(bad)
        capsys.readouterr()
        assert main(["quantize", str(tmp_path / "zip"), "-o", str(tmp_path / "bad.spqt")]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert "this ran" not in out and len(lines) == 1 and "not a readable PyTorch checkpoint" in lines[0], lines
    assert not (tmp_path / "bad.spqt").exists()


def test_a_sharded_checkpoint_reads_the_files_its_index_names(tmp_path, capsys):
    """model.safetensors.index.json names the weight files: another safetensors file beside the shards (Mistral's
    repositories hold a consolidated.safetensors of the same weights) is neither read nor hashed into the provenance;
    an index that lists a file the folder lacks, or one outside it, is refused in one line; an index none of whose
    files is there (an older repository's, its .bin files downloaded) leaves the .bin files read."""
    import json

    from safetensors.torch import load_file, save_file

    from spqt.cli import main

    folder = make_hf_checkpoint(tmp_path / "m", shards=2)
    reference = open_source(folder)
    weights = {n: reference.tensor(n) for n in reference.names}
    save_file({"model.norm.weight": torch.zeros(64)}, str(folder / "z-consolidated.safetensors"))
    source = open_source(folder)
    assert torch.equal(source.tensor("norm"), reference.tensor("norm"))
    assert source.provenance["source_sha256"] == reference.provenance["source_sha256"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["quantize", str(folder), "-o", str(tmp_path / "o.spqt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lists model-00003-of-00002.safetensors, which the folder lacks" in err[0], err
    assert not (tmp_path / "o.spqt").exists()
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["quantize", str(folder), "-o", str(tmp_path / "o.spqt")]) == 2
    assert "names ../elsewhere.safetensors, outside the folder" in capsys.readouterr().err
    # an older repository's index beside its .bin files, the safetensors not downloaded: the .bin files are read
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name.startswith("model-"):
            state.update(load_file(f))
        f.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    source = open_source(folder)
    assert source.names == reference.names and all(torch.equal(source.tensor(n), weights[n]) for n in weights)
