"""Does a kernel knob pay? The tuner's candidates for each shape are timed at each value of one
knob of the zigzag kernel, and the best config per value printed (B2 dense, B4 at 50 %, the
collection included, as `spqt tune` times them). Knobs:
  maxnreg  registers per thread at most (0: the compiler's choice). Fewer registers, more warps
           on an SM (65536 registers: 126 a thread -> 16 warps, 96 -> 21, 80 -> 25), more loads
           in flight; the price is spill traffic (scripts/sass_report.py shows it).
  ahead    each step asks L2 for the blocks `ahead` steps on (0: no prefetch).
Run on the device machine: python3 scripts/knob_probe.py KNOB=V1,V2,... [NxK ...]."""

import sys

import torch

from spqt.bench import tune
from spqt.kernels import tuning


def main(knob: str, values: list[int], shapes):
    print(torch.cuda.get_device_name())
    for value in values:
        def cands(variant, n, k, value=value):
            return [c | {knob: value} for c in tuning.candidates(variant, n, k)]

        entries = tune(shapes, log=lambda s: None, variants=("zigzag_dense", "zigzag_sparse"), candidates=cands)
        for variant, per_shape in entries.items():
            for shape, e in per_shape.items():
                print(f"{knob} {value:>3} {variant:<13} {shape:<11} {e['us']:7.2f} us  "
                      f"split {e['split']}, {e['num_warps']} warps, {e['chunks']} chunks", flush=True)


if __name__ == "__main__":
    name, vals = sys.argv[1].split("=")
    main(name, [int(v) for v in vals.split(",")],
         [tuple(int(v) for v in a.split("x")) for a in sys.argv[2:]] or [(28672, 8192), (8192, 28672), (4096, 4096)])
