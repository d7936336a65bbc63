import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from pystoi import stoi
from vector_quantize_pytorch import ResidualVQ

from omnitok.cli import main
from omnitok.errors import OmnitokError
from omnitok.tokenizers.audio import AudioTokenizer
from omnitok.train.codec import CodecTask, load_codec_config, train_codec

ASSETS = Path(__file__).parent / "assets"
SMALL = ["model.sizes={num_filters: 8, hidden_size: 32, codebook_dim: 32, codebook_size: 256, "
         "target_bandwidths: [1.2, 2.4], num_lstm_layers: 1}", "batch_size=8", "segment_s=0.5", "lr=0.001",
         "holdout=2", "time_weight=1.0", "mel_weight=0.0", "betas=[0.9, 0.99]"]


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """Two minutes of tones, chords and chirps at 16 kHz, the espeak speech assets, and one corrupt file."""
    root = tmp_path_factory.mktemp("sounds")
    rng = np.random.default_rng(0)
    rate = 16_000
    t = np.arange(rate * 6) / rate
    for i in range(20):
        f = 110 * 2 ** (rng.integers(0, 24) / 12)
        wave = [0.3 * np.sin(2 * np.pi * f * t),
                0.15 * sum(np.sin(2 * np.pi * f * r * t) for r in (1, 1.26, 1.5)),
                0.3 * np.sin(2 * np.pi * (f * t + 200 * t**2))][i % 3]
        sf.write(root / f"tone{i:02d}.wav", wave.astype(np.float32), rate)
    for p in ASSETS.glob("*.wav"):
        shutil.copy(p, root / p.name)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return root


def test_training_lowers_the_held_out_mel_distance(tmp_path, sounds, capsys):
    out = tmp_path / "codec"
    assert main(["audio-tokenizer", "train", "--audio", str(sounds), "--out", str(out), *SMALL, "steps=40",
                 "eval_every=20", "checkpoint_every=40", "gan.enabled=true", "gan.start=36",
                 "vq_warmup_steps=3"]) == 0
    assert "held-out SI-SDR" in capsys.readouterr().out
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert [e["quantized"] for e in evals] == [0, 1, 1]  # step 0 is in the warm-up: the unquantised autoencoder
    # 40 steps from random weights lower the held-out log-mel distance (measured: 1.85 -> 1.66 / 1.71). The held-out
    # SI-SDR is reported (the demo codec's 1500 steps with this recipe reach 14 dB) but not asserted: this far from
    # reconstructing a waveform (the training L1 stays near 0.165 all 40 steps) it is noise: -64.5 dB at
    # step 0, then -59.7 / -61.8 / -65.0 at step 40 as package versions and machines changed (the last on
    # 2026-12-04, failing the +2 dB this test asserted until then), -53.5 / -54.5 / -66.0 at steps 40 / 60 / 80
    assert evals[-1]["mel_distance"] < evals[0]["mel_distance"] - 0.1
    assert all(np.isfinite(e["si_sdr"]) for e in evals)
    record = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(record) == 40 and all(r["d"] > 0 for r in record[36:]) and all(r["d"] == 0 for r in record[:36])
    assert all(r["quantizers_active"] == 0 and r["commit"] == 0 for r in record[:3])  # autoencoder warm-up
    assert {r["quantizers_active"] for r in record[3:]} > {4}  # quantizer dropout: 1 to 4 codebooks per batch
    errors = [json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "corrupt.wav: unreadable" in errors[0]
    clips = [[sf.read(out / "samples" / "step_00000040" / f"clip{i}_{kind}.wav")[0] for kind in ("original",
                                                                                               "reconstruction")]
             for i in range(2)]
    assert evals[-1]["stoi"] == pytest.approx(np.mean([stoi(a, b, 24_000) for a, b in clips]), abs=0.02)
    samples = sorted(p.name for p in (out / "samples" / "step_00000040").iterdir())
    assert samples == ["clip0_original.wav", "clip0_reconstruction.wav", "clip1_original.wav",
                       "clip1_reconstruction.wav"]
    # The output is an ordinary audio tokenizer at the largest bandwidth (4 codebooks of 256 at 75 Hz).
    tok = AudioTokenizer.from_dir(out, device="cpu")
    assert (tok.codebook_sizes, tok.config.bandwidth) == ((256,) * 4, 2.4)
    codes = tok.encode([ASSETS / "speech_hello_22k.wav"])[0]
    assert codes.shape == (4, 228) and tok.decode([codes])[0].shape == (1, 228 * 320)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, sounds):
    full = load_codec_config(None, [*SMALL, "steps=6", "eval_every=100", "checkpoint_every=3"])
    train_codec([sounds], tmp_path / "a", full, device="cpu")
    train_codec([sounds], tmp_path / "b", load_codec_config(None, [*SMALL, "steps=3", "eval_every=100",
                                                                    "checkpoint_every=3"]), device="cpu")
    train_codec([sounds], tmp_path / "b", full, resume=True, device="cpu")
    a = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "train.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 6 and a == b
    # Killed after logging steps 4..6 but before the step-6 checkpoint was complete, mid-way through a line: the
    # resumed run cuts the logs back to step 3 and records steps 4..6 once.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    with open(tmp_path / "b" / "train.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    train_codec([sounds], tmp_path / "b", full, resume=True, device="cpu")
    assert (tmp_path / "b" / "train.jsonl").read_text().splitlines() == a
    evals = [json.loads(line)["step"] for line in (tmp_path / "b" / "eval.jsonl").read_text().splitlines()]
    assert evals == [0, 3, 6]  # the short run ended with an evaluation at its last step


