"""The chain: a decode step's layers as ONE persistent launch of the CUDA GEMV's source (zigzag_q4k.cu, CHAIN):
no launch, tail or reduction launch between the maps (issue 14's fixed costs).

Stages run in order. A GEMV stage (Stage) is one zigzag Q4_K map y = W x, dense or sparse (a threshold: each
program lists its share's kept inputs in shared memory and runs B4's gathered chunks over them), with its finish:
plain, a residual add, or SwiGLU (gate|up stacked), optionally the RMSNorm of x folded in (gamma and x's sums of
squares) and the sums of squares of y written for the next stage's norm. An attention stage (AttentionStage) is
one decode token's RoPE, KV-cache write and attention over the q|k|v stage's output (fused.rope_attention_decode's
contract). A stage waits for the stage that wrote its input (after); every program streams its item's weights (or
cached keys and values) before it waits. Chain(stages).launch() enqueues the launch on the current stream
(capturable in a CUDA graph): a zeroing of the done counters, then the kernel over a grid that fits the GPU at once
(occupancy x SMs), launched cooperative (all its programs resident, or the launch fails).

Stage tensors (all CUDA, contiguous, kept alive by the Chain): x (K,) fp16, y (N,) or SwiGLU (N / 2,) fp16, res
(N,) fp16 (may be y), gamma (K,) fp32, sq_in / sq_out fp32 (sq_out: one a 256-row output tile).
"""

import struct
from dataclasses import dataclass

import torch

from spqt.kernels import nvrtc, zigzag_cuda
from spqt.kernels.gpu_layout import GpuQ4K

EPILOGUE_PLAIN, EPILOGUE_RESIDUAL, EPILOGUE_SWIGLU = 0, 1, 2
KIND_GEMV, KIND_ATTENTION = 0, 1
# the .cu file's ChainStage: a header of eight ints (kind, items, tiles, after, after_tiles, 3 unused), then a union
# of GemvStage (twelve pointers, nine ints) and AttentionStage (nine pointers, five ints, a float): 168 bytes
HEADER, GEMV, ATTENTION, STAGE_BYTES = "<8i", "<12Q9i", "<9Q5if", 168
CHAIN_SHARE = 4096  # columns a sparse stage's share holds at most (the .cu file's)
ATTN_BLOCK, ATTN_SLOTS = 64, 32  # keys a block (fused.ATTN_BLOCK_N), blocks a head at most (the .cu file's)


