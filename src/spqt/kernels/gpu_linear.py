"""The GPU implementation behind spqt.linear.Linear: Q4_K blocks in kernel layout, Triton GEMV
for one token (B2 / B4 for zigzag, B0 for row); several tokens: zigzag Q4_K's blocks read in a GEMM of their own
(fp16 or bf16 on CUDA: gemm_cuda, up to its MAX_TOKENS rows; else gemm_q4k: up to its MAX_TOKENS rows, maps of
MIN_WEIGHTS and more), else dequantize + cuBLAS GEMM.
A residual add or the SwiGLU product runs inside the zigzag GEMV's reduction (one launch less);
an RMSNorm in front of a sparse map runs with the map's index collection (one launch less); in front of a dense
map on the CUDA GEMV it runs inside the GEMV (dense_normed: no launch), where the map that wrote its input finished
in the reduction kernel, which then also wrote its output's sums of squares (the output tensor carries them as
functional.NORM_SUMS; SPQT_NORM_FOLD=0 turns this off, for comparisons).
sparse_pays: the tuned crossovers of the shape (the lowest sparsity from which B4 with its collection, or MODE_KEPT,
beat B2). sparse_kept: a sparse map in ONE launch of the CUDA GEMV's MODE_KEPT on B2's config: each program lists its
share's kept inputs itself (no collection launch), the norm folded as in B2. Which maps run it is a property of the
whole decode step, not of a map timed alone (in whole steps it gained 6 % on the 7B at 50 % and lost 4 % on the 70B;
the table's per-map choice lost 3 % on the 70B: docs/RESULTS.md, sixteenth session), so by default a model runs the
route that `spqt tune --routes` measured for its geometry on this GPU (kept_route, set by the Generator; off where
none was measured), or every map dense where the tuned route of its level is "dense" (step_dense: no sparse step beat
the dense one there). SPQT_SPARSE_KEPT overrides it: =1 every sparse map, =norm / =plain the norm-fed maps / the
others, =0 none, =table where the tuned table says the map alone beat both B2 and the collected B4 (kept_first),
=dense every map dense.
TritonZigzagTypesLinear: the same for zigzag Q8_0 / Q6_K / Q5_K / Q3_K / Q2_K (zigzag_types.py).
CudaKQuantLinear: zigzag Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 on the CUDA GEMV (zigzag_q4k.cu TYPE 2 / 3 / 5 / 6 / 8) where it
runs (fp16 or bf16, sm_80+, NVRTC)."""

import functools
import os

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.functional import NORM_SUMS, linear_epilogue
from spqt.kernels import gemv as kg
from spqt.kernels import tuning
from spqt.kernels import fused as kf
from spqt.kernels import gemm_cuda
from spqt.kernels import gemm_q4k as kq
from spqt.kernels import zigzag_cuda
from spqt.kernels import zigzag_types as zt
from spqt.kernels.collect import collect
from spqt.kernels.gpu_layout import GpuQ4K, repack
from spqt.kernels.gpu_layout_types import GpuZigzag
from spqt.kernels.gpu_layout_types import repack as repack_types
from spqt.kernels.reference import sparsify


@functools.lru_cache(maxsize=None)
def norm_fold_on() -> bool:
    """SPQT_NORM_FOLD=0 keeps every RMSNorm a launch of its own (measurement); read once."""
    return os.environ.get("SPQT_NORM_FOLD", "1") != "0"


def norm_foldable(w, v: torch.Tensor, split: int, args: dict, gamma: torch.Tensor) -> bool:
    """Whether w's B2 (this split, the launch args of its config) can run the RMSNorm of its input v inside it:
    SPQT_NORM_FOLD on, the CUDA GEMV runs it, and zigzag_cuda.norm_fits (the share, the alignment)."""
    return (norm_fold_on() and kg.finish_plan(w, v, kg.MODE_DENSE, split, kg.EPILOGUE_NONE, args["impl"])[0]
            and zigzag_cuda.norm_fits(w.shape[1], split, args["num_warps"], v, gamma))


def kept_layout(w) -> bool:
    """Whether w is a zigzag matrix in a layout of the CUDA GEMV, whose MODE_KEPT runs it: Q4_K's (GpuQ4K), or a
    Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 one (zigzag_cuda.kquant_layout; not the Triton type kernels' GpuZigzag)."""
    return w.layout == "zigzag" and (isinstance(w, GpuQ4K) or zigzag_cuda.in_kquant_layout(w))


