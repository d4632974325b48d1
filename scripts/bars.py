"""Issues 14 and 15's speed bars judged from benchmark JSON: which bars the files hold a figure for, met or missed.

Reads `spqt bench decode --json` files (benchmark "decode": rows of model, sparsity, tokens_per_s, frac_of_floor) and
`spqt bench gemv --json` files (benchmark "gemv": rows of shape, type, variant, sparsity, bytes, frac_copy_bw,
speedup_vs_B2, each B4 row's speedup against the same run's dense B2 of its shape and type). Prints one Markdown
row a bar and figure: the bar, the figure, met / missed, the file it came from. A bar with no figure in the files is
not printed (say so where it matters). Exit status 0 whatever the verdicts: a report, not a test.

Size classes, as the issues give them: issue 14's "shapes of 25 MB or more" count a shape's Q4_K bytes; issue 15's
"132 MB shapes" are the shapes 132 MB in Q4_K (28672x8192 and 8192x28672), its 1.6x bar applies to the shapes
whose bytes in the row's own type are 25 MB or more.

    python scripts/bars.py out/bars-*.json
"""

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

MB = 1e6
LARGE_MB = 25.0
COPY_SHAPES = ("28672x8192", "8192x28672")  # 132 MB in Q4_K
B4_LARGE = {0.25: 1.28, 0.4: 1.55, 0.5: 1.8}  # issue 14, shapes >= 25 MB (Q4_K bytes)
B4_SMALL = {0.25: 1.1, 0.4: 1.25, 0.5: 1.4}
Q4K_BYTES_PER_WEIGHT = 144 / 256


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _copy_bar(typ: str, shape: str) -> tuple[str, float]:
    """B2's share-of-copy bar of a type on a 132 MB shape: its name and the share it needs."""
    need = 0.85 if typ == "q4_k" else 0.75
    return f"{typ} B2 >= {100 * need:.0f} % of copy, {shape}", need


def _b4_bar(typ: str, sparsity: float, need: float, shape: str, size: str) -> str:
    """The name of a B4-over-B2 bar."""
    return f"{typ} B4 / B2 at {100 * sparsity:g} % >= {need}x, {shape} ({size})"


def decode_bars(rows: list[dict], source: str) -> list[tuple[str, str, str, str]]:
    """Issue 14's decode bars from bench decode rows (Q4_K zigzag, any process): 7B dense >= 600 tok/s, 7B at 50 %
    >= 900 tok/s and >= 1.5x the same file's dense, 70B dense >= 75 % of its floor, no level slower than dense
    (by more than 0.5 %, the spread of a run's processes)."""
    out = []
    by_model: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("type", "q4_k") == "q4_k" and r.get("layout", "zigzag") == "zigzag":
            by_model[r["model"].removeprefix("synthetic:")][round(float(r["sparsity"]), 4)].append(r)
    for model, levels in sorted(by_model.items()):
        dense = [r["tokens_per_s"] for r in levels.get(0.0, [])]
        if model == "llama2-7b" and dense:
            out += [("7B dense >= 600 tok/s", f"{t:.1f} tok/s", _verdict(t >= 600), source) for t in dense]
        if model == "llama2-7b" and 0.5 in levels:
            for r in levels[0.5]:
                t = r["tokens_per_s"]
                out.append(("7B at 50 % >= 900 tok/s", f"{t:.1f} tok/s", _verdict(t >= 900), source))
                if dense:  # (the same file's dense row)
                    out.append(("7B at 50 % >= 1.5x its dense", f"{t / dense[0]:.3f}x ({t:.1f} / {dense[0]:.1f})",
                                _verdict(t >= 1.5 * dense[0]), source))
        if model == "llama2-70b" and dense:
            out += [("70B dense >= 75 % of the floor", f"{100 * r['frac_of_floor']:.1f} %",
                     _verdict(r["frac_of_floor"] >= 0.75), source) for r in levels[0.0]]
        if dense:
            for level, level_rows in sorted(levels.items()):
                for r in level_rows if level > 0 else []:
                    t = r["tokens_per_s"]
                    out.append((f"{model} at {100 * level:g} % not slower than dense (0.5 % spread)",
                                f"{t:.1f} against {dense[0]:.1f} tok/s", _verdict(t >= dense[0] * 0.995), source))
    return out


