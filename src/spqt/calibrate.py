"""Calibration of activation-sparsity thresholds (unified and greedy) for a criterion (TEAL's |x|
or WINA's |x| * column norm, sparsity.py), and a recommended level from held-out text.

The dense model runs over calibration text; a histogram of the criterion's score (|x| or
|x| * c) is gathered for every thresholded input (per layer: qkv, o, gate_up, down). Memory: HIST_BINS log-spaced bins of float64 per input,
8,192 x 8 B x 4 inputs x layers (7.9 MB for 30 layers), whatever the token count. A bin spans a
factor 2^(40/8192) = 1.0034 of |x|, so a threshold is exact to 0.34 % of its value; inside a bin
we interpolate in log space.

* unified: the threshold of sparsity s for an input is the s-quantile of its |x|.
* greedy (TEAL's greedyopt.py, checked step by step): inside each block, starting from 0,
  repeatedly raise the sparsity of the input whose raise adds the least error to the block's
  output, each step raising the block's weight-weighted sparsity by STEP, until it reaches each
  target exactly; every block gets the same target, blocks are independent (each sees the dense
  model's block inputs). As in TEAL: an input's share is the number of weights it gates (all its
  entries: rows x K of the matrices it feeds; TEAL's weight_dict), its step is STEP / share,
  the error is measured on the last quarter of each window's positions (tokens with a long
  context, like decode steps; TEAL's last_fraction 0.25), all positions thresholded. Where we
  differ by design: q/k/v share one input and gate/up one (one index list per fused matrix),
  where TEAL thresholds q, k, v (and gate, up) separately; and the error is the mean squared
  error (TEAL: the mean over channels of the norm over positions).

* global: the block levels themselves chosen per block, to meet the model's level at the least
  estimated loss (TEAL gives every block the same level). Each block's cost of running at block
  level l (its greedy thresholds of l) is the rise of the calibration text's mean NLL when that
  block alone runs sparse (block_sensitivities: one pass per block and grid level, from cached
  dense block inputs); the blocks' levels on a GLOBAL_STEP grid, averaging exactly the target,
  minimize the summed costs (allocate, a knapsack over the grid). Costs are taken as additive.

Held-out check: the last `held_out_tokens` of the calibration text are kept out of the
histograms and the greedy search; perplexity on them (llama.cpp's way, evaluate.py) is measured
dense and at every level, and sparsity.recommend picks the highest level within MAX_LOSS.

Everything runs in a fixed order on fixed data: the same text gives the same thresholds.
"""

import torch

from spqt import sparsity as sp
from spqt.checkpoint import LoadedModel
from spqt.errors import SpqtError
from spqt.generate import Generator, set_scales, set_sparse, sparse_linears
from spqt.model import layer_masks

HIST_BINS = 8192
LOG2_LO, LOG2_HI = -30.0, 10.0  # |x| from 2^-30 to 2^10; smaller values count as 2^-30
# Weight-weighted block sparsity added per greedy step. TEAL steps 0.05 / (sum of its weights) =
# 0.004 (Llama-3-8B); 0.0125 keeps a calibration of the default model on a 2-core CPU within
# minutes (each step runs 4 block forwards).
STEP = 0.0125
ERROR_FRACTION = 0.25  # greedy error on the last quarter of each window's positions (TEAL's last_fraction)
# global: the block levels chosen among 0, GLOBAL_STEP, ..., GLOBAL_MAX (the greedy thresholds of each);
# a target that is a multiple of GLOBAL_STEP / n_layers is met exactly (25, 40, 50, 65 % with 30 layers)
GLOBAL_STEP = 0.05
GLOBAL_MAX = 0.8


