"""End-to-end ``omnitok tokenize`` images/s on real photos against the image tokenizer's model-only encode of the same
images: ``python -m benchmarks.tokenize [--arch janus|tiny] [--images 48] [--workers 2]``."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import default_device, photo_pairs, quiet_stderr, tokenizer_dir


def run(args: argparse.Namespace) -> dict:
    """End-to-end ``omnitok tokenize`` images/s on a folder of real photos (JPEG decode, EXIF, resize in worker
    processes; encode; shard writing) vs the image tokenizer's model-only encode of the same images already decoded
    and resized, in one run. A ratio near 1 means reading and preprocessing are hidden behind the model."""
    from omnitok.data.tokenize import TokenizeConfig, tokenize
    from omnitok.tokenizers.image import ImageTokenizer

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photo_pairs(root / "photos", args.images)
        tokenizer_dir(root, args.arch, args.size)
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
        with quiet_stderr():
            manifest = tokenize(cfg)
        end_to_end = time.perf_counter() - start
    assert manifest["samples"] == args.images
    rates = {"tokenize": args.images / end_to_end, "model_only": args.images / model_only}
    print(f"omnitok tokenize, {args.images} JPEG photos -> {args.arch} VQ-16 at {args.size}px, batch {args.batch}, "
          f"{args.workers} workers ({device.type}, {torch.get_num_threads()} threads)")
    print(f"  end to end {rates['tokenize']:.2f} img/s (start-up included), model-only encode "
          f"{rates['model_only']:.2f} img/s, ratio {rates['tokenize'] / rates['model_only']:.3f}")
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenize", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["janus", "tiny"], default="janus")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=default_device())
    return run(parser.parse_args(argv))

if __name__ == "__main__":
    main()
