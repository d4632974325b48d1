"""Kernel parameters per GPU and shape: the tuned table, its defaults, and the tuner.

The table is JSON, one file per GPU and Triton version (``<gpu>--triton-<ver>.json``). The package ships some in
``tuned/``; ``spqt tune`` writes the user's own outside the package (:func:`user_table_path`: $SPQT_TUNED, else
$XDG_DATA_HOME/spqt/tuned, else ~/.local/share/spqt/tuned), so an upgrade keeps it. Where the user's table holds this
KERNEL_VERSION's entries it replaces the package's for that GPU whole (a tune starts from the table in use, so it
holds the package's entries too); else the package's applies. Keys: variant ("zigzag_dense", "zigzag_sparse",
"row_dense"; TYPE_VARIANTS for the other zigzag types) and the exact shape "NxK". A missing entry falls back to the
tuned entry of the nearest shape with the same K, else to :func:`default_config`; nothing re-tunes silently
(``spqt tune`` does, on request). Besides the kernels' entries, STEP_ROUTES holds the decode step's MODE_KEPT route
per model geometry (model_key; ``spqt tune --routes``); a kernel re-tune drops them (they were timed with the old
entries).
"""

import json
import logging
import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

# a user table that cannot be read: one line on stderr (logging's last resort) unless the application routes logging
log = logging.getLogger(__name__)

VARIANTS = ("zigzag_dense", "zigzag_sparse", "row_dense")
# The other zigzag types: "zigzag_<dense|sparse>_<type>". Where the CUDA GEMV runs the type (zigzag_cuda.kquant_layout),
# `spqt tune --types` times its configs in the type's CUDA layout and writes them with impl "cuda" (as "fallback" the
# Triton type kernel's config as the table had it: its default, untimed, unless a machine without the CUDA GEMV tuned
# it); elsewhere the plain-Triton type kernels' (zigzag_types.py) configs, into a CUDA entry's "fallback".
TYPE_FORMATS = ("q8_0", "q6_k", "q5_k", "q3_k", "q2_k")
TYPE_VARIANTS = tuple(f"zigzag_{kind}_{fmt}" for fmt in TYPE_FORMATS for kind in ("dense", "sparse"))
# The kernels' parameters mean different things after a kernel redesign: a table made for another
# version is not used (a user table's: the package's applies; the package's: defaults) until `spqt tune` writes one.
KERNEL_VERSION = 4  # 4: the tensor-core zigzag kernel (split, num_warps, chunks, ahead), PDL
# Per model geometry (model_key), which sparse maps of a decode step run MODE_KEPT (one launch a map), as
# `spqt tune --routes` measured whole decode steps: {"<model_key>": {"model": what was timed, "levels": {"0.5":
# {"route": one of STEP_ROUTE_NAMES, "tokens_per_s": {route: rate}}}}}. Timing a map alone misjudges MODE_KEPT in
# the step, in both directions (docs/RESULTS.md, sixteenth session), hence whole steps. Route "dense": no sparse
# route's step beat the dense step at that level, so every map runs dense there (no level slower than dense).
STEP_ROUTES = "step_routes"
KEPT_ROUTES = ("off", "norm", "all")  # MODE_KEPT on no sparse map, on the norm-fed ones (q|k|v, gate|up), on all
STEP_DENSE = "dense"  # the step route of a level where sparse steps do not pay: every map runs dense
STEP_ROUTE_NAMES = KEPT_ROUTES + (STEP_DENSE,)


def device_key() -> str:
    import torch
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug}--triton-{triton.__version__}"


def table_path(key: str | None = None) -> Path:
    """This GPU's table shipped in the package (tuned/<key>.json)."""
    return Path(str(resources.files("spqt").joinpath(f"kernels/tuned/{key or device_key()}.json")))


