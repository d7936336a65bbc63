"""Benchmarks, each against its peer in the same run: ``python -m omnitok.eval.bench image|audio|...``.

``image``: encode and decode images/s of omnitok's ImageTokenizer against calling transformers' ``JanusVQVAE``
directly with the same weights, on the same already-preprocessed batch of real photos (uint8 -> codes and codes
-> uint8 for both, so both pay the same conversions). Prints images/s and the ratio ours / peer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnitok.device import autocast


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` runs after one warm-up (best-of suppresses noise from other processes)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _photos(n: int, size: int) -> list[np.ndarray]:
    import skimage.data
    from PIL import Image

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    return [np.asarray(Image.fromarray(sources[i % len(sources)]).convert("RGB").resize((size, size)))
            for i in range(n)]


def bench_image(args: argparse.Namespace) -> dict:
    from transformers import JanusVQVAE, JanusVQVAEConfig

    from omnitok.tokenizers.image_import import import_image_tokenizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    widths = {"janus": dict(base_channels=128, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2,
                            latent_channels=256),
              "tiny": dict(base_channels=32, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1,
                           latent_channels=64)}[args.arch]
    cfg = JanusVQVAEConfig(**widths, embed_dim=8, num_embeddings=16384, num_patches=args.size // 16)
    peer = JanusVQVAE(cfg).eval()
    peer.quantize.embedding.weight.data = F.normalize(peer.quantize.embedding.weight.data, dim=-1)
    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        ours = import_image_tokenizer("janus", tmp, image_size=args.size)
    ours.model.to(device)
    ours.device, ours.batch_size = device, args.batch
    peer.to(device)
    arrays = _photos(args.batch, args.size)
    codes = ours.encode_preprocessed(arrays)

    def peer_encode():
        with torch.inference_mode(), autocast(device):
            x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            return peer.encode(x).image_tokens.cpu()

    def peer_decode():
        with torch.inference_mode(), autocast(device):
            tokens = torch.from_numpy(np.stack(codes)).to(device).reshape(len(codes), -1)
            x = peer.decode(tokens)
            return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    n = args.batch
    t = {"ours_encode": _timed(lambda: ours.encode_preprocessed(arrays), args.repeats, device),
         "peer_encode": _timed(peer_encode, args.repeats, device),
         "ours_decode": _timed(lambda: ours.decode(codes), args.repeats, device),
         "peer_decode": _timed(peer_decode, args.repeats, device)}
    rates = {k: n / v for k, v in t.items()}
    where = f"{device.type}{' bf16' if device.type == 'cuda' else ' fp32'}, {torch.get_num_threads()} threads"
    print(f"image tokenizer, {args.arch} VQ-16 architecture, {args.size}x{args.size}, batch {n} ({where})")
    for op in ("encode", "decode"):
        ratio = rates[f"ours_{op}"] / rates[f"peer_{op}"]
        print(f"  {op}: omnitok {rates[f'ours_{op}']:.2f} img/s, transformers JanusVQVAE {rates[f'peer_{op}']:.2f} "
              f"img/s, ratio {ratio:.3f}")
    return rates


def bench_audio(args: argparse.Namespace) -> dict:
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
    t = {"ours_encode": _timed(lambda: tok.encode([(c, rate) for c in clips]), args.repeats, device),
         "peer_encode_loop": _timed(peer_encode_loop, args.repeats, device),
         "peer_encode_stacked": _timed(peer_encode_stacked, args.repeats, device),
         "ours_decode": _timed(lambda: tok.decode(codes), args.repeats, device),
         "peer_decode_loop": _timed(peer_decode_loop, args.repeats, device),
         "peer_decode_stacked": _timed(peer_decode_stacked, args.repeats, device)}
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


def bench_tokenize(args: argparse.Namespace) -> dict:
    """End-to-end ``omnitok tokenize`` images/s on a folder of real photos (JPEG decode, EXIF, resize in worker
    processes; encode; shard writing) vs the image tokenizer's model-only encode of the same images already decoded
    and resized, in one run. A ratio near 1 means reading and preprocessing are hidden behind the model."""
    import skimage.data
    from PIL import Image

    from omnitok.data.tokenize import TokenizeConfig, tokenize
    from omnitok.tokenizers.image import ImagePreprocessConfig, ImageTokenizer
    from omnitok.tokenizers.multimodal import assemble
    from omnitok.tokenizers.vqgan import VQGAN, VQGANConfig
    from omnitok.train.text_tokenizer import TextTokenizerTrainConfig, train_text_tokenizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    widths = {"janus": dict(base_channels=128, num_res_blocks=2, latent_channels=256),
              "tiny": dict(base_channels=32, num_res_blocks=1, latent_channels=64)}[args.arch]
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "photos").mkdir()
        for i in range(args.images):
            p = photos[i % len(photos)]
            y, x = rng.integers(0, p.shape[0] // 3), rng.integers(0, p.shape[1] // 3)
            crop = p[y:y + 2 * p.shape[0] // 3, x:x + 2 * p.shape[1] // 3]
            Image.fromarray(crop).save(root / "photos" / f"{i:04d}.jpg", quality=92)
            (root / "photos" / f"{i:04d}.txt").write_text(f"photo {i}")
        (root / "text.txt").write_text("\n".join(f"photo {i} of a cat, a cup and a rocket" for i in range(2000)))
        train_text_tokenizer([root / "text.txt"], root / "text", TextTokenizerTrainConfig(vocab_size=300))
        model = VQGAN(VQGANConfig(**widths))
        ImageTokenizer(model, ImagePreprocessConfig(image_size=args.size), device="cpu").save(root / "image")
        assemble(root / "text", root / "tok", image=root / "image")
        image = ImageTokenizer.from_dir(root / "image", device=device)
        image.batch_size = args.batch
        files = sorted((root / "photos").glob("*.jpg"))
        arrays = [image.preprocess(f) for f in files]
        image.encode_preprocessed(arrays[: args.batch])  # warm-up
        start = time.perf_counter()
        image.encode_preprocessed(arrays)
        model_only = time.perf_counter() - start
        start = time.perf_counter()
        cfg = TokenizeConfig(inputs=[str(root / "photos")], tokenizer=str(root / "tok"), out=str(root / "shards"),
                             workers=args.workers, batch_size=args.batch, shard_size=1000)
        stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # no progress bar inside a benchmark
        try:
            manifest = tokenize(cfg)
        finally:
            sys.stderr.close()
            sys.stderr = stderr
        end_to_end = time.perf_counter() - start
    assert manifest["samples"] == args.images
    rates = {"tokenize": args.images / end_to_end, "model_only": args.images / model_only}
    print(f"omnitok tokenize, {args.images} JPEG photos -> {args.arch} VQ-16 at {args.size}px, batch {args.batch}, "
          f"{args.workers} workers ({device.type}, {torch.get_num_threads()} threads)")
    print(f"  end to end {rates['tokenize']:.2f} img/s (start-up included), model-only encode "
          f"{rates['model_only']:.2f} img/s, ratio {rates['tokenize'] / rates['model_only']:.3f}")
    return rates


def _synthetic_shards(directory: Path, layout, docs: int, seed: int = 0) -> None:
    """Shards of layout-valid interleaved documents (text, 8x8 images, audio frames) for training benchmarks."""
    from omnitok.data.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(seed)
    writer, shards = ShardWriter(directory, 200), []
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        text = rng.integers(3, layout.text_vocab_size, int(rng.integers(20, 200))).tolist()
        image = [layout.boi_id, layout.rows_id(8), layout.cols_id(8),
                 *layout.image_ids(rng.integers(0, layout.image_codebook_size, 64)).tolist(), layout.eoi_id]
        tokens = [1, *text, *image, 2]
        spans = [["text", 1, 1 + len(text)], ["image", 1 + len(text), 1 + len(text) + len(image)]]
        entry = writer.add(f"d{i:06d}", np.array(tokens, dtype=np.int32), {"spans": spans}, {})
        if entry:
            shards.append(entry)
    if (entry := writer.flush()) is not None:
        shards.append(entry)
    layout.save(directory)
    write_manifest(directory, shards, docs)


def bench_pretrain(args: argparse.Namespace) -> dict:
    """Training tokens/s of ``omnitok pretrain`` (DeepSpeed, the packed shard stream, per-modality loss and
    metrics, logging) vs a plain loop over the same HF model with the same batches already in memory, torch AdamW
    and the same dtype, in one run; plus the fraction of step time spent waiting for data."""
    import json

    import torch.nn.functional as F

    from omnitok.data.stream import PackedStream
    from omnitok.model.build import build_model
    from omnitok.tokenizers.layout import TokenLayout
    from omnitok.train.pretrain import load_pretrain_config, pretrain

    layout = TokenLayout(text_vocab_size=4000, image_codebook_size=1024, max_grid_side=16)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        layout.save(root / "tok")
        _synthetic_shards(root / "shards", layout, docs=2000)
        measured = args.steps // 2
        cfg = load_pretrain_config(args.config, [
            f"tokenizer={root / 'tok'}", f"out={root / 'run'}", f"data.shards=[{root / 'shards'}]",
            f"steps={args.steps}", f"log_every={measured}", f"checkpoint_every={args.steps * 10}", *args.overrides])
        stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
        try:
            pretrain(cfg)
        finally:
            sys.stderr.close()
            sys.stderr = stderr
        last = [json.loads(line) for line in (root / "run" / "train.jsonl").read_text().splitlines()][-1]
        ours, wait = last["tokens_per_s"], last["data_wait"]

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, layout)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                weight_decay=cfg.optim.weight_decay)
        stream = PackedStream(cfg.data, layout, cfg.micro_batch_size)
        batches = [stream.next_batch() for _ in range(args.steps)]

        def step(ids, labels):
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()

        for ids, labels in batches[:measured]:  # warm-up, as the measured window of the run above
            step(ids, labels)
        start = time.perf_counter()
        for ids, labels in batches[measured:]:
            step(ids, labels)
        plain = (args.steps - measured) * cfg.micro_batch_size * cfg.data.seq_len / (time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    print(f"pretraining, {params / 1e6:.1f}M-parameter {cfg.model.arch}, {cfg.micro_batch_size} x {cfg.data.seq_len} "
          f"tokens per step, ZeRO {cfg.zero_stage}, {torch.get_num_threads()} threads; last {args.steps - measured} of "
          f"{args.steps} steps")
    print(f"  omnitok pretrain {ours:.0f} tokens/s, plain loop {plain:.0f} tokens/s, ratio {ours / plain:.3f}; "
          f"data wait {wait:.2%} of step time")
    return {"ours": ours, "plain": plain, "data_wait": wait}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m omnitok.eval.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True, metavar="BENCHMARK")
    image = sub.add_parser("image", help="image tokenizer encode/decode vs transformers JanusVQVAE")
    image.add_argument("--arch", choices=["janus", "tiny"], default="janus",
                       help="janus: the real VQ-16 widths (default); tiny: narrow, for a quick look")
    image.add_argument("--size", type=int, default=256)
    image.add_argument("--batch", type=int, default=16)
    image.add_argument("--repeats", type=int, default=3)
    image.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    image.set_defaults(func=bench_image)
    audio = sub.add_parser("audio", help="audio tokenizer encode/decode RTF vs transformers EncodecModel")
    audio.add_argument("--preset", choices=["24khz", "32khz", "48khz"], default="24khz")
    audio.add_argument("--bandwidth", type=float, default=6.0)
    audio.add_argument("--seconds", type=float, default=10.0)
    audio.add_argument("--batch", type=int, default=1)
    audio.add_argument("--repeats", type=int, default=3)
    audio.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    audio.set_defaults(func=bench_audio)
    tok = sub.add_parser("tokenize", help="omnitok tokenize end to end vs the model-only image encode")
    tok.add_argument("--arch", choices=["janus", "tiny"], default="janus")
    tok.add_argument("--size", type=int, default=256)
    tok.add_argument("--images", type=int, default=48)
    tok.add_argument("--batch", type=int, default=16)
    tok.add_argument("--workers", type=int, default=2)
    tok.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tok.set_defaults(func=bench_tokenize)
    pre = sub.add_parser("pretrain", help="omnitok pretrain tokens/s vs a plain training loop")
    pre.add_argument("--config", default="configs/pretrain-tiny-cpu.yaml")
    pre.add_argument("--steps", type=int, default=40)
    pre.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pre.set_defaults(func=bench_pretrain)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
