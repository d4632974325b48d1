"""spqt.grammar: the token masks against a reference written here over the tiny tokenizer's vocabulary (finite
languages: a token allowed only where the text stays a prefix of a sentence, an end token only where it is one, and
every such token allowed where the language leaves a choice of next bytes; where it forces the next bytes llguidance
allows their canonical tokenization's first token alone, at least where they run to the sentence's end),
generation that keeps to a JSON schema, a choice, a regex and a GBNF grammar (greedy: each token the argmax of
its step's logits over the allowed ones), the CLI's flags, and the errors of bad grammars."""

import json
import re

import pytest
import torch

from spqt import grammar
from spqt.errors import SpqtError
from spqt.sampling import Sampling


@pytest.fixture(scope="module")
def tiny(tiny_spqt):
    from spqt.checkpoint import load_spqt
    from spqt.tokenizer import TextTokenizer

    loaded = load_spqt(tiny_spqt)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    return loaded, tok, grammar.Vocabulary(tok, loaded.config.vocab_size, tok.stop_ids)


def reference_allowed(tok, vocab: int, end_ids, sentences: list[bytes], text: bytes) -> tuple[set[int], str]:
    """The tokens after text that keep it a prefix of one of the sentences (a finite language), and the end tokens
    where text is one; special tokens never as text. And what the language leaves open: "free" (text is a sentence,
    or the sentences it starts go on with different bytes), "forced" (text starts one sentence alone and is not it:
    every byte to its end forced) or "partly" (the next bytes forced, then a choice)."""
    special = set(tok.backend.get_added_tokens_decoder())
    allowed = {t for t in range(vocab) if t not in special and tok.token_bytes(t)
               and any(s.startswith(text + tok.token_bytes(t)) for s in sentences)}
    going_on = [s for s in sentences if s.startswith(text) and len(s) > len(text)]
    if text in sentences or len({s[len(text)] for s in going_on}) > 1:
        state = "free"
    else:
        state = "forced" if len(going_on) == 1 else "partly"
    return allowed | (set(end_ids) if text in sentences else set()), state


def walk_against_reference(tiny, g: grammar.Grammar, sentences: list[str], rng, walks: int = 6) -> set[str]:
    """Random walks through g's matcher: at each step its mask is within the reference's, the whole of it where the
    language leaves the next byte free, one token where it forces every byte to the end; a walk ends at an end token.
    Returns the texts the walks ended on."""
    loaded, tok, vocabulary = tiny
    ends, language, done = vocabulary.end_ids, [s.encode() for s in sentences], set()
    free_steps = 0
    for _ in range(walks):
        m, text = g.matcher(), b""
        while True:
            allowed = set(m.allowed("cpu").nonzero().view(-1).tolist())
            want, state = reference_allowed(tok, loaded.config.vocab_size, ends, language, text)
            assert allowed and allowed <= want, (text, allowed, want)
            assert allowed == want if state == "free" else len(allowed) == 1 if state == "forced" else True, \
                (text, state, allowed, want)
            free_steps += state == "free"
            token = int(rng.choice(sorted(allowed)))
            if token in ends:
                done.add(text.decode())
                break
            m.consume(token)
            text += tok.token_bytes(token)
    assert free_steps >= walks  # (each walk's first step at least: the languages here start with a choice)
    return done


def test_choice_masks_are_the_languages_prefixes(tiny, rng):
    choices = ["the quick", "the lazy dog", "once", "over € ok", 'a "quoted"\nline']
    ended = walk_against_reference(tiny, grammar.choice(choices, tiny[2]), choices, rng, walks=12)
    assert ended <= set(choices) and ended


def test_regex_and_gbnf_masks_are_the_languages_prefixes(tiny, rng):
    sentences = ["ab", "c", "abd", "abef", "cd", "cef"]
    assert walk_against_reference(tiny, grammar.regex("(ab|c)(d|ef)?", tiny[2]), sentences, rng) <= set(sentences)
    gbnf = 'root ::= greet " " who\ngreet ::= "hello" | "hi"\nwho ::= "world" | "fox"'
    sentences = [f"{a} {b}" for a in ("hello", "hi") for b in ("world", "fox")]
    assert walk_against_reference(tiny, grammar.gbnf(gbnf, tiny[2]), sentences, rng) <= set(sentences)


