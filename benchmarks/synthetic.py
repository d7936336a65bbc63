"""Synthetic shards of layout-valid interleaved documents, for the training benchmarks and the tests (one maker for
both). A document is ``BOS text [image text] [audio] EOS`` with random sizes and codes, spans recorded as the
multimodal tokenizer writes them; media appear only where the layout has that modality. With ``chat``, each sample is
a conversation (``BOS <|user|> request <|eot|> <|assistant|> document <|eot|> EOS``) whose loss mask is the
assistant's turn, recorded as ``omnitok tokenize`` records it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from omnitok.data.shards import ShardWriter, trained_ranges, write_manifest
from omnitok.tokenizers.layout import Span, TokenLayout

# The text ids synthetic documents open and close with, as a SentencePiece text tokenizer numbers them (unk 0,
# bos 1, eos 2); random text is drawn from the ids after them.
BOS, EOS = 1, 2
FIRST_TEXT = 3


def document(rng: np.random.Generator, layout: TokenLayout, text: tuple[int, int] = (1, 12), grid: int | None = None,
             image_p: float = 0.7, audio_p: float = 0.5, frames: tuple[int, int] = (1, 20)
             ) -> tuple[np.ndarray, list[Span]]:
    """One document: ``text`` is the range of the first text's length; an image (``grid`` x ``grid``, or a random
    grid the layout allows) follows with probability ``image_p``, then a short text; audio (``frames`` frames) with
    probability ``audio_p``."""
    pieces, spans, pos = [[BOS]], [], 1

    def add(kind: str, ids: list[int]) -> None:
        nonlocal pos
        pieces.append(ids)
        spans.append(Span(kind, pos, pos + len(ids)))
        pos += len(ids)

    def words(lo: int, hi: int) -> list[int]:
        return rng.integers(FIRST_TEXT, layout.text_vocab_size, rng.integers(lo, hi)).tolist()

    add("text", words(*text))
    if layout.has_image and rng.random() < image_p:
        r, c = (grid, grid) if grid else (int(x) for x in rng.integers(1, layout.max_grid_side + 1, 2))
        codes = layout.image_ids(rng.integers(0, layout.image_codebook_size, r * c)).tolist()
        add("image", [layout.boi_id, layout.rows_id(r), layout.cols_id(c), *codes, layout.eoi_id])
        add("text", words(1, 6))
    if layout.has_audio and rng.random() < audio_p:
        n = int(rng.integers(*frames))
        codes = rng.integers(0, layout.audio_codebook_sizes[0], (layout.audio_num_codebooks, n))
        add("audio", [layout.boa_id, *layout.audio_ids(codes).tolist(), layout.eoa_id])
    pieces.append([EOS])
    return np.array([t for p in pieces for t in p], dtype=np.int32), spans


def conversation(rng: np.random.Generator, layout: TokenLayout, **shape
                 ) -> tuple[np.ndarray, list[Span], np.ndarray, list]:
    """One exchange: a user request of a few text ids, and the assistant's answer, a synthetic document's content
    whose text, when it opens with text, starts with the request's first id (so the answer depends on the request);
    the loss mask marks the answer and its ``<|eot|>``; the request is one dropout may drop when the answer opens
    with media."""
    body, spans = document(rng, layout, **shape)
    request = rng.integers(FIRST_TEXT, layout.text_vocab_size, rng.integers(1, 5))
    if spans[0].stop > spans[0].start:  # an answer that opens with text repeats the request's first id
        body[1] = request[0]
    head = [BOS, layout.role_id("user"), *request.tolist(), layout.eot_id, layout.role_id("assistant")]
    tokens = np.array([*head, *body[1:-1].tolist(), layout.eot_id, EOS], dtype=np.int32)
    shift = len(head) - 1
    loss = np.zeros(len(tokens), dtype=bool)
    loss[len(head):-1] = True
    requests = [[2, 2 + len(request), []]] if spans[0].stop == spans[0].start or spans[0].modality != "text" else []
    spans = [Span("text", 2, 2 + len(request)), *(Span(s.modality, s.start + shift, s.stop + shift) for s in spans)]
    return tokens, spans, loss, requests


def write_shards(directory: Path, layout: TokenLayout, n_docs: int, shard_size: int, seed: int = 0,
                 chat: bool = False, **shape) -> Path:
    """A shard directory of ``n_docs`` synthetic documents, or with ``chat`` conversations (``shape``:
    ``document``'s size settings)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer, shards = ShardWriter(directory, shard_size, layout), []
    for i in range(n_docs):
        meta = {"source": f"synthetic:{i}"}
        if chat:
            tokens, spans, loss, requests = conversation(rng, layout, **shape)
            meta["trained"] = trained_ranges(loss)
            if requests:
                meta["requests"] = requests
        else:
            tokens, spans = document(rng, layout, **shape)
        entry = writer.add(f"doc{i:05d}", tokens, {**meta, "spans": [list(s) for s in spans]})
        if entry:
            shards.append(entry)
    if (entry := writer.flush()) is not None:
        shards.append(entry)
    layout.save(directory)
    write_manifest(directory, shards, n_docs)
    return directory
