import copy

import numpy as np
import pytest
import torch
from test_pretrain_parts import LAYOUT

from omnitok.errors import OmnitokError
from omnitok.model.build import ModelConfig, build_model
from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate
from omnitok.tokenizers.layout import TokenLayout

EOS = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
                    LAYOUT).eval()
    with torch.no_grad():  # random weights favour no token class; lift media starts so spans occur often
        m.lm_head.bias = None
        m.lm_head.weight[[LAYOUT.boi_id, LAYOUT.boa_id]] *= 0
    return m


def check(seq: list[int], layout=LAYOUT) -> list[tuple]:
    """An independent reading of the grammar: returns the spans, asserting well-formedness."""
    spans, i = [], 0
    modality = layout.modality_of(np.array(seq)) if seq else np.array([])
    while i < len(seq):
        t = seq[i]
        if t == layout.boi_id:
            r, c = layout.rows_of(seq[i + 1]), layout.cols_of(seq[i + 2])
            codes = seq[i + 3:i + 3 + r * c]
            assert len(codes) == r * c and all(modality[i + 3 + k] == 2 for k in range(r * c)), "image codes"
            assert seq[i + 3 + r * c] == layout.eoi_id, "image must close with <|eoi|>"
            spans.append(("image", r, c))
            i += 4 + r * c
        elif t == layout.boa_id:
            j = seq.index(layout.eoa_id, i)
            body = np.array(seq[i + 1:j])
            assert len(body) and len(body) % layout.audio_num_codebooks == 0, "whole frames"
            layout.audio_codes(body)  # raises if a codebook is out of order
            spans.append(("audio", len(body) // layout.audio_num_codebooks))
            i = j + 1
        else:
            assert modality[i] == 0, f"token {t} outside a span is not text"
            i += 1
    return spans


def well_formed_over_random_prompts(model, cfg: SamplingConfig, batch: int, seed: int = 0) -> dict[str, int]:
    """Samples 1000 random prompts, ``batch`` a batch (guidance rows joining and leaving), asserting every output
    and every span reported as it closed well formed; returns how many spans of each kind there were."""
    rng = np.random.default_rng(seed)
    kinds = {"image": 0, "audio": 0}
    for start in range(0, 1000, batch):
        prompts = [[1, *rng.integers(3, 50, rng.integers(1, 10)).tolist()] for _ in range(batch)]
        closed = []
        outputs = generate(model, LAYOUT, prompts, EOS, cfg, seeds=list(range(start, start + batch)),
                           on_span=lambda b, kind, ids: closed.append((b, kind, ids)))
        for b, out in enumerate(outputs):
            assert 0 < len(out) <= cfg.max_new_tokens
            spans = check(out)
            for span in spans:
                kinds[span[0]] += 1
                assert span[0] != "audio" or span[1] <= LAYOUT.audio_frames(cfg.max_audio_s)
            reported = [ids for c, _, ids in closed if c == b]
            assert len(reported) == len(spans) and all(check(ids) for ids in reported)  # every span, whole
    return kinds


def test_random_prompts_always_give_well_formed_output(model):
    cfg = SamplingConfig(text=ModalitySampling(1.0), image=ModalitySampling(1.0, guidance=2.0),
                         audio=ModalitySampling(1.0, top_k=8, guidance=1.5), max_new_tokens=60, max_audio_s=0.12)
    kinds = well_formed_over_random_prompts(model, cfg, batch=250)
    assert kinds["image"] > 20 and kinds["audio"] > 20  # both kinds of span were really exercised


def test_greedy_text_equals_hugging_face_generate(model):
    prompt = [1, 7, 9, 11, 3]
    ours = generate(model, LAYOUT, [prompt], EOS, SamplingConfig(greedy=True, output="text", max_new_tokens=25))[0]
    non_text = [i for i in range(LAYOUT.vocab_size) if i >= LAYOUT.text_vocab_size]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=25, min_new_tokens=1, do_sample=False,
                        suppress_tokens=non_text, eos_token_id=EOS, pad_token_id=LAYOUT.pad_id)[0, len(prompt):]
    assert ours == hf.tolist()[: len(ours)] and len(ours) >= min(len(hf), 25)


@torch.inference_mode()
def test_text_output_is_never_empty(model):
    """A model that wants to stop at once: "any" may stop at once, "text" writes at least one text token."""
    model = copy.deepcopy(model)
    model.lm_head.weight[EOS] *= 0
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(LAYOUT.vocab_size))
    model.lm_head.bias[EOS] = 30.0
    prompts = [[1, 5, 6], [1, 8]]
    assert generate(model, LAYOUT, prompts, EOS, SamplingConfig(max_new_tokens=10)) == [[EOS], [EOS]]
    for out in generate(model, LAYOUT, prompts, EOS, SamplingConfig(output="text", max_new_tokens=10)):
        assert out[0] < LAYOUT.text_vocab_size and out[0] != EOS and out[-1] == EOS and len(out) == 2


