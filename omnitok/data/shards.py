"""The shard format (docs/ARCHITECTURE.md, Shards): WebDataset tars with ``layout.json`` and ``manifest.json``.

Each sample is ``KEY.tokens.npy`` (1-D ids, dtype in the manifest) and ``KEY.meta.json`` (source, segment spans),
so any plain ``webdataset`` reader reads them. Tars are written byte-deterministically (fixed member metadata) under
a temporary name and renamed when complete; a shard counts only once the manifest lists it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnitok.errors import OmnitokError, disk_full
from omnitok.jsonfile import parse_json, read_json_object, write_json_atomic
from omnitok.tokenizers.layout import LAYOUT_FILE, TOKEN_KINDS, TokenLayout

MANIFEST, ERRORS = "manifest.json", "errors.jsonl"
FORMAT, VERSION = "omnitok.shards", 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def encode_sample(tokens: np.ndarray, meta: dict[str, Any]) -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue(), json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()


@dataclass
class ShardWriter:
    """Collects samples and writes them ``shard_size`` at a time: ``shard-N.tar.tmp`` then renamed."""

    directory: Path
    shard_size: int
    layout: TokenLayout  # what the manifest entry's token counts by kind are counted with
    next_index: int = 0
    pending: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, tokens: np.ndarray, meta: dict[str, Any]) -> dict | None:
        """Add a sample; returns the finished shard's manifest entry when this sample completes one."""
        self.pending.append((key, *encode_sample(tokens, meta)))
        self.counts.update(self.layout.token_counts(tokens))
        return self.flush() if len(self.pending) >= self.shard_size else None

    def flush(self) -> dict | None:
        if not self.pending:
            return None
        name = shard_name(self.next_index)
        tmp = self.directory / (name + ".tmp")
        try:
            with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
                for key, tokens, meta in self.pending:
                    _member(tar, f"{key}.tokens.npy", tokens)
                    _member(tar, f"{key}.meta.json", meta)
        except Exception as e:
            tmp.unlink(missing_ok=True)  # the space it held is the user's again
            if not disk_full(e, self.directory):
                raise
            raise OmnitokError(f"writing {name} failed: the disk holding {self.directory} is full; the shards before "
                               "it are complete: free space, then rerun the same command to continue") from None
        os.replace(tmp, self.directory / name)
        entry = {"name": name, "samples": len(self.pending), "tokens": {m: self.counts[m] for m in TOKEN_KINDS}}
        self.pending, self.counts, self.next_index = [], Counter(), self.next_index + 1
        return entry


