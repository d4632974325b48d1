"""Launch B2 and B4 (50 %) a few times per shape, eagerly, for Nsight Compute to profile:

    ncu --kernel-name regex:_zigzag_mma_kernel --launch-skip 4 --launch-count 4 --section ... \
        python3 scripts/ncu_gemv.py 28672x8192 4096x4096
Each shape runs B2 three times, then collect + B4 three times (tuned configs, random data)."""

import sys

import torch

from spqt.bench import make_operands
from spqt.kernels import gemv as kg
from spqt.kernels import tuning
from spqt.kernels.collect import collect

for item in sys.argv[1:] or ["28672x8192"]:
    n, k = (int(v) for v in item.split("x"))
    ops = make_operands((n, k), 0)
    w = ops.zig[0]
    for variant, mode in (("zigzag_dense", kg.MODE_DENSE), ("zigzag_sparse", kg.MODE_INDEXED)):
        cfg = tuning.config(variant, n, k)
        ws = kg.ZigzagWorkspace(w, cfg["split"], torch.float16)
        t = torch.quantile(ops.x.float().abs(), 0.5).reshape(())
        for _ in range(3):
            if mode == kg.MODE_INDEXED:
                collect(ops.x, t, ws.idx, ws.count)
            kg.gemv_zigzag(w, ops.x, mode, ws, **tuning.launch_args(cfg), idx=ws.idx, count=ws.count)
        torch.cuda.synchronize()
        print(item, variant, cfg)
