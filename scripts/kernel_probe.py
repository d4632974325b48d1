"""Where B4's time goes, with the shipped configs: B2 (dense columns), B4 with every column in
the list (the cost of indexing alone), B4 at 50 % with random and with every other column active
(the cost of the access pattern), B4 with no column active (what a call costs that does not
shrink with the bytes), each with programmatic dependent launch on and off; the
collection alone; and GPU quantization time of a 4096x11008 matrix. Run on the device machine
(one short call)."""

import os
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
from spqt.kernels.collect import collect

for shape in [(4096, 4096), (28672, 8192), (8192, 28672)]:
    n, k = shape
    ops = make_operands(shape, props.L2_cache_size)
    every_other = ops.x.clone()
    every_other[1::2] = 0
    cases = {"B2": (ops.x, None, kg.MODE_DENSE),
             "B4 all columns": (ops.x, torch.tensor(-1.0, device="cuda"), kg.MODE_INDEXED),
             "B4 50 % random": (ops.x, torch.quantile(ops.x.float().abs(), 0.5).reshape(()), kg.MODE_INDEXED),
             "B4 every other column": (every_other, torch.tensor(0.0, device="cuda"), kg.MODE_INDEXED),
             "B4 no column": (ops.x, ops.x.float().abs().max().reshape(()) + 1, kg.MODE_INDEXED)}
    for pdl in ("1", "0"):
        os.environ["SPQT_PDL"] = pdl
        res = {}
        for name, (x, t, mode) in cases.items():
            cfg = tuning.config("zigzag_dense" if mode == kg.MODE_DENSE else "zigzag_sparse", n, k)
            ws = kg.ZigzagWorkspace(ops.zig[0], cfg["split"], torch.float16)
            if mode == kg.MODE_DENSE:
                seq = [(lambda w=w: kg.gemv_zigzag(w, x, mode, ws, **tuning.launch_args(cfg))) for w in ops.zig]
            else:
                seq = [(lambda w=w, x=x, t=t: (collect(x, t, ws.idx, ws.count),
                                               kg.gemv_zigzag(w, x, mode, ws, idx=ws.idx, count=ws.count,
                                                              **tuning.launch_args(cfg)))) for w in ops.zig]
            seq = (seq * -(-16 // len(seq)))[: max(16, len(seq))]
            res[name] = time_graph(seq) * 1e6
        nbytes = ops.zig[0].nbytes
        print(f"{n}x{k}: " + ", ".join(f"{name} {us:.2f} us" for name, us in res.items())
              + f" (B2 {nbytes / res['B2'] / 1e3:.0f} GB/s), PDL {'on' if pdl == '1' else 'off'}")
    del ops
    torch.cuda.empty_cache()

# The index collection alone (B4's first launch), per segment length (the default is 256).
os.environ["SPQT_PDL"] = "1"

for k in (4096, 11008, 14336, 28672):
    x = torch.randn(k, device="cuda").half()
    t = torch.quantile(x.float().abs(), 0.5).reshape(())
    idx = torch.empty(k, dtype=torch.int32, device="cuda")
    count = torch.empty((), dtype=torch.int32, device="cuda")
    res = {seg: time_graph([lambda seg=seg: collect(x, t, idx, count, segment=seg)] * 16) * 1e6
           for seg in (256, 512, 1024, 2048)}
    print(f"collect K={k} at 50 %: " + ", ".join(f"segment {seg} {us:.2f} us" for seg, us in res.items()))
