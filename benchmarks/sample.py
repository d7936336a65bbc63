"""Sampler decode tokens/s against transformers' ``generate`` (same model, prompt, temperature / top-p, KV cache),
text at batch 1 and 8; decode speed against the memory-bandwidth bound; with ``--compiled`` the compiled decoder
(CUDA graphs on a GPU) against eager, and how far its logits drift from eager's: ``python -m benchmarks.sample
[--size tiny|1b] [--compiled]`` (image spans, guided and not, with and without SJD: ``benchmarks.sjd``)."""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import default_device, first_difference, timed, top_kernels, weights_bound
from benchmarks.synthetic import BOS, EOS, FIRST_TEXT
from omnitok.device import model_dtype

SAMPLE_SIZES = {"tiny": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4),
                "1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4)}


def random_llama(size: str, text_vocab: int, grid: int, device: torch.device, dtype: torch.dtype):
    """A seeded random Llama of ``SAMPLE_SIZES[size]`` and its layout (``text_vocab`` text ids, 16384 image codes on
    grids up to ``grid`` x ``grid``, 4 x 1024 audio codes at 75 Hz), built on ``device`` in ``dtype``. Built there
    rather than on the CPU and moved: the 1B model's random initialisation alone takes 14 s on two CPU cores."""
    from omnitok.model.build import ModelConfig, build_model
    from omnitok.tokenizers.layout import TokenLayout

    layout = TokenLayout(text_vocab_size=text_vocab, image_codebook_size=16384, max_grid_side=grid,
                         audio_codebook_sizes=(1024,) * 4, audio_frame_rate=75.0)
    torch.manual_seed(0)
    with device:
        model = build_model(ModelConfig(**SAMPLE_SIZES[size]), layout)
    return model.eval().to(dtype=dtype), layout


def compiled_drift(model, prompt: list[int], tokens: list[int], device: torch.device) -> dict:
    """``tokens`` (eager greedy decoding's) fed one at a time after ``prompt`` to an eager and a compiled decoder
    (the compiled one's steps CUDA graphs on a GPU): the largest difference of their logits over the logits' spread
    (std), and, at the steps where their top tokens differ, eager's margin between its top token and the compiled
    one's, over the same spread. A fault in the compiled path (a graph replayed over stale inputs) differs by about
    the spread itself; rounding stays far below it and changes a top token only where eager's margin is within it."""
    from omnitok.model.decoder import Decoder

    decoders = [Decoder(model), Decoder(model, compiled=True)]
    caches = [d.new_cache(1) for d in decoders]
    ids = torch.tensor([prompt + tokens], device=device)
    n, drift, margins = len(prompt), 0.0, []
    ones = torch.ones(1, n, dtype=torch.bool, device=device)
    positions = torch.arange(n + len(tokens), device=device)[None]
    with torch.inference_mode():
        logits = [d.forward(c, ids[:, :n], ones, positions[:, :n]) for d, c in zip(decoders, caches)]
        for i in range(n, n + len(tokens)):
            eager, compiled = logits
            spread = float(eager.std())
            drift = max(drift, float((eager - compiled).abs().max()) / spread)
            pick = int(compiled.argmax())
            if pick != int(eager.argmax()):
                margins.append(float(eager.max() - eager[0, pick]) / spread)
            logits = [d.decode(c, ids[:, i:i + 1], ones[:, :1], positions[:, i:i + 1])[:, 0]
                      for d, c in zip(decoders, caches)]
    return {"steps": len(tokens), "max_drift": drift, "flips": len(margins),
            "widest_flip_margin": max(margins, default=None)}


def pass_split(model, device: torch.device, shapes=((1, 33), (8, 161), (16, 1060)), steps: int = 32,
               profile: bool = False) -> dict:
    """One-token passes of the compiled decoder, per shape (rows, cached positions), the mean over ``steps``: on a
    GPU split into its CUDA graph replayed alone (the layers) and the whole pass (the embedding, RoPE tables, mask
    and input copies around the replay, and the output layer). The shapes are the GPU check's: a batch-1 text step,
    a batch-8 one, and a guided batch-8 32x32 image's late in its span (16 rows over ~1060 positions; on an H200 such
    a pass took 32 ms where the batch-8 text one took 6.4): whether a long cache or many rows cost inside the layers
    or around them. With ``profile``, each shape's ten costliest kernels too (``top_kernels``; on a CPU, operators,
    and no split); without, empty off a GPU (no graphs)."""
    from omnitok.model.decoder import Decoder

    dec = Decoder(model, compiled=True)
    if dec.graphs is None and not profile:
        return {}
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def mean_ms(fn) -> float:
        return 1e3 * timed(lambda: [fn() for _ in range(steps)], 1, device) / steps

    out = {}
    for rows, n in shapes:
        cache = dec.new_cache(rows, capacity=n + 3 * steps + 2)  # room for every pass: the cache never grows
        ids = torch.randint(vocab, (rows, n), generator=generator).to(device)
        valid = torch.ones(rows, 1, dtype=torch.bool, device=device)

        def step():
            dec.decode(cache, ids[:, -1:], valid, torch.full((rows, 1), cache.length, device=device))

        with torch.inference_mode():
            dec.forward(cache, ids, torch.ones_like(ids, dtype=torch.bool),
                        torch.arange(n, device=device)[None].expand(rows, -1))
            step()  # compiles, and on a GPU captures the step's graph (a new cache: the only one)
            split = out[f"rows{rows}_cached{n}"] = {"pass_ms": mean_ms(step)}
            if dec.graphs is not None:
                (_, replay, _), = dec.graphs.graphs.values()
                split["graph_ms"] = mean_ms(replay)  # rewrites the last step's keys and values with the same ones
                split["outside_graph_ms"] = split["pass_ms"] - split["graph_ms"]
            if profile:
                split["top_kernels"] = top_kernels(step, device)
    return out


