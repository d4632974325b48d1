"""GEMV benchmark (B0..B4 and torch fp16; B2 and B4 of the other zigzag types) and the kernel
tuner, on a CUDA GPU.

Timing: each variant's call sequence (collect + GEMV + reduce where it has them) is captured in a
CUDA graph of `calls` consecutive calls over rotating weight copies whose total size exceeds 4x
the L2 cache; the graph is replayed after warm-up and timed with CUDA events; we report the
median per-call time over the replays (a shape's first sequence is timed once untimed before:
shape_timer). Bandwidth figures count the bytes a variant needs (the
active blocks only for sparse variants, x and y included) and are compared with a device-to-
device copy measured in the same run (bytes read + written).
"""

import dataclasses
import datetime
import json
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

import spqt
from spqt.checkpoint import QuantizedWeight
from spqt.errors import SpqtError
from spqt.kernels import gemv as kg
from spqt.kernels import tuning
from spqt.kernels import zigzag_cuda
from spqt.kernels import zigzag_types as zt
from spqt.kernels.collect import collect
from spqt.kernels.fused import rms_norm, rms_norm_collect
from spqt.kernels.gpu_layout import GpuQ4K, repack
from spqt.kernels.gpu_layout_types import GpuZigzag
from spqt.kernels.gpu_layout_types import repack as repack_types
from spqt.kernels.reference import sparsify

MODEL_SHAPES = {
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(1024, 4096), (14336, 4096), (4096, 14336)],
    "llama2-13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "llama2-70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}
VARIANTS = ("B0", "B1", "B2", "B3", "B4", "B4K", "B4KS", "B2n", "B4n", "B4Kn", "B4KSn", "fp16")
# B4K: MODE_KEPT (each program lists its share's kept inputs; B2's config on the CUDA GEMV; B4KS: B4's config); B2n,
# B4n, B4Kn, B4KSn: a norm-fed map (x is the RMSNorm of the input): B2 with the norm folded, the norm fused with B4's
# collection + B4, MODE_KEPT with the norm folded
GEMV_TYPES = ("q4_k",) + tuning.TYPE_FORMATS  # the other types have B2 and B4 only (zigzag_types.py)
# SmolLM2-135M, the default model: what `runtime` adds besides the synthetic models
DEFAULT_MODEL_DIMS = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536)


def runtime_shapes() -> list[tuple[int, int]]:
    """The (N, K) of the matrices the runtime multiplies: q|k|v and gate|up fused, o, down, for
    the synthetic models and the default model (`spqt tune` times these too)."""
    from spqt.bench_decode import SYNTHETIC
    from spqt.config import ModelConfig

    shapes = []
    for dims in [*SYNTHETIC.values(), DEFAULT_MODEL_DIMS]:
        shapes += ModelConfig(**dims).map_shapes()
    return list(dict.fromkeys(shapes))


def parse_shapes(text: str, runtime_maps: bool = False) -> list[tuple[int, int]]:
    """The (N, K) named by text, comma-separated: NxK, `runtime` (runtime_shapes), `default` (the default model's
    maps as the runtime runs them), or a model name: its matrices one by one (MODEL_SHAPES, the GEMV benchmark's).
    runtime_maps (spqt tune): a model name also gives its layers' maps as the runtime stores and runs them (q|k|v and
    gate|up fused; not the head), and names every synthetic geometry. In order, once each. SpqtError for anything
    else."""
    from spqt.bench_decode import SYNTHETIC
    from spqt.config import ModelConfig

    shapes = []
    for item in text.split(","):
        item = item.strip()
        if item == "runtime":
            shapes += runtime_shapes()
        elif item == "default":
            shapes += ModelConfig(**DEFAULT_MODEL_DIMS).map_shapes()
        elif item in MODEL_SHAPES or (runtime_maps and item in SYNTHETIC):
            shapes += MODEL_SHAPES.get(item, [])
            if runtime_maps:
                shapes += ModelConfig(**SYNTHETIC[item]).map_shapes()
        elif re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", item.lower()):
            n, k = item.lower().split("x")
            shapes.append((int(n), int(k)))
        elif item:
            names = SYNTHETIC if runtime_maps else MODEL_SHAPES
            raise SpqtError(f"unknown shape {item!r}: use NxK, runtime, default or one of {', '.join(names)}")
    return list(dict.fromkeys(shapes))


