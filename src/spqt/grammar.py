"""Structured output: which tokens a generation may take next so that its text keeps to a grammar, through llguidance
(the constrained-decoding library behind llama.cpp's and vLLM's guidance backends).

A grammar is a JSON schema (an empty one: any JSON value), "any JSON object" (OpenAI's json_object), a regular
expression, or a llama.cpp GBNF grammar (converted to llguidance's Lark). `Vocabulary` is llguidance's tokenizer of
the model's own `tokenizers` JSON over the model's vocabulary (ids past the tokenizer's: never allowed), its end
tokens the model's stop ids: once the text is complete an end token is allowed (where the grammar can go on, beside
the tokens that go on), and once it cannot go on, only an end token. `Grammar` is one grammar checked against it;
`Grammar.matcher()` starts one generation's walk (a fresh one each: a request's n choices each take one).
"""

import json
from dataclasses import dataclass
from functools import cached_property

import torch

from spqt.errors import SpqtError
from spqt.tokenizer import TextTokenizer

ANY_JSON_OBJECT = {"type": "object"}
# Whitespace between a JSON text's tokens: at most 32 characters a gap (llama.cpp's JSON grammars take a newline and
# 20 spaces or tabs), so a model that keeps choosing whitespace still reaches the end (unbounded, small models loop)
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,32}"


class Vocabulary:
    """llguidance's view of a model's tokenizer: vocab ids (the model's vocabulary size), end = stop ids."""

    def __init__(self, tokenizer: TextTokenizer, vocab: int, end_ids: set[int]):
        self.tokenizer, self.vocab, self.end_ids = tokenizer, vocab, sorted(end_ids)

    def literal(self, text: str) -> str:
        """text as a Lark terminal: the tokenizer's special token where text is one (models that learned
        `<tool_call>` as a token of its own are asked for that token, not its spelling), else the string."""
        token = self.tokenizer.backend.token_to_id(text)
        if token is not None and token in self.tokenizer.backend.get_added_tokens_decoder():
            return f"<[{token}]>"
        return json.dumps(text)

    @cached_property
    def lltokenizer(self):
        """Built on first use (0.2 s for a 49,152-token vocabulary on the 2-core VM), then kept."""
        import llguidance

        try:
            return llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab,
                                          eos_token=self.end_ids)
        except Exception as e:  # a tokenizer llguidance cannot read (it raises ValueError / RuntimeError)
            raise SpqtError(f"structured output is not available for this model's tokenizer ({str(e)[:200]})") \
                from None


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form, checked against the vocabulary it constrains; what (a short
    description for messages)."""

    source: str
    vocabulary: Vocabulary
    what: str

    def matcher(self) -> "GrammarMatcher":
        import llguidance

        return GrammarMatcher(llguidance.LLMatcher(self.vocabulary.lltokenizer, self.source, log_level=0),
                              self.vocabulary.vocab, self.what)


def _checked(source: str, vocabulary: Vocabulary, what: str) -> Grammar:
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(source, vocabulary.lltokenizer)
    if error:
        raise SpqtError(f"{what} is not valid: {' '.join(error.split())[:300]}")
    return Grammar(source, vocabulary, what)


def json_schema(schema, vocabulary: Vocabulary, what: str = "the JSON schema") -> Grammar:
    """schema: a dict (a JSON schema; {} allows any JSON value) or its JSON text."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SpqtError(f"{what} is not JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise SpqtError(f"{what} must be a JSON object (a schema), not {type(schema).__name__}")
    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
    except ValueError as e:
        raise SpqtError(f"{what} is not valid: {str(e)[:300]}") from None
    return _checked(source, vocabulary, what)


def json_object(vocabulary: Vocabulary) -> Grammar:
    """Any JSON object (OpenAI's response_format json_object)."""
    return json_schema(ANY_JSON_OBJECT, vocabulary, "a JSON object")


def regex(pattern: str, vocabulary: Vocabulary) -> Grammar:
    import llguidance

    return _checked(llguidance.LLMatcher.grammar_from_regex(pattern), vocabulary, "the regular expression")


def gbnf(text: str, vocabulary: Vocabulary) -> Grammar:
    """A llama.cpp GBNF grammar (its root rule `root`)."""
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        converted = gbnf_to_lark(text)
    except Exception as e:  # the converter raises its own parse errors (ValueError, AssertionError, ...)
        raise SpqtError(f"the GBNF grammar is not valid: {' '.join(str(e).split())[:300]}") from None
    return lark(converted, vocabulary, "the GBNF grammar")


def lark(text: str, vocabulary: Vocabulary, what: str = "the Lark grammar") -> Grammar:
    """A grammar in llguidance's Lark (its start rule `start`; `%json {schema}` embeds a JSON schema)."""
    import llguidance

    return _checked(llguidance.LLMatcher.grammar_from_lark(text), vocabulary, what)


def choice(values: list[str], vocabulary: Vocabulary) -> Grammar:
    """Exactly one of these strings (as Lark strings, which take JSON's escapes)."""
    return lark("start: " + " | ".join(json.dumps(v) for v in values), vocabulary, "the choice")


BUILDERS = {"json_schema": json_schema, "json_object": lambda _, vocabulary: json_object(vocabulary), "regex": regex,
            "choice": choice, "gbnf": gbnf}


def build(kind: str, value, vocabulary: Vocabulary) -> Grammar:
    """kind (a key of BUILDERS) and its value (a schema, None, a pattern, strings, a GBNF text) -> its Grammar."""
    return BUILDERS[kind](value, vocabulary)


class GrammarMatcher:
    """One generation's walk through a grammar: allowed() before each choice, consume() after it."""

    def __init__(self, matcher, vocab: int, what: str):
        self.matcher, self.vocab, self.what = matcher, vocab, what
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise SpqtError(f"{self.what}: {' '.join(self.matcher.get_error().split())[:300]}")

    def allowed(self, device: str | torch.device) -> torch.Tensor:
        """bool (vocab,) on device: the tokens that keep the text in the grammar."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        self._check()
        bits = bits.to(device)
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        return ((bits.unsqueeze(-1) >> shifts) & 1).view(-1)[:self.vocab].bool()

    def consume(self, token: int) -> None:
        """The chosen token (one allowed() allowed: anything else is an error)."""
        self.matcher.consume_token(token)
        self._check()

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole sentence of the grammar."""
        return self.matcher.is_accepting()
