"""A decode step's layers as ONE launch of the chain kernel (kernels/chain.py), where the model allows it: per
layer q|k|v (its RMSNorm folded), the attention (RoPE, KV-cache write), o (+ residual), gate|up (its RMSNorm
folded, SwiGLU) and down (+ residual), all zigzag Q4_K maps in fp16 on an sm_80+ GPU with NVRTC. A map whose
thresholds are on runs sparse inside the chain (its kept inputs found by the GEMV: y = W (x * (|x| > t)), WINA's
scale too), every sparse map: the launched step's dense fallbacks (crossovers of the launched kernels) do not apply.
Everything else (the embedding, the final norm, the head, sampling) runs as before.

Transformer.forward asks DecodeChain.runs() for every call: one token, CUDA, fp16, no achieved-sparsity counting,
no hook observing a map's input or a norm, a span of at most 2048 keys, and SPQT_CHAIN=1 (off by default: see
chain_on).
"""

import functools
import os

import torch

from spqt.direct_call import hooked
from spqt.kernels import chain as kc
from spqt.kernels import zigzag_cuda

CHAIN_WAVES = 1.0  # a map's split: its items about this many times the chain's programs (scripts/chain_probe.py)
CHAIN_KERNEL = {"warps": 4, "pipe": 0, "acc": 2, "prefetch": 1, "blocks": 4}  # the chain kernel's configuration


@functools.lru_cache(maxsize=None)
def chain_on() -> bool:
    """SPQT_CHAIN=1 runs the chain where it can; unset or 0 keeps every map a launch of its own (the default until
    the chain measures faster: docs/RESULTS.md, thirteenth session); read once."""
    return os.environ.get("SPQT_CHAIN", "0") == "1"


