"""End-to-end ``omnitok tokenize`` images/s on real photos against the image tokenizer's model-only encode of the same
images: ``python -m benchmarks.tokenize [--arch janus|tiny] [--images 48] [--workers 2]``."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import default_device, quiet_stderr


def run(args: argparse.Namespace) -> dict:
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
