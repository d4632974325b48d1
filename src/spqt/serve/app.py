"""The HTTP app (FastAPI): OpenAI's /v1/chat/completions, /v1/responses (a chat: spqt.serve.responses; its stored
responses, spqt.serve.response_store, retrieved, deleted and their input items listed under /v1/responses/{id}),
/v1/completions and /v1/models, Anthropic's /v1/messages (a chat: spqt.serve.messages), and /health.

A request is checked in this order, each failure answered with OpenAI's JSON error object: API key (401: `Authorization:
Bearer KEY`, or Anthropic's `x-api-key: KEY`), body size (413), Content-Type (415: JSON alone), JSON syntax and
Unicode text (400), fields (400, param naming the field), model name (404), token ids within the vocabulary (400),
prompt plus max_tokens within the context (400, code context_length_exceeded); /v1/messages answers them in
Anthropic's shape (messages.error_body). Then it joins the scheduler's FIFO queue (n choices, of each of a batch of
completions prompts: a job each, in turn, every prompt checked first); the answer is one JSON body, or with `stream:
true` server-sent events, a chunk per text piece (naming its choice) and `data: [DONE]` (the Responses API's and the
Messages API's named events: ResponseStream's, MessageStream's). Cross-origin requests from a browser (CORS) are
answered only for the origins `spqt serve --allow-origin` names.
"""

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from spqt import grammar
from spqt.errors import SpqtError
from spqt.generate import GenerationResult, Sampling
from spqt.serve import messages as m
from spqt.serve import protocol as p
from spqt.serve import responses as r
from spqt.serve.answer import Answer, AnswerStream, Piece, Reading, finish_reason, read_answer
from spqt.serve.engine import Engine
from spqt.serve.logprobs import TokenLogprob
from spqt.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from spqt.serve.scheduler import Job, Scheduler
from spqt.serve.reasoning import (answer_opening, grammar_after_thinking, reasoning_template, starts_thinking,
                                  think_tags, thinking_tokens)
from spqt.serve.response_store import DEFAULT_CAPACITY, ResponseStore
from spqt.serve.tools import forced_calls, tool_format

log = logging.getLogger("spqt.serve")

# Request bodies above this are refused (413) before they are parsed: a 128k-token context is about
# 0.5 MB of text, so 4 MiB leaves room for any prompt a context can hold.
MAX_BODY_BYTES = 4 * 2**20
DRAIN_BYTES = 16 * MAX_BODY_BYTES  # above this, answer 413 at once and drop the connection