def tune_plan(maps) -> dict[tuple[str, tuple[str, ...]], list[tuple[int, int]]]:
    """The tuned kernels a model's quantized maps run, maps {name: (fmt, layout, (N, K))} (checkpoint.spqt_maps, or
    weight_maps of a loaded model): {(fmt, table variants): [(N, K), ...]}, the maps as stored (q|k|v and gate|up
    fused) grouped by the variants they run: zigzag Q4_K (zigzag_dense, zigzag_sparse), row Q4_K (row_dense), another
    zigzag type (zigzag_dense_<fmt>, zigzag_sparse_<fmt>); a quantized head dense only (it never runs sparse). Maps
    without tuned kernels (other types in the row layout) are left out."""
    from spqt.kernels.dispatch import has_kernels

    plan: dict[tuple[str, tuple[str, ...]], list[tuple[int, int]]] = {}
    for name, (fmt, layout, shape) in maps.items():
        if not has_kernels(fmt, layout):
            continue
        kinds = ("dense",) if name == "output" else ("dense", "sparse")
        variants = (("row_dense",) if layout == "row" else tuple(f"zigzag_{kind}" for kind in kinds)
                    if fmt == "q4_k" else tuple(f"zigzag_{kind}_{fmt}" for kind in kinds))
        plan.setdefault((fmt, variants), []).append(tuple(shape))
    plan = {group: list(dict.fromkeys(shapes)) for group, shapes in plan.items()}
    for (fmt, variants), shapes in plan.items():  # a head's shape that a map also has: timed with the map's variants
        wider = [s for (f, v), ss in plan.items() if f == fmt and set(v) > set(variants) for s in ss]
        shapes[:] = [s for s in shapes if s not in wider]
    return {group: shapes for group, shapes in plan.items() if shapes}


def weight_maps(weights: dict) -> dict:
    """A loaded model's quantized maps as tune_plan takes them: {name: (fmt, layout, (N, K))}."""
    return {name: (w.fmt, w.layout, tuple(w.shape)) for name, w in weights.items() if isinstance(w, QuantizedWeight)}


def untuned_note(loaded, sparse: bool = True) -> str | None:
    """For a model about to run on this GPU's CUDA kernels (a LoadedModel): a line saying how many of its maps' (type,
    shape) the tuned table lacks, which run a neighbour's or Q4_K's config (on the H200 up to 15 % slower, the 8B's
    Q6_K maps), or, where the run is sparse (sparse), have no measured crossover, which run sparse at every level (on
    the H100's table before its crossovers the default model at 50 % decoded 21 % slower than dense), and how to time
    them (a .spqt: spqt tune --model; else, as a GGUF or an HF folder loads quantized, those types and shapes); None
    where every map has measured entries of its own, or lacks only crossovers in a dense run."""
    def listed(groups: dict) -> list[tuple[str, str]]:  # sorted (type, "NxK")
        return sorted({(fmt, f"{n}x{k}") for (fmt, _), group in groups.items() for n, k in group})

    def named(pairs: list) -> str:
        return ", ".join(f"{fmt} {shape}" for fmt, shape in pairs[:4]) + (", ..." if len(pairs) > 4 else "")

    plan = tune_plan(weight_maps(loaded.weights))
    uncrossed = listed(tuning.uncrossed(plan))
    shapes = [s for s in listed(tuning.untuned(plan)) if s not in uncrossed]
    without_cross = uncrossed if sparse else []
    if not shapes and not without_cross:
        return None
    path = getattr(loaded, "path", None)
    if str(path).endswith(".spqt"):
        command = f"spqt tune --model {path}"
    else:  # a GGUF or an HF folder, quantized as it loads: its maps' shapes and types themselves
        listed_pairs = shapes + without_cross
        command = (f"spqt tune --types {','.join(sorted({fmt for fmt, _ in listed_pairs}))} --shapes "
                   f"{','.join(dict.fromkeys(shape for _, shape in listed_pairs))}")
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} of this model's map shapes have no tuned config of their type on this GPU "
                     f"({named(shapes)}) and run a neighbour's, Q4_K's or the default")
    if without_cross:
        subject = f"{len(without_cross)} more" if shapes else f"{len(without_cross)} of this model's map shapes"
        parts.append(f"{subject} have no measured crossover on this GPU ({named(without_cross)}): at any sparsity "
                     f"they run sparse, faster than dense or not")
    return "; ".join(parts) + f": {command} times them"


def model_tune_plan(paths, names=None) -> dict[tuple[str, tuple[str, ...]], list[tuple[int, int]]]:
    """What `spqt tune --model` times for these .spqt models: tune_plan of their maps (from the metadata), merged. A
    GGUF, a folder or a bad file: SpqtError. names: what the GGUF's or folder's error calls each (a hub name for its
    downloaded file; default its path)."""
    from spqt.checkpoint import spqt_maps
    from spqt.sources import is_gguf

    plan: dict[tuple[str, tuple[str, ...]], list[tuple[int, int]]] = {}
    for path, name in zip(paths, names or paths):
        p = Path(path)
        if p.is_dir() or is_gguf(p):
            raise SpqtError(f"{name}: spqt tune --model times a .spqt model's maps; quantize it first "
                            f"(spqt quantize {name} -o model.spqt)")
        for group, shapes in tune_plan(spqt_maps(p).maps).items():
            plan[group] = list(dict.fromkeys(plan.get(group, []) + shapes))
    return plan


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, GB/s counting bytes read plus written (median of `reps`)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times) / 1e9


