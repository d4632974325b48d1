"""A bounded soak of `spqt serve`: does its memory level off over hundreds of requests?

Sends REQUESTS requests one after another, a mix that cycles through text completions and chats (plain and
streamed), a completion with echo and logprobs, a chat with logprobs, Responses API calls with store on (plain,
streamed, and turns that continue a stored response by previous_response_id, in chains of up to CHAIN turns), a stored
response retrieved, and a /metrics scrape. Every prompt is new (a request number in it), so nothing is answered from
a cache keyed by the prompt. Every EVERY requests it samples the server's resident memory (RSS), its open file
descriptors and threads (psutil), and /metrics' size and sample lines (its label sets). Prints a table and the RSS at
the start, after the warm-up and at the end, writes the samples as JSON; exits 1 on any failed request. On the
project's 2-core CPU VM the default model's server held 936 MiB at its start, 1,017 after 50 requests and 1,018 after
400 (max_tokens 16; 126 s); with --filler 600 and --max-tokens 48 (prompts of up to ~700 tokens) 1,118 after 50 and
1,129 after 250, a step where a longer prompt than any before came (the allocator keeps the largest prefill's memory).

    python scripts/serve_soak.py                                   # starts `spqt serve` (default model, CPU)
    python scripts/serve_soak.py --requests 400 --every 25 --json /tmp/soak.json
    python scripts/serve_soak.py --max-tokens 48 --filler 600 --serve-args '--responses-store 32'
    python scripts/serve_soak.py --url http://127.0.0.1:8080 --pid 1234
"""

import argparse
import json
import platform
import random
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from openai import OpenAI
from serve_process import start_serve

PROMPTS = ["The three primary colors are", "Write one sentence about the sea.", "The capital of France is",
           "List two fruits.", "Water boils at", "What is a prime number?", "Name a planet.", "Once upon a time"]
KINDS = ["completion", "completion-stream", "chat", "chat-stream", "echo-logprobs", "chat-logprobs", "responses",
         "responses-stream", "responses-next", "retrieve+metrics"]
WORDS = "the sea a ship sailed over grey water while birds cried and old men mended nets by the harbour wall".split()
CHAIN = 4  # turns of a stored conversation continued by previous_response_id before a new one starts


class Soak:
    """The requests of the mix, against one server; counts kept per kind."""

    def __init__(self, url: str, api_key: str, max_tokens: int, filler: int = 0):
        self.url, self.max_tokens, self.filler = url.rstrip("/"), max_tokens, filler
        self.client = OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id
        self.api_key = api_key
        self.last_response: str | None = None  # the stored response the next "responses-next" continues
        self.turns = 0

    def one(self, i: int) -> str:
        """Request i of the mix; returns its kind (raises where it failed)."""
        kind, c, n = KINDS[i % len(KINDS)], self.client, self.max_tokens
        prompt = f"{PROMPTS[i % len(PROMPTS)]} (request {i})"
        if self.filler:  # a preamble of 0 to filler words: prompts of many lengths
            pick = random.Random(i)
            prompt = " ".join(pick.choice(WORDS) for _ in range(pick.randrange(self.filler + 1))) + "\n\n" + prompt
        greedy = {"model": self.model, "temperature": 0, "max_tokens": n}
        chat = [{"role": "user", "content": prompt}]
        # (an answer may be empty: greedy decoding can end at once on a strange prompt; each must have ended)
        if kind == "completion":
            check(c.completions.create(prompt=prompt, **greedy).choices[0].finish_reason)
        elif kind == "completion-stream":
            check([x.choices[0].finish_reason for x in c.completions.create(prompt=prompt, stream=True, **greedy)
                   if x.choices][-1])
        elif kind == "chat":
            check(c.chat.completions.create(messages=chat, **greedy).choices[0].finish_reason)
        elif kind == "chat-stream":
            check([x.choices[0].finish_reason for x in c.chat.completions.create(
                messages=chat, stream=True, stream_options={"include_usage": True}, **greedy) if x.choices][-1])
        elif kind == "echo-logprobs":
            r = c.completions.create(prompt=prompt, echo=True, logprobs=5, **greedy | {"max_tokens": 4})
            check(r.choices[0].logprobs.tokens)
        elif kind == "chat-logprobs":
            r = c.chat.completions.create(messages=chat, logprobs=True, top_logprobs=5, **greedy)
            check(r.choices[0].logprobs and r.choices[0].finish_reason)
        elif kind in ("responses", "responses-next"):
            previous = self.last_response if kind == "responses-next" and self.turns < CHAIN else None
            r = c.responses.create(model=self.model, input=prompt, max_output_tokens=n, temperature=0, store=True,
                                   previous_response_id=previous)
            self.last_response, self.turns = r.id, self.turns + 1 if previous else 1
            check(r.status in ("completed", "incomplete"))
        elif kind == "responses-stream":
            # (the events read one by one: the client's responses.stream() wants response.completed, and an answer
            # that max_output_tokens cuts ends with response.incomplete)
            events = list(c.responses.create(model=self.model, input=prompt, max_output_tokens=n, temperature=0,
                                             store=True, stream=True))
            if events[-1].type not in ("response.completed", "response.incomplete"):
                raise RuntimeError(f"the stream ended with {events[-1].type}")
            check(events[-1].response.id)
        else:
            if self.last_response:
                check(c.responses.retrieve(self.last_response).id == self.last_response)
            self.metrics()
        return kind

    def metrics(self) -> str:
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()


