"""Speculative Jacobi decoding in image spans against plain decoding, and guided image spans against unguided, in
one run: forward passes, wall time per image and the sampler's own share of it at batch 1 and 8, on an ``omnitok
demo`` model (and, over ``--seeds`` seeds one image at a time, forward passes per image and the red-circle hit rate,
SJD on and off) and on the tiny random model of ``benchmarks.sample``: ``python -m benchmarks.sjd [--model
DEMO/sft/export] [--window 8 16] [--seeds 64]`` (each window measured against plain decoding in the same run)."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from benchmarks.common import default_device, model_passes, weights_bound
from benchmarks.sample import random_llama
from benchmarks.synthetic import BOS, EOS, FIRST_TEXT
from omnitok.device import model_dtype


def compare(name: str, model, layout, prompt: list[int], eos: int, cfg, window: int, repeats: int, images: int,
            device: torch.device, compiled: bool = False) -> dict:
    """Forward passes (per image at batch 1; per batch of 8, which runs until its slowest sample ends), seconds per
    image and the sampler's own share of them, SJD off and on, and with ``cfg``'s guidance off when it guides (what
    guidance costs): ``images`` seeds one at a time, and the same seeds (at least 8) in batches of 8, so both batch
    sizes make the same images; each timed as a whole, best of ``repeats`` after a warm-up on 4x4 images (which pays
    the compiler with ``compiled``: the shapes are dynamic, so a larger image compiles nothing new)."""
    from omnitok.model.sampler import generate
    from omnitok.tokenizers.layout import image_span_length

    settings = {"plain": cfg, "sjd": replace(cfg, image=replace(cfg.image, sjd_window=window))}
    if cfg.image.guidance != 1:
        settings = {"unguided": replace(cfg, image=replace(cfg.image, guidance=1.0)), **settings}
    out = {}
    seeds = list(range(100, 100 + max(images, 8)))
    for batch in (1, 8):
        chunks = [seeds[i:i + batch] for i in range(0, images if batch == 1 else len(seeds), batch)]
        row = {}
        for label, c in settings.items():
            small = replace(c, grid=(4, 4), max_new_tokens=image_span_length(4, 4))
            generate(model, layout, [prompt] * batch, eos, small, seeds=list(range(batch)), compiled=compiled)
            best, spent = float("inf"), {}
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                with model_passes() as seen:
                    start = time.perf_counter()
                    for chunk in chunks:
                        generate(model, layout, [prompt] * len(chunk), eos, c, seeds=chunk, compiled=compiled)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    took = time.perf_counter() - start
                if took < best:
                    best, spent = took, dict(seen)
            row[label] = {"s_per_image": best / sum(map(len, chunks)), "passes": spent["passes"] / len(chunks),
                          "ms_per_pass": 1e3 * best / spent["passes"],
                          "sampler_ms_per_pass": 1e3 * (best - spent["seconds"]) / spent["passes"],
                          "sampler_share": 1 - spent["seconds"] / best}
        row["passes_ratio"] = row["sjd"]["passes"] / row["plain"]["passes"]
        row["speedup"] = row["plain"]["s_per_image"] / row["sjd"]["s_per_image"]
        # what a window pass costs against a one-token step (prefill and the sampler's own work included): a model's
        # time with SJD against without is about its passes_ratio x window_cost on this device. A random ~1B model
        # accepts next to no drafts (its codes are near-uniform: passes_ratio ~1 measured on the CPU), so on a GPU
        # its window_cost, with the passes ratio of a trained model, is what says whether SJD pays there
        row["window_cost"] = row["sjd"]["ms_per_pass"] / row["plain"]["ms_per_pass"]
        guided = ""
        if "unguided" in row:
            row["guidance_cost"] = row["plain"]["s_per_image"] / row["unguided"]["s_per_image"]
            guided = (f"; unguided {row['unguided']['s_per_image']:.3f} s per image (guidance costs "
                      f"{row['guidance_cost']:.2f}x)")
        out[f"batch{batch}"] = row
        print(f"  {name}, batch {batch}: {row['plain']['passes']:.1f} -> {row['sjd']['passes']:.1f} forward passes "
              f"({row['passes_ratio']:.2f}x), {row['plain']['s_per_image']:.3f} -> "
              f"{row['sjd']['s_per_image']:.3f} s per image ({row['speedup']:.2f}x faster); a window pass costs "
              f"{row['window_cost']:.2f}x a one-token step; {row['plain']['ms_per_pass']:.2f} ms a pass, "
              f"{row['plain']['sampler_share']:.0%} of it the sampler's own work{guided}")
    return out


def demo_model(args: argparse.Namespace, device: torch.device) -> dict:
    """The demo model, "a red circle" as in the demo (the CLI's sampling defaults, guidance 3, top-k 1000)."""
    import numpy as np

    from omnitok.demo.measure import caption_match
    from omnitok.model.sample import load_model, parse_prompt, prompt_tokens
    from omnitok.model.sampler import SamplingConfig, generate

    model, tok = load_model(args.model, device=device)
    layout = tok.layout
    ids, eos, _, _ = prompt_tokens(tok, [parse_prompt("a red circle")], chat=False)
    cfg = SamplingConfig(output="image", max_new_tokens=256)
    g = cfg.grid or (layout.max_grid_side, layout.max_grid_side)
    print(f"demo model {args.model}: images up to {g[0]}x{g[1]} codes, window {args.window}")
    out = compare("demo", model, layout, ids[0], eos, cfg, args.window, args.repeats, args.images, device)
    hits, passes = {}, {}
    for label, c in (("plain", cfg), ("sjd", replace(cfg, image=replace(cfg.image, sjd_window=args.window)))):
        spans = []
        with model_passes() as seen:  # one at a time: passes per image (a batch waits for its slowest)
            for seed in range(1000, 1000 + args.seeds):
                spans += generate(model, layout, [ids[0]], eos, c, seeds=[seed])
        passes[label] = seen["passes"] / args.seeds
        pictures = tok.image.decode([tok.parse(np.asarray(s))[0].ids for s in spans])
        hits[label] = caption_match(list(pictures), "red", "circle")["both"]
    out["red_circle"] = {**hits, "seeds": args.seeds}
    out["passes_per_image"] = {**passes, "ratio": passes["sjd"] / passes["plain"]}
    print(f"  over the same {args.seeds} seeds one at a time: {passes['plain']:.1f} -> {passes['sjd']:.1f} "
          f"forward passes per image ({passes['sjd'] / passes['plain']:.2f}x); red circles plain {hits['plain']}, "
          f"SJD {hits['sjd']}")
    return out


def random_model(args: argparse.Namespace, device: torch.device, size: str = "tiny", grid: int = 16,
                 guidance: float = 3.0, compiled: bool = False) -> dict:
    """A random model of ``benchmarks.sample`` (``size``) with ``grid`` x ``grid`` image spans (near-uniform
    predictions, which guidance's plausibility floor sharpens); ``compiled``: the decoder under ``torch.compile``
    (CUDA graphs for one-token steps on a GPU)."""
    from omnitok.model.sampler import ModalitySampling, SamplingConfig
    from omnitok.tokenizers.layout import image_span_length

    model, layout = random_llama(size, 32000, grid, device, model_dtype(device))
    cfg = SamplingConfig(output="image", grid=(grid, grid), max_new_tokens=image_span_length(grid, grid),
                         image=ModalitySampling(top_k=1000, guidance=guidance))
    print(f"{size} random model ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M), {grid}x{grid} images, "
          f"guidance {guidance:g}{', compiled' if compiled else ''}")
    out = compare(f"random {size}", model, layout, [BOS] + list(range(FIRST_TEXT, FIRST_TEXT + 16)), EOS, cfg,
                  args.window, args.repeats, args.images, device, compiled)
    _, bound = weights_bound(model, device)
    for row in out.values():
        for label in ("plain", "sjd"):  # image codes per second of the whole batch
            row[label]["codes_per_s"] = grid * grid / row[label]["s_per_image"]
        for label in ("unguided", "plain", "sjd"):  # a pass at the memory-bandwidth bound reads the weights once
            if label in row:  # (unguided: only where the settings guide)
                row[label]["bound_fraction"] = bound * 1e3 / row[label]["ms_per_pass"]
    print(f"  guided passes at batch 1 and 8 run at {out['batch1']['plain']['bound_fraction']:.1%} and "
          f"{out['batch8']['plain']['bound_fraction']:.1%} of the memory-bandwidth bound (the weights read once a "
          f"pass: {bound * 1e3:.2f} ms)")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sjd", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an omnitok demo export (DEMO/sft/export or DEMO/export)")
    parser.add_argument("--window", type=int, nargs="+", default=[8, 16], help="drafts per window (several: each)")
    parser.add_argument("--seeds", type=int, default=64, help="red-circle samples per setting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=8, help="images timed one at a time (and at least 8 batched)")
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"{device.type}, {torch.get_num_threads()} threads")
    out = {}
    with torch.inference_mode():
        for window in args.window:
            one = argparse.Namespace(**{**vars(args), "window": window})
            out[f"window{window}"] = {"demo": demo_model(one, device)} if args.model else {}
            out[f"window{window}"]["random"] = random_model(one, device)
    return out


if __name__ == "__main__":
    main()