def trained_ranges(mask: np.ndarray) -> list[list[int]]:
    """A sample's loss mask (which ids are trained as targets) as ``[start, stop)`` runs: what ``meta.json`` stores
    under ``"trained"`` for conversations (a sample without it trains every id)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]


def sample_meta(encoded, source: str | None = None) -> dict[str, Any]:
    """``meta.json`` of an encoded document or conversation (``EncodedDocument``): its spans, and for a conversation
    the trained ranges and the requests conditioning dropout may drop (``tokenizers/chat.py``)."""
    meta: dict[str, Any] = {"spans": [[m, int(a), int(b)] for m, a, b in encoded.spans]}
    if source is not None:
        meta["source"] = source
    if encoded.loss is not None:
        meta["trained"] = trained_ranges(encoded.loss)
    if encoded.requests:
        meta["requests"] = [[int(a), int(b), [int(i) for i in r]] for a, b, r in encoded.requests]
    return meta


def trained_mask(ranges: list, length: int) -> np.ndarray:
    """The inverse of ``trained_ranges``; every id when ``ranges`` is None."""
    mask = np.zeros(length, dtype=bool) if ranges is not None else np.ones(length, dtype=bool)
    for start, stop in ranges or []:
        mask[start:stop] = True
    return mask


def write_manifest(directory: Path, shards: list[dict], samples: int) -> None:
    """A complete manifest for shards written outside ``omnitok tokenize`` (synthetic data in tests, benchmarks)."""
    tokens = Counter()
    for shard in shards:
        tokens.update(shard["tokens"])
    write_json_atomic(directory / MANIFEST, {
        "format": FORMAT, "version": VERSION, "dtype": "int32", "complete": True, "shards": shards,
        "samples": samples, "tokens": {m: tokens[m] for m in TOKEN_KINDS}, "errors": {}, "error_count": 0})


def read_manifest(directory: Path) -> dict:
    manifest = read_json_object(directory / MANIFEST, f"{directory} is not a shard directory (no {MANIFEST})")
    if manifest.get("format") != FORMAT:
        raise OmnitokError(f"{directory / MANIFEST} is not an omnitok shard manifest")
    return manifest


@contextlib.contextmanager
def open_tar(url: str) -> Iterator[tarfile.TarFile]:
    """A tar read as a stream: a local path, or ``pipe:COMMAND`` whose output is the tar (object stores). Once the
    caller has read every member, a tar that stops where a member would begin (tarfile takes the end of a copy cut
    short there, or garbage there, for the end of the archive) and a command that failed raise ``tarfile.ReadError``."""
    proc = None
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        raw = proc.stdout
    else:
        raw = open(url, "rb")
    stream = _Recent(raw)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield tar
            plain = getattr(tar.fileobj, "comptype", "tar") == "tar"  # offsets in a compressed one are not the file's
            if plain and stream.block(tar.offset) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError("it ends without tar's end-of-archive block: cut short or damaged")
        if proc is not None:
            while raw.read(1 << 16):  # the padding after the end
                pass
            if proc.wait() != 0:
                raise tarfile.ReadError(f"the command exited with status {proc.returncode}")
    finally:
        raw.close()
        if proc is not None:
            proc.wait()  # a command still writing ends on the closed pipe


class _Recent:
    """A binary stream's reader that keeps its last few reads, so that the block at a position tarfile has just read
    (where it found the archive's end) can be looked at."""

    def __init__(self, raw):
        self.raw, self.pos, self.recent = raw, 0, deque(maxlen=8)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.recent.append((self.pos, data))
        self.pos += len(data)
        return data

    def block(self, offset: int) -> bytes:
        """The 512 bytes from ``offset`` (fewer at the end of the stream; none when no longer held)."""
        if not self.recent or offset < self.recent[0][0]:
            return b""
        held = b"".join(data for _, data in self.recent)
        start = offset - self.recent[0][0]
        return held[start:start + tarfile.BLOCKSIZE]


def read_shard(url: str) -> list[tuple[str, np.ndarray, dict]]:
    """``(key, tokens, meta)`` of every sample of one shard tar, in order.

    Members are grouped by key the way WebDataset groups them (consecutive members sharing the name up to the first
    dot), so no two samples ever merge into one: a key that appears twice is an error naming it, never a silent
    drop. ``tokens.npy`` must be a plain 1-D integer array (no pickled objects) and ``meta.json`` a JSON object."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    try:
        with open_tar(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1][0] != key:
                    if key in seen:
                        raise OmnitokError(f"{url}: sample key {key!r} appears twice; every key in a shard set must "
                                           "be unique (re-make the shards with this omnitok)")
                    seen.add(key)
                    samples.append((key, {}))
                parts = samples[-1][1]
                if ext in parts:
                    raise OmnitokError(f"{url}: sample key {key!r} appears twice (two {ext} members); every key in "
                                       "a shard set must be unique (re-make the shards with this omnitok)")
                parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:  # truncated or damaged in a copy, missing, a pipe that failed
        raise OmnitokError(f"{url}: not a whole shard tar ({getattr(e, 'strerror', None) or e}); copy or re-make "
                           "it") from None
    return [(key, *_decode_sample(url, key, p)) for key, p in samples if "tokens.npy" in p and "meta.json" in p]


def _decode_sample(url: str, key: str, parts: dict[str, bytes]) -> tuple[np.ndarray, dict]:
    try:
        tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays need pickle: refused, as are non-.npy bytes
        raise OmnitokError(f"{url}: sample {key!r}: tokens.npy is not a plain array ({e})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise OmnitokError(f"{url}: sample {key!r}: tokens.npy must be a 1-D integer array, got {tokens.dtype} "
                           f"with shape {tokens.shape}")
    try:
        meta = parse_json(parts["meta.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OmnitokError(f"{url}: sample {key!r}: meta.json is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise OmnitokError(f"{url}: sample {key!r}: meta.json must hold a JSON object")
    return tokens, meta


def iter_samples(directory: Path) -> Iterator[tuple[str, np.ndarray, dict]]:
    """``(key, tokens, meta)`` of every sample of the shards the manifest lists, in order."""
    for shard in read_manifest(directory)["shards"]:
        yield from read_shard(str(directory / shard["name"]))


def shard_stats(directory: Path, plot: Path | None = None) -> tuple[str, list[str]]:
    """The manifest's counts and a token-length histogram (text, and a PNG when ``plot`` is given), every damaged
    shard with why it could not be read, every shard whose samples or tokens are not the manifest's for it (a shard
    from elsewhere copied over it), and every shard whose samples' keys another shard already has (a shard copied
    over another, or the shards of one corpus merged twice: training would read those samples twice).
    Returns the text and its problems in a few words each (none: the set is sound)."""
    manifest = read_manifest(directory)
    damaged, unlike = [], []
    lengths, hashes, owner = array("q"), array("q"), array("q")  # 8 bytes a sample each (a list's int: 36)
    for i, shard in enumerate(manifest["shards"]):
        try:
            samples = read_shard(str(directory / shard["name"]))
        except OmnitokError as e:  # every damaged shard is listed, not only the first
            damaged.append(str(e))
            continue
        sizes = [len(tokens) for _, tokens, _ in samples]
        held, listed = (len(sizes), sum(sizes)), (shard.get("samples"), sum(shard.get("tokens", {}).values()))
        if "samples" in shard and held != listed:  # whole, but not the shard written here
            unlike.append(f"{directory / shard['name']}: holds {held[0]} samples of {held[1]} tokens; the manifest "
                          f"lists {listed[0]} of {listed[1]} (a shard from elsewhere copied over it?)")
        lengths.extend(sizes)
        hashes.extend(hash(key) for key, _, _ in samples)  # collisions are checked on the keys themselves
        owner.extend([i] * len(samples))
    repeated = _repeated_keys(directory, manifest["shards"], np.frombuffer(hashes, np.int64),
                              np.frombuffer(owner, np.int64))
    lengths = np.frombuffer(lengths, np.int64)
    lines = [f"{directory}: {manifest['samples']} samples in {len(manifest['shards'])} shards"
             + ("" if manifest.get("complete") else " (incomplete run)"),
             "tokens: " + ", ".join(f"{m} {manifest['tokens'].get(m, 0)}" for m in TOKEN_KINDS)
             + f" (total {sum(manifest['tokens'].values())})",
             f"errors: {manifest['error_count']}" + ("" if not manifest["errors"] else " ("
             + ", ".join(f"{n} {r}" for r, n in sorted(manifest["errors"].items(), key=lambda kv: -kv[1])) + ")")]
    if damaged:
        lines += [f"damaged shards: {len(damaged)} of {len(manifest['shards'])} (training skips them)", *damaged]
    if unlike:
        lines += [f"shards unlike the manifest: {len(unlike)} of {len(manifest['shards'])}", *unlike]
    if repeated:
        lines += [f"repeated samples: {len(repeated)} of {len(manifest['shards'])} shards hold samples whose keys an "
                  "earlier shard has (training reads them twice: remove the copies, or re-make the set)", *repeated]
    if len(lengths):
        lines.append(f"sample length: min {lengths.min()}, median {int(np.median(lengths))}, mean "
                     f"{lengths.mean():.1f}, max {lengths.max()}")
        counts, edges = np.histogram(lengths, bins=min(12, max(1, len(np.unique(lengths)))))
        width = max(counts.max(), 1)
        for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
            lines.append(f"  {int(lo):>7}-{int(hi):<7} {'#' * max(1 if c else 0, round(40 * c / width))} {c}")
        if plot is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.hist(lengths, bins=40, color="#3b7dd8")
            ax.set(xlabel="tokens per sample", ylabel="samples", title=f"{directory.name}: {len(lengths)} samples")
            fig.tight_layout()
            fig.savefig(plot, dpi=100)
            plt.close(fig)
            lines.append(f"histogram written to {plot}")
    problems = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((len(damaged), "damaged shard"),
                                                                   (len(unlike), "shard unlike the manifest"),
                                                                   (len(repeated), "shard repeating samples")) if n]
    return "\n".join(lines), problems


def _repeated_keys(directory: Path, shards: list[dict], hashes: np.ndarray, owner: np.ndarray) -> list[str]:
    """A line for each shard holding samples whose keys an earlier shard of the set has: only shards whose key
    hashes collide are read again, and their keys compared (a hash collision alone says nothing)."""
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    involved = sorted(set(owner[order[same]].tolist()) | set(owner[order[same + 1]].tolist()))
    first: dict[str, int] = {}
    lines = []
    for i in involved:
        keys = [key for key, _, _ in read_shard(str(directory / shards[i]["name"]))]
        earlier: dict[int, int] = {}
        for key in keys:
            j = first.setdefault(key, i)
            if j != i:
                earlier[j] = earlier.get(j, 0) + 1
        if earlier:
            where = ", ".join(f"{n} of {shards[j]['name']}" for j, n in earlier.items())
            lines.append(f"{directory / shards[i]['name']}: {sum(earlier.values())} of its {len(keys)} samples have "
                         f"the keys of earlier samples ({where}): a shard copied over another, or one corpus merged "
                         "twice?")
    return lines


def _not_whole(path: Path) -> str | None:
    """Why the shard at ``path`` is not whole (missing, cut short), from its size and last bytes alone: ``ShardWriter``
    (tarfile) ends a tar with two zero blocks and pads it to whole 10 KiB records. None when it is whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - 2 * tarfile.BLOCKSIZE, 0))
            tail = f.read()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0 or size % tarfile.RECORDSIZE or tail != bytes(2 * tarfile.BLOCKSIZE):
        return "not a whole shard tar (it does not end as tar ends an archive: cut short)"
    return None


