"""OpenAI's Responses API (POST /v1/responses) as a chat: the request, whose input items become the chat's messages, its
flat function tools and tool_choice the chat's, text.format its structured output (ResponsesRequest); the response
object built from a chat answer's parts (spqt.serve.answer), whole (completed) or as server-sent events
(ResponseStream).

Output items, in order: a reasoning item (a reasoning model's <think> text as reasoning_text), a message (the
answer's text; also an empty one where the answer has nothing else), a function_call per call. Logprobs, where include
asks for message.output_text.logprobs (top_logprobs: the most likely tokens of each step), are those of the answer's
tokens after its thinking, on the message's text. status is incomplete where max_output_tokens cut the answer.

Stored responses (spqt.serve.response_store): a response that ends, completed or incomplete, is kept where store asks
for it (the default), for GET /v1/responses/{id} and its input items' list (InputItemsQuery); previous_response_id
continues a stored response's conversation: the turns it continued and its input, then its output as a client sends it
back (replayed: the message, the calls), then the new input; an item_reference input item stands for the stored item of
its id (ResponseStore.resolved). The instructions are not carried over (as OpenAI's are not); reasoning items, earlier
answers' in the input or the output, are kept by their id alone and left out of the prompt (chat templates write no
earlier thinking). What names other stored objects (conversation, a stored prompt) and background runs are refused. As
on the chat endpoint, reasoning effort turns a reasoning model's thinking on or off (p.effort_template_kwargs; refused
where the template writes none) and verbosity is refused; so are tools other than functions (web_search, file_search,
...) and truncation 'auto'. A reasoning summary is taken and none made (the thinking comes whole).
"""

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from spqt.generate import GenerationResult
from spqt.serve import protocol as p
from spqt.serve.answer import Answer, Piece
from spqt.serve.logprobs import TokenLogprob
from spqt.serve.tools import ToolCall

LOGPROBS_INCLUDE = "message.output_text.logprobs"  # the include value that asks for the answer's logprobs
# the input items taken, and how the ids the server gives them start
ITEM_KINDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs",
              "item_reference": "ref"}
MAX_LISTED_ITEMS = 100  # input items a page of their list at most, as OpenAI's limit


class InputText(p.RequestModel):
    """A text part of an input message: input_text, or output_text (an earlier answer's)."""

    type: str
    text: str

    _text_only = field_validator("type")(p.text_kind("only text parts are supported", ("input_text", "output_text")))


_text_parts = p.text_as_parts("input_text", "a string or an array of text parts")  # (a string: one text part)


