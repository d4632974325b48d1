"""Activation-sparsity thresholds as data, for two selection criteria.

Per layer, four thresholded inputs (INPUT_KINDS): the q/k/v input (attention RMSNorm output), the
o input (attention output), the gate/up input (MLP RMSNorm output) and the down input
(SiLU(gate) * up). Criteria (CRITERIA):

* teal: keep x_i when |x_i| > t (TEAL, Liu et al. 2024).
* wina: keep x_i when |x_i| * c_i > t, c_i = ||W[:, i]||_2 the norm of the column of the stored
  (dequantized) matrix that x_i multiplies; for q|k|v and gate|up the stacked matrix, so one
  index list still serves the fused matrix (WINA, Chen et al. 2025).

Stored in .spqt metadata as::

    {criterion: {mode: {level: [[t_qkv, t_o, t_gate_up, t_down] per layer]}},
     "recommended": {...}}     # written by spqt calibrate, see recommend()

mode "unified", "greedy" or "global" (calibrate.py), level the target sparsity written as "0.5";
greedy and global also store ``{mode}_allocations``, the sparsity of each input per layer. Files
written before criteria existed hold ``{mode: {level: ...}}`` at the top: those are TEAL thresholds.
The column norms live in the .spqt as tensors ``layers.{i}.{kind}.column_norm`` (K,) fp32.
"""

import json
from importlib import resources

import torch

from spqt.errors import SpqtError

INPUT_KINDS = ("qkv", "o", "gate_up", "down")
MODES = ("unified", "greedy", "global")
# spqt calibrate --mode: the modes each choice calibrates, the narrowest first
CALIBRATE_MODES = {"unified": ("unified",), "greedy": ("greedy",), "global": ("global",),
                   "both": ("unified", "greedy"), "all": MODES}
ALLOCATED_MODES = ("greedy", "global")  # modes whose inputs have levels of their own, kept as {mode}_allocations
CRITERIA = ("teal", "wina")
# TEAL stays the default: on the default model (zigzag Q4_K, full WikiText-2 test, H200, docs/RESULTS.md
# issue 16) WINA's column norms did not lower perplexity at equal sparsity (greedy 50 %: TEAL 35.42,
# WINA 35.93; unified 50 %: 40.60 vs 41.22; dense 26.51): SmolLM2's column norms are nearly equal.
DEFAULT_CRITERION = "teal"
# Greedy is the default mode where a model has greedy thresholds: same full test, TEAL, greedy against
# unified at 25 / 40 / 50 %: 27.19 / 29.86 / 35.42 against 27.41 / 31.48 / 40.60 (achieved 24.5 /
# 39.3 / 49.4 % against 24.5 / 39.7 / 50.6 % of the thresholded weights).
DEFAULT_MODE = "greedy"
# The loss a recommended level may cost on held-out calibration text: perplexity at most 5 % above dense.
MAX_LOSS = 0.05


def level_key(sparsity: float) -> str:
    return f"{float(sparsity):g}"


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= sparsity < 1.0):
        raise SpqtError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise SpqtError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return criterion


def by_criterion(thresholds: dict) -> dict:
    """The thresholds in the current layout (a legacy ``{mode: ...}`` dict read as TEAL's)."""
    if any(m in thresholds for m in MODES):
        legacy = {k: v for k, v in thresholds.items() if k not in CRITERIA and k != "recommended"}
        return {**{k: v for k, v in thresholds.items() if k in CRITERIA or k == "recommended"}, "teal": legacy}
    return thresholds


def default_criterion(thresholds: dict) -> str:
    """The criterion the model recommends, else DEFAULT_CRITERION when present, else the one it has."""
    t = by_criterion(thresholds)
    rec = t.get("recommended", {}).get("criterion")
    if rec in t:
        return rec
    if DEFAULT_CRITERION in t or not any(c in t for c in CRITERIA):
        return DEFAULT_CRITERION
    return next(c for c in CRITERIA if c in t)


