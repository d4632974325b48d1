"""First-token latency and tokens/s of one streamed request to `spqt serve`, with the openai client.

For each sparsity level, starts `spqt serve` on a free port (or uses --url, a server already
running), sends one warm-up request (on CUDA the first request captures the decode graphs), then
one streamed greedy completion, and prints the time to the first text chunk and the decode rate.

    python scripts/serve_probe.py --device cuda --sparsity 0,auto        # on the GPU machine
    python scripts/serve_probe.py --device cpu --max-tokens 32 --sparsity 0
    python scripts/serve_probe.py --url http://127.0.0.1:8080
"""

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def probe(url: str, api_key: str, max_tokens: int, prompt: str) -> dict:
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)  # warm-up
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
    return {"model": model, "prompt_tokens": usage.prompt_tokens, "tokens": n, "first_token_ms": 1e3 * (first - t0),
            "tokens_per_s": rate, "total_s": end - t0}


def start(model: str | None, device: str, sparsity: str, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "spqt.cli", "serve", *([model] if model else []), "--port", "0", "--device", device,
           "--sparsity", sparsity, *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    while not (found := re.search(r"listening on (\S+)", log.read_text(errors="replace"))):
        if proc.poll() is not None:
            raise SystemExit(f"spqt serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.5)
    return proc, found.group(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="probe this running server instead of starting one")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", help="model to serve (default: the default model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sparsity", default="0,auto", help="comma-separated levels to start servers with (0, 0.5, auto)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    args, extra = ap.parse_known_args()  # anything else goes to spqt serve (--mode, --ctx, ...)
    rows = []
    if args.url:
        rows.append(("as served", probe(args.url, args.api_key, args.max_tokens, args.prompt), ""))
    else:
        for level in args.sparsity.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                log = Path(tmp) / "serve.log"
                proc, url = start(args.model, args.device, level.strip(), log, extra)
                try:
                    row = probe(url, args.api_key, args.max_tokens, args.prompt)
                finally:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(60)
                served = re.search(r"on \w+, (dense|sparsity [\d.]+ \w+)", log.read_text(errors="replace"))
                rows.append((level.strip(), row, served.group(1) if served else "?"))
    print(f"{'--sparsity':>10s} {'served':>22s} {'prompt':>6s} {'tokens':>6s} {'first token':>12s} {'tokens/s':>9s}")
    for level, r, served in rows:
        print(f"{level:>10s} {served:>22s} {r['prompt_tokens']:6d} {r['tokens']:6d} {r['first_token_ms']:9.1f} ms "
              f"{r['tokens_per_s']:9.1f}")
    print(f"model {rows[0][1]['model']}, device {args.device if not args.url else 'as served'}, one streamed chat "
          f"request (greedy, max_tokens {args.max_tokens}) after one warm-up, openai client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
