"""Structured output: which tokens a generation may take next so that its text keeps to a grammar, through llguidance
(the constrained-decoding library behind llama.cpp's and vLLM's guidance backends).

A grammar is a JSON schema (an empty one: any JSON value), "any JSON object" (OpenAI's json_object), a regular
expression, one of a list of strings, a llama.cpp GBNF grammar (converted to llguidance's Lark) or a Lark grammar.
`Vocabulary` is llguidance's view of the model's tokenizer over the model's vocabulary (ids past the tokenizer's:
never allowed), its end tokens the model's stop ids: once the text is complete an end token is allowed (where the
grammar can go on, beside the tokens that go on), and once it cannot go on, only an end token. A special token
(`<|im_end|>`) is never text: a grammar's text that spells one is spelled out in ordinary tokens, and the token
itself is asked for as Vocabulary.literal writes it. `Grammar` is one grammar checked against the vocabulary (that
it parses and that some text starts it); `Grammar.matcher()` starts one generation's walk (a copy of the checked
one: a request's n choices each take one). `AfterThinking` starts a grammar after a reasoning model's think block,
or bounds that block (a thinking budget).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from spqt.errors import SpqtError
from spqt.tokenizer import TextTokenizer

ANY_JSON_OBJECT = {"type": "object"}
# Whitespace between a JSON text's tokens, as llama.cpp's JSON grammars take it: none, one space, or one or two line
# breaks and an indent of at most 20 spaces or tabs. Unbounded (llguidance's default), small models loop on it; at
# most 32 characters of any of it a gap, the default model's greedy answer to an array of booleans was `[`, 32 line
# breaks, `true`, 32 line breaks, `]` (69 tokens for 3), and max_tokens cut longer arrays and objects
JSON_WHITESPACE = r"(?: |\n{1,2}[ \t]{0,20})?"


class Vocabulary:
    """llguidance's view of a model's tokenizer: vocab ids (the model's vocabulary size), end = stop ids."""

    def __init__(self, tokenizer: TextTokenizer, vocab: int, end_ids: set[int]):
        self.tokenizer, self.vocab, self.end_ids = tokenizer, vocab, sorted(end_ids)

    def added_token(self, text: str) -> int | None:
        """The id of the tokenizer's added token whose text is text (`<tool_call>`, `</think>`), within the
        vocabulary; None where text is no such token."""
        token = self.tokenizer.backend.token_to_id(text)
        if token is not None and token < self.vocab and token in self.tokenizer.backend.get_added_tokens_decoder():
            return token
        return None

    def blank(self, token: int) -> bool:
        """Whether token is white space alone (its bytes, not an added token's): what a reasoning parser skips
        before a <think>."""
        if token in self.tokenizer.backend.get_added_tokens_decoder():
            return False
        piece = self.tokenizer.token_bytes(token)
        return bool(piece) and not piece.strip()

    def literal(self, text: str) -> str:
        """text as a Lark terminal: the tokenizer's added token where text is one (models that learned
        `<tool_call>` as a token of its own are asked for that token, not its spelling), else the string."""
        token = self.added_token(text)
        return json.dumps(text) if token is None else f"<[{token}]>"

    @cached_property
    def lltokenizer(self):
        """llguidance's tokenizer, built on first use, then kept: each id's bytes (a special token's, and an id past
        the tokenizer's, marked as llguidance marks special tokens: a 0xFF byte first, never text) and the model's
        tokenizer to split forced text, with special tokens' text taken as text."""
        import llguidance
        from llguidance import TokenizerWrapper
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.tokenizer.backend.to_str())
        backend.encode_special_tokens = True
        backend.no_padding()
        backend.no_truncation()
        special = {i for i, t in self.tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        size = self.tokenizer.backend.get_vocab_size(with_added_tokens=True)
        pieces = [b"\xff" + self.tokenizer.token_bytes(i) if i in special else self.tokenizer.token_bytes(i)
                  if i < size else b"\xff<unused %d>" % i for i in range(self.vocab)]

        class Pieces:  # what llguidance's TokenizerWrapper reads
            eos_token_id, bos_token_id, tokens, special_token_ids = self.end_ids[0], None, pieces, sorted(special)

            def __call__(self, text: str) -> list[int]:
                return backend.encode(text, add_special_tokens=False).ids

        try:
            return llguidance.LLTokenizer(TokenizerWrapper(Pieces()), n_vocab=self.vocab, eos_token=self.end_ids)
        except Exception as e:  # a vocabulary llguidance refuses (it raises ValueError / RuntimeError)
            raise SpqtError(f"structured output is not available for this model's tokenizer ({str(e)[:200]})") \
                from None


# llguidance's quote of the grammar source after an error (`   1 | start: ...`, a caret line under it), and the place
# before it (`at 1(8): `): of its own Lark, which a schema, a regex or a GBNF text became, not of the request's text
LLGUIDANCE_SOURCE_QUOTE = re.compile(r"\n\s*\d+ \| .*", re.S)
LLGUIDANCE_PLACE = re.compile(r"^at \d+\(\d+\): ")


def _message(error: str) -> str:
    """llguidance's error on one line, without the parser state it appends, or the place and the quote of its own
    grammar source."""
    error = LLGUIDANCE_SOURCE_QUOTE.sub("", error.split("<state>")[0])
    return " ".join(LLGUIDANCE_PLACE.sub("", error).split())[:300]


@dataclass(frozen=True)
class Grammar:
    """A grammar checked against the vocabulary it constrains: start, llguidance's matcher at its start (copied for
    each generation); what (a short description for messages)."""

    start: object
    vocabulary: Vocabulary
    what: str

    def matcher(self) -> "GrammarMatcher":
        return GrammarMatcher(self.start.deep_copy(), self.vocabulary.vocab, self.what)


def _checked(source: str, vocabulary: Vocabulary, what: str) -> Grammar:
    """source (llguidance's serialized grammar) -> its Grammar; SpqtError where it does not parse, or no text (not
    even the empty one) starts it, or it forces text without end from its start (`root ::= "x" root`: the first
    token consumed put the matcher in error, a request's 500 mid-generation)."""
    import llguidance

    start = llguidance.LLMatcher(vocabulary.lltokenizer, source, log_level=0)  # (compiles it once: no validate pass)
    if start.is_error():
        raise SpqtError(f"{what} is not valid: {_message(start.get_error())}")
    # (its first mask: no token allowed, or the computing of it put the matcher in error; then, on a copy, the first
    # token it forces consumed: text forced without end puts the matcher in error there)
    probe = start
    if any(start.compute_bitmask()) and not start.is_error():
        probe = start.deep_copy()
        probe.consume_tokens(probe.compute_ff_tokens()[:1])
        if not probe.is_error():
            return Grammar(start, vocabulary, what)
    raise SpqtError(f"{what} admits no text" + (f": {_message(probe.get_error())}" if probe.is_error() else ""))


def parse_schema(schema, what: str) -> dict:
    """A JSON schema given as a dict or its JSON text -> the dict; SpqtError where it is not a JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SpqtError(f"{what} is not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise SpqtError(f"{what} must be a JSON object (a schema), not {json.dumps(schema)[:40]}")
    return schema


# Where a schema holds schemas: under these keys a map of names to schemas, a list of them, or one schema
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf", "items")
SUBSCHEMA_ONES = ("items", "additionalProperties", "additionalItems", "contains", "unevaluatedItems")


def _subschemas(node: dict):
    """(key, name or index or None, schema) of each schema directly in node, in the positions JSON Schema gives them
    (not in data: const, enum, default, examples, or the names of properties)."""
    for key in SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            yield from ((key, name, sub) for name, sub in node[key].items())
    for key in SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            yield from ((key, i, sub) for i, sub in enumerate(node[key]))
    for key in SUBSCHEMA_ONES:
        if isinstance(node.get(key), dict):
            yield key, None, node[key]


def _subschemas_mapped(node: dict, fn) -> dict:
    """A copy of node with fn applied to each schema directly in it (_subschemas' positions)."""
    out = dict(node)
    for key, at, sub in _subschemas(node):
        if at is None:
            out[key] = fn(sub)
        elif isinstance(out[key], dict):
            out[key] = {**out[key], at: fn(sub)}
        else:
            out[key] = [*out[key][:at], fn(sub), *out[key][at + 1:]]
    return out


def closed_objects(schema: dict) -> dict:
    """schema (not changed) with `additionalProperties: false` in each object schema that lists properties and says
    nothing of others, as llama.cpp's JSON grammars and xgrammar's strict mode (vLLM's default) read it: JSON Schema
    lets any other property in, and the default model's answers to {"properties": {"a": ...}} went on with made-up
    keys to max_tokens. Left open: an object whose `required` names or `minProperties` ask for more than it lists,
    and every object of a schema that composes objects (allOf anywhere; a $ref, anyOf or oneOf beside properties),
    where a closed part would refuse the other parts' properties. What it takes, schema takes."""
    def composes(node) -> bool:
        if not isinstance(node, dict):
            return False
        here = "allOf" in node or ("properties" in node and any(k in node for k in ("$ref", "anyOf", "oneOf")))
        return here or any(composes(sub) for _, _, sub in _subschemas(node))

    def closes(node: dict) -> bool:
        listed = node.get("properties")
        if not isinstance(listed, dict) or any(k in node for k in (
                "additionalProperties", "patternProperties", "unevaluatedProperties")):
            return False
        required = node.get("required", [])
        unlisted = isinstance(required, list) and any(name not in listed for name in required)
        least = node.get("minProperties", 0)
        return not unlisted and not (isinstance(least, int) and least > len(listed))

    def close(node):
        if not isinstance(node, dict):
            return node
        out = _subschemas_mapped(node, close)
        if closes(node):
            out["additionalProperties"] = False
        return out

    return schema if composes(schema) else close(schema)


def rebased_refs(schema: dict, pointer: str) -> dict:
    """schema (not changed) with each local `$ref` ("#...") moved under `pointer` (a JSON pointer, "/anyOf/0/..."):
    for a schema placed at pointer inside another, whose refs would otherwise resolve against the outer root (a
    function's parameters with $defs inside a forced tool call's schema)."""
    def rebase(node):
        if not isinstance(node, dict):
            return node
        out = _subschemas_mapped(node, rebase)
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            out["$ref"] = "#" + pointer + node["$ref"][1:]
        return out

    return rebase(schema)


def json_schema(schema, vocabulary: Vocabulary, what: str = "the JSON schema") -> Grammar:
    """schema: a dict (a JSON schema; {} allows any JSON value) or its JSON text; its objects closed_objects'."""
    import llguidance

    schema = closed_objects(parse_schema(schema, what))
    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
    except ValueError as e:
        raise SpqtError(f"{what} is not valid: {str(e)[:300]}") from None
    return _checked(source, vocabulary, what)


def lark_json(schema: dict) -> str:
    """schema as a Lark grammar's `%json` item, with json_schema's whitespace between its tokens (Lark's own is any run
    of white space)."""
    return "%json " + json.dumps({"x-guidance": {"whitespace_pattern": JSON_WHITESPACE}, **schema})


def json_object(vocabulary: Vocabulary) -> Grammar:
    """Any JSON object (OpenAI's response_format json_object)."""
    return json_schema(ANY_JSON_OBJECT, vocabulary, "a JSON object")


def regex(pattern: str, vocabulary: Vocabulary) -> Grammar:
    import llguidance

    return _checked(llguidance.LLMatcher.grammar_from_regex(pattern), vocabulary, "the regular expression")


# GBNF's pieces that hold escapes: a string (its quotes, escapes inside) or a character class; and a comment (which
# holds none: skipped whole)
GBNF_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\r\n]*', re.S)
# An escape in a string or class: \uXXXX (group 1), \UXXXXXXXX (group 2), or any other (kept as it is)
GBNF_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|.)", re.S)