class MagnitudeHistogram:
    """Histogram of |x| over log2-spaced bins, for quantiles."""

    def __init__(self, device):
        self.counts = torch.zeros(HIST_BINS + 1, dtype=torch.float64, device=device)  # last: exact zeros

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        zero = a == 0
        pos = (torch.log2(a.clamp_min(2.0**LOG2_LO)) - LOG2_LO) / (LOG2_HI - LOG2_LO) * HIST_BINS
        b = pos.floor().clamp(0, HIST_BINS - 1).long()
        b = torch.where(zero, torch.full_like(b, HIST_BINS), b)
        self.counts += torch.bincount(b, minlength=HIST_BINS + 1).double()

    def quantile(self, s: float) -> float:
        """The threshold t with a fraction s of |x| <= t."""
        if s <= 0:
            return -1.0
        counts = self.counts.cpu()
        total = float(counts.sum())
        zeros = float(counts[HIST_BINS])
        want = s * total
        if want <= zeros:
            return 0.0
        cum = torch.cumsum(counts[:HIST_BINS], 0) + zeros
        i = int(torch.searchsorted(cum, torch.tensor(want, dtype=torch.float64)))
        i = min(i, HIST_BINS - 1)
        before = float(cum[i - 1]) if i > 0 else zeros
        frac = (want - before) / max(float(counts[i]), 1e-30)
        log2 = LOG2_LO + (i + min(max(frac, 0.0), 1.0)) * (LOG2_HI - LOG2_LO) / HIST_BINS
        return 2.0**log2


