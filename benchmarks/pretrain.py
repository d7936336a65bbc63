"""``omnitok pretrain`` training tokens/s (DeepSpeed, the packed shard stream, per-modality loss and metrics,
logging) against a plain loop over the same Hugging Face model with the same batches already in memory, torch AdamW
and the same precision (bf16 autocast where omnitok trains in bf16), on the same device, in one run; plus the
fraction of step time spent waiting for data and, on a GPU, omnitok's MFU:
``python -m benchmarks.pretrain [--config configs/pretrain-tiny-cpu.yaml] [--steps 40] [KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import default_device, plain_loop_tokens_per_s, quiet_stderr
from benchmarks.synthetic import write_shards
from omnitok.tokenizers.layout import TokenLayout

LAYOUT = TokenLayout(text_vocab_size=4000, image_codebook_size=1024, max_grid_side=16)


def synthetic_run_dir(root: Path) -> None:
    """``root/tok`` (the layout) and ``root/shards``: 2000 documents of 20-200 text tokens and an 8x8 image."""
    LAYOUT.save(root / "tok")
    write_shards(root / "shards", LAYOUT, n_docs=2000, shard_size=200, text=(20, 200), grid=8, image_p=1.0)


def measure(root: Path, name: str, config: str | None, steps: int, overrides: list[str]):
    """Pretrain ``steps`` steps into ``root/name``; the config and the last train record (the second half's tokens/s,
    data wait and, on a GPU with a known peak, MFU)."""
    from omnitok.train.pretrain import load_pretrain_config, pretrain

    cfg = load_pretrain_config(config, [
        f"tokenizer={root / 'tok'}", f"out={root / name}", f"data.shards=[{root / 'shards'}]", f"steps={steps}",
        f"log_every={steps // 2}", f"checkpoint_every={steps * 10}", *overrides])
    with quiet_stderr():
        pretrain(cfg)
    return cfg, [json.loads(line) for line in (root / name / "train.jsonl").read_text().splitlines()][-1]


def run(args: argparse.Namespace) -> dict:
    from omnitok.data.stream import PackedStream
    from omnitok.model.build import build_model

    measured = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_run_dir(root)
        cfg, last = measure(root, "run", args.config, args.steps, args.overrides)
        ours, wait = last["tokens_per_s"], last["data_wait"]

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, LAYOUT)
        params = sum(p.numel() for p in model.parameters())
        stream = PackedStream(cfg.data, LAYOUT, cfg.micro_batch_size)
        batches = [stream.next_batch() for _ in range(args.steps)]
        device = torch.device(default_device())  # where omnitok pretrain trained (``distributed.join``)
        plain = plain_loop_tokens_per_s(model, batches, cfg.optim, cfg.micro_batch_size * cfg.data.seq_len, device,
                                        bf16=cfg.bf16 and device.type == "cuda")
    print(f"pretraining, {params / 1e6:.1f}M-parameter {cfg.model.arch}, {cfg.micro_batch_size} x {cfg.data.seq_len} "
          f"tokens per step, ZeRO {cfg.zero_stage}, {torch.get_num_threads()} threads; last {args.steps - measured} of "
          f"{args.steps} steps")
    mfu = last.get("mfu")
    print(f"  omnitok pretrain {ours:.0f} tokens/s, plain loop {plain:.0f} tokens/s ({device.type}), ratio "
          f"{ours / plain:.3f}; data wait {wait:.2%} of step time" + (f"; MFU {mfu:.1%}" if mfu is not None else ""))
    return {"ours": ours, "plain": plain, "data_wait": wait, "params": params, "mfu": mfu}


def arguments(prog: str, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--config", default="configs/pretrain-tiny-cpu.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> dict:
    return run(arguments("python -m benchmarks.pretrain", __doc__).parse_args(argv))


if __name__ == "__main__":
    main()
