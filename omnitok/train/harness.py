"""The training harness every trainer runs on: settings, resume, kill-safe checkpoints, records, progress.

A task (pretraining, the VQ-GAN, the audio codec) supplies what differs: the batch of each step (a pure function of
the seed and the step, or a stream whose position is saved, so a resumed run sees the batches the uninterrupted one
would have), one training step, how a window of steps is summarised, an evaluation, how its state is saved and
loaded, and its export. ``run`` does the rest, the same way for every trainer, on one process or many.

Every run directory has the same layout:

- ``run_config.json``: the run's config (not ``config.json``: a tokenizer trainer's run directory is also its
  tokenizer directory, whose ``config.json`` is the model's);
- ``train.jsonl`` (one record per ``log_every`` steps), ``eval.jsonl``, ``errors.jsonl`` (inputs that could not be
  used), ``tb/`` (TensorBoard: ``train/...`` and ``eval/...``), ``loss.png`` (written at the end);
- ``checkpoints/step_N/``: the task's files, ``rank00000.pt`` ... (each rank's RNG, the harness counters, the
  window of steps not yet logged, and the task's own per-rank state; read weights-only), ``run.json`` (the step and
  the config) and ``COMPLETE`` (``checkpoint.py``). Written under a temporary name by every rank, then renamed by
  rank 0 after a barrier, so a kill at any moment leaves the previous checkpoint the newest usable one.

``--resume`` continues from the newest intact checkpoint, refuses a different config (``checkpoint.MAY_CHANGE`` lists
what may change) and first cuts the logs back to that step, so steps a killed run did after its checkpoint are
recorded once.

Preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before they kill) or SIGUSR1 (SLURM's ``--signal``)
makes a run finish the step it is in, save a checkpoint there and stop (``Stopped``: one line, exit status 128 + the
signal's number); ``--resume`` then continues exactly where it stopped. The ranks agree on it after every step (one
scalar all-reduce), so a signal that reached only one rank stops them all at the same step. Ctrl-C still stops at
once (the last checkpoint stays the newest).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from omnitok.config import check_seed
from omnitok.distributed import World
from omnitok.errors import OmnitokError, Stopped, disk_full
from omnitok.jsonfile import cut_jsonl, read_json_object, write_json_atomic
from omnitok.train.checkpoint import (
    check_same_config,
    complete_checkpoints,
    finish_checkpoint,
    pick_checkpoint,
    start_checkpoint,
)
from omnitok.weights import load_safetensors, load_torch_file

# The harness's checkpoint format; a checkpoint without it was written before the shared harness.
FORMAT = 2


@dataclass
class RunSettings:
    """What every trainer's config holds (its dataclass inherits these, so the keys sit at the top level)."""

    steps: int = 1000
    log_every: int = 1  # steps per train.jsonl record (a record is the window's mean; pretraining: token-weighted)
    eval_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # consecutive steps with a non-finite loss or gradient before the run stops
    seed: int = 0

    def check_run_settings(self) -> None:
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise OmnitokError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_seed(self.seed)


class TrainTask(Protocol):
    # keys of the latest train or eval record shown beside the loss in the progress bar
    shown: Sequence[str]

    def batches(self, start: int, steps: int) -> Iterator[tuple[Any | None, list[str]]]:
        """One ``(batch or None when nothing in it was usable, error messages)`` per step ``start+1 .. steps``."""

    def train_step(self, step: int, batch: Any) -> dict[str, float] | None:
        """One optimisation step; the values to add to the log window, or None when the step was skipped because a
        loss or gradient was not finite (every rank returns None together)."""

    def summarise(self, window: dict[str, float], seconds: float) -> dict[str, float]:
        """The train record of a window: ``window`` sums this rank's ``train_step`` values and holds ``_steps``."""

    def evaluate(self, step: int, out: Path, writer: Any | None) -> dict[str, float]:
        """Held-out metrics ({} when there is nothing to evaluate); ``writer`` is None off rank 0."""

    def save(self, directory: Path) -> dict:
        """Write the task's files into the checkpoint being made (every rank calls it); return this rank's state."""

    def load(self, directory: Path, state: dict) -> None:
        """Restore from a checkpoint ``directory`` and this rank's ``state``."""

    def export(self, out: Path) -> None:
        """Write the usable result (a tokenizer directory, a Hugging Face model) after every checkpoint."""


@dataclass
class RunResult:
    train: dict[str, float]  # the last train record
    eval: dict[str, float]  # the last evaluation


