"""Where does the achieved sparsity of a calibrated level come from? Per layer, the fraction of
weights a level's thresholds skip, measured three ways on the same thresholds:

  calib-dense   dense model on calibration text (the thresholds' own distribution)
  test-dense    dense model on the test text (the text's distribution, no feedback)
  test-sparse   sparse model on the test text (what `spqt perplexity` reports: the upstream
                layers' dropped inputs change what the later layers see)

Each as the weight-weighted fraction (the achieved sparsity of `spqt perplexity`), per layer and
overall, on the second half of each ctx window (llama.cpp's scored half; the first half runs dense).
CPU or CUDA; small by default (a few windows).

  python scripts/sparsity_drift.py --data WIKITEXT --calib BOOK.txt --sparsity 0.5,0.65 [--model M] [--mode unified]
"""

import argparse
import json
from pathlib import Path

import torch

from spqt import sparsity as sp
from spqt.checkpoint import load_model
from spqt.default_model import default_spqt
from spqt.generate import Generator, set_sparse, sparse_linears
from spqt.kernels.reference import keep_mask
from spqt.tokenizer import TextTokenizer


def drop_fractions(gen: Generator, windows: torch.Tensor, sparse: bool) -> tuple[torch.Tensor, float]:
    """((layers,) weight-weighted fraction of inputs at or below the threshold, the same over all
    layers), second half of each window, with the thresholds applied (sparse) or only measured (dense)."""
    model, n_layers = gen.model, gen.loaded.config.n_layers
    sums = torch.zeros(n_layers, 2, dtype=torch.float64)
    state = {"on": False}
    handles = []
    for layer, _, lin in sparse_linears(model):
        def hook(mod, args, layer=layer, lin=lin):
            if state["on"] and lin.threshold is not None:
                x = args[0].reshape(-1, args[0].shape[-1])
                dropped = (~keep_mask(x, lin.threshold, lin.scale)).sum(dtype=torch.float64)
                sums[layer, 0] += float(dropped) * lin.out_features
                sums[layer, 1] += x.numel() * lin.out_features
        handles.append(lin.input_tap.register_forward_pre_hook(hook))
    ctx = windows.shape[1]
    half = ctx // 2
    model.setup_cache(1, ctx, gen.dtype)
    dev = gen.device
    try:
        with torch.inference_mode():
            for row in windows:
                row = row[None].to(dev)
                state["on"] = False
                set_sparse(model, False)
                model(row[:, :half], torch.arange(half, device=dev), kv_len=half)
                state["on"] = True
                set_sparse(model, sparse)
                model(row[:, half:], torch.arange(half, ctx, device=dev), kv_len=ctx)
    finally:
        for h in handles:
            h.remove()
        set_sparse(model, False)
    return sums[:, 0] / sums[:, 1], float(sums[:, 0].sum() / sums[:, 1].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .spqt or GGUF (default: the default model)")
    ap.add_argument("--thresholds", default=None, help="a thresholds JSON (spqt calibrate --json)")
    ap.add_argument("--data", required=True, help="test text (WikiText-2)")
    ap.add_argument("--calib", required=True, help="calibration text")
    ap.add_argument("--sparsity", default="0.5,0.65")
    ap.add_argument("--mode", default="unified")
    ap.add_argument("--criterion", default="teal")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    loaded = load_model(args.model or default_spqt())
    if args.thresholds:
        loaded.thresholds = json.loads(Path(args.thresholds).read_text())["thresholds"]
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    n, ctx = args.windows, args.ctx

    def windows(path: str) -> torch.Tensor:
        ids = tok.encode(Path(path).read_text(encoding="utf-8"), add_bos=False)
        whole = min(n, len(ids) // ctx) * ctx  # whole windows only
        return torch.tensor(ids[:whole], dtype=torch.int64).view(-1, ctx)

    test, calib = windows(args.data), windows(args.calib)
    gen = Generator(loaded, args.device, dtype=torch.float32, max_len=ctx, dense_fallback=False,
                    criterion=args.criterion)
    out = {}
    for s in (float(v) for v in args.sparsity.split(",")):
        gen.set_sparsity(s, args.mode, criterion=args.criterion)
        rows = {"calib-dense": drop_fractions(gen, calib, False), "test-dense": drop_fractions(gen, test, False),
                "test-sparse": drop_fractions(gen, test, True)}
        print(f"\n{args.criterion} {args.mode} {100 * s:.0f} %: weight-weighted fraction skipped, "
              f"{n} windows of {ctx} (second halves)")
        print("layer " + " ".join(f"{name:>12s}" for name in rows))
        for layer in range(loaded.config.n_layers):
            print(f"{layer:5d} " + " ".join(f"{100 * float(r[0][layer]):11.1f}%" for r in rows.values()))
        print("  all " + " ".join(f"{100 * r[1]:11.1f}%" for r in rows.values()))
        out[sp.level_key(s)] = {name: {"per_layer": r[0].tolist(), "all": r[1]} for name, r in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
