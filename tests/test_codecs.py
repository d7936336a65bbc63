"""Mimi, DAC and WavTokenizer as omnitok audio tokenizers: codes and waveforms against the transformers classes' own
``encode`` / ``decode``, import (recognising the codec, refusing what is not one), the layout they give, odd inputs,
long files. EnCodec has the same checks in test_audio_tokenizer.py."""

import importlib
import json
import math
import tracemalloc
import types

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from test_audio_tokenizer import SPEECH, chord, init_codebooks, speech

from benchmarks.audio import codec_model, peer_calls
from omnitok.cli import main
from omnitok.document import Audio, Document, Text
from omnitok.errors import OmnitokError
from omnitok.eval.evaluate import eval_samples
from omnitok.tokenizers import audio as audio_module
from omnitok.tokenizers.audio import AudioError, AudioTokenizer, AudioTokenizerConfig
from omnitok.tokenizers.audio_import import import_audio_tokenizer
from omnitok.tokenizers.codecs import MimiCodec, Xcodec2Codec
from omnitok.tokenizers.multimodal import MultimodalTokenizer

# The codebooks each tokenizer uses: Mimi 4 of 8, DAC 3 of 4, X-Codec 2 kbps = 6 of 13 (6-bit codes); one otherwise.
SETTING = {"mimi": dict(num_codebooks=4), "dac": dict(num_codebooks=3), "wavtokenizer": {},
           "xcodec": dict(bandwidth=2.0), "xcodec2": {}}
CODEBOOKS = {"mimi": 4, "dac": 3, "wavtokenizer": 1, "xcodec": 6, "xcodec2": 1}


def init_fsq(model, wave: np.ndarray) -> None:
    """X-Codec2's scalar quantizer rounds a projection that random weights keep near 0 (one code for everything):
    scale and centre the projection on real audio so each level is used."""
    seen = []
    hook = model.quantizer.project_in.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    x = torch.from_numpy(wave)[None, None]
    codec = Xcodec2Codec(model, None)
    with torch.no_grad():
        codec.encode(codec.pad_to_frames(x))
        hook.remove()
        out = seen[0].reshape(-1, seen[0].shape[-1])
        scale = 1.5 / out.std(0)
        model.quantizer.project_in.weight.mul_(scale[:, None])
        model.quantizer.project_in.bias.copy_((model.quantizer.project_in.bias - out.mean(0)) * scale)


def tiny_codec(kind: str, seed: int = 0):
    """A random-weight codec of the real architecture at tiny sizes (benchmarks.audio's), codebooks initialised."""
    torch.manual_seed(seed)
    model = codec_model(kind, tiny=True)
    rate = model.config.sample_rate if kind == "xcodec" else model.config.sampling_rate
    (init_fsq if kind == "xcodec2" else init_codebooks)(model, speech(rate))
    return model


