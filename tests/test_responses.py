"""POST /v1/responses (spqt.serve.responses): OpenAI's Responses API on the chat's machinery, through the real server
(the default model on the CPU, conftest's server) and the openai client's responses.create / responses.stream; the
stored responses (spqt.serve.response_store): previous_response_id, retrieve, delete, input_items.list. The
answers are the chat endpoint's; the templates with tools or think tags, and their scripted answers, are
test_serve's; the template and scripted fixtures conftest's.
"""

import json
import re
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from conftest import CTX, KEY, THINK_TEMPLATE, TOOL_TEMPLATE, Server, named_events, serving  # noqa: E402

ASK = "Name three primary colors."
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
    "additionalProperties": False}}
FORECAST = {"type": "function", "name": "get_forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def events(server, body: dict) -> list[dict]:
    """The data of a streamed response's events, each checked to be named by its type in its event line and to be an
    event the openai client's types accept."""
    req = urllib.request.Request(server.url + "/v1/responses", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers.get_content_type() == "text/event-stream"
        out = named_events(r.read().decode(), STREAM_EVENT)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def comparable(response) -> dict:
    """What two runs of one greedy request share: the status, the output items but for their ids, the token counts but
    for the cached ones, the logprobs' tokens (a prompt that the cache held in part gives logprobs a few last bits
    apart)."""
    items = []
    for item in response.output:
        item = item.model_dump(exclude={"id", "call_id", "parsed_arguments"})
        for part in item.get("content") or []:
            part.pop("parsed", None)
            part["logprobs"] = [(e["token"], [a["token"] for a in e["top_logprobs"]]) for e in part.get("logprobs", [])]
        items.append(item)
    return {"status": response.status, "incomplete": response.incomplete_details, "output": items,
            "usage": response.usage.model_dump(exclude={"input_tokens_details"})}


def final_streamed(client, **body):
    """The final response of responses.stream (every event parsed by the openai client), and its events' types."""
    with client.responses.stream(**body) as stream:
        types = [event.type for event in stream]
        return stream.get_final_response(), types


def test_greedy_answer_is_the_chats_and_max_output_tokens_leaves_it_incomplete(server, model_id):
    """A string input is one user message, instructions a system message first: the greedy answer is the chat
    endpoint's for that conversation, its usage the chat's; max_output_tokens cut it (status incomplete, its reason,
    the message incomplete); the body is a Response to the openai client's types, the request's settings echoed; one
    log line."""
    client = server.client()
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": ASK}], temperature=0,
                                          max_tokens=12)
    assert chat.choices[0].finish_reason == "length"  # (12 tokens cut the answer)
    r = client.responses.create(model=model_id, input=ASK, temperature=0, max_output_tokens=12)
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    (message,) = r.output
    assert (message.type, message.status, message.role) == ("message", "incomplete", "assistant")
    assert r.id.startswith("resp_") and message.id.startswith("msg_") and r.object == "response" and r.error is None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == \
        (chat.usage.prompt_tokens, 12, chat.usage.prompt_tokens + 12)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    cached = r.usage.input_tokens_details
    assert cached.cached_tokens == chat.usage.prompt_tokens - 1 and cached.cache_write_tokens == 1  # (chat's prompt)
    status, body = server.raw("/v1/responses", json.dumps({"model": model_id, "input": ASK, "temperature": 0,
                                                           "max_output_tokens": 12, "metadata": {"k": "v"}}).encode())
    assert status == 200
    Response.model_validate(body)  # (strict: every field the client's type asks for, of its type)
    assert body["output"][0]["content"][0]["text"] == r.output_text
    echoed = {k: body[k] for k in ("max_output_tokens", "temperature", "top_p", "tools", "tool_choice", "text",
                                   "parallel_tool_calls", "metadata", "instructions", "truncation")}
    assert echoed == {"max_output_tokens": 12, "temperature": 0.0, "top_p": 1.0, "tools": [], "tool_choice": "auto",
                      "text": {"format": {"type": "text"}}, "parallel_tool_calls": True, "metadata": {"k": "v"},
                      "instructions": None, "truncation": "disabled"}, echoed
    assert re.search(r"POST /v1/responses 200 finish length, prompt \d+ .*\+ completion 12 tokens", server.log_text())
    system = "Answer in French."
    chat = client.chat.completions.create(model=model_id, temperature=0, max_tokens=6, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": ASK}])
    r = client.responses.create(model=model_id, instructions=system, temperature=0, max_output_tokens=6, input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK}]}])
    assert r.output_text == chat.choices[0].message.content and r.instructions == system
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_stream_events_are_openais_and_end_in_the_plain_response(server, model_id):
    """Streamed: the events in OpenAI's order, each named, numbered and of the client's types, the deltas joined to the
    done text and the plain answer; responses.create(stream=True) and responses.stream parse them, and the latter's
    final response is the plain one; logprobs (include) on the output text, the deltas' joined to the done's."""
    client = server.client()
    body = dict(model=model_id, input=ASK, temperature=0, max_output_tokens=40, top_logprobs=2,
                include=["message.output_text.logprobs"])
    plain = client.responses.create(**body)
    assert plain.status == "completed" and plain.incomplete_details is None  # (the answer ends within 40 tokens)
    logprobs = plain.output[0].content[0].logprobs
    assert "".join(e.token for e in logprobs) == plain.output_text and all(len(e.top_logprobs) == 2 for e in logprobs)
    assert plain.usage.output_tokens == len(logprobs) + 1  # (and the end token)
    got = events(server, body)
    types = [e["type"] for e in got]
    deltas = types.count("response.output_text.delta")
    assert deltas > 1 and types == ["response.created", "response.in_progress", "response.output_item.added",
                                    "response.content_part.added"] + ["response.output_text.delta"] * deltas + \
        ["response.output_text.done", "response.content_part.done", "response.output_item.done",
         "response.completed"], types
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    done = got[-4]
    assert "".join(e["delta"] for e in got if e["type"].endswith(".delta")) == done["text"] == plain.output_text
    assert [x for e in got if e["type"].endswith(".delta") for x in e["logprobs"]] == done["logprobs"]
    assert len({e["item_id"] for e in got[3:-2]} | {got[2]["item"]["id"], got[-2]["item"]["id"]}) == 1
    assert Response.model_validate(got[-1]["response"]).output_text == plain.output_text
    typed = list(client.responses.create(stream=True, **body))
    assert [e.type for e in typed] == types and type(typed[-1]).__name__ == "ResponseCompletedEvent"
    final, streamed_types = final_streamed(client, **body)
    assert streamed_types == types and comparable(final) == comparable(plain)
    assert [e.logprob for e in final.output[0].content[0].logprobs] == pytest.approx([e.logprob for e in logprobs],
                                                                                     abs=1e-3)


