"""Text <-> token ids from the model's own tokenizer data (a serialized `tokenizers` JSON and the
chat template), through the `tokenizers` / `transformers` libraries."""

import json
import re
from functools import cached_property

from spqt.config import ModelConfig
from spqt.errors import SpqtError
from spqt.sources import TokenizerSpec


class TextTokenizer:
    def __init__(self, spec: TokenizerSpec, config: ModelConfig):
        from tokenizers import Tokenizer

        self.spec = spec
        self.config = config
        try:
            self.backend = Tokenizer.from_str(spec.tokenizer_json)
        except Exception as e:  # tokenizers raises a plain Exception on bad data
            raise SpqtError(f"the model's tokenizer data is not valid ({str(e)[:200]})") from None
        self._hf = None

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of plain text; BOS first when the model adds one (add_bos=None: its default). special False: a
        special token's text ("<|im_end|>") is tokenized as any other text, as llama-perplexity tokenizes its file
        (llama.cpp's parse_special off; a non-special added token still matches, as llama.cpp's user-defined ones)."""
        ids = (self.backend if special else self._plain).encode(text, add_special_tokens=False).ids
        bos = self.bos_prefix if add_bos is None else self._bos if add_bos else []
        return bos + ids

    @cached_property
    def _plain(self):
        """A second backend that reads special tokens' texts as text (its own: the server's threads share backend)."""
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(self.spec.tokenizer_json)
        plain.encode_special_tokens = True
        return plain

    @property
    def bos_prefix(self) -> list[int]:
        """What encode puts before a text's own tokens by default: [BOS] where the model adds one, else []."""
        return self._bos if self.config.add_bos else []

    @property
    def _bos(self) -> list[int]:
        return [] if self.config.bos_id is None else [self.config.bos_id]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, alone (part of a character for some): a byte-level vocabulary's piece
        mapped back through GPT-2's byte alphabet; a SentencePiece one's with its word mark as a space and a byte
        piece (<0xNN>) as that byte; an added token (a special one too) as its text."""
        piece = self.backend.id_to_token(token)
        if piece is None:
            return b""
        if token in self._added or (self._byte_alphabet and not set(piece) <= self._byte_alphabet.keys()):
            return piece.encode("utf-8")
        if self._byte_alphabet:
            return bytes(self._byte_alphabet[c] for c in piece)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        return bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")

    @cached_property
    def _added(self) -> set[int]:
        return set(self.backend.get_added_tokens_decoder())

    @cached_property
    def _byte_alphabet(self) -> dict[str, int]:
        """GPT-2's byte alphabet (character -> byte) where the vocabulary is byte-level, else {}."""
        decoder = json.loads(self.spec.tokenizer_json).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [])} | {decoder.get("type")}
        if "ByteLevel" not in kinds:
            return {}
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        return {c: b for b, c in bytes_to_unicode().items()}

    def chat(self, prompt: str, system: str | None = None) -> list[int]:
        """The model's chat template around one user message, ready for the assistant's answer; a system message
        first where one is given ("" too: an empty one, in place of the template's default)."""
        return self.chat_messages(self.one_turn(prompt, system))

    @staticmethod
    def one_turn(prompt: str, system: str | None = None) -> list[dict]:
        """chat()'s conversation: the system message where one is given, the user's."""
        return ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}]

    def chat_messages(self, messages: list[dict], tools: list[dict] | None = None,
                      template_kwargs: dict | None = None) -> list[int]:
        """The token ids of render_chat's text."""
        return self.encode(self.render_chat(messages, tools, template_kwargs), add_bos=False)

    def answer_opening(self, messages: list[dict], rendered: str, tools: list[dict] | None = None,
                       template_kwargs: dict | None = None) -> str | None:
        """What the chat template writes for the answer after the conversation (its generation prompt: Qwen's
        `<|im_start|>assistant\n`, DeepSeek-R1's `<｜Assistant｜><think>\n`): rendered (render_chat's text of these
        arguments) less the conversation rendered without it; None where that is not where rendered starts, or is all
        of it (a template that writes its opening either way)."""
        base = self.render_chat(messages, tools, template_kwargs, add_generation_prompt=False)
        return rendered[len(base):] if rendered.startswith(base) and base != rendered else None

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None, add_generation_prompt: bool = True) -> str:
        """The model's chat template around a conversation ([{"role": ..., "content": str}, ...]; tool calls and
        results as transformers' templates take them), ready for the assistant's answer (add_generation_prompt);
        tools: OpenAI's function specs, passed to the template; template_kwargs: more variables for it (Qwen3's
        enable_thinking). SpqtError where the template refuses it (its raise_exception: Mistral's takes no system
        message)."""
        import jinja2

        if not self.spec.chat_template:
            raise SpqtError("this model has no chat template; drop --chat")
        from transformers import PreTrainedTokenizerFast

        if self._hf is None:
            self._hf = PreTrainedTokenizerFast(tokenizer_object=self.backend, chat_template=self.spec.chat_template,
                                               bos_token=self.spec.bos_token, eos_token=self.spec.eos_token)
        try:
            text = self._hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                tokenize=False, **(template_kwargs or {}))
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # (the last two: template_kwargs it cannot take)
            raise SpqtError(f"the model's chat template refused this conversation: {' '.join(str(e).split())}") \
                from None
        return text

    @property
    def stop_ids(self) -> set[int]:
        stops = set(self.config.eos_ids)
        if self.spec.eos_token is not None:
            tid = self.backend.token_to_id(self.spec.eos_token)
            if tid is not None:
                stops.add(tid)
        return stops
