"""`spqt serve`: a real server on 127.0.0.1 (CPU, the default model, a free port) and the official
`openai` client. One server for the module, run in a thread of the test process so that the model is
loaded once for the server and the `spqt generate` comparison; every test leaves it serving. The
signal handling is tested on a `spqt serve` process of the tiny model.

The default model is served from its GGUF file (float weights) rather than the converted .spqt,
whose first conversion takes minutes on a 2-core machine; the server code path is the same.
"""

import asyncio
import dataclasses
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

from spqt import cli  # noqa: E402
from spqt.cli import main  # noqa: E402
from conftest import (CTX, KEY, THINK_TEMPLATE, TOOL_TEMPLATE, generator_logprobs, prefix_logprobs,  # noqa: E402
                      serving, token_by_token_logprobs)

ROOT = Path(__file__).resolve().parents[1]


CHAT = [{"role": "user", "content": "Name three primary colors."}]
PROMPT = "The three primary colors are"
GREEDY = {"temperature": 0, "max_tokens": 12}


def stream_text(stream, chat: bool) -> tuple[str, str | None, object, int]:
    """(text, finish_reason, usage, chunks with text) of a streamed answer."""
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = (choice.delta.content if chat else choice.text) or ""
            chunks += bool(piece)
            pieces.append(piece)
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage, chunks


def test_models_and_health(server, model_id, default_gguf):
    assert model_id == default_gguf.stem
    assert server.client().models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")
    status, health = server.raw("/health")
    assert status == 200 and health["status"] == "ok" and health["ctx"] == CTX and health["device"] == "cpu"
    assert health["prompt_cache"] is True  # the default


def test_chat_streamed_equals_plain_for_greedy(server, model_id):
    client = server.client()
    plain = client.chat.completions.create(model=model_id, messages=CHAT, **GREEDY)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    assert choice.finish_reason == ("length" if plain.usage.completion_tokens == GREEDY["max_tokens"] else "stop")
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    stream = client.chat.completions.create(model=model_id, messages=CHAT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    text, finish, usage, chunks = stream_text(stream, chat=True)
    assert text == choice.message.content and finish == choice.finish_reason
    counts = {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage.model_dump(include=counts) == plain.usage.model_dump(include=counts)
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt again: cached
    assert chunks > 1  # streamed piece by piece, not in one block


def test_completion_streamed_equals_plain_for_greedy(server, model_id):
    client = server.client()
    plain = client.completions.create(model=model_id, prompt=PROMPT, **GREEDY)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= GREEDY["max_tokens"]
    stream = client.completions.create(model=model_id, prompt=PROMPT, stream=True, **GREEDY)
    text, finish, usage, chunks = stream_text(stream, chat=False)
    assert text == plain.choices[0].text and finish == plain.choices[0].finish_reason and chunks > 1
    assert usage is None  # only with stream_options.include_usage, as OpenAI does
    # one log line per request, with tokens, tokens/s and the sparsity
    assert re.search(r"POST /v1/completions 200 finish \w+, prompt \d+ \+ completion \d+ tokens in [\d.]+ s, "
                     r"prefill \d+ tokens/s, decode [\d.]+ tokens/s, dense", server.log_text())


def _cli_generate(capsys, prompt: str, n: int, chat: bool) -> str:
    """The text `spqt generate` prints for a prompt (greedy, CPU)."""
    capsys.readouterr()
    argv = ["generate", "default-model", "-p", prompt, "-n", str(n), "--device", "cpu"] + (["--chat"] if chat else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    return out.removesuffix("\n")  # stdout holds the generated text alone, then a newline


def test_text_equals_spqt_generate(server, model_id, capsys, monkeypatch, loaded):
    monkeypatch.setattr(cli, "_load", lambda args: loaded)  # the server's model, not a second load of it
    client = server.client()
    n = 16
    ours = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=n)
    assert ours.choices[0].finish_reason == "length"  # no end-of-text token inside, so the texts compare whole
    assert _cli_generate(capsys, PROMPT, n, chat=False) == ours.choices[0].text
    chat = client.chat.completions.create(model=model_id, messages=CHAT, temperature=0, max_tokens=n)
    theirs = _cli_generate(capsys, CHAT[0]["content"], n, chat=True)
    # spqt generate prints the end-of-sequence token's text too; the API answer leaves it out
    assert theirs.removesuffix("<|im_end|>") == chat.choices[0].message.content


def test_a_chat_turn_prefills_only_what_the_turn_before_did_not(server, model_id, loaded):
    """The prompt cache (on by default): the next turn of a chat, whose prompt starts with the turn before's prompt
    and answer, reuses their keys and values (usage.prompt_tokens_details.cached_tokens; the log line says so) and
    answers as a Generator that prefills the whole prompt does (greedy)."""
    from spqt.generate import Generator
    from spqt.tokenizer import TextTokenizer

    client = server.client()
    first = client.chat.completions.create(model=model_id, messages=CHAT, **GREEDY)
    turn = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "And three secondary colors?"}]
    second = client.chat.completions.create(model=model_id, messages=turn, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens, (first.usage, second.usage)  # + answer
    assert f"({cached} cached)" in server.log_text().splitlines()[-1]
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    ids = tok.chat_messages(turn)
    tokens = Generator(loaded, "cpu", max_len=CTX).generate(ids, GREEDY["max_tokens"], stop_ids=tok.stop_ids).tokens
    assert len(ids) == second.usage.prompt_tokens and len(tokens) == second.usage.completion_tokens
    assert second.choices[0].message.content == tok.decode([t for t in tokens if t not in tok.stop_ids])


def test_stop_strings_and_seeded_sampling(server, model_id):
    client = server.client()
    full = client.completions.create(model=model_id, prompt=PROMPT, **GREEDY).choices[0].text
    stop = full[6:9]
    assert len(stop) == 3 and full.index(stop) >= 1
    for stream in (False, True):
        r = client.completions.create(model=model_id, prompt=PROMPT, stop=[stop, "@@never@@"], stream=stream, **GREEDY)
        text, finish = stream_text(r, chat=False)[:2] if stream else (r.choices[0].text, r.choices[0].finish_reason)
        assert (text, finish) == (full[: full.index(stop)], "stop"), stream
    sampled = {"temperature": 0.9, "top_p": 0.9, "seed": 1234, "max_tokens": 10, "extra_body": {"top_k": 40}}
    a = client.chat.completions.create(model=model_id, messages=CHAT, **sampled).choices[0].message.content
    b = client.chat.completions.create(model=model_id, messages=CHAT, **sampled).choices[0].message.content
    assert a == b


def test_a_tiny_temperature_or_top_p_0_keeps_the_top_token(server, model_id):
    """OpenAI takes any temperature in [0, 2] and top_p in [0, 1]. A temperature so small that logits / temperature
    overflow float32 (1e-40) answered 500 (NaN probabilities); top_p 0 was refused. Both keep the top token alone."""
    client = server.client()
    greedy = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=4).choices[0].text
    for sampling in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 0, "seed": 1}):
        answer = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, **sampling)
        assert answer.choices[0].text == greedy, sampling
    assert server.health()["failed"] == 0


def test_prompts_are_tokenized_off_the_event_loop(server, model_id, engine, monkeypatch):
    """A 4 MiB prompt keeps the tokenizer busy for 3-6 s on a 2-core CPU; on the event loop that froze every other
    client's stream, and /health, for as long."""
    on_loop = []

    def watched(tokenize):
        def call(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(tokenize.__name__)
            except RuntimeError:  # no running loop in this thread: a worker thread's
                pass
            return tokenize(*args, **kwargs)
        return call

    for name in ("encode", "chat_messages"):
        monkeypatch.setattr(engine.tokenizer, name, watched(getattr(engine.tokenizer, name)))
    client = server.client()
    assert client.completions.create(model=model_id, prompt=PROMPT, max_tokens=1).choices[0].text
    assert stream_text(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=1, stream=True),
                       chat=True)[0]
    assert on_loop == []


