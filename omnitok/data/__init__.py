"""Data: interleaved documents (and, as they land, corpus readers, the shard format and the training stream)."""

from omnitok.document import Audio, Document, Image, Segment, Text

__all__ = ["Audio", "Document", "Image", "Segment", "Text"]