def build_app(engine: Engine, scheduler: Scheduler, api_key: str | None = None,
              allow_origins: tuple[str, ...] = (), stored_responses: int = DEFAULT_CAPACITY) -> FastAPI:
    """The app; stored_responses: how many responses the Responses API keeps (0: none)."""
    app = FastAPI(title="spqt serve", docs_url=None, redoc_url=None, openapi_url=None)
    if allow_origins:  # browser clients on these origins (CORS): their preflight needs no key, their requests do
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"])  # (the clients' own: anthropic-*, x-stainless-*; the key still asked)
    info = engine.info
    metrics = ServeMetrics(info, scheduler.stats)
    store = ResponseStore(stored_responses)

    def error_response(request: Request, err: p.ApiError, headers: dict | None = None) -> JSONResponse:
        log.info("%s %s %d %s: %s", request.method, request.url.path, err.status, err.code or err.type, err.message)
        anthropic = request.url.path.startswith("/v1/messages")
        return JSONResponse(m.error_body(err) if anthropic else err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(p.ApiError)
    async def _api_error(request: Request, err: p.ApiError):
        return error_response(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):  # unknown route, wrong method
        code = "not_found" if err.status_code == 404 else None
        return error_response(request, p.ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                                  code=code), headers=err.headers)  # a 405's Allow

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
        if not any(given is not None and secrets.compare_digest(given.encode(), api_key.encode())
                   for given in (bearer, request.headers.get("x-api-key"))):
            raise p.ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def parse(request: Request, model: type[BaseModel]):
        too_large = p.ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        if int(request.headers.get("content-length") or 0) > DRAIN_BYTES:
            raise too_large
        # Read to the end even past the limit (keeping nothing), so that a client which sends its whole
        # body before reading the answer gets the 413 (or 415) instead of a reset connection.
        body, size = bytearray(), 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > DRAIN_BYTES:
                    raise too_large
                if size <= MAX_BODY_BYTES:
                    body += chunk
        except ClientDisconnect:  # gone before the end of its body: the answer reaches no one (499, as nginx logs it)
            raise p.ApiError(499, "the client closed the connection before the end of its body",
                             code="client_closed") from None
        if size > MAX_BODY_BYTES:
            raise too_large
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            # A browser sends text/plain or a form cross-origin without asking first (no CORS preflight): a web
            # page could make this server generate. JSON only, as FastAPI's own body parsing since 0.65.2.
            raise p.ApiError(415, f"Content-Type must be application/json, got {media_type or 'none'} (curl: add "
                             "-H 'Content-Type: application/json').", code="unsupported_media_type")
        try:
            doc = json.loads(body, parse_constant=not_json)
            json.dumps(doc, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") is JSON, not text
        except UnicodeEncodeError as e:
            raise p.ApiError(400, f"The request holds a string that is not Unicode text (a lone surrogate, "
                             f"{e.object[e.start:e.end]!a}): a JSON string cut in the middle of a character?") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, not_json; nested too deep
            raise p.ApiError(400, f"We could not parse the JSON body of your request ({e}).") from None
        try:
            req = model.model_validate(doc)
        except ValidationError as e:
            raise p.invalid_request(e) from None
        if req.model is not None and req.model != info.model_id:
            raise model_not_found(req.model)
        return req

    def query(request: Request, model: type[BaseModel]):
        """The request's query parameters as model (their text taken for numbers and booleans); a 400 naming the
        parameter otherwise."""
        try:
            return model.model_validate(dict(request.query_params), strict=False)
        except ValidationError as e:
            raise p.invalid_request(e) from None

    def model_not_found(name: str) -> p.ApiError:
        return p.ApiError(404, f"The model '{name}' does not exist; this server serves '{info.model_id}'.",
                          param="model", code="model_not_found")

    def outside_vocabulary(ids: list[int]) -> int | None:
        """The first token id outside the model's vocabulary, None where every one is in it."""
        return next((t for t in ids if not 0 <= t < engine.tokenizer.config.vocab_size), None)

    async def rendered(messages: list[p.ChatMessage], tools: list[dict] | None, template_kwargs: dict,
                       param: str = "messages") -> tuple:
        """(the chat template's text of a conversation, its token ids), in a thread (a 4 MiB prompt's 3-6 s of
        tokenizing on the 2-core CPU stalled every stream on the event loop); a 400 naming param (the request's field
        of the conversation) where the template refuses it (its raise_exception, among others)."""
        def render() -> tuple[str, list[int]]:
            text = engine.tokenizer.render_chat([m.template_message() for m in messages], tools, template_kwargs)
            return text, engine.tokenizer.encode(text, add_bos=False)
        try:
            return await asyncio.to_thread(render)
        except SpqtError as e:
            raise p.ApiError(400, str(e), param=param) from None

    def shaping(req: p.SamplingFields) -> dict:
        """The request's logit shaping (Sampling's fields), its logit_bias tokens checked against the vocabulary."""
        vocab, shape = engine.generator.loaded.config.vocab_size, req.shaping()
        bad = max(shape["logit_bias"], default=-1)
        if bad >= vocab:
            raise p.ApiError(400, f"logit_bias: token id {bad} is outside the model's vocabulary of {vocab}.",
                             param="logit_bias", code="invalid_value")
        return shape

    async def structured(req: p.SamplingFields, tools: list | None = None) -> dict:
        """The request's structured output as Sampling's grammar ({} for plain text), compiled against the model's
        vocabulary in a thread (the vocabulary's first build takes a fraction of a second, a large schema too)."""
        asked = req.structure()
        if asked is None:
            return {}
        param, kind, value = asked
        if tools:
            raise p.ApiError(400, f"{param}: structured output and tools in one request are not supported (a call "
                             f"would have to keep to the format too).", param=param, code="unsupported_value")
        try:
            return {"grammar": await asyncio.to_thread(grammar.build, kind, value, engine.vocabulary)}
        except SpqtError as e:
            raise p.ApiError(400, f"{param}: {e}.", param=param, code="invalid_value") from None

    def make_job(request: Request, req: p.SamplingFields, shape: dict, prompt: list[int], echo: str | None = None,
                 added: int = 0, choice: int = 0) -> Job:
        """The job of one prompt (token ids); shape: shaping(req); echo, added: Job's (the prompt's text, where the
        request asks for it back, and how many leading tokens the server put before it); choice: which of the
        prompt's n (a given seed + choice seeds it, so that n samples differ and a request gives the same n
        again)."""
        room, least = info.ctx - len(prompt), 1 if req.max_tokens is None else req.max_tokens
        if room < least:
            # (no limit given: the answer may run to the context's end, and a prompt that fills it leaves none)
            wants = (f"{req.limit_param} asks for {least} more" if req.max_tokens is not None else
                     f"leaves no room for an answer (without {req.limit_param}: up to the context's end)")
            raise p.ApiError(400, f"This model's context is {info.ctx} tokens; the prompt has {len(prompt)} and "
                             f"{wants}.",
                             param=req.prompt_param,
                             code="context_length_exceeded")
        if req.seed is None:
            seed = secrets.randbits(63)
        else:  # (choice 0: the seed as given, also a negative one, which torch takes as it is)
            seed = req.seed if choice == 0 else (req.seed + choice) % 2**64
        try:  # top_p 0 keeps the top token alone: greedy (Sampling takes a top_p above 0)
            sampling = (Sampling(0.0, seed=seed, **shape) if req.top_p == 0 else
                        Sampling(req.temperature, req.top_k, req.top_p, seed, **shape))
        except SpqtError as e:
            raise p.ApiError(400, str(e), code="invalid_value") from None
        return Job(prompt=prompt, max_tokens=room if req.max_tokens is None else req.max_tokens, sampling=sampling,
                   stops=req.stop, label=f"{request.method} {request.url.path}", loop=asyncio.get_running_loop(),
                   logprobs=req.top_tokens(), echo=echo, prompt_added=added, on_finish=metrics.finished)

    def read_prompt(prompt: str | list[int], index: int, echo: bool) -> tuple[list[int], str | None, int]:
        """A completions prompt -> (token ids, its text where echo asks for it, how many leading ids the server put
        before the text): a string encoded (a BOS first where the model adds one), token ids checked (and decoded)."""
        if isinstance(prompt, str):
            return engine.tokenizer.encode(prompt), prompt if echo else None, len(engine.tokenizer.bos_prefix)
        bad = outside_vocabulary(prompt)
        if bad is not None:
            raise p.ApiError(400, f"prompt[{index}]: token id {bad} is outside the model's vocabulary of "
                             f"{engine.tokenizer.config.vocab_size}.",
                             param="prompt", code="invalid_value")
        return prompt, engine.tokenizer.decode(prompt) if echo else None, 0

    @app.get("/health")
    async def health(request: Request):
        return {"status": "ok", "model": info.model_id, "device": info.device, "sparsity": info.sparsity,
                "mode": info.mode, "criterion": info.criterion, "ctx": info.ctx, "prompt_cache": engine.prompt_cache,
                **scheduler.stats()}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return p.ModelList(data=[p.ModelCard(id=info.model_id, created=info.created)])

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def model(model_id: str):
        if model_id != info.model_id:
            raise model_not_found(model_id)
        return p.ModelCard(id=info.model_id, created=info.created)

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(request: Request):
        """A text's (content or prompt) or a conversation's (messages, through the chat template) token ids, as
        llama.cpp's and vLLM's servers answer: tokens (with_pieces: each {id, piece}, the piece its text, or its bytes
        where they are part of a character), count, max_model_len (the served context)."""
        req = await parse(request, p.TokenizeRequest)
        tok = engine.tokenizer
        if req.messages is not None:
            if not tok.spec.chat_template:
                raise p.ApiError(400, "This model has no chat template, so it takes no messages.", param="messages",
                                 code="unsupported_value")
            tools = [t.model_dump(exclude_none=True) for t in req.tools] or None
            _, ids = await rendered(req.messages, tools, req.chat_template_kwargs)
        else:
            ids = await asyncio.to_thread(tok.encode, req.content if req.content is not None else req.prompt,
                                          req.bos())

        def body() -> bytes:  # (in a thread: a long prompt's pieces and JSON took seconds, which stalled every stream)
            tokens = ids
            if req.with_pieces:
                tokens = []
                for t in ids:
                    piece = tok.token_bytes(t)
                    try:
                        tokens.append({"id": t, "piece": piece.decode("utf-8")})
                    except UnicodeDecodeError:
                        tokens.append({"id": t, "piece": list(piece)})
            return json.dumps({"tokens": tokens, "count": len(ids), "max_model_len": info.ctx}).encode()

        return Response(await asyncio.to_thread(body), media_type="application/json")

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(request: Request):
        """Token ids -> their text, as content (llama.cpp's name) and prompt (vLLM's)."""
        req = await parse(request, p.DetokenizeRequest)
        bad = outside_vocabulary(req.tokens)
        if bad is not None:
            raise p.ApiError(400, f"token id {bad} is outside the model's vocabulary of "
                             f"{engine.tokenizer.config.vocab_size}.", param="tokens", code="invalid_value")
        text = engine.tokenizer.decode(req.tokens)
        return {"content": text, "prompt": text}

    async def plan_chat(request: Request, req: p.SamplingFields, messages: list[p.ChatMessage]) -> \
            tuple[list[Job], Reading]:
        """A chat request's jobs (one a choice, of its conversation through the chat template) and how their answers
        are read: its tools (tool_choice forcing calls through a grammar), structured output (after the thinking of a
        reasoning model), reasoning. req: a chat request, or one that holds a chat's fields as ChatCompletionRequest
        names them (tool_specs, forced_tool, parallel_tool_calls, chat_template_kwargs); messages: its conversation,
        errors in it naming req.prompt_param."""
        if not engine.tokenizer.spec.chat_template:
            raise p.ApiError(400, "This model has no chat template, so it takes no messages; send the text to "
                             "/v1/completions.", param=req.prompt_param, code="unsupported_value")
        tools, fmt, forced = req.tool_specs(), None, req.forced_tool()
        shape = shaping(req) | await structured(req, tools)
        if tools:
            try:
                fmt = tool_format(engine.tokenizer.spec.chat_template)
            except ValueError as e:
                raise p.ApiError(400, f"{e}.", param="tools", code="unsupported_value") from None
        if forced is not None:  # the answer is calls alone: a grammar of the template's call format
            try:
                shape["grammar"] = await asyncio.to_thread(forced_calls, fmt, tools, forced, req.parallel_tool_calls,
                                                           engine.vocabulary)
            except SpqtError as e:  # (a parameters schema the grammar compiler refuses)
                raise p.ApiError(400, f"tools: {e}.", param="tools", code="invalid_value") from None
        prompt_text, prompt = await rendered(messages, tools, req.chat_template_kwargs, req.prompt_param)
        # a reasoning model's <think> text as its reasoning (spqt.serve.reasoning); thinking: from the answer's
        # start, where the template's opening of the answer opened the block; a grammar keeps to the text after the
        # thinking. A thinking budget wherever the template thinks (its <think> text parsed out or not), but not
        # under a grammar that holds from the answer's start (--reasoning-format none: no thinking there)
        think, opening = engine.reasoning, ""
        budget = req.thinking_token_budget if req.thinking_token_budget is not None else engine.thinking_budget
        budget = budget if reasoning_template(engine.tokenizer.spec.chat_template) else None
        if budget is not None and ((not think and "grammar" in shape) or (
                not req.budget_strict and think_tags(engine.vocabulary) is None)):
            budget = None  # (the Messages' budget is a target: where it cannot be kept, not kept)
        if think or budget is not None:  # (a second rendering, without the answer's opening, in a thread)
            conversation = [m.template_message() for m in messages]
            opening = await asyncio.to_thread(answer_opening, engine.tokenizer, conversation, prompt_text, tools,
                                              req.chat_template_kwargs)
        if (think and "grammar" in shape) or budget is not None:
            try:
                after = grammar_after_thinking(shape.get("grammar"), engine.vocabulary, opening, budget)
            except SpqtError as e:  # (a budget where the tags are not tokens of their own)
                raise p.ApiError(400, f"{req.budget_param}: {e}.", param=req.budget_param,
                                 code="unsupported_value") from None
            if "grammar" in shape:
                think = after is not None
                shape["grammar"] = shape["grammar"] if after is None else after
            elif after is not None:
                shape["grammar"] = after
        reading = Reading(think, think and starts_thinking(opening), fmt,
                          {t["function"]["name"] for t in tools} if tools else None, req.parallel_tool_calls)
        return [make_job(request, req, shape, prompt, choice=j) for j in range(req.n)], reading

    async def chat_answer(request: Request, job: Job, reading: Reading) -> tuple[Answer, list[TokenLogprob],
                                                                                 GenerationResult]:
        """A chat job's answer read whole (its parts), its tokens' logprobs entries and its result."""
        text, tokens, result = await collect(request, job)
        return read_answer(text, reading), tokens, result

    async def streamed_answers(request: Request, jobs: list[Job], reading: Reading) -> \
            AsyncIterator[tuple[int, Piece | None, GenerationResult | None]]:
        """A chat request's answers (its choices) read as they stream: per choice j (j, None, None) as its job is
        queued, (j, part, None) for each part (AnswerStream's), then (j, None, result)."""
        stream = None
        async for j, piece, tokens, result in run_choices(request, jobs):
            if piece is None:
                yield j, None, None
                stream = AnswerStream(reading)
                continue
            for part in stream.finish() if result is not None else stream.feed(piece, tokens or []):
                yield j, part, None
            if result is not None:
                yield j, None, result

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        req = await parse(request, p.ChatCompletionRequest)
        req.chat_template_kwargs = p.effort_template_kwargs(req.reasoning_effort, req.chat_template_kwargs,
                                                            engine.tokenizer.spec.chat_template or "",
                                                            "reasoning_effort")
        jobs, reading = await plan_chat(request, req, req.messages)
        rid, created = p.new_id("chatcmpl"), p.now()

        def logprobs(tokens: list[TokenLogprob] | None) -> p.ChatLogprobs | None:
            return p.chat_logprobs(tokens) if req.logprobs and tokens is not None else None

        if req.stream:
            def chunk(delta: dict, index: int = 0, finish=None, usage=None, choices=True,
                      tokens=None) -> p.ChatCompletionChunk:
                choice = p.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs(tokens))
                return p.ChatCompletionChunk(id=rid, created=created, model=info.model_id, usage=usage,
                                             choices=[choice] if choices else [])

            async def events():
                results, calls = [], []
                async for j, part, result in streamed_answers(request, jobs, reading):
                    if part is None and result is None:
                        yield chunk({"role": "assistant", "content": ""}, j)
                        calls = []
                    elif part is None:
                        yield chunk({}, j, finish=finish_reason(result.finish_reason, calls))
                        results.append(result)
                    elif part.kind == "calls":
                        calls = part.calls
                        yield chunk({"tool_calls": [c.wire(i) for i, c in enumerate(calls)]}, j)
                    else:
                        field = "reasoning_content" if part.kind == "reasoning" else "content"
                        yield chunk({field: part.text}, j, tokens=part.tokens)
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk({}, usage=p.usage(results, req.n), choices=False)

            return sse(events(), jobs)
        choices, results = [], []
        for j, job in enumerate(jobs):
            answer, tokens, result = await chat_answer(request, job, reading)
            calls = [c.wire() for c in answer.calls] or None
            message = p.AssistantMessage(content=(answer.content or None) if calls else answer.content,
                                         reasoning_content=answer.reasoning, tool_calls=calls)
            choices.append(p.ChatChoice(index=j, message=message,
                                        finish_reason=finish_reason(result.finish_reason, answer.calls),
                                        logprobs=logprobs(tokens)))
            results.append(result)
        return p.ChatCompletion(id=rid, created=created, model=info.model_id, choices=choices,
                                usage=p.usage(results, req.n))

    async def thinking(result: GenerationResult, reading: Reading) -> int:
        """How many of an answer's tokens are its thinking (reasoning.thinking_tokens), decoded in a thread."""
        if not reading.think:
            return 0
        return await asyncio.to_thread(thinking_tokens, result.tokens, engine.tokenizer.decode, reading.thinking)

    @app.post("/v1/responses", dependencies=[Depends(check_key)])
    async def responses(request: Request):
        """OpenAI's Responses API as a chat (spqt.serve.responses), continuing a stored response's conversation where
        previous_response_id names one; the response kept once it ends where store asks for it."""
        req = await parse(request, r.ResponsesRequest)
        req.chat_template_kwargs = p.effort_template_kwargs(req.reasoning and req.reasoning.effort,
                                                            req.chat_template_kwargs,
                                                            engine.tokenizer.spec.chat_template or "",
                                                            "reasoning.effort")
        earlier = store.continued(req.previous_response_id)
        req.input = store.resolved(req.input)
        jobs, reading = await plan_chat(request, req, req.chat_messages(earlier))
        response = r.new_response(req, info.model_id, req.store and store.capacity > 0)

        def keep(ended: r.ResponseObject) -> None:
            if ended.store:
                store.put(ended, req.input, earlier)

        if req.stream:
            stream = r.ResponseStream(response)

            async def lines():
                for line in stream.start():
                    yield line
                tokens = []  # every answer token's logprobs entries (where asked for)
                async for _, part, result in streamed_answers(request, jobs, reading):
                    if part is not None:
                        tokens += part.tokens
                        for line in stream.add(part):
                            yield line
                    elif result is not None:
                        n = await thinking(result, reading)
                        ending = stream.end(result.finish_reason == "length", tokens[n:],
                                            r.usage(result, n, engine.prompt_cache))
                        keep(stream.response)  # (before its last event: a client that has it finds it stored)
                        for line in ending:
                            yield line

            return event_stream(lines(), jobs, stream.error)
        answer, tokens, result = await chat_answer(request, jobs[0], reading)
        n = await thinking(result, reading)
        ended = r.completed(response, answer, tokens[n:], result.finish_reason == "length",
                            r.usage(result, n, engine.prompt_cache))
        keep(ended)
        return ended

    @app.get("/v1/responses/{response_id}", dependencies=[Depends(check_key)])
    async def stored_response(response_id: str, request: Request):
        """A stored response, the JSON its POST answered."""
        query(request, r.RetrieveQuery)
        return Response(store.get(response_id).body, media_type="application/json")

    @app.delete("/v1/responses/{response_id}", dependencies=[Depends(check_key)])
    async def delete_response(response_id: str):
        """A stored response forgotten (OpenAI's deletion object)."""
        return store.delete(response_id)

    @app.get("/v1/responses/{response_id}/input_items", dependencies=[Depends(check_key)])
    async def input_items(response_id: str, request: Request):
        """A page of a stored response's input items (OpenAI's list object)."""
        page = query(request, r.InputItemsQuery)
        return page.page(store.get(response_id).inputs)

    @app.post("/v1/messages", dependencies=[Depends(check_key)])
    async def messages(request: Request):
        """Anthropic's Messages API as a chat (spqt.serve.messages)."""
        req = await parse(request, m.MessagesRequest)
        req.chat_template_kwargs = template_kwargs(req)
        jobs, reading = await plan_chat(request, req, req.chat_messages())
        message, job, offered = m.new_message(info.model_id, len(jobs[0].prompt)), jobs[0], reading.fmt is not None
        if req.stream:
            stream = m.MessageStream(message, offered)

            async def lines():
                for line in stream.start():
                    yield line
                async for _, part, result in streamed_answers(request, jobs, reading):
                    if part is not None:
                        for line in stream.add(part):
                            yield line
                    elif result is not None:
                        reason = m.stop_reason(result, stream.calls, job.stop_found)
                        for line in stream.end(reason, job.stop_found, m.usage(result)):
                            yield line

            return event_stream(lines(), jobs, stream.error)
        answer, _, result = await chat_answer(request, job, reading)
        return m.completed(message, answer, offered, m.stop_reason(result, answer.calls, job.stop_found),
                           job.stop_found, m.usage(result))

    @app.post("/v1/messages/count_tokens", dependencies=[Depends(check_key)])
    async def count_message_tokens(request: Request):
        """A message request's prompt tokens (its conversation and tools through the chat template), as Anthropic
        counts them: {"input_tokens": N}."""
        req = await parse(request, m.CountTokensRequest)
        if not engine.tokenizer.spec.chat_template:
            raise p.ApiError(400, "This model has no chat template, so it takes no messages.", param="messages",
                             code="unsupported_value")
        _, ids = await rendered(req.chat_messages(), req.tool_specs(), template_kwargs(req))
        return {"input_tokens": len(ids)}

    def template_kwargs(req: m.MessagesRequest) -> dict:
        """A message request's chat_template_kwargs with its thinking (MessagesRequest.template_kwargs)."""
        return req.template_kwargs(engine.tokenizer.spec.chat_template or "")

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        req = await parse(request, p.CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise p.ApiError(400, "max_tokens 0 asks for nothing without echo: true (the prompt's logprobs alone).",
                             param="max_tokens", code="invalid_value")
        # prompt i's choice j at index i * n + j, as OpenAI orders them
        jobs, shape = [], shaping(req) | await structured(req)
        for i, prompt in enumerate(req.prompt):  # every prompt checked before any runs
            ids, text, added = await asyncio.to_thread(read_prompt, prompt, i, req.echo)  # (a long one: as chat's)
            jobs += [make_job(request, req, shape, ids, text, added, choice=j) for j in range(req.n)]
        rid, created = p.new_id("cmpl"), p.now()

        def body(text: str, index: int = 0, finish=None, usage=None, choices=True,
                 tokens: list[TokenLogprob] | None = None) -> p.Completion:
            logprobs = p.completion_logprobs(tokens) if tokens is not None and req.logprobs is not None else None
            choice = p.CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
            return p.Completion(id=rid, created=created, model=info.model_id, usage=usage,
                                choices=[choice] if choices else [])

        if req.stream:
            async def events():
                results = []
                async for i, piece, tokens, result in run_choices(request, jobs):
                    if result is not None:
                        yield body("", i, finish=result.finish_reason)
                        results.append(result)
                    elif piece or tokens:
                        yield body(piece, i, tokens=tokens)
                if req.stream_options and req.stream_options.include_usage:
                    yield body("", usage=p.usage(results, req.n), choices=False)

            return sse(events(), jobs)
        choices, results = [], []
        for i, job in enumerate(jobs):
            text, tokens, result = await collect(request, job)
            choices.append(body(text, i, finish=result.finish_reason, tokens=tokens).choices[0])
            results.append(result)
        return p.Completion(id=rid, created=created, model=info.model_id, choices=choices,
                            usage=p.usage(results, req.n))

    async def run_job(request: Request, job: Job) -> AsyncIterator[tuple[str, list[TokenLogprob],
                                                                          GenerationResult | None]]:
        """Queue the job and yield (text piece, its tokens' logprobs entries, None) as it runs, then ("", [], result).
        Ends early, without a result, when the job is cancelled; a client that goes away cancels it."""
        scheduler.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield *value, None
                elif kind == "done":
                    yield "", [], value
                    return
                elif kind == "cancelled":
                    return
                else:
                    raise p.ApiError(500, value, type="server_error")
        finally:
            watcher.cancel()
            job.cancel()  # no-op when it finished; frees the model when the stream was dropped

    async def run_choices(request: Request, jobs: list[Job]) -> AsyncIterator[tuple[int, str | None,
                                                                                   list[TokenLogprob],
                                                                                   GenerationResult | None]]:
        """A request's jobs (its choices) one after another: (index, None, [], None) as job `index` is queued, then
        run_job's events with its index. Raises cancelled(job) where one ends without its result (a finished job has
        its result, even if a stop signal came after it)."""
        for i, job in enumerate(jobs):
            yield i, None, [], None
            result = None
            async for piece, tokens, result in run_job(request, job):
                yield i, piece, tokens, result
            if result is None:
                raise cancelled(job)

    async def collect(request: Request, job: Job) -> tuple[str, list[TokenLogprob], GenerationResult]:
        pieces, tokens, result = [], [], None
        async for piece, more, result in run_job(request, job):
            pieces.append(piece)
            tokens += more
        if result is None:  # cancelled: the client is gone, or the server is stopping
            raise cancelled(job)
        return "".join(pieces), tokens, result

    return app


def cancelled(job: Job) -> p.ApiError:
    """The answer to a request cancelled before its end: 503 when the server is stopping; when the client went away
    (it cancelled its own job), 499 as nginx logs it, an answer no one reads, for the log's line."""
    if job.client_gone.is_set():
        return p.ApiError(499, "the request was cancelled: the client closed the connection", code="client_closed")
    return p.ApiError(503, "the request was cancelled: the server is stopping", type="server_error", code="cancelled")


def not_json(constant: str):
    """json.loads takes NaN and Infinity; JSON (and OpenAI) does not."""
    raise ValueError(f"{constant} is not a JSON value")


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client closes the connection (the body is read by now, so the next
    ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel(client_gone=True)
            return


def sse(events: AsyncIterator[BaseModel], jobs: list[Job]) -> StreamingResponse:
    """The chat's and completions' server-sent events: `data: {json}` per chunk, then `data: [DONE]`; an error as
    OpenAI's error object, which the openai client raises (event_stream)."""

    async def lines():
        async for event in events:
            yield f"data: {event.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return event_stream(lines(), jobs, lambda e: f"data: {json.dumps(e.body())}\n\n")


def event_stream(lines: AsyncIterator[str], jobs: list[Job], error: Callable[[p.ApiError], str]) -> StreamingResponse:
    """Server-sent events, lines (each an event's text). An error after the headers went out can only be an event,
    error(e); also for a cancellation, else a stream cut short by the server's stop would read as complete. jobs: the
    request's (a batch's prompts run one after another), cancelled where the stream ends before them."""

    async def guarded():
        try:
            async for line in lines:  # (they raise cancelled() where the job ended without its result)
                yield line
        except p.ApiError as e:
            yield error(e)
        except (GeneratorExit, asyncio.CancelledError):  # the stream torn down before its end: the client left (a
            for job in jobs:  # server that stops cancels its jobs first, and the first reason stays)
                job.cancel(client_gone=True)
            raise
        finally:
            for job in jobs:
                job.cancel()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
