"""What one persistent launch for a whole step's maps takes back (issue 14; device machine): every layer of a
synthetic model without its attention (o reads the first D outputs of q|k|v instead), as the runtime launches it
(q|k|v and gate|up with the RMSNorm folded, o and down with the residual, gate|up with SwiGLU; its tuned configs,
a launch or two a map) against the same arithmetic as ONE launch of the chain kernel (spqt.kernels.chain), in
variants (pipe, L2 prefetch, programs an SM, splits scaled). Both in CUDA graphs, alternating rounds, device time
of the replays (median); the chain's final hidden state against the launched one's.

    python3 scripts/chain_probe.py [--model synthetic:llama2-7b] [--variants pipe=1,acc=2 waves=2 ...]

A variant sets some of pipe (1: loads a chunk ahead), prefetch (1: an item's share asked of L2 before its wait),
blocks (programs an SM must hold: caps the registers), acc (accumulator tiles), warps, and the splits: scale (the
map's tuned split times it) or waves (each map's split such that its items are about waves x the programs).
"""

import argparse
import statistics

import torch

from spqt.bench_decode import probe_arguments, probe_generator, replay_device_us
from spqt.functional import NORM_SUMS
from spqt.kernels.chain import EPILOGUE_RESIDUAL, EPILOGUE_SWIGLU, Chain, Stage


def launched_layers(model, hidden0: torch.Tensor, sq0: torch.Tensor) -> torch.Tensor:
    """The runtime's calls for every layer, attention left out: (1, 1, D) fp16 out."""
    d = hidden0.numel()
    x = hidden0.view(1, 1, d)
    setattr(x, NORM_SUMS, sq0)
    for block in model.layers:
        qkv = block.attention.qkv(x, norm=block.attention_norm)
        h = block.attention.o(qkv[..., :d], residual=x)
        x = block.feed_forward(h, block.ffn_norm)
    return x


def chain_stages(model, hidden: torch.Tensor, sq0: torch.Tensor, split) -> tuple[list[Stage], dict]:
    """The same layers as chain stages over buffers (hidden updated in place), and those buffers; split(linear)
    gives a map's split."""
    d, dev = hidden.numel(), hidden.device
    first = model.layers[0]
    bufs = {"qkv": torch.empty(first.attention.qkv.impl.n, dtype=torch.float16, device=dev),
            "act": torch.empty(first.feed_forward.gate_up.impl.n // 2, dtype=torch.float16, device=dev),
            "sq": torch.empty(-(-d // 256), dtype=torch.float32, device=dev)}
    stages = []
    for block in model.layers:
        att, ff = block.attention, block.feed_forward
        qkv_w = att.qkv.impl.w
        stages.append(Stage(qkv_w, hidden, bufs["qkv"], split(att.qkv), gamma=block.attention_norm.weight,
                            sq_in=sq0 if not stages else bufs["sq"], after=len(stages) - 1))
        stages.append(Stage(att.o.impl.w, bufs["qkv"][:d], hidden, split(att.o), EPILOGUE_RESIDUAL, res=hidden,
                            sq_out=bufs["sq"], after=len(stages) - 1))
        stages.append(Stage(ff.gate_up.impl.w, hidden, bufs["act"], split(ff.gate_up), EPILOGUE_SWIGLU,
                            gamma=block.ffn_norm.weight, sq_in=bufs["sq"], after=len(stages) - 1))
        stages.append(Stage(ff.down.impl.w, bufs["act"], hidden, split(ff.down), EPILOGUE_RESIDUAL, res=hidden,
                            sq_out=bufs["sq"], after=len(stages) - 1))
    return stages, bufs


def captured(call) -> tuple[torch.cuda.CUDAGraph, object]:
    """A CUDA graph of call() (run once first) and its output."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


def main():
    ap = argparse.ArgumentParser()
    probe_arguments(ap, "synthetic:llama2-7b")
    ap.add_argument("--variants", nargs="+", default=["pipe=1", "pipe=0,acc=2", "pipe=0,acc=2,waves=2",
                                                      "pipe=0,acc=2,prefetch=0", "pipe=1,acc=2,waves=1"])
    args = ap.parse_args()
    gen, _ = probe_generator(args.model)
    model = gen.model
    d = model.config.dim
    eps = model.layers[0].attention_norm.eps
    hidden0 = torch.randn(d, device="cuda", dtype=torch.float16)
    sq0 = (hidden0.float() ** 2).sum().reshape(1)
    graphs, outs = {}, {}
    graphs["launched"], outs["launched"] = captured(lambda: launched_layers(model, hidden0, sq0))
    hidden = torch.empty_like(hidden0)
    sms = torch.cuda.get_device_properties(hidden0.device).multi_processor_count
    for spec in args.variants:
        v = {"pipe": 1, "prefetch": 1, "blocks": 1, "acc": 16, "warps": 4} | {
            key: float(val) for key, val in (kv.split("=") for kv in spec.split(","))}
        kernel_args = {key: int(v[key]) for key in ("pipe", "prefetch", "blocks", "acc", "warps")}
        programs = Chain.programs_for(hidden0.device, **kernel_args)

        def split(lin, v=v, programs=programs) -> int:
            if "waves" in v:
                return max(1, round(v["waves"] * programs / lin.impl.w.grid[0]))
            return max(1, round(lin.impl.cfg_dense["split"] * v.get("scale", 1.0)))

        stages, _ = chain_stages(model, hidden, sq0, split)
        chain = Chain(stages, eps, **kernel_args)

        def run(chain=chain):
            hidden.copy_(hidden0)
            chain.launch()
            return hidden

        graphs[f"chain {spec}"], outs[f"chain {spec}"] = captured(run)
        print(f"chain {spec}: {chain.programs} programs ({chain.programs / sms:.0f} an SM), "
              f"{sum(st.w.grid[0] * st.split for st in stages) / len(model.layers):.0f} items a layer")
    ref = None
    times = {name: [] for name in graphs}
    for _ in range(args.rounds):
        for name, graph in graphs.items():
            times[name].append(statistics.median(replay_device_us(graph, args.reps)))
            if name == "launched":
                ref = outs[name].reshape(-1).float().clone()
            else:
                out = outs[name].float()
                err = float((out - ref).abs().max() / ref.abs().max())
                print(f"  {name}: max |chain - launched| / max |launched| = {err:.2e}")
    base = statistics.median(times["launched"])
    print(f"{args.model}: {len(model.layers)} layers without attention, device time (us), median of {args.reps} "
          f"replays a round:")
    for name, t in times.items():
        print(f"  {name:<22} {', '.join(f'{x:.1f}' for x in t)}  ({base - statistics.median(t):+.1f} us less than "
              f"launched)")


if __name__ == "__main__":
    main()
