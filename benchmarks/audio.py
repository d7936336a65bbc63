"""Audio tokenizer real-time factor (compute seconds per audio second) of encode and decode against transformers'
``EncodecModel`` on the same tensors, looped per clip and stacked in one call:
``python -m benchmarks.audio [--preset 24khz] [--batch 8] [--seconds 10]``."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import default_device, timed


def run(args: argparse.Namespace) -> dict:
    """Real-time factor (seconds of compute per second of audio) of encode and decode on 10 s clips: omnitok's
    AudioTokenizer vs transformers' EncodecModel on the same tensors, looped per clip and stacked in one call."""
    from omnitok.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
    from omnitok.tokenizers.audio_import import encodec_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = encodec_model(args.preset).eval()
    for layer in model.quantizer.layers:  # random EnCodec codebooks are zeros; any spread works for timing
        layer.codebook.embed.normal_(0, 0.1)
    tok = AudioTokenizer(model, AudioTokenizerConfig(bandwidth=args.bandwidth), device=device)
    rate, seconds = tok.sample_rate, args.seconds
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    clips = [(0.3 * np.sin(2 * np.pi * (110 + 50 * i) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
             for i in range(args.batch)]
    if tok.channels == 2:
        clips = [np.stack([c, c]) for c in clips]
    tensors = [torch.from_numpy(c).reshape(1, tok.channels, -1).to(device) for c in clips]
    codes = tok.encode([(c, rate) for c in clips])
    code_tensors = [torch.from_numpy(c)[None, None].to(device) for c in codes]

    def peer_encode_loop():
        with torch.inference_mode():
            return [model.encode(x, bandwidth=args.bandwidth).audio_codes.cpu() for x in tensors]

    def peer_encode_stacked():
        with torch.inference_mode():
            return model.encode(torch.cat(tensors), bandwidth=args.bandwidth).audio_codes.cpu()

    def peer_decode_loop():
        with torch.inference_mode():
            return [model.decode(c, [None]).audio_values.cpu() for c in code_tensors]

    def peer_decode_stacked():
        with torch.inference_mode():
            return model.decode(torch.cat(code_tensors, dim=1), [None]).audio_values.cpu()

    audio_s = seconds * args.batch
    t = {"ours_encode": timed(lambda: tok.encode([(c, rate) for c in clips]), args.repeats, device),
         "peer_encode_loop": timed(peer_encode_loop, args.repeats, device),
         "peer_encode_stacked": timed(peer_encode_stacked, args.repeats, device),
         "ours_decode": timed(lambda: tok.decode(codes), args.repeats, device),
         "peer_decode_loop": timed(peer_decode_loop, args.repeats, device),
         "peer_decode_stacked": timed(peer_decode_stacked, args.repeats, device)}
    rtf = {k: v / audio_s for k, v in t.items()}
    print(f"audio tokenizer, EnCodec {args.preset} at {args.bandwidth:g} kbps ({tok.num_codebooks} codebooks), "
          f"{args.batch} x {seconds:g} s clips ({device.type}, {torch.get_num_threads()} threads, omnitok batches "
          f"{tok.batch_size} windows per pass); RTF = compute s "
          "per audio s, ratio = peer time / omnitok time")
    for op in ("encode", "decode"):
        print(f"  {op}: omnitok RTF {rtf[f'ours_{op}']:.4f}; EncodecModel per clip RTF {rtf[f'peer_{op}_loop']:.4f} "
              f"(ratio {t[f'peer_{op}_loop'] / t[f'ours_{op}']:.3f}), stacked in one call RTF "
              f"{rtf[f'peer_{op}_stacked']:.4f} (ratio {t[f'peer_{op}_stacked'] / t[f'ours_{op}']:.3f})")
    return rtf


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audio", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["24khz", "32khz", "48khz"], default="24khz")
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=default_device())
    return run(parser.parse_args(argv))

if __name__ == "__main__":
    main()
