"""What the decode attention costs a step's chain: the step's CUDA graph captured with the one-launch attention
(fused.rope_attention_decode, what ships), with it replaced by one trivial launch (a Triton copy of the query rows,
PDL like the attention: the launch without the work), and with no launch at all (the o map reads the query rows in
place), alternating, in one process (device machine; issue 14). The two replacements give wrong outputs: timing
only. --prompt-tokens / --max-len set the span the timed steps attend (default: 10 keys, one block).

    python3 scripts/attention_ceiling_probe.py [--model synthetic:llama2-70b] [--prompt-tokens 300 --max-len 512]
        [--rounds 2] [--reps 30]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse

import torch
import triton
import triton.language as tl

from spqt.bench_decode import alternating_step_us, print_step_comparison, probe_arguments, probe_generator_from
from spqt.kernels import fused
from spqt.kernels.zigzag_mma import uses_pdl


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """dst[:n] = src[:n], after the kernel before it (PDL), as the attention waits and releases."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-70b")
    args = ap.parse_args()
    gen, prompt = probe_generator_from(args)
    shipped = fused.rope_attention_decode

    def queries(qkv, table, positions, cache_k, cache_v, n_heads, n_kv, length):
        b, hd = qkv.shape[0], cache_k.shape[-1]
        return qkv[..., :n_heads * hd].reshape(b, 1, n_heads, hd)

    def copied(qkv, *rest):
        q = queries(qkv, *rest)
        out = torch.empty_like(q)
        pdl = uses_pdl(q.device)
        _copy_kernel[(triton.cdiv(q.numel(), 1024),)](q, out, q.numel(), BLOCK=1024, PDL=pdl, num_warps=4,
                                                     launch_pdl=pdl)
        return out

    variants = {"attention": shipped, "one copy launch": copied, "no launch": queries}

    def setup(name):
        def apply():
            fused.rope_attention_decode = variants[name]
        return apply

    results = alternating_step_us(gen, prompt, {name: setup(name) for name in variants}, args.rounds, args.reps)
    fused.rope_attention_decode = shipped
    print_step_comparison(f"{args.model} dense", results, "the attention")


if __name__ == "__main__":
    main()
