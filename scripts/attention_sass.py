"""The decode attention's kernels (kernels/fused.py) compiled for Hopper here (no GPU needed: Triton's bundled ptxas),
per head dim and dtype: registers, stack, instruction count and a hash of the SASS, so that a change meant to leave a
configuration's code alone can be checked to (same hash), and a new one to compile at all.

    python scripts/attention_sass.py [hd,dtype[,windowed][,qknorm|,qkall[:HxHKV]][,softcap] ...]
                                     (default: hd 64, 128, 256, 96; fp16. qkall: OLMo 2's q / k norms over all of q and
                                      of k, of H and HKV heads, default 32x32: OLMo 2 7B's)

The hash leaves out the kernel parameters' constant-bank offsets (c[0x0][...]), which an added argument moves.
"""

import hashlib
import math
import re
import sys

import triton

from spqt.kernels import fused
from spqt.kernels.sass import compile_sm90, disassemble, instructions

_POINTER = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def compiled(name: str, hd: int, dtype: str, windowed: bool = False, qk_norm: int = 0, softcap: float = 0.0,
             heads: tuple[int, int] = (32, 32)):
    """fused.<name> compiled for sm_90 with the launch's constexprs at head dim hd, caches and q|k|v of `dtype`, for a
    sliding layer where windowed, with q / k norms where qk_norm (1: per head; 2: over all of q and of k, of `heads`
    (H, HKV) heads), Gemma 2's score cap where softcap (a tree without these arguments ignores them)."""
    half, p = hd // 2, _POINTER[dtype]
    common = dict(HALF=half, HP=triton.next_power_of_2(half), BLOCK_N=fused.ATTN_BLOCK_N, PDL=True, WINDOWED=windowed,
                  QK_NORM=qk_norm, SOFTCAP=softcap)
    if qk_norm == 2:  # (rope_attention_decode's chunks)
        for letter, n in zip("QK", heads):
            width = triton.next_power_of_2(n * hd)
            common |= {f"{letter}N": width, f"{letter}C": min(1024, width)}
    if name == "_rope_attention_decode_kernel":
        sig = dict(x_ptr=p, t_ptr="*fp32", pos_ptr="*i64", k_ptr=p, v_ptr=p, o_ptr=p, part_ptr="*fp32",
                   ml_ptr="*fp32", cnt_ptr="*i32", H="i32", HKV="i32", L="i32", length="i32", window="i32",
                   sx="i32", scale="fp32", slots="i32", qw_ptr="*fp32", kw_ptr="*fp32", eps="fp32")
        constants = dict(common, GROUP=fused.ATTN_COMBINE_GROUP, AHEAD=fused.ATTN_PREFETCH_BLOCKS)
    elif name == "_rope_attention_blocks_kernel":
        sig = dict(x_ptr=p, t_ptr="*fp32", pos_ptr="*i64", k_ptr=p, v_ptr=p, part_ptr="*fp32", ml_ptr="*fp32",
                   H="i32", HKV="i32", L="i32", length="i32", window="i32", sx="i32", scale="fp32", slots="i32",
                   qw_ptr="*fp32", kw_ptr="*fp32", eps="fp32")
        constants = dict(common, G=4, GP=16, AHEAD=fused.ATTN_PREFETCH_BLOCKS,
                         PREC="ieee" if dtype == "fp32" else "tf32")
    else:
        sig = dict(pos_ptr="*i64", o_ptr=p, part_ptr="*fp32", ml_ptr="*fp32", H="i32", length="i32", window="i32",
                   slots="i32")
        constants = dict(HD=hd, COLS=math.gcd(hd, fused.ATTN_LONG_COMBINE_COLS), BLOCK_N=fused.ATTN_BLOCK_N,
                         GROUP=fused.ATTN_LONG_COMBINE_GROUP, PDL=True, WINDOWED=windowed)
    kernel = getattr(fused, name)
    names = kernel.arg_names
    signature = {a: sig.get(a, "constexpr") for a in names}
    constants = {a: v for a, v in constants.items() if a in names}
    warps = getattr(fused, "attention_long_warps", lambda hd: 4)(hd) if name == "_rope_attention_blocks_kernel" else 4
    return compile_sm90(kernel, signature, constants, divisible=sum(1 for a in names if sig.get(a, "").startswith("*")),
                        options=dict(num_warps=warps))


if __name__ == "__main__":
    configs = [a.split(",") for a in sys.argv[1:]] or [(hd, "fp16") for hd in (64, 128, 256, 96)]
    for hd, dtype, *flags in configs:
        whole = [f for f in flags if f.startswith("qkall")]
        heads = tuple(int(n) for n in whole[0][6:].split("x")) if whole and ":" in whole[0] else (32, 32)
        qk_norm = 2 if whole else int("qknorm" in flags)
        for name in ("_rope_attention_decode_kernel", "_rope_attention_blocks_kernel", "_attention_combine_kernel"):
            sass, regs, stack = disassemble(compiled(name, int(hd), dtype, "windowed" in flags, qk_norm,
                                                     50.0 if "softcap" in flags else 0.0, heads).asm["cubin"])
            lines = [re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[param]", re.sub(r"/\*[0-9a-f]{4}\*/", "", ln))
                     for ln in instructions(sass)]
            digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
            print(f"hd {hd} {dtype}{''.join(' ' + f for f in flags)} {name}: {regs} regs, stack {stack} B, "
                  f"{len(lines)} instructions, sass {digest}")
