"""Sampler decode tokens/s against transformers' ``generate`` (same model, prompt, temperature / top-p, KV cache),
text at batch 1 and 8; the time cost of classifier-free guidance on image spans, and how much of an image's time
is the sampler's own work between the model's forward passes; decode speed against the memory-bandwidth bound;
with ``--compiled`` the compiled decoder (CUDA graphs on a GPU) against eager, and guidance measured with it:
``python -m benchmarks.sample [--size tiny|1b] [--grid 16] [--compiled]``."""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from benchmarks.common import default_device, first_difference, timed
from benchmarks.synthetic import BOS, EOS, FIRST_TEXT
from omnitok.device import model_dtype

SAMPLE_SIZES = {"tiny": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4),
                "1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4)}


def outside_passes(fn, device: torch.device) -> dict:
    """One run of ``fn`` (a sampling call) split into the model's decoding passes (``Decoder.decode``, each timed to
    its end on a GPU) and everything else: the sampler's own work a pass (grammar, guidance, filtering, draws),
    which a GPU waits through, since the next pass needs the tokens picked."""
    from omnitok.model.decoder import Decoder

    spent, passes, decode = [0.0], [0], Decoder.decode

    def timed_decode(self, *a, **k):
        start = time.perf_counter()
        out = decode(self, *a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - start
        passes[0] += 1
        return out

    if device.type == "cuda":
        torch.cuda.synchronize()
    with mock.patch.object(Decoder, "decode", timed_decode):
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
    return {"passes": passes[0], "ms_per_pass": 1e3 * total / passes[0],
            "sampler_ms_per_pass": 1e3 * (total - spent[0]) / passes[0], "sampler_share": 1 - spent[0] / total}


def run(args: argparse.Namespace, out: dict | None = None) -> dict:
    """Decode tokens/s of omnitok's sampler vs transformers' ``generate`` (same model, prompt, temperature / top-p,
    KV cache), text mode at batch 1 and 8, and decode speed as a fraction of the memory-bandwidth bound (weight bytes
    per step / measured copy bandwidth); then (``compiled``) the compiled decoder's against eager; then the cost of
    classifier-free guidance on image spans (with the compiled decoder when ``compiled``). Results go into
    ``out`` as they are measured (what the GPU check keeps of a run that fails half-way)."""
    from omnitok.model.build import ModelConfig, build_model
    from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate
    from omnitok.tokenizers.layout import TokenLayout, image_span_length

    device = torch.device(args.device)
    layout = TokenLayout(text_vocab_size=args.text_vocab, image_codebook_size=16384, max_grid_side=args.grid,
                         audio_codebook_sizes=(1024,) * 4, audio_frame_rate=75.0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SAMPLE_SIZES[args.size]), layout).eval()
    dtype = model_dtype(device)
    model = model.to(device=device, dtype=dtype)
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
    big = torch.ones(256 * 2 ** 20 // 4, dtype=torch.float32, device=device)  # 256 MiB, far beyond any cache
    dst = torch.empty_like(big)
    copy_s = timed(lambda: dst.copy_(big), args.repeats + 2, device)
    bandwidth = 2 * big.numel() * 4 / copy_s  # read + write
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = weight_bytes / bandwidth
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
            # can then pick another token; where the first one differs says how soon
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
        out["bandwidth"]["fraction_compiled"] = bound * out["compiled_batch1"]["compiled"]
        print(f"  compiled, batch 1 decode is {out['bandwidth']['fraction_compiled']:.1%} of the memory bound")
    g = args.grid
    for batch in (1, 8):
        times = {}
        for scale in (1.0, 3.0):
            cfg = SamplingConfig(output="image", grid=(g, g), max_new_tokens=image_span_length(g, g),
                                 image=ModalitySampling(top_k=1000, guidance=scale))
            times[scale] = timed(lambda cfg=cfg: generate(model, layout, [prompt] * batch, eos, cfg,
                                                         compiled=args.compiled), args.repeats, device)
        split = outside_passes(lambda cfg=cfg: generate(model, layout, [prompt] * batch, eos, cfg,
                                                        compiled=args.compiled), device)
        out[f"cfg_batch{batch}"] = {"s_per_image_plain": times[1.0] / batch, "s_per_image_cfg": times[3.0] / batch,
                                    "cost": times[3.0] / times[1.0], "guided_split": split}
        print(f"  {g}x{g} image, batch {batch}: {times[1.0] / batch:.2f} s/image without guidance, "
              f"{times[3.0] / batch:.2f} with (scale 3): CFG costs {times[3.0] / times[1.0]:.2f}x time; guided, "
              f"{split['ms_per_pass']:.2f} ms a pass, of which the sampler's own work "
              f"{split['sampler_ms_per_pass']:.2f} ms ({split['sampler_share']:.0%})")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SAMPLE_SIZES), default="tiny")
    parser.add_argument("--text-vocab", type=int, default=32000)
    parser.add_argument("--grid", type=int, default=16, help="image grid side for the CFG timing (1b: 32)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compiled", action="store_true",
                        help="also time the compiled decoder; guidance is then timed with it")
    parser.add_argument("--device", default=default_device())
    return run(parser.parse_args(argv))

if __name__ == "__main__":
    main()
