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
    assert calls_of('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "hermes")[1] == \
        [("f", {"a": 1})]
    assert calls_of('<tool_call>{"name": "f", "parameters": {"a": [1, 2]}}</tool_call>', "hermes")[1] == \
        [("f", {"a": [1, 2]})]
    # what is not a call stays text: JSON cut by max_tokens, no name, arguments not an object, no tags at all
    for text in ('<tool_call>\n{"name": "get_weather", "argum', '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "It is sunny in Paris.", ""):
        assert parse_tool_calls(text, "hermes") == (text, []), text
    # one good call among bad ones: the bad one stays in the content
    mixed = f'<tool_call>not json</tool_call> and <tool_call>{TIME}</tool_call>'
    assert calls_of(mixed, "hermes") == ("<tool_call>not json</tool_call> and", [("get_time", {"zone": "CET"})])
    # a mention of the tag before a call; a call without its closing tag before another; the closing tag inside an
    # argument; text after the calls
    assert calls_of(f"I use <tool_call> tags.\n<tool_call>{TIME}</tool_call>", "hermes") == \
        ("I use <tool_call> tags.", [("get_time", {"zone": "CET"})])
    assert [n for n, _ in calls_of(f"<tool_call>{WEATHER}\n<tool_call>{TIME}</tool_call>", "hermes")[1]] == \
        ["get_weather", "get_time"]
    assert calls_of('<tool_call>{"name": "f", "arguments": {"s": "</tool_call>"}}</tool_call> done', "hermes") == \
        ("done", [("f", {"s": "</tool_call>"})])
    # a reasoning model's <think> block talks of calls; the call after it is one
    thought = f"<think>Maybe <tool_call>{WEATHER}</tool_call> would do.</think>\n<tool_call>{TIME}</tool_call>"
    assert calls_of(thought, "hermes") == (f"<think>Maybe <tool_call>{WEATHER}</tool_call> would do.</think>",
                                          [("get_time", {"zone": "CET"})])
    # names the request did not offer stay text; empty arguments text is no arguments
    assert parse_tool_calls(f"<tool_call>{WEATHER}</tool_call>", "hermes", {"get_time"})[1] == []
    assert calls_of('<tool_call>{"name": "f", "arguments": ""}</tool_call>', "hermes")[1] == [("f", {})]


def test_llama3_json_calls():
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert calls_of(call, "llama3_json") == ("", [("get_weather", {"city": "Paris"})])
    assert calls_of(f"<|python_tag|>{call}", "llama3_json")[1] == [("get_weather", {"city": "Paris"})]
    assert calls_of(f" {call}; {TIME}\n", "llama3_json")[1] == [("get_weather", {"city": "Paris"}),
                                                                 ("get_time", {"zone": "CET"})]
    for text in ("The weather in Paris is sunny.", '{"name": "f", "parameters": {"a": 1}', '{"answer": 42}',
                 f"{call} and then some text", '{"name": "", "parameters": {}}', '{"name": "Alice", "age": 30}',
                 f'{call}; {{"name": "Bob"}}'):
        assert parse_tool_calls(text, "llama3_json") == (text, []), text
    assert parse_tool_calls(call, "llama3_json", {"get_time"}) == (call, [])


def test_tool_format_of_templates():
    assert tool_format("{% if tools %}...<tool_call>...{% endif %}") == "hermes"
    assert tool_format("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert tool_format("{% if tools %}Respond in the format {\"name\": function name, \"parameters\": ...}. "
                       "Given the following functions, please respond with a JSON for a function call{% endif %}") \
        == "llama3_json"
    for template in (None, "", "{% for m in messages %}{{ m.content }}{% endfor %}"):
        with pytest.raises(ValueError, match="takes no tools"):
            tool_format(template)
    for other in ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}",
                  "{% if tools %}<tool_call>\n<function=name>\n<parameter=x>{% endif %}",
                  "{% if tools %}<tool_call>{{ name }}<arg_key>k</arg_key>{% endif %}"):
        with pytest.raises(ValueError, match="format this server does not read"):
            tool_format(other)


@pytest.mark.parametrize("fmt,text", [
    ("hermes", f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>"),
    ("hermes", f"Both:\n<tool_call>{WEATHER}</tool_call>\nand then\n<tool_call>{TIME}</tool_call> done."),
    ("hermes", f"Hi <tool_call>bad</tool_call>  <tool_call>{TIME}</tool_call>  after"),
    ("hermes", f"Let me check. <tool_call>{WEATHER}</tool_call> Done."),
    ("llama3_json", f'{WEATHER}; {{"name": "Bob"}}'),
    ("hermes", f"<tool_call>{WEATHER}</tool_call><tool_call>{TIME}</tool_call>"),
    ("hermes", "No tools needed: a < b and <tool but not a call."),
    ("hermes", '<tool_call>{"name": "cut'),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3_json", '  {"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "y"}}'),
    ("llama3_json", "Plain text {with braces}"),
    ("llama3_json", '{"not": "a call"}'),
    ("llama3_json", "<|python"),
])
def test_streamed_split_gives_the_whole_answers_parse(fmt, text):
    """Every split of the answer into up to three pieces, and one a character: the content sent (at once and at the
    end) is the parse's content (up to the white space at its ends), the calls the parse's; nothing of a call is sent
    as content."""
    content, calls = parse_tool_calls(text, fmt)
    n = len(text)
    splits = [[text[:a], text[a:b], text[b:]] for a in range(n + 1) for b in range(a, n + 1)] + [list(text)]
    for pieces in splits:
        stream = ToolTextStream(fmt)
        sent = "".join(stream.feed(piece) for piece in pieces)
        rest, got = stream.finish()
        sent += rest
        assert [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in calls], pieces
        assert (sent.strip() == content.strip()) if calls else sent == text, (pieces, sent)


