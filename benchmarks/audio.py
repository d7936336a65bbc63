"""Audio tokenizer real-time factor (compute seconds per audio second) of encode and decode, per codec, against
calling the transformers model directly on the same tensors (one clip a call at batch 1; the clips stacked in one call
at batch 8), and tokens per second of audio:
``python -m benchmarks.audio [--codecs encodec mimi dac wavtokenizer xcodec xcodec2] [--seconds 5] [--batches 1 8]
[--bf16-batch 64]`` (the last: what bf16 autocast would change, ``bf16``).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from benchmarks.common import default_device, timed

# The published configurations (random weights: speed does not depend on them) and the codebooks chosen; ``tiny``
# sizes are the tests' (tests/test_codecs.py builds its codecs here) and the reduced GPU check's.
PUBLISHED: dict[str, dict[str, Any]] = {
    "encodec": dict(sampling_rate=24_000, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0]),  # facebook/encodec_24khz
    "mimi": dict(),  # kyutai/mimi: the MimiConfig defaults
    "dac": dict(sampling_rate=44_100, n_codebooks=9, downsampling_ratios=[2, 4, 8, 8]),  # descript/dac_44khz
    "wavtokenizer": dict(),  # WavTokenizer 40 tokens/s at 24 kHz: the WavTokenizerConfig defaults
    "xcodec": dict(),  # X-Codec (hf-audio/xcodec-hubert-librispeech): the XcodecConfig defaults, HuBERT base
    "xcodec2": dict(),  # HKUSTAudio/xcodec2: the Xcodec2Config defaults (a 16-layer Wav2Vec2-BERT semantic encoder)
}
TINY: dict[str, dict[str, Any]] = {
    "encodec": dict(num_filters=8, hidden_size=32, codebook_dim=32),
    "mimi": dict(hidden_size=64, num_filters=8, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, codebook_dim=32, vector_quantization_hidden_dimension=32, upsample_groups=64,
                 num_quantizers=8, codebook_size=64),
    "dac": dict(encoder_hidden_size=8, decoder_hidden_size=32, n_codebooks=4, codebook_size=64, sampling_rate=16_000),
    "wavtokenizer": dict(num_filters=8, hidden_size=32, codebook_dim=32, codebook_size=64, decoder_hidden_size=32,
                         decoder_intermediate_size=64, decoder_num_layers=2, decoder_attention_num_groups=8,
                         num_lstm_layers=1),
    "xcodec": dict(acoustic_model_config=dict(encoder_hidden_size=8, decoder_hidden_size=32, hidden_size=32),
                   semantic_model_config=dict(model_type="hubert", hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64, conv_dim=[16] * 7,
                                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
                   codebook_size=64),
    # one semantic layer: Wav2Vec2-BERT's relative position keys cost time quadratic in a clip's length (a whole
    # 3-minute file through two layers took 46 s of the long-file test)
    "xcodec2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, encoder_hidden_size=4, quantization_dim=64,
                    quantization_levels=[4, 4, 4, 4],
                    semantic_model_config=dict(model_type="wav2vec2-bert", hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64, output_hidden_size=32,
                                               conv_depthwise_kernel_size=3)),
}
SETTING = {"encodec": dict(bandwidth=6.0), "mimi": dict(num_codebooks=8), "dac": dict(), "wavtokenizer": dict(),
           "xcodec": dict(bandwidth=4.0), "xcodec2": dict()}
CLASSES = {"encodec": ("EncodecModel", "EncodecConfig"), "mimi": ("MimiModel", "MimiConfig"),
           "dac": ("DacModel", "DacConfig"), "wavtokenizer": ("WavTokenizerModel", "WavTokenizerConfig"),
           "xcodec": ("XcodecModel", "XcodecConfig"), "xcodec2": ("Xcodec2Model", "Xcodec2Config")}


def codec_model(kind: str, tiny: bool = False, **overrides: Any):
    """A random-weight transformers codec model of the published (or the tiny) size."""
    import transformers

    model_name, config_name = CLASSES[kind]
    config = {**PUBLISHED[kind], **(TINY[kind] if tiny else {}), **overrides}
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()


def peer_calls(kind: str, model: Any, n_q: int, bandwidth: float | None):
    """The transformers model called directly, as its documentation shows: (B, C, S) -> codes (B, n_q, F) (EnCodec:
    (chunks, B, n_q, F)), codes -> audio (B, C, samples), with ``n_q`` codebooks (or ``bandwidth`` kbps). X-Codec2's
    class needs its feature extractor's padding and features (which need torchaudio): the peer computes them as the
    extractor does, with omnitok's Kaldi filterbank in torchaudio's place (the tests use the extractor itself)."""
    if kind == "encodec":
        return (lambda x: model.encode(x, bandwidth=bandwidth).audio_codes,
                lambda c: model.decode(c, [None]).audio_values)
    if kind == "mimi":
        return lambda x: model.encode(x, num_quantizers=n_q).audio_codes, lambda c: model.decode(c).audio_values
    if kind == "dac":
        return (lambda x: model.encode(x, n_quantizers=n_q).audio_codes[:, :n_q],
                lambda c: model.decode(audio_codes=c).audio_values[:, None])
    if kind == "xcodec":
        return lambda x: model.encode(x, bandwidth=bandwidth).audio_codes, lambda c: model.decode(c).audio_values
    if kind == "xcodec2":
        from omnitok.tokenizers.codecs import Xcodec2Codec

        features = Xcodec2Codec(model, None).features

        def encode(x):
            x = torch.nn.functional.pad(x, (0, 1))
            x = torch.nn.functional.pad(x, (0, -x.shape[-1] % model.config.hop_length))
            return model.encode(x, features(x)).audio_codes

        return encode, lambda c: model.decode(c).audio_values
    return lambda x: model.encode(x).audio_codes, lambda c: model.decode(c).audio_values


def tokenizer(kind: str, tiny: bool, device: torch.device):
    """An ``AudioTokenizer`` over a random-weight codec (``codec_model``), its codebooks spread (zero codebooks give
    one code; any spread works for timing)."""
    from omnitok.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig

    torch.manual_seed(0)
    model = codec_model(kind, tiny=tiny)
    for name, buffer in model.named_buffers():
        if name.endswith(("codebook.embed", "codebook.embed_sum")):
            buffer.normal_(0, 0.1)
    return AudioTokenizer(model, AudioTokenizerConfig(**SETTING[kind]), device=device)


def clips(tok, seconds: float, n: int) -> list[np.ndarray]:
    """``n`` clips of ``seconds`` (whole frames) at the codec's rate: a tone a clip and a little noise."""
    rate = tok.sample_rate
    samples = round(seconds * rate / tok.hop) * tok.hop  # whole frames: both sides see the same tensor
    rng = np.random.default_rng(0)
    t = np.arange(samples) / rate
    return [np.tile((0.3 * np.sin(2 * np.pi * (110 + 50 * i) * t) + 0.05 * rng.standard_normal(samples))
                    .astype(np.float32), (tok.channels, 1)) for i in range(n)]


