"""One GPU check, one JSON report: ``python -m benchmarks.gpu_check [--out gpu_report.json]`` on a CUDA machine runs
the GPU measurements the issue asks for, on one H100 / H200 (its goal is 8 minutes in all; on an H200 the sampler
part took 5 minutes with an image part it has since handed over), and three more where ``--parts`` names them:

- sampling with a ~1B random-weight Llama (``benchmarks.sample``): text tokens/s at batch 1 and 8 against
  transformers' ``generate``, the compiled decoder (CUDA graphs) against eager (same greedy tokens, or how far its
  logits drift from eager's where bf16 rounding picks other tokens), batch-1 decode as a fraction of the
  memory-bandwidth bound (weight bytes / measured copy bandwidth), eager and compiled, and compiled one-token passes
  split into their CUDA graph's replay and the work around it, at 1 row over 33 cached positions, 8 over 161 and 16
  over 1060 (a guided batch-8 32x32 image's late in its span);
- 32x32 image spans on the same model, compiled, at batch 1 and 8 (``benchmarks.sjd``): guided (scale 3) with and
  without speculative Jacobi decoding, and unguided: forward passes, seconds per image, codes/s, the sampler's own
  share of a pass, a pass against the memory-bandwidth bound (``bound_fraction``: reading the weights once over the
  pass's time), what guidance costs, and ``window_cost``, what a window pass costs against a one-token step (the
  random model accepts next to no drafts, so SJD's gain on a GPU is a trained model's passes ratio, measured on the
  CPU, times this);
- ``omnitok pretrain`` tokens/s and MFU (the run's own: 6 N + 12 L d s FLOPs a token over the GPU's bf16 peak) for
  the ~150M config (``configs/pretrain-150m-gpu.yaml``) over 100 steps, against a plain PyTorch loop on the same GPU
  under bf16 autocast (``benchmarks.pretrain``);
- VQ-GAN (Janus VQ-16 architecture, 256 px) encode / decode throughput at batch 64, and the share of codes that
  change when the photos are encoded one at a time instead (``benchmarks.image``);
- every audio codec (EnCodec 24 kHz 6 kbps, Mimi 8 codebooks, DAC 44.1 kHz, WavTokenizer 40 Hz, X-Codec 4 kbps,
  X-Codec2; published sizes, 5 s clips) encode / decode real-time factor at batch 1 and 8 against the transformers
  class called directly, and EnCodec at batch 64 under bf16 autocast against float32 (what the tokenizer runs in):
  speed, the codes that change per codebook, the decoded audio's SNR (``benchmarks.audio``);
- (``exact``, named only; 2.3 minutes on an H200) whether a seed samples the same alone as in a batch of 4 on the
  GPU, in float32 and in bfloat16 (the ~1B random model, 8x8 image spans plain, guided and with SJD, audio spans, a
  mixed batch), and whether greedy SJD equals greedy decoding there (``benchmarks.exactness``: the CPU's float32
  keeps both nearly always; the GPU's kernels and bf16's rounding may not);
- (``tokenize_ray``, named only; it needs Ray) ``omnitok tokenize --engine ray`` on 2048 JPEG photos with a Janus
  VQ-GAN encoder actor per GPU: img/s and how busy the GPU was while encoding (``nvidia-smi``'s utilization; the
  goal is > 0.8) (``benchmarks.tokenize_ray``);
- (``kernels``, named only; run last) the compiled decoder's one-token passes at the sampler part's three shapes,
  each with its ten costliest GPU kernels (``torch.profiler``): what the layers' graph and the work around it are
  made of.

``--reduced`` runs the same code with tiny sizes on any device (CI runs it on the CPU so that the script does not rot;
its numbers mean nothing). The compiled decoder's decoding passes run as CUDA graphs on a GPU
(``omnitok.model.decoder``); the report's ``graphs_captured`` says how many one sampling run captured (0 on a CPU).
A part that fails is recorded as ``{"error": ...}`` and listed in ``failed``; the others still run, and the exit
status is 1. The report is written after each part, so a run stopped at a time limit keeps the parts it finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from argparse import Namespace
from pathlib import Path

import torch

from benchmarks import audio, exactness, image, pretrain, sample, sjd, tokenize_ray
from benchmarks.common import default_device
from omnitok.device import model_dtype

# the order they run; ``kernels`` last of all, since a profiler that misbehaves with CUDA graphs could leave the GPU
# unusable for what came after it
PARTS = ("sampler", "image_spans", "pretrain", "vqgan", "audio", "exact", "tokenize_ray", "kernels")
# what runs unless --parts says otherwise: the measurements (its 8-minute goal); ``exact`` (2.3 minutes on an
# H200, run once: whether the GPU's kernels keep a seed's samples in a batch) when the decoder's kernels change,
# ``tokenize_ray`` where Ray is installed, ``kernels`` to see what a compiled pass's time is made of
DEFAULT_PARTS = PARTS[:5]


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    small = args.reduced
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or "cpu", "torch": torch.__version__, "reduced": small, "seconds": {}}

    report["failed"] = []

    def part(name: str, fn) -> None:
        """One measurement, ``fn(partial)``; a part that fails is recorded with its error and whatever it had put
        in ``partial``, and the others still run (a GPU session is short: one broken measurement must not cost the
        rest of the report)."""
        if name not in args.parts:
            return
        start, partial = time.perf_counter(), {}
        try:
            report[name] = fn(partial)
        except Exception as e:
            traceback.print_exc()
            report[name] = {**partial, "error": f"{type(e).__name__}: {e}"}
            report["failed"].append(name)
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        Path(args.out).write_text(json.dumps(report, indent=1))  # what is done survives a later failure

    size, grid = ("tiny", 4) if small else ("1b", 32)
    part("sampler", lambda partial: sample.run(Namespace(size=size, text_vocab=1000 if small else 32000,
                                                         prompt_len=32, new_tokens=16 if small else 128, repeats=1,
                                                         compiled=True, device=args.device), partial))
    spans = Namespace(window=4 if small else 16, repeats=1, images=1)
    # guided and not, SJD and not, as images are made: with the compiled decoder, the fast path on a GPU (eager, a
    # 1B model's pass there is launch-bound: a 32x32 image took ~17 s on an H200, too long for the check's time)
    part("image_spans", lambda _: sjd.random_model(spans, device, size, grid, 3.0, True))
    config = "configs/pretrain-tiny-cpu.yaml" if small else "configs/pretrain-150m-gpu.yaml"
    steps = 4 if small else 100
    overrides = [] if small else ["grad_accum=1", "eval_every=100000"]
    part("pretrain", lambda _: pretrain.run(Namespace(config=config, steps=steps, overrides=overrides)))
    batch = 2 if small else 64
    part("vqgan", lambda _: image.run(Namespace(arch="tiny" if small else "janus", size=64 if small else 256,
                                              batch=batch, repeats=1, device=args.device)))

    def audio_part(partial: dict) -> dict:
        seconds = 0.5 if small else 5.0
        partial.update(audio.run(Namespace(codecs=list(audio.PUBLISHED), seconds=seconds, repeats=1, tiny=small,
                                           batches=[1, 2 if small else 8], bf16_batch=0, device=args.device)))
        # bf16 for EnCodec alone, at the batch the issue names (the other codecs stay float32 measurements)
        partial["encodec"]["bf16"] = audio.bf16("encodec", 4 if small else 64, seconds, small, device)
        return partial

    part("audio", audio_part)
    # 4 seeds on the GPU: each setting is 5 samplings a dtype there (about 1 s each for the ~1B model)
    part("exact", lambda _: exactness.run(Namespace(model=None, size=size, grid=4 if small else 8,
                                                  seeds=8 if small else 4, device=args.device)))
    part("tokenize_ray", lambda _: tokenize_ray.gpu_busy("tiny" if small else "janus", 8 if small else 2048,
                                                       4 if small else 64))

    def kernels(_) -> dict:
        if device.type == "cuda":  # the profiler's first use, before the graphs it will watch are captured (PyTorch's
            # workaround: a graph captured before CUPTI first attaches may fail to replay under the profiler)
            from torch.profiler._utils import _init_for_cuda_graphs

            _init_for_cuda_graphs()
        model, _ = sample.random_llama(size, 1000 if small else 32000, grid, device, model_dtype(device))
        shapes = ((1, 9), (2, 17)) if small else ((1, 33), (8, 161), (16, 1060))
        out = sample.pass_split(model, device, shapes, steps=4 if small else 32, profile=True)
        for shape, split in out.items():
            print(f"  compiled pass, {shape}: {split['pass_ms']:.2f} ms; costliest kernels (us a pass, calls): "
                  + "; ".join(f"{k['name'][:60]} {k['us']:.0f} x{k['calls']:g}" for k in split["top_kernels"][:5]))
        return out

    part("kernels", kernels)
    print(f"report: {args.out} ({sum(report['seconds'].values()):.0f} s)"
          + (f"; FAILED: {', '.join(report['failed'])}" if report["failed"] else ""))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_report.json")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes, any device (the CI's smoke run)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS),
                        help=f"run these parts (default: {' '.join(DEFAULT_PARTS)}; a device call with a time limit "
                             "can run them in two)")
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args(argv)
    if not args.reduced and not args.device.startswith("cuda"):
        parser.error("the full check needs a CUDA device; --reduced runs it small on any device")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(1 if main()["failed"] else 0)