def why_not(model) -> str | None:
    """Why the model's layers cannot run as a chain (None: they can)."""
    c = model.config
    if not torch.cuda.is_available() or not zigzag_cuda.usable():
        return "no GPU the CUDA GEMV runs on"
    if c.head_dim % 64 or c.head_dim > 256 or c.qk_norm:
        return f"head dim {c.head_dim} (a multiple of 64 up to 256) or q/k norms"
    for block in model.layers:
        ff = block.feed_forward
        for lin in _maps(block):
            w = getattr(lin.impl, "w", None)
            if (lin.bias is not None or getattr(w, "fmt", None) != "q4_k" or getattr(w, "layout", None) != "zigzag"
                    or not w.quants.is_cuda):
                return "a map that is not zigzag Q4_K on the GPU without a bias"
        if (ff.gate_up.impl.n // 2) % 256:
            return f"an FFN width {ff.gate_up.impl.n // 2} that is not a multiple of 256"
    return None


def split_for(rows: int, k: int, programs: int) -> int:
    """A map's split in the chain: about CHAIN_WAVES x programs items of `rows` superblock rows, and shares of at
    most kc.CHAIN_SHARE of its k columns (what a sparse stage lists)."""
    return max(1, round(CHAIN_WAVES * programs / rows), -(-k // kc.CHAIN_SHARE))


def observed(model) -> bool:
    """Whether something watches the layers as the launched step runs them (a hook on a block, its attention or
    feed-forward, a norm, a map or a map's input tap; or a map counting its achieved sparsity): the chain would
    skip it."""
    for block in model.layers:
        if any(hooked(m) for m in (block, block.attention, block.feed_forward, block.attention_norm, block.ffn_norm)):
            return True
        if any(lin.track or hooked(lin) or hooked(lin.input_tap) for lin in _maps(block)):
            return True
    return False


def _maps(block) -> tuple:
    """A layer's four maps in the chain's order."""
    return block.attention.qkv, block.attention.o, block.feed_forward.gate_up, block.feed_forward.down


def _sparse(lin) -> bool:
    """Whether the map runs sparse: its thresholds on (a sparse stage in the chain)."""
    return lin.sparse and lin.threshold is not None


class DecodeChain:
    """The chains of a model's layers, one per (attention span, KV caches, sparse maps' thresholds: _key), over one
    set of buffers: the hidden state h (D,) fp16, updated in place, its sums of squares, the position, the maps'
    outputs, and the scratch (kernels/chain.py's Scratch) all chains share."""

    def __init__(self, model):
        self.model = model
        c = model.config
        dev = model.layers[0].attention.qkv.impl.w.quants.device
        att, ff = model.layers[0].attention, model.layers[0].feed_forward
        self.dim = c.dim
        self.h = torch.empty(c.dim, dtype=torch.float16, device=dev)
        self.qkv = torch.empty(att.qkv.impl.n, dtype=torch.float16, device=dev)
        self.attn = torch.empty(att.o.impl.k, dtype=torch.float16, device=dev)
        self.act = torch.empty(ff.gate_up.impl.n // 2, dtype=torch.float16, device=dev)
        self.sq = torch.empty(-(-c.dim // 256), dtype=torch.float32, device=dev)
        self.sq0 = torch.empty(1, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)  # the step's position, copied in by each call
        self.programs = kc.Chain.programs_for(dev, **CHAIN_KERNEL, head_dim=c.head_dim)
        self.scratch: kc.Scratch | None = None  # shared by all chains (made with the first)
        self._chains: dict = {}

    def forget(self) -> None:
        """Drop the chains (they hold the KV caches: Transformer.setup_cache allocates new ones)."""
        self._chains = {}

    def runs(self, x: torch.Tensor, positions: torch.Tensor, length: int) -> bool:
        """Whether this forward call can run the chain (the module docstring's conditions; under a CUDA graph's
        capture only a chain made before it, by the warm-up)."""
        if not chain_on() or x.shape != (1, 1, self.dim) or x.dtype != torch.float16 or not x.is_cuda:
            return False
        if positions.numel() != 1 or positions.dtype != torch.int64 or length > kc.ATTN_BLOCK * kc.ATTN_SLOTS:
            return False
        if observed(self.model):
            return False
        return not torch.cuda.is_current_stream_capturing() or self._key(length) in self._chains

    def _key(self, length: int) -> tuple:
        """The chain of a call over `length` keys: its span (a power of two from 64, the cache's length at most:
        eager steps (pos + 1 keys) reuse a few chains; the sums do not depend on it, each key block's arithmetic and
        their in-order merge depend on pos only), the caches and the sparse maps' thresholds and scales."""
        cache = self.model.layers[0].attention.cache.k
        span = min(cache.shape[2], max(kc.ATTN_BLOCK, 1 << (length - 1).bit_length()))
        sparse = tuple((lin.threshold.data_ptr(), lin.scale.data_ptr() if lin.scale is not None else 0)
                       if _sparse(lin) else None for block in self.model.layers for lin in _maps(block))
        return span, cache.data_ptr(), sparse

    def _stages(self, positions: torch.Tensor, length: int) -> list:
        heads = self.model.config.n_heads
        per_head = max(1, min(-(-length // kc.ATTN_BLOCK), self.programs // heads))
        stages = []
        for block in self.model.layers:
            att, ff = block.attention, block.feed_forward
            n = len(stages)

            def split(lin) -> int:
                return split_for(lin.impl.w.quants.shape[0], lin.in_features, self.programs)

            stages += [kc.Stage(att.qkv.impl.w, self.h, self.qkv, split(att.qkv), gamma=block.attention_norm.weight,
                                sq_in=self.sq0 if n == 0 else self.sq, after=n - 1),
                       kc.AttentionStage(self.qkv, self.model.rope, positions, att.cache.k[0], att.cache.v[0],
                                         self.attn, heads, length, per_head, after=n),
                       kc.Stage(att.o.impl.w, self.attn, self.h, split(att.o), kc.EPILOGUE_RESIDUAL, res=self.h,
                                sq_out=self.sq, after=n + 1),
                       kc.Stage(ff.gate_up.impl.w, self.h, self.act, split(ff.gate_up), kc.EPILOGUE_SWIGLU,
                                gamma=block.ffn_norm.weight, sq_in=self.sq, after=n + 2),
                       kc.Stage(ff.down.impl.w, self.act, self.h, split(ff.down), kc.EPILOGUE_RESIDUAL, res=self.h,
                                sq_out=self.sq, after=n + 3)]
            for st, lin in zip((stages[n], stages[n + 2], stages[n + 3], stages[n + 4]), _maps(block)):
                if _sparse(lin):
                    st.threshold, st.scale = lin.threshold, lin.scale
        return stages

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """The layers over x (1, 1, D) fp16 at position positions (1,) int64 (on the device) over `length` keys:
        the hidden state after the last layer (1, 1, D), a view of the chain's buffer (the next call overwrites it)."""
        key = self._key(length)
        if key not in self._chains:
            stages = self._stages(self.pos, key[0])
            if self.scratch is None:
                self.scratch = kc.Scratch(stages)
            eps = self.model.layers[0].attention_norm.eps
            self._chains[key] = kc.Chain(stages, eps, **CHAIN_KERNEL, scratch=self.scratch)
        self.pos.copy_(positions.view(-1))
        self.h.copy_(x.view(-1))
        torch.sum(self.h.float().square(), dim=0, keepdim=True, out=self.sq0)
        self._chains[key].launch()
        return self.h.view(1, 1, self.dim)
