"""Token ids -> text pieces as they arrive, with stop strings.

Decoding each new token alone would break multi-byte characters and the leading spaces some
decoders strip at the start of a text, so a piece is the difference between the decoding of a
few tokens before the new ones and the same with them (the offsets scheme of Hugging Face's
text-generation-inference). Text that could be the start of a stop string is held back until it
is known not to be one, so no client ever sees part of a stop string.

Which tokens a piece carries (a request's logprobs): a token's text starts where the text stood when it came
(`starts`); a token whose text has not come yet (half a character) starts where its text will. The tokens handed
out are those whose text starts before the end of the text handed out; at a stop string, those that hold only the
stop string and what follows it are never handed out; at the end, flush hands out the rest.
"""

import bisect
from collections.abc import Callable

INCOMPLETE = "\ufffd"  # what a byte-level decoder yields for a multi-byte character cut short
CONTEXT_TOKENS = 4  # the prompt's last tokens an answer's text is decoded after (TextStream's context)


def tail_starting(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag (what a stream holds back until the next piece
    shows whether the tag follows)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] = (), context: list[int] = ()):
        """context: the tokens before the first one fed (a prompt's last few), decoded with it but not part of the
        text, so that a decoder which strips a text's leading space (SentencePiece's) keeps the first token's;
        none where their text ends in part of a character."""
        self.decode = decode
        self.stops = [s for s in stops if s]
        context = list(context) if context and not decode(list(context)).endswith(INCOMPLETE) else []
        self.ids: list[int] = context  # the context, then the tokens fed
        self._prefix = 0  # ids[_prefix:_read] decode to text already taken into self.text
        self._read = len(context)
        self.text = ""  # all text so far (with what is held back)
        self.sent = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found; nothing more comes out
        self.found: str | None = None  # the stop string found (the first in the text; of two there, the first given)
        self.starts: list[int] = []  # where each token's text starts in self.text
        self._flushed = False

    def feed(self, token: int) -> str:
        """The next text piece (often '', while a character or a possible stop string is incomplete)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.starts.append(len(self.text))
        if not self._read_new(whole_characters=True):
            return ""
        pending = self.text[self.sent:]
        stop = self._stop(pending)
        return self._take(stop if stop is not None else len(pending) - self._held(pending))

    def flush(self) -> str:
        """Whatever is still held back, at the end of the generation (nothing after a stop string), with the text of
        a character the last tokens left unfinished (U+FFFD, as decoding them all gives)."""
        if self.stopped:
            return ""
        self._read_new(whole_characters=False)
        pending = self.text[self.sent:]
        stop = self._stop(pending)
        self._flushed = stop is None
        return self._take(stop if stop is not None else len(pending))

    def released(self) -> int:
        """How many of the tokens fed so far belong to the text handed out (see the module's docstring)."""
        return len(self.starts) if self._flushed else bisect.bisect_left(self.starts, self.sent)

    def _read_new(self, whole_characters: bool) -> bool:
        """Take the text of the tokens not read yet into self.text (whole_characters: not where it ends in an
        unfinished character); whether it did."""
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (whole_characters and after.endswith(INCOMPLETE)):
            return False
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return True

    def _stop(self, pending: str) -> int | None:
        """Where the first stop string in pending starts (then nothing more comes out), else None."""
        hits = [(pending.find(s), i) for i, s in enumerate(self.stops) if s in pending]
        if hits:
            at, i = min(hits)
            self.stopped, self.found = True, self.stops[i]
            return at
        return None

    def _held(self, pending: str) -> int:
        """Length of the longest end of pending that is a proper start of a stop string."""
        return max((tail_starting(pending, s) for s in self.stops), default=0)

    def _take(self, n: int) -> str:
        piece = self.text[self.sent:self.sent + n]
        self.sent += n
        return piece


def token_starts(decode: Callable[[list[int]], str], ids: list[int]) -> list[int]:
    """Where each token's text starts in the text of ids, by TextStream's rule (a token whose text has not come yet
    starts where its text will)."""
    stream = TextStream(decode)
    for token in ids:
        stream.feed(token)
    return stream.starts