def check_thresholds(thresholds, n_layers: int, where: str) -> None:
    """SpqtError unless thresholds (read from a file) hold, per criterion, every mode as {level:
    (n_layers, 4) finite numbers} and greedy allocations of the same shape, and a recommendation (when
    present) of the types auto_level reads; the legacy flat layout is read as TEAL's. Other keys, such
    as calibrate's records, are not read."""
    import math

    def bad(why: str):
        raise SpqtError(f"{where}: invalid thresholds ({why})")

    def is_num(v) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    def check_tables(tables, what: str) -> None:
        if not isinstance(tables, dict):
            bad(f"{what} is not a JSON object")
        for key, table in tables.items():
            rows_ok = isinstance(table, list) and len(table) == n_layers and all(
                isinstance(r, list) and len(r) == len(INPUT_KINDS) and all(is_num(t) for t in r) for r in table)
            if not rows_ok:
                bad(f"{what} {key} is not {n_layers} rows of {len(INPUT_KINDS)} numbers")

    if not isinstance(thresholds, dict):
        bad("not a JSON object")
    nested = by_criterion(thresholds)
    for criterion in CRITERIA:
        per_mode = nested.get(criterion, {})
        if not isinstance(per_mode, dict):
            bad(f"criterion {criterion!r} is not a JSON object")
        for mode in MODES:
            check_tables(per_mode.get(mode, {}), f"{criterion} {mode}")
        for mode in ALLOCATED_MODES:
            check_tables(per_mode.get(f"{mode}_allocations", {}), f"{criterion} {mode}_allocations")
    rec = nested.get("recommended")
    if rec is None:
        return
    if not isinstance(rec, dict):
        bad("recommended is not a JSON object")
    if "criterion" not in rec or "mode" not in rec or \
            rec["criterion"] not in (None, *CRITERIA) or rec["mode"] not in (None, *MODES):
        bad("recommended names an unknown criterion or mode")
    if not (is_num(rec.get("sparsity")) and 0 <= rec["sparsity"] < 1):
        bad("recommended sparsity is not a number in [0, 1)")
    for key in ("dense_ppl", "max_loss"):  # what calibrate writes beside the pick, and inspect prints
        if not is_num(rec.get(key)):
            bad(f"recommended {key} is not a number")
    rows = rec.get("held_out", [])
    rows_ok = isinstance(rows, list) and all(
        isinstance(r, dict) and r.get("criterion") in CRITERIA and r.get("mode") in MODES and
        is_num(r.get("sparsity")) and is_num(r.get("ppl")) for r in rows)
    if not rows_ok:
        bad("recommended held_out is not a list of {criterion, mode, sparsity, ppl}")


def select(thresholds: dict, sparsity: float, mode: str, n_layers: int, criterion: str = DEFAULT_CRITERION) -> torch.Tensor | None:
    """(n_layers, 4) float32 thresholds for a level, None for sparsity 0; SpqtError when absent."""
    check_sparsity(sparsity)
    check_criterion(criterion)
    if sparsity == 0:
        return None
    if mode not in MODES:
        raise SpqtError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(MODES)}")
    levels = mode_tables(thresholds, criterion).get(mode, {})
    key = level_key(sparsity)
    if key not in levels:
        raise _missing_level(thresholds, criterion, mode, key)
    table = torch.tensor(levels[key], dtype=torch.float32)
    if table.shape != (n_layers, len(INPUT_KINDS)):
        raise SpqtError(f"{mode} thresholds for {key} have shape {tuple(table.shape)}, expected ({n_layers}, 4)")
    return table


def mode_tables(thresholds: dict | None, criterion: str) -> dict:
    """A criterion's threshold tables by mode ({mode: {level key: (n_layers, 4) nested list}}), without the
    criterion's other entries (greedy_allocations)."""
    return {m: t for m, t in by_criterion(thresholds or {}).get(criterion, {}).items() if m in MODES}


def _missing_level(thresholds: dict, criterion: str, mode: str, key: str) -> SpqtError:
    """The error for a level the model has no thresholds for: the levels it has, the criteria and modes that have
    this one, and the calibrate command that makes it while keeping the criterion's other levels and modes (a
    calibration replaces a criterion's thresholds)."""
    kept = mode_tables(thresholds, criterion)
    have = ", ".join(sorted(kept.get(mode, {}))) or "none"
    others = [f"{c} {m}" for c in CRITERIA for m, table in mode_tables(thresholds, c).items() if key in table]
    wanted = sorted({float(k) for t in kept.values() for k in t} | {float(key)})
    modes = set(kept) | {mode}
    mode_arg = next(name for name, covers in CALIBRATE_MODES.items() if modes <= set(covers))
    return SpqtError(f"the model has no {criterion} {mode} thresholds for sparsity {key} (it has: {have}"
                     + (f"; {' and '.join(others)} {'has' if len(others) == 1 else 'have'} {key}" if others else "")
                     + f"); run spqt calibrate --criterion {criterion} --mode {mode_arg} --sparsity "
                     f"{','.join(level_key(w) for w in wanted)} --data TEXT... on its .spqt (spqt quantize makes one "
                     "from a GGUF or HF model)")


