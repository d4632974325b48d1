"""The .spqt model file, and loading any model (.spqt, .gguf, HF folder) into canonical weights.

A .spqt file is a safetensors container. Tensors::

    tok_embeddings (V, D) fp16        output (V, D) quantized blocks (mixes.head_type), or fp16 (files
                                      before the eleventh session, --head fp16); when tied, absent, or a
                                      quantized copy of the embedding (--head TYPE), which the head reads
    norm, layers.{i}.attention_norm, layers.{i}.ffn_norm (D,) fp32
                                      (attention_norm, ffn_norm: not with config.pre_norms off, OLMo 2)
    layers.{i}.q_norm, layers.{i}.k_norm (hd,) fp32      only with config.qk_norm (Qwen3, Gemma 3); (H*hd,) and
                                                          (Hkv*hd,) with qk_norm_scope "all" (OLMo 2)
    layers.{i}.post_attention_norm, layers.{i}.post_ffn_norm (D,) fp32   only with config.post_norms (Gemma, OLMo 2,
                                                                          GLM-4)
    layers.{i}.{group}.bias (rows,) fp32                  only for groups in config.linear_biases
                                                          (Qwen2: qkv), stacked like the weight
    layers.{i}.{qkv,o,gate_up,down}  uint8 quantized blocks, grid as in layouts.py:
        qkv     = rows of wq | wk | wv    (q_dim + 2 kv_dim, D)     one input, one index list
        o       = wo                      (D, q_dim)
        gate_up = rows of w1 | w3         (2 F, D)                  one input, one index list
        down    = w2                      (D, F)
    layers.{i}.{qkv,o,gate_up,down}.column_norm  (K,) fp32: ||W[:, k]||_2 of the dequantized
        stored matrix, the WINA criterion's per-input scale (sparsity.py); absent in older files

The safetensors metadata key ``spqt`` holds versioned JSON: format_version, config
(ModelConfig), tokenizer (tokenizers JSON, chat template), linears (format, layout, shape, parts
per tensor: a mix stores each matrix in its own format), thresholds (sparsity.py) and provenance
(source hash, tool version, date, quantization type or mix). Files are written to a temporary name
in the target folder and renamed. Version 2 added the family switches (biases, q/k norms, RoPE
frequency factors); version 1 files are Llama-family files without them and read as such. Version 3 is
version 2 with a quantized output head (mixes.head_type); files with a float head stay version 2. Version 4 is a
file whose RoPE table carries an attention factor (YaRN, config rope_attention_factor), which an older spqt would
drop: it refuses the file instead. Version 5, likewise, is a file with longrope's long factors (config
rope_long_freq_factors) or with layers that apply no RoPE (SmolLM3's NoPE layers, config nope_layers), which an
older spqt would rotate by the short factors or at all. Version 6 is a file with any of Gemma 3's switches
(config post_norms, activation, embed_scale, rope_local_theta: ModelConfig.gemma_switches) or with sliding-window
layers (config sliding_layers: Gemma 3's, Mistral's, Phi-3's, Qwen's), which an older spqt would drop. Version 7 is a
file with soft-capped attention scores or logits (Gemma 2: config attn_logit_softcap, final_logit_softcap), which an
older spqt would run uncapped. Version 8 is a file with partial RoPE (Phi-4-mini: config rope_dims, q's and k's rows
permuted into its pairing), which an older spqt would rotate whole. Version 9 is a file without the norms before the
attention and the MLP or with q/k norms over the whole of q and of k (OLMo 2: config pre_norms off, qk_norm_scope
"all"), whose tensors an older spqt would look for in vain or run as per-head norms; it refuses the version instead.
Files without these keys read them as pre_norms on and qk_norm_scope "head", as they were written. A GLM-4 file is
version 8 and needs nothing newer: its interleaved RoPE pairs are permuted before it is written, its norms and biases
are Gemma's and Qwen2's. An EXAONE 4.0 file is version 9 (pre_norms off) and needs nothing newer: its per-head q/k
norms, sliding layers and NoPE layers are Qwen3's, Gemma 3's and SmolLM3's keys.
"""

