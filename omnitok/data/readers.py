"""Corpus readers: every input spec becomes a stream of ``Item``s (a stable key, a ``Document``, where it came from).

Specs (``omnitok tokenize --input``):
- ``docs.jsonl``: one interleaved document a line, ``[{"text": ...}, {"image": path}, {"audio": path}]`` or
  ``{"id": ..., "segments": [...]}`` (OBELICS / MMC4 shape), paths relative to the file; or one pair a line,
  ``{"image": path, "text"|"caption": ...}`` / ``{"audio": path, ...}``;
- ``pairs.csv``: the same pair columns;
- a directory: media files with a same-stem ``.txt`` caption (or ``.json`` with ``text``/``caption``);
- WebDataset tars as img2dataset and audio datasets write them (``jpg``/``png``/``webp`` or ``wav``/``flac``/...
  with ``txt``/``json``): a local path, a brace pattern (``data/{000..009}.tar``) or a ``pipe:`` command;
- conversations (instruction tuning): JSONL lines with ``messages`` (the Hugging Face / OpenAI form) or
  ``conversations`` (LLaVA / ShareGPT), media paths relative to the file; in a tar, a sample whose ``json`` member
  holds either form, its media references naming the sample's members by extension (``{"type": "image", "image":
  "jpg"}``, ``"0.png"``), and ShareGPT's ``<image>`` / ``<audio>`` placeholders standing for the sample's media
  members in name order when the record lists none.

Pairs become documents in the chosen order: ``caption-first`` (text-to-media), ``media-first`` (captioning), or
``both``, each pair drawn one way or the other by a hash of its key and the seed (as AnyGPT renders pairs both
ways). Lines that cannot be parsed become ``Item``s with an ``error``, never silent drops.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from omnitok.data.media import media_kind, media_under
from omnitok.data.shards import open_tar
from omnitok.document import Audio, Conversation, Document, Image, Text, Turn
from omnitok.errors import OmnitokError
from omnitok.jsonfile import parse_json

PAIR_ORDERS = ("caption-first", "media-first", "both")


@dataclass
class Item:
    key: str
    source: str  # file and line / member, for records and errors
    doc: Document | Conversation | None = None
    error: str | None = None


def make_key(source: str, readable: str | None = None) -> str:
    """A WebDataset-safe key (no dots, which split key from extension) for the item at ``source`` (file and line,
    tar and member, or media path, as the input was given): unique because it hashes where the item is, not what it
    is called (two ``docs.jsonl`` in different folders, or two lines with the same ``id``, get different keys). The
    front is ``readable`` (default: ``source``) cut to fit; the 80-bit hash keeps chance collisions below 1e-6 even
    among 10^9 items."""
    front = re.sub(r"[^A-Za-z0-9_-]+", "_", readable if readable is not None else source).strip("_")[-60:]
    return f"{front}-{hashlib.sha1(source.encode()).hexdigest()[:20]}"


def pair_document(key: str, media: Image | Audio, caption: str, order: str, seed: int) -> Document:
    if order == "both":
        flip = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest(), 16) % 2
        order = "caption-first" if flip else "media-first"
    segments = [Text(caption), media] if order == "caption-first" else [media, Text(caption)]
    return Document(segments, key)


def _media(kind: str, value) -> Image | Audio:
    return Image(value) if kind == "image" else Audio(value)


def _pair_from_record(record: dict, base: Path) -> tuple[str, str, str] | None:
    """``(kind, media path, caption)`` of a pair record, or None when the record is not a pair."""
    kind = "image" if "image" in record else "audio" if "audio" in record else None
    caption = record.get("text", record.get("caption"))
    if kind is None or not isinstance(caption, str) or not isinstance(record[kind], str):
        return None
    path = record[kind] if "://" in record[kind] else str(base / record[kind])
    return kind, path, caption


def _parse_record(record: Any, base: Path) -> Callable[[], Document | Conversation] | None:
    """How to read a JSONL record that is a document or a conversation (None for anything else, e.g. a pair)."""
    if isinstance(record, dict) and "messages" in record:  # the Hugging Face / OpenAI chat form
        return lambda: Conversation.from_messages(record["messages"], base)
    if isinstance(record, dict) and "conversations" in record:  # the LLaVA / ShareGPT form
        return lambda: Conversation.from_sharegpt(record, base)
    if isinstance(record, list) or (isinstance(record, dict) and "segments" in record):
        return lambda: Document.from_json(record, base_dir=base)
    return None


def read_jsonl(path: Path, order: str, seed: int) -> Iterator[Item]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            source = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                record = parse_json(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield Item(make_key(source), source, error="line is not UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield Item(make_key(source), source, error=f"line is not JSON ({e.msg})")
                continue
            doc_id = record.get("id") if isinstance(record, dict) else None
            key = make_key(source, f"{path.stem}/{doc_id}" if doc_id is not None else None)
            parsed = _parse_record(record, path.parent)
            if parsed is not None:
                try:
                    doc = parsed()
                except OmnitokError as e:
                    yield Item(key, source, error=str(e))
                    continue
                doc.id = key
                yield Item(key, source, doc)
                continue
            pair = _pair_from_record(record, path.parent) if isinstance(record, dict) else None
            if pair is None:
                yield Item(key, source, error="neither a document (list of segments) nor a pair (image or audio "
                                               "with text or caption)")
                continue
            kind, media, caption = pair
            yield Item(key, source, pair_document(key, _media(kind, media), caption, order, seed))


def read_csv(path: Path, order: str, seed: int) -> Iterator[Item]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise OmnitokError(f"{path} is not UTF-8 text") from None
    for n, row in enumerate(rows, 2):
        source = f"{path}:{n}"
        key = make_key(source)
        pair = _pair_from_record({k: v for k, v in row.items() if v}, path.parent)
        if pair is None:
            yield Item(key, source, error="row needs an image or audio column and a text or caption column")
            continue
        kind, media, caption = pair
        yield Item(key, source, pair_document(key, _media(kind, media), caption, order, seed))


def _caption_of(stem: Path) -> tuple[str | None, str | None]:
    """The caption beside a media file, or (None, reason)."""
    txt, js = stem.with_suffix(".txt"), stem.with_suffix(".json")
    try:
        if txt.is_file():
            return txt.read_bytes().decode("utf-8").strip(), None
        if js.is_file():
            record = parse_json(js.read_bytes().decode("utf-8"))
            caption = record.get("text", record.get("caption")) if isinstance(record, dict) else None
            return (caption, None) if isinstance(caption, str) else (None, f"{js.name} has no text or caption")
    except UnicodeDecodeError:
        return None, "caption is not UTF-8"
    except json.JSONDecodeError:
        return None, "caption JSON is not valid"
    return None, "no same-stem .txt or .json caption"


def read_folder(path: Path, order: str, seed: int) -> Iterator[Item]:
    for media in media_under(path):
        source = str(media)
        key = make_key(source, str(media.relative_to(path.parent)))
        caption, problem = _caption_of(media.with_suffix(""))
        if caption is None:
            yield Item(key, source, error=problem)
            continue
        yield Item(key, source, pair_document(key, _media(media_kind(media.name), str(media)), caption, order, seed))


def _tar_location(url: str) -> str:
    """Where a tar is: its path, or for ``pipe:COMMAND`` the last word of the command that names a ``.tar`` (so
    ``pipe:cat x.tar`` and ``x.tar`` give the same keys); the whole command when none does."""
    if not url.startswith("pipe:"):
        return url
    named = [w for w in url[len("pipe:"):].split() if ".tar" in w]
    return named[-1] if named else url


def read_tar(url: str, order: str, seed: int) -> Iterator[Item]:
    """Samples of a WebDataset tar: members grouped by key (the name up to the first dot after the last slash)."""
    location = _tar_location(url)
    name = Path(location).stem

    def finish(key: str, parts: dict[str, bytes], problem: str | None) -> Item:
        source = f"{url}:{key}"
        item_key = make_key(f"{location}:{key}", f"{name}/{key}")
        if problem is not None:
            return Item(item_key, source, error=problem)
        media = next(((kind, data) for ext, data in parts.items() if (kind := media_kind(ext))), None)
        caption = parts.get("txt")
        if caption is None and "json" in parts:
            try:
                record = parse_json(parts["json"].decode("utf-8"))
                if isinstance(record, dict) and ("messages" in record or "conversations" in record):
                    return Item(item_key, source, _tar_conversation(record, parts, item_key))
                caption = record.get("text", record.get("caption")) if isinstance(record, dict) else None
                caption = caption.encode() if isinstance(caption, str) else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                return Item(item_key, source, error="json member is not valid UTF-8 JSON")
            except OmnitokError as e:
                return Item(item_key, source, error=str(e))
        if media is None or caption is None:
            return Item(item_key, source, error="sample needs an image or audio member and a txt or json caption")
        try:
            text = caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            return Item(item_key, source, error="caption is not UTF-8")
        return Item(item_key, source, pair_document(item_key, _media(*media), text, order, seed))

    # a sample's members lie together; a key that comes back after another sample, or a member name twice in one
    # sample (a.txt twice, a.jpg and a.JPG) leaves which file is meant unknown: the sample is recorded, not written
    # (a key twice in the output would make the whole shard unreadable)
    current, parts, problem, seen = None, {}, None, set()
    try:
        with open_tar(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                prefix = member.name[: len(member.name) - len(base)]
                key, _, ext = base.partition(".")
                key, ext = prefix + key, ext.lower()
                if key != current:
                    if current is not None:
                        yield finish(current, parts, problem)
                    parts, problem = {}, None
                    if key in seen:
                        problem = ("sample key comes again after other samples (a WebDataset tar holds each "
                                   "sample's members together; its first part was read as the sample)")
                    seen.add(key)
                current = key
                if ext in parts and problem is None:
                    problem = f"two {ext} members in one sample (the second: {member.name})"
                parts[ext] = tar.extractfile(member).read()
        if current is not None:
            yield finish(current, parts, problem)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Item(make_key(f"{url}:broken"), url, error=f"cannot read tar: truncated, corrupt or missing ({e})")


def _tar_conversation(record: dict, parts: dict[str, bytes], key: str) -> Conversation:
    """A conversation from a tar sample's json member, each media reference replaced by the member it names."""
    if "conversations" in record and not any(k in record for k in ("image", "images", "audio", "audios")):
        record = dict(record)
        for kind in ("image", "audio"):  # placeholders stand for the sample's media members in name order
            members = sorted(ext for ext in parts if media_kind(ext) == kind)
            if members:
                record[kind + "s"] = members
    conv = (Conversation.from_messages(record["messages"]) if "messages" in record
            else Conversation.from_sharegpt(record))

    def member(seg):
        if isinstance(seg, Text):
            return seg
        name = str(seg.source).lower()
        if name not in parts or media_kind(name) is None:
            held = ", ".join(sorted(e for e in parts if media_kind(e))) or "none"
            raise OmnitokError(f"conversation refers to member {seg.source!r}, which this sample does not hold "
                               f"(its media members: {held})")
        return type(seg)(parts[name])

    return Conversation([Turn(t.role, [member(s) for s in t.segments]) for t in conv.turns], key)


