"""Constrained interleaved decoding: our own loop over a Hugging Face causal LM with a KV cache.

Every sample carries a grammar state, and the tokens each state allows come as vectorised masks built from the
token layout (no per-token Python callbacks):

    TEXT   text ids; <|boi|> / <|boa|> when the output may hold images / audio; eos ends the sample
    ROWS   a <|rows_R|> token (or the fixed grid's)      COLS  a <|cols_C|> token
    CODES  image codes, exactly R*C of them               EOI   <|eoi|>, forced
    AUDIO  codes of codebook q = position in the frame; <|eoa|> only at a frame boundary, forced at the duration
           limit
    DONE   the sample has ended; it is fed padding and ignored

A budget rule keeps output well formed when ``max_new_tokens`` runs out: no image starts unless a whole one still
fits, <|eoa|> is forced when another frame would not, and eos is forced on the last step.

Sampling settings (temperature, top-k, top-p) are per modality of each sample's current state (text and image want
different settings; Chameleon and LlamaGen use top-k about 1000-2000 for images).

Not here yet: classifier-free guidance rows, media prompts, detokenization (the sampling issue's notes say what is
missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.layout import TokenLayout

TEXT, ROWS, COLS, CODES, EOI, AUDIO, DONE = range(7)
OUTPUTS = ("any", "text", "image", "audio")


@dataclass
class ModalitySampling:
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise OmnitokError("sampling: temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


@dataclass
class SamplingConfig:
    text: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=0.8, top_p=0.95))
    image: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=1.0, top_k=1000))
    audio: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=1.0, top_k=250))
    max_new_tokens: int = 1024
    max_audio_frames: int = 750  # 10 s of 75 Hz EnCodec frames
    grid: tuple[int, int] | None = None  # a fixed image grid (rows, cols); default: any the layout allows
    output: str = "any"  # "text", "image" or "audio" start that span at once (text: no media at all)
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise OmnitokError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.max_new_tokens < 1 or self.max_audio_frames < 1:
            raise OmnitokError("max_new_tokens and max_audio_frames must be at least 1")


class Grammar:
    """Per-sample decoding states and the masks of allowed next tokens, all as tensors over the batch."""

    def __init__(self, layout: TokenLayout, eos_id: int, cfg: SamplingConfig, batch: int, device: torch.device):
        self.layout, self.eos, self.cfg = layout, eos_id, cfg
        V, n_q = layout.vocab_size, max(layout.audio_num_codebooks, 1)
        if cfg.output == "image" and not layout.has_image or cfg.output == "audio" and not layout.has_audio:
            raise OmnitokError(f"this model's token layout has no {cfg.output} modality")
        if cfg.grid is not None:
            rows, cols = cfg.grid
            layout.rows_id(rows), layout.cols_id(cols)  # refuses a grid the layout cannot express
        self.max_codes = (cfg.grid[0] * cfg.grid[1]) if cfg.grid else layout.max_grid_side ** 2

        def mask(ids=(), ranges=()) -> torch.Tensor:
            m = torch.zeros(V, dtype=torch.bool)
            for a, b in ranges:
                m[a:b] = True
            m[list(ids)] = True
            return m

        text = layout.ranges["text"]
        starts = [layout.boi_id] * (layout.has_image and cfg.output == "any") + \
                 [layout.boa_id] * (layout.has_audio and cfg.output == "any")
        masks = {"text": mask(starts, [text]), "text_no_image": mask(starts[1:] if layout.has_image else starts,
                                                                     [text]),
                 "text_no_media": mask((), [text]), "eos": mask([eos_id]), "pad": mask([layout.pad_id])}
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
        self.masks = torch.stack([masks[n] for n in self.names]).to(device)  # (n_masks, V)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.n_q = n_q
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        self.state = zeros + {"any": TEXT, "text": TEXT, "image": ROWS, "audio": AUDIO}[cfg.output]
        self.remaining, self.rows, self.q, self.frames = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()

    def allowed(self, steps_left: int) -> torch.Tensor:
        """(B, V) boolean mask of the tokens each sample may take next."""
        i, s = self.index, self.state
        n_q = self.n_q
        text = i["text"]
        if steps_left <= 1:
            text = i["eos"]
        elif self.layout.has_image and steps_left < 4 + self.max_codes + 1:
            text = i["text_no_image"] if steps_left >= n_q + 3 else i["text_no_media"]
        elif self.layout.has_audio and steps_left < n_q + 3:
            text = i["text_no_media"]
        choice = torch.full_like(s, i["pad"])
        choice = torch.where(s == TEXT, text, choice)
        if self.layout.has_image:
            choice = torch.where(s == ROWS, i["rows"], choice)
            choice = torch.where(s == COLS, i["cols"], choice)
            choice = torch.where(s == CODES, i["codes"], choice)
            choice = torch.where(s == EOI, i["eoi"], choice)
        if self.layout.has_audio:
            audio = i["audio0"] + self.q  # the codebook of this position in the frame
            at_boundary = self.q == 0
            must_end = at_boundary & ((self.frames >= self.cfg.max_audio_frames) | (steps_left <= n_q + 1))
            may_end = at_boundary & (self.frames >= 1)
            audio = torch.where(may_end, i["audio0_or_eoa"], audio)
            audio = torch.where(must_end, i["eoa"], audio)
            choice = torch.where(s == AUDIO, audio, choice)
        return self.masks[choice]

    def advance(self, token: torch.Tensor) -> None:
        """Move every sample's state past its new token (B,)."""
        L, s = self.layout, self.state
        new = s.clone()
        if L.has_image:
            new = torch.where((s == TEXT) & (token == L.boi_id), ROWS, new)
            self.rows = torch.where(s == ROWS, token - L.rows_id(1) + 1, self.rows)
            cols = token - L.cols_id(1) + 1
            self.remaining = torch.where(s == COLS, self.rows * cols, self.remaining)
            new = torch.where(s == ROWS, COLS, new)
            new = torch.where(s == COLS, CODES, new)
            self.remaining = torch.where(s == CODES, self.remaining - 1, self.remaining)
            new = torch.where((s == CODES) & (self.remaining == 0), EOI, new)
            new = torch.where(s == EOI, TEXT, new)
        if L.has_audio:
            starts = (s == TEXT) & (token == L.boa_id)
            new = torch.where(starts, AUDIO, new)
            self.q = torch.where(starts, 0, self.q)
            self.frames = torch.where(starts, 0, self.frames)
            ends = (s == AUDIO) & (token == L.eoa_id)
            code = (s == AUDIO) & ~ends
            self.q = torch.where(code, (self.q + 1) % self.n_q, self.q)
            self.frames = torch.where(code & (self.q == 0), self.frames + 1, self.frames)
            new = torch.where(ends, TEXT, new)
        new = torch.where((s == TEXT) & (token == self.eos), DONE, new)
        self.state = new

    def modality(self) -> torch.Tensor:
        """0 text, 1 image, 2 audio: which sampling settings each sample uses now."""
        s = self.state
        return torch.where((s >= ROWS) & (s <= EOI), 1, torch.where(s == AUDIO, 2, 0))