def test_output_image_always_yields_an_image_of_the_fixed_grid(model):
    prompts = [[1, 5, 6], [1, 8], [1, 30, 31, 32, 33]]
    cfg = SamplingConfig(output="image", grid=(2, 3), max_new_tokens=20)
    for out in generate(model, LAYOUT, prompts, EOS, cfg, seeds=[3, 4, 5]):
        assert out[0] == LAYOUT.boi_id and check(out) == [("image", 2, 3)]  # the image is the whole output
    for out in generate(model, LAYOUT, prompts, EOS, SamplingConfig(output="audio", max_new_tokens=12)):
        assert out[0] == LAYOUT.boa_id and [s[0] for s in check(out)] == ["audio"]


def test_bad_requests_get_clear_errors(model):
    from omnitok.tokenizers.layout import TokenLayout

    with pytest.raises(OmnitokError, match="outside 1..4"):
        generate(model, LAYOUT, [[1]], EOS, SamplingConfig(grid=(5, 5)))
    with pytest.raises(OmnitokError, match="cannot hold an image"):
        generate(model, LAYOUT, [[1]], EOS, SamplingConfig(output="image", max_new_tokens=10))
    with pytest.raises(OmnitokError, match="no image modality"):
        generate(model, TokenLayout(text_vocab_size=50), [[1]], EOS, SamplingConfig(output="image"))
    with pytest.raises(OmnitokError, match="output must be one of"):
        SamplingConfig(output="video")


def reference_cfg(model, prompt: list[int], cfg: SamplingConfig, seed: int = 0) -> list[int]:
    """Classifier-free guidance decoding written the slow, obvious way: full forward passes, no cache, one sample.
    The unconditional sequence of a span is the conditional one without the text right before the span."""
    from omnitok.model.sampler import AUDIO, DONE, EOI, ROWS, Grammar, _filtered, _pick

    generators = None if cfg.greedy else [torch.Generator().manual_seed(seed)]

    grammar = Grammar(LAYOUT, EOS, cfg, 1, torch.device("cpu"))
    def drop_text(seq):
        keep = len(seq)
        while keep > 1 and LAYOUT.modality_of(seq[keep - 1]) == 0:
            keep -= 1
        return seq[:keep]

    cond, uncond, out = list(prompt), None, []
    if cfg.output in ("image", "audio"):  # the prompt ends with the span's opener
        uncond = drop_text(cond[:-1]) + cond[-1:]
    for step in range(cfg.max_new_tokens):
        logits = model(torch.tensor([cond])).logits[0, -1]
        state = int(grammar.state[0])
        allowed = grammar.allowed(cfg.max_new_tokens - step)
        if ROWS <= state <= EOI or state == AUDIO:
            m = cfg.image if state != AUDIO else cfg.audio
            u = model(torch.tensor([uncond])).logits[0, -1]
            p = torch.softmax(logits.masked_fill(~allowed[0], float("-inf")), -1)
            logits = (u + m.guidance * (logits - u)).masked_fill(p < m.plausibility * p.max(), float("-inf"))
        settings = cfg.of(int(grammar.modality()[0]))
        gens = [None] if generators is None or settings.temperature == 0 else generators
        token = int(_pick(_filtered(logits[None], allowed, settings), gens)[0])
        grammar.advance(torch.tensor([token]))
        if int(grammar.state[0]) in (ROWS, AUDIO) and state not in (ROWS, AUDIO):  # a span opens
            uncond = drop_text(cond)
        out.append(token)
        cond.append(token)
        if uncond is not None:
            uncond.append(token)
        if int(grammar.state[0]) == DONE:
            break
    return out


