"""spqt.serve.tools: a template's tool-call format, calls read out of answers, and the streamed split of an answer
into content sent at once and calls held to the end, against the whole answer's parse at every split."""

import json

import pytest

from spqt.serve.tools import ToolTextStream, parse_tool_calls, tool_format

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "CET"}}'


def calls_of(text: str, fmt: str) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = parse_tool_calls(text, fmt)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_calls_and_the_text_around_them():
    assert calls_of(f"<tool_call>\n{WEATHER}\n</tool_call>", "hermes") == \
        ("", [("get_weather", {"city": "Paris", "unit": "C"})])
    two = f"Checking both.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{TIME}</tool_call>"
    assert calls_of(two, "hermes") == ("Checking both.", [("get_weather", {"city": "Paris", "unit": "C"}),
                                                          ("get_time", {"zone": "CET"})])
    # the last call's closing tag cut off (the end-of-turn token came first): still a whole call
    assert calls_of(f"<tool_call>\n{TIME}", "hermes")[1] == [("get_time", {"zone": "CET"})]
    # arguments as a JSON object's text; "parameters" for "arguments"
    assert calls_of('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "hermes")[1] == [("f", {"a": 1})]
    assert calls_of('<tool_call>{"name": "f", "parameters": {"a": [1, 2]}}</tool_call>', "hermes")[1] == \
        [("f", {"a": [1, 2]})]
    # what is not a call stays text: JSON cut by max_tokens, no name, arguments not an object, no tags at all
    for text in ('<tool_call>\n{"name": "get_weather", "argum', '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "It is sunny in Paris.", ""):
        assert parse_tool_calls(text, "hermes") == (text, []), text
    # one good call among bad ones: the bad one stays in the content
    mixed = f'<tool_call>not json</tool_call> and <tool_call>{TIME}</tool_call>'
    assert calls_of(mixed, "hermes") == ("<tool_call>not json</tool_call> and", [("get_time", {"zone": "CET"})])


def test_llama3_json_calls():
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert calls_of(call, "llama3_json") == ("", [("get_weather", {"city": "Paris"})])
    assert calls_of(f"<|python_tag|>{call}", "llama3_json")[1] == [("get_weather", {"city": "Paris"})]
    assert calls_of(f" {call}; {TIME}\n", "llama3_json")[1] == [("get_weather", {"city": "Paris"}),
                                                                 ("get_time", {"zone": "CET"})]
    for text in ("The weather in Paris is sunny.", '{"name": "f", "parameters": {"a": 1}', '{"answer": 42}',
                 f"{call} and then some text", '{"name": "", "parameters": {}}'):
        assert parse_tool_calls(text, "llama3_json") == (text, []), text


def test_tool_format_of_templates():
    assert tool_format("{% if tools %}...<tool_call>...{% endif %}") == "hermes"
    assert tool_format("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert tool_format("{% if tools %}Respond in the format {\"name\": function name, \"parameters\": ...}. "
                       "Given the following functions, please respond with a JSON for a function call{% endif %}") \
        == "llama3_json"
    for template in (None, "", "{% for m in messages %}{{ m.content }}{% endfor %}"):
        with pytest.raises(ValueError, match="takes no tools"):
            tool_format(template)
    with pytest.raises(ValueError, match="format this server does not read"):
        tool_format("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}")


@pytest.mark.parametrize("fmt,text", [
    ("hermes", f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>"),
    ("hermes", f"<tool_call>{WEATHER}</tool_call><tool_call>{TIME}</tool_call>"),
    ("hermes", "No tools needed: a < b and <tool but not a call."),
    ("hermes", '<tool_call>{"name": "cut'),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3_json", '  {"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "y"}}'),
    ("llama3_json", "Plain text {with braces}"),
    ("llama3_json", '{"not": "a call"}'),
    ("llama3_json", "<|python"),
])
def test_streamed_split_gives_the_whole_answers_parse(fmt, text, rng):
    """Any split of the answer into pieces: the content sent (at once and at the end) is the parse's content (up to
    the white space around calls), the calls the parse's; nothing of a call is sent as content."""
    content, calls = parse_tool_calls(text, fmt)
    for _ in range(30):
        cuts = sorted(set(rng.integers(0, len(text) + 1, int(rng.integers(0, 8))).tolist()))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stream = ToolTextStream(fmt)
        sent = "".join(stream.feed(piece) for piece in pieces)
        rest, got = stream.finish()
        sent += rest
        assert [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in calls], pieces
        assert (sent.strip() == content.strip()) if calls else sent == text, (pieces, sent)
