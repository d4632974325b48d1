"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) as a chat: the request, whose system text
and messages (text, tool_use and tool_result blocks) become the chat's messages, its custom tools and tool_choice the
chat's (MessagesRequest); the message built from a chat answer's parts (spqt.serve.answer), whole or as server-sent
events (MessageStream); errors in Anthropic's shape (error_body).

Content blocks, in order: a thinking block (a reasoning model's <think> text; its signature empty: nothing is signed
here), a text block (the answer's text, none where it has none; where tools are offered its leading white space
dropped, since a stream cannot know whether calls follow, and with calls its trailing too, as read_answer strips it),
a tool_use block per call. stop_reason: max_tokens where max_tokens cut the answer, tool_use where it called a tool,
stop_sequence (stop_sequence the string) where one of stop_sequences ended it, else end_turn. usage: input_tokens
the prompt's tokens not read from the prompt cache, cache_read_input_tokens those read from it (the server keeps
the last prompt by itself; cache_control marks are taken and change nothing), cache_creation_input_tokens 0;
output_tokens every token the model produced, the end token included.

thinking: {"type": "enabled"} (or "adaptive") turns the template's thinking switch on where it reads one
(reasoning.thinking_switch: enable_thinking, as llama.cpp sets it, or thinking), and a model whose template writes no
think blocks answers without a thinking block (a budget is an upper bound); "disabled" turns it off, and is refused
where the template thinks with no way to turn it off. budget_tokens ("enabled") bounds the thinking: after that many
tokens its </think> is forced (the chat's thinking_token_budget; max_tokens still bounds the whole answer, the
thinking's tokens too), where the model's vocabulary has the think tags as tokens of their own (Qwen3's, DeepSeek-R1's
distills'); elsewhere it is a target not kept, as Anthropic's budget is a target, not a strict bound.

Refused with a 400 naming the field: image and document blocks (this model reads text), Anthropic's server tools
(web_search, bash, text_editor, code execution, ...), a last assistant message (a prefill: the answer would start a
new turn, not continue it), n. An earlier answer's thinking and redacted_thinking blocks are dropped (chat templates
write no earlier thinking). metadata, cache_control, service_tier and other unknown fields change nothing; the chat
endpoint's extra sampling fields (top_k, min_p, the penalties, ...) are taken as extra body fields.
"""

import json
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from spqt.generate import GenerationResult
from spqt.serve import protocol as p
from spqt.serve.answer import Answer, Piece
from spqt.serve.tools import ToolCall

BLOCK_KINDS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")  # the content blocks taken
ToolName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]  # Anthropic's rule
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}  # else 4xx/5xx below


def error_body(err: p.ApiError) -> dict:
    """An error as Anthropic answers it: {"type": "error", "error": {type, message}}, the message naming the field
    (err.param) where it does not already."""
    kind = ERROR_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    message = err.message if not err.param or err.param in err.message else f"{err.param}: {err.message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


class TextBlock(p.RequestModel):
    """A text block: of the system text, or of a tool_result's content."""

    type: str
    text: str

    _text_only = field_validator("type")(p.text_kind("only text blocks are supported"))


_text_blocks = p.text_as_parts("text", "a string or an array of content blocks")  # (a string: one text block)


class ContentBlock(p.RequestModel):
    """A block of a message's content: text; an assistant's tool_use (id, name, input); a user's tool_result
    (tool_use_id, content, is_error); an earlier answer's thinking or redacted_thinking (dropped)."""

    type: str
    text: str | None = None
    id: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)
    input: dict | None = None
    tool_use_id: str | None = Field(None, min_length=1)
    content: list[TextBlock] = Field(default_factory=list)
    is_error: bool = False

    _parts = field_validator("content", mode="before")(_text_blocks)

    @model_validator(mode="before")
    @classmethod
    def _thinking_dropped(cls, block):
        """A thinking block's fields (its text, its signature) are not read."""
        kind = block.get("type") if isinstance(block, dict) else None
        return {"type": kind} if kind in ("thinking", "redacted_thinking") else block

    @field_validator("type")
    @classmethod
    def _kind(cls, kind: str) -> str:
        if kind in ("image", "document"):
            raise p.unsupported(f"{kind} blocks are not supported: this model reads text")
        if kind not in BLOCK_KINDS:
            raise p.unsupported(f"content blocks of type '{kind}' are not supported (only {', '.join(BLOCK_KINDS)})")
        return kind

    @model_validator(mode="after")
    def _fields_of_kind(self):
        needs = {"text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",)}
        missing = [name for name in needs.get(self.type, ()) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} block needs its {' and '.join(missing)}")
        return self

    def result_text(self) -> str:
        """A tool_result's text ("Error: " before it where is_error says the call failed: templates have no field
        for it)."""
        text = "".join(part.text for part in self.content)
        return "Error: " + text if self.is_error else text


