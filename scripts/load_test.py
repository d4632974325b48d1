"""A bounded load test of `spqt serve` with the official openai client.

CLIENTS threads each send REQUESTS greedy requests at once (chat and text completions, streamed and
not, a different prompt each time), and every answer is compared with the answer its own prompt got
when sent alone beforehand: greedy decoding is deterministic, so any difference means two requests'
tokens mixed. Prints the number of requests, errors and mismatches, and p50 / p99 latency; exits 1
on any error or mismatch.

    python scripts/load_test.py                      # starts `spqt serve` (default model, CPU), 16 x 4
    python scripts/load_test.py --url http://127.0.0.1:8080 --clients 4 --requests 2
"""

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from openai import OpenAI
from serve_process import start_serve

PROMPTS = [
    "The three primary colors are", "Write one sentence about the sea.", "The capital of France is",
    "List two fruits.", "Water boils at", "What is a prime number?", "The quick brown fox",
    "Name a planet.", "Once upon a time", "Why is the sky blue?", "My favourite book is",
    "Give me a word that rhymes with cat.", "In 1969, astronauts", "How do bees make honey?",
    "The best way to learn is", "What does a compiler do?",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def ask(client: OpenAI, model: str, prompt: str, chat: bool, stream: bool, max_tokens: int) -> str:
    kw = {"model": model, "temperature": 0, "max_tokens": max_tokens, "stream": stream}
    if chat:
        r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
        if not stream:
            return r.choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    r = client.completions.create(prompt=prompt, **kw)
    if not stream:
        return r.choices[0].text
    return "".join(c.choices[0].text for c in r if c.choices)


def plan(clients: int, requests: int) -> list[list[tuple[str, bool, bool]]]:
    """Per client, its requests as (prompt, chat, stream); neighbours get different prompts."""
    return [[(PROMPTS[(i + 5 * j) % len(PROMPTS)], (i + j) % 2 == 1, j % 2 == 1) for j in range(requests)]
            for i in range(clients)]


def run(url: str, api_key: str, clients: int, requests: int, max_tokens: int) -> int:
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    work = plan(clients, requests)
    wanted = {(p, chat) for reqs in work for p, chat, _ in reqs}
    t0 = time.perf_counter()
    reference = {key: ask(client, model, key[0], key[1], False, max_tokens) for key in sorted(wanted)}
    alone = time.perf_counter() - t0
    print(f"reference: {len(reference)} prompts one at a time in {alone:.1f} s")

    latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def one_client(i: int) -> None:
        own = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=3600)
        start.wait()
        for prompt, chat, stream in work[i]:
            t = time.perf_counter()
            try:
                text = ask(own, model, prompt, chat, stream, max_tokens)
            except Exception as e:
                with lock:
                    errors.append(f"client {i}: {type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                if text != reference[(prompt, chat)]:
                    mismatches.append(f"client {i} {'chat' if chat else 'completion'} {prompt!r}: {text!r} != "
                                      f"{reference[(prompt, chat)]!r}")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for line in errors + mismatches:
        print(line)
    n = clients * requests
    print(f"{clients} clients x {requests} requests, max_tokens {max_tokens}: {n} requests, {len(errors)} errors, "
          f"{len(mismatches)} mismatches in {wall:.1f} s ({n / wall:.2f} requests/s)")
    if latencies:
        print(f"latency p50 {percentile(latencies, 50):.2f} s, p99 {percentile(latencies, 99):.2f} s, "
              f"max {max(latencies):.2f} s (one request alone: {alone / len(reference):.2f} s on average)")
    return 1 if errors or mismatches else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `spqt serve` on a free port)")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="with no --url: the model to serve (default: the default model)")
    ap.add_argument("--device", default="cpu", help="with no --url: the server's device")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.url:
        return run(args.url, args.api_key, args.clients, args.requests, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        # the prompt cache off: a reused prefix can turn a greedy near-tie, and the check compares tokens exactly
        proc, url, _ = start_serve(args.model, ["--device", args.device, "--prompt-cache", "off"], log)
        try:
            return run(url, args.api_key, args.clients, args.requests, args.max_tokens)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
