"""Tool calls in chat answers: which format a model's chat template asks for, and reading the calls out of an answer.

A request's `tools` go to the model's chat template (as transformers' apply_chat_template passes them); the model
answers a call in the format its template taught it, which the server reads back into OpenAI's `tool_calls`:

- "hermes" (templates that write `<tool_call>`: Qwen2.5, Qwen3, SmolLM3, Hermes): one or more
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, text around them the message's content;
- "llama3_json" (templates that write `<|python_tag|>` or ask for a JSON function call: Llama 3.1-3.3): the whole
  answer one JSON object `{"name": ..., "parameters": {...}}` (or "arguments"), several joined by ";", an optional
  `<|python_tag|>` first.

A call that does not parse (cut by max_tokens, not JSON, no name) stays text in the content. A template that takes
tools in another format is refused (tool_format's error), rather than answering calls that nobody reads.
"""

import json
import re
import secrets
from dataclasses import dataclass

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


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
    another format."""
    if not template or "tools" not in template:
        raise ValueError("this model's chat template takes no tools")
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or ("parameters" in template and "function call" in template.lower()):
        return "llama3_json"
    raise ValueError("this model's chat template takes tools in a format this server does not read (it reads "
                     "<tool_call> JSON, as Qwen's, and Llama 3.1's JSON calls)")


def _call(obj, names: tuple[str, ...]) -> ToolCall | None:
    """A parsed JSON value -> its call, None where it is not {"name": str, <one of names>: object or its text}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in names if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """An answer's text -> (its content: the text outside the calls, stripped; the calls in order)."""
    if fmt == "hermes":
        calls, kept, at = [], [], 0
        for m in re.finditer(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)", text, re.S):
            try:
                call = _call(json.loads(m.group(1).strip()), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue  # (left in the content)
            kept.append(text[at:m.start()])
            at = m.end()
            calls.append(call)
        if not calls:
            return text, []
        kept.append(text[at:])
        return "".join(kept).strip(), calls
    if fmt == "llama3_json":
        body = text.strip()
        body = body[len(PYTHON_TAG):].strip() if body.startswith(PYTHON_TAG) else body
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in _json_objects(body):
            call = _call(part, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
        return ("", calls) if calls else (text, [])
    raise ValueError(f"unknown tool-call format {fmt!r}")


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

    def __init__(self, fmt: str):
        self.fmt, self.sent, self.held = fmt, "", ""
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
            keep = next((n for n in range(min(len(HERMES_OPEN) - 1, len(self.held)), 0, -1)
                         if HERMES_OPEN.startswith(self.held[-n:])), 0)
            return self._release(len(self.held) - keep)
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
        whole = self.sent + self.held
        content, calls = parse_tool_calls(whole, self.fmt)
        if not calls:
            rest, self.held = self.held, ""
            return rest, []
        # content already sent stays sent; the rest of the content is what the calls leave after it
        rest = content[len(self.sent.strip()):] if content.startswith(self.sent.strip()) else ""
        return rest, calls