def test_text_format_json_schema_is_structured_output(server, model_id):
    """text.format json_schema: the answer is JSON the schema accepts, the chat endpoint's under response_format;
    json_object starts an object; the format is echoed."""
    client = server.client()
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "paint", "schema": schema, "strict": True}
    r = client.responses.create(model=model_id, input="Pick a color and a count as JSON.", temperature=0,
                                max_output_tokens=40, text={"format": fmt})
    value = json.loads(r.output_text)
    assert r.status == "completed" and value["color"] in ("red", "green", "blue") and 1 <= value["count"] <= 9
    assert r.text.format.name == "paint" and r.text.format.schema_ == schema
    chat = client.chat.completions.create(model=model_id, temperature=0, max_tokens=40, messages=[
        {"role": "user", "content": "Pick a color and a count as JSON."}], response_format={
        "type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}})
    assert chat.choices[0].message.content == r.output_text
    first = client.responses.create(model=model_id, input=ASK, temperature=0, max_output_tokens=1,
                                    text={"format": {"type": "json_object"}})
    assert first.output_text.startswith("{"), first.output_text


def test_forced_tool_calls_keep_to_their_schema(server, model_id, template):
    """tool_choice 'required' or a named function (the model's own greedy answer, through the template's call format
    and its grammar): function_call items of an offered tool (the named one) whose arguments keep to its parameters;
    parallel_tool_calls false gives one; streamed, each call's events, and the final response is the plain one."""
    template(TOOL_TEMPLATE)
    client = server.client()
    ask = dict(model=model_id, input="What will the weather be in Paris?", tools=[WEATHER, FORECAST], temperature=0,
               max_output_tokens=70)  # (the prompt of the tools holds 181 tokens)

    def calls(r, names: set[str]) -> list:
        found = [item for item in r.output if item.type == "function_call"]
        assert r.status == "completed" and found and [i.type for i in r.output] == ["function_call"] * len(found)
        for call in found:
            args = json.loads(call.arguments)
            assert call.name in names and call.status == "completed", call
            assert call.call_id.startswith("call_") and call.id.startswith("fc_")
            assert set(args) == ({"city", "days"} if call.name == "get_forecast" else {"city"}), args
            assert isinstance(args["city"], str) and len(args["city"]) <= 30
            assert call.name != "get_forecast" or 1 <= args["days"] <= 7
        return found

    calls(client.responses.create(tool_choice="required", **ask), {"get_weather", "get_forecast"})
    named = dict(ask, tool_choice={"type": "function", "name": "get_forecast"}, parallel_tool_calls=False)
    plain = client.responses.create(**named)
    assert len(calls(plain, {"get_forecast"})) == 1 and plain.tool_choice.name == "get_forecast"
    got = events(server, named)
    assert [e["type"] for e in got[2:-1]] == ["response.output_item.added", "response.function_call_arguments.delta",
                                              "response.function_call_arguments.done", "response.output_item.done"]
    assert got[2]["item"]["arguments"] == "" and got[4]["arguments"] == got[5]["item"]["arguments"] == \
        got[3]["delta"] == plain.output[0].arguments
    final, _ = final_streamed(client, **named)
    assert comparable(final) == comparable(plain)


def test_a_turn_after_a_call_renders_as_the_chats(server, model_id, template, scripted):
    """An input of messages (a developer's too), an earlier answer's message and function_call, and the call's
    function_call_output renders through the template as the same chat does (the call and its result in the
    template's format), the instructions first; an earlier reasoning item is left out; tool_choice none leaves the
    tools out. An answer of text and a call: a message and a function_call item, streamed alike."""
    template(TOOL_TEMPLATE)
    client = server.client()
    turn = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                           "text": "A SECRET THOUGHT"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed", "content": [
                {"type": "output_text", "text": "Let me check.", "annotations": []}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}',
             "id": "fc_1", "status": "completed"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]
    scripted.answer = "It is sunny."
    r = client.responses.create(model=model_id, input=turn, instructions="You tell the weather.", tools=[WEATHER])
    assert r.output_text == "It is sunny." and r.status == "completed"
    prompt = scripted.prompts[-1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt, prompt
    assert "<tool_response>sunny, 21 C</tool_response>" in prompt and "SECRET" not in prompt, prompt
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    client.chat.completions.create(model=model_id, tools=[chat_tool], messages=[
        {"role": "system", "content": "You tell the weather."}, {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert scripted.prompts[-1] == prompt
    client.responses.create(model=model_id, input=turn, tools=[WEATHER], tool_choice="none")
    assert "Tools:" in prompt and "Tools:" not in scripted.prompts[-1]
    scripted.answer = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    r = client.responses.create(model=model_id, input="Weather in Oslo?", tools=[WEATHER])
    assert [i.type for i in r.output] == ["message", "function_call"] and r.output_text == "Let me check."
    assert (r.output[1].name, json.loads(r.output[1].arguments)) == ("get_weather", {"city": "Oslo"})
    final, types = final_streamed(client, model=model_id, input="Weather in Oslo?", tools=[WEATHER])
    assert comparable(final) == comparable(r)
    assert types.index("response.output_item.done") < types.index("response.function_call_arguments.done"), types


def test_reasoning_items_where_the_template_thinks(server, model_id, engine, template, scripted):
    """A think template's answer: a reasoning item (its reasoning_text) before the message, its tokens counted as
    reasoning_tokens, the logprobs the text's alone; streamed, the reasoning's events first and the final response the
    plain one; thinking after a prompt that opened the block (chat_template_kwargs); thinking cut by
    max_output_tokens: the reasoning item alone, incomplete."""
    template(THINK_TEMPLATE)
    tok, client = engine.tokenizer, server.client()
    thought = "<think>\nRed, yellow, blue are the painter's.\n</think>"
    scripted.answer = thought + "\n\nRed, green and blue."
    ask = dict(model=model_id, input=ASK, include=["message.output_text.logprobs"])
    r = client.responses.create(**ask)
    assert [i.type for i in r.output] == ["reasoning", "message"] and r.output_text == "Red, green and blue."
    reasoning = r.output[0]
    assert [c.text for c in reasoning.content] == ["Red, yellow, blue are the painter's."]
    assert reasoning.summary == [] and reasoning.status == "completed" and reasoning.id.startswith("rs_")
    ids = tok.backend.encode(scripted.answer, add_special_tokens=False).ids
    closing = next(k for k in range(len(ids) + 1) if "</think>" in tok.decode(ids[:k]))  # (up to the tag's last)
    assert r.usage.output_tokens_details.reasoning_tokens == closing and r.usage.output_tokens == len(ids)
    assert "".join(e.token for e in r.output[1].content[0].logprobs).lstrip() == r.output_text
    final, types = final_streamed(client, **ask)
    assert comparable(final) == comparable(r)
    assert types[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta"], types
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta"), types
    whole = client.responses.create(model=model_id, input=[{"role": "user", "content": ASK}, {
        "role": "assistant", "content": r.output_text}, {"role": "user", "content": "Thanks."}])
    prompt = scripted.prompts[-1]  # (the reasoning item by reference: left out of the prompt, as sent whole)
    client.responses.create(model=model_id, input=[{"role": "user", "content": ASK}, {"id": reasoning.id},
                                                   {"id": r.output[1].id}, {"role": "user", "content": "Thanks."}])
    assert scripted.prompts[-1] == prompt and whole.status == "completed"
    scripted.answer = "Let me think.\n</think>\nBlue."
    opened = client.responses.create(model=model_id, input=ASK,
                                     extra_body={"chat_template_kwargs": {"open_think": True}})
    assert (opened.output[0].content[0].text, opened.output_text) == ("Let me think.", "Blue.")
    assert scripted.prompts[-1].endswith("<think>\n")
    scripted.answer = "<think>\nA long way to go"
    cut = client.responses.create(model=model_id, input=ASK, max_output_tokens=8)
    assert (cut.status, [i.type for i in cut.output], cut.output[0].status) == ("incomplete", ["reasoning"],
                                                                                "incomplete")
    assert cut.output[0].content[0].text.startswith("A long") and cut.output_text == ""
    assert cut.usage.output_tokens_details.reasoning_tokens == cut.usage.output_tokens == 8
    streamed = events(server, dict(model=model_id, input=ASK, max_output_tokens=8))
    assert streamed[-1]["type"] == "response.incomplete" and \
        comparable(Response.model_validate(streamed[-1]["response"])) == comparable(cut)


def test_reasoning_effort_turns_the_thinking_on_or_off(server, model_id, template, scripted):
    """OpenAI's reasoning effort (the chat's reasoning_effort, the Responses' reasoning.effort) on a think template:
    none and minimal set enable_thinking false, the others true, and the template gets reasoning_effort; a summary is
    taken (none made); an enable_thinking in chat_template_kwargs that disagrees, or none on a template that thinks
    with no switch: a 400 naming the field."""
    template(THINK_TEMPLATE + "{% if reasoning_effort is defined %}[{{ reasoning_effort }}]{% endif %}")
    client = server.client()
    scripted.answer = "<think>\nHm.\n</think>\n\nBlue."
    for effort, tail in [("none", "assistant<think>\n\n</think>[none]"),
                         ("minimal", "assistant<think>\n\n</think>[minimal]"), ("high", "<|im_start|>assistant[high]")]:
        r = client.responses.create(model=model_id, input=ASK, reasoning={"effort": effort, "summary": "auto"})
        assert scripted.prompts[-1].endswith(tail), (effort, scripted.prompts[-1])
        assert (r.reasoning.effort, r.reasoning.summary, r.output_text) == (effort, "auto", "Blue.")
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": ASK}],
                                       reasoning_effort=effort)
        assert scripted.prompts[-1].endswith(tail), (effort, scripted.prompts[-1])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": ASK}],
                                       reasoning_effort="low", extra_body={"chat_template_kwargs": {
                                           "enable_thinking": False}})
    assert e.value.body["param"] == "reasoning_effort" and "disagree" in e.value.message
    template(THINK_TEMPLATE.replace("enable_thinking is defined and enable_thinking is false", "false"))
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_id, input=ASK, reasoning={"effort": "none"})
    assert e.value.body["param"] == "reasoning.effort" and "cannot be honoured" in e.value.message
    client.responses.create(model=model_id, input=ASK, reasoning={"effort": "medium"})
    assert scripted.prompts[-1].endswith("<|im_start|>assistant")
    # a template whose switch is `thinking`, off unless set (Granite 3.2 / 3.3's): the effort sets it
    template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if thinking %}<|system|>Think "
             "first, between <think></think>.\n{% endif %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    for effort, on in [("max", True), ("minimal", False)]:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": ASK}],
                                       reasoning_effort=effort)
        assert ("Think first" in scripted.prompts[-1]) == on, (effort, scripted.prompts[-1])
    for thinking, on in [({"type": "enabled", "budget_tokens": 64}, True), ({"type": "disabled"}, False)]:
        status, _ = server.raw("/v1/messages", json.dumps({"model": model_id, "max_tokens": 8, "thinking": thinking,
                                                           "messages": [{"role": "user", "content": ASK}]}).encode())
        assert status == 200 and ("Think first" in scripted.prompts[-1]) == on, (thinking, scripted.prompts[-1])


