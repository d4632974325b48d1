"""Registers, spills, shared memory and instruction counts of the zigzag GEMV kernels of the other
types (kernels/zigzag_types.py) for Hopper, compiled here without a GPU (Triton's bundled ptxas
and cuobjdump), as a markdown table.

    python scripts/types_sass_report.py [--warps N] [--block-k N] [--dtype fp16|bf16|fp32]
    (default: each type's default warps, block_k 16, fp16; run without TRITON_INTERPRET)
"""

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton

from spqt.kernels import tuning
from spqt.kernels import zigzag_types as zt

BIN = Path(triton.__file__).parent / "backends/nvidia/bin"


def row(fmt: str, mode: int, warps: int, block_k: int, dtype: str) -> str:
    compiled = zt.compile_sm90(fmt, mode, dtype, num_warps=warps, block_k=block_k)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ptx)
        verbose = subprocess.run([str(BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o",
                                  f"{d}/k.cubin"], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f"{d}/k.cubin"], capture_output=True, text=True,
                              check=True).stdout
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?P\d\s+)?([A-Z0-9]+)", sass, flags=re.M))
    loads = collections.Counter(re.findall(r"ld\.global[.\w]*", ptx))
    wide = sum(n for k, n in loads.items() if ".v4." in k or "v2.b64" in k)
    regs = re.findall(r"Used (\d+) registers", verbose)[0]
    spill = re.findall(r"(\d+) bytes spill stores", verbose)[0]
    return (f"| {fmt} | {'B2' if mode == zt.MODE_DENSE else 'B4'} | {warps} | {regs} | {spill} | "
            f"{compiled.metadata.shared} | {sum(ops.values())} | {ops['I2F']} | {wide} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warps", type=int, default=0, help="0: each type's default")
    p.add_argument("--block-k", type=int, default=16)
    p.add_argument("--dtype", default="fp16")
    args = p.parse_args()
    print(f"triton {triton.__version__}, sm_90a, x {args.dtype}, block_k {args.block_k}")
    print("| type | variant | warps | registers | spill bytes | shared mem (B) | SASS instructions | I2F | "
          "16-byte global loads (PTX) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt in tuning.TYPE_FORMATS:
        warps = args.warps or tuning.default_config(f"zigzag_dense_{fmt}", 4096, 4096)["num_warps"]
        for mode in (zt.MODE_DENSE, zt.MODE_INDEXED):
            print(row(fmt, mode, warps, args.block_k, args.dtype))


if __name__ == "__main__":
    main()