def measure(kind: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    tok = tokenizer(kind, args.tiny, device)
    encode, decode = peer_calls(kind, tok.model, tok.num_codebooks, tok.config.bandwidth)
    rate = tok.sample_rate
    row = {"tokens_per_s": tok.frame_rate * tok.num_codebooks, "frame_rate": tok.frame_rate,
           "codebooks": tok.num_codebooks, "sample_rate": rate}
    for batch in args.batches:
        waves = clips(tok, args.seconds, batch)
        samples = waves[0].shape[1]
        tensors = [torch.from_numpy(c)[None].to(device) for c in waves]
        codes = tok.encode([(c, rate) for c in waves])
        code_tensors = [torch.from_numpy(c)[None].to(device) for c in codes]
        if kind == "encodec":
            code_tensors = [c[None] for c in code_tensors]  # (chunks=1, B, n_q, F)

        def peer_encode():
            with torch.inference_mode():
                if batch == 1:
                    return encode(tensors[0]).cpu()
                return encode(torch.cat(tensors)).cpu()

        def peer_decode():
            with torch.inference_mode():
                if batch == 1:
                    return decode(code_tensors[0]).cpu()
                return decode(torch.cat(code_tensors, dim=-3 if kind != "encodec" else 1)).cpu()

        audio_s = samples / rate * batch
        times = {"ours_encode": timed(lambda: tok.encode([(c, rate) for c in waves]), args.repeats, device),
                 "peer_encode": timed(peer_encode, args.repeats, device),
                 "ours_decode": timed(lambda: tok.decode(codes), args.repeats, device),
                 "peer_decode": timed(peer_decode, args.repeats, device)}
        row[f"batch{batch}"] = {**{f"{k}_rtf": v / audio_s for k, v in times.items()},
                                "encode_ratio": times["peer_encode"] / times["ours_encode"],
                                "decode_ratio": times["peer_decode"] / times["ours_decode"]}
    return row


def bf16(kind: str, batch: int, seconds: float, tiny: bool, device: torch.device, repeats: int = 1) -> dict:
    """What bf16 autocast would give a codec on a batch of ``batch`` clips, against float32 (what ``AudioTokenizer``
    runs in everywhere): encode and decode real-time factors, the share of codes that change per codebook (the
    quantizer's distances in bf16 may pick a neighbouring code, and a frame whose first code changes quantizes another
    residual in every later codebook), and the decoded audio's SNR against float32's from the same codes. Random
    weights: the shares show how often bf16 crosses a boundary, not what a trained codec would hear."""
    tok = tokenizer(kind, tiny, device)
    tok.batch_size = batch
    items = [(w, tok.sample_rate) for w in clips(tok, seconds, batch)]
    audio_s = seconds * batch

    def low(fn, *a):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*a)

    full, half = tok.encode(items), low(tok.encode, items)
    wave_full, wave_half = np.stack(tok.decode(full)), np.stack(low(tok.decode, full))
    differ = np.mean([(a != b).mean(axis=1) for a, b in zip(full, half)], axis=0)  # per codebook
    times = {"encode_fp32": timed(lambda: tok.encode(items), repeats, device),
             "encode_bf16": timed(lambda: low(tok.encode, items), repeats, device),
             "decode_fp32": timed(lambda: tok.decode(full), repeats, device),
             "decode_bf16": timed(lambda: low(tok.decode, full), repeats, device)}
    snr = 10 * np.log10(np.sum(wave_full ** 2) / max(np.sum((wave_half - wave_full) ** 2), 1e-30))
    row = {"batch": batch, "seconds": seconds, **{f"{k}_rtf": v / audio_s for k, v in times.items()},
           "encode_speedup": times["encode_fp32"] / times["encode_bf16"],
           "decode_speedup": times["decode_fp32"] / times["decode_bf16"],
           "codes_differ": float(differ.mean()), "codes_differ_per_codebook": [round(float(d), 5) for d in differ],
           "decode_snr_db": float(snr)}
    print(f"  {kind} bf16 autocast vs float32, batch {batch} of {seconds:g} s: encode {row['encode_speedup']:.2f}x, "
          f"decode {row['decode_speedup']:.2f}x as fast; codes that change {row['codes_differ']:.2%} (per codebook "
          f"{', '.join(f'{d:.1%}' for d in differ)}); decoded audio {snr:.1f} dB SNR against float32's")
    return row


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    print(f"audio tokenizers: {args.seconds:g} s clips ({device.type}, {torch.get_num_threads()} threads); RTF = "
          "compute s per audio s; ratio = transformers-class time / omnitok time (>= 0.95 is the goal at batch 1)")
    report = {}
    for kind in args.codecs:
        report[kind] = row = measure(kind, args)
        print(f"  {kind}: {row['sample_rate']} Hz, {row['frame_rate']:g} frames/s x {row['codebooks']} codebooks = "
              f"{row['tokens_per_s']:g} tokens per second of audio")
        for batch in args.batches:
            r = row[f"batch{batch}"]
            for op in ("encode", "decode"):
                print(f"    batch {batch} {op}: RTF omnitok {r[f'ours_{op}_rtf']:.4f}, class "
                      f"{r[f'peer_{op}_rtf']:.4f}, ratio {r[f'{op}_ratio']:.3f}")
        if args.bf16_batch:
            row["bf16"] = bf16(kind, args.bf16_batch, args.seconds, args.tiny, device, args.repeats)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audio", description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", nargs="+", choices=list(PUBLISHED), default=list(PUBLISHED))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16-batch", type=int, default=0, metavar="N",
                        help="also each codec under bf16 autocast against float32 on a batch of N clips")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny sizes instead of the published ones")
    parser.add_argument("--device", default=default_device())
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