@torch.inference_mode()
def test_guidance_matches_the_obvious_implementation_in_a_mixed_batch(model):
    cfg = SamplingConfig(text=ModalitySampling(1.0), image=ModalitySampling(1.0, guidance=2.5),
                         audio=ModalitySampling(1.0, guidance=1.7), max_new_tokens=50, max_audio_s=0.05)
    prompts = [[1, 5 + i, 6, 7 + i][: 2 + i % 3] for i in range(10)]
    seeds = list(range(10))
    ours = generate(model, LAYOUT, prompts, EOS, cfg, seeds=seeds)
    spans = [s[0] for out in ours for s in check(out)]
    assert "image" in spans and "audio" in spans  # guidance rows of both kinds joined and left
    for prompt, seed, out in zip(prompts, seeds, ours):
        assert out == reference_cfg(model, prompt, cfg, seed)
    greedy = SamplingConfig(greedy=True, output="image", grid=(3, 3), image=ModalitySampling(guidance=3.0),
                            max_new_tokens=20)
    batch = generate(model, LAYOUT, prompts, EOS, greedy)
    assert generate(model, LAYOUT, prompts[2:3], EOS, greedy)[0] == batch[2]


def test_guidance_one_is_no_guidance_and_guidance_changes_images(model):
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    cfg = dict(output="image", grid=(4, 4), max_new_tokens=24, greedy=True)
    plain = generate(model, LAYOUT, prompts, EOS, SamplingConfig(**cfg, image=ModalitySampling(guidance=1.0)))
    unguided = SamplingConfig(**cfg, image=ModalitySampling(guidance=1.0))
    assert plain == [[LAYOUT.boi_id] + reference_cfg(model, p + [LAYOUT.boi_id], unguided) for p in prompts]
    guided = SamplingConfig(**cfg, image=ModalitySampling(guidance=4.0))
    ours = generate(model, LAYOUT, prompts, EOS, guided)
    assert ours == [[LAYOUT.boi_id] + reference_cfg(model, p + [LAYOUT.boi_id], guided) for p in prompts]
    assert ours != plain


@torch.inference_mode()
def test_guided_tokens_are_plausible_under_the_conditional_model(model):
    """Strong guidance picks only image codes whose conditional probability is at least ``plausibility`` times the
    top allowed code's; with the floor off it picks codes outside that set."""
    model = copy.deepcopy(model)
    model.lm_head.weight *= 20  # peaked distributions with long tails, like a trained model's
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 30, 31]]
    codes = torch.zeros(LAYOUT.vocab_size, dtype=torch.bool)
    codes[slice(*LAYOUT.ranges["image"])] = True

    def implausible(floor: float) -> int:
        cfg = SamplingConfig(output="image", grid=(4, 4), max_new_tokens=24,
                             image=ModalitySampling(guidance=8.0, plausibility=floor))
        count = 0
        for prompt, out in zip(prompts, generate(model, LAYOUT, prompts, EOS, cfg, seeds=[0, 1, 2])):
            seq = prompt + out
            probs = torch.softmax(model(torch.tensor([seq])).logits[0], -1)
            for i in range(len(prompt), len(seq)):
                if codes[seq[i]]:
                    p = probs[i - 1][codes]
                    count += int(probs[i - 1, seq[i]] < 0.3 * p.max())
        return count

    assert implausible(0.3) == 0
    assert implausible(0.0) > 0


