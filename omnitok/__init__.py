"""omnitok: text, images and audio in one token space, and one decoder LM trained on it.

Subpackages: ``tokenizers`` (token layout, text / image / audio tokenizers, the multimodal tokenizer), ``data``
(documents, corpus readers, shards, the training stream), ``model``, ``train``, ``eval``. The ``omnitok`` command
is ``omnitok.cli``.
"""

__version__ = "0.1.0"