def test_codec_config_errors_are_clear(tmp_path, sounds):
    with pytest.raises(OmnitokError, match="chunked 48 kHz"):
        load_codec_config(None, ["model.preset=48khz"])
    with pytest.raises(OmnitokError, match="dead_code_share must be >= 0"):
        load_codec_config(None, ["dead_code_share=-1"])
    with pytest.raises(OmnitokError, match="lr_decay_steps and vq_warmup_steps must be >= 0"):
        load_codec_config(None, ["lr_decay_steps=-5"])
    with pytest.raises(OmnitokError, match="bandwidth 6.0 is not among"):
        train_codec([sounds], tmp_path / "x", load_codec_config(None, [*SMALL, "bandwidth=6.0"]), device="cpu")
    with pytest.raises(OmnitokError, match="no audio files"):
        train_codec([tmp_path], tmp_path / "y", load_codec_config(None, SMALL), device="cpu")


def test_small_cpu_config_trains_on_waveform_l2_and_mel_magnitudes(tmp_path, sounds):
    """configs/codec-small-cpu.yaml loads, and its loss is 10 x waveform L2 + the mel magnitude loss from the first
    step (no L1, no log-mel; no VQ in warm-up)."""
    config = Path(__file__).parent.parent / "configs" / "codec-small-cpu.yaml"
    cfg = load_codec_config(config, ["steps=2", "eval_every=100", "checkpoint_every=100", "holdout=2"])
    train_codec([sounds], tmp_path / "c", cfg, device="cpu")
    record = [json.loads(line) for line in (tmp_path / "c" / "train.jsonl").read_text().splitlines()]
    assert len(record) == 2
    for r in record:
        assert r["time_l2"] > 0 and r["mel"] > 0
        assert r["loss"] == pytest.approx(10 * r["time_l2"] + r["mel"], rel=1e-5)