def test_gbnf_unicode_escapes_are_read_as_llama_cpp_reads_them(tiny, rng):
    """\\uXXXX and \\UXXXXXXXX in GBNF strings and character classes (ASCII, a class's syntax characters, accented
    and astral characters) stand for their characters, \\xHH and an escaped backslash as before, comments are not
    read; a surrogate half is one error line."""
    gbnf = ('root ::= "h\\u0069" [\\u0021\\u005D-\\u005E] | "\\u00e9t\\u00E9" | "\\U0001F600\\x3d" | '
            '"\\\\u0041"  # a comment is not read: \\uD800 "\\u0041')
    sentences = ["hi!", "hi]", "hi^", "été", "😀=", "\\u0041"]
    assert walk_against_reference(tiny, grammar.gbnf(gbnf, tiny[2]), sentences, rng, walks=10) <= set(sentences)
    with pytest.raises(SpqtError, match=r"^the GBNF grammar is not valid: \\uD83D is not a character \(a surrogate "
                                        r"half or past U\+10FFFF\)$"):
        grammar.gbnf('root ::= "\\uD83D\\uDE00"', tiny[2])


def masked_argmax_walk(tiny, g: grammar.Grammar, raw: list[torch.Tensor], tokens: list[int]) -> None:
    """Each greedy token is the argmax of its step's raw logits over the tokens g allowed there."""
    m = g.matcher()
    for i, (logits, token) in enumerate(zip(raw, tokens)):
        allowed = m.allowed("cpu")
        masked = logits.float().masked_fill(~allowed, float("-inf"))
        assert allowed[token] and masked[token] >= masked.max() - 1e-3, (i, token, int(masked.argmax()))
        if i < len(tokens) - 1:
            m.consume(token)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"enum": ["x", "yz"]}, "c": {"type": "boolean"}},
          "required": ["a", "b", "c"], "additionalProperties": False}


def check_schema_answer(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"a", "b", "c"} and isinstance(value["a"], int) and 0 <= value["a"] <= 99
    assert value["b"] in ("x", "yz") and isinstance(value["c"], bool)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_generation_keeps_to_the_grammar(device, tiny, rng):
    """The tiny random model's answers under a JSON schema (bounded: every answer ends), greedy and sampled, parse and
    match it; greedy tokens are the masked argmax of their steps' logits; a choice's and a regex's answers are in
    their languages; without the grammar the same prompts do not give such answers."""
    from spqt.generate import Generator

    loaded, tok, vocabulary = tiny
    gen = Generator(loaded, device, max_len=600)
    schema = grammar.json_schema(SCHEMA, vocabulary)
    ends = set(vocabulary.end_ids)
    for prompt in [rng.integers(0, loaded.config.vocab_size, 6).tolist() for _ in range(2)]:
        raw = []
        result = gen.generate(prompt, 560, Sampling(grammar=schema), stop_ids=ends,
                              on_logits=lambda logits: raw.append(logits[0]))
        assert result.finish_reason == "stop" and result.tokens[-1] in ends
        check_schema_answer(tok.decode(result.tokens[:-1]))
        masked_argmax_walk(tiny, schema, raw, result.tokens)
        assert gen.generate(prompt, 560, Sampling(grammar=schema), stop_ids=ends).tokens == result.tokens
        sampled = gen.generate(prompt, 560, Sampling(1.0, seed=int(rng.integers(1 << 30)), grammar=schema),
                               stop_ids=ends)
        assert sampled.finish_reason == "stop"
        check_schema_answer(tok.decode(sampled.tokens[:-1]))
        plain = tok.decode(gen.generate(prompt, 40, stop_ids=ends).tokens)
        with pytest.raises(ValueError):
            check_schema_answer(plain)
    words = ["yes", "no", "maybe so"]
    answer = gen.generate(prompt, 20, Sampling(grammar=grammar.choice(words, vocabulary)), stop_ids=ends)
    assert tok.decode(answer.tokens[:-1]) in words and answer.finish_reason == "stop"
    answer = gen.generate(prompt, 20, Sampling(1.0, seed=5, grammar=grammar.regex("[0-9]{3}-[a-z]{2}", vocabulary)),
                          stop_ids=ends)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", tok.decode(answer.tokens[:-1]))


