"""The OpenAI wire format: request and response bodies of /v1/chat/completions, /v1/completions and
/v1/models, as pydantic models, and the JSON error object.

Requests are checked as OpenAI checks them: JSON types strictly (a boolean is true or false, an integer a
JSON integer; a number may be either), null meaning the default. What this server cannot honour (best_of > 1,
suffix, functions (tools' older form), structured output beside tools, audio, web search, reasoning effort, and the
sampling fields of other servers that clients pass as extra fields, such as typical_p) is refused rather than
ignored. The penalties (OpenAI's frequency and presence, vLLM's repetition_penalty or llama.cpp's repeat_penalty),
logit_bias and min_p shape the logits before the choice as spqt.sampling says; logprobs stay the model's own.
Structured output (response_format json_object or json_schema on either endpoint; llama.cpp's json_schema and
grammar, vLLM's guided_json, guided_regex, guided_choice, guided_grammar and structured_outputs) keeps every answer
within its grammar (spqt.grammar). Tools go to the model's chat template and its calls come back as tool_calls
(spqt.serve.tools); tool_choice 'required' or a named function forces the answer to be calls (of that function),
their arguments kept to its parameters' schema by a grammar. Other fields are ignored, as OpenAI-compatible servers
do.

Logprobs (chat's logprobs / top_logprobs, the completions' logprobs): each answer token's log-probability and the
most likely tokens at its step, from the model's own distribution (spqt.serve.logprobs); with the completions' echo
each prompt token's too. A token is named by the bytes it stands for: `bytes` as OpenAI gives them, `token` their
text (U+FFFD for part of a character).
"""

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from spqt.sampling import MAX_LOGIT_BIAS
from spqt.serve.logprobs import Named, TokenLogprob
from spqt.serve.reasoning import reasoning_template, thinking_switch

# OpenAI takes 4 stop strings; lm-evaluation-harness sends a task's `until` strings and the end-of-text one (6 for
# humaneval), and vLLM and llama.cpp take any number
MAX_STOP_STRINGS = 16
MAX_PROMPTS = 256  # prompts in one completions request (each one n Jobs, all made before the first runs)
MAX_CHOICES = 16  # n, choices of each prompt
MAX_LOGIT_BIAS_TOKENS = 1024  # logit_bias entries (each job's bias vector is built from them)
MAX_REPETITION_PENALTY = 100  # a finite bound (vLLM takes any value above 0; 1.0-1.5 is the usual range)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on chat's top_logprobs (its completions' is 5; vLLM takes 20 on both)

# a function's or a JSON schema's name, as OpenAI allows it
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(message: str) -> PydanticCustomError:
    """A valid request this server cannot honour (answered 400, code unsupported_value)."""
    return PydanticCustomError("unsupported_value", message)


def off_only(message: str):
    """A field validator: a value other than the field's off value (0, false, empty) is not honoured here."""
    def check(cls, value):
        if value:
            raise unsupported(message)
        return value
    return check


def refused(message: str):
    """A field validator of a field whose default is null: any value given is not honoured here."""
    def check(cls, value):
        raise unsupported(message)
    return check


def one_only(message: str):
    """A field validator: a count other than 1 is not honoured here."""
    def check(cls, count: int) -> int:
        if count != 1:
            raise unsupported(message)
        return count
    return check


def text_kind(what: str, kinds: tuple[str, ...] = ("text",)):
    """A field validator of a `type` field that takes the kinds of text alone; what: the refusal's words before the
    kind."""
    def check(cls, kind: str) -> str:
        if kind not in kinds:
            raise unsupported(f"{what}, not '{kind}'")
        return kind
    return check


def text_as_parts(kind: str, what: str):
    """A field validator (before) of a content field: a string arrives as one part of this kind (its text), an array
    as it is; what: the field's shape, for the error of anything else."""
    def parts(content):
        if isinstance(content, str):
            return [{"type": kind, "text": content}]
        if not isinstance(content, list):
            raise wrong_type(what)
        return content
    return parts


def schema_or_text(cls, schema):
    """A field validator (before) of a JSON schema that vLLM takes as an object or as its JSON text (guided_json,
    structured_outputs.json): either passes, as it is (spqt.grammar parses the text); anything else is refused."""
    if not isinstance(schema, dict | str):
        raise wrong_type("an object (a JSON schema) or its JSON text")
    return schema


