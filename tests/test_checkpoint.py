"""Readers (GGUF, HF), the .spqt file, and `spqt quantize` / `spqt inspect`, bad inputs included."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spqt.checkpoint import QuantizedWeight, load_model, load_spqt, quantize_source, save_spqt
from spqt.cli import main
from spqt.sources import open_source
from conftest import make_hf_checkpoint, sqnr_db


def test_hf_reader_and_spqt_round_trip(tiny_hf, tmp_path):
    src = open_source(tiny_hf)
    assert src.config.n_layers == 2 and src.config.n_kv_heads == 2
    model = quantize_source(src, "q4_k", "zigzag")
    out = tmp_path / "m.spqt"
    save_spqt(model, out)
    loaded = load_spqt(out)
    assert loaded.config == src.config
    assert loaded.kind == "q4_k-zigzag"
    qkv = loaded.weights["layers.1.qkv"]
    assert isinstance(qkv, QuantizedWeight) and qkv.shape == (64 + 2 * 32, 64)
    assert torch.equal(qkv.blocks, model.weights["layers.1.qkv"].blocks)
    assert loaded.parts["layers.1.gate_up"] == [160, 160]
    reference = torch.cat([src.tensor("layers.1.wq"), src.tensor("layers.1.wk"), src.tensor("layers.1.wv")])
    assert sqnr_db(reference, qkv.dequantize()) > 18
    assert loaded.weights["tok_embeddings"].dtype == torch.float16
    assert loaded.provenance["source_format"] == "hf" and len(loaded.provenance["source_sha256"]) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["m.spqt"], "a temporary file was left behind"


def test_sharded_hf_checkpoint(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "sharded", shards=3, tie=True)
    src = open_source(folder)
    assert src.config.tie_embeddings and "output" not in src.names
    assert src.tensor("layers.1.w2").shape == (64, 160)


def test_cli_quantize_and_inspect(tiny_hf, tmp_path, capsys):
    out = tmp_path / "row.spqt"
    assert main(["quantize", str(tiny_hf), "-o", str(out), "--layout", "row", "--device", "cpu"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "q4_k-row" in text and "bits per weight" in text
    assert load_spqt(out).weights["layers.0.down"].blocks.shape == (64, 1, 144)


def test_inspect_a_float_model_counts_its_maps_apart(tiny_hf, capsys, monkeypatch):
    """A GGUF or HF model loads its linear maps in float: inspect counts them on a line of their own, not as
    "other (embedding, norms)", and names the step before calibrate (which takes a .spqt). It reads layer 0's tensors
    alone and counts the others by its shapes (it read all, in float32: 280 GB for a 70B)."""
    from spqt.sources import SourceModel

    model = load_model(tiny_hf)
    assert model.config.n_layers > 1
    maps = sum(w.numel() for name, w in model.weights.items() if name.startswith("layers.") and w.dim() == 2)
    rest = sum(w.numel() * w.element_size() for name, w in model.weights.items()
               if not (name.startswith("layers.") and w.dim() == 2))
    read = []
    tensor = SourceModel.tensor
    monkeypatch.setattr(SourceModel, "tensor", lambda self, name: read.append(name) or tensor(self, name))
    assert main(["inspect", str(tiny_hf)]) == 0
    assert read and all(not name.startswith("layers.") or name.startswith("layers.0.") for name in read), read
    lines = {line[:12].strip(): line[13:] for line in capsys.readouterr().out.splitlines()}
    assert lines["float maps"].startswith(f"{maps * 4 / 1e6:.2f} MB for {maps / 1e6:.2f} M weights"), lines
    assert lines["other"].startswith(f"{rest / 1e6:.2f} MB (embedding, head, norms)"), lines
    assert lines["thresholds"] == "none (run spqt quantize, then spqt calibrate)"


def _no_new_files(folder: Path, before: set) -> None:
    assert set(os.listdir(folder)) == before, f"left behind: {set(os.listdir(folder)) - before}"


def _expect_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: error:") and fragment in err[0], err


def test_bad_inputs_give_one_line_and_no_file(tiny_hf, tmp_path, capsys):
    out = tmp_path / "out.spqt"
    before = set(os.listdir(tmp_path))
    _expect_error(capsys, ["quantize", str(tmp_path / "missing.gguf"), "-o", str(out)], "no such file")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    before.add("junk.bin")
    _expect_error(capsys, ["quantize", str(junk), "-o", str(out)], "neither a GGUF")
    _no_new_files(tmp_path, before)
    # unwritable output: its folder is a file
    _expect_error(capsys, ["quantize", str(tiny_hf), "-o", str(junk / "x.spqt")], "cannot write")
    _no_new_files(tmp_path, before)


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    _expect_error(capsys, ["quantize", str(bad), "-o", str(tmp_path / "o.spqt")], "GGUF")
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]


def _write_gguf(path: Path, arch: str, truncate: int = 0, layers: bool = True) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    if layers:
        w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate])
    return path


def test_unsupported_architecture_gguf(tmp_path, capsys):
    src = _write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    _expect_error(capsys, ["quantize", str(src), "-o", str(tmp_path / "o.spqt")], "unsupported architecture 'gpt2'")


def test_gguf_without_a_size_key(tmp_path, capsys):
    src = _write_gguf(tmp_path / "nolayers.gguf", "llama", layers=False)
    _expect_error(capsys, ["quantize", str(src), "-o", str(tmp_path / "o.spqt")],
                  "GGUF lacks the metadata key llama.block_count")


def test_truncated_gguf(tmp_path, capsys):
    src = _write_gguf(tmp_path / "cut.gguf", "llama", truncate=1000)
    _expect_error(capsys, ["quantize", str(src), "-o", str(tmp_path / "o.spqt")], "truncated")


def test_unsupported_architecture_hf(tmp_path, capsys):
    folder = make_hf_checkpoint(tmp_path / "m")
    cfg = (folder / "config.json").read_text().replace('"llama"', '"gpt_neox"')
    (folder / "config.json").write_text(cfg)
    _expect_error(capsys, ["quantize", str(folder), "-o", str(tmp_path / "o.spqt")], "unsupported architecture")


def test_corrupt_and_truncated_spqt(tiny_spqt, tmp_path, capsys):
    data = tiny_spqt.read_bytes()
    cut = tmp_path / "cut.spqt"
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(capsys, ["inspect", str(cut)], "not a valid .spqt")
    garbage = tmp_path / "garbage.spqt"
    garbage.write_bytes(os.urandom(1000))
    _expect_error(capsys, ["inspect", str(garbage)], "not a valid .spqt")


def test_spqt_rewrite_replaces_atomically(tiny_spqt, tmp_path):
    copy = tmp_path / "m.spqt"
    shutil.copy(tiny_spqt, copy)
    model = load_spqt(copy)
    model.thresholds = {"unified": {"0.5": [[0.1, 0.2, 0.3, 0.4]] * 2}}
    save_spqt(model, copy)
    assert load_spqt(copy).thresholds["unified"]["0.5"][1] == [0.1, 0.2, 0.3, 0.4]
    assert os.listdir(tmp_path) == ["m.spqt"]


def test_thresholds_and_column_norms_round_trip(tiny_spqt, tmp_path, capsys):
    """WINA's column norms (computed from the dequantized stored matrices, stacked ones whole) and
    thresholds of both criteria survive a save / load bit for bit; a wrong-shaped norm is one
    clear error; files from before criteria read as TEAL thresholds."""
    from spqt import sparsity as sp

    model = load_spqt(tiny_spqt)
    assert model.column_norms, "quantize stores the column norms"
    for name, norms in model.column_norms.items():
        w = model.weights[name].dequantize().double()
        expect = w.pow(2).sum(0).sqrt().float()  # ||W[:, k]||_2 over all rows (q|k|v, gate|up stacked)
        torch.testing.assert_close(norms, expect, rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(7)
    table = lambda: torch.rand(model.config.n_layers, 4, generator=g).tolist()  # noqa: E731
    model.thresholds = {"teal": {"unified": {"0.5": table()}}, "wina": {"greedy": {"0.4": table()}},
                        "recommended": {"criterion": "wina", "mode": "greedy", "sparsity": 0.4, "max_loss": 0.05,
                                        "dense_ppl": 12.5, "held_out": []}}
    copy = tmp_path / "m.spqt"
    save_spqt(model, copy)
    back = load_spqt(copy)
    assert back.thresholds == model.thresholds
    assert back.column_norms.keys() == model.column_norms.keys()
    for name in model.column_norms:
        assert torch.equal(back.column_norms[name], model.column_norms[name])
    assert "column_norm" not in " ".join(back.weights)
    assert sp.auto_level(back.thresholds, None, None) == ("wina", "greedy", 0.4)
    assert torch.equal(sp.select(back.thresholds, 0.4, "greedy", model.config.n_layers, "wina"),
                       torch.tensor(model.thresholds["wina"]["greedy"]["0.4"]))
    legacy = {"unified": {"0.5": table()}}
    assert sp.by_criterion(legacy)["teal"] == legacy and sp.default_criterion(legacy) == "teal"

    model.column_norms["layers.0.qkv"] = model.column_norms["layers.0.qkv"][:-1]
    save_spqt(model, copy)
    _expect_error(capsys, ["inspect", str(copy)], "column norms")
    model.column_norms["layers.0.qkv"] = torch.full_like(back.column_norms["layers.0.qkv"], float("nan"))
    save_spqt(model, copy)
    _expect_error(capsys, ["inspect", str(copy)], "non-finite column norms")


def test_inspect_names_a_dense_recommendation(tiny_spqt, tmp_path, capsys):
    """A held-out check where no level kept within the bound recommends dense (sparsity.recommend: criterion and mode
    None), as does a calibration without one that drops the measured rows (calibrate.merge); inspect says which
    instead of printing "None None sparsity 0"."""
    model = load_spqt(tiny_spqt)
    rows = [{"criterion": "teal", "mode": "unified", "sparsity": 0.5, "ppl": 20.0}]
    model.thresholds = {"teal": {"unified": {"0.5": [[1.0] * 4] * model.config.n_layers}},
                        "recommended": {"criterion": None, "mode": None, "sparsity": 0.0, "max_loss": 0.05,
                                        "dense_ppl": 12.5, "held_out": rows}}
    copy = tmp_path / "m.spqt"
    save_spqt(model, copy)
    assert main(["inspect", str(copy)]) == 0
    lines = {line[:12].strip(): line[13:] for line in capsys.readouterr().out.splitlines()}
    assert lines["recommended"] == "dense (no level's held-out perplexity within +5 % of dense)", lines
    model.thresholds["recommended"]["held_out"] = []  # a calibration without a held-out check dropped the rows
    save_spqt(model, copy)
    assert main(["inspect", str(copy)]) == 0
    lines = {line[:12].strip(): line[13:] for line in capsys.readouterr().out.splitlines()}
    assert lines["recommended"] == "dense (no level measured on held-out text)", lines


def test_check_thresholds_reads_the_nested_layout():
    """The hardened reader's check covers every criterion's tables, greedy allocations and the
    recommendation; the flat layout of older files is read as TEAL's; greedy levels come from the
    criterion's own allocations."""
    from spqt import sparsity as sp
    from spqt.errors import SpqtError

    rows = [[0.1, 0.2, 0.3, 0.4]] * 2
    alloc = [[0.5, 0.25, 0.5, 0.75]] * 2
    rec = {"criterion": "wina", "mode": "greedy", "sparsity": 0.5, "max_loss": 0.05, "dense_ppl": 9.0,
           "held_out": [{"criterion": "wina", "mode": "greedy", "sparsity": 0.5, "ppl": 9.2, "achieved": 0.5}]}
    good = {"teal": {"unified": {"0.5": rows}}, "wina": {"greedy": {"0.5": rows}, "greedy_allocations": {"0.5": alloc}},
            "recommended": rec}
    sp.check_thresholds(good, 2, "m")
    sp.check_thresholds({"unified": {"0.5": rows}, "greedy_allocations": {"0.5": alloc}}, 2, "m")  # legacy
    assert sp.levels(good, 0.5, "greedy", 2, "wina").tolist() == alloc
    assert sp.levels(good, 0.5, "greedy", 2, "teal").tolist() == [[0.5] * 4] * 2  # no teal allocation
    # a level as written, not rounded to float32 (0.65 would then be below a crossover of 0.65)
    assert sp.levels(good, 0.65, "unified", 2, "teal").tolist() == [[0.65] * 4] * 2
    assert sp.levels({"wina": {"greedy_allocations": {"0.5": [[0.65, 0.9, 0.1, 0.4]] * 2}}}, 0.5, "greedy", 2,
                     "wina").tolist() == [[0.65, 0.9, 0.1, 0.4]] * 2
    assert sp.levels({"greedy_allocations": {"0.5": alloc}, "greedy": {}}, 0.5, "greedy", 2).tolist() == alloc
    bad = [({**good, "wina": {"unified": {"0.5": rows[:1]}}}, "wina unified 0.5"),
           ({**good, "wina": {"greedy_allocations": {"0.5": [[float("inf")] * 4] * 2}}}, "greedy_allocations"),
           ({**good, "teal": [1]}, "criterion 'teal'"),
           ({**good, "recommended": {**rec, "criterion": "magnitude"}}, "unknown criterion"),
           ({**good, "recommended": {**rec, "sparsity": 1.5}}, "recommended sparsity"),
           ({**good, "recommended": {k: v for k, v in rec.items() if k != "dense_ppl"}}, "dense_ppl"),
           ({**good, "recommended": {**rec, "held_out": [{"ppl": "x"}]}}, "held_out")]
    for thresholds, why in bad:
        with pytest.raises(SpqtError, match=why):
            sp.check_thresholds(thresholds, 2, "m")