def levels(thresholds: dict, sparsity: float, mode: str, n_layers: int,
           criterion: str = DEFAULT_CRITERION) -> torch.Tensor:
    """(n_layers, 4) float64: the sparsity each input's threshold was calibrated for. Unified: the
    level itself; greedy and global: the allocation calibrate recorded under the criterion
    (``{criterion: {"<mode>_allocations": {level: ...}}}``), else the level. float64, so a level equals the
    crossovers it is compared with (0.65 in float32 is below 0.65: a map with that crossover ran dense at 65 %)."""
    table = torch.full((n_layers, len(INPUT_KINDS)), float(sparsity), dtype=torch.float64)
    per_mode = by_criterion(thresholds).get(criterion, {}) if mode in ALLOCATED_MODES else {}
    alloc = per_mode.get(f"{mode}_allocations", {}).get(level_key(sparsity))
    if alloc is not None and len(alloc) == n_layers:
        table = torch.tensor(alloc, dtype=torch.float64)
    return table


def recommend(rows: list[dict], dense_ppl: float, max_loss: float = MAX_LOSS) -> dict:
    """rows: [{criterion, mode, sparsity, ppl}] measured on held-out text. The highest level whose
    perplexity is within (1 + max_loss) x dense (the lower perplexity among ties); level 0 (dense)
    when none is."""
    ok = [r for r in rows if r["ppl"] <= dense_ppl * (1 + max_loss)]
    if not ok:
        return {"criterion": None, "mode": None, "sparsity": 0.0}
    best = max(ok, key=lambda r: (r["sparsity"], -r["ppl"]))
    return {"criterion": best["criterion"], "mode": best["mode"], "sparsity": best["sparsity"]}


def default_mode(thresholds: dict, criterion: str) -> str:
    """The first of DEFAULT_MODE, unified, global that the model holds thresholds of for the
    criterion (a model calibrated with --mode global alone has only those); unified when none."""
    per_mode = by_criterion(thresholds).get(criterion, {})
    return next((m for m in (DEFAULT_MODE, "unified", "global") if per_mode.get(m)), "unified")


def auto_level(thresholds: dict, criterion: str | None, mode: str | None) -> tuple[str, str, float]:
    """(criterion, mode, sparsity) for ``--sparsity auto``: the calibrated recommendation, restricted
    to the criterion / mode given (None: the recommendation's own); sparsity 0 (dense) for a model
    without one."""
    rec = by_criterion(thresholds).get("recommended")
    if not rec:  # nothing measured: the one level known to keep the text is dense (the caller says so)
        return criterion or default_criterion(thresholds), mode or "unified", 0.0
    if criterion in (None, rec["criterion"]) and mode in (None, rec["mode"]):
        return rec["criterion"] or criterion or DEFAULT_CRITERION, rec["mode"] or mode or "unified", float(rec["sparsity"])
    criterion = criterion or rec["criterion"] or DEFAULT_CRITERION
    mode = mode or rec["mode"] or "unified"
    rows = [r for r in rec.get("held_out", []) if r["criterion"] == criterion and r["mode"] == mode]
    if not rows:
        raise SpqtError(f"the calibration measured no {criterion} {mode} levels; run spqt calibrate --criterion {criterion}")
    pick = recommend(rows, rec["dense_ppl"], rec["max_loss"])
    return criterion, mode, float(pick["sparsity"])


def column_norms(weight) -> torch.Tensor:
    """||W[:, i]||_2 of an (N, K) float tensor or QuantizedWeight (dequantized): (K,) float32,
    summed in float64 so the stored value does not depend on the summation order."""
    w = weight.dequantize() if hasattr(weight, "dequantize") else weight
    return torch.linalg.vector_norm(w.double(), dim=0).float().cpu()


def shipped_thresholds(config) -> dict:
    """The thresholds shipped for the default model (computed by calibrate.py on the calibration books)."""
    path = resources.files("spqt").joinpath("data/smollm2-135m-thresholds.json")
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("n_layers") != config.n_layers or data.get("dim") != config.dim:
        return {}
    return data["thresholds"]