def json_object_text(cls, arguments: str) -> str:
    """A field validator of a call's arguments: a JSON object's text ("": no arguments), as OpenAI sends them."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        raise ValueError("not JSON text") from None
    if not isinstance(value, dict):
        raise ValueError("not the text of a JSON object")
    return arguments


def free_template_names(cls, kwargs: dict) -> dict:
    """A field validator of chat_template_kwargs: the names the server sets itself (or transformers takes for its own
    use) are refused."""
    taken = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "tokenize", "conversation",
                                  "documents", "chat_template", "return_dict", "continue_final_message",
                                  "return_assistant_tokens_mask", "tokenizer_kwargs", "raise_exception",
                                  "strftime_now"})
    if taken:
        raise ValueError(f"{', '.join(taken)}: set by the server, not by chat_template_kwargs")
    return kwargs


def wrong_type(expected: str) -> PydanticCustomError:
    return PydanticCustomError("wrong_type", "expected {expected}", {"expected": expected})


# JSON's types: the Python type json.loads gives, pydantic's strict error for another, the name (bool before int)
JSON_TYPES = ((bool, "bool_type", "a boolean"), (int, "int_type", "an integer"), (float, "float_type", "a number"),
              (str, "string_type", "a string"), (list, "list_type", "an array"), (dict, "dict_type", "an object"))
EXPECTED = {error: name for _, error, name in JSON_TYPES} | {"model_type": "an object"}


def json_type(value: Any) -> str:
    return next((name for kind, _, name in JSON_TYPES if isinstance(value, kind)), "null")


def invalid_request(e: ValidationError) -> ApiError:
    """OpenAI's 400 for the first of pydantic's errors, param the field's path (e.g. messages[0].content)."""
    err = e.errors()[0]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".") or None
    name, kind = param or "body", err["type"]
    if kind in EXPECTED or kind == "wrong_type":
        expected = err["ctx"]["expected"] if kind == "wrong_type" else EXPECTED[kind]
        return ApiError(400, f"'{name}' must be {expected}, not {json_type(err['input'])}.", param=param,
                        code="invalid_type")
    if kind == "missing":
        return ApiError(400, f"'{name}' is required.", param=param, code="missing_required_parameter")
    message = str(err["ctx"]["error"]) if kind == "value_error" else err["msg"]
    return ApiError(400, f"{name}: {message}", param=param,
                    code="unsupported_value" if kind == "unsupported_value" else "invalid_value")


class RequestModel(BaseModel):
    """A request body or a part of one: JSON types checked strictly; null for an optional field, at any depth,
    stands for its default (OpenAI's optional fields are nullable)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, body):
        return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    """response_format's json_schema: the schema (schema_, sent as "schema"; absent: any JSON value) that the answer
    keeps to. strict is taken either way: every answer keeps to the schema (spqt.grammar)."""

    name: Name
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """OpenAI's response_format: text, any JSON object (json_object), or JSON a schema accepts (json_schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs its json_schema object (name, schema)")
        return self


