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
from dataclasses import dataclass

import torch

from spqt.direct_call import hooked
from spqt.kernels import chain as kc
from spqt.kernels import zigzag_cuda

CHAIN_WAVES = 1.0  # a map's split: its items about this many times the chain's programs (scripts/chain_probe.py)
# the chain kernel's configuration (the fourteenth session's sweep, docs/RESULTS.md)
CHAIN_KERNEL = {"warps": 8, "pipe": 0, "acc": 2, "prefetch": 0, "blocks": 2}


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
    if not c.pre_norms:  # (its q|k|v and gate|up stages fold a norm in; OLMo 2's maps read the residual as it is)
        return "no norm before the attention and the MLP (OLMo 2)"
    if c.head_dim % 64 or c.head_dim > 256 or c.qk_norm:
        return f"head dim {c.head_dim} (a multiple of 64 up to 256) or q/k norms"
    if c.sliding_layers:  # (its attention masks by position alone)
        return f"a sliding window ({c.sliding_window} keys)"
    if c.gemma_switches:  # (the chain's stages know none of them)
        return "Gemma's post-norms, GELU MLP or embedding scale"
    if c.attn_logit_softcap:  # (its attention does not cap the scores)
        return f"soft-capped attention scores ({c.attn_logit_softcap:g})"
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
        if any(m is not None and hooked(m) for m in (block, block.attention, block.feed_forward, block.attention_norm,
                                                      block.ffn_norm)):
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


@dataclass
class ChainBuffers:
    """What a chain of a model's layers reads and writes besides the weights and caches: the hidden state h (D,)
    fp16, updated in place; the maps' outputs q|k|v, the attention's and SwiGLU's (fp16); the sums of squares of h
    (one a 256-row tile, fp32) and of the layers' input (sq0, one); the step's position (int64)."""

    h: torch.Tensor
    qkv: torch.Tensor
    attn: torch.Tensor
    act: torch.Tensor
    sq: torch.Tensor
    sq0: torch.Tensor
    pos: torch.Tensor

    @classmethod
    def for_model(cls, model) -> "ChainBuffers":
        att, ff = model.layers[0].attention, model.layers[0].feed_forward
        dev, dim = att.qkv.impl.w.quants.device, model.config.dim
        half = {"dtype": torch.float16, "device": dev}
        return cls(torch.empty(dim, **half), torch.empty(att.qkv.impl.n, **half), torch.empty(att.o.impl.k, **half),
                   torch.empty(ff.gate_up.impl.n // 2, **half),
                   torch.empty(-(-dim // 256), dtype=torch.float32, device=dev),
                   torch.empty(1, dtype=torch.float32, device=dev), torch.zeros(1, dtype=torch.int64, device=dev))


def programs_a_head(length: int, programs: int, heads: int) -> int:
    """Programs an attention stage gives a head: one a key block of `length` keys, no more than the chain's programs
    shared among the heads (as fused.attention_programs does with ATTN_PROGRAMS_PER_SM a SM), at least one."""
    return max(1, min(-(-length // kc.ATTN_BLOCK), programs // heads))


def layer_stages(model, bufs: ChainBuffers, split, length: int, per_head: int, layers: int | None = None,
                 attention: bool = True) -> list:
    """The chain stages of the model's first `layers` layers (all: None) over bufs: per layer q|k|v (the attention
    norm folded), the attention at bufs.pos over `length` keys (per_head programs a head), o (+ residual, the sums
    of squares), gate|up (the FFN norm folded, SwiGLU), down (+ residual, the sums of squares); a map whose thresholds
    are on runs sparse. split(linear) gives a map's split. attention=False (probes): o reads the first D outputs of
    q|k|v instead of the attention's."""
    heads = model.config.n_heads
    stages = []
    for i, block in enumerate(model.layers[:layers]):
        att, ff = block.attention, block.feed_forward
        n = len(stages)
        qkv = kc.Stage(att.qkv.impl.w, bufs.h, bufs.qkv, split(att.qkv), gamma=block.attention_norm.weight,
                       sq_in=bufs.sq0 if n == 0 else bufs.sq, after=n - 1)
        stages.append(qkv)
        if attention:
            stages.append(kc.AttentionStage(bufs.qkv, model.rope_for(i), bufs.pos, att.cache.k[0], att.cache.v[0],
                                            bufs.attn, heads, length, per_head, after=len(stages) - 1))
        o_in = bufs.attn if attention else bufs.qkv[: bufs.h.numel()]
        o = kc.Stage(att.o.impl.w, o_in, bufs.h, split(att.o), kc.EPILOGUE_RESIDUAL, res=bufs.h, sq_out=bufs.sq,
                     after=len(stages) - 1)
        gate_up = kc.Stage(ff.gate_up.impl.w, bufs.h, bufs.act, split(ff.gate_up), kc.EPILOGUE_SWIGLU,
                           gamma=block.ffn_norm.weight, sq_in=bufs.sq, after=len(stages))
        down = kc.Stage(ff.down.impl.w, bufs.act, bufs.h, split(ff.down), kc.EPILOGUE_RESIDUAL, res=bufs.h,
                        sq_out=bufs.sq, after=len(stages) + 1)
        stages += [o, gate_up, down]
        for st, lin in zip((qkv, o, gate_up, down), _maps(block)):
            if _sparse(lin):
                st.threshold, st.scale = lin.threshold, lin.scale
    return stages


class DecodeChain:
    """The chains of a model's layers, one per (attention span, KV caches, sparse maps' thresholds: _key), over one
    set of buffers (ChainBuffers) and one scratch (kernels/chain.py's Scratch) that all its chains share."""

    def __init__(self, model):
        self.model = model
        self.bufs = ChainBuffers.for_model(model)
        dev = self.bufs.h.device
        self.programs = kc.Chain.programs_for(dev, **CHAIN_KERNEL, head_dim=model.config.head_dim)
        self.scratch: kc.Scratch | None = None  # made with the first chain
        self._chains: dict = {}

    def forget(self) -> None:
        """Drop the chains (they hold the KV caches: Transformer.setup_cache allocates new ones)."""
        self._chains = {}

    def runs(self, x: torch.Tensor, positions: torch.Tensor, length: int) -> bool:
        """Whether this forward call can run the chain (the module docstring's conditions; under a CUDA graph's
        capture only a chain made before it, by the warm-up)."""
        if not chain_on() or x.shape != (1, 1, self.model.config.dim) or x.dtype != torch.float16 or not x.is_cuda:
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

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """The layers over x (1, 1, D) fp16 at position positions (1,) int64 (on the device) over `length` keys:
        the hidden state after the last layer (1, 1, D), a view of the chain's buffer (the next call overwrites it)."""
        key = self._key(length)
        if key not in self._chains:
            span = key[0]
            stages = layer_stages(self.model, self.bufs,
                                  lambda lin: split_for(lin.impl.w.quants.shape[0], lin.in_features, self.programs),
                                  span, programs_a_head(span, self.programs, self.model.config.n_heads))
            if self.scratch is None:
                self.scratch = kc.Scratch(stages)
            eps = self.model.layers[0].attention_norm.eps
            self._chains[key] = kc.Chain(stages, eps, **CHAIN_KERNEL, scratch=self.scratch)
        b = self.bufs
        b.pos.copy_(positions.view(-1))
        b.h.copy_(x.view(-1))
        torch.sum(b.h.float().square(), dim=0, keepdim=True, out=b.sq0)
        self._chains[key].launch()
        return b.h.view(x.shape)
