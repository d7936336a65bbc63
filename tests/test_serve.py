"""`omnitok serve`'s engine: continuous batching gives every request exactly what `omnitok sample` (the sampler's
`generate`) gives it with the same seed, whatever joins or leaves the batch around it; limits, cancellation,
timeouts and a full queue."""

import copy
import queue

import numpy as np
import pytest
import torch

from omnitok.document import Document, Text
from omnitok.errors import OmnitokError
from omnitok.model.sample import load_model, parse_chat_prompt, prompt_tokens
from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate
from omnitok.serve.engine import Engine, Job, QueueFull, _Running

SETTINGS = [SamplingConfig(max_new_tokens=60, max_audio_s=0.05, image=ModalitySampling(top_k=50, guidance=2.0),
                           audio=ModalitySampling(guidance=1.5)),
            SamplingConfig(output="image", max_new_tokens=80, image=ModalitySampling(top_k=20, guidance=3.0)),
            SamplingConfig(output="audio", max_new_tokens=40, max_audio_s=0.06),
            SamplingConfig(max_new_tokens=30, greedy=True),
            SamplingConfig(output="text", max_new_tokens=25, text=ModalitySampling(temperature=0.9, top_k=40))]


@pytest.fixture(scope="module")
def served(model_dir):
    return load_model(model_dir)


def plain_jobs(tok, n):
    texts = ["a red circle", "a low tone and a chord", "hello", "Return the value of x. " * 6]
    prompts = [e.ids.tolist()[:-1] for e in tok.encode_batch([Document([Text(t)]) for t in texts])]
    return [Job(prompts[i % len(prompts)], SETTINGS[i % len(SETTINGS)], seed=100 + i, end_id=tok.text.eos_id)
            for i in range(n)]


def reference(model, tok, job):
    return generate(model, tok.layout, [job.prompt], job.end_id, job.cfg, seeds=[job.seed], forbidden=job.forbidden,
                    nonempty=job.nonempty, requests=[job.request])[0]


def run(engine, jobs, every=3):
    """Submit the first jobs, then one more every ``every`` steps, and step until all are done."""
    waiting, steps = list(jobs[1:]), 0
    engine.submit(jobs[0])
    while waiting or engine.running or engine.waiting:
        engine.step()
        steps += 1
        if waiting and steps % every == 0:
            engine.submit(waiting.pop(0))
    return steps


def events(job):
    out = []
    while True:
        e = job.events.get(timeout=30)
        out.append(e)
        if e[0] == "done":
            return out


def check_exact(model, tok, jobs):
    """Every job's output is ``generate``'s alone, and its events give every token, every span decoded, then done."""
    for job in jobs:
        assert job.output == reference(model, tok, job), job.cfg
        got = events(job)
        assert [t for kind, t, *_ in got if kind == "token"] == job.output[1 if job.cfg.output in ("image", "audio")
                                                                           else 0:]
        spans = [p for p in tok.parse(np.asarray(job.output[:-1] if job.stopped == "end" else job.output))
                 if p.modality != "text"]
        media = [e for e in got if e[0] == "media"]
        assert [(k, kind) for _, k, kind, _ in media] == [(k, p.modality) for k, p in enumerate(spans)]
        assert got[-1] == ("done", job.stopped) and job.stopped in ("end", "length")


def test_every_request_gets_exactly_samples_output_whatever_joins_it(served):
    model, tok = served
    jobs = plain_jobs(tok, 12)
    engine = Engine(model, tok, max_rows=4)  # at most 4 jobs at once: the others wait their turn
    run(engine, jobs, every=2)
    check_exact(model, tok, jobs)
    assert engine.stats["finished"] == 12 and engine.batch_rows == 0
    assert engine.stats["passes"] >= max(len(job.output) for job in jobs) and engine.stats["drafts"] == 0


def test_cuda_graphs_serve_a_batch_whose_jobs_keep_joining_and_leaving(served):
    """The engine's decoding passes through ``CudaGraphs`` (capture emulated on the CPU: a replay recomputes over
    the cache tensors of its capture): jobs joining and leaving move rows inside the cache's buffers, so a graph
    captured at a number of rows is replayed whenever the batch has that many again, over whichever rows are there
    then, and every job still gets exactly ``generate``'s output. When a join or leave replaced the cache's tensors,
    these 48 jobs captured a graph on 167 of the 224 passes."""
    from test_decoder import Rerun

    from omnitok.model.decoder import CudaGraphs

    model, tok = served
    engine = Engine(model, tok, max_rows=8, max_queue=64)
    engine.decoder.static = True  # the compiled decoder's form, eagerly
    engine.decoder.graphs = CudaGraphs(engine.decoder._static, record=Rerun())
    before = CudaGraphs.captured
    jobs = plain_jobs(tok, 48)
    run(engine, jobs)
    check_exact(model, tok, jobs)
    captured, passes = CudaGraphs.captured - before, engine.stats["passes"]
    assert passes > 150 and captured < passes / 5, (captured, passes)  # one per row count and cache size


