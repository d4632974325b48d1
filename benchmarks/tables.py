"""Markdown tables from the JSON results in benchmarks/results (used for docs/RESULTS.md).

    python benchmarks/tables.py benchmarks/results
"""

import json
import sys
from pathlib import Path


def perplexity_table(folder: Path) -> str:
    rows = []
    for name, label in (("original", "original weights (GGUF Q4_1, dequantized)"), ("row", "row-Q4_K"),
                        ("zigzag", "zigzag-Q4_K")):
        for mode in ("unified", "greedy"):
            f = folder / f"ppl-{name}-{mode}.json"
            if not f.exists():
                continue
            res = {r["sparsity"]: r for r in json.loads(f.read_text())["results"]}
            cells = []
            for s in (0.0, 0.25, 0.4, 0.5, 0.65):
                r = res.get(s)
                if r is None:
                    cells.append("(dense above)" if s == 0 else "")
                elif s == 0:
                    cells.append(f"{r['ppl']:.3f}")
                else:
                    cells.append(f"{r['ppl']:.3f} ({100 * r['achieved']['all']:.1f} %)")
            rows.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    head = "| weights | mode | 0 % | 25 % | 40 % | 50 % | 65 % |\n|---|---|---|---|---|---|---|\n"
    return head + "\n".join(rows)


def gemv_table(path: Path) -> str:
    rep = json.loads(path.read_text())
    out = [f"{rep['device']}, copy {rep['copy_gbps']:.0f} GB/s (read+write), commit {rep['commit']}, {rep['date']}",
           "", "| shape | MB (Q4_K) | B0 us | B2 us | B2 % copy | B4 25 % | B4 40 % | B4 50 % | B4 65 % | B1 50 % | B3 50 % | fp16 us |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shapes = list(dict.fromkeys(r["shape"] for r in rep["rows"]))
    for sh in shapes:
        rs = [r for r in rep["rows"] if r["shape"] == sh]

        def get(v, s):
            return next((r for r in rs if r["variant"] == v and abs(r["sparsity"] - s) < 1e-9), None)

        b0, b2 = get("B0", 0), get("B2", 0)

        def sp(v, s):
            r = get(v, s)
            return f"{r['us']:.1f} ({r['speedup_vs_B2']:.2f}x)" if r else ""

        out.append(f"| {sh} | {b2['bytes'] / 1e6:.1f} | {b0['us']:.1f} | {b2['us']:.1f} | {100 * b2['frac_copy_bw']:.0f} % | "
                   f"{sp('B4', 0.25)} | {sp('B4', 0.4)} | {sp('B4', 0.5)} | {sp('B4', 0.65)} | {sp('B1', 0.5)} | "
                   f"{sp('B3', 0.5)} | {get('fp16', 0)['us']:.1f} |")
    return "\n".join(out)


def decode_table(folder: Path) -> str:
    out = ["| model | variant | sparsity | ms/token | tokens/s | weight GB/token | GB/s | floor ms | % of floor speed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in ("default", "llama2-7b", "llama3-8b", "llama2-13b", "llama2-70b"):
        f = folder / f"decode-{name}.json"
        if not f.exists():
            continue
        for r in json.loads(f.read_text())["rows"]:
            out.append(f"| {r['model']} | {r['variant']} | {r['sparsity']:.2f} | {r['ms_per_token']:.3f} | "
                       f"{r['tokens_per_s']:.1f} | {r['weight_bytes'] / 1e9:.2f} | {r['gbps']:.0f} | {r['floor_ms']:.3f} | "
                       f"{100 * r['frac_of_floor']:.0f} % |")
    return "\n".join(out)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    print("## Perplexity\n\n" + perplexity_table(folder))
    for gpu in ("h100", "h200"):
        if (folder / f"gemv-{gpu}.json").exists():
            print(f"\n## GEMV ({gpu.upper()})\n\n" + gemv_table(folder / f"gemv-{gpu}.json"))
    print("\n## Decode\n\n" + decode_table(folder))
