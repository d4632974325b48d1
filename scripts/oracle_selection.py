"""The per-token oracle of an activation-selection criterion: what the best ranking of inputs by a
score gives, against the calibrated thresholds that stand in for it (issue 16).

Thresholds keep x_i when score_i > t with t fixed per map, so how many inputs a token keeps varies
from token to token. The oracle keeps, for every token and every thresholded linear map (the q|k|v
input, the o input, the gate|up input, the down input: spqt.generate.sparse_linears), exactly the
k = ceil((1 - s) K) inputs of largest score and zeroes the rest. (A fixed budget per token is a
constraint that a threshold does not have: measured, it loses to the thresholds; docs/RESULTS.md,
"Issue 16: the per-token oracle bound".) Scores (spqt.sparsity.CRITERIA):

* teal: |x_i|
* wina: |x_i| * ||W[:, i]||_2, the column norms of the stored (dequantized) matrix, as the .spqt holds
  them (LoadedModel.ensure_column_norms), for q|k|v and gate|up the stacked matrix.

Scope: "token" (the oracle above: the same k for every token) or "chunk": per chunk and map, the
ceil((1 - s) T K) entries of largest score among all T scored tokens of the chunk, so a token keeps
more or fewer inputs as its scores stand against the chunk's. Chunk scope is a threshold fitted
exactly to the chunk's own (sparse-model) activations: it isolates what calibration on other text
loses, where token scope tests whether a fixed budget per token would do better than a threshold.

Allocation: "uniform" gives every map the level s; "greedy" gives each (layer, map) the level that
greedy calibration allocated it (the model's ``greedy_allocations``), so the oracle row is the
per-token twin of the greedy threshold row, with the same share of each map.

Perplexity is llama.cpp's method through spqt.evaluate.perplexity, as `spqt perplexity` runs it:
the first half of each chunk a dense prefill, the scored half with the masks on. The masks are forward
hooks on each map's ``input_tap`` (the map's actual input, after the fused norm): a hook that
returns a tensor replaces the input the map multiplies, so the runtime stays untouched. They act only
while the map's ``sparse`` switch is on (the scored half), and the maps have no thresholds then, so
each runs its dense product on the masked input. Achieved sparsity is counted from the masks
themselves and checked against the scope's k.

Not part of the runtime (a measurement); the rows of the model's calibrated thresholds (or
`--thresholds`; `--baselines`) run on the
same chunks through the same Generator, so the rows compare on identical tokens. On CUDA every map
runs the torch reference path (dequantized weights, `--dtype`, fp32 by default as the issue-16 table).

    PYTHONPATH=src python scripts/oracle_selection.py --chunks 24 --device cpu --json out.json
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from spqt import sparsity as sp
from spqt.errors import SpqtError
from spqt.evaluate import perplexity
from spqt.generate import Generator, set_thresholds, sparse_linears

DEFAULT_DATA = "/work/shared/data/wikitext-2-raw-v1-test.txt"
ALLOCATIONS = ("uniform", "greedy")
SCOPES = ("token", "chunk")


def keep_count(in_features: int, level: float) -> int:
    """k = ceil((1 - level) K), the inputs a token keeps; rounded to 1e-9 first so that a level whose
    product is a whole number in exact arithmetic (0.5 x 576) does not gain one from float error."""
    return min(in_features, math.ceil(round((1.0 - level) * in_features, 9)))


def topk_keep(x: torch.Tensor, keep: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., K) -> bool (..., K), True at the `keep` largest scores of each row (each token):
    |x| (teal) or |x| * scale (wina, scale (K,) fp32), computed in fp32 as keep_mask does."""
    score = x.float().abs()
    if scale is not None:
        score = score * scale
    if keep >= x.shape[-1]:
        return torch.ones_like(score, dtype=torch.bool)
    idx = score.topk(keep, dim=-1, sorted=False).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