def _same_items(parts: list[Path], manifests: list[dict]) -> str | None:
    """Which two parts tokenized the same items, from their manifests' settings: one part given twice, or two runs
    whose inputs overlap and that are not parts of one split run (``num_parts``). None: no two did (or a manifest
    does not say: a merged set, or an older omnitok's)."""
    runs = [(p, list(s["inputs"]), set(s["inputs"]), s.get("num_parts", 1), s.get("part", 0))
            for p, m in zip(parts, manifests) if "inputs" in (s := m.get("settings") or {})]
    for i, (p, inputs, _, n, part) in enumerate(runs):
        for q, other, other_set, other_n, other_part in runs[:i]:
            if (inputs, n) == (other, other_n):
                if part == other_part:
                    return f"{q} and {p} are the same part ({part + 1} of {n}) of one tokenize run"
            elif shared := next((x for x in inputs if x in other_set), None):
                return f"{q} and {p} both tokenized {shared!r}"
    return None


def merge_shards(out: Path, parts: list[Path]) -> dict:
    """Join the shard directories of parts into one (shards renumbered, hard-linked or copied; manifests and error
    records combined). Every part must have the same token layout and be complete, each of its shards present and
    not cut short, and no two parts may have tokenized the same items (checked before anything is written)."""
    if out.exists() and any(out.iterdir()):
        raise OmnitokError(f"{out} is not empty")
    manifests = [read_manifest(p) for p in parts]
    layouts = [TokenLayout.load(p / LAYOUT_FILE) for p in parts]
    twice = _same_items(parts, manifests)
    if twice:
        raise OmnitokError(f"{twice}: merged, those samples would be in the set twice (a sample's key comes from "
                           "where its item is); merge the parts of one run, or runs over different inputs")
    for p, m, layout in zip(parts, manifests, layouts):
        layouts[0].check_same(layout, str(parts[0]), str(p))
        if not m.get("complete"):
            raise OmnitokError(f"{p} is an incomplete run; finish it (rerun its command) before merging")
        for shard in m["shards"]:  # a bad copy of a part; reading every shard whole would take as long as training
            problem = _not_whole(p / shard["name"])
            if problem:
                raise OmnitokError(f"{p / shard['name']}: {problem}; copy that part again or re-make it (its "
                                   "tokenize command, into a new directory), then merge")
    out.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    errors: Counter = Counter()
    tokens: Counter = Counter()
    with open(out / ERRORS, "w") as err_out:
        for p, m in zip(parts, manifests):
            for shard in m["shards"]:
                target = out / shard_name(index)
                try:
                    os.link(p / shard["name"], target)
                except OSError:
                    shutil.copyfile(p / shard["name"], target)
                shards.append({**shard, "name": target.name, "from": f"{p.name}/{shard['name']}"})
                index += 1
            errors.update(m["errors"])
            tokens.update(m["tokens"])
            if (p / ERRORS).is_file():
                err_out.write((p / ERRORS).read_text())
    layouts[0].save(out / LAYOUT_FILE)
    manifest = {**{k: v for k, v in manifests[0].items() if k in ("format", "version", "dtype", "tokenizer")},
                "complete": True, "shards": shards, "samples": sum(s["samples"] for s in shards),
                "tokens": dict(tokens), "errors": dict(errors), "error_count": sum(errors.values()),
                "merged_from": [str(p) for p in parts]}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
