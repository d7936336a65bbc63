import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ASSETS, PHOTOS
from PIL import Image
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio, short_time_objective_intelligibility
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from benchmarks.synthetic import write_shards
from omnitok.cli import main
from omnitok.eval.evaluate import (
    eval_audio_tokenizer,
    eval_image_tokenizer,
    eval_lm,
    eval_samples,
    frechet_distance,
    mel_image,
)
from omnitok.tokenizers.audio import AudioTokenizer, load_audio
from omnitok.tokenizers.image import ImageTokenizer
from omnitok.tokenizers.layout import TokenLayout
from omnitok.train.audio_losses import mel_spectrogram


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(6):
        Image.fromarray(PHOTOS[i % 4][40 * i:40 * i + 128, 30 * i:30 * i + 128]).save(root / f"p{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_image_report_matches_torchmetrics_on_the_same_tensors(tokdir, photos, tmp_path):
    report = eval_image_tokenizer(tokdir / "image", photos, tmp_path)
    tok = ImageTokenizer.from_dir(tokdir / "image")
    arrays = [tok.preprocess(str(p)) for p in sorted(photos.glob("p*.png"))]
    codes = tok.encode_preprocessed(arrays)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.stack(tok.decode(codes))).permute(0, 3, 1, 2).float() / 255
    assert report["images"] == 6 and "broken.png" in next(iter(report["unreadable"]))
    assert report["psnr"] == pytest.approx(float(peak_signal_noise_ratio(y, x, data_range=1.0)), abs=1e-4)
    assert report["ssim"] == pytest.approx(float(structural_similarity_index_measure(y, x, data_range=1.0)), abs=1e-4)
    used = np.unique(np.concatenate([c.reshape(-1) for c in codes]))
    assert report["codebook"]["usage"] == pytest.approx(len(used) / 256)
    assert 1 <= report["codebook"]["perplexity"] <= len(used)
    assert set(report["skipped"]) == {"fid"}
    for name in ("reconstructions.png", "codebook_usage.png"):
        with Image.open(tmp_path / name) as img:
            assert min(img.size) > 100
    assert json.loads((tmp_path / "image_report.json").read_text())["psnr"] == report["psnr"]


def test_fid_with_a_local_feature_network(tokdir, photos, tmp_path):
    class Features(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)

    torch.export.save(torch.export.export(Features(), (torch.rand(1, 3, 32, 32),)), str(tmp_path / "features.pt2"))
    report = eval_image_tokenizer(tokdir / "image", photos, tmp_path / "r", fid_features=tmp_path / "features.pt2")
    assert report["fid"] > 0 and "fid" not in report["skipped"]
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    b = rng.normal(size=(4000, 3)) + [1, 0, 0]  # unit Gaussians a unit apart: FID about 1
    assert frechet_distance(rng.normal(size=(4000, 3)), b) == pytest.approx(1.0, abs=0.15)