def run(task: TrainTask, settings: RunSettings, config: dict, out: Path, *, world: World, resume: bool, desc: str,
        allowed: Sequence[Any] = ()) -> RunResult:
    """Train ``task`` to ``settings.steps``. ``config`` is the run's full config as plain data; ``allowed`` the
    classes the task's torch files may hold beyond torch's weights-only set."""
    root = out / "checkpoints"
    start, skipped, nonfinite, window = 0, 0, 0, {}
    if resume:
        ckpt = _agreed_checkpoint(root, world, allowed)
        saved = read_json_object(ckpt / "run.json", "") if (ckpt / "run.json").is_file() else {}
        if saved.get("format") != FORMAT:
            raise OmnitokError(f"--resume: {ckpt} was written by an omnitok from before the shared training harness "
                               "and cannot be resumed; start a new run (omnitok export still reads a pretraining one)")
        check_same_config(saved["config"], config, ckpt, ignored=("out",))
        local = load_torch_file(ckpt / f"rank{world.rank:05d}.pt", allowed)
        task.load(ckpt, local["task"])
        torch.set_rng_state(local["rng"])
        if world.device.type == "cuda":
            torch.cuda.set_rng_state(local["cuda_rng"])
        start, skipped, nonfinite, window = saved["step"], local["skipped"], local["nonfinite"], local["window"]
    elif complete_checkpoints(root):
        raise OmnitokError(f"{out} already holds a training run; pass --resume to continue it or choose a new out")
    log = _Records(out, world, start)
    log.write_config(config)

    def checkpoint(step: int, export: bool = True) -> None:
        tmp = root / f".tmp-step_{step:08d}"
        try:
            if world.main:
                start_checkpoint(root, step)
            world.barrier()
            rng = {"rng": torch.get_rng_state()}
            if world.device.type == "cuda":
                rng["cuda_rng"] = torch.cuda.get_rng_state(world.device)
            local = {"task": task.save(tmp), "skipped": skipped, "nonfinite": nonfinite, "window": window, **rng}
            torch.save(local, tmp / f"rank{world.rank:05d}.pt")
            world.barrier()
            if world.main:
                write_json_atomic(tmp / "run.json", {"format": FORMAT, "step": step, "config": config})
                finish_checkpoint(tmp, settings.keep_checkpoints)
            world.barrier()
            if export:
                task.export(out)
        except Exception as e:
            if not disk_full(e, root):
                raise
            if world.main:
                shutil.rmtree(tmp, ignore_errors=True)  # the space it held is the user's again
            raise OmnitokError(f"saving the step {step} checkpoint failed: the disk holding {out} is full; the newest "
                               "complete checkpoint is kept: free space, then rerun with --resume") from None

    result = RunResult({}, {})

    def evaluate(step: int) -> None:
        metrics = task.evaluate(step, out, log.writer)
        if metrics:
            result.eval = metrics
            log.record("eval", step, metrics)

    steps = settings.steps
    stop = _StopSignals()
    try:
        if start == 0:
            evaluate(0)
        progress = tqdm(task.batches(start, steps), total=steps - start, desc=desc, unit="step",
                        disable=not world.main)
        window_start = time.perf_counter()
        for step, (batch, problems) in enumerate(progress, start=start + 1):
            log.errors(step, problems)
            if world.main and problems:  # a damaged shard, a conversation that does not fit: seen, not only logged
                tqdm.write("\n".join(f"step {step}: {p}" for p in problems[:3])
                           + (f"\nstep {step}: {len(problems) - 3} more in errors.jsonl" if len(problems) > 3 else ""))
            values = task.train_step(step, batch) if batch is not None else None
            if values is None:
                skipped += 1
                nonfinite = nonfinite + 1 if batch is not None else nonfinite
                why = "no usable input" if batch is None else "non-finite loss or gradient"
                if world.main:
                    tqdm.write(f"step {step}: skipped ({why}); {skipped} so far")
                if nonfinite >= settings.max_nonfinite:
                    raise OmnitokError(f"{nonfinite} steps in a row had a non-finite loss or gradient; stopping (lower "
                                       "the learning rate, check the data, or raise max_nonfinite)")
            else:
                nonfinite = 0
                for k, v in {**values, "_steps": 1}.items():
                    window[k] = window.get(k, 0.0) + float(v)
            if step % settings.log_every == 0 or step == steps:
                trained = task.summarise(window, time.perf_counter() - window_start) if window else {}
                result.train = {**trained, "skipped_steps": skipped}
                log.record("train", step, result.train)
                latest = {**result.eval, **result.train}
                progress.set_postfix({k: f"{latest[k]:.4g}" for k in ("loss", *task.shown) if k in latest})
                window, window_start = {}, time.perf_counter()
            if step % settings.eval_every == 0 or step == steps:
                evaluate(step)
            saved = step % settings.checkpoint_every == 0 or step == steps
            if saved:
                checkpoint(step)
            if step < steps and world.any(stop.signum is not None):  # every rank stops at the same step
                if not saved:
                    checkpoint(step, export=False)  # the export can wait for the resumed run: grace periods are short
                name = signal.Signals(stop.signum).name if stop.signum else "a stop signal to another rank"
                raise Stopped(f"stopped by {name} after step {step} of {steps}; its checkpoint is saved: rerun the "
                              "same command with --resume to continue", stop.signum or signal.SIGTERM)
    finally:
        stop.restore()
        log.close()
    return result


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _StopSignals:
    """While a run trains: ``STOP_SIGNALS`` only note that the run should stop (``signum``, the last one seen); the
    harness checks after each step. Installed from the main thread only (Python's rule); ``restore`` puts the
    previous handlers back."""

    def __init__(self):
        self.signum: int | None = None
        main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS} if main else {}

    def _note(self, signum: int, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def mean_window(window: dict[str, float]) -> dict[str, float]:
    """A window's per-step mean: the summary of tasks whose steps each record their own scalars."""
    steps = max(window.get("_steps", 0.0), 1.0)
    return {k: v / steps for k, v in window.items() if k != "_steps"}


class ModuleTask(ABC):
    """Save and load for a one-process task made of modules and optimizers: each module as safetensors, the
    optimizers' state in the rank file."""

    shown: Sequence[str] = ()

    @abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]: ...

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def summarise(self, window: dict[str, float], seconds: float) -> dict[str, float]:
        return mean_window(window)

    def save(self, directory: Path) -> dict:
        for name, module in self.modules().items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                      str(directory / f"{name}.safetensors"))
        return {"optimizers": {n: o.state_dict() for n, o in self.optimizers().items()}}

    def load(self, directory: Path, state: dict) -> None:
        for name, module in self.modules().items():
            module.load_state_dict(load_safetensors(directory / f"{name}.safetensors"))
        for name, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])


