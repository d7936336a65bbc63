"""Tokenizers: the token layout (the one owner of id ranges), the text tokenizer, the media tokenizer protocol, the
multimodal tokenizer that turns documents into id sequences and back, and the media tokenizers themselves.

``ImageTokenizer`` and ``AudioTokenizer`` carry model code (the VQ-GAN, transformers' EnCodec); they are imported on
first use (PEP 562), so ``import omnitok.tokenizers`` stays light.
"""

from importlib import import_module

from omnitok.tokenizers.layout import Modality, Span, TokenLayout
from omnitok.tokenizers.multimodal import EncodedDocument, MultimodalTokenizer, ParsedSegment, assemble
from omnitok.tokenizers.protocol import AudioCodec, ImageCodec
from omnitok.tokenizers.text import TextTokenizer

_LAZY = {"ImageTokenizer": "omnitok.tokenizers.image", "AudioTokenizer": "omnitok.tokenizers.audio"}

__all__ = ["AudioCodec", "AudioTokenizer", "EncodedDocument", "ImageCodec", "ImageTokenizer", "Modality",
           "MultimodalTokenizer", "ParsedSegment", "Span", "TextTokenizer", "TokenLayout", "assemble"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