def test_the_stream_of_an_answer_ends_in_its_plain_response():
    """ResponseStream over an answer's pieces (fed a character at a time through AnswerStream) ends in the response
    that completed() gives for the whole answer (read_answer), items and statuses alike, for text, thinking (cut too),
    calls after text or after white space alone, white space alone and nothing; each event is of the client's types,
    each message's deltas add up to its done text (white space before a call held back, where tools are offered), and
    an error after the stream began is an error event."""
    from spqt.generate import GenerationResult
    from spqt.serve import responses as r
    from spqt.serve.answer import AnswerStream, Reading, read_answer
    from spqt.serve.protocol import ApiError

    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    readings = {"plain": Reading(), "think": Reading(think=True), "tools": Reading(fmt="hermes", offered={"f"}),
                "both": Reading(think=True, fmt="hermes", offered={"f"})}
    cases = [("plain", "Red, green and blue.", False), ("plain", "", False), ("plain", "  ", False),
             ("think", "<think>\nHm.\n</think>\n\nBlue.", False), ("think", "<think>\nA long wa", True),
             ("think", "<think>x</think>", False), ("tools", "Let me check.\n" + call, False),
             ("tools", "\n" + call + call, False), ("tools", "No call.", True), ("both", "<think>f</think>\n" + call,
                                                                                 False),
             ("tools", "Let me check. \n\n" + call, False), ("tools", "Sure.\n\nMore text. \n", False),
             ("both", "<think>f</think>\nOne moment.\n" + call, False)]
    offered = {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}

    def body(response) -> dict:
        out = response.model_dump(exclude={"id", "created_at"})
        for item in out["output"]:
            item.pop("id")
            item.pop("call_id", None)
        return out

    for kind, text, cut in cases:
        reading, result = readings[kind], GenerationResult([0] * 5, 3, 0.01, 0.01, finish_reason="length" if cut
                                                           else "stop")
        counts = r.usage(result, 0, True)
        request = r.ResponsesRequest.model_validate(offered if reading.fmt else {"input": "x"})
        plain = r.completed(r.new_response(request, "m", False), read_answer(text, reading), [], cut, counts)
        stream, answer = r.ResponseStream(r.new_response(request, "m", False)), AnswerStream(reading)
        lines = stream.start()
        for char in text:
            lines += [line for part in answer.feed(char, []) for line in stream.add(part)]
        lines += [line for part in answer.finish() for line in stream.add(part)] + stream.end(cut, [], counts)
        for line in lines:
            STREAM_EVENT.validate_python(json.loads(line.split("\ndata: ")[1]))
        assert body(stream.response) == body(plain), (kind, text, body(stream.response), body(plain))
        events = [json.loads(line.split("\ndata: ")[1]) for line in lines]
        sent = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        done = [e["text"] for e in events if e["type"] == "response.output_text.done"]
        assert done == [sent] if done else sent == "", (kind, text, sent, done)
        assert plain.status == ("incomplete" if cut else "completed") and plain.output, (kind, text)
    error, failed = [json.loads(event.split("\ndata: ")[1])
                     for event in stream.error(ApiError(503, "stopping", code="cancelled")).split("\n\n")[:2]]
    assert STREAM_EVENT.validate_python(error).type == "error" and error["code"] == "cancelled"
    assert error["sequence_number"] == len(lines) and failed["sequence_number"] == len(lines) + 1
    failed = STREAM_EVENT.validate_python(failed)  # (then response.failed: the response so far, its error)
    assert failed.type == "response.failed" and failed.response.status == "failed", failed
    assert (failed.response.error.code, failed.response.error.message) == ("server_error", "stopping")
    assert [item.id for item in failed.response.output] == [item.id for item in stream.response.output]


