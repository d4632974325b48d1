"""Building a runnable model from a LoadedModel, and the prefill / decode loop with sampling.

Prompt tokens go through one dense prefill; each new token is one decode step with the sparse
thresholds on (when a sparsity level is chosen).
"""

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from spqt import sparsity as sp
from spqt.checkpoint import LoadedModel, kind_types
from spqt.cpu_threads import DecodeThreads
from spqt.decode_chain import DecodeChain, chain_on, why_not
from spqt.errors import SpqtError
from spqt.kernels.tuning import STEP_DENSE
from spqt.linear import Linear
from spqt.model import Block, Transformer
from spqt.sampling import LogitShaper, Sampling, sample  # noqa: F401 (Sampling and sample: spqt.generate's names too)

KV_BUCKET_MIN = 256  # the shortest attention span a decode graph is captured for
# A CUDA prefill of n tokens runs padded to a bucket (a power of two from PREFILL_BUCKET_MIN, a multiple of
# PREFILL_BUCKET_STEP past it) up to PREFILL_GRAPH_MAX tokens, as a CUDA graph from a bucket's second use on: a short
# prompt's prefill is a few hundred launches whose host time is many times their device time (an H200, the 135M
# default model: ~33 ms against ~1.4 ms). Longer prompts run as they are: their kernels outlast the host's launches.
PREFILL_BUCKET_MIN = 16
PREFILL_BUCKET_STEP = 256  # past it the padding costs device time: at most 255 tokens of it
PREFILL_GRAPH_MAX = 2048
# After a reused prefix (generate's reuse) the rest of a prompt runs in a graph of its own per (bucket, keys); a server
# with the prompt cache captures those of buckets up to SUFFIX_BUCKET_MAX at its start (capture_prefills).
SUFFIX_BUCKET_MAX = 256


SCORE_VALUES = 2**24  # Generator.score's logits a pass at most (positions x vocab: 134 MB of float64 log-softmax)


class PrefillGraph(NamedTuple):
    """A bucket's captured prefill: replaying `graph` reads tokens (1, bucket), positions (bucket,) and last (1,) (the
    last prompt token's index), all int64, and writes logits (1, 1, vocab) float32, which the next replay overwrites."""

    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor
    logits: torch.Tensor