def kaldi_reference_fbank(waveform, num_mel_bins, frame_length, frame_shift, sample_frequency, window_type,
                          preemphasis_coefficient, remove_dc_offset, use_log_fbank, use_energy, dither, snip_edges,
                          low_freq, high_freq):
    """``torchaudio.compliance.kaldi.fbank``'s signature, computed by kaldi-native-fbank (Kaldi's own C++)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq, frame.frame_length_ms, frame.frame_shift_ms = sample_frequency, frame_length, frame_shift
    frame.window_type, frame.preemph_coeff, frame.remove_dc_offset = window_type, preemphasis_coefficient, \
        remove_dc_offset
    frame.dither, frame.snip_edges = dither, snip_edges
    opts.mel_opts.num_bins, opts.mel_opts.low_freq, opts.mel_opts.high_freq = num_mel_bins, low_freq, high_freq
    opts.use_energy, opts.use_log_fbank = use_energy, use_log_fbank
    bank = knf.OnlineFbank(opts)
    bank.accept_waveform(sample_frequency, waveform.reshape(-1).tolist())
    bank.input_finished()
    return torch.from_numpy(np.stack([bank.get_frame(i) for i in range(bank.num_frames_ready)]))


@pytest.fixture(scope="module")
def xcodec2_extractor():
    """transformers' own ``Xcodec2FeatureExtractor`` (padding, normalisation, frame stacking), with Kaldi's fbank
    from kaldi-native-fbank where it calls torchaudio (not installable here)."""
    module = importlib.import_module("transformers.models.xcodec2.feature_extraction_xcodec2")
    backends = transformers.utils.import_utils.BACKENDS_MAPPING
    saved = backends["torchaudio"]
    backends["torchaudio"] = (lambda: True, saved[1])
    kaldi = types.SimpleNamespace(fbank=kaldi_reference_fbank)
    module.torchaudio = types.SimpleNamespace(compliance=types.SimpleNamespace(kaldi=kaldi))
    try:
        yield module.Xcodec2FeatureExtractor()
    finally:
        backends["torchaudio"] = saved
        del module.torchaudio


def tokenizer(kind: str, **settings) -> AudioTokenizer:
    return AudioTokenizer(tiny_codec(kind), AudioTokenizerConfig(**SETTING[kind], **settings), device="cpu")


@pytest.fixture(scope="module", params=sorted(SETTING))
def tok(request):
    return tokenizer(request.param)


def clips(tok: AudioTokenizer) -> list[np.ndarray]:
    """espeak-ng speech and a chord, of lengths that are and are not whole numbers of frames."""
    rate, hop = tok.sample_rate, tok.hop
    talk = speech(rate)
    return [talk[:40 * hop], talk[:rate + 13], talk[: int(0.77 * rate)], chord(rate, 0.5)[:7 * hop + 1],
            talk[:hop - 5]]


def class_encode(tok: AudioTokenizer, wave: np.ndarray, extractor=None) -> np.ndarray:
    """The transformers class's own ``encode`` on one clip, as its documentation calls it (X-Codec2: after its
    feature extractor)."""
    x = torch.from_numpy(wave)[None, None]
    with torch.no_grad():
        if tok.kind == "xcodec2":
            inputs = extractor(wave, sampling_rate=tok.sample_rate, return_tensors="pt")
            return tok.model.encode(inputs["input_values"], inputs["input_features"]).audio_codes[0].numpy()
        encode, _ = peer_calls(tok.kind, tok.model, tok.num_codebooks, tok.config.bandwidth)
        return encode(x)[0].numpy()


def class_decode(tok: AudioTokenizer, codes: np.ndarray) -> np.ndarray:
    _, decode = peer_calls(tok.kind, tok.model, tok.num_codebooks, tok.config.bandwidth)
    with torch.no_grad():
        return decode(torch.from_numpy(codes)[None])[0].numpy()


def test_codes_equal_the_class_encode_and_waveforms_its_decode(tok, request):
    """Every codec gets its input zero-padded to whole frames (DAC would drop a partial last frame), so codes equal
    the class's ``encode`` of the padded clip exactly; of the unpadded clip they equal it on every frame but the
    last when the clip is not a whole number of frames (that frame, or DAC's last whole one, sees the padding).
    Clips of several lengths are encoded in one batch, and each equals its encoding alone. X-Codec2 equals its class
    after its feature extractor on the clip itself (its features are normalised over the clip, so padding would
    change every frame); for a whole-frames clip the class gives a frame more (the sample of padding its extractor
    adds), which is not kept."""
    extractor = request.getfixturevalue("xcodec2_extractor") if tok.kind == "xcodec2" else None
    batch = clips(tok)
    codes = tok.encode([(c, tok.sample_rate) for c in batch])
    assert len(np.unique(np.concatenate([c.reshape(-1) for c in codes]))) > 5, "codes vary"
    for wave, ours in zip(batch, codes):
        frames = math.ceil(len(wave) / tok.hop)
        assert ours.shape == (tok.num_codebooks, frames) and ours.dtype == np.int64
        padded = np.pad(wave, (0, frames * tok.hop - len(wave)))
        exact = wave if tok.kind == "xcodec2" else padded  # X-Codec2 pads from the clip's own length
        np.testing.assert_array_equal(ours, class_encode(tok, exact, extractor)[:, :frames])
        np.testing.assert_array_equal(ours, tok.encode([(wave, tok.sample_rate)])[0])  # alone == in the batch
        # On the unpadded clip: DAC's encode fails on less than a frame (omnitok gives it one frame), and X-Codec's
        # HuBERT normalises over the whole input (group norm, attention), so the padding moves every frame a little
        # (17 % of this clip's codes, mostly in later codebooks): no frame-exact comparison there.
        if len(wave) >= tok.hop and tok.kind != "xcodec":
            unpadded = class_encode(tok, wave, extractor)[:, :frames]
            agree = unpadded.shape[1] - (len(wave) % tok.hop > 0)
            np.testing.assert_array_equal(ours[:, :agree], unpadded[:, :agree])
        wave_out = tok.decode([ours])[0]
        assert wave_out.shape == (tok.channels, frames * tok.hop) and wave_out.dtype == np.float32
        if frames > 1 or tok.kind != "xcodec2":  # X-Codec2's decoder fails on one frame; omnitok decodes it twice
            reference = class_decode(tok, ours)[..., :frames * tok.hop]
            np.testing.assert_allclose(wave_out, reference, atol=1e-4, rtol=0)


def test_odd_inputs_and_bad_files_give_one_clear_error(tok, tmp_path):
    t = np.arange(44_100) / 44_100
    sf.write(tmp_path / "stereo.wav", np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.1,
             44_100)
    sf.write(tmp_path / "phone.wav", speech(8_000), 8_000)
    sf.write(tmp_path / "silence.flac", np.zeros(16_000, np.float32), 16_000)
    codes = tok.encode([tmp_path / "stereo.wav", tmp_path / "phone.wav", tmp_path / "silence.flac",
                        (np.zeros((2, 300), np.int16), tok.sample_rate)])
    assert [c.shape[1] for c in codes] == [math.ceil(n / tok.hop) for n in
                                           (tok.sample_rate, round(len(speech(8_000)) * tok.sample_rate / 8_000),
                                            tok.sample_rate, 300)]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFX" + (tmp_path / "phone.wav").read_bytes()[4:2000])
    with pytest.raises(AudioError, match="corrupt.wav: not a sound file libsndfile can read"):
        tok.encode([tmp_path / "corrupt.wav"])
    with pytest.raises(AudioError, match="NaN"):
        tok.encode([(np.full(100, np.nan, np.float32), tok.sample_rate)])


@pytest.mark.parametrize("kind, measured", [("mimi", 0.0), ("dac", 0.0), ("wavtokenizer", 0.0006),
                                            ("xcodec", 0.0019),
                                            pytest.param("xcodec2", 0.018, marks=pytest.mark.slow)])
def test_a_long_file_streams_in_bounded_memory_close_to_whole_file_encoding(kind, measured, tmp_path, monkeypatch):
    """Three minutes of speech over a gliding tone, streamed in 20 s windows with 2 s of context on each side,
    against the whole file encoded at once."""
    tok = tokenizer(kind)
    rate = tok.sample_rate
    t = np.arange(rate * 180) / rate
    long = (np.tile(speech(rate), 90)[: len(t)] * 0.7 + 0.2 * np.sin(2 * np.pi * (220 + 200 * np.sin(t / 3)) * t))
    sf.write(tmp_path / "long.wav", long.astype(np.float32), rate, subtype="FLOAT")
    whole = AudioTokenizer(tok.model, AudioTokenizerConfig(**SETTING[kind], chunk_s=1000), device="cpu")
    reference = whole.encode([tmp_path / "long.wav"])[0]
    monkeypatch.setattr(audio_module, "READ_BLOCK_S", 2.0)
    windowed = AudioTokenizer(tok.model, AudioTokenizerConfig(**SETTING[kind], chunk_s=20.0, context_s=2.0),
                              device="cpu", batch_size=1)
    tracemalloc.start()
    codes = windowed.encode([tmp_path / "long.wav"])[0]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert codes.shape == reference.shape == (tok.num_codebooks, math.ceil(180 * tok.frame_rate))
    assert peak < 0.6 * 4 * len(long)  # never the whole file as float32
    differing = float((codes != reference).mean())
    print(f"{kind}: peak {peak / 1e6:.1f} MB of a {4 * len(long) / 1e6:.1f} MB file; {differing:.3%} of the codes "
          "differ from whole-file encoding")
    assert differing <= measured + 0.005


def test_import_recognises_the_codec_and_chooses_its_codebooks(tmp_path, capsys):
    for kind in sorted(SETTING):
        model = tiny_codec(kind)
        model.save_pretrained(tmp_path / kind)
        choice = [f"--{'codebooks' if k == 'num_codebooks' else k}" if i == 0 else str(v)
                  for k, v in SETTING[kind].items() for i in range(2)]
        assert main(["audio-tokenizer", "import", "--format", "hf", "--src", str(tmp_path / kind),
                     "--out", str(tmp_path / f"{kind}-tok"), *choice]) == 0
        said = capsys.readouterr().out
        loaded = AudioTokenizer.from_dir(tmp_path / f"{kind}-tok", device="cpu")
        assert f"({kind})" in said and f"{loaded.frame_rate * loaded.num_codebooks:g} tokens per second" in said
        assert loaded.kind == kind and loaded.num_codebooks == CODEBOOKS[kind]
        direct = AudioTokenizer(model, AudioTokenizerConfig(**SETTING[kind]), device="cpu")
        assert loaded.fingerprint == direct.fingerprint
        wave = (speech(loaded.sample_rate)[: loaded.sample_rate], loaded.sample_rate)
        np.testing.assert_array_equal(loaded.encode([wave])[0], direct.encode([wave])[0])
    default = import_audio_tokenizer("hf", tmp_path / "mimi")
    assert default.num_codebooks == 8  # Moshi's 8 of Mimi's codebooks (all 8 of this tiny one)
    assert import_audio_tokenizer("hf", tmp_path / "dac").num_codebooks == 4  # DAC: all
    assert default.fingerprint != import_audio_tokenizer("hf", tmp_path / "mimi", num_codebooks=2).fingerprint


def refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err  # transformers' progress bars may come first
    said = [line for line in err.splitlines() if line.startswith("omnitok: error: ")]
    assert len(said) == 1 and "Traceback" not in err, err
    return said[0]


def test_what_is_not_a_codec_omnitok_reads_is_refused_in_one_line(tmp_path, capsys):
    def directory(name, config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return ["audio-tokenizer", "import", "--format", "hf", "--src", str(tmp_path / name), "--out",
                str(tmp_path / f"{name}-out")]

    err = refused(directory("llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}), capsys)
    assert "holds a 'llama' model (LlamaForCausalLM), not an audio codec omnitok reads (encodec, mimi, dac" in err
    err = refused(directory("vocos", {"model_type": "vocos"}), capsys)
    assert "holds a 'vocos' model, not an audio codec omnitok reads" in err
    assert "a config without model_type" in refused(directory("bare", {"hidden_size": 8}), capsys)
    err = refused(directory("typed", {"model_type": "mimi", "num_quantizers": "x"}), capsys)  # transformers' check
    assert "cannot load the model (safetensors weights only): Validation error for field 'num_quantizers': " in err
    assert "no config.json" in refused(["audio-tokenizer", "import", "--format", "hf", "--src", str(tmp_path),
                                        "--out", str(tmp_path / "o")], capsys)
    transformers.EncodecModel(transformers.EncodecConfig(audio_channels=3, num_filters=4, hidden_size=16,
                                                         codebook_dim=16)).save_pretrained(tmp_path / "three")
    err = refused(["audio-tokenizer", "import", "--format", "hf", "--src", str(tmp_path / "three"), "--out",
                   str(tmp_path / "o")], capsys)
    assert "takes 3 audio channels; omnitok reads mono and stereo codecs" in err
    odd = types.SimpleNamespace(config=types.SimpleNamespace(sampling_rate=24_000, frame_rate=7.0, audio_channels=1))
    with pytest.raises(OmnitokError, match="frames are not a whole number of samples"):
        MimiCodec(odd, None)  # 24 kHz at 7 frames/s: the layout's frames could not be cut into windows
    tiny_codec("mimi").save_pretrained(tmp_path / "mimi")
    tiny_codec("wavtokenizer").save_pretrained(tmp_path / "wt")
    for src, choice, message in [("mimi", "9", "uses 1 to 8 codebooks"),
                                 ("wt", "1", "has one codebook; it takes no num_codebooks")]:
        assert message in refused(["audio-tokenizer", "import", "--format", "hf", "--src", str(tmp_path / src),
                                   "--out", str(tmp_path / "o"), "--codebooks", choice], capsys)
    assert not (tmp_path / "o").exists()


def test_a_mimi_tokenizer_directory_records_its_codebooks_and_frame_rate(tmp_path, sp_dir):
    tok_audio = tokenizer("mimi")
    tok_audio.save(tmp_path / "audio")
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--audio", str(tmp_path / "audio"),
                 "--out", str(tmp_path / "tok")]) == 0
    tok = MultimodalTokenizer.from_dir(tmp_path / "tok")
    assert tok.layout.audio_codebook_sizes == (64,) * 4 and tok.layout.audio_frame_rate == 12.5
    assert tok.layout.audio_frames(10.0) == 125
    doc = Document([Text("Say: "), Audio(SPEECH), Text(" then a chord "), Audio((chord(24_000, 1.0), 24_000))])
    parsed = tok.parse(tok.encode(doc))
    assert [p.modality for p in parsed] == ["text", "audio", "text", "audio"]
    np.testing.assert_array_equal(parsed[1].ids, tok_audio.encode([SPEECH])[0])
    assert parsed[3].ids.shape == (4, 13)  # 1 s at 12.5 frames/s, rounded up
    wave, rate = tok.decode(tok.encode(doc)).segments[3].source
    assert rate == 24_000 and wave.shape == (1, 13 * 1920)


def test_mimi_shards_train_sample_audio_that_decodes_and_evaluate_valid(tmp_path, sp_dir):
    """Speech and tones with captions -> `omnitok tokenize` with a Mimi tokenizer -> `omnitok pretrain` (the loss
    falls) -> `omnitok export` -> `omnitok sample` of audio spans -> `omnitok eval samples`."""
    tokenizer("mimi").save(tmp_path / "audio")
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--audio", str(tmp_path / "audio"),
                 "--out", str(tmp_path / "tok")]) == 0
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i, pitch in enumerate([220, 330, 440, 550, 660, 880] * 3):
        t = np.arange(int(16_000 * (0.8 + 0.1 * (i % 4)))) / 16_000
        sf.write(pairs / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32), 16_000)
        (pairs / f"tone{i}.txt").write_text(f"a steady tone at {pitch} hertz")
    for i, asset in enumerate(sorted(SPEECH.parent.glob("speech_*.wav"))):
        sf.write(pairs / f"speech{i}.flac", sf.read(asset)[0][:16_000 * 2], sf.info(asset).samplerate)
        (pairs / f"speech{i}.txt").write_text("somebody speaking")
    assert main(["tokenize", "--input", str(pairs), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "shards"), "--workers", "0"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["tokens"]["audio"] > 0 and not manifest.get("errors")
    run = tmp_path / "run"
    assert main(["pretrain", f"tokenizer={tmp_path / 'tok'}", f"out={run}", f"data.shards=[{tmp_path / 'shards'}]",
                 "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
                 "model.num_kv_heads=2", "data.seq_len=96", "micro_batch_size=4", "optim.lr=0.003",
                 "optim.warmup_steps=5", "log_every=1", "steps=40", "checkpoint_every=100"]) == 0
    train = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert all(r.get("audio_tokens", 0) > 0 for r in train)
    first, last = (sum(r["loss"] for r in rs) / 5 for rs in (train[:5], train[-5:]))
    assert last < first - 1.0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tmp_path / "export"), "--prompt", "a steady tone at 440 hertz",
                 "--num-samples", "4", "--output-modality", "audio", "--out", str(out), "--max-new-tokens", "80",
                 "max_audio_s=1.0"]) == 0
    report = eval_samples(out)
    assert report["segments"]["audio"] == 4 and report["valid"]["audio"] == 1.0 and not report["problems"]
    for record in json.loads((out / "samples.json").read_text())["samples"]:
        (span,) = [s for s in record["segments"] if s["type"] == "audio"]
        assert 1 <= span["frames"] <= 13 and span["tokens"] == 4 * span["frames"] + 2  # <|boa|> frames <|eoa|>
        wave, rate = sf.read(out / record["id"] / span["file"])
        assert rate == 24_000 and len(wave) == span["frames"] * 1920


def test_eval_tokenizer_reports_each_codebook_and_the_token_rate(tmp_path, capsys):
    tok = tokenizer("dac")
    tok.save(tmp_path / "dac")
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "speech.wav", speech(16_000)[:24_000], 16_000)
    sf.write(tmp_path / "clips" / "chord.flac", chord(44_100, 1.0), 44_100)
    assert main(["eval", "tokenizer", "--audio-tokenizer", str(tmp_path / "dac"), "--audio", str(tmp_path / "clips"),
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads(next((tmp_path / "eval").glob("audio*.json")).read_text())
    assert report["codec"] == "dac" and report["clips"] == 2
    assert [c["size"] for c in report["codebooks"]] == [64] * 3 and report["tokens_per_second"] == 3 * 31.25
    assert all(0 < c["usage"] <= 1 for c in report["codebooks"]) and np.isfinite(report["si_sdr"])


def test_the_kaldi_filterbank_matches_kaldi_native_fbank():
    """omnitok's torch Kaldi fbank (X-Codec2's features, where transformers uses torchaudio) against Kaldi's C++ on
    espeak-ng speech, a chord and silence, including lengths that are not a whole number of frame shifts."""
    from omnitok.tokenizers.kaldi_fbank import fbank

    for wave in (speech(16_000)[:16_000], chord(16_000, 0.73), np.zeros(1_000, np.float32), speech(16_000)[:399]):
        x = torch.from_numpy(wave) * 2 ** 15
        ours = fbank(x, 16_000, 80, 400, 160, low_freq=20.0, high_freq=8_000)
        if len(wave) < 400:
            assert ours.shape == (0, 80)
            continue
        reference = kaldi_reference_fbank(x[None], 80, 25.0, 10.0, 16_000, "povey", 0.97, True, True, False, 0.0, True,
                                          20, 8_000)
        assert ours.shape == reference.shape == (1 + (len(wave) - 400) // 160, 80)
        # energies to 0.1 %, up to float32 round-off 70 dB under each frame's loudest bin (a pure chord has bins
        # ~140 dB down, where the two FFTs' round-off differs)
        ours, reference = np.exp(ours.double().numpy()), np.exp(reference.double().numpy())
        floor = 1e-7 * reference.max(axis=1, keepdims=True)
        assert (np.abs(ours - reference) <= 1e-3 * reference + floor).all()