import collections
import datetime
import json
import os
import shutil
import stat
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

import spqt
from spqt.config import ModelConfig
from spqt.errors import SpqtError
from spqt.formats import FORMATS, SEARCHES, check_search, get_format
from spqt.layouts import check_layout, grid_shape
from spqt.mixes import check_quant_type, group_types, head_type
from spqt.quant import dequantize, quantize
from spqt.sources import SourceModel, TokenizerSpec, is_gguf, open_source

FORMAT_VERSION = 2  # written for files whose head is float; 3 where it is quantized (an older spqt refuses those)
QUANTIZED_HEAD_VERSION = 3
ATTENTION_FACTOR_VERSION = 4
ROPE_LAYOUT_VERSION = 5  # longrope's long factors, NoPE layers
GEMMA_VERSION = 6  # post-norms, GELU MLP, embedding scale, sliding windows, a local RoPE table
SOFT_CAP_VERSION = 7  # soft-capped attention scores or logits (Gemma 2)
PARTIAL_ROPE_VERSION = 8  # a part of each head rotated (Phi-4-mini's rope_dims)
NORM_LAYOUT_VERSION = 9  # no input norms, q/k norms over the whole of q and of k (OLMo 2)
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
NORM_SUFFIX = ".column_norm"

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
    column_norms: dict = field(default_factory=dict)  # linear name -> (K,) fp32, see ensure_column_norms

    def ensure_column_norms(self) -> dict:
        """The column norms of every thresholded linear map (computed from the stored weights where
        the file had none): linear name -> (K,) fp32 on the CPU."""
        from spqt.sparsity import column_norms

        for name in self.parts:
            if name.startswith("layers.") and name not in self.column_norms:  # not the head: never thresholded
                self.column_norms[name] = column_norms(self.weights[name])
        return self.column_norms

    def head(self):
        """The matrix the output head multiplies by: "output" (quantized, or an untied fp16 head), else the tied
        embedding."""
        return self.weights.get("output", self.weights["tok_embeddings"])

    @property
    def kind(self) -> str:
        """'q4_k-zigzag', 'q6_k-row', 'q6_k+q4_k-zigzag' (a mix: its types, widest first) or 'float'."""
        w = self.weights.get("layers.0.qkv")
        # QuantizedWeight, or the kernels' GpuQ4K (synthetic models); a float tensor has no fmt
        if not hasattr(w, "fmt"):
            return "float"
        used = {v.fmt for name, v in self.weights.items() if hasattr(v, "fmt") and name.startswith("layers.")}
        return model_kind(used, w.layout)


def model_kind(formats: set, layout: str) -> str:
    """A quantized model's kind from its layers' formats and layout: 'q4_k-zigzag', 'q6_k+q4_k-zigzag' (a mix: its
    types, widest first)."""
    return f"{'+'.join(f for f in FORMATS if f in formats)}-{layout}"


def kind_types(kind: str) -> tuple[str, str]:
    """A quantized model's kind (model_kind) split into its types and layout: ('q6_k+q4_k', 'zigzag'); the types are
    what the step routes are keyed by (tuning.model_key)."""
    types, layout = kind.rsplit("-", 1)
    return types, layout


def _parts(config: ModelConfig) -> dict:
    return {"qkv": [config.q_dim, config.kv_dim, config.kv_dim], "o": [config.dim],
            "gate_up": [config.ffn_dim, config.ffn_dim], "down": [config.dim]}