def _gbnf_unicode_escapes(text: str) -> str:
    """GBNF's \\uXXXX and \\UXXXXXXXX escapes in strings and character classes written as escapes that llguidance's
    converter keeps (it drops their leading zeros, which its Lark then refuses): an ASCII character as \\xHH, any
    other as itself (never GBNF syntax); other escapes, and comments, as they are. A surrogate half or a code past
    U+10FFFF (llama.cpp's parser takes it for a character that nothing matches): SpqtError."""
    def escape(m: re.Match) -> str:
        digits = m[1] or m[2]
        if digits is None:
            return m[0]
        code = int(digits, 16)
        if 0xD800 <= code < 0xE000 or code > 0x10FFFF:
            raise SpqtError(f"the GBNF grammar is not valid: {m[0]} is not a character (a surrogate half or past "
                            f"U+10FFFF)")
        return f"\\x{code:02X}" if code < 0x80 else chr(code)

    return GBNF_LITERAL.sub(lambda m: m[0] if m[0].startswith("#") else GBNF_ESCAPE.sub(escape, m[0]), text)


def gbnf(text: str, vocabulary: Vocabulary) -> Grammar:
    """A llama.cpp GBNF grammar (its root rule `root`)."""
    from llguidance.gbnf_to_lark import gbnf_to_lark

    text = _gbnf_unicode_escapes(text)
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
            raise SpqtError(f"{self.what}: {_message(self.matcher.get_error())}")

    def allowed(self, device: str | torch.device) -> torch.Tensor:
        """bool (vocab,) on device: the tokens that keep the text in the grammar."""
        return torch.from_numpy(self.allowed_host()).to(device)

    def allowed_host(self) -> np.ndarray:
        """allowed() as a numpy bool (vocab,) array of its own (unpacked by numpy: a few microseconds, where torch's
        ops took 50-70 us, more with the CPU's threads busy)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._check()
        return np.unpackbits(bits, bitorder="little")[:self.vocab].view(np.bool_)

    def consume(self, token: int) -> None:
        """The chosen token (one allowed() allowed: anything else is an error)."""
        self.matcher.consume_token(token)
        self._check()

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole sentence of the grammar."""
        return self.matcher.is_accepting()


