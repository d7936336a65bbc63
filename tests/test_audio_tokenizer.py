import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from omnitok.cli import main
from omnitok.document import Audio, Document, Text
from omnitok.errors import MalformedSequence, OmnitokError
from omnitok.tokenizers import audio as audio_module
from omnitok.tokenizers.audio import AudioError, AudioTokenizer, AudioTokenizerConfig
from omnitok.tokenizers.audio_import import encodec_model, import_audio_tokenizer
from omnitok.tokenizers.layout import TokenLayout
from omnitok.tokenizers.multimodal import MultimodalTokenizer

ASSETS = Path(__file__).parent / "assets"
SPEECH = ASSETS / "speech_en_16k.wav"
NARROW = dict(num_filters=8, hidden_size=32, codebook_dim=32)


def speech(rate: int, seconds: float | None = None) -> np.ndarray:
    wave, sr = sf.read(SPEECH, dtype="float32")
    x = soxr.resample(wave, sr, rate, quality="HQ").astype(np.float32)
    return x[: int(seconds * rate)] if seconds else x


def chord(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.2 * sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))).astype(np.float32)


def init_codebooks(model, wave: np.ndarray, seed: int = 0) -> None:
    """Random EnCodec / Mimi / WavTokenizer / X-Codec codebooks are zeros (one code for everything): fill each from
    the vectors it is first asked to quantize, in residual order, while encoding real audio (what k-means init does),
    so codes are diverse and a parity test means something. DAC's codebooks are random embeddings and already give
    varied codes; they are left alone."""
    g = torch.Generator().manual_seed(seed)
    books = [m for m in model.modules() if hasattr(m, "quantize") and hasattr(m, "codebook_size")
             and (hasattr(m, "embed_sum") or isinstance(getattr(m, "embed", None), torch.Tensor))]
    for book in books:
        def first_call(h, book=book, quantize=book.quantize):
            rows = h[torch.randint(0, len(h), (book.codebook_size,), generator=g)].float()
            rows = rows + 0.05 * h.std() * torch.randn(rows.shape, generator=g)
            if hasattr(book, "embed_sum"):  # Mimi keeps sums and usage counts
                book.embed_sum.copy_(rows)
                book.cluster_usage.fill_(1.0)
                book._embed = None
            else:
                book.embed.copy_(rows)
                book.embed_avg.copy_(rows)
            del book.quantize  # back to the class's method
            return quantize(h)

        book.quantize = first_call
    every_codebook = {"bandwidth": max(model.config.target_bandwidths)} if hasattr(model.config, "target_bandwidths") \
        else {}  # EnCodec, X-Codec: the largest bandwidth runs every quantizer
    with torch.no_grad():
        x = torch.from_numpy(wave).reshape(1, 1, -1).repeat(1, getattr(model.config, "audio_channels", 1), 1)
        model.encode(x, **every_codebook)


def codec(preset: str, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    model = encodec_model(preset, **{**NARROW, **sizes}).eval()
    init_codebooks(model, speech(model.config.sampling_rate))
    return model


def reference_codes(model, wave: np.ndarray, bandwidth: float) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(wave).reshape(1, 1, -1).repeat(1, model.config.audio_channels, 1)
        return model.encode(x, bandwidth=bandwidth).audio_codes[0, 0].numpy()


@pytest.mark.parametrize("preset, bandwidths", [("24khz", [1.5, 6.0]), ("32khz", [2.2])])
def test_codes_equal_encodec_model_on_speech_and_tones(preset, bandwidths):
    model = codec(preset)
    rate = model.config.sampling_rate
    clips = [speech(rate, 4.0), chord(rate, 2.0), speech(rate, 3.0) + chord(rate, 3.0)]  # whole seconds
    for bandwidth in bandwidths:
        tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=bandwidth), device="cpu")
        ours = tok.encode([(c, rate) for c in clips])  # one batch, mixed lengths
        for clip, codes in zip(clips, ours):
            ref = reference_codes(model, clip, bandwidth)
            assert codes.shape == ref.shape == (tok.num_codebooks, len(clip) // tok.hop)
            np.testing.assert_array_equal(codes, ref)
        assert min(len(np.unique(c)) for c in ours[0]) > 10  # diverse codes: the comparison means something


def test_file_input_is_resampled_and_matches_all_but_a_partial_last_frame():
    """A 16 kHz file of 5.00075 s is 120018 samples at 24 kHz: 375 whole frames and one partial. EnCodec
    reflect-pads a partial frame inside its strided layers; omnitok zero-pads windows so they batch."""
    model = codec("24khz")
    tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=6.0), device="cpu")
    codes = tok.encode([SPEECH])[0]
    ref = reference_codes(model, speech(24_000), 6.0)
    assert codes.shape == ref.shape == (8, 376)
    np.testing.assert_array_equal(codes[:, :-1], ref[:, :-1])
    np.testing.assert_array_equal(codes[:4], ref[:4])  # the coarse codebooks agree on the partial frame too