def test_what_this_server_cannot_honour_is_a_400_naming_its_field(server, model_id, template):
    """The Conversations API (conversation), a stored prompt, background, reasoning effort (the template writes no
    thinking) and a summary of an unknown kind, an item_reference without its id,
    verbosity, truncation 'auto', tools other than functions, tool_choice of another kind or naming a tool not offered,
    input items and parts other than text, a call's item without its fields, an input of reasoning alone, n, the
    bounds of max_output_tokens and top_logprobs, structured output beside tools, a prompt beyond the context: each a
    400 naming its field; another model a 404."""
    template(TOOL_TEMPLATE)
    ask = {"model": model_id, "input": ASK, "max_output_tokens": 2}
    for change, param in [
            ({"conversation": "conv_1"}, "conversation"), ({"prompt": {"id": "pmpt_1"}}, "prompt"),
            ({"background": True}, "background"),
            ({"reasoning": {"effort": "low"}}, "reasoning.effort"), ({"reasoning": {"effort": "extreme"}},
                                                                     "reasoning.effort"),
            ({"reasoning": {"summary": "brief"}}, "reasoning.summary"),
            ({"text": {"verbosity": "low"}}, "text.verbosity"), ({"truncation": "auto"}, "truncation"),
            ({"tools": [{"type": "web_search"}]}, "tools[0]"),
            ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[1]"),
            ({"tools": [{**WEATHER, "name": "no spaces"}]}, "tools[0].name"),
            ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "rm_rf"}}, "tool_choice"),
            ({"tool_choice": "required"}, "tool_choice"),
            ({"input": [{"type": "item_reference"}]}, "input[0]"),
            ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
             "input[0].content[0].type"),
            ({"input": [{"type": "function_call", "name": "get_weather", "arguments": "{}"}]}, "input[0]"),
            ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
             "input[0].arguments"),
            ({"input": [{"type": "reasoning", "summary": []}]}, "input"), ({"input": []}, "input"),
            ({"input": None}, "input"), ({"n": 2}, "n"), ({"max_output_tokens": 0}, "max_output_tokens"),
            ({"top_logprobs": 21}, "top_logprobs"), ({"text": {"format": {"type": "json_schema", "schema": {}}}},
                                                     "text.format"),
            ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
            ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
            ({"input": "colors " * 2 * CTX}, "input"),
            ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]}, "input")]:
        status, body = server.raw("/v1/responses", json.dumps({**ask, **change}).encode())
        error = body.get("error") or {}
        assert (status, error.get("param")) == (400, param), (change, body)
        assert "\n" not in error["message"] and error["type"] == "invalid_request_error", body
    status, body = server.raw("/v1/responses", json.dumps({**ask, "tools": [{"type": "web_search"}]}).encode())
    assert "'web_search' tools are not supported" in body["error"]["message"], body
    status, body = server.raw("/v1/responses", json.dumps({**ask, "max_output_tokens": CTX}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert f"max_output_tokens asks for {CTX} more" in body["error"]["message"], body  # (its own field's name)
    unanswered = {"type": "function_call_output", "call_id": "call_9", "output": "x"}  # (no call_9 before it)
    status, body = server.raw("/v1/responses", json.dumps({**ask, "input": [unanswered]}).encode())
    assert body["error"]["message"] == "No tool call found for function call output with call_id call_9.", body
    status, body = server.raw("/v1/responses", json.dumps({**ask, "conversation": {"id": "conv_1"}}).encode())
    assert "the Conversations API is not supported" in body["error"]["message"], body
    assert server.raw("/v1/responses", json.dumps({**ask, "model": "gpt-4o"}).encode())[0] == 404
    accepted = {"store": False, "user": "u", "include": ["reasoning.encrypted_content"], "truncation": "disabled",
                "reasoning": {"effort": None}, "stream_options": {"include_obfuscation": False}, "service_tier": "auto"}
    assert server.raw("/v1/responses", json.dumps({**ask, **accepted}).encode())[0] == 200


def test_a_stream_whose_client_leaves_frees_the_model(server, model_id):
    """The client closes a long stream after its first deltas: the job is cancelled at its next token (logged as the
    client's leaving), the response is not stored, and the server answers the next request."""
    client = server.client()
    before = server.health()["cancelled"]
    stream = client.responses.create(model=model_id, input="Tell me a long story.", temperature=0, stream=True,
                                     max_output_tokens=CTX - 64)
    deltas, response_id = 0, None
    for event in stream:
        response_id = response_id or event.response.id  # (response.created's)
        deltas += event.type == "response.output_text.delta"
        if deltas == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while (health := server.health())["cancelled"] == before or health["running"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    line = [ln for ln in server.log_text().splitlines() if "POST /v1/responses cancelled (client gone" in ln][-1]
    assert int(re.search(r"completion (\d+) tokens", line).group(1)) < 40, line
    assert server.raw(f"/v1/responses/{response_id}")[0] == 404
    assert client.responses.create(model=model_id, input=ASK, max_output_tokens=2).usage.output_tokens == 2


def test_previous_response_id_continues_the_conversation_as_sent_whole(server, model_id, template, scripted):
    """A turn after a stored response (previous_response_id) renders the prompt of the same conversation sent whole:
    the earlier input, the earlier answer's message (its reasoning left out), the new input, over two stored turns;
    the earlier instructions are not carried over, the new ones come first; previous_response_id is echoed."""
    template(THINK_TEMPLATE)
    client = server.client()
    scripted.answer = "<think>\nA SECRET THOUGHT\n</think>\n\nRed, green and blue."
    first = client.responses.create(model=model_id, input=ASK, instructions="Answer in French.")
    assert [i.type for i in first.output] == ["reasoning", "message"] and first.previous_response_id is None
    scripted.answer = "Yellow."
    second = client.responses.create(model=model_id, input="And another?", instructions="Be brief.",
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == "Yellow."
    whole = [{"role": "user", "content": ASK}, {"role": "assistant", "content": "Red, green and blue."},
             {"role": "user", "content": "And another?"}]
    chained = scripted.prompts[-1]
    assert "SECRET" not in chained and "French" not in chained and "Be brief." in chained, chained
    client.responses.create(model=model_id, input=whole, instructions="Be brief.")
    assert scripted.prompts[-1] == chained
    client.responses.create(model=model_id, input="Thanks.", previous_response_id=second.id)
    chained = scripted.prompts[-1]
    client.responses.create(model=model_id, input=whole + [{"role": "assistant", "content": "Yellow."},
                                                           {"role": "user", "content": "Thanks."}])
    assert scripted.prompts[-1] == chained and "Be brief." not in chained


def test_a_call_answered_through_previous_response_id(server, model_id, template, scripted):
    """An answer's function_call answered by a function_call_output after previous_response_id: the prompt of the
    whole conversation (the answer's text and call one assistant message, then the call's result); the answer's items
    sent again beside previous_response_id are OpenAI's 400 (duplicate items), named by item_reference instead they
    give the whole conversation's prompt (an unknown id: OpenAI's 404)."""
    template(TOOL_TEMPLATE)
    client = server.client()
    scripted.answer = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                       '</tool_call>')
    first = client.responses.create(model=model_id, input="Weather in Paris?", tools=[WEATHER])
    call = first.output[1]
    answered = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    scripted.answer = "It is sunny."
    second = client.responses.create(model=model_id, input=[answered], tools=[WEATHER], previous_response_id=first.id)
    chained = scripted.prompts[-1]
    assert second.output_text == "It is sunny." and "<tool_response>sunny, 21 C</tool_response>" in chained, chained
    client.responses.create(model=model_id, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": '{"city": "Paris"}'},
        answered])
    assert scripted.prompts[-1] == chained
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_id, input=[*first.output, answered], previous_response_id=first.id)
    assert e.value.param == "input" and f"Duplicate item found with id {first.output[0].id}." in e.value.message
    client.responses.create(model=model_id, tools=[WEATHER], input=[  # (the answer's items named by their ids)
        {"role": "user", "content": "Weather in Paris?"}, {"type": "item_reference", "id": first.output[0].id},
        {"type": "item_reference", "id": call.id}, answered])
    assert scripted.prompts[-1] == chained
    client.responses.create(model=model_id, tools=[WEATHER], input=[  # (OpenAI's item_reference: its type optional)
        {"role": "user", "content": "Weather in Paris?"}, {"id": first.output[0].id}, {"id": call.id, "type": None},
        answered])
    assert scripted.prompts[-1] == chained
    with pytest.raises(openai.BadRequestError) as e:  # (an item the continued conversation holds already)
        client.responses.create(model=model_id, previous_response_id=first.id, input=[
            {"type": "item_reference", "id": call.id}, answered])
    assert e.value.param == "input" and f"Duplicate item found with id {call.id}." in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=model_id, input=[{"type": "item_reference", "id": "msg_none"}])
    assert e.value.body["param"] == "input" and "Item with id 'msg_none' not found." in e.value.message
    repeated = {"id": "msg_twice", "role": "user", "content": "Weather?"}  # (the input's own repeat: its pages)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_id, input=[repeated, repeated])
    assert e.value.param == "input" and "Duplicate item found with id msg_twice." in e.value.message