def test_a_seeded_sample_is_the_same_alone_or_in_any_batch(model):
    cfg = SamplingConfig(max_new_tokens=40, max_audio_s=0.06, image=ModalitySampling(top_k=10, guidance=2.0))
    prompts = [[1, 5, 6, 7], [1, 8], [1, 30, 31, 32, 33], [1, 12, 13]]
    batch = generate(model, LAYOUT, prompts, EOS, cfg, seeds=[10, 11, 12, 13])
    assert len({tuple(o) for o in batch}) == 4
    for i in (0, 3):
        assert generate(model, LAYOUT, [prompts[i]], EOS, cfg, seeds=[10 + i])[0] == batch[i]
    assert generate(model, LAYOUT, [prompts[0]], EOS, cfg, seeds=[99])[0] != batch[0]


def test_pick_samples_the_top_k_and_top_p_distributions():
    from omnitok.model.sampler import _filtered, _pick

    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    n = 6000
    logits = probs.log().expand(n, 5)
    allowed = torch.ones(n, 5, dtype=torch.bool)
    allowed[:, 0] = False  # a masked token is never drawn

    def freq(setting):
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        picks = _pick(_filtered(logits, allowed, setting), gens)
        return torch.bincount(picks, minlength=5).float() / n

    def expect(keep):
        p = torch.zeros(5)
        p[keep] = probs[keep] / probs[keep].sum()
        return p

    torch.testing.assert_close(freq(ModalitySampling()), expect([1, 2, 3, 4]), atol=0.02, rtol=0)
    torch.testing.assert_close(freq(ModalitySampling(top_k=2)), expect([1, 3]), atol=0.02, rtol=0)
    # nucleus 0.5 of the allowed mass: 0.4/0.95 alone is below it, so the top two stay
    torch.testing.assert_close(freq(ModalitySampling(top_p=0.5)), expect([1, 3]), atol=0.02, rtol=0)
    torch.testing.assert_close(freq(ModalitySampling(top_p=0.4)), expect([1]), atol=0, rtol=0)
    # the nucleus of the top-k, renormalised (0.4 / 0.85 > 0.45): top-k first, as transformers' warpers chain them
    torch.testing.assert_close(freq(ModalitySampling(top_p=0.45)), expect([1, 3]), atol=0.02, rtol=0)
    torch.testing.assert_close(freq(ModalitySampling(top_k=3, top_p=0.45)), expect([1]), atol=0, rtol=0)
    sharp = freq(ModalitySampling(temperature=0.5, top_k=3))  # p^2 over the top three
    torch.testing.assert_close(sharp, torch.tensor([0, .16, 0, .09, .0225]) / .2725, atol=0.02, rtol=0)


def test_what_a_sample_may_take_lies_in_its_modalitys_columns():
    """The sampler does a sample's arithmetic over its modality's columns only (``Grammar.columns``: inside a span,
    the span's ids), so a token allowed outside them could never be drawn: random walks through every state of
    layouts with both media, one, and a chat's markers, checked at every position of a window."""
    from omnitok.model.sampler import AUDIO, CODES, DONE, EOI, ROWS, Grammar

    layouts = [LAYOUT, TokenLayout(text_vocab_size=50, image_codebook_size=32, max_grid_side=4),
               TokenLayout(text_vocab_size=50, audio_codebook_sizes=(16, 8), audio_frame_rate=100.0),
               TokenLayout(text_vocab_size=50, image_codebook_size=32, max_grid_side=4,
                           audio_codebook_sizes=(16,) * 2, audio_frame_rate=100.0, chat=True)]
    generator = torch.Generator().manual_seed(0)
    for layout in layouts:
        cfg = SamplingConfig(max_new_tokens=80, max_audio_s=0.1)
        grammar = Grammar(layout, EOS, cfg, 64, torch.device("cpu"))
        seen = set()
        for step in range(cfg.max_new_tokens):
            allowed = grammar.allowed_ahead(cfg.max_new_tokens - step, 3)  # (B, 4, V)
            for b, m in enumerate(grammar.modality().tolist()):
                lo, hi = grammar.columns[m]
                assert allowed[b, 0].any() and not allowed[b, :, :lo].any() and not allowed[b, :, hi:].any()
            seen |= set(grammar.state.tolist())
            grammar.advance(torch.multinomial(allowed[:, 0].float(), 1, generator=generator).squeeze(1))
        assert {DONE} | ({ROWS, CODES, EOI} if layout.has_image else set()) | \
            ({AUDIO} if layout.has_audio else set()) <= seen
        assert all(hi - lo < layout.vocab_size for m, (lo, hi) in grammar.columns.items() if m)  # spans: a part


