"""spqt.serve.reasoning: the thinking and the answer of a reasoning model's text, whole and streamed (every split of
the text into up to three pieces gives the whole's split)."""

import itertools

from spqt.serve.reasoning import ReasoningStream, reasoning_template, split_reasoning, starts_thinking

CASES = [("<think>\nplan a\nb\n</think>\n\nAnswer.", False, ("plan a\nb", "Answer.")),
         ("  <think>x</think>y", False, ("x", "y")),
         ("no think here", False, (None, "no think here")),
         ("\n\nHello <think>x</think>", False, (None, "\n\nHello <think>x</think>")),
         ("\n\nHello <think>x</think>", True, ("Hello <think>x", "")),
         ("<think>\n\ncut short\n", False, ("cut short", "")), ("<think>\n\n", False, (None, "")),
         ("<thi", False, (None, "<thi")), ("   ", False, (None, "   ")),
         ("<think></think>", False, (None, "")), ("<think>a</thin", False, ("a</thin", "")),
         ("plan</think>\nA", True, ("plan", "A")), ("a\n\n</think>\n\n\nB\n", True, ("a", "B\n")),
         ("<think>\n</think>", True, ("<think>", "")), ("", True, (None, "")), ("", False, (None, ""))]


def test_split_reasoning():
    for text, thinking, want in CASES:
        assert split_reasoning(text, thinking) == want, (text, thinking)


def test_a_stream_splits_as_the_whole_does():
    for text, thinking, (reasoning, content) in CASES:
        for cuts in itertools.combinations_with_replacement(range(len(text) + 1), 2):
            pieces = [text[:cuts[0]], text[cuts[0]:cuts[1]], text[cuts[1]:]]
            stream, got = ReasoningStream(thinking), ["", ""]
            for piece in pieces:
                for i, part in enumerate(stream.feed(piece)):
                    got[i] += part
            for i, part in enumerate(stream.finish()):
                got[i] += part
            assert got == [reasoning or "", content], (text, thinking, pieces)


def test_which_templates_and_prompts_think():
    assert reasoning_template("{{ '<think>' }}...{{ '</think>' }}") and not reasoning_template("{{ m.content }}")
    assert reasoning_template("{% set content = content.split('</think>')[-1] %}")  # (R1's distills' first one)
    assert not reasoning_template(None)
    assert starts_thinking("<|im_start|>assistant\n<think>\n") and not starts_thinking("a<think>b</think>\n")
    assert not starts_thinking("<|im_start|>assistant\n")
