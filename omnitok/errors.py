"""The exception types the CLI answers without a traceback: ``OmnitokError`` means "the user gave us something wrong".

The CLI prints an ``OmnitokError`` as one line (no traceback); anything else is a bug and keeps its traceback, except
``Stopped``, which is no error: a training run that a stop signal ended as asked.
"""

import errno
import shutil
from pathlib import Path


class OmnitokError(Exception):
    """Wrong usage or bad input, with a message that names what is wrong."""


class LayoutMismatch(OmnitokError):
    """A token layout (or a fingerprint in it) does not match the tokenizer or data at hand."""


class MalformedSequence(OmnitokError):
    """An id sequence that does not follow the document grammar of ARCHITECTURE.md."""


class Stopped(Exception):
    """A training run that a stop signal (a scheduler's preemption) ended after saving a checkpoint: the CLI prints
    its message as one line and exits with 128 + the signal's number, as a process the signal killed would."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def disk_full(error: BaseException, where: Path) -> bool:
    """Whether ``error``, raised while writing under ``where``, comes from a full disk or quota: an OSError saying so
    (here or in its cause), or a failed write with under 1 MiB left there (torch.save reports a short write as a
    RuntimeError about stream positions; safetensors as its own error)."""
    chain = [error, error.__cause__, error.__context__]
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return True
    try:
        return shutil.disk_usage(where).free < 2**20
    except OSError:
        return False
