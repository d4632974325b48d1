"""`spqt chat`: a conversation in the terminal, on one Generator.

Each turn renders the whole conversation with the model's chat template, ready for the assistant's answer, and
generates with Generator.generate's reuse, as spqt serve's prompt cache does: the KV cache holds what the turn before
left in it (its prompt, and its answer where that was decoded dense), so only what follows the longest common prefix
is prefilled: the last answer's end-of-turn token, the new message and the template's text around it. Where the
rendering of the conversation so far is not the start of the new one (a template that rewrites earlier turns, or an
answer's text that re-encodes into other tokens than were decoded, or a generation prompt whose last token merges with
the answer's first), the reuse stops at the first token that differs and the rest is prefilled: the same prompt, more
of it computed. An answer can differ from a whole prefill's where the last bits of the logits decide (other matrix
shapes, another summation order), as the serve engine's docstring says.

The answer is kept as its text without the end-of-turn token (the stop token ends the generation; the template writes
it back), streamed as TextStream hands it out (whole characters, the leading space a SentencePiece decoder would
strip kept). The conversation has to fit the KV cache: where it would not, with the answer's new tokens, the oldest
user / assistant turns are dropped (never the system message nor the new message), down to half the room where
any must go (KEPT_AFTER_DROP: as llama.cpp's and ollama's context shift discard half; the last turn kept), so that the
next turns reuse the KV cache again instead of prefilling the whole conversation each; a message that does not fit
alone is refused and the conversation stays as it was.
"""

import contextlib
import dataclasses
import importlib.util
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from spqt.errors import SpqtError
from spqt.generate import GenerationResult, Generator
from spqt.grammar import Vocabulary
from spqt.sampling import Sampling
from spqt.serve.reasoning import chat_grammar
from spqt.serve.text import CONTEXT_TOKENS, TextStream
from spqt.tokenizer import TextTokenizer

HELP = """\
/exit, /quit    end the chat (so does the end of the input: Ctrl-D)
/reset          clear the conversation (the system message stays)
/system TEXT    set the system message and clear the conversation (/system alone: the template's default)
/help           this list
//TEXT          sends /TEXT as the message (a message that starts with /)
\"\"\"             begins a message of several lines, which a line ending with \"\"\" ends (as ollama reads them)
                (a paste of several lines is one message too, where the terminal marks pastes)
Ctrl-C          stops an answer (a second one ends spqt; before its first token, the message is not kept);
                at the prompt it drops the line typed, and a second one there ends the chat"""


MANY_LINES = '"""'
# Where the conversation outgrows the context, the oldest turns go until the prompt takes at most this share of the
# room (the context less an answer's -n), the last turn kept: later turns append to what the KV cache holds.
KEPT_AFTER_DROP = 0.5


def read_lines(first: str, read) -> str:
    """A message of several lines: first (a line that begins with \"\"\") and the lines read() gives up to one that
    ends with \"\"\" (the first line too, where it does), without the quotes; at the end of the input, what came."""
    lines, line = [], first[len(MANY_LINES):]
    while not line.rstrip().endswith(MANY_LINES):
        lines.append(line)
        line = read()
        if line is None:
            return "\n".join(lines).strip()
    lines.append(line.rstrip()[:-len(MANY_LINES)])
    return "\n".join(lines).strip()


class StoppedEarly(Exception):
    """Chat.reply's should_stop came true before the answer's first token (a Ctrl-C while the message prefilled): the
    message is not in the conversation."""


@dataclass
class Turn:
    """One answer: its text as the conversation keeps it, the generation's figures, how many of the oldest turns were
    dropped to fit it in the context, and whether should_stop ended it."""

    text: str
    result: GenerationResult
    dropped: int
    stopped: bool


def check_template(tokenizer: TextTokenizer, system: str | None) -> None:
    """SpqtError where the model has no chat template, or where it refuses a conversation of a user message (after
    `system`, where one is given)."""
    if not tokenizer.spec.chat_template:
        raise SpqtError("this model has no chat template: spqt chat needs one (spqt generate -p runs plain text)")
    tokenizer.chat_messages(_messages(system, [], "hi"))


