"""The .spqt model file, and loading any model (.spqt, .gguf, HF folder) into canonical weights.

A .spqt file is a safetensors container. Tensors::

    tok_embeddings (V, D) fp16        output (V, D) fp16, absent when tied to the embedding
    norm, layers.{i}.attention_norm, layers.{i}.ffn_norm (D,) fp32
    layers.{i}.{qkv,o,gate_up,down}  uint8 quantized blocks, grid as in layouts.py:
        qkv     = rows of wq | wk | wv    (q_dim + 2 kv_dim, D)     one input, one index list
        o       = wo                      (D, q_dim)
        gate_up = rows of w1 | w3         (2 F, D)                  one input, one index list
        down    = w2                      (D, F)

The safetensors metadata key ``spqt`` holds versioned JSON: format_version, config
(ModelConfig), tokenizer (tokenizers JSON, chat template), linears (format, layout, shape, parts
per tensor: a mix stores each matrix in its own format), thresholds (sparsity.py) and provenance (source hash, tool version, date).
Files are written to a temporary name in the target folder and renamed.
"""

import datetime
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

import spqt
from spqt.config import ModelConfig
from spqt.errors import SpqtError
from spqt.formats import FORMATS, get_format
from spqt.layouts import check_layout, grid_shape
from spqt.mixes import check_quant_type, group_types
from spqt.quant import dequantize, quantize
from spqt.sources import SourceModel, TokenizerSpec, open_source

FORMAT_VERSION = 1

# Fused linear maps: canonical name -> the source matrices stacked along rows (outputs).
LINEAR_GROUPS = {"qkv": ("wq", "wk", "wv"), "o": ("wo",), "gate_up": ("w1", "w3"), "down": ("w2",)}


@dataclass
class QuantizedWeight:
    """A quantized (N, K) matrix: uint8 blocks in a named format and layout."""

    blocks: torch.Tensor  # uint8 (grid_rows, grid_cols, block_bytes)
    fmt: str
    layout: str
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """float32 (N, K) on the blocks' device."""
        return dequantize(self.blocks, self.fmt, self.layout, self.shape)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


@dataclass
class LoadedModel:
    """Everything the runtime needs. weights: canonical fused names -> float tensor or QuantizedWeight."""

    config: ModelConfig
    tokenizer: TokenizerSpec
    weights: dict
    parts: dict  # linear name (e.g. "layers.0.qkv") -> row counts of its stacked matrices
    thresholds: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def kind(self) -> str:
        """'q4_k-zigzag', 'q6_k-row', 'q6_k+q4_k-zigzag' (a mix: its types, widest first) or 'float'."""
        w = self.weights.get("layers.0.qkv")
        # QuantizedWeight, or the kernels' GpuQ4K (synthetic models); a float tensor has no fmt
        if not hasattr(w, "fmt"):
            return "float"
        used = {v.fmt for v in self.weights.values() if hasattr(v, "fmt")}
        return f"{'+'.join(f for f in FORMATS if f in used)}-{w.layout}"


def _parts(config: ModelConfig) -> dict:
    return {"qkv": [config.q_dim, config.kv_dim, config.kv_dim], "o": [config.dim],
            "gate_up": [config.ffn_dim, config.ffn_dim], "down": [config.dim]}


def fused_float_weights(source: SourceModel, progress: bool = False) -> LoadedModel:
    """A source model's weights as given (float32), with linear groups stacked."""
    from tqdm.auto import tqdm

    cfg = source.config
    weights = {name: source.tensor(name) for name in ("tok_embeddings", "norm", "output") if name in source.names}
    parts = {}
    for i in tqdm(range(cfg.n_layers), desc="loading", unit="layer", disable=not progress):
        for norm in ("attention_norm", "ffn_norm"):
            weights[f"layers.{i}.{norm}"] = source.tensor(f"layers.{i}.{norm}")
        for group, members in LINEAR_GROUPS.items():
            weights[f"layers.{i}.{group}"] = torch.cat([source.tensor(f"layers.{i}.{m}") for m in members], dim=0)
            parts[f"layers.{i}.{group}"] = _parts(cfg)[group]
    return LoadedModel(config=cfg, tokenizer=source.tokenizer, weights=weights, parts=parts,
                       provenance=dict(source.provenance))


