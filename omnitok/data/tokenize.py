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

Engines: both produce the same ``Outcome`` stream, one per item in item order (the sample to write, or why the item
was left out), which one loop here turns into shards, the manifest and ``errors.jsonl``. The local engine prepares
in a process pool and encodes in this process; ``--engine ray`` (``ray_engine.py``) prepares in Ray tasks and
encodes in encoder actors across a cluster. The engine is not part of the command's identity: a run started on one may
be resumed on the other.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shlex
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omnitok.data.prepare import Outcome, Prepared, Preprocessor, encode_prepared, prepare_all
from omnitok.data.readers import Item, read_inputs
from omnitok.data.shards import ERRORS, FORMAT, MANIFEST, VERSION, ShardWriter, read_manifest
from omnitok.distributed import launched_part
from omnitok.errors import OmnitokError
from omnitok.jsonfile import cut_jsonl, write_json_atomic
from omnitok.tokenizers.layout import LAYOUT_FILE, TOKEN_KINDS, TokenLayout
from omnitok.tokenizers.multimodal import ID_DTYPE, LOSS_ON, MultimodalTokenizer

ENGINES = ("local", "ray")


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
    engine: str = "local"  # local (a process pool here) or ray (ray_engine.py)
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local cluster; "auto" or HOST:PORT
    encoders: int | None = None  # encoder actors (default: one per GPU share, else half the cluster's CPUs)
    gpus_per_encoder: float | None = None  # default: 1 when the cluster has GPUs, else 0

    def __post_init__(self) -> None:
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise OmnitokError(f"--part must be in [0, {self.num_parts}), got {self.part}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise OmnitokError("--shard-size and --batch-size must be at least 1, --workers at least 0")
        if self.loss_on not in LOSS_ON:
            raise OmnitokError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if self.engine not in ENGINES:
            raise OmnitokError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if (self.encoders is not None and self.encoders < 1) or (self.gpus_per_encoder or 0) < 0:
            raise OmnitokError("--encoders must be at least 1, --gpus-per-encoder at least 0")

    def identity(self) -> dict:
        """What decides the output; a resumed run must match it exactly (workers and batch size do not count)."""
        d = asdict(self)
        for k in ("workers", "batch_size", "out", "engine", "ray_address", "encoders", "gpus_per_encoder"):
            d.pop(k)
        if d["loss_on"] == "assistant":  # the default is left out, as in settings written before conversations
            d.pop("loss_on")
        d["tokenizer"] = str(Path(self.tokenizer).resolve())
        return d


def _part_from_env(cfg: TokenizeConfig) -> TokenizeConfig:
    """Under torchrun / deepspeed, RANK and WORLD_SIZE choose the part when --num-parts is not given."""
    launched = launched_part()
    if cfg.num_parts == 1 and launched is not None:
        cfg.part, cfg.num_parts = launched
    return cfg


def tokenize(cfg: TokenizeConfig, command: str | None = None) -> dict:
    """Run (or resume) a tokenization; returns the final manifest."""
    cfg = _part_from_env(cfg)
    if cfg.engine == "ray":
        from omnitok.data.ray_engine import ray_engine

        # Ray installed, the cluster joined, its resources enough and the tokenizer loaded there, before any work;
        # this process loads no model
        with ray_engine(cfg) as pipeline:
            return _tokenize(cfg, command, pipeline.layout, pipeline.prepare, pipeline.outcomes)
    workers = _Workers(cfg.workers) if cfg.workers else None  # before any model is loaded: no CUDA state forked
    try:
        tok = MultimodalTokenizer.from_dir(cfg.tokenizer)
        return _tokenize(cfg, command, tok.layout, Preprocessor.of(tok),
                         lambda jobs, prepare: _local_outcomes(cfg, tok, jobs, prepare, workers))
    finally:
        if workers is not None:
            workers.close()


def _exit_with(parent: int) -> None:
    """Worker initializer: a worker whose parent is gone (SIGKILL, the OOM killer) ends within a second, instead of
    waiting on the task queue for ever (its siblings hold the queue open, so it never sees end-of-file)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class _Workers:
    """Worker processes that prepare media, results in item order, a bounded number of items in flight. A worker
    that dies (a crash in a decoder, the OOM killer) breaks the pool: the items then in flight are each prepared
    alone in a pool of one, those whose worker dies again are recorded as errors (``WORKER_DIED``), and the pool
    starts again. Forked where the platform allows (instant: the imported modules are inherited), else spawned."""

    chunk = 4  # items per task

    def __init__(self, workers: int):
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.context, self.workers = multiprocessing.get_context(method), workers
        self.pool = self._start(workers)

    def _start(self, workers: int) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(workers, mp_context=self.context, initializer=_exit_with,
                                   initargs=(os.getpid(),))
        pool.submit(int).result()  # the processes start now, before the caller loads any model
        return pool

    def map(self, prepare: Preprocessor, jobs: Iterator[tuple[int, Item]]) -> Iterator[Prepared]:
        flight: deque = deque()

        def fill() -> None:
            while len(flight) < 4 * self.workers and (chunk := list(itertools.islice(jobs, self.chunk))):
                flight.append((chunk, self.pool.submit(prepare_all, prepare, chunk)))

        fill()
        while flight:
            chunk, future = flight.popleft()
            try:
                done = future.result()
            except BrokenProcessPool:
                lost = [job for c in [chunk, *(c for c, _ in flight)] for job in c]
                flight.clear()
                self.pool.shutdown(wait=False, cancel_futures=True)
                done = [self._alone(prepare, job) for job in lost]
                self.pool = self._start(self.workers)
            yield from done
            fill()

    def _alone(self, prepare: Preprocessor, job: tuple[int, Item]) -> Prepared:
        with ProcessPoolExecutor(1, mp_context=self.context, initializer=_exit_with, initargs=(os.getpid(),)) as one:
            try:
                return one.submit(prepare, job).result()
            except BrokenProcessPool:
                return Prepared.worker_died(job)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _local_outcomes(cfg: TokenizeConfig, tok: MultimodalTokenizer, jobs: Iterator[tuple[int, Item]],
                    prepare: Preprocessor, workers: _Workers | None) -> Iterator[Outcome]:
    """The local engine: media prepared by the workers (in order), encoded here ``batch_size`` good documents at a
    time."""
    prepared = workers.map(prepare, jobs) if workers else map(prepare, jobs)
    pending: list[Prepared] = []
    good = 0
    for p in prepared:
        pending.append(p)
        good += p.error is None
        if good >= cfg.batch_size:
            yield from encode_prepared(tok, pending, cfg.loss_on)
            pending, good = [], 0
    yield from encode_prepared(tok, pending, cfg.loss_on)


def _tokenize(cfg: TokenizeConfig, command: str | None, layout: TokenLayout, prepare: Preprocessor,
              engine: Callable[[Iterator[tuple[int, Item]], Preprocessor], Iterator[Outcome]]) -> dict:
    """The loop both engines share: ``engine(jobs, prepare)`` gives each item's outcome, in item order."""
    out = Path(cfg.out)
    if (out / LAYOUT_FILE).is_file():  # refuse before any work
        TokenLayout.load(out / LAYOUT_FILE).check_same(layout, f"the tokenizer {cfg.tokenizer}", str(out))
    elif out.exists() and any(out.iterdir()):
        raise OmnitokError(f"{out} is not empty and holds no shard set")
    out.mkdir(parents=True, exist_ok=True)
    layout.save(out / LAYOUT_FILE)

    manifest = _start_manifest(out, cfg, layout, command)
    if manifest["complete"]:
        tqdm.write(f"{out} is already complete ({manifest['samples']} samples)")
        return manifest
    resume_after = manifest["items_done"]
    errors = _restore_errors(out, resume_after)
    for stale in out.glob("*.tar.tmp"):
        stale.unlink()

    writer = ShardWriter(out, cfg.shard_size, layout, next_index=len(manifest["shards"]))

    def jobs() -> Iterator[tuple[int, Item]]:
        for index, item in enumerate(read_inputs(cfg.inputs, cfg.pair_order, cfg.seed)):
            if index % cfg.num_parts == cfg.part and index > resume_after:
                yield index, item

    start, samples, tokens = time.time(), 0, 0
    last_index = resume_after
    error_file = open(out / ERRORS, "a")  # noqa: SIM115 (closed in finally)
    try:
        progress = tqdm(engine(jobs(), prepare), desc="tokenize", unit="item")
        for outcome in progress:
            last_index = outcome.index
            if outcome.error is not None:
                entry = {"item": outcome.index, "key": outcome.key, "source": outcome.source, "error": outcome.error,
                         "reason": outcome.reason}
                errors.append(entry)
                error_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                error_file.flush()
            else:
                finished = writer.add(outcome.key, outcome.ids, outcome.meta)
                samples, tokens = samples + 1, tokens + len(outcome.ids)
                if finished is not None:
                    _shard_done(out, manifest, finished, outcome.index, errors)
            elapsed = max(time.time() - start, 1e-9)
            progress.set_postfix(samples_s=f"{samples / elapsed:.1f}", tokens_s=f"{tokens / elapsed:.0f}",
                                 errors=len(errors))
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


def _start_manifest(out: Path, cfg: TokenizeConfig, layout: TokenLayout, command: str | None) -> dict:
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("settings") != cfg.identity():
            raise OmnitokError(f"{out} was made by a different command (inputs, tokenizer, parts, shard size or "
                               "pair order differ); choose a new --out or rerun the original command")
        return manifest
    return {"format": FORMAT, "version": VERSION, "dtype": np.dtype(ID_DTYPE).name,
            "tokenizer": {"fingerprints": dict(layout.fingerprints), "vocab_size": layout.vocab_size},
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
