"""Interleaved documents: an ordered list of text, image and audio segments.

Media may be given as a file path, raw file bytes, an array (uint8 ``(H, W, 3)`` for images; ``(waveform,
sample_rate)`` for audio) or a PIL image; the media tokenizers read all of these. Decoding ids gives images as
uint8 arrays and audio as ``(float32 (channels, samples), sample_rate)``.

The JSON form (one line of an interleaved JSONL corpus, OBELICS/MMC4 style) is a list of segments,
``[{"text": "..."}, {"image": "cat.png"}, {"audio": "meow.wav"}]``, or an object ``{"id": ..., "segments": [...]}``;
relative media paths are taken from the JSON file's directory.

Conversations (instruction tuning) are turns of a role and segments, read from the Hugging Face / OpenAI
``messages`` form or the LLaVA / ShareGPT ``conversations`` form, and checked (roles in order, an assistant turn, no
empty turn) before anything is tokenized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnitok.errors import OmnitokError


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True, eq=False)
class Image:
    """An image: path, file bytes, PIL image or uint8 ``(H, W, 3)`` array."""

    source: Any


@dataclass(frozen=True, eq=False)
class Audio:
    """A sound: path, file bytes, or ``(waveform, sample_rate)`` with waveform ``(samples,)`` or
    ``(channels, samples)``."""

    source: Any


@dataclass(frozen=True)
class Tokens:
    """Ids already made: text ids or one whole media span (markers included) that a model wrote or a tokenizer
    encoded earlier (a chat's history). Encoding puts them in unchanged."""

    ids: tuple[int, ...]
    modality: str  # text, image or audio


Segment = Text | Image | Audio | Tokens
_KEYS = {"text": Text, "image": Image, "audio": Audio}


@dataclass
class Document:
    segments: list[Segment] = field(default_factory=list)
    id: str | None = None

    @property
    def modalities(self) -> list[str]:
        """The kind of each segment, in order (``"text"``, ``"image"``, ``"audio"``)."""
        return [type(s).__name__.lower() for s in self.segments]

    def merged(self) -> Document:
        """The same document with empty text dropped and adjacent text segments joined.

        This is the normal form that decoding returns: ids do not remember where one text segment ended and the
        next began.
        """
        out: list[Segment] = []
        for seg in self.segments:
            if isinstance(seg, Text):
                if not seg.text:
                    continue
                if out and isinstance(out[-1], Text):
                    out[-1] = Text(out[-1].text + seg.text)
                    continue
            out.append(seg)
        return Document(out, self.id)

    @classmethod
    def from_json(cls, data: Any, base_dir: str | Path | None = None) -> Document:
        """Build a document from its JSON form (see the module docstring)."""
        doc_id = None
        if isinstance(data, dict):
            unknown = set(data) - {"id", "segments"}
            if unknown:
                raise OmnitokError(f"document: unknown key {sorted(unknown)[0]!r} (expected 'id' and 'segments')")
            doc_id, data = data.get("id"), data.get("segments")
        if not isinstance(data, list):
            raise OmnitokError("a document is a list of segments like {\"text\": ...}, {\"image\": path}")
        segments: list[Segment] = []
        for i, item in enumerate(data):
            if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in _KEYS:
                raise OmnitokError(f"segment {i} must be one of {{\"text\": str}}, {{\"image\": path}}, "
                                   f"{{\"audio\": path}}; got {item!r:.80}")
            (key, value), = item.items()
            if not isinstance(value, str):
                raise OmnitokError(f"segment {i}: {key!r} must be a string, got {type(value).__name__}")
            if key != "text" and base_dir is not None and "://" not in value:
                value = str(Path(base_dir) / value)
            segments.append(_KEYS[key](value))
        return cls(segments, None if doc_id is None else str(doc_id))


# ---------------------------------------------------------------- conversations

ROLES = ("system", "user", "assistant")  # also the order of the role markers in the token layout
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
_PLACEHOLDERS = {"<image>": Image, "<audio>": Audio}


@dataclass
class Turn:
    role: str  # system, user or assistant
    segments: list[Segment] = field(default_factory=list)


@dataclass
class Conversation:
    """A conversation for instruction tuning: an optional system turn, then user and assistant turns alternating,
    starting with the user, with at least one assistant turn. Every turn holds text, image and audio segments."""

    turns: list[Turn] = field(default_factory=list)
    id: str | None = None

    @property
    def segments(self) -> list[Segment]:
        """Every turn's segments, in order (the conversation's text and media, roles aside)."""
        return [s for t in self.turns for s in t.segments]

    @property
    def last_user_segments(self) -> list[Segment]:
        """The segments of the last user turn (none without one): what a chat prompt asks now."""
        return next((t.segments for t in reversed(self.turns) if t.role == "user"), [])

    def check(self, prompt: bool = False) -> Conversation:
        """Refuse a conversation training cannot use, naming what is wrong; returns it otherwise. With ``prompt``, it
        is a request for the assistant's next turn: it must end with a user turn and need not hold an assistant
        turn."""
        if not self.turns:
            raise OmnitokError("conversation has no turns")
        roles = [t.role for t in self.turns]
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise OmnitokError(f"conversation: unknown role {unknown[0]!r} (roles are {', '.join(ROLES)})")
        body = roles[1:] if roles[0] == "system" else roles
        for i, role in enumerate(body):
            want = "user" if i % 2 == 0 else "assistant"
            if role != want:
                at = i + (len(roles) - len(body))
                raise OmnitokError(f"conversation: turn {at} is {role!r} where {want!r} belongs (an optional system "
                                   "turn first, then user and assistant alternating, starting with the user)")
        if prompt and body[-1:] != ["user"]:
            raise OmnitokError("a chat prompt must end with a user turn (the assistant answers it)")
        if not prompt and "assistant" not in body:
            raise OmnitokError("conversation has no assistant turn: there is nothing to learn from it")
        for i, turn in enumerate(self.turns):
            if not any(not isinstance(s, Text) or s.text.strip() for s in turn.segments):
                raise OmnitokError(f"conversation: turn {i} ({turn.role}) is empty")
        return self

    @classmethod
    def from_messages(cls, messages: Any, base_dir: str | Path | None = None, conv_id: Any = None,
                      prompt: bool = False) -> Conversation:
        """The Hugging Face / OpenAI chat form: ``[{"role": ..., "content": str or [parts]}]``, a part being
        ``{"type": "text", "text": ...}``, ``{"type": "image", "image"|"path"|"url": ...}``, ``{"type": "audio",
        "audio"|"path"|"url": ...}`` or OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``. Checked as
        training data, or with ``prompt`` as a chat request (``check``)."""
        if not isinstance(messages, list):
            raise OmnitokError("'messages' must be a list of {\"role\": ..., \"content\": ...}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise OmnitokError(f"message {i} must be an object with 'role' and 'content'")
            content = m["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise OmnitokError(f"message {i}: 'content' must be a string or a list of parts")
            turns.append(Turn(str(m["role"]), [_part(p, i, base_dir) for p in parts]))
        return cls(turns, None if conv_id is None else str(conv_id)).check(prompt)

    @classmethod
    def from_sharegpt(cls, record: dict, base_dir: str | Path | None = None, prompt: bool = False) -> Conversation:
        """The LLaVA / ShareGPT form: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "image":
        path or [paths], "audio": ...}``; ``<image>`` / ``<audio>`` in the values stand for the media in order. Media
        without any placeholder go before the first user text (LLaVA's convention)."""
        media = {}
        for key, kind in (("image", Image), ("audio", Audio)):
            value = record.get(key) or record.get(key + "s") or []
            media[kind] = [_media_path(v, base_dir) for v in ([value] if isinstance(value, str) else value)]
        messages = record.get("conversations")
        if not isinstance(messages, list):
            raise OmnitokError("'conversations' must be a list of {\"from\": ..., \"value\": ...}")
        placed = sum(str(m.get("value", "")).count(p) for m in messages if isinstance(m, dict) for p in _PLACEHOLDERS)
        pending = {kind: list(paths) for kind, paths in media.items()}
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise OmnitokError(f"conversation turn {i} must be an object with 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise OmnitokError(f"conversation turn {i}: unknown speaker {m['from']!r}")
            segments: list[Segment] = []
            if not placed and role == "user" and not any(t.role == "user" for t in turns):
                segments += [kind(p) for kind, paths in pending.items() for p in paths]
                pending = {kind: [] for kind in pending}
            for piece in re.split(r"(<image>|<audio>)", str(m["value"])):
                if piece in _PLACEHOLDERS:
                    kind = _PLACEHOLDERS[piece]
                    if not pending[kind]:
                        raise OmnitokError(f"conversation turn {i}: more {piece} placeholders than "
                                           f"{kind.__name__.lower()} files")
                    segments.append(kind(pending[kind].pop(0)))
                elif piece.strip():
                    segments.append(Text(piece.strip()))
            turns.append(Turn(role, segments))
        left = [k.__name__.lower() for k, v in pending.items() if v]
        if left:
            raise OmnitokError(f"conversation: more {left[0]} files than <{left[0]}> placeholders")
        return cls(turns, None if record.get("id") is None else str(record["id"])).check(prompt)


def _media_path(value: Any, base_dir: str | Path | None) -> str:
    if not isinstance(value, str):
        raise OmnitokError(f"a media reference must be a path string, got {type(value).__name__}")
    return str(Path(base_dir) / value) if base_dir is not None and "://" not in value else value


def _part(part: Any, message: int, base_dir: str | Path | None) -> Segment:
    if isinstance(part, str):
        return Text(part)
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return Text(part["text"])
    if kind == "image_url" and isinstance(part.get("image_url"), dict):
        return Image(_media_path(part["image_url"].get("url"), base_dir))
    if kind in ("image", "audio"):
        ref = next((part[k] for k in (kind, "path", "url") if k in part), None)
        return (Image if kind == "image" else Audio)(_media_path(ref, base_dir))
    raise OmnitokError(f"message {message}: a content part must be text, image or audio, got {part!r:.80}")
