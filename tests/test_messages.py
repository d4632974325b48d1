"""POST /v1/messages and /v1/messages/count_tokens (spqt.serve.messages): Anthropic's Messages API on the chat's
machinery, through the real server (the default model on the CPU, conftest's server) and the anthropic client's
messages.create / messages.stream. The answers are the chat endpoint's; the templates and the template and scripted
fixtures are conftest's.
"""

import json
import urllib.error
import urllib.request

import pytest

anthropic = pytest.importorskip("anthropic", reason="the dev extra installs the anthropic client")

from anthropic.types import Message, RawMessageStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from conftest import CTX, KEY, THINK_TEMPLATE, TOOL_TEMPLATE, named_events  # noqa: E402

ASK = "Name three primary colors."
WEATHER = {"name": "get_weather", "description": "The weather in a city.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
    "additionalProperties": False}}
FORECAST = {"name": "get_forecast", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)
GREEDY = {"temperature": 0}  # (the anthropic client sends it as an extra body field: newer ones have no argument)


def client(server, **kw):
    """An anthropic.Anthropic client of the server (its key sent as x-api-key)."""
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120, **kw)


def sdk(body: dict) -> dict:
    """A request body as the anthropic client's arguments: the sampling fields it may not name as extra body fields."""
    extra = {k: body[k] for k in ("temperature", "top_p", "top_k") if k in body}
    return {k: v for k, v in body.items() if k not in extra} | ({"extra_body": extra} if extra else {})


def post(server, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict | list[dict]]:
    """(status, JSON) of a request sent as given with the x-api-key header (or headers); for a stream, its events'
    data, each checked to be named by its type in its event line and to be an event the anthropic client's types
    accept."""
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), headers=headers or {
        "x-api-key": KEY, "anthropic-version": "2023-06-01", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            if r.headers.get_content_type() != "text/event-stream":
                return r.status, json.load(r)
            return 200, named_events(r.read().decode(), STREAM_EVENT)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def comparable(message) -> dict:
    """What two runs of one greedy request share: the message but for its ids and the cache's split of the prompt."""
    body = message.model_dump(exclude={"id"}, exclude_none=True)
    for block in body["content"]:
        block.pop("id", None)
    usage = body.pop("usage")
    body["prompt_tokens"] = usage["input_tokens"] + usage["cache_read_input_tokens"]
    body["output_tokens"] = usage["output_tokens"]
    return body


def final_streamed(c, **body):
    """The final message of messages.stream (every event parsed by the anthropic client), and its events' types."""
    with c.messages.stream(**sdk(body)) as stream:
        types = [event.type for event in stream]
        return stream.get_final_message(), types


def test_greedy_text_is_the_chats_with_its_stops_and_counts(server, model_id):
    """The greedy answer is the chat endpoint's for the same conversation (a system text too), in Anthropic's message
    (a Message to the anthropic client's types); max_tokens cut it (stop_reason max_tokens); a stop sequence ends it
    before the string (stop_reason stop_sequence, the string); usage splits the prompt into cache read and not;
    count_tokens is the prompt's count; the Bearer header is taken as x-api-key is."""
    chat, c = server.client(), client(server)
    reply = chat.chat.completions.create(model=model_id, messages=[{"role": "user", "content": ASK}], temperature=0,
                                         max_tokens=12)
    assert reply.choices[0].finish_reason == "length"
    msg = c.messages.create(model=model_id, max_tokens=12, messages=[{"role": "user", "content": ASK}],
                            extra_body=GREEDY)
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == reply.choices[0].message.content
    assert (msg.stop_reason, msg.stop_sequence, msg.role, msg.type) == ("max_tokens", None, "assistant", "message")
    assert msg.id.startswith("msg_") and msg.model == model_id and msg.usage.output_tokens == 12
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == reply.usage.prompt_tokens
    assert msg.usage.cache_read_input_tokens == reply.usage.prompt_tokens - 1  # (the chat's prompt, in the cache)
    status, body = post(server, "/v1/messages", {"model": model_id, "max_tokens": 12, "temperature": 0,
                                                  "messages": [{"role": "user", "content": [{"type": "text",
                                                                                             "text": ASK}]}]})
    assert status == 200 and set(body) == {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence",
                                           "usage"}, body
    assert set(body["usage"]) == {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                  "cache_creation_input_tokens"}
    Message.model_validate(body)
    assert body["content"] == [{"type": "text", "text": msg.content[0].text}]
    whole = c.messages.create(model=model_id, max_tokens=40, messages=[{"role": "user", "content": ASK}],
                              extra_body=GREEDY)
    text = whole.content[0].text
    assert whole.stop_reason == "end_turn" and len(text) > 12, whole  # (the answer ends within 40 tokens)
    stop = text[8:12]
    cut = c.messages.create(model=model_id, max_tokens=40, stop_sequences=["never here", stop],
                            messages=[{"role": "user", "content": ASK}], extra_body=GREEDY)
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop), cut
    assert cut.content[0].text == text[:text.index(stop)]
    system = "Answer in French."
    reply = chat.chat.completions.create(model=model_id, temperature=0, max_tokens=6, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": ASK}])
    msg = c.messages.create(model=model_id, max_tokens=6, system=[{"type": "text", "text": system}],
                            messages=[{"role": "user", "content": ASK}], extra_body=GREEDY)
    assert msg.content[0].text == reply.choices[0].message.content
    count = c.messages.count_tokens(model=model_id, system=system, messages=[{"role": "user", "content": ASK}])
    assert count.input_tokens == reply.usage.prompt_tokens
    bearer = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert post(server, "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": ASK}]}, bearer)[0] == 200