def test_speculative_jacobi_requests_are_exact_beside_plain_ones_joining_and_leaving(served):
    """Jobs with ``sjd_window`` verify windows in the batch's pass while the others take one token; each gets
    exactly ``generate``'s output with the same settings, alone. A sharpened copy of the model makes drafts both
    stand and fall."""
    model, tok = served
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight *= 4
    jobs = plain_jobs(tok, 14)
    for i, job in enumerate(jobs):
        if i % 3:
            job.cfg = copy.deepcopy(job.cfg)
            job.cfg.image.sjd_window, job.cfg.audio.sjd_window = 3 + i % 6, 2 + i % 5
    engine = Engine(sharp, tok, max_rows=5)
    run(engine, jobs, every=2)
    check_exact(sharp, tok, jobs)
    stats = engine.stats
    assert 0 < stats["accepted"] < stats["drafts"], stats  # some drafts stood, some fell
    assert stats["finished"] == 14 and engine.batch_rows == 0


@pytest.mark.parametrize("sjd", [0, 5])
def test_chat_requests_with_guidance_are_exact_in_a_batch(chat_model_dir, sjd):
    model, tok = load_model(chat_model_dir)
    prompts = [parse_chat_prompt(t) for t in ("Draw a red circle.", "Play a rising chirp.", "Hello", "Again?")]
    ids, end, forbidden, requests = prompt_tokens(tok, prompts, chat=True)
    cfg = SamplingConfig(max_new_tokens=90, max_audio_s=0.06,
                         image=ModalitySampling(top_k=50, guidance=2.0, sjd_window=sjd),
                         audio=ModalitySampling(guidance=1.5, sjd_window=sjd))
    jobs = [Job(ids[i % 4], cfg, seed=i, end_id=end, forbidden=tuple(forbidden), nonempty=True,
                request=requests[i % 4]) for i in range(8)]
    engine = Engine(model, tok, max_rows=3)
    run(engine, jobs, every=4)
    for job in jobs:
        assert job.output == reference(model, tok, job)
    assert (engine.stats["drafts"] > 0) == (sjd > 0)


def test_cancelled_and_timed_out_requests_leave_and_the_others_are_untouched(served):
    model, tok = served
    jobs = plain_jobs(tok, 6)
    jobs[1].timeout = 0.0
    engine = Engine(model, tok)
    for job in jobs:
        engine.submit(job)
    for _ in range(3):
        engine.step()
    jobs[2].cancel()
    while engine.running or engine.waiting:
        engine.step()
    assert jobs[1].stopped == "timeout" and jobs[2].stopped == "cancelled"
    assert len(jobs[2].output) < len(reference(model, tok, jobs[2]))
    for job in (jobs[0], *jobs[3:]):
        assert job.output == reference(model, tok, job)
    assert events(jobs[2])[-1] == ("done", "cancelled")


def test_a_full_queue_and_bad_requests_are_refused_at_once(served):
    model, tok = served
    engine = Engine(model, tok, max_queue=2)
    jobs = plain_jobs(tok, 3)
    engine.submit(jobs[0])
    engine.submit(jobs[1])
    with pytest.raises(QueueFull, match="queue holds 2 requests"):
        engine.submit(jobs[2])
    with pytest.raises(OmnitokError, match="grid"):
        engine.submit(Job([1, 2], SamplingConfig(output="image", grid=(99, 99)), 0, tok.text.eos_id))
    for seed in (-1, 1 << 64):  # torch would fold the first into another seed's stream and fail on the second
        with pytest.raises(OmnitokError, match=f"a seed must be from 0 to 2\\*\\*64 - 1, got {seed}"):
            engine.submit(Job([1, 2], SamplingConfig(), seed, tok.text.eos_id))
    # a prompt that leaves no room in the model's positions ends with an error, and the engine goes on
    long = Job([tok.text.bos_id] * (model.config.max_position_embeddings + 5), SamplingConfig(), 0, tok.text.eos_id)
    engine.max_queue = 10
    engine.submit(long)
    while engine.running or engine.waiting:
        engine.step()
    assert long.stopped.startswith("error: a prompt of") and jobs[0].output == reference(model, tok, jobs[0])


def test_the_engine_thread_serves_requests_submitted_from_other_threads(served):
    model, tok = served
    engine = Engine(model, tok, max_rows=8).start()
    try:
        jobs = plain_jobs(tok, 6)
        for job in jobs:
            engine.submit(job)
        for job in jobs:
            assert events(job)[-1][0] == "done"
            assert job.output == reference(model, tok, job)
    finally:
        engine.close()
    with pytest.raises(queue.Empty):
        jobs[0].events.get_nowait()


