"""``omnitok finetune`` with LoRA: training tokens/s against a plain loop over the same PEFT model (the same base, the
same LoRA settings) with the same batches already in memory, torch AdamW on the trainable parameters, in one run;
and what LoRA saves against full fine-tuning on the same model: trainable parameters, optimizer state and the peak
resident memory of building and training (each method in a fresh process):
``python -m benchmarks.finetune [--config configs/finetune-lora-cpu.yaml] [--steps 40] [KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from benchmarks.common import default_device, plain_loop_tokens_per_s, quiet_stderr
from benchmarks.synthetic import write_shards
from omnitok.tokenizers.layout import TokenLayout

LAYOUT = TokenLayout(text_vocab_size=4000, image_codebook_size=1024, max_grid_side=16)
CHAT = dataclasses.replace(LAYOUT, chat=True)
BASE_MODEL = ["model.hidden_size=256", "model.intermediate_size=688", "model.num_layers=4", "model.num_heads=4",
              "model.num_kv_heads=4"]


def prepare(root: Path) -> None:
    """``root/base/export`` (a tiny Llama after 2 pretraining steps), ``root/chat_tok`` and ``root/chat_shards``:
    2000 conversations whose answers are 20-200 text tokens and an 8x8 image."""
    from omnitok.train.pretrain import load_pretrain_config, pretrain

    LAYOUT.save(root / "tok")
    CHAT.save(root / "chat_tok")
    write_shards(root / "docs", LAYOUT, n_docs=50, shard_size=50, grid=8)
    write_shards(root / "chat_shards", CHAT, n_docs=2000, shard_size=200, text=(20, 200), grid=8, image_p=1.0,
                 chat=True)
    with quiet_stderr():
        pretrain(load_pretrain_config(None, [f"tokenizer={root / 'tok'}", f"out={root / 'base'}",
                                             f"data.shards=[{root / 'docs'}]", "steps=2", "checkpoint_every=2",
                                             "data.seq_len=512", "micro_batch_size=2", *BASE_MODEL]))


def config(root: Path, name: str, path: str | None, steps: int, overrides: list[str]):
    from omnitok.train.finetune import load_finetune_config

    return load_finetune_config(path, [
        f"tokenizer={root / 'chat_tok'}", f"out={root / name}", f"data.shards=[{root / 'chat_shards'}]",
        f"model.init_from={root / 'base' / 'export'}", f"steps={steps}", f"log_every={max(steps // 2, 1)}",
        f"checkpoint_every={steps * 10}", *overrides])


def child(root: Path, method: str, path: str | None, steps: int, overrides: list[str]) -> None:
    """One method's run in this fresh process: its trainable parameters, optimizer state and peak memory (JSON)."""
    import deepspeed  # noqa: F401  (imported before the baseline: the libraries are not what is measured)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from omnitok import distributed
    from omnitok.config import to_dict
    from omnitok.train import deepspeed_io, harness
    from omnitok.train.finetune import FinetuneTask

    cfg = config(root, f"mem-{method}", path, steps, [*overrides, f"method={method}"])
    before = rss_mb()
    peak, done = [before], threading.Event()

    def sample() -> None:  # the resident memory every 5 ms while the model is built and trained
        while not done.wait(0.005):
            peak.append(rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    task = FinetuneTask(cfg, distributed.join())
    with quiet_stderr():
        harness.run(task, cfg, to_dict(cfg), Path(cfg.out), world=task.world, resume=False, desc="finetune",
                    allowed=deepspeed_io.allowed_classes())
    done.set()
    sampler.join()
    state = task.engine.basic_optimizer.state.values()
    print(json.dumps({
        "trainable": sum(p.numel() for p in task.engine.module.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in task.engine.module.parameters()),
        "optimizer_bytes": sum(t.numel() * t.element_size() for s in state for t in s.values() if torch.is_tensor(t)),
        "peak_rss_mb": max(peak) - before}))


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def run(args: argparse.Namespace) -> dict:
    from omnitok.data.stream import PackedStream
    from omnitok.model.build import build_model
    from omnitok.train.finetune import finetune, wrap_lora

    measured = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        cfg = config(root, "run", args.config, args.steps, args.overrides)
        with quiet_stderr():
            finetune(cfg)
        ours = [json.loads(line) for line in (root / "run" / "train.jsonl").read_text().splitlines()][-1]
        memory = {}
        launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this process's world
        env = {k: v for k, v in os.environ.items() if k not in launcher}
        for method in ("lora", "full"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.finetune", "--child", method, str(root),
                                  "--steps", "4", *([f"--config={args.config}"] if args.config else []),
                                  *args.overrides], capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"the {method} memory run failed:\n{out.stderr[-3000:]}")
            memory[method] = json.loads(out.stdout.strip().splitlines()[-1])

        torch.manual_seed(cfg.seed)
        model = wrap_lora(build_model(cfg.model, CHAT), cfg, CHAT)
        stream = PackedStream(cfg.data, CHAT, cfg.micro_batch_size)
        batches = [stream.next_batch() for _ in range(args.steps)]
        device = torch.device(default_device())  # where omnitok finetune trained
        plain = plain_loop_tokens_per_s(model, batches, cfg.optim, cfg.micro_batch_size * cfg.data.seq_len, device,
                                        bf16=cfg.bf16 and device.type == "cuda")
    lora, full = memory["lora"], memory["full"]
    print(f"fine-tuning with LoRA r={cfg.lora.r}, {full['total'] / 1e6:.1f}M-parameter model, {cfg.micro_batch_size} x "
          f"{cfg.data.seq_len} tokens per step, ZeRO {cfg.zero_stage}, {torch.get_num_threads()} threads; last "
          f"{args.steps - measured} of {args.steps} steps")
    print(f"  omnitok finetune {ours['tokens_per_s']:.0f} tokens/s, plain PEFT loop {plain:.0f} tokens/s, ratio "
          f"{ours['tokens_per_s'] / plain:.3f}; data wait {ours['data_wait']:.2%} of step time")
    print(f"  trainable parameters: LoRA {lora['trainable']:,} ({lora['trainable'] / lora['total']:.2%}), full "
          f"{full['trainable']:,}; ratio {lora['trainable'] / full['trainable']:.4f}")
    print(f"  optimizer state: LoRA {lora['optimizer_bytes'] / 2**20:.1f} MiB, full "
          f"{full['optimizer_bytes'] / 2**20:.1f} MiB; peak memory of building and training (resident, above "
          f"the process before): LoRA "
          f"{lora['peak_rss_mb']:.0f} MiB, full {full['peak_rss_mb']:.0f} MiB "
          f"(ratio {lora['peak_rss_mb'] / full['peak_rss_mb']:.3f})")
    return {"ours": ours["tokens_per_s"], "plain": plain, "memory": memory}


def arguments(prog: str, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--config", default="configs/finetune-lora-cpu.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    args = arguments("python -m benchmarks.finetune", __doc__).parse_args(argv)
    if args.child:
        return child(Path(args.child[1]), args.child[0], args.config, args.steps, args.overrides)
    return run(args)


if __name__ == "__main__":
    main()
