"""Documents <-> one id sequence, following the templates of ARCHITECTURE.md (Sequences):

    document  = bos segment... eos
    text      = the text tokenizer's ids
    image     = <|boi|> <|rows_R|> <|cols_C|> code * (R*C, row-major) <|eoi|>
    audio     = <|boa|> frame * F <|eoa|>,  frame = n_q codes in codebook order

A tokenizer directory holds ``layout.json``, ``text/`` and, when present, ``image/`` and ``audio/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from omnitok.document import Audio, Conversation, Document, Image, Segment, Text, Tokens
from omnitok.errors import MalformedSequence, OmnitokError
from omnitok.tokenizers.chat import RESERVED, SLOT, ChatFormat, ChatTemplate, Request, request_of
from omnitok.tokenizers.layout import IMAGE_HEADER, LAYOUT_FILE, Modality, Span, TokenLayout, image_span_length
from omnitok.tokenizers.protocol import AudioCodec, ImageCodec, load_media_part
from omnitok.tokenizers.text import TextTokenizer

ID_DTYPE = np.int32  # every layout fits (checked in MultimodalTokenizer); half the bytes of int64 in shards


@dataclass
class EncodedDocument:
    ids: np.ndarray  # (L,) int32 global ids, bos ... eos
    spans: list[Span]
    loss: np.ndarray | None = None  # (L,) bool: which ids are trained as targets (conversations); None: all
    requests: list[Request] = field(default_factory=list)  # conversations: user turns dropout may drop (chat.py)


LOSS_ON = ("assistant", "all")  # a conversation's trained tokens: the assistant's turns, or every token


@dataclass
class ParsedSegment:
    """One segment of an id sequence, before media decoding: text ids, an image grid or audio codes."""

    modality: str
    span: Span
    ids: np.ndarray  # text: text ids; image: (rows, cols) codes; audio: (n_q, frames) codes


class MultimodalTokenizer:
    """Text, image and audio tokenizers under one token layout.

    ``encode(doc)`` gives the id sequence of a ``Document``; ``decode(ids)`` gives the document back (text as
    ``str``, images as uint8 ``(H, W, 3)`` arrays, audio as ``(float32 (channels, samples), sample_rate)``).
    """

    def __init__(self, layout: TokenLayout, text: TextTokenizer, image: ImageCodec | None = None,
                 audio: AudioCodec | None = None):
        if layout.vocab_size > np.iinfo(ID_DTYPE).max:
            raise OmnitokError(f"vocabulary of {layout.vocab_size} does not fit {np.dtype(ID_DTYPE).name} ids")
        if text.vocab_size > layout.text_vocab_size:
            raise OmnitokError(f"text tokenizer has {text.vocab_size} ids but the layout's text range holds "
                               f"{layout.text_vocab_size}")
        layout.check_fingerprint("text", text.fingerprint, "the text tokenizer")
        if image is not None:
            if (image.codebook_size, image.max_grid_side) != (layout.image_codebook_size, layout.max_grid_side):
                raise OmnitokError(f"image tokenizer has {image.codebook_size} codes and grids up to "
                                   f"{image.max_grid_side}; the layout has {layout.image_codebook_size} and "
                                   f"{layout.max_grid_side}")
            layout.check_fingerprint("image", image.fingerprint, "the image tokenizer")
        if audio is not None:
            if tuple(audio.codebook_sizes) != layout.audio_codebook_sizes:
                raise OmnitokError(f"audio tokenizer has codebooks of {list(audio.codebook_sizes)}; the layout has "
                                   f"{list(layout.audio_codebook_sizes)}")
            layout.check_fingerprint("audio", audio.fingerprint, "the audio tokenizer")
            layout = layout.with_audio_frame_rate(audio.frame_rate)  # a version 1 layout.json does not record it
        self.layout, self.text, self.image, self.audio = layout, text, image, audio

    @classmethod
    def build(cls, text: TextTokenizer, image: ImageCodec | None = None, audio: AudioCodec | None = None,
              text_vocab_size: int | None = None, chat: bool = False) -> MultimodalTokenizer:
        """Make the layout from the parts. ``text_vocab_size`` may exceed the text tokenizer's (an LLM whose
        embedding table is padded beyond its tokenizer keeps its rows where they are). ``chat`` adds the role
        markers conversations need, unless the text tokenizer has its own chat template: that is used instead."""
        if text_vocab_size is not None and text_vocab_size < text.vocab_size:
            raise OmnitokError(f"text_vocab_size {text_vocab_size} is smaller than the text tokenizer's "
                               f"{text.vocab_size} ids")
        fingerprints = {"text": text.fingerprint}
        if image is not None:
            fingerprints["image"] = image.fingerprint
        if audio is not None:
            fingerprints["audio"] = audio.fingerprint
        layout = TokenLayout(
            text_vocab_size=text_vocab_size or text.vocab_size,
            image_codebook_size=image.codebook_size if image is not None else 0,
            max_grid_side=image.max_grid_side if image is not None else 0,
            audio_codebook_sizes=tuple(audio.codebook_sizes) if audio is not None else (),
            audio_frame_rate=audio.frame_rate if audio is not None else 0.0,
            fingerprints=fingerprints,
            chat=chat and text.chat_template is None,
        )
        return cls(layout, text, image, audio)

    # ---------------------------------------------------------------- directory form

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        if (directory / LAYOUT_FILE).exists():
            raise OmnitokError(f"{directory} already holds a tokenizer; choose another directory or remove it "
                               "(shards and checkpoints made with it would no longer match)")
        self.text.save(directory / "text")
        if self.image is not None:
            self.image.save(directory / "image")
        if self.audio is not None:
            self.audio.save(directory / "audio")
        self.layout.save(directory / LAYOUT_FILE)  # last: a directory with layout.json is complete
        return directory

    @classmethod
    def from_dir(cls, directory: str | Path) -> MultimodalTokenizer:
        """Load a tokenizer directory; every part's fingerprint must match ``layout.json``."""
        directory = Path(directory)
        if not (directory / LAYOUT_FILE).is_file():
            raise OmnitokError(f"{directory} is not a tokenizer directory (no {LAYOUT_FILE}); make one with "
                               "`omnitok tokenizer assemble`")
        layout = TokenLayout.load(directory / LAYOUT_FILE)
        text = TextTokenizer.from_dir(directory / "text")
        image = load_media_part(directory / "image", "image") if (directory / "image").is_dir() else None
        audio = load_media_part(directory / "audio", "audio") if (directory / "audio").is_dir() else None
        for name, part in (("image", image), ("audio", audio)):
            if part is None and name in layout.fingerprints:
                raise OmnitokError(f"{directory}/layout.json records an {name} tokenizer, but {directory}/{name} "
                                   "is missing")
        return cls(layout, text, image, audio)

    # ---------------------------------------------------------------- encoding

    def encode(self, doc: Document) -> np.ndarray:
        """Document -> 1-D int32 array of global ids: ``bos segment... eos``."""
        return self.encode_batch([doc])[0].ids

    def encode_batch(self, docs: list[Document]) -> list[EncodedDocument]:
        """Encode many documents, batching all their text, images and audio through each tokenizer once.

        Adjacent text segments are joined before encoding (``Document.merged``), so the ids do not depend on where
        a text was split: tokenizers with a dummy prefix (SentencePiece, Llama) would otherwise add a space.
        """
        docs = [doc.merged() for doc in docs]
        for d, doc in enumerate(docs):
            if not doc.segments:
                raise OmnitokError(f"document {doc.id or d} is empty")
        encoded = []
        for doc, pieces in zip(docs, self._encode_parts([doc.segments for doc in docs])):
            ids, spans = [self.text.bos_id], []
            for modality, piece in pieces:
                spans.append(Span(modality, len(ids), len(ids) + len(piece)))
                ids.extend(piece.tolist())
            ids.append(self.text.eos_id)
            encoded.append(EncodedDocument(np.array(ids, dtype=ID_DTYPE), spans))
        return encoded

    @cached_property
    def chat(self) -> ChatFormat | None:
        """How this tokenizer writes conversations (``chat.py``): the layout's role markers, or else the text
        tokenizer's own chat template; None when it has neither."""
        if self.layout.chat:
            return ChatFormat("markers", self.layout.eot_id, (self.text.bos_id, self.text.eos_id))
        if self.text.chat_template is not None:
            end = ChatTemplate(self.text).end_id
            forbidden = {*self.text.special_ids, self.text.bos_id, self.text.eos_id} - {end}
            return ChatFormat("template", end, tuple(sorted(forbidden)))
        return None

    def need_chat(self) -> ChatFormat:
        """The chat format, or a one-line refusal for a tokenizer that cannot hold conversations."""
        if self.chat is None:
            raise OmnitokError("this tokenizer cannot hold conversations: its layout has no chat markers and its text "
                               "tokenizer no chat template; assemble it with `omnitok tokenizer assemble --chat` and "
                               "fine-tune from a model on it")
        return self.chat

    def encode_media(self, segments: list[Segment]) -> list[Segment]:
        """The segments with each image and sound replaced by its ids (``Tokens``), e.g. to keep a chat's history
        without encoding its media again."""
        media = [s for s in segments if isinstance(s, Image | Audio)]
        pieces = iter(self._encode_parts([media])[0])
        return [Tokens(tuple(next(pieces)[1].tolist()), "image" if isinstance(s, Image) else "audio")
                if isinstance(s, Image | Audio) else s for s in segments]

    def encode_conversations(self, conversations: list[Conversation], loss_on: str = "assistant",
                             prompt: bool = False) -> list[EncodedDocument]:
        """Conversations -> ids with a loss mask and requests (``chat.py``), in this tokenizer's chat format: with
        ``loss_on`` "assistant" the assistant turns' ids (media spans included) and what ends them (``<|eot|>``, or
        the template's end of turn) are trained, so the model learns to answer and to end its turn, and nothing the
        user or system wrote is; "all" trains every id but the first. Each turn's text is joined as in
        ``encode_batch``; the whole batch's media go through each tokenizer once.

        With ``prompt`` each conversation ends with a user turn and is encoded as the request for the next answer:
        it ends where the assistant's answer begins (``<|assistant|>``; the template's generation prompt)."""
        if loss_on not in LOSS_ON:
            raise OmnitokError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        chat = self.need_chat()
        turns = [[s for s in Document(t.segments).merged().segments if not (isinstance(s, Tokens) and not s.ids)]
                 for c in conversations for t in c.check(prompt).turns]
        if chat.kind == "markers":
            return self._encode_with_markers(conversations, turns, loss_on, prompt)
        return self._encode_with_template(conversations, turns, loss_on, prompt)

    def _encode_with_markers(self, conversations: list[Conversation], turns: list[list[Segment]], loss_on: str,
                             prompt: bool) -> list[EncodedDocument]:
        """``bos, (<|role|> segment... <|eot|>)..., eos`` (a prompt ends ``<|assistant|>`` instead of eos)."""
        layout = self.layout
        parts, segments = iter(self._encode_parts(turns, literal=True)), iter(turns)
        encoded = []
        for conv in conversations:
            ids, loss, spans, requests = [self.text.bos_id], [False], [], []
            conv_segments = [next(segments) for _ in conv.turns]
            for i, turn in enumerate(conv.turns):
                trained = loss_on == "all" or turn.role == "assistant"
                ids.append(layout.role_id(turn.role))
                loss.append(loss_on == "all")  # the runtime writes the role marker that opens a turn
                start = len(ids)
                for modality, piece in next(parts):
                    spans.append(Span(modality, len(ids), len(ids) + len(piece)))
                    ids.extend(piece.tolist())
                    loss.extend([trained] * len(piece))
                if _is_request(conv, conv_segments, i, prompt):
                    requests.append((start, len(ids), []))
                ids.append(layout.eot_id)
                loss.append(trained)
            ids.append(layout.role_id("assistant") if prompt else self.text.eos_id)
            loss.append(loss_on == "all")
            encoded.append(EncodedDocument(np.array(ids, dtype=ID_DTYPE), spans, np.array(loss, dtype=bool),
                                           requests))
        return encoded

    def _encode_with_template(self, conversations: list[Conversation], turns: list[list[Segment]], loss_on: str,
                              prompt: bool) -> list[EncodedDocument]:
        """The text tokenizer's chat template, media spans in place of placeholders; the answers found by rendering
        the conversation up to each assistant turn with and without it (``chat.py``)."""
        template = ChatTemplate(self.text)
        media = iter(self._encode_parts([[s for s in segs if not isinstance(s, Text)] for segs in turns]))
        segments = iter(turns)
        encoded = []
        for conv in conversations:
            slots, kinds, messages = [], [], []
            conv_segments = [next(segments) for _ in conv.turns]
            for turn, segs in zip(conv.turns, conv_segments):
                turn_media, content = iter(next(media)), []
                for seg in segs:
                    if isinstance(seg, Text):
                        if any(r in seg.text for r in RESERVED):
                            raise OmnitokError("a turn's text holds one of U+E000-U+E003, which omnitok reserves "
                                               "for media and control tokens in chat templates")
                        content.append(template.mark(seg.text))
                    else:
                        modality, ids = next(turn_media)
                        content.append(SLOT.format(len(slots)))
                        slots.append(ids.tolist())
                        kinds.append(modality)
                messages.append({"role": turn.role, "content": "".join(content)})
            ids, placed = template.ids(messages, prompt, slots)
            if sorted(k for k, _, _ in placed if k != "text") != list(range(len(slots))):
                raise OmnitokError("the chat template does not write each message's content exactly once")
            loss = np.zeros(len(ids), dtype=bool)
            if loss_on == "all":
                loss[1:] = True
            for i, turn in enumerate(conv.turns):
                if turn.role != "assistant" or loss_on == "all":
                    continue
                before = template.ids(messages[:i], True, slots)[0]
                after = template.ids(messages[: i + 1], False, slots)[0]
                if after[: len(before)] != before or ids[: len(after)] != after:
                    raise OmnitokError(f"the chat template writes turn {i} differently once later turns follow, so "
                                       "its answer cannot be told apart from the rest")
                loss[len(before):len(after)] = True
            requests = []
            for i in range(len(conv.turns)):
                if _is_request(conv, conv_segments, i, prompt):
                    emptied = [dict(m, content="") if j == i else m for j, m in enumerate(messages)]
                    requests.append(request_of(ids, template.ids(emptied, prompt, slots)[0]))
            spans = [Span("text" if k == "text" else kinds[k], start, stop) for k, start, stop in placed]
            encoded.append(EncodedDocument(np.array(ids, dtype=ID_DTYPE), spans, loss, requests))
        return encoded

    def _encode_parts(self, segment_lists: list[list[Segment]], literal: bool = False
                      ) -> list[list[tuple[str, np.ndarray]]]:
        """Each list of segments as ``(modality, ids)`` pieces (empty ones dropped), with all text, images and audio
        of all lists batched through each tokenizer once; ``literal``: text spelling a control token stays text
        (conversations)."""
        texts, images, sounds = [], [], []
        for segments in segment_lists:
            for seg in segments:
                if isinstance(seg, Text):
                    texts.append(seg.text)
                elif isinstance(seg, Image):
                    images.append(seg.source)
                elif isinstance(seg, Audio):
                    sounds.append(seg.source)
                elif not isinstance(seg, Tokens):
                    raise OmnitokError(f"unknown segment {seg!r:.60}")
        text_ids = iter(self.text.encode(texts, literal))
        image_codes = iter(self._image().encode(images) if images else [])
        audio_codes = iter(self._audio().encode(sounds) if sounds else [])
        out = []
        for segments in segment_lists:
            pieces = []
            for seg in segments:
                if isinstance(seg, Text):
                    piece = self.layout.check_text(np.asarray(next(text_ids), dtype=np.int64))
                    modality = "text"
                elif isinstance(seg, Image):
                    piece, modality = self._image_piece(next(image_codes)), "image"
                elif isinstance(seg, Tokens):
                    piece, modality = np.asarray(seg.ids, dtype=np.int64), seg.modality
                else:
                    piece, modality = self._audio_piece(next(audio_codes)), "audio"
                if len(piece):
                    pieces.append((modality, piece.astype(np.int64)))
            out.append(pieces)
        return out

    def _image_piece(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise OmnitokError(f"image tokenizer returned codes of shape {codes.shape}; expected (rows, cols)")
        rows, cols = codes.shape
        head = [self.layout.boi_id, self.layout.rows_id(rows), self.layout.cols_id(cols)]
        return np.concatenate([head, self.layout.image_ids(codes.reshape(-1)), [self.layout.eoi_id]])

    def _audio_piece(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim == 2 and codes.shape[1] == 0:
            raise OmnitokError("audio clip is too short: it gives no frame of codes")
        return np.concatenate([[self.layout.boa_id], self.layout.audio_ids(codes), [self.layout.eoa_id]])

    # ---------------------------------------------------------------- decoding

    def parse(self, ids: np.ndarray) -> list[ParsedSegment]:
        """Split an id sequence into segments, checking the grammar; no media is decoded.

        A leading bos and a trailing eos are dropped. Raises ``MalformedSequence`` naming the position of the
        first id that breaks the grammar.
        """
        ids = np.asarray(ids).astype(np.int64, copy=False)
        if ids.ndim != 1:
            raise MalformedSequence(f"expected a 1-D id sequence, got shape {ids.shape}")
        layout = self.layout
        modality = layout.modality_of(ids)
        start, stop = 0, len(ids)
        if stop and ids[0] == self.text.bos_id:
            start = 1
        if stop > start and ids[-1] == self.text.eos_id:
            stop -= 1
        out: list[ParsedSegment] = []
        pos = start
        while pos < stop:
            token = int(ids[pos])
            if modality[pos] == Modality.TEXT:
                others = np.flatnonzero(modality[pos:stop] != Modality.TEXT)
                end = pos + (int(others[0]) if len(others) else stop - pos)
                out.append(ParsedSegment("text", Span("text", pos, end), ids[pos:end]))
                pos = end
            elif layout.has_image and token == layout.boi_id:
                if pos + IMAGE_HEADER > stop:
                    raise MalformedSequence(f"image at position {pos} ends before its grid size")
                rows, cols = layout.rows_of(int(ids[pos + 1])), layout.cols_of(int(ids[pos + 2]))
                end = pos + image_span_length(rows, cols) - 1  # where <|eoi|> must be
                if end >= stop or ids[end] != layout.eoi_id:
                    got = "the end of the sequence" if end >= stop else layout.describe_id(int(ids[end]))
                    raise MalformedSequence(f"image at position {pos} is {rows}x{cols}, so <|eoi|> must be at "
                                            f"position {end}; found {got}")
                body = ids[pos + IMAGE_HEADER:end]
                if not np.all(modality[pos + IMAGE_HEADER:end] == Modality.IMAGE):
                    bad = pos + IMAGE_HEADER + int(np.flatnonzero(modality[pos + IMAGE_HEADER:end]
                                                                  != Modality.IMAGE)[0])
                    raise MalformedSequence(f"image at position {pos}: position {bad} holds "
                                            f"{layout.describe_id(int(ids[bad]))}, not an image code")
                codes = layout.image_codes(body).reshape(rows, cols)
                out.append(ParsedSegment("image", Span("image", pos, end + 1), codes))
                pos = end + 1
            elif layout.has_audio and token == layout.boa_id:
                closes = np.flatnonzero(ids[pos + 1:stop] == layout.eoa_id)
                if not len(closes):
                    raise MalformedSequence(f"audio at position {pos} has no <|eoa|>")
                end = pos + 1 + int(closes[0])
                body = ids[pos + 1:end]
                if not np.all(modality[pos + 1:end] == Modality.AUDIO):
                    bad = pos + 1 + int(np.flatnonzero(modality[pos + 1:end] != Modality.AUDIO)[0])
                    raise MalformedSequence(f"audio at position {pos}: position {bad} holds "
                                            f"{layout.describe_id(int(ids[bad]))}, not an audio code")
                if len(body) == 0:
                    raise MalformedSequence(f"audio at position {pos} holds no frame")
                out.append(ParsedSegment("audio", Span("audio", pos, end + 1), layout.audio_codes(body)))
                pos = end + 1
            else:
                raise MalformedSequence(f"unexpected {layout.describe_id(token)} at position {pos}")
        return out

    def decode(self, ids: np.ndarray) -> Document:
        """Id sequence -> Document, decoding all its images and all its audio in one batch each."""
        parsed = self.parse(ids)
        grids = [p.ids for p in parsed if p.modality == "image"]
        clips = [p.ids for p in parsed if p.modality == "audio"]
        pixels = iter(self._image().decode(grids) if grids else [])
        waves = iter(self._audio().decode(clips) if clips else [])
        segments = []
        for p in parsed:
            if p.modality == "text":
                segments.append(Text(self.text.decode(p.ids)))
            elif p.modality == "image":
                segments.append(Image(next(pixels)))
            else:
                segments.append(Audio((next(waves), self._audio().sample_rate)))
        return Document(segments)

    def _image(self) -> ImageCodec:
        if self.image is None:
            raise OmnitokError("this tokenizer has no image tokenizer")
        return self.image

    def _audio(self) -> AudioCodec:
        if self.audio is None:
            raise OmnitokError("this tokenizer has no audio tokenizer")
        return self.audio


def assemble(text: str | Path, out: str | Path, image: str | Path | None = None, audio: str | Path | None = None,
             text_vocab_size: int | None = None, bos_token: str | None = None,
             eos_token: str | None = None, chat: bool = False) -> MultimodalTokenizer:
    """``omnitok tokenizer assemble``: gather the parts into one tokenizer directory with its layout."""
    text_tok = TextTokenizer.from_path(text, bos_token=bos_token, eos_token=eos_token)
    image_tok = load_media_part(image, "image") if image is not None else None
    audio_tok = load_media_part(audio, "audio") if audio is not None else None
    tok = MultimodalTokenizer.build(text_tok, image_tok, audio_tok, text_vocab_size=text_vocab_size, chat=chat)
    tok.save(out)
    return MultimodalTokenizer.from_dir(out)  # proves the directory reloads with matching fingerprints


def _is_request(conv: Conversation, segments: list[list[Segment]], i: int, prompt: bool) -> bool:
    """Whether user turn ``i`` (``segments``: each turn's, merged) is one conditioning dropout may drop: the last
    turn of a prompt, or one answered by an assistant turn that opens with media."""
    if conv.turns[i].role != "user":
        return False
    if i == len(conv.turns) - 1:
        return prompt
    first = segments[i + 1][0] if segments[i + 1] else None
    return isinstance(first, Image | Audio) or (isinstance(first, Tokens) and first.modality != "text")
