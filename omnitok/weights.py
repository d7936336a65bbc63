"""Reading foreign weights safely, and loading them into a module exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from omnitok.errors import OmnitokError


def torch_load_state(path: str | Path) -> dict:
    """A dict from a torch file, read with ``weights_only=True`` (never unpickled freely)."""
    path = Path(path)
    if not path.is_file():
        raise OmnitokError(f"weights file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, wrong file type, objects outside the weights-only allow-list
        raise OmnitokError(f"{path} cannot be read as a weights-only torch checkpoint: {e}") from None
    if not isinstance(obj, dict):
        raise OmnitokError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


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
