"""``omnitok text-tokenizer train``: SentencePiece BPE with byte fallback on plain text or JSONL files.

Settings follow Llama's tokenizer (BPE, byte fallback, digits split, whitespace-only pieces allowed) with the
identity normaliser and no whitespace folding, so that ``decode(encode(s)) == s`` for every string: a tokenizer
that rewrites text would make the model learn a different corpus from the one given.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from omnitok.errors import OmnitokError
from omnitok.jsonfile import parse_json, write_json_atomic
from omnitok.tokenizers.text import TextTokenizer, _SentencePiece

REPORT_FILE = "train_report.json"


@dataclass
class TextTokenizerTrainConfig:
    vocab_size: int
    character_coverage: float = 0.9995  # SentencePiece's default; rarer characters fall back to bytes
    max_sentences: int = 2_000_000  # lines SentencePiece samples for training (it reservoir-samples past this)
    max_line_bytes: int = 65536
    sample_lines: int = 5000  # lines kept for the statistics printed at the end
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise OmnitokError(f"vocab size {self.vocab_size} is too small: byte fallback alone needs 259 pieces")
        if not 0 < self.character_coverage <= 1:
            raise OmnitokError(f"character coverage must be in (0, 1], got {self.character_coverage}")


@dataclass
class CorpusCounts:
    files: int = 0
    bytes: int = 0
    lines: int = 0
    characters: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def read_corpus(paths: list[Path], counts: CorpusCounts, max_line_bytes: int, progress: tqdm) -> Iterator[str]:
    """Yield training lines from plain text files (one line each) and JSONL files (the ``text`` field of each
    record, split into lines). Lines that are not UTF-8, not JSON, lack a text field or are too long are skipped
    and counted in ``counts.skipped`` by reason."""
    for path in paths:
        counts.files += 1
        jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
        with open(path, "rb") as f:
            for raw in f:
                counts.bytes += len(raw)
                progress.update(len(raw))
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    counts.skip("not UTF-8")
                    continue
                if not jsonl:
                    lines = [line.rstrip("\r\n")]
                else:
                    if not line.strip():
                        continue
                    try:
                        record = parse_json(line)
                    except json.JSONDecodeError:
                        counts.skip("not JSON")
                        continue
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        counts.skip("no text field")
                        continue
                    lines = record["text"].split("\n")
                for text in lines:
                    if not text:
                        continue
                    if len(text.encode("utf-8")) > max_line_bytes:
                        counts.skip(f"line over {max_line_bytes} bytes")
                        continue
                    counts.lines += 1
                    counts.characters += len(text)
                    yield text


def train_text_tokenizer(inputs: list[str | Path], out: str | Path,
                         config: TextTokenizerTrainConfig) -> tuple[TextTokenizer, dict]:
    """Train a tokenizer on ``inputs``, save it as an omnitok text tokenizer directory in ``out``, and return it
    with its report (corpus counts, vocabulary and coverage statistics), also written to ``out/train_report.json``.
    """
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise OmnitokError(f"input file not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                    if len(missing) > 1 else ""))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OmnitokError(f"{out} is not empty; choose a new directory for the tokenizer")

    counts = CorpusCounts()
    rng = random.Random(config.seed)
    sample: list[str] = []

    def lines_with_sample() -> Iterator[str]:
        for i, line in enumerate(read_corpus(paths, counts, config.max_line_bytes, progress)):
            if len(sample) < config.sample_lines:  # reservoir sample for the statistics
                sample.append(line)
            elif (j := rng.randrange(i + 1)) < config.sample_lines:
                sample[j] = line
            yield line

    model = io.BytesIO()
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading corpus", leave=False) as progress:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines_with_sample(), model_writer=model,
                model_type="bpe", vocab_size=config.vocab_size, byte_fallback=True,
                character_coverage=config.character_coverage, split_digits=True, allow_whitespace_only_pieces=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                input_sentence_size=config.max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=1000000,
                max_sentence_length=config.max_line_bytes, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                num_threads=os.cpu_count() or 1, minloglevel=2,
            )
        except RuntimeError as e:
            raise OmnitokError(_explain_sentencepiece_error(str(e), counts, config.vocab_size)) from None
    if counts.lines == 0:
        raise OmnitokError("the corpus holds no usable text" + _skips(counts))

    tok = TextTokenizer(_SentencePiece(model.getvalue(), "trained model"))
    tok.save(out)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    report = {"corpus": asdict(counts), "config": asdict(config), **_statistics(sp, sample)}
    write_json_atomic(out / REPORT_FILE, report)
    return tok, report


def _skips(counts: CorpusCounts) -> str:
    if not counts.skipped:
        return ""
    return " (skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.skipped.items())) + ")"


def _explain_sentencepiece_error(message: str, counts: CorpusCounts, vocab_size: int) -> str:
    if counts.lines == 0 or "sentences_.empty()" in message:
        return "the corpus holds no usable text" + _skips(counts)
    if m := re.search(r"value <= (\d+)", message):
        return f"vocab size {vocab_size} is too large for this corpus: it supports at most {m.group(1)} pieces"
    if m := re.search(r"required_chars\. (\d+) vs (\d+)", message):
        return (f"vocab size {vocab_size} is smaller than the {m.group(2)} characters and special pieces the corpus "
                "needs; raise --vocab-size or lower --character-coverage")
    return f"SentencePiece training failed: {message}"


def _statistics(sp: spm.SentencePieceProcessor, sample: list[str]) -> dict:
    """Vocabulary make-up, and coverage / compression measured on a sample of the training lines."""
    size = sp.get_piece_size()
    kinds = Counter("byte" if sp.is_byte(i) else "control" if sp.is_control(i) else "unknown" if sp.is_unknown(i)
                    else "normal" for i in range(size))
    normal = [sp.id_to_piece(i) for i in range(size) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    ids = sp.encode(sample)
    tokens = sum(len(x) for x in ids)
    byte_tokens = sum(sp.is_byte(i) for x in ids for i in x)
    chars = Counter(ch for line in sample for ch in line)
    unk = sp.unk_id()

    def has_piece(ch: str) -> bool:
        return sp.piece_to_id("\u2581" if ch == " " else ch) != unk

    covered = {ch for ch in chars if has_piece(ch)}
    n_chars = sum(chars.values())
    return {
        "vocabulary": {
            "size": size, **{f"{k}_pieces": v for k, v in sorted(kinds.items())},
            "mean_piece_chars": round(sum(len(p) for p in normal) / max(len(normal), 1), 2),
            "longest_piece": max(normal, key=len, default=""),
        },
        "sample": {
            "lines": len(sample), "characters": n_chars, "tokens": tokens,
            "chars_per_token": round(n_chars / max(tokens, 1), 3),
            "byte_fallback_token_fraction": round(byte_tokens / max(tokens, 1), 5),
            "distinct_characters": len(chars), "distinct_characters_in_vocab": len(covered),
            "character_coverage": round(sum(chars[c] for c in covered) / max(n_chars, 1), 6),
        },
    }


def format_report(report: dict, out: Path) -> str:
    corpus, vocab, sample = report["corpus"], report["vocabulary"], report["sample"]
    lines = [
        f"text tokenizer written to {out}",
        f"  corpus      {corpus['files']} files, {corpus['lines']} lines, {corpus['characters']} characters"
        + (_skips(CorpusCounts(skipped=corpus["skipped"])) or ", nothing skipped"),
        f"  vocabulary  {vocab['size']} pieces: {vocab.get('normal_pieces', 0)} learned, "
        f"{vocab.get('byte_pieces', 0)} byte fallback, "
        f"{vocab.get('control_pieces', 0) + vocab.get('unknown_pieces', 0)} control; "
        f"mean piece {vocab['mean_piece_chars']} chars, longest {vocab['longest_piece']!r}",
        f"  coverage    {sample['character_coverage']:.4%} of characters have a piece "
        f"({sample['distinct_characters_in_vocab']}/{sample['distinct_characters']} distinct); "
        f"{sample['byte_fallback_token_fraction']:.3%} of tokens are byte fallback",
        f"  compression {sample['chars_per_token']} characters per token (on {sample['lines']} sampled lines)",
    ]
    return "\n".join(lines)