def test_stored_responses_are_retrieved_and_deleted(server, model_id, scripted):
    """GET /v1/responses/{id} answers the JSON its POST answered (a stream's: its last event's response), which the
    openai client's retrieve parses; DELETE answers OpenAI's deletion object, then GET, DELETE, the input items and
    previous_response_id are 404s (the latter OpenAI's previous_response_not_found); store false keeps nothing,
    plain or streamed; the routes ask for the key."""
    scripted.answer = "Blue."
    client, ask = server.client(), {"model": model_id, "input": ASK}
    status, posted = server.raw("/v1/responses", json.dumps(ask).encode())
    path = f"/v1/responses/{posted['id']}"
    assert status == 200 and posted["store"] is True and server.raw(path) == (200, posted)
    streamed = events(server, ask)[-1]["response"]
    assert server.raw(f"/v1/responses/{streamed['id']}") == (200, streamed) and streamed["output"]
    assert client.responses.retrieve(posted["id"]).output_text == "Blue."
    assert server.raw(path, key="wrong")[0] == server.raw(path, key="wrong", method="DELETE")[0] == 401
    assert server.raw(path + "?stream=true")[1]["error"]["param"] == "stream"
    assert server.raw(path, method="DELETE") == (200, {"id": posted["id"], "object": "response.deleted",
                                                       "deleted": True})
    for gone, method in [(path, "GET"), (path, "DELETE"), (path + "/input_items", "GET")]:
        status, body = server.raw(gone, method=method)
        assert status == 404 and body["error"]["message"] == f"Response with id '{posted['id']}' not found.", body
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=model_id, input="More?", previous_response_id=posted["id"])
    assert (e.value.code, e.value.param) == ("previous_response_not_found", "previous_response_id")
    assert e.value.body["message"] == f"Previous response with id '{posted['id']}' not found.", e.value.body
    unstored = client.responses.create(model=model_id, input=ASK, store=False)
    streamed = events(server, {**ask, "store": False})[-1]["response"]
    assert unstored.to_dict()["store"] is False and streamed["store"] is False
    for response_id in (unstored.id, streamed["id"]):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response_id)