def user_table_path(key: str | None = None) -> Path:
    """This GPU's table of the user's own tuning, what `spqt tune` writes: <folder>/<key>.json, the folder $SPQT_TUNED,
    else $XDG_DATA_HOME/spqt/tuned (an absolute path, as the XDG spec asks), else ~/.local/share/spqt/tuned."""
    folder = os.environ.get("SPQT_TUNED")
    if not folder:
        data = os.environ.get("XDG_DATA_HOME", "")
        home = Path(os.path.expanduser("~"))  # (no HOME and no passwd entry: "~" as it is, never an exception)
        folder = (Path(data) if os.path.isabs(data) else home / ".local" / "share") / "spqt" / "tuned"
    return Path(folder).expanduser() / f"{key or device_key()}.json"


class TableEntries(dict):
    """A GPU's loaded entries {variant: {"NxK": config}} and where they came from: source, {"path", "created"} of the
    table file (its "created" stamp tells a re-tuned table from the one it replaced at the same path), None where no
    table applies (every shape runs its default)."""

    source: dict | None = None


def _read_table(path: Path, strict: bool) -> TableEntries | None:
    """The table file's entries where it holds this KERNEL_VERSION's; None where it is absent or of another version.
    strict: OSError or ValueError where it cannot be read or is not a tuned table (a user table); else only JSON's own
    errors (the shipped table)."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if strict and (not isinstance(doc, dict) or not isinstance(doc.get("entries", {}), dict)):
        raise ValueError("not a JSON object with a dict of entries")
    if doc.get("kernel_version") != KERNEL_VERSION:
        return None
    entries = TableEntries(doc.get("entries", {}))
    entries.source = {"path": str(path), "created": doc.get("created")}
    return entries


@lru_cache(maxsize=None)
def _load_table(key: str) -> TableEntries:
    """This GPU's entries: the user table's where it holds this KERNEL_VERSION's, else the package table's, else none.
    A user table that cannot be read falls back to the package's with one warning line."""
    user = user_table_path(key)
    try:
        entries = _read_table(user, strict=True)
    except (OSError, ValueError) as e:
        log.warning("spqt: warning: %s is not a readable tuned table (%s); the table shipped for this GPU applies, "
                    "if any (spqt tune writes a new one)", user, e)
        entries = None
    if entries is None:
        entries = _read_table(table_path(key), strict=False)
    return entries if entries is not None else TableEntries()


def table_source(key: str | None = None) -> dict | None:
    """Where this GPU's entries come from (_load_table's choice): {"path", "created"} of the user or the package
    table, None where neither applies (every shape runs its default)."""
    return _load_table(key or device_key()).source


def sm_count() -> int:
    import torch

    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


