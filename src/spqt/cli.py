"""The `spqt` command. Each subcommand is a thin shell over a library function.

Errors a person can fix (bad paths, corrupt files, unsupported models, out-of-range options)
are SpqtError: one line on stderr, exit code 2, no traceback.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from spqt.errors import SpqtError

EXIT_USAGE = 2


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _model_path(arg: str | None) -> Path:
    from spqt.default_model import default_spqt

    return Path(arg) if arg else default_spqt()


# ---------------------------------------------------------------- quantize / inspect


def cmd_quantize(args) -> int:
    from spqt.checkpoint import check_writable, quantize_source, save_spqt
    from spqt.sources import open_source

    out = Path(args.output)
    check_writable(out)
    device = _resolve_device(args.device)
    start = time.perf_counter()
    source = open_source(args.source)
    model = quantize_source(source, args.type, args.layout, device=device, progress=True)
    save_spqt(model, out)
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s on {device}")
    return 0


def cmd_inspect(args) -> int:
    from spqt.checkpoint import QuantizedWeight, load_model

    model = load_model(args.model)
    c = model.config
    print(f"model        {args.model}")
    print(f"kind         {model.kind}")
    print(f"architecture llama-family: {c.n_layers} layers, dim {c.dim}, heads {c.n_heads} (kv {c.n_kv_heads}), "
          f"head_dim {c.head_dim}, ffn {c.ffn_dim}, vocab {c.vocab_size}, context {c.max_seq_len}, "
          f"rope theta {c.rope_theta:g}{' (llama3 scaling)' if c.rope_scaling else ''}, tied head {c.tie_embeddings}")
    quant_bytes = quant_weights = other_bytes = 0
    rows = []
    for name, w in model.weights.items():
        if isinstance(w, QuantizedWeight):
            n, k = w.shape
            quant_bytes += w.nbytes
            quant_weights += n * k
            if name.startswith("layers.0."):
                rows.append((name, f"{w.fmt} {w.layout}", f"{n}x{k}", f"{8 * w.nbytes / (n * k):.2f}"))
        else:
            other_bytes += w.numel() * w.element_size()
            if not name.startswith("layers.") or name.startswith("layers.0."):
                rows.append((name, str(w.dtype).replace("torch.", ""), "x".join(map(str, w.shape)), ""))
    print(f"{'tensor':28s} {'format':16s} {'shape':>12s} {'bits/w':>7s}   (layer 0 shown; all layers alike)")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:16s} {r[2]:>12s} {r[3]:>7s}")
    if quant_weights:
        print(f"quantized    {quant_bytes / 1e6:.2f} MB for {quant_weights / 1e6:.2f} M weights: "
              f"{8 * quant_bytes / quant_weights:.3f} bits per weight (zero padding included)")
    print(f"other        {other_bytes / 1e6:.2f} MB (embedding, head, norms)")
    if model.thresholds:
        for mode, levels in model.thresholds.items():
            print(f"thresholds   {mode}: sparsity {', '.join(sorted(levels))}")
    else:
        print("thresholds   none (run spqt calibrate)")
    if model.provenance:
        print(f"provenance   {json.dumps(model.provenance)}")
    return 0


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise SpqtError(f"unknown device {name!r}; choose cpu, cuda or auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpqtError("--device cuda was asked for, but this machine has no CUDA GPU")
    return name


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from spqt import __version__

    parser = argparse.ArgumentParser(prog="spqt", description="Activation-sparse decoding on K-quantized weights.")
    parser.add_argument("--version", action="version", version=f"spqt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="convert a GGUF file or HF checkpoint folder to a .spqt model")
    p.add_argument("source", help="a .gguf file or a Hugging Face checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="the .spqt file to write")
    p.add_argument("--layout", choices=["zigzag", "row"], default="zigzag")
    p.add_argument("--type", default="q4_k", help="quantization format (q4_k)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present; same bytes)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="describe a model file")
    p.add_argument("model")
    p.set_defaults(func=cmd_inspect)

    # RUNTIME_COMMANDS
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpqtError as e:
        print(f"spqt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("spqt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("spqt: error: out of memory", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