def test_audio_report_matches_torchmetrics(tokdir, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("speech_en_16k.wav", "speech_hello_22k.wav"):  # their first 1.5 s
        wave, rate = sf.read(ASSETS / name)
        sf.write(folder / name, wave[: int(1.5 * rate)], rate)
    report = eval_audio_tokenizer(tokdir / "audio", folder, tmp_path / "out")
    tok = AudioTokenizer.from_dir(tokdir / "audio")
    expected, intelligibility = [], []
    for name in sorted(p.name for p in folder.iterdir()):
        x = load_audio(str(folder / name), tok.sample_rate, tok.channels)
        y = tok.decode(tok.encode([(x, tok.sample_rate)]))[0][..., : x.shape[-1]]
        x = x[..., : y.shape[-1]]
        expected.append(float(scale_invariant_signal_distortion_ratio(torch.from_numpy(y), torch.from_numpy(x))))
        intelligibility.append(short_time_objective_intelligibility(torch.from_numpy(y[0]), torch.from_numpy(x[0]),
                                                                    tok.sample_rate).item())
    assert report["per_clip_si_sdr"] == pytest.approx(expected, abs=1e-3)
    assert report["per_clip_stoi"] == pytest.approx(intelligibility, abs=1e-3)  # torchmetrics' STOI, via pystoi
    assert all(0 <= s <= 1 for s in intelligibility)
    wave, rate = sf.read(tmp_path / "out" / "samples" / "clip1_original.wav", always_2d=True)
    assert rate == tok.sample_rate and wave.T == pytest.approx(x, abs=1e-4)  # the WAV pairs written for listening
    assert sf.info(tmp_path / "out" / "samples" / "clip1_reconstruction.wav").frames == x.shape[-1]
    assert report["mel_distance"] > 0 and len(report["codebooks"]) == tok.num_codebooks
    assert (tmp_path / "out" / "reconstructions.png").is_file() and (tmp_path / "out" / "codebook_usage.png").is_file()
    # a clip too short to measure (STOI, the longest mel window) and an empty one are listed, the others measured
    sf.write(folder / "blip.wav", wave[:100], rate)
    sf.write(folder / "empty.wav", wave[:0], rate)
    again = eval_audio_tokenizer(tokdir / "audio", folder, tmp_path / "again")
    assert again["per_clip_si_sdr"] == pytest.approx(report["per_clip_si_sdr"], abs=1e-4)
    assert list(again["too_short"]) == [str(folder / "blip.wav")] and min(again["too_short"].values()) < 0.01
    assert list(again["unreadable"]) == [str(folder / "empty.wav")]


def test_mel_image_draws_a_rising_chirp_rising():
    rate = 24_000
    t = np.arange(2 * rate) / rate
    chirp = torch.tensor(0.5 * np.sin(2 * np.pi * (200 * t + 1400 * t**2)), dtype=torch.float32)[None]  # 200->5800 Hz
    top = float(mel_spectrogram(chirp[None], rate, 1024, 64).max().log())
    image = mel_image(chirp, rate, top)
    assert image.shape == (64, 96, 3) and image.max() > 240
    brightest_row = image[:, :, 0].argmax(axis=0)  # row 0 is the top (highest frequencies)
    assert brightest_row[5] > brightest_row[48] > brightest_row[90]
    assert image[:, 5:, 0].max(axis=0).min() > 200  # the chirp is drawn all the way, on the clip's own scale
    assert mel_image(torch.zeros_like(chirp), rate, top).max() == 0  # silence is black on the original's scale


def test_lm_report_matches_a_plain_per_token_loss(model_dir, tokdir, tmp_path):
    from transformers import AutoModelForCausalLM

    layout = TokenLayout.load(tokdir / "layout.json")
    shards = write_shards(tmp_path / "shards", layout, 12, 5)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    from omnitok.data.shards import iter_samples

    sums, counts, longest = {}, {}, 0
    for _, tokens, _ in iter_samples(shards):
        longest = max(longest, len(tokens))
        ids = torch.from_numpy(tokens.astype(np.int64))[None]
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
        for t, loss in zip(ids[0, 1:].tolist(), nll.tolist()):
            name = ["text", "special", "image", "audio", "reserved"][int(layout.modality_of(np.array(t)))]
            sums[name] = sums.get(name, 0) + loss
            counts[name] = counts.get(name, 0) + 1
    # packed several documents to a sequence (the longest document fills one), each isolated: the same as alone
    for seq_len in (None, max(longest, layout.max_grid_side ** 2 + 4)):
        report = eval_lm(model_dir, [str(shards)], tmp_path / "lm.json", batch_size=3, seq_len=seq_len)
        assert report["documents"] == 12 and set(report["modalities"]) == set(counts)
        for name, m in report["modalities"].items():
            assert m["tokens"] == counts[name]
            assert m["loss"] == pytest.approx(sums[name] / counts[name], rel=1e-4)
        assert json.loads((tmp_path / "lm.json").read_text())["all"]["loss"] == pytest.approx(report["all"]["loss"])
    assert report["sequences"] < 12  # rows held several documents


def test_samples_report_counts_and_finds_broken_files(model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--model", str(model_dir), "--prompt", "a red circle", "--num-samples", "6", "--out",
                 str(out), "--max-new-tokens", "90"]) == 0
    report = eval_samples(out)
    assert report["samples"] == 6 and report["valid"]["image"] in (1.0, None) and not report["problems"]
    assert report["segments"]["image"] + report["segments"]["audio"] > 0
    assert main(["eval", "samples", str(out)]) == 0 and "6 samples" in capsys.readouterr().out
    broken = next(out.rglob("*.png"), None) or next(out.rglob("*.wav"))
    broken.write_bytes(b"garbage")
    report = eval_samples(out)
    assert len(report["problems"]) == 1 and broken.name in report["problems"][0]