def original_state_dict(model) -> dict:
    """transformers' EnCodec weights under the original encodec package's names."""
    out = {}
    for key, value in model.state_dict().items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        key = re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", key)
        m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", key)
        if m:
            part, index, rest = m.groups()
            transposed = part == "decoder" and int(index) in (3, 6, 9, 12)  # the upsampling layers
            if rest.startswith("conv."):
                rest = ("convtr.convtr." if transposed else "conv.conv.") + rest[len("conv."):]
            for sub in ("block.1.conv.", "block.3.conv.", "shortcut.conv."):
                rest = rest.replace(sub, sub + "conv.") if rest.startswith(sub) else rest
            key = f"{part}.model.{index}.{rest}"
        out[key] = value.clone()
    return out


def test_original_meta_checkpoint_loads_to_identical_codes(tmp_path):
    model = codec("24khz", **{"num_filters": 32, "hidden_size": 128, "codebook_dim": 128})  # the real 24 kHz sizes
    state = original_state_dict(model)
    assert "encoder.model.0.conv.conv.weight_g" in state and "decoder.model.3.convtr.convtr.weight_v" in state
    assert "quantizer.vq.layers.0._codebook.embed" in state and "encoder.model.13.lstm.weight_ih_l0" in state
    torch.save(state, tmp_path / "encodec_24khz-d7cc33bc.th")
    assert main(["audio-tokenizer", "import", "--format", "encodec", "--preset", "24khz", "--src",
                 str(tmp_path / "encodec_24khz-d7cc33bc.th"), "--out", str(tmp_path / "audio")]) == 0
    tok = AudioTokenizer.from_dir(tmp_path / "audio", device="cpu")
    assert (tok.num_codebooks, tok.config.bandwidth) == (8, 6.0)
    clip = speech(24_000, 2.0)
    np.testing.assert_array_equal(tok.encode([(clip, 24_000)])[0], reference_codes(model, clip, 6.0))
    del state["encoder.model.0.conv.conv.bias"]
    torch.save(state, tmp_path / "broken.th")
    with pytest.raises(OmnitokError, match="1 missing: encoder.layers.0.conv.bias"):
        import_audio_tokenizer("encodec", tmp_path / "broken.th", preset="24khz")
    with pytest.raises(OmnitokError, match="needs --preset"):
        import_audio_tokenizer("encodec", tmp_path / "broken.th")


def test_hf_directory_round_trips_with_the_same_fingerprint(tmp_path):
    model = codec("32khz")
    model.save_pretrained(tmp_path / "hf")
    tok = import_audio_tokenizer("hf", tmp_path / "hf", tmp_path / "audio")
    assert (tok.codebook_sizes, tok.frame_rate) == ((2048,) * 4, 50)
    again = AudioTokenizer.from_dir(tmp_path / "audio")
    assert again.fingerprint == tok.fingerprint
    with pytest.raises(OmnitokError, match="bandwidth 6.0 kbps is not one this codec was trained for"):
        import_audio_tokenizer("hf", tmp_path / "hf", bandwidth=6.0)


def test_decode_gives_waveforms_at_the_model_rate():
    model = codec("24khz")
    tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=3.0), device="cpu")
    codes = tok.encode([(speech(24_000, 1.0), 24_000), (chord(24_000, 0.5), 24_000)])
    waves = tok.decode(codes)
    assert [w.shape for w in waves] == [(1, 24_000), (1, 38 * 320)] and waves[0].dtype == np.float32  # whole frames
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(codes[0])[None, None], [None]).audio_values[0].numpy()
    np.testing.assert_allclose(waves[0], ref, atol=1e-6)
    with pytest.raises(OmnitokError, match=r"shape \(4, frames>0\)"):
        tok.decode([np.zeros((8, 3), np.int64)])


