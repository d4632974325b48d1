"""What B2's instructions cost on the device: the CUDA Q4_K B2 (zigzag_q4k.cu, the GEMV alone, no reduction) at each
shape's shipped config, then its 16-tile assembly at the entry's split, warps and accumulators ("base"), with a part of
its arithmetic left out (-DPROBE_CUT=n: wrong sums, the same loads; the
SASS loop's instruction count beside each), then at 4 accumulator tiles (one select a class of tiles) and Q4_K's tile
pairs at 8 and 2 (-DPAIRS=1; correct sums) at the same split and warps, and (--sweep) the best split x warps of the
tuner's candidates for each. Each row: us (median of CUDA-graph replays over weight copies larger than L2), % of copy.

    python scripts/b2_cut_probe.py [--shapes 57344x8192,...] [--sweep] [--json out.json]
"""

import argparse
import json

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import nvrtc, tuning, zigzag_cuda
from spqt.kernels.sass import disassemble, main_loop

SHAPES = "57344x8192,8192x28672,28672x8192,10240x8192,8192x8192,12288x4096,4096x4096"
CUTS = {"base": 0, "cut B zeroing": 1, "cut A masks": 2, "cut A permutes+masks": 3, "cut scales": 4}


def loop_length(warps: int, acc: int, cut: int, extra: tuple = ()) -> int:
    """Instructions of the B2 loop (sm_90 SASS) at warps, acc, PROBE_CUT=cut and the extra defines."""
    opts = zigzag_cuda.options(warps, zigzag_cuda.MODE_DENSE, 0, -1, acc=acc, extra=(f"-DPROBE_CUT={cut}",) + extra)
    sass, _, _ = disassemble(nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), opts, "sm_90"))
    return len(main_loop(sass, "HMMA"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--sweep", action="store_true", help="each kernel's best split x warps of the tuner's candidates")
    parser.add_argument("--json")
    args = parser.parse_args()
    copy = bench.copy_bandwidth()
    print(f"copy {copy:.0f} GB/s", flush=True)
    props = torch.cuda.get_device_properties(0)
    rows = []

    def record(spec, label, cfg, us, mb, loop=None):
        rows.append({"shape": spec, "variant": label, "config": cfg, "us": round(us, 2),
                     "pct_copy": round(100 * mb * 1e3 / us / copy, 1), "loop": loop})
        print(f"{spec:11s} {label:24s} {us:7.2f} us {rows[-1]['pct_copy']:5.1f} % of copy  {cfg}"
              + (f"  loop {loop}" if loop else ""), flush=True)

    for spec in args.shapes.split(","):
        n, k = (int(v) for v in spec.split("x"))
        ops = bench.make_operands((n, k), props.L2_cache_size)
        mb = 144 * -(-n // 256) * k / 1e6
        cfg = tuning.config("zigzag_dense", n, k)
        if cfg.get("impl") != "cuda":
            cfg = {"split": cfg["split"], "num_warps": 4, "chunks": 1, "impl": "cuda", "acc": 2}
        split, warps, acc = cfg["split"], cfg["num_warps"], cfg.get("acc", 16)
        shipped = tuning.launch_args(cfg)["extra"]  # its tile pairs and L2 prefetch, where it has them
        workspaces = {}

        def calls_of(split_, warps_, acc_, extra=()):
            ws = workspaces.setdefault(split_, kg.ZigzagWorkspace(ops.zig[0], split_, torch.float16))
            return [(lambda w=w: zigzag_cuda.launch(w.quants, w.head, ops.x, ws.idx, ws.count, ws.partials, k, ws.np,
                                                    split_, zigzag_cuda.MODE_DENSE, warps_, True, 0, extra, acc=acc_))
                    for w in ops.zig]

        us, _ = bench._fastest([{}], lambda _c: calls_of(split, warps, acc, shipped))
        record(spec, "shipped", [split, warps, acc, *shipped], us, mb)
        for label, cut in CUTS.items():  # the 16-tile assembly at the entry's accumulators
            if cut == 1 and acc == 16:
                continue
            us, _ = bench._fastest([{}], lambda _c, cut=cut: calls_of(split, warps, acc, (f"-DPROBE_CUT={cut}",)))
            record(spec, label, [split, warps, acc], us, mb, loop_length(warps, acc, cut))
        for other, pairs in ((4, False), (8, True), (2, True)):
            extra = ("-DPAIRS=1",) if pairs else ()
            us, _ = bench._fastest([{}], lambda _c, other=other, extra=extra: calls_of(split, warps, other, extra))
            record(spec, f"{'pairs ' if pairs else ''}acc {other}", [split, warps, other], us, mb,
                   loop_length(warps, other, 0, extra))
        if args.sweep:
            cands = [c for c in tuning.cuda_candidates("zigzag_dense", n, k)
                     if not c["pipe"] and not c["fused"] and not c.get("cluster") and c["num_warps"] > 1
                     and c.get("acc", 16) == 16]
            for acc_, pairs in ((2, False), (4, False), (8, True), (2, True)):
                extra = ("-DPAIRS=1",) if pairs else ()
                us, c = bench._fastest(cands, lambda c, acc_=acc_, extra=extra: calls_of(c["split"], c["num_warps"],
                                                                                      acc_, extra))
                record(spec, f"best {'pairs ' if pairs else ''}acc {acc_}", [c["split"], c["num_warps"], acc_], us, mb)
        ops = None
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbs": copy, "commit": bench.git_commit(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