def test_eval_usage_errors_are_one_line(capsys, tmp_path):
    assert main(["eval", "tokenizer", "--images", str(tmp_path)]) == 2
    assert "--image-tokenizer with --images" in capsys.readouterr().err
    assert main(["eval", "samples", str(tmp_path)]) == 2
    assert "no samples.json" in capsys.readouterr().err
    index = tmp_path / "samples.json"
    for text, says in [("{bad", "is not valid JSON"), ('{"samples": [{"id": "000"}]}', "does not hold `omnitok sample` "
                                                                                       "records")]:
        index.write_text(text)
        assert main(["eval", "samples", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    # a picture segment whose record lost its file name is a problem found, not a crash
    index.write_text(json.dumps({"samples": [{"id": "000", "new_tokens": 3, "stopped": "eos",
                                              "segments": [{"type": "image", "tokens": 3}]}]}))
    assert eval_samples(tmp_path)["problems"] == ["000/?: KeyError: 'file'"]


def _byte_vocab(directory, specials, chars, suffix=""):
    """vocab.json and merges.txt of a character-level BPE tokenizer (no merges): real tokenizer files, made here."""
    vocab = {}
    for token in [*specials, *chars, *(c + suffix for c in chars if suffix)]:
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random-weight CLIP saved as a Hugging Face directory with its processor files (tokenizer, image processor)."""
    import string

    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("clip")
    vocab = _byte_vocab(root, ["<|startoftext|>", "<|endoftext|>"], list(string.ascii_lowercase + " .,!?'"), "</w>")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=24)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=24, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)).save_pretrained(root)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    """A random-weight CLAP (HTSAT audio, RoBERTa text) with its processor files, inputs of at most 2 s at 48 kHz."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    root = tmp_path_factory.mktemp("clap")
    vocab = _byte_vocab(root, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], ByteLevel.alphabet())
    tokenizer = RobertaTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=40)
    features = ClapFeatureExtractor(feature_size=16, sampling_rate=48_000, max_length_s=2, truncation="rand_trunc",
                                    padding="repeatpad")
    torch.manual_seed(0)
    ClapModel(ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, projection_dim=16),
        audio_config=dict(spec_size=64, window_size=4, num_mel_bins=16, patch_size=4, patch_stride=(4, 4),
                          depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32, patch_embeds_hidden_size=16,
                          projection_dim=16, enable_fusion=False), projection_dim=16)).save_pretrained(root)
    ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(root)
    return root


PAIRS = ["a red circle", "a blue square on a green field", "nothing at all", "a yellow triangle"]


def test_clip_score_matches_clips_own_logits_and_torchmetrics(clip_dir):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    from omnitok.eval.alignment import Aligner

    pictures = [Image.fromarray(p[:96, :128]) for p in PHOTOS[:4]]
    cos = Aligner(clip_dir, "image").cosines(PAIRS, pictures)
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():  # the model's own forward: logits are the cosines times exp(logit_scale); the second
        # caption is longer than the model's 24 positions and is cut to them, as the tokenizer cuts (its end kept)
        out = model(**processor(text=PAIRS, images=pictures, return_tensors="pt", padding=True, truncation=True,
                                max_length=24))
    np.testing.assert_allclose(cos, out.logits_per_image.diagonal().numpy() / model.logit_scale.exp().item(), atol=1e-5)
    assert (cos > 0).any() and (cos < 0).any() and np.ptp(cos) > 0.01  # the check can tell pairs apart

    class Tensors(torch.nn.Module):  # torchmetrics 1.9 expects the feature tensors transformers 4 returned
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def get_text_features(self, *args, **kwargs):
            return model.get_text_features(*args, **kwargs).pooler_output

        def get_image_features(self, *args, **kwargs):
            return model.get_image_features(*args, **kwargs).pooler_output

    tensors = [torch.from_numpy(np.asarray(p)).permute(2, 0, 1) for p in pictures]
    for i in (0, 2, 3):  # torchmetrics: max(100 * cosine, 0) (it cuts long captions differently: no end token)
        reference = clip_score(tensors[i], PAIRS[i], model_name_or_path=lambda: (Tensors(), processor))
        assert float(reference) == pytest.approx(max(100 * cos[i], 0), abs=1e-3)