def json_gap(tok, g: grammar.Grammar, before: str, gap: str) -> tuple[int, bool]:
    """How many of gap's characters (one-byte tokens each) g takes after the text before, and whether it then takes
    the next key's quote (the gap was whitespace it may end)."""
    m = g.matcher()
    for t in tok.encode(before):
        m.consume(t)
    taken = 0
    for c in gap:
        (t,) = tok.encode(c)
        if not m.allowed("cpu")[t]:
            break
        m.consume(t)
        taken += 1
    return taken, bool(m.allowed("cpu")[tok.encode('"')[0]])


def test_json_whitespace_is_bounded(tiny):
    """A gap between a JSON text's tokens is llama.cpp's: nothing, one space, or one or two line breaks and an indent
    of at most 20 spaces or tabs (32 line breaks a gap let a small model pad each one)."""
    _, tok, vocabulary = tiny
    g = grammar.json_object(vocabulary)
    assert json_gap(tok, g, "{", "") == (0, True)
    assert json_gap(tok, g, "{", "  ") == (1, True)
    assert json_gap(tok, g, "{", "\n\n\n") == (2, True)
    assert json_gap(tok, g, "{", "\n" + " " * 30) == (21, True)
    assert json_gap(tok, g, "{", "\n\t\t ") == (4, True)
    assert json_gap(tok, g, '{"a": 1,', " \n") == (1, True)


def test_objects_that_list_properties_take_no_others(tiny):
    """An object schema that lists properties and says nothing of others takes none (llama.cpp's reading, xgrammar's
    strict mode), at any depth; one that allows others or needs more than it lists, a schema that composes objects
    (allOf, a $ref or an anyOf beside properties) and data (const, property names) are as given."""
    _, tok, vocabulary = tiny
    point = {"type": "object", "properties": {"x": {"type": "integer"}}}
    closed = dict(point, additionalProperties=False)
    assert grammar.closed_objects(point) == closed and "additionalProperties" not in point
    nested = {"$defs": {"p": point}, "type": "object", "properties": {"ps": {"type": "array", "items": point},
                                                                     "q": {"anyOf": [point, {"type": "null"}]}}}
    assert grammar.closed_objects(nested) == {
        "$defs": {"p": closed}, "type": "object", "additionalProperties": False,
        "properties": {"ps": {"type": "array", "items": closed}, "q": {"anyOf": [closed, {"type": "null"}]}}}
    # required names or minProperties beyond the listed ones: closed, no object would do (llama.cpp takes them)
    for open_ in (dict(point, required=["x", "y"]), dict(point, minProperties=2)):
        assert grammar.closed_objects(open_) == open_
    grammar.json_schema(dict(point, required=["x", "y"]), vocabulary)  # (closed: "required property 'y'
    # is unsatisfiable"; llguidance takes minProperties only where every listed property is required)
    # a property named as a keyword is data, not composition: the object is closed still
    named = {"type": "object", "properties": {"allOf": {"type": "string"}, "$ref": {}}}
    assert grammar.closed_objects(named) == dict(named, additionalProperties=False)
    for kept in (dict(point, additionalProperties=True), dict(point, patternProperties={"^y": {}}), {"const": point},
                 {"allOf": [point, {"required": ["x"]}]}, {"items": {"allOf": [point]}},
                 {"$ref": "#/$defs/p", "$defs": {"p": {}}, "properties": {"y": {}}},
                 dict(point, anyOf=[{"properties": {"y": {}}}, {"$ref": "#/$defs/z"}], **{"$defs": {"z": point}})):
        assert grammar.closed_objects(kept) == kept
    g = grammar.json_schema(point, vocabulary)
    for text, takes in (('{"x": 1}', True), ('{}', True), ('{"x": 1, "y": 2}', False)):
        m = g.matcher()
        for t in tok.encode(text):
            if not m.allowed("cpu")[t]:
                break
            m.consume(t)
        else:
            assert takes and m.complete, text
            continue
        assert not takes, text


