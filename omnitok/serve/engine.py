"""The serving engine: one model in memory, continuous batching.

Requests (``Job``) wait in a bounded queue. Between any two decoding steps the engine admits waiting jobs into the
running batch (their prompts prefilled in a small KV cache that is spliced into the batch's, the way guidance rows
join in ``sampler.generate``) and retires the ones that finished, were cancelled or ran out of time, within limits
on rows and on cached tokens. Each job keeps its own sampling settings, grammar, end id, seed, guidance and chat
request, and draws from its own generator, so its output is exactly ``sampler.generate``'s (``omnitok sample``'s)
for that seed, alone or among any others (tested; up to the model's rounding between batch sizes, see ``sampler``).
Media spans are decoded on a background thread the moment they close, and handed to the job as events.

Speculative Jacobi decoding (``sjd_window``) runs here as in ``generate``: a job inside a span whose settings ask for
it feeds its last token with its drafted codes, the batch's forward pass is then a window as wide as the longest
(rows with fewer are padding there), every job verifies its own drafts, and the cache forgets each row's fallen
drafts before the next pass (``KVCache.rewind``; rows admitted in between end at the window's first column). Jobs in
text, or without SJD, take one token a pass beside them.

A job's events (``Job.events``, a thread-safe queue): ``("token", id)`` for every new id, ``("media", k, modality,
array_or_waveform)`` when its k-th span is decoded, then ``("done", stopped)`` once everything is delivered;
``stopped`` is "end" (it wrote its end id), "length" (``max_new_tokens`` or the model's positions), "cancelled",
"timeout" or "error: ..." .
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from omnitok.config import check_seed
from omnitok.errors import OmnitokError
from omnitok.model.decoder import Decoder
from omnitok.model.sample import SpanDecoder
from omnitok.model.sampler import (
    AUDIO,
    DONE,
    EOI,
    ROWS,
    Grammar,
    Logits,
    SamplingConfig,
    _advance_columns,
    _drafts,
    _left_padded,
    _right_padded,
    _span_event,
    _take,
    check_request,
    head_columns,
    new_token_budget,
    span_opener,
    unconditional,
)
from omnitok.tokenizers.chat import Request
from omnitok.tokenizers.layout import image_span_length
from omnitok.tokenizers.multimodal import MultimodalTokenizer


class QueueFull(OmnitokError):
    """The engine's queue holds ``max_queue`` jobs: the caller should come back later."""


@dataclass(eq=False)
class Job:
    """One request: a prompt's ids and how to continue it (``sampler.generate``'s arguments for one sample)."""

    prompt: list[int]
    cfg: SamplingConfig
    seed: int
    end_id: int
    forbidden: tuple[int, ...] = ()
    nonempty: bool = False
    request: Request | None = None  # a chat prompt's last request: what guidance's unconditional row drops
    timeout: float | None = None  # seconds from submission
    events: queue.Queue = field(default_factory=queue.Queue)
    output: list[int] = field(default_factory=list)  # the opener (image / audio output) and the new ids
    stopped: str | None = None
    submitted: float = 0.0
    first_token: float | None = None  # when the first new id came (time to first token)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop at the next step (a client that went away); the job ends with ``stopped`` "cancelled"."""
        self.cancelled = True


def _failed(e: Exception) -> str:
    """How a job that a bug ended says so."""
    return f"error: the engine failed ({type(e).__name__}: {e})"


