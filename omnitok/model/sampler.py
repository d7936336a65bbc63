"""Constrained interleaved decoding: our own loop over a Hugging Face causal LM with a KV cache.

Every sample carries a grammar state, and the tokens each state allows come as vectorised masks built from the
token layout (no per-token Python callbacks):

    TEXT   text ids; <|boi|> / <|boa|> when the output may hold images / audio; eos ends the sample (in a chat,
           <|eot|> ends the assistant's turn and the text bos / eos are never written)
    ROWS   a <|rows_R|> token (or the fixed grid's)      COLS  a <|cols_C|> token
    CODES  image codes, exactly R*C of them               EOI   <|eoi|>, forced
    AUDIO  codes of codebook q = position in the frame; <|eoa|> only at a frame boundary, forced at the duration
           limit
    DONE   the sample has ended; it is fed padding and ignored

A budget rule keeps output well formed when ``max_new_tokens`` runs out: no image starts unless a whole one still
fits, <|eoa|> is forced when another frame would not, and eos is forced on the last step.

Sampling settings (temperature, top-k, top-p) are per modality of each sample's current state (text and image want
different settings; Chameleon and LlamaGen use top-k about 1000-2000 for images). A sample's sampling arithmetic
(guidance, top-k / top-p, softmax, draws) runs over its modality's columns only (``Grammar.columns``: inside an
image span the image markers and codes, not the text vocabulary), the same columns whatever else is in its batch.

With ``output`` "image" or "audio" the span opens at once and the sample ends when it closes.

Classifier-free guidance (per modality, ``guidance`` != 1): while a sample is inside an image or audio span, an
unconditional row runs in the same forward pass with its own KV cache rows: the sample's sequence with the text right
before the span dropped (in a chat, the last user turn's content), exactly what conditioning dropout trains
(ARCHITECTURE.md). The logits used are
``u + guidance * (c - u)`` over the tokens the conditional row finds plausible (``plausibility``, the adaptive
plausibility constraint of contrastive decoding, Li et al. 2023). The row joins when the span opens (a short prefill
spliced into the batch cache) and leaves when it closes, so samples in text pay nothing and a batch may mix samples in
any state.

Randomness is per sample: sample ``b`` draws its noise from its own generator seeded ``seeds[b]``, indexed by token
id, so a prompt gives the same output alone or in any batch, as far as the model computes its row's logits to the same
bits in both (a BLAS may round a row differently among more rows; ``benchmarks.exactness`` counts how often a draw
then differs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from omnitok.config import check_seed
from omnitok.errors import OmnitokError
from omnitok.model.decoder import Decoder
from omnitok.tokenizers.chat import Request
from omnitok.tokenizers.layout import Modality, TokenLayout, image_span_length

TEXT, ROWS, COLS, CODES, EOI, AUDIO, DONE = range(7)
STATE_MODALITY = np.array([Modality.TEXT, *[Modality.IMAGE] * 4, Modality.AUDIO, Modality.TEXT])  # by state
OUTPUTS = ("any", "text", "image", "audio")


@dataclass
class ModalitySampling:
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    guidance: float = 1.0  # classifier-free guidance scale for spans of this modality; 1: none
    plausibility: float = 0.1  # guidance picks among tokens at least this times as likely as the top one; 0: all
    sjd_window: int = 0  # speculative Jacobi decoding inside spans of this modality: drafts per pass; 0: off

    def __post_init__(self) -> None:
        if (self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.guidance < 0
                or not 0 <= self.plausibility <= 1 or self.sjd_window < 0):
            raise OmnitokError("sampling: temperature >= 0, top_k >= 0, 0 < top_p <= 1, guidance >= 0, "
                               "0 <= plausibility <= 1 and sjd_window >= 0")


@dataclass
class SamplingConfig:
    text: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=0.8, top_p=0.95))
    image: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=1.0, top_k=1000,
                                                                             guidance=3.0))
    audio: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=1.0, top_k=250,
                                                                             guidance=3.0))
    max_new_tokens: int = 1024
    max_audio_s: float = 10.0  # the longest audio span, in seconds of the codec's frames
    grid: tuple[int, int] | None = None  # a fixed image grid (rows, cols); default: any the layout allows
    output: str = "any"  # "image" / "audio": one span of that kind; "text": at least one text token, no media
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.text.guidance != 1 or self.text.sjd_window != 0:
            raise OmnitokError("guidance and speculative Jacobi decoding apply to image and audio spans; "
                               "text.guidance must stay 1 and text.sjd_window 0")
        if self.output not in OUTPUTS:
            raise OmnitokError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.max_new_tokens < 1 or not self.max_audio_s > 0:
            raise OmnitokError("max_new_tokens must be at least 1 and max_audio_s positive")

    @property
    def widest_window(self) -> int:
        """The most drafts a window of these settings holds, in any span (0: no speculative Jacobi decoding)."""
        return max(self.image.sjd_window, self.audio.sjd_window)

    def of(self, modality: int) -> ModalitySampling:
        """The settings of a sample in this ``Modality`` (TEXT, IMAGE or AUDIO; other modalities never sample: they
        get the text settings)."""
        return {Modality.IMAGE: self.image, Modality.AUDIO: self.audio}.get(modality, self.text)


def check_request(layout: TokenLayout, cfg: SamplingConfig) -> int:
    """Refuses settings this layout cannot serve; returns the longest image span (ids, markers included)."""
    if cfg.output == "image" and not layout.has_image or cfg.output == "audio" and not layout.has_audio:
        raise OmnitokError(f"this model's token layout has no {cfg.output} modality")
    if cfg.grid is not None:
        rows, cols = cfg.grid
        layout.rows_id(rows), layout.cols_id(cols)  # refuses a grid the layout cannot express
    rows, cols = cfg.grid or (layout.max_grid_side, layout.max_grid_side)
    longest = image_span_length(rows, cols)
    if cfg.output == "image" and cfg.max_new_tokens < longest:
        raise OmnitokError(f"max_new_tokens {cfg.max_new_tokens} cannot hold an image of up to {rows * cols} "
                           f"codes (needs {longest} with its markers)")
    return longest


class Grammar:
    """Per-sample decoding states and the masks of allowed next tokens. The states are small numpy arrays over the
    batch, on the host: the sampler reads them every pass to decide what each sample does, and states kept on a GPU
    would cost a synchronisation (and a dozen kernel launches per update) each time. The masks are tensors on the
    model's device, gathered by one index a pass."""

    def __init__(self, layout: TokenLayout, eos_id: int, cfg: SamplingConfig, batch: int, device: torch.device,
                 forbidden: Sequence[int] = (), nonempty: bool = False):
        self.layout, self.eos, self.cfg, self.device = layout, eos_id, cfg, device
        self.nonempty = nonempty or cfg.output == "text"  # the first token may not end the sample
        V, n_q = layout.vocab_size, max(layout.audio_num_codebooks, 1)
        self.longest_image = check_request(layout, cfg)
        self.max_audio_frames = layout.audio_frames(cfg.max_audio_s) if layout.has_audio else 0

        def mask(ids=(), ranges=()) -> torch.Tensor:
            m = torch.zeros(V, dtype=torch.bool)
            for a, b in ranges:
                m[a:b] = True
            m[list(ids)] = True
            return m

        text = layout.ranges["text"]
        starts = ([layout.boi_id] if layout.has_image and cfg.output == "any" else []) + \
                 ([layout.boa_id] if layout.has_audio and cfg.output == "any" else [])
        # text, and the id that ends the sample (eos; <|eot|> in a chat), without the ids a sample must not write
        masks = {"text": mask([*starts, eos_id], [text]),
                 "text_no_image": mask([*(starts[1:] if layout.has_image else starts), eos_id], [text]),
                 "text_no_media": mask([eos_id], [text])}
        for m in masks.values():
            m[list(forbidden)] = False
        masks.update({"eos": mask([eos_id]), "pad": mask([layout.pad_id])})
        if layout.has_image:
            rows1, cols1, G = layout.rows_id(1), layout.cols_id(1), layout.max_grid_side
            masks["rows"] = mask([layout.rows_id(cfg.grid[0])]) if cfg.grid else mask((), [(rows1, rows1 + G)])
            masks["cols"] = mask([layout.cols_id(cfg.grid[1])]) if cfg.grid else mask((), [(cols1, cols1 + G)])
            masks["codes"], masks["eoi"] = mask((), [layout.ranges["image"]]), mask([layout.eoi_id])
        if layout.has_audio:
            for q in range(n_q):
                masks[f"audio{q}"] = mask((), [layout.audio_range(q)])
            masks["audio0_or_eoa"] = mask([layout.eoa_id], [layout.audio_range(0)])
            masks["eoa"] = mask([layout.eoa_id])
        self.names = list(masks)
        stacked = torch.stack([masks[n] for n in self.names])  # (n_masks, V)
        self.masks = stacked.to(device)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.n_q = n_q
        # by state, the mask of a sample in it (text and audio: refined by ``_choice``; DONE: padding)
        by_state = {TEXT: "text", ROWS: "rows", COLS: "cols", CODES: "codes", EOI: "eoi", AUDIO: "audio0"}
        self.by_state = np.array([self.index.get(by_state.get(st, "pad"), self.index["pad"]) for st in range(7)])
        # each mask's allowed ids as a range [first, last + 1), and (``nonempty``) the same with the end id taken out
        without_end = stacked.clone()
        without_end[:, eos_id] = False
        self.bounds = _bounds(stacked), _bounds(without_end) if self.nonempty else None

        # per media Modality code, every token of its spans (markers and codes)
        spans = {Modality.IMAGE: ["rows", "cols", "codes", "eoi"] if layout.has_image else [],
                 Modality.AUDIO: [f"audio{q}" for q in range(n_q)] + ["eoa"] if layout.has_audio else []}
        span_masks = {m: stacked[[self.index[n] for n in names]].any(0) for m, names in spans.items() if names}
        # per Modality code, the ids [lo, hi) a sample in it may take (a span's markers and codes; text: all): the
        # columns its sampling arithmetic runs over, the same whatever else is in the batch
        self.columns = {Modality.TEXT: (0, V), **{m: tuple(_bounds(mask[None])[0].tolist())
                                                  for m, mask in span_masks.items()}}
        zeros = np.zeros(batch, dtype=np.int64)
        self.state = zeros + {"any": TEXT, "text": TEXT, "image": ROWS, "audio": AUDIO}[cfg.output]
        self.remaining, self.rows, self.q, self.frames = zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy()
        self.first = np.ones(batch, dtype=bool)  # no token sampled yet

    def allowed(self, steps_left: int | np.ndarray) -> torch.Tensor:
        """(B, V) boolean mask of the tokens each sample may take next, given the new tokens each may still add
        (one number for all, or one per sample)."""
        return self.allowed_ahead(steps_left, 0)[:, 0]

    def _ahead(self, ahead: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each sample's state, codebook position and frame count after 0..``ahead`` more codes of its span, (B,
        ahead + 1) each (positions and frames (B, 1) when no sample is in audio); outside a span the state now (a
        sample drafts only codes inside a span)."""
        s, q, frames = self.state[:, None], self.q[:, None], self.frames[:, None]
        if ahead == 0:
            return s, q, frames
        j = np.arange(ahead + 1)[None, :]
        s = np.where((s == CODES) & (self.remaining[:, None] <= j), EOI, s)
        audio = s == AUDIO
        if not audio.any():
            return s, q, frames
        return s, np.where(audio, (q + j) % self.n_q, q), np.where(audio, frames + (q + j) // self.n_q, frames)

    def _choice(self, steps_left: int | np.ndarray, ahead: int) -> tuple[np.ndarray, np.ndarray]:
        """Which of ``masks`` each sample may take from next and after each of ``ahead`` more codes, (B, ahead + 1),
        and where the end id is taken out of it (``nonempty``: the first token of a text output or a turn)."""
        i = self.index
        n_q = self.n_q
        s, q, frames = self._ahead(ahead)
        left = np.broadcast_to(np.asarray(steps_left), s.shape[:1])[:, None] - np.arange(ahead + 1)[None, :]
        choice = self.by_state[s]
        text = s == TEXT
        if text.any():
            mask = np.full(left.shape, i["text"])
            if self.layout.has_audio:
                mask = np.where(left < n_q + 3, i["text_no_media"], mask)
            if self.layout.has_image:
                short = np.where(left >= n_q + 3, i["text_no_image"], i["text_no_media"])
                mask = np.where(left < self.longest_image + 1, short, mask)  # room for the image and eos
            choice = np.where(text, np.where(left <= 1, i["eos"], mask), choice)
        audio = s == AUDIO
        if audio.any():
            mask = i["audio0"] + q  # the codebook of this position in the frame
            at_boundary = q == 0
            must_end = at_boundary & ((frames >= self.max_audio_frames) | (left <= n_q + 1))
            may_end = at_boundary & (frames >= 1)
            mask = np.where(may_end, i["audio0_or_eoa"], mask)
            choice = np.where(audio, np.where(must_end, i["eoa"], mask), choice)
        # text output, an assistant's turn: the first token does not end it
        no_end = text & (left > 1) & self.first[:, None] if self.nonempty else np.zeros(choice.shape, bool)
        return choice, no_end

    def allowed_ahead(self, steps_left: int | np.ndarray, ahead: int) -> torch.Tensor:
        """(B, ahead + 1, V) on the device: what each sample may take next and, inside a span, after each of
        ``ahead`` more codes (the masks a window of drafted codes is verified with)."""
        choice, no_end = self._choice(steps_left, ahead)
        allowed = self.masks[torch.from_numpy(choice).to(self.device)]  # a copy
        if no_end.any():
            allowed[..., self.eos] &= torch.from_numpy(~no_end).to(self.device)
        return allowed

    def id_range(self, steps_left: int | np.ndarray, ahead: int, spans: bool = False) -> tuple[int, int] | None:
        """The ids [lo, hi) from the first to the last that ``allowed_ahead`` allows any sample anywhere, from the
        masks' ranges on the host (None: none); with ``spans``, also every token of the span each sample is in, or
        of any span it may open (a sample in text): what its next windows' drafts may be drawn from (``_drafts``)."""
        choice, no_end = self._choice(steps_left, ahead)
        bounds = self.bounds[0][choice]
        if no_end.any():
            bounds = np.where(no_end[..., None], self.bounds[1][choice], bounds)
        lo, hi = int(bounds[..., 0].min()), int(bounds[..., 1].max())
        if spans:
            modality, text = self.modality(), self.state == TEXT
            for m in (Modality.IMAGE, Modality.AUDIO):
                if m in self.columns and ((modality == m) | text).any():
                    lo, hi = min(lo, self.columns[m][0]), max(hi, self.columns[m][1])
        return (lo, hi) if lo < hi else None

    def advance(self, token: Sequence[int] | np.ndarray, moving: np.ndarray | None = None) -> None:
        """Move every sample's state past its new token (B,); with ``moving`` (B,) only those samples (in a window
        of drafts, samples take different numbers of tokens). Only the states some sample is in are looked at."""
        token = np.asarray(token, dtype=np.int64)
        before = {name: getattr(self, name) for name in self._ROW_STATE}
        L, s = self.layout, self.state
        new, present = s.copy(), set(s.tolist())
        if TEXT in present:
            text = s == TEXT
            if L.has_image:
                new[text & (token == L.boi_id)] = ROWS
            if L.has_audio:
                starts = text & (token == L.boa_id)
                new[starts] = AUDIO
                self.q, self.frames = np.where(starts, 0, self.q), np.where(starts, 0, self.frames)
            new[text & (token == self.eos)] = DONE
        if ROWS in present:
            self.rows = np.where(s == ROWS, L.grid_sides(token)[0], self.rows)
            new[s == ROWS] = COLS
        if COLS in present:
            self.remaining = np.where(s == COLS, self.rows * L.grid_sides(token)[1], self.remaining)
            new[s == COLS] = CODES
        if CODES in present:
            codes = s == CODES
            self.remaining = self.remaining - codes
            new[codes & (self.remaining == 0)] = EOI
        if EOI in present:
            new[s == EOI] = TEXT
        if AUDIO in present:
            ends = (s == AUDIO) & (token == L.eoa_id)
            code = (s == AUDIO) & ~ends
            self.q = np.where(code, (self.q + 1) % self.n_q, self.q)
            self.frames = np.where(code & (self.q == 0), self.frames + 1, self.frames)
            new[ends] = TEXT
        if self.cfg.output in ("image", "audio"):  # the requested span was the whole output
            new[(new == TEXT) & (s != TEXT)] = DONE
        self.state = new
        self.first = np.zeros_like(self.first)
        if moving is not None:
            for name, old in before.items():
                setattr(self, name, np.where(moving, getattr(self, name), old))

    _ROW_STATE = ("state", "remaining", "rows", "q", "frames", "first")

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these samples, in this order (a server's batch after some requests finished)."""
        for name in self._ROW_STATE:
            setattr(self, name, getattr(self, name)[np.asarray(rows, dtype=np.int64)])

    def extend(self, other: Grammar) -> None:
        """Append ``other``'s samples (same layout, end id and settings: the masks are shared)."""
        for name in self._ROW_STATE:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))

    def modality(self) -> np.ndarray:
        """The ``Modality`` code (TEXT, IMAGE or AUDIO) whose sampling settings each sample uses now (B,)."""
        return STATE_MODALITY[self.state]