@dataclass
class Stage:
    w: GpuQ4K  # zigzag Q4_K in the kernel layout (rows, 2, K, 16) with grouped heads
    x: torch.Tensor
    y: torch.Tensor
    split: int
    epilogue: int = EPILOGUE_PLAIN
    res: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    sq_in: torch.Tensor | None = None
    sq_out: torch.Tensor | None = None
    after: int = -1  # index of the stage that writes x (-1: written before the launch)
    threshold: torch.Tensor | None = None  # () fp32: sparse, y = W (x * (|x| (scale) > t)), x the normed input
    scale: torch.Tensor | None = None  # (K,) fp32 (WINA) or None

    def tiles(self) -> int:
        """Output tiles (256 rows) of y."""
        n = self.w.shape[0]
        return (n // 2 if self.epilogue == EPILOGUE_SWIGLU else n + 255) // 256

    def items(self) -> int:
        return self.w.quants.shape[0] * self.split


@dataclass
class AttentionStage:
    qkv: torch.Tensor  # ((H + 2 Hkv) hd,) fp16: the q|k|v stage's output
    table: torch.Tensor  # (L_max, hd) fp32 RoPE: cos | sin
    pos: torch.Tensor  # () or (1,) int64: the token's position, written before the launch
    cache_k: torch.Tensor  # (Hkv, L, hd) fp16
    cache_v: torch.Tensor
    out: torch.Tensor  # (H hd,) fp16
    heads: int
    length: int  # keys attended at most (> pos)
    programs: int  # programs a head (its key blocks p, p + programs, ...)
    after: int = -1

    def tiles(self) -> int:
        return self.heads

    def items(self) -> int:
        return self.heads * self.programs


def options(warps: int, pipe: int, acc: int, prefetch: int, blocks: int, head_dim: int = 128,
            defines: tuple = ()) -> tuple:
    """NVRTC options of the chain kernel (the .cu file's CHAIN macros; blocks: programs an SM must hold; head_dim:
    the attention stages'; defines: more -D options, for probes: -DCHAIN_SLEEP=ns between two polls of a waiting
    program, -DCHAIN_FINISH=0 a finisher summing one output at a time, -DCHAIN_NOWAIT=1 no stage waits (timing
    only), -DCHAIN_FENCE=1 release / acquire operations instead of SC fences)."""
    return zigzag_cuda.options(warps, 0, pipe, -1, acc=acc) + (
        "-DCHAIN=1", f"-DCHAIN_PREFETCH={prefetch}", f"-DCHAIN_BLOCKS={blocks}", f"-DCHAIN_HD={head_dim}",
        *defines)


def _check_gemv(i: int, st: Stage) -> None:
    n, k = st.w.shape
    rows = st.w.quants.shape[0]
    swiglu = st.epilogue == EPILOGUE_SWIGLU
    if (getattr(st.w, "layout", None) != "zigzag" or getattr(st.w, "fmt", None) != "q4_k"
            or tuple(st.w.quants.shape) != (rows, 2, k, 16)):
        raise ValueError(f"stage {i}: a zigzag Q4_K matrix in the CUDA GEMV's layout")
    if st.x.numel() != k or st.y.numel() != (n // 2 if swiglu else n) or (swiglu and (n // 2) % 256):
        raise ValueError(f"stage {i}: x ({k},), y ({n // 2 if swiglu else n},) (SwiGLU: N / 2 a multiple of 256)")
    if any(t is not None and (t.dtype != torch.float16 or not t.is_contiguous()) for t in (st.x, st.y, st.res)):
        raise ValueError(f"stage {i}: x, y and res contiguous fp16")
    if any(t is not None and (t.dtype != torch.float32 or not t.is_contiguous())
           for t in (st.gamma, st.sq_in, st.sq_out)) or (st.gamma is not None and st.gamma.numel() != k):
        raise ValueError(f"stage {i}: gamma ({k},), sq_in and sq_out contiguous fp32")
    if (st.gamma is None) != (st.sq_in is None) or (st.epilogue == EPILOGUE_RESIDUAL) != (st.res is not None) \
            or st.epilogue not in (0, 1, 2):
        raise ValueError(f"stage {i}: gamma with sq_in, res with the residual epilogue (0, 1 or 2)")
    if st.sq_out is not None and st.sq_out.numel() < st.tiles():
        raise ValueError(f"stage {i}: sq_out holds one sum a tile ({st.tiles()})")
    if st.split < 1:
        raise ValueError(f"stage {i}: split at least 1")
    if st.threshold is not None and (st.threshold.numel() != 1 or st.threshold.dtype != torch.float32
                                     or (st.scale is not None and (st.scale.numel() != k
                                                                   or st.scale.dtype != torch.float32))):
        raise ValueError(f"stage {i}: a sparse stage's threshold is one fp32, its scale ({k},) fp32")
    if st.scale is not None and st.threshold is None:
        raise ValueError(f"stage {i}: a scale without a threshold")


def _check_attention(i: int, st: AttentionStage) -> None:
    kv, cache_len, hd = st.cache_k.shape
    if st.cache_v.shape != st.cache_k.shape or hd % 64 or hd > 256 or st.heads % kv:
        raise ValueError(f"stage {i}: caches (Hkv, L, hd), hd a multiple of 64 up to 256, Hkv dividing the heads")
    if st.qkv.numel() != (st.heads + 2 * kv) * hd or st.out.numel() != st.heads * hd or st.table.shape[1] != hd:
        raise ValueError(f"stage {i}: q|k|v ({(st.heads + 2 * kv) * hd},), out ({st.heads * hd},), the RoPE table "
                         f"(L, {hd})")
    if any(t.dtype != torch.float16 or not t.is_contiguous() for t in (st.qkv, st.cache_k, st.cache_v, st.out)) \
            or st.table.dtype != torch.float32 or st.pos.dtype != torch.int64 or st.pos.numel() != 1:
        raise ValueError(f"stage {i}: fp16 q|k|v, caches and out, an fp32 table, one int64 position")
    if not 0 < st.length <= min(cache_len, ATTN_BLOCK * ATTN_SLOTS) or st.programs < 1:
        raise ValueError(f"stage {i}: a span of 1 to {min(cache_len, ATTN_BLOCK * ATTN_SLOTS)} keys, a program a head")


def check(stages: list) -> None:
    """ValueError unless the stages make a chain the kernel runs (each stage's shapes, dtypes and finish)."""
    if not stages:
        raise ValueError("a chain needs at least one stage")
    dims = _head_dims(stages)
    if len(dims) > 1:
        raise ValueError(f"the attention stages of a chain share one head dim, not {dims}")
    for i, st in enumerate(stages):
        if not -1 <= st.after < i:
            raise ValueError(f"stage {i}: after an earlier stage (or -1)")
        if isinstance(st, AttentionStage):
            _check_attention(i, st)
        else:
            _check_gemv(i, st)


def _kernel(device: torch.device, warps: int, pipe: int, acc: int, prefetch: int, blocks: int,
            head_dim: int, defines: tuple) -> nvrtc.Kernel:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return zigzag_cuda.compiled(index, options(warps, pipe, acc, prefetch, blocks, head_dim, defines), "zigzag_chain")


def _programs(kernel: nvrtc.Kernel, device: torch.device, warps: int) -> int:
    """As many programs of the chain kernel as the GPU holds at once (its occupancy x SMs)."""
    return kernel.blocks_per_sm(32 * warps) * torch.cuda.get_device_properties(device).multi_processor_count


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class Scratch:
    """What a chain's stages write and read back within a launch: the GEMV partial sums and arrival counters, the
    attention's block sums, (max, sum) pairs and arrival counters, sized for `stages`. The sums serve every stage (a
    stage starts after the one before has finished: its finishers have read their partials); each stage has its own
    arrival counters (zeroed by its finishers), so an output's finisher is elected once a launch however the stages
    run (the NOWAIT probe too). One set serves every chain launched on one stream after another whose stages it fits
    (decode_chain.py keeps one for all its chains)."""

    def __init__(self, stages: list):
        self.sizes = _scratch_sizes(stages)
        part, rows, most, heads, hd = self.sizes
        device = _first_tensor(stages[0]).device
        self.part = torch.empty(max(part, 1), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(rows, 1), dtype=torch.int32, device=device)
        self.attn_part = torch.empty(max(most * ATTN_SLOTS * hd, 1), dtype=torch.float32, device=device)
        self.attn_ml = torch.empty(max(most * ATTN_SLOTS * 2, 1), dtype=torch.float32, device=device)
        self.attn_counters = torch.zeros(max(heads, 1), dtype=torch.int32, device=device)

    def fits(self, stages: list) -> bool:
        return all(a <= b for a, b in zip(_scratch_sizes(stages), self.sizes))

    def poison(self) -> None:
        """The float scratch set to NaN (tests: a sum read before it was written shows)."""
        for t in (self.part, self.attn_part, self.attn_ml):
            t.fill_(float("nan"))


def _scratch_sizes(stages: list) -> tuple[int, int, int, int, int]:
    """(partial sums, arrival counters of GEMV rows, heads of the largest attention stage (its block sums), the
    attention heads' arrival counters, head dim) the stages need at most (the counters: every stage's own)."""
    gemv = [st for st in stages if isinstance(st, Stage)]
    attn = [st for st in stages if isinstance(st, AttentionStage)]
    return (max((st.split * st.w.quants.shape[0] * 256 for st in gemv), default=0),
            sum(st.w.quants.shape[0] for st in gemv), max((st.heads for st in attn), default=0),
            sum(st.heads for st in attn), max((st.cache_k.shape[2] for st in attn), default=0))


def _counter_offsets(stages: list) -> tuple[list[int], list[int]]:
    """Where each stage's own arrival counters start: in the GEMV rows' counters, in the attention heads'."""
    rows, heads, at_rows, at_heads = 0, 0, [], []
    for st in stages:
        at_rows.append(rows)
        at_heads.append(heads)
        if isinstance(st, AttentionStage):
            heads += st.heads
        else:
            rows += st.w.quants.shape[0]
    return at_rows, at_heads


class Chain:
    """The stages' descriptors on the device and the done counters; the scratch (Scratch) its stages share."""

    def __init__(self, stages: list, eps: float, warps: int = 4, pipe: int = 1, acc: int = 16,
                 prefetch: int = 1, blocks: int = 1, scratch: Scratch | None = None, defines: tuple = ()):
        check(stages)
        device = _first_tensor(stages[0]).device
        self.head_dim = (_head_dims(stages) or [128])[0]
        self.kernel = _kernel(device, warps, pipe, acc, prefetch, blocks, self.head_dim, tuple(defines))
        self.warps, self.eps, self.stages = warps, float(eps), stages
        self.programs = _programs(self.kernel, device, warps)
        self.scratch = scratch if scratch is not None else Scratch(stages)
        if not self.scratch.fits(stages):
            raise ValueError("the shared scratch is smaller than these stages need")
        self._counter_at, self._attn_counter_at = _counter_offsets(stages)
        packed = b"".join(self._pack(i, st, stages) for i, st in enumerate(stages))
        self.table = torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(device)
        self.done = torch.zeros(len(stages), dtype=torch.int32, device=device)

    @staticmethod
    def programs_for(device: torch.device, warps: int = 4, pipe: int = 1, acc: int = 16, prefetch: int = 1,
                     blocks: int = 1, head_dim: int = 128, defines: tuple = ()) -> int:
        """The grid of a chain kernel: as many programs as the GPU holds at once (its occupancy x SMs)."""
        return _programs(_kernel(device, warps, pipe, acc, prefetch, blocks, head_dim, tuple(defines)), device, warps)

    def _pack(self, i: int, st, stages: list) -> bytes:
        after_tiles = stages[st.after].tiles() if st.after >= 0 else 0
        if isinstance(st, AttentionStage):
            kv, cache_len, hd = st.cache_k.shape
            sc = self.scratch
            body = struct.pack(ATTENTION, _ptr(st.qkv), _ptr(st.table), _ptr(st.pos), _ptr(st.cache_k),
                               _ptr(st.cache_v), _ptr(st.out), _ptr(sc.attn_part), _ptr(sc.attn_ml),
                               _ptr(sc.attn_counters) + 4 * self._attn_counter_at[i],
                               st.heads, kv, cache_len, st.length, st.programs, hd ** -0.5)
            kind = KIND_ATTENTION
        else:
            n, k = st.w.shape
            rows = st.w.quants.shape[0]
            per = zigzag_cuda.share(k, st.split, self.warps)
            if st.threshold is not None and per > CHAIN_SHARE:
                raise ValueError(f"a sparse stage's share holds {CHAIN_SHARE} columns at most; split {st.split} of "
                                 f"K = {k} gives {per}")
            body = struct.pack(GEMV, _ptr(st.w.quants), _ptr(st.w.head), _ptr(st.x), _ptr(st.y), _ptr(st.res),
                               _ptr(self.scratch.part), _ptr(self.scratch.counters) + 4 * self._counter_at[i],
                               _ptr(st.gamma), _ptr(st.sq_in),
                               _ptr(st.sq_out),
                               _ptr(st.threshold), _ptr(st.scale), k, rows * 256, per, st.split, n, n // 2,
                               st.epilogue, rows, 0 if st.sq_in is None else st.sq_in.numel())
            kind = KIND_GEMV
        header = struct.pack(HEADER, kind, st.items(), st.tiles(), st.after, after_tiles, 0, 0, 0)
        return (header + body).ljust(STAGE_BYTES, b"\0")

    def counters(self) -> list[torch.Tensor]:
        """The stages' arrival counters (zero between launches)."""
        return [self.scratch.counters, self.scratch.attn_counters]

    def launch(self) -> None:
        """The chain on the current stream: done zeroed, then one launch of `programs` programs, cooperative (all
        resident at once, or the launch fails: its programs wait on each other)."""
        self.done.zero_()
        P, I = nvrtc.POINTER, nvrtc.INT
        args = [(self.table.data_ptr(), P), (len(self.stages), I), (self.done.data_ptr(), P), (self.eps, nvrtc.FLOAT)]
        self.kernel.launch((self.programs, 1), 32 * self.warps, args, torch.cuda.current_stream(self.table.device),
                           cooperative=True)


def _head_dims(stages: list) -> list[int]:
    """The attention stages' head dims, each once, ascending."""
    return sorted({st.cache_k.shape[2] for st in stages if isinstance(st, AttentionStage)})


def _first_tensor(st) -> torch.Tensor:
    return st.qkv if isinstance(st, AttentionStage) else st.x
