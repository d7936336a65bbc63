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
    assert set(report["skipped"]) == {"fid", "clip_score"}
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
