"""The one exception type that means "the user gave us something wrong".

The CLI prints an ``OmnitokError`` as one line (no traceback); anything else is a bug and keeps its traceback.
"""


class OmnitokError(Exception):
    """Wrong usage or bad input, with a message that names what is wrong."""


class LayoutMismatch(OmnitokError):
    """A token layout (or a fingerprint in it) does not match the tokenizer or data at hand."""


class MalformedSequence(OmnitokError):
    """An id sequence that does not follow the document grammar of ARCHITECTURE.md."""