def _bounds(masks: torch.Tensor) -> np.ndarray:
    """Per row of (n, V) boolean masks on the CPU, the ids from the first allowed to the last, [lo, hi), as (n, 2);
    (V, 0) for a row that allows none."""
    m = masks.numpy()
    V = m.shape[-1]
    bounds = np.stack([m.argmax(-1), V - m[:, ::-1].argmax(-1)], -1)
    return np.where(m.any(-1)[:, None], bounds, [V, 0])


class Logits(NamedTuple):
    """Logits of the ids [lo, lo + values.shape[-1]) along the last dimension: a decoding pass computes only the ids
    its picks and drafts may take (``head_columns``), a prefill computes them all (lo 0)."""
    values: torch.Tensor
    lo: int = 0

    def rows(self, index) -> Logits:
        return Logits(self.values[index], self.lo)

    def columns(self, lo: int, hi: int) -> torch.Tensor:
        """The logits of the ids [lo, hi): a view when the pass computed them all, else a copy with -inf where it
        did not (ids no pick may take)."""
        start, end, width = lo - self.lo, hi - self.lo, self.values.shape[-1]
        if 0 <= start and end <= width:
            return self.values[..., start:end]
        out = self.values.new_full((*self.values.shape[:-1], hi - lo), float("-inf"))
        a, b = max(start, 0), min(end, width)
        if a < b:
            out[..., a - start:b - start] = self.values[..., a:b]
        return out


