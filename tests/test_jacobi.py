"""Speculative Jacobi decoding in media spans (``sampler.py``, ``sjd_window``): exact where it must be."""

import copy
from unittest import mock

import numpy as np
import pytest
import torch
from test_pretrain_parts import LAYOUT
from test_sampler import EOS, check, well_formed_over_random_prompts

from benchmarks.common import model_passes
from omnitok.errors import OmnitokError
from omnitok.model import sampler
from omnitok.model.build import ModelConfig, build_model
from omnitok.model.sampler import ModalitySampling, SamplingConfig, _filtered, _guided, generate


@pytest.fixture(scope="module")
def model():
    """A tiny random model with peaked distributions (drafts both stand and fall) that opens spans often."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
                    LAYOUT).eval()
    with torch.no_grad():
        m.lm_head.bias = None
        m.lm_head.weight[[LAYOUT.boi_id, LAYOUT.boa_id]] *= 0
        m.lm_head.weight *= 5
    return m


def passes(fn):
    """``fn()``'s result and how many forward passes it ran."""
    with model_passes() as seen:
        out = fn()
    return out, seen["passes"]


def with_sjd(cfg: SamplingConfig, image: int, audio: int) -> SamplingConfig:
    cfg = copy.deepcopy(cfg)
    cfg.image.sjd_window, cfg.audio.sjd_window = image, audio
    return cfg


PROMPTS = [[1, 5 + i, 6, 7 + i][: 2 + i % 3] for i in range(10)]


