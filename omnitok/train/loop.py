"""The training loop that tokenizer trainers share: resume, kill-safe checkpoints, progress, TensorBoard, records.

A task (the VQ-GAN, the audio codec) supplies what differs: its modules and optimizers, the batch for each step
(a pure function of the seed and the step, so a resumed run sees the batches the uninterrupted one would have),
one training step, an evaluation, and how to write its tokenizer directory. ``run`` does the rest:

- ``out/checkpoints/step_N/``: every module as safetensors, optimizer and RNG state in ``training.pt`` (read
  weights-only), the config in ``state.json``; ``--resume`` picks the newest intact one (``checkpoint.py``) and
  refuses a different config (only ``steps`` may change, to train longer);
- ``out/losses.jsonl`` (every step), ``out/eval.jsonl``, ``out/errors.jsonl`` (inputs that could not be used),
  ``out/tb/`` (TensorBoard), and the tokenizer directory itself in ``out`` at every checkpoint. A run first cuts
  the logs back to the step it starts from, so the steps a killed run did after its checkpoint are not recorded twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from omnitok.errors import OmnitokError
from omnitok.jsonfile import cut_jsonl, read_json_object, write_json_atomic
from omnitok.train.checkpoint import check_same_config, pick_checkpoint, save_checkpoint
from omnitok.weights import load_safetensors, load_torch_file


class TrainTask(Protocol):
    def modules(self) -> dict[str, torch.nn.Module]: ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def batches(self, start: int, steps: int) -> Iterator[tuple[Any | None, list[str]]]:
        """One ``(batch or None when nothing in it was usable, error messages)`` per step ``start+1 .. steps``."""

    def train_step(self, step: int, batch: Any) -> dict[str, float] | None:
        """One optimisation step; the scalars to record, or None when the step was skipped (non-finite loss)."""

    def evaluate(self, step: int, out: Path, writer: Any) -> dict[str, float]: ...

    def export(self, out: Path) -> None: ...


def saved_config(out: Path) -> tuple[Path, dict]:
    """The newest intact checkpoint under ``out`` and the config it was trained with."""
    ckpt = pick_checkpoint(out / "checkpoints")
    return ckpt, read_json_object(ckpt / "state.json", f"{ckpt} has no state.json")["config"]


def run(task: TrainTask, config: dict, out: Path, *, steps: int, eval_every: int, checkpoint_every: int,
        keep: int, resume: bool, device: torch.device, desc: str) -> dict[str, float]:
    """Train ``task`` to ``steps``; return the last evaluation. ``config`` is the run's full config as plain data."""
    from torch.utils.tensorboard import SummaryWriter

    start, skipped = 0, 0
    if resume:
        ckpt, saved = saved_config(out)
        check_same_config(saved, config, ckpt)
        for name, module in task.modules().items():
            module.load_state_dict(load_safetensors(ckpt / f"{name}.safetensors"))
        state = load_torch_file(ckpt / "training.pt")
        for name, opt in task.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start, skipped = state["step"], state["skipped"]
    elif (out / "checkpoints").exists():
        raise OmnitokError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    for log in ("losses", "eval", "errors"):  # a killed run may have logged steps after its checkpoint
        cut_jsonl(out / f"{log}.jsonl", "step", start)

    def checkpoint(step: int) -> None:
        def write(d: Path) -> None:
            for name, module in task.modules().items():
                save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                          str(d / f"{name}.safetensors"))
            rng = {"rng": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda_rng"] = torch.cuda.get_rng_state()
            torch.save({"step": step, "skipped": skipped, **rng,
                        "optimizers": {n: o.state_dict() for n, o in task.optimizers().items()}}, d / "training.pt")
            write_json_atomic(d / "state.json", {"step": step, "config": config})

        save_checkpoint(out / "checkpoints", step, write, keep)
        task.export(out)

    writer = SummaryWriter(str(out / "tb"), purge_step=start + 1)  # the same cut for TensorBoard
    metrics: dict[str, float] = {}

    def evaluate(step: int) -> dict[str, float]:
        m = task.evaluate(step, out, writer)
        for k, v in m.items():
            writer.add_scalar(f"eval/{k}", v, step)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        return m

    with open(out / "losses.jsonl", "a") as losses, open(out / "errors.jsonl", "a") as errors:
        try:
            if start == 0:
                metrics = evaluate(0)
            progress = tqdm(task.batches(start, steps), total=steps - start, desc=desc, unit="step")
            for step, (batch, problems) in enumerate(progress, start=start + 1):
                for p in problems:
                    errors.write(json.dumps({"step": step, "error": p}) + "\n")
                record = task.train_step(step, batch) if batch is not None else None
                if record is None:
                    skipped += 1
                    tqdm.write(f"step {step}: skipped ({'no usable input' if batch is None else 'non-finite loss'}); "
                               f"{skipped} so far")
                else:
                    losses.write(json.dumps({"step": step, **record}) + "\n")
                    for k, v in record.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    shown = {k: f"{v:.3g}" for k, v in metrics.items() if k in ("psnr", "si_sdr")}  # last evaluation
                    progress.set_postfix(loss=f"{record['loss']:.4f}", **shown)
                if step % eval_every == 0 or step == steps:
                    metrics = evaluate(step)
                if step % checkpoint_every == 0 or step == steps:
                    checkpoint(step)
        finally:
            writer.close()
    return metrics