def test_a_wrong_method_is_405_with_allow(server):
    """RFC 9110: a 405 names the methods the resource takes (Allow); it was dropped with starlette's headers."""
    for path, allowed in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
        req = urllib.request.Request(server.url + path, method="DELETE", headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 405 and e.value.headers["Allow"] == allowed, e.value.headers
        assert json.load(e.value)["error"]["type"] == "invalid_request_error"


def test_cross_origin_requests_only_from_the_allowed_origins(server, engine, model_id):
    """CORS: a browser's preflight (OPTIONS) and request from an origin --allow-origin names get its
    Access-Control-Allow-Origin (the preflight needs no key, the request does; the clients' own headers, the openai
    and anthropic SDKs', allowed); another origin's, or any origin's on a server without the option, get none, so the
    browser keeps the answer from the page."""
    page, other = "http://localhost:3000", "http://evil.example"

    def preflight(url: str, origin: str):
        req = urllib.request.Request(url + "/v1/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-api-key,anthropic-version,"
                                              "anthropic-dangerous-direct-browser-access,x-stainless-os"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.headers

    def models(url: str, origin: str):
        req = urllib.request.Request(url + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.load(r)["data"][0]["id"] == model_id
            return r.headers

    with serving(engine, api_key=KEY, allow_origins=(page,)) as url:
        status, headers = preflight(url, page)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == page, headers
        assert "POST" in headers["Access-Control-Allow-Methods"] and "authorization" in \
            headers["Access-Control-Allow-Headers"].lower(), headers
        assert models(url, page)["Access-Control-Allow-Origin"] == page
        assert preflight(url, other)[1]["Access-Control-Allow-Origin"] is None
        assert models(url, other)["Access-Control-Allow-Origin"] is None
        req = urllib.request.Request(url + "/v1/models", headers={"Origin": page})  # no key: still refused
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 401
    status, headers = preflight(server.url, page)  # the default: no origin
    assert status == 405 and headers["Access-Control-Allow-Origin"] is None
    assert models(server.url, page)["Access-Control-Allow-Origin"] is None


def test_chat_with_a_model_without_chat_template_points_to_completions(server, model_id, engine, monkeypatch):
    """The 400 said "drop --chat", spqt generate's advice, to an HTTP client."""
    monkeypatch.setattr(engine.tokenizer.spec, "chat_template", None)
    status, body = server.raw("/v1/chat/completions", json.dumps({"model": model_id, "messages": CHAT}).encode())
    message = body["error"]["message"]
    assert status == 400 and body["error"]["param"] == "messages", body
    assert "/v1/completions" in message and "--chat" not in message, body


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server, model_id):
    def error(status, fragment, call):
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == status, e.value
        body = e.value.body
        assert set(body) >= {"message", "type", "code"} and fragment in body["message"], body

    client = server.client()
    error(401, "API key", lambda: server.client(key="wrong").chat.completions.create(model=model_id, messages=CHAT))
    error(404, "does not exist", lambda: client.chat.completions.create(model="gpt-4o", messages=CHAT))
    error(400, "max_tokens", lambda: client.completions.create(model=model_id, prompt=PROMPT, max_tokens=0))
    error(400, "n: Input should be less than or equal to 16",
          lambda: client.completions.create(model=model_id, prompt=PROMPT, n=17))
    error(400, "n: Input should be greater than or equal to 1",
          lambda: client.chat.completions.create(model=model_id, messages=CHAT, n=0))
    error(400, "seed", lambda: client.completions.create(model=model_id, prompt=PROMPT, seed=2**70))
    error(400, "temperature", lambda: client.completions.create(model=model_id, prompt=PROMPT, temperature=-1))
    long_prompt = "colors " * (2 * CTX)
    error(400, "context", lambda: client.completions.create(model=model_id, prompt=long_prompt, max_tokens=4))
    error(400, "context", lambda: client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=CTX))
    error(400, "context", lambda: client.chat.completions.create(model=model_id, stream=True, max_tokens=4,
                                                                 messages=[{"role": "user", "content": long_prompt}]))
    status, body = server.raw("/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "parse the JSON" in body["error"]["message"], body
    status, body = server.raw("/v1/chat/completions", json.dumps({"model": model_id}).encode())
    assert status == 400 and body["error"]["param"] == "messages", body
    status, body = server.raw("/v1/completions", b'{"prompt": "x", "temperature": NaN}')
    assert status == 400 and "NaN" in body["error"]["message"], body
    status, body = server.raw("/v1/chat/completions", b" " * (5 * 2**20))
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    status, body = server.raw("/v1/nothing-here")
    assert status == 404 and "error" in body, body
    status, body = server.raw("/v1/models", key="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key", body
    assert server.raw("/health", key="wrong")[0] == 200  # health needs no key
    ok = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=2)
    assert ok.choices[0].text
    assert server.health()["failed"] == 0


def _post(server, path: str, body: bytes, content_type: str | None) -> tuple[int, dict]:
    """(status, JSON) of a POST with this Content-Type header, or none (urllib would add a form's)."""
    import http.client

    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=120)
    headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": content_type} if content_type else {})}
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_without_max_tokens_the_answer_runs_to_the_contexts_end(server, model_id):
    """No max_tokens: a prompt one token short of the context gets one token, finish_reason length, usage summing to
    the context; a prompt that fills it is refused, the message saying it leaves no room (it said "max_tokens asks
    for 1 more", a field the request did not have)."""
    ids = [(7 * i) % 1000 + 100 for i in range(CTX)]
    client = server.client()
    last = client.completions.create(model=model_id, prompt=ids[:-1], temperature=0)
    assert last.choices[0].finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (CTX - 1, 1, CTX)
    status, body = server.raw("/v1/completions", json.dumps({"model": model_id, "prompt": ids}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    message = body["error"]["message"]
    assert f"the prompt has {CTX} and leaves no room for an answer" in message and "asks for" not in message, body


def test_hostile_bodies_are_400s_not_tracebacks(server, model_id):
    """The fiftieth session's sweep of the server: JSON nested past Python's recursion limit and a lone surrogate
    (valid JSON: a string cut in the middle of an emoji) were 500s with a traceback; a non-JSON Content-Type ran
    (text/plain is a form of request a web page sends cross-origin without asking first); a client that left
    before the end of its body logged a traceback. Now OpenAI-shaped 400 / 415 answers and no error in the log."""
    errors: list[str] = []

    class Errors(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    handler, uvicorn_log = Errors(), logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(handler)
    try:
        deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, body = server.raw("/v1/chat/completions", deep)
        assert status == 400 and "parse the JSON" in body["error"]["message"], body
        for path, doc in (("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi \ud800 x"}]}'),
                          ("/v1/completions", r'{"prompt": "hi \udfff", "max_tokens": 4, "stream": true}')):
            status, body = server.raw(path, doc.encode())
            assert status == 400 and "not Unicode text" in body["error"]["message"], body
        ok = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
        for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
            status, body = _post(server, "/v1/completions", ok, content_type)
            assert status == 415 and body["error"]["code"] == "unsupported_media_type", (content_type, body)
        assert _post(server, "/v1/completions", ok, "application/json; charset=utf-8")[0] == 200
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:  # 14 of the 1,000 bytes it announces, then gone
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt": "x"')
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while "POST /v1/completions 499 client_closed" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.05)
    finally:
        uvicorn_log.removeHandler(handler)
    assert errors == []
    assert server.health()["failed"] == 0


def test_a_plain_request_whose_client_leaves_is_logged_as_gone(server, model_id):
    """A client that stops waiting for a non-streamed answer cancels its job; the log said "the server is stopping"
    (503). Now: cancelled (client gone), 499 as nginx logs it; the next request is served."""
    before = server.health()["cancelled"]
    body = json.dumps({"prompt": "Once upon a time", "temperature": 0, "max_tokens": CTX - 8}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # the whole request, then gone once its job runs
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while not server.health()["running"]:
            assert time.monotonic() < deadline, server.health()
            time.sleep(0.02)
    deadline = time.monotonic() + 30  # (the 499 line is the HTTP side's, written after the worker's count)
    while (h := server.health())["cancelled"] == before or h["running"] or " 499 " not in server.log_text():
        assert time.monotonic() < deadline, (h, server.log_text()[-2000:])
        time.sleep(0.05)
    log = server.log_text()
    line = [ln for ln in log.splitlines() if "POST /v1/completions cancelled" in ln][-1]
    assert "cancelled (client gone) after" in line and int(re.search(r"completion (\d+) tokens", line).group(1)) < 40
    assert "POST /v1/completions 499 client_closed" in log and "server is stopping" not in log, log[-2000:]
    ok = server.client().completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=2)
    assert ok.choices[0].text


def test_json_types_are_strict_and_unhonoured_fields_refused(server, model_id):
    """As OpenAI checks a request: a value of another JSON type than the field's, or one this server would have to
    ignore, is a 400 naming the field (in param and message); what clients send (an integer temperature, nulls for
    defaults, a string or a list for stop and content, the fields this server ignores at their defaults, vLLM's
    top_k -1) passes."""
    chat = {"model": model_id, "messages": CHAT, "max_tokens": 1}
    text = {"model": model_id, "prompt": PROMPT, "max_tokens": 1}
    one_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    refused = [(chat, {"stream": "yes"}, "stream"), (chat, {"stream": 1}, "stream"),
               (chat, {"max_tokens": "5"}, "max_tokens"), (chat, {"max_tokens": 5.0}, "max_tokens"),
               (chat, {"temperature": "0.5"}, "temperature"), (chat, {"temperature": True}, "temperature"),
               (chat, {"n": "1"}, "n"), (chat, {"seed": "3"}, "seed"), (chat, {"stop": 5}, "stop"),
               (text, {"stop": [f"s{i}" for i in range(17)]}, "stop"),
               (chat, {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
               (chat, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
               (chat, {"messages": one_image}, "messages[0].content[0].type"),
               (chat, {"frequency_penalty": 2.5}, "frequency_penalty"),
               (chat, {"presence_penalty": -3}, "presence_penalty"), (chat, {"logit_bias": {"a50": 10}}, "logit_bias"),
               (text, {"logit_bias": {"50": 101}}, "logit_bias"), (text, {"logit_bias": {"50": "1"}}, "logit_bias.50"),
               (text, {"logit_bias": {str(10**7): 1}}, "logit_bias"), (text, {"logit_bias": [1]}, "logit_bias"),
               (text, {"logit_bias": {"050": 1}}, "logit_bias"),
               (text, {"logit_bias": {str(t): 1 for t in range(1025)}}, "logit_bias"),
               (chat, {"tool_choice": "required"}, "tool_choice"), (chat, {"logprobs": 1}, "logprobs"),
               (chat, {"function_call": "required"}, "function_call"),
               (chat, {"top_logprobs": 2}, "top_logprobs"),
               (chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
               (chat, {"response_format": {"type": "json"}}, "response_format.type"),
               (chat, {"response_format": {"type": "json_schema"}}, "response_format"),
               (chat, {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
                "response_format.json_schema.name"),
               (text, {"guided_choice": []}, "guided_choice"), (text, {"guided_json": 5}, "guided_json"),
               (text, {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
               (text, {"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
               (chat, {"messages": [{"role": "user"}]}, "messages[0]"),
               (chat, {"messages": [{"role": "user", "content": None}]}, "messages[0]"),
               (text, {"best_of": 2}, "best_of"), (text, {"echo": 1}, "echo"), (text, {"suffix": "x"}, "suffix"),
               (text, {"logprobs": True}, "logprobs"), (text, {"logprobs": 21}, "logprobs"),
               (text, {"logprobs": -1}, "logprobs"), (text, {"prompt": []}, "prompt"), (text, {"prompt": [[]]}, "prompt"),
               (text, {"prompt": [PROMPT, ""]}, "prompt"), (text, {"prompt": [1, "a"]}, "prompt"),
               (text, {"prompt": [True]}, "prompt"), (text, {"prompt": [[1.5]]}, "prompt"),
               (text, {"prompt": {"a": 1}}, "prompt"), (text, {"prompt": [5, 10**9]}, "prompt"),
               (text, {"prompt": [[5], [-1]]}, "prompt"), (text, {"prompt": [[5]] * 257}, "prompt"), (text, {"max_tokens": 0}, "max_tokens"),
               (text, {"max_tokens": -1, "echo": True}, "max_tokens"),
               # OpenAI's fields for audio, web search or reasoning (refused by OpenAI for models without them)
               (chat, {"modalities": ["text", "audio"]}, "modalities"), (chat, {"audio": {"voice": "alloy"}}, "audio"),
               (chat, {"web_search_options": {}}, "web_search_options"),
               (chat, {"reasoning_effort": "high"}, "reasoning_effort"), (chat, {"verbosity": "low"}, "verbosity"),
               # other servers' sampling fields (vLLM, llama.cpp; Open WebUI sends min_p): out of range, or not
               # honoured here
               (chat, {"min_p": 1.5}, "min_p"), (text, {"top_k": -2}, "top_k"),
               (text, {"repetition_penalty": 0}, "repetition_penalty"),
               (chat, {"repeat_penalty": -1.1}, "repeat_penalty"), (chat, {"repeat_penalty": 101}, "repeat_penalty"),
               (text, {"repetition_penalty": 1.2, "repeat_penalty": 1.1}, "repeat_penalty"),
               (chat, {"typical_p": 0.9}, "typical_p"),
               (chat, {"min_tokens": 5}, "min_tokens"), (text, {"ignore_eos": True}, "ignore_eos")]
    for base, change, param in refused:
        path = "/v1/chat/completions" if base is chat else "/v1/completions"
        status, body = server.raw(path, json.dumps({**base, **change}).encode())
        error = body.get("error") or {}
        assert (status, error.get("type"), error.get("param")) == (400, "invalid_request_error", param), (change, body)
        assert param in error["message"], body
    accepted = [{"temperature": 0}, {"stop": "x"}, {"stop": ["x", "y"]}, {"stop": [f"s{i}" for i in range(16)]},
                {"temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None,
                 "logit_bias": None},
                {"max_tokens": None, "max_completion_tokens": 1, "seed": 7, "top_k": 5, "user": "u",
                 "metadata": {"k": "v"}},
                {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
                 "parallel_tool_calls": False, "tool_choice": "none"},
                {"logprobs": False, "top_logprobs": 0}, {"logprobs": True, "top_logprobs": 20},
                {"frequency_penalty": 0.5, "presence_penalty": -1, "logit_bias": {"50": 10, "7": -100}, "min_p": 0.1,
                 "repetition_penalty": 1.2, "repeat_penalty": 1.2}, {"repeat_penalty": 1.1, "frequency_penalty": 2},
                {"modalities": ["text"], "audio": None, "reasoning_effort": None, "store": False,
                 "service_tier": "auto", "prediction": {"type": "content", "content": "Red"}, "min_p": 0,
                 "repetition_penalty": 1, "typical_p": 1.0, "min_tokens": 0, "ignore_eos": False},
                {"top_k": -1, "temperature": 0.7},  # (vLLM's top_k for no cut, which its clients send)
                {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                              {"role": "assistant", "content": None}, {"role": "assistant"}, *CHAT],
                 "stream_options": {"include_usage": None}}]
    for change in accepted:
        status, body = server.raw("/v1/chat/completions", json.dumps({**chat, **change}).encode())
        assert status == 200 and body["usage"]["completion_tokens"] == 1, (change, body)


def test_penalties_and_logit_bias_are_the_generators(server, model_id, engine, loaded):
    """OpenAI's frequency / presence penalties, logit_bias, and vLLM's repetition_penalty (llama.cpp's repeat_penalty)
    and min_p: a completion is a Generator's answer under the same Sampling (greedy and seeded); a bias of +100 on a
    token makes the answer that token; logprobs stay the model's own (the biased token's is not 0)."""
    from spqt.generate import Generator, Sampling

    client, tok = server.client(), engine.tokenizer
    reference = Generator(loaded, "cpu", max_len=CTX)
    shaping = dict(frequency_penalty=1.2, presence_penalty=0.4, repetition_penalty=1.3, min_p=0.05)
    # (prompts no request before shares a prefix with: a whole prefill, as the reference's, not the prompt cache's)
    for prompt, extra, sampling in (("Colours of the rainbow:", {}, Sampling(**shaping)),
                                    ("My favourite animals are", {"temperature": 0.8, "seed": 5},
                                     Sampling(0.8, seed=5, **shaping))):
        ids = tok.encode(prompt)
        body = {**GREEDY, "max_tokens": 20, **shaping, **extra}
        got = client.completions.create(model=model_id, prompt=prompt, extra_body=body).choices[0].text
        want = reference.generate(ids, 20, sampling, stop_ids=engine.stop_ids).tokens
        plain = reference.generate(ids, 20, Sampling(**{k: v for k, v in extra.items() if k != "seed"}, seed=5),
                                   stop_ids=engine.stop_ids).tokens
        assert got == tok.decode([t for t in want if t not in engine.stop_ids]) and want != plain, extra
    renamed = client.completions.create(model=model_id, prompt=PROMPT, **GREEDY,
                                        extra_body={"repeat_penalty": 1.3}).choices[0].text
    assert renamed == client.completions.create(model=model_id, prompt=PROMPT, **GREEDY,
                                                extra_body={"repetition_penalty": 1.3}).choices[0].text
    forced = tok.encode(" red")[-1]
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                  logit_bias={str(forced): 100}).choices[0]
    assert r.text == tok.decode([forced] * 3) and all(lp < -0.01 for lp in r.logprobs.token_logprobs[1:])
    assert client.completions.create(model=model_id, prompt=PROMPT, max_tokens=3, temperature=0,
                                     logit_bias={str(forced): -100}).choices[0].text != r.text
    # a repetition penalty in range but 0 in float32 (a seen token's logit over it inf: was a 500): the prompt's
    # tokens, which it raises above every other, are the answer
    tiny = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, temperature=0.7, seed=2, logprobs=0,
                                     extra_body={"repetition_penalty": 1e-45}).choices[0]
    assert set(tiny.logprobs.tokens) <= {tok.decode([t]) for t in tok.encode(PROMPT)}, tiny.logprobs.tokens


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus' text format (0 where the sample is not there yet)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def test_metrics_count_the_jobs(server, model_id):
    """/metrics: each finished job counted by its finish reason, its prompt, cached and generated tokens as the usage
    says, its seconds observed once; the queue's gauges and the model's info; the key required."""
    def scrape() -> str:
        req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.headers.get_content_type() == "text/plain"
            return r.read().decode()

    names = ['spqt_requests_total{finish_reason="length"}', 'spqt_requests_total{finish_reason="stop"}',
             "spqt_prompt_tokens_total", "spqt_prompt_tokens_cached_total", "spqt_generation_tokens_total",
             "spqt_request_duration_seconds_count", "spqt_time_per_output_token_seconds_count"]
    before = scrape()
    client = server.client()
    usage = [client.completions.create(model=model_id, prompt=PROMPT, max_tokens=5, temperature=0, n=2).usage,
             client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=200, temperature=0).usage]
    after = scrape()
    delta = {n: metric(after, n) - metric(before, n) for n in names}
    assert delta['spqt_requests_total{finish_reason="length"}'] == 2  # (the two choices of max_tokens 5)
    assert delta['spqt_requests_total{finish_reason="stop"}'] == 1  # (the chat answer ends by itself)
    # (usage counts a request's prompt once, the metrics each job's: the completions' two choices twice)
    assert delta["spqt_prompt_tokens_total"] == 2 * usage[0].prompt_tokens + usage[1].prompt_tokens
    assert delta["spqt_generation_tokens_total"] == sum(u.completion_tokens for u in usage)
    assert delta["spqt_prompt_tokens_cached_total"] >= sum(
        (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0 for u in usage)
    assert delta["spqt_request_duration_seconds_count"] == 3 == delta["spqt_time_per_output_token_seconds_count"]
    assert "spqt_requests_waiting 0.0" in after and "spqt_requests_running 0.0" in after
    assert f'spqt_model_info{{ctx="{CTX}",device="cpu",model="{model_id}",sparsity="0"}} 1.0' in after
    assert server.raw("/metrics", key="wrong")[0] == 401


def test_metrics_count_a_job_that_fails_in_the_engine(server, model_id, engine, monkeypatch):
    """A job whose generation raises is counted as finish reason error, its seconds observed, and its client still
    gets the 500 with the error's message; the server goes on serving."""
    from spqt.errors import SpqtError

    def fails(prompt, n, sampling, **kw):
        raise SpqtError("the logits of the prompt are not finite numbers in fp16")

    def scrape() -> str:
        return urllib.request.urlopen(urllib.request.Request(
            server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}), timeout=60).read().decode()

    names = ['spqt_requests_total{finish_reason="error"}', "spqt_request_duration_seconds_count",
             "spqt_prompt_tokens_total", "spqt_generation_tokens_total"]
    before = scrape()
    with monkeypatch.context() as patch:
        patch.setattr(engine.generator, "generate", fails)
        status, body = server.raw("/v1/completions", json.dumps(
            {"model": model_id, "prompt": PROMPT, "max_tokens": 3}).encode())
    after = scrape()
    assert status == 500 and body["error"]["type"] == "server_error"
    assert body["error"]["message"] == "generation failed: the logits of the prompt are not finite numbers in fp16"
    delta = {n: metric(after, n) - metric(before, n) for n in names}
    assert delta == {names[0]: 1, names[1]: 1, names[2]: 0, names[3]: 0}
    assert server.client().completions.create(model=model_id, prompt=PROMPT, max_tokens=2).choices[0].text


def test_tokenize_and_detokenize(server, model_id, engine):
    """/tokenize as llama.cpp's server (content, with_pieces) and vLLM's (prompt, messages) answer it, /detokenize
    back to the text; the refusals name their field."""
    tok, text = engine.tokenizer, "Héllo wörld, 3 primary colors"
    status, body = server.raw("/tokenize", json.dumps({"content": text}).encode())
    assert status == 200 and body == {"tokens": tok.encode(text, add_bos=False), "count": len(body["tokens"]),
                                      "max_model_len": CTX}
    status, body = server.raw("/tokenize", json.dumps({"model": model_id, "prompt": text}).encode())
    assert status == 200 and body["tokens"] == tok.encode(text)
    status, pieces = server.raw("/tokenize", json.dumps({"content": text, "with_pieces": True}).encode())
    assert [p["id"] for p in pieces["tokens"]] == tok.encode(text, add_bos=False)
    assert b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode()
                    for p in pieces["tokens"]) == text.encode()
    status, chat = server.raw("/tokenize", json.dumps({"messages": CHAT}).encode())
    assert status == 200 and chat["tokens"] == tok.chat_messages(CHAT) and chat["count"] == len(chat["tokens"])
    for body in ({"tokens": tok.encode(text)}, {"model": model_id, "tokens": chat["tokens"]}):
        status, back = server.raw("/detokenize", json.dumps(body).encode())
        assert status == 200 and back["content"] == back["prompt"] == tok.decode(body["tokens"])
    for path, body, param in [("/tokenize", {}, None), ("/tokenize", {"content": "a", "prompt": "b"}, None),
                              ("/tokenize", {"messages": CHAT, "add_generation_prompt": False},
                               "add_generation_prompt"),
                              ("/tokenize", {"content": "a", "add_special": True, "add_special_tokens": False}, None),
                              ("/tokenize", {"content": "a", "chat_template_kwargs": {"x": 1}}, None),
                              ("/tokenize", {"messages": CHAT, "chat_template_kwargs": {"tokenize": 1}},
                               "chat_template_kwargs"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens"), ("/detokenize", {"tokens": "a"}, "tokens")]:
        status, err = server.raw(path, json.dumps(body).encode())
        assert status == 400 and err["error"]["param"] == param, (path, body, err)
    assert server.raw("/tokenize", json.dumps({"content": "a"}).encode(), key="wrong")[0] == 401
    assert server.raw("/tokenize", json.dumps({"model": "other", "content": "a"}).encode())[0] == 404


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def test_structured_output_keeps_to_its_grammar(server, model_id, engine, loaded):
    """response_format json_schema and json_object (chat and completions), llama.cpp's grammar and json_schema, vLLM's
    guided_choice, guided_regex and structured_outputs: each answer keeps to its grammar and ends with the model's end
    (finish stop); a greedy answer is a Generator's under the same grammar, streamed or not; the refusals name their
    field."""
    from spqt import grammar
    from spqt.generate import Generator, Sampling

    client, tok = server.client(), engine.tokenizer
    ask = [{"role": "user", "content": "Give the name and age of a famous scientist as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=model_id, messages=ask, max_tokens=80, temperature=0,
                                       response_format=fmt).choices[0]
    person = json.loads(r.message.content)
    assert r.finish_reason == "stop" and set(person) == {"name", "age"} and 0 <= person["age"] <= 150
    reference = Generator(loaded, "cpu", max_len=CTX)
    schema = grammar.json_schema(PERSON, engine.vocabulary)
    want = reference.generate(tok.chat_messages(ask), 80, Sampling(grammar=schema), stop_ids=engine.stop_ids)
    assert r.message.content == tok.decode(want.tokens[:-1])
    streamed = client.chat.completions.create(model=model_id, messages=ask, max_tokens=80, temperature=0,
                                              response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.message.content
    sampled = client.chat.completions.create(model=model_id, messages=ask, max_tokens=80, temperature=1.0, seed=3,
                                             response_format=fmt, n=2)
    for choice in sampled.choices:
        assert choice.finish_reason == "stop" and set(json.loads(choice.message.content)) == {"name", "age"}
    first = [client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=1, temperature=0,
                                            **extra).choices[0].message.content
             for extra in ({"response_format": {"type": "json_object"}}, {})]
    assert first[0].startswith("{") and not first[1].startswith("{"), first  # (an object's first token)
    text = client.completions.create(model=model_id, prompt="A JSON record of a person:", max_tokens=80,
                                     temperature=0, extra_body={"response_format": fmt}).choices[0]
    assert text.finish_reason == "stop" and set(json.loads(text.text)) == {"name", "age"}
    for extra, check in [({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
                         ({"guided_regex": "[A-Z][a-z]{2,8}, [0-9]{4}"},
                          lambda t: re.fullmatch("[A-Z][a-z]{2,8}, [0-9]{4}", t)),
                         ({"grammar": 'root ::= ("yes" | "no") "!"'}, lambda t: t in ("yes!", "no!")),
                         ({"json_schema": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
                          lambda t: all(isinstance(b, bool) for b in json.loads(t))),
                         ({"structured_outputs": {"choice": ["cat", "dog"]}}, lambda t: t in ("cat", "dog")),
                         # a schema as its JSON text, as vLLM takes guided_json and structured_outputs.json
                         ({"guided_json": '{"enum": ["up", "down"]}'}, lambda t: t in ('"up"', '"down"')),
                         ({"structured_outputs": {"json": '{"type": "boolean"}'}}, lambda t: t in ("true", "false")),
                         ({"structured_outputs": {"json_object": True}, "max_tokens": 1},
                          lambda t: t.startswith("{"))]:
        c = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=extra.get("max_tokens", 40), temperature=0,
                                      extra_body={k: v for k, v in extra.items() if k != "max_tokens"}).choices[0]
        assert c.finish_reason == ("length" if "max_tokens" in extra else "stop") and check(c.text), (extra, c.text)
    chat = {"model": model_id, "messages": CHAT, "max_tokens": 8}
    for change, param in [({"guided_json": {"type": "objectx"}}, "guided_json"), ({"guided_json": "{x"}, "guided_json"),
                          ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json"),
                          ({"guided_regex": "[0-9"}, "guided_regex"), ({"grammar": "root ::= ("}, "grammar"),
                          ({"guided_grammar": 'root ::= "x" root'}, "guided_grammar"),  # (x forever: was a 500)
                          ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
                          ({"response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]}, "response_format")]:
        status, body = server.raw("/v1/chat/completions", json.dumps({**chat, **change}).encode())
        error = body.get("error") or {}
        assert (status, error.get("param")) == (400, param), (change, body)
        assert "\n" not in error["message"] and param in error["message"], body


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


def test_tool_calls_read_from_the_answer(server, model_id, engine, monkeypatch):
    """tools go to the chat template (and tool_choice 'none' keeps them out); an answer's <tool_call> JSON comes
    back as OpenAI's tool_calls with finish_reason tool_calls, plain or streamed (the text before the call as
    content, nothing of the call), one call where parallel_tool_calls is false; a conversation's calls and tool
    results reach the template; a model whose template takes no tools refuses them."""
    from spqt.generate import GenerationResult

    tok = engine.tokenizer
    status, body = server.raw("/v1/chat/completions", json.dumps(
        {"model": model_id, "messages": CHAT, "tools": [WEATHER_TOOL]}).encode())
    assert status == 400 and body["error"]["param"] == "tools" and "takes no tools" in body["error"]["message"]
    monkeypatch.setattr(tok, "spec", dataclasses.replace(tok.spec, chat_template=TOOL_TEMPLATE))
    monkeypatch.setattr(tok, "_hf", None)
    prompts, answer = [], ["Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                           "{\"city\": \"Paris\"}}\n</tool_call>"]

    def answers(prompt, n, sampling, stop_ids=(), on_token=None, on_logits=None, **kw):  # the model "answers"
        prompts.append(tok.decode(prompt))  # answer[0] (random logits where logprobs are asked)
        out, ids = [], tok.backend.encode(answer[0], add_special_tokens=False).ids
        for t in ids[:n]:
            if on_logits:
                on_logits(torch.randn(1, engine.generator.loaded.config.vocab_size))
            out.append(t)
            if on_token and on_token(t):
                break
        return GenerationResult(out, len(prompt), 0.01, 0.01, finish_reason="length" if len(ids) > n else "stop")

    monkeypatch.setattr(engine.generator, "generate", answers)
    client = server.client()
    ask = dict(model=model_id, messages=CHAT, tools=[WEATHER_TOOL], temperature=0)
    plain = client.chat.completions.create(**ask).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.content == "Let me check."
    (call,) = plain.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert '"name": "get_weather"' in prompts[-1] and '"description": "The weather in a city."' in prompts[-1]
    chunks = list(client.chat.completions.create(stream=True, **ask))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert content.strip() == "Let me check." and "tool_call" not in content
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # logprobs streamed with tools: every token's entry arrives (the held text's with the content after it)
    chunks = list(client.chat.completions.create(stream=True, logprobs=True, **ask))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert "".join(e.token for e in entries) == answer[0]
    # the wire: a message's calls have no index (a streamed delta's have); a call cut by max_tokens after its
    # JSON is a call, finish_reason length
    status, body = server.raw("/v1/chat/completions", json.dumps(ask).encode())
    assert status == 200 and "index" not in body["choices"][0]["message"]["tool_calls"][0]
    cut = client.chat.completions.create(max_tokens=len(tok.backend.encode(answer[0]).ids) - 1, **ask).choices[0]
    assert cut.finish_reason == "length" and [c.function.name for c in cut.message.tool_calls] == ["get_weather"]
    # a tool not offered: its call stays text
    answer[0] = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    other = client.chat.completions.create(**ask).choices[0]
    assert (other.finish_reason, other.message.content, other.message.tool_calls) == ("stop", answer[0], None)
    # two calls; parallel_tool_calls false keeps the first
    answer[0] = ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>"
                 "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>")
    both = client.chat.completions.create(**ask).choices[0].message
    assert both.content is None and [json.loads(c.function.arguments)["city"] for c in both.tool_calls] == \
        ["Oslo", "Rome"] and len({c.id for c in both.tool_calls}) == 2
    first = client.chat.completions.create(parallel_tool_calls=False, **ask).choices[0].message
    assert [json.loads(c.function.arguments)["city"] for c in first.tool_calls] == ["Oslo"]
    # tool_choice none: no tools in the prompt, the answer's text as it is
    none = client.chat.completions.create(tool_choice="none", **ask).choices[0]
    assert none.finish_reason == "stop" and none.message.content == answer[0] and not none.message.tool_calls
    assert "Tools:" not in prompts[-1]
    # an answer without a call
    answer[0] = "It is sunny."
    sunny = client.chat.completions.create(**ask).choices[0]
    assert (sunny.finish_reason, sunny.message.content, sunny.message.tool_calls) == ("stop", "It is sunny.", None)
    # the call and its result in the conversation reach the template
    turn = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    client.chat.completions.create(**{**ask, "messages": turn})
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompts[-1]
    assert "<tool_response>sunny, 21 C</tool_response>" in prompts[-1]
    for bad, param in ((dict(turn[2], tool_call_id=None), "messages[1]"),
                       ({**turn[1], "tool_calls": [{**turn[1]["tool_calls"][0], "function": {
                           "name": "get_weather", "arguments": "{city"}}]},
                        "messages[1].tool_calls[0].function.arguments"),
                       ({"role": "user", "content": "x", "tool_calls": turn[1]["tool_calls"]}, "messages[1]")):
        messages = [*CHAT, bad]
        status, body = server.raw("/v1/chat/completions", json.dumps({**ask, "messages": messages}).encode())
        assert status == 400 and body["error"]["param"] == param, (bad, body)
    status, body = server.raw("/v1/chat/completions", json.dumps({**ask, "tools": [
        {"type": "function", "function": {"name": "no spaces allowed"}}]}).encode())
    assert status == 400 and body["error"]["param"] == "tools[0].function.name", body


def test_reasoning_content_apart_from_the_answer(server, model_id, engine, monkeypatch):
    """Where the template writes think tags, the answer's <think> text is reasoning_content and the rest content,
    plain and streamed (the deltas join to the same), after a prompt that opened the block too; thinking cut by
    max_tokens is all reasoning; beside a tool call; --reasoning-format none keeps it all content; the default model's
    template (no tags) leaves the text as it is; chat_template_kwargs reach the template."""
    from spqt.generate import GenerationResult

    tok = engine.tokenizer
    client = server.client()
    ask = dict(model=model_id, messages=CHAT, temperature=0)
    plain = client.chat.completions.create(**ask).choices[0].message
    assert plain.reasoning_content is None
    monkeypatch.setattr(tok, "spec", dataclasses.replace(tok.spec, chat_template=THINK_TEMPLATE))
    monkeypatch.setattr(tok, "_hf", None)
    prompts, answer = [], ["<think>\nRed, yellow, blue are the painter's.\n</think>\n\nRed, green and blue."]

    def answers(prompt, n, sampling, stop_ids=(), on_token=None, on_logits=None, **kw):  # the model "answers"
        prompts.append(tok.decode(prompt))
        out, ids = [], tok.backend.encode(answer[0], add_special_tokens=False).ids
        for t in ids[:n]:
            out.append(t)
            if on_token and on_token(t):
                break
        return GenerationResult(out, len(prompt), 0.01, 0.01, finish_reason="length" if len(ids) > n else "stop")

    monkeypatch.setattr(engine.generator, "generate", answers)

    def both(**extra) -> tuple:
        """(reasoning, content, finish) of the plain answer, checked equal to the streamed one's."""
        r = client.chat.completions.create(**ask, **extra).choices[0]
        chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **ask, **extra) if c.choices]
        streamed = ("".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks) or None,
                    "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason)
        assert streamed == (r.message.reasoning_content or None, r.message.content, r.finish_reason), (streamed, r)
        return streamed

    assert both() == ("Red, yellow, blue are the painter's.", "Red, green and blue.", "stop")
    answer[0] = "Let me think.\n</think>\nBlue."
    assert both(extra_body={"chat_template_kwargs": {"open_think": True}}) == ("Let me think.", "Blue.", "stop")
    assert prompts[-1].endswith("<think>\n")
    assert both(extra_body={"chat_template_kwargs": {"enable_thinking": False}})[1] == answer[0]
    assert prompts[-1].rstrip().endswith("</think>")
    answer[0] = "<think>\nA long way to go"
    ids = tok.backend.encode(answer[0], add_special_tokens=False).ids
    cut = both(max_tokens=len(ids) - 1)
    assert cut[1:] == ("", "length") and "A long way to go".startswith(cut[0]) and len(cut[0]) > 5, cut
    # beside tools: the thinking apart, then the call read from the content
    monkeypatch.setattr(tok, "spec", dataclasses.replace(tok.spec, chat_template=TOOL_TEMPLATE +
                                                         "{% if false %}<think></think>{% endif %}"))
    monkeypatch.setattr(tok, "_hf", None)
    answer[0] = '<think>The weather tool.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    for stream in (False, True):
        r = client.chat.completions.create(**ask, tools=[WEATHER_TOOL], stream=stream)
        if stream:
            chunks = [c.choices[0] for c in r if c.choices]
            thought = "".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks)
            calls = [d.function.name for c in chunks for d in c.delta.tool_calls or []]
            content, finish = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
        else:
            m = r.choices[0].message
            thought, content, finish = m.reasoning_content, m.content or "", r.choices[0].finish_reason
            calls = [c.function.name for c in m.tool_calls]
        assert (thought, content, calls, finish) == ("The weather tool.", "", ["get_weather"], "tool_calls"), stream
    monkeypatch.setattr(engine, "reasoning_format", "none")
    answer[0] = "<think>x</think>y"
    assert both() == (None, answer[0], "stop")
    for kwargs, param in [({"tools": []}, "chat_template_kwargs"),
                          ({"continue_final_message": True}, "chat_template_kwargs"),
                          ({"enable_thinking": "no", "open_think": None, "messages_x": 1}, None)]:
        status, body = server.raw("/v1/chat/completions", json.dumps({**ask, "chat_template_kwargs": kwargs}).encode())
        assert status == (400 if param else 200) and (body["error"]["param"] == param if param else True), body


def with_think_tokens(tokenizer_json: str, ids: tuple[int, int]) -> str:
    """A tokenizer's JSON with its added tokens ids renamed <think> and </think> (not special, as Qwen3's)."""
    data = json.loads(tokenizer_json)
    for entry in data["added_tokens"]:
        if entry["id"] in ids:
            name = ("<think>", "</think>")[ids.index(entry["id"])]
            data["model"]["vocab"][name] = data["model"]["vocab"].pop(entry["content"])
            entry.update(content=name, special=False)
    return json.dumps(data)


@pytest.fixture
def thinking_model(engine, monkeypatch):
    """The served model as a reasoning model: THINK_TEMPLATE, its added tokens 12 and 13 renamed <think> and
    </think>; its answers the wanted text's tokens, each on top of random logits (+50), then the sampler's shaping (a
    grammar's or a budget's masks) and argmax: .wanted (a one-item list: the text), .gates (each job's
    Sampling.grammar), .outs (each job's tokens), .spec and .original (the tokenizer's JSON before), .vocab."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from spqt import grammar
    from spqt.generate import GenerationResult
    from spqt.sampling import LogitShaper

    tok, vocab = engine.tokenizer, engine.generator.loaded.config.vocab_size
    original = tok.spec.tokenizer_json
    spec = dataclasses.replace(tok.spec, chat_template=THINK_TEMPLATE,
                               tokenizer_json=with_think_tokens(tok.spec.tokenizer_json, (12, 13)))
    for name, value in [("spec", spec), ("backend", Tokenizer.from_str(spec.tokenizer_json)), ("_hf", None),
                        ("_added", set(range(17)))]:
        monkeypatch.setattr(tok, name, value)
    monkeypatch.setattr(engine, "vocabulary", grammar.Vocabulary(tok, vocab, engine.stop_ids))
    model = SimpleNamespace(wanted=[""], gates=[], outs=[], spec=spec, original=original, vocab=vocab)

    def answers(prompt, n, sampling, stop_ids=(), on_token=None, on_logits=None, **kw):
        model.gates.append(sampling.grammar)
        noise = torch.Generator().manual_seed(sum(prompt) + 7919 * len(prompt))  # (a prompt's answers alike)
        shaper, out = LogitShaper(sampling, prompt, vocab, "cpu"), []
        script = tok.backend.encode(model.wanted[0], add_special_tokens=False).ids
        for i in range(n):
            logits = torch.randn(1, vocab, generator=noise)
            if i < len(script):
                logits[0, script[i]] += 50.0
            out.append(int(shaper(logits).argmax()))
            shaper.add(out[-1])
            if (on_token and on_token(out[-1])) or out[-1] in stop_ids:
                break
        model.outs.append(out)
        return GenerationResult(out, len(prompt), 0.01, 0.01, finish_reason="stop" if out[-1] in stop_ids else "length")

    monkeypatch.setattr(engine.generator, "generate", answers)
    return model


def test_structured_output_after_the_thinking(server, model_id, engine, thinking_model, monkeypatch):
    """A reasoning template's answer under structured output (guided_choice, streamed and not) thinks freely, then
    keeps to the grammar, as vLLM orders them: after a prompt that opened the think block, after a <think> the answer
    opened, or from the first token where it did not open one or the template closed the block (enable_thinking
    false); the content keeps to the grammar and the reasoning is the thinking. The model's tokens here: each step's
    wanted token on top of random logits, then the sampler's shaping (its grammar's masks) and argmax."""
    from spqt import grammar
    from spqt.tokenizer import TextTokenizer

    wanted, gates, spec, original, vocab = (thinking_model.wanted, thinking_model.gates, thinking_model.spec,
                                            thinking_model.original, thinking_model.vocab)
    colors = ["red", "green or blue"]
    ask = dict(model=model_id, messages=CHAT, temperature=0, max_tokens=40, extra_body={"guided_choice": colors})

    def both(**kwargs) -> tuple:
        """(reasoning, content) of the plain answer, checked equal to the streamed one's; both finish with stop."""
        args = {**ask, "extra_body": {**ask["extra_body"], **kwargs}}
        r = client.chat.completions.create(**args).choices[0]
        chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **args) if c.choices]
        streamed = ("".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks) or None,
                    "".join(c.delta.content or "" for c in chunks))
        assert streamed == (r.message.reasoning_content or None, r.message.content), (streamed, r)
        assert r.finish_reason == chunks[-1].finish_reason == "stop"
        return streamed

    client = server.client()
    wanted[0] = "<think>\nPrimary colors of light.\n</think>\n\nPurple!"
    thought, content = both()
    assert thought == "Primary colors of light." and content in colors, (thought, content)
    assert isinstance(gates[-1], grammar.AfterThinking) and not gates[-1].thinking
    wanted[0] = "Light.\n</think>\n\nPurple!"
    thought, content = both(chat_template_kwargs={"open_think": True})
    assert thought == "Light." and content in colors and gates[-1].thinking, (thought, content)
    # the last message's text also in the template's opening: the opening still read whole
    ask["messages"] = [{"role": "user", "content": "<think>"}]
    thought, content = both(chat_template_kwargs={"open_think": True})
    assert thought == "Light." and content in colors and gates[-1].thinking, (thought, content)
    ask["messages"] = CHAT
    wanted[0] = "Purple, <think>?"  # (no thinking opened: the grammar from the first token)
    assert both()[0] is None and both()[1] in colors
    wanted[0] = "<think>\nx</think>"
    thought, content = both(chat_template_kwargs={"enable_thinking": False})
    assert (thought, content in colors) == (None, True) and not isinstance(gates[-1], grammar.AfterThinking)
    # a vocabulary without the tags as tokens of their own: the grammar from the start, the answer all content
    untagged = TextTokenizer(dataclasses.replace(spec, tokenizer_json=original), engine.generator.loaded.config)
    monkeypatch.setattr(engine, "vocabulary", grammar.Vocabulary(untagged, vocab, engine.stop_ids))
    wanted[0] = "<think>\nPrimary colors of light.\n</think>\n\nPurple!"
    thought, content = both()
    assert (thought, content in colors) == (None, True) and not isinstance(gates[-1], grammar.AfterThinking)


def test_a_thinking_budget_ends_the_thinking(server, model_id, engine, thinking_model, monkeypatch):
    """thinking_token_budget (vLLM's; an extra field of the Responses request; the Messages API's
    thinking.budget_tokens): after that many thinking tokens the answer's next is </think>, forced; the reasoning is
    those tokens' text, streamed alike, and the answer goes on (free, or in its grammar); 0 closes at once. Where the
    template closed the block or writes no thinking there is nothing to bound. Where the tags are not tokens of their
    own: the chat's budget a 400 naming its field, the Messages' a target not kept."""
    from spqt import grammar
    from spqt.tokenizer import TextTokenizer

    tok, client = engine.tokenizer, server.client()
    close = tok.backend.token_to_id("</think>")
    thinking_model.wanted[0] = "<think>\nPrimary colors of light are red, green and blue.\n</think>\n\nPurple!"
    script = tok.backend.encode(thinking_model.wanted[0], add_special_tokens=False).ids
    ask = dict(model=model_id, messages=CHAT, temperature=0, max_tokens=30)

    def both(**extra) -> tuple:
        """(reasoning, content, tokens) of the plain answer, its reasoning and content checked equal to the
        streamed one's."""
        r = client.chat.completions.create(**ask, extra_body=extra).choices[0]
        tokens = thinking_model.outs[-1]
        chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **ask, extra_body=extra)
                  if c.choices]
        streamed = ("".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks) or None,
                    "".join(c.delta.content or "" for c in chunks))
        assert streamed == (r.message.reasoning_content or None, r.message.content), (streamed, r)
        assert thinking_model.outs[-1] == tokens
        return r.message.reasoning_content, r.message.content, tokens

    for budget in (0, 3):
        thought, content, tokens = both(thinking_token_budget=budget)
        assert tokens[:budget + 1] == script[:budget + 1] and tokens[budget + 1] == close, tokens
        assert thought == (tok.decode(script[1:budget + 1]).strip("\n") or None), thought
        assert content == tok.decode(tokens[budget + 2:]).lstrip() and gates_budget(thinking_model) == budget
    # a budget and a grammar: the thinking bounded, then the grammar
    colors = ["red", "green or blue"]
    thought, content, tokens = both(thinking_token_budget=2, guided_choice=colors)
    assert tokens[3] == close and thought == tok.decode(script[1:3]).strip("\n") and content in colors
    # the block opened by the template: the budget counts from the answer's first token
    thinking_model.wanted[0] = "Light is red, green and blue.\n</think>\n\nPurple!"
    thought, content, tokens = both(thinking_token_budget=4, chat_template_kwargs={"open_think": True})
    assert tokens[4] == close and thought == tok.decode(tokens[:4]).strip("\n"), tokens
    # the Responses request's extra field; the Messages API's budget_tokens
    r = client.responses.create(model=model_id, input=CHAT[0]["content"], temperature=0, max_output_tokens=30,
                                extra_body={"thinking_token_budget": 4, "chat_template_kwargs": {"open_think": True}})
    assert r.output[0].content[0].text == thought and thinking_model.outs[-1][4] == close
    body = dict(model=model_id, messages=CHAT, max_tokens=30, temperature=0,
                thinking={"type": "enabled", "budget_tokens": 4}, chat_template_kwargs={"open_think": True})
    status, message = server.raw("/v1/messages", json.dumps(body).encode())
    assert status == 200 and message["content"][0] == {"type": "thinking", "thinking": thought, "signature": ""}
    assert thinking_model.outs[-1][4] == close
    # --reasoning-format none: the budget holds, the thinking stays in the content; a grammar there holds from the
    # first token (no budget)
    monkeypatch.setattr(engine, "reasoning_format", "none")
    thinking_model.wanted[0] = "<think>\nPrimary colors of light are red, green and blue.\n</think>\n\nPurple!"
    r = client.chat.completions.create(**ask, extra_body={"thinking_token_budget": 3}).choices[0]
    assert thinking_model.outs[-1][:4] == script[:4] and thinking_model.outs[-1][4] == close
    assert getattr(r.message, "reasoning_content", None) is None and r.message.content.startswith("<think>")
    r = client.chat.completions.create(**ask, extra_body={"thinking_token_budget": 3, "guided_choice": colors})
    assert r.choices[0].message.content in colors and gates_budget(thinking_model) is None
    monkeypatch.setattr(engine, "reasoning_format", "auto")
    # spqt serve --thinking-budget: the budget of a request that gives none
    monkeypatch.setattr(engine, "thinking_budget", 2)
    client.chat.completions.create(**ask)
    assert thinking_model.outs[-1][3] == close and gates_budget(thinking_model) == 2
    client.chat.completions.create(**ask, extra_body={"thinking_token_budget": 5})
    assert thinking_model.outs[-1][6] == close and gates_budget(thinking_model) == 5
    status, message = server.raw("/v1/messages", json.dumps({**body, "thinking": {"type": "adaptive"}}).encode())
    assert status == 200 and gates_budget(thinking_model) == 2 and thinking_model.outs[-1][2] == close
    monkeypatch.setattr(engine, "thinking_budget", None)
    # nothing to bound: the block closed by the template
    both(thinking_token_budget=1, chat_template_kwargs={"enable_thinking": False})
    assert thinking_model.gates[-1] is None
    # the tags not tokens of their own: the chat's budget refused, the Messages' not kept
    untagged = TextTokenizer(dataclasses.replace(thinking_model.spec, tokenizer_json=thinking_model.original),
                             engine.generator.loaded.config)
    monkeypatch.setattr(engine, "vocabulary", grammar.Vocabulary(untagged, thinking_model.vocab, engine.stop_ids))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask, extra_body={"thinking_token_budget": 3})
    assert e.value.body["param"] == "thinking_token_budget" and "tokens of their own" in e.value.body["message"]
    status, message = server.raw("/v1/messages", json.dumps(body).encode())
    assert status == 200 and thinking_model.gates[-1] is None


def gates_budget(model) -> int | None:
    """The budget of the last job's AfterThinking (None where it had none)."""
    from spqt import grammar

    gate = model.gates[-1]
    return gate.budget if isinstance(gate, grammar.AfterThinking) else None


def test_tool_choice_required_or_named_forces_calls(server, model_id, engine, monkeypatch):
    """tool_choice 'required' and a named function: the model's own answer (greedy and sampled) is calls alone, of an
    offered tool (the named one), its arguments keeping to the function's parameters (a city string, days an integer
    in 1-7), finish_reason tool_calls; parallel_tool_calls false gives one call; a name not offered, or forcing with no
    tools, is a 400 naming tool_choice."""
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "spec", dataclasses.replace(tok.spec, chat_template=TOOL_TEMPLATE))
    monkeypatch.setattr(tok, "_hf", None)
    forecast = {"type": "function", "function": {"name": "get_forecast", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
        "additionalProperties": False}}}
    client = server.client()
    ask = dict(model=model_id, messages=[{"role": "user", "content": "What will the weather be in Paris?"}],
               tools=[weather, forecast], max_tokens=80)
    for choice, extra in [("required", {"temperature": 0}), ("required", {"temperature": 1.0, "seed": 4}),
                          ({"type": "function", "function": {"name": "get_forecast"}}, {"temperature": 0}),
                          ("required", {"temperature": 0, "parallel_tool_calls": False})]:
        r = client.chat.completions.create(tool_choice=choice, **ask, **extra).choices[0]
        assert r.finish_reason == "tool_calls" and r.message.tool_calls, (choice, r.message)
        for call in r.message.tool_calls:
            args = json.loads(call.function.arguments)
            assert call.function.name in ("get_weather", "get_forecast") and isinstance(args["city"], str)
            if isinstance(choice, dict):
                assert call.function.name == "get_forecast"
            if call.function.name == "get_forecast":
                assert set(args) == {"city", "days"} and 1 <= args["days"] <= 7
            else:
                assert set(args) == {"city"}
        if extra.get("parallel_tool_calls") is False:
            assert len(r.message.tool_calls) == 1
    plain = client.chat.completions.create(tool_choice="auto", temperature=0, **ask).choices[0]
    assert plain.finish_reason != "tool_calls" and not plain.message.tool_calls  # (the model alone answers in text)
    for change in ({"tool_choice": {"type": "function", "function": {"name": "rm_rf"}}},
                   {"tool_choice": "required", "tools": []}, {"tool_choice": "sometimes"}):
        status, body = server.raw("/v1/chat/completions", json.dumps({**ask, **change}).encode())
        assert status == 400 and body["error"]["param"] == "tool_choice", (change, body)