def _take(grammar: Grammar, cfg: SamplingConfig, cond: Logits, guided: list[int], uncond: Logits | None,
          allowed: torch.Tensor, drafts: list[list[int]], proposals: list[torch.Tensor | None],
          generators: Sequence[torch.Generator] | None) -> tuple[list[list[int]], list[_Ahead | None]]:
    """The tokens every sample takes after a decoding pass: one, picked from its logits after its last token, or (a
    sample that fed drafts) the drafts that stand and one more (``_verify``).

    ``cond`` (B, W, ·): each sample's logits after its last token and after each of its drafts; ``guided``: the
    samples with an unconditional row, ``uncond`` (len(guided), W, ·) those rows' logits; ``allowed`` (B, W, V): the
    grammar's masks at each position; ``drafts[b]`` and ``proposals[b]`` (m, hi - lo): the window sample ``b`` fed and
    the distributions it was drawn from; ``generators``: the samples' own (None: greedy).

    Samples are handled by modality, each over its modality's columns (``Grammar.columns``: inside a span the span's
    ids, not the whole vocabulary), so a sample's arithmetic is the same whatever else is in its batch. Returns the
    tokens each takes (none for a sample that had ended) and, per drafting sample, what its pass says about the
    positions after them (``_Ahead``: where its next window starts, ``_drafts``)."""
    device, B = cond.values.device, len(drafts)
    modality, ended = grammar.modality().tolist(), (grammar.state == DONE).tolist()
    uncond_row = {b: j for j, b in enumerate(guided)}
    taken: list[list[int]] = [[] for _ in range(B)]
    predicted: list[_Ahead | None] = [None] * B
    for m, (lo, hi) in grammar.columns.items():
        s = cfg.of(m)
        for drafting in (False, True):
            rows = [b for b in range(B) if modality[b] == m and bool(drafts[b]) == drafting and not ended[b]]
            if not rows:
                continue
            w = 1 + max(len(drafts[b]) for b in rows)
            x = _part(cond, rows, w, lo, hi)
            a = (allowed if len(rows) == B else allowed[torch.tensor(rows, device=device)])[:, :w, lo:hi]
            mine = [i for i, b in enumerate(rows) if b in uncond_row]
            if mine:
                u = _part(uncond, [uncond_row[rows[i]] for i in mine], w, lo, hi)
                if len(mine) == len(rows):
                    x = _guided(x, u, a, s.guidance, s.plausibility)
                else:
                    j = torch.tensor(mine, device=device)
                    x = x.index_copy(0, j, _guided(x[j], u, a[j], s.guidance, s.plausibility))
            x = _filtered(x.flatten(0, 1), a.flatten(0, 1), s).view(len(rows), w, -1)
            gens = [None if generators is None or s.temperature == 0 else generators[b] for b in rows]
            if drafting:
                t, p = _verify(x, [[d - lo for d in drafts[b]] for b in rows], [proposals[b] for b in rows], gens)
            else:
                t, p = [[token] for token in _pick(x[:, 0], gens).tolist()], [None] * len(rows)
            for b, tb, pb in zip(rows, t, p):
                taken[b], predicted[b] = [token + lo for token in tb], pb
    return taken, predicted