class InputItem(p.RequestModel):
    """An item of the input: a message (type "message", or no type and a role), an earlier answer's function_call, a
    call's result (function_call_output), an earlier answer's reasoning item (dropped), or a reference to a stored
    item by its id (item_reference: resolved, before the request is read, to that item). id: the client's, else a new
    one (the input items' list names each)."""

    type: str = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: list[InputText] = Field(default_factory=list)
    call_id: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)
    arguments: str | None = None  # a JSON object's text
    output: list[InputText] | None = None

    _parts = field_validator("content", "output", mode="before")(_text_parts)
    _object = field_validator("arguments")(p.json_object_text)

    @model_validator(mode="before")
    @classmethod
    def _reasoning_dropped(cls, item):
        """A reasoning item's fields but its id are not read (its content holds reasoning_text parts); an item of an id
        alone is an item_reference (OpenAI's type is optional there)."""
        if isinstance(item, dict) and item.get("type") == "reasoning":
            return {"type": "reasoning", **({"id": item["id"]} if isinstance(item.get("id"), str) else {})}
        if isinstance(item, dict) and (set(item) == {"id"} or (set(item) == {"id", "type"} and item["type"] is None)):
            return {"type": "item_reference", "id": item["id"]}
        return item

    @field_validator("type")
    @classmethod
    def _kind(cls, kind: str) -> str:
        if kind not in ITEM_KINDS:
            raise p.unsupported(f"input items of type '{kind}' are not supported (only {', '.join(ITEM_KINDS)})")
        return kind

    @model_validator(mode="after")
    def _fields_of_kind(self):
        needs = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output"), "reasoning": (), "item_reference": ("id",)}[self.type]
        missing = [name for name in needs if getattr(self, name) in (None, [])]
        if missing:
            raise ValueError(f"a {self.type} item needs its {' and '.join(missing)}")
        self.id = self.id or item_id(ITEM_KINDS[self.type])
        return self

    def text(self) -> str:
        """A message's text, or a call's result's."""
        return "".join(part.text for part in (self.content if self.type == "message" else self.output or []))

    def listed(self) -> dict:
        """The item as the input items' list gives it (OpenAI's item of its kind, status completed): a message's parts
        input_text, an assistant's output_text; a call's result its text."""
        item = {"id": self.id, "type": self.type, "status": "completed"}
        if self.type == "message":
            kind, more = ("output_text", {"annotations": []}) if self.role == "assistant" else ("input_text", {})
            return item | {"role": self.role, "content": [{"type": kind, "text": part.text, **more}
                                                          for part in self.content]}
        if self.type == "function_call":
            return item | {"call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        return item | {"call_id": self.call_id, "output": self.text()}


class FunctionTool(p.FunctionSpec):
    """A function tool as the Responses API gives it: FunctionSpec's fields beside its type."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, tool):
        if isinstance(tool, dict) and isinstance(tool.get("type"), str) and tool["type"] != "function":
            raise p.unsupported(f"'{tool['type']}' tools are not supported (only function tools)")
        return tool


class TextFormat(p.JsonSchemaFormat):
    """text.format: text, any JSON object (json_object), or JSON that a schema accepts (json_schema, with
    JsonSchemaFormat's fields beside the type)."""

    type: Literal["text", "json_object", "json_schema"]
    name: p.Name | None = None

    @model_validator(mode="after")
    def _named(self):
        if self.type == "json_schema" and (self.name is None or "schema_" not in self.model_fields_set):
            raise ValueError("type 'json_schema' needs its name and schema")  # (as OpenAI's Responses API does)
        return self


class TextConfig(p.RequestModel):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))
    verbosity: str | None = None

    _not_this_model = field_validator("verbosity")(p.refused("not supported by this model (only null)"))


