"""Activation-sparsity thresholds as data.

Per layer, four thresholded inputs (INPUT_KINDS): the q/k/v input (attention RMSNorm output), the
o input (attention output), the gate/up input (MLP RMSNorm output) and the down input
(SiLU(gate) * up). A threshold t zeroes the entries with |x| <= t.

Stored in .spqt metadata as ``{mode: {level: [[t_qkv, t_o, t_gate_up, t_down] per layer]}}``,
mode "unified" or "greedy", level the target sparsity written as "0.5".
"""

import json
from importlib import resources

import torch

from spqt.errors import SpqtError

INPUT_KINDS = ("qkv", "o", "gate_up", "down")
MODES = ("unified", "greedy")


def level_key(sparsity: float) -> str:
    return f"{float(sparsity):g}"


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= sparsity < 1.0):
        raise SpqtError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def check_thresholds(thresholds, n_layers: int, where: str) -> None:
    """SpqtError unless every mode in thresholds is {level: (n_layers, 4) finite numbers} (read from a
    file; other keys, such as calibrate's records, are not read)."""
    import math

    def bad(why: str):
        raise SpqtError(f"{where}: invalid thresholds ({why})")

    if not isinstance(thresholds, dict):
        bad("not a JSON object")
    for mode in MODES:
        levels = thresholds.get(mode, {})
        if not isinstance(levels, dict):
            bad(f"mode {mode!r} is not a JSON object")
        for key, table in levels.items():
            rows_ok = isinstance(table, list) and len(table) == n_layers and all(
                isinstance(r, list) and len(r) == len(INPUT_KINDS) and
                all(type(t) in (int, float) and math.isfinite(t) for t in r) for r in table)
            if not rows_ok:
                bad(f"{mode} {key} is not {n_layers} rows of {len(INPUT_KINDS)} numbers")


def select(thresholds: dict, sparsity: float, mode: str, n_layers: int) -> torch.Tensor | None:
    """(n_layers, 4) float32 thresholds for a level, None for sparsity 0; SpqtError when absent."""
    check_sparsity(sparsity)
    if sparsity == 0:
        return None
    if mode not in MODES:
        raise SpqtError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(MODES)}")
    levels = thresholds.get(mode, {})
    key = level_key(sparsity)
    if key not in levels:
        have = ", ".join(sorted(levels)) or "none"
        raise SpqtError(f"the model has no {mode} thresholds for sparsity {key} (it has: {have}); run spqt calibrate")
    table = torch.tensor(levels[key], dtype=torch.float32)
    if table.shape != (n_layers, len(INPUT_KINDS)):
        raise SpqtError(f"{mode} thresholds for {key} have shape {tuple(table.shape)}, expected ({n_layers}, 4)")
    return table


def levels(thresholds: dict, sparsity: float, mode: str, n_layers: int) -> torch.Tensor:
    """(n_layers, 4) float32: the sparsity each input's threshold was calibrated for. Unified: the
    level itself; greedy: the allocation calibrate recorded (``greedy_allocations``), else the level."""
    table = torch.full((n_layers, len(INPUT_KINDS)), float(sparsity))
    alloc = thresholds.get("greedy_allocations", {}).get(level_key(sparsity)) if mode == "greedy" else None
    if alloc is not None and len(alloc) == n_layers:
        table = torch.tensor(alloc, dtype=torch.float32)
    return table


def shipped_thresholds(config) -> dict:
    """The thresholds shipped for the default model (computed by calibrate.py on the calibration books)."""
    path = resources.files("spqt").joinpath("data/smollm2-135m-thresholds.json")
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("n_layers") != config.n_layers or data.get("dim") != config.dim:
        return {}
    return data["thresholds"]
