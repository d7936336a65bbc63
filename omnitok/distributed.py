"""Processes, ranks and collectives: the only reader of the launcher's RANK / WORLD_SIZE / LOCAL_RANK.

``join()`` puts this process in the launcher's process group (torchrun, the ``deepspeed`` launcher) or, run as is,
in a group of one; ``single(device)`` is a one-process world with no group at all (the tokenizer trainers). A
``World``'s collectives are no-ops in a world of one without a group, so code that reduces reads the same either way.
``launched_part()`` tells offline tokenization which part of the corpus this process writes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes logs, TensorBoard and shared files."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.grouped:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (so every rank takes the same branch)."""
        return bool(self.sum({"flag": 1.0 if flag else 0.0})["flag"])

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Every rank's ``values`` summed key by key (every rank must pass the same keys)."""
        if not self.grouped:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def gather_lines(self, lines: list[str]) -> list[str]:
        """Every rank's ``lines``, in rank order, on every rank."""
        if not self.grouped:
            return list(lines)
        gathered: list = [None] * self.size
        torch.distributed.all_gather_object(gathered, list(lines))
        return [line for part in gathered for line in part]

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.grouped:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.broadcast(t, 0)
        return int(t.item())


def single(device: torch.device) -> World:
    return World(0, 1, device)


def join() -> World:
    """Join the launcher's process group (gloo on CPU, NCCL on GPU), or make a group of one when launched as is."""
    import deepspeed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".torch_extensions"))
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)


def launched_part() -> tuple[int, int] | None:
    """``(rank, world size)`` when a launcher started several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def is_main_process() -> bool:
    """Rank 0 of the launch (or a process launched as is), read before or after ``join``."""
    return int(os.environ.get("RANK", "0")) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
