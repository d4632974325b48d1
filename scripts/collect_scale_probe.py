"""The cost of WINA's per-input scale in the index collection, on the GPU: collect() and
rms_norm_collect() with and without the scale, per width K, CUDA-graph replays (median), 50 %
of the inputs kept. Run on the device machine: python3 scripts/collect_scale_probe.py"""

import torch

from spqt.bench import time_graph
from spqt.kernels.collect import collect
from spqt.kernels.fused import rms_norm_collect

print(f"{'K':>6} {'collect us':>11} {'+scale':>8} {'norm+collect us':>16} {'+scale':>8}")
for k in (576, 1536, 4096, 5120, 8192, 11008, 14336, 28672):
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    scale = torch.rand(k, device="cuda") + 0.5
    w = torch.rand(k, device="cuda") + 0.5
    t = torch.quantile(x.float().abs(), 0.5).reshape(())
    idx = torch.empty(k, dtype=torch.int32, device="cuda")
    count = torch.empty((), dtype=torch.int32, device="cuda")
    out = torch.empty_like(x)
    res = []
    for s in (None, scale):
        res.append(time_graph([lambda s=s: collect(x, t, idx, count, scale=s)] * 16) * 1e6)
    for s in (None, scale):
        res.append(time_graph([lambda s=s: rms_norm_collect(x, w, 1e-5, t, out, idx, count, scale=s)] * 16) * 1e6)
    print(f"{k:>6} {res[0]:>11.2f} {res[1]:>8.2f} {res[2]:>16.2f} {res[3]:>8.2f}", flush=True)