def read_inputs(specs: list[str], order: str = "caption-first", seed: int = 0) -> Iterator[Item]:
    """All items of all specs, in a fixed order."""
    if order not in PAIR_ORDERS:
        raise OmnitokError(f"pair order must be one of {', '.join(PAIR_ORDERS)}, got {order!r}")
    _refuse_overlaps(specs)
    for spec in specs:
        if spec.startswith("pipe:"):
            yield from read_tar(spec, order, seed)
            continue
        expanded = list(braceexpand(spec))
        for one in expanded:
            path = Path(one)
            if path.is_dir():
                yield from read_folder(path, order, seed)
            elif path.suffix.lower() in (".jsonl", ".ndjson") and path.is_file():
                yield from read_jsonl(path, order, seed)
            elif path.suffix.lower() == ".csv" and path.is_file():
                yield from read_csv(path, order, seed)
            elif path.suffix.lower() == ".tar" and path.is_file():
                yield from read_tar(one, order, seed)
            elif not path.exists():
                raise OmnitokError(f"input {one} does not exist")
            else:
                raise OmnitokError(f"input {one}: expected a .jsonl, .csv, .tar, a directory, or a pipe: URL")



def _refuse_overlaps(specs: list[str]) -> None:
    """An input named twice, or a folder inside another input folder, would put the same items in the shards twice
    (under the same keys): refused before any work."""
    seen: dict[str, str] = {}
    for spec in specs:
        for one in [spec] if spec.startswith("pipe:") else braceexpand(spec):
            where = one if one.startswith("pipe:") else str(Path(one).resolve())
            if where in seen:
                raise OmnitokError(f"input {one} is given twice (also as {seen[where]})")
            seen[where] = one
    folders = sorted((Path(w), one) for w, one in seen.items() if not w.startswith("pipe:") and Path(w).is_dir())
    for (a, a_spec), (b, b_spec) in zip(folders, folders[1:]):
        if a in b.parents:
            raise OmnitokError(f"input folder {b_spec} is inside input folder {a_spec}: its files would be read twice")
