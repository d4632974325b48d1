"""Tool calls in chat answers: which format a model's chat template asks for, and reading the calls out of an answer.

A request's `tools` go to the model's chat template (as transformers' apply_chat_template passes them); the model
answers a call in the format its template taught it, which the server reads back into OpenAI's `tool_calls`:

- "hermes" (templates that write `<tool_call>` JSON: Qwen2.5, Qwen3, SmolLM3): one or more
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the closing tag may be missing), text around them the
  message's content, a `<think>` block's mentions not calls;
- "llama3_json" (templates that write `<|python_tag|>` or ask for a JSON function call: Llama 3.1-3.3): the whole
  answer one JSON object `{"name": ..., "parameters": {...}}` (or "arguments"), several joined by ";", an optional
  `<|python_tag|>` first.

A call that does not parse (cut by max_tokens, not JSON, no arguments) or names a tool not offered stays text in
the content. A template that takes
tools in another format is refused (tool_format's error), rather than answering calls that nobody reads.
"""

import json
import re
import secrets
from dataclasses import dataclass

from spqt import grammar
from spqt.errors import SpqtError
from spqt.serve.reasoning import THINK_CLOSE, THINK_OPEN
from spqt.serve.text import tail_starting

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
XML_CALL_MARKS = ("<function=", "<arg_key>", "<parameter=")  # templates whose <tool_call> holds XML, not JSON


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or "call_" + secrets.token_hex(12)

    def wire(self, index: int | None = None) -> dict:
        """OpenAI's tool_calls entry (with its index: a streamed delta's)."""
        entry = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return entry if index is None else {"index": index, **entry}


def tool_format(template: str | None) -> str:
    """The tool-call format a chat template teaches ("hermes", "llama3_json"); ValueError where it takes no tools or
    another format (XML calls inside <tool_call>, as Qwen3-Coder's <function=...> or GLM-4.5's <arg_key>, among
    them)."""
    if not template or "tools" not in template:
        raise ValueError("this model's chat template takes no tools")
    if HERMES_OPEN in template and not any(mark in template for mark in XML_CALL_MARKS):
        return "hermes"
    if PYTHON_TAG in template or ("parameters" in template and "function call" in template.lower()):
        return "llama3_json"
    raise ValueError("this model's chat template takes tools in a format this server does not read (it reads "
                     "<tool_call> JSON, as Qwen2.5's and Qwen3's, and Llama 3.1's JSON calls)")


def _call(obj, keys: tuple[str, ...], offered: set[str] | None) -> ToolCall | None:
    """A parsed JSON value -> its call, None where it is not {"name": one of the offered tools (any name where
    offered is None), one of keys: an object or its text}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if (offered is not None and obj["name"] not in offered) or not any(k in obj for k in keys):
        return None
    args = next(obj[k] for k in keys if k in obj)
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _thinking(text: str) -> list[tuple[int, int]]:
    """The spans of <think>...</think> (an unclosed one to the end), where a reasoning model only talks of calls."""
    return [(m.start(), m.end()) for m in re.finditer(f"{THINK_OPEN}.*?(?:{THINK_CLOSE}|$)", text, re.S)]


def parse_tool_calls(text: str, fmt: str, offered: set[str] | None = None) -> tuple[str, list[ToolCall]]:
    """An answer's text -> (its content: the text outside the calls, stripped where there are calls; the calls in
    order). offered: the tools' names (a call of another name stays text; None: any name)."""
    if fmt == "hermes":
        calls, kept, at, search = [], [], 0, 0
        decoder, thinking = json.JSONDecoder(), _thinking(text)
        while (start := text.find(HERMES_OPEN, search)) >= 0:
            search = start + len(HERMES_OPEN)
            if any(a <= start < b for a, b in thinking):
                continue
            body = search + len(text[search:]) - len(text[search:].lstrip())
            try:
                value, end = decoder.raw_decode(text, body)
            except json.JSONDecodeError:
                continue  # a mention of the tag, or a call cut short: text
            call = _call(value, ("arguments", "parameters"), offered)
            if call is None:
                continue
            rest = text[end:].lstrip()
            end = len(text) - len(rest) + len(HERMES_CLOSE) if rest.startswith(HERMES_CLOSE) else end
            kept.append(text[at:start])
            calls.append(call)
            at = search = end
        if not calls:
            return text, []
        kept.append(text[at:])
        return "".join(kept).strip(), calls
    if fmt == "llama3_json":
        body = text.strip()
        body = body[len(PYTHON_TAG):].strip() if body.startswith(PYTHON_TAG) else body
        if not body.startswith("{"):
            return text, []
        calls = [_call(part, ("parameters", "arguments"), offered) for part in _json_objects(body)]
        return ("", calls) if calls and None not in calls else (text, [])
    raise ValueError(f"unknown tool-call format {fmt!r}")


