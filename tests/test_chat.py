"""`spqt chat` on the tiny random model (its chat template: `<s>ROLE: TEXT</s>` a message, `<s>assistant: ` to
answer): each turn against a fresh Generator's greedy answer to the whole conversation rendered by the template, the
KV cache's reuse counted, the commands, the context's limits, the errors and what goes to stdout and stderr.

The tiny model's answers are random bytes (newlines and characters cut short too), so stdout is compared whole, as
the concatenation of the expected answers, each followed by a line end."""

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from spqt.cli import main
from conftest import ctrl_c_at_decode_step

N = 10  # new tokens an answer
CTX = 256


@pytest.fixture(scope="module")
def model(tiny_spqt):
    from spqt.checkpoint import load_spqt
    from spqt.kernels import cpu_native
    from spqt.tokenizer import TextTokenizer

    loaded = load_spqt(tiny_spqt)
    backend = "cpu-native" if cpu_native.available() is None else "cpu-fp16"  # what --gemv auto runs on the CPU
    return loaded, TextTokenizer(loaded.tokenizer, loaded.config), backend


@pytest.fixture(scope="module", autouse=True)
def gemv(model):
    """The CLI runs' --gemv: the GEMV the fresh generators run (auto's choice, without its note where it falls back)."""
    GEMV[:] = ["--gemv", "native" if model[2] == "cpu-native" else "fp16"]


GEMV: list[str] = []


def generator(model, max_len: int = CTX):
    from spqt.generate import Generator

    loaded, _, backend = model
    return Generator(loaded, "cpu", max_len=max_len, backend=backend)


def shown_text(tok, prompt: list[int], tokens: list[int]) -> str:
    """The text of an answer's tokens as TextStream streams it (the stop token left out)."""
    from spqt.serve.text import CONTEXT_TOKENS, TextStream

    stream = TextStream(tok.decode, context=prompt[-CONTEXT_TOKENS:])
    pieces = [stream.feed(t) for t in tokens if t not in tok.stop_ids]
    return "".join(pieces) + stream.flush()


def fresh(model, conversation: list[str], system: str | None = None, n: int = N, max_len: int = CTX):
    """(tokens, text, prompt) of a fresh Generator's greedy answer to the conversation [user, assistant, ..., user],
    rendered whole by the chat template: no cache to reuse."""
    _, tok, _ = model
    roles = ["user", "assistant"] * len(conversation)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": role, "content": text} for role, text in zip(roles, conversation)]
    prompt = tok.chat_messages(messages)
    tokens = generator(model, max_len).generate(prompt, n, stop_ids=tok.stop_ids, track=False).tokens
    return tokens, shown_text(tok, prompt, tokens), prompt


