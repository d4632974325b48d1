"""A chat answer read into its parts: the reasoning (a reasoning model's <think> text, spqt.serve.reasoning), the
content, and the tool calls (spqt.serve.tools); whole (read_answer) or piece by piece as its text streams
(AnswerStream). The chat endpoint and the Responses endpoint read answers alike and differ only in how they write the
parts on the wire.
"""

from dataclasses import dataclass, field

from spqt.serve.logprobs import TokenLogprob
from spqt.serve.reasoning import ReasoningStream, split_reasoning
from spqt.serve.tools import ToolCall, ToolTextStream, parse_tool_calls


@dataclass(frozen=True)
class Reading:
    """How a chat request's answers are read. think: an answer's <think> text is its reasoning; thinking: it thinks
    from its start (the prompt opened the block); fmt: the tool-call format of the template (None: no tools offered);
    offered: the tools' names (a call of another stays text); parallel: every call kept (else the first alone)."""

    think: bool = False
    thinking: bool = False
    fmt: str | None = None
    offered: set[str] | None = None
    parallel: bool = True

    def kept(self, calls: list[ToolCall]) -> list[ToolCall]:
        return calls if self.parallel else calls[:1]


@dataclass
class Answer:
    """A whole answer's parts: reasoning (None where it has none, or an empty one), content (the text outside the
    calls, stripped where there are calls), calls (those kept)."""

    reasoning: str | None
    content: str
    calls: list[ToolCall]


def read_answer(text: str, reading: Reading) -> Answer:
    thought, text = split_reasoning(text, reading.thinking) if reading.think else (None, text)
    content, calls = parse_tool_calls(text, reading.fmt, reading.offered) if reading.fmt else (text, [])
    return Answer(thought, content, reading.kept(calls))


def finish_reason(finished: str, calls: list[ToolCall]) -> str:
    """An answer's finish_reason: tool_calls where it called a tool, unless max_tokens cut it (finished: the
    generation's, "length" says so)."""
    return "tool_calls" if calls and finished != "length" else finished


@dataclass
class Piece:
    """A streamed answer's next part: kind "reasoning" or "content" (text, and the logprobs entries of the tokens not
    sent before it) or "calls" (the calls kept, at the end)."""

    kind: str
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)

    def then(self, other: "Piece") -> "Piece":
        """This text part and the next one as one (their text and tokens joined, this kind)."""
        return Piece(self.kind, self.text + other.text, self.tokens + other.tokens)


class AnswerStream:
    """A streamed answer's text pieces -> its parts, as read_answer reads the whole: the reasoning as it comes (where
    the template thinks), then the content, held back where it may begin a call (where tools are offered), the calls
    at the end. feed(piece, tokens) and, once the answer ended, finish() -> the parts to send now. A token's logprobs
    entries go out with the next text, or the last part; the calls' tokens' with the content."""

    def __init__(self, reading: Reading):
        self.reading = reading
        self.reasoning = ReasoningStream(reading.thinking) if reading.think else None
        self.held = ToolTextStream(reading.fmt, reading.offered) if reading.fmt else None
        self.pending: list[TokenLogprob] = []  # entries of text not sent yet
        self.calls: list[ToolCall] = []  # the calls kept, once finished

    def feed(self, piece: str, tokens: list[TokenLogprob]) -> list[Piece]:
        return self._parts(piece, tokens, ending=False)

    def finish(self) -> list[Piece]:
        return self._parts("", [], ending=True)

    def _parts(self, piece: str, tokens: list[TokenLogprob], ending: bool) -> list[Piece]:
        parts, self.pending = [], self.pending + tokens
        thought, content = ("", "" if ending else piece) if self.reasoning is None else \
            self.reasoning.finish() if ending else self.reasoning.feed(piece)
        if thought:
            parts.append(Piece("reasoning", thought, self.pending))
            self.pending = []
        calls = []
        if self.held:
            content = self.held.feed(content) if content else ""
            if ending:
                rest, calls = self.held.finish()
                content += rest
        if content or (self.pending and (ending or not (self.held or self.reasoning))):
            parts.append(Piece("content", content, self.pending))
            self.pending = []
        if calls:
            self.calls = self.reading.kept(calls)
            parts.append(Piece("calls", calls=self.calls))
        return parts