def test_mel_loss_joins_after_mel_start_step(tmp_path, sounds):
    cfg = load_codec_config(None, [*SMALL, "time_weight=0", "time_l2_weight=10", "mel_weight=2", "log_mel_weight=0.5",
                                   "mel_start_step=2",
                                   "vq_warmup_steps=10", "steps=4", "eval_every=100", "checkpoint_every=100"])
    train_codec([sounds], tmp_path / "c", cfg, device="cpu")
    record = [json.loads(line) for line in (tmp_path / "c" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in record] == [1, 2, 3, 4] and all(r["mel"] > 0 and r["log_mel"] > 0 for r in record)
    for r in record:
        expected = 10 * r["time_l2"] + (2 * r["mel"] + 0.5 * r["log_mel"] if r["step"] > 2 else 0)
        assert r["loss"] == pytest.approx(expected, rel=1e-5)


def _task(sounds, *overrides):
    return CodecTask([sounds], load_codec_config(None, [*SMALL, *overrides]), torch.device("cpu"))


def _quantization_error(rvq, emb):
    """Mean squared error of the first codebook on ``emb`` (B, D, frames)."""
    vectors = emb.transpose(1, 2)
    with torch.no_grad():
        quantized, _, _ = rvq.layers[0](vectors)
    return float((quantized - vectors).pow(2).mean())


def test_codebooks_start_from_k_means_over_several_batches(sounds):
    """The first quantized step initialises every codebook by k-means over 16 frames per code (this batch and the
    next steps' batches), not over one batch of 296 frames for 256 codes, which k-means memorises."""
    task = _task(sounds, "vq_warmup_steps=1")
    # an encoder whose frames differ (an untrained EnCodec encoder maps these sounds to nearly one point)
    task.codec.encoder = torch.nn.Conv1d(1, 32, kernel_size=640, stride=320, padding=160)
    task.train_step(1, task._batch(1)[0])
    with torch.no_grad():
        emb = task.codec.encoder(task._batch(2)[0])
        task._init_codebooks(2, emb)
        unseen = task.codec.encoder(task._batch(100)[0])
        one_batch = ResidualVQ(dim=32, num_quantizers=4, codebook_size=256, kmeans_init=True, kmeans_iters=10)
        one_batch(emb.transpose(1, 2))
    rvq = task.rvq.eval()
    assert all(layer._codebook.initted for layer in rvq.layers)  # every layer, though dropout draws fewer
    # use counts as if from one batch (296 frames; codes k-means left empty restart at the uniform count), not
    # from the 16 batches: the usual dead-code threshold applies afterwards
    assert 296 <= float(rvq.layers[0]._codebook.cluster_size.sum()) < 400
    ours, peer = _quantization_error(rvq, unseen), _quantization_error(one_batch.eval(), unseen)
    assert ours < 0.6 * peer, (ours, peer)
    task.rvq.train()
    task.train_step(2, task._batch(2)[0])  # the trainer's own first quantized step keeps these codebooks
    assert _quantization_error(task.rvq.eval(), unseen) < 0.6 * peer


def test_commitment_loss_is_relative_to_a_large_embedding(sounds):
    """Above a mean square of 1 the commitment loss is relative to the embedding's: an encoder whose output is 10x
    larger reports the same loss (an absolute one: 100x). Below it stays EnCodec's absolute loss."""
    commits = {}
    for scale in (1.0, 100.0, 1000.0):  # the untrained encoder's output has a mean square of ~0.002
        task = _task(sounds, "vq_warmup_steps=0", "quantizer_dropout=false")
        task.codec.encoder.register_forward_hook(lambda module, args, output, s=scale: output * s)
        commits[scale] = task.train_step(1, task._batch(1)[0])["commit"]
    assert commits[1000.0] == pytest.approx(commits[100.0], rel=0.05)
    assert 0 < commits[1.0] < 0.01 * commits[100.0]  # absolute while small: its mean square times the relative


def test_learning_rate_falls_linearly_over_the_last_steps(tmp_path, sounds):
    cfg = load_codec_config(None, [*SMALL, "steps=6", "lr_decay_steps=4", "eval_every=100", "checkpoint_every=100"])
    train_codec([sounds], tmp_path / "c", cfg, device="cpu")
    record = [json.loads(line) for line in (tmp_path / "c" / "train.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in record] == pytest.approx([1e-3, 1e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_a_file_of_nan_samples_is_recorded_and_never_held_out_or_trained_on(tmp_path):
    """Sound files hold floats, NaN included: one such clip would make a whole batch's loss non-finite, and a
    held-out one every evaluation's SI-SDR NaN."""
    folder = tmp_path / "sounds"
    folder.mkdir()
    t = np.arange(12_000) / 24_000
    for i in range(3):
        sf.write(folder / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), 24_000)
    sf.write(folder / "nan.wav", np.full(12_000, np.nan, np.float32), 24_000, subtype="FLOAT")
    where = set()
    for holdout in (1, 2):  # seed 0's order: nan.wav is a training file with one held out, held out with two
        task = CodecTask([folder], load_codec_config(None, [*SMALL, f"holdout={holdout}"]), torch.device("cpu"))
        assert torch.isfinite(task.held).all()
        if any(path.name == "nan.wav" for path, _, _ in task.train_files):
            where.add("train")
            assert task.startup_errors == [] and len(task.held) == holdout
            batches = [task._batch(step) for step in range(1, 4)]
            assert all(batch is None or torch.isfinite(batch).all() for batch, _ in batches)
            errors = [e for _, errors in batches for e in errors]
            assert errors and all("nan.wav: unreadable at" in e and "holds NaN or infinite samples" in e
                                  for e in errors)
        else:
            where.add("held out")
            assert task.startup_errors == [f"{folder / 'nan.wav'}: unreadable (holds NaN or infinite samples); not "
                                           "held out"] and len(task.held) == holdout - 1
    assert where == {"train", "held out"}
