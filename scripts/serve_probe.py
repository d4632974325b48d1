"""First-token latency and tokens/s of one streamed request to `spqt serve`, with the openai client.

For each sparsity level, starts `spqt serve` on a free port (or uses --url, a server already
running), sends one warm-up request (on CUDA the first request captures the decode graphs), then
one streamed greedy completion, and prints the time to the first text chunk, the decode rate, and how long the
server took to start (of which, on CUDA, its prefill graphs' captures: the prompt cache adds its rests' graphs).

    python scripts/serve_probe.py --device cuda --sparsity 0,auto        # on the GPU machine
    python scripts/serve_probe.py --device cpu --max-tokens 32 --sparsity 0
    python scripts/serve_probe.py --url http://127.0.0.1:8080
    python scripts/serve_probe.py --device cpu --sparsity 0 --prompt-cache on,off \
        --history ../shared/data/calibration/grimms-fairy-tales-gutenberg-52521.txt --history-chars 4000

With --history, the measured request is a chat's second turn: the first turn's user message is the file's first
--history-chars characters and the prompt, its answer (max_tokens, greedy) comes from the warm-up request, and the
second turn asks "Go on." after both, as a chat client sends it (the whole conversation). --prompt-cache lists the
servers' settings to start in turn (spqt serve --prompt-cache), each at every sparsity level.
"""

import argparse
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI
from serve_process import start_serve

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def probe(url: str, api_key: str, max_tokens: int, prompt: str, history: str = "") -> dict:
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": f"{history}\n\n{prompt}" if history else prompt}]
    warm = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    if history:  # the measured request is the next turn, after the warm-up's answer
        messages += [{"role": "assistant", "content": warm.choices[0].message.content},
                     {"role": "user", "content": "Go on."}]
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    first = last = None
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
    end = time.perf_counter()
    n = usage.completion_tokens
    # the decode rate: tokens after the first over the time after the first (as spqt generate counts it)
    rate = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    details = usage.prompt_tokens_details
    return {"model": model, "prompt_tokens": usage.prompt_tokens, "tokens": n, "first_token_ms": 1e3 * (first - t0),
            "tokens_per_s": rate, "total_s": end - t0, "cached": (details.cached_tokens or 0) if details else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="probe this running server instead of starting one")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", help="model to serve (default: the default model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sparsity", default="0,auto", help="comma-separated levels to start servers with (0, 0.5, auto)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--history", type=Path, help="measure a chat's second turn, the first holding this text file's "
                    "start (see above)")
    ap.add_argument("--history-chars", type=int, default=4000)
    ap.add_argument("--prompt-cache", default="off", help="comma-separated spqt serve --prompt-cache settings (off: "
                    "the measured request, without --history the warm-up's again, prefills whole as before the cache)")
    args, extra = ap.parse_known_args()  # anything else goes to spqt serve (--mode, --ctx, ...)
    history = args.history.read_text(encoding="utf-8")[:args.history_chars] if args.history else ""
    rows = []
    if args.url:
        rows.append(("as served", "", probe(args.url, args.api_key, args.max_tokens, args.prompt, history), ""))
    else:
        for cache in args.prompt_cache.split(","):
            for level in args.sparsity.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    log = Path(tmp) / "serve.log"
                    options = ["--device", args.device, "--sparsity", level.strip(), *extra, "--prompt-cache",
                               cache.strip()]
                    proc, url, ready_s = start_serve(args.model, options, log)
                    try:
                        row = probe(url, args.api_key, args.max_tokens, args.prompt, history)
                    finally:
                        proc.send_signal(signal.SIGINT)
                        proc.wait(60)
                    text = log.read_text(errors="replace")
                    served = re.search(r"on \w+, (dense|sparsity [\d.]+ \w+)", text)
                    # the start: until the server listened (0.5 s polls), of which the prefill graphs' captures (CUDA)
                    captured = re.search(r"prefill graphs .* captured in ([\d.]+) s", text)
                    row["start"] = f"{ready_s:.1f}" + (f" ({captured.group(1)})" if captured else "")
                    rows.append((level.strip(), cache.strip(), row, served.group(1) if served else "?"))
    print(f"{'--sparsity':>10s} {'cache':>5s} {'served':>22s} {'prompt':>6s} {'cached':>6s} {'tokens':>6s} "
          f"{'first token':>12s} {'tokens/s':>9s} {'start s (graphs)':>17s}")
    for level, cache, r, served in rows:
        print(f"{level:>10s} {cache:>5s} {served:>22s} {r['prompt_tokens']:6d} {r['cached']:6d} {r['tokens']:6d} "
              f"{r['first_token_ms']:9.1f} ms {r['tokens_per_s']:9.1f} {r.get('start', '-'):>17s}")
    what = "a chat's second turn after the first (its warm-up)" if history else "one streamed chat request after " \
        "one warm-up"
    print(f"model {rows[0][2]['model']}, device {args.device if not args.url else 'as served'}, {what} (greedy, "
          f"max_tokens {args.max_tokens}), openai client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
