"""The CUDA GEMV (zigzag_q4k.cu) for sm_90 per TYPE, compiled here by NVRTC (no GPU needed): a hash of the
whole SASS listing (addresses dropped: equal hashes = the same code), the main loop's instructions (a chunk
of 16 columns per lane), its HMMA count, registers and stack, for a set of configurations (B2 / B4 / MODE_KEPT, PIPE,
ACC, finishes, cluster). Compare two commits' JSON to show that a change leaves a type's code alone.

    python scripts/cuda_sass_types.py [--types 2,3,4,5,6,8] [--opcodes] [--json out.json]

--opcodes: also the main loop's instructions per opcode (modifiers dropped), most frequent first.
"""

import argparse
import collections
import hashlib
import json
import re

from spqt.kernels import nvrtc, zigzag_cuda
from spqt.kernels.sass import disassemble, main_loop, opcode

# (mode, pipe, epilogue, acc, cluster)
CONFIGS = [(0, 0, -1, 16, 0), (0, 1, -1, 16, 0), (0, 0, 0, 2, 0), (0, 1, 2, 16, 0), (2, 0, -1, 16, 0),
           (2, 1, 1, 2, 0), (2, 0, -1, 4, 0), (0, 0, 1, 8, 0), (0, 0, 2, 2, 1), (2, 0, 1, 16, 1),
           (3, 0, -1, 16, 0), (3, 1, 1, 2, 0)]

parser = argparse.ArgumentParser()
parser.add_argument("--types", default="2,3,4,5,6,8")
parser.add_argument("--opcodes", action="store_true")
parser.add_argument("--json")
args = parser.parse_args()
source = zigzag_cuda.SOURCE.read_text()
out = {}
print("type mode pipe epilogue acc cluster | sass hash    loop HMMA regs stack")
for bits in (int(t) for t in args.types.split(",")):
    for mode, pipe, epilogue, acc, cluster in CONFIGS:
        options = zigzag_cuda.options(4, mode, pipe, epilogue, acc=acc, bits=bits, cluster=bool(cluster))
        sass, regs, stack = disassemble(nvrtc.compile_cubin(source, options, "sm_90"))
        lines = [re.sub(r"/\*[0-9a-f]{4}\*/", "", ln).strip() for ln in sass.splitlines()
                 if re.search(r"/\*[0-9a-f]{4}\*/", ln)]
        loop = main_loop(sass, "HMMA")
        row = {"sass": hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12], "loop": len(loop),
               "hmma": sum("HMMA" in ln for ln in loop), "regs": regs, "stack": stack}
        if args.opcodes:
            row["opcodes"] = dict(collections.Counter(opcode(ln).split(".")[0] for ln in loop).most_common())
        out[f"{bits} {mode} {pipe} {epilogue} {acc} {cluster}"] = row
        print(f"{bits:4d} {mode:4d} {pipe:4d} {epilogue:8d} {acc:3d} {cluster:7d} | {row['sass']} {row['loop']:4d} "
              f"{row['hmma']:4d} {regs:4d} {stack:5d}" + (f" | {row['opcodes']}" if args.opcodes else ""), flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
