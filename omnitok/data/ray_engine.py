"""``omnitok tokenize --engine ray``: the local engine's stages on a Ray Data pipeline, across a cluster.

The driver (this process) loads no model: one task on the cluster loads the tokenizer first (every check of its
parts, the refusal of a damaged one in one line before any output) and sends back its layout and the media sizes.
It lists the items exactly as the local engine does (same readers, same indices, same part) and hands them to Ray a
window at a time (``ray_window`` items: the driver never holds more of the corpus than that).
Each window is one dataset: blocks of items -> ``Preprocessor`` in CPU tasks (decode, EXIF, resize; decode, mix,
resample) -> ``encode_prepared`` in a pool of encoder actors (each loads the tokenizer once per window, on its GPU
share when it has one, and encodes ``batch_size`` items at a time) -> back to the driver in item order
(``preserve_order``), where ``tokenize.py``'s loop writes shards, the manifest and ``errors.jsonl`` as for the local
engine. Encoding a document does not depend on which batch it is in (the local engine's own property), so the shards
are byte for byte the local engine's, whatever the number of tasks, actors, blocks or windows.

Failures: a Python error on one file is an outcome like any other (``Preprocessor`` catches it). A worker process
that dies (a crash in a decoder, the OOM killer) fails its task; Ray retries it once (a lost node's work is redone),
and if the dataset still fails, every remaining item of the window is prepared alone in a task of its own with no
retry: the items whose task dies are recorded as errors ("a worker died preparing this item") and the window is run
again without them. Every attempt at a window ends its encoder actors when the driver is done with it (``_Encoders``:
Ray Data only drops them). A killed driver is the local engine's case: the rerun resumes after the last complete
shard.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from omnitok.data.prepare import Prepared, Preprocessor, encode_prepared
from omnitok.data.readers import Item
from omnitok.errors import OmnitokError
from omnitok.tokenizers.layout import TokenLayout

INSTALL = "--engine ray needs Ray Data: pip install 'omnitok[ray]' (or pip install 'ray[data]')"


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise OmnitokError(INSTALL) from None
    return ray


class _Encoder:
    """An encoder actor: the tokenizer loaded once, then batches of prepared items -> outcomes. It enrols in the
    job's ``_Encoders`` first, so that the driver can end it with its dataset."""

    def __init__(self, tokenizer: str, loss_on: str, threads: int | None, encoders, attempt: int):
        import ray
        import torch

        from omnitok.tokenizers.multimodal import MultimodalTokenizer

        encoders.enrol.remote(attempt, ray.get_runtime_context().current_actor)
        if threads is not None:
            torch.set_num_threads(threads)
        self.tok = MultimodalTokenizer.from_dir(tokenizer)
        self.loss_on = loss_on

    def __call__(self, batch: dict) -> dict:
        outcomes = encode_prepared(self.tok, list(batch["prepared"]), self.loss_on)
        column = np.empty(len(outcomes), dtype=object)
        column[:] = outcomes
        return {"outcome": column}


class _Encoders:
    """The job's encoder actors, by attempt (one Ray dataset each), which the driver ends when it is done with an
    attempt. Ray Data (2.60) ends a dataset's actors by dropping its references to them, never by killing them, and
    an actor that was busy (or still starting) when its dataset ended could live on, holding its CPU or GPU, until the
    driver's garbage collector happened to run (a failure's traceback keeps the executor in a reference cycle): on a
    cluster with none to spare the next dataset waited for it forever (twice in CI). An encoder that enrols in an
    attempt already ended is ended at once."""

    def __init__(self):
        import ray

        self.kill = ray.kill
        self.actors: dict[int, list] = {}
        self.ended: set[int] = set()

    def enrol(self, attempt: int, actor) -> None:
        if attempt in self.ended:
            self.kill(actor)
        else:
            self.actors.setdefault(attempt, []).append(actor)

    def end(self, attempt: int) -> int:
        self.ended.add(attempt)
        actors = self.actors.pop(attempt, [])
        for actor in actors:
            self.kill(actor)
        return len(actors)


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
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the shard writer is fed in item order
        context.enable_progress_bars = False  # the driver shows items/s, tokens/s and errors
        context.print_on_execution_start = False
        self.layout, self.prepare = self._tokenizer_facts()
        # restarted (empty) if its node is lost: the encoders it knew are then left to Ray Data, as before it
        self.enrolled = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Encoders).remote()
        self.attempts = itertools.count()

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

    def outcomes(self, jobs: Iterator[tuple[int, Item]], prepare: Preprocessor) -> Iterator:
        while window := list(itertools.islice(jobs, self.cfg.ray_window)):
            yield from self.window(window, prepare)

    def dataset(self, jobs: list[tuple[int, Item]], prepare, attempt: int):
        ray, cfg = self.ray, self.cfg
        rows = [{"job": job} for job in jobs]
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / cfg.batch_size))
        resources = {"num_gpus": self.gpus_per_encoder} if self.gpus_per_encoder else {}
        # Ray Data retries a failed task and restarts a dead actor forever by default: a file that kills its worker
        # would never end the job. Once is enough for a lost node. Only the (deprecated since Ray 2.60, hence the
        # extra's upper bound) remote-args keywords set these.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map(lambda row: {"prepared": prepare(row["job"])}, num_cpus=1, max_retries=1)
            args = (cfg.tokenizer, cfg.loss_on, self.threads, self.enrolled, attempt)
            return ds.map_batches(_Encoder, fn_constructor_args=args,
                                  batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1, **resources,
                                  compute=ray.data.ActorPoolStrategy(size=self.encoders), max_restarts=1,
                                  max_task_retries=1)

    def window(self, jobs: list[tuple[int, Item]], prepare) -> Iterator:
        died: dict[int, object] = {}  # index -> its error outcome, for items whose worker died
        done = -1
        rest = jobs
        while True:
            attempt = next(self.attempts)
            try:
                for row in self.dataset(rest, prepare, attempt).iter_rows():
                    outcome = row["outcome"]
                    yield from self._died_before(died, outcome.index)
                    done = outcome.index
                    yield outcome
                yield from self._died_before(died, math.inf)
                return
            except self.ray.exceptions.RayError as e:
                failure = (str(e).strip().splitlines() or [type(e).__name__])[0]
            finally:  # its encoders go now, whatever Ray Data does with them
                self.ray.get(self.enrolled.end.remote(attempt))
            rest = [(i, item) for i, item in rest if i > done and i not in died]
            found = self._find_dead(rest, prepare)
            if not found:
                raise OmnitokError(f"the Ray pipeline failed and no single item makes it fail: {failure}; rerun the "
                                   "same command to continue after the last complete shard") from None
            died.update(found)
            rest = [(i, item) for i, item in rest if i not in died]

    @staticmethod
    def _died_before(died: dict, index: float) -> Iterator:
        for i in sorted(i for i in died if i < index):
            yield died.pop(i)

    def _find_dead(self, jobs: list[tuple[int, Item]], prepare) -> dict:
        """Each item prepared in a task of its own, never retried: the items whose worker dies."""
        ray = self.ray
        alone = ray.remote(num_cpus=1, max_retries=0)(lambda prepare, job: prepare(job))
        shared = ray.put(prepare)
        refs = [(job, alone.remote(shared, job)) for job in jobs]
        dead = {}
        for job, ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                died = Prepared.worker_died(job, f" ({type(e).__name__})")
                dead[died.index] = died.failed(died.error)
        return dead