def time_graph(fn_calls: list, replays: int = 30, warmup: int = 5) -> float:
    """Median seconds per call of a list of zero-argument launches, captured as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fn_calls[: min(3, len(fn_calls))]:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fn_calls:
            f()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    return statistics.median(replay_seconds(graph, replays, len(fn_calls)))


def replay_seconds(graph, replays: int, launches: int) -> list[float]:
    """Seconds a launch of each of `replays` replays of a captured CUDA graph of `launches` launches, one after
    another, each timed by CUDA events and waited for."""
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / launches)
    return times


def shape_timer(replays: int = 30, warmup: int = 5):
    """time_graph (at replays, warmup) for one shape's sequences, the first of them timed once untimed before (10
    replays): the first timing after building a shape's operands measured 5-10 % slow on the H200 (the same kernel
    right after it was not). `bench gemv`, the tuner (_fastest) and the crossovers time through it. Without it
    `bench gemv`'s B2, timed first, read 13.9 / 15.9 % over the steady rate for Q5_K / Q6_K on an H100 (docs/RESULTS.md,
    fifty-second session; the cause not established)."""
    first = True

    def timed(seq: list) -> float:
        nonlocal first
        if first:
            first = False
            time_graph(seq, replays=10, warmup=2)
        return time_graph(seq, replays=replays, warmup=warmup)

    return timed


def _copies(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [t] + [t.clone() for _ in range(n - 1)]


@dataclass
class Operands:
    """Random weights of one shape in both layouts, rotated copies, an fp16 x."""

    shape: tuple[int, int]
    zig: list[GpuQ4K]
    row: list[GpuQ4K]
    fp16: list[torch.Tensor]
    x: torch.Tensor


def make_operands(shape, l2_bytes: int, seed: int = 0) -> Operands:
    n, k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    zig = repack(QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", shape), "cuda")
    row = repack(QuantizedWeight(spqt.quantize(w, "q4_k", "row"), "q4_k", "row", shape), "cuda")
    w16 = w.half()
    del w
    target = 4 * l2_bytes

    def rot(nbytes):
        return max(2, -(-target // nbytes))

    nz, nr, nf = rot(zig.nbytes), rot(row.nbytes), rot(w16.numel() * 2)
    zigs = [GpuQ4K(q, h, "zigzag", shape) for q, h in zip(_copies(zig.quants, nz), _copies(zig.head, nz))]
    rows = [GpuQ4K(q, h, "row", shape) for q, h in zip(_copies(row.quants, nr), _copies(row.head, nr))]
    x = torch.randn(k, device="cuda", generator=g).half()
    return Operands(shape, zigs, rows, _copies(w16, nf), x)


def bench_shape(ops: Operands, sparsities, variants, configs: dict | None = None) -> list[dict]:
    """Time every variant at every sparsity for one shape. configs: variant -> kernel config."""
    n, k = ops.shape
    configs = configs or {}
    cz_d = configs.get("zigzag_dense") or tuning.config("zigzag_dense", n, k)
    cz_s = configs.get("zigzag_sparse") or tuning.config("zigzag_sparse", n, k)
    cr = configs.get("row_dense") or tuning.config("row_dense", n, k)
    x = ops.x
    ws_d = kg.ZigzagWorkspace(ops.zig[0], cz_d["split"], torch.float16)
    ws_s = kg.ZigzagWorkspace(ops.zig[0], cz_s["split"], torch.float16)
    y_row = torch.empty(n, dtype=torch.float16, device="cuda")
    y16 = torch.empty(n, dtype=torch.float16, device="cuda")
    block_bytes = ops.zig[0].nbytes
    row_bytes = ops.row[0].nbytes
    out = []
    args_kept = tuning.launch_args(cz_d) | {"impl": "cuda"}
    args_kept_s = tuning.launch_args(cz_s) | {"impl": "cuda"}
    gamma = torch.ones(k, device="cuda", dtype=torch.float32)
    norm = (gamma, (x.float() ** 2).sum().reshape(1), 1e-5)  # x as the norm's input (weight 1, its sums of squares)
    normed = torch.empty_like(x)
    kept_runs = zigzag_cuda.usable(x.device) and zigzag_cuda.kept_fits(k, cz_d["split"], cz_d["num_warps"])
    kept_runs_s = zigzag_cuda.usable(x.device) and zigzag_cuda.kept_fits(k, cz_s["split"], cz_s["num_warps"])
    timed = shape_timer()
    for s in sparsities:
        t = torch.quantile(x.float().abs(), s).reshape(()) if s > 0 else torch.tensor(-1.0, device="cuda")
        active = float((x.float().abs() > t).float().mean())
        xs = sparsify(x, t)
        calls = {
            "B0": lambda w: kg.gemv_row(w, x, out=y_row, **cr),
            "B1": lambda w: kg.gemv_row(w, x, threshold=t, out=y_row, **cr),
            "B2": lambda w: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws_d, **tuning.launch_args(cz_d)),
            "B3": lambda w: kg.gemv_zigzag(w, x, kg.MODE_STATIC, ws_d, threshold=t, **tuning.launch_args(cz_d)),
            "B4": lambda w: (collect(x, t, ws_s.idx, ws_s.count),
                             kg.gemv_zigzag(w, x, kg.MODE_INDEXED, ws_s, idx=ws_s.idx, count=ws_s.count,
                                            **tuning.launch_args(cz_s))),
            "B4K": lambda w: kg.gemv_zigzag(w, x, kg.MODE_KEPT, ws_d, threshold=t, **args_kept),
            "B2n": lambda w: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws_d, **args_kept, norm=norm),
            "B4n": lambda w: (rms_norm_collect(x, gamma, norm[2], t, normed, ws_s.idx, ws_s.count),
                              kg.gemv_zigzag(w, normed, kg.MODE_INDEXED, ws_s, idx=ws_s.idx, count=ws_s.count,
                                             **tuning.launch_args(cz_s))),
            "B4Kn": lambda w: kg.gemv_zigzag(w, x, kg.MODE_KEPT, ws_d, threshold=t, **args_kept, norm=norm),
            "B4KS": lambda w: kg.gemv_zigzag(w, x, kg.MODE_KEPT, ws_s, threshold=t, **args_kept_s),
            "B4KSn": lambda w: kg.gemv_zigzag(w, x, kg.MODE_KEPT, ws_s, threshold=t, **args_kept_s, norm=norm),
            "fp16": lambda w: torch.mv(w, xs if s > 0 else x, out=y16),
        }
        pools = {"B0": ops.row, "B1": ops.row, "fp16": ops.fp16}  # the others: zigzag copies
        needed = {"B0": row_bytes, "B1": row_bytes * (active if s > 0 else 1.0), "B2": block_bytes,
                  "B2n": block_bytes, "fp16": n * k * 2}  # the others: the kept columns' blocks
        for v in variants:
            if s > 0 and v in ("B0", "B2", "B2n"):
                continue  # dense variants do not depend on sparsity
            if (v in ("B4K", "B2n", "B4Kn") and not kept_runs) or (v in ("B4KS", "B4KSn") and not kept_runs_s):
                continue  # the CUDA GEMV does not run here, or a share holds more than NORM_SHARE columns
            pool = pools.get(v, ops.zig)
            seq = [(lambda f=calls[v], w=pool[i % len(pool)]: f(w)) for i in range(max(len(pool), 16))]
            sec = timed(seq)
            nbytes = needed.get(v, block_bytes * active) + 2 * k + 2 * n
            out.append({"shape": f"{n}x{k}", "n": n, "k": k, "variant": v, "sparsity": s, "active": active,
                        "us": sec * 1e6, "bytes": nbytes, "gbps": nbytes / sec / 1e9})
    return out


def weight_copies(w, count: int) -> list:
    """w and count - 1 copies of it (every tensor field of its dataclass cloned): rotated so that a
    timed sequence reads weights that are not in L2."""
    tensors = [f.name for f in dataclasses.fields(w) if isinstance(getattr(w, f.name), torch.Tensor)]
    return [w] + [dataclasses.replace(w, **{f: getattr(w, f).clone() for f in tensors}) for _ in range(count - 1)]


def make_type_operands(shape, fmt: str, l2_bytes: int, seed: int = 0) -> tuple[list[GpuZigzag], torch.Tensor]:
    """Random zigzag weights of one shape in another type (kernel layout), rotated copies, an fp16 x.
    Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 where the CUDA GEMV runs: its layouts (zigzag_cuda.kquant_layout), as the
    runtime runs them (CudaKQuantLinear); else the Triton type kernels' (gpu_layout_types)."""
    n, k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    qw = QuantizedWeight(spqt.quantize(w, fmt, "zigzag"), fmt, "zigzag", shape)
    layout = zigzag_cuda.kquant_layout(fmt) if zigzag_cuda.runs() else None
    gw = layout[1](qw, "cuda") if layout is not None else repack_types(qw, "cuda")
    del w
    return weight_copies(gw, max(2, -(-4 * l2_bytes // gw.nbytes))), torch.randn(k, device="cuda", generator=g).half()


def bench_type_shape(ws: list[GpuZigzag], x: torch.Tensor, sparsities, variants) -> list[dict]:
    """B2 (once) and B4 (collect included) at every sparsity of one shape in one type, on the
    default or tuned configs of its variants."""
    n, k = ws[0].shape
    fmt = ws[0].fmt
    if zigzag_cuda.in_kquant_layout(ws[0]):  # Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 on the CUDA GEMV: configs as the runtime's
        cd, cs = tuning.cuda_type_config("dense", fmt, n, k), tuning.cuda_type_config("sparse", fmt, n, k)
        ws_d, ws_s = kg.ZigzagWorkspace(ws[0], cd["split"], torch.float16), kg.ZigzagWorkspace(ws[0], cs["split"], torch.float16)

        def gemv(w, mode, wsp, cfg, **kw):
            return kg.gemv_zigzag(w, x, mode, wsp, **tuning.launch_args(cfg), **kw)
    else:
        cd = tuning.triton_config(f"zigzag_dense_{fmt}", n, k)  # the Triton type kernel's, as the runtime's
        cs = tuning.triton_config(f"zigzag_sparse_{fmt}", n, k)
        ws_d = zt.TypesWorkspace(ws[0], cd["split"], torch.float16)
        ws_s = zt.TypesWorkspace(ws[0], cs["split"], torch.float16)

        def gemv(w, mode, wsp, cfg, **kw):
            return zt.gemv(w, x, mode, wsp, **tuning.types_launch_args(cfg), **kw)
    out = []
    timed = shape_timer()
    for s in sparsities:
        t = torch.quantile(x.float().abs(), s).reshape(()) if s > 0 else torch.tensor(-1.0, device="cuda")
        active = float((x.float().abs() > t).float().mean())
        calls = {
            "B2": lambda w: gemv(w, zt.MODE_DENSE, ws_d, cd),
            "B4": lambda w, t=t: (collect(x, t, ws_s.idx, ws_s.count),
                                  gemv(w, zt.MODE_INDEXED, ws_s, cs, idx=ws_s.idx, count=ws_s.count)),
        }
        for v in ("B2", "B4"):
            if v not in variants or (s > 0 and v == "B2"):
                continue
            seq = [(lambda f=calls[v], w=ws[i % len(ws)]: f(w)) for i in range(max(len(ws), 16))]
            sec = timed(seq)
            nbytes = ws[0].nbytes * (active if v == "B4" else 1.0) + 2 * k + 2 * n
            out.append({"shape": f"{n}x{k}", "n": n, "k": k, "type": fmt, "variant": v, "sparsity": s,
                        "active": active, "us": sec * 1e6, "bytes": nbytes, "gbps": nbytes / sec / 1e9})
    return out


def git_commit() -> str:
    """The commit the benchmark ran on: $SPQT_COMMIT when set (the device machine's copy of the tree
    carries git metadata of an older commit: pass the hash in the command), else HEAD of the checkout that holds
    this package (not of the working directory's: an installed spqt is in none, "unknown")."""
    import os

    if os.environ.get("SPQT_COMMIT"):
        return os.environ["SPQT_COMMIT"]
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
        return head.stdout.strip() + ("+uncommitted" if dirty else "")
    except Exception:
        return "unknown"


def run_gemv_benchmark(shapes, sparsities, variants, json_path=None, plot_path=None, log=print,
                       types=("q4_k",)) -> dict:
    """types: "q4_k" runs every variant; the other GEMV_TYPES run B2 and B4 (those in variants)."""
    import triton

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    copy_gbps = copy_bandwidth()
    log(f"{torch.cuda.get_device_name()}: {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, "
        f"copy {copy_gbps:.0f} GB/s (read+write), triton {triton.__version__}, torch {torch.__version__}")
    rows = []
    for shape in shapes:
        for fmt in types:
            if fmt == "q4_k":
                ops = make_operands(shape, l2)
                res = [dict(r, type="q4_k") for r in bench_shape(ops, sparsities, variants)]
            else:
                ops, x = make_type_operands(shape, fmt, l2)
                res = bench_type_shape(ops, x, sparsities, variants)
            dense = {r["variant"]: r["us"] for r in res if r["sparsity"] == 0}
            for r in res:
                r["frac_copy_bw"] = r["gbps"] / copy_gbps
                r["speedup_vs_B0"] = dense.get("B0", float("nan")) / r["us"]
                r["speedup_vs_B2"] = dense.get("B2", float("nan")) / r["us"]
            rows += res
            del ops
            torch.cuda.empty_cache()
            _print_shape(res, log)
    report = {"benchmark": "gemv", "device": torch.cuda.get_device_name(), "sms": props.multi_processor_count,
              "l2_bytes": l2, "copy_gbps": copy_gbps, "torch": torch.__version__, "triton": triton.__version__,
              "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "table": tuning.table_source(),
              "method": "CUDA-graph replay of >=16 calls over weight copies > 4x L2, CUDA events, median of 30; a "
                        "shape's first sequence timed once untimed before",
              "rows": rows}
    if json_path:
        from pathlib import Path

        from spqt.checkpoint import atomic_write

        atomic_write(Path(json_path), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    if plot_path:
        plot_speedups(report, plot_path)
    return report


def _print_shape(res, log) -> None:
    log(f"{'shape':>12s} {'type':>4s} {'var':>5s} {'sparse':>6s} {'us':>8s} {'MB':>7s} {'GB/s':>6s} {'xB0':>5s} "
        f"{'xB2':>5s}")
    dense = {r["variant"]: r["us"] for r in res if r["sparsity"] == 0}
    for r in res:
        log(f"{r['shape']:>12s} {r['type']:>4s} {r['variant']:>5s} {r['sparsity']:6.2f} {r['us']:8.2f} "
            f"{r['bytes'] / 1e6:7.2f} "
            f"{r['gbps']:6.0f} {dense.get('B0', float('nan')) / r['us']:5.2f} {dense.get('B2', float('nan')) / r['us']:5.2f}")


def plot_speedups(report: dict, path) -> None:
    """Speedup over B2 vs sparsity, one panel per shape, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = dict(report, rows=[r for r in report["rows"] if r.get("type", "q4_k") == "q4_k"])
    shapes = list(dict.fromkeys(r["shape"] for r in report["rows"]))
    cols = 4
    fig, axes = plt.subplots(-(-len(shapes) // cols), cols, figsize=(4 * cols, 3.2 * -(-len(shapes) // cols)), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        rows = [r for r in report["rows"] if r["shape"] == shape]
        for v in ("B1", "B3", "B4", "fp16"):
            pts = sorted((r["sparsity"], r["speedup_vs_B2"]) for r in rows if r["variant"] == v)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        b0 = [r["speedup_vs_B2"] for r in rows if r["variant"] == "B0"]
        if b0:
            ax.axhline(b0[0], color="gray", ls=":", label="B0 (dense row)")
        ax.axhline(1.0, color="black", lw=0.8, label="B2 (dense zigzag)")
        xs = [0, 0.25, 0.4, 0.5, 0.65]
        ax.plot(xs, [1 / (1 - s) for s in xs], color="black", ls="--", lw=0.6, label="ideal 1/(1-s)")
        ax.set_title(shape)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup over B2")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Q4_K GEMV on {report['device']} (commit {report['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _at_least_16(calls: list) -> list:
    """The calls repeated to at least 16 launches per graph (the tuner's timing unit)."""
    return (calls * -(-16 // len(calls)))[: max(16, len(calls))]


CROSSOVER_LEVELS = (0.1, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)
CROSSOVER_MARGIN = 0.97  # sparse must be at least 3 % faster: the spread of repeated timings is ~1-2 %


def crossover(weights: list, dense_cfg: dict, sparse_cfg: dict) -> dict:
    """The lowest of CROSSOVER_LEVELS from which the tuned B4 beats the tuned B2 at every higher
    level, with the collection launch ("crossover": collect + B4 against B2) and with the collection
    done by the norm before the map ("crossover_fused": rms_norm_collect + B4 against rms_norm + B2, or
    against B2 with the norm folded in where the runtime folds it (the CUDA B2, gpu_linear.dense_normed):
    the fused norm costs more than the plain one, which B4 must win back; on the H200 the 7B step at
    25 % was 1 % slower than dense when this compared B4 with B2 alone); None where B4 never wins. On the CUDA GEMV
    (any type in its layouts) also: "crossover_kept" / "crossover_kept_fused", the lowest level from which MODE_KEPT
    (B2's config; norm-fed: the norm folded) beats B2 by the margin and the collected B4 at every higher level
    (TritonLinear.kept_pays).
    Runtime maps below their crossover run dense (Linear.dense_fallback). weights: rotated copies of one zigzag
    matrix in a layout gemv_zigzag runs (Q4_K's, or a type's CUDA layout)."""
    n, k = weights[0].shape
    ws_d = kg.ZigzagWorkspace(weights[0], dense_cfg["split"], torch.float16)
    ws_s = kg.ZigzagWorkspace(weights[0], sparse_cfg["split"], torch.float16)

    first_untimed = shape_timer(replays=10, warmup=2)

    def timed(call):
        return first_untimed(_at_least_16([(lambda w=w: call(w)) for w in weights]))

    # the norm-fed case: x is the RMSNorm of h (weight 1), made by rms_norm (dense) or rms_norm_collect
    h = torch.randn(k, device="cuda", dtype=torch.float16)
    norm_w = torch.ones(k, device="cuda", dtype=torch.float32)
    eps = 1e-5
    x = rms_norm(h, norm_w, eps)
    normed = torch.empty_like(x)

    args = tuning.launch_args(dense_cfg)

    def b2(w):
        return kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws_d, **args)

    def b4(w):
        return kg.gemv_zigzag(w, x, kg.MODE_INDEXED, ws_s, idx=ws_s.idx, count=ws_s.count,
                              **tuning.launch_args(sparse_cfg))

    dense = timed(b2)
    from spqt.kernels.gpu_linear import kept_runnable, norm_foldable

    sums = (h.float() ** 2).sum().reshape(1)  # the reduction before would write them (any partition)
    # as the runtime runs it (TritonLinear.sparse_kept): the dense config on the CUDA GEMV
    kept_runs = kept_runnable(weights[0], h, ws_d.split, args)
    if norm_foldable(weights[0], h, ws_d.split, args, norm_w):
        dense_norm = timed(lambda w: kg.gemv_zigzag(w, h, kg.MODE_DENSE, ws_d, **args, norm=(norm_w, sums, eps)))
    else:
        dense_norm = timed(lambda w: (rms_norm(h, norm_w, eps), b2(w)))
    wins = {"crossover": [], "crossover_fused": [], "crossover_kept": [], "crossover_kept_fused": []}
    for s in CROSSOVER_LEVELS:
        t = torch.quantile(x.float().abs(), s).reshape(())
        both = timed(lambda w: (collect(x, t, ws_s.idx, ws_s.count), b4(w)))
        fused = timed(lambda w: (rms_norm_collect(h, norm_w, eps, t, normed, ws_s.idx, ws_s.count), b4(w)))
        wins["crossover"].append(both < CROSSOVER_MARGIN * dense)
        wins["crossover_fused"].append(fused < CROSSOVER_MARGIN * dense_norm)
        if kept_runs:  # MODE_KEPT must beat B2 by the margin and the collected B4
            kept = timed(lambda w: kg.gemv_zigzag(w, x, kg.MODE_KEPT, ws_d, threshold=t, **args))
            kept_norm = timed(lambda w: kg.gemv_zigzag(w, h, kg.MODE_KEPT, ws_d, threshold=t, **args,
                                                       norm=(norm_w, sums, eps)))
            wins["crossover_kept"].append(kept < CROSSOVER_MARGIN * dense and kept < both)
            wins["crossover_kept_fused"].append(kept_norm < CROSSOVER_MARGIN * dense_norm and kept_norm < fused)
    out = {}
    for key, won in wins.items():
        level = None
        for s, w in zip(reversed(CROSSOVER_LEVELS), reversed(won)):
            if not w:
                break
            level = s
        out[key] = level
    return out


def _fastest(configs, calls) -> tuple[float, dict]:
    """(microseconds, config) of the fastest of configs; calls(config): the launches of one timing
    (one per rotated weight copy, repeated to at least 16 in the CUDA graph)."""
    best = None
    timed = shape_timer(replays=10, warmup=2)  # the first config once untimed
    for cfg in configs:
        us = timed(_at_least_16(calls(cfg))) * 1e6
        if best is None or us < best[0]:
            best = (us, cfg)
    return best


def tune(shapes, log=print, variants=tuning.VARIANTS, candidates=tuning.candidates) -> dict:
    """Time the candidate configs of every variant per shape; return the winners as table entries.
    zigzag_sparse is chosen at 50 % sparsity (collect included). candidates(variant, n, k): the
    configs to time (scripts may narrow them)."""
    props = torch.cuda.get_device_properties(0)
    entries = {v: {} for v in variants}
    for shape in shapes:
        n, k = shape
        ops = make_operands(shape, props.L2_cache_size)
        x = ops.x
        t = torch.quantile(x.float().abs(), 0.5).reshape(())
        y = torch.empty(n, dtype=torch.float16, device="cuda")
        for variant in variants:
            def calls(cfg, variant=variant):
                if variant == "row_dense":
                    return [(lambda w=w: kg.gemv_row(w, x, out=y, **cfg)) for w in ops.row]
                ws = kg.ZigzagWorkspace(ops.zig[0], cfg["split"], torch.float16)
                if variant == "zigzag_dense":
                    return [(lambda w=w: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws, **tuning.launch_args(cfg)))
                            for w in ops.zig]
                return [(lambda w=w: (collect(x, t, ws.idx, ws.count),
                                      kg.gemv_zigzag(w, x, kg.MODE_INDEXED, ws, idx=ws.idx, count=ws.count,
                                                     **tuning.launch_args(cfg))))
                        for w in ops.zig]

            best = _fastest(candidates(variant, n, k), calls)
            entries[variant][f"{n}x{k}"] = {**best[1], "us": round(best[0], 2)}
            log(f"{n}x{k} {variant}: {best[1]} {best[0]:.2f} us")
        if "zigzag_dense" in entries and "zigzag_sparse" in entries:
            cross = crossover(ops.zig, entries["zigzag_dense"][f"{n}x{k}"], entries["zigzag_sparse"][f"{n}x{k}"])
            entries["zigzag_sparse"][f"{n}x{k}"].update(cross)
            log(f"{n}x{k} crossover (B4 beats B2 from): {cross}")
        ops = None  # this shape's weights freed before the next shape's (calls() holds no other reference)
        torch.cuda.empty_cache()
    return entries


def tune_types(shapes, types, log=print, candidates=None, kinds=("dense", "sparse")) -> dict:
    """The other zigzag types' B2 and B4 (at 50 % sparsity, collect included): the candidate configs of
    "zigzag_{dense,sparse}_<type>" timed per shape; returns the winners as table entries. Where the CUDA GEMV
    runs the type (as CudaKQuantLinear does): its configs (tuning.cuda_type_candidates) in the type's CUDA
    layout, entries with impl "cuda", the Triton type kernel's config as the table has it (untimed here) as
    "fallback", and the crossovers
    (crossover(), on this type's weights); elsewhere the Triton type kernels' (tuning.candidates) in their own
    layout. candidates(variant, n, k): the configs to time instead, for the kernel that runs here (scripts and
    tests narrow them). kinds: ("dense",) times B2 alone (an output head; no crossover)."""
    props = torch.cuda.get_device_properties(0)
    entries = {}
    for n, k in shapes:
        for fmt in types:
            pool, x = make_type_operands((n, k), fmt, props.L2_cache_size)
            t = torch.quantile(x.float().abs(), 0.5).reshape(())
            on_cuda = zigzag_cuda.in_kquant_layout(pool[0])
            for kind in kinds:
                variant = f"zigzag_{kind}_{fmt}"

                def calls(cfg, kind=kind):
                    if on_cuda:
                        ws = kg.ZigzagWorkspace(pool[0], cfg["split"], torch.float16)
                        args = tuning.launch_args(cfg)

                        def gemv(w, mode, **kw):
                            return kg.gemv_zigzag(w, x, mode, ws, **args, **kw)
                    else:
                        ws = zt.TypesWorkspace(pool[0], cfg["split"], torch.float16)
                        args = tuning.types_launch_args(cfg)

                        def gemv(w, mode, **kw):
                            return zt.gemv(w, x, mode, ws, **args, **kw)
                    if kind == "dense":
                        return [(lambda w=w: gemv(w, zt.MODE_DENSE)) for w in pool]
                    return [(lambda w=w: (collect(x, t, ws.idx, ws.count),
                                          gemv(w, zt.MODE_INDEXED, idx=ws.idx, count=ws.count))) for w in pool]

                configs = (candidates or (tuning.cuda_type_candidates if on_cuda else tuning.candidates))(variant, n, k)
                best = _fastest(configs, calls)
                entry = {**best[1], "us": round(best[0], 2)}
                if on_cuda:  # what a machine without the CUDA GEMV runs instead (the Triton type kernel)
                    entry["fallback"] = tuning.triton_config(variant, n, k)
                entries.setdefault(variant, {})[f"{n}x{k}"] = entry
                log(f"{n}x{k} {variant}: {best[1]} {best[0]:.2f} us")
            if on_cuda and "sparse" in kinds:
                cross = crossover(pool, entries[f"zigzag_dense_{fmt}"][f"{n}x{k}"],
                                  entries[f"zigzag_sparse_{fmt}"][f"{n}x{k}"])
                entries[f"zigzag_sparse_{fmt}"][f"{n}x{k}"].update(cross)
                log(f"{n}x{k} {fmt} crossover (B4 beats B2 from): {cross}")
            pool = None  # freed before the next type's copies
            torch.cuda.empty_cache()
    return entries


def tune_crossover(shapes, log=print, types=("q4_k",)) -> dict:
    """This GPU's table with every zigzag_sparse entry's crossover measured anew (the configs kept:
    shapes the table lacks get their nearest neighbour's or the default); for another type (types) the crossovers of
    its CUDA configs as the runtime runs them (tuning.cuda_type_config: its own CUDA entry, else Q4_K's) into the
    type's zigzag_sparse_<type> entry of the shape (where the type has no CUDA entry of its own: a copy of that
    config, with the type's Triton config as its fallback). SpqtError, before any timing, where another type is asked
    and the CUDA GEMV does not run here."""
    if any(fmt != "q4_k" for fmt in types) and not zigzag_cuda.runs():
        raise SpqtError(f"spqt tune --crossover-only --types {','.join(types)}: the other types' crossovers are their "
                        "CUDA GEMV's, which does not run here (an sm_80+ GPU with NVRTC, SPQT_GEMV not triton)")
    props = torch.cuda.get_device_properties(0)
    entries = tuning.all_entries()
    for n, k in shapes:
        key = f"{n}x{k}"
        for fmt in types:
            if fmt == "q4_k":
                for v in ("zigzag_dense", "zigzag_sparse", "row_dense"):
                    entries[v].setdefault(key, tuning.config(v, n, k))
                weights = make_operands((n, k), props.L2_cache_size).zig
                dense, variant = entries["zigzag_dense"][key], "zigzag_sparse"
                sparse = entries[variant][key]
            else:
                weights = make_type_operands((n, k), fmt, props.L2_cache_size)[0]
                dense, variant = tuning.cuda_type_config("dense", fmt, n, k), f"zigzag_sparse_{fmt}"
                sparse = entries.setdefault(variant, {}).get(key)
                if sparse is None or sparse.get("impl") != "cuda":  # the runtime runs Q4_K's (cuda_type_config)
                    borrowed = tuning.cuda_type_config("sparse", fmt, n, k)
                    sparse = {key_: v for key_, v in borrowed.items() if key_ != "us"} | {
                        "fallback": tuning.triton_config(variant, n, k)}
            cross = crossover(weights, dense, sparse)
            entries[variant][key] = {**sparse, **cross}
            log(f"{key} {fmt} crossover (B4 beats B2 from): {cross}")
            del weights
            torch.cuda.empty_cache()
    return {v: e for v, e in entries.items() if e}  # the other types' entries kept as they were
