"""``omnitok pretrain``: the decoder LM learns the interleaved token stream with DeepSpeed.

Run as is for one process, or under ``deepspeed`` / ``torchrun`` for many (RANK / WORLD_SIZE / LOCAL_RANK come from
the launcher; gloo on CPU, NCCL on GPU). The run directory holds:
- ``checkpoints/step_N/``: the DeepSpeed checkpoint (model, optimizer, scheduler), the full fp32 weights as
  ``model.safetensors``, each rank's stream position, RNG state and unlogged loss sums, and ``COMPLETE`` (every file's
  size and checksum) once every rank has saved (written under a temporary name first, so a kill while saving leaves
  the previous checkpoint the newest usable one); ``--resume`` continues from the newest intact one, and every
  checkpoint file is read weights-only (``deepspeed_io.py``);
- ``tb/`` (TensorBoard: loss and accuracy per modality, lr, tokens/s, data-wait fraction, padding), ``train.jsonl``,
  ``eval.jsonl``, ``config.json``;
- ``loss.png``: the loss curves per modality (written at the end);
- ``export/``: a plain Hugging Face model directory (``config.json``, ``model.safetensors``) with the tokenizer
  directory in ``export/tokenizer``, written at the end and by ``omnitok export``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from omnitok.config import apply_overrides, build, load_config_file, to_dict
from omnitok.data.stream import PackedStream, StreamConfig
from omnitok.errors import OmnitokError
from omnitok.jsonfile import cut_jsonl, read_json_object, write_json_atomic
from omnitok.model.build import ModelConfig, build_model
from omnitok.model.loss import IGNORE, REPORTED, LossConfig, lm_loss
from omnitok.tokenizers.layout import LAYOUT_FILE, TokenLayout
from omnitok.train import deepspeed_io
from omnitok.train.checkpoint import (
    check_same_config,
    complete_checkpoints,
    finish_checkpoint,
    pick_checkpoint,
    start_checkpoint,
)
from omnitok.weights import load_safetensors, load_torch_file


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class EvalConfig:
    shards: list[str] = field(default_factory=list)  # held-out shard sets
    every: int = 500
    batches: int = 8


@dataclass
class PretrainConfig:
    tokenizer: str = ""
    out: str = "runs/pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: StreamConfig = field(default_factory=StreamConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steps: int = 1000
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    zero_stage: int = 1
    bf16: bool = True  # on GPU; CPU runs in fp32
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    max_nonfinite: int = 5  # consecutive skipped steps before the run stops
    seed: int = 0
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config, merged over ours

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise OmnitokError("pretrain: 'tokenizer' (a tokenizer directory) is required")
        if self.zero_stage not in (0, 1, 2, 3):
            raise OmnitokError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.steps < 1 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise OmnitokError("steps, micro_batch_size and grad_accum must be at least 1")
        self.optim.betas = tuple(self.optim.betas)


def load_pretrain_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    return build(PretrainConfig, apply_overrides(load_config_file(path), overrides))


# ---------------------------------------------------------------- distributed set-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group (or make a one-process group); returns rank, world size, device."""
    import deepspeed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".torch_extensions"))
    if "RANK" not in os.environ:  # launched as is: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def deepspeed_config(cfg: PretrainConfig, device: torch.device) -> dict:
    o = cfg.optim
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": o.grad_clip,
        # torch_adam: PyTorch's AdamW, no JIT-built fused kernel (needed on CPU, fine everywhere)
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.steps, "warmup_num_steps": min(o.warmup_steps, cfg.steps),
            "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16 and device.type == "cuda"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- the run


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train; returns the last logged metrics (on every rank)."""
    import deepspeed

    rank, world, device = init_distributed()
    out = Path(cfg.out)
    layout = TokenLayout.load(Path(cfg.tokenizer) / LAYOUT_FILE)
    ckpt_root = out / "checkpoints"
    if not resume and complete_checkpoints(ckpt_root):
        raise OmnitokError(f"{out} already holds a run; pass --resume to continue it or choose a new out")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, layout)
    stream = PackedStream(cfg.data, layout, cfg.micro_batch_size, rank, world)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=deepspeed_config(cfg, device))
    deepspeed_io.read_weights_only(engine)
    start = 0
    sums: dict[str, float] = {}
    nonfinite, skipped = 0, 0
    if resume:
        ckpt = _agreed_checkpoint(ckpt_root, rank, device)
        saved = read_json_object(ckpt / "run.json", f"{ckpt} has no run.json")
        check_same_config(saved["config"], to_dict(cfg), ckpt, ignored=("out",))
        engine.load_checkpoint(str(ckpt_root), tag=ckpt.name, load_module_strict=True)
        local = load_torch_file(ckpt / f"rank{rank:05d}.pt")
        stream.load_state_dict(local["stream"])
        torch.set_rng_state(local["rng"])
        # the loss sums since the last log point, so the first record after a resume covers the whole window
        sums, nonfinite, skipped = dict(local.get("sums", {})), local.get("nonfinite", 0), local.get("skipped", 0)
        start = saved["step"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", to_dict(cfg))
        for log in ("train", "eval"):  # a killed run may have logged steps after its checkpoint
            cut_jsonl(out / f"{log}.jsonl", "step", start)
    eval_stream = None
    if cfg.eval.shards:
        eval_cfg = StreamConfig(shards=cfg.eval.shards, seq_len=cfg.data.seq_len, cond_dropout=0.0, seed=cfg.seed,
                                isolate_documents=cfg.data.isolate_documents)
        eval_stream = lambda: PackedStream(eval_cfg, layout, cfg.micro_batch_size, rank, world)  # noqa: E731

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=start + 1)
    n_params = sum(p.numel() for p in model.parameters())
    peak = _peak_flops(device)
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.data.seq_len * world
    last: dict = {}
    wait = compute = 0.0
    progress = tqdm(range(start + 1, cfg.steps + 1), desc="pretrain", unit="step", disable=rank != 0)
    window_start = time.perf_counter()
    for step in progress:
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = stream.next_batch()
            inputs, labels = batch.model_inputs(device), batch.labels.to(device)
            t1 = time.perf_counter()
            logits = engine(**inputs).logits  # (B, L, V)
            tokens = (labels != IGNORE).sum().to(torch.float64).reshape(1)
            torch.distributed.all_reduce(tokens)  # the mean is over all ranks' tokens (DeepSpeed averages grads)
            loss, metrics = lm_loss(logits, labels, layout, cfg.loss, normalizer=tokens.clamp(min=1).item() / world)
            if _any_rank(not torch.isfinite(loss), device):  # every rank skips together, or none does
                nonfinite, skipped = _skip(step, "loss", nonfinite, skipped, cfg, rank)
                continue
            engine.backward(loss)
            if not _stepped(engine, cfg, device):
                nonfinite, skipped = _skip(step, "gradient", nonfinite, skipped, cfg, rank)
                continue
            nonfinite = 0
            wait, compute = wait + t1 - t0, compute + time.perf_counter() - t1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if step % cfg.log_every == 0 or step == cfg.steps:
            last = _log(step, sums, wait, compute, window_start, tokens_per_step * cfg.log_every, n_params, peak,
                        scheduler, stream, writer, out, rank, device, skipped)
            progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                 wait=f"{last['data_wait']:.1%}")
            sums, wait, compute, window_start = {}, 0.0, 0.0, time.perf_counter()
        if eval_stream is not None and (step % cfg.eval.every == 0 or step == cfg.steps):
            _evaluate(engine, eval_stream(), cfg, layout, device, step, writer, out, rank)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(engine, stream, cfg, step, rank, {"sums": sums, "nonfinite": nonfinite, "skipped": skipped})
    if writer is not None:
        writer.close()
    export_model(engine, cfg, out / "export", rank)
    if rank == 0:
        plot_losses(out)
    return last


def plot_losses(run: Path) -> None:
    """``loss.png``: training (and held-out) loss per modality against the step, from the run's jsonl logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for kind, style in (("train", "-"), ("eval", "--")):
        path = run / f"{kind}.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for key in ["loss"] + sorted({k for r in rows for k in r if k.endswith("_loss")}):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, label=f"{kind} {key.replace('_loss', '')}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=110)
    plt.close(fig)


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def _stepped(engine, cfg: PretrainConfig, device: torch.device) -> bool:
    """Take the optimizer step unless a gradient is non-finite. ZeRO 1-3 check (across ranks) and skip by themselves,
    counting in ``engine.skipped_steps``; without ZeRO the check is here."""
    if cfg.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
        local = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in engine.module.parameters())
        if _any_rank(local, device):
            engine.zero_grad()
            return False
    before = engine.skipped_steps
    engine.step()
    return engine.skipped_steps == before