def _dithered_gguf_weight(tensor, generator) -> torch.Tensor:
    """A Q4_1 GGUF matrix with the rounding of its source restored as uniform noise.

    The default model ships as Q4_1: every 32 consecutive weights of a row sit on a 16-level grid.
    Row Q4_K groups rows the same way and nearly reproduces that grid (33-35 dB against the Q4_1
    values), zigzag groups columns and cannot (22 dB) - an artifact of the source, not of the
    layout (on the transposed matrix the two numbers swap exactly). Adding uniform noise of one
    Q4_1 step (its block scale d) gives back weights with the real distribution and no grid.
    """
    from gguf.quants import dequantize as gguf_dequantize

    rows = tensor.data.shape[0]
    w = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    blocks = np.ascontiguousarray(tensor.data).reshape(rows, -1, 20)  # Q4_1: fp16 d, fp16 m, 16 B
    step = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32))
    step = step.repeat_interleave(32, dim=1).reshape(w.shape)
    return w + (torch.rand(w.shape, generator=generator) - 0.5) * step


@pytest.mark.slow
def test_default_model_row_vs_zigzag_sqnr(default_gguf):
    """Real SmolLM2 weights: the zigzag layout is as accurate as llama.cpp's row layout (aggregate
    SQNR over every linear map of layers 0, 5, ..., 25, within 0.5 dB)."""
    import gguf

    import spqt

    reader = gguf.GGUFReader(str(default_gguf))
    tensors = {t.name: t for t in reader.tensors}
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % (1 << 62)))
    energy, noise = 0.0, {"row": 0.0, "zigzag": 0.0}
    for layer in range(0, 30, 5):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            w = _dithered_gguf_weight(tensors[f"blk.{layer}.{kind}.weight"], generator)
            energy += float(w.double().pow(2).sum())
            for layout in noise:
                back = spqt.dequantize(spqt.quantize(w, "q4_k", layout), "q4_k", layout, tuple(w.shape))
                noise[layout] += float((w.double() - back.double()).pow(2).sum())
    row, zig = (10 * np.log10(energy / noise[k]) for k in ("row", "zigzag"))
    print(f"aggregate SQNR: row {row:.2f} dB, zigzag {zig:.2f} dB")
    assert abs(row - zig) < 0.5, f"row {row:.2f} dB vs zigzag {zig:.2f} dB"


@pytest.mark.slow
def test_default_model_gguf_reader(default_gguf):
    model = load_model(default_gguf)
    c = model.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and model.kind == "float"
    assert model.weights["layers.0.qkv"].shape == (960, 576)
