"""The training stream: shard sets -> documents -> conditioning dropout -> packed sequences -> batches.

- Shard sets are shard directories (their manifest lists the shards) or URL patterns (brace patterns, ``pipe:``).
- Each rank reads its own shards (``shards[rank::world]`` of a seeded per-epoch order); with fewer shards than ranks
  every rank reads all of them and keeps every world-th sample, so no rank is ever empty. Epochs repeat without
  end, so every rank runs exactly the steps the trainer asks for.
- Disjointness is per epoch: in epoch ``e`` the lanes' shares of a set are disjoint and together cover it. Lanes
  are not held in step across epochs: with a shard count that the lanes do not divide (or shards of unequal size)
  a lane that finishes its share first starts its next epoch, whose order may hand it a shard another lane is
  still reading. This is deliberate: keeping lanes in lockstep would mean dropping the remainder shards of every
  epoch or making ranks wait for each other, and the overlap costs nothing measurable: at most a few samples
  appear twice in one global batch, and since each epoch re-deals the shards at random, every shard is read
  equally often in expectation (``tests/test_reliability.py`` counts it).
- Mixture: each document comes from shard set ``k`` with probability ``weights[k]`` (seeded per document).
- Conditioning dropout (ARCHITECTURE.md): text right before an image or audio span is dropped with probability
  ``cond_dropout``, so the model also learns the unconditional case that classifier-free guidance samples from; in a
  conversation, the content of a user turn answered with media (the requests its shard sample records).
- Packing to ``seq_len`` never cuts an image span (one that would cross the boundary starts the next sequence);
  a document longer than ``seq_len`` is split only inside text or at audio frame boundaries. Padding carries no
  loss; the padded fraction is reported.
- Document isolation (``isolate_documents``, default on): each batch carries position ids that restart at every
  document (and at the part of a document that continues from the previous sequence), and no token is trained to
  predict the first token of the next document. Given position ids and no attention mask, transformers' causal LMs
  build the block-diagonal causal mask themselves (``masking_utils.find_packed_sequence_indices``: SDPA, eager and
  flex on CPU) or take FlashAttention's variable-length path, so attention never crosses a document.
- ``state_dict()`` is the exact position (epochs, shards, samples, the partly filled sequence), small and JSON-able,
  saved with every checkpoint so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from braceexpand import braceexpand

from omnitok.data.shards import MANIFEST, read_manifest, read_shard, trained_mask
from omnitok.errors import OmnitokError
from omnitok.tokenizers.layout import IGNORE, LAYOUT_FILE, Span, TokenLayout, image_span_length


@dataclass
class StreamConfig:
    shards: list[str] = field(default_factory=list)  # one entry per shard set: a directory or a URL pattern
    weights: list[float] | None = None  # mixture weight of each shard set (default equal)
    seq_len: int = 1024
    cond_dropout: float = 0.1
    seed: int = 0
    lanes: int | None = None  # independent sub-streams (default: the world size); see PackedStream
    isolate_documents: bool = True  # attention and positions restart at every packed document

    def __post_init__(self) -> None:
        if self.lanes is not None and self.lanes < 1:
            raise OmnitokError("data.lanes must be at least 1")
        if self.weights is not None and len(self.weights) != len(self.shards):
            raise OmnitokError(f"data.weights has {len(self.weights)} entries for {len(self.shards)} shard sets")
        if not 0 <= self.cond_dropout <= 1 or self.seq_len < 8:
            raise OmnitokError("data.cond_dropout must be in [0, 1] and data.seq_len at least 8")


def shard_urls(spec: str, layout: TokenLayout | None = None) -> list[str]:
    """The shard URLs of one shard set; a directory's layout must equal ``layout``."""
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            if layout is not None:
                layout.check_reads(TokenLayout.load(path / LAYOUT_FILE), "the model's tokenizer", str(path))
            return [str(path / s["name"]) for s in read_manifest(path)["shards"]]
        raise OmnitokError(f"{path} is not a shard directory (no {MANIFEST})")
    urls = list(braceexpand(spec)) if not spec.startswith("pipe:") else [spec]
    missing = [u for u in urls if not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise OmnitokError(f"shard {missing[0]} not found")
    return urls


class _Source:
    """One shard set, read by one rank: yields documents; its position is (epoch, shard, sample)."""

    def __init__(self, urls: list[str], index: int, seed: int, rank: int, world: int):
        if not urls:
            raise OmnitokError("a shard set holds no shards")
        self.urls, self.index, self.seed, self.rank, self.world = urls, index, seed, rank, world
        self.epoch, self.shard, self.sample = 0, 0, 0
        self._cache: tuple[tuple[int, int], list] | None = None
        self.problems: list[str] = []  # shards skipped since the caller last took them, with the reasons

    def _order(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.index, self.epoch]).permutation(len(self.urls))
        return list(order[self.rank::self.world]) if len(self.urls) >= self.world else list(order)

    def _samples(self, shard_pos: int) -> list:
        key = (self.epoch, shard_pos)
        if self._cache is None or self._cache[0] != key:
            shard = self._order()[shard_pos]
            try:
                read = read_shard(self.urls[shard])
            except OmnitokError as e:  # damaged (a bad copy, a lost sample): skipped, recorded, the run goes on
                self.problems.append(f"{e}; skipped in epoch {self.epoch}")
                read = []
            samples = [(tokens.astype(np.int64), [Span(*s) for s in meta["spans"]],
                        trained_mask(meta.get("trained"), len(tokens)), meta.get("requests", []))
                       for _, tokens, meta in read]
            perm = np.random.default_rng([self.seed, self.index, self.epoch, int(shard)]).permutation(len(samples))
            samples = [samples[i] for i in perm]
            if len(self.urls) < self.world:  # fewer shards than ranks: split by sample
                samples = samples[(self.rank + shard_pos) % self.world::self.world]
            self._cache = (key, samples)
        return self._cache[1]

    def next(self) -> tuple[np.ndarray, list[Span], np.ndarray, list]:
        for _ in range(len(self.urls) * 2 + 2):  # skips empty shards; a wholly empty set fails below
            order = self._order()
            if self.shard >= len(order):
                self.epoch, self.shard, self.sample = self.epoch + 1, 0, 0
                continue
            samples = self._samples(self.shard)
            if self.sample < len(samples):
                self.sample += 1
                return samples[self.sample - 1]
            self.shard, self.sample = self.shard + 1, 0
        raise OmnitokError(f"shard set {self.index} holds no samples for rank {self.rank}"
                           + (f" (the last problem: {self.problems[-1]})" if self.problems else ""))

    def where(self) -> str:
        """The shard and sample ``next`` returned last."""
        return f"{self.urls[self._order()[self.shard]]} sample {self.sample - 1}"

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample}

    def load(self, state: dict) -> None:
        self.epoch, self.shard, self.sample = state["epoch"], state["shard"], state["sample"]