def test_input_items_list_the_requests_inputs(server, model_id, template, scripted):
    """GET /v1/responses/{id}/input_items: the request's input items (its reasoning item, dropped, left out), with the
    ids the client gave and new ones, as OpenAI's list object: last first by default, asc in order, a page of limit
    with has_more, and the openai client's pages (after) in turn; bad query values a 400 naming them."""
    template(TOOL_TEMPLATE)
    client = server.client()
    scripted.answer = "It is sunny."
    turn = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "id": "msg_1", "content": [
                {"type": "output_text", "text": "Let me check.", "annotations": []}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}',
             "id": "fc_1"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]
    r = client.responses.create(model=model_id, input=turn, tools=[WEATHER])
    status, listed = server.raw(f"/v1/responses/{r.id}/input_items?order=asc")
    items = listed["data"]
    assert status == 200 and listed["object"] == "list" and not listed["has_more"]
    assert [(i["type"], i.get("role")) for i in items] == [("message", "developer"), ("message", "user"),
                                                           ("message", "assistant"), ("function_call", None),
                                                           ("function_call_output", None)], items
    ids = [i["id"] for i in items]
    assert ids[2:4] == ["msg_1", "fc_1"] and ids[0].startswith("msg_") and len(set(ids)) == 5
    assert (listed["first_id"], listed["last_id"]) == (ids[0], ids[-1])
    assert items[1]["content"] == [{"type": "input_text", "text": "Weather in Paris?"}]
    assert items[2]["content"] == [{"type": "output_text", "text": "Let me check.", "annotations": []}]
    assert (items[3]["arguments"], items[4]["output"]) == ('{"city": "Paris"}', "sunny, 21 C")
    assert [i.id for i in client.responses.input_items.list(r.id).data] == ids[::-1]
    page = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.id for i in page.data] == ids[:2] and page.has_more
    assert [i.id for i in client.responses.input_items.list(r.id, order="asc", limit=2)] == ids  # (every page)
    for query, param in [("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"), ("after=x", "after")]:
        status, body = server.raw(f"/v1/responses/{r.id}/input_items?{query}")
        assert (status, body["error"]["param"]) == (400, param), body


