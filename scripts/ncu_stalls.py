"""The stall samples of an ncu source page (`ncu -i R.ncu-rep --page source --csv --print-source sass`, as
the thirteenth session's `gpu_session.sh chainncu` wrote it): the totals per stall reason, then the N SASS lines
with the most samples, each with its executions and its two largest reasons.

    python3 scripts/ncu_stalls.py ncu-1-sass.csv [N]
"""

import csv
import sys


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[1], rows[2:]  # row 0 names the kernel
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = "Warp Stall Sampling (All Samples)"

    def count(row, name):
        return int(row[col[name]] or 0)

    print("samples", sum(count(r, samples) for r in data), "warp instructions",
          sum(count(r, "Instructions Executed") for r in data))
    totals = {name: sum(count(r, name) for r in data) for name in reasons}
    print(sorted(((v, k) for k, v in totals.items()), reverse=True)[:8])
    hot = sorted(range(len(data)), key=lambda i: -count(data[i], samples))[:top]
    for i in sorted(hot):
        r = data[i]
        two = sorted(((count(r, s), s[6:]) for s in reasons), reverse=True)[:2]
        print(f"{i:5d} {count(r, samples):7d} {count(r, 'Instructions Executed'):10d} "
              f"{r[col['Source']].strip()[:60]:60s} {two}")


if __name__ == "__main__":
    main()