def _layer_extras(source: SourceModel, i: int) -> dict:
    """Layer i's tensors besides the linear maps' weights, float32: its norms (config.layer_norms: two, four with
    post_norms, none before the maps without pre_norms; q/k norms), and each biased group's output bias, stacked like
    its weight (a member the source gives no bias gets zeros)."""
    cfg = source.config
    out = {f"layers.{i}.{n}": source.tensor(f"layers.{i}.{n}") for n in cfg.layer_norms()}
    for group in cfg.linear_biases:
        pieces = []
        for member, rows in zip(LINEAR_GROUPS[group], _parts(cfg)[group]):
            name = f"layers.{i}.b{member[1:]}"  # wq -> bq, w1 -> b1
            pieces.append(source.tensor(name) if name in source.names else torch.zeros(rows))
        out[f"layers.{i}.{group}.bias"] = torch.cat(pieces)
    return out


def fused_float_weights(source: SourceModel, progress: bool = False) -> LoadedModel:
    """A source model's weights as given (float32), with linear groups stacked."""
    from tqdm.auto import tqdm

    cfg = source.config
    weights = {name: source.tensor(name) for name in ("tok_embeddings", "norm", "output") if name in source.names}
    parts = {}
    for i in tqdm(range(cfg.n_layers), desc="loading", unit="layer", disable=not progress):
        weights.update(fused_layer_weights(source, i))
        for group in LINEAR_GROUPS:
            parts[f"layers.{i}.{group}"] = _parts(cfg)[group]
    return LoadedModel(config=cfg, tokenizer=source.tokenizer, weights=weights, parts=parts,
                       provenance=dict(source.provenance))


