"""Replays test_rope_attention_decode[gpu-normed]'s random draws for seed 7417410399418984800 and runs the failing case
(40 heads, kv 8, hd 128, pos 3000, qk norm all) through the Triton interpreter in fp16, reporting the error."""
import sys, time
import numpy as np, torch
from spqt import functional
from spqt.config import ModelConfig
from spqt.kernels import fused
from spqt.model import rope_table

rng = np.random.default_rng(7417410399418984800)
dtype = torch.float16 if len(sys.argv) < 2 else getattr(torch, sys.argv[1])
normed = ((4, 2, 64, 70, 1, 0), (2, 1, 96, 700, 1, 0), (2, 1, 32, 200, 1, 20), (32, 8, 128, 1500, 1, 0), (4, 1, 256, 1500, 1, 512))
normed_whole = ((10, 2, 128, 3, 1, 0), (4, 2, 32, 600, 2, 0), (4, 2, 32, 100, 1, 40), (32, 32, 128, 1500, 1, 0), (40, 8, 128, 3000, 1, 0), (32, 32, 128, 5000, 1, 4096))
cases = [c + ("head",) for c in normed] + [c + ("all",) for c in normed_whole]
device = "cpu"
for heads, kv, hd, pos, batch, window, qk in cases:
    L = pos + 100
    cfg = ModelConfig(vocab_size=10, dim=heads * hd, n_layers=1, n_heads=heads, n_kv_heads=kv, ffn_dim=8, max_seq_len=L)
    qkv = torch.from_numpy(rng.standard_normal((batch, 1, (heads + 2 * kv) * hd)).astype(np.float32)).to(device, dtype)
    caches = []
    for _ in range(2):
        c = torch.from_numpy(rng.standard_normal((batch, kv, L, hd)).astype(np.float32)).to(device, dtype)
        if pos > 2048 and not caches:
            loud = slice(2048, pos) if pos % 200 == 0 else slice(0, 2048)
            c[:, :, loud] *= 3
        c[:, :, pos:] = float("nan")
        c[:, :, :max(0, pos - window + 1) if window else 0] = float("nan")
        caches.append(c)
    sizes = (heads * hd, kv * hd) if qk == "all" else (hd, hd)
    norms = tuple(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32)).to(device) for n in sizes)
    if (heads, kv, hd, pos) != (40, 8, 128, 3000):
        continue
    table = rope_table(cfg, L)
    ref = [c.clone().float() for c in caches]
    for r in ref:
        r[r.isnan()] = 0
    positions = torch.tensor([pos])
    length = pos + 1
    mask = torch.zeros((1, length))
    want = functional.attention(qkv.float(), table, positions, *ref, heads, kv, mask, length,
                                qk_norm=(norms[0], norms[1], 1e-6))
    # the same in float64 from the fp16 inputs
    t = time.time()
    got = fused.rope_attention_decode(qkv, table, positions, *caches, heads, kv, length, window, (*norms, 1e-6),
                                      out=torch.full((batch, 1, heads, hd), float("nan"), dtype=dtype))
    print("interp s", time.time() - t)
    err = (got.float() - want).abs()
    bound = 2e-3 + 2e-3 * want.abs()
    print("max abs err", err.max().item(), "worst ratio to tol", (err / bound).max().item(), "n over", (err > bound).sum().item(),
          "max |want|", want.abs().max().item())
    # how far is want itself from a float64 twin (the fp16 rounding of the stored k row)
    idx = (err / bound).argmax().item()
    print("at", np.unravel_index(idx, err.shape), "got", got.float().flatten()[idx].item(), "want", want.flatten()[idx].item())