def run(args: argparse.Namespace, out: dict | None = None) -> dict:
    """Decode tokens/s of omnitok's sampler vs transformers' ``generate`` (same model, prompt, temperature / top-p,
    KV cache), text mode at batch 1 and 8, and decode speed as a fraction of the memory-bandwidth bound (weight bytes
    per step / measured copy bandwidth); then (``compiled``) the compiled decoder's against eager, with the same
    greedy tokens or, where they differ, how far its logits drift (``compiled_drift``). Results go into ``out`` as
    they are measured (what the GPU check keeps of a run that fails half-way)."""
    from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate

    device = torch.device(args.device)
    dtype = model_dtype(device)
    model, layout = random_llama(args.size, args.text_vocab, 32, device, dtype)
    eos = EOS
    with torch.no_grad():
        model.lm_head.weight[eos] = 0  # so both sides generate the full length
    prompt = [BOS] + list(range(FIRST_TEXT, FIRST_TEXT + args.prompt_len))
    n = args.new_tokens
    text = ModalitySampling(temperature=0.8, top_p=0.95)
    out = {} if out is None else out
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

        t_ours, t_peer = timed(ours, args.repeats, device), timed(peer, args.repeats, device)
        r_ours, r_peer = counts["ours"] / t_ours, counts["peer"] / t_peer
        out[f"batch{batch}"] = {"ours": r_ours, "peer": r_peer, "ratio": r_ours / r_peer}
        print(f"  text, batch {batch}: omnitok {r_ours:.0f} tokens/s, transformers generate {r_peer:.0f} tokens/s, "
              f"ratio {r_ours / r_peer:.2f}")
    bandwidth, bound = weights_bound(model, device, args.repeats + 2)
    weight_bytes = bound * bandwidth
    out["bandwidth"] = {"copy_GBps": bandwidth / 1e9, "bound_s": bound, "fraction": bound * out["batch1"]["ours"]}
    print(f"  memory bound: {weight_bytes / 1e6:.0f} MB of weights at {bandwidth / 1e9:.1f} GB/s copy bandwidth = "
          f"{bound * 1e3:.2f} ms/token; batch 1 decode takes {1e3 / out['batch1']['ours']:.2f} ms/token: "
          f"{out['bandwidth']['fraction']:.1%} of the bound")
    if args.compiled:  # the compiled decoder (CUDA graphs on a GPU) against eager: text decode, same greedy tokens
        from omnitok.model.decoder import CudaGraphs

        for batch in (1, 8):
            cfg = SamplingConfig(greedy=True, output="text", max_new_tokens=n)
            prompts = [prompt] * batch
            captured, start = CudaGraphs.captured, time.perf_counter()
            compiled = generate(model, layout, prompts, eos, cfg, compiled=True)
            warm = time.perf_counter() - start  # the first compiled run pays the compiler
            captured = CudaGraphs.captured - captured
            # bf16 on a GPU: fused kernels round otherwise than eager ones, and a random model's near-uniform logits
            # can then pick another token (an H200 first differed at token 6); compiled_drift below says whether that
            # is rounding
            eager = generate(model, layout, prompts, eos, cfg)
            same = compiled == eager
            differ = [first_difference(a, b) for a, b in zip(compiled, eager)]
            rates = {c: batch * n / timed(lambda c=c: generate(model, layout, prompts, eos, cfg, compiled=c),
                                          args.repeats, device) for c in (False, True)}
            out[f"compiled_batch{batch}"] = {"eager": rates[False], "compiled": rates[True],
                                             "ratio": rates[True] / rates[False], "same_tokens": same,
                                             "first_difference": min((d for d in differ if d is not None),
                                                                     default=None),
                                             "first_run_s": warm, "graphs_captured": captured}
            where = out[f"compiled_batch{batch}"]["first_difference"]
            print(f"  text, batch {batch}: compiled {rates[True]:.0f} tokens/s, eager {rates[False]:.0f} tokens/s, "
                  f"ratio {rates[True] / rates[False]:.2f}; greedy tokens {'equal' if same else f'differ from {where}'}"
                  f"; first run {warm:.1f} s with {captured} CUDA graphs captured")
        # whether tokens that differ are rounding or a fault: the logits themselves, step by step on eager's tokens
        drift = out["compiled_drift"] = compiled_drift(model, prompt, eager[0], device)
        flips = drift["flips"] and f", where eager's top two were at most {drift['widest_flip_margin']:.2g} apart"
        print(f"  compiled logits at most {drift['max_drift']:.2g} of their spread from eager's over {drift['steps']} "
              f"steps of eager's tokens; top tokens differ at {drift['flips']}{flips or ''}")
        out["bandwidth"]["fraction_compiled"] = bound * out["compiled_batch1"]["compiled"]
        print(f"  compiled, batch 1 decode is {out['bandwidth']['fraction_compiled']:.1%} of the memory bound")
        out["compiled_pass"] = pass_split(model, device)
        for shape, split in out["compiled_pass"].items():
            print(f"  compiled pass, {shape}: {split['pass_ms']:.2f} ms, its CUDA graph (the layers) "
                  f"{split['graph_ms']:.2f} ms, around it {split['outside_graph_ms']:.2f} ms")
        print(f"  a decoded token at batch 1 {1e3 / out['compiled_batch1']['compiled']:.2f} ms, the bound "
              f"{bound * 1e3:.2f} ms")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SAMPLE_SIZES), default="tiny")
    parser.add_argument("--text-vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compiled", action="store_true",
                        help="also time the compiled decoder against eager")
    parser.add_argument("--device", default=default_device())
    return run(parser.parse_args(argv))

if __name__ == "__main__":
    main()