def kept_runnable(w, v: torch.Tensor, split: int, args: dict) -> bool:
    """Whether w's MODE_KEPT can run with this split and the launch args of a config: a layout of the CUDA GEMV
    (kept_layout), the CUDA GEMV runs it, and a share of at most NORM_SHARE columns (zigzag_cuda.kept_fits; its list
    in shared memory)."""
    return (kept_layout(w) and kg.finish_plan(w, v, kg.MODE_KEPT, split, kg.EPILOGUE_NONE, args["impl"])[0]
            and zigzag_cuda.kept_fits(w.shape[1], split, args["num_warps"]))


def bf16_on_cuda(cfg: dict, dtype: torch.dtype, device) -> dict:
    """A Q4_K zigzag entry as a bf16 map runs it: where the entry names the Triton kernel, the CUDA GEMV with the
    entry's split, warps and accumulators instead, wherever that runs (SPQT_GEMV unset, zigzag_cuda.usable): the tuner
    timed Triton in fp16, where it holds x d sc as one fp16 term, and in bf16 it takes two (two mma a tile); with every
    map on the CUDA GEMV, bf16 decodes of llama2-7b, glm4-9b and gemma2-2b ran 1.13-1.21x as fast as on the H100 table's
    Triton entries (docs/RESULTS.md, forty-fifth session). Other dtypes, devices and CUDA entries unchanged."""
    if (dtype != torch.bfloat16 or cfg.get("impl") == "cuda" or zigzag_cuda.choice()
            or not str(device).startswith("cuda")):
        return cfg
    return cfg | {"impl": "cuda"} if zigzag_cuda.usable(torch.device(device)) else cfg


# SPQT_SPARSE_KEPT's values: the routes by name (tuning.STEP_ROUTE_NAMES; "1" and "0" too), "plain", "table"
KEPT_SETTINGS = {"1": "all", "0": "off", **{r: r for r in tuning.STEP_ROUTE_NAMES}, "plain": "plain",
                 "table": "table"}


def kept_setting() -> str | None:
    """Which sparse maps try MODE_KEPT first as SPQT_SPARSE_KEPT asks: "all" (=1 or =all), "norm" (=norm: the maps
    whose input an RMSNorm makes, q|k|v and gate|up), "plain" (=plain: the others, o and down), "table" (=table: where
    the tuned table says the map alone won, TritonLinear.kept_pays), "dense" (=dense: every map dense, as the tuned
    route of a level where sparse steps do not pay), anything else set "off" (=0, =off); None where it
    is unset or empty (the default: the model's tuned step route, TritonLinear.kept_route). Read at each call; a
    decode step's captured CUDA graph keeps the routing it was captured with (Generator.drop_graphs after a change, as
    scripts/kept_probe.py does)."""
    value = os.environ.get("SPQT_SPARSE_KEPT", "")
    return KEPT_SETTINGS.get(value, "off") if value else None


def kept_config() -> str:
    """SPQT_KEPT_CONFIG=sparse: MODE_KEPT runs the shape's tuned B4 config and workspace; else B2's (the default).
    Read at each call (a probe compares them)."""
    return "sparse" if os.environ.get("SPQT_KEPT_CONFIG", "") == "sparse" else "dense"


def fused_gemm_runs(w, dtype: torch.dtype, rows: int) -> bool:
    """Whether `rows` rows of x in `dtype` (tokens times batch: a prefill's bucket, a perplexity batch) times w run
    gemm_q4k (the blocks read in the GEMM) rather than dequantize + cuBLAS: a zigzag Q4_K matrix of at least
    gemm_q4k.MIN_WEIGHTS weights, fp16 / bf16 x, at most gemm_q4k.MAX_TOKENS rows, or LARGE_MAX_TOKENS rows for a
    matrix of LARGE_WEIGHTS or more (where it measured faster; docs/RESULTS.md, twenty-ninth and thirtieth sessions).
    SPQT_PREFILL_GEMM=fused / =dequant forces one (measurement); read at each call."""
    setting = os.environ.get("SPQT_PREFILL_GEMM", "")
    if setting == "dequant" or w.layout != "zigzag" or w.fmt != "q4_k" or dtype not in (torch.float16, torch.bfloat16):
        return False
    weights = w.shape[0] * w.shape[1]
    return setting == "fused" or (rows <= kq.MAX_TOKENS and weights >= kq.MIN_WEIGHTS) or (
        rows <= kq.LARGE_MAX_TOKENS and weights >= kq.LARGE_WEIGHTS)


