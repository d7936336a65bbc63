"""Whether a seed samples the same alone as in a batch on this device and dtype, and whether greedy speculative Jacobi
decoding gives plain greedy decoding's tokens: ``python -m benchmarks.exactness [--model EXPORT] [--seeds 8]``
(default: the tiny random model of ``benchmarks.sample``; settings: plain, guided and guided SJD image spans, SJD
audio spans, and a batch whose samples move between text and media).

The sampler treats every sample on its own (grammar, generator, draws, drafts, guidance row), so a sample's tokens
depend on its batch only through the logits the model computes for its row, and those are not always the same bits:
a BLAS picks its matrix kernel by the number of rows (MKL on the CPU here rounds a row one way alone, another among
2 to 10-15 rows, another among more, and again past about 256 rows with a large inner size; the bounds depend on the
shapes), and PyTorch's elementwise kernels compute a tensor's last few values with scalar code (a SiLU over a width
that is not a multiple of 32 rounds the last row's tail differently). A draw that lands within that rounding of the
boundary between two codes then goes the other way.
Measured on the CPU here in float32, 64 seeds: the tiny random model (8x8 images, codes near-uniform over top-k 1000)
62/64 the same in each image setting, 64/64 for audio and the mixed batch; the demo model 64/64 in every setting.
bfloat16 rounds 2^16 times coarser; on a GPU the report has both dtypes."""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import default_device, first_difference
from benchmarks.sample import SAMPLE_SIZES, random_llama
from benchmarks.synthetic import BOS, EOS, FIRST_TEXT


def _random_model(args: argparse.Namespace, device: torch.device):
    model, layout = random_llama(args.size, 1000 if args.size == "tiny" else 32000, args.grid, device,
                                 torch.float32)
    return model, layout, [BOS] + list(range(FIRST_TEXT, FIRST_TEXT + 16)), EOS, f"{args.size} random model"


def _exported(args: argparse.Namespace, device: torch.device):
    from omnitok.model.sample import load_model, parse_prompt, prompt_tokens

    model, tok = load_model(args.model, device=device)
    ids, eos, _, _ = prompt_tokens(tok, [parse_prompt(args.prompt)], chat=False)
    return model, tok.layout, ids[0], eos, f"{args.model}, {args.prompt!r}"


def run(args: argparse.Namespace) -> dict:
    """Per dtype (float32; bfloat16 too on a GPU), per setting: how many of ``args.seeds`` seeds sample the same
    alone as together, and the earliest position where one differs; how far a row's logits move between a batch of
    one and of ``args.seeds`` (the rounding a difference comes from); whether greedy SJD equals greedy decoding.
    The model: ``args.model`` (an ``omnitok export``, prompted with ``args.prompt``) or a random one of
    ``args.size``."""
    from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate
    from omnitok.tokenizers.layout import image_span_length

    device = torch.device(args.device)
    model, layout, prompt, eos, what = (_exported if args.model else _random_model)(args, device)
    g, n = layout.max_grid_side, args.seeds
    image = dict(output="image", grid=(g, g), max_new_tokens=image_span_length(g, g))
    window = max(2, g * g // 8)
    settings = {
        "image": SamplingConfig(**image, image=ModalitySampling(top_k=1000)),
        "image_guided": SamplingConfig(**image, image=ModalitySampling(top_k=1000, guidance=3.0)),
        "image_guided_sjd": SamplingConfig(**image, image=ModalitySampling(top_k=1000, guidance=3.0,
                                                                           sjd_window=window)),
        "audio_sjd": SamplingConfig(output="audio", max_new_tokens=64, audio=ModalitySampling(top_k=100,
                                                                                            sjd_window=4)),
        "mixed_sjd": SamplingConfig(output="any", max_new_tokens=3 * g * g, image=ModalitySampling(sjd_window=window),
                                    audio=ModalitySampling(sjd_window=4)),
    }
    if not layout.has_audio:
        del settings["audio_sjd"]
    greedy = {w: SamplingConfig(**image, greedy=True, image=ModalitySampling(sjd_window=w)) for w in (0, window)}
    out: dict = {}
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    print(f"{what}, {g}x{g} images, {n} seeds alone vs in one batch, {device.type}")
    with torch.inference_mode():
        for dtype in dtypes:
            model = model.to(dtype)
            name = str(dtype).split(".")[1]
            row: dict = {}
            for label, cfg in settings.items():
                seeds = list(range(n))
                together = generate(model, layout, [prompt] * n, eos, cfg, seeds=seeds)
                alone = [generate(model, layout, [prompt], eos, cfg, seeds=[s])[0] for s in seeds]
                where = [first_difference(a, b) for a, b in zip(alone, together)]
                row[label] = {"alone_equals_batch": where.count(None), "of": n,
                              "first_difference": min((w for w in where if w is not None), default=None)}
                print(f"  {name} {label}: {where.count(None)}/{n} seeds the same alone as in a batch"
                      + ("" if row[label]["first_difference"] is None
                         else f" (first difference at token {row[label]['first_difference']})"))
            # how far the batch moves a row's logits: one sampled sequence alone and as n identical rows
            ids = torch.tensor([prompt + together[0]], device=device)
            one, many = model(ids).logits[0].float(), model(ids.repeat(n, 1)).logits[0].float()
            drift = (one - many).abs().max().item()
            row["logit_drift"] = {"max_abs": drift, "relative_to_std": drift / one.std().item()}
            print(f"  {name} a row's logits alone vs among {n}: at most {drift:.3g} apart "
                  f"({row['logit_drift']['relative_to_std']:.2g} of their spread)")
            plain, sjd = (generate(model, layout, [prompt], eos, greedy[w])[0] for w in (0, window))
            row["greedy_sjd_equals_greedy"] = plain == sjd
            row["greedy_first_difference"] = first_difference(plain, sjd)
            print(f"  {name} greedy SJD (window {window}) {'equals' if plain == sjd else 'DIFFERS from'} greedy "
                  "decoding" + ("" if plain == sjd else f" from token {row['greedy_first_difference']}"))
            out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exactness", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an omnitok export (default: a random model of --size)")
    parser.add_argument("--prompt", default="a red circle", help="with --model: the prompt every sample continues")
    parser.add_argument("--seeds", type=int, default=8, help="samples, alone and as one batch")
    parser.add_argument("--size", choices=sorted(SAMPLE_SIZES), default="tiny")
    parser.add_argument("--grid", type=int, default=8, help="the random model's image grid side")
    parser.add_argument("--device", default=default_device())
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