def test_the_store_keeps_the_last_n_responses(engine, model_id, scripted):
    """A server that keeps 2 responses: the least recently used goes first (a retrieved one stays); one that keeps
    none: store echoed false, previous_response_id refused as before stored responses were."""
    scripted.answer = "Blue."
    with serving(engine, api_key=KEY, stored_responses=2) as url:
        client = Server(url, []).client()
        a, b = (client.responses.create(model=model_id, input=ASK) for _ in range(2))
        client.responses.retrieve(a.id)
        c = client.responses.create(model=model_id, input=ASK)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(b.id)
        assert [client.responses.retrieve(x.id).id for x in (a, c)] == [a.id, c.id]
    with serving(engine, api_key=KEY, stored_responses=0) as url:
        server = Server(url, [])
        status, posted = server.raw("/v1/responses", json.dumps({"model": model_id, "input": ASK}).encode())
        assert status == 200 and posted["store"] is False and server.raw(f"/v1/responses/{posted['id']}")[0] == 404
        status, body = server.raw("/v1/responses", json.dumps({"model": model_id, "input": ASK,
                                                               "previous_response_id": posted["id"]}).encode())
        assert (status, body["error"]["param"]) == (400, "previous_response_id")
        assert "stores no responses" in body["error"]["message"], body
        status, body = server.raw("/v1/responses", json.dumps({"model": model_id, "input": [
            {"type": "item_reference", "id": posted["output"][0]["id"]}]}).encode())
        assert (status, body["error"]["param"]) == (400, "input") and "stores no responses" in body["error"]["message"]