class StructuredOutputs(RequestModel):
    """vLLM's structured_outputs: one of json (a schema), json_object, regex, choice, grammar; its other keys
    (structural_tag, whitespace_pattern, ...) refused, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_: dict | str | None = Field(None, alias="json")  # a schema, or its JSON text (as vLLM takes it)
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None

    _schema = field_validator("json_", mode="before")(schema_or_text)

    def structure(self) -> list[tuple[str, str, Any]]:
        return [(f"structured_outputs.{name}", kind, value) for name, kind, value in (
            ("json", "json_schema", self.json_), ("json_object", "json_object", True if self.json_object else None),
            ("regex", "regex", self.regex), ("choice", "choice", self.choice), ("grammar", "gbnf", self.grammar))
            if value is not None]


class SamplingFields(RequestModel):
    """What both endpoints share. Defaults are OpenAI's (temperature 1: sampling; 0 means greedy).
    top_k is not in OpenAI's API (clients pass it as an extra body field); 0 means no top-k cut, and so does -1 (vLLM's
    "disabled", which its clients send; llama.cpp takes any k <= 0 as no cut)."""

    prompt_param: ClassVar[str] = "prompt"  # the field that holds the prompt (errors of the prompt name it)
    limit_param: ClassVar[str] = "max_tokens"  # the field that bounds the answer's tokens (errors name it)
    budget_param: ClassVar[str] = "thinking_token_budget"  # a chat's field that holds its thinking budget
    budget_strict: ClassVar[bool] = True  # a budget that cannot be kept (no think tags as tokens) is a 400
    model: str | None = None  # None: the one served model
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: the top token alone (greedy)
    top_k: int = Field(0, ge=-1)  # -1: no cut, as 0 (Sampling reads both so)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch's seed range; None: a fresh random seed
    stop: list[str] = Field(default_factory=list)  # a string or up to MAX_STOP_STRINGS
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices, each a job of its own (run one after another)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] = Field(default_factory=dict)  # token id (a decimal string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None  # OpenAI's chat field; vLLM takes it on completions too

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        if isinstance(stop, str):
            return [stop]
        if not isinstance(stop, list):
            raise wrong_type("a string or an array of strings")
        return stop

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, stops: list[str]) -> list[str]:
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float]) -> dict[str, float]:
        if len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens")
        for key, value in bias.items():
            if not key.isascii() or not key.isdigit() or (key != "0" and key.startswith("0")):
                raise ValueError(f"the key {key!r} is not a token id (a decimal integer without leading zeros)")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {key} is {value}, outside [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}]")
        return bias

    # Other servers' sampling fields (vLLM's, llama.cpp's; Open WebUI passes min_p on), sent as extra body fields
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY)  # vLLM's name
    repeat_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY)  # llama.cpp's name
    # structured output as llama.cpp's server (json_schema, grammar: GBNF) and vLLM's (guided_*, and the newer
    # structured_outputs: json, regex, choice, grammar) take it
    json_schema: dict | None = None
    grammar: str | None = None
    guided_json: dict | str | None = None  # a schema, or its JSON text (as vLLM takes it)
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_whitespace_pattern: str | None = None
    # ignoring one of these would change the answer, so only its neutral value passes
    typical_p: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False

    _no_extra_zero = field_validator("min_tokens", "ignore_eos")(off_only("not supported (only 0 or false)"))
    _no_whitespace_pattern = field_validator("guided_whitespace_pattern")(refused("not supported (only null)"))
    _schema = field_validator("guided_json", mode="before")(schema_or_text)
    _no_extra_one = field_validator("typical_p")(one_only("not supported (only 1)"))

    @field_validator("repeat_penalty")
    @classmethod
    def _one_repetition_penalty(cls, penalty: float, info: ValidationInfo) -> float:
        if info.data.get("repetition_penalty", 1.0) not in (1.0, penalty) and penalty != 1.0:
            raise ValueError("repeat_penalty is repetition_penalty under llama.cpp's name: give one, or both equal")
        return penalty

    def structure(self) -> tuple[str, str, Any] | None:
        """The structured output the request asks for: (param, kind, value), kind json_schema (value a schema),
        json_object, regex, choice (a list of strings) or gbnf (a grammar's text); None for plain text. An error
        where it asks in more than one field."""
        given = self.structures()
        if len(given) > 1:
            raise ApiError(400, f"The request asks for structured output in {given[0][0]} and in {given[1][0]}: "
                           f"give one.", param=given[1][0], code="invalid_value")
        return given[0] if given else None

    def structures(self) -> list[tuple[str, str, Any]]:
        """Each field's structured output, as structure() gives it."""
        given = []
        if self.response_format is not None and self.response_format.type != "text":
            f = self.response_format
            given.append(("response_format", "json_object", None) if f.type == "json_object" else
                         ("response_format", "json_schema", f.json_schema.schema_))
        given += [(name, kind, value) for name, kind, value in (
            ("json_schema", "json_schema", self.json_schema), ("grammar", "gbnf", self.grammar),
            ("guided_json", "json_schema", self.guided_json), ("guided_regex", "regex", self.guided_regex),
            ("guided_choice", "choice", self.guided_choice), ("guided_grammar", "gbnf", self.guided_grammar))
            if value is not None]
        if self.structured_outputs is not None:
            given += self.structured_outputs.structure()
        return given

    def shaping(self) -> dict:
        """Sampling's fields that shape the logits (spqt.sampling): once a request, its jobs share the bias map."""
        repetition = self.repetition_penalty if self.repetition_penalty != 1.0 else self.repeat_penalty
        return dict(min_p=self.min_p, repetition_penalty=repetition,
                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                    logit_bias={int(k): v for k, v in self.logit_bias.items()})


class TextPart(RequestModel):
    type: str
    text: str

    _text_only = field_validator("type")(text_kind("only text parts are supported"))


class FunctionCall(RequestModel):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object's text, as OpenAI sends it

    _object = field_validator("arguments")(json_object_text)


class MessageToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(RequestModel):
    name: Name
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionSpec


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a string arrives as one part; an assistant's may be absent or null (a message of tool calls: no parts)
    content: list[TextPart] = Field(default_factory=list)
    tool_calls: list[MessageToolCall] = Field(default_factory=list)  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise wrong_type("a string or an array of text parts")
        return content

    @model_validator(mode="after")
    def _content_given(self):
        if not self.content and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs its content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def template_message(self) -> dict:
        """The message as chat templates take it (transformers' convention: a call's arguments as an object;
        "developer" is OpenAI's newer name for "system")."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments or "{}")}}
                for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out

    def text(self) -> str:
        return "".join(p.text for p in self.content)


Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]  # OpenAI's reasoning efforts


def thinking_switched(kwargs: dict, template: str, on: bool, param: str, asked: str) -> dict:
    """kwargs (a request's chat_template_kwargs) with the template's thinking switch (reasoning.thinking_switch) set
    on or off, as param asked (asked: its value, for messages): enable_thinking wherever the template reads it,
    thinking where it also writes think blocks. A 400 naming param where kwargs set the switch otherwise, or where off
    is asked of a template that thinks with no switch."""
    switch, thinks = thinking_switch(template), reasoning_template(template)
    if switch and kwargs.get(switch, on) != on:
        raise ApiError(400, f"{param} and chat_template_kwargs.{switch} disagree: give one.", param=param,
                       code="invalid_value")
    if switch == "enable_thinking" or (switch and thinks):
        return {**kwargs, switch: on}
    if thinks and not on:
        raise ApiError(400, f"{param}: this model's chat template thinks with no way to turn it off "
                       f"(enable_thinking, thinking), so '{asked}' cannot be honoured.", param=param,
                       code="unsupported_value")
    return kwargs


def effort_template_kwargs(effort: str | None, kwargs: dict, template: str, param: str) -> dict:
    """OpenAI's reasoning effort (the chat's reasoning_effort, the Responses' reasoning.effort) as the chat template's
    variables, kwargs (the request's chat_template_kwargs) with it: where the template writes thinking, "none" and
    "minimal" turn it off, the other efforts on (thinking_switched), and reasoning_effort itself is passed on (the
    templates that read it); where the template writes none, refused, as OpenAI refuses it for a model that does not
    reason. A 400 naming param where it cannot be honoured or kwargs' own reasoning_effort disagrees."""
    if effort is None:
        return kwargs
    if not reasoning_template(template):
        raise ApiError(400, f"{param}: not supported by this model (its chat template writes no thinking).",
                       param=param, code="unsupported_value")
    if kwargs.get("reasoning_effort", effort) != effort:
        raise ApiError(400, f"{param} and chat_template_kwargs.reasoning_effort disagree: give one.", param=param,
                       code="invalid_value")
    switched = thinking_switched(kwargs, template, effort not in ("none", "minimal"), param, effort)
    return {**switched, "reasoning_effort": effort}


class ChatCompletionRequest(SamplingFields):
    prompt_param: ClassVar[str] = "messages"
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] = Field(default_factory=list)
    functions: list = Field(default_factory=list)  # tools' older form
    tool_choice: Any = None  # None: "auto" with tools, "none" without
    function_call: Any = "none"
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict = Field(default_factory=dict)  # vLLM's and llama.cpp's: more template variables
    thinking_token_budget: int | None = Field(None, ge=0)  # vLLM's: a reasoning model's thinking at most this long
    modalities: list[str] = Field(default_factory=lambda: ["text"])
    # OpenAI's audio, web search and reasoning models' fields (OpenAI refuses them for the models without those too)
    audio: dict | None = None
    web_search_options: dict | None = None
    reasoning_effort: Effort | None = None  # a reasoning model's thinking on or off (effort_template_kwargs)
    verbosity: str | None = None

    _unsupported = field_validator("functions")(off_only("not supported (send tools)"))
    _not_this_model = field_validator("audio", "web_search_options", "verbosity")(
        refused("not supported by this model (only null)"))

    _free_names = field_validator("chat_template_kwargs")(free_template_names)

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, modalities: list[str]) -> list[str]:
        if modalities != ["text"]:
            raise unsupported("only [\"text\"] is supported")
        return modalities

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice):
        if choice in (None, "none", "auto", "required"):  # "auto" with no tools is "none"
            return choice
        named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
        if not named:
            raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}")
        return choice

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, choice):
        if choice not in (None, "none", "auto"):
            raise unsupported("only 'none' or 'auto' is supported (send tools and tool_choice)")
        return choice

    def forced_tool(self) -> str | None:
        """What tool_choice forces (forced_tool's)."""
        choice = self.tool_choice
        named = isinstance(choice, dict)
        return forced_tool(None if named else choice, choice["function"]["name"] if named else None,
                           [t.function.name for t in self.tools])

    def tool_specs(self) -> list[dict] | None:
        """The tools for the chat template (OpenAI's JSON, as transformers passes it), None where none are offered
        or tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @model_validator(mode="after")
    def _limit(self):
        self.max_tokens = self.max_completion_tokens or self.max_tokens
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int, info: ValidationInfo) -> int:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def top_tokens(self) -> int | None:
        """How many most likely tokens each answer token's logprobs list (None: no logprobs asked)."""
        return self.top_logprobs if self.logprobs else None


