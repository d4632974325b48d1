"""Why do decode graphs replay slower in some processes? (device machine; one line out)

    python3 scripts/graph_tail_probe.py --variant VARIANT [--model default|synthetic:NAME] [--reps 30] [--max-len 64]
        [--profile] [--replay-stream default|side] [--json OUT]

The forty-sixth session ended the greedy decode step with one Triton kernel in place of the runtime's three launches
(the history entry, the next token, the next position) and saw the default model's graph replay 42 us slower on an
H100 (680 against 637 us, each in a process of one capture). In processes of two captures the forty-seventh found the
six endings below within 2 % of each other, and found that a process's graphs, earlier ones included, replay 1-2 %
slower (the 7B) once it has made a second stream capture of anything (the decode-* and tiny-* variants; kernels overlap
less: --profile). Whether the Triton ending costs anything in a one-capture process is decode-first-triton's question.
Run the variants alternating, each in a fresh process (`gpu_session.sh tail47`, `order48`):

  shipped           the runtime's own capture (Generator._capture, not replaced): index_copy_ into the history, a copy
                    (a memcpy node) and an add on the inputs
  no-memcpy         the same with the token's copy as an index_copy_ kernel: no memcpy node in the graph
  triton            one Triton kernel doing the three (its module loaded at the decode step's capture)
  triton-preloaded  that kernel, its module loaded before the process's first prefill
  late-module       the runtime's capture, and a Triton kernel nothing else runs loaded between the prefill graph's
                    capture and the decode step's (every variant loads the decode kernels' modules there too, so
                    this asks only whether one more load matters: a null result does not clear module loads)
  eager-first       the runtime's capture after a 2-token generation run eagerly (no graph) first, which loads every
                    decode kernel's module before the process's first capture (a fix the runtime could make at start)
  decode-first      the runtime's capture as the process's first (no prefill graph: scripts/profile_decode.py's order)
  decode-first-triton  the same with the Triton ending, its module loaded first (triton-preloaded's): does that ending
                    cost anything in a process of one capture, where spqt bench decode measured it 5.5 % slower?
  decode-then-prefill  decode-first, then the prefill graph captured (two more generations of the prompt), the same
                    decode graph timed after: does a later capture of another graph slow a graph already captured?
  decode-then-tiny  decode-first, then a graph of one small add captured and instantiated (a pool of its own)
  decode-then-kept  the same, its capture kept uninstantiated (keep_graph=True): the capture alone, no instantiation
  decode-then-empty decode-first, then torch.cuda.empty_cache() alone (what torch.cuda.graph's __enter__ calls first)
  decode-then-host-empty  decode-first, then torch's pinned host cache emptied alone (the same __enter__'s next call)
  decode-then-raw   decode-first, then the add captured by capture_begin / capture_end on a side stream, kept
                    uninstantiated: a capture without torch.cuda.graph's emptying of the caches
  decode-then-driver  decode-first, then the add captured through the CUDA driver itself (cuStreamBeginCapture /
                    cuStreamEndCapture from cuda-bindings, global mode, a side stream; the graph destroyed): torch's
                    capture_begin / capture_end (its private pool, its RNG registration) left out
  decode-then-driver-empty  the same with nothing launched inside the capture (an empty graph)
  decode-then-driver-relaxed  decode-then-driver in relaxed capture mode (global mode makes the driver watch every
                    thread's calls during the capture)
  tiny-then-decode  the add captured (raw, kept uninstantiated, never replayed) before anything else, then decode-first
  decode-then-raw-freed  decode-then-raw, the graph reset and dropped before the timing: must the capture's graph stay
                    alive?
  decode-then-driver-kept  decode-then-driver, its graph kept alive (not destroyed) until the timing is done
  decode-then-runtime  decode-then-driver through cuda-bindings' runtime API (cudaStreamBeginCapture, torch's call)
  decode-then-pool  decode-first, then a tensor allocated in a private memory pool of torch's allocator (MemPool), no
                    capture: is it the pool that a torch capture opens?
  decode-then-bucket  decode-first, then a 300-token generation (with --max-len 1024: the 512-key bucket captured), the
                    first decode graph timed after

The first six variants' process: a prefill run eagerly, then its graph captured (the prompt's second use), then an
8-token greedy generation that captures the decode step with the variant's end; the others' as each says. Each prints
the step graph's device time (each replay alone between two CUDA events, median of --reps), as
scripts/profile_decode.py times it, on the current stream (the runtime's) or, with --replay-stream side, on a stream
of its own (does the slower state belong to the default stream?).

--graphs runtime captures the runtime's graphs (decode and prefill) without torch's CUDAGraph object: a stream capture
through the CUDA runtime API of cuda-bindings, the capture's allocations routed to a private pool of torch's allocator,
the graph instantiated and launched through cuda-bindings (RuntimeGraph: what differs from torch's capture is in its
docstring). The probe's own raw capture stays torch's. The greedy tokens of the first generation (its prefill eager,
its decode steps replayed) are checked against an eager (graph-free) run of the same prompt; the prefill graphs'
outputs (decode-then-prefill's other prompt) are not.
"""