def test_stream_events_end_in_the_plain_message(server, model_id):
    """Streamed: Anthropic's events in order, each named and of the client's types, the text deltas joined the plain
    text; messages.stream parses them and its final message is the plain one; the usage of message_delta holds every
    count."""
    c = client(server)
    body = dict(model=model_id, max_tokens=40, temperature=0, messages=[{"role": "user", "content": ASK}])
    plain = c.messages.create(**sdk(body))
    status, events = post(server, "/v1/messages", {**body, "stream": True})
    types = [e["type"] for e in events]
    deltas = types.count("content_block_delta")
    assert deltas > 1 and types == ["message_start", "content_block_start"] + ["content_block_delta"] * deltas + \
        ["content_block_stop", "message_delta", "message_stop"], types
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None
    assert "".join(e["delta"]["text"] for e in events[2:-3]) == plain.content[0].text
    assert events[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert set(events[-2]["usage"]) == set(plain.usage.model_dump(exclude_none=True))
    final, streamed_types = final_streamed(c, **body)
    assert streamed_types[:2] == ["message_start", "content_block_start"] and streamed_types[-1] == "message_stop"
    assert comparable(final) == comparable(plain)
    typed = list(c.messages.create(stream=True, **sdk(body)))
    assert [e.type for e in typed] == types


def test_forced_tool_use_keeps_to_its_schema(server, model_id, template):
    """tool_choice any or a named tool (the model's own greedy answer through the template's call format and its
    grammar): tool_use blocks of an offered tool (the named one) whose input keeps to its schema, stop_reason
    tool_use; disable_parallel_tool_use gives one; streamed as an input_json_delta, the final message the plain one."""
    template(TOOL_TEMPLATE)
    c = client(server)
    ask = dict(model=model_id, max_tokens=70, temperature=0, tools=[WEATHER, FORECAST],
               messages=[{"role": "user", "content": "What will the weather be in Paris?"}])

    def uses(msg, names: set[str]) -> list:
        found = [b for b in msg.content if b.type == "tool_use"]
        assert msg.stop_reason == "tool_use" and found and [b.type for b in msg.content] == ["tool_use"] * len(found)
        for block in found:
            assert block.name in names and block.id.startswith("toolu_"), block
            assert set(block.input) == ({"city", "days"} if block.name == "get_forecast" else {"city"}), block
            assert isinstance(block.input["city"], str) and len(block.input["city"]) <= 30
            assert block.name != "get_forecast" or 1 <= block.input["days"] <= 7
        return found

    uses(c.messages.create(**sdk(dict(ask, tool_choice={"type": "any"}))), {"get_weather", "get_forecast"})
    named = dict(ask, tool_choice={"type": "tool", "name": "get_forecast", "disable_parallel_tool_use": True})
    plain = c.messages.create(**sdk(named))
    assert len(uses(plain, {"get_forecast"})) == 1
    _, events = post(server, "/v1/messages", {**named, "stream": True})
    assert [e["type"] for e in events[1:-2]] == ["content_block_start", "content_block_delta", "content_block_stop"]
    assert events[1]["content_block"]["input"] == {} and events[1]["content_block"]["id"].startswith("toolu_")
    assert json.loads(events[2]["delta"]["partial_json"]) == plain.content[0].input
    final, _ = final_streamed(c, **named)
    assert comparable(final) == comparable(plain)


def test_a_turn_after_tool_use_renders_as_the_chats(server, model_id, template, scripted):
    """An assistant's text and tool_use blocks and the user's tool_result render through the template as the chat's
    assistant tool_calls and tool messages (a failed call's result marked), an earlier thinking block left out, the
    system text first; tool_choice none leaves the tools out; an answer of text and a call: a text and a tool_use
    block, streamed alike; count_tokens counts that prompt."""
    template(TOOL_TEMPLATE)
    c = client(server)
    turn = [{"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "A SECRET THOUGHT", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "no station"}]},
                {"type": "text", "text": "Thanks."}]}]
    scripted.answer = "It is sunny."
    msg = c.messages.create(model=model_id, max_tokens=30, system="You tell the weather.", tools=[WEATHER],
                            messages=turn)
    assert [(b.type, b.text) for b in msg.content] == [("text", "It is sunny.")] and msg.stop_reason == "end_turn"
    prompt = scripted.prompts[-1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in prompt, prompt
    assert "<tool_response>Error: no station</tool_response>" in prompt and "SECRET" not in prompt, prompt
    chat_tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"],
                                                  "description": WEATHER["description"]}}
    server.client().chat.completions.create(model=model_id, max_tokens=30, tools=[chat_tool], messages=[
        {"role": "system", "content": "You tell the weather."}, {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no station"},
        {"role": "user", "content": "Thanks."}])
    assert scripted.prompts[-1] == prompt
    reordered = turn[:2] + [{"role": "user", "content": turn[2]["content"][2:] + turn[2]["content"][:2]}]
    c.messages.create(model=model_id, max_tokens=30, system="You tell the weather.", tools=[WEATHER],
                      messages=reordered)  # (text before the results: the results still follow their calls)
    assert scripted.prompts[-1] == prompt
    c.messages.create(model=model_id, max_tokens=5, tools=[WEATHER], messages=turn, system=[
        {"type": "text", "text": "You tell the weather."}, {"type": "text", "text": "Be brief."}])
    assert "You tell the weather.\n\nBe brief." in scripted.prompts[-1]  # (system blocks as paragraphs)
    count = c.messages.count_tokens(model=model_id, system="You tell the weather.", tools=[WEATHER], messages=turn)
    assert count.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    c.messages.create(model=model_id, max_tokens=30, tools=[WEATHER], tool_choice={"type": "none"}, messages=turn)
    assert "Tools:" in prompt and "Tools:" not in scripted.prompts[-1]
    scripted.answer = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    ask = dict(model=model_id, max_tokens=60, tools=[WEATHER], messages=[{"role": "user", "content": "Oslo?"}])
    msg = c.messages.create(**ask)
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[0].text == "Let me check."
    assert (msg.content[1].name, msg.content[1].input, msg.stop_reason) == ("get_weather", {"city": "Oslo"},
                                                                             "tool_use")
    final, _ = final_streamed(c, **ask)
    assert comparable(final) == comparable(msg)


def test_thinking_blocks_where_the_template_thinks(server, model_id, template, scripted):
    """A think template's answer: a thinking block (empty signature) before the text, streamed as thinking_delta
    and ending in the plain message; thinking disabled sets the template's enable_thinking false, enabled true;
    disabled on a template that thinks with no switch, a 400 naming thinking."""
    template(THINK_TEMPLATE)
    c = client(server)
    scripted.answer = "<think>\nRed, yellow, blue are the painter's.\n</think>\n\nRed, green and blue."
    ask = dict(model=model_id, max_tokens=60, messages=[{"role": "user", "content": ASK}])
    msg = c.messages.create(**ask)
    assert [b.type for b in msg.content] == ["thinking", "text"], msg
    assert (msg.content[0].thinking, msg.content[0].signature) == ("Red, yellow, blue are the painter's.", "")
    assert msg.content[1].text == "Red, green and blue."
    final, types = final_streamed(c, **ask)
    assert comparable(final) == comparable(msg)
    _, events = post(server, "/v1/messages", {**ask, "stream": True})
    assert events[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[2]["delta"]["type"] == "thinking_delta"
    c.messages.create(thinking={"type": "disabled"}, **ask)
    assert scripted.prompts[-1].endswith("<|im_start|>assistant<think>\n\n</think>")
    c.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **ask)
    assert scripted.prompts[-1].endswith("<|im_start|>assistant")
    template(THINK_TEMPLATE.replace("enable_thinking is defined and enable_thinking is false", "false"))
    status, body = post(server, "/v1/messages", {**ask, "thinking": {"type": "disabled"}})
    assert status == 400 and body["error"]["message"].startswith("thinking:"), body


def test_the_stream_of_an_answer_ends_in_its_plain_message():
    """MessageStream over an answer's pieces (fed a character at a time through AnswerStream) ends in the message
    that completed() gives for the whole answer (read_answer), blocks, their text and the stop alike, for text, white
    space around it, thinking (cut too), calls after text or white space, white space alone and nothing; each event
    is of the client's types."""
    from spqt.generate import GenerationResult
    from spqt.serve import messages as m
    from spqt.serve.answer import AnswerStream, Reading, read_answer

    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    readings = {"plain": Reading(), "think": Reading(think=True), "tools": Reading(fmt="hermes", offered={"f"}),
                "both": Reading(think=True, fmt="hermes", offered={"f"})}
    cases = [("plain", "Red, green and blue."), ("plain", ""), ("plain", "  "), ("plain", " Red \n\n blue \n"),
             ("think", "<think>\nHm.\n</think>\n\nBlue."), ("think", "<think>\nA long wa"), ("think", "<think>x</think>"),
             ("tools", "Let me check.\n" + call), ("tools", "\n" + call + call), ("tools", " No call. "),
             ("tools", "  "), ("both", "<think>f</think>\n" + call), ("tools", "a \n " + call + " b")]
    for kind, text in cases:
        reading, result = readings[kind], GenerationResult([0] * 5, 3, 0.01, 0.01)
        answer = read_answer(text, reading)
        offered, reason = reading.fmt is not None, m.stop_reason(result, answer.calls, None)
        plain = m.completed(m.new_message("m", 3), answer, offered, reason, None, m.usage(result))
        stream, pieces = m.MessageStream(m.new_message("m", 3), offered), AnswerStream(reading)
        lines = stream.start()
        for char in text:
            lines += [line for part in pieces.feed(char, []) for line in stream.add(part)]
        lines += [line for part in pieces.finish() for line in stream.add(part)]
        lines += stream.end(reason, None, m.usage(result))
        for line in lines:
            STREAM_EVENT.validate_python(json.loads(line.split("\ndata: ")[1]))
        got = stream.message.model_dump(exclude={"id"})
        want = plain.model_dump(exclude={"id"})
        for block in got["content"] + want["content"]:
            block.pop("id", None)
        assert got == want, (kind, text, got, want)
    assert m.completed(m.new_message("m", 3), read_answer(" Red ", Reading()), False, "end_turn", None,
                       m.usage(result)).content[0].text == " Red "


def test_what_this_server_cannot_honour_is_a_400_in_anthropics_shape(server, model_id, template):
    """Images and documents, server tools, other block kinds, a block without its fields, a block of the other role,
    a last assistant message, tool_choice naming a tool not offered or forcing one without tools, temperature above
    1, no max_tokens, n, a prompt beyond the context: each a 400 in Anthropic's error shape naming the problem; a
    wrong or missing key a 401 (authentication_error), another model a 404 (not_found_error); metadata, service_tier,
    cache_control and other unknown fields are taken."""
    template(TOOL_TEMPLATE)
    ask = {"model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": ASK}]}

    def user(*blocks):
        return {"messages": [{"role": "user", "content": list(blocks)}]}

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    for change, words in [
            (user(image), "messages[0].content[0].type: image blocks are not supported"),
            (user(document), "messages[0].content[0].type: document blocks are not supported"),
            ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "'web_search' of type"),
            ({"tools": [WEATHER, {"type": "bash_20250124", "name": "bash"}]}, "tools[1]: the tool 'bash'"),
            ({"tools": [{**WEATHER, "name": "no spaces"}]}, "tools[0].name"),
            ({"tools": [{"name": "f"}]}, "'tools[0].input_schema' is required"),
            (user({"type": "search_result", "text": "x"}), "type 'search_result' are not supported"),
            (user({"type": "tool_result"}), "needs its tool_use_id"),
            (user({"type": "tool_result", "tool_use_id": "t", "content": [image]}), "content[0].type"),
            (user({"type": "tool_use", "id": "t", "name": "f", "input": {}}), "a user message holds no tool_use"),
            ({"messages": [{"role": "user", "content": ASK}, {"role": "assistant", "content": "Red"}]}, "prefill"),
            ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "rm_rf"}}, "'rm_rf'"),
            ({"tool_choice": {"type": "any"}}, "offers no tools"), ({"temperature": 1.5}, "temperature"),
            ({"max_tokens": None}, "'max_tokens' is required"), ({"n": 2}, "n: not supported"),
            ({"thinking": {"type": "sometimes"}}, "thinking.type"),
            (user({"type": "text", "text": "colors " * 2 * CTX}), "context"), (user(), "messages[0].content")]:
        status, body = post(server, "/v1/messages", {**ask, **change})
        assert status == 400 and body["type"] == "error", (change, body)
        assert body["error"]["type"] == "invalid_request_error" and words in body["error"]["message"], (change, body)
        assert "\n" not in body["error"]["message"], body
    headers = {"Content-Type": "application/json"}
    for key in ({}, {"x-api-key": "wrong"}):
        status, body = post(server, "/v1/messages", ask, {**headers, **key})
        assert (status, body["error"]["type"]) == (401, "authentication_error"), body
    status, body = post(server, "/v1/messages", {**ask, "model": "claude-sonnet-4-5"})
    assert (status, body["type"], body["error"]["type"]) == (404, "error", "not_found_error"), body
    assert server.raw("/v1/chat/completions", json.dumps({"model": "x", "messages": ask["messages"]}).encode())[1][
        "error"]["code"] == "model_not_found"  # (the OpenAI endpoints keep their shape)
    taken = {"metadata": {"user_id": "u"}, "service_tier": "auto", "top_k": 5, "top_p": 0.9,
             "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
             "messages": [{"role": "user", "content": [{"type": "text", "text": ASK,
                                                        "cache_control": {"type": "ephemeral"}}]}]}
    assert post(server, "/v1/messages", {**ask, **taken})[0] == 200