class ReasoningConfig(p.RequestModel):
    """reasoning: effort as the chat's reasoning_effort (p.effort_template_kwargs); summary taken, none made
    (the reasoning item holds the thinking whole, as reasoning_text)."""

    effort: p.Effort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(p.SamplingFields):
    """POST /v1/responses: a chat (chat_messages(); tool_specs, forced_tool, parallel_tool_calls and
    chat_template_kwargs as ChatCompletionRequest names them) with the sampling fields of the chat endpoint (as extra
    body fields where OpenAI's Responses API has none: top_k, stop, the penalties, ...). max_output_tokens bounds all
    of the answer's tokens, its thinking's too."""

    prompt_param: ClassVar[str] = "input"
    limit_param: ClassVar[str] = "max_output_tokens"
    input: list[InputItem] = Field(min_length=1)  # a string arrives as one user message
    instructions: str | None = None  # a system message before the input
    max_output_tokens: int | None = Field(None, ge=1)
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Any = None  # None: "auto"
    parallel_tool_calls: bool = True
    text: TextConfig = Field(default_factory=TextConfig)
    reasoning: ReasoningConfig | None = None
    top_logprobs: int = Field(0, ge=0, le=p.MAX_TOP_LOGPROBS)
    include: list[str] = Field(default_factory=list)  # LOGPROBS_INCLUDE asks for logprobs; the rest changes nothing
    chat_template_kwargs: dict = Field(default_factory=dict)  # vLLM's and llama.cpp's: more template variables
    thinking_token_budget: int | None = Field(None, ge=0)  # the chat's (vLLM's): the thinking at most this long
    store: bool = True  # kept for GET /v1/responses/{id} and previous_response_id (spqt.serve.response_store)
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    truncation: str = "disabled"
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None  # a stored prompt's id and variables
    background: bool = False

    _one_output = field_validator("n")(p.one_only("not supported: a response is one answer (only 1)"))
    _free_names = field_validator("chat_template_kwargs")(p.free_template_names)
    _no_conversations = field_validator("conversation")(p.refused(
        "the Conversations API is not supported: send the whole conversation as the input, or continue a stored "
        "response with previous_response_id"))
    _no_stored_prompt = field_validator("prompt")(p.refused("this server stores no prompts: send the text as the "
                                                            "instructions and input"))
    _no_background = field_validator("background")(p.off_only("not supported: the response runs while the request "
                                                              "waits (only false)"))

    @field_validator("input", mode="before")
    @classmethod
    def _one_message(cls, value):
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, truncation: str) -> str:
        if truncation != "disabled":
            raise p.unsupported(f"only 'disabled' is supported (an input beyond the context is refused, not cut), not "
                                f"'{truncation}'")
        return truncation

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice):
        named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str)
        if choice not in (None, "none", "auto", "required") and not named:
            raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}")
        return choice

    @model_validator(mode="after")
    def _limit(self):
        self.max_tokens = self.max_output_tokens or self.max_tokens
        return self

    def chat_messages(self, earlier: list[InputItem] = ()) -> list[p.ChatMessage]:
        """The input, after the items of the conversation it continues (earlier: a stored response's), as the chat's
        messages: the instructions a system message first; function_call items an assistant message's tool_calls (the
        message before's where it is the assistant's), a function_call_output a tool message (named after its call,
        which the conversation must hold before it: else OpenAI's 400); reasoning items left out. An input item that
        the conversation holds already (its id) is OpenAI's 400: the conversation would hold it twice."""
        held = {item.id for item in earlier}
        for item in self.input:  # (the input's own repeats too: the input items' pages name items by id)
            if item.id in held:
                raise p.ApiError(400, f"Duplicate item found with id {item.id}. Remove duplicate items from your "
                                 f"input and try again.", param="input", code="invalid_value")
            held.add(item.id)
        messages = [p.ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        names = {}
        for item in [*earlier, *self.input]:
            if item.type == "message":
                messages.append(p.ChatMessage(role=item.role, content=item.text()))
            elif item.type == "function_call":
                names[item.call_id] = item.name
                call = p.MessageToolCall(id=item.call_id, function=p.FunctionCall(name=item.name,
                                                                                   arguments=item.arguments))
                if not messages or messages[-1].role != "assistant":
                    messages.append(p.ChatMessage(role="assistant"))
                messages[-1].tool_calls.append(call)
            elif item.type == "function_call_output":
                if item.call_id not in names:  # (OpenAI's 400: an output answers a call the conversation holds)
                    raise p.ApiError(400, f"No tool call found for function call output with call_id {item.call_id}.",
                                     param="input", code="invalid_value")
                messages.append(p.ChatMessage(role="tool", tool_call_id=item.call_id, content=item.text(),
                                              name=names[item.call_id]))
        if not messages:
            raise p.ApiError(400, "The input holds no message (its reasoning items alone).", param="input",
                             code="invalid_value")
        return messages

    def tool_specs(self) -> list[dict] | None:
        """The tools as the chat's (OpenAI's chat form, as transformers passes them to the template), None where none
        are offered or tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                for t in self.tools]

    def forced_tool(self) -> str | None:
        """What tool_choice forces (protocol.forced_tool's)."""
        choice = self.tool_choice
        named = isinstance(choice, dict)
        return p.forced_tool(None if named else choice, choice["name"] if named else None,
                             [t.name for t in self.tools])

    def structures(self) -> list[tuple[str, str, Any]]:
        kind = self.text.format.type
        given = [] if kind == "text" else [("text.format", kind, self.text.format.schema_ if kind == "json_schema"
                                            else None)]
        return given + super().structures()

    def top_tokens(self) -> int | None:
        """How many most likely tokens each answer token's logprobs list (None: no logprobs asked)."""
        return self.top_logprobs if LOGPROBS_INCLUDE in self.include else None


# ---------------------------------------------------------------- the response

Status = Literal["in_progress", "completed", "incomplete", "failed"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list[p.ChatTokenLogprob] = Field(default_factory=list)  # where include asks for them


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Status
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    status: Status
    summary: list = Field(default_factory=list)
    content: list[ReasoningText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    status: Status
    call_id: str  # what the call's function_call_output names
    name: str
    arguments: str  # a JSON object's text


class InputTokensDetails(BaseModel):
    cached_tokens: int  # as the chat's usage counts them
    cache_write_tokens: int  # those prefilled into the prompt cache for the next request (0 with the cache off)


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int  # the thinking's (spqt.serve.reasoning.thinking_tokens)


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int  # every token the model produced, the end-of-sequence token included
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(BaseModel):
    """The response: the answer (output, usage, status) and the request's settings, echoed as OpenAI echoes them."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    error: dict | None = None  # a failed response's {"code", "message"}
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[ReasoningItem | MessageItem | FunctionCallItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    top_logprobs: int
    tools: list[dict]
    tool_choice: str | dict
    parallel_tool_calls: bool
    text: dict
    reasoning: dict
    truncation: str
    metadata: dict[str, str]
    user: str | None
    background: bool = False
    previous_response_id: str | None = None
    store: bool  # whether the server keeps it (request's store, where the server's store is on)


def new_response(req: ResponsesRequest, model: str, stored: bool) -> ResponseObject:
    """The response to req before its answer (in_progress); stored: the server keeps it once it ends."""
    reasoning = req.reasoning or ReasoningConfig()
    return ResponseObject(
        id=p.new_id("resp", "_"), created_at=p.now(), status="in_progress", model=model,
        previous_response_id=req.previous_response_id, store=stored,
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, top_logprobs=req.top_logprobs,
        tools=[t.model_dump(by_alias=True, exclude_unset=True) for t in req.tools],
        tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
        parallel_tool_calls=req.parallel_tool_calls,
        text={"format": req.text.format.model_dump(by_alias=True, exclude_unset=True)},
        reasoning=reasoning.model_dump(), truncation=req.truncation, metadata=req.metadata, user=req.user)


def usage(result: GenerationResult, thinking: int, prompt_cache: bool) -> ResponseUsage:
    """The counts of an answer (result) whose first `thinking` tokens are its thinking; prompt_cache: the server keeps
    the prompt for the next request."""
    counts = p.usage([result])
    cached = counts.prompt_tokens_details.cached_tokens
    return ResponseUsage(input_tokens=counts.prompt_tokens,
                         input_tokens_details=InputTokensDetails(
                             cached_tokens=cached, cache_write_tokens=counts.prompt_tokens - cached if prompt_cache
                             else 0),
                         output_tokens=counts.completion_tokens,
                         output_tokens_details=OutputTokensDetails(reasoning_tokens=thinking),
                         total_tokens=counts.total_tokens)


def item_id(prefix: str) -> str:
    return p.new_id(prefix, "_")


def call_item(call: ToolCall) -> FunctionCallItem:
    return FunctionCallItem(id=item_id("fc"), status="completed", call_id=call.id, name=call.name,
                            arguments=call.arguments)


def completed(response: ResponseObject, answer: Answer, tokens: list[TokenLogprob], incomplete: bool,
              counts: ResponseUsage) -> ResponseObject:
    """The response with its answer: tokens, the logprobs entries of its message's text; incomplete: max_output_tokens
    cut the answer."""
    status = "incomplete" if incomplete else "completed"
    output = []
    if answer.reasoning:
        cut = incomplete and not (answer.content or answer.calls)
        output.append(ReasoningItem(id=item_id("rs"), status="incomplete" if cut else "completed",
                                    content=[ReasoningText(text=answer.reasoning)]))
    if answer.content or not (answer.reasoning or answer.calls):
        text = OutputText(text=answer.content, logprobs=p.chat_logprobs(tokens).content)
        output.append(MessageItem(id=item_id("msg"), status=status, content=[text]))
    output += [call_item(call) for call in answer.calls]
    return response.model_copy(update=dict(
        status=status, output=output, usage=counts,
        incomplete_details=IncompleteDetails() if incomplete else None))


def replayed(response: ResponseObject) -> list[InputItem]:
    """A response's output as the input items a client sends back to continue it (its message, its calls, its
    reasoning by its id alone: chat_messages leaves it out, as chat templates leave out earlier thinking)."""
    return [InputItem.model_validate(item.model_dump()) for item in response.output]


class RetrieveQuery(p.RequestModel):
    """GET /v1/responses/{id}'s query: the stored response is answered whole (its events again, stream=true, are
    refused); include and the rest change nothing."""

    stream: bool = False

    _whole = field_validator("stream")(p.off_only("not supported: a stored response is answered whole (only false)"))


class InputItemsQuery(p.RequestModel):
    """GET /v1/responses/{id}/input_items's query: a page of at most limit items in order (asc: as the request gave
    them, desc: last first), after the item named `after` (the openai client's next page)."""

    limit: int = Field(20, ge=1, le=MAX_LISTED_ITEMS)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None

    def page(self, items: list[InputItem]) -> dict:
        """A page of a request's input items (its reasoning items, dropped, left out) as OpenAI's list object; a 400
        where `after` names none of them."""
        listed = [item for item in items if item.type != "reasoning"]
        listed = listed[::-1] if self.order == "desc" else listed
        if self.after is not None:
            ids = [item.id for item in listed]
            if self.after not in ids:
                raise p.ApiError(400, f"No input item with id '{self.after}' in this response.", param="after",
                                 code="invalid_value")
            listed = listed[ids.index(self.after) + 1:]
        data = [item.listed() for item in listed[:self.limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(listed) > self.limit}


class ResponseStream:
    """A streamed response's server-sent events (`event: TYPE`, `data: JSON` with its type and sequence_number), in
    OpenAI's order: response.created and response.in_progress (start); per output item response.output_item.added,
    its content_part.added, its deltas (reasoning_text, output_text; a call's function_call_arguments), their .done,
    content_part.done and output_item.done; response.completed or response.incomplete (end). The reasoning item opens
    with the answer's first reasoning, the message with its first text other than white space (closing the
    reasoning; white space before it waits, and goes where calls follow, as read_answer strips it; where tools are
    offered, so does white space at the end of its text so far), the calls come at the end; the items and the
    response at the end are those completed() gives for the whole answer, and the deltas add up to their text."""

    def __init__(self, response: ResponseObject):
        self.response = response
        self.sequence = 0
        self.items: list[ReasoningItem | MessageItem | FunctionCallItem] = []
        self.open: ReasoningItem | MessageItem | None = None  # the item whose text streams now (the last of items)
        self.text = ""  # the open item's text so far
        self.waiting = Piece("content")  # the answer's text of white space alone, before its message opens
        self.held = Piece("content")  # where tools are offered, the open message's last text ending in white space
        self.calls: list[ToolCall] = []

    def event(self, kind: str, **fields) -> str:
        data = json.dumps({"type": kind, "sequence_number": self.sequence, **fields}, ensure_ascii=False)
        self.sequence += 1
        return f"event: {kind}\ndata: {data}\n\n"

    def start(self) -> list[str]:
        body = self.response.model_dump()
        return [self.event("response.created", response=body), self.event("response.in_progress", response=body)]

    def add(self, piece: Piece) -> list[str]:
        """The events of an answer's next part."""
        if piece.kind == "calls":
            self.calls = piece.calls
            return []
        if piece.kind == "reasoning":
            events = [] if self.open else self._open(ReasoningItem(id=item_id("rs"), status="in_progress",
                                                                   content=[]), ReasoningText(text=""))
            return events + [self._delta(piece)]
        if not isinstance(self.open, MessageItem):
            self.waiting = self.waiting.then(piece)
            if not self.waiting.text.strip():
                return []
            piece, self.waiting = self.waiting, Piece("content")
            return self._close("completed") + self._open_message() + self._message_text(piece)
        return self._message_text(piece)

    def _message_text(self, piece: Piece) -> list[str]:
        """The open message's delta of piece; where tools are offered, text that ends in white space waits for what
        follows (calls: the message's text stripped, as read_answer strips it; else more text)."""
        if self.response.tools:
            piece = self.held.then(piece)
            self.held = piece if piece.text[-1:].isspace() else Piece("content")
            if self.held.text:
                return []
        return [self._delta(piece)] if piece.text else []

    def end(self, incomplete: bool, tokens: list[TokenLogprob], counts: ResponseUsage) -> list[str]:
        """The events after the answer's last part: the open item closed (a message's text stripped where the answer
        called a tool, as read_answer strips it; its logprobs the entries tokens), the calls, the response.
        incomplete: max_output_tokens cut the answer."""
        status = "incomplete" if incomplete else "completed"
        events = []
        if not self.calls and (self.waiting.text or not self.items):  # white space alone, or nothing (an empty
            events += self._close("completed") + self._open_message()  # message, as completed() gives)
            events += [self._delta(self.waiting)] if self.waiting.text else []
        if isinstance(self.open, ReasoningItem):
            events += self._close(status if not self.calls else "completed")
        else:
            held = self.held if not self.calls else Piece("content", self.held.text.rstrip(), self.held.tokens)
            events += [self._delta(held)] if held.text else []
            events += self._close(status, tokens)
        for call in self.calls:
            index = len(self.items)
            self.items.append(call_item(call))
            at = dict(item_id=self.items[-1].id, output_index=index)
            added = self.items[-1].model_copy(update=dict(status="in_progress", arguments=""))
            events += [self.event("response.output_item.added", output_index=index, item=added.model_dump()),
                       self.event("response.function_call_arguments.delta", **at, delta=call.arguments),
                       self.event("response.function_call_arguments.done", **at, name=call.name,
                                  arguments=call.arguments),
                       self.event("response.output_item.done", output_index=index, item=self.items[-1].model_dump())]
        self.response = self.response.model_copy(update=dict(
            status=status, output=self.items, usage=counts,
            incomplete_details=IncompleteDetails() if incomplete else None))
        return events + [self.event(f"response.{status}", response=self.response.model_dump())]

    def error(self, err: p.ApiError) -> str:
        """The events of an error after the stream began (a cancellation: the server stops): OpenAI's error event,
        then response.failed with the response so far, its status failed."""
        self.response = self.response.model_copy(update=dict(
            status="failed", output=self.items, error={"code": "server_error", "message": err.message}))  # (OpenAI's
        # response errors have codes of their own: the error event above carries this server's)
        return self.event("error", code=err.code, message=err.message, param=err.param) + \
            self.event("response.failed", response=self.response.model_dump())

    def _open_message(self) -> list[str]:
        return self._open(MessageItem(id=item_id("msg"), status="in_progress", content=[]), OutputText(text=""))

    def _open(self, item: ReasoningItem | MessageItem, part: ReasoningText | OutputText) -> list[str]:
        self.items.append(item)
        self.open, self.text = item, ""
        index = len(self.items) - 1
        return [self.event("response.output_item.added", output_index=index, item=item.model_dump()),
                self.event("response.content_part.added", item_id=item.id, output_index=index, content_index=0,
                           part=part.model_dump())]

    def _delta(self, piece: Piece) -> str:
        """The open item's delta event of a piece of its text (a message's with its tokens' logprobs entries)."""
        self.text += piece.text
        at = dict(item_id=self.open.id, output_index=len(self.items) - 1, content_index=0, delta=piece.text)
        if isinstance(self.open, MessageItem):
            return self.event("response.output_text.delta", **at, logprobs=_wire(piece.tokens))
        return self.event("response.reasoning_text.delta", **at)

    def _close(self, status: Status, tokens: list[TokenLogprob] | None = None) -> list[str]:
        """The open item's closing events (none where none is open); tokens: a message's logprobs entries."""
        item, index = self.open, len(self.items) - 1
        if item is None:
            return []
        at = dict(item_id=item.id, output_index=index, content_index=0)
        if isinstance(item, MessageItem):
            text = self.text.strip() if self.calls else self.text
            part = OutputText(text=text, logprobs=p.chat_logprobs(tokens or []).content)
            done = self.event("response.output_text.done", **at, text=text, logprobs=_wire(tokens or []))
        else:
            part = ReasoningText(text=self.text)
            done = self.event("response.reasoning_text.done", **at, text=self.text)
        self.items[index] = item.model_copy(update=dict(status=status, content=[part]))
        self.open = None
        return [done, self.event("response.content_part.done", **at, part=part.model_dump()),
                self.event("response.output_item.done", output_index=index, item=self.items[index].model_dump())]


def _wire(tokens: list[TokenLogprob]) -> list[dict]:
    """Logprobs entries as the output_text's logprobs list them."""
    return [entry.model_dump() for entry in p.chat_logprobs(tokens).content]