def test_a_failing_step_ends_the_batch_with_an_error_and_the_engine_goes_on(served, monkeypatch):
    model, tok = served
    engine = Engine(model, tok).start()
    try:
        broken = plain_jobs(tok, 2)
        original = Engine._forward
        monkeypatch.setattr(Engine, "_forward", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
        for job in broken:
            engine.submit(job)
        assert all(events(job)[-1] == ("done", "error: the engine failed (RuntimeError: boom)") for job in broken)
        monkeypatch.setattr(Engine, "_forward", original)
        job = engine.submit(plain_jobs(tok, 1)[0])
        assert events(job)[-1][0] == "done" and job.output == reference(model, tok, job)
    finally:
        engine.close()


def test_a_job_that_fails_to_start_ends_alone_and_none_is_lost(served, monkeypatch):
    """A bug while a job joins the batch ends that job (not its neighbours); one in the prefill of joining jobs ends
    them with an error (they used to be dropped, their clients waiting until they timed out)."""
    model, tok = served
    engine = Engine(model, tok)
    jobs = plain_jobs(tok, 3)
    start = _Running.__init__

    def failing(self, job, *args):
        if job is jobs[1]:
            raise RuntimeError("boom")
        start(self, job, *args)

    monkeypatch.setattr(_Running, "__init__", failing)
    for job in jobs:
        engine.submit(job)
    while engine.running or engine.waiting:
        engine.step()
    assert events(jobs[1]) == [("done", "error: the engine failed (RuntimeError: boom)")]
    for job in (jobs[0], jobs[2]):
        assert job.output == reference(model, tok, job)
    monkeypatch.setattr(_Running, "__init__", start)
    engine = Engine(model, tok).start()
    try:
        monkeypatch.setattr(Engine, "_prefill", lambda self, seqs: (_ for _ in ()).throw(RuntimeError("no memory")))
        joining = [engine.submit(job) for job in plain_jobs(tok, 2)]
        assert all(events(job)[-1] == ("done", "error: the engine failed (RuntimeError: no memory)")
                   for job in joining)
    finally:
        engine.close()


@pytest.mark.parametrize("modality", ["image", "audio", None])
def test_the_warm_up_fits_a_queue_and_a_batch_of_one(served, modality):
    """``--compile --max-queue 1 --max-rows 1``: the warm-up's jobs go one at a time (two at once would be refused
    by the queue and stop the server's start), with windows of drafts in the spans the server's defaults draft in;
    its counts do not reach the metrics. (The decoder is eager here, the flag alone set: what is checked is the
    warm-up's own bookkeeping, not the compiler.)"""
    model, tok = served
    engine = Engine(model, tok, max_rows=1, max_queue=1)
    engine.decoder.compiled = True
    defaults = SamplingConfig(**({modality: ModalitySampling(sjd_window=4)} if modality else {}))
    seen, drafts = [], [0]
    submit, step = engine.submit, engine.step
    engine.submit = lambda job: seen.append(job) or submit(job)
    engine.step = lambda: step() or drafts.append(engine.stats["drafts"])
    engine.warm_up(defaults)
    assert [job.cfg.output for job in seen] == ["text"] + [modality] * bool(modality)
    ends = {"image": tok.layout.eoi_id, "audio": tok.layout.eoa_id}
    assert all(ends[job.cfg.output] in job.output for job in seen[1:])  # whole spans, with windows of drafts
    assert (max(drafts) > 0) == bool(modality)
    assert set(engine.stats.values()) == {0} and not engine.running and not engine.waiting
    job = plain_jobs(tok, 1)[0]
    run(engine, [job])
    assert job.output == reference(model, tok, job) and engine.stats["requests"] == 1


@pytest.mark.slow
def test_the_compiled_engine_gives_the_same_greedy_tokens(served):
    """``omnitok serve --compile``: the batch's cache is trimmed, grown and spliced as jobs come and go, windows of
    drafts are verified, and the compiled decoder (its one-token steps in the static form CUDA graphs replay) still
    gives every job ``generate``'s greedy tokens."""
    model, tok = served
    jobs = plain_jobs(tok, 8)
    for i, job in enumerate(jobs):
        job.cfg = copy.deepcopy(job.cfg)
        job.cfg.greedy = True
        job.cfg.image.sjd_window = 4 * (i % 2)
    torch._dynamo.reset()  # the decoder tests compiled this architecture's graphs already: warm-up must make them
    engine = Engine(model, tok, max_rows=3, compiled=True)
    # one row, then several, one token a pass and (the server's defaults draft in image spans) windows: what the
    # first requests would otherwise compile
    engine.warm_up(SamplingConfig(image=ModalitySampling(sjd_window=4)))
    assert engine.stats["passes"] == engine.stats["tokens"] == 0 and not engine.running
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    first = plain_jobs(tok, 3)  # one token a pass
    windowed = [Job(first[0].prompt, SamplingConfig(output="image", max_new_tokens=80, greedy=True,
                                                    image=ModalitySampling(guidance=g, sjd_window=4)),
                    seed=0, end_id=tok.text.eos_id) for g in (1.0, 3.0)]  # one row; two (the guidance row)
    for batch in (first[:1], first[1:], windowed[:1], windowed):  # a request alone, then together
        for job in batch:
            engine.submit(job)
        while engine.running or engine.waiting:
            engine.step()
    assert engine.stats["drafts"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    run(engine, jobs, every=2)
    for job in jobs + first + windowed:
        assert job.output == reference(model, tok, job)
