"""Variants of the CUDA C++ GEMV (zigzag_q4k.cu's -D knobs), B2 dense and B4 at 50 %, each at its
shape's shipped H200 config: which part of the kernel holds the streaming rate (variants that
leave a stage out or change how it loads; PROBE_* variants compute wrong results, they only time).
B4's list is collected once before its timings (the GEMV alone is timed, no reduction).

Then the read ceiling of the same bytes ("ideal read"): a kernel that only reads the listed
columns' blocks (both 64-byte planes and the head of superblock row r) with 8 lanes a column, so
each 8-lane phase reads one column's 128 quant bytes, XOR-folded; the list is every column (the
bytes B2 reads, in order) or B4's list at 50 %. ideal 50 % over ideal dense is what gathering
64-byte pieces costs the memory system, whatever the kernel does; PROBE xor against it is what
B2's / B4's per-lane address pattern costs; base against PROBE xor what the arithmetic costs.

    python scripts/cuda_variants.py [--shapes 4096x4096,...] [--json out.json]
"""

import argparse
import json

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import tuning, zigzag_cuda
from spqt.kernels.collect import collect

SHAPES = "4096x4096,12288x4096,22016x4096,4096x11008,28672x8192,57344x8192,8192x28672"
# "warm-up" first: the first variant timed on a shape measured 5-10 % slow in every run (the same
# kernel timed again right after it was not), so a throwaway run of the base kernel leads
VARIANTS = {
    zigzag_cuda.MODE_DENSE: {"warm-up": (), "base": (), "L2FIRST=2": ("-DL2FIRST=2",),
                             "PROBE heads fixed": ("-DPROBE_HEADS=1",), "PROBE xor": ("-DPROBE_XOR=1",)},
    zigzag_cuda.MODE_INDEXED: {"warm-up": (), "base": (),
                               "PROBE xor": ("-DPROBE_XOR=1",)},
}

IDEAL_READ = r"""
typedef unsigned int u32;
// grid (rows, split), 128 threads; program (r, s) reads list positions [s per, min(n, (s + 1) per)):
// warp w takes groups of 4 positions (lane: position 4 u + lane / 8 of the group, piece lane % 8 =
// plane piece / 4, uint4 piece % 4 of it; piece 0 also the head), UNROLL groups in flight.
extern "C" __global__ void __launch_bounds__(128) ideal_read(const uint4* __restrict__ q, const uint4* __restrict__ h,
    const int* __restrict__ idx, int n, int K, int per, u32* __restrict__ out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = blockIdx.x, s = blockIdx.y;
  const int first = s * per, hi = min(n, first + per);
  const int piece = lane & 7, sub = lane >> 3;
  const uint4* qr = q + (size_t)(2 * r + (piece >> 2)) * K * 4 + (piece & 3);
  const uint4* hr = h + (size_t)(r >> 2) * K * 4 + (r & 3);
  u32 acc = 0;
  for (int p = first + warp * 4 * UNROLL; p < hi; p += 16 * UNROLL) {
    uint4 v[UNROLL], hv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int pos = p + 4 * u + sub;
      const int col = pos < hi ? __ldg(idx + pos) : -1;
      v[u] = make_uint4(0, 0, 0, 0);
      hv[u] = v[u];
      if (col >= 0) {
        v[u] = __ldg(qr + (size_t)col * 4);
        if (piece == 0) hv[u] = __ldg(hr + (size_t)col * 4);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w ^ hv[u].x ^ hv[u].y ^ hv[u].z ^ hv[u].w;
  }
  if (acc == 0x9E3779B9u) out[(blockIdx.y * gridDim.x + blockIdx.x) * 128 + threadIdx.x] = acc;  // keeps the loads
}
"""


