"""Reading weights safely (nothing a file holds is ever run), and loading them into a module exactly.

Every file omnitok reads that could carry code goes through here: torch files with ``torch.load(weights_only=True)``
and an explicit allow-list of extra classes, safetensors, and Hugging Face model directories restricted to
safetensors. A file that needs anything else is refused with one line naming it (``OmnitokError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from omnitok.errors import OmnitokError


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def unsafe_globals(path: str | Path, allowed: Sequence[Any] = ()) -> list[str] | None:
    """The classes and functions a torch file would need beyond torch's weights-only set and ``allowed``, read from
    its pickle without running it; None when it is not a readable zip-format torch file (truncated, foreign)."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) format, truncated or foreign file: nothing to vouch for
        return None
    names = {_qualname(a) for a in allowed}
    return [n for n in needed if n not in names]


def load_torch_file(path: str | Path, allowed: Sequence[Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` with ``allowed`` classes added to the allow-list for this call only."""
    path = Path(path)
    if not path.is_file():
        raise OmnitokError(f"{path} not found")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, objects outside the allow-list
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OmnitokError(f"{path}: refused, not a weights-only torch file ({first[:200]})") from None


def torch_load_state(path: str | Path) -> dict:
    """A dict from a torch file (foreign checkpoints), read weights-only."""
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise OmnitokError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or foreign file is one line naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise OmnitokError(f"{path} not found")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: header or data cut short, not safetensors at all
        raise OmnitokError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None


def from_pretrained(cls: Any, directory: str | Path, **kwargs) -> Any:
    """``cls.from_pretrained`` on a local directory, safetensors only (a ``pytorch_model.bin`` is a pickle and is
    never read); a missing or damaged weights file is one line naming the directory."""
    from huggingface_hub.errors import StrictDataclassError  # a config.json value of the wrong type
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, StrictDataclassError) as e:
        why = " ".join(str(e).split()) or type(e).__name__  # several lines (a config's validation) made one
        raise OmnitokError(f"{directory}: cannot load the model (safetensors weights only): {why[:300]}") from None


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` exactly: any missing, unexpected or mis-shaped key is an error listing the first
    few of each."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (model has {tuple(expected[k].shape)})"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            problems.append(f"{len(items)} {what}: " + ", ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
    if problems:
        raise OmnitokError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