def check_room(max_new_tokens: int, context: int) -> None:
    """SpqtError where an answer of max_new_tokens leaves no room for a message in a context of that many tokens."""
    if max_new_tokens >= context:
        raise SpqtError(f"-n {max_new_tokens} leaves no room for a message in the context of {context} tokens")


def _messages(system: str | None, turns: list[tuple[str, str]], user: str) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    done = [{"role": role, "content": text} for pair in turns for role, text in zip(("user", "assistant"), pair)]
    return head + done + [{"role": "user", "content": user}]


class Chat:
    """A conversation on `generator` (its KV cache of generator.max_len tokens is the context): a system message
    (None: the template's default) and the (user, assistant) turns so far."""

    def __init__(self, generator: Generator, tokenizer: TextTokenizer, sampling: Sampling, max_new_tokens: int,
                 system: str | None = None, track: bool = False, thinking_budget: int | None = None):
        """max_new_tokens: an answer's at most (each turn keeps room for it in the context). track: count the
        achieved sparsity (Generator.generate's). thinking_budget: a reasoning model's thinking at most this many
        tokens an answer, then its </think> forced (spqt.serve.reasoning.chat_grammar; None: no bound)."""
        check_template(tokenizer, system)
        check_room(max_new_tokens, generator.max_len)
        self.generator, self.tokenizer, self.sampling = generator, tokenizer, sampling
        self.max_new_tokens, self.track, self.thinking_budget = max_new_tokens, track, thinking_budget
        self.system = system
        self.turns: list[tuple[str, str]] = []
        self.answers = 0  # replies begun: answer i is seeded sampling.seed + i (a reset does not start them again)

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns = []

    def set_system(self, system: str | None) -> None:
        """A new system message (None: the template's default), and a new conversation."""
        check_template(self.tokenizer, system)
        self.system = system
        self.reset()

    def messages(self, user: str) -> list[dict]:
        """The conversation with `user` as its next message, as the template takes it."""
        return _messages(self.system, self.turns, user)

    def fit(self, user: str) -> tuple[list[int], int]:
        """(the prompt of the conversation with `user` next, how many of the oldest turns it leaves out) so that the
        prompt plus max_new_tokens fit the context; where turns must go, as many more as bring the prompt down to
        KEPT_AFTER_DROP of that room, the last turn kept (the next turns then find their prefix in the KV cache,
        where dropping one turn a time shifted the conversation every turn and prefilled it whole). SpqtError where
        the message does not fit alone (after the system message)."""
        room = self.generator.max_len - self.max_new_tokens

        def prompt_without(dropped: int) -> list[int]:
            return self.tokenizer.chat_messages(_messages(self.system, self.turns[dropped:], user))

        prompt, dropped = prompt_without(0), 0
        while len(prompt) > room and dropped < len(self.turns):
            dropped += 1
            prompt = prompt_without(dropped)
        if len(prompt) > room:
            system = " with the system message" if self.system is not None else ""
            raise SpqtError(f"the message takes {len(prompt)} tokens in the chat template{system}: with -n "
                            f"{self.max_new_tokens} that exceeds the context of {self.generator.max_len} tokens; it "
                            f"was not sent")
        while dropped and dropped < len(self.turns) - 1 and len(prompt) > KEPT_AFTER_DROP * room:
            dropped += 1
            prompt = prompt_without(dropped)
        return prompt, dropped

    def reply(self, user: str, on_text: Callable[[str], None] = lambda piece: None,
              should_stop: Callable[[], bool] = lambda: False,
              on_dropped: Callable[[int], None] = lambda n: None) -> Turn:
        """Answer `user` after the conversation so far (the oldest turns dropped where it would not fit, on_dropped
        told how many first), prefilling only what the KV cache does not hold yet; on_text gets the answer's text
        piece by piece as it decodes; should_stop, asked at each new token and, on the CPU, before each layer of the
        prefill (Generator.generate's), ends the answer there (the token not taken). The turn joins the conversation
        once answered; StoppedEarly (should_stop true before the first token was taken) and SpqtError (the message too
        long, the template refusing, logits that are not finite) leave the conversation as it was."""
        prompt, dropped = self.fit(user)
        if dropped:
            on_dropped(dropped)
        stream = TextStream(self.tokenizer.decode, context=prompt[-CONTEXT_TOKENS:])
        stop_ids = self.tokenizer.stop_ids
        stopped, taken = False, 0

        def on_token(token: int) -> bool:
            nonlocal stopped, taken
            if should_stop():
                stopped = True
                return True
            taken += 1
            if token not in stop_ids:  # (generate ends on it; the template writes the end of the turn itself)
                piece = stream.feed(token)
                if piece:
                    on_text(piece)
            return False

        # each answer a seed of its own, as the server's n choices: with one seed for all, the same message after a
        # /reset drew the same answer again (llama.cpp's chat draws on from one generator)
        sampling = dataclasses.replace(self.sampling, seed=(self.sampling.seed + self.answers) % 2**64)
        self.answers += 1
        if self.thinking_budget is not None:
            vocabulary = Vocabulary(self.tokenizer, self.generator.loaded.config.vocab_size, stop_ids)
            gate = chat_grammar(None, self.tokenizer, _messages(self.system, self.turns[dropped:], user),
                                self.thinking_budget, vocabulary)
            sampling = dataclasses.replace(sampling, grammar=gate)
        result = self.generator.generate(prompt, self.max_new_tokens, sampling, stop_ids=stop_ids,
                                         on_token=on_token, track=self.track, reuse=True, should_stop=should_stop)
        if not taken and should_stop():  # (a prefill cut short is not reused: Generator.generate keeps no record)
            raise StoppedEarly
        piece = stream.flush()
        if piece:
            on_text(piece)
        self.turns = self.turns[dropped:] + [(user, stream.text)]
        return Turn(stream.text, result, dropped, stopped)


