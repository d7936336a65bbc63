from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import pytest

from omnitok.tokenizers.text import TextTokenizer
from omnitok.train.text_tokenizer import TextTokenizerTrainConfig, train_text_tokenizer


def stdlib_docstrings(max_modules: int = 120) -> list[str]:
    """Real English text with code in it: docstrings of the Python standard library."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_modules]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stdlib_docstrings.txt"
    path.write_text("\n".join(stdlib_docstrings()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory, stdlib_corpus) -> Path:
    out = tmp_path_factory.mktemp("sp") / "text"
    train_text_tokenizer([stdlib_corpus], out, TextTokenizerTrainConfig(vocab_size=1000))
    return out


@pytest.fixture(scope="session")
def sp_tok(sp_dir) -> TextTokenizer:
    return TextTokenizer.from_dir(sp_dir)
