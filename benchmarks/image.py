"""Image tokenizer encode / decode images/s against transformers' ``JanusVQVAE`` with the same weights, on the same
already-preprocessed batch of real photos (uint8 -> codes and codes -> uint8 for both, so both pay the same
conversions), in one run: ``python -m benchmarks.image [--arch janus|tiny] [--batch 16] [--size 256]``; and the
share of codes that differ when the photos are encoded one at a time (shards promise not to depend on the batch
size: tested on the CPU in float32; a GPU's bf16 convolutions may round a code over to its neighbour)."""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import default_device, photos, timed
from omnitok.device import autocast, model_dtype


def run(args: argparse.Namespace) -> dict:
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
    arrays = photos(args.batch, args.size)
    codes = ours.encode_preprocessed(arrays)
    ours.batch_size = 1  # the same photos one at a time: do their codes depend on the batch (the shards' promise)?
    alone = ours.encode_preprocessed(arrays)
    ours.batch_size = args.batch
    differ = sum(int((a != b).sum()) for a, b in zip(alone, codes)) / sum(c.size for c in codes)

    def peer_encode():
        with torch.inference_mode(), autocast(device):
            return peer.encode(model_input(np.stack(arrays)).to(device)).image_tokens.cpu()

    def peer_decode():
        with torch.inference_mode(), autocast(device):
            tokens = torch.from_numpy(np.stack(codes)).to(device).reshape(len(codes), -1)
            return pixels_to_uint8(peer.decode(tokens)).cpu()

    n = args.batch
    t = {"ours_encode": timed(lambda: ours.encode_preprocessed(arrays), args.repeats, device),
         "peer_encode": timed(peer_encode, args.repeats, device),
         "ours_decode": timed(lambda: ours.decode(codes), args.repeats, device),
         "peer_decode": timed(peer_decode, args.repeats, device)}
    rates = {k: n / v for k, v in t.items()}
    where = f"{device.type} {str(model_dtype(device)).split('.')[1]}, {torch.get_num_threads()} threads"
    print(f"image tokenizer, {args.arch} VQ-16 architecture, {args.size}x{args.size}, batch {n} ({where})")
    for op in ("encode", "decode"):
        ratio = rates[f"ours_{op}"] / rates[f"peer_{op}"]
        print(f"  {op}: omnitok {rates[f'ours_{op}']:.2f} img/s, transformers JanusVQVAE {rates[f'peer_{op}']:.2f} "
              f"img/s, ratio {ratio:.3f}")
    print(f"  codes that differ between encoding one at a time and in batches of {n}: {differ:.2%}")
    return {**rates, "codes_differ_alone_vs_batch": differ}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.image", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["janus", "tiny"], default="janus",
                        help="janus: the real VQ-16 widths (default); tiny: narrow, for a quick look")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=default_device())
    return run(parser.parse_args(argv))

if __name__ == "__main__":
    main()