def stored_as(name: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w in the dtype the .spqt file stores it in; SpqtError naming the tensor where a value leaves that dtype's range
    (an fp16 embedding past 65504 would load as infinities: every activation NaN). NaN or infinite sources are refused
    as they are read (SourceModel.tensor)."""
    out = w.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise SpqtError(f"the checkpoint's tensor {name} holds values past the range of "
                        f"{str(dtype).removeprefix('torch.')} (largest magnitude {float(w.abs().max()):g}), the dtype "
                        f"the .spqt file stores it in")
    return out


def fused_layer_weights(source: SourceModel, i: int) -> dict:
    """Layer i's weights as given (float32): "layers.{i}.{group}" stacked as LINEAR_GROUPS says, and its norms and
    biases (_layer_extras)."""
    weights = _layer_extras(source, i)
    for group, members in LINEAR_GROUPS.items():
        weights[f"layers.{i}.{group}"] = torch.cat([source.tensor(f"layers.{i}.{m}") for m in members], dim=0)
    return weights


def quantize_source(source: SourceModel, fmt: str = "q4_k", layout: str = "zigzag",
                    device: str = "cpu", progress: bool = False, search: str = "reference",
                    head: str = "auto", calibration: list[int] | None = None,
                    calibration_tokens: int | None = None) -> LoadedModel:
    """Quantize every linear map of a source model and its output head; embeddings fp16, norms fp32.

    fmt: one type for every linear map (q8_0, q6_k, q5_k, q4_k, q3_k, q2_k) or a mix (mixes.py:
    q4_k_m, q5_k_m, q3_k_m, q4_k_s, ...), whose per-matrix types the .spqt metadata records.
    search: the encoder search (spqt.formats.SEARCHES): "reference" gives llama.cpp's bytes; "mse"
    searches the Q4_K and Q5_K matrices for a lower squared error (a mix's other types keep the
    reference encoder; a single type without that search is an error). The provenance records it.
    head: the output head's type (mixes.head_type: "auto" is llama.cpp's recipe, "fp16" keeps it float); a head
    tied to the embedding stays the fp16 embedding unless a type is named: then a quantized copy is stored.
    calibration: tokens of calibration text; given, the layers' maps are quantized with their errors compensated
    on the model's inputs from that text (gptq.py; its first calibration_tokens, default gptq.TOKENS); the head
    keeps the plain encoder. The provenance records it."""
    from tqdm.auto import tqdm

    from spqt.sparsity import column_norms

    fmt = check_quant_type(fmt)
    check_layout(layout)
    cfg = source.config
    types = group_types(fmt, cfg.n_layers)
    check_search(search, fmt)
    head_fmt = head_type(fmt, head, cfg.tie_embeddings)
    embedding_names = ("tok_embeddings",) + (() if cfg.tie_embeddings or head_fmt else ("output",))
    # the embeddings come first in the file; their values arrive from a worker below
    weights = {"tok_embeddings": None, "norm": source.tensor("norm")} | {name: None for name in embedding_names}
    if head_fmt:
        weights["output"] = None
    parts, norms = {}, {}

    def read_embeddings() -> dict:
        """The fp16 embeddings, and the quantized head where head_fmt asks for one (a tied head from the embedding
        read here, not read again)."""
        read = {name: source.tensor(name) for name in embedding_names}
        out = {name: stored_as(name, w, torch.float16) for name, w in read.items()}
        if head_fmt:
            w = read["tok_embeddings"] if cfg.tie_embeddings else source.tensor("output")
            out["output"] = QuantizedWeight(quantize(w.to(device), head_fmt, layout).cpu(), head_fmt, layout,
                                            tuple(w.shape))
        return out

    def encode(w: torch.Tensor, fmt: str) -> tuple:
        served = SEARCHES[search]
        blocks = quantize(w.to(device), fmt, layout, search if served is None or fmt in served else "reference").cpu()
        q = QuantizedWeight(blocks, fmt, layout, tuple(w.shape))
        return q, column_norms(q)

    # One worker thread per core, each running its torch ops on one thread (quant.py says why),
    # takes whole matrices from one queue: no core waits at the end of each matrix, as one did
    # when each matrix was split over the cores (o: 1,024 + 272 blocks). A worker also computes
    # its matrix's column norms: afterwards on torch's 2 threads they took 1.0-1.3 s of the
    # default model's conversion at load 2 on the 2-core machine and 12.4 s when another job held
    # a core, against 2.4 s of CPU on one thread. The main thread reads the next layer
    # (dequantized from the source format) meanwhile; at most two layers of float weights are
    # held. The GPU takes one matrix at a time.
    threads = torch.get_num_threads()
    workers = threads if device == "cpu" else 1
    pending = collections.deque()  # per layer read: {name: future of (QuantizedWeight, norms) or tensor}

    def collect() -> None:
        for name, value in pending.popleft().items():
            if isinstance(value, Future):
                weights[name], norms[name] = value.result()
                parts[name] = _parts(cfg)[name.rsplit(".", 1)[1]]
            else:
                weights[name] = value

    def compensate() -> dict:
        """Every layer through gptq.quantize_layers, one layer at a time (its maps on one-thread workers on the
        CPU); the record for the provenance."""
        from spqt import gptq
        from spqt.calibrate import token_windows

        def layer_weights(i: int) -> dict:
            """Layer i's float weights for GPTQ; its norms and biases go to the model as they are, read once."""
            layer = fused_layer_weights(source, i)
            weights.update({name: w for name, w in layer.items() if name.rsplit(".", 1)[1] not in LINEAR_GROUPS})
            return layer

        windows = token_windows(calibration, min(gptq.CTX, cfg.max_seq_len), calibration_tokens or gptq.TOKENS)
        errors, plain = [], []
        layers = gptq.quantize_layers(cfg, source.tensor("tok_embeddings"), layer_weights, windows, types, layout,
                                      search, device, progress=progress)
        for _, results in layers:
            for name, result in results.items():
                q = QuantizedWeight(result.blocks.cpu(), types[name], layout, result.shape)
                weights[name], norms[name] = q, column_norms(q)
                parts[name] = _parts(cfg)[name.rsplit(".", 1)[1]]
                errors.append(min(result.error, result.plain_error))
                plain.append(result.plain_error)
        kept = sum(e < p for e, p in zip(errors, plain))
        ratio = sum(e / p for e, p in zip(errors, plain) if p > 0) / max(1, sum(p > 0 for p in plain))
        return {"tokens": windows.numel(), "ctx": windows.shape[1], "damp": gptq.DAMP, "maps_compensated": kept,
                "maps": len(errors), "mean_output_error_vs_plain": round(ratio, 4)}

    record = None
    pool = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        embeddings = pool.submit(read_embeddings)
        if calibration is not None:
            record = compensate()
        with tqdm(total=cfg.n_layers, desc=f"quantizing to {fmt} {layout}", unit="layer",
                  disable=not progress or calibration is not None) as bar:
            for i in range(cfg.n_layers if calibration is None else 0):
                if embeddings.done() and embeddings.exception() is not None:
                    raise embeddings.exception()  # (stored_as's refusal now, not after every layer)
                pending.append({name: pool.submit(encode, w, types[name]) if name.rsplit(".", 1)[1] in LINEAR_GROUPS
                                else w for name, w in fused_layer_weights(source, i).items()})
                if len(pending) == 2:
                    collect()
                    bar.update()
            while pending:
                collect()
                bar.update()
        weights.update(embeddings.result())
        if head_fmt:
            parts["output"] = [cfg.vocab_size]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)  # new threads take their count from the last setting
    provenance = dict(source.provenance)
    if search != "reference":
        provenance["encoder_search"] = search
    if record is not None:
        provenance["gptq"] = record
    provenance.update({"quantization": fmt, "head": head_fmt or "fp16", "tool": f"spqt {spqt.__version__}",
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    model = LoadedModel(config=cfg, tokenizer=source.tokenizer, weights=weights, parts=parts, provenance=provenance,
                        column_norms=norms)
    model.ensure_column_norms()
    return model


def check_writable(path: Path) -> None:
    """Fail early (before a long job) when `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise SpqtError(f"cannot write {path}: it is a directory")
    atomic_write(path, lambda tmp: None, keep=False)  # a temporary file beside it, removed


def atomic_write(path: Path, write, keep: bool = True) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, then rename it onto `path` (keep=False: only
    check that one can be made there). The file gets the usual permissions (0666 less the umask), not mkstemp's 0600,
    also where it replaces a file of other permissions. A device or a pipe at `path` is written into instead: a rename
    would replace it (as root, /dev/null itself)."""
    path = Path(path)
    if _special(path):  # a device or a pipe (/dev/null, /dev/stdout, a FIFO): written into, never replaced by a file
        if not os.access(path, os.W_OK):
            raise SpqtError(f"cannot write {path}: Permission denied")
        if keep:  # written beside, then copied in: safetensors' save_file renames a file of its own onto its path
            try:
                with tempfile.TemporaryDirectory() as folder:
                    tmp = os.path.join(folder, path.name)
                    write(tmp)
                    with open(tmp, "rb") as src, open(path, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            except OSError as e:
                raise SpqtError(f"cannot write {path}: {e.strerror or e}") from None
            except SafetensorError as e:
                raise SpqtError(f"cannot write {path}: {e}") from None
        return
    folder = path.parent
    if not folder.exists():
        raise SpqtError(f"cannot write {path}: the folder {folder} does not exist")
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
            try:
                os.chmod(tmp, 0o666 & ~_umask())
            except OSError:  # a file system without modes (some FUSE / CIFS mounts): keep mkstemp's
                pass
            os.replace(tmp, path)
    except OSError as e:
        raise SpqtError(f"cannot write {path}: {e.strerror or e}") from None
    except SafetensorError as e:  # safetensors' own I/O errors (a full disk, a file size limit)
        raise SpqtError(f"cannot write {path}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _special(path: Path) -> bool:
    """Whether path (a link followed) exists and is neither a regular file nor a folder: a device, a pipe, a socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _umask() -> int:
    """The process's umask (read by setting it, then set back: not thread-safe; the CLI's writes are on its main
    thread, the server writes no files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    for name, norms in model.column_norms.items():
        tensors[f"{name}{NORM_SUFFIX}"] = norms.to(torch.float32).contiguous()
    if not linears:
        raise SpqtError("a .spqt file holds a quantized model; this one has no quantized weights")
    c = model.config
    version = (NORM_LAYOUT_VERSION if not c.pre_norms or c.qk_norm_scope != "head" else
               PARTIAL_ROPE_VERSION if c.rope_dims else
               SOFT_CAP_VERSION if c.soft_capped else
               GEMMA_VERSION if c.gemma_switches or c.sliding_layers else
               ROPE_LAYOUT_VERSION if c.rope_long_freq_factors is not None or c.nope_layers else
               ATTENTION_FACTOR_VERSION if c.rope_attention_factor != 1.0 else
               QUANTIZED_HEAD_VERSION if isinstance(model.weights.get("output"), QuantizedWeight) else FORMAT_VERSION)
    meta = {"format_version": version, "config": c.to_dict(),
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
    try:
        return _from_metadata(meta, tensors, path)
    except SpqtError:
        raise
    except KeyError as e:
        raise SpqtError(f"{path}: not a valid .spqt file (its metadata lacks {e})") from None
    except (AttributeError, TypeError, ValueError) as e:  # fields of the wrong kind
        raise SpqtError(f"{path}: not a valid .spqt file ({e})") from None


@dataclass
class SpqtMaps:
    """A .spqt file's quantized maps as its metadata declares them, no tensor read: maps {name: (fmt, layout, (N, K))}
    and kind (LoadedModel.kind's form: "q4_k-zigzag", "q6_k+q4_k-zigzag")."""

    maps: dict
    kind: str


def spqt_maps(path: str | os.PathLike) -> SpqtMaps:
    """The maps a .spqt file's metadata declares (what spqt tune plans from, without reading a 40 GB file); the tensors
    are checked when the model loads. A missing file, another file kind or bad metadata: SpqtError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SpqtError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as st:
            raw = (st.metadata() or {}).get("spqt")
        if raw is None:
            raise SpqtError(f"{path}: a safetensors file without SpQt metadata")
        maps = {name: (info["format"], info["layout"], tuple(info["shape"]))
                for name, info in json.loads(raw)["linears"].items()}
        if not maps or any(type(n) is not int or type(k) is not int for _, _, (n, k) in maps.values()):
            raise ValueError("no quantized maps of (N, K) shape")
    except SpqtError:
        raise
    except Exception as e:
        raise SpqtError(f"{path}: not a valid .spqt file ({type(e).__name__}: {e})") from None
    used = {fmt for name, (fmt, _, _) in maps.items() if name.startswith("layers.")}
    return SpqtMaps(maps, model_kind(used, maps.get("layers.0.qkv", next(iter(maps.values())))[1]))


def _from_metadata(meta: dict, tensors: dict, path: Path) -> LoadedModel:
    """The LoadedModel a .spqt file's metadata and tensors describe, every declared field checked
    against the tensors before use."""
    from spqt.sparsity import check_thresholds

    if not isinstance(meta, dict):
        raise SpqtError(f"{path}: not a valid .spqt file (metadata is not a JSON object)")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise SpqtError(f"{path}: .spqt format version {version} is not supported "
                        f"(this spqt reads {', '.join(map(str, READABLE_VERSIONS))})")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise SpqtError(f"{path}: invalid model config in the metadata ({type(e).__name__}: {e})") from None
    linears = meta["linears"]
    if not isinstance(linears, dict):
        raise SpqtError(f"{path}: not a valid .spqt file (linears is not a JSON object)")
    weights, parts, norms = {}, {}, {}
    for name, t in tensors.items():
        if name.endswith(NORM_SUFFIX):
            norms[name[: -len(NORM_SUFFIX)]] = t
            continue
        info = linears.get(name)
        if info is None:
            if not t.is_floating_point():
                raise SpqtError(f"{path}: tensor {name} is {t.dtype}, expected a floating-point type")
            weights[name] = t
            continue
        fmt, layout, shape = info["format"], info["layout"], info["shape"]
        if not isinstance(fmt, str) or not isinstance(shape, list) or len(shape) != 2 or \
                any(type(d) is not int or d < 1 for d in shape):
            raise SpqtError(f"{path}: tensor {name}: format {fmt!r} and shape {shape!r} are not a format name and (N, K)")
        shape = tuple(shape)
        spec = get_format(fmt)
        expect = (*grid_shape(layout, shape, spec.block_size), spec.block_bytes)
        if t.dtype != torch.uint8 or tuple(t.shape) != expect:
            raise SpqtError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected uint8 {expect}")
        weights[name] = QuantizedWeight(t, fmt, layout, shape)
        parts[name] = info["parts"]
    expected = _expected_shapes(config)
    if config.tie_embeddings and "output" in weights:  # a quantized copy of the tied head
        expected["output"] = (config.vocab_size, config.dim)
    for name, shape in expected.items():
        w = weights.get(name)
        if w is None:
            raise SpqtError(f"{path}: missing tensor {name}")
        got = w.shape if isinstance(w, QuantizedWeight) else tuple(w.shape)
        if tuple(got) != shape:
            raise SpqtError(f"{path}: tensor {name} has shape {tuple(got)}, expected {shape}")
    for name, t in norms.items():
        w = weights.get(name)
        if name not in parts or t.dtype != torch.float32 or tuple(t.shape) != (w.shape[1],):
            raise SpqtError(f"{path}: tensor {name}{NORM_SUFFIX} is {t.dtype} {tuple(t.shape)}, "
                            f"expected the float32 column norms of a linear map")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise SpqtError(f"{path}: tensor {name}{NORM_SUFFIX} holds negative or non-finite column norms")
    tokenizer = TokenizerSpec(**meta["tokenizer"])
    if not isinstance(tokenizer.tokenizer_json, str) or not isinstance(json.loads(tokenizer.tokenizer_json), dict):
        raise SpqtError(f"{path}: not a valid .spqt file (the tokenizer is not a serialized tokenizers JSON)")
    thresholds = meta.get("thresholds", {})
    check_thresholds(thresholds, config.n_layers, str(path))
    provenance = meta.get("provenance", {})
    return LoadedModel(config=config, tokenizer=tokenizer, weights=weights, parts=parts,
                       thresholds=thresholds, provenance=provenance if isinstance(provenance, dict) else {},
                       path=path, column_norms=norms)


def _expected_shapes(c: ModelConfig) -> dict:
    shapes = {"tok_embeddings": (c.vocab_size, c.dim), "norm": (c.dim,)}
    if not c.tie_embeddings:
        shapes["output"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        shapes |= {f"layers.{i}.{name}": (size,) for name, size in c.layer_norms().items()}
        shapes[f"layers.{i}.qkv"] = (c.q_dim + 2 * c.kv_dim, c.dim)
        shapes[f"layers.{i}.o"] = (c.dim, c.q_dim)
        shapes[f"layers.{i}.gate_up"] = (2 * c.ffn_dim, c.dim)
        shapes[f"layers.{i}.down"] = (c.dim, c.ffn_dim)
        for group in c.linear_biases:
            shapes[f"layers.{i}.{group}.bias"] = (shapes[f"layers.{i}.{group}"][0],)
    return shapes


def load_model(path: str | os.PathLike, progress: bool = False) -> LoadedModel:
    """A .spqt (quantized weights), or a .gguf / HF folder (its own weights, as float32)."""
    p = Path(path)
    if p.is_file() and not is_gguf(p):
        if p.suffix.lower() == ".gguf":
            raise SpqtError(f"{p}: not a GGUF file (it does not begin with GGUF's magic bytes)")
        return load_spqt(p)
    return fused_float_weights(open_source(p), progress=progress)