def _agreed_checkpoint(root: Path, world: World, allowed: Sequence[Any]) -> Path:
    """Rank 0 picks the newest intact checkpoint (checksums, pickle check) and every rank resumes from it."""
    chosen, error = None, None
    if world.main:
        try:
            chosen = pick_checkpoint(root, allowed)
        except OmnitokError as e:
            error = e
    step = world.broadcast(int(chosen.name.removeprefix("step_")) if chosen is not None else -1)
    if error is not None:
        raise error
    if step < 0:
        raise OmnitokError(f"--resume: rank 0 found no usable checkpoint in {root} (its message says why)")
    return root / f"step_{step:08d}"


class _Records:
    """Rank 0's ``train.jsonl`` / ``eval.jsonl`` / ``errors.jsonl``, TensorBoard and ``loss.png``."""

    def __init__(self, out: Path, world: World, start: int):
        self.out, self.main, self.writer = out, world.main, None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            out.mkdir(parents=True, exist_ok=True)
            for name in ("train", "eval", "errors"):  # a killed run may have logged steps after its checkpoint
                cut_jsonl(out / f"{name}.jsonl", "step", start)
                (out / f"{name}.jsonl").touch()
            self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1)  # the same cut for TensorBoard

    def write_config(self, config: dict) -> None:
        if self.main:
            write_json_atomic(self.out / "run_config.json", config)

    def record(self, kind: str, step: int, stats: dict[str, float]) -> None:
        if not self.main:
            return
        for k, v in stats.items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)
        self._append(kind, [{"step": step, **stats}])

    def errors(self, step: int, problems: list[str]) -> None:
        if self.main and problems:
            self._append("errors", [{"step": step, "error": p} for p in problems])

    def _append(self, kind: str, rows: list[dict]) -> None:
        with open(self.out / f"{kind}.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def close(self) -> None:
        if self.main:
            self.writer.close()
            plot_losses(self.out)


def plot_losses(run: Path) -> None:
    """``loss.png``: training (and held-out) loss, per modality where recorded, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for kind, style in (("train", "-"), ("eval", "--")):
        path = run / f"{kind}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        for key in ["loss"] + sorted({k for r in rows for k in r if k.endswith("_loss")}):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, label=f"{kind} {key.replace('_loss', '')}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=110)
    plt.close(fig)


def ignore_stop_signals(worker_id: int) -> None:
    """A data-loader worker's ``worker_init_fn``: a stop signal sent to the whole process group (SLURM signals every
    process of a job step) is the main process's to act on at the next step; left to kill the workers, it would end
    the run at once with DataLoader's "worker killed" error and no checkpoint."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
