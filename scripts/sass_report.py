"""Registers, spills and instruction counts of the zigzag GEMV kernel for Hopper, compiled here
(no GPU needed: Triton builds the sm_90 cubin; nvdisasm from Triton's bundle reads it).

    python scripts/sass_report.py [num_warps,mode,dtype,chunks ...]   (default: 1-4 warps, B2 and B4, fp16,
                                                                        1 and 2 chunks)
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

from spqt.kernels import zigzag_mma as zm

BIN = Path(triton.__file__).parent / "backends/nvidia/bin"


def report(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    lines, labels, best = [], {}, []
    for ln in sass.splitlines():
        label = re.match(r"^(\.L_\w+):", ln.strip())
        if label:
            labels[label.group(1)] = len(lines)
        elif re.search(r"/\*[0-9a-f]{4}\*/", ln):
            lines.append(ln)
            target = re.search(r"BRA\s+(?:`\()?(\.L_\w+)", ln)
            if target and target.group(1) in labels and len(lines) - labels[target.group(1)] > len(best):
                best = lines[labels[target.group(1)]:]  # a backward branch closes a loop
    ops = {}
    for ln in best:
        m = re.search(r"\*/\s+(?:@!?P\d\s+)?([A-Z][A-Z0-9_.]*)", ln)
        if m:
            op = m.group(1).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    return f"{regs} regs, stack {stack} B, {len(lines)} instructions; longest loop {len(best)}: {top}"


if __name__ == "__main__":
    configs = [(a.split(",")) for a in sys.argv[1:]] or [(w, m, "fp16", c) for w in (1, 2, 4) for m in (0, 2)
                                                          for c in (1, 2)]
    for warps, mode, dtype, chunks in configs:
        print(f"warps {int(warps)} mode {int(mode)} {dtype} chunks {int(chunks)}:",
              report(zm.compile_sm90(int(warps), int(mode), dtype, int(chunks))))
