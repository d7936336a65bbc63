"""``omnitok tokenize --engine ray``: the local engine's stages as Ray tasks and actors, across a cluster.

The driver (this process) loads no model: one task on the cluster loads the tokenizer first (every check of its
parts, the refusal of a damaged one in one line before any output) and sends back its layout and the media sizes.
It lists the items exactly as the local engine does (same readers, same indices, same part) and streams them to the
cluster in blocks of ``batch_size``: each block is prepared in a CPU task (decode, EXIF, resize; decode, mix,
resample) and encoded by one of the job's encoder actors (``encode_prepared``; each loads the tokenizer once, on its
GPU share when it has one), which take the blocks in turn. At most ``in_flight`` blocks are out at a time (two per
CPU of the cluster, at most 8192 items: what the driver holds of the corpus) and their outcomes come back in item
order, where ``tokenize.py``'s loop writes shards, the manifest and ``errors.jsonl`` as for the local engine.
Encoding a document does not depend on which batch it is in (the local engine's own property), so the shards are
byte for byte the local engine's, whatever the number of tasks, actors or nodes.

The encoders start once and live as long as the job (Ray Data, used before, started a pool per dataset, and a
dataset per window of items: about 7 s of actor start-up and tokenizer loading each time, and a drained pipeline at
every window's end); the driver kills them when the job ends, however it ends.

Failures: a Python error on one file is an outcome like any other (``Preprocessor`` catches it). A worker process
that dies (a crash in a decoder, the OOM killer) fails its task; Ray retries it once (a lost node's work is redone)
and restarts a dead encoder once. A block that still fails has each of its items prepared alone in a task of its
own with no retry: the items whose task dies are recorded as errors ("a worker died preparing this item") and the
others are encoded; a failure no single item explains ends the job in one line. A killed driver is the local
engine's case: the rerun resumes after the last complete shard.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from omnitok.data.prepare import Outcome, Prepared, Preprocessor, encode_prepared, prepare_all
from omnitok.data.readers import Item
from omnitok.errors import OmnitokError
from omnitok.tokenizers.layout import TokenLayout

INSTALL = "--engine ray needs Ray: pip install 'omnitok[ray]' (or pip install ray)"


def import_ray():
    try:
        import ray
    except ImportError:
        raise OmnitokError(INSTALL) from None
    return ray


class _Encoder:
    """An encoder actor: the tokenizer loaded once for the whole job, then blocks of prepared items -> outcomes."""

    def __init__(self, tokenizer: str, loss_on: str, threads: int | None):
        import torch

        from omnitok.tokenizers.multimodal import MultimodalTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self.tok = MultimodalTokenizer.from_dir(tokenizer)
        self.loss_on = loss_on

    def encode(self, prepared: list[Prepared]) -> list[Outcome]:
        return encode_prepared(self.tok, prepared, self.loss_on)


def _tokenizer_facts(tokenizer: str) -> tuple[TokenLayout, Preprocessor]:
    """On a worker: the tokenizer loaded as an encoder loads it, and what the driver needs of it."""
    from omnitok.tokenizers.multimodal import MultimodalTokenizer

    tok = MultimodalTokenizer.from_dir(tokenizer)
    return tok.layout, Preprocessor.of(tok)


@contextmanager
def ray_engine(cfg) -> Iterator:
    """Join the cluster (``cfg.ray_address``; else RAY_ADDRESS; else start Ray here), check its resources and load
    the tokenizer there, before any work; yields the pipeline: its ``layout`` and ``prepare`` (the tokenizer's), and
    ``outcomes(jobs, prepare)``, one per item in item order."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        _check_reachable(cfg.ray_address)
        try:
            ray.init(address=cfg.ray_address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise OmnitokError(f"cannot join the Ray cluster at {cfg.ray_address or 'RAY_ADDRESS'}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        yield _Pipeline(ray, cfg)
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT that nothing answers on is refused in seconds (Ray itself waits minutes for it)."""
    if address is None or address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise OmnitokError(f"cannot reach the Ray cluster at {address}: {getattr(e, 'strerror', None) or e}") from None


class _Pipeline:
    def __init__(self, ray, cfg):
        self.ray, self.cfg = ray, cfg
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
        per = cfg.gpus_per_encoder if cfg.gpus_per_encoder is not None else (1.0 if gpus else 0.0)
        if per > gpus:
            raise OmnitokError(f"--gpus-per-encoder {per:g} but the Ray cluster has {gpus:g} GPUs")
        self.gpus_per_encoder = per
        # CPU encoders leave half the cluster to the tasks that prepare media (on 2 CPUs: one of each)
        self.encoders = cfg.encoders or (int(gpus // per) if per else max(1, int(cpus) // 2))
        if not per and self.encoders >= cpus:
            raise OmnitokError(f"--encoders {self.encoders} would take all {cpus:g} CPUs of the Ray cluster and leave "
                               "none to prepare media")
        # A CPU encoder reserves one CPU but computes with its share of all of them (Ray would give it one thread):
        # preparing media is light and bursty, so, as the local engine's encoding process does beside its workers,
        # the encoders use the cores the tasks leave idle. Measured on 2 CPUs: 0.49 -> 0.81 of the local engine.
        self.threads = None if per else max(1, int(cpus) // self.encoders)
        # enough blocks out to keep every CPU and encoder busy while the oldest is awaited, bounded in items
        self.in_flight = max(2 * self.encoders, min(2 * int(cpus), 8192 // cfg.batch_size), 2)
        self.layout, self.prepare = self._tokenizer_facts()

    def _tokenizer_facts(self) -> tuple[TokenLayout, Preprocessor]:
        task = self.ray.remote(num_cpus=1, num_gpus=0, max_retries=0)(_tokenizer_facts)
        try:
            return self.ray.get(task.remote(self.cfg.tokenizer))
        except self.ray.exceptions.RayError as e:  # the loader's own error, or its worker died
            cause = getattr(e, "cause", None)
            if isinstance(cause, OmnitokError):
                raise OmnitokError(str(cause)) from None
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else (str(e).strip() or type(e).__name__)
            raise OmnitokError(f"loading the tokenizer {self.cfg.tokenizer} on the Ray cluster failed: "
                               f"{detail.splitlines()[0][:300]}") from None

    def outcomes(self, jobs: Iterator[tuple[int, Item]], prepare: Preprocessor) -> Iterator[Outcome]:
        """Blocks of ``batch_size`` items, each prepared in a task and encoded by one of the job's encoder actors
        (in turn), at most ``in_flight`` blocks at a time; outcomes in item order. The encoders live as long as the
        job, and go with it whatever ends it."""
        ray = self.ray
        shared = ray.put(prepare)
        # Ray retries a failed task and restarts a dead actor: once is enough for a lost node; a file that kills its
        # worker every time is found by ``_settle``
        task = ray.remote(num_cpus=1, max_retries=1)(prepare_all)
        actor = ray.remote(num_cpus=1, num_gpus=self.gpus_per_encoder, max_restarts=1, max_task_retries=1)(_Encoder)
        encoders = [actor.remote(self.cfg.tokenizer, self.cfg.loss_on, self.threads) for _ in range(self.encoders)]
        flight: deque = deque()
        try:
            for n, block in enumerate(iter(lambda: list(itertools.islice(jobs, self.cfg.batch_size)), [])):
                flight.append((block, encoders[n % len(encoders)].encode.remote(task.remote(shared, block))))
                if len(flight) >= self.in_flight:
                    yield from self._settle(*flight.popleft(), shared, encoders)
            while flight:
                yield from self._settle(*flight.popleft(), shared, encoders)
        finally:
            for encoder in encoders:
                ray.kill(encoder)

    def _settle(self, block: list[tuple[int, Item]], ref, shared, encoders: list) -> list[Outcome]:
        """A block's outcomes. When its task or encoder failed for good, each item is prepared alone in a task of its
        own with no retry: those whose task dies are recorded ("a worker died preparing this item"), the others are
        encoded again; a failure no single item explains ends the job in one line (a rerun resumes)."""
        ray = self.ray

        def unexplained(e: Exception) -> OmnitokError:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return OmnitokError(f"the Ray pipeline failed and no single item makes it fail: {first}; rerun the same "
                                "command to continue after the last complete shard")

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            failure = e
        alone = ray.remote(num_cpus=1, max_retries=0)(lambda prepare, job: prepare(job))
        refs = [(job, alone.remote(shared, job)) for job in block]
        prepared, died = [], []
        for job, one in refs:
            try:
                prepared.append(ray.get(one))
            except ray.exceptions.RayError as e:
                dead = Prepared.worker_died(job, f" ({type(e).__name__})")
                died.append(dead.failed(dead.error))
        if not died:
            raise unexplained(failure)
        try:
            outcomes = ray.get(encoders[0].encode.remote(prepared)) + died
        except ray.exceptions.RayError as e:
            raise unexplained(e) from None
        return sorted(outcomes, key=lambda o: o.index)