def forced_calls(fmt: str, tools: list[dict], name: str, parallel: bool, vocabulary: grammar.Vocabulary) -> \
        grammar.Grammar:
    """The grammar of an answer that is calls alone (tool_choice 'required', name "", or a named function): in the
    template's format, each call's arguments kept to its function's parameters schema (any object where it gives
    none), one call or (parallel) several. hermes: `<tool_call>` (the tokenizer's special token where it has one),
    a newline, the JSON call, a newline, `</tool_call>`, calls a newline apart; llama3_json: the JSON call
    {"name", "parameters"}, calls joined by ";"."""
    key = "arguments" if fmt == "hermes" else "parameters"
    specs = [t["function"] for t in tools if not name or t["function"]["name"] == name]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, key: arguments_schema(
        f, (f"/anyOf/{i}" if len(specs) > 1 else "") + f"/properties/{key}")},  # (where the call's schema holds it)
        "required": ["name", key], "additionalProperties": False} for i, f in enumerate(specs)]
    call = grammar.lark_json(calls[0] if len(calls) == 1 else {"anyOf": calls})
    if fmt == "hermes":
        call = f"{vocabulary.literal(HERMES_OPEN)} \"\\n\" {call} \"\\n\" {vocabulary.literal(HERMES_CLOSE)}"
        more = '("\\n" call)*'
    else:
        more = '(";" call)*'
    lark = f"start: call {more if parallel else ''}\ncall: {call}"
    try:
        return grammar.lark(lark, vocabulary, "the forced tool call")
    except SpqtError:  # (its message holds the Lark text: the function whose parameters fail, where one does)
        for f in specs:
            if f.get("parameters") is not None:
                grammar.json_schema(f["parameters"], vocabulary, f"the parameters schema of function '{f['name']}'")
        raise


def arguments_schema(function: dict, pointer: str = "") -> dict:
    """A function spec's arguments as a JSON schema to be placed at `pointer` (a JSON pointer) in a call's schema: its
    parameters (grammar.closed_objects'; their local $refs rebased there, so that their $defs resolve), an object
    whatever they say (parse_tool_calls takes no other); without parameters, the empty object alone (OpenAI's "empty
    parameter list": any object there let a small model's forced call run on with made-up arguments to max_tokens)."""
    if function.get("parameters") is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    parameters = grammar.rebased_refs(grammar.closed_objects(function["parameters"]), f"{pointer}/allOf/0")
    return {"allOf": [parameters, {"type": "object"}]}


def _json_objects(body: str) -> list:
    """JSON values one after another, separated by ';' or white space; [] where the text is not exactly that."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return []
        found.append(value)
        while at < len(body) and (body[at].isspace() or body[at] == ";"):
            at += 1
    return found


class ToolTextStream:
    """A streamed answer's text split into what goes out as content now and what is held for the calls: hermes holds
    from `<tool_call>` on (and a tail that may begin it), llama3_json holds an answer that begins with `{` or the
    python tag. feed(piece) -> content to send now; finish() -> (content still to send, calls)."""

    def __init__(self, fmt: str, offered: set[str] | None = None):
        self.fmt, self.offered, self.sent, self.held = fmt, offered, "", ""
        self.plain = None  # False once a call begins (hermes) or the answer's start shows one (llama3_json); True:
        # llama3_json's answer is text

    def feed(self, piece: str) -> str:
        self.held += piece
        if self.fmt == "hermes":
            if self.plain is False:  # held from the first call on
                return ""
            at = self.held.find(HERMES_OPEN)
            if at >= 0:
                self.plain = False
                return self._release(at)
            return self._release(len(self.held) - tail_starting(self.held, HERMES_OPEN))
        if self.plain is None:  # (nothing sent yet)
            start = self.held.lstrip()
            if not start or (PYTHON_TAG.startswith(start) and start != PYTHON_TAG):
                return ""  # white space alone, or perhaps the python tag: not yet known
            self.plain = not (start[0] == "{" or start.startswith(PYTHON_TAG))
        return self._release(len(self.held)) if self.plain else ""

    def _release(self, n: int) -> str:
        out, self.held = self.held[:n], self.held[n:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_tool_calls(self.sent + self.held, self.fmt, self.offered)
        if not calls:
            rest, self.held = self.held, ""
            return rest, []
        # what was sent precedes every call (the first call's tag is held), so the content starts with it (its white
        # space at the end included: the content joins the text around a call with it)
        return content[len(self.sent.lstrip()):], calls
