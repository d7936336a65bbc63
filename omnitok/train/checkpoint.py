"""Checkpoint directories that survive a kill at any moment.

A checkpoint is written into a temporary directory, marked complete, then renamed to ``step_XXXXXXXX``; a kill
while saving leaves only the temporary directory, which is ignored (and removed by the next save), so the previous
checkpoint stays the newest usable one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

COMPLETE = "COMPLETE"


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Call ``write(directory)`` to fill a new checkpoint for ``step``; keep the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale)
    tmp.mkdir()
    write(tmp)
    (tmp / COMPLETE).touch()
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None
