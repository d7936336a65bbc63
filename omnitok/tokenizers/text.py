"""The text tokenizer: one class over a SentencePiece model or a Hugging Face tokenizer.

Ids from here are the layout's text range ``[0, vocab_size)`` unchanged. ``encode`` never adds bos/eos: the
multimodal tokenizer places them around whole documents (ARCHITECTURE.md, Sequences).

Accepted sources (``TextTokenizer.from_path``):
- an omnitok text tokenizer directory (what ``save`` and ``omnitok text-tokenizer train`` write),
- a SentencePiece ``.model`` file,
- a Hugging Face ``tokenizer.json`` file (bos/eos tokens named by the caller, or found among common names),
- a pretrained LLM's directory (``tokenizer.json`` or ``tokenizer.model`` with ``tokenizer_config.json``), so a
  model can start from an existing LLM's vocabulary. An instruct LLM's chat template comes along (kept as
  ``chat_template.json``, part of the fingerprint): conversations are then written the way the LLM learned them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm
import tokenizers

from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object, write_json_atomic
from omnitok.tokenizers.protocol import PART_FILE, fingerprint, read_part_info, write_part_info

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CHAT_FILE = "chat_template.json"  # an instruct LLM's chat template and the special tokens it may name
# Tried in order when a bare tokenizer.json does not say which tokens are bos and eos.
_COMMON_BOS_EOS = [("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>"), ("<bos>", "<eos>"),
                   ("<|endoftext|>", "<|endoftext|>"), ("<|im_start|>", "<|im_end|>")]


class _SentencePiece:
    """Text round-trips exactly except U+2581, SentencePiece's space symbol, which decodes as a space."""

    name = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str):
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise OmnitokError(f"{source} is not a SentencePiece model: {e}") from None
        self.proto = model_proto
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise OmnitokError(f"SentencePiece model {source} has no bos or eos piece; documents need both")

    def encode(self, texts: list[str], literal: bool = False) -> list[list[int]]:
        return self.sp.encode(texts)  # bos / eos are control pieces: text never spells them

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        return fingerprint({"backend": self.name}, blobs=[self.proto])

    def save(self, directory: Path) -> None:
        (directory / SP_FILE).write_bytes(self.proto)
        write_part_info(directory, "text", self.name)


class _HuggingFace:
    name = "hf"

    def __init__(self, tok: tokenizers.Tokenizer, bos: str | None, eos: str | None, source: str,
                 chat: dict | None = None):
        # A tokenizer.json may carry truncation/padding settings; ids must never be cut or padded here.
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        if bos is None and eos is None:
            vocab = tok.get_vocab(with_added_tokens=True)
            found = next(((b, e) for b, e in _COMMON_BOS_EOS if b in vocab and e in vocab), None)
            if found is None:
                tried = ", ".join(f"{b}/{e}" for b, e in _COMMON_BOS_EOS)
                raise OmnitokError(f"{source}: cannot tell which tokens are bos and eos (tried {tried}); name them")
            bos, eos = found
        # Models without a bos token (Qwen, GPT-2 style) mark document starts with eos, as they were trained.
        bos = bos if bos is not None else eos
        if eos is None:
            raise OmnitokError(f"{source} has no eos token; documents need one")
        self.bos, self.eos = bos, eos
        self.bos_id, self.eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
        for token, token_id in ((bos, self.bos_id), (eos, self.eos_id)):
            if token_id is None:
                raise OmnitokError(f"{source}: token {token!r} is not in the vocabulary")
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.special_ids = sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self.chat = chat
        if chat is not None and not (isinstance(chat.get("template"), str) and isinstance(chat.get("tokens"), dict)):
            raise OmnitokError(f"{source}: {CHAT_FILE} must hold a 'template' string and a 'tokens' object")

    def encode(self, texts: list[str], literal: bool = False) -> list[list[int]]:
        tok = self.literal if literal else self.tok
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    @cached_property
    def literal(self) -> tokenizers.Tokenizer:
        """The same tokenizer, with text that spells a special token encoded as plain text."""
        tok = tokenizers.Tokenizer.from_str(self.tok.to_str())
        tok.encode_special_tokens = True
        return tok

    @cached_property
    def chat_renderer(self):
        from transformers import PreTrainedTokenizerFast  # slow import; only chat templates need it

        return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(self.tok.to_str()),
                                       chat_template=self.chat["template"], **self.chat["tokens"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        chat = [json.dumps(self.chat, sort_keys=True).encode()] if self.chat is not None else []
        return fingerprint({"backend": self.name, "bos": self.bos, "eos": self.eos},
                           blobs=[self.tok.to_str().encode(), *chat])

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / HF_FILE))
        if self.chat is not None:
            write_json_atomic(directory / CHAT_FILE, self.chat)
        write_part_info(directory, "text", self.name, bos_token=self.bos, eos_token=self.eos)