import argparse
import gc
import json
import statistics

import torch
import triton
import triton.language as tl

from spqt.bench_decode import replay_device_us
from spqt.generate import Generator, _warm_up

from prefill_probe import load  # (default, or synthetic:NAME[:TYPE]; scripts/ is this script's path)

VARIANTS = ("shipped", "no-memcpy", "triton", "triton-preloaded", "late-module", "eager-first", "decode-first",
            "decode-then-prefill", "decode-then-tiny", "decode-then-kept", "decode-then-empty",
            "decode-then-host-empty", "decode-then-raw", "decode-then-bucket", "tiny-then-decode", "decode-then-driver",
            "decode-then-driver-empty", "decode-then-driver-relaxed", "decode-first-triton", "decode-then-raw-freed",
            "decode-then-driver-kept", "decode-then-runtime", "decode-then-pool")


@triton.jit
def _advance_kernel(logits_ptr, greedy_ptr, history_ptr, io_ptr):
    """history[io[1]] = greedy (-1 where logits[greedy] is not finite); io = (greedy, io[1] + 1)."""
    g = tl.load(greedy_ptr)
    v = tl.load(logits_ptr + g).to(tl.float32)
    pos = tl.load(io_ptr + 1)
    tl.store(history_ptr + pos, tl.where(tl.abs(v) < float("inf"), g, -1))
    tl.store(io_ptr, g)
    tl.store(io_ptr + 1, pos + 1)


@triton.jit
def _unused_kernel(x_ptr):
    """A module of its own that nothing else loads (late-module)."""
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def advance(logits: torch.Tensor, greedy: torch.Tensor, history: torch.Tensor, io: torch.Tensor) -> None:
    _advance_kernel[(1,)](logits, greedy, history, io, num_warps=1)


def raw_capture(scratch: torch.Tensor) -> torch.cuda.CUDAGraph:
    """scratch += 1 captured by torch's capture_begin / capture_end on a side stream (no torch.cuda.graph: no cache
    emptying), kept uninstantiated; returned so that it stays alive."""
    raw, side = TorchGraph(keep_graph=True), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        raw.capture_begin()
        scratch.add_(1)
        raw.capture_end()
    torch.cuda.synchronize()
    return raw


def driver_capture(scratch: torch.Tensor, launch: bool, relaxed: bool = False, keep: bool = False):
    """One stream capture through the CUDA driver alone (no torch graph object): scratch += 1 inside it if launch, on a
    side stream, in global mode (torch's capture_begin's default) or relaxed; the captured graph never instantiated,
    destroyed unless keep (then returned, to stay alive)."""
    from cuda.bindings import driver

    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    handle, modes = driver.CUstream(side.cuda_stream), driver.CUstreamCaptureMode
    err, = driver.cuStreamBeginCapture(handle, modes.CU_STREAM_CAPTURE_MODE_RELAXED if relaxed
                                           else modes.CU_STREAM_CAPTURE_MODE_GLOBAL)
    assert int(err) == 0, err
    if launch:
        with torch.cuda.stream(side):
            scratch.add_(1)
    err, graph = driver.cuStreamEndCapture(handle)
    assert int(err) == 0, err
    torch.cuda.synchronize()
    if keep:
        return graph
    driver.cuGraphDestroy(graph)
    return None