def test_bad_grammars_are_one_line_errors(tiny):
    vocabulary = tiny[2]
    for build, value, words in [(grammar.json_schema, '{"type": "objectx"}', "the JSON schema is not valid"),
                                (grammar.json_schema, "{not json", "the JSON schema is not JSON"),
                                (grammar.json_schema, "[1, 2]", "must be a JSON object"),
                                (grammar.regex, "[0-9]+(", "the regular expression is not valid"),
                                (grammar.gbnf, 'root ::= ("a" | "b"', "the GBNF grammar is not valid"),
                                (grammar.gbnf, 'start ::= "a"', "the GBNF grammar is not valid"),
                                (grammar.json_schema, "true", "must be a JSON object"),
                                (grammar.regex, "[^\\x00-\\U0010FFFF]", "the regular expression admits no text"),
                                (grammar.json_schema, {"$ref": "#"}, "the JSON schema admits no text"),
                                # text forced forever (no rule ends it): the first consume failed, mid-generation
                                (grammar.gbnf, 'root ::= "ab" root', "the GBNF grammar admits no text"),
                                (grammar.lark, 'start: "x" "y" start', "the Lark grammar admits no text")]:
        with pytest.raises(SpqtError, match=words) as e:
            build(value, vocabulary)
        # one line, without the place in and the quote of llguidance's own Lark (`at 1(8): ...   1 | start: ...`)
        assert "\n" not in str(e.value) and not re.search(r"\d+ \| start:|at \d+\(\d+\)", str(e.value))