def forced_tool(choice: str | None, name: str | None, offered: list[str]) -> str | None:
    """What a tool_choice forces: "" any offered tool (choice 'required'), the named function (name), or None (the
    model's choice: choice None, 'none' or 'auto'). offered: the tools' names. ApiError where it names a tool not
    offered, or forces a call with no tools."""
    if name is None and choice in (None, "none", "auto"):
        return None
    if not offered:
        raise ApiError(400, "tool_choice forces a call, but the request offers no tools.", param="tool_choice",
                       code="invalid_value")
    if name is None:
        return ""
    if name not in offered:
        raise ApiError(400, f"tool_choice names the function '{name}', which tools does not offer.",
                       param="tool_choice", code="invalid_value")
    return name


class CompletionRequest(SamplingFields):
    """prompt: a string, an array of token ids, or an array of several of either (a batch: a choice each, run one
    after another). echo: the prompt's text before the answer, with logprobs also its tokens' (the first's null);
    max_tokens 0 then asks for the echo alone (lm-evaluation-harness's loglikelihood requests)."""

    prompt: list[str | list[int]]
    max_tokens: int | None = Field(None, ge=0)  # None: up to the end of the context; 0: the echo alone
    echo: bool = False
    suffix: str = ""
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # 0 too asks for the sampled tokens' logprobs
    best_of: int = 1

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt):
        def ids(value) -> bool:
            return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)

        if isinstance(prompt, str) or (ids(prompt) and prompt):
            return [prompt]  # one prompt
        if not isinstance(prompt, list):
            raise wrong_type("a string, an array of token ids, or an array of those")
        for i, one in enumerate(prompt):
            if not (isinstance(one, str) or ids(one)):
                raise ValueError(f"prompt[{i}] is {json_type(one)}, not a string or an array of token ids")
        return prompt

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompts: list) -> list:
        if not prompts:
            raise ValueError("no prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, not {len(prompts)}")
        if not all(prompts):
            raise ValueError("a prompt is empty")
        return prompts

    _unsupported = field_validator("suffix")(off_only("not supported"))

    def top_tokens(self) -> int | None:
        """How many most likely tokens each answer token's logprobs list (None: no logprobs asked)."""
        return self.logprobs

    _one_best = field_validator("best_of")(one_only("only 1 is supported"))


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # leading prompt tokens whose keys and values the server reused from the request before


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # every token the model produced, the end-of-sequence token included
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(results: list, n: int = 1) -> Usage:
    """A request's counts (results: spqt.generate.GenerationResult, one a choice, a prompt's n choices in a row): each
    prompt counted once, as OpenAI and vLLM count it (its first choice's cached tokens), every choice's completion."""
    firsts = results[::n]
    prompt, completion = sum(r.prompt_tokens for r in firsts), sum(len(r.tokens) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(r.cached_tokens for r in firsts)))