def _skip(step: int, what: str, nonfinite: int, skipped: int, cfg: PretrainConfig, rank: int) -> tuple[int, int]:
    nonfinite, skipped = nonfinite + 1, skipped + 1
    if rank == 0:
        tqdm.write(f"step {step}: non-finite {what}; step skipped ({skipped} so far)")
    if nonfinite >= cfg.max_nonfinite:
        raise OmnitokError(f"{nonfinite} steps in a row had a non-finite loss or gradient; stopping (lower optim.lr, "
                           "check the data, or raise max_nonfinite)")
    return nonfinite, skipped


def _reduce(values: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _summarise(sums: dict[str, float]) -> dict[str, float]:
    out = {}
    tokens = sum(sums.get(f"{m}_tokens", 0.0) for m in REPORTED)
    out["loss"] = sum(sums.get(f"{m}_loss", 0.0) for m in REPORTED) / max(tokens, 1.0)
    for m in REPORTED:
        n = sums.get(f"{m}_tokens", 0.0)
        if n:
            out[f"{m}_loss"] = sums[f"{m}_loss"] / n
            out[f"{m}_ppl"] = math.exp(min(out[f"{m}_loss"], 50.0))
            out[f"{m}_acc"] = sums[f"{m}_correct"] / n
            out[f"{m}_tokens"] = n
    return out


def _log(step, sums, wait, compute, window_start, tokens, n_params, peak, scheduler, stream, writer, out, rank,
         device, skipped) -> dict:
    padding, emitted = stream.padding_counts
    summed = _reduce({**sums, "_wait": wait, "_compute": compute, "_padding": padding, "_emitted": emitted}, device)
    elapsed = time.perf_counter() - window_start
    stats = _summarise(summed)
    stats["tokens_per_s"] = tokens / max(elapsed, 1e-9)
    stats["data_wait"] = summed["_wait"] / max(summed["_wait"] + summed["_compute"], 1e-9)
    stats["padding"] = summed["_padding"] / max(summed["_emitted"], 1.0)  # all ranks' sequences
    stats["skipped_steps"] = skipped
    stats["lr"] = scheduler.get_last_lr()[0] if scheduler is not None else float("nan")
    if peak:
        stats["mfu"] = 6 * n_params * stats["tokens_per_s"] / (peak * torch.distributed.get_world_size())
    _record(writer, out, rank, "train", step, stats)
    return stats


def _record(writer, out: Path, rank: int, kind: str, step: int, stats: dict[str, float]) -> None:
    """Rank 0 writes scalars to TensorBoard (``kind/name``) and a line to ``out/kind.jsonl``."""
    if rank != 0:
        return
    for k, v in stats.items():
        writer.add_scalar(f"{kind}/{k}", v, step)
    with open(out / f"{kind}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **stats}) + "\n")


@torch.no_grad()
def _evaluate(engine, stream: PackedStream, cfg: PretrainConfig, layout, device, step, writer, out, rank) -> dict:
    engine.eval()
    sums: dict[str, float] = {}
    for _ in range(cfg.eval.batches):
        batch = stream.next_batch()
        _, metrics = lm_loss(engine(**batch.model_inputs(device)).logits, batch.labels.to(device), layout, cfg.loss)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    engine.train()
    stats = _summarise(_reduce(sums, device))
    _record(writer, out, rank, "eval", step, stats)
    return stats


def _agreed_checkpoint(root: Path, rank: int, device: torch.device) -> Path:
    """Rank 0 picks the newest intact checkpoint (checksums, pickle check) and every rank resumes from it."""
    chosen, error = None, None
    if rank == 0:
        try:
            chosen = pick_checkpoint(root, deepspeed_io.allowed_classes())
        except OmnitokError as e:
            error = e
    step = torch.tensor([int(chosen.name.removeprefix("step_")) if chosen is not None else -1], device=device)
    torch.distributed.broadcast(step, 0)
    if error is not None:
        raise error
    if step.item() < 0:
        raise OmnitokError(f"--resume: rank 0 found no usable checkpoint in {root} (its message says why)")
    return root / f"step_{int(step.item()):08d}"


def save(engine, stream: PackedStream, cfg: PretrainConfig, step: int, rank: int, window: dict) -> Path:
    """A checkpoint that a kill at any moment cannot half-write: temporary tag, every rank's state, a barrier, then
    rank 0 adds the fp32 weights, records every file's size and checksum and renames it (``checkpoint.py``).
    ``window``: this rank's loss sums and skip counters since the last log point."""
    from safetensors.torch import save_file

    root = Path(cfg.out) / "checkpoints"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        start_checkpoint(root, step)
    torch.distributed.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    state = deepspeed_io.full_fp32_state(engine, cfg.zero_stage, rank)
    torch.save({"stream": stream.state_dict(), "rng": torch.get_rng_state(), **window}, tmp / f"rank{rank:05d}.pt")
    torch.distributed.barrier()
    if rank == 0:
        save_file(state, str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "run.json", {"step": step, "config": to_dict(cfg)})
        finish_checkpoint(tmp, cfg.keep_checkpoints)
    torch.distributed.barrier()
    return root / f"step_{step:08d}"


def export_model(engine, cfg: PretrainConfig, directory: Path, rank: int) -> None:
    """A plain Hugging Face directory of the plain module's fp32 weights, with the tokenizer beside."""
    state = deepspeed_io.full_fp32_state(engine, cfg.zero_stage, rank)
    if rank == 0:
        write_hf_directory(cfg, state, directory)
    torch.distributed.barrier()


def write_hf_directory(cfg: PretrainConfig, state: dict[str, torch.Tensor], directory: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    layout = TokenLayout.load(Path(cfg.tokenizer) / LAYOUT_FILE)
    if cfg.model.init_from is None:
        model = build_model(cfg.model, layout)
    else:  # the continued LLM's own architecture with the extended vocabulary; its weights come from `state`
        hf_config = AutoConfig.from_pretrained(cfg.model.init_from, local_files_only=True)
        hf_config.vocab_size = layout.vocab_size
        model = AutoModelForCausalLM.from_config(hf_config)
    model.load_state_dict(state, strict=True)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    if (directory / "tokenizer").exists():
        shutil.rmtree(directory / "tokenizer")
    shutil.copytree(cfg.tokenizer, directory / "tokenizer")


def export_run(run: str | Path, out: str | Path) -> Path:
    """``omnitok export``: the newest intact checkpoint of a run as a Hugging Face directory (+ tokenizer). Reads the
    checkpoint's ``model.safetensors`` and ``run.json`` only; DeepSpeed's pickled files are not opened."""
    run = Path(run)
    ckpt = pick_checkpoint(run / "checkpoints", deepspeed_io.allowed_classes())
    cfg = build(PretrainConfig, read_json_object(ckpt / "run.json", f"{ckpt} has no run.json")["config"])
    if not (ckpt / "model.safetensors").is_file():
        raise OmnitokError(f"{ckpt} has no model.safetensors (written by an older omnitok); resume the run for a "
                           "step (omnitok pretrain --resume, with more steps) to write a checkpoint that exports")
    write_hf_directory(cfg, load_safetensors(ckpt / "model.safetensors"), Path(out))
    return Path(out)