@pytest.mark.parametrize("output", ["image", "audio", "any"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_output_equals_plain_greedy_decoding_in_fewer_passes(model, output, guidance):
    cfg = SamplingConfig(greedy=True, output=output, max_new_tokens=60, max_audio_s=0.08,
                         grid=(4, 4) if output == "image" else None,
                         image=ModalitySampling(guidance=guidance), audio=ModalitySampling(guidance=guidance))
    sjd = with_sjd(cfg, 6, 5)
    ours = generate(model, LAYOUT, PROMPTS, EOS, sjd)
    assert ours == generate(model, LAYOUT, PROMPTS, EOS, cfg)
    assert all(check(o) is not None for o in ours)
    if output != "any":  # every sample is one span; alone, each takes fewer passes (a batch waits for its slowest)
        alone = [[passes(lambda: generate(model, LAYOUT, [p], EOS, c))[1] for p in PROMPTS] for c in (cfg, sjd)]
        assert sum(alone[1]) < sum(alone[0]), alone


def test_sampled_outputs_are_the_same_alone_or_in_a_mixed_batch(model):
    """Guidance rows verify the same windows; samples in text decode beside samples in spans; top-k applies."""
    cfg = SamplingConfig(max_new_tokens=60, max_audio_s=0.08,
                         image=ModalitySampling(top_k=10, guidance=2.0, sjd_window=8),
                         audio=ModalitySampling(guidance=1.5, sjd_window=4, top_p=0.9))
    batch = generate(model, LAYOUT, PROMPTS, EOS, cfg, seeds=list(range(10)))
    kinds = {span[0] for out in batch for span in check(out)}
    assert kinds == {"image", "audio"}
    assert [generate(model, LAYOUT, [p], EOS, cfg, seeds=[i])[0] for i, p in enumerate(PROMPTS)] == batch


@pytest.mark.slow
def test_spans_stay_well_formed_over_1000_random_prompts(model):
    cfg = SamplingConfig(text=ModalitySampling(1.0), image=ModalitySampling(1.0, guidance=2.0, sjd_window=6),
                         audio=ModalitySampling(1.0, top_k=8, guidance=1.5, sjd_window=5), max_new_tokens=60,
                         max_audio_s=0.12)
    kinds = well_formed_over_random_prompts(model, cfg, batch=250, seed=1)
    assert kinds["image"] > 50 and kinds["audio"] > 50


GRID = (1, 3)
IMAGE = ModalitySampling(temperature=1.0, top_k=12, guidance=2.0, sjd_window=2)


def exact_code_distributions(model, prompt: list[int]) -> list[torch.Tensor]:
    """The model's own marginal distributions of the 1st, 2nd and 3rd code of a 1x3 image after ``prompt``, with
    guidance (unconditional sequence: bos and the span), top-k and temperature, by full forward passes over every
    prefix of codes."""
    head = [LAYOUT.boi_id, LAYOUT.rows_id(GRID[0]), LAYOUT.cols_id(GRID[1])]
    codes = torch.arange(*LAYOUT.ranges["image"])
    allowed = torch.zeros(LAYOUT.vocab_size, dtype=torch.bool)
    allowed[codes] = True

    def next_code(prefixes: list[list[int]]) -> torch.Tensor:  # (n, K) for code prefixes
        c = model(torch.tensor([prompt + head + p for p in prefixes])).logits[:, -1]
        u = model(torch.tensor([[1] + head + p for p in prefixes])).logits[:, -1]
        mixed = _guided(c, u, allowed.expand_as(c), IMAGE.guidance, IMAGE.plausibility)
        x = _filtered(mixed, allowed.expand_as(c), IMAGE)
        return torch.softmax(x, -1)[:, codes]

    with torch.inference_mode():
        p1 = next_code([[]])[0]  # (K,)
        p2 = p1[:, None] * next_code([[int(a)] for a in codes])  # (K, K): joint of codes 1 and 2
        pairs = [[int(a), int(b)] for a in codes for b in codes]
        p3 = (p2.flatten()[:, None] * next_code(pairs)).sum(0)
    return [p1, p2.sum(0), p3]


def chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's goodness of fit, cells expected below 5 pooled."""
    from scipy.stats import chisquare

    counts, expected = counts.astype(np.float64), expected.astype(np.float64)
    assert counts[expected == 0].sum() == 0, "a code the model cannot give was given"
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def sampled_codes(model, prompt: list[int], n: int) -> np.ndarray:
    cfg = SamplingConfig(output="image", grid=GRID, image=IMAGE, max_new_tokens=8)
    out = []
    for start in range(0, n, 500):
        out += generate(model, LAYOUT, [prompt] * 500, EOS, cfg, seeds=list(range(start, start + 500)))
    return np.array([o[3:6] for o in out]) - LAYOUT.ranges["image"][0]  # (n, 3) after boi rows cols


@pytest.mark.slow
def test_sampled_codes_follow_the_models_distribution(model):
    """Over 4000 seeds, each of the three codes' frequencies fit the model's exact marginals (chi-square, every
    p-value above 0.001; the second and third codes come from verified drafts). A verifier that lets every draft
    stand fails the same test."""
    prompt = [1, 8, 9, 10]
    expected = exact_code_distributions(model, prompt)
    codes = sampled_codes(model, prompt, 4000)
    K = len(expected[0])
    p_values = [chi_square_p(np.bincount(codes[:, i], minlength=K), 4000 * expected[i].numpy()) for i in range(3)]
    print("p-values", p_values)
    assert min(p_values) > 1e-3, p_values

    verify = sampler._verify

    def credulous(x, drafts, proposals, generators):  # every draft stands: the output follows the drafts instead
        taken, rest = verify(x, drafts, proposals, generators)
        return [row + [t[-1]] for row, t in zip(drafts, taken)], rest

    with mock.patch.object(sampler, "_verify", credulous):
        wrong = sampled_codes(model, prompt, 4000)
    assert chi_square_p(np.bincount(wrong[:, 2], minlength=K), 4000 * expected[2].numpy()) < 1e-3


def test_coupled_drafts_follow_the_new_distribution_and_keep_the_old_ones_when_they_can():
    """MC-SJD's maximal coupling (``sampler._coupled``), 20000 positions of one call: with old drafts drawn from
    q_old, the new drafts' frequencies fit the new distribution q (chi-square), and a new draft equals the old one
    with probability sum(min(q_old, q)), the most any coupling allows (drawn independently: sum(q_old * q))."""
    g = torch.Generator().manual_seed(0)
    K, n = 12, 20000
    q_old = torch.softmax(torch.randn(K, generator=g) * 1.5, -1)
    q = torch.softmax(q_old.log() + 0.7 * torch.randn(K, generator=g), -1)
    old = torch.multinomial(q_old, n, replacement=True, generator=g)
    ahead = sampler._Ahead(q.expand(n, K), old.tolist(), q_old.expand(n, K))
    new = sampler._coupled(q.expand(n, K), ahead, torch.rand(2, n, generator=g))
    assert chi_square_p(np.bincount(new.numpy(), minlength=K), n * q.numpy()) > 1e-3
    same, most, independent = (new == old).float().mean(), torch.minimum(q_old, q).sum(), (q_old * q).sum()
    assert abs(same - most) < 0.015 and most > independent + 0.2, (same, most, independent)
    assert sampler._coupled(q[None], sampler._Ahead(q[None], [], q[:0]), torch.rand(2, 1)).shape == (1,)  # none old


def test_text_has_no_window():
    with pytest.raises(OmnitokError, match="sjd_window"):
        SamplingConfig(text=ModalitySampling(sjd_window=4))
    with pytest.raises(OmnitokError, match="sjd_window >= 0"):
        ModalitySampling(sjd_window=-1)