@dataclass(frozen=True)
class AfterThinking:
    """A reasoning model's think block before its answer: a grammar that the answer keeps to after it, as vLLM orders
    them (any token until the block's end (close_id, `</think>`) but the end tokens (vLLM allows them: an answer that
    ends while it thinks has no content), the grammar from the token after it), a budget of thinking tokens, or both.
    thinking: the prompt opened the block (the answer thinks from its start); else the answer's first token may open
    one (open_id, `<think>`) or is the answer's first. budget: at most this many tokens between the tags; the next one
    is close_id, forced (as vLLM's thinking_token_budget and llama.cpp's reasoning budget end it). grammar None: the
    answer after the thinking is free, and so are the end tokens while it thinks (vocabulary: the one masked)."""

    grammar: Grammar | None
    open_id: int
    close_id: int
    thinking: bool
    budget: int | None = None
    vocabulary: Vocabulary | None = None  # where grammar is None; else the grammar's

    def __post_init__(self):
        if self.grammar is None and (self.vocabulary is None or self.budget is None):
            raise ValueError("AfterThinking without a grammar needs a budget and the vocabulary")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"a thinking budget is >= 0 tokens, got {self.budget}")

    @property
    def what(self) -> str:
        return self.grammar.what if self.grammar is not None else "the thinking budget"

    def matcher(self) -> "ThinkingMatcher":
        if self.grammar is None:
            return ThinkingMatcher(None, self.vocabulary.vocab, self.open_id, self.close_id, [], self.thinking,
                                   self.budget, self.vocabulary.blank)
        return ThinkingMatcher(self.grammar.matcher(), self.grammar.vocabulary.vocab, self.open_id, self.close_id,
                               self.grammar.vocabulary.end_ids, self.thinking, self.budget)


