"""What one persistent launch for a whole step's layers takes back (issue 14; device machine): every layer of a
synthetic model as the runtime launches it (q|k|v and gate|up with the RMSNorm folded, o and down with the residual,
gate|up with SwiGLU, the fused decode attention at position --pos; its tuned configs, a launch or two a map)
against the same arithmetic as ONE launch of the chain kernel (spqt.kernels.chain), in variants (pipe, L2
prefetch, programs an SM, accumulators, splits). --no-attention: o reads the first D outputs of q|k|v instead of
the attention (the maps alone). Both in CUDA graphs, alternating rounds, device time of the replays (median); the
chain's final hidden state against the launched one's.

    python3 scripts/chain_probe.py [--model synthetic:llama2-7b] [--no-attention] [--variants acc=2,blocks=4 ...]

A variant sets some of pipe (1: loads a chunk ahead), prefetch (1: an item's share asked of L2 before its wait),
blocks (programs an SM must hold: caps the registers), acc (accumulator tiles), warps, sleep (ns between two polls
of a waiting program), finish (0: a finisher sums one output at a time; 1, the default: all in flight), nowait (1:
no stage waits for its input: wrong outputs, the items' own time), fence (1: release / acquire operations instead
of SC fences), and the splits: scale (the map's tuned split times it) or waves (each map's split such that its
items are about waves x the programs).
"""

import argparse
import statistics

import torch

from spqt.bench_decode import probe_arguments, probe_generator_from, replay_device_us
from spqt.decode_chain import ChainBuffers, layer_stages, programs_a_head
from spqt.functional import NORM_SUMS
from spqt.kernels.chain import Chain


def launched_layers(model, hidden0: torch.Tensor, sq0: torch.Tensor, pos: torch.Tensor | None,
                    length: int, layers: int) -> torch.Tensor:
    """The runtime's calls for every layer (the model's blocks at position pos over `length` keys; pos None: the
    attention left out): (1, 1, D) fp16 out."""
    d = hidden0.numel()
    x = hidden0.view(1, 1, d)
    setattr(x, NORM_SUMS, sq0)
    mask = None
    if pos is not None:
        mask = torch.zeros((1, length), dtype=x.dtype, device=x.device).masked_fill_(
            torch.arange(length, device=x.device)[None, :] > pos[:, None], float("-inf"))
    for i, block in enumerate(model.layers[:layers]):
        if pos is not None:
            x = block(x, model.rope_for(i), pos, mask)
            continue
        qkv = block.attention.qkv(x, norm=block.attention_norm)
        h = block.attention.o(qkv[..., :d], residual=x)
        x = block.feed_forward(h, block.ffn_norm)
    return x


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
    ap.add_argument("--variants", nargs="+", default=["pipe=0,acc=2,blocks=4,waves=1",
                                                      "pipe=0,acc=2,blocks=4,waves=1,sleep=0",
                                                      "pipe=0,acc=2,blocks=4,waves=1,sleep=500",
                                                      "pipe=0,acc=2,blocks=4,waves=1,prefetch=0"])
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--pos", type=int, default=40, help="the token's position (the synthetic model holds 64)")
    ap.add_argument("--layers", type=int, default=0, help="the first N layers only (0: all): the error check over "
                    "a few layers (random synthetic layers amplify rounding differences over many)")
    args = ap.parse_args()
    gen, _ = probe_generator_from(args)
    model = gen.model
    d = model.config.dim
    eps = model.config.norm_eps
    hidden0 = torch.randn(d, device="cuda", dtype=torch.float16)
    bufs = ChainBuffers.for_model(model)  # the chains' (hidden updated in place, copied from hidden0 each run)
    bufs.sq0.copy_((hidden0.float() ** 2).sum().reshape(1))
    bufs.pos.fill_(args.pos)
    pos = None if args.no_attention else bufs.pos
    length = gen.max_len
    graphs, outs = {}, {}
    layers = args.layers or len(model.layers)
    graphs["launched"], outs["launched"] = captured(
        lambda: launched_layers(model, hidden0, bufs.sq0, pos, length, layers))
    hidden = bufs.h
    sms = torch.cuda.get_device_properties(hidden0.device).multi_processor_count
    chains = []
    for spec in args.variants:
        v = {"pipe": 1, "prefetch": 1, "blocks": 1, "acc": 16, "warps": 4} | {
            key: float(val) for key, val in (kv.split("=") for kv in spec.split(","))}
        unknown = set(v) - {"pipe", "prefetch", "blocks", "acc", "warps", "sleep", "finish", "nowait", "fence", "waves"}
        if unknown:
            raise SystemExit(f"chain_probe: unknown variant keys {', '.join(sorted(unknown))} in {spec!r}")
        kernel_args = {key: int(v[key]) for key in ("pipe", "prefetch", "blocks", "acc", "warps")}
        kernel_args["defines"] = tuple(f"-DCHAIN_{key.upper()}={int(v[key])}"
                                       for key in ("sleep", "finish", "nowait", "fence") if key in v)
        programs = Chain.programs_for(hidden0.device, **kernel_args, head_dim=model.config.head_dim)

        def split(lin, v=v, programs=programs) -> int:
            if "waves" in v:
                return max(1, round(v["waves"] * programs / lin.impl.w.grid[0]))
            return max(1, round(lin.impl.cfg_dense["split"] * v.get("scale", 1.0)))

        stages = layer_stages(model, bufs, split, length, programs_a_head(length, programs, model.config.n_heads),
                              layers, attention=pos is not None)
        chain = Chain(stages, eps, **kernel_args)
        chains.append(chain)  # a graph holds no reference to the chain's table, done counters and scratch

        def run(chain=chain):
            hidden.copy_(hidden0)
            chain.launch()
            return hidden

        graphs[f"chain {spec}"], outs[f"chain {spec}"] = captured(run)
        print(f"chain {spec}: {chain.programs} programs ({chain.programs / sms:.0f} an SM), "
              f"{sum(st.items() for st in stages) / layers:.0f} items a layer")
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
    what = "without attention" if pos is None else f"at position {args.pos} over {length} keys"
    print(f"{args.model}: {layers} layers {what}, device time (us), median of {args.reps} "
          f"replays a round:")
    for name, t in times.items():
        print(f"  {name:<22} {', '.join(f'{x:.1f}' for x in t)}  ({base - statistics.median(t):+.1f} us less than "
              f"launched)")


if __name__ == "__main__":
    main()