TorchGraph = torch.cuda.CUDAGraph


class RuntimeGraph:
    """torch.cuda.CUDAGraph's interface (as torch.cuda.graph drives it: its cache emptying and side stream stay) over a
    runtime-API stream capture (cuda-bindings): no RNG registration, no capture bookkeeping of torch's; every
    allocation the thread makes during the capture (on any stream, where torch's capture filters by the capturing
    stream) routed to a private pool of torch's allocator; the graph instantiated with `flags` (0; --graphs
    runtime-autofree: cudaGraphInstantiateFlagAutoFreeOnLaunch, as torch's capture_end instantiates) and launched on
    the current stream. For this probe's process only: the pools live as long as the class, reset()
    releases no pool, and a graph dropped without reset() keeps its executable graph."""
    pools: dict = {}  # graph_pool_handle() -> MemPool, shared by the graphs captured with it
    flags = 0  # cudaGraphInstantiateWithFlags' flags

    def __init__(self, keep_graph: bool = False):
        self.graph = self.exec = self.mempool = None

    def capture_begin(self, pool=None, capture_error_mode: str = "global", **_):
        from cuda.bindings import runtime

        if pool and pool not in RuntimeGraph.pools:
            RuntimeGraph.pools[pool] = torch.cuda.MemPool()
        self.mempool = RuntimeGraph.pools[pool] if pool else torch.cuda.MemPool()
        torch._C._cuda_beginAllocateCurrentThreadToPool(torch.cuda.current_device(), self.mempool.id)
        self.stream = torch.cuda.current_stream().cuda_stream
        modes = runtime.cudaStreamCaptureMode
        err, = runtime.cudaStreamBeginCapture(self.stream, {"global": modes.cudaStreamCaptureModeGlobal,
                                                            "relaxed": modes.cudaStreamCaptureModeRelaxed,
                                                            "thread_local": modes.cudaStreamCaptureModeThreadLocal}
                                              [capture_error_mode])
        assert int(err) == 0, err

    def capture_end(self):
        from cuda.bindings import runtime

        err, self.graph = runtime.cudaStreamEndCapture(self.stream)
        torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), self.mempool.id)
        assert int(err) == 0, err
        err, self.exec = runtime.cudaGraphInstantiateWithFlags(self.graph, RuntimeGraph.flags)
        assert int(err) == 0, err

    def replay(self):
        from cuda.bindings import runtime

        err, = runtime.cudaGraphLaunch(self.exec, torch.cuda.current_stream().cuda_stream)
        assert int(err) == 0, err

    def reset(self):
        from cuda.bindings import runtime

        if self.exec is not None:
            runtime.cudaGraphExecDestroy(self.exec)
            runtime.cudaGraphDestroy(self.graph)
        self.graph = self.exec = None