def test_an_audio_layout_without_images_samples_audio_of_at_most_max_audio_s():
    """Found with Mimi (test_codecs): asking for audio on a layout with no image modality named the missing
    <|boi|> before."""
    layout = TokenLayout(text_vocab_size=50, audio_codebook_sizes=(16, 8), audio_frame_rate=12.5)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1),
                        layout)
    cfg = SamplingConfig(output="audio", max_new_tokens=60, max_audio_s=0.4)
    for out in generate(model, layout, [[1, 5, 6]] * 3, 2, cfg, seeds=[0, 1, 2]):
        assert out[0] == layout.boa_id and out[-1] == layout.eoa_id
        codes = layout.audio_codes(np.asarray(out[1:-1]))  # whole frames, each codebook in its own range
        assert 1 <= codes.shape[1] <= 5 and (codes[1] < 8).all()  # 0.4 s at 12.5 frames/s: 5 frames


def test_inside_spans_only_the_spans_logits_are_computed_and_the_samples_do_not_change(model):
    """Once every sample is inside an image or audio span, a pass computes only the output rows of the ids its next
    picks (and drafts) may take (``head_columns``); the tokens are those of computing every logit, bit for bit."""
    from unittest import mock

    from omnitok.model import sampler
    from omnitok.model.decoder import Decoder

    prompts = [[1, 5 + i, 6][: 2 + i % 2] for i in range(6)]
    ranges = []  # the columns of every decoding pass (one-token steps and windows; not the prompts' prefills)
    decode = Decoder.decode

    def recorded(self, cache, ids, valid, positions, columns=None):
        ranges.append(columns)
        return decode(self, cache, ids, valid, positions, columns)

    for cfg in (SamplingConfig(output="image", grid=(3, 4), max_new_tokens=40,
                               image=ModalitySampling(top_k=8, guidance=2.0, sjd_window=3)),
                SamplingConfig(output="audio", max_new_tokens=40, max_audio_s=0.1,
                               audio=ModalitySampling(top_p=0.9, guidance=1.5)),
                SamplingConfig(max_new_tokens=40, image=ModalitySampling(sjd_window=4))):
        ranges.clear()
        with mock.patch.object(Decoder, "decode", recorded):
            ours = generate(model, LAYOUT, prompts, EOS, cfg, seeds=list(range(6)))
        with mock.patch.object(sampler, "head_columns", lambda ranges, vocab_size: None):
            assert ours == generate(model, LAYOUT, prompts, EOS, cfg, seeds=list(range(6)))
        restricted = [c for c in ranges if c is not None]
        if cfg.output == "image":  # the grid markers, the codes, <|eoi|>, the padding of samples that ended
            assert len(restricted) == len(ranges) > 4
            assert all(c[0] >= LAYOUT.pad_id and c[1] <= LAYOUT.ranges["image"][1] for c in restricted)
        elif cfg.output == "audio":  # once samples end, their padding id (at the text's end) and the last codebook
            # span more than half of this tiny vocabulary, and everything is computed
            assert len(restricted) > len(ranges) // 2
            assert all(c[0] >= LAYOUT.pad_id and c[1] <= LAYOUT.ranges["audio"][1] for c in restricted)
