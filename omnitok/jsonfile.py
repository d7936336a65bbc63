"""Reading and writing the small JSON files omnitok keeps beside its data (layouts, manifests, part notes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnitok.errors import OmnitokError


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for text from outside: nesting too deep for Python's recursive parser (``[[[[...]]]]``, a
    RecursionError that would end the job or the request) is a ``JSONDecodeError`` like any other bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``missing`` is the message when the file is absent."""
    if not path.is_file():
        raise OmnitokError(missing)
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmnitokError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OmnitokError(f"{path} must hold a JSON object")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name, then rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def cut_jsonl(path: Path, key: str, last: int) -> list[dict[str, Any]]:
    """Keep the records of a JSON-lines log whose ``key`` is at most ``last`` (where a resumed job starts again), and
    return them. A line a kill cut off mid-write is dropped; a missing file is an empty log."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = parse_json(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get(key, 0) <= last:
            kept.append(record)
    if len(kept) < len(lines):  # rewritten only when something goes: a long log is not copied at every start
        _write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return kept