def token_windows(tokens: list[int], ctx: int, limit: int) -> torch.Tensor:
    """(count, ctx) int64: the first `limit` tokens (at least one window) in whole windows of ctx."""
    n = min(len(tokens) // ctx, max(1, limit // ctx))
    if n == 0:
        raise SpqtError(f"calibration text has {len(tokens)} tokens, fewer than one window of {ctx}")
    return torch.tensor(tokens[: n * ctx], dtype=torch.int64).view(n, ctx)


def _score(lin, x: torch.Tensor) -> torch.Tensor:
    """The criterion's score of x, the quantity compared with the threshold (keep_mask)."""
    a = x.float().abs()
    return a if lin.scale is None else a * lin.scale


@torch.inference_mode()
def gather_histograms(model, windows: torch.Tensor, device: str, progress: bool = False) -> dict:
    """(layer, kind) -> MagnitudeHistogram of the criterion's score of the inputs of that linear map
    (|x|, or |x| * c when the model's linear maps carry WINA scales), dense model."""
    from tqdm.auto import tqdm

    hists, handles = {}, []
    for layer, kind, lin in sparse_linears(model):
        h = MagnitudeHistogram(device)
        hists[(layer, kind)] = h
        # on the tap: the map's actual input (after the norm), scored with the map's own scale
        handles.append(lin.input_tap.register_forward_pre_hook(
            lambda mod, args, h=h, lin=lin: h.add(_score(lin, args[0]))))
    set_sparse(model, False)
    ctx = windows.shape[1]
    model.setup_cache(1, ctx, model.tok_embeddings.weight.dtype)
    try:
        for row in tqdm(windows, desc="calibration pass", unit="window", disable=not progress):
            model(row[None].to(device), torch.arange(ctx, device=device), kv_len=ctx)
    finally:
        for handle in handles:
            handle.remove()
    return hists


def unified_thresholds(hists: dict, n_layers: int, levels) -> dict:
    return {sp.level_key(s): [[hists[(i, k)].quantile(s) for k in sp.INPUT_KINDS] for i in range(n_layers)]
            for s in levels}


def _input_sizes(config) -> list[int]:
    """Weights gated by all entries of each input (rows x inputs of the matrices that consume it):
    a block's sparsity counts skipped weights, as TEAL's weight_dict does. (Before issue 16 this
    counted rows only, which under-weighted down, K = ffn_dim, by ffn_dim / dim = 2.7x.)"""
    c = config
    return [(c.q_dim + 2 * c.kv_dim) * c.dim, c.dim * c.q_dim, 2 * c.ffn_dim * c.dim, c.dim * c.ffn_dim]


def _block_linears(block) -> list:
    """A block's thresholded maps in sparsity.INPUT_KINDS order."""
    return [block.attention.qkv, block.attention.o, block.feed_forward.gate_up, block.feed_forward.down]


def _dense_block_inputs(model, tokens: torch.Tensor, device: str) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The dense model's forward over tokens (B, T) on the device: (the input of every block,
    positions (T,), every layer's mask (T, T) bool for running blocks on them: causal, a sliding layer's windowed
    too, model.layer_masks). The KV cache is set up for (B, T); the caller restores it."""
    batch, ctx = tokens.shape
    inputs = []
    handles = [b.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone())) for b in model.layers]
    set_sparse(model, False)
    model.setup_cache(batch, ctx, model.tok_embeddings.weight.dtype)
    positions = torch.arange(ctx, device=device)
    try:
        model(tokens, positions, kv_len=ctx)
    finally:
        for h in handles:
            h.remove()
    return inputs, positions, layer_masks(model.config, positions[None, :] <= positions[:, None], positions)


@torch.inference_mode()
def greedy_thresholds(model, hists: dict, windows: torch.Tensor, levels, device: str, progress: bool = False,
                      step_size: float = STEP) -> dict:
    """TEAL's greedy allocation per block, on cached block inputs of `windows` (dense)."""
    from tqdm.auto import tqdm

    config = model.config
    levels = sorted(levels)
    sizes = torch.tensor(_input_sizes(config), dtype=torch.float64)
    share = sizes / sizes.sum()
    ctx = windows.shape[1]
    inputs, positions, masks = _dense_block_inputs(model, windows.to(device), device)
    scored = slice(int(ctx * (1 - ERROR_FRACTION)), ctx)
    result = {sp.level_key(s): [] for s in levels}
    for i, block in enumerate(tqdm(model.layers, desc="greedy allocation", unit="block", disable=not progress)):
        x = inputs[i]
        linears = _block_linears(block)

        def block_error(s_vec) -> float:
            for lin, kind, s in zip(linears, sp.INPUT_KINDS, s_vec):
                lin.set_threshold(hists[(i, kind)].quantile(float(s)) if s > 0 else None)
            set_sparse(model, False)
            for lin in linears:
                lin.sparse = True
            y = block(x, model.rope_for(i), positions, masks[i])
            for lin in linears:
                lin.sparse = False
            return float((y[:, scored].float() - dense).pow(2).mean())

        set_sparse(model, False)
        dense = block(x, model.rope_for(i), positions, masks[i])[:, scored].float()
        s_vec = torch.zeros(4, dtype=torch.float64)
        targets = list(levels)
        while targets:
            current = float((s_vec * share).sum())
            step = min(step_size, targets[0] - current)
            best = None
            for j in range(4):
                trial = s_vec.clone()
                trial[j] = trial[j] + step / float(share[j])
                if trial[j] > 0.99:
                    continue
                err = block_error(trial)
                if best is None or err < best[0]:
                    best = (err, trial)
            if best is None:
                raise SpqtError(f"greedy calibration cannot reach sparsity {targets[0]} in block {i}")
            s_vec = best[1]
            if abs(float((s_vec * share).sum()) - targets[0]) < 1e-9:
                key = sp.level_key(targets.pop(0))
                result[key].append([hists[(i, k)].quantile(float(s)) if s > 0 else -1.0
                                    for k, s in zip(sp.INPUT_KINDS, s_vec)])
                result.setdefault("_allocations", {}).setdefault(key, []).append([float(v) for v in s_vec])
        for lin in linears:
            lin.set_threshold(None)
    model.setup_cache(1, ctx, model.tok_embeddings.weight.dtype)
    return result


def global_grid(step: float = GLOBAL_STEP, top: float = GLOBAL_MAX) -> list[float]:
    """The block levels global allocation chooses among, besides 0 (dense)."""
    return [round(i * step, 6) for i in range(1, int(round(top / step)) + 1)]


