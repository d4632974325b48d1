"""TEAL vs WINA (unified) on the default model's original GGUF weights, on a few windows: both
criteria's histograms from one dense pass over N_CAL windows of 512 tokens spread over the
calibration books, then perplexity (llama.cpp's way) on the first N_EVAL chunks of the WikiText-2
test, dense and per level. For a machine that cannot run the full table (docs/RESULTS.md, issue 16).

    PYTHONPATH=src python scripts/criteria_quick_check.py N_CAL N_EVAL 0.5,0.4
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from spqt import sparsity as sp
from spqt.calibrate import MagnitudeHistogram
from spqt.checkpoint import load_model
from spqt.default_model import default_gguf
from spqt.evaluate import perplexity
from spqt.generate import Generator, set_sparse, sparse_linears
from spqt.tokenizer import TextTokenizer

n_cal, n_eval = int(sys.argv[1]), int(sys.argv[2])
levels = [float(v) for v in sys.argv[3].split(",")]
loaded = load_model(default_gguf())
norms = loaded.ensure_column_norms()
tok = TextTokenizer(loaded.tokenizer, loaded.config)
DATA = Path(os.environ.get("DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
C = DATA / "calibration"
cal = []
for f in sorted(C.glob("*.txt")):
    cal += tok.encode(f.read_text(encoding="utf-8"), add_bos=False)
gen = Generator(loaded, "cpu", torch.float32, max_len=512, criterion="teal")
model = gen.model
hists = {}
hooks = []
for layer, kind, lin in sparse_linears(model):
    ht, hw = MagnitudeHistogram("cpu"), MagnitudeHistogram("cpu")
    hists[("teal", layer, kind)], hists[("wina", layer, kind)] = ht, hw
    nm = norms[f"layers.{layer}.{kind}"]

    def both(mod, args, ht=ht, hw=hw, nm=nm):  # TEAL's score |x| and WINA's |x| * c from one pass
        ht.add(args[0])
        hw.add(args[0].float().abs() * nm)

    hooks.append(lin.input_tap.register_forward_pre_hook(both))  # the map's input, after the norm
set_sparse(model, False)
model.setup_cache(1, 512, torch.float32)
t0 = time.time()
# windows spread over the books (the first window of each book is front matter)
step = len(cal) // (n_cal + 1)
with torch.inference_mode():
    for w in range(n_cal):
        row = torch.tensor(cal[(w + 1) * step - 256:(w + 1) * step + 256])[None]
        model(row, torch.arange(512), kv_len=512)
for h in hooks:
    h.remove()
print(f"histograms: {n_cal} windows in {time.time() - t0:.0f} s", flush=True)
wt = tok.encode((DATA / "wikitext-2-raw-v1-test.txt").read_text(encoding="utf-8"), add_bos=False)
bos = loaded.config.bos_id if loaded.config.add_bos else None
out = {}
t0 = time.time()
r = perplexity(gen, wt, 512, chunks=n_eval, bos_id=bos)
print(f"dense ppl {r.ppl:.3f} ({n_eval} chunks, {r.scored} scored tokens) in {time.time() - t0:.0f} s", flush=True)
out["dense"] = r.ppl
for s in levels:
    for crit in ("teal", "wina"):
        table = torch.tensor([[hists[(crit, i, k)].quantile(s) for k in sp.INPUT_KINDS] for i in range(loaded.config.n_layers)])
        gen.set_sparsity(s, "unified", table=table, criterion=crit)
        t0 = time.time()
        r = perplexity(gen, wt, 512, chunks=n_eval, bos_id=bos)
        out[f"{crit}-{s}"] = (r.ppl, r.achieved)
        print(f"{crit} unified {s}: ppl {r.ppl:.3f} ({100 * (r.ppl / out['dense'] - 1):+.1f} %), achieved {100 * r.achieved['all']:.1f} % "
              f"{ {k: round(v, 3) for k, v in r.achieved.items()} } in {time.time() - t0:.0f} s", flush=True)
Path("out").mkdir(exist_ok=True)
Path(f"out/criteria-quick-{n_cal}-{n_eval}.json").write_text(json.dumps(out, indent=1))