def quantize_source(source: SourceModel, fmt: str = "q4_k", layout: str = "zigzag",
                    device: str = "cpu", progress: bool = False) -> LoadedModel:
    """Quantize every linear map of a source model; embeddings fp16, norms fp32.

    fmt: one type for every linear map (q8_0, q6_k, q5_k, q4_k, q3_k, q2_k) or a mix (mixes.py:
    q4_k_m, q5_k_m, q3_k_m), whose per-matrix types the .spqt metadata records."""
    from tqdm.auto import tqdm

    fmt = check_quant_type(fmt)
    check_layout(layout)
    cfg = source.config
    types = group_types(fmt, cfg.n_layers)
    weights = {"tok_embeddings": source.tensor("tok_embeddings").to(torch.float16),
               "norm": source.tensor("norm")}
    if not cfg.tie_embeddings:
        weights["output"] = source.tensor("output").to(torch.float16)
    parts = {}
    for i in tqdm(range(cfg.n_layers), desc=f"quantizing to {fmt} {layout}", unit="layer", disable=not progress):
        for norm in ("attention_norm", "ffn_norm"):
            weights[f"layers.{i}.{norm}"] = source.tensor(f"layers.{i}.{norm}")
        for group, members in LINEAR_GROUPS.items():
            w = torch.cat([source.tensor(f"layers.{i}.{m}") for m in members], dim=0)
            name = f"layers.{i}.{group}"
            blocks = quantize(w.to(device), types[name], layout).cpu()
            weights[name] = QuantizedWeight(blocks, types[name], layout, tuple(w.shape))
            parts[f"layers.{i}.{group}"] = _parts(cfg)[group]
    provenance = dict(source.provenance)
    provenance.update({"quantization": fmt, "tool": f"spqt {spqt.__version__}", "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    return LoadedModel(config=cfg, tokenizer=source.tokenizer, weights=weights, parts=parts, provenance=provenance)


def check_writable(path: Path) -> None:
    """Fail early (before a long job) when `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise SpqtError(f"cannot write {path}: it is a directory")
    atomic_write(path.with_name(path.name + ".probe"), lambda tmp: None, keep=False)


def atomic_write(path: Path, write, keep: bool = True) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, then rename it onto `path`."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise SpqtError(f"cannot write {path}: {folder} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise SpqtError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        write(tmp)
        if keep:
            os.replace(tmp, path)
    except OSError as e:
        raise SpqtError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_spqt(model: LoadedModel, path: str | os.PathLike) -> None:
    """Write a quantized LoadedModel as a .spqt file (temporary name, then rename)."""
    from safetensors.torch import save_file

    tensors, linears = {}, {}
    for name, w in model.weights.items():
        if isinstance(w, QuantizedWeight):
            tensors[name] = w.blocks.contiguous()
            linears[name] = {"format": w.fmt, "layout": w.layout, "shape": list(w.shape), "parts": model.parts[name]}
        else:
            tensors[name] = w.contiguous()
    if not linears:
        raise SpqtError("a .spqt file holds a quantized model; this one has no quantized weights")
    meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "tokenizer": model.tokenizer.to_dict(), "linears": linears,
            "thresholds": model.thresholds, "provenance": model.provenance}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"spqt": json.dumps(meta)}))


def load_spqt(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Read and validate a .spqt file (memory-mapped by safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise SpqtError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as st:
            raw = (st.metadata() or {}).get("spqt")
            if raw is None:
                raise SpqtError(f"{path}: a safetensors file without SpQt metadata")
            meta = json.loads(raw)
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    except SpqtError:
        raise
    except Exception as e:
        raise SpqtError(f"{path}: not a valid .spqt file ({type(e).__name__}: {e})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise SpqtError(f"{path}: .spqt format version {version} is not supported (this spqt reads {FORMAT_VERSION})")
    config = ModelConfig.from_dict(meta["config"])
    weights, parts = {}, {}
    for name, t in tensors.items():
        info = meta["linears"].get(name)
        if info is None:
            weights[name] = t
            continue
        fmt, layout, shape = info["format"], info["layout"], tuple(info["shape"])
        spec = get_format(fmt)
        expect = (*grid_shape(layout, shape, spec.block_size), spec.block_bytes)
        if t.dtype != torch.uint8 or tuple(t.shape) != expect:
            raise SpqtError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected uint8 {expect}")
        weights[name] = QuantizedWeight(t, fmt, layout, shape)
        parts[name] = info["parts"]
    expected = _expected_shapes(config)
    for name, shape in expected.items():
        w = weights.get(name)
        if w is None:
            raise SpqtError(f"{path}: missing tensor {name}")
        got = w.shape if isinstance(w, QuantizedWeight) else tuple(w.shape)
        if tuple(got) != shape:
            raise SpqtError(f"{path}: tensor {name} has shape {tuple(got)}, expected {shape}")
    return LoadedModel(config=config, tokenizer=TokenizerSpec(**meta["tokenizer"]), weights=weights, parts=parts,
                       thresholds=meta.get("thresholds", {}), provenance=meta.get("provenance", {}), path=path)


def _expected_shapes(c: ModelConfig) -> dict:
    shapes = {"tok_embeddings": (c.vocab_size, c.dim), "norm": (c.dim,)}
    if not c.tie_embeddings:
        shapes["output"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        shapes[f"layers.{i}.attention_norm"] = (c.dim,)
        shapes[f"layers.{i}.ffn_norm"] = (c.dim,)
        shapes[f"layers.{i}.qkv"] = (c.q_dim + 2 * c.kv_dim, c.dim)
        shapes[f"layers.{i}.o"] = (c.dim, c.q_dim)
        shapes[f"layers.{i}.gate_up"] = (2 * c.ffn_dim, c.dim)
        shapes[f"layers.{i}.down"] = (c.dim, c.ffn_dim)
    return shapes


def load_model(path: str | os.PathLike, progress: bool = False) -> LoadedModel:
    """A .spqt (quantized weights), or a .gguf / HF folder (its own weights, as float32)."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            return load_spqt(p)
    return fused_float_weights(open_source(p), progress=progress)