def _part(t: Logits, rows: list[int], w: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``rows``, positions ``:w`` and ids [lo, hi) of ``t``: a view when the rows are all of ``t``'s in order
    (the usual case) and the ids were computed, else a copy."""
    if rows != list(range(len(t.values))):
        t = t.rows(torch.tensor(rows, device=t.values.device))
    return t.rows((slice(None), slice(None, w))).columns(lo, hi)


def _guided(c: torch.Tensor, u: torch.Tensor, allowed: torch.Tensor, scale: float, plausibility: float) -> torch.Tensor:
    """Guided logits ``u + scale * (c - u)`` of conditional rows ``c`` and their unconditional rows ``u``, over the
    tokens the conditional model finds plausible: those allowed with probability at least ``plausibility`` times the
    most likely allowed one's. Guidance rewards tokens by how much more likely the condition makes them, so without
    the floor a token both rows find near-impossible can win on noise in the logits' tail (a small model's images
    turn to blotches at guidance 3)."""
    c_allowed = c.masked_fill(~allowed, float("-inf"))
    log_floor = math.log(plausibility) if plausibility > 0 else float("-inf")
    implausible = c_allowed < c_allowed.max(-1, keepdim=True).values + log_floor
    # in place, the same numbers as u + scale * (c - u) (products and sums commute exactly): a window's logits are
    # megabytes, and each new tensor of that size costs more than the arithmetic on a CPU
    return c_allowed.sub_(u).mul_(scale).add_(u).masked_fill_(implausible, float("-inf"))


def _pick(x: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of filtered logits ``x`` (rows, V) (``_filtered``): for a row without a generator (greedy,
    or temperature 0) the most likely; else the row draws one uniform number from its own generator and takes the
    token where it falls in the cumulative distribution over token ids, so its draw depends neither on the other
    rows nor on how many candidates top-k / top-p left."""
    if all(g is None for g in generators):
        return x.argmax(-1)
    u = torch.cat([x.new_zeros(1) if g is None else torch.rand(1, generator=g, device=x.device) for g in generators])
    drawn = _draw(torch.softmax(x, dim=-1), u)
    if all(g is not None for g in generators):
        return drawn
    return torch.where(torch.tensor([g is None for g in generators], device=x.device), x.argmax(-1), drawn)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` (rows, V), the token where ``u`` (rows,) falls in the cumulative distribution over token
    ids (the most likely token when ``u`` lands on a float edge beside a token of probability 0)."""
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return torch.where(probs.gather(-1, token[:, None]).squeeze(-1) > 0, token, probs.argmax(-1))


def _filtered(logits: torch.Tensor, allowed: torch.Tensor, s: ModalitySampling) -> torch.Tensor:
    """The logits rows sample from (rows, V) with settings ``s``: the allowed tokens' divided by the temperature,
    everything outside the top-k and the top-p nucleus at -inf. Their softmax is the rows' distribution; at
    temperature 0 their argmax is the token."""
    x = logits.masked_fill(~allowed, float("-inf"))
    if s.temperature not in (0, 1):
        x = x / s.temperature
    V = x.shape[-1]
    k = s.top_k if 0 < s.top_k < V else V
    if s.top_p < 1:
        ranked = _largest(x, k)
        probs = torch.softmax(ranked, dim=-1)
        # the nucleus (the top candidate always stays), among the allowed candidates
        inside = (probs.cumsum(-1) - probs <= s.top_p) & (ranked > float("-inf"))
        return x.masked_fill(x < ranked.gather(-1, inside.sum(-1, keepdim=True) - 1), float("-inf"))
    if k < V:
        x = x.masked_fill(x < _largest(x, k)[:, -1:], float("-inf"))
    return x


def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values of each row of ``x`` (rows, V), in descending order. On a CPU numpy partitions the
    row and sorts only those: torch's CPU sort and topk always compute indices and are several times slower (2.5 ms
    vs 0.9 ms for 17 rows of a 52k vocabulary), which would dominate a decoding step; GPUs sort fast."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return x.topk(k, dim=-1).values
    a = x.numpy()
    if k < a.shape[-1]:
        a = np.partition(a, a.shape[-1] - k, axis=-1)[:, -k:]
    return torch.from_numpy(np.ascontiguousarray(np.sort(a, axis=-1)[:, ::-1]))


# ---------------------------------------------------------------- speculative Jacobi decoding
#
# Inside an image or audio span whose settings ask for it (``sjd_window``), a sample feeds its last token together
# with a window of drafted codes for the positions after it, and one forward pass gives the model's distribution
# after each of them. The drafts are checked in order by the speculative-sampling rule (Leviathan et al. 2023): draft
# ``d`` drawn from proposal ``q`` stands with probability min(1, p(d) / q(d)) under the model's distribution ``p``
# (the same one plain decoding samples: grammar, guidance, temperature, top-k, top-p); at the first draft that falls,
# the token is drawn from max(0, p - q) renormalised, and when all stand one more is drawn from the last ``p``. So
# every taken token follows the model's distribution exactly, whatever the drafts were; at temperature 0 a draft
# stands only when it is the argmax. The next window (Teng et al., "Accelerating Auto-regressive Text-to-Image
# Generation with Training-free Speculative Jacobi Decoding", ICLR 2025) starts with the model's latest predictions
# for the positions after the one that fell (the Jacobi iteration: each position refines its guess from the pass
# that saw the newer prefix), topped up with codes drawn from the last prediction restricted to what each position
# allows (the paper tops up with uniformly random codes). A position that already held a draft is re-drafted by
# maximal coupling with it (MC-SJD, ``_coupled``): the old code stays as often as the new distribution allows, so
# drafts stop changing from pass to pass once the model's predictions settle. Drafting the code one image row above
# instead (a fixed guess) was tried on the demo model and took as many passes. Unlike the paper's batch loop, each
# sample keeps its own number of accepted tokens (the cache forgets each row's fallen drafts), so a sample does not
# depend on its batch (beyond the model's rounding, above).


class _Ahead(NamedTuple):
    """What a window's pass says about the positions after the token a drafting sample took (over its modality's
    columns): the model's distributions there, the first proposals of its next window; and the drafts it had fed
    for them with the distributions those were drawn from, which the next drafts are coupled with."""
    dist: torch.Tensor  # (n, columns)
    drafts: list[int]  # at most n - 1
    proposals: torch.Tensor  # (len(drafts), columns)


def _verify(x: torch.Tensor, drafts: list[list[int]], proposals: list[torch.Tensor],
            generators: list[torch.Generator | None]) -> tuple[list[list[int]], list[_Ahead]]:
    """The tokens each drafting sample takes from its window, every row at once: ``x`` (rows, w + 1, V) the filtered
    logits after each row's last token and each of its drafts (a row with ``m`` < w drafts uses its first m + 1
    positions), ``drafts[r]`` its draft ids and ``proposals[r]`` (m, V) the distributions they were drawn from (all
    over ``x``'s columns), ``generators[r]`` its generator (None: greedy, a draft stands when it is the argmax).
    Returns per row the drafts that stand and one more token, and what the pass says about the positions after it
    (``_Ahead``). Each row draws its m + 1 uniform numbers from its own generator, as one row alone would."""
    R, W, V = x.shape
    device = x.device
    m = torch.tensor([len(d) for d in drafts], device=device)
    p = torch.softmax(x, dim=-1)  # (R, W, V)
    d = torch.zeros((R, W - 1), dtype=torch.long, device=device)
    q = x.new_zeros((R, W - 1, V))
    u = x.new_zeros((R, W))
    for r, (row, proposal, g) in enumerate(zip(drafts, proposals, generators)):
        d[r, :len(row)] = torch.tensor(row, device=device)
        q[r, :len(row)] = proposal
        if g is not None:
            u[r, :len(row) + 1] = torch.rand(len(row) + 1, generator=g, device=device)
    greedy = torch.tensor([g is None for g in generators], device=device)
    best = x.argmax(-1)  # (R, W)
    p_d, q_d = p[:, :-1].gather(-1, d[..., None]).squeeze(-1), q.gather(-1, d[..., None]).squeeze(-1)
    ok = torch.where(greedy[:, None], d == best[:, :-1], u[:, :-1] * q_d < p_d)  # u < p / q, without dividing by q
    ok &= torch.arange(W - 1, device=device)[None, :] < m[:, None]
    stand = ok.long().cumprod(1).sum(1)  # (R,)
    rows = torch.arange(R, device=device)
    p_s = p[rows, stand]
    residual = (p_s - q[rows, stand.clamp(max=W - 2)]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_s)  # p == q: falls only on a float edge
    rest = torch.where((stand < m)[:, None], residual, p_s)  # all stood: one more from the last distribution
    token = torch.where(greedy, best[rows, stand], _draw(rest, u[rows, m]))
    taken = [row[:s] + [t] for row, s, t in zip(drafts, stand.tolist(), token.tolist())]
    return taken, [_Ahead(p[r, s + 1:k + 1], row[s + 1:], proposal[s + 1:])
                   for r, (row, proposal, s, k) in enumerate(zip(drafts, proposals, stand.tolist(), m.tolist()))]


def _drafts(grammar: Grammar, left: np.ndarray, cfg: SamplingConfig, predicted: list[_Ahead | None],
            last: Logits, generators: Sequence[torch.Generator] | None) -> tuple[list[list[int]], list]:
    """Each sample's next window: inside a span whose modality has ``sjd_window`` > 0, up to that many codes, never
    past the span's last code, the audio duration limit or the sample's budget. First the model's latest
    predictions for those positions (``predicted[b]``, from ``_take``), then draws from the last logits ``last``
    (B, ·) restricted to what each position allows; all over the sample's modality's columns (``Grammar.columns``).
    ``generators``: the samples' own (None: greedy; a modality at temperature 0 drafts greedily too). Returns the
    drafts and, per sample, the distributions they were drawn from (m, hi - lo) (None without drafts)."""
    s, device, n_q = grammar.state, grammar.device, grammar.n_q
    modality = grammar.modality().tolist()
    width = np.array([cfg.of(m).sjd_window for m in modality])
    # positions where a code may come: before the image's <|eoi|>, before the frame limit or the budget force <|eoa|>
    audio_room = np.minimum((grammar.max_audio_frames - grammar.frames) * n_q - grammar.q, left - n_q - 1)
    room = np.where(s == CODES, grammar.remaining, np.where(s == AUDIO, audio_room, 0))
    count = np.minimum(np.minimum(width, room), left - 1).clip(min=0).tolist()
    B = len(count)
    if max(count) == 0:
        return [[] for _ in range(B)], [None] * B
    have = [0 if predicted[b] is None else min(len(predicted[b].dist), count[b]) for b in range(B)]
    # the positions past what the last pass predicted: topped up from the last logits under each position's mask
    top_up = [(b, j) for b in range(B) for j in range(have[b], count[b])]
    fresh: dict[tuple[int, int], torch.Tensor] = {}
    if top_up:
        masks = grammar.allowed_ahead(left, max(count))
        for m, (lo, hi) in grammar.columns.items():
            pairs = [(b, j) for b, j in top_up if modality[b] == m]
            if pairs:
                b, j = (torch.tensor(c, device=device) for c in zip(*pairs))
                x = last.rows(b).columns(lo, hi)
                fresh.update(zip(pairs, torch.softmax(_filtered(x, masks[b, j, lo:hi], cfg.of(m)), -1)))
    drafts, proposals = [], []
    for b, k in enumerate(count):
        lo, hi = grammar.columns[modality[b]]
        q = last.values.new_zeros((0, hi - lo)) if predicted[b] is None else predicted[b].dist[:have[b]]
        q = torch.cat([q, *(fresh[b, j][None] for j in range(have[b], k))])  # a new tensor
        if k and grammar.layout.has_audio and modality[b] == Modality.AUDIO:
            q[:, grammar.layout.eoa_id - lo] = 0  # drafts are codes: the masks of a window assume its span goes on
            empty = torch.nonzero(q.sum(-1) <= 0).flatten()
            q = q[: int(empty[0])] if len(empty) else q  # a position that can only end the span ends the window
            q = q / q.sum(-1, keepdim=True)
        if len(q) == 0:
            drafts.append([])
            proposals.append(None)
            continue
        g = None if generators is None or cfg.of(modality[b]).temperature == 0 else generators[b]
        if g is None:
            d = q.argmax(-1)
        else:  # two numbers a position: whether the last window's draft stays, and a draw
            u = torch.rand(2, len(q), generator=g, device=device)
            d = _draw(q, u[1]) if predicted[b] is None else _coupled(q, predicted[b], u)
        drafts.append((d + lo).tolist())
        proposals.append(q)
    return drafts, proposals


def _coupled(q: torch.Tensor, ahead: _Ahead, u: torch.Tensor) -> torch.Tensor:
    """Drafts that follow ``q`` (n, columns) exactly and keep the last window's drafts for the same positions
    (``ahead.drafts``, drawn from ``ahead.proposals``) as often as that allows: the maximal coupling of MC-SJD (So et
    al., "MC-SJD: Maximal Coupling Speculative Jacobi Decoding for Autoregressive Visual Generation Acceleration",
    2025). An old draft ``d`` stays with probability min(1, q(d) / q_old(d)) (``u[0]``), else the new one is drawn
    from max(0, q - q_old) renormalised (``u[1]``); positions without an old draft draw from ``q``. Each new draft is
    distributed as ``q`` whatever the old one was, so verifying it against ``q`` stays exact; but where the model's
    prediction barely moved between passes the token stays, and the positions after it are verified against
    predictions made from the same token. Drawn independently, the drafts of a flat image distribution change every
    pass and seldom match what the next positions were predicted from (the paper reports image generation up to
    4.2x faster than plain decoding, against SJD's about 2x)."""
    d = _draw(q, u[1])
    n = min(len(ahead.drafts), len(q))
    if n == 0:
        return d
    old, new, q_old = torch.tensor(ahead.drafts[:n], device=q.device), q[:n], ahead.proposals[:n]
    stays = u[0, :n] * q_old.gather(-1, old[:, None]).squeeze(-1) < new.gather(-1, old[:, None]).squeeze(-1)
    residual = (new - q_old).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, new)  # q == q_old: the old one stays
    return torch.cat([torch.where(stays, old, _draw(residual, u[1, :n])), d[n:]])


def unconditional(prefix: list[int], layout: TokenLayout, request: Request | None = None) -> list[int]:
    """The unconditional version of a sequence about to open a media span, as conditioning dropout makes it in
    training: in a conversation, its ``request`` applied (the last user turn's content emptied, ``chat.py``);
    otherwise the text right before the span dropped (back to the previous media span or to bos)."""
    if request is not None:
        start, stop, replacement = request
        return prefix[:start] + list(replacement) + prefix[stop:]
    modality = layout.modality_of(np.asarray(prefix[1:], dtype=np.int64))
    kept = np.flatnonzero(modality != Modality.TEXT)
    return prefix[: 2 + int(kept[-1])] if len(kept) else prefix[:1]


def span_opener(layout: TokenLayout, cfg: SamplingConfig) -> list[int]:
    """The ids a sample starts with: the span's opener when the output is one image or one sound, else none."""
    if cfg.output == "image":
        return [layout.boi_id]
    return [layout.boa_id] if cfg.output == "audio" else []


def head_columns(ranges: Sequence[tuple[int, int] | None], vocab_size: int) -> tuple[int, int] | None:
    """The one range of ids [lo, hi) that holds every range of ``ranges`` (None: no id), when it is at most half the
    vocabulary, else None: which logits a decoding pass must compute. The ranges are ``Grammar.id_range``'s: what the
    next picks may take and, with SJD, every token of each sample's span (the next window's drafts are topped up from
    the pass's last logits, ``_drafts``). Inside media spans (the codes, their markers, the padding of samples that
    ended) it leaves out the text; while any sample is in text, everything."""
    ranges = [r for r in ranges if r is not None]
    if not ranges:
        return None
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return (lo, hi) if hi - lo <= vocab_size // 2 else None


def _right_padded(rows: list[list[int]], width: int, pad: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decoding pass feeds: each row's ids (its last token, then its drafts) padded on the right to ``width``,
    and which of them are real."""
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=device)
    return ids, valid


def _advance_columns(grammar: Grammar, taken: list[list[int]], pad: int) -> list[tuple[int, int, int, int]]:
    """Moves every sample's grammar past the tokens it took after a pass, column by column (a window's drafts are
    codes: only a sample's last token can end it); returns (sample, token, state before, state after) in order."""
    out = []
    for col in range(max(len(t) for t in taken)):
        moving = [col < len(t) for t in taken]
        tokens = [t[col] if m else pad for t, m in zip(taken, moving)]
        before = grammar.state.tolist()
        grammar.advance(tokens, None if all(moving) else np.array(moving))
        out += [(b, tokens[b], before[b], after) for b, after in enumerate(grammar.state.tolist()) if moving[b]]
    return out


def _span_event(before: int, after: int) -> str | None:
    """What a token did to its sample's media spans, from the grammar states before and after it: "open" (one
    opened), "image" / "audio" (one of that kind closed), None (neither)."""
    if before == TEXT and after in (ROWS, AUDIO):
        return "open"
    if before in (EOI, AUDIO) and after in (TEXT, DONE):
        return "image" if before == EOI else "audio"
    return None


def _left_padded(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(r) for r in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool, device=device)
    for b, r in enumerate(seqs):  # every row's last token at the same position
        ids[b, width - len(r):] = torch.tensor(r, device=device)
        valid[b, width - len(r):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return ids, valid, positions


SpanCallback = Callable[[int, str, list[int]], None]


def new_token_budget(model, cfg: SamplingConfig, prompt_lengths: list[int]) -> list[int]:
    """How many new tokens each prompt may get: ``max_new_tokens``, limited so that prompt and output fit in the
    model's ``max_position_embeddings`` (beyond them a model trained on shorter sequences has never seen a position,
    and a RoPE model's output degrades). The limit is per prompt, so a sample does not depend on its batch; a prompt
    that leaves no room (or, for image output, no room for a whole image) is refused."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is None:
        return [cfg.max_new_tokens] * len(prompt_lengths)
    budget = []
    for n in prompt_lengths:
        room = min(cfg.max_new_tokens, context - n)
        if room < 1:
            raise OmnitokError(f"a prompt of {n} tokens leaves no room in the model's {context} positions")
        budget.append(room)
    return budget


@torch.inference_mode()
def generate(model, layout: TokenLayout, prompts: list[list[int]], eos_id: int, cfg: SamplingConfig,
             seeds: list[int] | None = None, on_span: SpanCallback | None = None,
             forbidden: Sequence[int] = (), nonempty: bool = False,
             requests: Sequence[Request | None] | None = None, compiled: bool = False) -> list[list[int]]:
    """Continue each prompt (ids, normally starting with bos); returns the new ids of each, ending at ``eos_id``
    (the text eos; the end of an assistant's turn in a chat) or when ``max_new_tokens`` are used, always with every
    media span complete. ``forbidden`` ids are never sampled (in a chat: bos, eos, other control tokens); with
    ``nonempty`` the first new token does not end the sample (an assistant's turn is never empty). ``requests[b]``:
    what guidance's unconditional row drops from chat prompt ``b`` (``unconditional``).

    ``seeds[b]`` seeds sample ``b`` (default ``0, 1, 2, ...``). ``on_span(b, modality, ids)`` is called as soon as
    a span of sample ``b`` closes (its ids from the opening marker to the closing one), so media can be decoded while
    sampling goes on. ``compiled``: the decoder's layers under ``torch.compile`` (``Decoder``).
    """
    if not prompts or any(not p for p in prompts):
        raise OmnitokError("every prompt needs at least one token")
    decoder = Decoder(model, compiled)
    device, B = decoder.device, len(prompts)
    seeds = list(range(B)) if seeds is None else seeds
    requests = [None] * B if requests is None else list(requests)
    if len(seeds) != B or len(requests) != B:
        raise OmnitokError(f"{len(seeds)} seeds and {len(requests)} requests for {B} prompts")
    opener = span_opener(layout, cfg)
    budget = new_token_budget(model, cfg, [len(p) + len(opener) for p in prompts])
    grammar = Grammar(layout, eos_id, cfg, B, device, forbidden, nonempty)
    if cfg.output == "image" and min(budget) < grammar.longest_image:
        raise OmnitokError(f"only {min(budget)} new tokens fit in the model's positions after the prompt: too few "
                           f"for an image span of up to {grammar.longest_image} tokens")
    generators = None if cfg.greedy else [torch.Generator(device=device).manual_seed(check_seed(s))
                                          for s in seeds]
    guided = {m for m in (Modality.IMAGE, Modality.AUDIO) if cfg.of(m).guidance != 1}

    def wants_guidance() -> list[int]:
        """The samples that need an unconditional row now: inside a guided span."""
        return [b for b, m in enumerate(grammar.modality().tolist()) if m in guided] if guided else []

    uncond_of = wants_guidance()  # the sample of each unconditional row (rows B, B+1, ...)
    seqs = [list(p) + opener for p in prompts] + [unconditional(prompts[b], layout, requests[b]) + opener
                                                 for b in uncond_of]
    cache = decoder.new_cache(len(seqs), capacity=max(len(r) for r in seqs) + max(budget))
    ids, valid, positions = _left_padded(seqs, layout.pad_id, device)
    logits = Logits(decoder.forward(cache, ids, valid, positions)[:, None])  # (rows, window, V)
    next_pos = positions[:, -1] + 1
    new: list[list[int]] = [[] for _ in range(B)]
    span_start = [0] * B  # where each sample's current span opened, in ``opener + new[b]``
    budget_left = np.array(budget)
    drafts: list[list[int]] = [[] for _ in range(B)]  # each sample's drafts, fed after its last token
    proposals: list[torch.Tensor | None] = [None] * B  # the distributions they were drawn from (m, columns)
    allowed = grammar.allowed_ahead(budget_left, 0)  # (B, w + 1, V): what each position of the window may take
    # the logits a pass computes: those its picks may take, and (SJD) those the next window's drafts may be drawn from
    drafting_on = cfg.widest_window > 0
    for _ in range(max(budget)):  # every sample takes at least one token a pass
        width = logits.values.shape[1] - 1
        taken, predicted = _take(grammar, cfg, logits.rows(slice(B)), uncond_of, logits.rows(slice(B, None)), allowed,
                                 drafts, proposals,
                                 generators)
        # the conditional logits after each sample's window (guided ones hide what the last position did not allow)
        last = Logits(torch.stack([logits.values[b, len(drafts[b])] for b in range(B)]), logits.lo)
        if width:  # the cache forgets the drafts that fell (an unconditional row keeps what its sample keeps)
            stood = torch.tensor([max(len(t) - 1, 0) for t in taken], device=device)
            stood = torch.cat([stood, stood[torch.tensor(uncond_of, dtype=torch.long, device=device)]])
            cache.rewind(stood + 1, width + 1)
            next_pos = next_pos + stood
        for b, token, before, after in _advance_columns(grammar, taken, layout.pad_id):
            new[b].append(token)
            event = _span_event(before, after)
            if event == "open":
                span_start[b] = len(opener) + len(new[b]) - 1
            elif event and on_span is not None:
                on_span(b, event, (opener + new[b])[span_start[b]:])
        budget_left = budget_left - np.array([len(t) for t in taken])
        states = grammar.state.tolist()
        if all(st == DONE for st in states):
            break
        wanted = wants_guidance()
        if wanted != uncond_of:
            keep = [j for j, b in enumerate(uncond_of) if b in wanted]
            joining = [b for b in wanted if b not in uncond_of]
            if len(keep) < len(uncond_of):
                rows = torch.tensor(list(range(B)) + [B + j for j in keep], device=device)
                cache.select(rows)
                next_pos = next_pos[rows]
            uncond_of = [uncond_of[j] for j in keep]
            if joining:  # prefill their unconditional prefixes, then splice them in
                # what the conditional row has been fed so far: all but the last token taken
                prefixes = [unconditional(list(prompts[b]) + opener + new[b][:-1], layout, requests[b])
                            for b in joining]
                extra = decoder.new_cache(len(joining), capacity=max(len(p) for p in prefixes))
                ids, valid, positions = _left_padded(prefixes, layout.pad_id, device)
                decoder.forward(extra, ids, valid, positions)
                cache.extend(extra)
                next_pos = torch.cat([next_pos, positions[:, -1] + 1])
                uncond_of += joining
        drafts, proposals = _drafts(grammar, budget_left, cfg, predicted, last, generators)
        window = decoder.window_width(1 + max(len(d) for d in drafts), 1 + cfg.widest_window)
        fed_rows = [([t[-1]] if t else [layout.pad_id]) + d for t, d in zip(taken, drafts)]
        fed_rows += [fed_rows[b] for b in uncond_of]
        step_ids, step_valid = _right_padded(fed_rows, window, layout.pad_id, device)
        step_pos = next_pos[:, None] + torch.arange(window, device=device)
        allowed = grammar.allowed_ahead(budget_left, window - 1)  # the next picks' (drafts are codes of the span)
        columns = head_columns([grammar.id_range(budget_left, window - 1, spans=drafting_on)], layout.vocab_size)
        logits = Logits(decoder.decode(cache, step_ids, step_valid, step_pos, columns), columns[0] if columns else 0)
        next_pos = next_pos + 1
    results = []
    for b in range(B):
        seq = opener + new[b]
        if eos_id in seq:
            seq = seq[: seq.index(eos_id) + 1]
        results.append(seq)
    return results