def test_generate_cli_structured_output(tiny_spqt, tmp_path, capsys):
    from spqt.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["generate", str(tiny_spqt), "-p", "the quick", "-n", "400", "--json-schema-file", str(schema)]) == 0
    out = capsys.readouterr().out
    check_schema_answer(out.strip())
    assert main(["generate", str(tiny_spqt), "-p", "the quick", "-n", "20", "--grammar",
                 'root ::= "yes" | "no"']) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    assert main(["generate", str(tiny_spqt), "-p", "the quick", "-n", "3", "-j", json.dumps(SCHEMA)]) == 0
    assert "-n 3 ended the answer before its grammar was complete" in capsys.readouterr().err
    for bad in (["--json-schema", '{"type": 3}'], ["-j", "true"], ["-j", "{"], ["--grammar-file", str(tmp_path / "missing.gbnf")],
                ["--grammar", "root ::= ("]):
        assert main(["generate", str(tiny_spqt), "-p", "x", "-n", "4", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("spqt: error:") == 1 and err.strip().splitlines()[-1].startswith("spqt: error:")
    with pytest.raises(SystemExit) as e:  # one structured output at a time (argparse's own error)
        main(["generate", str(tiny_spqt), "-p", "x", "-j", "{}", "--grammar", 'root ::= "a"'])
    assert e.value.code == 2


def test_a_special_token_is_asked_for_as_itself(tiny):
    """Vocabulary.literal: text that is one of the tokenizer's special tokens stands for that token (the grammar
    allows it, not its spelling), other text for its characters."""
    _, tok, vocabulary = tiny
    end = tok.backend.token_to_id("</s>")
    assert vocabulary.literal("</s>") == f"<[{end}]>" and vocabulary.literal('a "b"') == '"a \\"b\\""'
    m = grammar.lark(f'start: "hi" {vocabulary.literal("</s>")} "x"', vocabulary).matcher()
    for t in tok.encode("hi"):
        m.consume(t)
    assert m.allowed("cpu").nonzero().view(-1).tolist() == [end]
    m.consume(end)
    assert not m.complete and m.allowed("cpu")[tok.encode("x")[0]]


def test_a_special_tokens_text_in_a_grammar_is_spelled_out(tiny, rng):
    """A grammar whose text holds a special token's text ("</s>", the tiny model's end): the walk spells it in
    ordinary tokens (the special token itself is never allowed before the text is complete), and greedy generation
    under it gives that text and ends."""
    from spqt.generate import Generator

    loaded, tok, vocabulary = tiny
    end = tok.backend.token_to_id("</s>")
    g = grammar.choice(["x</s>y", "x</s>z"], vocabulary)
    m, text = g.matcher(), b""
    while not m.complete:
        allowed = m.allowed("cpu")
        assert not allowed[end]
        token = int(rng.choice(allowed.nonzero().view(-1).numpy()))
        m.consume(token)
        text += tok.token_bytes(token)
    assert text in (b"x</s>y", b"x</s>z") and m.allowed("cpu").nonzero().view(-1).tolist() == vocabulary.end_ids
    answer = Generator(loaded, "cpu", max_len=64).generate(tok.encode("the"), 20, Sampling(grammar=g),
                                                           stop_ids=set(vocabulary.end_ids))
    assert answer.finish_reason == "stop" and tok.decode(answer.tokens[:-1]) in ("x</s>y", "x</s>z")


def thinking_vocabulary(tiny) -> tuple:
    """tiny's tokenizer with <think> and </think> added as tokens of their own, not special (as Qwen3's), and its
    Vocabulary two ids larger: (tokenizer, vocabulary, open id, close id)."""
    import dataclasses

    from tokenizers import AddedToken, Tokenizer

    from spqt.tokenizer import TextTokenizer

    loaded, tok, vocabulary = tiny
    backend = Tokenizer.from_str(tok.backend.to_str())
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    thinking = TextTokenizer(dataclasses.replace(tok.spec, tokenizer_json=backend.to_str()), loaded.config)
    size = backend.get_vocab_size(with_added_tokens=True)
    v = grammar.Vocabulary(thinking, size, set(vocabulary.end_ids))
    return thinking, v, v.added_token("<think>"), v.added_token("</think>")


def test_a_grammar_after_thinking(tiny, rng):
    """grammar_after_thinking: where the prompt opened a think block every token is allowed (no mask) until
    </think>, then the grammar's mask; where the template closed the block, the grammar itself; else the first mask is
    the grammar's and <think>, which opens the block, while any other token starts the grammar. Walks whose wanted
    tokens the mask refuses end in the grammar's language; without the tags as tokens there is no gate."""
    import dataclasses

    from spqt.sampling import LogitShaper
    from spqt.serve.reasoning import answer_opening, chat_grammar, grammar_after_thinking

    thinking_tok, v, open_id, close_id = thinking_vocabulary(tiny)
    words = ["red", "green blue"]
    g = grammar.choice(words, v)
    assert grammar_after_thinking(g, tiny[2], "<think>\n") is None  # (tiny's own vocabulary: no such tokens)
    assert grammar_after_thinking(g, v, "x<think>\n\n</think>\n\n") is g
    opened = grammar_after_thinking(g, v, "A:")
    assert isinstance(opened, grammar.AfterThinking) and not opened.thinking

    ends = torch.tensor(v.end_ids)

    def walk(gate, wanted: list[int]) -> tuple[list[int], list[bool]]:
        """Greedy over random logits with each wanted token on top (where the mask leaves it), to an end token:
        the tokens and whether each step was masked by the grammar (a thinking step masks the end tokens alone)."""
        shaper, tokens, masked = LogitShaper(Sampling(grammar=gate), [], v.vocab, "cpu"), [], []
        for i in range(40):
            logits = torch.from_numpy(rng.standard_normal((1, v.vocab)).astype("float32"))
            if i < len(wanted):
                logits[0, wanted[i]] += 50.0
            shaped = shaper(logits)
            masked.append(not torch.equal(shaped, logits.index_fill(1, ends, float("-inf"))))
            tokens.append(int(shaped.argmax()))
            if tokens[-1] in v.end_ids:
                return tokens, masked
            shaper.add(tokens[-1])
        raise AssertionError(f"no end in 40 steps: {tokens}")

    plan, purple = thinking_tok.encode("plan it", add_bos=False), thinking_tok.encode("purple", add_bos=False)
    # thinking from the start: a <think> and an end token inside it neither end it (the end token is masked)
    thought = plan + [open_id, v.end_ids[0]] + plan + [close_id]
    tokens, masked = walk(grammar_after_thinking(g, v, "A:<think>\n"), thought + purple)
    at = len(thought)
    assert tokens[:at] == plan + [open_id, tokens[len(plan) + 1]] + plan + [close_id], tokens
    assert tokens[len(plan) + 1] not in v.end_ids and not any(masked[:at])
    assert all(masked[at:]) and thinking_tok.decode(tokens[at:-1]) in words
    tokens, masked = walk(grammar_after_thinking(g, v, "A:"), [open_id] + plan + [close_id] + purple)
    assert tokens[:len(plan) + 2] == [open_id] + plan + [close_id] and masked[0] and not any(masked[1:len(plan) + 2])
    assert thinking_tok.decode(tokens[len(plan) + 2:-1]) in words
    gate = grammar_after_thinking(g, v, "A:")
    first = gate.matcher().allowed("cpu")
    assert first[open_id] and not first[close_id] and torch.equal(first.nonzero(), torch.cat([
        g.matcher().allowed("cpu").nonzero(), torch.tensor([[open_id]])]).sort(0).values)
    red = thinking_tok.encode("red", add_bos=False)[:1]
    tokens, masked = walk(gate, red + [open_id] + purple)  # (no thinking: the grammar from the first token on)
    assert tokens[0] == red[0] and open_id not in tokens and all(masked) and thinking_tok.decode(tokens[:-1]) in words
    m = gate.matcher()
    assert not m.complete
    m.consume(open_id)
    assert torch.equal(m.allowed("cpu").logical_not().nonzero().view(-1), ends.sort().values) and not m.complete
    # spqt generate --chat's: the template's opening of the answer decides
    asked = thinking_tok.one_turn("think")  # (the last message's text is also in the opening)
    assert chat_grammar(g, thinking_tok, asked) is g  # (tiny's template writes no think tags)
    for opening, want in [("A:<think>\n", grammar.AfterThinking(g, open_id, close_id, True)),
                          ("A:", grammar.AfterThinking(g, open_id, close_id, False)), ("A:<think></think>", g)]:
        thinking_tok.spec = dataclasses.replace(thinking_tok.spec, chat_template=(
            "{% for m in messages %}U:{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}" + opening +
            "{% endif %}{# </think>: a template that thinks #}"))
        thinking_tok._hf = None  # (the transformers tokenizer that renders it: built again)
        assert answer_opening(thinking_tok, asked, thinking_tok.render_chat(asked)) == opening
        assert chat_grammar(g, thinking_tok, asked) == want, opening


def test_the_answer_opening_where_the_template_does_not_render_it_apart(tiny):
    """answer_opening: the rendering less the one without the generation prompt; where that one is not the start of
    the rendering, or the template refuses it, the text after the last message's (the whole where it is absent)."""
    import dataclasses

    from spqt.serve.reasoning import answer_opening

    tok = thinking_vocabulary(tiny)[0]
    asked = tok.one_turn("hello?", system="be brief")
    for template, rendered, want in [
            ("{% if not add_generation_prompt %}X{% endif %}{{ messages[-1].content }} then <think>", None,
             " then <think>"),
            ("{% if not add_generation_prompt %}{{ raise_exception('no') }}{% endif %}{{ messages[-1].content }}<think>",
             None, "<think>"),
            ("{{ messages[-1].content }}{% if add_generation_prompt %}<think>{% endif %}", "other <think>",
             "other <think>")]:
        tok.spec, tok._hf = dataclasses.replace(tok.spec, chat_template=template), None
        assert answer_opening(tok, asked, rendered or tok.render_chat(asked)) == want, template


def test_generation_keeps_to_the_grammar_after_thinking(tiny, rng):
    """The tiny model's greedy answer under AfterThinking (two of its own tokens standing for the tags, the close
    one's logit raised): before the close the unmasked argmax, after it the grammar's masked argmax, in its
    language, to the end token."""
    from spqt.generate import Generator

    loaded, tok, vocabulary = tiny
    raw, ends = [], set(vocabulary.end_ids)
    plain = sorted(set(range(loaded.config.vocab_size)) - ends - set(tok.backend.get_added_tokens_decoder()))
    open_id, close_id = (int(t) for t in rng.choice(plain, 2, replace=False))
    words = ["yes", "no", "maybe so"]
    gate = grammar.AfterThinking(grammar.choice(words, vocabulary), open_id, close_id, thinking=True)
    answer = Generator(loaded, "cpu", max_len=200).generate(
        rng.integers(0, loaded.config.vocab_size, 5).tolist(), 150, Sampling(grammar=gate, logit_bias={close_id: 4.0}),
        stop_ids=ends, on_logits=lambda logits: raw.append(logits[0].float()))
    assert answer.finish_reason == "stop" and close_id in answer.tokens
    at = answer.tokens.index(close_id)
    # the bias holds after the close too (where the grammar allows close_id, the answer takes it: was a failure)
    raw = [logits + 4.0 * (torch.arange(len(logits)) == close_id) for logits in raw]
    for logits, token in zip(raw[:at + 1], answer.tokens[:at + 1]):  # (the end tokens masked while it thinks)
        assert int(logits.index_fill(0, torch.tensor(sorted(ends)), float("-inf")).argmax()) == token
    masked_argmax_walk(tiny, gate.grammar, raw[at + 1:], answer.tokens[at + 1:])
    assert tok.decode(answer.tokens[at + 1:-1]) in words


def test_a_thinking_budget(tiny, rng):
    """A thinking budget (AfterThinking with or without a grammar): inside the block every token is allowed (the end
    tokens too where no grammar follows) until budget tokens are spent, then </think> alone, then the answer free
    (or the grammar's); a block the answer opens counts from its <think>; a budget of 0 closes at once. Where the
    template closed the block there is nothing to bound; without the tags as tokens a budget is an error."""
    from spqt.serve.reasoning import chat_grammar, grammar_after_thinking

    thinking_tok, v, open_id, close_id = thinking_vocabulary(tiny)
    free = torch.ones(v.vocab, dtype=torch.bool)
    only_close = torch.zeros(v.vocab, dtype=torch.bool).index_fill(0, torch.tensor([close_id]), True)
    plain = [int(t) for t in rng.choice(sorted(set(range(tiny[0].config.vocab_size)) - set(v.end_ids) - set(
        thinking_tok.backend.get_added_tokens_decoder())), 8, replace=False)]
    for budget in (0, 1, 3):
        for opening, first in [("A:<think>\n", []), ("A:", [open_id])]:
            gate = grammar_after_thinking(None, v, opening, budget)
            assert isinstance(gate, grammar.AfterThinking) and gate.grammar is None and gate.budget == budget
            m = gate.matcher()
            for token in first + plain[:budget]:
                assert torch.equal(m.allowed("cpu"), free) and m.complete
                m.consume(token)
            assert torch.equal(m.allowed("cpu"), only_close) and m.over_budget
            with pytest.raises(SpqtError, match="budget"):
                m.consume(plain[budget])
            m.consume(close_id)
            for token in plain + [open_id]:  # (the answer: free, a <think> in it is text)
                assert torch.equal(m.allowed("cpu"), free) and not m.over_budget
                m.consume(token)
    m = grammar_after_thinking(None, v, "A:", 1).matcher()
    m.consume(plain[0])  # (no block opened: nothing to bound)
    for token in plain:
        assert torch.equal(m.allowed("cpu"), free)
        m.consume(token)
    # with a grammar: the thinking's end tokens masked, the budget's close, then the grammar's masks
    g = grammar.choice(["red", "green blue"], v)
    m = grammar_after_thinking(g, v, "A:<think>\n", 2).matcher()
    ends = torch.zeros(v.vocab, dtype=torch.bool).index_fill(0, torch.tensor(v.end_ids), True)
    for token in plain[:2]:
        assert torch.equal(m.allowed("cpu"), ~ends) and not m.complete
        m.consume(token)
    assert torch.equal(m.allowed("cpu"), only_close)
    m.consume(close_id)
    assert torch.equal(m.allowed("cpu"), g.matcher().allowed("cpu"))
    # nothing to bound, or no way to bound it
    assert grammar_after_thinking(None, v, "A:<think>\n\n</think>\n\n", 5) is None
    assert grammar_after_thinking(g, v, "A:<think>\n\n</think>\n\n", 5) is g
    assert grammar_after_thinking(None, v, "A:<think>\n", None) is None
    with pytest.raises(SpqtError, match="tokens of their own"):
        grammar_after_thinking(None, tiny[2], "A:<think>\n", 5)
    assert grammar_after_thinking(None, tiny[2], "A:<think></think>", 5) is None
    assert chat_grammar(None, thinking_tok, thinking_tok.one_turn("hi"), 5, v) is None  # (tiny's template: no tags)
    with pytest.raises(ValueError):
        grammar.AfterThinking(None, open_id, close_id, True)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_generation_ends_its_thinking_at_the_budget(device, tiny, rng):
    """The tiny model's greedy answer under a thinking budget (two of its own tokens standing for the tags, the close
    one's logit lowered by 100 so that it never closes by itself, the end tokens' too so that it does not end before
    the budget): the budget's tokens are the model's argmax, the next one the forced close, then the model's argmax
    again to -n; a sampled answer closes at the same place; the tokens before the close are those of the answer
    without a budget."""
    from spqt.generate import Generator

    loaded, tok, vocabulary = tiny
    ends = set(vocabulary.end_ids)
    plain = sorted(set(range(loaded.config.vocab_size)) - ends - set(tok.backend.get_added_tokens_decoder()))
    open_id, close_id = (int(t) for t in rng.choice(plain, 2, replace=False))
    gen, budget = Generator(loaded, device, max_len=120), 6
    prompt = rng.integers(0, loaded.config.vocab_size, 5).tolist()
    gate = grammar.AfterThinking(None, open_id, close_id, True, budget, vocabulary)
    bias = {close_id: -100.0} | {end: -100.0 for end in ends}  # (an end token before the budget would end it)
    raw = []
    answer = gen.generate(prompt, 40, Sampling(grammar=gate, logit_bias=bias), stop_ids=ends,
                          on_logits=lambda logits: raw.append(logits[0].float().cpu()))
    assert len(answer.tokens) > budget + 1 and answer.tokens[budget] == close_id, answer.tokens
    assert close_id not in answer.tokens[:budget] + answer.tokens[budget + 1:]
    for i, (logits, token) in enumerate(zip(raw, answer.tokens)):
        if i != budget:
            biased = logits.index_add(0, torch.tensor(list(bias)), torch.tensor(list(bias.values())))
            assert biased[token] >= biased.max() - 1e-3, (i, token, int(biased.argmax()))
    unbounded = gen.generate(prompt, 40, Sampling(logit_bias=bias), stop_ids=ends)
    assert unbounded.tokens[:budget] == answer.tokens[:budget] and close_id not in unbounded.tokens
    sampled = gen.generate(prompt, 40, Sampling(1.0, seed=int(rng.integers(1 << 30)), grammar=gate, logit_bias=bias),
                           stop_ids=ends)
    assert sampled.tokens[budget] == close_id and close_id not in sampled.tokens[:budget], sampled.tokens


def test_a_thinking_budget_counts_from_a_think_after_white_space(tiny, rng):
    """Without a grammar, white space before the answer's own <think> keeps the start (the reasoning parsers skip
    it): the budget still bounds the block; any other first token leaves the answer free. With a grammar the white
    space is the grammar's (unchanged)."""
    from spqt.serve.reasoning import grammar_after_thinking

    thinking_tok, v, open_id, close_id = thinking_vocabulary(tiny)
    blank = [t for t in range(tiny[0].config.vocab_size) if v.blank(t)]
    words = [t for t in range(tiny[0].config.vocab_size) if thinking_tok.token_bytes(t).strip() and t not in v.end_ids
             and t not in thinking_tok.backend.get_added_tokens_decoder()]
    assert blank and not v.blank(open_id) and not v.blank(v.end_ids[0])
    first, plain = int(rng.choice(blank)), [int(t) for t in rng.choice(words, 4, replace=False)]
    m = grammar_after_thinking(None, v, "A:", 2).matcher()
    for token in [first, first, open_id] + plain[:2]:
        assert not m.over_budget
        m.consume(token)
    assert m.over_budget and m.allowed("cpu").nonzero().view(-1).tolist() == [close_id]
    m = grammar_after_thinking(None, v, "A:", 2).matcher()
    m.consume(plain[0])  # (text first: no block to bound)
    for token in [open_id] + plain:
        m.consume(token)
    assert not m.over_budget and m.state == "answer"
    m = grammar_after_thinking(grammar.regex(r"\s*red", v), v, "A:", 2).matcher()
    m.consume(first)
    assert m.state == "answer"
