"""spqt's llama.cpp-method perplexity chunk by chunk (evaluate.perplexity on each 512-token chunk alone, as the
CLI's batch-1 loop computes it), printed as llama-perplexity prints its running estimate: [i]ppl."""
import math
import sys
from pathlib import Path

from spqt.checkpoint import load_model
from spqt.evaluate import perplexity
from spqt.generate import Generator
from spqt.tokenizer import TextTokenizer

M, W, N = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
loaded = load_model(M)
tok = TextTokenizer(loaded.tokenizer, loaded.config)
text = W.read_text(encoding="utf-8")
tokens = tok.encode(text[:-1] if text.endswith("\n") else text)
bos = loaded.config.bos_id if loaded.config.add_bos else None
gen = Generator(loaded, "cpu", max_len=512, dense_fallback=False)
nll, scored, out = 0.0, 0, []
for i in range(N):
    r = perplexity(gen, tokens[512 * i: 512 * (i + 1)], ctx=512, chunks=1, bos_id=bos)
    nll, scored = nll + r.nll_sum, scored + r.scored
    out.append(f"[{i + 1}]{math.exp(nll / scored):.4f}")
    print(out[-1], flush=True)
print(f"tokens {len(tokens)} chunks {len(tokens) // 512} scored {scored} ppl {math.exp(nll / scored):.4f}")
print(",".join(out))
