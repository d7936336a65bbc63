import argparse
import re
import subprocess
import sys
from pathlib import Path

import tokenizers

import omnitok.tokenizers
from omnitok.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_import_tokenizers_is_hugging_face_not_ours():
    # Our subpackage is omnitok.tokenizers; a top-level `tokenizers` must stay Hugging Face's, which transformers
    # imports (ARCHITECTURE.md, Package).
    assert hasattr(tokenizers, "Tokenizer") and hasattr(tokenizers, "pre_tokenizers")
    assert Path(tokenizers.__file__).parent != Path(omnitok.tokenizers.__file__).parent
    assert "omnitok" not in Path(tokenizers.__file__).parts
    # The same holds in a fresh interpreter started from the repository root, where a stray tokenizers/ would win.
    out = subprocess.run([sys.executable, "-c", "import tokenizers, transformers; print(tokenizers.Tokenizer)"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert "tokenizers.Tokenizer" in out.stdout


def _subcommands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(sub, (*prefix, name))


def test_every_subcommand_has_help():
    commands = list(_subcommands(build_parser()))
    assert ("text-tokenizer", "train") in commands and ("tokenizer", "assemble") in commands
    top = subprocess.run([sys.executable, "-m", "omnitok", "--help"], capture_output=True, text=True, check=True)
    for command in commands:
        if len(command) == 1:
            assert command[0] in top.stdout
        out = subprocess.run([sys.executable, "-m", "omnitok", *command, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("usage: omnitok " + " ".join(command)), command


def test_wrong_usage_is_one_line():
    out = subprocess.run([sys.executable, "-m", "omnitok", "tokenizer", "assemble", "--text"], capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "omnitok tokenizer assemble: error: argument --text: expected one argument "
        "(see omnitok tokenizer assemble --help)"]
    out = subprocess.run([sys.executable, "-m", "omnitok", "tokenizer", "info", "/nonexistent"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr == "omnitok: error: no token layout at /nonexistent\n"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(pip install torch==2\.13\.0 && .*pytest.*)$", readme, re.M)
    assert len(commands) == 1, "the README names exactly one test command"
    assert commands[0] in ci.splitlines()


def test_the_public_names_import_and_media_tokenizers_load_lazily():
    """ARCHITECTURE.md, Package: the names it lists import from omnitok.tokenizers; the media tokenizers' model code
    loads only when one of them is first used."""
    code = ("import sys, omnitok.tokenizers as t; before = 'omnitok.tokenizers.image' in sys.modules or "
            "'omnitok.tokenizers.audio' in sys.modules; "
            "from omnitok.tokenizers import ImageTokenizer, AudioTokenizer, TokenLayout, TextTokenizer, "
            "MultimodalTokenizer; print(before, ImageTokenizer.__module__, AudioTokenizer.__module__, "
            "sorted(set(t.__all__) - set(dir(t)) - {'ImageTokenizer', 'AudioTokenizer'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "omnitok.tokenizers.image", "omnitok.tokenizers.audio", "[]"]
