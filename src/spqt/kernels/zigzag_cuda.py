"""The zigzag GEMV (B2 dense, B4 indexed, B4 over each program's own list: MODE_KEPT) of Q4_K, and of Q2_K, Q3_K,
Q5_K, Q6_K and Q8_0 in their own layouts (kquant_layout), as CUDA C++
(zigzag_q4k.cu, compiled by NVRTC): the contract and arithmetic of zigzag_mma.py's kernel for fp16 x, with fewer
instructions per weight (the .cu file says where they go); finished by gemv._reduce_kernel, or by its own last
program of each output tile (fused). bf16 x (XBF16) runs the same arithmetic: B = x d sc rounded from fp32 to one fp16
term (finer than bf16 itself; the Triton kernel's two bf16 terms and bf16 levels cost it twice the mma), y bf16; x may
leave fp16's range, the product x d sc may not (|x d sc| < 65504, the bound fp16 x has too).

Q4_K: selected by the tuned config's "impl": "cuda" (gemv.gemv_zigzag; a bf16 map's Triton entries too:
gpu_linear.bf16_on_cuda), or for every zigzag Q4_K call by SPQT_GEMV=cuda; the other types' layouts always run it.
SPQT_GEMV=triton never uses it. Needs an sm_80+ GPU and cuda-bindings with NVRTC (usable()); elsewhere the Triton
kernel runs (tuning.config then picks an entry's Triton fallback). The GPU tests compare it with the torch reference
like the Triton kernel.
"""

import functools
import os
from pathlib import Path

import torch

from spqt.kernels import gpu_layout, nvrtc

SOURCE = Path(__file__).with_name("zigzag_q4k.cu")
MODE_DENSE, MODE_INDEXED = 0, 2
MODE_KEPT = 3  # B4 over each program's own list of its share's kept inputs (no collection launch; B2's grid)
MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with fp16 operands; PDL only from sm_90


ACCS = (16, 8, 4, 2)  # accumulator tiles a lane may hold (the .cu file's ACC; with tile pairs at 8: no selects)


X_DTYPES = (torch.float16, torch.bfloat16)  # the activations this kernel takes (bf16: the .cu file's XBF16)


def options(warps: int, mode: int, pipe: int, epilogue: int = -1, extra: tuple = (), acc: int = 16,
            bits: int = 4, cluster: bool = False, norm: bool = False, bf16: bool = False) -> tuple:
    """NVRTC options of one configuration (the .cu file's macros; bits 2: Q2_K, 3: Q3_K, 4: Q4_K, 5: Q5_K, 6: Q6_K,
    8: Q8_0; norm: the RMSNorm folded into B2; bf16: x, the residual and y bf16; extra: more -D options, for
    probes)."""
    return (f"-DWARPS={warps}", f"-DMODE={mode}", f"-DPIPE={pipe}", f"-DEPILOGUE={epilogue}", f"-DACC={acc}",
            f"-DTYPE={bits}", f"-DCLUSTER={int(cluster)}", f"-DNORM={int(norm)}") + (("-DXBF16=1",) if bf16 else ()) \
        + tuple(extra)


def pairs_run(bits: int, acc: int) -> bool:
    """Whether tile pairs (the .cu file's PAIRS) exist for this type (bits as launch's) and accumulator count: Q4_K,
    Q5_K and Q6_K at 8 or 2, Q2_K and Q3_K at 8."""
    return (bits in (4, 5, 6) and acc in (2, 8)) or (bits in (2, 3) and acc == 8)


MAX_CLUSTER = 16  # programs a cluster may hold on sm_90 (above 8 with the non-portable size allowed)


def cluster_dims(n: int, epilogue: int, split: int) -> tuple[int, int] | None:
    """The cluster (x, y) of a cluster finish (the .cu file's CLUSTER): (1, split), SwiGLU (2, split); None
    where it cannot run: no epilogue, SwiGLU with N / 2 not a multiple of 256, or more than MAX_CLUSTER."""
    if epilogue < 0 or not fusable(n, epilogue):
        return None
    dims = (2 if epilogue == 2 else 1, split)
    return dims if dims[0] * dims[1] <= MAX_CLUSTER else None


