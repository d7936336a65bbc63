"""``omnitok pretrain``: the decoder LM learns the interleaved token stream with DeepSpeed, as a task of the training
harness (``harness.py``: resume, checkpoints, records and the run-directory layout are the same for every trainer).

Run as is for one process, or under ``deepspeed`` / ``torchrun`` for many (``omnitok.distributed``; gloo on CPU, NCCL
on GPU). Besides the harness's files, each checkpoint holds DeepSpeed's own (model, optimizer, scheduler; read
weights-only, ``deepspeed_io.py``), the full fp32 weights as ``model.safetensors`` and, in each rank's state, the
stream's exact position. TensorBoard and ``train.jsonl`` get loss, accuracy and perplexity per modality, lr, tokens/s,
data-wait fraction, padding and (on GPU) MFU; ``export/`` is a plain Hugging Face model directory with the tokenizer
directory in ``export/tokenizer``, rewritten at every checkpoint (``export.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnitok import distributed
from omnitok.config import apply_overrides, build, load_config_file, to_dict
from omnitok.data.stream import PackedStream, StreamConfig
from omnitok.distributed import World
from omnitok.errors import OmnitokError
from omnitok.model.build import ModelConfig, build_model
from omnitok.model.loss import LossConfig, lm_loss
from omnitok.tokenizers.layout import IGNORE, LAYOUT_FILE, TOKEN_KINDS, TokenLayout
from omnitok.train import deepspeed_io, harness
from omnitok.train.export import write_hf_directory
from omnitok.train.harness import RunResult, RunSettings


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
    shards: list[str] = field(default_factory=list)  # held-out shard sets, evaluated every eval_every steps
    batches: int = 8


@dataclass
class PretrainConfig(RunSettings):
    log_every: int = 10
    checkpoint_every: int = 500
    tokenizer: str = ""
    out: str = "runs/pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: StreamConfig = field(default_factory=StreamConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    zero_stage: int = 1
    bf16: bool = True  # on GPU; CPU runs in fp32
    # Memory and speed: none of these changes what is computed, so a resumed run may change them.
    attention: str = "sdpa"  # transformers' attention kernel: sdpa, eager, flex_attention, flash_attention_2 / _3
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    compile: str | None = None  # a torch.compile backend for the model ("inductor"); None: not compiled
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config, merged over ours

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise OmnitokError("pretrain: 'tokenizer' (a tokenizer directory) is required")
        if self.zero_stage not in (0, 1, 2, 3):
            raise OmnitokError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        self.check_run_settings()
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise OmnitokError("micro_batch_size and grad_accum must be at least 1")
        self.optim.betas = tuple(self.optim.betas)


def load_pretrain_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    return build(PretrainConfig, apply_overrides(load_config_file(path), overrides))


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


# ---------------------------------------------------------------- the task


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def _peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s (vendor data sheets), for MFU; None off a GPU or for one not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the weights (forward and backward) and 12 L d s for attention over a
    sequence of s (PaLM's appendix B; at the 150M config's 2048 tokens attention adds ~40 % to 6 N)."""
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * model.config.num_hidden_layers * model.config.hidden_size * seq_len


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train; returns the last train record (on every rank)."""
    return run_lm_task(PretrainTask, cfg, resume, "pretrain")


def run_lm_task(task_class: type, cfg: PretrainConfig, resume: bool, desc: str) -> dict:
    """``task_class`` (pretraining's task or one built on it) on the harness; the last train record, every rank."""
    world = distributed.join()
    result: RunResult = harness.run(task_class(cfg, world), cfg, to_dict(cfg), Path(cfg.out), world=world,
                                    resume=resume, desc=desc, allowed=deepspeed_io.allowed_classes())
    return result.train


class PretrainTask:
    """The decoder LM under a DeepSpeed engine, reading the packed stream; ``grad_accum`` micro-batches a step."""

    shown = ("tokens_per_s", "data_wait")

    def __init__(self, cfg: PretrainConfig, world: World):
        import deepspeed

        self.cfg, self.world, self.device = cfg, world, world.device
        self.layout = TokenLayout.load(Path(cfg.tokenizer) / LAYOUT_FILE)
        torch.manual_seed(cfg.seed)
        model = self.make_model()
        self.stream = PackedStream(cfg.data, self.layout, cfg.micro_batch_size, world.rank, world.size)
        trained = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=trained,
                                                                 config=deepspeed_config(cfg, self.device))
        deepspeed_io.read_weights_only(self.engine)
        if cfg.compile:
            self.engine.compile(backend=cfg.compile)
        self.flops_per_token = flops_per_token(model, cfg.data.seq_len)
        self.peak = _peak_flops(self.device)
        self.tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.data.seq_len * world.size
        self.state: dict[str, torch.Tensor] | None = None  # the fp32 weights of the last checkpoint (rank 0)

    def make_model(self) -> torch.nn.Module:
        """The module DeepSpeed trains (its parameters with ``requires_grad``)."""
        model = build_model(self.cfg.model, self.layout, self.cfg.attention)
        if self.cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def hf_state(self, state: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
        """The trained module's full fp32 state as the plain Hugging Face model's (here they are one)."""
        return state

    def batches(self, start: int, steps: int):
        """Each step's ``grad_accum`` micro-batches on the device, with the seconds spent reading them."""
        for _ in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            micro = [(b.model_inputs(self.device), b.labels.to(self.device))
                     for b in (self.stream.next_batch() for _ in range(self.cfg.grad_accum))]
            problems = self.stream.take_problems()  # conversations skipped (every rank's, recorded by rank 0)
            if self.world.any(bool(problems)):
                problems = self.world.gather_lines(problems)
            yield (micro, time.perf_counter() - t0), problems

    def train_step(self, step: int, batch) -> dict[str, float] | None:
        micro, wait = batch
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        finite = True
        for inputs, labels in micro:
            logits = self.engine(**inputs).logits  # (B, L, V)
            # the mean is over all ranks' tokens (DeepSpeed averages gradients over ranks)
            tokens = self.world.sum({"n": float((labels != IGNORE).sum())})["n"]
            loss, metrics = lm_loss(logits, labels, self.layout, self.cfg.loss,
                                    normalizer=max(tokens, 1.0) / self.world.size)
            if self.world.any(not torch.isfinite(loss)):  # every rank skips the step together, or none does
                # Still a backward and a step, with gradients made NaN (whatever made the loss so), so that the
                # optimizer step skips below and DeepSpeed's micro-step count stays on this step's boundary: a
                # micro-batch left out would shift every later step's accumulation by one micro-batch.
                finite, loss = False, loss * float("nan")
            self.engine.backward(loss)
            finite = self._stepped() and finite
            if finite:
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        if not finite:
            return None
        return {**sums, "_wait": wait, "_compute": time.perf_counter() - t0}

    def _stepped(self) -> bool:
        """Take the optimizer step unless a gradient is non-finite. ZeRO 1-3 check (across ranks) and skip by
        themselves, counting in ``engine.skipped_steps``; without ZeRO the check is here."""
        engine = self.engine
        if self.cfg.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
            local = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in engine.module.parameters())
            if self.world.any(local):
                engine.zero_grad()
                engine.set_gradient_accumulation_boundary(False)  # a step without an update: only the count moves
                engine.step()
                engine.set_gradient_accumulation_boundary(None)
                return False
        before = engine.skipped_steps
        engine.step()
        return engine.skipped_steps == before

    def summarise(self, window: dict[str, float], seconds: float) -> dict[str, float]:
        padding, emitted = self.stream.padding_counts  # totals since the start, summed over ranks below
        summed = self.world.sum({**window, "_padding": padding, "_emitted": emitted, "_skipped": self.stream.skipped})
        stats = summarise_losses(summed)
        stats["tokens_per_s"] = self.tokens_per_step * window.get("_steps", 0.0) / max(seconds, 1e-9)
        busy = summed.get("_wait", 0.0) + summed.get("_compute", 0.0)
        stats["data_wait"] = summed.get("_wait", 0.0) / max(busy, 1e-9)
        stats["padding"] = summed["_padding"] / max(summed["_emitted"], 1.0)  # all ranks' sequences
        if summed["_skipped"]:
            stats["conversations_skipped"] = summed["_skipped"]  # longer than a sequence, since the start
        stats["lr"] = self.scheduler.get_last_lr()[0] if self.scheduler is not None else float("nan")
        if self.peak:
            stats["mfu"] = self.flops_per_token * stats["tokens_per_s"] / (self.peak * self.world.size)
        return stats

    @torch.no_grad()
    def evaluate(self, step: int, out: Path, writer) -> dict[str, float]:
        cfg = self.cfg
        if not cfg.eval.shards:
            return {}
        stream_cfg = StreamConfig(shards=cfg.eval.shards, seq_len=cfg.data.seq_len, cond_dropout=0.0, seed=cfg.seed,
                                  isolate_documents=cfg.data.isolate_documents)
        stream = PackedStream(stream_cfg, self.layout, cfg.micro_batch_size, self.world.rank, self.world.size)
        self.engine.eval()
        sums: dict[str, float] = {}
        for _ in range(cfg.eval.batches):
            batch = stream.next_batch()
            _, metrics = lm_loss(self.engine(**batch.model_inputs(self.device)).logits, batch.labels.to(self.device),
                                 self.layout, cfg.loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.engine.train()
        return summarise_losses(self.world.sum(sums))

    def save(self, directory: Path) -> dict:
        from safetensors.torch import save_file

        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        state = deepspeed_io.full_fp32_state(self.engine, self.cfg.zero_stage, self.world.rank)
        if self.world.main:
            self.state = self.hf_state(state, directory)
            save_file(self.state, str(directory / "model.safetensors"))
        return {"stream": self.stream.state_dict()}

    def load(self, directory: Path, state: dict) -> None:
        self.engine.load_checkpoint(str(directory.parent), tag=directory.name, load_module_strict=True)
        self.stream.load_state_dict(state["stream"])

    def export(self, out: Path) -> None:
        """The weights of the checkpoint just written, as a Hugging Face directory in ``out/export``."""
        if self.world.main:
            write_hf_directory(self.cfg.model, self.cfg.tokenizer, self.state, out / "export")
        self.world.barrier()


def summarise_losses(sums: dict[str, float]) -> dict[str, float]:
    """Per-modality loss, perplexity and accuracy from ``lm_loss``'s sums (added over steps and ranks)."""
    out = {}
    tokens = sum(sums.get(f"{m}_tokens", 0.0) for m in TOKEN_KINDS)
    out["loss"] = sum(sums.get(f"{m}_loss", 0.0) for m in TOKEN_KINDS) / max(tokens, 1.0)
    for m in TOKEN_KINDS:
        n = sums.get(f"{m}_tokens", 0.0)
        if n:
            out[f"{m}_loss"] = sums[f"{m}_loss"] / n
            out[f"{m}_ppl"] = math.exp(min(out[f"{m}_loss"], 50.0))
            out[f"{m}_acc"] = sums[f"{m}_correct"] / n
            out[f"{m}_tokens"] = n
    return out