@torch.inference_mode()
def block_sensitivities(model, block_tables: list, windows: torch.Tensor, device: str,
                        progress: bool = False) -> torch.Tensor:
    """(n_layers, 1 + len(block_tables)) the rise of the mean NLL of the second half of each window
    when block b alone runs sparse with block_tables[g][b] (its 4 thresholds; column 0: dense, 0),
    made non-decreasing along g. Dense block inputs are computed once; a pass runs blocks b.. only."""
    from tqdm.auto import tqdm

    ctx = windows.shape[1]
    half = ctx // 2
    tokens = windows.to(device)
    targets = tokens[:, half + 1 :].reshape(-1)
    inputs, positions, masks = _dense_block_inputs(model, tokens, device)

    def nll_from(b: int, x: torch.Tensor) -> float:
        for i in range(b, len(model.layers)):
            x = model.layers[i](x, model.rope_for(i), positions, masks[i])
        logits = model.logits(x[:, half:-1])
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets))

    dense = nll_from(0, inputs[0])  # the same path as the sparse passes: their differences are the costs
    costs = torch.zeros(len(model.layers), 1 + len(block_tables), dtype=torch.float64)
    for b, block in enumerate(tqdm(model.layers, desc="block sensitivity", unit="block", disable=not progress)):
        linears = _block_linears(block)
        for g, table in enumerate(block_tables):
            for lin, t in zip(linears, table[b]):
                lin.set_threshold(t if t >= 0 else None)
                lin.sparse = True
            costs[b, g + 1] = nll_from(b, inputs[b]) - dense
            for lin in linears:
                lin.sparse = False
                lin.set_threshold(None)
    model.setup_cache(1, ctx, model.tok_embeddings.weight.dtype)
    return torch.cummax(costs.clamp_min(0.0), dim=1).values


def allocate(costs: torch.Tensor, target: float, step: float = GLOBAL_STEP) -> list[int]:
    """costs (n_blocks, n_levels): the cost of block b at level g step. The level index of each block
    whose mean level is the target (rounded to the nearest step / n_blocks) at the least summed cost
    (an exact knapsack over the grid: blocks x total steps x levels)."""
    n, n_levels = costs.shape
    total = int(round(target * n / step))
    if not 0 <= total <= n * (n_levels - 1):
        raise SpqtError(f"global allocation cannot reach sparsity {target} with block levels up to "
                        f"{(n_levels - 1) * step:g}")
    c = costs.tolist()
    inf = float("inf")
    best = [0.0] + [inf] * total  # best[u]: least cost of the blocks so far with u steps in all
    choice = []
    for b in range(n):
        new, pick = [inf] * (total + 1), [0] * (total + 1)
        for u in range(total + 1):
            for g in range(min(n_levels - 1, u) + 1):
                v = best[u - g] + c[b][g]
                if v < new[u]:
                    new[u], pick[u] = v, g
        best = new
        choice.append(pick)
    levels, u = [0] * n, total
    for b in reversed(range(n)):
        levels[b] = choice[b][u]
        u -= levels[b]
    return levels


def global_thresholds(model, windows: torch.Tensor, greedy: dict, allocations: dict, levels, device: str,
                      progress: bool = False) -> tuple[dict, dict, dict]:
    """Global allocation on top of greedy's per-block thresholds at the grid levels (greedy and
    allocations as greedy_thresholds returns them, keyed by level). Returns the thresholds and the
    per-input allocations per target level, and the record (block levels, costs)."""
    grid = global_grid()
    n_layers = len(model.layers)
    tables = [greedy[sp.level_key(g)] for g in grid]
    costs = block_sensitivities(model, tables, windows, device, progress)
    thresholds, allocs, record = {}, {}, {"grid_step": GLOBAL_STEP, "nll_rise": costs.tolist(), "block_levels": {}}
    for s in levels:
        pick = allocate(costs, s)
        key = sp.level_key(s)
        thresholds[key] = [[-1.0] * 4 if g == 0 else greedy[sp.level_key(grid[g - 1])][b] for b, g in enumerate(pick)]
        allocs[key] = [[0.0] * 4 if g == 0 else allocations[sp.level_key(grid[g - 1])][b] for b, g in enumerate(pick)]
        record["block_levels"][key] = [0.0 if g == 0 else grid[g - 1] for g in pick]
        # the mean reached: the target rounded to the grid (GLOBAL_STEP / n_layers)
        record.setdefault("mean_level", {})[key] = sum(record["block_levels"][key]) / n_layers
    assert all(len(t) == n_layers for t in thresholds.values())
    return thresholds, allocs, record


