"""Where B2's time goes: the same loads with and without the dequantize-and-FMA arithmetic, and
GPU quantization time of a 4096x11008 matrix. Run on the device machine (one short call)."""

import time

import torch

import spqt
from spqt.bench import make_operands, time_graph
from spqt.kernels import gemv as kg
from spqt.kernels import tuning

props = torch.cuda.get_device_properties(0)
w = torch.randn(4096, 11008, device="cuda")
spqt.quantize(w, "q4_k", "zigzag")
for layout in ("row", "zigzag"):
    torch.cuda.synchronize()
    t = time.perf_counter()
    spqt.quantize(w, "q4_k", layout)
    torch.cuda.synchronize()
    print(f"quantize 4096x11008 {layout} on the GPU: {time.perf_counter() - t:.3f} s")
del w
for shape in [(4096, 4096), (28672, 8192), (8192, 28672)]:
    n, k = shape
    ops = make_operands(shape, props.L2_cache_size)
    cfg = tuning.config("zigzag_dense", n, k)
    ws = kg.ZigzagWorkspace(ops.zig[0], cfg["split"], torch.float16)
    res = {}
    for probe in (False, True):
        seq = [(lambda w=w: kg.gemv_zigzag(w, ops.x, kg.MODE_DENSE, ws, **tuning.launch_args(cfg),
                                           _probe_no_math=probe)) for w in ops.zig]
        seq = (seq * -(-16 // len(seq)))[: max(16, len(seq))]
        res[probe] = time_graph(seq) * 1e6
    nbytes = ops.zig[0].nbytes
    print(f"{n}x{k} cfg {cfg}: B2 {res[False]:.2f} us ({nbytes / res[False] / 1e3:.0f} GB/s), "
          f"loads only {res[True]:.2f} us ({nbytes / res[True] / 1e3:.0f} GB/s)")
    if shape == (28672, 8192):
        kernel = kg._zigzag_kernel
        for key, compiled in list(kernel.device_caches[0][0].items())[:6]:
            print("compiled:", compiled.metadata.num_warps, "warps,", compiled.n_regs, "regs,", compiled.n_spills, "spills")
    del ops
    torch.cuda.empty_cache()

# The index collection alone (B4's first launch), per segment length (the default is 256).
from spqt.kernels.collect import collect

for k in (4096, 11008, 14336, 28672):
    x = torch.randn(k, device="cuda").half()
    t = torch.quantile(x.float().abs(), 0.5).reshape(())
    idx = torch.empty(k, dtype=torch.int32, device="cuda")
    count = torch.empty((), dtype=torch.int32, device="cuda")
    res = {seg: time_graph([lambda seg=seg: collect(x, t, idx, count, segment=seg)] * 16) * 1e6
           for seg in (256, 512, 1024, 2048)}
    print(f"collect K={k} at 50 %: " + ", ".join(f"segment {seg} {us:.2f} us" for seg, us in res.items()))