class _Running:
    """A job's decoding state while it is in the batch."""

    def __init__(self, job: Job, engine: Engine, budget: int):
        cfg, device = job.cfg, engine.decoder.device
        self.job, self.budget = job, budget
        # jobs with equal settings share one grammar and pick their tokens together
        self.settings = repr((cfg, job.end_id, job.forbidden, job.nonempty))
        self.grammar = Grammar(engine.layout, job.end_id, cfg, 1, device, job.forbidden, job.nonempty)
        self.generator = None if cfg.greedy else torch.Generator(device=device).manual_seed(job.seed)
        self.produced = 0  # new ids so far (``job.output`` holds the opener and them)
        self.span_start = 0
        self.spans = 0  # spans closed so far
        self.pending = 0  # spans submitted for decoding and not yet delivered
        self.finished = False
        # (1 + drafts fed, ·) over the ids its last pass computed: after the last token fed and after each draft
        self.logits: Logits | None = None
        self.uncond: Logits | None = None  # the same of its unconditional row, while it has one
        self.drafts: list[int] = []  # codes to feed after its last token (speculative Jacobi decoding)
        self.proposals: torch.Tensor | None = None  # the distributions they were drawn from (drafts, columns)
        self.kept = 0  # of the last window, the columns its rows keep (0: it verified no drafts, one)
        self.sjd = cfg.widest_window > 0
        self.lock = threading.Lock()
        self.state = int(self.grammar.state[0])

    def guided(self) -> bool:
        """Whether the job is inside a span its settings guide (what ``generate``'s ``wants_guidance`` asks),
        from its grammar state as a plain int (this is asked for every job at every step)."""
        state, cfg = self.state, self.job.cfg
        if ROWS <= state <= EOI:
            return cfg.image.guidance != 1
        return state == AUDIO and cfg.audio.guidance != 1


class _Group:
    """Running jobs with the same settings: one grammar over all their rows, their tokens picked together."""

    def __init__(self):
        self.members: list[_Running] = []
        self.grammar: Grammar | None = None

    def left(self) -> np.ndarray:
        """The new tokens each member may still add."""
        return np.array([r.budget - r.produced for r in self.members])

    def width(self) -> int:
        """The most drafts a member feeds with its last token in the next pass."""
        return max(len(r.drafts) for r in self.members)

    def add(self, r: _Running) -> None:
        if self.grammar is None:
            self.grammar = r.grammar
        else:
            self.grammar.extend(r.grammar)
        self.members.append(r)

    def retire(self) -> None:
        keep = [i for i, r in enumerate(self.members) if not r.finished]
        if len(keep) < len(self.members):
            self.members = [self.members[i] for i in keep]
            if keep:
                self.grammar.select(keep)