def check_levels(levels, modes) -> None:
    """SpqtError unless every level is in (0, 1) and every mode is known and reaches its levels (global: up to
    GLOBAL_MAX); the CLI calls it before it loads the model."""
    for s in levels:
        if not 0 < s < 1:
            raise SpqtError(f"calibration levels must be in (0, 1), got {s}")
    for m in modes:
        if m not in sp.MODES:
            raise SpqtError(f"unknown mode {m!r}; choose one of {', '.join(sp.MODES)}")
    if "global" in modes and max(levels) > GLOBAL_MAX:
        raise SpqtError(f"--mode global allocates block levels up to {GLOBAL_MAX:g}: it cannot reach sparsity "
                        f"{max(levels):g}")


def check_text(loaded: LoadedModel, tokens: list[int], held_out_tokens: int, ctx: int = 512) -> int:
    """The calibration's window: ctx, or the whole context of a shorter model (as --gptq's); SpqtError where the
    text holds too few tokens for the held-out tokens and one window. The CLI calls it before its note."""
    ctx = min(ctx, loaded.config.max_seq_len)
    if len(tokens) < held_out_tokens + ctx:
        held_out = f"{held_out_tokens} held-out tokens and " if held_out_tokens else ""
        raise SpqtError(f"calibration text has {len(tokens)} tokens: too few for {held_out}one window of {ctx}")
    return ctx