def test_logprobs_are_the_models_log_softmax_and_follow_the_text(server, model_id, engine, loaded):
    """Chat's logprobs / top_logprobs and the completions' logprobs: each token's log-softmax of the raw logits it was
    decoded from (not the sampling temperature's; as a Generator gives them, within the prompt cache's last bits),
    the most likely tokens first, each token named by its bytes, which join to the answer's text, streamed or not."""
    from spqt.generate import Sampling

    client, tok = server.client(), engine.tokenizer
    sampled = {"temperature": 0.7, "seed": 99, "max_tokens": 12}
    for stream, sampling in ((False, GREEDY), (True, GREEDY), (False, sampled), (True, sampled)):
        r = client.chat.completions.create(model=model_id, messages=CHAT, logprobs=True, top_logprobs=3, stream=stream,
                                           **sampling)
        chunks = list(r) if stream else [r]
        text = "".join((c.choices[0].delta.content if stream else c.choices[0].message.content) or ""
                       for c in chunks if c.choices)
        entries = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert text and bytes(b for t in entries for b in t.bytes).decode() == text, (stream, sampling)
        reference = generator_logprobs(loaded, "cpu", tok.chat_messages(CHAT), len(entries), CTX,
                                       Sampling(sampling["temperature"], seed=sampling.get("seed", 0)))
        for entry, (token, lp) in zip(entries, reference, strict=True):
            assert entry.bytes == list(tok.token_bytes(token)) and entry.token == bytes(entry.bytes).decode()
            assert entry.logprob == pytest.approx(float(lp[token]), abs=2e-3)
            top = [a.logprob for a in entry.top_logprobs]
            assert top == pytest.approx(lp.topk(3).values.tolist(), abs=2e-3) and top == sorted(top, reverse=True)
    plain = client.completions.create(model=model_id, prompt=PROMPT, logprobs=2, **GREEDY).choices[0]
    lp = plain.logprobs
    assert "".join(lp.tokens) == plain.text and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(alts) == 2 and max(alts.values()) == v for alts, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = [c.choices[0].logprobs for c in client.completions.create(model=model_id, prompt=PROMPT, logprobs=2,
                                                                         stream=True, **GREEDY) if c.choices]
    assert [t for c in streamed if c for t in c.tokens] == lp.tokens
    assert [o for c in streamed if c for o in c.text_offset] == lp.text_offset  # offsets in the whole text
    # a stop string: the tokens that hold text before it stay, those within it go; logprobs 0: the sampled token alone
    stop = plain.text[6:9]
    cut = client.completions.create(model=model_id, prompt=PROMPT, logprobs=0, stop=[stop], **GREEDY).choices[0]
    kept = cut.logprobs.tokens
    assert cut.text == plain.text[: plain.text.index(stop)] and kept == lp.tokens[: len(kept)]
    assert len("".join(kept[:-1])) < len(cut.text) <= len("".join(kept))
    assert cut.logprobs.top_logprobs == [{t: v} for t, v in zip(kept, cut.logprobs.token_logprobs)]
    # without logprobs asked, none are sent
    assert client.chat.completions.create(model=model_id, messages=CHAT, **GREEDY).choices[0].logprobs is None