def cuda_gemm_runs(w, x: torch.Tensor, rows: int) -> bool:
    """Whether `rows` rows of x times w run the CUDA GEMM (gemm_cuda: the tokens as the mma's n, the levels its A
    operand) before gemm_q4k or dequantize + cuBLAS: fp16 or bf16 x on a GPU where it runs (gemm_cuda.runs), a zigzag
    Q4_K matrix and rows where it measured faster (gemm_cuda.pays; docs/RESULTS.md, thirty-first and thirty-second
    sessions, in fp16; bf16 took the same time on the 7B's maps, forty-sixth).
    SPQT_PREFILL_GEMM=cuda forces it where it runs up to gemm_q4k.LARGE_MAX_TOKENS rows (its partial sums grow with
    the rows), =fused / =dequant the others (measurement); read at each call."""
    setting = os.environ.get("SPQT_PREFILL_GEMM", "")
    if setting in ("dequant", "fused") or not gemm_cuda.runs(w, x):
        return False
    return (setting == "cuda" and rows <= kq.LARGE_MAX_TOKENS) or gemm_cuda.pays(w.shape[0], w.shape[1], rows)


def _with_sums(y: torch.Tensor, shape: torch.Size, sums: torch.Tensor | None) -> torch.Tensor:
    """y viewed as (..., N) of x's shape, carrying its sums of squares (NORM_SUMS) where they were written."""
    out = y.view(*shape[:-1], y.numel())
    if sums is not None:
        setattr(out, NORM_SUMS, sums)
    return out


def _kernel_weight(weight, kernel_type, repack_fn, device: str):
    """weight as kernel_type (kept if it is one; a QuantizedWeight repacked onto the device)."""
    if isinstance(weight, kernel_type):
        return weight
    if isinstance(weight, QuantizedWeight):
        return repack_fn(weight, device)
    raise ValueError("the triton backend runs quantized weights; float models use the reference backend")