class OracleMasks:
    """Top-k masks on every thresholded map of gen's model while installed (a context manager).

    levels: {(layer, kind): level}; scales: {(layer, kind): (K,) fp32} or None (teal); scope "token"
    (k = keep_count(K, level) per token) or "chunk" (keep_count(T K, level) per sequence of the batch
    over its T tokens). counts[(layer, kind)] = [kept, seen] entries of the masked (scored) tokens,
    expected[(layer, kind)] the entries the scope's k says should have been kept."""

    def __init__(self, model, levels: dict, scales: dict | None = None, scope: str = "token"):
        if scope not in SCOPES:
            raise SpqtError(f"unknown oracle scope {scope!r}; choose one of {', '.join(SCOPES)}")
        self.model, self.levels, self.scales, self.scope = model, levels, scales, scope
        self.counts = {key: [0, 0] for key in levels}
        self.expected = {key: 0 for key in levels}
        self._handles = []

    def __enter__(self):
        for layer, kind, lin in sparse_linears(self.model):
            key = (layer, kind)
            self._handles.append(lin.input_tap.register_forward_hook(self._hook(lin, key)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, lin, key):
        level = self.levels[key]
        scale = None if self.scales is None else self.scales[key]

        def hook(module, inputs, x):
            if not lin.sparse:  # the dense prefill
                return None
            if self.scope == "token":
                keep = keep_count(x.shape[-1], level)
                mask = topk_keep(x, keep, scale)
                self.expected[key] += keep * (x.numel() // x.shape[-1])
            else:  # x (B, T, K): one pool per sequence
                pool = x.reshape(x.shape[0], -1)
                keep = keep_count(pool.shape[-1], level)
                wide = None if scale is None else scale.repeat(pool.shape[-1] // scale.shape[0])
                mask = topk_keep(pool, keep, wide).view(x.shape)
                self.expected[key] += keep * x.shape[0]
            kept = int(mask.sum())
            self.counts[key][0] += kept
            self.counts[key][1] += mask.numel()
            if lin.track:  # achieved_sparsity reads [dropped, seen]; the dense product adds seen
                lin.counts[0] += mask.numel() - kept
            return x * mask

        return hook

    def check(self) -> None:
        """Every mask kept exactly its scope's k (AssertionError otherwise)."""
        for key, (kept, seen) in self.counts.items():
            if kept != self.expected[key]:
                raise AssertionError(f"layers.{key[0]}.{key[1]}: kept {kept} of {seen} inputs, expected {self.expected[key]}")


def map_levels(loaded, level: float, allocation: str, criterion: str) -> dict:
    """{(layer, kind): level}: the level everywhere (uniform), or the greedy calibration's allocation."""
    n = loaded.config.n_layers
    if allocation == "greedy":
        sp.select(loaded.thresholds, level, "greedy", n, criterion)  # SpqtError when absent
        table = sp.levels(loaded.thresholds, level, "greedy", n, criterion)
    else:
        table = torch.full((n, len(sp.INPUT_KINDS)), float(level))
    return {(i, kind): float(table[i, j]) for i in range(n) for j, kind in enumerate(sp.INPUT_KINDS)}


def oracle_perplexity(gen: Generator, tokens: list[int], level: float, criterion: str, allocation: str = "uniform",
                      scope: str = "token", ctx: int = 512, chunks: int | None = None, batch: int = 1,
                      bos_id: int | None = None, progress: bool = False) -> dict:
    """Perplexity with the oracle masks at `level` (see the module docstring)."""
    loaded = gen.loaded
    levels = map_levels(loaded, level, allocation, criterion)
    scales = None
    if criterion == "wina":
        norms = loaded.ensure_column_norms()
        scales = {key: norms[f"layers.{key[0]}.{key[1]}"].to(device=gen.device, dtype=torch.float32) for key in levels}
    gen.set_sparsity(0.0)  # no thresholds: every map runs its dense product (on the masked input)
    set_thresholds(gen.model, None)
    gen.sparsity = level  # perplexity turns the maps' sparse switches on for the scored half
    try:
        with OracleMasks(gen.model, levels, scales, scope) as masks:
            r = perplexity(gen, tokens, ctx, "llamacpp", chunks, batch, bos_id, progress=progress)
    finally:
        gen.set_sparsity(0.0)
    masks.check()
    kept = sum(c[0] for c in masks.counts.values())
    seen = sum(c[1] for c in masks.counts.values())
    return {"ppl": r.ppl, "scored_tokens": r.scored, "chunks": r.chunks, "achieved": r.achieved,
            "achieved_entries": 1 - kept / seen}


def threshold_perplexity(gen: Generator, tokens: list[int], level: float, criterion: str, mode: str,
                         ctx: int = 512, chunks: int | None = None, batch: int = 1, bos_id: int | None = None,
                         progress: bool = False) -> dict:
    """Perplexity with the model's calibrated thresholds, as `spqt perplexity` computes it."""
    gen.set_sparsity(level, mode, criterion=criterion)
    r = perplexity(gen, tokens, ctx, "llamacpp", chunks, batch, bos_id, progress=progress)
    gen.set_sparsity(0.0)
    return {"ppl": r.ppl, "scored_tokens": r.scored, "chunks": r.chunks, "achieved": r.achieved}


def _items(text: str, choices: tuple, what: str) -> list[tuple]:
    """'a:b[:c],...' -> [(a, b[, c])], each part from its tuple of choices (trailing parts optional
    where choices has a default at index 0 of the extra tuples)."""
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) == len(choices) - 1 and len(choices) == 3:
            parts.append(choices[2][0])
        if len(parts) != len(choices) or any(p not in c for p, c in zip(parts, choices)):
            raise SpqtError(f"{what} {item!r}: expected {':'.join('|'.join(c) for c in choices)}")
        out.append(tuple(parts))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help=".spqt file (default: the default model, zigzag Q4_K)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the text (default: WikiText-2 raw test)")
    p.add_argument("--levels", default="0.25,0.4,0.5,0.65")
    p.add_argument("--oracles", default="teal:uniform,wina:uniform",
                   help="criterion:allocation[:scope], comma-separated (allocation uniform or greedy; scope token "
                      "(default) or chunk)")
    p.add_argument("--baselines", default="teal:greedy,wina:greedy",
                   help="criterion:mode threshold rows on the same chunks (empty: none)")
    p.add_argument("--thresholds", help="thresholds JSON from spqt calibrate --json (instead of the model's own)")
    p.add_argument("--chunks", type=int, default=None, help="the first N chunks (default: the whole text)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--batch", type=int, default=0, help="chunks per forward (default 32 on cuda, 1 on cpu)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except SpqtError as e:
        print(f"spqt: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from spqt.checkpoint import atomic_write, load_model
    from spqt.default_model import default_spqt
    from spqt.generate import resolve_device
    from spqt.tokenizer import TextTokenizer

    levels = [sp.check_sparsity(float(s)) for s in args.levels.split(",") if s]
    oracles = _items(args.oracles, (sp.CRITERIA, ALLOCATIONS, SCOPES), "--oracles")
    baselines = _items(args.baselines, (sp.CRITERIA, sp.MODES), "--baselines")
    data = Path(args.data)
    if not data.is_file():
        raise SpqtError(f"no such file: {data}")
    device = resolve_device(args.device)
    model_path = Path(args.model) if args.model else default_spqt()
    loaded = load_model(model_path)
    if args.thresholds:
        try:
            doc = json.loads(Path(args.thresholds).read_text())
            thresholds = doc["thresholds"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SpqtError(f"{args.thresholds}: not a thresholds file written by spqt calibrate --json ({e})") from None
        sp.check_thresholds(thresholds, loaded.config.n_layers, args.thresholds)
        loaded.thresholds = thresholds
    n = loaded.config.n_layers
    for s in levels:  # every asked row must be runnable before hours of computing start
        for criterion, mode in baselines:
            sp.select(loaded.thresholds, s, mode, n, criterion)
        for criterion, allocation, _ in oracles:
            map_levels(loaded, s, allocation, criterion)
    tokens = TextTokenizer(loaded.tokenizer, loaded.config).encode(data.read_text(encoding="utf-8"), add_bos=False)
    bos = loaded.config.bos_id if loaded.config.add_bos else None
    batch = args.batch or (32 if device == "cuda" else 1)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    # the torch reference path on either device (the oracle masks in torch; the rows compare like with like)
    gen = Generator(loaded, device, dtype=dtype, max_len=args.ctx, backend="reference", dense_fallback=False)
    common = dict(ctx=args.ctx, chunks=args.chunks, batch=batch, bos_id=bos, progress=True)

    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        dense = rows[0]["ppl"]
        row["increase"] = row["ppl"] / dense - 1
        a = row.get("achieved", {}).get("all", 0.0)
        print(f"{row['kind']:>12s} {row['criterion']:>6s} {row['mode']:>8s} {100 * row['level']:5.0f}%  ppl {row['ppl']:9.4f}"
              f"  {100 * row['increase']:+7.2f}%  achieved {100 * a:5.2f}%  ({row['seconds']:.0f} s)", flush=True)
        if args.json:
            report = {"model": str(model_path), "kind": loaded.kind, "data": str(data), "method": "llamacpp",
                      "ctx": args.ctx, "chunks": row["chunks"], "device": device, "dtype": args.dtype,
                      "backend": "reference", "batch": batch, "thresholds": args.thresholds, "dense_ppl": dense,
                      "rows": rows}
            atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))

    t0 = time.perf_counter()
    r = threshold_perplexity(gen, tokens, 0.0, sp.DEFAULT_CRITERION, "unified", **common)
    emit({"kind": "dense", "criterion": "-", "mode": "-", "level": 0.0, **r, "seconds": time.perf_counter() - t0})
    for s in levels:
        for criterion, allocation, scope in oracles:
            t0 = time.perf_counter()
            r = oracle_perplexity(gen, tokens, s, criterion, allocation, scope, **common)
            emit({"kind": f"oracle-{scope}", "criterion": criterion, "mode": allocation, "level": s, **r,
                  "seconds": time.perf_counter() - t0})
        for criterion, mode in baselines:
            t0 = time.perf_counter()
            r = threshold_perplexity(gen, tokens, s, criterion, mode, **common)
            emit({"kind": "threshold", "criterion": criterion, "mode": mode, "level": s, **r,
                  "seconds": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
