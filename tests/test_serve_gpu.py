"""`spqt serve --device cuda`: the default model served from a worker thread on the GPU (CUDA graphs
captured and replayed there), talked to over HTTP with the standard library, its greedy answers
compared with the same model's Generator run in the test's own thread. Needs no openai client (the
device machine has none); the API's details are tests/test_serve.py's, on the CPU."""

import http.client
import json

import pytest

from conftest import generator_logprobs, prefix_logprobs, serving

pytestmark = pytest.mark.gpu

CTX = 256
PROMPT = "The three primary colors are"
N = 24


@pytest.fixture(scope="module")
def cuda_server():
    from spqt.checkpoint import load_spqt
    from spqt.default_model import default_spqt
    from spqt.serve.engine import Engine

    loaded = load_spqt(default_spqt(progress=False))
    engine = Engine(loaded, "cuda", 0.0, ctx=CTX, name="default", prompt_cache=False)
    with serving(engine) as url:
        yield int(url.rsplit(":", 1)[1]), loaded, engine


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=json.dumps(body) if body else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _stream(port: int, body: dict, stop_after: int | None = None) -> tuple[list[str], bool]:
    """(text pieces, whether `data: [DONE]` came) of a streamed completion; stop_after: hang up after
    that many pieces (the server should cancel the generation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    pieces, done = [], False
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(dict(body, stream=True)),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            piece = json.loads(line[6:])["choices"][0]["text"]
            pieces.append(piece)
            if stop_after is not None and len([p for p in pieces if p]) >= stop_after:
                break
    finally:
        conn.close()
    return pieces, done


def _reference_text(loaded, engine, n: int) -> str:
    """Greedy text of the same model on CUDA from a Generator of this thread (its stop token left out)."""
    from spqt.generate import Generator

    gen = Generator(loaded, "cuda", sparsity=0.0, max_len=CTX)
    tokens = gen.generate(engine.tokenizer.encode(PROMPT), n, stop_ids=engine.stop_ids, track=False).tokens
    return engine.tokenizer.decode([t for t in tokens if t not in engine.stop_ids])


def test_cuda_server_greedy_equals_generator(cuda_server):
    port, loaded, engine = cuda_server
    status, health = _request(port, "GET", "/health")
    assert status == 200 and health["device"] == "cuda"
    prefills = engine.generator._prefills  # captured at the server's start, up to its context
    assert max(prefills) == (CTX, CTX) and all(g is not None for g in prefills.values()), sorted(prefills)
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": N}
    status, plain = _request(port, "POST", "/v1/completions", body)
    assert status == 200, plain
    text = plain["choices"][0]["text"]
    assert text and plain["usage"]["completion_tokens"] <= N
    assert text == _reference_text(loaded, engine, N)
    pieces, done = _stream(port, body)
    assert done and "".join(pieces) == text and len([p for p in pieces if p]) > 1


def test_cuda_server_after_a_dropped_stream(cuda_server):
    """A client that hangs up mid-stream cancels its generation between two graph replays; the next
    request (a chat, then the first completion again) still answers as the Generator does."""
    port, loaded, engine = cuda_server
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": N}
    pieces, done = _stream(port, dict(body, max_tokens=CTX - 16), stop_after=3)
    assert not done and len([p for p in pieces if p]) == 3
    status, chat = _request(port, "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 8})
    assert status == 200 and chat["choices"][0]["message"]["content"], chat
    status, plain = _request(port, "POST", "/v1/completions", body)
    assert status == 200 and plain["choices"][0]["text"] == _reference_text(loaded, engine, N)


def test_cuda_server_with_the_prompt_cache(cuda_server):
    """spqt serve --prompt-cache on, on CUDA: the rests' prefill graphs are captured at the start, a chat's next turn
    reuses the turn before, its answer included (usage.prompt_tokens_details.cached_tokens), and answers as a
    Generator that runs the same two turns the same way does (greedy); the reuse itself is checked against a whole
    prefill in tests/test_gpu_runtime.py (fp32, within rounding)."""
    from spqt.generate import Generator
    from spqt.serve.engine import Engine

    loaded = cuda_server[1]
    engine = Engine(loaded, "cuda", 0.0, ctx=CTX, name="cached", prompt_cache=True)
    assert engine.prompt_cache and any(b < k for b, k in engine.generator._prefills), sorted(engine.generator._prefills)
    chat = [{"role": "user", "content": "Name three primary colors."}]
    with serving(engine) as url:
        port = int(url.rsplit(":", 1)[1])
        status, first = _request(port, "POST", "/v1/chat/completions",
                                 {"messages": chat, "temperature": 0, "max_tokens": 12})
        assert status == 200, first
        turn = chat + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "And three secondary colors?"}]
        status, second = _request(port, "POST", "/v1/chat/completions",
                                  {"messages": turn, "temperature": 0, "max_tokens": 12})
        assert status == 200, second
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] < cached < second["usage"]["prompt_tokens"], (first["usage"], second["usage"])
    same = Generator(loaded, "cuda", sparsity=0.0, max_len=CTX)
    same.capture_prefills(CTX - 1, suffixes=True)
    for messages in (chat, turn):
        result = same.generate(engine.tokenizer.chat_messages(messages), 12, stop_ids=engine.stop_ids, reuse=True)
    assert result.cached_tokens == cached
    assert second["choices"][0]["message"]["content"] == engine.tokenizer.decode(
        [t for t in result.tokens if t not in engine.stop_ids])


def test_cuda_server_logprobs_are_the_generators(cuda_server):
    """Logprobs on CUDA (the host reads each step's logits rather than the graphs' pipelined argmax): the same greedy
    text, each token's logprob the log-softmax of the logits a Generator of this thread chose it from, the chosen
    token the most likely."""
    port, loaded, engine = cuda_server
    status, r = _request(port, "POST", "/v1/completions",
                         {"prompt": PROMPT, "temperature": 0, "max_tokens": N, "logprobs": 3})
    assert status == 200, r
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == _reference_text(loaded, engine, N) and "".join(lp["tokens"]) == choice["text"]
    steps = generator_logprobs(loaded, "cuda", engine.tokenizer.encode(PROMPT), len(lp["tokens"]), CTX)
    for (token, reference), value, top in zip(steps, lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert value == pytest.approx(float(reference[token]), abs=1e-3)
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(value)


def test_cuda_server_logprobs_of_a_small_model(tiny_spqt):
    """As above on a small random Llama in zigzag Q4_K (no GGUF needed): the CUDA server's greedy tokens and logprobs
    are a CUDA Generator's, each the log-softmax of the logits it was chosen from."""
    from spqt.checkpoint import load_spqt
    from spqt.serve.engine import Engine

    loaded = load_spqt(tiny_spqt)
    engine = Engine(loaded, "cuda", 0.0, ctx=64, name="tiny", prompt_cache=False)
    with serving(engine) as url:
        status, r = _request(int(url.rsplit(":", 1)[1]), "POST", "/v1/completions",
                             {"prompt": "hello world", "temperature": 0, "max_tokens": 12, "logprobs": 3})
    assert status == 200, r
    lp = r["choices"][0]["logprobs"]
    steps = generator_logprobs(loaded, "cuda", engine.tokenizer.encode("hello world"), len(lp["tokens"]), 64)
    assert lp["tokens"] and lp["tokens"] == [engine.tokenizer.token_bytes(t).decode(errors="replace") for t, _ in steps]
    for (token, reference), value, top in zip(steps, lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert value == pytest.approx(float(reference[token]), abs=1e-3)
        assert max(top.values()) == pytest.approx(value)


def test_cuda_server_echo_of_a_small_model(tiny_spqt):
    """The CUDA server's echo (lm-evaluation-harness's request: token ids, echo, logprobs 1, max_tokens 1): the
    prompt's logprobs are a CUDA Generator's prefill of each prefix, the answer token the one without echo."""
    from spqt.checkpoint import load_spqt
    from spqt.serve.engine import Engine

    loaded = load_spqt(tiny_spqt)
    engine = Engine(loaded, "cuda", 0.0, ctx=64, name="tiny")
    ids = engine.tokenizer.encode("hello world, and the rest of it")
    body = {"prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1}
    with serving(engine) as url:
        port = int(url.rsplit(":", 1)[1])
        status, echoed = _request(port, "POST", "/v1/completions", {**body, "echo": True})
        _, plain = _request(port, "POST", "/v1/completions", body)
    assert status == 200, echoed
    lp = echoed["choices"][0]["logprobs"]
    assert echoed["choices"][0]["text"] == engine.tokenizer.decode(ids) + plain["choices"][0]["text"]
    assert lp["tokens"][len(ids):] == plain["choices"][0]["logprobs"]["tokens"] and lp["token_logprobs"][0] is None
    for i, reference in enumerate(prefix_logprobs(loaded, "cuda", ids, 64), start=1):
        assert lp["token_logprobs"][i] == pytest.approx(float(reference[ids[i]]), abs=2e-2)