@pytest.fixture(scope="module")
def tiny_vocabulary(tiny_spqt):
    """(the tiny model's tokenizer, its spqt.grammar.Vocabulary)."""
    from spqt import grammar
    from spqt.checkpoint import load_spqt
    from spqt.tokenizer import TextTokenizer

    loaded = load_spqt(tiny_spqt)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    return tok, grammar.Vocabulary(tok, loaded.config.vocab_size, tok.stop_ids)


def accepts(tok, g, text: str) -> bool:
    """Whether grammar g takes text whole, in text's own tokens (byte-level BPE: as the model would spell it)."""
    m = g.matcher()
    for t in tok.encode(text):
        if not m.allowed("cpu")[t]:
            return False
        m.consume(t)
    return m.complete


def test_forced_calls_grammar_reads_back_as_the_calls(tiny_vocabulary):
    """The grammar of a forced call (tool_choice 'required' / named) accepts the template format's call text of an
    offered tool with arguments its parameters accept, which parse_tool_calls reads back, and nothing else: another
    tool's name, arguments outside the schema, text before the call, a second call without parallel."""
    from spqt.serve.tools import forced_calls

    tok, vocabulary = tiny_vocabulary
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}}, {"type": "function", "function": {"name": "now"}}]

    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    llama = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    for fmt, one in (("hermes", hermes), ("llama3_json", llama)):
        two = one + ("\n" if fmt == "hermes" else ";") + one.replace("get_weather", "now").replace(
            '{"city": "Oslo"}', "{}")
        anyone, named = (forced_calls(fmt, tools, name, True, vocabulary) for name in ("", "get_weather"))
        single = forced_calls(fmt, tools, "", False, vocabulary)
        assert all(accepts(tok, g, one) for g in (anyone, named, single)) and accepts(tok, anyone, two)
        assert not accepts(tok, single, two) and not accepts(tok, named, two)  # one call; the named tool alone
        assert not accepts(tok, anyone, one.replace("get_weather", "rm_rf"))
        assert not accepts(tok, anyone, one.replace('"city"', '"town"')) and not accepts(tok, anyone, "Sure. " + one)
        assert [c.name for c in parse_tool_calls(two, fmt, {"get_weather", "now"})[1]] == ["get_weather", "now"]
    # parameters without "type": "object": the arguments an object still (parse_tool_calls reads no other)
    loose = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "string"}}}}}]
    g = forced_calls("hermes", loose, "", False, vocabulary)
    assert accepts(tok, g, '<tool_call>\n{"name": "f", "arguments": {"x": "a"}}\n</tool_call>')
    assert not accepts(tok, g, '<tool_call>\n{"name": "f", "arguments": "Oslo"}\n</tool_call>')