def chat(monkeypatch, capsys, model_path, lines: bytes, *flags) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `spqt chat` in this process, its standard input the bytes `lines` (a pipe's:
    not a terminal)."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    capsys.readouterr()
    code = main(["chat", str(model_path), "-n", str(N), "--device", "cpu", "--ctx", str(CTX), *GEMV, *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_piped_turns_are_a_fresh_generate_of_the_whole_conversation(tiny_spqt, model, tmp_path):
    """`printf 'hi\\nwhat?\\n' | spqt chat`: two turns, then the end of the input ends it (exit 0). Each answer is,
    token for token (as text), a fresh greedy generate of the whole conversation so far, the earlier answers as the
    chat kept them; stdout holds the answers alone, stderr the model line and one figures line an answer, whose
    second turn reused the cache."""
    first, text1, _ = fresh(model, ["hi"])
    second, text2, _ = fresh(model, ["hi", text1, "what is the king?"])
    proc = subprocess.run([sys.executable, "-m", "spqt.cli", "chat", str(tiny_spqt), "-n", str(N), "--device", "cpu",
                           "--ctx", str(CTX)], input=b"hi\nwhat is the king?\n", capture_output=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.decode() == text1 + "\n" + text2 + "\n"
    assert text1 != text2  # (the second turn is not the first one's answer again)
    figures = [line for line in err.splitlines() if line.startswith("[answer ")]
    assert len(figures) == 2 and "tokens/s" not in proc.stdout.decode(), err
    assert re.search(r"\b0 reused\b", figures[0]) and int(re.search(r"(\d+) reused", figures[1])[1]) > 0, figures
    assert err.splitlines()[0].startswith("[q4_k-zigzag, cpu") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def read_until(fd: int, done, seen: bytes = b"", timeout: float = 120) -> bytes:
    """What the terminal's master end `fd` gave, `seen` first, up to where done(all of it) holds (None: to the
    end)."""
    deadline = time.monotonic() + timeout
    while done is None or not done(seen):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"timed out: {seen!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other end closed
            chunk = b""
        if not chunk:
            assert done is None, f"the end came first: {seen!r}"
            return seen
        seen += chunk
    return seen


def test_a_terminal_pastes_several_lines_as_one_message_and_ctrl_d_ends_the_line(tiny_spqt, model, tmp_path):
    """On a terminal (stdin, stdout and stderr a pseudo-terminal, readline's): the prompt turns bracketed paste on
    (Python's readline turns it off), so a paste of two lines is one message (its answer's prompt is that of the
    message of two lines; before, each line was a turn); Ctrl-D at the prompt ends its line (readline does, in that
    mode: the shell's prompt went on after the `> `) and the chat, exit 0."""
    _, _, prompt = fresh(model, ["hi\nthe quick fox"])
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "spqt.cli", "chat", str(tiny_spqt), "-n", str(N), "--device",
                             "cpu", "--ctx", str(CTX), *GEMV], stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TERM": "xterm"})
    os.close(slave)
    try:
        seen = read_until(master, lambda seen: seen.endswith(b"> "))  # (the prompt waits for a line)
        assert b"\x1b[?2004h" in seen, seen  # (a terminal marks a paste only where the program asks it to)
        os.write(master, b"\x1b[200~hi\nthe quick fox\x1b[201~\r")
        seen = read_until(master, lambda seen: b"[answer " in seen and seen.endswith(b"> "), seen)
        os.write(master, b"\x04")
        seen = read_until(master, None, seen)
        assert proc.wait(timeout=60) == 0, seen
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    figures = re.findall(r"\[answer .*? prompt (\d+) tokens", text)
    assert figures == [str(len(prompt))] and "Traceback" not in text, text
    assert "\n" in text[text.rindex("> "):], text


def test_ctrl_d_ends_the_prompts_line_where_readline_does_not_draw_it(monkeypatch):
    """`spqt chat > log` from a terminal: the prompt goes to stderr and input() reads without readline, so Ctrl-D
    left the shell's prompt after the `> `; now a line end follows it."""
    from spqt.chat import line_reader

    typed = ["hi"]

    def ctrl_d_after_typed(prompt=""):
        if not typed:
            raise EOFError
        return typed.pop(0)

    monkeypatch.setattr("builtins.input", ctrl_d_after_typed)
    err = io.StringIO()
    read = line_reader(io.StringIO(), True, False, err)
    assert (read(), read(), err.getvalue()) == ("hi", None, "> > \n")


def test_the_second_turn_prefills_only_what_the_cache_does_not_hold(model, monkeypatch):
    """The second turn reuses the KV cache: the tokens prefilled (counted at Generator._prefill) are the prompt less
    its common prefix with what the first turn left in the cache (its prompt and answer, less the answer's last
    token, never fed back), at least the first prompt less its last token (the generation prompt's, which the
    template's text after it may merge with); its answer is a fresh whole prefill's, token for token."""
    from spqt.chat import Chat
    from spqt.generate import Generator, Sampling

    _, tok, _ = model
    prefilled = []
    real = Generator._prefill
    monkeypatch.setattr(Generator, "_prefill", lambda self, prompt, start=0, capture=False: prefilled.append(
        len(prompt) - start) or real(self, prompt, start, capture))
    session = Chat(generator(model), tok, Sampling(), N)
    one = session.reply("hi")
    two = session.reply("what is the king?")
    prompt1 = tok.chat_messages([{"role": "user", "content": "hi"}])
    tokens2, _, prompt2 = fresh(model, ["hi", one.text, "what is the king?"])
    held = prompt1 + one.result.tokens[:-1]
    common = next(i for i, (a, b) in enumerate(zip(held + [None], prompt2)) if a != b)
    assert (one.result.prompt_tokens, two.result.prompt_tokens) == (len(prompt1), len(prompt2))
    assert prefilled[:2] == [len(prompt1), len(prompt2) - common], (prefilled, common)
    assert two.result.cached_tokens == common >= len(prompt1) - 1
    assert two.result.tokens == tokens2
    assert session.turns == [("hi", one.text), ("what is the king?", two.text)]


def test_each_answer_is_seeded_apart_so_a_message_asked_again_is_a_new_sample(model, monkeypatch):
    """Answer i of a chat samples at seed + i (one seed for every answer drew the same answer to the same message
    after a /reset); a chat of the same seed and messages repeats its answers."""
    from spqt.chat import Chat
    from spqt.generate import Generator, Sampling

    _, tok, _ = model
    seeds = []
    real = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, prompt, n, sampling, **kw: seeds.append(sampling.seed) or
                        real(self, prompt, n, sampling, **kw))

    def answers(seed: int) -> list[str]:
        session = Chat(generator(model), tok, Sampling(1.5, seed=seed), N)
        first = session.reply("hi").text
        session.reset()
        return [first, session.reply("hi").text, session.reply("and then?").text]

    once = answers(11)
    assert seeds == [11, 12, 13] and once[0] != once[1]
    assert answers(11) == once
    seeds.clear()
    answers(2**64 - 1)
    assert seeds == [2**64 - 1, 0, 1]


def test_reset_and_system(tiny_spqt, model, monkeypatch, capsys):
    """/reset starts the conversation again (the next answer is the first one's again, where with the history kept it
    is another); /system TEXT sets the system message and resets, and /reset keeps it; /help and the notes go to
    stderr alone; /exit ends before the lines after it."""
    _, plain, _ = fresh(model, ["hi"])
    _, again, _ = fresh(model, ["hi", plain, "hi"])
    _, brief, _ = fresh(model, ["hi"], system="be brief")
    assert len({plain, again, brief}) == 3  # the history and the system message change the answer
    code, out, err = chat(monkeypatch, capsys, tiny_spqt,
                          b"hi\nhi\n/reset\nhi\n/system be brief\nhi\n/reset\n/help\nhi\n/exit\nhi\n")
    assert code == 0
    assert out == "\n".join([plain, again, plain, brief, brief]) + "\n"
    assert "/system TEXT" in err and err.count("the conversation is cleared") == 3, err
    assert sum(line.startswith("[answer ") for line in err.splitlines()) == 5


def test_the_oldest_turns_go_where_the_context_is_full(tiny_spqt, model, monkeypatch, capsys):
    """With a context that holds the last two turns and the answer but not the three turns: the third message drops
    the first turn (one note line), and its answer is a fresh generate of the conversation without it."""
    _, tok, _ = model
    u1, u2, u3 = "hi", "what is the king?", "once upon a time there was a king"
    _, a1, p1 = fresh(model, [u1])
    _, a2, p2 = fresh(model, [u1, a1, u2])
    render = tok.chat_messages
    ctx = len(render([{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 2, [u2, a2, u3])])) + N
    whole = render([{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 3, [u1, a1, u2, a2, u3])])
    assert len(p2) + N <= ctx < len(whole) + N  # the test's premise: two turns fit, three do not
    _, a3, _ = fresh(model, [u2, a2, u3], max_len=ctx)
    code, out, err = chat(monkeypatch, capsys, tiny_spqt, f"{u1}\n{u2}\n{u3}\n".encode(), "--ctx", str(ctx))
    assert code == 0 and out == a1 + "\n" + a2 + "\n" + a3 + "\n"
    notes = [line for line in err.splitlines() if "dropped" in line]
    assert notes == [f"spqt: note: the conversation outgrew the context of {ctx} tokens: the oldest 1 turn dropped"]


def test_a_full_context_drops_to_half_and_the_next_turns_reuse_the_cache(model):
    """Where turns must go, as many as bring the prompt to half the room (the context less -n), the last turn kept:
    then the next turns prefill only their new part (dropping one turn a time shifted the conversation every turn,
    which prefilled it whole); each answer a fresh generate of the conversation kept."""
    from spqt.chat import KEPT_AFTER_DROP, Chat
    from spqt.generate import Sampling

    _, tok, _ = model
    ctx = 300
    room = ctx - N
    session = Chat(generator(model, ctx), tok, Sampling(), N)
    messages = [f"tell me about the king number {i} of the old land" for i in range(9)]
    drops, before = [], None
    for i, user in enumerate(messages):
        kept = session.turns[:]
        render = [tok.chat_messages([{"role": r, "content": t} for pair in kept[d:] for r, t in
                                     zip(("user", "assistant"), pair)] + [{"role": "user", "content": user}])
                  for d in range(len(kept) + 1)]
        least = next(d for d, p in enumerate(render) if len(p) <= room)
        turn = session.reply(user)
        drops.append(turn.dropped)
        if least:  # the context is full: down to half, the last turn kept
            assert turn.dropped >= least and (len(render[turn.dropped]) <= KEPT_AFTER_DROP * room or
                                              turn.dropped == len(kept) - 1), (i, least, turn.dropped)
            assert len(render[turn.dropped - 1]) > KEPT_AFTER_DROP * room or turn.dropped == least
        else:
            assert turn.dropped == 0 and (i == 0 or turn.result.cached_tokens >= before - 1), i  # the last prompt's
        conversation = [t for pair in kept[turn.dropped:] for t in pair] + [user]
        assert turn.result.tokens == fresh(model, conversation, max_len=ctx)[0], i
        before = turn.result.prompt_tokens
    assert sum(d > 0 for d in drops) >= 1 and max(drops) >= 2 and drops.count(0) >= 6, drops  # the premise


def test_a_message_that_does_not_fit_is_one_error_and_the_chat_goes_on(tiny_spqt, model, monkeypatch, capsys):
    """A message longer than the context, a line that is not UTF-8 and an unknown command: one error line each on
    stderr, nothing on stdout, none of them in the conversation; the next message is answered as the first one."""
    _, hi, _ = fresh(model, ["hi"])
    lines = b"hello world " * 40 + b"\n\xff\xfehi\n/bogus\nhi\n"
    code, out, err = chat(monkeypatch, capsys, tiny_spqt, lines, "--ctx", "64", "--quiet")
    assert code == 0 and out == hi + "\n"
    errors = err.splitlines()
    assert len(errors) == 3 and all(line.startswith("spqt: error: ") for line in errors), errors
    assert "exceeds the context of 64 tokens; it was not sent" in errors[0]
    assert "not UTF-8" in errors[1] and "unknown command /bogus" in errors[2]


def test_a_double_slash_sends_a_message_that_starts_with_a_slash(tiny_spqt, model, monkeypatch, capsys):
    """//usr is the message /usr (a command otherwise): answered as a fresh generate of it."""
    _, want, _ = fresh(model, ["/usr"])
    assert chat(monkeypatch, capsys, tiny_spqt, b"//usr\n", "--quiet") == (0, want + "\n", "")


def test_a_message_of_several_lines(tiny_spqt, model, monkeypatch, capsys):
    """\"\"\" begins a message of several lines and a line ending with \"\"\" ends it (one turn, the lines joined by
    line ends); \"\"\"x\"\"\" on one line is the message x."""
    _, want, _ = fresh(model, ["hi\nthe quick fox"])
    _, one, _ = fresh(model, ["hi\nthe quick fox", want, "x"])
    lines = b'"""hi\nthe quick fox\n"""\n"""x"""\n'
    assert chat(monkeypatch, capsys, tiny_spqt, lines, "--quiet") == (0, want + "\n" + one + "\n", "")


def test_quiet_leaves_stderr_empty(tiny_spqt, model, monkeypatch, capsys):
    """--quiet: no model line, no figures; the answers on stdout as without it."""
    _, hi, _ = fresh(model, ["hi"])
    assert chat(monkeypatch, capsys, tiny_spqt, b"hi\n", "--quiet") == (0, hi + "\n", "")


def test_errors_are_one_line(tiny_spqt, tmp_path, monkeypatch, capsys):
    """A model without a chat template, a missing file, -n that leaves no room, a --ctx past the model's, a system
    message the template refuses: one error line, exit 2, before any model line."""
    from spqt.checkpoint import load_spqt, save_spqt

    loaded = load_spqt(tiny_spqt)
    loaded.tokenizer.chat_template = None
    save_spqt(loaded, tmp_path / "plain.spqt")
    loaded.tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system "
                                      "role') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    save_spqt(loaded, tmp_path / "nosystem.spqt")
    for path, flags, fragment in [(tmp_path / "plain.spqt", [], "this model has no chat template"),
                                  (tmp_path / "none.spqt", [], "no such file"),
                                  (tiny_spqt, ["-n", "300"], "-n 300 leaves no room"),
                                  (tiny_spqt, ["--ctx", "4096"], "exceeds the model's context of 2048"),
                                  (tmp_path / "nosystem.spqt", ["--system", "x"], "refused this conversation")]:
        code, out, err = chat(monkeypatch, capsys, path, b"hi\n", *flags)
        lines = err.strip().splitlines()
        assert (code, out) == (2, "") and len(lines) == 1 and lines[0].startswith("spqt: error: "), (flags, err)
        assert fragment in lines[0], lines


def test_ctrl_c_stops_the_answer_and_keeps_it(tiny_spqt, model, monkeypatch, capsys):
    """Ctrl-C (SIGINT, sent at the third decode step) ends the answer at its next token: a line end, the figures
    line says stopped, and the next turn's answer is a fresh generate after the part that was shown; the loop goes on
    and the SIGINT handler is Python's own again afterwards."""
    _, tok, _ = model
    tokens, whole, prompt = fresh(model, ["hi"])
    part = shown_text(tok, prompt, tokens[:3])  # the prefill's token and two steps' come out; the third step's not
    assert part != whole and whole.startswith(part)
    _, after, _ = fresh(model, ["hi", part, "what is the king?"])
    ctrl_c_at_decode_step(monkeypatch, 3)
    code, out, err = chat(monkeypatch, capsys, tiny_spqt, b"hi\nwhat is the king?\n")
    assert code == 0 and out == part + "\n" + after + "\n"
    figures = [line for line in err.splitlines() if line.startswith("[answer ")]
    assert figures[0].endswith("| stopped]") and not figures[1].endswith("| stopped]"), figures
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_the_message_prefills_stops_at_once_and_keeps_nothing(tiny_spqt, model, monkeypatch, capsys):
    """Ctrl-C (SIGINT) while the first message prefills: the prefill stops there (it went on to the answer's first
    token, which asks should_stop, and kept an empty answer: a long message's Ctrl-C showed nothing for the whole
    prefill), one note line, nothing on stdout; the next message is answered as the first of the conversation, its
    prompt computed whole (the cache half written is not reused)."""
    from spqt.generate import Generator

    _, after, _ = fresh(model, ["what is the king?"])
    prefills, real = [], Generator._prefill

    def prefill(self, prompt, start=0, capture=False):
        prefills.append(start)
        if len(prefills) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, prompt, start, capture)

    monkeypatch.setattr(Generator, "_prefill", prefill)
    code, out, err = chat(monkeypatch, capsys, tiny_spqt, b"hi\nwhat is the king?\n")
    assert code == 0 and out == after + "\n", err
    assert "[stopped before the answer began: the message is not in the conversation]" in err.splitlines(), err
    figures = [line for line in err.splitlines() if line.startswith("[answer ")]
    assert len(figures) == 1 and " 0 reused" in figures[0] and prefills == [0, 0], (figures, prefills)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_at_the_prompt_ends_the_chat(tiny_spqt, model, monkeypatch, capsys):
    """Ctrl-C while the next line is read: exit 0 after the answers so far, no traceback, no `interrupted`."""
    _, hi, _ = fresh(model, ["hi"])

    class Interrupted(io.BytesIO):
        def readline(self, *args):
            line = super().readline(*args)
            if not line:
                raise KeyboardInterrupt
            return line

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(Interrupted(b"hi\n"), encoding="utf-8"))
    capsys.readouterr()
    assert main(["chat", str(tiny_spqt), "-n", str(N), "--device", "cpu", "--ctx", str(CTX), *GEMV, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == hi + "\n" and err == "\n"


def test_ctrl_c_at_a_terminals_prompt_drops_the_line_and_a_second_one_ends_the_chat(model):
    """At a terminal a Ctrl-C at the prompt drops what was typed, with a note, and the chat goes on (one meant for an
    answer that had just ended took the whole conversation); a second in a row ends it, exit 0. A message read in
    between starts the count again."""
    from spqt.chat import Chat, run
    from spqt.generate import Sampling

    _, tok, _ = model
    _, hi, _ = fresh(model, ["hi"])
    inputs = [KeyboardInterrupt, "hi", KeyboardInterrupt, KeyboardInterrupt, "never read"]

    def read():
        got = inputs.pop(0)
        if got is KeyboardInterrupt:
            raise KeyboardInterrupt
        return got

    out, err = io.StringIO(), io.StringIO()
    assert run(Chat(generator(model), tok, Sampling(), N), read, out, err, stats=False, terminal=True) == 0
    note = "[the line is dropped: Ctrl-C again, Ctrl-D or /exit ends the chat]"
    assert (out.getvalue(), err.getvalue().splitlines()) == (hi + "\n", ["", note, "", note, ""])
    assert inputs == ["never read"]


def test_an_answer_ending_on_the_end_of_turn_token_is_kept_without_it(model, monkeypatch):
    """Where the answer ends on a stop token (here the fresh answer's fourth token made the end-of-turn token), the
    conversation keeps the text before it (the template writes the end of the turn), and the next turn reuses the
    whole first prompt and answer from the cache."""
    from spqt.chat import Chat
    from spqt.generate import Sampling
    from spqt.tokenizer import TextTokenizer

    _, tok, _ = model
    tokens, _, prompt1 = fresh(model, ["hi"])
    stop = tokens[3]
    assert stop not in tokens[:3] and stop not in tok.stop_ids
    monkeypatch.setattr(TextTokenizer, "stop_ids", property(lambda self: {stop}))
    session = Chat(generator(model), tok, Sampling(), N)
    one = session.reply("hi")
    assert one.result.tokens == tokens[:4] and one.result.finish_reason == "stop"
    assert one.text == shown_text(tok, prompt1, tokens[:3]) and session.turns == [("hi", one.text)]
    prompt2 = tok.chat_messages(session.messages("what is the king?"))
    two = session.reply("what is the king?")
    held = prompt1 + tokens[:3]  # (the stop token is never fed back)
    common = next(i for i, (a, b) in enumerate(zip(held + [None], prompt2)) if a != b)
    assert two.result.cached_tokens == common >= len(prompt1) - 1


@pytest.mark.gpu
def test_chat_on_cuda_answers_as_a_fresh_generate_and_reuses_the_cache(tiny_spqt, model, monkeypatch, capsys):
    """On CUDA (fp32, the prefill graphs of a reused prefix's rests captured at the start): each answer is a fresh
    CUDA Generator's greedy answer to the whole conversation, and the second turn reused the cache."""
    import torch

    from spqt.generate import Generator

    loaded, tok, _ = model

    def fresh_cuda(conversation: list[str]) -> str:
        roles = ["user", "assistant"] * len(conversation)
        prompt = tok.chat_messages([{"role": r, "content": t} for r, t in zip(roles, conversation)])
        gen = Generator(loaded, "cuda", dtype=torch.float32, max_len=CTX)
        return shown_text(tok, prompt, gen.generate(prompt, N, stop_ids=tok.stop_ids, track=False).tokens)

    text1 = fresh_cuda(["hi"])
    text2 = fresh_cuda(["hi", text1, "what is the king?"])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi\nwhat is the king?\n"), encoding="utf-8"))
    capsys.readouterr()
    code = main(["chat", str(tiny_spqt), "-n", str(N), "--device", "cuda", "--dtype", "fp32", "--ctx", str(CTX)])
    out, err = capsys.readouterr()
    assert code == 0 and out == text1 + "\n" + text2 + "\n", err
    figures = [line for line in err.splitlines() if line.startswith("[answer ")]
    assert len(figures) == 2 and int(re.search(r"(\d+) reused", figures[1])[1]) > 0, err
    assert "prefill graphs captured" in err and "Traceback" not in err


def test_a_thinking_budget_bounds_each_answers_thinking(model, monkeypatch):
    """Chat's thinking_budget: each turn's Sampling carries chat_grammar's gate for the conversation as that turn
    renders it (the turns kept, the new message last) with the budget and the model's vocabulary; the tiny
    template writes no thinking, so the gate is none and the answers are those of a chat without a budget."""
    from spqt import chat
    from spqt.generate import Generator, Sampling

    _, tok, _ = model
    asked, sampled = [], []
    real_gate, real_generate = chat.chat_grammar, Generator.generate
    monkeypatch.setattr(chat, "chat_grammar", lambda g, tokenizer, messages, budget, vocabulary: asked.append(
        (g, messages, budget, vocabulary.vocab, vocabulary.end_ids)) or real_gate(g, tokenizer, messages, budget,
                                                                                   vocabulary))
    monkeypatch.setattr(Generator, "generate", lambda self, prompt, n, sampling=None, **kw: sampled.append(
        sampling) or real_generate(self, prompt, n, sampling, **kw))
    session = chat.Chat(generator(model), tok, Sampling(), N, system="be brief", thinking_budget=7)
    one = session.reply("hi")
    two = session.reply("and then?")
    assert [a[1] for a in asked] == [chat._messages("be brief", [], "hi"),
                                     chat._messages("be brief", [("hi", one.text)], "and then?")]
    assert all(a[0] is None and a[2] == 7 and a[3] == model[0].config.vocab_size and a[4] == sorted(tok.stop_ids)
               for a in asked)
    assert [s.grammar for s in sampled] == [None, None]
    plain = chat.Chat(generator(model), tok, Sampling(), N, system="be brief")
    assert [plain.reply("hi").text, plain.reply("and then?").text] == [one.text, two.text]


def test_a_thinking_budget_needs_the_think_tags_as_tokens(tiny_spqt, monkeypatch, capsys):
    """--thinking-budget where the template thinks but the vocabulary spells <think> / </think>: one error line,
    exit 2, before any turn (chat) or answer (generate --chat); where the template writes no thinking: a note."""
    import dataclasses

    from spqt import cli

    real_load = cli._load

    def thinking_template(args, path=None):
        loaded = real_load(args, path)
        loaded.tokenizer = dataclasses.replace(loaded.tokenizer, chat_template=(
            "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: <think>\n{% endif %}{# </think> #}"))
        return loaded

    code, out, err = chat(monkeypatch, capsys, tiny_spqt, b"hi\n", "--thinking-budget", "3")
    assert code == 0 and "--thinking-budget bounds nothing" in err
    monkeypatch.setattr(cli, "_load", thinking_template)
    for argv in (["chat", str(tiny_spqt), "--thinking-budget", "3", "--device", "cpu"],
                 ["generate", str(tiny_spqt), "-p", "hi", "--chat", "--thinking-budget", "3", "--device", "cpu"]):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi\n"), encoding="utf-8"))
        capsys.readouterr()
        assert main(argv) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and "needs <think> and </think> as tokens of their own" in lines[0], err


def test_a_closed_standard_input_ends_the_chat(tiny_spqt, monkeypatch, capsys):
    """`spqt chat <&-` (stdin closed: Python's sys.stdin is None) is the end of the input at once, as </dev/null is:
    exit 0, nothing on stdout, no traceback."""
    monkeypatch.setattr("sys.stdin", None)
    capsys.readouterr()
    assert main(["chat", str(tiny_spqt), "-n", str(N), "--device", "cpu", "--ctx", str(CTX), *GEMV]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and "error" not in err, err