def _pick(logits: torch.Tensor, allowed: torch.Tensor, modality: torch.Tensor, cfg: SamplingConfig,
          generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from masked logits (B, V), with the row's modality's temperature / top-k / top-p."""
    x = logits.float().masked_fill(~allowed, float("-inf"))
    if cfg.greedy:
        return x.argmax(-1)
    settings = (cfg.text, cfg.image, cfg.audio)
    temp = torch.tensor([m.temperature for m in settings], device=x.device)[modality]  # (B,)
    top_k = torch.tensor([m.top_k or x.shape[-1] for m in settings], device=x.device)[modality]
    top_p = torch.tensor([m.top_p for m in settings], device=x.device)[modality]
    zero_t = temp == 0
    x = x / torch.where(zero_t, 1.0, temp)[:, None]
    values, order = x.sort(dim=-1, descending=True)  # (B, V)
    kth = values.gather(-1, (top_k.clamp(max=x.shape[-1]) - 1)[:, None])  # (B, 1)
    values = values.masked_fill(values < kth, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    beyond = probs.cumsum(-1) - probs > top_p[:, None]  # tokens past the nucleus (the top one always stays)
    values = values.masked_fill(beyond, float("-inf"))
    choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator).squeeze(-1)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(zero_t, x.argmax(-1), sampled)


@torch.inference_mode()
def generate(model, layout: TokenLayout, prompts: list[list[int]], eos_id: int,
             cfg: SamplingConfig) -> list[list[int]]:
    """Continue each prompt (ids, normally starting with bos); returns the new ids of each, ending at eos or when
    ``max_new_tokens`` are used, always with every media span complete."""
    if not prompts or any(not p for p in prompts):
        raise OmnitokError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B = len(prompts)
    opener = {"image": [layout.boi_id] if cfg.output == "image" else [],
              "audio": [layout.boa_id] if cfg.output == "audio" else []}.get(cfg.output, [])
    rows = [list(p) + opener for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((B, width), layout.pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((B, width), dtype=torch.long, device=device)
    for b, r in enumerate(rows):  # left padding: every row's last prompt token is at the same position
        ids[b, width - len(r):] = torch.tensor(r, device=device)
        attention[b, width - len(r):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    grammar = Grammar(layout, eos_id, cfg, B, device)
    if cfg.output == "image" and cfg.max_new_tokens < 3 + grammar.max_codes + 1:
        raise OmnitokError(f"max_new_tokens {cfg.max_new_tokens} cannot hold an image of up to {grammar.max_codes} "
                           f"codes (needs {3 + grammar.max_codes + 1} with its markers)")
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if not cfg.greedy else None
    from transformers import DynamicCache

    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=DynamicCache(),
                use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    new = torch.zeros((B, 0), dtype=torch.long, device=device)
    for step in range(cfg.max_new_tokens):
        token = _pick(logits, grammar.allowed(cfg.max_new_tokens - step), grammar.modality(), cfg, generator)
        token = torch.where(grammar.state == DONE, layout.pad_id, token)
        grammar.advance(token)
        new = torch.cat([new, token[:, None]], dim=1)
        if bool((grammar.state == DONE).all()):
            break
        attention = torch.cat([attention, torch.ones((B, 1), dtype=attention.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    results = []
    for b in range(B):
        seq = opener + new[b].tolist()
        if eos_id in seq:
            seq = seq[: seq.index(eos_id) + 1]
        results.append([t for t in seq if t != layout.pad_id])
    return results