class ThinkingMatcher:
    """One generation's walk through an AfterThinking: state "start" (the first token: the answer's or open_id; with
    no grammar, the white space before a <think> too, which the reasoning parsers skip: blank(token) says which),
    "thinking" (every token but end_ids allowed (a grammar's answer does not end before it), close_id ends it; once
    spent reaches the budget, close_id alone) or "answer" (the grammar's walk; with none (inner None), every token)."""

    def __init__(self, inner: GrammarMatcher | None, vocab: int, open_id: int, close_id: int, end_ids: list[int],
                 thinking: bool, budget: int | None = None, blank: Callable[[int], bool] = lambda token: False):
        self.inner, self.vocab, self.open_id, self.close_id, self.end_ids = inner, vocab, open_id, close_id, end_ids
        self.blank = blank
        self.state = "thinking" if thinking else "start"
        self.budget, self.spent = budget, 0  # spent: the thinking's tokens so far
        self._masks: dict[tuple[str, str], torch.Tensor] = {}  # {(kind, device): a fixed mask there}

    def _mask(self, kind: str, device: str | torch.device) -> torch.Tensor:
        """A fixed mask on device, built once: "thinking" (end_ids off), "close" (close_id alone), "free" (all)."""
        key = (kind, str(device))
        if key not in self._masks:
            mask = torch.full((self.vocab,), kind != "close", dtype=torch.bool)
            if kind == "thinking":
                mask[self.end_ids] = False
            elif kind == "close":
                mask[self.close_id] = True
            self._masks[key] = mask.to(device)
        return self._masks[key]

    @property
    def over_budget(self) -> bool:
        """Whether the thinking has spent its budget: its next token is close_id."""
        return self.state == "thinking" and self.budget is not None and self.spent >= self.budget

    def allowed(self, device: str | torch.device) -> torch.Tensor:
        """bool (vocab,) on device as GrammarMatcher.allowed."""
        if self.state == "thinking":
            return self._mask("close" if self.over_budget else "thinking", device)
        if self.inner is None:
            return self._mask("free", device)
        allowed = self.inner.allowed_host()
        if self.state == "start":
            allowed[self.open_id] = True
        return torch.from_numpy(allowed).to(device)

    def consume(self, token: int) -> None:
        if self.state == "answer":
            if self.inner is not None:
                self.inner.consume(token)
        elif self.state == "thinking":
            if token == self.close_id:
                self.state = "answer"
            elif self.over_budget:
                raise SpqtError(f"the thinking budget of {self.budget} tokens is spent: its next token is "
                                f"{self.close_id}, got {token}")
            else:
                self.spent += 1
        elif token == self.open_id:  # (where the grammar could take the tag as text too, it opens the block)
            self.state = "thinking"
        elif self.inner is None and self.blank(token):
            pass  # (white space before a <think>: still the start)
        else:
            self.state = "answer"
            if self.inner is not None:
                self.inner.consume(token)

    @property
    def complete(self) -> bool:
        """Whether the answer after the thinking is a whole sentence of the grammar (with none: always)."""
        return self.inner is None or (self.state == "answer" and self.inner.complete)