class Message(p.RequestModel):
    role: Literal["user", "assistant"]
    content: list[ContentBlock] = Field(min_length=1)  # a string arrives as one text block; none: a 400, as Anthropic

    _blocks = field_validator("content", mode="before")(_text_blocks)

    @model_validator(mode="after")
    def _blocks_of_role(self):
        kinds = {block.type for block in self.content}
        if self.role == "user" and kinds & {"tool_use", "thinking", "redacted_thinking"}:
            raise ValueError("a user message holds no tool_use or thinking blocks (an assistant's)")
        if self.role == "assistant" and "tool_result" in kinds:
            raise ValueError("an assistant message holds no tool_result blocks (a user's)")
        return self


class CustomTool(p.RequestModel):
    """A custom tool: name, description, input_schema (its input's JSON Schema)."""

    type: Literal["custom"] = "custom"
    name: ToolName
    description: str | None = None
    input_schema: dict

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, tool):
        if isinstance(tool, dict) and isinstance(tool.get("type"), str) and tool["type"] != "custom":
            raise p.unsupported(f"the tool '{tool.get('name')}' of type '{tool['type']}' is one of Anthropic's server "
                                f"tools, not supported here (only custom tools: name, description, input_schema)")
        return tool


class ToolChoice(p.RequestModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool": the tool called
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self):
        if self.type == "tool" and self.name is None:
            raise ValueError("type 'tool' needs the tool's name")
        return self


class ThinkingConfig(p.RequestModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)  # "enabled": the thinking at most this long (the docstring)