def _warm_up(run, times: int) -> None:
    """Run a CUDA graph's work `times` times on a side stream before its capture (Triton compiles, cuBLAS picks its
    kernels), ordered after the current stream's work and before what follows."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            run()
    torch.cuda.current_stream().wait_stream(stream)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise SpqtError(f"unknown device {name!r}; choose cpu, cuda or auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpqtError("--device cuda was asked for, but this machine has no CUDA GPU")
    return name


def build_model(loaded: LoadedModel, device: str = "cpu", dtype: torch.dtype = torch.float32,
                backend: str = "reference") -> Transformer:
    """The Transformer with every linear map built from the loaded weights (the head dense: a quantized head on the
    backend's kernels, a float one on the reference map or the CPU's fp16 GEMV)."""
    weights = loaded.weights

    def make_linear(name: str, out_features: int, in_features: int):
        if name == "output":
            head = loaded.head()
            if hasattr(head, "fmt"):  # quantized (mixes.head_type): the backend's kernels, as a layer's map
                return Linear(head, dtype, device, backend)
            # a float head: the reference map, or the CPU's fp16 GEMV in that mode
            head_backend = backend if backend in CPU_FAST_BACKENDS else "reference"
            return Linear(head.to(torch.float32), dtype, device, backend=head_backend)
        return Linear(weights[name], dtype, device, backend, bias=weights.get(f"{name}.bias"))

    model = Transformer(loaded.config, make_linear)
    model.tok_embeddings.weight.data = weights["tok_embeddings"].to(device=device, dtype=dtype)
    model.norm.weight.data = weights["norm"].to(device=device, dtype=torch.float32)
    for i, block in enumerate(model.layers):
        _set_block_norms(block, i, weights, device, backend)
    return model.to(device)


def build_block(config, i: int, weights: dict, device: str = "cpu", dtype: torch.dtype = torch.float32,
                backend: str = "reference") -> Block:
    """Layer i alone, as build_model builds it, from a dict holding (at least) that layer's "layers.{i}.*" weights;
    no KV cache (set block.attention.cache before running it)."""
    block = Block(config, i, lambda name, out_features, in_features: Linear(
        weights[name], dtype, device, backend, bias=weights.get(f"{name}.bias")))
    _set_block_norms(block, i, weights, device, backend)
    return block.to(device)


def _set_block_norms(block: Block, i: int, weights: dict, device: str, backend: str) -> None:
    block.attention.native = backend == "cpu-native"
    norms = {"attention_norm": block.attention_norm, "ffn_norm": block.ffn_norm,
             "q_norm": block.attention.q_norm, "k_norm": block.attention.k_norm,
             "post_attention_norm": block.post_attention_norm, "post_ffn_norm": block.post_ffn_norm}
    for name, norm in norms.items():
        if norm is not None:
            norm.weight.data = weights[f"layers.{i}.{name}"].to(device=device, dtype=torch.float32)


def sparse_linears(model: Transformer):
    """(layer, kind, Linear) for every thresholded linear map."""
    for i, block in enumerate(model.layers):
        yield i, "qkv", block.attention.qkv
        yield i, "o", block.attention.o
        yield i, "gate_up", block.feed_forward.gate_up
        yield i, "down", block.feed_forward.down


def set_thresholds(model: Transformer, table: torch.Tensor | None, levels: torch.Tensor | None = None) -> None:
    """table: (n_layers, 4) thresholds in INPUT_KINDS order, or None for dense; levels: the same
    shape, the sparsity each threshold was calibrated for (None: unknown)."""
    for layer, kind, lin in sparse_linears(model):
        j = sp.INPUT_KINDS.index(kind)
        lin.set_threshold(None if table is None else float(table[layer, j]),
                          None if levels is None else float(levels[layer, j]))
    # The levels decide which maps run dense (below their crossover) when a decode step is captured,
    # so they are part of the graphs' key (Generator._graph_at): before, graphs captured at 25 %
    # (every 7B map dense) were replayed at 40 and 50 % (H200: 2.20 ms a token instead of 2.04)
    level_key = None if table is None or levels is None else tuple(levels.flatten().tolist())
    model.switches = {**getattr(model, "switches", {}), "thresholds": table is not None, "levels": level_key}


def set_dense_fallback(model: Transformer, active: bool) -> None:
    """Let maps whose kernels are not faster sparse than dense at their level run dense."""
    for _, _, lin in sparse_linears(model):
        lin.dense_fallback = active
    model.switches = {**getattr(model, "switches", {}), "dense_fallback": active}


CPU_FAST_BACKENDS = ("cpu-native", "cpu-fp16")  # the CPU's maps with a speed (the reference is the semantics)
DENSE_STEP_FORCED = "SPQT_SPARSE_KEPT=dense asks it"  # Generator.dense_step_reason where the variable forces it
KEPT_ROUTE_NAMES = {"norm": "the norm-fed maps", "all": "every sparse map"}  # the MODE_KEPT routes other than off


def set_kept_route(model: Transformer, route: str) -> None:
    """Which sparse maps run MODE_KEPT (one launch a map) in the model's decode steps: "off", "norm" (q|k|v and
    gate|up) or "all" (tuning.KEPT_ROUTES; implementations without MODE_KEPT ignore it)."""
    for _, _, lin in sparse_linears(model):
        if hasattr(lin.impl, "kept_route"):
            lin.impl.kept_route = route
    model.switches = {**getattr(model, "switches", {}), "kept_route": route}


def dense_fallbacks(model: Transformer) -> list[str]:
    """The maps that run dense although a threshold is set (their level is below the crossover)."""
    out = []
    for layer, kind, lin in sparse_linears(model):
        if lin.threshold is not None and lin.dense_fallback:
            norm_fed = kind in ("qkv", "gate_up") and getattr(lin.impl, "fuses_norm", False)
            if not lin.impl.sparse_pays(lin.level, norm_fed):
                out.append(f"layers.{layer}.{kind}")
    return out
def set_scales(model: Transformer, norms: dict | None) -> None:
    """norms: linear name -> (K,) column norms (the WINA criterion), or None (TEAL's |x|)."""
    for layer, kind, lin in sparse_linears(model):
        lin.set_scale(None if norms is None else norms[f"layers.{layer}.{kind}"])
    model.switches = {**getattr(model, "switches", {}), "scaled": norms is not None}


def set_sparse(model: Transformer, active: bool, track: bool = False) -> None:
    """Turn the thresholds on or off in every linear map (and the achieved-sparsity counting).
    model.switches records the setting, so a captured decode graph knows when it is stale."""
    for _, _, lin in sparse_linears(model):
        lin.sparse = active
        lin.track = track
    model.switches = {**getattr(model, "switches", {}), "sparse": active, "track": track}


def achieved_sparsity(model: Transformer, reset: bool = True, counts: torch.Tensor | None = None) -> dict:
    """Fraction of inputs dropped per input kind, and 'all': the fraction of the thresholded
    weights skipped (each dropped input skips a column of out_features weights), the fraction
    of weight bytes a sparse GEMV does not read, as TEAL counts a model's sparsity. counts: (maps, 2) float64
    [dropped, seen] per map of sparse_linears(model), in its order, instead of the maps' own counters."""
    sums = {k: torch.zeros(2, dtype=torch.float64) for k in sp.INPUT_KINDS}
    rows = counts.cpu() if counts is not None else None
    for i, (_, kind, lin) in enumerate(sparse_linears(model)):
        sums[kind] += (lin.counts.cpu() if rows is None else rows[i]) * lin.out_features
        if reset:
            lin.counts.zero_()
    out = {k: float(v[0] / v[1]) if v[1] > 0 else 0.0 for k, v in sums.items()}
    total = sum(sums.values())
    out["all"] = float(total[0] / total[1]) if total[1] > 0 else 0.0
    return out


@dataclass
class GenerationResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    sparsity: dict = field(default_factory=dict)
    finish_reason: str = "length"  # "stop": a stop token, or on_token asked to stop; "length": max_new_tokens
    cached_tokens: int = 0  # leading prompt tokens whose keys and values the cache held already (generate's reuse)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens computed (not those reused from the cache) a second."""
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Steps per second after the first step (on CUDA the first captures the graph, and compiles
        the kernels on a fresh machine); over all steps when there is only one."""
        steps = self.step_seconds[1:] or self.step_seconds
        return len(steps) / sum(steps) if steps else 0.0


COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in COMPUTE_DTYPES.items()}  # torch dtype -> its --dtype name


class PromptScores(NamedTuple):
    """Generator.score's result for a prompt of n tokens (CPU tensors): logprobs (n - 1,) float64, each of
    prompt[1:] given the tokens before it; top_ids (n - 1, k) int64 and top_logprobs (n - 1, k) float64, the k most
    likely tokens at each of those positions, most likely first."""
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def non_finite_error(dtype: torch.dtype, when: str) -> SpqtError:
    """The error of logits that are not finite numbers (`when`: "of the prompt", "after 12 new tokens", ...): the
    activations overflowed the compute dtype (fp16's largest value is 65504) or the weights hold non-finite values."""
    name = DTYPE_NAMES.get(dtype, str(dtype))
    hint = "; --dtype bf16 holds float32's range" if dtype == torch.float16 else ""
    return SpqtError(f"the logits {when} are not finite numbers in {name}: the activations overflowed it or the "
                     f"weights hold non-finite values{hint}")


class _Stopped(Exception):
    """should_stop asked a prefill to end (between_layers)."""


@contextlib.contextmanager
def between_layers(model: Transformer, should_stop: Callable[[], bool] | None):
    """Within the block, should_stop is asked before each of the model's layers runs, and a true answer raises
    _Stopped there: a server's long prefill on the CPU (a 5,500-token prompt of the default model took 20 s on 2 cores,
    0.7 s a layer) ends within a layer when its client leaves or the server stops, instead of holding the model to its
    end. None: nothing asked."""
    if should_stop is None:
        yield
        return

    def check(module, args) -> None:
        if should_stop():
            raise _Stopped

    hooks = [layer.register_forward_pre_hook(check) for layer in model.layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def compute_dtype(name: str) -> torch.dtype | None:
    """The compute dtype a --dtype option names (COMPUTE_DTYPES), or None for auto: the run's default_dtype."""
    if name == "auto":
        return None
    if name not in COMPUTE_DTYPES:
        raise SpqtError(f"unknown dtype {name!r}; choose auto, fp32, fp16 or bf16")
    return COMPUTE_DTYPES[name]


# Families computed in bfloat16 on CUDA where no dtype is asked (default_dtype)
BF16_FAMILIES = ("gemma2", "gemma3", "glm4", "olmo2", "olmo3", "exaone4", "ernie4_5", "seed_oss")


def default_dtype(config, device: str) -> torch.dtype:
    """The compute dtype of a run that asks for none: float32 on the CPU (its speed comes from its GEMV's own types);
    on CUDA float16, or bfloat16 (BF16_FAMILIES) for Gemma 2 and 3, whose activations outgrow float16's range (their
    large norm weights and post-norms: transformers' issue 36822, fp16 logits NaN; Gemma 2 was trained and released in
    bfloat16) where bfloat16 holds float32's, for GLM-4 0414 (released in bfloat16; its MLP's down map overflows
    float16: llama.cpp issue 12946 and PR 13101, mlx-lm issue 106), and for the families released in bfloat16 whose
    range in float16 is not measured: OLMo 2 and 3, EXAONE 4.0, ERNIE 4.5, Seed-OSS (bfloat16 decodes and prefills
    short prompts as fast: the CUDA GEMV and GEMM take it, docs/RESULTS.md, forty-fifth and forty-sixth sessions)."""
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if config.family in BF16_FAMILIES else torch.float16


class Generator:
    """A model ready to generate: weights on the device, KV cache for `max_len` tokens."""

    def __init__(self, loaded: LoadedModel, device: str = "cpu", dtype: torch.dtype | None = None,
                 sparsity: float = 0.0, mode: str = "unified", max_len: int | None = None,
                 backend: str | None = None, dense_fallback: bool = True, criterion: str | None = None):
        """dense_fallback: maps whose sparse kernel is not faster than the dense one at their level
        (the tuned crossover of their shape on this GPU) run dense; off, every map runs as asked
        (the semantics of the CPU reference, which always runs sparse). dtype None: default_dtype. criterion: teal or
        wina (None: the model's default, sparsity.default_criterion). backend: None picks triton on
        CUDA for a quantized model, else the fp32 reference; "cpu-fp16" is the CPU's fast GEMV
        (kernels/cpu_fp16.py: fp16 weights, fp32 sums)."""
        self.loaded = loaded
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(loaded.config, self.device)
        backend = backend or ("triton" if self.device == "cuda" and loaded.kind != "float" else "reference")
        self.backend = backend
        self.model = build_model(loaded, self.device, self.dtype, backend)
        set_dense_fallback(self.model, dense_fallback)
        self.set_sparsity(sparsity, mode, criterion=criterion)
        self.max_len = min(max_len or loaded.config.max_seq_len, loaded.config.max_seq_len)
        self.model.setup_cache(1, self.max_len, self.dtype)
        # a decode step's layers in one launch where the model allows it and SPQT_CHAIN=1 (decode_chain.py)
        self.chain_off_because = (why_not(self.model) if self.dtype == torch.float16 else "not fp16") if chain_on() \
            else "SPQT_CHAIN is not 1"
        if self.chain_off_because is None:
            self.model.decode_chain = DecodeChain(self.model)
        # CUDA graphs of one decode step, captured at first use per sparsity setting and per
        # attention length (see _kv_bucket); self._graph is the one replayed last
        self.use_graph = self.device == "cuda"
        self._graphs: dict[int, tuple] = {}
        self._graph = None
        self._graph_key = None
        # prefill graphs per (bucket, keys) (_prefill), one memory pool for all of them (they never run at once)
        self._drop_prefills(None)
        # the tokens whose keys and values the cache holds at positions 0, 1, ..., as the last generate() left them,
        # and the cache they are in (model.cache_generation; None: nothing to reuse)
        self._kept: tuple[list[int], int | None] = ([], None)
        # The step's inputs, token and position, as one device vector filled by one host copy
        self._io = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._io_host = torch.zeros(2, dtype=torch.int64, pin_memory=self.device == "cuda")
        self._io_copied = torch.cuda.Event() if self.device == "cuda" else None
        self._tok = self._io[0:1].view(1, 1)
        self._pos = self._io[1:2]
        # Greedy steps feed themselves on the device (see _capture): the token each step chose, at
        # its input position, is read back by a side stream while the next step runs.
        if self.device == "cuda":
            self._history = torch.zeros(self.max_len, dtype=torch.int64, device=self.device)
            self._token_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
            self._reader = torch.cuda.Stream()

    def set_sparsity(self, sparsity: float, mode: str = "unified", table: torch.Tensor | None = None,
                     criterion: str | None = None) -> None:
        """Choose the calibrated thresholds of a level (0: dense), or an explicit (layers, 4) table,
        for a criterion (None: the model's default, sparsity.default_criterion)."""
        criterion = sp.check_criterion(criterion or sp.default_criterion(self.loaded.thresholds))
        if table is None:
            table = sp.select(self.loaded.thresholds, sparsity, mode, self.loaded.config.n_layers, criterion)
        levels = None
        if table is not None:
            levels = sp.levels(self.loaded.thresholds, sparsity, mode, table.shape[0], criterion)
        set_scales(self.model, self.loaded.ensure_column_norms() if criterion == "wina" and table is not None else None)
        set_thresholds(self.model, table, levels)
        self.sparsity = sparsity
        self.criterion = criterion
        self.kept_route = self._tuned_kept_route(sparsity if table is not None else 0.0)
        set_kept_route(self.model, self.kept_route)

    def kept_possible(self) -> bool:
        """Whether MODE_KEPT can run in this model's decode steps at all: zigzag maps (any type or mix) in fp16 or
        bf16 on the CUDA GEMV (NVRTC usable, SPQT_GEMV not triton); elsewhere every sparse map takes the collected path
        whatever the route. (`spqt tune --routes` times the steps in the model's default dtype; a bf16 run of a model
        tuned in fp16 takes its routes: the same kernels, the same instruction counts.)"""
        from spqt.kernels import zigzag_cuda

        if (self.device != "cuda" or self.backend != "triton" or not self.loaded.kind.endswith("-zigzag")
                or self.dtype not in zigzag_cuda.X_DTYPES):
            return False
        return zigzag_cuda.runs()

    def kept_runs(self) -> str | None:
        """Which sparse maps the launched decode steps try in one launch (MODE_KEPT) when they do not count the
        achieved sparsity (counting takes the collected path): SPQT_SPARSE_KEPT's setting where set, else the tuned
        route ("all", "norm", "plain" or "table"); None where that is off, MODE_KEPT cannot run (kept_possible) or
        the steps run the chain."""
        if not self.kept_possible() or self.chain_runs():
            return None
        from spqt.kernels.gpu_linear import kept_setting

        setting = kept_setting() or self.kept_route
        return None if setting in ("off", STEP_DENSE) else setting

    def dense_step_reason(self) -> str | None:
        """Why every map of the decode steps runs dense although a level is set, None where they do not: the tuned
        step route of this level is "dense" (spqt tune --routes timed no sparse step faster than the dense one
        here), or SPQT_SPARSE_KEPT=dense asks it (any implementation that has crossovers); on the CPU's native maps,
        every thresholded map is below SPARSE_FROM (dense_fallback_note); never with dense_fallback off (every map then
        runs as asked) or in the chain (it runs every thresholded map sparse)."""
        thresholded = sum(lin.threshold is not None for _, _, lin in sparse_linears(self.model))
        if self.sparsity <= 0 or self.chain_runs() or not 0 < thresholded <= len(self.dense_fallbacks()):
            return None
        if self.backend in CPU_FAST_BACKENDS:
            return self.dense_fallback_note() + "; --no-dense-fallback runs them sparse"
        from spqt.kernels.gpu_linear import kept_setting

        setting = kept_setting()
        if setting is not None:
            return DENSE_STEP_FORCED if setting == STEP_DENSE else None
        if self.kept_route == STEP_DENSE:
            return ("spqt tune --routes timed no sparse decode step faster than the dense one at this level for this "
                    "model on this GPU; SPQT_SPARSE_KEPT=off runs the sparse maps")
        return None

    def tuned_route_runs(self, track: bool = False) -> str | None:
        """The tuned MODE_KEPT route ("norm" or "all") where the decode steps run it (kept_runs), None where it is
        off, where SPQT_SPARSE_KEPT overrides it, or (track) where the steps count the achieved sparsity."""
        if track or self.kept_route == "off":
            return None
        from spqt.kernels.gpu_linear import kept_setting

        return None if kept_setting() is not None else self.kept_runs()

    def _tuned_kept_route(self, sparsity: float) -> str:
        """The decode step's MODE_KEPT route that `spqt tune --routes` measured for this model's geometry at this
        sparsity on this GPU (tuning.decode_route); "off" when dense (an explicit table at sparsity 0 included) or
        where MODE_KEPT cannot run (kept_possible). SPQT_SPARSE_KEPT, when set, overrides it map by map
        (gpu_linear.kept_setting)."""
        if sparsity <= 0 or not self.kept_possible():
            return "off"
        from spqt.kernels import tuning

        return tuning.decode_route(tuning.model_key(self.loaded.config, kind_types(self.loaded.kind)[0]), sparsity)

    def dense_fallback_note(self) -> str:
        """Why dense_fallbacks() run dense, for a log line: the tuned crossover on a GPU, SPARSE_FROM on the CPU's
        native maps, at no level on the CPU's fp16 GEMVs (HalfGemvLinear / NativeHalfLinear.sparse_pays)."""
        if self.backend in CPU_FAST_BACKENDS:
            from spqt.kernels.cpu_native import SPARSE_FROM

            dense = set(self.dense_fallbacks())  # the fp16 GEMVs pay at no level, not even an unknown one
            gemv = [not lin.impl.sparse_pays(None) for layer, kind, lin in sparse_linears(self.model)
                    if f"layers.{layer}.{kind}" in dense]
            why = []
            if not all(gemv):
                why.append(f"at this level their sparse kernel is not faster on the CPU (its skipped blocks still "
                           f"stream; a map runs sparse from {100 * SPARSE_FROM:g} %)")
            if any(gemv):
                why.append("the fp16 GEMV (a float or row-layout map, or --gemv fp16) reads every weight sparse or "
                           "dense, so sparsity saves it nothing")
            return "; ".join(why)
        return "at this level their sparse kernel is not faster on this GPU (spqt tune's crossover)"

    def dense_fallbacks(self) -> list[str]:
        """Maps running dense at this level because their sparse kernel would be slower (none in the chain: it runs
        every thresholded map sparse)."""
        return [] if self.chain_runs() else dense_fallbacks(self.model)

    def chain_runs(self) -> bool:
        """Whether decode steps run their layers as one chain launch (decode_chain.py; a step that counts the
        achieved sparsity, generate(track=True), still launches them)."""
        return self.model.decode_chain is not None and chain_on()

    def _kv_bucket(self, pos: int) -> int:
        """Keys a step at position pos attends to in a graph: the smallest power of two above pos,
        at least KV_BUCKET_MIN, at most the cache, so attention reads about what the sequence holds
        instead of the whole preallocated context. A sliding layer's fused decode attention reads its window's blocks
        alone, whatever the bucket."""
        return min(self.max_len, max(KV_BUCKET_MIN, 1 << pos.bit_length()))

    def _capture(self, kv_len: int) -> tuple:
        """Capture one decode step (the model's forward over kv_len keys) as a CUDA graph over the
        static inputs: (graph, logits (1, 1, vocab), greedy token (1,))."""
        # The warm-up runs write this step's K/V at this step's position, as the replay will.
        _warm_up(lambda: self.model(self._tok, self._pos, kv_len=kv_len), times=2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model(self._tok, self._pos, kv_len=kv_len)
            greedy = logits[:, -1].argmax(-1)  # greedy decoding needs no other launch
            # The next greedy step's input, on the device: no host round trip between steps
            # (decode_step overwrites both from the host before a replay it drives).
            self._history.index_copy_(0, self._pos, greedy)
            self._io[0:1].copy_(greedy)
            self._io[1:2].add_(1)
        return graph, logits, greedy

    def drop_graphs(self) -> None:
        """Forget the captured decode and prefill graphs: the next CUDA step and prefill capture anew (measurement:
        scripts/order_probe.py)."""
        self._graphs, self._graph_key = {}, None
        self._drop_prefills(None)

    def _drop_prefills(self, key) -> None:
        """Forget the prefill graphs, and their memory pool with them (a pool's handle is not reused once its graphs
        are gone: torch's allocator may still hold it, retired)."""
        self._prefills, self._prefill_key, self._prefill_pool = {}, key, None

    def _graphs_key(self) -> tuple:
        """What a captured decode graph depends on beyond its inputs: the model's switches and its KV cache."""
        return tuple(sorted(getattr(self.model, "switches", {}).items())), self.model.cache_generation

    def _prefill_bucket(self, n: int) -> int:
        """Tokens a CUDA prefill of n <= PREFILL_GRAPH_MAX tokens runs as: a power of two from PREFILL_BUCKET_MIN up to
        PREFILL_BUCKET_STEP, a multiple of it past that; at most the cache."""
        bucket = max(PREFILL_BUCKET_MIN, 1 << (n - 1).bit_length())
        if bucket > PREFILL_BUCKET_STEP:
            bucket = -(-n // PREFILL_BUCKET_STEP) * PREFILL_BUCKET_STEP
        return min(self.max_len, bucket)

    def _prefill_inputs(self, bucket: int) -> tuple:
        """Static inputs of a bucket's prefill: tokens (1, bucket), positions (bucket,), the last prompt token's
        index (1,), all int64 on the device (_prefill fills them before every run)."""
        dev = self.device
        return (torch.zeros(1, bucket, dtype=torch.int64, device=dev), torch.arange(bucket, device=dev),
                torch.zeros(1, dtype=torch.int64, device=dev))

    def capture_prefills(self, longest: int, suffixes: bool = False) -> int:
        """Capture the prefill graphs of every bucket up to a prompt of `longest` tokens now (a server's start), so no
        request pays a capture; with suffixes, also those of the rest of a prompt after a reused prefix (generate's
        reuse): every bucket up to SUFFIX_BUCKET_MAX over every span of keys _kv_bucket gives. Returns the largest
        bucket captured (0 where there is none: the CPU)."""
        if not self.use_graph:
            return 0
        self._kept = ([], None)  # the captures' prompts overwrite the cache
        top = self._prefill_bucket(max(1, min(longest, PREFILL_GRAPH_MAX, self.max_len)))
        runs = [(0, bucket) for bucket in sorted({self._prefill_bucket(n) for n in range(1, top + 1)})]
        if suffixes:  # a prefix that ends `bucket` positions before the span's end: the span is _kv_bucket's
            spans = sorted({self._kv_bucket(pos) for pos in range(self.max_len)})
            buckets = sorted({self._prefill_bucket(n) for n in range(1, min(SUFFIX_BUCKET_MAX, top) + 1)})
            runs += [(keys - bucket, bucket) for keys in spans for bucket in buckets if bucket < keys]
        with torch.inference_mode():
            set_sparse(self.model, False)
            for start, bucket in runs:
                for _ in range(2):  # the first use runs eagerly, the second captures
                    self._prefill([0] * (start + bucket), start, capture=True)
        torch.cuda.synchronize()
        return top

    def _reuse_pays(self, n: int, start: int) -> bool:
        """Whether prefilling the last n - start of n prompt tokens after a reused prefix beats prefilling all n: on
        the CPU always, and where all n would run eagerly (past PREFILL_GRAPH_MAX); on CUDA otherwise only where the
        rest's (bucket, keys) graph is captured (capture_prefills' suffixes): an eager prefill's launches take ~33 ms
        of host time for the default model, its captured prefill ~1.5 ms (an H200)."""
        if not self.use_graph or n > PREFILL_GRAPH_MAX:
            return True
        slot = self._prefill_slot(n - start, start)
        return slot[0] > 0 and self._captured(slot) is not None

    def _prefill_slot(self, m: int, start: int) -> tuple[int, int]:
        """(bucket, keys) of a CUDA prefill of m tokens after `start` cached ones: padded to its bucket, over the bucket
        itself from position 0 and over _kv_bucket's span after a reused prefix; (0, 0) where it runs as it is (past
        PREFILL_GRAPH_MAX, or its padding past the span)."""
        if m > PREFILL_GRAPH_MAX:
            return 0, 0
        bucket = self._prefill_bucket(m)
        keys = bucket if start == 0 else self._kv_bucket(start + bucket - 1)
        return (bucket, keys) if start + bucket <= keys else (0, 0)

    def _captured(self, slot: tuple[int, int]) -> PrefillGraph | None:
        """The slot's captured prefill graph, None where there is none (a new KV cache drops them all first)."""
        if self.model.cache_generation != self._prefill_key:
            self._drop_prefills(self.model.cache_generation)
        return self._prefills.get(slot)

    def _prefill(self, prompt: list[int], start: int = 0, capture: bool = False) -> torch.Tensor:
        """The dense prefill of prompt[start:] at positions start .. n - 1 into the KV cache, which holds the first
        `start` tokens' keys and values already (generate's reuse) -> the last token's logits (1, 1, vocab) float32
        (on CUDA a graph's output or a buffer of the head's: read it before the next prefill or step).

        On CUDA padded to its bucket (_prefill_bucket) and run over `keys` keys: the bucket itself from position 0,
        after a reused prefix the power of two that _kv_bucket gives. The padding's keys and values land in the cache
        after the prompt, where no later step reads them (each decode step writes its own position first and attends
        to none after it). A whole prompt's (bucket, keys) runs eagerly at its first use (which warms Triton and cuBLAS
        up) and as a CUDA graph from its second on; graph or not, the same kernels on the same shapes. A rest after a
        reused prefix runs in its graph only where one was captured before (capture: capture_prefills' runs, which
        capture at the second use), else as it is, so no request pays a capture of one of the many (bucket, keys)
        pairs. A new KV cache (or drop_graphs) makes every graph stale; the prefill runs dense whatever the switches
        say. Where the bucket is past PREFILL_GRAPH_MAX or its padding past the cache, and on the CPU, the tokens run
        as they are: the head for the last token alone."""
        dev, n = self.device, len(prompt)
        m = n - start
        slot = self._prefill_slot(m, start) if dev == "cuda" else (0, 0)
        bucket, keys = slot
        captured = self._captured(slot) if bucket else None
        if not bucket or (start and not capture and captured is None):
            return self.model(torch.tensor([prompt[start:]], device=dev), torch.arange(start, n, device=dev),
                              kv_len=n, select=torch.tensor([m - 1], device=dev))
        tokens, positions, last = (captured.tokens, captured.positions, captured.last) if captured else \
            self._prefill_inputs(bucket)
        host = torch.zeros(2 * bucket + 1, dtype=torch.int64)
        host[:m] = torch.tensor(prompt[start:])
        host[bucket:2 * bucket] = torch.arange(start, start + bucket)
        host[2 * bucket] = m - 1
        staged = host.to(dev)
        tokens.copy_(staged[:bucket].view(1, bucket))
        positions.copy_(staged[bucket:2 * bucket])
        last.copy_(staged[2 * bucket:])
        if captured:
            captured.graph.replay()
            return captured.logits

        def run():
            return self.model(tokens, positions, kv_len=keys, select=last)

        if not self.use_graph or slot not in self._prefills:
            if self.use_graph:
                self._prefills[slot] = None  # seen once: captured at the next use
            return run()
        # the second use: the warm-up is this prefill (it writes what the replay writes again), then the capture
        _warm_up(run, times=1)
        self._prefill_pool = self._prefill_pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._prefill_pool):
            logits = run()
        self._prefills[slot] = PrefillGraph(graph, tokens, positions, last, logits)
        graph.replay()
        return logits

    def reusable_prefix(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` the KV cache holds already, as the last generate() left it: the
        common prefix of the two, at most len(prompt) - 1 (the last prompt token runs again for its logits)."""
        kept, generation = self._kept
        if generation != self.model.cache_generation:
            return 0
        n, limit = 0, min(len(kept), len(prompt) - 1)
        while n < limit and kept[n] == prompt[n]:
            n += 1
        return n

    def _graph_at(self, pos: int):
        """The decode graph for a step at position pos (captured on first use; all re-captured when
        the switches change or the KV cache was re-allocated, as perplexity does). Sets
        self._logits and self.greedy_token to its outputs."""
        key = self._graphs_key()
        if key != self._graph_key:
            self._graphs, self._graph_key = {}, key
        bucket = self._kv_bucket(pos)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        self._graph, self._logits, self.greedy_token = self._graphs[bucket]
        return self._graph

    def _set_io(self, token: int, pos: int) -> None:
        """The step's token and position from the host: one pinned copy."""
        self._io_copied.synchronize()  # the pinned buffer is free again
        self._io_host[0] = int(token)
        self._io_host[1] = pos
        self._io.copy_(self._io_host, non_blocking=True)
        self._io_copied.record()

    def decode_step(self, token: torch.Tensor | int, pos: int) -> torch.Tensor:
        """One token at position pos -> logits (1, 1, vocab). On CUDA a graph replay, after which
        self.greedy_token (1,) holds the logits' argmax."""
        self._kept = ([], None)  # a caller's own steps write the cache (generate() records it again at its end)
        if not self.use_graph:
            tok = torch.as_tensor(token, device=self.device).view(1, 1)
            return self.model(tok, torch.tensor([pos], device=self.device), kv_len=pos + 1)
        self._set_io(token, pos)
        self._graph_at(pos).replay()
        return self._logits

    def _decode_greedy_pipelined(self, token: int, pos: int, budget: int, on_token, stop_ids) -> tuple:
        """Greedy decoding by graph replays that feed themselves: step p+1 is enqueued before the
        token of step p is read back (by a side stream that waits for step p alone), so the GPU
        never waits for the host. budget: steps to run at most; on_token may ask to stop by
        returning a true value. Returns (tokens, seconds between consecutive tokens as the host
        receives them, finish reason "stop" or "length"). A step enqueued past a stop is discarded."""
        self._set_io(token, pos)
        inflight: deque = deque()
        out, steps = [], []

        def enqueue(p: int) -> None:
            self._graph_at(p).replay()
            done = torch.cuda.Event()
            done.record()
            inflight.append((done, p))

        enqueue(pos)
        issued = 1
        last = time.perf_counter()
        while inflight:
            if issued < budget:
                enqueue(pos + issued)
                issued += 1
            done, p = inflight.popleft()
            self._reader.wait_event(done)
            with torch.cuda.stream(self._reader):
                self._token_host.copy_(self._history[p:p + 1], non_blocking=True)
                read = torch.cuda.Event()
                read.record()
            read.synchronize()
            t = int(self._token_host[0])
            now = time.perf_counter()
            steps.append(now - last)
            last = now
            out.append(t)
            if (on_token and on_token(t)) or t in stop_ids:
                torch.cuda.synchronize()
                return out, steps, "stop"
        torch.cuda.synchronize()
        return out, steps, "length"

    def _decode_threads(self) -> DecodeThreads:
        """The CPU's intra-op thread count for decode steps, probed on layer 0's gate|up GEMV."""
        lin = self.model.layers[0].feed_forward.gate_up
        x = torch.randn(1, 1, lin.in_features, generator=torch.Generator().manual_seed(0)).to(self.dtype)
        return DecodeThreads(lambda: lin.impl.dense(x))

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _check_finite(self, logits: torch.Tensor, when: str) -> None:
        """_non_finite(when) where logits (1, vocab) hold a NaN or an infinity: one reduction and a read."""
        if not bool(torch.isfinite(logits).all()):
            self._non_finite(when)

    def _non_finite(self, when: str) -> None:
        """Raise non_finite_error after the generation's state is put back: maps dense, counters zero, the KV cache
        allocated anew (a NaN left in it would reach later requests through the paths that mask keys past the
        sequence by adding -inf)."""
        set_sparse(self.model, False)
        for _, _, lin in sparse_linears(self.model):
            lin.counts.zero_()
        self.model.setup_cache(1, self.max_len, self.dtype)
        raise non_finite_error(self.dtype, when)

    @torch.inference_mode()
    def score(self, prompt: list[int], top: int, chunk: int | None = None,
              should_stop: Callable[[], bool] | None = None) -> PromptScores:
        """Each prompt token's log-probability given the tokens before it (float64 log-softmax of the logits, as
        generate's on_logits sees them) and the `top` most likely tokens at its position, for prompt[1:]. At a
        sparsity level every position runs with the thresholds on, as decoding each token sparse would compute it
        (the mask is per token, so one pass over many tokens equals token-by-token decoding; spqt perplexity's gptq
        method); dense, the logits are a prefill's. Runs `chunk` positions at a time (None: SCORE_VALUES // vocab,
        within 16 .. 256) and writes the KV cache: a dense pass leaves it as a prefill of the prompt does, which
        generate's reuse then takes up. should_stop: asked before each chunk; true ends the pass there (the scores
        of the positions run so far, a cache no reuse takes)."""
        self._check_prompt(prompt, 0)
        self._kept = ([], None)
        sparse = self.sparsity > 0 and not (self.device == "cpu" and self.dense_step_reason())
        set_sparse(self.model, sparse)
        dev, n = self.device, len(prompt)
        ids = torch.tensor(prompt, device=dev)
        vocab = self.loaded.config.vocab_size
        k, chunk = min(top, vocab), chunk or max(16, min(256, SCORE_VALUES // vocab))
        picked, top_values, top_ids, stopped = [], [], [], False
        try:
            for start in range(0, n - 1, chunk):
                if should_stop and should_stop():
                    stopped = True
                    break
                end = min(start + chunk, n - 1)  # positions start .. end - 1 predict tokens start + 1 .. end
                logits = self.model(ids[start:end].view(1, -1), torch.arange(start, end, device=dev), kv_len=end)[0]
                if not bool(torch.isfinite(logits).all()):
                    self._non_finite("of the prompt")
                logprobs = torch.log_softmax(logits.double(), dim=-1)
                picked.append(logprobs.gather(1, ids[start + 1:end + 1].view(-1, 1))[:, 0].cpu())
                values, at = torch.topk(logprobs, k, dim=-1)
                top_values.append(values.cpu())
                top_ids.append(at.cpu())
        finally:
            set_sparse(self.model, False)
        if not sparse and not stopped and n > 1:  # the cache holds prompt[:-1] as a dense prefill writes it
            self._kept = (list(prompt[:-1]), self.model.cache_generation)
        empty = torch.zeros(0, k, dtype=torch.float64)  # (a prompt of one token: nothing to score)
        return PromptScores(torch.cat(picked) if picked else empty.new_zeros(0),
                            torch.cat(top_ids) if top_ids else empty.long(), torch.cat(top_values) if top_values else empty)

    def _check_prompt(self, prompt: list[int], max_new_tokens: int) -> None:
        """SpqtError for an empty prompt, a token id beyond the vocabulary, or prompt plus new tokens past the cache."""
        if not prompt:
            raise SpqtError("the prompt is empty")
        if max(prompt) >= self.loaded.config.vocab_size or min(prompt) < 0:
            bad = max(prompt) if max(prompt) >= self.loaded.config.vocab_size else min(prompt)
            raise SpqtError(f"token id {bad} is outside the model's vocabulary of {self.loaded.config.vocab_size}")
        if len(prompt) + max_new_tokens > self.max_len:
            raise SpqtError(f"prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens exceed the context "
                            f"of {self.max_len} tokens")

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: set[int] = frozenset(), on_token=None, track: bool = True,
                 on_logits=None, reuse: bool = False,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        """Prefill the prompt (dense), then decode up to max_new_tokens (sparse when a level is set).
        on_token(token_id) sees each new token before the next step; a true return value ends the
        generation there (finish_reason "stop"; a server's stop strings and client disconnects use it).
        track: count the achieved sparsity (a few small kernels per linear map; off for timing).
        reuse: prefill only what follows the prompt's longest prefix whose keys and values the cache holds from the
        last generate() (reusable_prefix; result.cached_tokens says how many): its prompt, and its new tokens where
        they were decoded dense (sparse steps' keys and values are not what a dense prefill writes); on CUDA where
        that pays (_reuse_pays). The logits can differ from a whole prefill's in the last bits (other matrix shapes,
        another summation order). What writes the cache outside generate(), decode_step and capture_prefills (a
        caller's own model(...) calls, as the benchmarks make) must not be followed by a reuse.
        should_stop: asked before each layer of the prefill on the CPU (between_layers); true ends the generation
        before its first token: a result with no tokens, finish_reason "stop", and a cache no reuse takes.
        Logits that are not finite numbers raise non_finite_error (after the prefill, at each step whose token the host
        reads, after the last of CUDA's greedy graph replays), the generator put back as a fresh one (_non_finite)."""
        self._check_prompt(prompt, max_new_tokens)
        shaper = LogitShaper(sampling, prompt, self.loaded.config.vocab_size, self.device) \
            if sampling.shapes_logits() else None
        gen = torch.Generator(device=self.device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
        cached = self.reusable_prefix(prompt) if reuse else 0
        cached = cached if cached and self._reuse_pays(len(prompt), cached) else 0
        self._kept = ([], None)  # until this generation has written the cache
        set_sparse(self.model, False)
        self._sync()
        start = time.perf_counter()
        try:
            # (the CPU's alone: on CUDA a prefill is a graph, or launches that take milliseconds, and a capture of
            # one must not be cut)
            with between_layers(self.model, should_stop if self.device == "cpu" else None):
                logits = self._prefill(prompt, cached)
        except _Stopped:
            return GenerationResult([], len(prompt), time.perf_counter() - start, 0.0, finish_reason="stop",
                                    cached_tokens=cached)
        if on_logits:
            on_logits(logits[:, -1].float().cpu())
        self._check_finite(logits[:, -1], "of the prompt")  # (before sampling: a NaN probability is an error there)
        def choose(last: torch.Tensor) -> torch.Tensor:
            """The next token from a step's last logits (shaped first where sampling asks; counted by the shaper)."""
            token = sample(shaper(last) if shaper else last, sampling, gen)
            if shaper:
                shaper.add(token)
            return token

        token = choose(logits[:, -1])
        self._sync()
        prefill = time.perf_counter() - start
        out, steps = [], []
        # on the CPU a level whose every map runs dense (dense_step_reason) decodes as dense does, without the sparse
        # path's per-map checks (a GPU's steps are graphs: captured once, they run no Python per map)
        sparse = self.sparsity > 0 and not (self.device == "cpu" and self.dense_step_reason())
        set_sparse(self.model, sparse, track=track and sparse)
        pos = len(prompt)
        finish = "length"
        greedy_in_graph = self.use_graph and sampling.temperature == 0 and shaper is None
        if greedy_in_graph and on_logits is None:
            t = int(token)
            out.append(t)
            if (on_token and on_token(t)) or t in stop_ids:
                finish = "stop"
            elif max_new_tokens > 1:
                more, steps, finish = self._decode_greedy_pipelined(t, pos, max_new_tokens - 1, on_token, stop_ids)
                out += more
                # the last step's logits (past a stop, the discarded step's): checked once, not a read a step; a
                # NaN in the KV cache reaches every later step
                self._check_finite(self._logits[:, -1], f"after {len(out)} new tokens")
            max_new_tokens = 0  # done: the loop below is the host-driven path
        threads = self._decode_threads() if self.device == "cpu" and max_new_tokens > 1 else None
        try:
            for _ in range(max_new_tokens):
                t = int(token)
                out.append(t)
                halt = bool(on_token(t)) if on_token else False
                if halt or t in stop_ids:
                    finish = "stop"
                    break
                if len(out) == max_new_tokens:
                    break
                t0 = time.perf_counter()
                if threads:
                    threads.check(len(steps))  # timed with the step it precedes
                logits = self.decode_step(t, pos)
                if on_logits:
                    on_logits(logits[:, -1].float().cpu())
                # each step's logits checked where the host reads each token anyway: on the device, read after the
                # step's sync (no wait of its own); a sample takes zeros in their place (a NaN probability is an
                # error, on CUDA a device-side assert)
                last = logits[:, -1]
                finite = torch.isfinite(last).all()
                token = self.greedy_token if greedy_in_graph else choose(torch.where(finite, last, 0.0))
                self._sync()
                if not bool(finite):
                    self._non_finite(f"after {len(out)} new tokens")
                steps.append(time.perf_counter() - t0)
                if threads:
                    threads.observe(steps[-1])
                pos += 1
        finally:
            if threads:
                threads.restore()
        achieved = achieved_sparsity(self.model) if sparse and track else {}
        set_sparse(self.model, False)
        # the cache now holds the prompt and every new token but the last (never fed back); decoded tokens count
        # where their steps ran dense
        self._kept = (list(prompt) + (out[:-1] if not sparse else []), self.model.cache_generation)
        return GenerationResult(out, len(prompt), prefill, sum(steps), steps, achieved, finish, cached)