def stats_line(turn: Turn) -> str:
    """The figures of an answer in one line, for stderr."""
    r = turn.result
    computed = r.prompt_tokens - r.cached_tokens
    achieved = f" | achieved sparsity {100 * r.sparsity['all']:.1f}%" if r.sparsity else ""
    stopped = " | stopped" if turn.stopped else ""
    return (f"[answer {len(r.tokens)} tokens, {r.decode_tokens_per_s:.1f} tokens/s | prompt {r.prompt_tokens} tokens, "
            f"{r.cached_tokens} reused, {computed} prefilled at {r.prefill_tokens_per_s:.0f} tokens/s"
            f"{achieved}{stopped}]")


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """Within the block a Ctrl-C (SIGINT) sets `event` instead of raising KeyboardInterrupt; a second one, the event
    set already, raises it as usual. Off the main thread, where Python takes no signal handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def line_reader(stdin: TextIO, stdin_tty: bool, stdout_tty: bool, err: TextIO,
                prompt: str = "> ") -> Callable[[], str | None]:
    """A function that returns the next line of input without its line end, None at its end (Ctrl-C raises
    KeyboardInterrupt). From a terminal, `prompt` first: where stdout is the terminal too, readline's line editing
    and history (where Python has readline), whose prompt it draws itself on stdout (redrawn as the line is edited;
    nothing there is captured), and a paste of several lines is one line (GNU readline's bracketed paste); else the
    prompt goes to `err`; Ctrl-D ends the prompt's line. Not from a terminal (a pipe, a file): lines of UTF-8,
    whatever the locale, with no prompt; a line that is not UTF-8 is a SpqtError."""
    if stdin_tty:
        bracketed = False  # GNU readline's bracketed paste on (which ends the prompt's line at Ctrl-D itself)
        if stdout_tty and importlib.util.find_spec("readline") is not None:
            readline = importlib.import_module("readline")  # input() edits lines and keeps their history once imported
            bracketed = "libedit" not in (readline.__doc__ or "")
            if bracketed:  # a paste of several lines is one message
                readline.parse_and_bind("set enable-bracketed-paste on")  # (Python turns it off, for its REPL)

        def ask() -> str | None:
            if not stdout_tty:
                err.write(prompt)
                err.flush()
            try:
                return input(prompt if stdout_tty else "")
            except EOFError:  # Ctrl-D: the prompt's line ends, so the shell's prompt starts a line of its own
                if not bracketed:
                    screen = sys.stdout if stdout_tty else err
                    screen.write("\n")
                    screen.flush()
                return None

        return ask
    lines = getattr(stdin, "buffer", None)  # bytes, read as UTF-8 whatever the locale (a StringIO has none)

    def read() -> str | None:
        if lines is None:
            line = stdin.readline()
        else:
            raw = lines.readline()
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SpqtError(f"a line of the input is not UTF-8 (byte {e.start}: {e.reason}); it was skipped") \
                    from None
        return line.removesuffix("\n").removesuffix("\r") if line else None

    return read


def run(chat: Chat, read: Callable[[], str | None], out: TextIO, err: TextIO, stats: bool = True,
        terminal: bool = False) -> int:
    """The chat loop: a line read is a message, answered on `out` (its text alone, then a line end), or a command
    (HELP); the figures of each answer (stats) and every note or error go to `err`, one line each. Ends at /exit,
    /quit, the end of the input or a Ctrl-C while reading (0); from a terminal (`terminal`) a Ctrl-C at the prompt
    drops the line typed instead, with a note, and a second one in a row ends it (a Ctrl-C meant for an answer that
    had just ended no longer ends the conversation). An error in one turn is its line and the loop goes on."""

    def say(line: str) -> None:
        err.write(line + "\n")
        err.flush()

    shown = False  # text of the answer on its way is on `out`
    ending = False  # a Ctrl-C at a terminal's prompt came last: a second one ends the chat

    def show(piece: str) -> None:
        nonlocal shown
        out.write(piece)
        out.flush()
        shown = True

    while True:
        try:
            line = read()
            text = line.strip() if line is not None else ""
            many = text.startswith(MANY_LINES)  # (a message of several lines: no command)
            if many:
                text = read_lines(text, read)
        except KeyboardInterrupt:  # at the prompt: the chat ends, as at the end of the input (a terminal: at a second)
            say("")
            if not terminal or ending:
                return 0
            say("[the line is dropped: Ctrl-C again, Ctrl-D or /exit ends the chat]")
            ending = True
            continue
        except SpqtError as e:
            say(f"spqt: error: {e}")
            ending = False
            continue
        ending = False
        if line is None:
            return 0
        if not text:
            continue
        if not many and text.startswith("//"):
            text = text[1:]
        elif not many and text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/help":
                say(HELP)
            elif command == "/reset":
                chat.reset()
                say("[the conversation is cleared]")
            elif command == "/system":
                try:
                    chat.set_system(rest.strip() or None)
                except SpqtError as e:
                    say(f"spqt: error: {e}")
                    continue
                say("[system message set; the conversation is cleared]" if chat.system is not None
                    else "[the template's own system message; the conversation is cleared]")
            else:
                say(f"spqt: error: unknown command {command}; /help lists the commands")
            continue
        stop, shown = threading.Event(), False
        try:
            with ctrl_c_sets(stop):
                turn = chat.reply(text, on_text=show, should_stop=stop.is_set,
                                  on_dropped=lambda n: say(f"spqt: note: the conversation outgrew the context of "
                                                           f"{chat.generator.max_len} tokens: the oldest {n} "
                                                           f"turn{'s' if n > 1 else ''} dropped"))
        except StoppedEarly:  # (a Ctrl-C while the message prefilled)
            say("[stopped before the answer began: the message is not in the conversation]")
            continue
        except SpqtError as e:
            if shown:  # (logits that are not finite, halfway through the answer)
                show("\n")
            say(f"spqt: error: {e}")
            continue
        show("\n")
        if stats:
            say(stats_line(turn))
