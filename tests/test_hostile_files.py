"""Hostile files: a bounded, seeded fuzz of the readers through the CLI.

Small valid GGUF, HF-safetensors and .spqt models are mutated (truncated at every section,
header bits flipped, absurd declared sizes and counts, wrong dtypes) and handed to `spqt
quantize`, `inspect` and `generate`, called in-process. Every case must end in exactly one
`spqt: error: ...` line and exit code 2: no traceback, no refusal left to the allocator (the
"out of memory" line), no resident-memory peak beyond the file's own size (times the 8x a
dequantization to float32 may take, plus a fixed allowance for the runtime), no file left behind.
Random bit flips in headers may also leave a file that is still valid (a flipped letter in a
name): those must then run cleanly (exit 0). Dtype changes that shrink a tensor (F32 declared
as F16) leave a readable file of other numbers, as they would for llama.cpp, and are not tried.
"""

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spqt.cli import main
from conftest import make_hf_checkpoint

SEED = 1802
# A fixed allowance for the interpreter's own working set during a case (torch, tokenizers);
# a declared absurd size would ask for gigabytes.
ALLOWANCE = 256 << 20


def _peak_rss_reset() -> int:
    """Resets VmHWM, the peak resident set, and returns the baseline to measure a case's peak from:
    the resident set now, or, where the kernel refuses the reset, the peak so far (a case is then
    still caught when it raises the process's peak beyond the bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return _rss("VmHWM")
    return _rss("VmRSS")


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


# ---------------------------------------------------------------- the valid files


def _gguf_from_hf(folder: Path, path: Path, down_type: str | None = None, split_max_tensors: int = 0,
                  tokenizer_model: str = "gpt2") -> Path:
    """The tiny HF checkpoint as a llama GGUF (gguf's writer): F32 norms, F16 / F32 / Q8_0
    matrices, a gpt2-style BPE vocabulary taken from the checkpoint's tokenizer. down_type "iq4_nl": ffn_down as
    IQ4_NL blocks of random codes with a scale of 1/64 (the gguf package has no IQ4_NL encoder). split_max_tensors:
    split into files of that many tensors as llama.cpp's gguf-split does (PATH-STEM-00001-of-0000N.gguf, ...; the
    first's path returned). tokenizer_model: the tokenizer.ggml.model key."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    t = load_file(str(folder / "model.safetensors"))
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    special = {a["content"]: a["id"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(None if split_max_tensors else str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_types([3 if p in special else 1 for p in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(special["<s>"])
    w.add_eos_token_id(special["</s>"])
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"].astype(np.float16))
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    w.add_tensor("output.weight", t["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in names.items():
            x = t[f"model.layers.{i}.{hf}.weight"]
            if g == "ffn_up":
                x = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"blk.{i}.{g}.weight", x, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
            if g == "ffn_down" and down_type == "iq4_nl":  # a block: fp16 scale, 16 bytes of 4-bit codes
                n, k = x.shape
                blocks = np.random.default_rng(i).integers(0, 256, (n, k // 32, 18), dtype=np.uint8)
                blocks[..., :2] = np.frombuffer(np.float16(1 / 64).tobytes(), np.uint8)
                w.add_tensor(f"blk.{i}.{g}.weight", blocks.reshape(n, -1),
                             raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
                continue
            w.add_tensor(f"blk.{i}.{g}.weight", x.astype(np.float16) if g == "attn_v" else x)
    w.write_header_to_file(path=path if split_max_tensors else None)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)[0] if split_max_tensors else path


# ---------------------------------------------------------------- mutations


def _flip(data: bytes, rng, lo: int, hi: int, flips: int = 1) -> bytes:
    b = bytearray(data)
    for _ in range(flips):
        pos = int(rng.integers(lo, hi))
        b[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _put(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


ABSURD_U64 = (0, 1 << 31, 1 << 40, (1 << 63) - 1, (1 << 64) - 1)


def gguf_cases(data: bytes, rng):
    """(label, bytes, may_succeed) for a valid GGUF."""
    import gguf

    tmp = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf", dir=tmp) as f:
        f.write(data)
        f.flush()
        reader = gguf.GGUFReader(f.name)
        fields = [fl for fl in reader.fields.values() if not fl.name.startswith("GGUF.")]
        infos = [t.field.offset for t in reader.tensors]
        tensors = [(t.field.offset, len(t.name), len(t.shape), t.data_offset, int(t.n_bytes), t.tensor_type)
                   for t in reader.tensors]
        data_start = reader.data_offset
    # truncation at every section boundary, and inside each
    cuts = {0, 3, 4, 6, 8, 12, 16, 20, 24, data_start, len(data) - 1}
    for fl in fields:
        cuts.update({fl.offset, fl.offset + 5, fl.offset + 8 + len(fl.name) + 2})
    for off in infos:
        cuts.update({off, off + 6})
    for info_off, name_len, n_dims, d_off, n_bytes, _ in tensors:
        cuts.update({d_off, d_off + n_bytes // 2})
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        yield f"gguf truncated at {cut}", data[:cut], False
    # header counts and version
    yield "gguf version 99", _put(data, 4, "<I", 99), False
    for v in ABSURD_U64:
        yield f"gguf n_tensors {v}", _put(data, 8, "<Q", v), False
        yield f"gguf n_kv {v}", _put(data, 16, "<Q", v), False
    # absurd string lengths and array counts in the metadata
    for fl in fields[:: max(1, len(fields) // 6)]:
        value_at = fl.offset + 8 + len(fl.name) + 4
        vtype = int(fl.types[0])
        if vtype == gguf.GGUFValueType.STRING:
            for v in (1 << 40, (1 << 64) - 1):
                yield f"gguf {fl.name} string length {v}", _put(data, value_at, "<Q", v), False
        elif vtype == gguf.GGUFValueType.ARRAY:
            for v in (1 << 40, (1 << 64) - 1):
                yield f"gguf {fl.name} array count {v}", _put(data, value_at + 4, "<Q", v), False
        yield f"gguf {fl.name} value type 99", _put(data, fl.offset + 8 + len(fl.name), "<I", 99), False
    # tensor infos: dims, n_dims, type, offset
    for info_off, name_len, n_dims, d_off, n_bytes, ttype in tensors[:: max(1, len(tensors) // 4)]:
        dims_at = info_off + 8 + name_len + 4
        type_at = dims_at + 8 * n_dims
        yield f"gguf tensor@{info_off} n_dims 200", _put(data, info_off + 8 + name_len, "<I", 200), False
        for v in (0, 1 << 40, (1 << 63) - 1):
            yield f"gguf tensor@{info_off} dim0 {v}", _put(data, dims_at, "<Q", v), False
        yield f"gguf tensor@{info_off} type 99", _put(data, type_at, "<I", 99), False
        wrong = {gguf.GGMLQuantizationType.F32: gguf.GGMLQuantizationType.I32,
                 gguf.GGMLQuantizationType.F16: gguf.GGMLQuantizationType.F32,
                 gguf.GGMLQuantizationType.Q8_0: gguf.GGMLQuantizationType.F32}[ttype]
        yield f"gguf tensor@{info_off} type {ttype.name} -> {wrong.name}", _put(data, type_at, "<I", int(wrong)), False
        for v in (1, 1 << 40, (1 << 64) - 1):
            yield f"gguf tensor@{info_off} offset {v}", _put(data, type_at + 4, "<Q", v), False
    for i in range(12):
        yield f"gguf header bit flip {i}", _flip(data, rng, 0, data_start, 1 + i % 3), True


def _safetensors_parts(data: bytes) -> tuple[int, dict]:
    n = struct.unpack_from("<Q", data, 0)[0]
    return n, json.loads(data[8 : 8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    n, _ = _safetensors_parts(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def safetensors_cases(data: bytes, rng, label: str):
    """(label, bytes, may_succeed) for a valid safetensors file (HF weights or a .spqt)."""
    n, header = _safetensors_parts(data)
    names = [k for k in header if k != "__metadata__"]
    ends = sorted({8, 8 + n} | {8 + n + header[k]["data_offsets"][1] for k in names})
    for cut in [0, 4, 8, 9, 8 + n // 2, 8 + n - 1] + [e - 3 for e in ends[2:: max(1, len(ends) // 5)]] + [len(data) - 1]:
        yield f"{label} truncated at {cut}", data[:cut], False
    for v in (0, 7, len(data), 1 << 40, (1 << 64) - 1):
        yield f"{label} header length {v}", _put(data, 0, "<Q", v), False
    picks = [names[int(i)] for i in rng.choice(len(names), size=min(4, len(names)), replace=False)]
    for k in picks:
        h = json.loads(json.dumps(header))
        dtype = h[k]["dtype"]
        h[k]["dtype"] = {"F32": "I32", "F16": "I16", "U8": "F32", "BF16": "I16"}.get(dtype, "BOOL")
        yield f"{label} {k} dtype {dtype} -> {h[k]['dtype']}", _with_header(data, h), False
        h = json.loads(json.dumps(header))
        h[k]["shape"] = [1 << 40] + h[k]["shape"][1:]
        yield f"{label} {k} shape absurd", _with_header(data, h), False
        h = json.loads(json.dumps(header))
        h[k]["data_offsets"] = [0, 1 << 40]
        yield f"{label} {k} offsets absurd", _with_header(data, h), False
    for i in range(6):
        yield f"{label} header bit flip {i}", _flip(data, rng, 0, 8 + n, 1), True


def spqt_metadata_cases(data: bytes):
    """(label, bytes, may_succeed): the SpQt JSON inside a valid .spqt with absurd or wrong values."""
    _, header = _safetensors_parts(data)
    meta = json.loads(header["__metadata__"]["spqt"])

    def edited(change):
        m = json.loads(json.dumps(meta))
        change(m)
        h = json.loads(json.dumps(header))
        h["__metadata__"]["spqt"] = json.dumps(m)
        return _with_header(data, h)

    yield "spqt metadata not JSON", _with_header(data, {**header, "__metadata__": {"spqt": "{oops"}}), False
    yield "spqt metadata a list", edited(lambda m: m.clear()), False
    for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "vocab_size", "max_seq_len"):
        for v in (0, -3, 1 << 40, "12", None):
            # head_dim 0 (or absent) means dim / n_heads: a valid file
            yield f"spqt config {key}={v!r}", edited(lambda m: m["config"].__setitem__(key, v)), key == "head_dim" and not v
    for key in ("norm_eps", "rope_theta"):
        yield f"spqt config {key}=-1", edited(lambda m: m["config"].__setitem__(key, -1.0)), False
    yield "spqt config bos_id beyond vocab", edited(lambda m: m["config"].__setitem__("bos_id", 1 << 40)), False
    for v in ([99], [-1], ["0"], 3):
        yield f"spqt config nope_layers={v!r}", edited(lambda m: m["config"].__setitem__("nope_layers", v)), False
    # Gemma 3's switches, unusable or without the tensors they need (post_norms: the layers' post norms)
    for key, v in (("sliding_layers", [99]), ("sliding_layers", [0]), ("sliding_window", -8), ("activation", "relu"),
                   ("embed_scale", 0), ("embed_scale", "8"), ("rope_local_theta", -1.0), ("post_norms", "yes"),
                   ("post_norms", True)):
        yield f"spqt config {key}={v!r}", edited(lambda m: m["config"].__setitem__(key, v)), False
    # Gemma 2's soft-caps: a negative, infinite or textual cap is refused; null reads as none (0)
    for key in ("attn_logit_softcap", "final_logit_softcap"):
        for v in (-1.0, float("inf"), "30", True, None):
            yield f"spqt config {key}={v!r}", edited(lambda m: m["config"].__setitem__(key, v)), v is None
    # partial RoPE's rotated dimensions: odd, negative, past the head or not an integer
    for v in (7, -2, 1 << 20, "12", True):
        yield f"spqt config rope_dims={v!r}", edited(lambda m: m["config"].__setitem__("rope_dims", v)), False
    # OLMo 2's switches: unusable values, whole-q/k norms without the q/k norms, no pre-norms without post-norms (the
    # tiny model has neither)
    for key, v in (("pre_norms", "no"), ("pre_norms", 0), ("pre_norms", False), ("qk_norm_scope", "row"),
                   ("qk_norm_scope", "all"), ("qk_norm", "yes")):
        yield f"spqt config {key}={v!r}", edited(lambda m: m["config"].__setitem__(key, v)), False
    yield "spqt no config", edited(lambda m: m.pop("config")), False
    yield "spqt format_version 99", edited(lambda m: m.__setitem__("format_version", 99)), False
    first = next(iter(meta["linears"]))
    yield "spqt linear format q9", edited(lambda m: m["linears"][first].__setitem__("format", "q9")), False
    yield "spqt linear format 5", edited(lambda m: m["linears"][first].__setitem__("format", 5)), False
    yield "spqt linear layout diagonal", edited(lambda m: m["linears"][first].__setitem__("layout", "diagonal")), False
    yield "spqt linear shape absurd", edited(lambda m: m["linears"][first].__setitem__("shape", [1 << 40, 1 << 40])), False
    yield "spqt linear shape wrong type", edited(lambda m: m["linears"][first].__setitem__("shape", "64x64")), False
    yield "spqt linears a list", edited(lambda m: m.__setitem__("linears", [])), False
    yield "spqt tokenizer garbage", edited(lambda m: m["tokenizer"].__setitem__("tokenizer_json", "{not json")), False
    yield "spqt tokenizer missing", edited(lambda m: m.pop("tokenizer")), False
    yield "spqt thresholds ragged", edited(lambda m: m.__setitem__("thresholds", {"unified": {"0.5": [[0.1], [0.2, 0.3]]}})), False
    yield "spqt thresholds a string", edited(lambda m: m.__setitem__("thresholds", "none")), False


def hf_config_cases(cfg: dict):
    """(label, config.json text, may_succeed) with absurd declared sizes."""
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim"):
        for v in (0, -1, 1 << 40, "64", None):
            # head_dim 0 or null means hidden_size / heads, and kv heads null means as many as heads
            benign = not v and (key == "head_dim" or (key == "num_key_value_heads" and v is None))
            yield f"hf config {key}={v!r}", json.dumps({**cfg, key: v}), benign
    yield "hf config rope_scaling garbage", json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3"}}), False
    yield "hf config a list", json.dumps([cfg]), False


# ---------------------------------------------------------------- the run


def _commands(model: Path, out_dir: Path, source: bool):
    cmds = [["inspect", str(model)], ["generate", str(model), "-p", "hello world", "-n", "2", "--device", "cpu"]]
    if source:
        cmds.append(["quantize", str(model), "-o", str(out_dir / "out.spqt"), "--device", "cpu"])
    return cmds


def _check(capsys, argv, label, size, may_succeed, folders):
    before = {f: sorted(p.name for p in f.iterdir()) for f in folders}
    base = _peak_rss_reset()
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    peak = _rss("VmHWM") - base
    err = [line for line in captured.err.splitlines() if line.strip()]
    where = f"case {label!r}, command {argv[0]}"
    assert "Traceback" not in captured.err, f"{where}: {captured.err}"
    assert peak <= ALLOWANCE + 8 * size, f"{where}: resident peak grew by {peak >> 20} MB for a {size >> 10} kB file"
    if code == 0 and may_succeed:
        for f in folders:
            for p in f.iterdir():
                if p.name == "out.spqt":
                    p.unlink()
    else:
        assert code == 2, f"{where}: exit {code}, stderr {err}"
        assert len(err) == 1 and err[0].startswith("spqt: error: "), f"{where}: stderr {err}"
        assert "out of memory" not in err[0], f"{where}: left to the allocator: {err[0]}"
    after = {f: sorted(p.name for p in f.iterdir()) for f in folders}
    assert after == before, f"{where}: files left behind: {after} (before {before})"
    return code


@pytest.fixture(scope="module")
def valid_models(tmp_path_factory):
    from spqt.checkpoint import quantize_source, save_spqt
    from spqt.sources import open_source

    root = tmp_path_factory.mktemp("hostile_base")
    hf = make_hf_checkpoint(root / "hf", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, seed=3)
    gguf_path = _gguf_from_hf(hf, root / "tiny.gguf")
    spqt_path = root / "tiny.spqt"
    save_spqt(quantize_source(open_source(hf), "q4_k", "zigzag"), spqt_path)
    return hf, gguf_path, spqt_path


def test_hostile_files(valid_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # progress bars are not error lines
    hf, gguf_path, spqt_path = valid_models
    rng = np.random.default_rng(SEED)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    start = time.perf_counter()
    tried = succeeded = 0

    # the unmutated files run (so the mutations below are what fails)
    for model, source in ((gguf_path, True), (hf, True), (spqt_path, False)):
        for argv in _commands(model, out_dir, source):
            assert _check(capsys, argv, "valid", 0, True, [out_dir]) == 0, argv

    work = tmp_path / "work"
    work.mkdir()
    case_gguf = work / "m.gguf"
    for label, data, may_succeed in gguf_cases(gguf_path.read_bytes(), rng):
        case_gguf.write_bytes(data)
        for argv in _commands(case_gguf, out_dir, True):
            tried += 1
            succeeded += _check(capsys, argv, label, len(data), may_succeed, [out_dir, work]) == 0

    case_spqt = work / "m.spqt"
    base = spqt_path.read_bytes()
    for label, data, may_succeed in [*safetensors_cases(base, rng, "spqt"), *spqt_metadata_cases(base)]:
        case_spqt.write_bytes(data)
        for argv in _commands(case_spqt, out_dir, False):
            tried += 1
            succeeded += _check(capsys, argv, label, len(data), may_succeed, [out_dir, work]) == 0
    case_spqt.unlink()

    case_hf = work / "hf"
    case_hf.mkdir()
    for f in hf.iterdir():
        (case_hf / f.name).write_bytes(f.read_bytes())
    weights = (hf / "model.safetensors").read_bytes()
    for label, data, may_succeed in safetensors_cases(weights, rng, "safetensors"):
        (case_hf / "model.safetensors").write_bytes(data)
        for argv in _commands(case_hf, out_dir, True):
            tried += 1
            succeeded += _check(capsys, argv, label, len(data), may_succeed, [out_dir, work, case_hf]) == 0
    (case_hf / "model.safetensors").write_bytes(weights)
    cfg = json.loads((hf / "config.json").read_text())
    for label, text, may_succeed in hf_config_cases(cfg):
        (case_hf / "config.json").write_text(text)
        for argv in _commands(case_hf, out_dir, True)[::2]:  # inspect and quantize read the same config
            tried += 1
            succeeded += _check(capsys, argv, label, len(weights), may_succeed, [out_dir, work, case_hf]) == 0

    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nhostile files: {tried} cases tried in {seconds:.0f} s, all refused with one error line "
              f"except {succeeded} bit flips that left a valid file and ran cleanly")
    assert tried > 300


def test_a_gguf_of_i_quants_is_read(tiny_hf, tmp_path):
    """An i-quant tensor (IQ4_NL here; IQ4_XS, IQ3_S, ... alike) is block-quantized, not integer: read through the
    gguf package's decoder, as a K-quant is. The reader refused every type whose name began with I."""
    import gguf

    from spqt.sources import open_source

    source = open_source(_gguf_from_hf(tiny_hf, tmp_path / "iq.gguf", down_type="iq4_nl"))
    reader = gguf.GGUFReader(str(tmp_path / "iq.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.IQ4_NL
    want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
        tuple(int(d) for d in reversed(t.shape)))
    assert np.array_equal(source.tensor("layers.1.w2").numpy(), want) and np.abs(want).max() > 0


def test_a_quantized_gguf_to_zigzag_gets_a_note(tiny_hf, tmp_path, capsys):
    """A GGUF whose weights are rounded already (Q8_0 up maps here) and a zigzag target: one note on stderr that names
    the file's quantized types and the cost, before the conversion; none for the row layout, with --gptq, or from a
    float source."""
    from spqt.cli import main
    from spqt.sources import open_source

    src = _gguf_from_hf(tiny_hf, tmp_path / "q8.gguf")
    assert open_source(src).weight_types == ("F16", "F32", "Q8_0")
    assert main(["quantize", str(src), "-o", str(tmp_path / "z.spqt"), "--device", "cpu"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spqt: note:")]
    assert len(notes) == 1 and "q8.gguf's weights are quantized already (Q8_0)" in notes[0], notes
    assert "zigzag Q4_K +13.8 %" in notes[0]
    book = tmp_path / "book.txt"
    book.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    for extra, source in ((["--layout", "row"], src), (["--gptq", str(book)], src), ([], tiny_hf)):
        assert main(["quantize", str(source), "-o", str(tmp_path / "o.spqt"), "--device", "cpu", *extra]) == 0
        assert "spqt: note:" not in capsys.readouterr().err, extra


def test_a_gguf_tokenizer_no_converter_builds_is_one_line(tiny_hf, tmp_path, capsys):
    """A GGUF whose tokenizer transformers cannot build (a tokenizer model it does not know here; on an older
    transformers, a newer family's architecture): one error line that names transformers' version and the way out,
    exit 2, nothing written."""
    import transformers

    from spqt.cli import main

    src = _gguf_from_hf(tiny_hf, tmp_path / "odd.gguf", tokenizer_model="no-such-model")
    out = tmp_path / "o.spqt"
    capsys.readouterr()
    assert main(["quantize", str(src), "-o", str(out), "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spqt:")]
    assert len(err) == 1 and "cannot build the tokenizer from its GGUF metadata" in err[0], err
    assert f"transformers {transformers.__version__}" in err[0] and "Hugging Face folder" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


def test_a_split_gguf_is_read_from_its_first_file(tiny_hf, tmp_path, capsys):
    """A GGUF split as llama.cpp's gguf-split splits it (a 70B's Q4_K_M comes so): read from its first file, the
    same tensors and config as the whole file; the second file passed, a file missing or renamed, or a file of
    another split: one clear error line each."""
    from spqt.sources import model_name, open_source

    whole = open_source(_gguf_from_hf(tiny_hf, tmp_path / "whole.gguf"))
    first = _gguf_from_hf(tiny_hf, tmp_path / "split" / "tiny.gguf", split_max_tensors=8)
    files = sorted(first.parent.iterdir())
    assert first.name == "tiny-00001-of-00003.gguf" and len(files) == 3, files
    split = open_source(first)
    assert split.config == whole.config and split.names == whole.names
    for name in whole.names:
        assert torch.equal(split.tensor(name), whole.tensor(name)), name
    assert split.provenance["source_files"] == 3
    assert (model_name(first), model_name(tmp_path / "whole.gguf")) == ("tiny", "whole")  # serve's model id
    out = tmp_path / "o.spqt"

    def refused(source: Path, fragment: str) -> None:
        capsys.readouterr()
        assert main(["quantize", str(source), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("spqt: error:") and fragment in err[0], err
        assert not out.exists()

    assert main(["quantize", str(first), "-o", str(out)]) == 0  # the whole pipeline, tokenizer included
    out.unlink()
    refused(files[1], "file 2 of a GGUF split into 3 files; pass the first")
    files[1].rename(tmp_path / "second.gguf")  # the first file named as the second
    first.rename(files[1])
    refused(files[1], "pass the first, named PREFIX-00001-of-00003.gguf")
    files[1].rename(first)
    (tmp_path / "second.gguf").rename(files[1])
    renamed = first.with_name("tiny.gguf")
    first.rename(renamed)
    refused(renamed, "pass the first, named PREFIX-00001-of-00003.gguf")
    renamed.rename(first)
    files[2].rename(tmp_path / "away.gguf")
    refused(first, "tiny-00003-of-00003.gguf is missing")
    other = _gguf_from_hf(tiny_hf, tmp_path / "other" / "tiny.gguf", split_max_tensors=12)  # 2 files
    (other.parent / "tiny-00002-of-00002.gguf").rename(files[2])
    refused(first, "not file 3 of 3")
    # a split key that is not an integer (a damaged or hand-made file): one error line, not int()'s traceback
    from types import SimpleNamespace

    from spqt.errors import SpqtError
    from spqt.sources import _gguf_split

    field = SimpleNamespace(contents=lambda: "three")
    with pytest.raises(SpqtError, match="GGUF metadata key split.count is not an integer \\('three'\\)"):
        _gguf_split(first, SimpleNamespace(fields={"split.count": field}), {})


def test_an_embedding_past_fp16s_range_is_refused(tiny_hf, tmp_path, capsys):
    """spqt quantize of a checkpoint whose embedding holds values past fp16's range (the .spqt file's dtype for it:
    they would load as infinities, every activation NaN): one error line naming the tensor, exit 2, no file. (NaN or
    infinite weights are refused as they are read: test_conversion.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    from spqt.cli import main

    folder = tmp_path / "big"
    shutil.copytree(tiny_hf, folder)
    path = next(folder.glob("*.safetensors"))
    tensors = load_file(path)
    name = next(n for n in tensors if "embed_tokens" in n)
    tensors[name] = tensors[name] * 1e6
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "big.spqt"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["quantize", str(folder), "-o", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spqt:")]
    assert len(errors) == 1 and "tok_embeddings holds values past the range of float16" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no file, no temporary one