def test_clap_score_matches_claps_own_logits_on_resampled_mono_sound(clap_dir):
    import soxr
    from transformers import ClapModel, ClapProcessor

    from omnitok.eval.alignment import Aligner

    t = np.arange(24_000 * 3) / 24_000  # 3 s at 24 kHz, stereo: read as mono at 48 kHz and cut to the model's 2 s
    sounds = [np.stack([np.sin(2 * np.pi * f * t), np.sin(2 * np.pi * 1.5 * f * t)]).astype(np.float32) * 0.5
              for f in (220, 440, 880, 1760)]
    cos = Aligner(clap_dir, "audio").cosines(PAIRS, [(s, 24_000) for s in sounds])
    model, processor = ClapModel.from_pretrained(clap_dir).eval(), ClapProcessor.from_pretrained(clap_dir)
    waves = [soxr.resample(s.mean(0), 24_000, 48_000).astype(np.float32)[:96_000] for s in sounds]
    with torch.no_grad():
        out = model(**processor(text=PAIRS, audio=waves, sampling_rate=48_000, return_tensors="pt", padding=True))
    own = out.logits_per_audio.diagonal().numpy() / model.logit_scale_a.exp().item()
    np.testing.assert_allclose(cos, own, atol=1e-5)
    assert np.ptp(cos) > 0.01


def test_samples_are_scored_against_their_prompts_words(model_dir, clip_dir, clap_dir, tmp_path, capsys):
    from omnitok.eval.alignment import Aligner

    out = tmp_path / "s"
    photo = tmp_path / "photo.png"
    Image.fromarray(PHOTOS[0][:64, :64]).save(photo)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle\n  two   squares <image:{photo}> and a tone\n<image:{photo}>\n")
    assert main(["sample", "--model", str(model_dir), "--prompts", str(prompts), "--num-samples", "4", "--out",
                 str(out), "--max-new-tokens", "90"]) == 0
    capsys.readouterr()
    assert main(["eval", "samples", str(out), "--clip", str(clip_dir), "--clap", str(clap_dir)]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "eval_samples.json").read_text())
    records = json.loads((out / "samples.json").read_text())["samples"]
    assert [r["prompt_text"] for r in records[::4]] == ["a red circle", "two squares and a tone", ""]
    for name, modality, word in (("clip_score", "image", "CLIP"), ("clap_score", "audio", "CLAP")):
        pairs = [(f"{r['id']}/{s['file']}", r["prompt_text"]) for r in records if r["prompt_text"]
                 for s in r["segments"] if s["type"] == modality]
        scored = report[name]
        assert list(scored["per_segment"]) == [n for n, _ in pairs] and scored["pairs"] == len(pairs) > 0
        assert f"{word} score {scored['score']:.2f}" in said
        if modality == "image":  # the same numbers as the scorer on the files
            files = [Image.open(out / n) for n, _ in pairs]
            direct = Aligner(clip_dir, "image").cosines([t for _, t in pairs], files)
            np.testing.assert_allclose(list(scored["per_segment"].values()), direct, atol=1e-5)
            assert scored["score"] == pytest.approx(float(np.maximum(100 * direct, 0).mean()), abs=1e-3)
    # without models the scores are skipped with the reason; a directory of the wrong kind is one line
    assert set(eval_samples(out)["skipped"]) == {"clip_score", "clap_score"}
    assert main(["eval", "samples", str(out), "--clip", str(clap_dir)]) == 2
    assert "holds a ClapModel, not a CLIP-like (text, image) model" in capsys.readouterr().err
    assert main(["eval", "samples", str(out), "--clap", str(tmp_path / "missing")]) == 2
    assert "missing is not a model directory" in capsys.readouterr().err