class TritonLinear:
    kept_route = "off"  # which sparse maps of the decode step run MODE_KEPT (tuning.STEP_ROUTE_NAMES; set_kept_route)
    # whether a residual epilogue also writes the output's sums of squares for a folded norm after it (False: the
    # output feeds no norm, as a biased map's, whose bias comes as the residual: Linear sets it)
    norm_sums = True

    def __init__(self, weight, dtype: torch.dtype, device: str):
        self.w = _kernel_weight(weight, GpuQ4K, repack, device)
        self.n, self.k = weight.shape
        self.fuses_norm = self.w.layout == "zigzag"  # sparse_normed: the row layout has no sparse kernel
        if self.w.layout == "zigzag":
            def entry(kind: str) -> dict:
                return bf16_on_cuda(tuning.config(f"zigzag_{kind}", self.n, self.k), dtype, device)

            self._zigzag_setup(entry, kg.ZigzagWorkspace, dtype, device)
        else:
            self.cfg_row = tuning.config("row_dense", self.n, self.k)
            self.y = torch.empty(self.n, dtype=dtype, device=device)

    def _zigzag_setup(self, config, workspace, dtype: torch.dtype, device: str) -> None:
        """The tuned configs config(kind) (kind "dense" / "sparse") for this shape, their preallocated
        workspaces, and sparse_normed's norm output (K,)."""
        self.cfg_dense, self.cfg_sparse = config("dense"), config("sparse")
        self.ws_dense = workspace(self.w, self.cfg_dense["split"], dtype)
        self.ws_sparse = workspace(self.w, self.cfg_sparse["split"], dtype)
        self.normed = torch.empty(self.k, dtype=dtype, device=device)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.k
        if cuda_gemm_runs(self.w, x, rows):
            return gemm_cuda.gemm(self.w, x.reshape(rows, self.k).contiguous()).view(*x.shape[:-1], self.n)
        if fused_gemm_runs(self.w, x.dtype, rows):
            return kq.gemm_q4k(self.w, x.reshape(rows, self.k).contiguous()).view(*x.shape[:-1], self.n)
        w = kg.dequantize(self.w, x.dtype)
        return torch.nn.functional.linear(x, w)

    def _gemv_epilogue(self, residual: torch.Tensor | None, swiglu: bool) -> dict | None:
        """The fused-epilogue arguments of gemv_zigzag, or None where the epilogue runs in torch."""
        if self.w.layout != "zigzag":
            return None
        return {"residual": None if residual is None else residual.reshape(self.n).contiguous(), "swiglu": swiglu}

    def _gemv(self, v: torch.Tensor, mode: int, ws: kg.ZigzagWorkspace, cfg: dict, epilogue: dict, **more):
        """gemv_zigzag of v (K,) with a config and workspace -> (y, ws.sumsq where the reduction wrote the
        sums of squares of a residual map's output, else None)."""
        args = tuning.launch_args(cfg)
        sums = (self.norm_sums and epilogue["residual"] is not None and norm_fold_on()
                and not kg.finish_plan(self.w, v, mode, ws.split, kg.EPILOGUE_RESIDUAL, args["impl"], args["fused"],
                                       args["cluster"])[2])
        y = kg.gemv_zigzag(self.w, v, mode, ws, **args, **epilogue, sumsq=sums, **more)
        return y, ws.sumsq if sums else None

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        if x.numel() != self.k:
            return linear_epilogue(self._gemm(x), residual, swiglu)
        v = x.reshape(self.k)
        fused = self._gemv_epilogue(residual, swiglu)
        if fused is not None:
            y, sums = self._gemv(v, kg.MODE_DENSE, self.ws_dense, self.cfg_dense, fused)
            return _with_sums(y, x.shape, sums)
        y = kg.gemv_row(self.w, v, out=self.y, **self.cfg_row)
        return linear_epilogue(y.view(*x.shape[:-1], self.n), residual, swiglu)

    def dense_normed(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, sums: torch.Tensor,
                     residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor | None:
        """W rms_norm(x) for one token x (..., K) fp16 or bf16 (norm_weight fp32, as the runtime keeps it) with the
        norm inside the CUDA B2, its rstd from x's sums of squares `sums` (fp32, written by the reduction that finished
        x); None where this map cannot fold it (the row layout, the Triton GEMV, fp32 x, a share too wide or x
        unaligned: zigzag_cuda.norm_fits)."""
        if (self.w.layout != "zigzag" or x.numel() != self.k or x.dtype not in zigzag_cuda.X_DTYPES
                or norm_weight.dtype != torch.float32):
            return None
        v = x.reshape(self.k)
        gamma = norm_weight.reshape(self.k)
        if not norm_foldable(self.w, v, self.ws_dense.split, tuning.launch_args(self.cfg_dense), gamma):
            return None
        y, out_sums = self._gemv(v, kg.MODE_DENSE, self.ws_dense, self.cfg_dense, self._gemv_epilogue(residual, swiglu),
                                 norm=(gamma, sums, eps))
        return _with_sums(y, x.shape, out_sums)

    def collected_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """Whether B4 at this sparsity beat B2 for this shape when tuned (collection included,
        or fused into the norm for norm_fed inputs); True where the table has no crossover; False where the step
        runs dense (step_dense)."""
        if self.step_dense():
            return False
        if self.w.layout != "zigzag" or level is None:
            return True
        key = "crossover_fused" if norm_fed else "crossover"
        if key not in self.cfg_sparse:
            return True
        crossover = self.cfg_sparse[key]
        return crossover is not None and level >= crossover

    def kept_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """Whether MODE_KEPT at this sparsity beat both B2 and the collected B4 for this shape when tuned
        ("crossover_kept", norm_fed: "crossover_kept_fused", bench.crossover); False where the table has none."""
        if self.w.layout != "zigzag" or level is None:
            return False
        crossover = self.cfg_sparse.get("crossover_kept_fused" if norm_fed else "crossover_kept")
        return crossover is not None and level >= crossover

    def step_dense(self) -> bool:
        """Whether the decode step runs every map dense at this level: its tuned route is "dense" (sparse steps were
        slower than the dense step there) or SPQT_SPARSE_KEPT=dense asks it."""
        return (kept_setting() or self.kept_route) == tuning.STEP_DENSE

    def sparse_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """Whether a sparse kernel beat B2 at this sparsity for this shape: the collected B4, or MODE_KEPT where the
        table decides it (SPQT_SPARSE_KEPT=table); never where the step runs dense (step_dense: collected_pays). A
        route ("all", "norm") runs MODE_KEPT on the maps the collected B4 makes sparse, as `spqt tune --routes`
        timed it: counting MODE_KEPT's own crossover there too made the 13B at 25 % 1 % slower than dense on the H200
        (docs/RESULTS.md, twenty-fifth session)."""
        return self.collected_pays(level, norm_fed) or (kept_setting() == "table" and self.kept_pays(level, norm_fed))

    def kept_first(self, level: float | None, norm_fed: bool = False) -> bool:
        """Whether a sparse forward tries MODE_KEPT (sparse_kept) before the collected B4: as SPQT_SPARSE_KEPT asks
        (kept_setting), else by the model's tuned step route (kept_route: "off", "norm", "all" or "dense": none)."""
        setting = kept_setting() or self.kept_route
        if setting == "table":
            return self.kept_pays(level, norm_fed)
        return setting == "all" or (setting == "norm" and norm_fed) or (setting == "plain" and not norm_fed)

    def sparse_normed(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, threshold: torch.Tensor,
                      residual: torch.Tensor | None = None, swiglu: bool = False, scale: torch.Tensor | None = None):
        """W sparsify(rms_norm(x)) for one token, the norm and the collection in one launch (scale:
        as sparse()'s). Returns (y, the normed x (..., K)). Zigzag only (the row layout has no sparse kernel)."""
        ws = self.ws_sparse
        kf.rms_norm_collect(x.reshape(self.k), norm_weight, eps, threshold, self.normed, ws.idx, ws.count, scale=scale)
        y, sums = self._gemv_indexed(self.normed, self._gemv_epilogue(residual, swiglu))
        return _with_sums(y, x.shape, sums), self.normed.view(x.shape)

    def sparse_kept(self, x: torch.Tensor, threshold: torch.Tensor, residual: torch.Tensor | None = None,
                    swiglu: bool = False, scale: torch.Tensor | None = None,
                    norm: tuple | None = None) -> torch.Tensor | None:
        """W sparsify(x) for one token x (..., K) fp16 or bf16 in one launch: the CUDA GEMV's MODE_KEPT with B2's config
        (without tile pairs) and workspace (kept_config(): or B4's), each program listing its share's inputs with
        |x_k| (scale_k) > threshold;
        norm (gamma (K,) fp32, eps, sums: x's sums of squares from the reduction that wrote it): of rms_norm(x)
        instead, the norm folded as in dense_normed. None where it cannot run here (not in a zigzag layout of the
        CUDA GEMV: kept_layout, fp32 x, the CUDA GEMV not configured, a share over NORM_SHARE columns, x or gamma
        unaligned)."""
        if (not kept_layout(self.w) or x.numel() != self.k or x.dtype not in zigzag_cuda.X_DTYPES
                or threshold.dtype != torch.float32 or threshold.numel() != 1 or x.data_ptr() % 16):
            return None
        v = x.reshape(self.k)
        cfg, ws = (self.cfg_sparse, self.ws_sparse) if kept_config() == "sparse" else (self.cfg_dense, self.ws_dense)
        cfg = tuning.without_pairs(cfg)  # the config the step routes were timed with (tuning.without_pairs)
        args = tuning.launch_args(cfg)
        split = ws.split
        epilogue = self._gemv_epilogue(residual, swiglu)
        if not kept_runnable(self.w, v, split, args):
            return None
        more = {"threshold": threshold.reshape(()), "scale": scale}
        if norm is not None:
            gamma, eps, sums = norm
            gamma = gamma.reshape(self.k)
            if gamma.dtype != torch.float32 or not zigzag_cuda.norm_fits(self.k, split, args["num_warps"], v, gamma):
                return None
            more["norm"] = (gamma, sums, eps)
        y, out_sums = self._gemv(v, kg.MODE_KEPT, ws, cfg, epilogue, **more)
        return _with_sums(y, x.shape, out_sums)

    def _gemv_indexed(self, v: torch.Tensor, epilogue: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """B4 over v (K,) with the index list already in the sparse workspace: (y, its sums of squares or None)."""
        ws = self.ws_sparse
        return self._gemv(v, kg.MODE_INDEXED, ws, self.cfg_sparse, epilogue, idx=ws.idx, count=ws.count)

    def sparse(self, x: torch.Tensor, threshold: torch.Tensor, residual: torch.Tensor | None = None,
               swiglu: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
        """scale: (K,) fp32 or None, WINA's column norms (keep |x| * scale > t)."""
        fused = self._gemv_epilogue(residual, swiglu) if x.numel() == self.k else None
        if fused is None:
            return self.dense(sparsify(x, threshold, scale), residual, swiglu)
        v = x.reshape(self.k)
        collect(v, threshold, self.ws_sparse.idx, self.ws_sparse.count, scale=scale)
        y, sums = self._gemv_indexed(v, fused)
        return _with_sums(y, x.shape, sums)


class TritonZigzagTypesLinear(TritonLinear):
    """A zigzag Q8_0 ... Q2_K map: one token through zigzag_types.gemv (B2 dense, B4 on the
    collected index list, the residual / SwiGLU epilogue in its reduction, the RMSNorm fused with
    the collection as for Q4_K); several tokens: zigzag_types.dequantize into x's dtype, then
    cuBLAS. Configs: tuning variants
    "zigzag_{dense,sparse}_<type>" (defaults until `spqt tune` times them)."""

    def __init__(self, weight, dtype: torch.dtype, device: str):
        self.w = _kernel_weight(weight, GpuZigzag, repack_types, device)
        self.n, self.k = weight.shape
        self.fuses_norm = True
        # the Triton type kernel's config (a CUDA entry's fallback where the CUDA GEMV won the shape)
        self._zigzag_setup(lambda kind: tuning.triton_config(f"zigzag_{kind}_{self.w.fmt}", self.n, self.k),
                           zt.TypesWorkspace, dtype, device)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, zt.dequantize(self.w, x.dtype))

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        if x.numel() != self.k:
            return linear_epilogue(self._gemm(x), residual, swiglu)
        y = zt.gemv(self.w, x.reshape(self.k), zt.MODE_DENSE, self.ws_dense, **tuning.types_launch_args(self.cfg_dense),
                    **self._gemv_epilogue(residual, swiglu))
        return y.view(*x.shape[:-1], y.numel())

    def _gemv_indexed(self, v: torch.Tensor, epilogue: dict) -> tuple[torch.Tensor, None]:
        ws = self.ws_sparse
        return zt.gemv(self.w, v, zt.MODE_INDEXED, ws, **tuning.types_launch_args(self.cfg_sparse), idx=ws.idx,
                       count=ws.count, **epilogue), None

    def dense_normed(self, x, norm_weight, eps, sums, residual=None, swiglu=False) -> None:
        """The Triton type kernels do not fold the norm (the module runs it)."""
        return None

    def kept_first(self, level: float | None, norm_fed: bool = False) -> bool:
        """The Triton type kernels have no MODE_KEPT (the collection runs)."""
        return False


class CudaKQuantLinear(TritonLinear):
    """A zigzag Q2_K, Q3_K, Q5_K, Q6_K or Q8_0 map on the CUDA GEMV (its layout by weight.fmt: zigzag_cuda.kquant_layout;
    dispatch picks it for fp16 and bf16 where zigzag_cuda.usable()): one token through gemv_zigzag, which runs
    these layouts on the CUDA kernel whatever impl the config names; the configs and crossovers are the type's
    tuned CUDA entries (`spqt tune --types`), else the Q4_K table's of the shape (the same kernel, 84 / 112 / 176 /
    210 / 272 bytes a column-superblock instead of 144): tuning.cuda_type_config; several tokens: the dequant kernel,
    cuBLAS."""

    def __init__(self, weight, dtype: torch.dtype, device: str):
        layout = zigzag_cuda.kquant_layout(weight.fmt)
        if layout is None or weight.layout != "zigzag":
            raise ValueError(f"the CUDA GEMV's K-quant layouts take zigzag q2_k / q3_k / q5_k / q6_k / q8_0, not {weight.layout} "
                             f"{weight.fmt}")
        if dtype not in zigzag_cuda.X_DTYPES:
            raise ValueError(f"the {weight.fmt} CUDA GEMV takes fp16 or bf16 activations, not {dtype}")
        self.w = _kernel_weight(weight, *layout, device)
        self.n, self.k = weight.shape
        self.fuses_norm = True
        self._zigzag_setup(lambda kind: tuning.cuda_type_config(kind, self.w.fmt, self.n, self.k), kg.ZigzagWorkspace,
                           dtype, device)
