"""A worker process that dies on one file, as a segfault in a decoder would: preparing media whose file name starts
with ``crash`` calls ``os._exit(1)``. Installed in the local engine's forked workers by monkeypatching before they
fork (tests/test_tokenize.py), and in Ray's workers as ``worker_process_setup_hook`` (tests/test_tokenize_ray.py),
where an encoder also takes its time over media named ``busy*``, and a crash beside them waits for it to begin, and
encoders log their start."""

import os
import time
from pathlib import Path

BUSY = "encoder-busy"  # made beside busy* media when an encoder begins their batch


def crashing(segments):
    """``Preprocessor.segments`` that kills its process on crash* media; when busy* media lie beside them, only once
    an encoder is busy with those (at most 30 s later)."""

    def wrapped(self, given):
        for seg in given:
            if isinstance(getattr(seg, "source", None), str | Path) and Path(seg.source).name.startswith("crash"):
                folder = Path(seg.source).parent
                deadline = time.monotonic() + 30
                while any(folder.glob("busy*")) and not (folder / BUSY).exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                os._exit(1)
        return segments(self, given)

    return wrapped


def slow_encoding(encode):
    """``_Encoder.encode`` that takes 10 s over a block holding busy* media (and says so beside them)."""

    def wrapped(self, prepared):
        busy = [Path(p.source) for p in prepared if Path(p.source).name.startswith("busy")]
        if busy:
            (busy[0].parent / BUSY).touch()
            time.sleep(10)
        return encode(self, prepared)

    return wrapped


def logged_start(init):
    """``_Encoder.__init__`` that appends a line to the file ``OMNITOK_TEST_ENCODER_STARTS`` names, when set."""

    def wrapped(self, *args):
        if os.environ.get("OMNITOK_TEST_ENCODER_STARTS"):
            with open(os.environ["OMNITOK_TEST_ENCODER_STARTS"], "a") as log:
                log.write(f"{os.getpid()}\n")
        init(self, *args)

    return wrapped


def install() -> None:
    from omnitok.data import prepare, ray_engine

    prepare.Preprocessor.segments = crashing(prepare.Preprocessor.segments)
    ray_engine._Encoder.encode = slow_encoding(ray_engine._Encoder.encode)
    ray_engine._Encoder.__init__ = logged_start(ray_engine._Encoder.__init__)