def test_forced_calls_arguments_are_bounded(tiny_vocabulary):
    """A function without parameters takes the empty object alone (OpenAI's empty parameter list: any object let a
    small model's forced call run on to max_tokens); the arguments' white space is json_schema's, not Lark's any run
    of it; a function whose parameters the compiler refuses is named in the error, without the grammar's text."""
    from spqt.errors import SpqtError
    from spqt.serve.tools import forced_calls

    tok, vocabulary = tiny_vocabulary
    tools = [{"type": "function", "function": {"name": "now"}},
             {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}]
    for fmt, call in (("hermes", '<tool_call>\n{"name": "NAME", "arguments": ARGS}\n</tool_call>'),
                      ("llama3_json", '{"name": "NAME", "parameters": ARGS}')):
        now, f, g = (forced_calls(fmt, tools, name, False, vocabulary) for name in ("now", "f", "g"))
        for no_arguments, name in ((now, "now"), (g, "g")):  # (g: listed properties, none, take no others)
            assert accepts(tok, no_arguments, call.replace("NAME", name).replace("ARGS", "{}"))
            assert not accepts(tok, no_arguments, call.replace("NAME", name).replace("ARGS", '{"x": 1}'))
        assert accepts(tok, f, call.replace("NAME", "f").replace("ARGS", '{"x": 1}'))  # (an object schema: any)
        assert accepts(tok, f, call.replace("NAME", "f").replace("ARGS", '{\n  "x": 1\n}'))
        assert not accepts(tok, f, call.replace("NAME", "f").replace("ARGS", '{' + " " * 40 + '"x": 1}'))
    bad = [{"type": "function", "function": {"name": "ok"}},
           {"type": "function", "function": {"name": "bad", "parameters": {"type": "objectx"}}}]
    with pytest.raises(SpqtError, match="the parameters schema of function 'bad' is not valid: Invalid type") as e:
        forced_calls("hermes", bad, "", True, vocabulary)
    assert "|" not in str(e.value)


def test_forced_calls_resolve_the_parameters_own_refs(tiny_vocabulary):
    """Parameters with $defs and local $refs (as pydantic writes a tool's model) inside a forced call's schema: their
    refs resolve against the parameters, not the call's root (where "#/$defs/..." named nothing), one tool or several."""
    from spqt.serve.tools import forced_calls

    tok, vocabulary = tiny_vocabulary
    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    weather = {"name": "w", "parameters": {"$defs": {"Place": place}, "type": "object",
                                           "properties": {"at": {"$ref": "#/$defs/Place"}}, "required": ["at"]}}
    tools = [{"type": "function", "function": weather}, {"type": "function", "function": {"name": "now"}}]
    call = '<tool_call>\n{"name": "w", "arguments": {"at": {"city": "Oslo"}}}\n</tool_call>'
    for name in ("", "w"):  # (two tools: each under anyOf; one: at the call's root)
        g = forced_calls("hermes", tools, name, False, vocabulary)
        assert accepts(tok, g, call)
        assert not accepts(tok, g, call.replace('{"city": "Oslo"}', '{"town": "Oslo"}'))

