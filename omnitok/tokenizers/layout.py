"""The token layout: the one place that decides which global id means what.

Every other module asks the layout for ids; none does offset arithmetic of its own (as
Chameleon's ``inference/vocab.py``; docs/ARCHITECTURE.md, Token layout). The vocabulary is laid out in this order::

    [0, T)                text ids, exactly the text tokenizer's ids (bos/eos included)
    [T, S)                specials: <|pad|>, then <|boi|> <|eoi|> <|rows_1..G|> <|cols_1..G|> when there is an
                          image modality, then <|boa|> <|eoa|> when there is an audio modality
    [I, I + K)            image codes
    [A_q, A_q + C_q)      audio codes of codebook q, for q in [0, n_q), one after another (A_0 = I + K,
                          A_{q+1} = A_q + C_q); the codebooks' sizes C_q need not be equal
    [E, E + 4)            with ``chat``: <|system|> <|user|> <|assistant|> <|eot|> (special ids, after every code so
                          that a layout with them keeps every id of the same layout without them)
    [E + 4 or E, V)       reserved: padding of the vocabulary to a multiple of 64 (for the model's matmuls);
                          no id here belongs to any modality

All code <-> id maps are vectorised and accept numpy arrays or torch tensors, returning the same kind.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from omnitok.document import ROLES
from omnitok.errors import LayoutMismatch, MalformedSequence, OmnitokError
from omnitok.jsonfile import read_json_object, write_json_atomic

Array = TypeVar("Array", np.ndarray, torch.Tensor)

LAYOUT_FILE = "layout.json"
FORMAT = "omnitok.layout"
VERSION = 2  # 2: audio codebook sizes per codebook and the codec's frame rate (1: one size for every codebook)


class Modality(IntEnum):
    """What an id is. The order is the order of the ranges in the vocabulary."""

    TEXT = 0
    SPECIAL = 1
    IMAGE = 2
    AUDIO = 3
    RESERVED = 4

    @property
    def label(self) -> str:
        """The name used in files, metrics and span records: ``text``, ``special``, ``image``, ``audio``."""
        return self.name.lower()


# The kinds of id that are counted (shard manifests) and reported (training metrics): every modality but RESERVED.
TOKEN_KINDS = tuple(m.label for m in Modality if m is not Modality.RESERVED)
# The kinds of segment a document holds (a span's ``modality``); each media kind has a tokenizer fingerprint.
MODALITY_NAMES = (Modality.TEXT.label, Modality.IMAGE.label, Modality.AUDIO.label)
# The label of a position that predicts nothing (padding, a packed document's last token): transformers' convention.
IGNORE = -100
# An image span is <|boi|> <|rows_R|> <|cols_C|>, R x C codes, <|eoi|>: codes begin this many ids after <|boi|>.
IMAGE_HEADER = 3


def image_span_length(rows: int, cols: int) -> int:
    """Ids in the span of a ``rows`` x ``cols`` image, its four markers included."""
    return IMAGE_HEADER + rows * cols + 1


class Span(NamedTuple):
    """Where one segment lies in an id sequence: ``ids[start:stop]``, media markers included. Stored as the plain
    list ``[modality, start, stop]`` (shard metadata, the training stream's saved position)."""

    modality: str
    start: int
    stop: int


def _bounds(x: np.ndarray | torch.Tensor) -> tuple[int, int] | None:
    """(min, max) of a numpy array or tensor as Python ints, or None when it is empty."""
    empty = x.size == 0 if isinstance(x, np.ndarray) else x.numel() == 0
    if empty:
        return None
    return int(x.min()), int(x.max())


def _check_in(x: np.ndarray | torch.Tensor, lo: int, hi: int, what: str) -> None:
    b = _bounds(x)
    if b is not None and (b[0] < lo or b[1] >= hi):
        bad = b[0] if b[0] < lo else b[1]
        raise OmnitokError(f"{what}: value {bad} is outside [{lo}, {hi})")


def _as_index_array(x: Any) -> np.ndarray | torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise OmnitokError(f"expected integer codes or ids, got a {x.dtype} tensor")
        return x
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise OmnitokError(f"expected integer codes or ids, got an array of {a.dtype}")
    return a.astype(np.int64, copy=False)


@dataclass(frozen=True)
class TokenLayout:
    """Id ranges of one vocabulary, built from the sizes of its tokenizers.

    ``image_codebook_size=0`` (and no ``audio_codebook_sizes``) means the layout has no such modality and none of
    its special tokens. ``audio_codebook_sizes`` are the audio codec's codebooks in frame order and
    ``audio_frame_rate`` its frames per second (0 only in a layout read from a version 1 file, which did not record
    it: ``with_audio_frame_rate`` fills it in from the codec). ``fingerprints`` maps a modality name to the sha256
    of the tokenizer the ids came from.
    """

    text_vocab_size: int
    image_codebook_size: int = 0
    max_grid_side: int = 0
    audio_codebook_sizes: tuple[int, ...] = ()
    audio_frame_rate: float = 0.0
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    pad_to_multiple: int = 64
    chat: bool = False  # the role markers of conversations: <|system|> <|user|> <|assistant|> and <|eot|>

    def __post_init__(self) -> None:
        for name in ("text_vocab_size", "image_codebook_size", "max_grid_side", "pad_to_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise OmnitokError(f"token layout: {name} must be a non-negative integer, got {value!r}")
        if self.text_vocab_size < 1:
            raise OmnitokError("token layout: text_vocab_size must be at least 1")
        if not isinstance(self.chat, bool):
            raise OmnitokError(f"token layout: chat must be true or false, got {self.chat!r}")
        if self.pad_to_multiple < 1:
            raise OmnitokError("token layout: pad_to_multiple must be at least 1")
        if (self.image_codebook_size == 0) != (self.max_grid_side == 0):
            raise OmnitokError("token layout: image_codebook_size and max_grid_side must both be set or both be 0 "
                               f"(got {self.image_codebook_size} and {self.max_grid_side})")
        sizes = self.audio_codebook_sizes
        if not isinstance(sizes, list | tuple) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise OmnitokError(f"token layout: audio_codebook_sizes must be a list of positive integers, got {sizes!r}")
        object.__setattr__(self, "audio_codebook_sizes", tuple(sizes))
        rate = self.audio_frame_rate
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not math.isfinite(rate) or rate < 0 \
                or (rate > 0 and not sizes):
            raise OmnitokError(f"token layout: audio_frame_rate must be a non-negative number, and 0 without audio "
                               f"codebooks; got {rate!r}")
        object.__setattr__(self, "audio_frame_rate", float(rate))
        unknown = set(self.fingerprints) - set(MODALITY_NAMES)
        if unknown:
            raise OmnitokError(f"token layout: fingerprints for unknown modalities {sorted(unknown)}; "
                               f"known: {list(MODALITY_NAMES)}")
        object.__setattr__(self, "fingerprints", dict(self.fingerprints))

        names = ["<|pad|>"]
        if self.has_image:
            names += ["<|boi|>", "<|eoi|>"]
            names += [f"<|rows_{r}|>" for r in range(1, self.max_grid_side + 1)]
            names += [f"<|cols_{c}|>" for c in range(1, self.max_grid_side + 1)]
        if self.has_audio:
            names += ["<|boa|>", "<|eoa|>"]
        specials = {name: self.text_vocab_size + i for i, name in enumerate(names)}
        image_offset = self.text_vocab_size + len(names)
        audio_offset = image_offset + self.image_codebook_size
        starts = np.concatenate([[0], np.cumsum(self.audio_codebook_sizes, dtype=np.int64)]) + audio_offset
        codes_end = int(starts[-1])
        # The chat markers come after every code, so a layout with them keeps every id of the same layout without
        # them: a base model pretrained on the one is fine-tuned on the other with the same rows.
        chat = [f"<|{role}|>" for role in ROLES] + ["<|eot|>"] if self.chat else []
        specials.update({name: codes_end + i for i, name in enumerate(chat)})
        used = codes_end + len(chat)
        vocab = -(-used // self.pad_to_multiple) * self.pad_to_multiple
        object.__setattr__(self, "_specials", specials)
        object.__setattr__(self, "_special_names", {i: n for n, i in specials.items()})
        object.__setattr__(self, "_image_offset", image_offset)
        object.__setattr__(self, "_audio_offset", audio_offset)
        object.__setattr__(self, "_audio_starts", starts)  # codebook q's ids: [starts[q], starts[q + 1])
        object.__setattr__(self, "_used", used)
        object.__setattr__(self, "_codes_end", codes_end)
        object.__setattr__(self, "_vocab", vocab)
        # Upper ends of the ranges in Modality order; searchsorted(side="right") maps an id to its Modality (the chat
        # markers after the codes are special ids too: modality_of says so).
        object.__setattr__(self, "_ends", np.array([self.text_vocab_size, image_offset, audio_offset, codes_end],
                                                   dtype=np.int64))

    # ---------------------------------------------------------------- sizes and ranges

    @property
    def has_image(self) -> bool:
        return self.image_codebook_size > 0

    @property
    def has_audio(self) -> bool:
        return bool(self.audio_codebook_sizes)

    @property
    def audio_num_codebooks(self) -> int:
        """Codes per audio frame (0 without audio)."""
        return len(self.audio_codebook_sizes)

    @property
    def vocab_size(self) -> int:
        """Size of the model's embedding table: every range, padded up to a multiple of ``pad_to_multiple``."""
        return self._vocab

    @property
    def used_vocab_size(self) -> int:
        """Ids below this belong to a modality; ids from here to ``vocab_size`` are reserved padding."""
        return self._used

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open ``[start, stop)`` of every range, in vocabulary order; they are disjoint and cover the vocab."""
        return {
            "text": (0, self.text_vocab_size),
            "special": (self.text_vocab_size, self._image_offset),
            "image": (self._image_offset, self._audio_offset),
            "audio": (self._audio_offset, self._codes_end),
            **({"chat": (self._codes_end, self._used)} if self.chat else {}),  # role markers: special ids
            "reserved": (self._used, self._vocab),
        }

    def audio_range(self, q: int) -> tuple[int, int]:
        """``[start, stop)`` of codebook ``q``'s ids."""
        self._need_audio()
        if not 0 <= q < self.audio_num_codebooks:
            raise OmnitokError(f"audio codebook {q} does not exist; the layout has {self.audio_num_codebooks}")
        return int(self._audio_starts[q]), int(self._audio_starts[q + 1])

    def audio_frames(self, seconds: float) -> int:
        """Audio frames in ``seconds`` of sound (rounded up) at the codec's frame rate."""
        self._need_audio()
        if not self.audio_frame_rate:
            raise OmnitokError("this token layout does not record the audio codec's frame rate (a version 1 "
                               "layout.json); load it with its tokenizer directory, which fills it in")
        return max(1, math.ceil(seconds * self.audio_frame_rate - 1e-9))

    def with_audio_frame_rate(self, rate: float) -> TokenLayout:
        """This layout with the codec's frame rate recorded (a version 1 layout did not; any other must agree)."""
        if self.audio_frame_rate in (0.0, rate):
            return dataclasses.replace(self, audio_frame_rate=rate)
        raise LayoutMismatch(f"the audio codec runs at {rate:g} frames/s, but the layout records "
                             f"{self.audio_frame_rate:g}")

    # ---------------------------------------------------------------- special tokens

    @property
    def specials(self) -> dict[str, int]:
        return dict(self._specials)

    def special_id(self, name: str) -> int:
        try:
            return self._specials[name]
        except KeyError:
            known = ", ".join(n for n in self._specials if "_" not in n.strip("<|>")) or "none"
            raise OmnitokError(f"unknown special token {name!r}; this layout has {known}"
                               + (f", and <|rows_R|>/<|cols_C|> for R, C in 1..{self.max_grid_side}"
                                  if self.has_image else "")) from None

    def special_name(self, token_id: int) -> str:
        try:
            return self._special_names[int(token_id)]
        except KeyError:
            raise OmnitokError(f"id {token_id} is not a special token") from None

    @property
    def pad_id(self) -> int:
        return self._specials["<|pad|>"]

    @property
    def boi_id(self) -> int:
        self._need_image()
        return self._specials["<|boi|>"]

    @property
    def eoi_id(self) -> int:
        self._need_image()
        return self._specials["<|eoi|>"]

    @property
    def boa_id(self) -> int:
        self._need_audio()
        return self._specials["<|boa|>"]

    @property
    def eoa_id(self) -> int:
        self._need_audio()
        return self._specials["<|eoa|>"]

    def role_id(self, role: str) -> int:
        """The marker that opens a ``role`` turn of a conversation (``system``, ``user``, ``assistant``)."""
        self.need_chat()
        if role not in ROLES:
            raise OmnitokError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return self._specials[f"<|{role}|>"]

    @property
    def eot_id(self) -> int:
        """The marker that ends every turn of a conversation."""
        self.need_chat()
        return self._specials["<|eot|>"]

    def rows_id(self, rows: int) -> int:
        self._need_image()
        if not 1 <= rows <= self.max_grid_side:
            raise OmnitokError(f"image grid of {rows} rows is outside 1..{self.max_grid_side} (max_grid_side)")
        return self._specials[f"<|rows_{rows}|>"]

    def cols_id(self, cols: int) -> int:
        self._need_image()
        if not 1 <= cols <= self.max_grid_side:
            raise OmnitokError(f"image grid of {cols} columns is outside 1..{self.max_grid_side} (max_grid_side)")
        return self._specials[f"<|cols_{cols}|>"]

    def rows_of(self, token_id: int) -> int:
        """Inverse of ``rows_id``: the grid height a ``<|rows_R|>`` id stands for."""
        first = self.rows_id(1)
        if not first <= token_id < first + self.max_grid_side:
            raise MalformedSequence(f"expected a <|rows_R|> token, got {self.describe_id(token_id)}")
        return int(token_id) - first + 1

    def cols_of(self, token_id: int) -> int:
        first = self.cols_id(1)
        if not first <= token_id < first + self.max_grid_side:
            raise MalformedSequence(f"expected a <|cols_C|> token, got {self.describe_id(token_id)}")
        return int(token_id) - first + 1

    def grid_sides(self, ids: Array) -> tuple[Array, Array]:
        """Vectorised ``rows_of`` / ``cols_of``: the grid side each id stands for as a ``<|rows_R|>`` and as a
        ``<|cols_C|>`` token, 0 where it is not one."""
        r, c, g = self.rows_id(1), self.cols_id(1), self.max_grid_side
        where = torch.where if isinstance(ids, torch.Tensor) else np.where
        return where((ids >= r) & (ids < r + g), ids - r + 1, 0), where((ids >= c) & (ids < c + g), ids - c + 1, 0)

    # ---------------------------------------------------------------- modality of ids

    def token_counts(self, ids: np.ndarray) -> dict[str, int]:
        """How many of ``ids`` are of each kind (``TOKEN_KINDS``: text, special, image, audio)."""
        kinds = np.bincount(self.modality_of(ids), minlength=len(Modality))
        return {m: int(kinds[Modality[m.upper()]]) for m in TOKEN_KINDS}

    def modality_of(self, ids: Array) -> Array:
        """Modality code (``Modality`` values) of every id; ids outside ``[0, vocab_size)`` are refused."""
        ids = _as_index_array(ids)
        _check_in(ids, 0, self._vocab, f"token ids (vocab_size {self._vocab})")
        if isinstance(ids, torch.Tensor):
            kind = torch.bucketize(ids, torch.as_tensor(self._ends, device=ids.device), right=True)
        else:
            kind = np.searchsorted(self._ends, ids, side="right")
        if not self.chat:
            return kind
        markers = (ids >= self._codes_end) & (ids < self._used)  # after the codes, but special ids
        return torch.where(markers, int(Modality.SPECIAL), kind) if isinstance(ids, torch.Tensor) else \
            np.where(markers, int(Modality.SPECIAL), kind)

    def check_text(self, ids: Array) -> Array:
        """Return ``ids`` after checking that every one is a text id."""
        ids = _as_index_array(ids)
        _check_in(ids, 0, self.text_vocab_size, "text ids")
        return ids

    # ---------------------------------------------------------------- image codes

    def image_ids(self, codes: Array) -> Array:
        """Image codebook indices -> global ids (any shape)."""
        self._need_image()
        codes = _as_index_array(codes)
        _check_in(codes, 0, self.image_codebook_size, "image codes")
        return codes + self._image_offset

    def image_codes(self, ids: Array) -> Array:
        """Global ids -> image codebook indices; refuses ids that are not image codes."""
        self._need_image()
        ids = _as_index_array(ids)
        _check_in(ids, self._image_offset, self._audio_offset, "image code ids")
        return ids - self._image_offset

    # ---------------------------------------------------------------- audio codes

    def _per_codebook(self, values: np.ndarray, like: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return torch.as_tensor(values, device=like.device) if isinstance(like, torch.Tensor) else values

    def audio_ids(self, codes: Array) -> Array:
        """Codes ``(n_q, frames)`` -> 1-D global ids, frame-major: ``f0q0 f0q1 .. f0q(n-1) f1q0 ..``."""
        self._need_audio()
        codes = _as_index_array(codes)
        if codes.ndim != 2 or codes.shape[0] != self.audio_num_codebooks:
            raise OmnitokError(f"audio codes must have shape (n_q={self.audio_num_codebooks}, frames), "
                               f"got {tuple(codes.shape)}")
        _check_in(codes, 0, max(self.audio_codebook_sizes), "audio codes")
        sizes = np.asarray(self.audio_codebook_sizes)
        over = codes >= self._per_codebook(sizes, codes)[:, None]
        if bool(over.any()):
            q = int(over.nonzero()[0][0]) if isinstance(over, np.ndarray) else int(over.nonzero()[0, 0])
            raise OmnitokError(f"audio codes: codebook {q} has {sizes[q]} codes, got {int(codes[q].max())}")
        ids = codes + self._per_codebook(self._audio_starts[:-1], codes)[:, None]  # (n_q, F)
        return ids.T.reshape(-1)  # (F * n_q,) frame-major

    def audio_codes(self, ids: Array) -> Array:
        """Inverse of ``audio_ids``: 1-D frame-major ids -> codes ``(n_q, frames)``.

        Refuses a length that is not a multiple of ``n_q`` and any id whose codebook is not the one its position
        in the frame calls for.
        """
        self._need_audio()
        ids = _as_index_array(ids)
        n_q = self.audio_num_codebooks
        if ids.ndim != 1:
            raise OmnitokError(f"audio ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.shape[0] % n_q:
            raise MalformedSequence(f"audio span of {ids.shape[0]} ids is not a whole number of frames "
                                    f"({n_q} codebooks per frame)")
        _check_in(ids, self._audio_offset, self._codes_end, "audio code ids")
        position = torch.arange(ids.shape[0], device=ids.device) if isinstance(ids, torch.Tensor) \
            else np.arange(ids.shape[0])
        if isinstance(ids, torch.Tensor):
            book = torch.bucketize(ids, torch.as_tensor(self._audio_starts[1:], device=ids.device), right=True)
        else:
            book = np.searchsorted(self._audio_starts[1:], ids, side="right")
        wrong = book != position % n_q
        if bool(wrong.any()):
            first = int(wrong.nonzero()[0][0]) if isinstance(wrong, np.ndarray) else int(wrong.nonzero()[0, 0])
            got = int(book[first])
            raise MalformedSequence(f"audio id at position {first} (frame {first // n_q}) belongs to codebook {got}, "
                                    f"but that position holds codebook {first % n_q}")
        frames = ids.reshape(-1, n_q).T  # (n_q, F)
        return frames - self._per_codebook(self._audio_starts[:-1], ids)[:, None]

    # ---------------------------------------------------------------- fingerprints and comparison

    def with_fingerprints(self, **fingerprints: str) -> TokenLayout:
        return dataclasses.replace(self, fingerprints={**self.fingerprints, **fingerprints})

    def check_fingerprint(self, modality: str, fingerprint: str, source: str) -> None:
        """Refuse a tokenizer whose fingerprint is not the one this layout was made with."""
        expected = self.fingerprints.get(modality)
        if expected is None:
            raise LayoutMismatch(f"layout.json records no {modality} tokenizer, but {source} provides one")
        if expected != fingerprint:
            raise LayoutMismatch(f"{modality} tokenizer at {source} has fingerprint {fingerprint}, but layout.json was "
                                 f"made with {expected}; ids made with one are wrong for the other")

    def check_same(self, other: TokenLayout, mine: str, theirs: str) -> None:
        """Refuse ``other`` unless it is the same layout (sizes and fingerprints); the message names the difference.
        An audio frame rate that one of them does not record (a version 1 file) is taken as the other's: it names
        no id."""
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "audio_frame_rate" and not (a and b):
                continue
            if a != b:
                raise LayoutMismatch(f"the token layout of {theirs} differs from that of {mine}: {f.name} is {b!r} "
                                     f"there and {a!r} here")

    def check_reads(self, written: TokenLayout, mine: str, theirs: str) -> None:
        """Refuse ids written under ``written`` (shards, a model's rows) unless they mean the same here: the same
        layout (``check_same``), or the same layout without the chat markers this one adds (they sit after every
        code)."""
        if self.chat and not written.chat:
            written = dataclasses.replace(written, chat=True)
        self.check_same(written, mine, theirs)

    def added_ids(self, base: TokenLayout | None) -> list[int]:
        """The ids this layout uses that a model trained on ``base`` never learned: the chat markers when ``base`` is
        this layout without them (``check_reads`` holds), or every non-text id when ``base`` is None (a text LLM)."""
        if base is None:
            return list(range(self.text_vocab_size, self._used))
        self.check_reads(base, "this tokenizer", "the base model")
        return list(range(base.used_vocab_size, self._used))

    # ---------------------------------------------------------------- file form

    def to_json(self) -> dict[str, Any]:
        """The ``layout.json`` contents: parameters, then the derived tables for readers in other languages."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "text_vocab_size": self.text_vocab_size,
            "image_codebook_size": self.image_codebook_size,
            "max_grid_side": self.max_grid_side,
            "audio_codebook_sizes": list(self.audio_codebook_sizes),
            "audio_frame_rate": self.audio_frame_rate,
            "pad_to_multiple": self.pad_to_multiple,
            **({"chat": True} if self.chat else {}),  # absent in layouts without chat markers (and older files)
            "fingerprints": dict(sorted(self.fingerprints.items())),
            "vocab_size": self.vocab_size,
            "ranges": {name: list(r) for name, r in self.ranges.items()},
            "specials": self.specials,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "layout") -> TokenLayout:
        """Rebuild a layout, refusing unknown keys and derived tables that disagree with the parameters."""
        if data.get("format") != FORMAT:
            raise OmnitokError(f"{source} is not an omnitok token layout (format is {data.get('format')!r})")
        if data.get("version") == 1:
            data = _from_version_1(data)
        if data.get("version") != VERSION:
            raise OmnitokError(f"{source} has layout version {data.get('version')!r}; this omnitok reads 1 and "
                               f"{VERSION}")
        params = {f.name for f in dataclasses.fields(cls)}
        derived = {"format", "version", "vocab_size", "ranges", "specials"}
        unknown = set(data) - params - derived
        if unknown:
            raise OmnitokError(f"{source}: unknown key {sorted(unknown)[0]!r}")
        _check_ranges(data.get("ranges", {}), data.get("vocab_size"), source)
        _check_specials(data.get("specials", {}), data.get("ranges", {}), source)
        layout = cls(**{k: v for k, v in data.items() if k in params})
        rebuilt = layout.to_json()
        for key in sorted(derived):
            if key in data and data[key] != rebuilt[key]:
                raise OmnitokError(f"{source}: stored {key!r} does not follow from its sizes "
                                   f"(stored {data[key]!r}, sizes give {rebuilt[key]!r})")
        return layout

    def save(self, path: str | Path) -> Path:
        """Write ``layout.json`` (``path`` may be the file or its directory)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / LAYOUT_FILE
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenLayout:
        """Read ``layout.json`` (``path`` may be the file or its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / LAYOUT_FILE
        data = read_json_object(path, f"no token layout at {path}")
        return cls.from_json(data, source=str(path))

    def describe(self) -> str:
        """A few human-readable lines: ranges and fingerprints."""
        lines = [f"vocab_size {self.vocab_size} ({self.used_vocab_size} used)"]
        for name, (start, stop) in self.ranges.items():
            extra = ""
            if name == "audio" and self.has_audio:
                sizes = self.audio_codebook_sizes
                books = f"{len(sizes)} codebooks x {sizes[0]}" if len(set(sizes)) == 1 else \
                    f"codebooks of {', '.join(map(str, sizes))}"
                rate = f", {self.audio_frame_rate:g} frames/s" if self.audio_frame_rate else ""
                extra = f"  ({books}{rate})"
            if name == "special":
                extra = f"  ({stop - start} tokens)"
            lines.append(f"  {name:<8} [{start}, {stop}){extra}")
        for modality, fp in sorted(self.fingerprints.items()):
            lines.append(f"  {modality} tokenizer {fp}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- helpers

    def _need_image(self) -> None:
        if not self.has_image:
            raise OmnitokError("this token layout has no image modality")

    def need_chat(self) -> None:
        """Refuse, in one line, a layout without the chat markers conversations need."""
        if not self.chat:
            raise OmnitokError("this token layout has no chat markers, so it cannot hold conversations; assemble the "
                               "tokenizer with `omnitok tokenizer assemble --chat` and fine-tune from a model on it")

    def _need_audio(self) -> None:
        if not self.has_audio:
            raise OmnitokError("this token layout has no audio modality")

    def describe_id(self, token_id: int) -> str:
        if 0 <= token_id < self._vocab:
            kind = Modality(int(self.modality_of(np.array([token_id]))[0])).label
            if kind == "special":
                return f"{self._special_names[int(token_id)]} (id {token_id})"
            return f"a {kind} id ({token_id})"
        return f"id {token_id}, outside the vocabulary"


def _from_version_1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version 1 ``layout.json`` in version 2 form: one size for every audio codebook, no frame rate (0).
    The ids it describes are the same (codebook q at ``A + q * C``), so everything written under it stays readable."""
    data = dict(data)
    size, n_q = data.pop("audio_codebook_size", 0), data.pop("audio_num_codebooks", 0)
    if not isinstance(size, int) or not isinstance(n_q, int) or (size == 0) != (n_q == 0):
        raise OmnitokError(f"token layout: audio_codebook_size and audio_num_codebooks must both be set or both be 0 "
                           f"(got {size!r} and {n_q!r})")
    data.update(version=VERSION, audio_codebook_sizes=[size] * n_q, audio_frame_rate=0.0)
    return data


def _check_ranges(ranges: Any, vocab_size: Any, source: str) -> None:
    """Stored ranges must tile ``[0, vocab_size)``: no gap, no overlap."""
    if not ranges:
        return
    if not isinstance(ranges, dict) or not all(isinstance(r, list) and len(r) == 2 for r in ranges.values()):
        raise OmnitokError(f"{source}: 'ranges' must map names to [start, stop]")
    ordered = sorted(ranges.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    position, previous = 0, None
    for name, (start, stop) in ordered:
        if stop < start:
            raise OmnitokError(f"{source}: range {name!r} [{start}, {stop}) ends before it starts")
        if start < position:
            raise OmnitokError(f"{source}: ranges {previous!r} and {name!r} overlap at id {start}")
        if start > position:
            raise OmnitokError(f"{source}: ids [{position}, {start}) belong to no range (after {previous!r})")
        position, previous = stop, name
    if vocab_size is not None and position != vocab_size:
        raise OmnitokError(f"{source}: ranges end at {position}, but vocab_size is {vocab_size}")


def _check_specials(specials: Any, ranges: Any, source: str) -> None:
    if not specials:
        return
    ids = list(specials.values())
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        names = [n for n, i in specials.items() if i == dup]
        raise OmnitokError(f"{source}: special tokens {names} share id {dup}")
    if isinstance(ranges, dict) and "special" in ranges:
        inside = [ranges[k] for k in ("special", "chat") if k in ranges]
        for name, i in specials.items():
            if not any(start <= i < stop for start, stop in inside):
                start, stop = ranges["special"]
                raise OmnitokError(f"{source}: special token {name!r} has id {i}, outside the special range "
                                   f"[{start}, {stop})")
