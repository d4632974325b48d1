"""The chain kernel (spqt.kernels.chain, zigzag_q4k.cu CHAIN): dense zigzag Q4_K maps in one persistent launch,
against torch stage by stage (GPU), and what the CPU can check (the sm_90 compile, the stage checks)."""

import numpy as np
import pytest
import torch

from spqt.kernels import chain as kc
from test_kernels import _weights

EPS = 1e-5


def _layer_shapes(d: int, qkv: int, f: int, attn: int) -> list[tuple[int, int]]:
    """(N, K) of a layer's four maps: q|k|v, o (reads the first `attn` q|k|v outputs), gate|up, down."""
    return [(qkv, d), (d, attn), (2 * f, d), (d, f)]


def _stages(rng, device: str, layers: int, d: int = 640, qkv: int = 1000, f: int = 512, attn: int = 600):
    """`layers` layers of chain stages over fresh random weights and norm weights, hidden updated in place (as
    scripts/chain_probe.py): returns (stages, dequantized weights, gammas, buffers)."""
    bufs = {"h": torch.empty(d, dtype=torch.float16, device=device),
            "qkv": torch.empty(qkv, dtype=torch.float16, device=device),
            "act": torch.empty(f, dtype=torch.float16, device=device),
            "sq": torch.empty(-(-d // 256), dtype=torch.float32, device=device),
            "sq0": torch.empty(5, dtype=torch.float32, device=device)}
    stages, dense, gammas = [], [], []
    for _ in range(layers):
        # scaled by K^-1/2 as a model's are: unit-scale weights grew the hidden state past fp16's range in the
        # reference itself for some seeds (layer 2's residual reached inf: a failure of the data, not the kernel)
        ws = [_weights(rng, shape, "zigzag", device, scale=shape[1] ** -0.5)
              for shape in _layer_shapes(d, qkv, f, attn)]
        dense += [qw.dequantize().to(device) for qw, _ in ws]
        g1, g2 = (torch.from_numpy(1 + 0.3 * rng.standard_normal(d).astype(np.float32)).to(device) for _ in range(2))
        gammas += [g1, g2]
        n = len(stages)
        stages += [kc.Stage(ws[0][1], bufs["h"], bufs["qkv"], 3, gamma=g1, sq_in=bufs["sq0"] if n == 0 else bufs["sq"],
                            after=n - 1),
                   kc.Stage(ws[1][1], bufs["qkv"][:attn], bufs["h"], 5, kc.EPILOGUE_RESIDUAL, res=bufs["h"],
                            sq_out=bufs["sq"], after=n),
                   kc.Stage(ws[2][1], bufs["h"], bufs["act"], 2, kc.EPILOGUE_SWIGLU, gamma=g2, sq_in=bufs["sq"],
                            after=n + 1),
                   kc.Stage(ws[3][1], bufs["act"], bufs["h"], 7, kc.EPILOGUE_RESIDUAL, res=bufs["h"],
                            sq_out=bufs["sq"], after=n + 2)]
    return stages, dense, gammas, bufs


def _normed(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The folded norm as the kernel reads x: fp16((x rstd) gamma), rstd from the fp32 sum of x's squares."""
    xf = x.float()
    rstd = 1.0 / torch.sqrt((xf * xf).sum() / x.numel() + EPS)
    return (xf * rstd * gamma).half().float()


def _reference(h0: torch.Tensor, dense: list, gammas: list, attn: int) -> torch.Tensor:
    """The chain's arithmetic in torch (fp32 products and sums, fp16 outputs): the final hidden state."""
    h = h0.clone()
    for layer in range(len(dense) // 4):
        w_qkv, w_o, w_gu, w_down = dense[4 * layer: 4 * layer + 4]
        qkv = (w_qkv @ _normed(h, gammas[2 * layer])).half()
        h = (h.float() + w_o @ qkv[:attn].float()).half()
        gu = w_gu @ _normed(h, gammas[2 * layer + 1])
        f = gu.numel() // 2
        act = (torch.nn.functional.silu(gu[:f]) * gu[f:]).half()
        h = (h.float() + w_down @ act.float()).half()
    return h


@pytest.mark.gpu
def test_chain_matches_torch(rng):
    """Two layers (eight stages: norms folded, residual and SwiGLU finishes, sums of squares handed on, buffers
    reused by the second layer) in one launch: the final hidden state within the fp32 accumulation's and one fp16
    rounding's error of torch, the stages' outputs poisoned first; deterministic; the counters back at zero; the
    same bits replayed from a CUDA graph; the same bits with and without the L2 prefetch and the pipelined loads,
    with the finishers summing an output at a time (CHAIN_FINISH=0), with release / acquire operations for the
    fences (CHAIN_FENCE=1), and on a grid of 7 programs (several items a program)."""
    stages, dense, gammas, bufs = _stages(rng, "cuda", layers=2)
    h0 = torch.from_numpy(rng.standard_normal(640).astype(np.float32)).to("cuda", torch.float16)
    sq0 = h0.float().pow(2)
    bufs["sq0"].copy_(torch.stack([sq0[i::5].sum() for i in range(5)]))  # any partition of the squares
    want = _reference(h0, dense, gammas, 600).float()
    results = []
    for pipe, prefetch, defines in ((0, 1, ()), (1, 0, ()), (0, 1, ("-DCHAIN_FINISH=0",)),
                                    (0, 0, ("-DCHAIN_FENCE=1",))):
        chain = kc.Chain(stages, EPS, pipe=pipe, prefetch=prefetch, acc=2, blocks=4, defines=defines)

        def run():
            for name in ("qkv", "act", "sq"):
                bufs[name].fill_(float("nan"))
            chain.scratch.poison()
            bufs["h"].copy_(h0)
            chain.launch()
            return bufs["h"].clone()

        got = run()
        what = f"pipe {pipe} prefetch {prefetch} {' '.join(defines)}"
        assert torch.isfinite(got).all(), what
        err = float((got.float() - want).abs().max() / want.abs().max())
        assert err < 4e-3, f"{what}: max |chain - torch| / max |torch| = {err:.2e}"
        assert torch.equal(run(), got), f"{what}: not deterministic"
        assert torch.equal(chain.done.cpu(), torch.tensor([st.tiles() for st in stages], dtype=torch.int32)), what
        assert not any(c.any() for c in chain.counters()), f"{what}: arrival counters not reset"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            bufs["h"].copy_(h0)
            chain.launch()
        for name in ("h", "qkv", "act", "sq"):
            bufs[name].fill_(float("nan"))
        chain.scratch.poison()
        graph.replay()
        assert torch.equal(bufs["h"], got), f"{what}: graph replay differs"
        chain.programs = 7  # a smaller grid: every program runs several items a stage
        assert torch.equal(run(), got), f"{what}: 7 programs differ"
        results.append(got)
    assert all(torch.equal(results[0], r) for r in results[1:]), "the loads' schedule or the finish changed the sums"


@pytest.mark.gpu
@pytest.mark.parametrize("shape, epilogue, norm, wina", [((1000, 640), kc.EPILOGUE_PLAIN, True, False),
                                                         ((640, 600), kc.EPILOGUE_RESIDUAL, False, True),
                                                         ((1024, 777), kc.EPILOGUE_SWIGLU, True, True)])
def test_chain_sparse_stage_matches_torch(rng, shape, epilogue, norm, wina):
    """A sparse GEMV stage (its kept inputs found inside it: |x| (times WINA's scale) > t, x the normed input where
    a norm is folded) against torch on the same kept inputs, its finish included; no input within 2 % of the
    threshold (so the kernel's and torch's rstd, which may differ in the last bit, keep the same inputs); y poisoned;
    deterministic; several splits (shares of 1 to 4 chunk rounds); the same bits on a grid of 3 programs."""
    n, k = shape
    qw, gw = _weights(rng, shape, "zigzag", "cuda")
    w = qw.dequantize().cuda()
    gamma = torch.from_numpy(1 + 0.3 * rng.standard_normal(k).astype(np.float32)).cuda() if norm else None
    scale = torch.from_numpy(0.5 + rng.random(k).astype(np.float32)).cuda() if wina else None
    t = torch.tensor(0.6, device="cuda")
    x = torch.from_numpy(rng.standard_normal(k).astype(np.float32)).to("cuda", torch.float16)
    for _ in range(8):  # move the inputs near the threshold away from it
        xn = _normed(x, gamma) if norm else x.float()
        a = xn.abs() * (scale if wina else 1.0)
        near = (a - t).abs() < 0.02 * t
        if not near.any():
            break
        x = torch.where(near, (x.float() * 0.8).half(), x)
    assert not near.any()
    kept = torch.where(a > t, xn, torch.zeros_like(xn))
    assert 0.2 < float((a > t).float().mean()) < 0.8
    sq = x.float().pow(2)
    sq_in = torch.stack([sq[i::5].sum() for i in range(5)]) if norm else None
    res = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to("cuda", torch.float16)
    plain = w @ kept
    if epilogue == kc.EPILOGUE_SWIGLU:
        want = (torch.nn.functional.silu(plain[: n // 2]) * plain[n // 2:]).half().float()
    else:
        want = (plain + (res.float() if epilogue == kc.EPILOGUE_RESIDUAL else 0)).half().float()
    y = torch.empty(n // 2 if epilogue == kc.EPILOGUE_SWIGLU else n, dtype=torch.float16, device="cuda")
    for split in (1, 3, 7):
        stage = kc.Stage(gw, x, y, split, epilogue, res=res if epilogue == kc.EPILOGUE_RESIDUAL else None,
                         gamma=gamma, sq_in=sq_in, threshold=t, scale=scale)
        chain = kc.Chain([stage], EPS, pipe=0, acc=2, blocks=4)
        y.fill_(float("nan"))
        chain.scratch.poison()
        chain.launch()
        got = y.float().clone()
        what = f"{shape} epilogue {epilogue} norm {norm} wina {wina} split {split}"
        torch.testing.assert_close(got, want, rtol=5e-3, atol=2e-3 * float(want.abs().max()), msg=what)
        y.fill_(float("nan"))
        chain.launch()
        assert torch.equal(y.float(), got), f"{what}: not deterministic"
        chain.programs = 3  # several items a program
        y.fill_(float("nan"))
        chain.launch()
        assert torch.equal(y.float(), got), f"{what}: 3 programs differ"


@pytest.mark.gpu
def test_chain_mixes_sparse_and_dense_on_small_grids(rng):
    """Sparse stages between dense ones (o and down thresholded), each stage's own arrival counters: on grids of 5
    and 2 programs (several items a program, of several stages) the same bits as on the full grid, finite,
    deterministic."""
    stages, _, _, bufs = _stages(rng, "cuda", layers=2)
    for st in stages[1::2]:  # o and down
        st.threshold = torch.tensor(0.5, device="cuda")
    h0 = torch.from_numpy(rng.standard_normal(640).astype(np.float32)).to("cuda", torch.float16)
    sq0 = h0.float().pow(2)
    bufs["sq0"].copy_(torch.stack([sq0[i::5].sum() for i in range(5)]))
    outs = []
    chain = kc.Chain(stages, EPS, pipe=0, acc=2, blocks=4)
    for programs in (chain.programs, 5, 2):
        chain.programs = programs
        for _ in range(2):
            for name in ("qkv", "act", "sq"):
                bufs[name].fill_(float("nan"))
            chain.scratch.poison()
            bufs["h"].copy_(h0)
            chain.launch()
            outs.append(bufs["h"].clone())
        assert torch.isfinite(outs[-1]).all(), f"{programs} programs"
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "smaller grids changed the sums"


def test_chain_compiles_for_sm90():
    """The chain kernel (the runtime's configuration) compiles for sm_90, and its loops over chunks keep everything in
    registers (the few spilled values are the item loop's, outside them)."""
    from spqt.decode_chain import CHAIN_KERNEL
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, loops

    opts = kc.options(CHAIN_KERNEL["warps"], CHAIN_KERNEL["pipe"], CHAIN_KERNEL["acc"], CHAIN_KERNEL["prefetch"],
                      CHAIN_KERNEL["blocks"])
    sass, _, _ = disassemble(nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), opts, "sm_90"))
    chain = sass[sass.index(".text.zigzag_chain:"):]
    chain = chain[: chain.index(".text.", 1)] if ".text." in chain[1:] else chain
    mma = [loop for loop in loops(chain) if any("HMMA" in ln for ln in loop)]
    # the innermost of them (a loop's lines are a contiguous run of the listing: inner loops are sublists)
    inner = [loop for loop in mma if not any(o is not loop and len(o) < len(loop) and o[0] in loop for o in mma)]
    assert len(inner) >= 2, f"the dense and sparse chunk loops: {len(inner)} found"
    for loop in inner:
        assert not [ln for ln in loop if "LDL" in ln or "STL" in ln], "local memory in a chunk loop"


def test_chain_checks_its_stages(rng):
    """A stage the kernel cannot run is refused before anything compiles or launches."""
    stages, _, _, bufs = _stages(rng, "cpu", layers=1, d=256, qkv=512, f=256, attn=256)
    kc.check(stages)
    with pytest.raises(ValueError, match="earlier stage"):
        kc.check([stages[0], kc.Stage(stages[1].w, stages[1].x, stages[1].y, 2, kc.EPILOGUE_RESIDUAL,
                                      res=bufs["h"], after=1)])
    with pytest.raises(ValueError, match="x \\(256,\\)"):
        kc.check([kc.Stage(stages[0].w, bufs["qkv"], bufs["qkv"], 2)])
    with pytest.raises(ValueError, match="SwiGLU"):
        kc.check([kc.Stage(stages[1].w, bufs["h"], bufs["act"][:128], 2, kc.EPILOGUE_SWIGLU)])  # N / 2 = 128
    with pytest.raises(ValueError, match="gamma with sq_in"):
        kc.check([kc.Stage(stages[0].w, bufs["h"], bufs["qkv"], 2, gamma=stages[0].gamma)])
    with pytest.raises(ValueError, match="at least one stage"):
        kc.check([])


def _rope(table: torch.Tensor, pos: int, v: torch.Tensor) -> torch.Tensor:
    """v (heads, hd) fp32 rotated by the table's row pos (cos | sin halves)."""
    half = v.shape[-1] // 2
    cos, sin = table[pos, :half], table[pos, half:]
    v1, v2 = v[..., :half], v[..., half:]
    return torch.cat([v1 * cos - v2 * sin, v2 * cos + v1 * sin], dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv, hd", [(8, 2, 128), (9, 3, 64)])
def test_chain_attention_matches_torch(rng, heads, kv, hd):
    """An attention stage alone (RoPE, the KV-cache write, the split-key attention and its merge) against torch at
    positions inside one key block, on a block's edge and across several blocks of a program: the output within fp32
    softmax error, the cache row at pos written (rounded as the cache stores it), no other row touched; the output
    poisoned first; deterministic."""
    cache_len, length = 320, 256
    freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(cache_len, dtype=torch.float64), freqs)
    table = torch.cat([angles.cos(), angles.sin()], dim=-1).float().cuda()
    # one block; a block's edge; programs > blocks > 1 (idle programs); programs not dividing the blocks
    for pos, programs in ((5, 1), (63, 1), (64, 2), (70, 4), (200, 2), (200, 3), (255, 1)):
        qkv = torch.from_numpy(rng.standard_normal((heads + 2 * kv) * hd).astype(np.float32)).to("cuda", torch.float16)
        cache_k = torch.from_numpy(rng.standard_normal((kv, cache_len, hd)).astype(np.float32)).to("cuda", torch.float16)
        cache_v = torch.from_numpy(rng.standard_normal((kv, cache_len, hd)).astype(np.float32)).to("cuda", torch.float16)
        k_before, v_before = cache_k.clone(), cache_v.clone()
        out = torch.full((heads * hd,), float("nan"), dtype=torch.float16, device="cuda")
        position = torch.tensor([pos], device="cuda")
        stage = kc.AttentionStage(qkv, table, position, cache_k, cache_v, out, heads, length, programs)
        chain = kc.Chain([stage], EPS, pipe=0, acc=2, blocks=4)
        chain.scratch.poison()
        chain.launch()
        got = out.float().clone()
        what = f"H {heads} Hkv {kv} hd {hd} pos {pos} programs {programs}"
        x = qkv.float().view(heads + 2 * kv, hd)
        q = _rope(table, pos, x[:heads]).half().float()
        k_new = _rope(table, pos, x[heads: heads + kv]).half()
        v_new = x[heads + kv:].half()
        keys, values = k_before[:, : pos + 1].clone(), v_before[:, : pos + 1].clone()
        keys[:, pos], values[:, pos] = k_new, v_new
        group = heads // kv
        scores = torch.einsum("hd,hnd->hn", q, keys.float().repeat_interleave(group, 0)) * hd ** -0.5
        want = torch.einsum("hn,hnd->hd", scores.softmax(-1), values.float().repeat_interleave(group, 0)).reshape(-1)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-3, msg=what)
        assert torch.equal(cache_k[:, pos], k_new) and torch.equal(cache_v[:, pos], v_new), f"{what}: new k, v"
        others = torch.ones(cache_len, dtype=torch.bool)
        others[pos] = False
        assert torch.equal(cache_k[:, others], k_before[:, others]), f"{what}: other cache rows written"
        assert torch.equal(cache_v[:, others], v_before[:, others]), f"{what}: other cache rows written"
        out.fill_(float("nan"))
        chain.scratch.poison()
        chain.launch()
        assert torch.equal(out.float(), got), f"{what}: not deterministic"
        assert not any(c.any() for c in chain.counters()), f"{what}: arrival counters not reset"


def test_chain_steps_aside_for_observers(tiny_spqt):
    """The chain runs only where nothing watches the layers (decode_chain.observed): a hook on a block, its
    attention, a norm, a map or a map's input tap, or a map counting its achieved sparsity, makes it step aside."""
    from spqt.checkpoint import load_spqt
    from spqt.decode_chain import observed
    from spqt.generate import build_model

    model = build_model(load_spqt(tiny_spqt), "cpu")
    assert not observed(model)
    block = model.layers[-1]
    for module in (block, block.attention, block.ffn_norm, block.feed_forward.down, block.attention.qkv.input_tap):
        handle = module.register_forward_hook(lambda *a: None)
        assert observed(model), type(module).__name__
        handle.remove()
        assert not observed(model)
    block.attention.o.track = True
    assert observed(model)


def test_new_caches_drop_the_chains(tiny_spqt):
    """Transformer.setup_cache (new KV caches, as perplexity allocates) makes the decode chain forget its chains,
    which hold the old caches."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import build_model

    class Recorder:
        forgotten = 0

        def forget(self):
            self.forgotten += 1

    model = build_model(load_spqt(tiny_spqt), "cpu")
    model.decode_chain = Recorder()
    model.setup_cache(1, 32, torch.float32)
    model.setup_cache(1, 64, torch.float32)
    assert model.decode_chain.forgotten == 2