def is_conversation(trained) -> bool:
    """Whether a sample's loss mask is a conversation's: a document trains every id, a conversation never its bos."""
    return not all(trained) if isinstance(trained, list) else not bool(trained.all())


class Packer:
    """Documents into sequences of exactly ``seq_len`` tokens (padding at the end), recording where each document (or
    the part of one continued from the previous sequence) begins. An image span is never cut (one that would cross
    the boundary starts the next sequence); a document longer than ``seq_len`` is cut only inside text or at an audio
    frame boundary. ``documents()`` gives the next ``(tokens, spans, trained)`` (``trained``: which ids are trained as
    targets, all of them but in conversations), or None when there are no more.

    Training fills every sequence, so a document may continue in the next one. A conversation is never cut (the
    part continued in the next sequence would hold answers without their request): the current sequence is padded
    instead (the stream skips conversations longer than a sequence). With ``keep_whole`` (evaluation) the same holds
    for every document that fits in a sequence, so each is scored exactly as it would be alone."""

    def __init__(self, layout: TokenLayout, seq_len: int,
                 documents: Callable[[], tuple[np.ndarray, list[Span], np.ndarray] | None], keep_whole: bool = False):
        longest = image_span_length(layout.max_grid_side, layout.max_grid_side) if layout.has_image else 0
        if longest > seq_len:
            raise OmnitokError(f"sequence length {seq_len} (data.seq_len; --seq-len of eval lm) cannot hold the "
                               "longest image span this tokenizer makes: "
                               f"{layout.max_grid_side}x{layout.max_grid_side} codes + 4 markers = {longest} tokens")
        self.layout, self.seq_len, self.documents, self.keep_whole = layout, seq_len, documents, keep_whole
        self.pending: list[int] = []  # the partly filled sequence
        self.trained: list[bool] = []  # which of its ids are trained as targets
        self.starts: list[int] = []  # where each document (or document part) begins in it
        # the part of a document not yet packed: tokens, spans, longer than a sequence, trained
        self.rest: tuple[list[int], list[Span], bool, list[bool]] | None = None
        self.padding, self.tokens = 0, 0

    def _cut(self, spans: list, length: int, room: int, long: bool) -> int:
        """The largest cut ``c <= room`` (tokens ``[0, c)`` stay) that splits no image span, and an audio span only
        at a frame boundary of a document longer than ``seq_len``; 0 when there is none."""
        allowed = np.ones(room + 1, dtype=bool)
        allowed[0] = False
        n_q = self.layout.audio_num_codebooks
        for modality, s, e in spans:
            lo, hi = max(s + 1, 1), min(e, room + 1)  # interior cut positions s < c < e (s < 0: span began earlier)
            if lo >= hi:
                continue
            if modality == "image" or (modality == "audio" and not long):
                allowed[lo:hi] = False
            elif modality == "audio":
                interior = np.arange(lo, hi)
                allowed[lo:hi] = (interior - (s + 1)) % n_q == 0
        cuts = np.flatnonzero(allowed[: min(room, length) + 1])
        return int(cuts[-1]) if len(cuts) else 0

    def sequence(self) -> tuple[list[int], list[int], list[bool]] | None:
        """The next sequence, where its documents begin and which of its ids are trained as targets; None once the
        documents have run out and all is packed."""
        L = self.seq_len
        while True:
            if self.rest is None:
                document = self.documents()
                if document is None:
                    return self._emit() if self.pending else None
                tokens, spans, trained = document
                self.rest = (tokens.tolist(), spans, len(tokens) > L, trained.tolist())
            tokens, spans, long, trained = self.rest
            room = L - len(self.pending)
            if len(tokens) <= room:
                self.starts.append(len(self.pending))
                self.pending += tokens
                self.trained += trained
                self.rest = None
                if len(self.pending) == L:
                    return self._emit()
                continue
            if (self.keep_whole or is_conversation(trained)) and not long:
                return self._emit()  # the document starts the next sequence
            cut = self._cut(spans, len(tokens), room, long)
            if cut == 0 and not self.pending:
                cut = room  # cannot happen for valid layouts (checked at start-up); never loop forever
            self.starts.append(len(self.pending))
            self.pending += tokens[:cut]
            self.trained += trained[:cut]
            # Spans keep their true start (negative once cut), so audio frame boundaries stay where they were.
            self.rest = (tokens[cut:], [Span(m, s - cut, e - cut) for m, s, e in spans if e > cut], long,
                         trained[cut:])
            return self._emit()

    def _emit(self) -> tuple[list[int], list[int], list[bool]]:
        pad = self.seq_len - len(self.pending)
        seq, trained = self.pending + [self.layout.pad_id] * pad, self.trained + [False] * pad
        starts = self.starts + ([len(self.pending)] if len(self.pending) < self.seq_len else [])  # padding
        self.padding += pad
        self.tokens += self.seq_len
        self.pending, self.starts, self.trained = [], [], []
        return seq, starts, trained

    def state_dict(self) -> dict:
        rest = None if self.rest is None else [self.rest[0], [list(s) for s in self.rest[1]], *self.rest[2:]]
        return {"pending": list(self.pending), "trained": list(self.trained), "starts": list(self.starts),
                "rest": rest, "padding": self.padding,
                "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.pending = list(state["pending"])
        self.trained = list(state.get("trained", [True] * len(self.pending)))  # saved before conversations
        # positions saved before isolation existed: the partial sequence counts as one document
        self.starts = list(state.get("starts", [0] if self.pending else []))
        rest = state["rest"]
        self.rest = None if rest is None else (rest[0], [Span(*s) for s in rest[1]], rest[2],
                                               rest[3] if len(rest) > 3 else [True] * len(rest[0]))
        self.padding, self.tokens = state["padding"], state["tokens"]


class _Lane:
    """One independent packed sub-stream: its share of every shard set, its own documents and packer."""

    def __init__(self, cfg: StreamConfig, layout: TokenLayout, urls: list[list[str]], lane: int, lanes: int):
        self.cfg, self.layout, self.lane = cfg, layout, lane
        self.sources = [_Source(u, i, cfg.seed, lane, lanes) for i, u in enumerate(urls)]
        weights = np.array(cfg.weights or [1.0] * len(self.sources), dtype=np.float64)
        self.weights = weights / weights.sum()
        self.documents = 0
        self.skipped = 0  # conversations longer than a sequence, since the start
        self.problems: list[str] = []  # why, since the caller last took them
        self.packer = Packer(layout, cfg.seq_len, self._document)

    # ---------------------------------------------------------------- documents

    def _document(self) -> tuple[np.ndarray, list[Span], np.ndarray]:
        """The next document or conversation. A conversation longer than a sequence is skipped and recorded: cut,
        its later answers would be trained without the requests they answer."""
        while True:
            self.documents += 1
            k = 0 if len(self.sources) == 1 else int(np.random.default_rng(
                [self.cfg.seed, 7, self.lane, self.documents]).choice(len(self.sources), p=self.weights))
            tokens, spans, trained, requests = self.sources[k].next()
            if len(tokens) > self.cfg.seq_len and is_conversation(trained):
                self.skipped += 1
                self.problems.append(f"{self.sources[k].where()}: a conversation of {len(tokens)} tokens does not fit "
                                     f"in data.seq_len {self.cfg.seq_len}; skipped")
                continue
            return self._drop_conditioning(tokens, spans, trained, requests,
                                           np.random.default_rng([self.cfg.seed, 11, self.lane, self.documents]))

    def _drop_conditioning(self, tokens: np.ndarray, spans: list, trained: np.ndarray, requests: list, rng
                           ) -> tuple[np.ndarray, list, np.ndarray]:
        """With probability ``cond_dropout`` each: in a document, drop the text right before a media span; in a
        conversation, apply each of its requests (``tokenizers/chat.py``: the content of a user turn that an assistant
        turn opening with media answers, emptied as the chat format writes an empty turn). Either is exactly what
        the sampler's unconditional row holds."""
        if not self.cfg.cond_dropout:
            return tokens, spans, trained
        p = self.cfg.cond_dropout
        if is_conversation(trained):
            edits = [(start, stop, replacement) for start, stop, replacement in requests if rng.random() < p]
        else:
            edits = [(spans[i - 1].start, spans[i - 1].stop, []) for i in range(1, len(spans))
                     if spans[i].modality != "text" and spans[i - 1].modality == "text"
                     and spans[i - 1].stop == spans[i].start and rng.random() < p]
        return edited(tokens, spans, trained, edits) if edits else (tokens, spans, trained)

    # ---------------------------------------------------------------- position

    def state_dict(self) -> dict:
        return {"sources": [s.state() for s in self.sources], "documents": self.documents,
                **self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for source, s in zip(self.sources, state["sources"]):
            source.load(s)
        self.documents = state["documents"]
        self.packer.load_state_dict(state)


def edited(tokens: np.ndarray, spans: list, trained: np.ndarray, edits: list
           ) -> tuple[np.ndarray, list, np.ndarray]:
    """A sample with each ``(start, stop, replacement)`` of ``edits`` (disjoint) applied: ``tokens[start:stop]``
    replaced by ``replacement``, which is never trained. Spans inside an edited range go; a text span across an
    edge keeps its outer part and the replacement."""
    edits = sorted(edits)
    pieces, masks, pos = [], [], 0
    for start, stop, replacement in edits:
        pieces += [tokens[pos:start], np.asarray(replacement, dtype=tokens.dtype)]
        masks += [trained[pos:start], np.zeros(len(replacement), dtype=bool)]
        pos = stop
    pieces.append(tokens[pos:])
    masks.append(trained[pos:])

    def moved(p: int, end: bool) -> int:
        shift = 0
        for start, stop, replacement in edits:
            if p >= stop:
                shift += len(replacement) - (stop - start)
            elif p > start:  # inside an edit: to its far edge, replacement included
                return (start if not end else start + len(replacement)) + shift
        return p + shift

    new_spans = []
    for m, s, e in spans:
        if any(start <= s and e <= stop for start, stop, _ in edits):
            continue
        s2, e2 = moved(s, False), moved(e, True)
        if e2 > s2:
            new_spans.append(Span(m, s2, e2))
    return np.concatenate(pieces), new_spans, np.concatenate(masks)


class Batch(NamedTuple):
    ids: torch.Tensor  # (B, L) packed token ids
    labels: torch.Tensor  # (B, L) the next token, IGNORE on padding (and across documents when isolated)
    positions: torch.Tensor | None  # (B, L) restarting at every document; None without isolation

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Keyword arguments for a transformers causal LM: no cache, so packed position ids isolate documents."""
        inputs = {"input_ids": self.ids.to(device), "use_cache": False}
        if self.positions is not None:
            inputs["position_ids"] = self.positions.to(device)
        return inputs


def batch_of(rows: list[tuple[list[int], list[int], list[bool]]], layout: TokenLayout, isolate: bool) -> Batch:
    """A batch of packed sequences and where their documents begin (``Packer.sequence``): labels are the next token,
    IGNORE on padding; with ``isolate``, position ids restart at every document and no label crosses into the next
    document."""
    ids = torch.tensor([seq for seq, _, _ in rows], dtype=torch.long)  # (B, L)
    trained = torch.tensor([t for _, _, t in rows], dtype=torch.bool)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:].masked_fill(~trained[:, 1:], IGNORE)  # label t is the token after input t
    labels[labels == layout.pad_id] = IGNORE
    if not isolate:
        return Batch(ids, labels, None)
    L = ids.shape[1]
    positions = torch.empty_like(ids)
    for b, (_, starts, _) in enumerate(rows):
        bounds = [*starts, L]
        for start, stop in zip(bounds, bounds[1:]):
            positions[b, start:stop] = torch.arange(stop - start)
            if start > 0:
                labels[b, start - 1] = IGNORE  # the next document's first token is not predicted
    return Batch(ids, labels, positions)


class PackedStream:
    """Batches ``(input_ids (B, L), labels (B, L))`` of packed documents for one rank.

    The data is cut into ``lanes`` independent sub-streams (default: the world size); rank ``r`` reads lanes
    ``r, r + W, ...`` and takes ``B / (lanes / W)`` sequences from each. The global batch, all ranks together, is then
    the same sequences whatever the world size, so a 2-rank run can be checked against a 1-rank run, and runs can
    move to another world size that divides ``lanes``. Lanes read disjoint shards (or disjoint samples of them).
    """

    def __init__(self, cfg: StreamConfig, layout: TokenLayout, batch_size: int, rank: int = 0, world: int = 1):
        if not cfg.shards:
            raise OmnitokError("data.shards is empty: name at least one shard directory or pattern")
        lanes = cfg.lanes or world
        if lanes % world:
            raise OmnitokError(f"data.lanes ({lanes}) must be a multiple of the world size ({world})")
        per_rank = lanes // world
        if batch_size % per_rank:
            raise OmnitokError(f"micro_batch_size {batch_size} must be a multiple of the lanes per rank ({per_rank})")
        urls = [shard_urls(s, layout) for s in cfg.shards]
        self.layout, self.batch_size, self.per_lane = layout, batch_size, batch_size // per_rank
        self.isolate = cfg.isolate_documents
        self.lanes = [_Lane(cfg, layout, urls, lane, lanes) for lane in range(rank, lanes, world)]

    @property
    def sources(self) -> list[_Source]:
        return [s for lane in self.lanes for s in lane.sources]

    def take_problems(self) -> list[str]:
        """What this rank's lanes skipped since the last call (damaged shards, conversations that do not fit), with
        the reasons."""
        problems = [p for owner in [*self.sources, *self.lanes] for p in owner.problems]
        for owner in [*self.sources, *self.lanes]:
            owner.problems = []
        return problems

    @property
    def skipped(self) -> int:
        """Conversations this rank skipped since the start (longer than a sequence)."""
        return sum(lane.skipped for lane in self.lanes)

    def next_batch(self) -> Batch:
        return batch_of([lane.packer.sequence() for lane in self.lanes for _ in range(self.per_lane)], self.layout,
                        self.isolate)

    @property
    def padding_counts(self) -> tuple[int, int]:
        """Padding tokens and all tokens this rank has emitted (summed over ranks for a run's padding fraction)."""
        return sum(lane.packer.padding for lane in self.lanes), sum(lane.packer.tokens for lane in self.lanes)

    @property
    def padding_fraction(self) -> float:
        padding, tokens = self.padding_counts
        return padding / max(tokens, 1)

    def state_dict(self) -> dict:
        return {"lanes": [lane.state_dict() for lane in self.lanes]}

    def load_state_dict(self, state: dict) -> None:
        for lane, s in zip(self.lanes, state["lanes"]):
            lane.load_state_dict(s)