def _alternatives(tok, top: torch.return_types.topk, token: int, logprob: float) -> dict[str, float]:
    """The completions' top_logprobs entry of a token from the reference's top k (the likelier of two equal texts)."""
    named: dict[str, float] = {}
    for i, v in (*zip(top.indices.tolist(), top.values.tolist()), (token, logprob)):
        named.setdefault(tok.token_bytes(i).decode("utf-8", errors="replace"), v)
    return named


def test_n_choices_are_the_seeds_one_request_each(server, model_id):
    """n choices: choice j of a seeded request is the n = 1 request's at seed + j (so the samples differ, and the
    request gives the same n again), streamed as plain; a completions batch orders prompt i's choice j at i * n + j;
    usage sums them all."""
    client = server.client()
    sampled = dict(model=model_id, temperature=0.9, seed=41, max_tokens=8)
    three = client.chat.completions.create(messages=CHAT, n=3, **sampled)
    alone = [client.chat.completions.create(messages=CHAT, **{**sampled, "seed": 41 + j}) for j in range(3)]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [r.choices[0].message.content for r in alone]
    assert len({c.message.content for c in three.choices}) > 1  # (three samples at T 0.9 of 8 tokens: not all one)
    assert three.usage.completion_tokens == sum(r.usage.completion_tokens for r in alone)
    assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counted once, as OpenAI does
    chunks = list(client.chat.completions.create(messages=CHAT, n=3, stream=True, **sampled))
    for j, want in enumerate(three.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == j]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == want.finish_reason
        assert "".join(c.delta.content or "" for c in mine) == want.message.content
    prompts = [PROMPT, "Water boils at"]
    batch = client.completions.create(model=model_id, prompt=prompts, n=2, temperature=0.9, seed=7, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    ones = [[client.completions.create(model=model_id, prompt=prompt, temperature=0.9, seed=7 + j, max_tokens=6)
             for j in range(2)] for prompt in prompts]
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert batch.choices[i * 2 + j].text == ones[i][j].choices[0].text, (i, j)
    assert batch.usage.prompt_tokens == sum(o[0].usage.prompt_tokens for o in ones)
    assert batch.usage.completion_tokens == sum(r.usage.completion_tokens for o in ones for r in o)
    streamed = list(client.completions.create(model=model_id, prompt=prompts, n=2, temperature=0.9, seed=7,
                                              max_tokens=6, stream=True, stream_options={"include_usage": True}))
    for k, want in enumerate(batch.choices):
        assert "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == k) == want.text
    assert streamed[-1].usage == batch.usage
    # seeds at the ends of the range: choice 1 of 2^64 - 1 wraps to 0; a negative seed's choices are those after it
    top = client.completions.create(model=model_id, prompt=PROMPT, n=2, temperature=0.9, seed=2**64 - 1, max_tokens=6)
    zero = client.completions.create(model=model_id, prompt=PROMPT, temperature=0.9, seed=0, max_tokens=6)
    assert top.choices[1].text == zero.choices[0].text
    low = client.completions.create(model=model_id, prompt=PROMPT, n=2, temperature=0.9, seed=-5, max_tokens=6)
    after = client.completions.create(model=model_id, prompt=PROMPT, temperature=0.9, seed=2**64 - 4, max_tokens=6)
    assert low.choices[1].text == after.choices[0].text


def test_echo_returns_the_prompt_and_its_tokens_logprobs(server, model_id, engine, loaded):
    """/v1/completions' echo, as lm-evaluation-harness's loglikelihood requests send it (echo, logprobs, max_tokens
    0 or 1, the prompt as token ids, several in a batch): the prompt's text before the answer; each prompt token's
    logprob the model's given the tokens before it (here a Generator's prefill of those; the first token's null), with
    its most likely tokens; the answer's entries those of the request without echo, offset past the prompt's text;
    a batch's choices each its prompt's alone, streamed or not, usage summed."""
    client, tok = server.client(), engine.tokenizer
    ids = tok.encode(PROMPT)
    reference = prefix_logprobs(loaded, "cpu", ids, CTX)
    only = client.completions.create(model=model_id, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0, temperature=0)
    choice, lp = only.choices[0], only.choices[0].logprobs
    assert (choice.text, choice.finish_reason) == (PROMPT, "length")
    assert (only.usage.prompt_tokens, only.usage.completion_tokens) == (len(ids), 0)
    assert lp.tokens == [tok.token_bytes(t).decode() for t in ids] and "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, alts, token, ref in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], ids[1:], reference, strict=True):
        assert got == pytest.approx(float(ref[token]), abs=2e-3)
        expected = _alternatives(tok, ref.topk(3), token, float(ref[token]))
        assert alts.keys() == expected.keys() and list(alts.values()) == pytest.approx(list(expected.values()), abs=2e-3)
    # with an answer: the prompt given as token ids, the answer as without echo
    plain = client.completions.create(model=model_id, prompt=PROMPT, logprobs=3, **GREEDY).choices[0]
    echoed = client.completions.create(model=model_id, prompt=ids, echo=True, logprobs=4, **GREEDY)  # (4: scored
    both = echoed.choices[0].logprobs  # again, not the last scores' 3 kept)
    assert echoed.choices[0].text == PROMPT + plain.text and both.tokens == lp.tokens + plain.logprobs.tokens
    assert both.token_logprobs[0] is None and both.top_logprobs[0] is None
    assert both.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:] + plain.logprobs.token_logprobs, abs=2e-3)
    assert both.text_offset == lp.text_offset + [len(PROMPT) + at for at in plain.logprobs.text_offset]
    assert echoed.usage.prompt_tokens_details.cached_tokens == 0  # the scoring pass's cache is the request's own
    # a batch: a string and token ids; each choice is its prompt's alone, streamed or not
    prompts = [PROMPT, tok.encode("Water boils at")]
    batch = dict(model=model_id, echo=True, logprobs=1, max_tokens=1, temperature=0)
    together = client.completions.create(prompt=prompts, **batch)
    alone = [client.completions.create(prompt=one, **batch) for one in prompts]
    assert [c.index for c in together.choices] == [0, 1]
    for got, want in zip(together.choices, alone):
        want = want.choices[0]
        assert (got.text, got.logprobs.tokens, got.logprobs.text_offset) == \
            (want.text, want.logprobs.tokens, want.logprobs.text_offset)
        assert got.logprobs.token_logprobs[1:] == pytest.approx(want.logprobs.token_logprobs[1:], abs=2e-3)
    assert (together.usage.prompt_tokens, together.usage.completion_tokens) == (len(ids) + len(prompts[1]), 2)
    chunks = list(client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True},
                                            **batch))
    for i, want in enumerate(together.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == want.text and mine[-1].finish_reason == want.finish_reason
        assert [t for c in mine if c.logprobs for t in c.logprobs.tokens] == want.logprobs.tokens
    assert chunks[-1].usage.prompt_tokens == together.usage.prompt_tokens and chunks[-1].choices == []
    # every token id checked against the vocabulary before anything runs
    status, body = server.raw("/v1/completions", json.dumps({**batch, "prompt": [ids, [5, 10**6]]}).encode())
    assert status == 400 and "prompt[1]: token id 1000000" in body["error"]["message"], body
    # the context: a prompt of all of it is scored alone, one token more is refused; a prompt of one token has
    # nothing to score
    full = (ids * CTX)[:CTX]
    alone = client.completions.create(model=model_id, prompt=full, echo=True, logprobs=0, max_tokens=0).choices[0]
    assert len(alone.logprobs.token_logprobs) == CTX and alone.logprobs.token_logprobs[0] is None
    status, body = server.raw("/v1/completions", json.dumps({**batch, "prompt": full + [5], "max_tokens": 0}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "max_tokens asks for" in body["error"]["message"], body
    one = client.completions.create(model=model_id, prompt=ids[:1], echo=True, logprobs=2, max_tokens=0).choices[0]
    assert one.logprobs.token_logprobs == [None] and one.logprobs.top_logprobs == [None]
    other = client.completions.create(model=model_id, prompt=ids[1:2], echo=True, logprobs=0, max_tokens=0).choices[0]
    assert other.logprobs.token_logprobs == [None]  # (logprobs 0, no top tokens: was an IndexError, a 500)


def test_a_prompt_scored_once_for_its_choices_and_again_for_more_top_tokens(server, model_id, engine, monkeypatch):
    """The last prompt scored is kept: a request's n echoed choices and a repeat of the prompt with as many top
    tokens or fewer run one scoring pass, with the same entries as a pass each (the fewer top tokens the first of
    the kept ones); a different prompt or more top tokens run a pass again."""
    client, passes = server.client(), []
    score = engine.generator.score
    monkeypatch.setattr(engine, "scored", None)
    monkeypatch.setattr(engine.generator, "score", lambda prompt, top, **kw: passes.append(top) or score(prompt, top,
                                                                                                          **kw))
    ask = dict(model=model_id, prompt=PROMPT, echo=True, max_tokens=2, temperature=0.9, seed=3)
    two = client.completions.create(n=2, logprobs=3, **ask)
    assert passes == [3]
    alone = []
    for j in range(2):  # each with a pass of its own
        monkeypatch.setattr(engine, "scored", None)
        alone.append(client.completions.create(logprobs=3, **{**ask, "seed": 3 + j}).choices[0])
    assert passes == [3, 3, 3]
    fewer = client.completions.create(logprobs=1, **ask).choices[0]
    assert passes == [3, 3, 3]
    monkeypatch.setattr(engine, "scored", None)
    fresh = client.completions.create(logprobs=1, **ask).choices[0]
    assert passes == [3, 3, 3, 1]
    n = len(engine.tokenizer.encode(PROMPT))
    for got, want in zip(two.choices, alone, strict=True):
        assert (got.text, got.logprobs.tokens) == (want.text, want.logprobs.tokens)
        assert got.logprobs.token_logprobs[1:] == pytest.approx(want.logprobs.token_logprobs[1:], abs=1e-6)
        assert got.logprobs.top_logprobs[1:n] == want.logprobs.top_logprobs[1:n]
    assert fewer.logprobs.token_logprobs[1:n] == fresh.logprobs.token_logprobs[1:n]
    assert fewer.logprobs.top_logprobs[1:n] == fresh.logprobs.top_logprobs[1:n]
    client.completions.create(logprobs=4, **ask)
    client.completions.create(logprobs=1, **{**ask, "prompt": PROMPT + " and"})
    assert passes == [3, 3, 3, 1, 4, 1]


def test_echo_lists_the_stop_token_that_ended_the_answer(server, model_id, engine, loaded, monkeypatch):
    """lm-evaluation-harness reads one entry after the prompt's from a max_tokens 1 request: where the model's token
    is a stop token (an end of text), the echo's logprobs list it last (its text not in the choice's); without echo
    an answer's entries are those of its text, as before."""
    client, tok = server.client(), engine.tokenizer
    ids = tok.encode(PROMPT)
    (first, reference), = generator_logprobs(loaded, "cpu", ids, 1, CTX)
    monkeypatch.setattr(engine, "stop_ids", engine.stop_ids | {first})
    ask = dict(model=model_id, prompt=ids, logprobs=1, max_tokens=1, temperature=0)
    echoed = client.completions.create(echo=True, **ask).choices[0]
    lp = echoed.logprobs
    assert (echoed.text, echoed.finish_reason) == (PROMPT, "stop") and len(lp.tokens) == len(ids) + 1
    assert lp.tokens[-1] == tok.token_bytes(first).decode(errors="replace") and lp.text_offset[-1] == len(PROMPT)
    assert lp.token_logprobs[-1] == pytest.approx(float(reference[first]), abs=2e-3)
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # lm-eval's greedy check
    plain = client.completions.create(**ask).choices[0]
    assert (plain.text, plain.finish_reason, plain.logprobs.tokens) == ("", "stop", [])


def test_echo_at_a_sparsity_level_scores_the_prompt_sparse(tiny_spqt, rng):
    """A server at a level: the echo's prompt logprobs are token-by-token sparse decoding's (every position with the
    thresholds on), not the dense prefill's; its answer is the one without echo; nothing counts as cached."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import Generator
    from spqt.serve.engine import Engine

    loaded = load_spqt(tiny_spqt)
    table = torch.from_numpy(rng.uniform(0.05, 0.3, (loaded.config.n_layers, 4))).float()
    engine = Engine(loaded, "cpu", 0.0, ctx=64, name="tiny")
    engine.generator.set_sparsity(0.4, table=table)
    ids = rng.integers(0, loaded.config.vocab_size, 19).tolist()
    ask = {"prompt": [ids], "logprobs": 2, "max_tokens": 3, "temperature": 0}
    with serving(engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        echoed = client.completions.create(model="tiny", echo=True, **ask)
        plain = client.completions.create(model="tiny", **ask).choices[0]
    lp = echoed.choices[0].logprobs
    reference = Generator(loaded, "cpu", max_len=64)
    reference.set_sparsity(0.4, table=table)
    sparse, dense = (token_by_token_logprobs(reference, ids, sparse=level) for level in (True, False))
    want = sparse.gather(1, torch.tensor(ids[1:]).view(-1, 1))[:, 0].tolist()
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert lp.token_logprobs[1:len(ids)] != pytest.approx(dense.gather(1, torch.tensor(ids[1:]).view(-1, 1))[:, 0]
                                                          .tolist(), abs=1e-4)
    # an answer ended by an end token (finish "stop": no stop strings here) has that token's entry last with an echo
    # alone (spqt.serve.engine's docstring: lm-evaluation-harness reads it); a seed whose answer ended early failed here
    extra = int(echoed.choices[0].finish_reason == "stop")
    answer = len(lp.tokens) - len(ids) - extra
    assert plain.finish_reason == echoed.choices[0].finish_reason and answer == len(plain.logprobs.tokens)
    assert echoed.choices[0].text.endswith(plain.text)
    assert lp.tokens[len(ids):len(ids) + answer] == plain.logprobs.tokens
    assert lp.token_logprobs[len(ids):len(ids) + answer] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert echoed.usage.prompt_tokens_details.cached_tokens == 0


def test_echo_of_a_model_that_puts_bos_first(server, model_id, engine, monkeypatch):
    """Where the model adds BOS to a text (Llama's GGUFs), an echoed string prompt is the client's text: the BOS the
    server put first is the first token (null logprob, offset 0, its text not in the echo), the rest as without it."""
    ask = dict(model=model_id, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    without = server.client().completions.create(**ask).choices[0]
    monkeypatch.setattr(engine.tokenizer, "config", dataclasses.replace(engine.tokenizer.config, add_bos=True))
    bos = engine.tokenizer.config.bos_id
    assert engine.tokenizer.encode(PROMPT)[0] == bos
    with_bos = server.client().completions.create(**ask).choices[0]
    lp = with_bos.logprobs
    assert with_bos.text == PROMPT and lp.tokens == [engine.tokenizer.token_bytes(bos).decode()] + without.logprobs.tokens
    assert lp.text_offset == [0] + without.logprobs.text_offset and lp.token_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])


def test_token_bytes_of_byte_level_and_sentencepiece_vocabularies(engine):
    """TextTokenizer.token_bytes: what a token stands for alone, split characters as their bytes. Byte-level (the
    default model) and SentencePiece-style (word mark, byte pieces, as Llama 2's tokenizer.json) vocabularies."""
    tok = engine.tokenizer
    text = "Hello \u65e5\u672c\u8a9e caf\u00e9"
    ids = tok.encode(text)
    assert b"".join(map(tok.token_bytes, ids)).decode() == text
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="replace")) < len(tok.token_bytes(i)) for i in ids)
    assert tok.token_bytes(tok.backend.token_to_id("<|im_end|>")) == b"<|im_end|>"  # a special token as its text
    llama = _sentencepiece_style(tok)
    assert [llama.token_bytes(i) for i in (2, 3, 4, 5, 1)] == [b" caf", b"\xc3", b"\xa9", b" ", b"<s>"]


def _sentencepiece_style(tok):
    """A TextTokenizer of a small SentencePiece-style vocabulary (word mark, byte pieces, a decoder that strips the
    text's leading space, as Llama 2's tokenizer.json): <s> 1, \u2581caf 2, <0xC3> 3, <0xA9> 4, \u2581 5."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    from spqt.tokenizer import TextTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "\u2581caf": 2, "<0xC3>": 3, "<0xA9>": 4, "\u2581": 5, "c": 6, "a": 7, "f": 8}
    sp = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.add_special_tokens(["<s>"])
    return TextTokenizer(dataclasses.replace(tok.spec, tokenizer_json=sp.to_str()), tok.config)


def test_text_stream_decodes_after_the_prompts_last_tokens(engine):
    """An answer's text decoded after the prompt's last tokens (TextStream's context): a SentencePiece decoder strips a
    text's leading space, so "caf" + " caf" came out as "cafcaf"; the context keeps it, and is dropped where its text
    ends in part of a character. A byte-level vocabulary's text is the same either way."""
    from spqt.serve.text import TextStream

    llama = _sentencepiece_style(engine.tokenizer)

    def answer(context):
        ts = TextStream(llama.decode, context=context)
        text = "".join(ts.feed(t) for t in (2, 3, 4)) + ts.flush()
        return text, ts.starts, ts.released()

    assert llama.decode([2]) == "caf"
    assert answer([1, 2]) == (" caf\u00e9", [0, 4, 4], 3)
    assert answer([]) == answer([1, 3]) == ("caf\u00e9", [0, 3, 3], 3)  # (context of half a character: none)
    tok = engine.tokenizer
    ids = tok.encode(" The answer: caf\u00e9 \u65e5\u672c")
    ts = TextStream(tok.decode, context=tok.encode(PROMPT)[-4:])
    assert "".join(ts.feed(t) for t in ids) + ts.flush() == tok.decode(ids)


def test_text_stream_hands_out_the_tokens_of_its_text():
    from spqt.serve.text import TextStream

    vocab = [b"Hel", b"lo", b" E", b"ND", b"\xc3", b"\xa9", b"!"]
    ts = TextStream(lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace"), [" END"])
    released = []
    for token in (0, 4, 5, 2, 1, 2, 3, 6):
        ts.feed(token)
        released.append(ts.released())
    # the split character's first token waits for its second; " E" waits while it may start " END"; the second
    # " E" starts the stop string, so neither it nor "ND" is ever handed out
    assert released == [1, 1, 3, 3, 5, 5, 5, 5] and ts.text[: ts.sent] == "Hel\u00e9 Elo" and ts.stopped
    assert ts.flush() == "" and ts.released() == 5
    ts = TextStream(lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace"), [" END"])
    for token in (0, 2):
        ts.feed(token)
    assert ts.released() == 1 and ts.flush() == " E" and ts.released() == 2


def test_stream_events_are_openai_chunks(server, model_id):
    """Role first (chat), text pieces, a finish_reason chunk, with include_usage a usage chunk whose choices are
    empty, then [DONE]; both endpoints."""
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": PROMPT})):
        status, events = server.raw(path, json.dumps({**body, "model": model_id, "stream": True, **GREEDY,
                                                      "stream_options": {"include_usage": True}}).encode())
        assert status == 200 and events[-1] == "[DONE]", events
        *pieces, finish, usage = events[:-1]
        n = usage["usage"]["completion_tokens"]
        assert usage["choices"] == [] and 1 <= n <= GREEDY["max_tokens"], usage
        assert finish["choices"][0]["finish_reason"] == ("length" if n == GREEDY["max_tokens"] else "stop"), finish
        assert all(e["usage"] is None for e in pieces + [finish]), events
        assert all(e["choices"][0]["finish_reason"] is None for e in pieces), events
        if "messages" in body:
            assert pieces[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}, pieces[0]


def test_disconnect_mid_stream_frees_the_model(server, model_id):
    client = server.client()
    expected = client.completions.create(model=model_id, prompt=PROMPT, **GREEDY).choices[0].text
    before = server.health()["cancelled"]
    long = client.completions.create(model=model_id, prompt="Once upon a time", temperature=0, stream=True,
                                     max_tokens=CTX - 8)
    got = [c.choices[0].text for _, c in zip(range(3), long)]
    assert len(got) == 3
    long.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while (h := server.health())["cancelled"] == before or h["running"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    line = [ln for ln in server.log_text().splitlines() if "cancelled (client gone" in ln][-1]
    produced = int(re.search(r"completion (\d+) tokens", line).group(1))
    assert produced < 40, line  # of CTX - 8 asked: it stopped when the client left, not at max_tokens
    after = client.completions.create(model=model_id, prompt=PROMPT, **GREEDY).choices[0].text
    assert after == expected


@pytest.mark.slow
def test_load_script_concurrent_clients_get_their_own_answers(server, model_id):
    """A small run of scripts/load_test.py (the full 16 x 4 run is in docs/RESULTS.md)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), "--url", server.url,
                          "--api-key", KEY, "--clients", "4", "--requests", "2", "--max-tokens", "4"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"8 requests, 0 errors, 0 mismatches", out.stdout), out.stdout
    assert re.search(r"latency p50 [\d.]+ s, p99 [\d.]+ s", out.stdout), out.stdout


def test_server_runs_httptools_and_uvloop():
    """The service's uvicorn settings resolve to httptools' parser and (off Windows) uvloop's event loop, spqt's
    dependencies: h11 and asyncio cost 1.4 ms more a request (docs/RESULTS.md, thirty-second session)."""
    from spqt.serve.server import GRACEFUL_SECONDS, uvicorn_config

    config = uvicorn_config(lambda scope, receive, send: None)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    if sys.platform != "win32":
        import importlib.util

        assert importlib.util.find_spec("uvloop") is not None
        if hasattr(config, "get_loop_factory"):  # uvicorn >= 0.36 (older ones pick uvloop in setup_event_loop)
            assert config.get_loop_factory().__module__.startswith("uvloop")
    assert not config.access_log and config.timeout_graceful_shutdown == GRACEFUL_SECONDS


def test_cli_errors_before_serving(tiny_hf, capsys):
    def error(argv, fragment):
        capsys.readouterr()
        assert main(["serve", str(tiny_hf), "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("spqt: error:") and fragment in err[-1], err

    error(["--sparsity", "1.5"], "sparsity must be in")
    error(["--sparsity", "half"], "--sparsity takes a number")
    error(["--sparsity", "0.5", "--port", "0"], "no teal unified thresholds")
    error(["--criterion", "magnitude"], "unknown criterion")
    error(["--dtype", "fp8"], "unknown dtype 'fp8'")
    error(["--port", "70000"], "--port must be in")
    for origin in ("localhost:3000", "http://localhost:3000/", "http://localhost:3000/app", "ftp://x"):
        error(["--allow-origin", origin], "--allow-origin takes * or an origin as a browser sends it")
    error(["--ctx", "100000", "--port", "0"], "--ctx must be in")
    real_load = cli._load  # a template that thinks, a vocabulary that spells the tags: a budget cannot be kept

    def thinking_template(args, path=None):
        loaded = real_load(args, path)
        loaded.tokenizer = dataclasses.replace(loaded.tokenizer, chat_template=THINK_TEMPLATE)
        return loaded

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_load", thinking_template)
        error(["--thinking-budget", "64", "--port", "0"], "--thinking-budget needs <think> and </think> as tokens")
    with pytest.raises(SystemExit) as e:  # below 2: argparse's usage error
        main(["serve", str(tiny_hf), "--device", "cpu", "--ctx", "1"])
    assert e.value.code == 2 and "--ctx: must be at least 2" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        error(["--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1")


def test_sparsity_auto_is_the_recommended_level_else_dense(tiny_hf):
    from spqt.checkpoint import load_model
    from spqt import sparsity as sp
    from spqt.serve.engine import parse_sparsity, recommended_sparsity

    loaded = load_model(tiny_hf)
    assert parse_sparsity("auto") is None and parse_sparsity("0.25") == 0.25
    assert recommended_sparsity(loaded) == ("teal", "unified", 0.0)  # no recommendation: auto serves dense
    rows = [{"criterion": c, "mode": m, "sparsity": s, "ppl": p} for c, m, s, p in
            [("teal", "unified", 0.4, 10.2), ("teal", "greedy", 0.4, 10.1), ("wina", "unified", 0.5, 10.4),
             ("teal", "unified", 0.5, 11.0)]]
    loaded.thresholds = {"recommended": {**sp.recommend(rows, 10.0), "dense_ppl": 10.0, "max_loss": sp.MAX_LOSS,
                                         "held_out": rows}}
    assert recommended_sparsity(loaded) == ("wina", "unified", 0.5)
    # the same pick as spqt generate --sparsity auto, also when restricted to a criterion or mode
    for criterion, mode in [(None, None), ("teal", None), ("teal", "greedy"), ("wina", "unified")]:
        assert recommended_sparsity(loaded, criterion, mode) == sp.auto_level(loaded.thresholds, criterion, mode)
    assert recommended_sparsity(loaded, "teal", None) == ("teal", "unified", 0.4)
    import torch

    from spqt.serve.engine import Engine

    # the compute dtype spqt serve --dtype asks for (None: the runtime's default, fp32 on the CPU)
    assert Engine(loaded, "cpu", dtype=torch.bfloat16).generator.dtype == torch.bfloat16
    assert Engine(loaded, "cpu").generator.dtype == torch.float32


def test_engine_logs_dense_maps_and_one_launch_maps(tiny_hf, caplog, monkeypatch):
    """The server's log says which maps run dense below their crossover and which run in one launch (MODE_KEPT:
    forced here, a CPU has none; the tuned route named as such), as spqt generate does."""
    from spqt.checkpoint import load_model
    from spqt.generate import Generator
    from spqt.serve.engine import Engine

    loaded = load_model(tiny_hf)
    monkeypatch.setattr(Generator, "dense_fallbacks", lambda self: ["layers.0.o"])
    for kept, tuned, said in (("all", "all", "every sparse map (spqt tune --routes)"),
                              ("plain", None, "as SPQT_SPARSE_KEPT=plain asks"), (None, None, None)):
        monkeypatch.setattr(Generator, "kept_runs", lambda self: kept)
        monkeypatch.setattr(Generator, "tuned_route_runs", lambda self, track=False: tuned)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="spqt.serve"):
            Engine(loaded, "cpu", 0.0, ctx=64)
        assert any("1 of 8 linear maps run dense" in r.getMessage() for r in caplog.records)
        one_launch = [r.getMessage() for r in caplog.records if "in one launch" in r.getMessage()]
        assert one_launch == ([] if said is None else [f"sparse maps in one launch each (MODE_KEPT): {said}"])


def test_sigterm_stops_the_server_cleanly_mid_stream(tiny_hf, tmp_path):
    """SIGINT takes the same path (one handler for both); one process start is enough for the suite."""
    sig = signal.SIGTERM
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "spqt.cli", "serve", str(tiny_hf), "--port", "0", "--device", "cpu"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (found := re.search(r"listening on (\S+)", log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=found.group(1) + "/v1", api_key="none", max_retries=0, timeout=60)
        # greedy: the tiny random model's 2000 greedy tokens hold no end token (a sampled one ended the request by
        # itself before the signal once, twenty-first session)
        stream = client.completions.create(model="model", prompt="once upon a time", max_tokens=2000, stream=True,
                                           temperature=0)
        chunks = iter(stream)
        next(chunks)  # generating now (2000 tokens would take seconds)
        t0 = time.monotonic()
        proc.send_signal(sig)
        rest = []
        # the stream ends instead of running to max_tokens, with an error event (it ended as if complete, without
        # a finish_reason, and the openai client raised nothing)
        with pytest.raises(openai.APIError, match="the server is stopping"):
            rest.extend(chunks)
        rc = proc.wait(30)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert rc == 0, text
    assert len(rest) < 1999 and f"stopped ({sig.name})" in text and "cancelled" in text, text
    assert seconds < 10, f"{seconds:.1f} s to stop"


def test_a_job_cancelled_while_its_prompt_prefills_ends_before_the_next_layer(tiny_hf, caplog):
    """A client that leaves (or a server that stops) during a long prefill frees the model within a layer: a
    5,500-token prompt of the default model prefilled for 20 s on the 2-core CPU after SIGTERM (the server took 19 s to
    exit, its log a flood of tracebacks). The cache it leaves is not reused: the next prompt gets a whole prefill's
    answer."""
    from spqt.checkpoint import load_model
    from spqt.generate import Sampling
    from spqt.serve.engine import Engine
    from spqt.serve.scheduler import Job

    engine = Engine(load_model(tiny_hf), "cpu", 0.0, ctx=64)
    layers = engine.generator.model.layers
    prompt, ran = [3, 5, 7, 9, 11, 13], []

    async def scenario(job_cancelled_in_layer: int | None) -> tuple[list, list]:
        job = Job(prompt, 8, Sampling(0.0), [], "POST /v1/completions", asyncio.get_running_loop())
        ran.clear()

        def layer_runs(module, args):
            ran.append(module)
            if job_cancelled_in_layer is not None and module is layers[job_cancelled_in_layer]:
                job.cancel(client_gone=True)

        hooks = [layer.register_forward_pre_hook(layer_runs) for layer in layers]
        try:
            engine.run(job)
        finally:
            for hook in hooks:
                hook.remove()
        await asyncio.sleep(0)  # (the worker's events land in the loop)
        return [job.events.get_nowait() for _ in range(job.events.qsize())], list(ran)

    with caplog.at_level(logging.INFO, logger="spqt.serve"):
        events, run_layers = asyncio.run(scenario(0))
    assert events == [("cancelled", None)]
    assert run_layers == [layers[0]], f"{len(run_layers)} layers ran after the cancel"  # the prefill's first alone
    assert "cancelled (client gone) after prompt 6 + completion 0 tokens" in caplog.text, caplog.text
    assert "prefill stopped, decode" in caplog.text, caplog.text  # (not a rate over the whole prompt)
    events, _ = asyncio.run(scenario(None))
    assert events[-1][0] == "done" and events[-1][1].cached_tokens == 0
    fresh = engine.generator.generate(prompt, 8, Sampling(0.0), stop_ids=engine.stop_ids)
    assert events[-1][1].tokens == fresh.tokens


def test_a_job_that_ends_after_the_server_stopped_is_not_a_traceback(monkeypatch, caplog):
    """The worker ends a job after the HTTP side's event loop closed (a prefill that outlasted the graceful shutdown):
    its events reach no one and are dropped, instead of a RuntimeError ("Event loop is closed") logged as a failed
    job with its traceback and a second one that killed the worker thread."""
    from spqt.serve.scheduler import Job, Scheduler

    died = []
    monkeypatch.setattr(threading, "excepthook", died.append)

    def run(job: Job) -> str:
        job.emit("text", ("late", []))
        job.emit("cancelled")
        return "cancelled"

    loop = asyncio.new_event_loop()
    loop.close()
    scheduler = Scheduler(run)
    with caplog.at_level(logging.INFO, logger="spqt.serve"):
        scheduler.submit(Job([1], 1, None, [], "POST /v1/completions", loop))
        scheduler.close()
    assert not died, died[0].exc_value
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert scheduler.stats()["cancelled"] == 1


def test_text_stream_holds_back_stop_strings_and_split_characters():
    from spqt.serve.text import TextStream

    vocab = [b"Hel", b"lo ", b"wo", b"rld", b"!", b" E", b"ND", b"\xc3", b"\xa9", b" E", b"x"]

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    def run(ids, stops):
        ts = TextStream(decode, stops)
        pieces = [ts.feed(i) for i in ids]
        return pieces, ts.flush(), ts.stopped

    # " E" could start " END": held until "ND" completes it, and nothing of the stop string comes out
    pieces, tail, stopped = run([0, 1, 2, 3, 5, 6, 4], ["rld END", " END"])
    assert "".join(pieces) == "Hello wo" and tail == "" and stopped
    assert pieces == ["Hel", "lo", " wo", "", "", "", ""]  # a trailing " " might start " END" too
    # a held " E" that turns out not to be a stop is released with what follows
    pieces, tail, stopped = run([0, 9, 10, 4], [" END"])
    assert pieces == ["Hel", "", " Ex", "!"] and tail == "" and not stopped
    # a character split over two tokens comes out whole; what is held at the end is flushed
    pieces, tail, stopped = run([7, 8, 5], [" END"])
    assert pieces == ["", "\u00e9", ""] and tail == " E" and not stopped


def test_text_stream_finds_a_stop_string_in_the_flushed_text():
    """The last tokens' unfinished character comes out at the flush, and a stop string there still cuts the text: the
    tokens from the stop string on are not handed out; without one, they all are."""
    from spqt.serve.text import TextStream

    vocab = [b"x", b"D\xe2", b"EN", b"y"]

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    for ids, stops, text, released in (([0, 1], ["D"], "x", 1), ([2, 1], ["END"], "", 0),
                                       ([0, 1], ["Q"], "xD\ufffd", 2), ([3, 1], [], "yD\ufffd", 2)):
        ts = TextStream(decode, stops)
        out = "".join(ts.feed(t) for t in ids) + ts.flush()
        assert (out, ts.stopped, ts.released()) == (text, bool(released < len(ids)), released), (ids, stops)


def test_text_stream_of_random_tokens_is_the_decoding_of_them_all(engine, rng):
    """Random token ids of the default model's byte-level vocabulary (split characters, special tokens), after a
    random context: the pieces and the flush join to decoding context and tokens at once, less the context's text
    (a context that ends in part of a character is not used); a last character left unfinished comes out as U+FFFD."""
    from spqt.serve.text import TextStream

    decode, vocab = engine.tokenizer.decode, engine.tokenizer.config.vocab_size
    for _ in range(200):
        context, ids = rng.integers(0, vocab, 4).tolist(), rng.integers(0, vocab, 12).tolist()
        ts = TextStream(decode, context=context)
        text = "".join(ts.feed(t) for t in ids) + ts.flush()
        used = [] if decode(context).endswith("\ufffd") else context
        assert text == decode(used + ids)[len(decode(used)):], (context, ids)
        assert ts.released() == len(ids)
    ids = engine.tokenizer.encode(" \u65e5\u672c\u8a9e")
    cut = next(ids[:k] for k in range(1, len(ids)) if decode(ids[:k]).endswith("\ufffd"))  # a character cut short
    ts = TextStream(decode)
    assert "".join(ts.feed(t) for t in cut) + ts.flush() == decode(cut)


def test_scheduler_runs_jobs_one_at_a_time_in_order_and_drops_cancelled_ones():
    import asyncio

    from spqt.serve.scheduler import Job, Scheduler

    ran, overlap, busy = [], [], threading.Lock()
    gate = threading.Event()

    def run(job: Job) -> str:
        if not busy.acquire(blocking=False):
            overlap.append(job.label)
        try:
            gate.wait(10)  # the first job holds the worker until the others are queued
            ran.append(job.label)
            job.emit("text", job.label)
            job.emit("done", None)
            return "completed"
        finally:
            busy.release()

    async def scenario():
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(run)
        jobs = [Job([1], 1, None, [], f"job{i}", loop) for i in range(4)]
        for job in jobs:
            scheduler.submit(job)
        jobs[2].cancel()  # still queued behind job0: dropped unrun
        gate.set()
        events = []
        for job in jobs:  # (a loop, not nested comprehensions: an await in the inner one is a SyntaxError on 3.10)
            events.append([await job.events.get() for _ in range(1 if job is jobs[2] else 2)])
        scheduler.close()
        # the HTTP side cancels a job when it stops reading it, also after its last event: that job stays uncancelled
        # (else its stream, when the worker had not yet returned, lost its data: [DONE])
        done = Job([1], 1, None, [], "done", loop)
        done.emit("done", None)
        done.cancel()
        stats = scheduler.stats()
        # once stopping (its worker still running), a job submitted after (a batch's next prompt) is dropped unrun
        stopping = Scheduler(run)
        stopping.cancel_all()
        late = Job([1], 1, None, [], "late", loop)
        stopping.submit(late)
        dropped = await late.events.get()
        stopping.close()
        return events, stats, done.cancelled.is_set(), (dropped, ran.count("late"))

    events, stats, cancelled_after_done, late = asyncio.run(scenario())
    assert ran == ["job0", "job1", "job3"] and not overlap and not cancelled_after_done
    assert late == (("cancelled", None), 0)
    assert events[2] == [("cancelled", None)]
    assert events[3] == [("text", "job3"), ("done", None)]
    assert stats["completed"] == 3 and stats["cancelled"] == 1 and stats["waiting"] == 0 and not stats["running"]


def test_a_runtime_error_of_a_request_is_one_log_line_and_the_worker_goes_on(caplog):
    """A SpqtError from run (e.g. logits that are not finite) reaches the client as its message and the log as one
    line without a traceback; any other exception with its type and the traceback; the next job still runs. The job's
    on_finish hook (the metrics) hears of a failed job too, and a hook that raises masks neither an error nor an
    answer."""
    import asyncio

    from spqt.errors import SpqtError
    from spqt.serve.scheduler import Job, Scheduler

    def run(job: Job) -> str:
        if job.label == "nan":
            raise SpqtError("the logits of the prompt are not finite numbers in fp16")
        if job.label in ("bug", "bug and a bad hook"):
            raise KeyError("oops")
        job.report("result", 0.0)
        job.emit("done", None)
        return "completed"

    reports = []

    def on_finish(result, seconds, cancelled):
        reports.append((result, cancelled))

    def bad_hook(result, seconds, cancelled):
        raise ValueError("the hook's own bug")

    async def scenario():
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(run)
        jobs = [Job([1], 1, None, [], label, loop, on_finish=bad_hook if "hook" in label else on_finish)
                for label in ("nan", "bug", "bug and a bad hook", "fine", "fine with a bad hook")]
        for job in jobs:
            scheduler.submit(job)
        events = [await job.events.get() for job in jobs]
        scheduler.close()
        return events, scheduler.stats()

    with caplog.at_level("INFO", logger="spqt.serve"):
        events, stats = asyncio.run(scenario())
    # the hook (the app's metrics) hears of each job once, a failed one without a result, before its last event;
    # a hook that raises is logged and changes no job's answer or error
    assert events == [("error", "generation failed: the logits of the prompt are not finite numbers in fp16"),
                      ("error", "generation failed: KeyError: 'oops'"),
                      ("error", "generation failed: KeyError: 'oops'"), ("done", None), ("done", None)]
    assert reports == [(None, False), (None, False), ("result", False)]
    assert stats["failed"] == 3 and stats["completed"] == 2
    hooks = [r for r in caplog.records if "finish hook" in r.getMessage()]
    assert [r.getMessage() for r in hooks] == ["bug and a bad hook: its finish hook (metrics) failed",
                                               "fine with a bad hook: its finish hook (metrics) failed"]
    assert all(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in hooks)
    nan, bug = (next(r for r in caplog.records if r.getMessage().startswith(label)) for label in ("nan", "bug"))
    assert nan.exc_info is None and "not finite" in nan.getMessage() and bug.exc_info is not None

