"""A few launches of one zigzag GEMV config, for Nsight Compute (ncu --kernel-name ...): B2 of a shape
with the CUDA or Triton kernel, fresh random weights, each config launched 3 times.

    ncu --clock-control none --kernel-name regex:zigzag python scripts/gemv_once.py 57344x8192 \
        'impl=cuda,split=16,num_warps=4,pipe=0' 'impl=triton,split=16,num_warps=2'
"""

import sys

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import tuning

n, k = (int(v) for v in sys.argv[1].split("x"))
ops = bench.make_operands((n, k), torch.cuda.get_device_properties(0).L2_cache_size)
for spec in sys.argv[2:]:
    cfg = tuning.default_config("zigzag_dense", n, k)
    for item in spec.split(","):
        key, value = item.split("=")
        cfg[key] = value if key == "impl" else int(value)
    ws = kg.ZigzagWorkspace(ops.zig[0], cfg["split"], torch.float16)
    for i in range(3):
        kg.gemv_zigzag(ops.zig[i % len(ops.zig)], ops.x, kg.MODE_DENSE, ws, **tuning.launch_args(cfg))
    torch.cuda.synchronize()
    print(spec, "ok", flush=True)