def gemv_bars(rows: list[dict], source: str) -> list[tuple[str, str, str, str]]:
    """The GEMV bars from bench gemv rows: per type, B2's share of copy on the 132 MB shapes (Q4_K >= 85 %, the
    others >= 75 %) and B4 over B2 (Q4_K: issue 14's three levels and two size classes; the others: >= 1.6x at 50 %
    on shapes of 25 MB or more)."""
    out = []
    for r in rows:
        typ, shape, s = r.get("type", "q4_k"), r["shape"], round(float(r["sparsity"]), 4)
        if r["variant"] == "B2" and s == 0 and shape in COPY_SHAPES:
            bar, need = _copy_bar(typ, shape)
            out.append((bar, f"{100 * r['frac_copy_bw']:.1f} %", _verdict(r["frac_copy_bw"] >= need), source))
        if r["variant"] != "B4" or s == 0:
            continue
        n, k = (int(v) for v in shape.split("x"))
        x = r["speedup_vs_B2"]
        if not math.isfinite(x):  # no B2 row of this shape and type in the run
            continue
        if typ == "q4_k":
            large = n * k * Q4K_BYTES_PER_WEIGHT / MB >= LARGE_MB
            need = (B4_LARGE if large else B4_SMALL).get(s)
            size = ">= 25 MB" if large else "< 25 MB"
        else:
            dense_mb = r["bytes"] / max(float(r.get("active", 1.0)), 1e-9) / MB
            need = 1.6 if (s == 0.5 and dense_mb >= LARGE_MB) else None
            size = f"{dense_mb:.0f} MB"
        if need is not None:
            out.append((_b4_bar(typ, s, need, shape, size), f"{x:.2f}x", _verdict(x >= need), source))
    return out


def expected_bars() -> list[str]:
    """The bars a full `gpu_session.sh bars` run gives a figure for, at the least (the large shapes'; the 7B shapes'
    GEMV bars too where its parts ran)."""
    names = ["7B dense >= 600 tok/s", "7B at 50 % >= 900 tok/s", "7B at 50 % >= 1.5x its dense",
             "70B dense >= 75 % of the floor"]
    for typ in ("q4_k", "q8_0", "q6_k", "q5_k", "q3_k", "q2_k"):
        names += [_copy_bar(typ, shape)[0] for shape in COPY_SHAPES]
    names += [_b4_bar("q4_k", s, need, shape, ">= 25 MB") for shape in COPY_SHAPES + ("57344x8192",)
              for s, need in B4_LARGE.items()]
    return names


def judge(paths: list[Path]) -> list[tuple[str, str, str, str]]:
    """Every bar row of the given JSON files, in file order."""
    out = []
    for path in paths:
        report = json.loads(path.read_text())
        kind = report.get("benchmark")
        rows = report.get("rows", [])
        tag = f"{path.name} ({report.get('device', '?')}, {report.get('commit', '?')})"
        if kind == "decode":
            out += decode_bars(rows, tag)
        elif kind == "gemv":
            out += gemv_bars(rows, tag)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    rows = judge([Path(a) for a in argv])
    print("| bar | figure | status | from |\n|---|---|---|---|")
    for bar, figure, status, source in rows:
        print(f"| {bar} | {figure} | {status} | {source} |")
    missed = sum(r[2] == "missed" for r in rows)
    print(f"\n{len(rows)} figures, {missed} missed")
    absent = [name for name in expected_bars() if name not in {r[0] for r in rows}]
    if absent:  # a part that timed out or failed writes no JSON: its bars are named here, not passed over
        print(f"no figure in these files for {len(absent)} bars: " + "; ".join(absent))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
