"""A reasoning model's thinking apart from its answer: `<think>...</think>` (Qwen3, QwQ, DeepSeek-R1's distills,
SmolLM3) as the message's reasoning_content, the rest as its content, as vLLM's reasoning parsers and llama.cpp's server
(--reasoning-format deepseek) give them.

It applies where the model's chat template writes think tags (reasoning_template). The answer is thinking from its
start where the template's opening of the answer leaves a `<think>` open (DeepSeek-R1's templates open it:
answer_opening, starts_thinking), else where the answer itself opens one first. Thinking that max_tokens cut before its
`</think>` is all reasoning_content. The content after `</think>` loses its leading white space; the reasoning keeps
its text but for the line ends around it (a stream holds line ends back until it sees what follows them). Structured
output keeps the content to its grammar and leaves the thinking free (grammar_after_thinking).
"""

import bisect
import functools
import re
from collections.abc import Callable

from spqt.errors import SpqtError
from spqt.grammar import AfterThinking, Grammar, Vocabulary
from spqt.serve.text import TextStream, tail_starting
from spqt.tokenizer import TextTokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


JINJA_CODE = re.compile(r"{[%{].*?[%}]}", re.S)  # a template's statements and expressions


@functools.lru_cache(maxsize=4)  # (a server's one template, parsed once, not at every request that switches it)
def template_variables(template: str) -> frozenset[str]:
    """The variables a chat template reads from its caller (jinja2.meta: not its own set / for / macro names, not
    text in strings); where jinja2 cannot parse it (a tag of transformers' own, {% generation %}), the names in its
    code, less what its strings hold."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        parsed = Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        return frozenset(meta.find_undeclared_variables(parsed))
    except TemplateSyntaxError:
        code = re.sub(r"'[^']*'|\"[^\"]*\"", "''", " ".join(JINJA_CODE.findall(template)))
        return frozenset(re.findall(r"(?<![\w.])[A-Za-z_]\w*", code))


def thinking_switch(template: str | None) -> str | None:
    """The template variable that turns a reasoning template's thinking on or off: enable_thinking (Qwen3, SmolLM3),
    else thinking (Granite 3.3, DeepSeek-V3.1, Hermes 4: off unless set; Kimi K2: on unless set false), where the
    template reads it from its caller; None where it reads neither."""
    names = template_variables(template or "")
    return next((name for name in ("enable_thinking", "thinking") if name in names), None)


def reasoning_template(template: str | None) -> bool:
    """Whether a chat template writes (or, as DeepSeek-R1's distills' first one, strips) think blocks."""
    return bool(template) and THINK_CLOSE in template


def starts_thinking(opening: str) -> bool:
    """Whether the template's opening of the answer (answer_opening) leaves a think block open: the answer then
    thinks from its start."""
    return opening.rfind(THINK_OPEN) > opening.rfind(THINK_CLOSE)


def answer_opening(tokenizer: TextTokenizer, messages: list[dict], rendered: str, tools: list[dict] | None = None,
                   template_kwargs: dict | None = None) -> str:
    """What the chat template wrote after the conversation for the answer (TextTokenizer.answer_opening: rendered less
    the rendering without the generation prompt); where that rendering is not rendered's start or the template
    refuses it, what follows the last message's text (all of rendered where it is not found). The tags in the
    conversation itself are its writers' words, not the template's."""
    try:
        opening = tokenizer.answer_opening(messages, rendered, tools, template_kwargs)
    except SpqtError:
        opening = None
    if opening is not None:
        return opening
    last = messages[-1].get("content") if messages else None
    last = last if isinstance(last, str) else ""
    at = rendered.rfind(last) if last else -1
    return rendered[at + len(last):] if at >= 0 else rendered


def think_tags(vocabulary: Vocabulary) -> tuple[int, int] | None:
    """The ids of <think> and </think> where both are tokens of their own in vocabulary (added tokens), else None."""
    open_id, close_id = vocabulary.added_token(THINK_OPEN), vocabulary.added_token(THINK_CLOSE)
    return None if open_id is None or close_id is None else (open_id, close_id)


def budget_bounds(tokenizer: TextTokenizer, vocab: int, what: str) -> bool:
    """Whether a thinking budget (what: its name in messages) bounds anything for a model of this tokenizer and
    vocabulary size: False where its template writes no thinking; SpqtError where it does but its vocabulary has no
    <think> / </think> tokens to keep it with."""
    if not reasoning_template(tokenizer.spec.chat_template):
        return False
    if think_tags(Vocabulary(tokenizer, vocab, tokenizer.stop_ids)) is None:
        raise SpqtError(no_tags(what))
    return True


def no_tags(what: str) -> str:
    """The message of a budget (what) that cannot be kept: no think tags as tokens."""
    return f"{what} needs {THINK_OPEN} and {THINK_CLOSE} as tokens of their own, which this model's vocabulary lacks"


def grammar_after_thinking(g: Grammar | None, vocabulary: Vocabulary, opening: str, budget: int | None = None) -> \
        Grammar | AfterThinking | None:
    """A structured-output grammar (or None: none) and a thinking budget (or None: none) for a reasoning template's
    answer, as vLLM applies them (AfterThinking), by the template's opening of the answer (answer_opening): thinking
    from the start where it opened the block (starts_thinking); g itself where it closed it (Qwen3's enable_thinking
    false: no thinking to bound); else the answer may open one first. None where the vocabulary lacks either tag as a
    token of its own (a grammar then runs from the answer's start and the answer is all content; a budget there is an
    SpqtError, but where the block is closed) or where there is nothing to apply (neither g nor budget)."""
    open_id, close_id = think_tags(vocabulary) or (None, None)
    closed = THINK_CLOSE in opening and not starts_thinking(opening)
    if open_id is None:
        if budget is not None and not closed:
            raise SpqtError(no_tags("a thinking budget"))
        return None
    if closed or (g is None and budget is None):
        return g
    return AfterThinking(g, open_id, close_id, starts_thinking(opening), budget, None if g is not None else vocabulary)


def chat_grammar(g: Grammar | None, tokenizer: TextTokenizer, messages: list[dict], budget: int | None = None,
                 vocabulary: Vocabulary | None = None) -> Grammar | AfterThinking | None:
    """g (or None) and a thinking budget (or None) for the answer to a chat (its messages, as render_chat takes them):
    after the thinking where the model's template thinks and its vocabulary has the tags (grammar_after_thinking;
    vocabulary: g's, or where g is None the one a budget masks), else g from the answer's start (a budget then
    bounds nothing: the template writes no thinking)."""
    if not reasoning_template(tokenizer.spec.chat_template):
        return g
    opening = answer_opening(tokenizer, messages, tokenizer.render_chat(messages))
    gate = grammar_after_thinking(g, g.vocabulary if g is not None else vocabulary, opening, budget)
    return g if gate is None else gate


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """An answer -> (its reasoning, None where it has none or an empty one, as a stream sends none; its content)."""
    if not thinking:
        start = text.lstrip()
        if not start.startswith(THINK_OPEN):
            return None, text
        text = start[len(THINK_OPEN):]
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text.strip("\n") or None, ""
    return text[:end].strip("\n") or None, text[end + len(THINK_CLOSE):].lstrip()


def thinking_tokens(tokens: list[int], decode: Callable[[list[int]], str], thinking: bool) -> int:
    """How many of an answer's tokens (ids, its end token too) are its thinking, as split_reasoning splits its text:
    those whose text starts before the end of its </think>, all of them where the thinking never closed; 0 where it
    has none. thinking: the answer thinks from its start."""
    stream = TextStream(decode)
    for token in tokens:
        stream.feed(token)
    stream.flush()
    text = stream.text
    if not thinking and not text.lstrip().startswith(THINK_OPEN):
        return 0
    end = text.find(THINK_CLOSE)
    return len(tokens) if end < 0 else bisect.bisect_left(stream.starts, end + len(THINK_CLOSE))


class ReasoningStream:
    """A streamed answer's pieces split as split_reasoning splits the whole: feed(piece) -> (reasoning, content) to
    send now (either may be ""), finish() -> the same for what is held (a tail that may begin a tag)."""

    def __init__(self, thinking: bool):
        self.state = "reasoning" if thinking else "start"  # start: the answer may still open a think block
        self.held = ""
        self.began = False  # reasoning text sent: its leading line ends are dropped until then
        self.content_began = False

    def feed(self, piece: str) -> tuple[str, str]:
        self.held += piece
        reasoning = content = ""
        while True:
            if self.state == "start":
                start = self.held.lstrip()
                if start.startswith(THINK_OPEN):
                    self.held, self.state = start[len(THINK_OPEN):], "reasoning"
                    continue
                if not start or THINK_OPEN.startswith(start):
                    return reasoning, content  # white space, or perhaps the tag: not yet known
                self.state = "content"
                self.content_began = True  # (no reasoning: the content as it is, its white space too)
            if self.state == "reasoning":
                end = self.held.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self.held[:end].rstrip("\n")
                    self.held, self.state = self.held[end + len(THINK_CLOSE):], "content"
                    continue
                body = self.held[:len(self.held) - tail_starting(self.held, THINK_CLOSE)]
                sent = body.rstrip("\n")  # (line ends held: they may end the reasoning)
                reasoning += sent
                self.held = self.held[len(sent):]
                return self._reasoning(reasoning), content
            # content
            if not self.content_began:
                self.held = self.held.lstrip()
                if not self.held:
                    return self._reasoning(reasoning), content
                self.content_began = True
            content += self.held
            self.held = ""
            return self._reasoning(reasoning), content

    def _reasoning(self, text: str) -> str:
        if not self.began:  # (the first text after the tag: its line ends dropped)
            text = text.lstrip("\n")
            self.began = bool(text)
        return text

    def finish(self) -> tuple[str, str]:
        """The held rest."""
        rest, self.held = self.held, ""
        if self.state == "reasoning":
            return self._reasoning(rest.rstrip("\n")), ""
        return "", rest if self.content_began or self.state != "content" else rest.lstrip()
