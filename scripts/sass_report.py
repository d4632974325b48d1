"""Registers, spills and instruction counts of the zigzag GEMV kernel for Hopper, compiled here
(no GPU needed: Triton builds the sm_90 cubin; nvdisasm from Triton's bundle reads it).

    python scripts/sass_report.py [num_warps,mode,dtype,chunks ...]   (default: 1-4 warps, B2 and B4, fp16,
                                                                        1 and 2 chunks)
"""

import collections
import sys

from spqt.kernels import zigzag_mma as zm
from spqt.kernels.sass import disassemble, instructions, main_loop, opcode


def report(compiled) -> str:
    sass, regs, stack = disassemble(compiled.asm["cubin"])
    best = main_loop(sass)
    ops = collections.Counter(op.split(".")[0] for op in map(opcode, best) if op)
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
    return f"{regs} regs, stack {stack} B, {len(instructions(sass))} instructions; longest loop {len(best)}: {top}"


if __name__ == "__main__":
    configs = [(a.split(",")) for a in sys.argv[1:]] or [(w, m, "fp16", c) for w in (1, 2, 4) for m in (0, 2)
                                                          for c in (1, 2)]
    for warps, mode, dtype, chunks in configs:
        print(f"warps {int(warps)} mode {int(mode)} {dtype} chunks {int(chunks)}:",
              report(zm.compile_sm90(int(warps), int(mode), dtype, int(chunks))))
