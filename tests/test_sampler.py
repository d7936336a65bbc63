import numpy as np
import pytest
import torch
from test_pretrain_parts import LAYOUT

from omnitok.errors import OmnitokError
from omnitok.model.build import ModelConfig, build_model
from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate

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


def test_random_prompts_always_give_well_formed_output(model):
    rng = np.random.default_rng(0)
    cfg = SamplingConfig(text=ModalitySampling(1.0), image=ModalitySampling(1.0), audio=ModalitySampling(1.0),
                         max_new_tokens=60, max_audio_frames=12, seed=1)
    kinds = {"image": 0, "audio": 0}
    for start in range(0, 1000, 100):  # 1000 prompts, 100 a batch
        prompts = [[1, *rng.integers(3, 50, rng.integers(1, 10)).tolist()] for _ in range(100)]
        outputs = generate(model, LAYOUT, prompts, EOS, cfg)
        for out in outputs:
            assert 0 < len(out) <= 60
            for span in check(out):
                kinds[span[0]] += 1
                if span[0] == "audio":
                    assert span[1] <= 12
    assert kinds["image"] > 20 and kinds["audio"] > 20  # both kinds of span were really exercised


def test_greedy_text_equals_hugging_face_generate(model):
    prompt = [1, 7, 9, 11, 3]
    ours = generate(model, LAYOUT, [prompt], EOS, SamplingConfig(greedy=True, output="text", max_new_tokens=25))[0]
    non_text = [i for i in range(LAYOUT.vocab_size) if i >= LAYOUT.text_vocab_size]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False, suppress_tokens=non_text,
                        eos_token_id=EOS, pad_token_id=LAYOUT.pad_id)[0, len(prompt):].tolist()
    assert ours == hf[: len(ours)] and len(ours) >= min(len(hf), 25)


def test_output_image_always_yields_an_image_of_the_fixed_grid(model):
    prompts = [[1, 5, 6], [1, 8], [1, 30, 31, 32, 33]]
    cfg = SamplingConfig(output="image", grid=(2, 3), max_new_tokens=20, seed=3)
    for out in generate(model, LAYOUT, prompts, EOS, cfg):
        spans = check(out)
        assert out[0] == LAYOUT.boi_id and spans[0] == ("image", 2, 3)
    for out in generate(model, LAYOUT, prompts, EOS, SamplingConfig(output="audio", max_new_tokens=12)):
        assert out[0] == LAYOUT.boa_id and check(out)[0][0] == "audio"


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
