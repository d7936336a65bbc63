"""The per-item work both ``omnitok tokenize`` engines share (ARCHITECTURE.md, Offline tokenization): an item's media
read and preprocessed (``Preprocessor`` -> ``Prepared``, no models), a run of prepared items through the tokenizers
(``encode_prepared`` -> ``Outcome``s), and the countable reason of an error."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from omnitok.data.readers import Item
from omnitok.data.shards import sample_meta
from omnitok.document import Audio, Conversation, Document, Image, Text, Turn
from omnitok.errors import OmnitokError
from omnitok.tokenizers.multimodal import MultimodalTokenizer

WORKER_DIED = "a worker died preparing this item"  # its process ended (a crash in a decoder, the OOM killer)


@dataclass
class Outcome:
    """One item's result: the sample to write (ids and ``meta.json``), or why the item was left out."""

    index: int
    key: str
    source: str
    ids: np.ndarray | None = None
    meta: dict | None = None
    error: str | None = None
    reason: str | None = None


@dataclass
class Prepared:
    """An item with its media read and preprocessed (``doc``), or the error that stopped it; without the raw bytes."""

    index: int
    key: str
    source: str
    names: list[str]  # the item's media paths and its source: what error messages name first
    doc: Document | Conversation | None = None
    error: str | None = None

    @classmethod
    def worker_died(cls, job: tuple[int, Item], detail: str = "") -> Prepared:
        """The item whose preparing process died (probed alone, it died again)."""
        index, item = job
        return cls(index, item.key, item.source, [item.source], error=f"{item.source}: {WORKER_DIED}{detail}")

    def failed(self, message: str) -> Outcome:
        return Outcome(self.index, self.key, self.source, error=message, reason=_reason(message, self.names))


def encode_prepared(tok: MultimodalTokenizer, batch: list[Prepared], loss_on: str) -> list[Outcome]:
    """The outcomes of a run of prepared items, in order. The good documents go through the tokenizers as one batch
    (each kind once); a batch that fails is retried a document at a time, so only the one that broke it is lost."""

    def encode_all(docs: list) -> list:
        convs = [d for d in docs if isinstance(d, Conversation)]
        plain = iter(tok.encode_batch([d for d in docs if not isinstance(d, Conversation)]))
        chats = iter(tok.encode_conversations(convs, loss_on) if convs else [])
        return [next(chats) if isinstance(d, Conversation) else next(plain) for d in docs]

    good = [p for p in batch if p.error is None]
    try:
        encoded: list = encode_all([p.doc for p in good])
    except OmnitokError:
        encoded = []
        for p in good:
            try:
                encoded.extend(encode_all([p.doc]))
            except OmnitokError as e:
                encoded.append(str(e))
    results = dict(zip([p.index for p in good], encoded))
    out = []
    for p in batch:
        enc = results.get(p.index, p.error)
        if isinstance(enc, str):
            out.append(p.failed(enc))
        else:
            out.append(Outcome(p.index, p.key, p.source, enc.ids, sample_meta(enc, p.source)))
    return out


def prepare_all(prepare: Preprocessor, jobs: list[tuple[int, Item]]) -> list[Prepared]:
    """A run of items prepared in one task (a worker process, a Ray task)."""
    return [prepare(job) for job in jobs]


@dataclass
class Preprocessor:
    """What a worker needs to prepare media: sizes and rates only, no models (cheap to send to processes)."""

    image: dict | None  # ImagePreprocessConfig fields and the downsampling factor
    audio: tuple[int, int] | None  # sample rate, channels

    @classmethod
    def of(cls, tok: MultimodalTokenizer) -> Preprocessor:
        """The sizes and rates of ``tok``'s media tokenizers."""
        image = None
        if tok.image is not None:
            image = {**asdict(tok.image.preprocess_config), "multiple": tok.image.downsample}
        return cls(image, (tok.audio.sample_rate, tok.audio.channels) if tok.audio is not None else None)

    def __call__(self, job: tuple[int, Item]) -> Prepared:
        index, item = job
        names = [str(seg.source) for seg in (item.doc.segments if item.doc is not None else [])
                 if isinstance(seg, Image | Audio) and isinstance(seg.source, str | Path)] + [item.source]
        done = Prepared(index, item.key, item.source, names)
        if item.error is not None:
            done.error = item.error
            return done
        try:
            done.doc = self.prepare(item.doc)
        except OmnitokError as e:
            done.error = str(e)
        except Exception as e:  # a worker must never take the job down; the item is recorded with the reason
            done.error = f"unexpected {type(e).__name__}: {e}"
        return done

    def prepare(self, doc: Document | Conversation) -> Document | Conversation:
        """The document (or each turn of the conversation) with its media read and preprocessed."""
        if isinstance(doc, Conversation):
            return Conversation([Turn(t.role, self.segments(t.segments)) for t in doc.turns], doc.id)
        segments = self.segments(doc.segments)
        if not any(not isinstance(s, Text) or s.text for s in segments):
            raise OmnitokError("empty document")
        return Document(segments, doc.id)

    def segments(self, given: list) -> list:
        from omnitok.tokenizers.audio import load_audio
        from omnitok.tokenizers.image import ImagePreprocessConfig, prepare_image

        segments = []
        for seg in given:
            if isinstance(seg, Text):
                if not isinstance(seg.text, str):
                    raise OmnitokError("text segment is not a string")
                segments.append(seg)
            elif isinstance(seg, Image):
                if self.image is None:
                    raise OmnitokError("document has an image but the tokenizer has no image tokenizer")
                cfg = ImagePreprocessConfig(**{k: v for k, v in self.image.items() if k != "multiple"})
                segments.append(Image(prepare_image(seg.source, cfg, self.image["multiple"])))
            elif isinstance(seg, Audio):
                if self.audio is None:
                    raise OmnitokError("document has audio but the tokenizer has no audio tokenizer")
                rate, channels = self.audio
                segments.append(Audio((load_audio(seg.source, rate, channels), rate)))
        return segments


def _reason(message: str, names: list[str]) -> str:
    """A short, countable reason: the message without the file it names first and without the details in brackets
    after it. The names are the item's own media paths and source (matched exactly, so paths with spaces are cut
    whole), else a ``<bytes>``-style name or a space-free path."""
    for name in sorted(names, key=len, reverse=True):
        if message.startswith(name + ": "):
            text = message[len(name) + 2:]
            break
    else:
        text = re.sub(r"^(<\w+>|\S*[/.\\]\S*): ", "", message)
    return re.sub(r"\s*\(.*\)$", "", text).split(";")[0].strip() or "error"
