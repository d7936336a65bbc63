"""Installed in the Ray workers of tests/test_tokenize_ray.py (``worker_process_setup_hook``): preparing a media
file whose name starts with ``crash`` kills the worker process outright, as a segfault in a decoder would."""

import os
from pathlib import Path


def install() -> None:
    from omnitok.data import prepare

    original = prepare.Preprocessor.segments

    def segments(self, given):
        for seg in given:
            if isinstance(getattr(seg, "source", None), str | Path) and Path(seg.source).name.startswith("crash"):
                os._exit(1)
        return original(self, given)

    prepare.Preprocessor.segments = segments