def clusters_run(device: torch.device) -> bool:
    """Thread block clusters: a CUDA device of sm_90 or newer."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (9, 0)


def kquant_layout(fmt: str | None):
    """(planes class, repack) of this GEMV's own layout of a zigzag Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 matrix
    (gpu_layout_q2k, gpu_layout_q3k, gpu_layout_q5k, gpu_layout_q6k, gpu_layout_q8_0; TYPE 2 / 3 / 5 / 6 / 8), or None
    for another format (Q4_K: gpu_layout's GpuQ4K)."""
    from spqt.kernels import gpu_layout_q2k, gpu_layout_q3k, gpu_layout_q5k, gpu_layout_q6k, gpu_layout_q8_0

    return {"q2_k": (gpu_layout_q2k.GpuQ2KPlanes, gpu_layout_q2k.repack),
            "q3_k": (gpu_layout_q3k.GpuQ3KPlanes, gpu_layout_q3k.repack),
            "q5_k": (gpu_layout_q5k.GpuQ5KPlanes, gpu_layout_q5k.repack),
            "q6_k": (gpu_layout_q6k.GpuQ6KPlanes, gpu_layout_q6k.repack),
            "q8_0": (gpu_layout_q8_0.GpuQ8_0Planes, gpu_layout_q8_0.repack)}.get(fmt)


def in_kquant_layout(w) -> bool:
    """Whether w is a zigzag Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 matrix already in this GEMV's layout (kquant_layout)."""
    layout = kquant_layout(getattr(w, "fmt", None))
    return layout is not None and isinstance(w, layout[0])


def fusable(n: int, epilogue: int) -> bool:
    """Whether the kernel can finish y itself: SwiGLU needs F = N / 2 a multiple of 256 (an output
    tile's up rows then lie in one superblock row)."""
    return epilogue != 2 or (n // 2) % 256 == 0


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def usable(device: torch.device | None = None) -> bool:
    """NVRTC and the driver usable and the GPU (default: the current one) sm_80 or newer."""
    if not torch.cuda.is_available() or not nvrtc.available():
        return False
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _capable(index)


@functools.lru_cache(maxsize=None)
def compiled(index: int, opts: tuple, name: str, large_clusters: bool = False) -> nvrtc.Kernel:
    """Function `name` of the .cu file compiled with opts for device `index`, loaded into its primary context
    (made current)."""
    with torch.cuda.device(index):
        arch = nvrtc.device_arch(torch.device("cuda", index))
        return nvrtc.Kernel(nvrtc.compile_cubin(SOURCE.read_text(), opts, arch), name, large_clusters=large_clusters)


def _kernel(index: int, warps: int, mode: int, pipe: int, epilogue: int = -1, extra: tuple = (), acc: int = 16,
            bits: int = 4, cluster: bool = False, norm: bool = False, bf16: bool = False) -> nvrtc.Kernel:
    """The GEMV compiled for device `index` (compiled())."""
    return compiled(index, options(warps, mode, pipe, epilogue, extra, acc, bits, cluster, norm, bf16),
                    "zigzag_q4k_gemv", cluster)


def programs_per_sm(warps: int, mode: int, acc: int, bits: int = 4, device: torch.device | None = None,
                    pairs: bool = False) -> int:
    """Programs of the GEMV of a type (bits as launch's; B2 / B4 by mode, no pipe, the reduction's finish) an SM of
    the GPU holds at once at this warp and accumulator count (its registers decide): what a launch's waves are
    counted in."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _kernel(index, warps, mode, 0, -1, ("-DPAIRS=1",) if pairs else (), acc, bits).blocks_per_sm(32 * warps)


@functools.lru_cache(maxsize=None)
def env_defines() -> tuple:
    """SPQT_CUDA_DEFINES: -D options added to every launch (measurement: e.g. "-DL2FIRST=4 -DL2AHEAD=2"
    through a whole decode step, scripts/launch_probe.py); read once per process."""
    return tuple(os.environ.get("SPQT_CUDA_DEFINES", "").split())


@functools.lru_cache(maxsize=None)
def _fused_env() -> str:
    return os.environ.get("SPQT_GEMV_FUSED", "")


def fused_choice(fused: bool) -> bool:
    """SPQT_GEMV_FUSED=1 / 0 overrides the tuned config's fused finish (measurement: a whole decode step
    with every map finished by its GEMV, scripts/launch_probe.py; 0 also turns the cluster finish off, so
    every map ends in the reduction kernel); unset, the config decides. Read once."""
    return {"1": True, "0": False}.get(_fused_env(), fused)


def choice() -> str:
    """SPQT_GEMV: "cuda" forces this kernel, "triton" the Triton one, else the tuned config decides."""
    return os.environ.get("SPQT_GEMV", "").lower()


def runs(device: torch.device | None = None) -> bool:
    """Whether this kernel runs the zigzag maps here that it may run: usable() on the device (default: the current
    one) and SPQT_GEMV not "triton" (the other types' layouts, MODE_KEPT)."""
    return choice() != "triton" and usable(device)


def supports(x: torch.Tensor, mode: int) -> bool:
    """This kernel runs fp16 and bf16 x (X_DTYPES), B2 and B4, on an sm_80+ CUDA device with NVRTC."""
    return (x.is_cuda and x.dtype in X_DTYPES and mode in (MODE_DENSE, MODE_INDEXED, MODE_KEPT)
            and usable(x.device))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def share(k: int, split: int, warps: int) -> int:
    """B2: columns a program takes, K / split rounded up to a multiple of its step (16 columns a warp)."""
    step = 16 * warps
    return _cdiv(_cdiv(k, split), step) * step


NORM_SHARE = 4096  # columns of the normed input a program holds in shared memory (with gamma's: 24 KB at most)
NORM_BYTES = 6  # shared memory a column of the share: gamma fp32, the normed input (x's 16-bit type)
KEPT_BYTES = 6  # MODE_KEPT's shared memory a column of the share: its x and the kept offset and x (2 bytes each; with
# a folded norm gamma's fp32 and the normed x, the kept list over gamma's once normalized): 24 KB at most


def kept_fits(k: int, split: int, warps: int) -> bool:
    """Whether MODE_KEPT can run a share of this config: at most NORM_SHARE columns (its list in shared memory)."""
    return share(k, split, warps) <= NORM_SHARE


def shared_bytes(k: int, split: int, warps: int, mode: int, norm: bool) -> int:
    """Dynamic shared memory of a launch: the normed share (norm), MODE_KEPT's share of x and its list (at most
    NORM_SHARE columns: 24 KB, with the kernel's static shared memory within the 48 KB a launch has without opt-in)."""
    per = share(k, split, warps)
    return KEPT_BYTES * per if mode == MODE_KEPT else NORM_BYTES * per if norm else 0


def norm_fits(k: int, split: int, warps: int, x: torch.Tensor, gamma: torch.Tensor) -> bool:
    """Whether B2 can fold an RMSNorm here: a program's share of at most NORM_SHARE columns, x and gamma
    16-byte aligned (copied 16 bytes at a time)."""
    return share(k, split, warps) <= NORM_SHARE and x.data_ptr() % 16 == 0 and gamma.data_ptr() % 16 == 0


def launch(quants: torch.Tensor, head: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
           partials: torch.Tensor, k: int, np_: int, split: int, mode: int, warps: int, pdl: bool,
           pipe: int = 0, extra: tuple = (), epilogue: int = -1, y: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, counters: torch.Tensor | None = None, n: int = 0,
           acc: int = 16, high: torch.Tensor | None = None, d: torch.Tensor | None = None, bits: int = 4,
           cluster: bool = False, norm: tuple | None = None, threshold: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> None:
    """Grid (rows, split): partials (split, NP) fp32 get every row of every program. quants (rows, 2, K, 16)
    int32 zigzag kernel layout (two 64-byte planes; bits 8: (rows, 4, K, 16)), head (ceil(rows / 4), K, 4, 4) int32
    (gpu_layout.group_heads); x (K,) fp16 or bf16 (X_DTYPES; y and the residual the same); idx (>= K,) int32 and
    count () int32 for B4 (ignored by B2). pipe: 1 loads the next chunk (B4: step) before this one's arithmetic.
    epilogue -1: the partials alone (gemv._reduce_kernel finishes); 0 / 1 / 2 (plain, residual (N,), SwiGLU;
    fusable(n, 2) must hold): the last program of each output tile writes y (N,) or (N / 2,),
    counters (rows,) int32 zero before and after. acc: accumulator tiles a lane holds (ACCS; fewer
    registers, more occupancy, a select a class of tiles below 16; tile pairs: extra -DPAIRS=1 where pairs_run,
    Q4_K at 8 or 2, Q2_K and Q3_K at 8). bits 5 (Q5_K, gpu_layout_q5k.py): high = the
    fifth bits (rows, K, 8) int32, quants and head the levels' low nibbles and Q5_K's 16-byte heads; bits 6
    (Q6_K, gpu_layout_q6k.py): high = the top bit pairs (rows, K, 16) int32, head the grouped scales, d
    (rows, K) fp16; bits 8 (Q8_0, gpu_layout_q8_0.py): quants the four planes of levels + 128 (rows, 4, K, 16), head
    the grouped d (ceil(rows / 4), K, 4, 8) fp16, no high or d; bits 3 (Q3_K, gpu_layout_q3k.py): quants the low bit
    pairs (rows, 2, K, 8), high the third bits (rows, K, 8) int32, head its 16-byte heads grouped as Q4_K's; bits 2
    (Q2_K, gpu_layout_q2k.py): quants the levels as Q3_K's low pairs, head the grouped scale bytes, d (rows, K) int32
    d | dmin << 16, no high.
    cluster (sm_90, an epilogue, cluster_dims not None): the programs of an output tile are a
    thread block cluster and its rank 0 finishes the tile from their shared memory (partials and counters
    unused). norm (B2, MODE_KEPT): (gamma (K,) fp32, sq (P,) fp32, eps): x is an RMSNorm's input, normalized as it is
    read with the rstd of sq's partial sums of squares (the reduction before wrote them: gemv_zigzag's sumsq).
    MODE_KEPT (B2's grid and finishes, norm allowed): threshold () fp32 and scale None or (K,) fp32 (WINA's column
    norms): each program lists the columns of its share with |x_k| (scale_k) > threshold (x_k the 16-bit input, normed
    with norm) and multiplies those only (idx and count unused).
    extra: more -D options of the .cu file (scripts/cuda_variants.py's load variants and probes)."""
    rows = quants.shape[0]
    if x.dtype not in X_DTYPES or any(v is not None and v.dtype != x.dtype for v in (y, residual)):
        raise ValueError(f"the CUDA GEMV takes fp16 or bf16 x, y and residual of x's dtype; got x {x.dtype}, y "
                         f"{None if y is None else y.dtype}, residual {None if residual is None else residual.dtype}")
    planes = 4 if bits == 8 else 2
    per = 8 if bits in (2, 3) else 16  # int32 a column in a plane
    if gpu_layout.PLANES != 2 or tuple(quants.shape) != (rows, planes, k, per) or head.shape[:2] != (-(-rows // 4), k):
        raise ValueError(f"the CUDA GEMV reads {planes} planes (rows, {planes}, K, {per}) and grouped heads; got "
                         f"{tuple(quants.shape)}, {tuple(head.shape)}")
    words = {3: 8, 5: 8, 6: 16}.get(bits)
    if bits not in (2, 3, 4, 5, 6, 8) or (words and (high is None or tuple(high.shape) != (rows, k, words))) \
            or (bits == 6 and (d is None or tuple(d.shape) != (rows, k) or d.dtype != torch.float16)) \
            or (bits == 2 and (d is None or tuple(d.shape) != (rows, k) or d.dtype != torch.int32)) \
            or (bits == 8 and (tuple(head.shape) != (-(-rows // 4), k, 4, 8) or head.dtype != torch.float16)):
        raise ValueError(f"bits 2 (Q2_K: d (rows, K) int32), 3 (Q3_K: high (rows, K, 8)), 4 (Q4_K), 5 (Q5_K: high "
                         f"(rows, K, 8)), 6 (Q6_K: high (rows, K, 16), d (rows, K) fp16) "
                         f"or 8 (Q8_0: head the grouped d (ceil(rows / 4), K, 4, 8) fp16); got bits {bits}, high "
                         f"{None if high is None else tuple(high.shape)}, head {tuple(head.shape)} {head.dtype}")
    if mode == MODE_KEPT and (threshold is None or threshold.numel() != 1 or threshold.dtype != torch.float32
                              or (scale is not None and (tuple(scale.shape) != (k,) or scale.dtype != torch.float32))
                              or not kept_fits(k, split, warps) or x.data_ptr() % 16):
        raise ValueError(f"MODE_KEPT needs a () fp32 threshold, scale None or ({k},) fp32, a share of at most "
                         f"{NORM_SHARE} columns and x 16-byte aligned; got threshold "
                         f"{None if threshold is None else threshold.dtype}, "
                         f"scale {None if scale is None else (tuple(scale.shape), scale.dtype)}, share "
                         f"{share(k, split, warps)}")
    if norm is not None and (mode == MODE_INDEXED or tuple(norm[0].shape) != (k,) or norm[0].dtype != torch.float32
                             or norm[1].dtype != torch.float32 or norm[1].dim() != 1
                             or not norm_fits(k, split, warps, x, norm[0])):
        raise ValueError(f"a folded norm runs B2 or MODE_KEPT with gamma ({k},) fp32, a vector of fp32 sums of "
                         f"squares, a share of at most {NORM_SHARE} columns and x, gamma 16-byte aligned; got mode {mode}, gamma "
                         f"{tuple(norm[0].shape)} {norm[0].dtype}, sums {norm[1].dtype}, share {share(k, split, warps)}")
    gamma, sq, eps = norm if norm is not None else (None, None, 0.0)
    tensors = [t for t in (quants, head, x, idx, count, partials, y, residual, counters, high, d, gamma, sq, threshold,
                           scale) if t is not None]
    if not all(t.is_contiguous() for t in tensors) or quants.data_ptr() % 16 or head.data_ptr() % 16:
        raise ValueError("the CUDA GEMV needs contiguous tensors, its weights 16-byte aligned (uint4 loads)")
    if warps not in (1, 2, 4, 8) or pipe not in (0, 1) or acc not in ACCS:
        raise ValueError(f"warps 1, 2, 4 or 8, pipe 0 or 1 and acc one of {ACCS}, not {warps}, {pipe}, {acc}")
    if "-DPAIRS=1" in extra and not pairs_run(bits, acc):
        raise ValueError(f"tile pairs run Q4_K / Q5_K / Q6_K (bits 4 / 5 / 6) at acc 8 or 2 and Q2_K / Q3_K (bits 2 / "
                         f"3) at acc 8, not bits {bits}, acc {acc}")
    if epilogue >= 0 and (y is None or counters is None or not fusable(n, epilogue)):
        raise ValueError("a fused finish needs y and the counters (and for SwiGLU N / 2 a multiple of 256)")
    dims = cluster_dims(n, epilogue, split) if cluster else None
    if cluster and (dims is None or y is None or not clusters_run(x.device)):
        raise ValueError(f"a cluster finish needs sm_90, y and an epilogue, and at most {MAX_CLUSTER} programs a "
                         f"cluster (SwiGLU: 2 split, N / 2 a multiple of 256); got epilogue {epilogue}, split {split}")
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    kernel = _kernel(index, warps, mode, pipe, epilogue, tuple(extra) + env_defines(), acc, bits, cluster,
                     norm is not None, x.dtype == torch.bfloat16)
    out = y if y is not None else x
    P, I = nvrtc.POINTER, nvrtc.INT
    args = [(quants.data_ptr(), P), (head.data_ptr(), P), (x.data_ptr(), P), (idx.data_ptr(), P),
            (count.data_ptr(), P), (partials.data_ptr(), P), (k, I), (np_, I), (share(k, split, warps), I), (split, I),
            (out.data_ptr(), P), ((residual if residual is not None else out).data_ptr(), P),
            ((counters if counters is not None else count).data_ptr(), P), (n, I), (n // 2, I),
            ((high if high is not None else quants).data_ptr(), P), ((d if d is not None else x).data_ptr(), P),
            ((gamma if gamma is not None else x).data_ptr(), P), ((sq if sq is not None else partials).data_ptr(), P),
            (0 if sq is None else sq.numel(), I), (float(eps), nvrtc.FLOAT),
            ((threshold if threshold is not None else partials).data_ptr(), P),
            (scale.data_ptr() if scale is not None else 0, P)]
    kernel.launch((rows, split), 32 * warps, args, torch.cuda.current_stream(x.device), pdl, cluster=dims,
                  shared=shared_bytes(k, split, warps, mode, norm is not None))
