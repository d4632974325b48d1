"""Where a CPU decode step of the default model goes: the GEMVs against everything else (issue 18).

    PYTHONPATH=src python scripts/profile_cpu_decode.py [--steps 20] [--threads 2] [--backend cpu-fp16]

Decodes greedy steps after the demo prompt (the Generator's own decode_step and sampling), first
timed plainly (median step), then under torch.profiler: self CPU time per aten op a token, and
the step's wall time split into `aten::mm` (the GEMVs; `aten::addmm` too) and the rest. The
profiler's own cost per op inflates "the rest", so the step is also timed with every GEMV replaced
by a stored output of its shape (--stub), at one position repeated (the same attention span): that
step's time is the work outside the GEMVs; its minimum is the steadiest figure on a shared host.
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from spqt.checkpoint import load_spqt
from spqt.default_model import default_spqt
from spqt.generate import Generator, Sampling, sample, set_sparse
from spqt.tokenizer import TextTokenizer

GEMV_OPS = ("aten::mm", "aten::addmm")


def stub_gemvs():
    """Replace F.linear, torch.mm (the fp16 GEMV of every CPU map) and the native maps' C call by a
    lookup of a zero output of the product's shape."""
    outputs = {}

    def product(x, w, bias=None, n=None):
        key = (x.shape[:-1], n, x.dtype)
        if key not in outputs:
            outputs[key] = torch.zeros(*x.shape[:-1], n, dtype=x.dtype)
        return outputs[key]

    torch.nn.functional.linear = lambda x, w, bias=None: product(x, w, n=w.shape[0])
    torch.mm = lambda x, w: product(x, w, n=w.shape[1])
    from spqt.kernels import cpu_native  # the native maps' C call (backend cpu-native)

    cpu_native._NativeMap._call = lambda self, fn, ptr, x, residual, *rule: (product(x, None, n=self.out_features), 0)


def steps(gen, token, pos, n):
    """n greedy decode steps from (token, pos); returns (token, pos, seconds of each step)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = gen.decode_step(int(token), pos)
        token = sample(logits[:, -1], Sampling(), None)
        times.append(time.perf_counter() - t0)
        pos += 1
    return token, pos, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="cpu-fp16")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--stub", action="store_true", help="GEMVs replaced by stored outputs")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--sparsity", type=float, default=0.0, help="a calibrated level (achieved sparsity counted)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_spqt(default_spqt(progress=False))
    prompt = TextTokenizer(loaded.tokenizer, loaded.config).encode("The three primary colors are")
    n = args.steps
    gen = Generator(loaded, "cpu", backend=args.backend, max_len=len(prompt) + 3 * n + 8, sparsity=args.sparsity)
    with torch.inference_mode():
        logits = gen.model(torch.tensor([prompt]), torch.arange(len(prompt)), kv_len=len(prompt))
        set_sparse(gen.model, args.sparsity > 0, track=args.sparsity > 0)  # as generate() decodes
        token, pos = sample(logits[:, -1], Sampling(), None), len(prompt)
        token, pos, _ = steps(gen, token, pos, 4)  # warm
        token, pos, plain = steps(gen, token, pos, n)
        if args.stub:
            stub_gemvs()
            # one position again and again (its KV slot rewritten): the same attention span each step
            stubbed = [steps(gen, token, pos, 1)[2][0] for _ in range(3 * n)][n:]
            print(f"{args.backend}, {args.threads} threads: plain step median {1e3 * statistics.median(plain):.2f} ms; "
                  f"GEMVs stubbed, position {pos}: min {1e3 * min(stubbed):.2f} ms, "
                  f"median {1e3 * statistics.median(stubbed):.2f} ms (of {2 * n})")
        if args.no_profile:
            if not args.stub:
                print(f"{args.backend}, {args.threads} threads: plain step median "
                      f"{1e3 * statistics.median(plain):.2f} ms ({1 / statistics.median(plain):.1f} tokens/s)")
            return
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            token, pos, profiled = steps(gen, token, pos, n)
    per_op = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        per_op[ev.key][0] += ev.count
        per_op[ev.key][1] += ev.self_cpu_time_total
    wall = sum(profiled) * 1e6 / n
    gemv = sum(per_op[k][1] for k in GEMV_OPS) / n
    calls = sum(c for c, _ in per_op.values()) / n
    others = sum(us for k, (_, us) in per_op.items() if k not in GEMV_OPS) / n
    print(f"{args.backend}, {args.threads} threads: plain step median {1e3 * statistics.median(plain):.2f} ms "
          f"({1 / statistics.median(plain):.1f} tokens/s); profiled step {wall / 1e3:.2f} ms, "
          f"GEMVs {gemv / 1e3:.2f} ms, outside them {(wall - gemv) / 1e3:.2f} ms (the other aten ops' self time "
          f"{others / 1e3:.2f} ms, the rest Python and the profiler's own cost), {calls:.0f} aten calls a token")
    print(f"{'op':40s} {'calls/token':>11s} {'self us/token':>13s} {'us/call':>8s}")
    for key, (c, us) in sorted(per_op.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{key[:40]:40s} {c / n:11.1f} {us / n:13.1f} {us / max(c, 1):8.2f}")


if __name__ == "__main__":
    main()
