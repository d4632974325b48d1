"""Two tuned tables in one decode step: the step's CUDA graph captured with every linear map configured from
table A, then from table B, alternating, in one process (device machine; issue 14). Run-to-run noise of
`spqt bench decode` on the 70B (72-74.6 % of the floor on one commit) is larger than a re-tune's effect;
captures alternating in one process share the machine's state.

    python3 scripts/table_probe.py --a before.json --b after.json [--model synthetic:llama2-70b] [--rounds 2]

The first capture is a warm-up (bench_decode.alternating_step_us).
"""

import argparse
import json

import torch

from spqt.bench_decode import alternating_step_us, print_step_comparison, probe_arguments, probe_generator_from
from spqt.generate import Generator, sparse_linears
from spqt.kernels import gemv as kg
from spqt.kernels import tuning


def table_entries(path: str) -> dict:
    doc = json.loads(open(path).read())
    if doc.get("kernel_version") != tuning.KERNEL_VERSION:
        raise SystemExit(f"{path}: kernel_version {doc.get('kernel_version')}, not {tuning.KERNEL_VERSION}")
    return doc["entries"]


def configure(gen: Generator, entries: dict) -> None:
    """Every zigzag Q4_K map of gen's model re-configured (configs, split workspaces) from the table entries."""
    tuning._load_table = lambda key: entries  # tuning.config reads the table through this name
    for _, _, lin in sparse_linears(gen.model):
        impl = lin.impl
        impl._zigzag_setup(lambda kind: tuning.config(f"zigzag_{kind}", impl.n, impl.k), kg.ZigzagWorkspace,
                           torch.float16, "cuda")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="table A (a tuned/<device>.json)")
    ap.add_argument("--b", required=True, help="table B")
    probe_arguments(ap, "synthetic:llama2-70b")
    args = ap.parse_args()
    tables = {"A": table_entries(args.a), "B": table_entries(args.b)}
    gen, prompt = probe_generator_from(args)
    shapes = [f"{lin.impl.n}x{lin.impl.k}" for _, _, lin in sparse_linears(gen.model)][:4]  # layer 0's maps
    keys = ("split", "num_warps", "acc", "cluster", "us")
    for name, entries in tables.items():
        dense = entries.get("zigzag_dense", {})
        print(f"table {name}: " + ", ".join(f"{shape} {({k: v for k, v in dense.get(shape, {}).items() if k in keys})}"
                                            for shape in shapes))

    setups = {name: (lambda e=entries: configure(gen, e)) for name, entries in tables.items()}
    results = alternating_step_us(gen, prompt, setups, args.rounds, args.reps)
    print_step_comparison(f"{args.model} dense", results)


if __name__ == "__main__":
    main()