class MessagesRequest(p.SamplingFields):
    """POST /v1/messages: a chat (chat_messages(); tool_specs, forced_tool, parallel_tool_calls and
    chat_template_kwargs as ChatCompletionRequest names them) with Anthropic's sampling fields (temperature 0-1,
    top_p, top_k, stop_sequences) and the chat endpoint's others as extra body fields. max_tokens bounds all of the
    answer's tokens, its thinking's too."""

    prompt_param: ClassVar[str] = "messages"
    budget_param: ClassVar[str] = "thinking"
    budget_strict: ClassVar[bool] = False  # Anthropic's budget is a target: where it cannot be kept, not kept
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: list[TextBlock] = Field(default_factory=list)  # a string arrives as one text block
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    stop_sequences: list[str] = Field(default_factory=list, max_length=p.MAX_STOP_STRINGS)
    tools: list[CustomTool] = Field(default_factory=list)
    tool_choice: ToolChoice | None = None  # None: auto
    thinking: ThinkingConfig | None = None  # None: the template's default
    metadata: dict = Field(default_factory=dict)  # taken, unused
    chat_template_kwargs: dict = Field(default_factory=dict)  # vLLM's and llama.cpp's: more template variables

    _system = field_validator("system", mode="before")(_text_blocks)
    _one_output = field_validator("n")(p.one_only("not supported: a message is one answer (only 1)"))
    _free_names = field_validator("chat_template_kwargs")(p.free_template_names)

    @field_validator("messages")
    @classmethod
    def _no_prefill(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role == "assistant":
            raise p.unsupported("a last assistant message (a prefill the answer continues) is not supported: end "
                                "with a user message")
        return messages

    @model_validator(mode="after")
    def _stops(self):
        self.stop = self.stop + [s for s in self.stop_sequences if s]
        return self

    @property
    def parallel_tool_calls(self) -> bool:
        return not (self.tool_choice and self.tool_choice.disable_parallel_tool_use)

    def chat_messages(self) -> list[p.ChatMessage]:
        """The conversation as the chat's messages: the system text a system message first (its blocks as
        paragraphs); an assistant's text blocks its content, its tool_use blocks its tool_calls; a user's tool_result
        blocks tool messages (named after their call where the conversation holds it), then its text blocks a user
        message; thinking blocks left out."""
        messages = [p.ChatMessage(role="system", content="\n\n".join(b.text for b in self.system))] if self.system \
            else []  # (the blocks as paragraphs: Claude Code's two would run together)
        names = {}
        for message in self.messages:
            if message.role == "assistant":
                reply = p.ChatMessage(role="assistant", content="".join(b.text for b in message.content
                                                                        if b.type == "text"))
                for block in message.content:
                    if block.type == "tool_use":
                        names[block.id] = block.name
                        reply.tool_calls.append(p.MessageToolCall(id=block.id, function=p.FunctionCall(
                            name=block.name, arguments=json.dumps(block.input, ensure_ascii=False))))
                messages.append(reply)
                continue
            for block in sorted(message.content, key=lambda b: b.type != "tool_result"):  # (results first, as
                if block.type == "tool_result":  # Anthropic orders them: right after their calls)
                    messages.append(p.ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                                  content=block.result_text(), name=names.get(block.tool_use_id)))
                elif messages and messages[-1].role == "user":  # (text after text: one message)
                    messages[-1].content.append(p.TextPart(type="text", text=block.text))
                else:
                    messages.append(p.ChatMessage(role="user", content=block.text))
        return messages

    def tool_specs(self) -> list[dict] | None:
        """The tools as the chat's (OpenAI's chat form, as transformers passes them to the template), None where none
        are offered or tool_choice is none."""
        if not self.tools or (self.tool_choice and self.tool_choice.type == "none"):
            return None
        return [{"type": "function", "function": {"name": t.name} | ({"description": t.description} if t.description
                                                                     is not None else {}) |
                 {"parameters": t.input_schema}} for t in self.tools]

    def forced_tool(self) -> str | None:
        """What tool_choice forces (protocol.forced_tool's): any tool (any), the named one (tool)."""
        choice = self.tool_choice.type if self.tool_choice else "auto"
        return p.forced_tool({"any": "required"}.get(choice, choice) if choice != "tool" else None,
                             self.tool_choice.name if choice == "tool" else None, [t.name for t in self.tools])

    def top_tokens(self) -> None:
        """No logprobs: Anthropic's API has none."""
        return None

    @property
    def thinking_token_budget(self) -> int | None:
        """thinking's budget_tokens where thinking is "enabled" (the chat's thinking_token_budget), else None."""
        return self.thinking.budget_tokens if self.thinking and self.thinking.type == "enabled" else None

    def template_kwargs(self, template: str) -> dict:
        """chat_template_kwargs with thinking's switch (the module's docstring; protocol.thinking_switched); template:
        the chat template's text. ApiError where thinking cannot be honoured."""
        if self.thinking is None:
            return self.chat_template_kwargs
        return p.thinking_switched(self.chat_template_kwargs, template, self.thinking.type != "disabled", "thinking",
                                   self.thinking.type)


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: a message's request without max_tokens."""

    max_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------- the message

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingOut(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # nothing is signed here


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str  # what the call's tool_result names
    name: str
    input: dict


class MessageUsage(BaseModel):
    input_tokens: int  # the prompt's tokens not read from the prompt cache
    output_tokens: int  # every token the model produced, the end token included
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageObject(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingOut | TextOut | ToolUseOut] = Field(default_factory=list)
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


def new_message(model: str, prompt_tokens: int) -> MessageObject:
    """The message before its answer (a stream's message_start)."""
    return MessageObject(id=p.new_id("msg", "_"), model=model, usage=MessageUsage(input_tokens=prompt_tokens,
                                                                                   output_tokens=0))


def usage(result: GenerationResult) -> MessageUsage:
    return MessageUsage(input_tokens=result.prompt_tokens - result.cached_tokens, output_tokens=len(result.tokens),
                        cache_read_input_tokens=result.cached_tokens)


def stop_reason(result: GenerationResult, calls: list[ToolCall], stop_found: str | None) -> StopReason:
    """Why the answer ended; stop_found: the stop sequence that ended it (None: none did)."""
    if result.finish_reason == "length":
        return "max_tokens"
    return "tool_use" if calls else "stop_sequence" if stop_found is not None else "end_turn"


def tool_use(call: ToolCall) -> ToolUseOut:
    return ToolUseOut(id="toolu_" + call.id.removeprefix("call_"), name=call.name, input=json.loads(call.arguments))


def completed(message: MessageObject, answer: Answer, tools_offered: bool, reason: StopReason,
              stop_found: str | None, counts: MessageUsage) -> MessageObject:
    """The message with its answer's blocks (the module's docstring); tools_offered: the answer was read for calls."""
    text = answer.content.lstrip() if tools_offered else answer.content
    content = ([ThinkingOut(thinking=answer.reasoning)] if answer.reasoning else []) + \
        ([TextOut(text=text)] if text else []) + [tool_use(call) for call in answer.calls]
    return message.model_copy(update=dict(content=content, stop_reason=reason, usage=counts,
                                          stop_sequence=stop_found if reason == "stop_sequence" else None))


class MessageStream:
    """A streamed message's server-sent events (`event: TYPE`, `data: JSON` with its type), in Anthropic's order:
    message_start (the message, no content); per block content_block_start, its deltas (thinking_delta, text_delta;
    a tool_use's input_json_delta), content_block_stop; message_delta (stop_reason, stop_sequence, usage: every count,
    as the anthropic client reads them); message_stop. The thinking block opens with the answer's first reasoning, the
    text block with its first text other than white space (closing the thinking); white space waits until text
    follows (at its start, where tools are offered, and at its end it goes where no calls follow), so that the blocks
    joined are those completed() gives for the whole answer; the tool_use blocks come at the end."""

    def __init__(self, message: MessageObject, tools_offered: bool):
        self.message = message
        self.lead = not tools_offered  # the text's leading white space kept
        self.blocks: list[ThinkingOut | TextOut | ToolUseOut] = []
        self.open: ThinkingOut | TextOut | None = None  # the block whose text streams now (the last of blocks)
        self.index: int | None = None  # the open block's (a tool_use block's too) index, None where none is open
        self.waiting = ""  # white space not sent yet: before the text block opens, or at its end so far
        self.calls: list[ToolCall] = []

    def event(self, kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"

    def start(self) -> list[str]:
        return [self.event("message_start", message=self.message.model_dump())]

    def add(self, piece: Piece) -> list[str]:
        """The events of an answer's next part."""
        if piece.kind == "calls":
            self.calls = piece.calls
            return []
        if piece.kind == "reasoning":
            events = [] if isinstance(self.open, ThinkingOut) else self._close() + self._open(ThinkingOut(thinking=""))
            return events + [self._delta(piece.text)] if piece.text else events
        text = self.waiting + piece.text
        if not isinstance(self.open, TextOut):
            if not text.strip():
                self.waiting = text
                return []
            events = self._close() + self._open(TextOut(text=""))
            text = text if self.lead else text.lstrip()
        else:
            events = []
        body = text.rstrip()
        self.waiting = text[len(body):]
        return events + [self._delta(body)] if body else events

    def end(self, reason: StopReason, stop_found: str | None, counts: MessageUsage) -> list[str]:
        """The events after the answer's last part: the white space that waits (where no calls follow), the open
        block closed, the tool_use blocks, message_delta and message_stop."""
        events = []
        if self.waiting and not self.calls and (self.lead or isinstance(self.open, TextOut)):
            if not isinstance(self.open, TextOut):
                events += self._close() + self._open(TextOut(text=""))
            events.append(self._delta(self.waiting))
        events += self._close()
        for call in self.calls:
            block = tool_use(call)
            events += self._open(block.model_copy(update=dict(input={})))
            self.blocks[-1] = block
            events += [self.event("content_block_delta", index=len(self.blocks) - 1,
                                  delta={"type": "input_json_delta", "partial_json": call.arguments})]
            events += self._close()
        stop = stop_found if reason == "stop_sequence" else None
        self.message = self.message.model_copy(update=dict(content=self.blocks, stop_reason=reason,
                                                           stop_sequence=stop, usage=counts))
        return events + [self.event("message_delta", delta={"stop_reason": reason, "stop_sequence": stop},
                                    usage=counts.model_dump()),
                         self.event("message_stop")]

    def error(self, err: p.ApiError) -> str:
        """The event of an error after the stream began (a cancellation: the server stops)."""
        return self.event("error", error=error_body(err)["error"])

    def _open(self, block: ThinkingOut | TextOut | ToolUseOut) -> list[str]:
        self.blocks.append(block)
        self.open = block if not isinstance(block, ToolUseOut) else None
        self.index = len(self.blocks) - 1
        return [self.event("content_block_start", index=self.index, content_block=block.model_dump())]

    def _delta(self, text: str) -> str:
        """The open block's delta event of a piece of its text."""
        index, block = len(self.blocks) - 1, self.open
        if isinstance(block, ThinkingOut):
            self.blocks[index] = block = block.model_copy(update=dict(thinking=block.thinking + text))
            delta = {"type": "thinking_delta", "thinking": text}
        else:
            self.blocks[index] = block = block.model_copy(update=dict(text=block.text + text))
            delta = {"type": "text_delta", "text": text}
        self.open = block
        return self.event("content_block_delta", index=index, delta=delta)

    def _close(self) -> list[str]:
        """The open block's content_block_stop (none where none is open)."""
        if self.index is None:
            return []
        index, self.open, self.index = self.index, None, None
        return [self.event("content_block_stop", index=index)]