class TextTokenizer:
    """Strings <-> text ids. ``encode(list[str]) -> list[list[int]]``; ``decode(ids) -> str``."""

    def __init__(self, backend: _SentencePiece | _HuggingFace):
        self._backend = backend
        self.fingerprint = backend.fingerprint()

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_id(self) -> int:
        return self._backend.bos_id

    @property
    def eos_id(self) -> int:
        return self._backend.eos_id

    @property
    def chat_template(self) -> dict | None:
        """An instruct LLM's own chat template: ``{"template": jinja source, "tokens": {"bos_token": ..., ...}}`` (the
        special tokens its template may name), or None."""
        return getattr(self._backend, "chat", None)

    def render_chat(self, messages: list[dict], generation_prompt: bool) -> str:
        """The chat template's text for ``messages`` (``{"role", "content": str}``), rendered by transformers in its
        sandbox (a template cannot run code); a template error (a role it refuses, say) is one line."""
        if self.chat_template is None:
            raise OmnitokError("this text tokenizer has no chat template")
        try:
            return self._backend.chat_renderer.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2's TemplateError (and the template's raise_exception), SecurityError
            raise OmnitokError(f"the chat template refuses this conversation: {e}") from None

    @property
    def special_ids(self) -> list[int]:
        """Ids of the control tokens a Hugging Face tokenizer declares special (none for SentencePiece)."""
        return getattr(self._backend, "special_ids", [])

    @cached_property
    def control_tokens(self) -> list[str]:
        """The strings of ``special_ids``: what text could spell to forge a control token."""
        backend = self._backend
        return [backend.tok.id_to_token(i) for i in self.special_ids] if isinstance(backend, _HuggingFace) else []

    def encode(self, texts: Sequence[str], literal: bool = False) -> list[list[int]]:
        """Batch of strings -> lists of text ids, without bos/eos. With ``literal``, text that spells a control token
        (``<|im_end|>``: a special token of a Hugging Face tokenizer) is encoded as plain text, never as that token:
        what a chat's user wrote cannot close a turn or open another."""
        if isinstance(texts, str):
            raise OmnitokError("TextTokenizer.encode takes a list of strings, got one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise OmnitokError(f"text {i} is a {type(text).__name__}, not a str")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise OmnitokError(f"text {i} is not valid Unicode (lone surrogate at {e.start})") from None
        return self._backend.encode(list(texts), literal)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise OmnitokError(f"id {bad} is not a text id (text vocabulary has {self.vocab_size})")
        return self._backend.decode(ids)

    def stream(self) -> TextStream:
        """An incremental decoder for ids that arrive one at a time (a streamed answer)."""
        return TextStream(self)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        return directory

    @classmethod
    def from_dir(cls, directory: str | Path) -> TextTokenizer:
        """Load an omnitok text tokenizer directory (written by ``save``)."""
        directory = Path(directory)
        info = read_part_info(directory, "text")
        if info.get("type") == _SentencePiece.name:
            if not (directory / SP_FILE).is_file():
                raise OmnitokError(f"{directory / SP_FILE} not found")
            return cls(_SentencePiece((directory / SP_FILE).read_bytes(), str(directory / SP_FILE)))
        if info.get("type") == _HuggingFace.name:
            try:
                tok = tokenizers.Tokenizer.from_file(str(directory / HF_FILE))
            except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
                raise OmnitokError(f"{directory / HF_FILE} is not a Hugging Face tokenizer.json: {e}") from None
            chat = read_json_object(directory / CHAT_FILE, "") if (directory / CHAT_FILE).is_file() else None
            return cls(_HuggingFace(tok, info.get("bos_token"), info.get("eos_token"), str(directory), chat))
        raise OmnitokError(f"{directory}: unknown text tokenizer type {info.get('type')!r}")

    @classmethod
    def from_path(cls, path: str | Path, bos_token: str | None = None, eos_token: str | None = None) -> TextTokenizer:
        """Load any accepted source (see the module docstring)."""
        path = Path(path)
        if not path.exists():
            raise OmnitokError(f"text tokenizer {path} does not exist")
        if path.is_dir() and (path / PART_FILE).is_file():
            return cls.from_dir(path)
        if path.is_file() and path.suffix == ".model":
            return cls(_SentencePiece(path.read_bytes(), str(path)))
        if path.is_file() and path.suffix == ".json":
            try:
                tok = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
                raise OmnitokError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
            return cls(_HuggingFace(tok, bos_token, eos_token, str(path)))
        if path.is_dir() and ((path / HF_FILE).is_file() or (path / "tokenizer_config.json").is_file()):
            return cls._from_pretrained_dir(path, bos_token, eos_token)
        raise OmnitokError(f"{path} is not a text tokenizer: expected an omnitok text tokenizer directory, a "
                           "SentencePiece .model file, a tokenizer.json, or a Hugging Face model directory")

    @classmethod
    def _from_pretrained_dir(cls, path: Path, bos_token: str | None, eos_token: str | None) -> TextTokenizer:
        from transformers import AutoTokenizer  # slow import; only this path needs it

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types for unreadable directories
            raise OmnitokError(f"cannot load the tokenizer in {path}: {e}") from None
        if not getattr(hf, "is_fast", False):
            raise OmnitokError(f"{path} gives a slow (Python) tokenizer; omnitok needs a fast one (tokenizer.json)")
        bos = bos_token if bos_token is not None else hf.bos_token
        eos = eos_token if eos_token is not None else hf.eos_token
        template = hf.chat_template.get("default") if isinstance(hf.chat_template, dict) else hf.chat_template
        chat = None if not template else {
            "template": template,  # rendered later in transformers' sandbox, with the tokens the LLM declares
            "tokens": {k: v for k, v in hf.special_tokens_map.items() if isinstance(v, str)}}
        return cls(_HuggingFace(hf.backend_tokenizer, bos, eos, str(path), chat))

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.backend}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"fingerprint={self.fingerprint[:12]})")



class TextStream:
    """Text ids in one at a time, text out as soon as it is final: ``push(id)`` returns what the new id adds (often
    "", while a character's bytes are still arriving), ``flush()`` what is still held back (at the end of a text
    segment). The pieces joined are ``decode`` of all the ids.

    A piece's text can depend on its neighbours (SentencePiece drops the leading space of the first piece it decodes;
    byte-fallback and byte-level pieces carry parts of one character), so each push decodes the ids from the last
    emitted piece's start ("prefix") twice: up to the ids already emitted and to the end, and emits the difference
    once it does not end in an unfinished character (U+FFFD). Each push decodes a few ids, not the whole answer so
    far: a long answer costs O(n), not O(n^2), of the server's event loop. (Text generation servers use the same
    two offsets.)"""

    def __init__(self, tok: TextTokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # the ids before it were emitted, and no later text can change theirs
        self.read = 0  # the ids before it were emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._new(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes as U+FFFD, as ``decode`` would give it); the
        stream starts afresh."""
        if not self.ids:
            return ""
        out = self._new(final=True)
        self.ids, self.prefix, self.read = [], 0, 0
        return out

    def _new(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]