def default_config(variant: str, n: int, k: int) -> dict:
    """A sane starting point: 8 rows per program for row; for zigzag two-warp programs, about 8
    per SM (the best region of the H100 sweep in docs/RESULTS.md), each at least one chunk of
    16 columns per warp."""
    if variant == "row_dense":
        return {"block_n": 8, "num_warps": 2}
    rows = -(-n // 256)
    if variant in TYPE_VARIANTS:
        # one program per 256 outputs (Q8_0: 8 block rows of 32) and about 8 programs per SM, each
        # at least one 16-column step; warps so that a lane decodes one piece a step (16 level bytes:
        # 16 columns x 8 pieces of Q6_K / Q5_K over 4 warps, x 4 of Q3_K / Q2_K over 2; Q8_0 2 pieces
        # a lane, zigzag_types). Not timed on a GPU: a start for the tuner.
        split = max(1, min(-(-8 * sm_count() // rows), -(-k // 16)))
        warps = 2 if variant.endswith(("q3_k", "q2_k")) else 4
        return {"split": split, "num_warps": warps, "block_k": 16} | ({"rows": 8} if variant.endswith("q8_0") else {})
    split = max(1, min(-(-8 * sm_count() // rows), -(-k // 32)))
    return {"split": split, "num_warps": 2, "chunks": 1, "ahead": 0, "acc": 16, "pipe": 0}


def launch_args(cfg: dict) -> dict:
    """The keyword arguments of gemv_zigzag in a zigzag config (the split is the workspace's). "l2first": n > 0
    (CUDA B2) has each warp prefetch its next n chunks into L2 before the PDL wait (zigzag_q4k.cu's L2FIRST);
    "pairs": true (CUDA at acc 8 or 2; zigzag_cuda.pairs_run says which weight types have them at which) multiplies
    tile pairs (its PAIRS)."""
    l2first = cfg.get("l2first", 0)
    if type(l2first) is not int or l2first < 0:
        raise ValueError(f"a tuned entry's l2first must be a chunk count of 0 or more, not {l2first!r}")
    pairs = cfg.get("pairs", False)
    if pairs and (cfg.get("impl") != "cuda" or cfg.get("acc") not in (2, 8)):
        raise ValueError(f"a tuned entry's tile pairs run on the CUDA GEMV at acc 8 or 2, not {cfg}")
    return {"num_warps": cfg["num_warps"], "chunks": cfg["chunks"], "maxnreg": cfg.get("maxnreg", 0),
            "ahead": cfg.get("ahead", 0), "acc": cfg.get("acc", 16), "pipe": cfg.get("pipe", 0),
            "impl": cfg.get("impl", "triton"), "fused": cfg.get("fused", False), "cluster": cfg.get("cluster", False),
            "extra": ((f"-DL2FIRST={l2first}",) if l2first else ()) + (("-DPAIRS=1",) if pairs else ())}


PREFETCH_KEYS = ("l2first", "l2first_step_us")  # an entry's L2 prefetch depth and its timings (spqt tune --l2first)
# the accumulator counts, with or without tile pairs, of the weight types whose pairs the tuner times (bits as
# zigzag_cuda's; Q5_K's and Q6_K's pairs run where an entry asks, and are not timed: cuda_candidates)
PAIRED_ACCS = {4: ((8, True), (2, True), (4, False)), 2: ((8, True), (8, False), (4, False)),
               3: ((8, True), (8, False), (4, False))}
PAIRS_CANDIDATE_BITS = tuple(PAIRED_ACCS)
# an entry's tile pairs and, where whole decode steps judged them (scripts/finish_probe.py), the step's device time
# without / with ("0" / "1") them
PAIRS_KEYS = ("pairs", "pairs_step_us")


def with_pairs(entry: dict, on: bool, step_us: dict | None = None) -> dict:
    """A copy of a config with tile pairs on or off and, where given, the step timings that chose it (spqt tune
    --pairs)."""
    return without_pairs(entry) | ({"pairs": True} if on else {}) | (
        {"pairs_step_us": step_us} if step_us is not None else {})


def without_pairs(entry: dict) -> dict:
    """A copy of a config without tile pairs: what MODE_KEPT runs of a B2 entry (the step routes were timed on it;
    scripts/finish_probe.py judged the 7B's pairs in dense steps alone)."""
    return {key: v for key, v in entry.items() if key not in PAIRS_KEYS}


def without_prefetch(entry: dict) -> dict:
    """A copy of a config without its L2 prefetch depth and timings: what a map elsewhere in a step (a borrowed
    neighbour's entry, another weight type's map) may take from it."""
    return {key: v for key, v in entry.items() if key not in PREFETCH_KEYS}


def with_prefetch(entry: dict, depth: int, step_us: dict | None = None) -> dict:
    """A copy of a config with this L2 prefetch depth (none at 0) and, where given, the step timings that chose it."""
    return without_prefetch(entry) | ({"l2first": depth} if depth else {}) | (
        {"l2first_step_us": step_us} if step_us is not None else {})


def types_launch_args(cfg: dict) -> dict:
    """The keyword arguments of zigzag_types.gemv in a TYPE_VARIANTS config (the split is the workspace's)."""
    return {key: cfg[key] for key in ("num_warps", "block_k", "rows") if key in cfg}


def _nearest_entry(entries: dict, variant: str, n: int, k: int) -> dict | None:
    """The tuned entry of the same K with the closest N, its split scaled to launch about as many
    programs (a shape the table lacks borrows its neighbour's tile and warps), without its L2 prefetch depth (judged
    in the step for the neighbour's place there, spqt tune --l2first)."""
    import math

    same_k = [(int(key.split("x")[0]), e) for key, e in entries.items() if int(key.split("x")[1]) == k]
    if not same_k:
        return None
    n_near, entry = min(same_k, key=lambda item: abs(math.log(item[0] / n)))

    def scaled(cfg: dict) -> dict:
        if variant == "row_dense":
            return dict(cfg)
        split = max(1, min(round(cfg["split"] * -(-n_near // 256) / -(-n // 256)), -(-k // 4)))
        return dict(cfg, split=split)

    entry = without_prefetch(scaled(entry))
    if isinstance(entry.get("fallback"), dict):  # a CUDA entry's Triton config borrows the same way
        entry["fallback"] = scaled(entry["fallback"])
    return entry


def table_entries(variant: str) -> dict:
    """This GPU's tuned entries of one variant ("NxK" -> config with the tuner's "us"), {} if none."""
    return _load_table(device_key()).get(variant, {})


def all_entries() -> dict:
    """Every variant's entries of this GPU's table (a copy to update; a re-tune keeps what it does
    not time), {variant: {"NxK": config}}. Not the step routes (STEP_ROUTES): a kernel re-tune keeps those of the
    models none of whose shapes it changed (cmd_tune)."""
    return {v: dict(table_entries(v)) for v in VARIANTS + TYPE_VARIANTS}


def model_key(config, fmt: str) -> str:
    """A decode step's geometry as the step routes are keyed: weight type, then dim x ffn_dim x heads x KV heads x
    head_dim x layers (the maps' shapes and their count), e.g. "q4_k:4096x11008x32x32x128x32". Not the head or
    the vocabulary, nor the thresholds: a route timed on a synthetic model (its own calibration) is assumed to hold
    for a real model of its geometry."""
    head_dim = config.head_dim or config.dim // config.n_heads
    return (f"{fmt}:{config.dim}x{config.ffn_dim}x{config.n_heads}x{config.n_kv_heads}x{head_dim}"
            f"x{config.n_layers}")


def model_shapes(key: str) -> list[tuple[int, int]]:
    """The (N, K) of the linear maps a model_key's decode step runs (ModelConfig.map_shapes); ValueError where the
    key does not parse."""
    from spqt.config import ModelConfig

    try:
        dim, ffn, heads, kv, head_dim, layers = (int(v) for v in key.split(":", 1)[1].split("x"))
    except IndexError:
        raise ValueError(f"not a model key: {key!r}") from None
    config = ModelConfig(vocab_size=1, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
                         head_dim=head_dim)
    return config.map_shapes()


def _runs(entries: dict, variant: str, n: int, k: int) -> dict | None:
    """The config a map of this shape runs from these entries of a variant, as a step route depends on it: its own,
    else its neighbour's (_nearest_entry), without the tuner's time, the L2 prefetch depth (a dense map's hint,
    which spqt tune --l2first changes keeping the routes), the step timings of its tile pairs (the pairs themselves
    count: spqt tune --pairs keeps the routes, MODE_KEPT runs without them, but a dense map below its crossover runs
    them) or a CUDA entry's Triton fallback (what a machine without the CUDA GEMV runs)."""
    entry = entries.get(f"{n}x{k}") or _nearest_entry(entries, variant, n, k)
    return None if entry is None else {key: v for key, v in without_prefetch(entry).items()
                                       if key not in ("us", "pairs_step_us", "fallback")}


def route_touched(key: str, before: dict, after: dict) -> bool:
    """Whether a re-tune changed what a step route's model (its model_key) runs: for one of its shapes, the dense or
    sparse config (own or borrowed, crossovers included) differs between the tables' entries `before` and `after`
    ({variant: {"NxK": entry}}): Q4_K's variants, and for a key with other types (a type or a mix: "q3_k+q4_k:...")
    also theirs (their maps borrow Q4_K's entries: cuda_type_config); True where the key does not parse."""
    try:
        shapes = model_shapes(key)
    except ValueError:
        return True
    kinds = ("dense", "sparse")
    variants = [f"zigzag_{kind}" for kind in kinds] + [f"zigzag_{kind}_{fmt}" for fmt in key.split(":", 1)[0].split("+")
                                                       if fmt != "q4_k" for kind in kinds]
    return any(_runs(before.get(v, {}), v, n, k) != _runs(after.get(v, {}), v, n, k) for v in variants
               for n, k in shapes)


def measured(variant: str, entry: dict | None) -> bool:
    """Whether a shape's entry of a variant counts as tuned: there is one, and where the tuner measures a crossover
    (Q4_K's zigzag_sparse; another type's sparse entry where the CUDA GEMV runs it, impl "cuda": bench.tune_types)
    it holds it. A table tuned before crossovers were measured lacks them (the H100's of 2026-11-23, until the
    thirty-ninth and fortieth sessions measured them), and those sparse maps then run sparse at every level, faster
    than dense or not (collected_pays)."""
    crossed = variant == "zigzag_sparse" or (variant.startswith("zigzag_sparse_") and entry is not None
                                              and entry.get("impl") == "cuda")
    return entry is not None and (not crossed or "crossover" in entry)


def untuned(plan: dict) -> dict:
    """The part of a tune plan ({(fmt, variants): [(N, K), ...]}, bench.tune_plan) that this GPU's table lacks: the
    shapes of a group with no measured entry of their own in one of its variants (measured: they run a neighbour's or
    Q4_K's config, or sparse with no crossover)."""
    missing = {group: [(n, k) for n, k in shapes
                       if not all(measured(v, table_entries(v).get(f"{n}x{k}")) for v in group[1])]
               for group, shapes in plan.items()}
    return {group: shapes for group, shapes in missing.items() if shapes}


def uncrossed(plan: dict) -> dict:
    """The part of untuned(plan) whose shapes have entries of their own in every variant, a sparse one without its
    crossover."""
    have = {group: [(n, k) for n, k in shapes if all(f"{n}x{k}" in table_entries(v) for v in group[1])]
            for group, shapes in untuned(plan).items()}
    return {group: shapes for group, shapes in have.items() if shapes}


def level_key(level: float) -> str:
    """A sparsity level as the step routes store it (exact: repr of the float)."""
    return repr(float(level))


def decode_route(key: str, level: float) -> str:
    """Which sparse maps run MODE_KEPT in a decode step at this sparsity, for a model of this model_key on this GPU:
    the route `spqt tune --routes` chose at the highest level it timed at or below `level` (STEP_ROUTE_NAMES: "off",
    "norm": the norm-fed q|k|v and gate|up, "all", or "dense": every map dense, the sparse steps were slower); "off"
    where it timed none, or the entry names no route it knows."""
    levels = table_entries(STEP_ROUTES).get(key, {}).get("levels", {})
    below = [lv for lv in levels if float(lv) <= level]
    route = levels[max(below, key=float)].get("route") if below else "off"
    return route if route in STEP_ROUTE_NAMES else "off"


def config(variant: str, n: int, k: int) -> dict:
    """The tuned config of this GPU for the shape, else its nearest tuned neighbour, else the default.
    zigzag_sparse entries may also hold "crossover" and "crossover_fused" (bench.crossover)."""
    if variant not in VARIANTS + TYPE_VARIANTS:
        raise ValueError(f"unknown kernel variant {variant}")
    entries = _load_table(device_key()).get(variant, {})
    entry = entries.get(f"{n}x{k}") or _nearest_entry(entries, variant, n, k)
    if not entry:
        return default_config(variant, n, k)
    cfg = {key: value for key, value in entry.items() if key != "us"}  # "us": the tuner's timing
    if cfg.get("impl") == "cuda" and not _cuda_usable():
        # the CUDA GEMV won here, but this machine cannot run it: the Triton config timed against it
        fallback = cfg.get("fallback") or default_config(variant, n, k)
        return fallback | {key: value for key, value in cfg.items() if key.startswith("crossover")}
    return cfg


def cuda_type_config(kind: str, fmt: str, n: int, k: int) -> dict:
    """The CUDA GEMV's config of a zigzag Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 map (kind "dense" or "sparse"): the type's
    own tuned CUDA entry of the shape ("zigzag_<kind>_<fmt>", impl "cuda"), else Q4_K's entry of the shape (the same
    kernel, tuned there), else the type's CUDA entry of the nearest N with the same K, else Q4_K's config (its
    neighbour or default): an exact shape's tuning is the better guess than a neighbour's of another size. Never an
    L2 prefetch depth ("l2first": judged in Q4_K decode steps, for Q4_K's planes) nor Q4_K's tile pairs ("pairs":
    Q4_K's assembly; a type's own entry keeps its own, Q2_K's, Q3_K's, Q5_K's or Q6_K's)."""
    key, own, q4k = f"{n}x{k}", f"zigzag_{kind}_{fmt}", f"zigzag_{kind}"
    if table_entries(own).get(key, {}).get("impl") != "cuda" and key in table_entries(q4k):
        cfg, borrowed = config(q4k, n, k), True
    else:
        cfg = config(own, n, k)
        cfg, borrowed = (cfg, False) if cfg.get("impl") == "cuda" else (config(q4k, n, k), True)
    dropped = PREFETCH_KEYS + (PAIRS_KEYS if borrowed else ())
    return {key: value for key, value in cfg.items() if key not in dropped}


def cuda_type_candidates(variant: str, n: int, k: int) -> list[dict]:
    """The CUDA GEMV's configs `spqt tune --types` times for a type variant ("zigzag_<kind>_<fmt>") in the type's
    CUDA layout: Q4_K's candidates of the kind with 2-8 warps and plain loads (cuda_variants' sweep), no clusters
    (gemv_zigzag runs the cluster finish for Q4_K only)."""
    from spqt.kernels.gemv import TYPE_BITS

    kind, fmt = variant.split("_")[1], variant.split("_", 2)[2]
    return [c for c in cuda_candidates(f"zigzag_{kind}", n, k, TYPE_BITS[fmt])
            if c["num_warps"] > 1 and c["pipe"] == 0 and not c.get("cluster")]


def _cuda_usable() -> bool:
    from spqt.kernels import zigzag_cuda

    return zigzag_cuda.usable()


def triton_config(variant: str, n: int, k: int) -> dict:
    """The Triton kernel's config of a shape: the tuned entry, or a CUDA entry's fallback."""
    cfg = {key: value for key, value in config(variant, n, k).items() if not key.startswith("crossover")}
    if cfg.get("impl") == "cuda":
        return cfg.get("fallback") or default_config(variant, n, k)
    return cfg


def candidates(variant: str, n: int, k: int) -> list[dict]:
    """The short list `spqt tune` times for one shape."""
    if variant == "row_dense":
        return [{"block_n": b, "num_warps": w} for w in (1, 2, 4) for b in (4 * w, 8 * w)]
    rows = -(-n // 256)
    base = -(-sm_count() // rows)
    if variant in TYPE_VARIANTS:
        splits = sorted({max(1, min(int(base * f), -(-k // 16))) for f in (1, 2, 4, 8, 16)})
        q8 = [{"rows": r} for r in (2, 4, 8)] if variant.endswith("q8_0") else [{}]
        # block_k and warps that give a lane one or two pieces of 16 level bytes a step (zigzag_types:
        # 8 pieces a column of Q6_K / Q5_K, 4 of Q3_K / Q2_K, 2 per block row of Q8_0)
        per_col = 4 if variant.endswith(("q3_k", "q2_k")) else 8
        return [{"split": s, "num_warps": w, "block_k": b} | extra for s in splits for extra in q8
                for b in (8, 16, 32, 64) for w in (1, 2, 4, 8)
                if b * extra.get("rows", per_col // 2) * 2 // (32 * w) in (1, 2)]
    splits = sorted({max(1, min(int(base * f), -(-k // 16))) for f in (1, 2, 4, 6, 8, 12, 16)})
    # 4 warps a program won no shape of either shipped table (KERNEL_VERSION 4); ahead 2 and 3 lost
    # to 1 on the H100 (benchmarks/results/ahead-probe-h100.txt); acc 2 and 4 and pipe 0 and 1 each won
    # some of the 7 shapes of the H200 probe (benchmarks/results/decode-floor/probe-pipe-eb5065c.log)
    triton_configs = [{"split": s, "num_warps": w, "chunks": c, "ahead": a, "acc": acc, "pipe": p}
                      for s in splits for w in (1, 2) for c in (1, 2) for a in (0, 1) for acc in (2, 4, 16)
                      for p in ((0, 1) if c == 1 else (0,))]
    return triton_configs + cuda_candidates(variant, n, k)


def table_and_cuda_candidates(variant: str, n: int, k: int) -> list[dict]:
    """This GPU's Triton config of the shape (tuned, else its neighbour's or the default) and a short list of
    the CUDA GEMV's (splits about 1-12 programs an SM, 2-8 warps, plain loads for B2, finished by the
    reduction kernel or by the GEMV's last program): `spqt tune --cuda-against-table`."""
    short = [c for c in cuda_candidates(variant, n, k) if c["num_warps"] > 1 and c["pipe"] == 0]
    return [triton_config(variant, n, k)] + short


def cuda_candidates(variant: str, n: int, k: int, bits: int = 4) -> list[dict]:
    """The CUDA C++ GEMV's configs (zigzag_cuda.py) for zigzag_dense / zigzag_sparse, where it can run
    (zigzag_cuda.usable); [] elsewhere. bits: the weight type whose occupancy the wave-fitting splits count."""
    if variant not in ("zigzag_dense", "zigzag_sparse") or not _cuda_usable():
        return []
    rows = -(-n // 256)
    base = -(-sm_count() // rows)
    splits = sorted({max(1, min(int(base * f), -(-k // 16))) for f in (1, 2, 3, 4, 6, 8, 12, 16)})
    # fused: the last program of an output tile finishes it (no reduction launch); acc 2: two accumulator
    # tiles a lane (72 registers instead of 125, more warps an SM; H200, 57344x8192 B2 at 88 % of copy
    # against 77 % with 16, 8192x28672 80 against 75 %; a little slower on 4096x4096, cuda-variants-a5374cf)
    configs = [{"impl": "cuda", "split": s, "num_warps": w, "chunks": 1, "pipe": p, "fused": f, "acc": a}
               for s in splits for w in (1, 2, 4, 8) for p in (0, 1) for f in (False, True) for a in (16, 2)]
    # tile pairs (Q4_K) at acc 8 (no selects, 95 registers) and 2 (71), and acc 4 (one select a class of tiles),
    # plain loads only: H200, the GEMV alone at each one's best split x warps, against the 2-accumulator kernel:
    # 57344x8192 67.9 us with pairs at 2 against 71.8, 8192x28672 36.5 against 39.1, 10240x8192 15.8 against 17.3
    # (benchmarks/results/session21/b2-cut-a2c0cfa.log); 12288x4096 10.8 at acc 4 against 11.2 (b2-cut-80d6977.log).
    # Q2_K's and Q3_K's tile pairs at acc 8 (no selects or level permutes: sm_90 B2 loops of 228 and 240 instructions
    # against 235 and 263 with class selects at 8, 262 and 282 at acc 2). Q5_K's and Q6_K's pairs are not candidates
    # (zigzag_cuda.pairs_run has them): on the H100 they left the large maps alone within -0.4 / +0.9 %, and made the
    # 7B's Q5_K step 4.3 % slower on the shipped entries (benchmarks/results/session51)
    configs += [{"impl": "cuda", "split": s, "num_warps": w, "chunks": 1, "pipe": 0, "fused": f, "acc": a}
                | ({"pairs": True} if pairs else {})
                for s in splits for w in (2, 4, 8) for f in (False, True)
                for a, pairs in PAIRED_ACCS.get(bits, ((8, False), (4, False)))]
    configs += _wave_fitting(variant, rows, k, splits, bits)
    # cluster (sm_90): the split programs of an output tile one thread block cluster, finished from their shared
    # memory by its rank 0 (no reduction launch). The tuner times the plain finish, (1, split); a stacked
    # gate|up map runs SwiGLU's (2, split): split <= 4 keeps that within the portable 8 programs (16 are allowed
    # on sm_90 but were not launched at 8 warps / 16 accumulators, one program an SM by registers)
    import torch

    from spqt.kernels import zigzag_cuda

    if zigzag_cuda.clusters_run(torch.device("cuda")):
        configs += [{"impl": "cuda", "split": s, "num_warps": w, "chunks": 1, "pipe": p, "fused": False, "acc": a,
                     "cluster": True}
                    for s in sorted({min(s, 4) for s in splits} | {2, 4}) if s <= -(-k // 16)
                    for w in (2, 4, 8) for p in (0, 1) for a in (16, 2)]
    return configs


def _wave_fitting(variant: str, rows: int, k: int, splits: list[int], bits: int) -> list[dict]:
    """More CUDA candidates: at 2, 4 and 8 warps and 16, 8 (Q4_K, Q2_K, Q3_K: their tile pairs) or 2 accumulators,
    the largest splits whose rows x split programs fill 1, 2 or 3 whole waves of what the GPU holds at once
    (zigzag_cuda.programs_per_sm of the type of `bits`), where the multiples of the SM count above do not already.
    Plain loads, the reduction's finish. (Timed
    on the H200, tenth session: the 70B's 10240x8192 at split 23 against 24, 18.69 against 18.73 us. A share is
    rounded up to 16 columns a warp, so split 24 launches 960 programs of which only 880 hold columns: one wave
    already. Kept as candidates: they cost the tuner a few configs a shape.)"""
    from spqt.kernels import zigzag_cuda

    mode = zigzag_cuda.MODE_DENSE if variant == "zigzag_dense" else zigzag_cuda.MODE_INDEXED
    found = {}  # (split, warps, acc) -> config
    for warps in (2, 4, 8):
        for acc in (16, 8, 2):
            pairs = acc == 8 and bits in PAIRS_CANDIDATE_BITS
            slots = sm_count() * zigzag_cuda.programs_per_sm(warps, mode, acc, bits, pairs=pairs)
            for waves in (1, 2, 3):
                split = min(slots * waves // rows, -(-k // 16))
                if split >= 1 and split not in splits:
                    found[split, warps, acc] = {"impl": "cuda", "split": split, "num_warps": warps, "chunks": 1,
                                                "pipe": 0, "fused": False, "acc": acc} | (
                        {"pairs": True} if pairs else {})
    return list(found.values())


def save_table(entries: dict, key: str | None = None, path: Path | None = None) -> Path:
    """entries written as this GPU's table: to path, else to the user table (user_table_path), its folder made; the
    loaded tables forgotten, so the next read sees it."""
    import datetime

    import torch

    from spqt.checkpoint import atomic_write

    path = path or user_table_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": torch.cuda.get_device_name(), "key": key or device_key(), "kernel_version": KERNEL_VERSION,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "entries": entries}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n"))
    _load_table.cache_clear()
    return path
