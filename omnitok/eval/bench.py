"""Benchmarks, each against its peer in the same run: ``python -m omnitok.eval.bench image|audio|...``.

``image``: encode and decode images/s of omnitok's ImageTokenizer against calling transformers' ``JanusVQVAE``
directly with the same weights, on the same already-preprocessed batch of real photos (uint8 -> codes and codes
-> uint8 for both, so both pay the same conversions). Prints images/s and the ratio ours / peer.

``sample``: the sampler's decode tokens/s against transformers' ``generate`` with the same model and settings, the
time cost of classifier-free guidance on image spans, and decode speed against the memory-bandwidth bound.
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

    from omnitok.tokenizers.image import model_input, pixels_to_uint8
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
            return peer.encode(model_input(np.stack(arrays)).to(device)).image_tokens.cpu()

    def peer_decode():
        with torch.inference_mode(), autocast(device):
            tokens = torch.from_numpy(np.stack(codes)).to(device).reshape(len(codes), -1)
            return pixels_to_uint8(peer.decode(tokens)).cpu()

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

        def step(batch):  # the same inputs (packed position ids when documents are isolated)
            logits = model(**batch.model_inputs(torch.device("cpu"))).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()

        for batch in batches[:measured]:  # warm-up, as the measured window of the run above
            step(batch)
        start = time.perf_counter()
        for batch in batches[measured:]:
            step(batch)
        plain = (args.steps - measured) * cfg.micro_batch_size * cfg.data.seq_len / (time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    print(f"pretraining, {params / 1e6:.1f}M-parameter {cfg.model.arch}, {cfg.micro_batch_size} x {cfg.data.seq_len} "
          f"tokens per step, ZeRO {cfg.zero_stage}, {torch.get_num_threads()} threads; last {args.steps - measured} of "
          f"{args.steps} steps")
    print(f"  omnitok pretrain {ours:.0f} tokens/s, plain loop {plain:.0f} tokens/s, ratio {ours / plain:.3f}; "
          f"data wait {wait:.2%} of step time")
    return {"ours": ours, "plain": plain, "data_wait": wait}


SAMPLE_SIZES = {"tiny": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4),
                "1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4)}


def bench_sample(args: argparse.Namespace) -> dict:
    """Decode tokens/s of omnitok's sampler vs transformers' ``generate`` (same model, prompt, temperature / top-p,
    KV cache), text mode at batch 1 and 8; then the cost of classifier-free guidance on image spans; then decode
    speed as a fraction of the memory-bandwidth bound (weight bytes per step / measured copy bandwidth)."""
    from omnitok.model.build import ModelConfig, build_model
    from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate
    from omnitok.tokenizers.layout import TokenLayout, image_span_length

    device = torch.device(args.device)
    layout = TokenLayout(text_vocab_size=args.text_vocab, image_codebook_size=16384, max_grid_side=args.grid,
                         audio_codebook_size=1024, audio_num_codebooks=4)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SAMPLE_SIZES[args.size]), layout).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    eos = 2
    with torch.no_grad():
        model.lm_head.weight[eos] = 0  # so both sides generate the full length
    prompt = [1] + list(range(5, 5 + args.prompt_len))
    n = args.new_tokens
    text = ModalitySampling(temperature=0.8, top_p=0.95)
    out: dict = {}
    where = f"{device.type} {str(dtype).split('.')[1]}, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in model.parameters())
    print(f"sampling, {params / 1e6:.0f}M-parameter llama, vocab {layout.vocab_size}, {where}")
    for batch in (1, 8):
        prompts = [prompt] * batch
        cfg = SamplingConfig(text=text, output="text", max_new_tokens=n)
        ids = torch.tensor(prompts, device=device)
        counts = {}

        def ours():
            counts["ours"] = sum(len(o) for o in generate(model, layout, prompts, eos, cfg))

        def peer():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True,
                                 temperature=0.8, top_p=0.95, top_k=0, pad_token_id=layout.pad_id,
                                 eos_token_id=eos)[:, ids.shape[1]:]
            counts["peer"] = int((new != layout.pad_id).sum())

        t_ours, t_peer = _timed(ours, args.repeats, device), _timed(peer, args.repeats, device)
        r_ours, r_peer = counts["ours"] / t_ours, counts["peer"] / t_peer
        out[f"batch{batch}"] = {"ours": r_ours, "peer": r_peer, "ratio": r_ours / r_peer}
        print(f"  text, batch {batch}: omnitok {r_ours:.0f} tokens/s, transformers generate {r_peer:.0f} tokens/s, "
              f"ratio {r_ours / r_peer:.2f}")
    g = args.grid
    for batch in (1, 8):
        times = {}
        for scale in (1.0, 3.0):
            cfg = SamplingConfig(output="image", grid=(g, g), max_new_tokens=image_span_length(g, g),
                                 image=ModalitySampling(top_k=1000, guidance=scale))
            times[scale] = _timed(lambda cfg=cfg: generate(model, layout, [prompt] * batch, eos, cfg),
                                  args.repeats, device)
        out[f"cfg_batch{batch}"] = {"s_per_image_plain": times[1.0] / batch, "s_per_image_cfg": times[3.0] / batch,
                                    "cost": times[3.0] / times[1.0]}
        print(f"  {g}x{g} image, batch {batch}: {times[1.0] / batch:.2f} s/image without guidance, "
              f"{times[3.0] / batch:.2f} with (scale 3): CFG costs {times[3.0] / times[1.0]:.2f}x time")
    big = torch.ones(256 * 2 ** 20 // 4, dtype=torch.float32, device=device)  # 256 MiB, far beyond any cache
    dst = torch.empty_like(big)
    copy_s = _timed(lambda: dst.copy_(big), args.repeats + 2, device)
    bandwidth = 2 * big.numel() * 4 / copy_s  # read + write
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = 1 / out["batch1"]["ours"]
    bound = weight_bytes / bandwidth
    out["bandwidth"] = {"copy_GBps": bandwidth / 1e9, "bound_s": bound, "fraction": bound / per_token}
    print(f"  memory bound: {weight_bytes / 1e6:.0f} MB of weights at {bandwidth / 1e9:.1f} GB/s copy bandwidth = "
          f"{bound * 1e3:.2f} ms/token; batch 1 decode takes {per_token * 1e3:.2f} ms/token: "
          f"{bound / per_token:.1%} of the bound")
    return out


_LOSS_PROBE = """
import json, resource, sys, time, torch
from omnitok.model.loss import LossConfig, lm_loss
from omnitok.tokenizers.layout import TokenLayout
rows, vocab, chunk = (int(a) for a in sys.argv[1:4])
layout = TokenLayout(text_vocab_size=vocab - 64)
torch.manual_seed(0)
logits = torch.randn(1, rows, layout.vocab_size, dtype=torch.bfloat16).requires_grad_()
labels = torch.randint(0, layout.text_vocab_size, (1, rows))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
loss, _ = lm_loss(logits, labels, layout, LossConfig(chunk_rows=chunk))
loss.backward()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (peak - base) / 1024, "seconds": seconds, "loss": loss.item()}))
"""


def bench_loss(args: argparse.Namespace) -> dict:
    """Peak memory of the loss's forward and backward beyond the bf16 logits themselves: chunked cross-entropy vs
    the same function over all rows at once (the memory profile of the version before chunking, which kept a full
    fp32 copy), each in a fresh process (peak resident set)."""
    import json
    import subprocess
    import sys

    rows = args.batch * args.seq
    results = {}
    for name, chunk in (("whole", rows), ("chunked", args.chunk)):
        out = subprocess.run([sys.executable, "-c", _LOSS_PROBE, str(rows), str(args.vocab), str(chunk)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mb = rows * (args.vocab // 64 * 64 + 64) * 2 / 2**20
    ratio = results["chunked"]["extra_mb"] / results["whole"]["extra_mb"]
    c, w = results["chunked"], results["whole"]
    print(f"loss on bf16 logits {args.batch}x{args.seq}x{args.vocab} ({logits_mb:.0f} MB): peak extra memory "
          f"chunked ({args.chunk} rows) {c['extra_mb']:.0f} MB, whole {w['extra_mb']:.0f} MB -> ratio {ratio:.2f}; "
          f"time {c['seconds']:.2f} s vs {w['seconds']:.2f} s; loss {c['loss']:.6f} vs {w['loss']:.6f}")
    return {**results, "ratio": ratio}


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
    sam = sub.add_parser("sample", help="sampler decode tokens/s vs transformers generate; CFG cost")
    sam.add_argument("--size", choices=sorted(SAMPLE_SIZES), default="tiny")
    sam.add_argument("--text-vocab", type=int, default=32000)
    sam.add_argument("--grid", type=int, default=16, help="image grid side for the CFG timing (1b: 32)")
    sam.add_argument("--prompt-len", type=int, default=32)
    sam.add_argument("--new-tokens", type=int, default=128)
    sam.add_argument("--repeats", type=int, default=2)
    sam.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sam.set_defaults(func=bench_sample)
    lo = sub.add_parser("loss", help="peak memory of the chunked cross-entropy vs the unchunked form")
    lo.add_argument("--batch", type=int, default=8)
    lo.add_argument("--seq", type=int, default=1024)
    lo.add_argument("--vocab", type=int, default=65536)
    lo.add_argument("--chunk", type=int, default=1024)
    lo.set_defaults(func=bench_loss)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
