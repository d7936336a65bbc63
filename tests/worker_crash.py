"""A worker process that dies on one file, as a segfault in a decoder would: preparing media whose file name starts
with ``crash`` calls ``os._exit(1)``. Installed in the local engine's forked workers by monkeypatching before they
fork (tests/test_tokenize.py), and in Ray's workers as ``worker_process_setup_hook`` (tests/test_tokenize_ray.py)."""

import os
from pathlib import Path


def crashing(segments):
    """``Preprocessor.segments`` that kills its process on crash* media."""

    def wrapped(self, given):
        for seg in given:
            if isinstance(getattr(seg, "source", None), str | Path) and Path(seg.source).name.startswith("crash"):
                os._exit(1)
        return segments(self, given)

    return wrapped


def install() -> None:
    from omnitok.data import prepare

    prepare.Preprocessor.segments = crashing(prepare.Preprocessor.segments)
