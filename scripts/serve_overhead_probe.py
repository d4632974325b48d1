"""Where a streamed chat request's first token waits outside the model, in one process: `spqt serve`'s app under
uvicorn on a free port, httpx streaming from this thread, time stamps patched into the scheduler, the engine and the
generator. Per request: the request until the job is queued (HTTP, parsing, template, tokens), queued until the worker
runs it, generate's prefill until the first token, the first text event until the client holds its chunk.

    python scripts/serve_overhead_probe.py [--device cpu] [--requests 12] [--max-tokens 1] [--client openai]

--client openai streams through the openai client (what scripts/serve_probe.py times) instead of raw httpx.

uvicorn takes httptools and uvloop where installed (spqt's dependencies): run with them uninstalled (or shadowed) to
compare h11 and asyncio.
"""

import argparse
import threading
import time

import httpx2 as httpx

from spqt.checkpoint import load_model
from spqt.default_model import default_spqt
from spqt.generate import Generator
from spqt.serve import engine as serve_engine
from spqt.serve import scheduler as serve_scheduler
from spqt.serve import server as serve_server
from serve_probe import PROMPT  # the request scripts/serve_probe.py times (this folder is on the path)

STAMPS: dict[str, float] = {}


def stamp_first(name: str) -> None:
    STAMPS.setdefault(name, time.perf_counter())


def patch() -> None:
    """Time stamps at the job's queueing, its run, generate's start, the first token and the first text event."""
    submit, run, emit, generate = (serve_scheduler.Scheduler.submit, serve_engine.Engine.run,
                                   serve_scheduler.Job.emit, Generator.generate)

    def submit_(self, job):
        stamp_first("queued")
        return submit(self, job)

    def run_(self, job):
        stamp_first("run")
        return run(self, job)

    def emit_(self, kind, value=None):
        if kind == "text":
            stamp_first("emitted")
        return emit(self, kind, value)

    def generate_(self, *args, on_token=None, **kwargs):
        stamp_first("generate")

        def first(token):
            stamp_first("token")
            return on_token(token)

        return generate(self, *args, on_token=first if on_token else None, **kwargs)

    serve_scheduler.Scheduler.submit, serve_engine.Engine.run = submit_, run_
    serve_scheduler.Job.emit, Generator.generate = emit_, generate_


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--client", choices=("httpx", "openai"), default="httpx")
    args = ap.parse_args()
    patch()
    # the same request again and again: the prompt cache off, so each prefills whole as the measured runs before it did
    engine = serve_engine.Engine(load_model(default_spqt(progress=False)), args.device, 0.0, prompt_cache=False)
    sock = serve_server.bind("127.0.0.1", 0)
    service = serve_server.Service(engine)
    threading.Thread(target=service.run, args=(sock,), daemon=True).start()
    config = service.server.config
    config.load()
    print(f"uvicorn: {config.http_protocol_class.__name__}, loop {config.get_loop_factory().__module__}")
    body = {"model": engine.info.model_id, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    spans = (("request", "queued"), ("queued", "run"), ("generate", "token"), ("emitted", "client"),
             ("request", "client"))
    time.sleep(1.0)  # the server's start
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    if args.client == "openai":
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        request = {key: body[key] for key in ("model", "messages", "max_tokens", "temperature")}
    else:
        client = httpx.Client(base_url=url, timeout=600)
    for _ in range(args.requests):
        STAMPS.clear()
        stamp_first("request")
        if args.client == "openai":
            for chunk in client.chat.completions.create(stream=True, **request):
                if chunk.choices and chunk.choices[0].delta.content:
                    stamp_first("client")
        else:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        stamp_first("client")
        print("  ".join(f"{a}->{b} {1e3 * (STAMPS[b] - STAMPS[a]):7.2f} ms" for a, b in spans), flush=True)
    client.close()
    service.stop()


if __name__ == "__main__":
    main()
