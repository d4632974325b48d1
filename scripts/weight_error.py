"""Weight error of quantized .spqt files against their float source, per fused linear map.

For every .spqt given, every fused map (q|k|v, o, gate|up, down of every layer) is dequantized and
compared with the source's float weights (a GGUF's own values, dequantized). Prints the RMSE per
map kind over all layers, the RMSE of all maps together, and each file's RMSE as a share of the
first file's (so the first file is the baseline):

    python scripts/weight_error.py a.spqt b.spqt [--source model.gguf] [--per-layer]
"""

import argparse
import math

import torch

from spqt.checkpoint import LINEAR_GROUPS, QuantizedWeight, load_spqt
from spqt.default_model import default_gguf
from spqt.sources import open_source


def squared_errors(source, path: str) -> dict[str, tuple[float, int]]:
    """fused map name -> (sum of squared errors (float64), number of weights)."""
    model = load_spqt(path)
    out = {}
    for name, w in model.weights.items():
        if not isinstance(w, QuantizedWeight) or not name.startswith("layers."):  # the layers' maps, not the head
            continue
        layer, group = name.split(".")[1], name.split(".")[2]
        ref = torch.cat([source.tensor(f"layers.{layer}.{m}") for m in LINEAR_GROUPS[group]], dim=0).double()
        out[name] = (float(((w.dequantize().double() - ref) ** 2).sum()), ref.numel())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help=".spqt files; the first is the baseline")
    parser.add_argument("--source", default=None, help="the float source (default: the default model's GGUF)")
    parser.add_argument("--per-layer", action="store_true", help="also print every map's RMSE")
    args = parser.parse_args()
    source = open_source(args.source or default_gguf())
    errors = [squared_errors(source, f) for f in args.files]
    names = list(errors[0])
    kinds = list(LINEAR_GROUPS) + ["all"]

    def rmse(err: dict, kind: str) -> float:
        picked = [v for n, v in err.items() if kind == "all" or n.endswith("." + kind)]
        return math.sqrt(sum(s for s, _ in picked) / sum(c for _, c in picked))

    print(f"{'file':60s} " + " ".join(f"{k:>19s}" for k in kinds) + "   (RMSE; in brackets: share of the first file's)")
    for path, err in zip(args.files, errors):
        cells = [f"{rmse(err, k):.4e} ({rmse(err, k) / rmse(errors[0], k):.4f})" for k in kinds]
        print(f"{path:60s} " + " ".join(cells))
    if args.per_layer:
        for name in names:
            print(f"{name:24s} " + " ".join(f"{math.sqrt(e[name][0] / e[name][1]):.4e}" for e in errors))


if __name__ == "__main__":
    main()