def ideal_read_us(ops, idx, n_listed: int, k: int) -> tuple[float, dict]:
    """Fastest (us, config) of the ideal read of the listed columns over a few grids and unrolls."""
    from spqt.kernels import nvrtc

    rows = ops.zig[0].quants.shape[0]
    arch = nvrtc.device_arch(idx.device)
    kernels = {u: nvrtc.Kernel(nvrtc.compile_cubin(IDEAL_READ, (f"-DUNROLL={u}",), arch), "ideal_read") for u in (2, 4, 8)}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = []
    for u in kernels:
        for ctas_per_sm in (4, 8, 16):
            split = max(1, min(2048, -(-ctas_per_sm * sms // rows)))
            per = -(-(-(-n_listed // split)) // (16 * u)) * 16 * u
            configs.append({"unroll": u, "split": -(-n_listed // per), "per": per})
    out = torch.empty(rows * max(c["split"] for c in configs) * 128, dtype=torch.int32, device="cuda")  # never written
    P, I = nvrtc.POINTER, nvrtc.INT

    def calls(cfg):
        return [(lambda w=w: kernels[cfg["unroll"]].launch(
            (rows, cfg["split"]), 128, [(w.quants.data_ptr(), P), (w.head.data_ptr(), P), (idx.data_ptr(), P),
                                        (n_listed, I), (k, I), (cfg["per"], I), (out.data_ptr(), P)],
            torch.cuda.current_stream())) for w in ops.zig]
    return bench._fastest(configs, calls)


parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default=SHAPES)
parser.add_argument("--json")
parser.add_argument("--skip-ideal", action="store_true", help="leave out the ideal reads")
parser.add_argument("--sweep", default="",
                    help="acc:pipe pairs (e.g. 16:0,4:1,2:1): each one's best split and warps (2, 4, 8) per shape")
args = parser.parse_args()
copy = bench.copy_bandwidth()
print(f"copy {copy:.0f} GB/s", flush=True)
props = torch.cuda.get_device_properties(0)
rows = []
for spec in args.shapes.split(","):
    n, k = (int(v) for v in spec.split("x"))
    ops = bench.make_operands((n, k), props.L2_cache_size)
    mb = 144 * -(-n // 256) * k / 1e6
    for mode, variants in VARIANTS.items():
        variant = "zigzag_dense" if mode == zigzag_cuda.MODE_DENSE else "zigzag_sparse"
        cfg = tuning.config(variant, n, k)
        if cfg.get("impl") != "cuda":
            cfg = {"split": cfg["split"], "num_warps": 4, "pipe": 0}  # a Triton entry: the CUDA kernel at its split
        split, warps, pipe = cfg["split"], cfg["num_warps"], cfg.get("pipe", 0)
        ws = kg.ZigzagWorkspace(ops.zig[0], split, torch.float16)
        if mode == zigzag_cuda.MODE_INDEXED:
            collect(ops.x, torch.quantile(ops.x.float().abs(), 0.5).reshape(()), ws.idx, ws.count)
        for name, extra in variants.items():
            def calls(_cfg, extra=extra):
                return [(lambda w=w: zigzag_cuda.launch(w.quants, w.head, ops.x, ws.idx, ws.count, ws.partials, k, ws.np,
                                                        split, mode, warps, True, pipe, extra)) for w in ops.zig]
            us, _ = bench._fastest([{}], calls)
            share = 1.0 if mode == zigzag_cuda.MODE_DENSE else int(ws.count.item()) / k
            rows.append({"shape": spec, "mode": "B2" if mode == zigzag_cuda.MODE_DENSE else "B4 50%", "variant": name,
                         "config": [split, warps, pipe], "us": round(us, 2),
                         "pct_copy_of_bytes_read": round(100 * share * mb * 1e3 / us / copy, 1)})
            print(f"{spec:11s} {rows[-1]['mode']:6s} {name:20s} {us:7.2f} us {rows[-1]['pct_copy_of_bytes_read']:5.1f} % "
                  f"of copy (bytes it reads; split {split}, warps {warps}, pipe {pipe})", flush=True)
        sweep = [tuple(int(v) for v in pair.split(":")) for pair in args.sweep.split(",") if pair]
        if sweep:
            cands = [c for c in tuning.cuda_candidates(variant, n, k)
                     if not c["pipe"] and not c["fused"] and c["num_warps"] > 1 and c.get("acc", 16) == 16]
            wss = {c["split"]: kg.ZigzagWorkspace(ops.zig[0], c["split"], torch.float16) for c in cands}
            if mode == zigzag_cuda.MODE_INDEXED:
                for w_ in wss.values():
                    collect(ops.x, torch.quantile(ops.x.float().abs(), 0.5).reshape(()), w_.idx, w_.count)

            def sweep_calls(c, acc, pipe):
                w_ = wss[c["split"]]
                return [(lambda w=w: zigzag_cuda.launch(w.quants, w.head, ops.x, w_.idx, w_.count, w_.partials, k, w_.np,
                                                        c["split"], mode, c["num_warps"], True, pipe, acc=acc))
                        for w in ops.zig]
            for acc, pipe in sweep:
                us, c = bench._fastest(cands, lambda c, acc=acc, pipe=pipe: sweep_calls(c, acc, pipe))
                share = 1.0 if mode == zigzag_cuda.MODE_DENSE else int(ws.count.item()) / k
                label = f"best acc {acc} pipe {pipe}"
                rows.append({"shape": spec, "mode": "B2" if mode == zigzag_cuda.MODE_DENSE else "B4 50%", "variant": label,
                             "config": [c["split"], c["num_warps"], pipe, acc], "us": round(us, 2),
                             "pct_copy_of_bytes_read": round(100 * share * mb * 1e3 / us / copy, 1)})
                print(f"{spec:11s} {rows[-1]['mode']:6s} {label:20s} {us:7.2f} us "
                      f"{rows[-1]['pct_copy_of_bytes_read']:5.1f} % of copy (split {c['split']}, warps {c['num_warps']})",
                      flush=True)
        if mode == zigzag_cuda.MODE_INDEXED and not args.skip_ideal:
            n_listed = int(ws.count.item())
            lists = {"ideal read, every column": (torch.arange(k, dtype=torch.int32, device="cuda"), k),
                     "ideal read, B4 list": (ws.idx, n_listed)}
            for name, (idx, listed) in lists.items():
                us, cfg = ideal_read_us(ops, idx, listed, k)
                share = listed / k
                rows.append({"shape": spec, "mode": f"read {100 * share:.0f}%", "variant": name, "config": cfg,
                             "us": round(us, 2), "pct_copy_of_bytes_read": round(100 * share * mb * 1e3 / us / copy, 1)})
                print(f"{spec:11s} {rows[-1]['mode']:6s} {name:20s} {us:7.2f} us {rows[-1]['pct_copy_of_bytes_read']:5.1f} % "
                      f"of copy (bytes it reads; {cfg})", flush=True)
    ops = None
    torch.cuda.empty_cache()
if args.json:
    with open(args.json, "w") as f:
        json.dump({"copy_gbs": copy, "commit": bench.git_commit(), "rows": rows}, f, indent=1)
