"""``omnitok tokenize``: corpora -> WebDataset token shards, with nothing lost and nothing done twice.

Stages: the readers enumerate items in a fixed order (``readers.py``); this process keeps item ``i`` when
``i % num_parts == part``; worker processes load and preprocess media (decode, EXIF, resize; decode, mix,
resample), in order; the main process encodes batches of documents with the tokenizers (on the GPU when there is
one) and the writer fills shards of ``shard_size`` samples. Output depends on none of the number of workers, the
batch size or interruptions: samples are written in item order, shard boundaries fall every ``shard_size`` good
samples, and tars are byte-deterministic.

Resume: the manifest is rewritten after each complete shard with the index of the last item that shard covers;
rerunning the same command skips to the next item, drops error records past that point and ends with exactly the
shards of an uninterrupted run. A different command on the same directory is refused.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omnitok.data.readers import Item, read_inputs
from omnitok.data.shards import ERRORS, FORMAT, MANIFEST, VERSION, ShardWriter, read_manifest, sample_meta
from omnitok.distributed import launched_part
from omnitok.document import Audio, Conversation, Document, Image, Text, Turn
from omnitok.errors import OmnitokError
from omnitok.jsonfile import cut_jsonl, write_json_atomic
from omnitok.tokenizers.layout import LAYOUT_FILE, TOKEN_KINDS, Modality, TokenLayout
from omnitok.tokenizers.multimodal import ID_DTYPE, LOSS_ON, MultimodalTokenizer


@dataclass
class TokenizeConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    workers: int = 2
    batch_size: int = 16
    shard_size: int = 1000
    pair_order: str = "caption-first"
    seed: int = 0
    num_parts: int = 1
    part: int = 0
    loss_on: str = "assistant"  # which ids of a conversation are trained: the assistant's turns, or all

    def __post_init__(self) -> None:
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise OmnitokError(f"--part must be in [0, {self.num_parts}), got {self.part}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise OmnitokError("--shard-size and --batch-size must be at least 1, --workers at least 0")
        if self.loss_on not in LOSS_ON:
            raise OmnitokError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")

    def identity(self) -> dict:
        """What decides the output; a resumed run must match it exactly (workers and batch size do not count)."""
        d = asdict(self)
        for k in ("workers", "batch_size", "out"):
            d.pop(k)
        if d["loss_on"] == "assistant":  # the default is left out, as in settings written before conversations
            d.pop("loss_on")
        d["tokenizer"] = str(Path(self.tokenizer).resolve())
        return d


@dataclass
class Preprocessor:
    """What a worker needs to prepare media: sizes and rates only, no models (cheap to send to processes)."""

    image: dict | None  # ImagePreprocessConfig fields and the downsampling factor
    audio: tuple[int, int] | None  # sample rate, channels

    def __call__(self, job: tuple[int, Item]) -> tuple[int, Item, Document | Conversation | None, str | None]:
        index, item = job
        if item.error is not None:
            return index, item, None, item.error
        try:
            return index, item, self.prepare(item.doc), None
        except OmnitokError as e:
            return index, item, None, str(e)
        except Exception as e:  # a worker must never take the job down; the item is recorded with the reason
            return index, item, None, f"unexpected {type(e).__name__}: {e}"

    def prepare(self, doc: Document | Conversation) -> Document | Conversation:
        """The document (or each turn of the conversation) with its media read and preprocessed."""
        if isinstance(doc, Conversation):
            return Conversation([Turn(t.role, self.segments(t.segments)) for t in doc.turns], doc.id)
        segments = self.segments(doc.segments)
        if not any(not isinstance(s, Text) or s.text for s in segments):
            raise OmnitokError("empty document")
        return Document(segments, doc.id)

    def segments(self, given: list) -> list:
        from omnitok.tokenizers.audio import load_audio
        from omnitok.tokenizers.image import ImagePreprocessConfig, prepare_image

        segments = []
        for seg in given:
            if isinstance(seg, Text):
                if not isinstance(seg.text, str):
                    raise OmnitokError("text segment is not a string")
                segments.append(seg)
            elif isinstance(seg, Image):
                if self.image is None:
                    raise OmnitokError("document has an image but the tokenizer has no image tokenizer")
                cfg = ImagePreprocessConfig(**{k: v for k, v in self.image.items() if k != "multiple"})
                segments.append(Image(prepare_image(seg.source, cfg, self.image["multiple"])))
            elif isinstance(seg, Audio):
                if self.audio is None:
                    raise OmnitokError("document has audio but the tokenizer has no audio tokenizer")
                rate, channels = self.audio
                segments.append(Audio((load_audio(seg.source, rate, channels), rate)))
        return segments


def _reason(message: str, item: Item) -> str:
    """A short, countable reason: the message without the file it names first and without the details in brackets
    after it. The names are the item's own media paths and source (matched exactly, so paths with spaces are cut
    whole), else a ``<bytes>``-style name or a space-free path."""
    names = [str(seg.source) for seg in (item.doc.segments if item.doc is not None else [])
             if isinstance(seg, Image | Audio) and isinstance(seg.source, str | Path)] + [item.source]
    for name in sorted(names, key=len, reverse=True):
        if message.startswith(name + ": "):
            text = message[len(name) + 2:]
            break
    else:
        text = re.sub(r"^(<\w+>|\S*[/.\\]\S*): ", "", message)
    return re.sub(r"\s*\(.*\)$", "", text).split(";")[0].strip() or "error"


def _token_counts(layout: TokenLayout, ids: np.ndarray) -> dict[str, int]:
    kinds = np.bincount(layout.modality_of(ids), minlength=len(Modality))
    return {m: int(kinds[Modality[m.upper()]]) for m in TOKEN_KINDS}


def _part_from_env(cfg: TokenizeConfig) -> TokenizeConfig:
    """Under torchrun / deepspeed, RANK and WORLD_SIZE choose the part when --num-parts is not given."""
    launched = launched_part()
    if cfg.num_parts == 1 and launched is not None:
        cfg.part, cfg.num_parts = launched
    return cfg


def tokenize(cfg: TokenizeConfig, command: str | None = None) -> dict:
    """Run (or resume) a tokenization; returns the final manifest."""
    cfg = _part_from_env(cfg)
    pool = _worker_pool(cfg.workers)  # before any model is loaded: forked workers then share no CUDA state
    try:
        return _tokenize(cfg, command, pool)
    finally:
        if pool is not None:
            pool.terminate()


def _worker_pool(workers: int):
    """Worker processes, forked where the platform allows (instant: they inherit the imported modules) and
    spawned elsewhere."""
    if workers == 0:
        return None
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


def _tokenize(cfg: TokenizeConfig, command: str | None, pool) -> dict:
    tok = MultimodalTokenizer.from_dir(cfg.tokenizer)
    out = Path(cfg.out)
    if (out / LAYOUT_FILE).is_file():  # refuse before any work
        TokenLayout.load(out / LAYOUT_FILE).check_same(tok.layout, f"the tokenizer {cfg.tokenizer}", str(out))
    elif out.exists() and any(out.iterdir()):
        raise OmnitokError(f"{out} is not empty and holds no shard set")
    out.mkdir(parents=True, exist_ok=True)
    tok.layout.save(out / LAYOUT_FILE)

    manifest = _start_manifest(out, cfg, tok, command)
    if manifest["complete"]:
        tqdm.write(f"{out} is already complete ({manifest['samples']} samples)")
        return manifest
    resume_after = manifest["items_done"]
    errors = _restore_errors(out, resume_after)
    for stale in out.glob("*.tar.tmp"):
        stale.unlink()

    image = None
    if tok.image is not None:
        image = {**asdict(tok.image.preprocess_config), "multiple": tok.image.downsample}
    audio = (tok.audio.sample_rate, tok.audio.channels) if tok.audio is not None else None
    prepare = Preprocessor(image, audio)
    writer = ShardWriter(out, cfg.shard_size, next_index=len(manifest["shards"]))

    def jobs() -> Iterator[tuple[int, Item]]:
        for index, item in enumerate(read_inputs(cfg.inputs, cfg.pair_order, cfg.seed)):
            if index % cfg.num_parts == cfg.part and index > resume_after:
                yield index, item

    start, samples, tokens = time.time(), 0, 0
    last_index = resume_after
    error_file = open(out / ERRORS, "a")  # noqa: SIM115 (closed in finally)
    try:
        prepared = pool.imap(prepare, jobs(), chunksize=4) if pool else map(prepare, jobs())
        progress = tqdm(prepared, desc="tokenize", unit="item")
        batch: list[tuple[int, Item, Document]] = []

        def record_error(index: int, item: Item, message: str) -> None:
            entry = {"item": index, "key": item.key, "source": item.source, "error": message,
                     "reason": _reason(message, item)}
            errors.append(entry)
            error_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            error_file.flush()

        def encode_all(docs: list) -> list:
            """Documents and conversations of one batch, each kind batched through the tokenizers once."""
            convs = [d for d in docs if isinstance(d, Conversation)]
            plain = iter(tok.encode_batch([d for d in docs if not isinstance(d, Conversation)]))
            chats = iter(tok.encode_conversations(convs, cfg.loss_on) if convs else [])
            return [next(chats) if isinstance(d, Conversation) else next(plain) for d in docs]

        def encode(batch: list[tuple[int, Item, Document | Conversation]]) -> None:
            nonlocal samples, tokens
            try:
                encoded = encode_all([doc for _, _, doc in batch])
            except OmnitokError:  # find the document that broke the batch; keep the others
                encoded = []
                for index, item, doc in batch:
                    try:
                        encoded.extend(encode_all([doc]))
                    except OmnitokError as e:
                        record_error(index, item, str(e))
                        encoded.append(None)
            for (index, item, _), enc in zip(batch, encoded):
                if enc is None:
                    continue
                counts = _token_counts(tok.layout, enc.ids)
                finished = writer.add(item.key, enc.ids, sample_meta(enc, item.source), counts)
                samples, tokens = samples + 1, tokens + len(enc.ids)
                if finished is not None:
                    _shard_done(out, manifest, finished, index, errors)

        for index, item, doc, error in progress:
            last_index = index
            if error is not None:
                record_error(index, item, error)
            else:
                batch.append((index, item, doc))
                if len(batch) >= cfg.batch_size:
                    encode(batch)
                    batch = []
            elapsed = max(time.time() - start, 1e-9)
            progress.set_postfix(samples_s=f"{samples / elapsed:.1f}", tokens_s=f"{tokens / elapsed:.0f}",
                                 errors=len(errors))
        if batch:
            encode(batch)
        final = writer.flush()
        if final is not None:
            _shard_done(out, manifest, final, last_index, errors)
        manifest["items_done"] = max(manifest["items_done"], last_index)
        manifest["complete"] = True
        _update_errors(manifest, errors)
        manifest["seconds"] = round(manifest.get("seconds", 0.0) + time.time() - start, 2)
        write_json_atomic(out / MANIFEST, manifest)
    finally:
        error_file.close()
    return manifest


def _start_manifest(out: Path, cfg: TokenizeConfig, tok: MultimodalTokenizer, command: str | None) -> dict:
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("settings") != cfg.identity():
            raise OmnitokError(f"{out} was made by a different command (inputs, tokenizer, parts, shard size or "
                               "pair order differ); choose a new --out or rerun the original command")
        return manifest
    return {"format": FORMAT, "version": VERSION, "dtype": np.dtype(ID_DTYPE).name,
            "tokenizer": {"fingerprints": dict(tok.layout.fingerprints), "vocab_size": tok.layout.vocab_size},
            "settings": cfg.identity(), "command": command or "", "complete": False, "items_done": -1,
            "shards": [], "samples": 0, "tokens": {m: 0 for m in TOKEN_KINDS}, "errors": {}, "error_count": 0}


def _restore_errors(out: Path, resume_after: int) -> list[dict]:
    """Error records up to the resume point; later ones are rewritten by this run."""
    return cut_jsonl(out / ERRORS, "item", resume_after)


def _update_errors(manifest: dict, errors: list[dict]) -> None:
    counted = [e for e in errors if e["item"] <= manifest["items_done"]]
    manifest["errors"] = dict(Counter(e["reason"] for e in counted))
    manifest["error_count"] = len(counted)


def _shard_done(out: Path, manifest: dict, entry: dict, last_item: int, errors: list[dict]) -> None:
    entry["last_item"] = last_item
    manifest["shards"].append(entry)
    manifest["samples"] += entry["samples"]
    for m, n in entry["tokens"].items():
        manifest["tokens"][m] = manifest["tokens"].get(m, 0) + n
    manifest["items_done"] = last_item
    _update_errors(manifest, errors)
    write_json_atomic(out / MANIFEST, manifest)


def summary(manifest: dict, out: str) -> str:
    reasons = sorted(manifest["errors"].items(), key=lambda kv: -kv[1])
    return "\n".join([
        f"shards written to {out}: {manifest['samples']} samples in {len(manifest['shards'])} shards "
        f"({manifest.get('seconds', 0):.1f} s)",
        "tokens: " + ", ".join(f"{m} {manifest['tokens'].get(m, 0)}" for m in TOKEN_KINDS),
        f"errors: {manifest['error_count']}" + (" (" + ", ".join(f"{n} {r}" for r, n in reasons) + ")"
                                               if reasons else "") + f"; details in {out}/{ERRORS}",
    ])


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["omnitok", *sys.argv[1:]])