def runtime_capture(scratch: torch.Tensor) -> None:
    """driver_capture's add through the CUDA runtime API (cudaStreamBeginCapture, global mode), the graph destroyed."""
    from cuda.bindings import runtime

    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    err, = runtime.cudaStreamBeginCapture(side.cuda_stream, runtime.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
    assert int(err) == 0, err
    with torch.cuda.stream(side):
        scratch.add_(1)
    err, graph = runtime.cudaStreamEndCapture(side.cuda_stream)
    assert int(err) == 0, err
    runtime.cudaGraphDestroy(graph)
    torch.cuda.synchronize()


def with_ending(gen: Generator, variant: str) -> None:
    """gen's decode step captured with the variant's end (Generator._capture's, the last three launches replaced; its
    warm-up as the runtime's, the model alone, but for the Triton ending, whose module cannot load inside a capture)."""
    zero = torch.zeros(1, dtype=torch.int64, device=gen.device)

    def end(logits: torch.Tensor, greedy: torch.Tensor, history: torch.Tensor, io: torch.Tensor, pos: torch.Tensor):
        if variant.startswith("triton"):
            advance(logits[0, -1], greedy, history, io)
            return
        history.index_copy_(0, pos, greedy)
        if variant == "no-memcpy":
            io.index_copy_(0, zero, greedy)
        else:
            io[0:1].copy_(greedy)
        io[1:2].add_(1)

    def capture(kv_len: int) -> tuple:
        def step() -> None:
            warm = gen.model(gen._tok, gen._pos, kv_len=kv_len)
            if variant.startswith("triton"):
                scratch_io = gen._io.clone()  # a warm-up must not advance the step's inputs
                end(warm, warm[:, -1].argmax(-1), torch.empty_like(gen._history), scratch_io, scratch_io[1:2])

        _warm_up(step, times=2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = gen.model(gen._tok, gen._pos, kv_len=kv_len)
            greedy = logits[:, -1].argmax(-1)
            end(logits, greedy, gen._history, gen._io, gen._pos)
        return graph, logits, greedy

    gen._capture = capture


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="also the kernels' sum and the gaps (torch.profiler)")
    ap.add_argument("--replay-stream", choices=("default", "side"), default="default",
                    help="replay (and time) on the current stream, as the runtime does, or on a stream of its own")
    ap.add_argument("--graphs", choices=("torch", "runtime", "runtime-autofree"), default="torch",
                    help="the runtime's graphs captured by torch's CUDAGraph or by RuntimeGraph (instantiated without "
                         "flags, or with auto-free on launch as torch's)")
    args = ap.parse_args()
    if args.graphs.startswith("runtime"):
        torch.cuda.CUDAGraph = RuntimeGraph
        RuntimeGraph.flags = 1 if args.graphs == "runtime-autofree" else 0  # cudaGraphInstantiateFlagAutoFreeOnLaunch
    loaded = load(args.model, args.max_len)
    gen = Generator(loaded, "cuda", max_len=args.max_len)
    prompt = torch.randint(0, loaded.config.vocab_size, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    scratch = torch.zeros(8, dtype=torch.int64, device="cuda")
    alive = []  # raw captures' graphs, kept until the timing is done
    if args.variant in ("triton-preloaded", "decode-first-triton"):  # the module loaded before any capture (the
        logits = torch.zeros(16, dtype=torch.float32, device="cuda")  # logits are float32: Transformer.logits)
        advance(logits, scratch[:1], scratch, scratch[2:4].clone())
        torch.cuda.synchronize()
    if args.variant == "tiny-then-decode":
        alive.append(raw_capture(scratch))
    if args.variant == "decode-first-triton":
        with_ending(gen, "triton")
    if args.variant.startswith("decode-") or args.variant == "tiny-then-decode":
        tokens = gen.generate(prompt, 8, track=False).tokens  # the decode step captured first, the prefill eager
        if args.variant == "decode-then-prefill":  # another prompt of the length (no prefix of the cache's to reuse)
            other = [(t + 1) % loaded.config.vocab_size for t in prompt]
            gen.generate(other, 8, track=False)  # the prefill's second use: its graph captured
            gen.generate(other, 8, track=False)  # (replayed; the decode graphs are those captured above)
        if args.variant in ("decode-then-tiny", "decode-then-kept"):
            tiny = TorchGraph(keep_graph=args.variant == "decode-then-kept")
            with torch.cuda.graph(tiny):
                scratch.add_(1)
            torch.cuda.synchronize()
        if args.variant == "decode-then-bucket":
            first = gen._graph
            gen.generate(prompt, 300, track=False)
            print(f"decode graphs after the 300 tokens: {len(gen._graphs)}")
            gen._graph = first
        if args.variant.startswith("decode-then-driver"):
            alive.append(driver_capture(scratch, launch=args.variant != "decode-then-driver-empty",
                                        relaxed=args.variant == "decode-then-driver-relaxed",
                                        keep=args.variant == "decode-then-driver-kept"))
        if args.variant == "decode-then-runtime":
            runtime_capture(scratch)
        if args.variant == "decode-then-pool":
            pool = torch.cuda.MemPool()
            with torch.cuda.use_mem_pool(pool):
                alive.append(torch.ones(1 << 20, device="cuda"))
            alive.append(pool)
            torch.cuda.synchronize()
        if args.variant == "decode-then-empty":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if args.variant == "decode-then-host-empty":
            torch.cuda.synchronize()
            torch._C._host_emptyCache()
        if args.variant == "decode-then-raw":
            alive.append(raw_capture(scratch))
        if args.variant == "decode-then-raw-freed":
            freed = raw_capture(scratch)
            freed.reset()
            del freed
            gc.collect()
            torch.cuda.synchronize()
        report(args, gen, tokens, prompt)
        return
    if args.variant not in ("shipped", "late-module", "eager-first"):
        with_ending(gen, args.variant)
    if args.variant == "eager-first":  # every decode kernel's module loaded before any capture
        gen.use_graph = False
        gen.generate(prompt, 2, track=False)
        gen.use_graph = True
        torch.cuda.synchronize()
    gen.generate(prompt, 1, track=False)  # the prefill, eager
    gen.generate(prompt, 1, track=False)  # its graph captured (second use)
    if args.variant == "late-module":
        _unused_kernel[(1,)](scratch, num_warps=1)
        torch.cuda.synchronize()
    tokens = gen.generate(prompt, 8, track=False).tokens  # the decode step captured with the variant's end
    report(args, gen, tokens, prompt)


def report(args, gen: Generator, tokens: list[int], prompt: list[int]) -> None:
    """Print (and write to --json) the decode step graph's device time: each replay alone, median of --reps; with
    --graphs runtime, whether the 8 greedy tokens equal an eager run's."""
    stream = torch.cuda.Stream() if args.replay_stream == "side" else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        us = replay_device_us(gen._graph, args.reps, before=lambda: gen._set_io(tokens[0], len(prompt)))
    row = {"variant": args.variant, "model": args.model, "device": torch.cuda.get_device_name(),
           "median_us": statistics.median(us), "min_us": min(us), "reps": args.reps, "stream": args.replay_stream}
    if args.profile:  # the kernels' device time a replay (torch.profiler over 5 replays): kernels or gaps?
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.cuda.stream(stream):
            for _ in range(5):
                gen._graph.replay()
            torch.cuda.synchronize()
        kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
        row["kernel_sum_us"] = sum(ev.device_time for ev in kernels) / 5
        row["kernels"] = len(kernels) / 5
    if args.graphs != "torch":
        gen.use_graph = False
        row["tokens_match_eager"] = gen.generate(prompt, len(tokens), track=False).tokens == tokens
        gen.use_graph = True
    row["graphs"] = args.graphs
    row["prefill_graphs"] = sum(graph is not None for graph in gen._prefills.values())
    row["decode_graphs"] = len(gen._graphs)
    print(f"{args.variant:19s} {args.model:20s} {args.replay_stream:7s} step graph {row['median_us']:8.1f} us "
          f"(min {row['min_us']:.1f}, "
          f"{args.reps} replays; {row['prefill_graphs']} prefill / {row['decode_graphs']} decode graphs)"
          + (f"; {row['kernels']:.0f} kernels, their sum {row['kernel_sum_us']:.1f} us, gaps "
             f"{row['median_us'] - row['kernel_sum_us']:.1f} us" if args.profile else "")
          + (f"; {args.graphs} graphs, tokens equal eager: {row['tokens_match_eager']}"
             if args.graphs != "torch" else ""),
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f)


if __name__ == "__main__":
    main()