class Engine:
    """Continuous batching over one model. ``submit`` from any thread; ``start`` runs the loop on a thread of its
    own (or call ``step`` yourself, as the tests do)."""

    def __init__(self, model, tok: MultimodalTokenizer, max_rows: int = 16, max_tokens: int = 1 << 16,
                 max_queue: int = 64, compiled: bool = False):
        if max_rows < 1 or max_tokens < 1 or max_queue < 1:
            raise OmnitokError("max_rows, max_tokens and max_queue must be at least 1")
        self.model, self.tok, self.layout = model, tok, tok.layout
        self.decoder = Decoder(model, compiled)
        self.max_rows, self.max_tokens, self.max_queue = max_rows, max_tokens, max_queue
        self.waiting: deque[Job] = deque()
        self.running: list[_Running] = []
        self.groups: dict[str, _Group] = {}
        self.rows: list[tuple[_Running, bool]] = []  # the cache's rows: (job, is its unconditional row)
        self.positions: list[int] = []  # each row's next position
        self.cache = None
        self.fed = 1  # the width of the last forward pass's window (1: one token a row, nothing to rewind)
        self.wake = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        self.spans = SpanDecoder(tok, on_done=self._span_done, background=True)  # decoding never stalls the steps
        self.stats = {"requests": 0, "finished": 0, "tokens": 0, "rejected": 0, "cancelled": 0, "timed_out": 0,
                      "passes": 0, "drafts": 0, "accepted": 0}

    # ---------------------------------------------------------------- the caller's side

    def submit(self, job: Job) -> Job:
        """Queue a job (checked first: a request the layout cannot serve, or its seed, is refused here, in one
        line)."""
        check_request(self.layout, job.cfg)
        check_seed(job.seed)
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the queue holds {self.max_queue} requests; try again shortly")
            job.submitted = time.monotonic()
            self.waiting.append(job)
            self.stats["requests"] += 1
            self.wake.notify()
        return job

    def warm_up(self, defaults: SamplingConfig) -> None:
        """With ``compiled``: compile the decoding passes of a batch of one row and of several, a graph each, before
        the first request, which would otherwise wait for them (seconds on a CPU, more on a GPU; there the CUDA
        graphs are captured again once the first requests grow the cache). Text jobs of three greedy tokens, the end
        id forbidden so that each decodes, one alone and then two together (as many as the queue and the batch
        take); and where the server's ``defaults`` draft windows in spans (speculative Jacobi decoding), unguided
        greedy jobs with a small span, alone and together, which verify windows (the width is a dynamic shape: one
        compile serves every window). A request that turns windows on itself compiles them at its first. The
        counts start afresh after."""
        if not self.decoder.compiled:
            return
        text = self.tok.text
        settings = [SamplingConfig(output="text", max_new_tokens=3, greedy=True)]
        # where the defaults draft windows in a modality's spans: a small span of it (drafts after its first code);
        # one modality serves: every window of these settings is as wide as their widest (``window_width``)
        if self.layout.has_image and defaults.image.sjd_window:
            cols = min(4, self.layout.max_grid_side)
            settings.append(replace(defaults, output="image", grid=(1, cols), max_new_tokens=image_span_length(1, cols),
                                    greedy=True, image=replace(defaults.image, guidance=1.0)))
        elif self.layout.has_audio and self.layout.audio_frame_rate and defaults.audio.sjd_window:
            settings.append(replace(defaults, output="audio", max_audio_s=2 / self.layout.audio_frame_rate,
                                    max_new_tokens=64, greedy=True, audio=replace(defaults.audio, guidance=1.0)))
        for cfg in settings:
            for rows in sorted({1, min(2, self.max_rows, self.max_queue)}):
                for _ in range(rows):
                    self.submit(Job([text.bos_id], cfg, seed=0, end_id=text.eos_id, forbidden=(text.eos_id,)))
                while self.waiting or self.running:
                    self.step()
        self.stats = dict.fromkeys(self.stats, 0)

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self._loop, name="omnitok-engine", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()
        self.spans.finish()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_rows(self) -> int:
        return len(self.rows)

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.closed and not self.waiting and not self.running:
                    self.wake.wait()
                if self.closed:
                    return
            try:
                self.step()
            except Exception as e:  # a bug costs the jobs in the batch, never the server
                self._fail_all(_failed(e))

    def _fail_all(self, why: str) -> None:
        """End every running job with ``why`` and start again from an empty batch."""
        for r in self.running:
            if not r.finished:
                self._finish(r, why)
        self.running, self.groups, self.rows, self.positions, self.cache, self.fed = [], {}, [], [], None, 1

    # ---------------------------------------------------------------- one decoding step

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting jobs, pick every running job's next token, retire the finished, let unconditional rows
        join or leave, and run the batch's forward pass."""
        self._admit()
        now = time.monotonic()
        for r in self.running:
            job = r.job
            if job.cancelled or (job.timeout is not None and now - job.submitted > job.timeout):
                self._finish(r, "cancelled" if job.cancelled else "timeout")
        self._retire()
        for group in self.groups.values():
            self._pick(group)
        self._rewind()
        self._retire()
        self._guidance()
        if self.rows:
            self._forward()

    def _admit(self) -> None:
        with self.wake:
            admitted = []
            used = sum(r.budget + len(r.job.prompt) for r in self.running)
            while self.waiting and len(self.running) + len(admitted) < self.max_rows:
                job = self.waiting[0]
                if used + len(job.prompt) + job.cfg.max_new_tokens > self.max_tokens and (self.running or admitted):
                    break  # it waits for room (alone it is admitted whatever its size, or it would wait forever)
                self.waiting.popleft()
                admitted.append(job)
                used += len(job.prompt) + job.cfg.max_new_tokens
        new, seqs = [], []
        for job in admitted:
            opener = span_opener(self.layout, job.cfg)
            try:
                budget = new_token_budget(self.model, job.cfg, [len(job.prompt) + len(opener)])[0]
                r = _Running(job, self, budget)
                if job.cfg.output == "image" and budget < r.grammar.longest_image:
                    raise OmnitokError(f"only {budget} new tokens fit after the prompt: too few for an image")
            except Exception as e:  # this job cannot start (a bug too ends it alone: it has no row yet)
                job.stopped = f"error: {e}" if isinstance(e, OmnitokError) else _failed(e)
                self.stats["finished"] += 1
                job.events.put(("done", job.stopped))
                continue
            job.output = list(opener)
            new.append(r)
            seqs.append((r, False, job.prompt + opener))
            if r.guided():  # image / audio output opens its span at once: its unconditional row starts too
                seqs.append((r, True, unconditional(job.prompt, self.layout, job.request) + opener))
        self.running += new  # before their prefill: if it fails, they end with the batch, not lost
        if seqs:
            self._prefill(seqs)
            for r in new:
                self.groups.setdefault(r.settings, _Group()).add(r)

    def _prefill(self, seqs: list[tuple[_Running, bool, list[int]]]) -> None:
        """New rows: their ids fed in a cache of their own, spliced into the batch's; their logits kept."""
        cache = self.decoder.new_cache(len(seqs), capacity=max(len(s) for _, _, s in seqs))
        ids, valid, positions = _left_padded([s for _, _, s in seqs], self.layout.pad_id, self.decoder.device)
        logits = self.decoder.forward(cache, ids, valid, positions)
        for i, (r, uncond, _) in enumerate(seqs):
            if uncond:
                r.uncond = Logits(logits[i:i + 1])
            else:
                r.logits = Logits(logits[i:i + 1])
        if self.cache is None:
            self.cache, self.fed = cache, 1
        elif not self.rows:  # an empty batch's cache: its buffers (and the CUDA graphs over them) serve again
            self.cache.clear()
            self.cache.extend(cache)
            self.fed = 1
        else:  # after a window, they end where its first column is: the window's other columns are padding to them
            self.cache.extend(cache, end=self.cache.length - self.fed + 1)
        self.rows += [(r, uncond) for r, uncond, _ in seqs]
        self.positions += (positions[:, -1] + 1).tolist()

    def _pick(self, group: _Group) -> None:
        """The next tokens of every job of a group, picked together, each row from its own logits, grammar state
        and generator, exactly as ``generate`` picks them for that sample: one token, or the drafts of its window
        that stand and one more; then the drafts of its next window."""
        members, grammar = group.members, group.grammar
        cfg = members[0].job.cfg
        width = group.width()
        allowed = grammar.allowed_ahead(group.left(), width)  # (n, width + 1, V): drafts are codes of the span
        guided = [i for i, r in enumerate(members) if r.uncond is not None]
        generators = None if cfg.greedy else [r.generator for r in members]
        taken, predicted = _take(grammar, cfg, _windows([r.logits for r in members], width + 1), guided,
                                 _windows([members[i].uncond for i in guided], width + 1) if guided else None,
                                 allowed, [r.drafts for r in members], [r.proposals for r in members], generators)
        for r, t in zip(members, taken):
            if r.drafts:
                r.kept = len(t)  # its last token and the drafts that stood
                self.stats["drafts"] += len(r.drafts)
                self.stats["accepted"] += len(t) - 1
        for i, token, before, after in _advance_columns(grammar, taken, self.layout.pad_id):
            self._advance(members[i], token, before, after)
        if members[0].sjd:  # the conditional logits after each job's window, before its drafts are replaced
            last = _stacked([r.logits.rows(len(r.drafts)) for r in members])
            drafts, proposals = _drafts(grammar, group.left(), cfg, predicted, last, generators)
            for r, d, q in zip(members, drafts, proposals):
                r.drafts, r.proposals = d, q

    def _rewind(self) -> None:
        """After a window: every row forgets the drafts its job's verification let fall and moves its next position
        past those that stood; rows that fed one token (or joined since, ending at the window's first column) keep
        only that column, so the cache ends after the longest run kept."""
        if self.fed > 1 and self.rows:
            kept = [r.kept or 1 for r, _ in self.rows]
            self.cache.rewind(torch.tensor(kept, device=self.decoder.device), self.fed)
            self.positions = [p + k - 1 for p, k in zip(self.positions, kept)]
        for r in self.running:
            r.kept = 0
        self.fed = 1

    def _advance(self, r: _Running, t: int, before: int, state: int) -> None:
        job = r.job
        r.state = state
        r.produced += 1
        job.output.append(t)
        if job.first_token is None:
            job.first_token = time.monotonic()
        self.stats["tokens"] += 1
        job.events.put(("token", t))
        event = _span_event(before, state)
        if event == "open":
            r.span_start = len(job.output) - 1
        elif event:
            with r.lock:
                r.pending += 1
            self.spans.submit((r, r.spans, event), event, job.output[r.span_start:])
            r.spans += 1
        if state == DONE or r.produced >= r.budget:
            self._finish(r, "end" if t == job.end_id else "length")

    def _finish(self, r: _Running, stopped: str) -> None:
        r.finished = True
        if stopped in ("cancelled", "timeout"):
            self.stats["cancelled" if stopped == "cancelled" else "timed_out"] += 1
        with r.lock:
            r.job.stopped = stopped
            if r.pending == 0:
                self._done(r)

    def _done(self, r: _Running) -> None:
        self.stats["finished"] += 1
        r.job.events.put(("done", r.job.stopped))

    def _span_done(self, key: tuple[_Running, int, str], out) -> None:
        r, k, kind = key
        r.job.events.put(("media", k, kind, out))
        with r.lock:
            r.pending -= 1
            if r.finished and r.pending == 0:
                self._done(r)

    def _retire(self) -> None:
        self.running = [r for r in self.running if not r.finished]
        for key, group in list(self.groups.items()):
            group.retire()
            if not group.members:
                del self.groups[key]
        keep = [i for i, (r, _) in enumerate(self.rows) if not r.finished]
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if keep:
            self.cache.select(torch.tensor(keep, device=self.decoder.device))
            self.cache.trim()
        self.rows = [self.rows[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]

    def _guidance(self) -> None:
        """Unconditional rows join the jobs that entered a guided span and leave those that left one."""
        leaving = [i for i, (r, uncond) in enumerate(self.rows) if uncond and not r.guided()]
        for i in leaving:
            self.rows[i][0].uncond = None
        if leaving:
            self._keep([i for i in range(len(self.rows)) if i not in set(leaving)])
        has = {id(r) for r, uncond in self.rows if uncond}
        joining = [r for r in self.running if r.guided() and id(r) not in has]
        if joining:  # what the conditional row has been fed so far: all but the token just picked
            self._prefill([(r, True, unconditional(r.job.prompt + r.job.output[:-1], self.layout,
                                                   r.job.request)) for r in joining])

    def _forward(self) -> None:
        """One pass over every row: its job's last token, and the job's drafts when it has some (a window)."""
        fed = [[r.job.output[-1], *r.drafts] for r, _ in self.rows]
        widest = 1 + max(r.job.cfg.widest_window for r, _ in self.rows)
        width, device = self.decoder.window_width(max(len(f) for f in fed), widest), self.decoder.device
        ids, valid = _right_padded(fed, width, self.layout.pad_id, device)
        positions = torch.tensor(self.positions, device=device)[:, None] + torch.arange(width, device=device)
        columns = head_columns([g.grammar.id_range(g.left(), g.width(), spans=g.members[0].sjd)
                                for g in self.groups.values()], self.layout.vocab_size)
        logits = Logits(self.decoder.decode(self.cache, ids, valid, positions, columns), columns[0] if columns else 0)
        for i, (r, uncond) in enumerate(self.rows):
            if uncond:
                r.uncond = logits.rows((i, slice(len(fed[i]))))
            else:
                r.logits = logits.rows((i, slice(len(fed[i]))))
        self.fed = width
        self.positions = [p + 1 for p in self.positions]
        self.stats["passes"] += 1


def _windows(logits: list[Logits], width: int) -> Logits:
    """Jobs' logits windows (n_i, ·) stacked as (jobs, width, ·); the positions past a job's window are zeros."""
    return _stacked([x if len(x.values) == width else
                     Logits(torch.cat([x.values, x.values.new_zeros((width - len(x.values), x.values.shape[-1]))]),
                            x.lo) for x in logits])


def _stacked(logits: list[Logits]) -> Logits:
    """Jobs' logits of one shape stacked (jobs, ...), over all the ids any of them covers (a job prefilled this step
    covers every id, beside jobs decoded over a span's ids)."""
    lo, hi = min(x.lo for x in logits), max(x.lo + x.values.shape[-1] for x in logits)
    return Logits(torch.stack([x.columns(lo, hi) for x in logits]), lo)
