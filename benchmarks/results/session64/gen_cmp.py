"""Teacher-forced check of llama.cpp's greedy continuation against spqt's fp32 logits (reference backend)."""
import sys
from pathlib import Path

import torch

from spqt.checkpoint import load_model
from spqt.generate import Generator
from spqt.tokenizer import TextTokenizer

M = Path(sys.argv[1])
G = Path(sys.argv[2])
loaded = load_model(M)
tok = TextTokenizer(loaded.tokenizer, loaded.config)
gen = Generator(loaded, "cpu", max_len=160)
model = gen.model
chat = {4, 5}
for i in range(1, 6):
    prompt = (G / f"p{i}.txt").read_text()
    lc_out = (G / f"lc_p{i}.out").read_text()
    sp_out = (G / f"sp_p{i}.out").read_text()
    if i in chat:
        ids = tok.chat(prompt)
        lc_text = lc_out.split("assistant\n", 1)[1]
        ended = "[end of text]" in lc_text
        lc_text = lc_text.split(" [end of text]")[0].rstrip("\n")
        lc_ids = tok.encode(lc_text, add_bos=False) + ([2] if ended else [])
    else:
        ids = tok.encode(prompt)
        lc_text = lc_out[len(prompt):].rstrip("\n")
        lc_ids = tok.encode(lc_text, add_bos=False)
    sp_text = sp_out.rstrip("\n")
    ours = gen.generate(ids, 48, stop_ids=tok.stop_ids).tokens
    full = ids + lc_ids
    n = len(full)
    with torch.inference_mode():
        model.setup_cache(1, n, torch.float32)
        logits = model(torch.tensor([full]), torch.arange(n), kv_len=n)[0].float()
    model.setup_cache(1, gen.max_len, gen.dtype)
    first = None
    for j, t in enumerate(lc_ids):
        row = logits[len(ids) - 1 + j]
        if int(row.argmax()) != t:
            first = j
            break
    same_chars = next((k for k, (a, b) in enumerate(zip(lc_text, sp_text)) if a != b),
                      min(len(lc_text), len(sp_text)))
    print(f"== p{i} chat={i in chat} prompt_tokens={len(ids)} llama.cpp_tokens~{len(lc_ids)} "
          f"spqt_ref_tokens={len(ours)}"
          f" cli_text==lc_text: {lc_text == sp_text} (common chars {same_chars})")
    print(f"   spqt fp32 reference greedy == spqt CLI text: {tok.decode([t for t in ours if t != 2]) == sp_text}")
    if first is None:
        print("   llama.cpp's tokens are spqt's fp32 argmax at every step")
        continue
    row = logits[len(ids) - 1 + first]
    top = torch.topk(row, 2)
    lc_t, sp_t = lc_ids[first], int(top.indices[0])
    print(f"   first llama.cpp token not spqt's argmax: step {first} (prefix {tok.decode(lc_ids[:first])!r})")
    print(f"   llama.cpp {lc_t} {tok.decode([lc_t])!r} logit {float(row[lc_t]):.4f} | spqt {sp_t} "
          f"{tok.decode([sp_t])!r} logit {float(row[sp_t]):.4f} | gap {float(row[sp_t] - row[lc_t]):.4f} "
          f"(logit spread {float(row.max() - row.min()):.1f})")
