"""Issue 15's perplexity table: the default model in every K-quant type and mix, row and zigzag, dense and sparse.

For each type or mix and layout, `spqt quantize` converts the default model's GGUF (kept in --models, reused when
there), `spqt inspect` reads its stored bits per weight, and `spqt perplexity` scores it at each level (llama.cpp's
method, ctx 512) with the same thresholds for every row (--thresholds: the shipped ones, calibrated on zigzag Q4_K).
The GGUF's own weights are the baseline row. With --gptq BOOK..., every type row is converted with `spqt quantize
--gptq` (error-compensated, gptq.py) and named *-gptq, so both kinds of rows can share one --out. Each row's JSON
lands in --out as it finishes (a rerun skips rows whose JSON is there), then the whole table is printed and written
as table.md / table.json.

    python scripts/types_table.py --data ../shared/data/wikitext-2-raw-v1-test.txt --device cuda   # the full test
    python scripts/types_table.py --data ... --device cpu --chunks 60 --out /tmp/types60            # a CPU preview
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from spqt.default_model import default_gguf
from spqt.mixes import MIXES

TYPES = ("q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")
THRESHOLDS = Path(__file__).resolve().parent.parent / "src/spqt/data/smollm2-135m-thresholds.json"


def cli(*args: str) -> str:
    """Run `spqt ARGS`; its stdout and stderr together (raises with them on failure)."""
    done = subprocess.run([sys.executable, "-m", "spqt.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"spqt {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def bits_per_weight(model: Path) -> float:
    """The stored bits per weight of the quantized maps (zero padding included), as `spqt inspect` counts them."""
    found = re.search(r"([\d.]+) bits per weight", cli("inspect", str(model)))
    if not found:
        raise SystemExit(f"spqt inspect {model}: no bits per weight line")
    return float(found.group(1))


def row(args, name: str, layout: str | None) -> dict:
    """One row's results: {'name', 'layout', 'bits', 'results': perplexity's rows}; cached in args.out."""
    label = (f"{name}-{layout}" + ("-gptq" if args.gptq else "")) if layout else name
    saved = args.out / f"{label}.json"
    if saved.exists():
        return json.loads(saved.read_text())
    if layout:
        model = args.models / f"{label}.spqt"
        if not model.exists():
            cli("quantize", str(args.gguf), "-o", str(model), "--type", name, "--layout", layout, "--device",
                args.device, *(["--gptq", *map(str, args.gptq)] if args.gptq else []))
        bits, levels = bits_per_weight(model), args.sparsity
    else:
        model, bits, levels = args.gguf, None, "0"
    scored = args.out / f"{label}.ppl.json"
    cli("perplexity", str(model), "--data", str(args.data), "--device", args.device, "--dtype", "fp32",
        "--sparsity", levels, "--thresholds", str(args.thresholds), "--json", str(scored),
        *(["--chunks", str(args.chunks)] if args.chunks else []))
    entry = {"name": name, "layout": layout, "gptq": bool(args.gptq and layout), "bits": bits,
             "results": json.loads(scored.read_text())["results"]}
    scored.unlink()
    saved.write_text(json.dumps(entry, indent=1))
    print(f"{label}: " + ", ".join(f"{r['sparsity']:g} {r['ppl']:.3f}" for r in entry["results"]), flush=True)
    return entry


def table(rows: list[dict], levels: list[float]) -> str:
    """Markdown: a row a model, its bits, dense perplexity against the baseline's, each level with its achieved."""
    base = next(r["results"][0]["ppl"] for r in rows if r["layout"] is None)
    head = "| weights | layout | bits/w stored | dense | vs GGUF | " + " | ".join(f"{100 * s:g} %" for s in levels if s)
    lines = [head + " |", "|" + "---|" * (5 + sum(1 for s in levels if s))]
    for r in rows:
        by = {x["sparsity"]: x for x in r["results"]}
        dense = by[0.0]["ppl"]
        cells = [r["name"].upper() if r["layout"] else "GGUF Q4_1 (its own weights)",
                 (r["layout"] + (" GPTQ" if r.get("gptq") else "")) if r["layout"] else "-",
                 f"{r['bits']:.3f}" if r["bits"] else "-", f"{dense:.3f}",
                 f"{100 * (dense / base - 1):+.2f} %" if r["layout"] else "-"]
        for s in (s for s in levels if s):
            x = by.get(s)
            cells.append(f"{x['ppl']:.3f} ({100 * x['achieved'].get('all', 0):.1f} %)" if x else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="WikiText-2 raw test")
    ap.add_argument("--gguf", type=Path, default=None, help="the source GGUF (default: the default model's)")
    ap.add_argument("--out", type=Path, default=Path("types-table"), help="folder for the rows' JSON and the table")
    ap.add_argument("--models", type=Path, default=None, help="folder for the converted models (default: --out)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunks", type=int, default=0, help="the first N chunks only (default: the whole test)")
    ap.add_argument("--sparsity", default="0,0.25,0.5")
    # (q5_k_s and q3_k_s are their base type in every layer map: the same weights as q5_k and q3_k)
    ap.add_argument("--types", default=",".join(TYPES + tuple(m for m in MIXES if m not in ("q5_k_s", "q3_k_s"))))
    ap.add_argument("--layouts", default="zigzag,row")
    ap.add_argument("--thresholds", type=Path, default=THRESHOLDS)
    ap.add_argument("--gptq", type=Path, nargs="+", default=None,
                    help="calibration text: every type row converted with spqt quantize --gptq (rows named *-gptq)")
    args = ap.parse_args()
    args.gguf = args.gguf or default_gguf()
    args.models = args.models or args.out
    args.out.mkdir(parents=True, exist_ok=True)
    args.models.mkdir(parents=True, exist_ok=True)
    levels = [float(s) for s in args.sparsity.split(",")]
    rows = [row(args, "gguf", None)]
    for name in args.types.split(","):
        for layout in args.layouts.split(","):
            rows.append(row(args, name, layout))
    text = table(rows, levels)
    scope = f"the first {args.chunks} chunks" if args.chunks else "the whole test"
    sparse = next((x for r in rows for x in r["results"] if x["sparsity"]), None)
    text += (f"\n\nspqt perplexity --device {args.device} --dtype fp32 on {args.data.name}, {scope}"
             + (f"; sparse levels: {sparse['criterion']} {sparse['mode']} thresholds of {args.thresholds.name}, "
                "achieved sparsity in brackets" if sparse else "") + "\n")
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