def test_the_store_keeps_its_bytes_bound(server, model_id, scripted):
    """The store's byte bound (JSON and input text): the least recently used go first until the rest fits, the newest
    kept whatever its size; a delete gives its bytes back."""
    from spqt.serve.responses import InputItem, ResponseObject
    from spqt.serve.response_store import ResponseStore

    scripted.answer = "Blue."
    client = server.client()
    made = [ResponseObject.model_validate(client.responses.create(model=model_id, input=ASK * (1 + 4 * i))
                                          .model_dump()) for i in range(3)]
    inputs = [[InputItem.model_validate({"role": "user", "content": ASK * (1 + 4 * i)})] for i in range(3)]
    sizes = [len(r.model_dump_json()) + len(i[0].model_dump_json()) for r, i in zip(made, inputs)]
    store = ResponseStore(10, max_bytes=sizes[1] + sizes[2])
    for response, given in zip(made, inputs):
        store.put(response, given, [])
    assert list(store.responses) == [made[1].id, made[2].id] and store.size == sizes[1] + sizes[2]
    store.delete(made[1].id)
    assert store.size == sizes[2]
    tiny = ResponseStore(10, max_bytes=1)
    for response, given in zip(made, inputs):
        tiny.put(response, given, [])
    assert list(tiny.responses) == [made[2].id] and tiny.size == sizes[2]


def test_the_responses_store_option(capsys, monkeypatch, tiny_hf):
    """spqt serve --responses-store N reaches the server (its default DEFAULT_CAPACITY, as its help says); a negative
    or non-integer N is one error line (exit 2)."""
    from spqt.cli import main
    from spqt.serve import server as served
    from spqt.serve.response_store import DEFAULT_CAPACITY

    for value, fragment in [("-1", "must be at least 0, got -1"), ("many", "expected an integer, got 'many'")]:
        with pytest.raises(SystemExit) as e:
            main(["serve", "--responses-store", value])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "--responses-store" in err[-1] and fragment in err[-1], err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert f"(default {DEFAULT_CAPACITY}," in " ".join(capsys.readouterr().out.split())
    kept = []
    monkeypatch.setattr(served, "serve", lambda *args: kept.append(args[-1]))
    for option in ([], ["--responses-store", "3"]):
        assert main(["serve", str(tiny_hf), "--device", "cpu", "--port", "0", *option]) == 0
    assert kept == [DEFAULT_CAPACITY, 3]


def test_the_thinking_switch_is_a_variable_the_template_reads():
    """reasoning.thinking_switch: enable_thinking before thinking, where the template reads it from its caller (as
    Qwen3's, Granite 3.3's, DeepSeek-V3.1's excerpts do), not where the word is in its strings (Phi-4-reasoning's
    system prompt), a message's field or its own variable; a template jinja cannot parse (transformers' generation
    tag) read by its code less its strings."""
    from spqt.serve.reasoning import thinking_switch

    for template, want in [
            ("{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}",
             "enable_thinking"),
            ("{%- if thinking %}Think{%- elif x %}{% endif %}{% if enable_thinking %}{% endif %}", "enable_thinking"),
            ("{%- if tools %}{%- elif thinking %}<think></think>{%- endif %}", "thinking"),  # Granite 3.3
            ("{% if not thinking is defined %}{% set thinking = false %}{% endif %}{% if not thinking %}</think>"
             "{% endif %}", "thinking"),  # DeepSeek-V3.1
            ("{{'<|im_start|>system<|im_sep|>Use a systematic thinking process, <think></think>'}}", None),  # Phi-4
            ("{% for m in messages %}{{ m.thinking }}{{ m['thinking'] }}{% endfor %}</think>", None),
            ("{% set thinking = messages[0].content %}{{ thinking }}{% for thinking in [1] %}{% endfor %}", None),
            ("{% generation %}{{ 'thinking' }}{% endgeneration %}{% if thinking %}{% endif %}", "thinking"),
            ("{% generation %}{{ 'deep thinking mode' }}{% endgeneration %}", None), ("", None), (None, None)]:
        assert thinking_switch(template) == want, template
