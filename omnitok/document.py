"""Interleaved documents: an ordered list of text, image and audio segments.

Media may be given as a file path, raw file bytes, an array (uint8 ``(H, W, 3)`` for images; ``(waveform,
sample_rate)`` for audio) or a PIL image; the media tokenizers read all of these. Decoding ids gives images as
uint8 arrays and audio as ``(float32 (channels, samples), sample_rate)``.

The JSON form (one line of an interleaved JSONL corpus, OBELICS/MMC4 style) is a list of segments,
``[{"text": "..."}, {"image": "cat.png"}, {"audio": "meow.wav"}]``, or an object ``{"id": ..., "segments": [...]}``;
relative media paths are taken from the JSON file's directory.
"""

from __future__ import annotations

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


Segment = Text | Image | Audio
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
