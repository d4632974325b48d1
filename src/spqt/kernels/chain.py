"""The chain: dense zigzag Q4_K maps one after another in ONE persistent launch of the CUDA GEMV
(zigzag_q4k.cu, CHAIN): no launch, tail or reduction launch between them (issue 14's fixed costs).

A stage is one map y = W x with its finish: plain, a residual add, or SwiGLU (gate|up stacked), optionally the
RMSNorm of x folded in (gamma and x's sums of squares) and the sums of squares of y written for the next
stage's norm. A stage waits for the stage that wrote its input (after); every program streams its item's
weights before it waits. Chain(stages).launch() enqueues the launch on the current stream (capturable in a CUDA
graph): a zeroing of the done counters, then the kernel over a grid that fits the GPU at once (occupancy x SMs).

Stage tensors (all CUDA, contiguous, kept alive by the Chain): x (K,) fp16, y (N,) or SwiGLU (N / 2,) fp16, res
(N,) fp16 (may be y), gamma (K,) fp32, sq_in / sq_out fp32 (sq_out: one a 256-row output tile).
"""

import struct
from dataclasses import dataclass

import torch

from spqt.kernels import nvrtc, zigzag_cuda
from spqt.kernels.gpu_layout import GpuQ4K

EPILOGUE_PLAIN, EPILOGUE_RESIDUAL, EPILOGUE_SWIGLU = 0, 1, 2
STAGE_FORMAT = "<10Q12i"  # the .cu file's ChainStage: ten pointers, twelve ints (128 bytes)


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

    def tiles(self) -> int:
        """Output tiles (256 rows) of y."""
        n = self.w.shape[0]
        return (n // 2 if self.epilogue == EPILOGUE_SWIGLU else n + 255) // 256


def options(warps: int, pipe: int, acc: int, prefetch: int, blocks: int) -> tuple:
    """NVRTC options of the chain kernel (the .cu file's CHAIN macros; blocks: programs an SM must hold)."""
    return zigzag_cuda.options(warps, 0, pipe, -1, acc=acc) + (
        "-DCHAIN=1", f"-DCHAIN_PREFETCH={prefetch}", f"-DCHAIN_BLOCKS={blocks}")


def check(stages: list[Stage]) -> None:
    """ValueError unless the stages make a chain the kernel runs (each stage's shapes, dtypes and finish)."""
    if not stages:
        raise ValueError("a chain needs at least one stage")
    for i, st in enumerate(stages):
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
        if not -1 <= st.after < i or (st.gamma is None) != (st.sq_in is None) or (
                st.epilogue == EPILOGUE_RESIDUAL) != (st.res is not None) or st.epilogue not in (0, 1, 2):
            raise ValueError(f"stage {i}: after an earlier stage (or -1), gamma with sq_in, res with the residual "
                             f"epilogue (0, 1 or 2)")
        if st.sq_out is not None and st.sq_out.numel() < st.tiles():
            raise ValueError(f"stage {i}: sq_out holds one sum a tile ({st.tiles()})")
        if st.split < 1:
            raise ValueError(f"stage {i}: split at least 1")


def _kernel(device: torch.device, warps: int, pipe: int, acc: int, prefetch: int, blocks: int) -> nvrtc.Kernel:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return zigzag_cuda.compiled(index, options(warps, pipe, acc, prefetch, blocks), "zigzag_chain")


class Chain:
    """The stages' descriptors on the device, their partial sums and arrival counters, the done counters."""

    def __init__(self, stages: list[Stage], eps: float, warps: int = 4, pipe: int = 1, acc: int = 16,
                 prefetch: int = 1, blocks: int = 1):
        check(stages)
        device = stages[0].x.device
        self.kernel = _kernel(device, warps, pipe, acc, prefetch, blocks)
        self.warps, self.eps, self.stages = warps, float(eps), stages
        self.programs = self.programs_for(device, warps, pipe, acc, prefetch, blocks)
        packed, self.buffers = b"", []
        for i, st in enumerate(stages):
            packed += self._pack(st, i, stages)
        self.table = torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(device)
        self.done = torch.zeros(len(stages), dtype=torch.int32, device=device)

    @staticmethod
    def programs_for(device: torch.device, warps: int = 4, pipe: int = 1, acc: int = 16, prefetch: int = 1,
                     blocks: int = 1) -> int:
        """The grid of a chain kernel: as many programs as the GPU holds at once (its occupancy x SMs)."""
        return (_kernel(device, warps, pipe, acc, prefetch, blocks).blocks_per_sm(32 * warps)
                * torch.cuda.get_device_properties(device).multi_processor_count)

    def _pack(self, st: Stage, i: int, stages: list[Stage]) -> bytes:
        n, k = st.w.shape
        rows = st.w.quants.shape[0]
        part = torch.empty((st.split, rows * 256), dtype=torch.float32, device=st.x.device)
        counters = torch.zeros(rows, dtype=torch.int32, device=st.x.device)
        self.buffers += [part, counters]
        per = zigzag_cuda.share(k, st.split, self.warps)
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        after = stages[st.after].tiles() if st.after >= 0 else 0
        return struct.pack(STAGE_FORMAT, ptr(st.w.quants), ptr(st.w.head), ptr(st.x), ptr(st.y), ptr(st.res),
                           ptr(part), ptr(counters), ptr(st.gamma), ptr(st.sq_in), ptr(st.sq_out),
                           k, rows * 256, per, st.split, n, n // 2, st.epilogue, rows, st.tiles(),
                           0 if st.sq_in is None else st.sq_in.numel(), st.after, after)

    def launch(self) -> None:
        """The chain on the current stream: done zeroed, then one launch of `programs` programs."""
        self.done.zero_()
        P, I = nvrtc.POINTER, nvrtc.INT
        args = [(self.table.data_ptr(), P), (len(self.stages), I), (self.done.data_ptr(), P), (self.eps, nvrtc.FLOAT)]
        self.kernel.launch((self.programs, 1), 32 * self.warps, args, torch.cuda.current_stream(self.table.device))