@pytest.mark.parametrize("preset", ["24khz", "32khz", "48khz"])
def test_frame_major_flattening_round_trips_for_every_preset_and_bandwidth(preset):
    model = encodec_model(preset, **NARROW)
    for bandwidth in model.config.target_bandwidths:
        tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=bandwidth), device="cpu")
        layout = TokenLayout(text_vocab_size=10, audio_codebook_sizes=tok.codebook_sizes,
                             audio_frame_rate=tok.frame_rate)
        codes = np.random.default_rng(0).integers(0, tok.codebook_sizes[0], (tok.num_codebooks, 17))
        ids = layout.audio_ids(codes)
        np.testing.assert_array_equal(layout.audio_codes(ids), codes)
        assert ids[1] - layout.audio_range(1)[0] == codes[1, 0]  # frame-major: f0q0 f0q1 ...
        with pytest.raises(MalformedSequence):
            layout.audio_codes(ids[:-1])
        if tok.num_codebooks > 1:
            with pytest.raises(MalformedSequence, match="codebook"):
                layout.audio_codes(np.roll(ids, 1))
    expected = {"24khz": [2, 4, 8, 16, 32], "32khz": [4], "48khz": [2, 4, 8, 16]}[preset]
    assert [AudioTokenizer(model, AudioTokenizerConfig(bandwidth=b), device="cpu").num_codebooks
            for b in model.config.target_bandwidths] == expected


def test_48khz_stereo_chunks_are_exact_in_any_window_size():
    torch.manual_seed(0)
    model = encodec_model("48khz", **NARROW).eval()
    init_codebooks(model, speech(48_000))
    stereo = np.stack([speech(48_000, 2.6), chord(48_000, 2.6)])
    whole = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=6.0), device="cpu").encode([(stereo, 48_000)])[0]
    small = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=6.0, chunk_s=1.0), device="cpu")
    np.testing.assert_array_equal(small.encode([(stereo, 48_000)])[0], whole)
    assert whole.shape == (4, 2 * 150 + 93)  # chunks at 0, 47520, 95040: the last holds 29760 samples
    with torch.no_grad():
        out = model.encode(torch.from_numpy(stereo)[None], bandwidth=6.0)  # (chunks, 1, n_q, 150), last padded
    reference = out.audio_codes[:, 0].permute(1, 0, 2).reshape(4, -1)[:, : whole.shape[1]].numpy()
    assert out.last_frame_pad_length == 150 - 93
    np.testing.assert_array_equal(whole, reference)
    wave = small.decode([whole])[0]
    assert wave.shape[0] == 2 and abs(wave.shape[1] - stereo.shape[1]) < 48_000 * 0.02


