"""Checkpoint directories that survive a kill at any moment, and a damaged or hostile one on resume.

A checkpoint is written into a temporary directory, then ``COMPLETE`` is written into it (a JSON list of every file
it holds with its size and SHA-256), then it is renamed to ``step_XXXXXXXX``. A kill while saving leaves only the
temporary directory, which is ignored (and removed by the next save), so the previous checkpoint stays the newest
usable one.

On resume ``pick_checkpoint`` takes the newest complete checkpoint whose files all match their record; a checkpoint
with a missing, truncated or altered file is reported in one line and the previous one is tried. Before anything is
loaded, every torch file of the chosen checkpoint is read for the classes its pickle would build (without running
it): a file that needs anything outside torch's weights-only set and the caller's allow-list is refused, since it was
not written by the trainer. Checkpoints written before the record existed (an empty ``COMPLETE``) are used without
the size and checksum check, but with the same pickle check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from omnitok.errors import OmnitokError
from omnitok.weights import unsafe_globals

COMPLETE = "COMPLETE"


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Call ``write(directory)`` to fill a new checkpoint for ``step``; keep the newest ``keep`` checkpoints."""
    tmp = start_checkpoint(root, step)
    write(tmp)
    return finish_checkpoint(tmp, keep)


def start_checkpoint(root: Path, step: int) -> Path:
    """A fresh temporary directory for ``step``'s checkpoint (stale ones of killed saves removed)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale)
    tmp = root / f".tmp-step_{step:08d}"
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, keep: int) -> Path:
    """Record what the filled ``tmp`` holds, rename it to its final name, and prune to the newest ``keep``."""
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / COMPLETE).write_text(json.dumps({"files": files}, indent=1) + "\n")
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(tmp.parent)[:-keep] if keep > 0 else []:
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


def damage(ckpt: Path) -> str | None:
    """What is wrong with ``ckpt``'s files against its ``COMPLETE`` record, or None when they all match."""
    text = (ckpt / COMPLETE).read_text(errors="replace").strip()
    if not text:
        return None  # written before records existed
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict):
        return f"its {COMPLETE} record is not readable"
    for name, want in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, {want.get('bytes')} were written"
        if _sha256(path) != want.get("sha256"):
            return f"{name} differs from what was written (checksum)"
    return None


def pick_checkpoint(root: Path, allowed: Sequence[Any] = ()) -> Path:
    """The newest complete checkpoint under ``root`` that is intact; damaged newer ones are reported and passed
    over. Raises when there is none, or when the chosen one holds a torch file that needs classes outside the
    weights-only set and ``allowed``."""
    found = complete_checkpoints(root)
    if not found:
        raise OmnitokError(f"no complete checkpoint in {root}")
    for ckpt in reversed(found):
        problem = damage(ckpt)
        if problem is None:
            for f in sorted(ckpt.rglob("*.pt")):
                needed = unsafe_globals(f, allowed)
                if needed is None:
                    problem = f"{f.name} is not a readable torch file"
                    break
                if needed:
                    raise OmnitokError(f"{f}: refused: loading it would need {', '.join(needed[:3])}, which a "
                                       "weights-only load never runs (this file was not written by omnitok)")
        if problem is None:
            return ckpt
        tqdm.write(f"checkpoint {ckpt.name} is damaged ({problem}); trying the one before it")
    raise OmnitokError(f"no intact checkpoint in {root} (all {len(found)} are damaged)")


# Settings a resumed run may change: how long it trains, how often it logs, evaluates and saves, and how the same
# computation is fitted to the hardware (attention kernel, activation checkpointing, compilation).
MAY_CHANGE = ("steps", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "max_nonfinite",
              "attention", "activation_checkpointing", "compile")


def check_same_config(saved: dict, config: dict, ckpt: Path, ignored: tuple[str, ...] = ()) -> None:
    """Refuse to resume with a config that differs from the checkpoint's, naming the differing settings.
    ``MAY_CHANGE`` settings may differ; ``ignored`` ones are not part of the run's identity (the run's own location,
    so a moved or copied run directory resumes). Settings the saved config does not hold at all were added to omnitok
    after the run was written; they take their value from the current config."""
    skip = set(MAY_CHANGE) | set(ignored)
    differing = [k for k in _diff(saved, config) if k not in skip and _has(saved, k)]
    if differing:
        said = "; ".join(f"{k!r}: {_get(saved, k)!r} then, {_get(config, k)!r} now" for k in differing[:3])
        raise OmnitokError(f"--resume: the config differs from the one {ckpt} was trained with "
                           f"({said}{'; ...' if len(differing) > 3 else ''}); only {', '.join(MAY_CHANGE)} may change")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _has(d: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
