"""The tokenizer as data (TokenizerSpec), and building it from a GGUF file, in this process or in a
child process that runs beside the conversion.

Building the default model's tokenizer costs about 2.5 s of one core: importing transformers
1.3-1.7 s, reading the vocabulary and merges 0.3 s, building the ``tokenizers`` object 0.4 s
(2-core machine, 2026-12-01). Nearly all of it holds the GIL: run in a thread beside the encoder,
it overlapped nothing (4 layers encoded with the tokenizer built in a thread took 3.81 s, the two
one after the other 3.81 s). A child process has its own interpreter; it starts before gguf's
reader parses the file, so the two run on separate cores, and later it takes its share of the
cores beside the encoder. This module imports neither torch nor numpy (the child would pay
torch's ~2 s import for nothing).

Run as ``python -m spqt.tokenizer_spec GGUF``: writes JSON on stdout, the TokenizerSpec's fields or
``{"error": message}`` (exit code 2).
"""

import json
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

from spqt.errors import SpqtError

# Below this GGUF size the tokenizer is built in-process: a small model's encoding is shorter than
# the child's start (its own transformers import, 1.3-1.7 s), and the hostile-file test opens
# hundreds of small files. The default model's GGUF is 98 MB.
CHILD_MIN_BYTES = 16 << 20


@dataclass
class TokenizerSpec:
    """What is needed to rebuild the tokenizer without the source: serialized and plain data."""

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def to_dict(self) -> dict:
        return {"tokenizer_json": self.tokenizer_json, "chat_template": self.chat_template,
                "bos_token": self.bos_token, "eos_token": self.eos_token}


def spec_from_hf_tokenizer(tok) -> TokenizerSpec:
    if not getattr(tok, "is_fast", False):
        raise SpqtError("only fast (tokenizers-backed) tokenizers are supported")
    return TokenizerSpec(tokenizer_json=tok.backend_tokenizer.to_str(), chat_template=tok.chat_template,
                         bos_token=tok.bos_token, eos_token=tok.eos_token)


def gguf_tokenizer(path: Path) -> TokenizerSpec:
    """The tokenizer a GGUF's metadata describes, built by transformers' GGUF converter.

    transformers >= 5 exposes the converter itself, which reads only the tokenizer keys (1.2 s for
    the default model); AutoTokenizer(gguf_file=...) also parses every field with gguf's reader to
    build a model config first (about 7 s more on the 2-core machine). Both give the same
    tokenizer JSON (checked on the default model)."""
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers 4.x has only the AutoTokenizer route
        get_gguf_tokenizer = None
    try:
        if get_gguf_tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            from transformers import PreTrainedTokenizerFast

            architecture, tokenizer_dict, special = get_gguf_tokenizer(str(path))
            backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
            tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=special.get("chat_template"),
                                          **{k: special.get(k) for k in ("bos_token", "eos_token", "unk_token",
                                                                         "pad_token")})
    except Exception as e:
        raise SpqtError(f"{path}: cannot build the tokenizer from its GGUF metadata ({type(e).__name__}: {e})") from None
    return spec_from_hf_tokenizer(tok)


class ChildTokenizer:
    """gguf_tokenizer(path) in a child process started now; calling the object waits for it and
    returns the TokenizerSpec (or raises its SpqtError). The child is killed when the object is
    dropped or cancelled before that."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # the child imports this very spqt, wherever the parent found it
        src = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "spqt.tokenizer_spec", str(self.path)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          env=env)
        except OSError as e:
            raise SpqtError(f"{self.path}: cannot start a process to build the tokenizer ({e})") from None
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        self._result = None

    def __call__(self) -> TokenizerSpec:
        if self._result is None:
            out, err = self._proc.communicate()
            self._finalizer.detach()
            try:
                answer = json.loads(out)
            except ValueError:  # it died before answering (killed, out of memory, a broken install)
                last = err.decode(errors="replace").strip().splitlines()[-1:]
                raise SpqtError(f"{self.path}: building the tokenizer failed (its process exited with code "
                                f"{self._proc.returncode}{': ' + last[0] if last else ''})") from None
            if "error" in answer:
                raise SpqtError(answer["error"])
            self._result = TokenizerSpec(**answer)
        return self._result

    def cancel(self) -> None:
        if self._finalizer.alive:
            self._finalizer()


def start_gguf_tokenizer(path) -> "ChildTokenizer | None":
    """A ChildTokenizer for a GGUF file of at least CHILD_MIN_BYTES, else None (a smaller file, not
    a GGUF, not readable: open_source builds or refuses it in-process). Called before torch is
    imported (default_model.py), the child's start overlaps the parent's imports too."""
    path = Path(path)
    try:
        if path.stat().st_size < CHILD_MIN_BYTES:
            return None
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
    except OSError:
        return None
    return ChildTokenizer(path)


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()  # reaps it and closes the pipes


def _child_main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m spqt.tokenizer_spec GGUF", file=sys.stderr)
        return 2
    try:
        answer, code = gguf_tokenizer(Path(argv[0])).to_dict(), 0
    except SpqtError as e:
        answer, code = {"error": str(e)}, 2
    sys.stdout.write(json.dumps(answer))
    return code


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