def check(ended) -> None:
    """ended: what shows that an answer came whole (its finish_reason, ...)."""
    if not ended:
        raise RuntimeError(f"an answer that did not end: {ended!r}")


def sample(proc: psutil.Process, soak: Soak, done: int, t0: float) -> dict:
    """The server's figures now."""
    text = soak.metrics()
    return {"requests": done, "seconds": round(time.perf_counter() - t0, 1),
            "rss_mib": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds(), "threads": proc.num_threads(),
            "metrics_bytes": len(text), "metrics_samples": sum(1 for ln in text.splitlines() if ln[:1] not in "#")}


def run(url: str, pid: int, api_key: str, requests: int, every: int, warmup: int, max_tokens: int, filler: int,
        max_seconds: float, out: Path | None) -> int:
    proc, soak = psutil.Process(pid), Soak(url, api_key, max_tokens, filler)
    t0 = time.perf_counter()
    samples, errors, counts = [sample(proc, soak, 0, t0)], [], dict.fromkeys(KINDS, 0)
    print(f"{'requests':>8} {'s':>7} {'RSS MiB':>8} {'fds':>4} {'thr':>4} {'/metrics B':>10} {'samples':>7} errors",
          flush=True)

    def show(s: dict) -> None:
        print(f"{s['requests']:>8} {s['seconds']:>7.1f} {s['rss_mib']:>8.1f} {s['fds']:>4} {s['threads']:>4} "
              f"{s['metrics_bytes']:>10} {s['metrics_samples']:>7} {len(errors)}", flush=True)

    show(samples[0])
    done = 0
    for i in range(requests):
        if time.perf_counter() - t0 > max_seconds:
            print(f"stopped after {max_seconds:.0f} s (--max-seconds)")
            break
        try:
            counts[soak.one(i)] += 1
        except Exception as e:  # (the openai client's errors, a stream cut short, an empty answer)
            errors.append(f"request {i} ({KINDS[i % len(KINDS)]}): {type(e).__name__}: {e}")
        done = i + 1
        if done % every == 0 or done == requests:
            samples.append(sample(proc, soak, done, t0))
            show(samples[-1])
    for line in errors[:20]:
        print(line)
    warm = next((s for s in samples if s["requests"] >= warmup), samples[-1])
    end = samples[-1]
    per_100 = 100 * (end["rss_mib"] - warm["rss_mib"]) / max(1, end["requests"] - warm["requests"])
    print(f"{done} requests in {end['seconds']:.0f} s, {len(errors)} errors; RSS {samples[0]['rss_mib']:.0f} MiB at "
          f"the start, {warm['rss_mib']:.0f} after {warm['requests']} (warm-up), {end['rss_mib']:.0f} at the end "
          f"({per_100:+.2f} MiB per 100 requests after the warm-up)")
    if out:
        out.write_text(json.dumps({"url": url, "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "max_tokens": max_tokens, "filler": filler, "counts": counts, "errors": errors,
                                   "rss_mib_per_100_requests_after_warmup": round(per_100, 3), "samples": samples},
                                  indent=1))
        print(f"wrote {out}")
    return 1 if errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (with --pid; default: start `spqt serve` on a free port)")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, whose memory is sampled")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="with no --url: the model to serve (default: the default model)")
    ap.add_argument("--serve-args", default="", help="with no --url: more `spqt serve` options, e.g. "
                    "'--responses-store 16'")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--every", type=int, default=25, help="sample every this many requests")
    ap.add_argument("--warmup", type=int, default=50, help="requests before the warm-up's sample")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--filler", type=int, default=0, help="put 0 to this many words before each prompt (a random "
                    "number, seeded by the request's)")
    ap.add_argument("--max-seconds", type=float, default=1200, help="stop sending after this long")
    ap.add_argument("--json", type=Path, help="write the samples here")
    args = ap.parse_args()
    go = (lambda url, pid: run(url, pid, args.api_key, args.requests, args.every, args.warmup, args.max_tokens,
                               args.filler, args.max_seconds, args.json))
    if args.url:
        if args.pid is None:
            ap.error("--url needs --pid (the server's process, whose memory is sampled)")
        return go(args.url, args.pid)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        proc, url, _ = start_serve(args.model, ["--device", "cpu", *args.serve_args.split()], log)
        try:
            return go(url, proc.pid)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
            tracebacks = log.read_text(errors="replace").count("Traceback")
            print(f"server log: {tracebacks} tracebacks" + (f" ({log} is removed; run with --url to keep it)"
                                                            if tracebacks else ""))


if __name__ == "__main__":
    sys.exit(main())