def test_odd_inputs_encode_and_bad_files_raise_one_clear_error(tmp_path):
    tok = AudioTokenizer(codec("24khz"), AudioTokenizerConfig(bandwidth=3.0), device="cpu")
    t96 = np.arange(96_000) / 96_000
    sf.write(tmp_path / "eight.wav", np.stack([np.sin(2 * np.pi * 110 * (c + 1) * t96) * 0.1 for c in range(8)], 1),
             96_000)
    sf.write(tmp_path / "phone.wav", speech(8_000), 8_000)
    sf.write(tmp_path / "blip.wav", chord(24_000, 0.05), 24_000)
    sf.write(tmp_path / "silence.flac", np.zeros(48_000, np.float32), 48_000)
    sf.write(tmp_path / "hot.wav", chord(24_000, 0.1) * 1.5 / np.abs(chord(24_000, 0.1)).max(), 24_000, subtype="FLOAT")
    codes = tok.encode([tmp_path / "eight.wav", tmp_path / "phone.wav", tmp_path / "blip.wav",
                        tmp_path / "silence.flac", (np.zeros((2, 2400), np.int16), 24_000), tmp_path / "hot.wav"])
    assert [c.shape for c in codes] == [(4, 75), (4, 376), (4, 4), (4, 75), (4, 8), (4, 8)]  # a master 1.5 over: kept
    good = (tmp_path / "phone.wav").read_bytes()
    (tmp_path / "corrupt.wav").write_bytes(b"RIFX" + good[4:44] + good[44:2000])
    (tmp_path / "empty.wav").write_bytes(b"")
    for name, message in [("corrupt.wav", "not a sound file libsndfile can read"), ("empty.wav", "empty file"),
                          ("missing.wav", "cannot open")]:
        with pytest.raises(AudioError, match=f"{name}: {message}"):
            tok.encode([tmp_path / name])
    with pytest.raises(AudioError, match="NaN"):
        tok.encode([(np.full(100, np.nan, np.float32), 24_000)])
    pcm = (speech(24_000) * 30_000).astype(np.float32)  # integer PCM stored as float without scaling
    sf.write(tmp_path / "unscaled.wav", pcm, 24_000, subtype="FLOAT")
    for source in (tmp_path / "unscaled.wav", (pcm, 24_000)):
        with pytest.raises(AudioError, match=r"samples reach [\d.]+e\+04; float audio lies within about \[-1, 1\]"):
            tok.encode([source])
    with pytest.raises(AudioError, match="sample rate must be a positive integer"):
        tok.encode([(np.zeros(100, np.float32), 0)])
    sf.write(tmp_path / "one_hertz.wav", chord(24_000, 0.1), 1)  # a broken header: 2400 samples "at 1 Hz"
    for source in (tmp_path / "one_hertz.wav", (np.zeros(100, np.float32), 999)):
        with pytest.raises(AudioError, match=r"a sample rate of (1|999) Hz is not sound a codec can take \(below 1000"):
            tok.encode([source])


def test_long_audio_is_streamed_in_bounded_memory_and_close_to_whole_file(tmp_path, monkeypatch):
    model = codec("24khz")
    rate = 24_000
    minutes = 3
    t = np.arange(rate * 60 * minutes) / rate
    long = (np.tile(speech(rate), 40)[: len(t)] * 0.7 + 0.2 * np.sin(2 * np.pi * (220 + 200 * np.sin(t / 3)) * t))
    sf.write(tmp_path / "long.wav", long.astype(np.float32), rate, subtype="PCM_16")
    whole = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=6.0, chunk_s=10_000), device="cpu")
    reference = whole.encode([(sf.read(tmp_path / "long.wav", dtype="float32")[0][: rate * 60], rate)])[0]
    monkeypatch.setattr(audio_module, "READ_BLOCK_S", 2.0)
    tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=6.0, chunk_s=20.0, context_s=2.0), device="cpu",
                         batch_size=1)  # memory is bounded by batch_size windows
    tracemalloc.start()
    codes = tok.encode([tmp_path / "long.wav"])[0]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert codes.shape == (8, 75 * 60 * minutes)
    assert peak < 10e6  # the whole file as float32 would be 17 MB; a window with context is ~2.3 MB
    differing = (codes[:, : reference.shape[1]] != reference).mean()
    assert differing < 0.005  # measured 0.08 % on this model (20 s windows, 2 s context)


def test_multimodal_round_trip_through_the_real_audio_tokenizer(tmp_path, sp_dir):
    tok_audio = AudioTokenizer(codec("24khz"), AudioTokenizerConfig(bandwidth=3.0), device="cpu")
    tok_audio.save(tmp_path / "audio")
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--audio", str(tmp_path / "audio"),
                 "--out", str(tmp_path / "tok")]) == 0
    tok = MultimodalTokenizer.from_dir(tmp_path / "tok")
    assert tok.layout.audio_codebook_sizes == (1024,) * 4
    doc = Document([Text("Listen: "), Audio(SPEECH), Text(" and a chord "), Audio((chord(24_000, 1.0), 24_000))])
    ids = tok.encode(doc)
    parsed = tok.parse(ids)
    assert [p.modality for p in parsed] == ["text", "audio", "text", "audio"]
    expected = tok_audio.encode([SPEECH, (chord(24_000, 1.0), 24_000)])
    np.testing.assert_array_equal(parsed[1].ids, expected[0])
    np.testing.assert_array_equal(parsed[3].ids, expected[1])
    decoded = tok.decode(ids)
    assert decoded.segments[0].text == "Listen: " and decoded.segments[2].text == " and a chord "
    wave, rate = decoded.segments[3].source
    assert rate == 24_000 and wave.shape == (1, 24_000)