def calibrate(loaded: LoadedModel, tokens: list[int], levels, modes=("unified", "greedy"), device: str = "cpu",
              max_tokens: int = 65536, greedy_tokens: int = 2048, ctx: int = 512, progress: bool = False,
              criterion: str = sp.DEFAULT_CRITERION, held_out_tokens: int = 8192, step: float = STEP,
              sensitivity_tokens: int = 4096) -> dict:
    """Thresholds {criterion: {mode: {level: [[t_qkv, t_o, t_gate_up, t_down] per layer]},
    "greedy_allocations" / "global_allocations": {level: per-input sparsities per layer}},
    "_calibration": {...},
    "recommended": {...}} (sparsity.py's layout). The model runs dense, in float32.

    tokens: the calibration text; its last held_out_tokens are kept out of the thresholds and
    scored (perplexity, dense and per level) for the recommendation; 0 skips that."""
    sp.check_criterion(criterion)
    check_levels(levels, modes)
    ctx = check_text(loaded, tokens, held_out_tokens, ctx)
    fit, held_out = (tokens[:-held_out_tokens], tokens[-held_out_tokens:]) if held_out_tokens else (tokens, [])
    gen = Generator(loaded, device, torch.float32, max_len=ctx, backend="reference", criterion=criterion)
    model = gen.model
    set_scales(model, loaded.ensure_column_norms() if criterion == "wina" else None)
    windows = token_windows(fit, ctx, max_tokens)
    hists = gather_histograms(model, windows, device, progress)
    out = {}
    if "unified" in modes:
        out["unified"] = unified_thresholds(hists, loaded.config.n_layers, levels)
    records = {}
    if "greedy" in modes or "global" in modes:
        wanted = sorted(set(levels) | (set(global_grid()) if "global" in modes else set()))
        g = greedy_thresholds(model, hists, windows[: max(1, greedy_tokens // ctx)], wanted, device, progress, step)
        allocations = g.pop("_allocations", {})
        if "greedy" in modes:
            out["greedy_allocations"] = {sp.level_key(s): allocations[sp.level_key(s)] for s in levels}
            out["greedy"] = {sp.level_key(s): g[sp.level_key(s)] for s in levels}
        if "global" in modes:
            sens = windows[: max(1, sensitivity_tokens // ctx)]
            out["global"], out["global_allocations"], records["global"] = global_thresholds(
                model, sens, g, allocations, levels, device, progress)
            records["global"]["tokens"] = int(sens.numel())
    result = {criterion: out,
              "_calibration": {"tokens": int(windows.numel()), "greedy_tokens": int(min(windows.shape[0], max(1, greedy_tokens // ctx)) * ctx),
                               "ctx": ctx, "hist_bins": HIST_BINS, "step": step, "error_fraction": ERROR_FRACTION,
                               **records}}
    if held_out:
        result["recommended"] = _held_out_check(gen, out, held_out, levels, modes, criterion, ctx, progress)
    return result


def _held_out_check(gen: Generator, thresholds: dict, held_out: list[int], levels, modes, criterion: str, ctx: int,
                    progress: bool) -> dict:
    """Perplexity on held-out calibration text (llama.cpp's way: dense first half of each window,
    the scored second half thresholded), dense and per (mode, level); the recommendation."""
    import hashlib

    from spqt.evaluate import perplexities

    bos = gen.loaded.config.bos_id if gen.loaded.config.add_bos else None
    ctx = min(ctx, len(held_out))

    def setting(mode: str, s: float):
        table = torch.tensor(thresholds[mode][sp.level_key(s)], dtype=torch.float32)
        return lambda: gen.set_sparsity(s, mode, table=table, criterion=criterion)

    # dense and every (mode, level) in one pass: each window's dense first half prefilled once
    cases = [(mode, s) for mode in modes for s in levels]
    settings = [lambda: gen.set_sparsity(0.0, criterion=criterion)] + [setting(mode, s) for mode, s in cases]
    results = perplexities(gen, held_out, settings, ctx=ctx, bos_id=bos, progress=progress)
    dense = results[0].ppl
    rows = [{"criterion": criterion, "mode": mode, "sparsity": float(s), "ppl": r.ppl,
             "achieved": r.achieved.get("all", 0.0)} for (mode, s), r in zip(cases, results[1:])]
    gen.set_sparsity(0.0, criterion=criterion)
    digest = hashlib.sha256(torch.tensor(held_out, dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {**sp.recommend(rows, dense), "max_loss": sp.MAX_LOSS, "dense_ppl": dense, "held_out_tokens": len(held_out),
            "held_out_sha256": digest, "ctx": ctx, "held_out": rows}


def merge(existing: dict, new: dict) -> dict:
    """Thresholds of a new calibration merged into a model's: the new criterion replaces its old
    entry, and the recommendation spans every criterion measured on the same held-out tokens."""
    out = dict(sp.by_criterion(existing))
    old_rec = out.get("recommended")
    out.update(new)
    rec = new.get("recommended")
    crits = {c for c in new if c in sp.CRITERIA}
    if rec and old_rec and old_rec.get("held_out_sha256") == rec["held_out_sha256"] and old_rec.get("ctx") == rec["ctx"]:
        rows = [r for r in old_rec["held_out"] if r["criterion"] not in crits] + rec["held_out"]
        out["recommended"] = {**rec, **sp.recommend(rows, rec["dense_ppl"], rec["max_loss"]), "held_out": rows}
    elif not rec and old_rec:  # the replaced criterion's measurements no longer describe its thresholds
        rows = [r for r in old_rec.get("held_out", []) if r["criterion"] not in crits]
        out["recommended"] = {**old_rec, **sp.recommend(rows, old_rec["dense_ppl"], old_rec["max_loss"]), "held_out": rows}
    return out