class TopLogprob(BaseModel):
    token: str  # its bytes as text (U+FFFD for part of a character)
    logprob: float
    bytes: list[int]  # the bytes the token stands for


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at this token's step, most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


def _top(named: Named) -> TopLogprob:
    return TopLogprob(token=named.text, logprob=named.logprob, bytes=list(named.data))


def chat_logprobs(tokens: list[TokenLogprob]) -> ChatLogprobs:
    """Chat's logprobs object of answer tokens."""
    return ChatLogprobs(content=[ChatTokenLogprob(token=t.token.text, logprob=t.token.logprob, bytes=list(t.token.data),
                                                  top_logprobs=[_top(a) for a in t.top]) for t in tokens])


class CompletionLogprobs(BaseModel):
    """The completions endpoint's older form: parallel lists, a token's alternatives as {text: logprob}. With an
    echo, the prompt's tokens come first, the first with null logprob and alternatives (nothing predicts it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # the step's most likely tokens and the sampled one (k + 1 at most)
    text_offset: list[int]  # where each token's text starts in the choice's text


def completion_logprobs(tokens: list[TokenLogprob]) -> CompletionLogprobs:
    def alternatives(t: TokenLogprob) -> dict[str, float] | None:
        if t.top is None:
            return None
        top: dict[str, float] = {}
        for named in (*t.top, t.token):  # two tokens of one text (parts of characters): the likelier stays
            top.setdefault(named.text, named.logprob)
        return top

    return CompletionLogprobs(tokens=[t.token.text for t in tokens], token_logprobs=[t.token.logprob for t in tokens],
                              top_logprobs=[alternatives(t) for t in tokens], text_offset=[t.offset for t in tokens])


FinishReason = Literal["stop", "length", "tool_calls"] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: a message of tool calls alone
    reasoning_content: str | None = None  # a reasoning model's thinking (spqt.serve.reasoning), as vLLM gives it
    tool_calls: list[dict] | None = None  # ToolCall.wire() entries


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, Any]  # {"role": "assistant", "content": ""} first, then {"content": piece} (or {"tool_calls":
    # [...]}), {} last
    finish_reason: FinishReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """Also each streamed chunk of /v1/completions (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenizeRequest(RequestModel):
    """POST /tokenize as llama.cpp's server takes it (content; add_special, default false; with_pieces) and as vLLM's
    does (prompt; add_special_tokens, default true; or messages through the chat template, with tools)."""

    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] = Field(default_factory=list)
    chat_template_kwargs: dict = Field(default_factory=dict)
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    with_pieces: bool = False

    _generation_prompt = field_validator("add_generation_prompt")(one_only("not supported (only true: the "
                                                                            "template's prompt for an answer)"))

    _free_names = field_validator("chat_template_kwargs")(free_template_names)

    @model_validator(mode="after")
    def _one_input(self):
        if sum(x is not None for x in (self.content, self.prompt, self.messages)) != 1:
            raise ValueError("give one of content, prompt or messages")
        if self.messages is None and (self.tools or self.chat_template_kwargs):
            raise ValueError("tools and chat_template_kwargs go with messages (the chat template)")
        if self.add_special is not None and self.add_special_tokens is not None and \
                self.add_special != self.add_special_tokens:
            raise ValueError("add_special is add_special_tokens under llama.cpp's name: give one, or both equal")
        return self

    def bos(self) -> bool | None:
        """A text's BOS, as TextTokenizer.encode takes it: None (where the model adds one: the special tokens asked
        for, and vLLM's default for prompt) or False (none asked for, and llama.cpp's default for content)."""
        asked = self.add_special if self.add_special is not None else self.add_special_tokens
        return None if (asked if asked is not None else self.prompt is not None) else False


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spqt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
