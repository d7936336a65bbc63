"""Tokenizers: the token layout (the one owner of id ranges), the text tokenizer, the media tokenizer protocol, and
the multimodal tokenizer that turns documents into id sequences and back."""

from omnitok.tokenizers.layout import Modality, TokenLayout
from omnitok.tokenizers.multimodal import EncodedDocument, MultimodalTokenizer, ParsedSegment, Span, assemble
from omnitok.tokenizers.protocol import AudioCodec, ImageCodec
from omnitok.tokenizers.text import TextTokenizer

__all__ = ["AudioCodec", "EncodedDocument", "ImageCodec", "Modality", "MultimodalTokenizer", "ParsedSegment", "Span",
           "TextTokenizer", "TokenLayout", "assemble"]
