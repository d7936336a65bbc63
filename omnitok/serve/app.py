"""``omnitok serve``: an OpenAI-style HTTP API (FastAPI) over the continuous-batching engine.

Routes: ``POST /v1/chat/completions`` (messages whose content parts are text, images as data URLs and audio as
base64 WAV; the reply's parts carry text, PNG and WAV; ``stream: true`` sends server-sent events: text deltas, then
each media part as soon as its span is decoded), ``POST /v1/images/generations`` (prompt, n, size = the code grid
"ROWSxCOLS", ``b64_json``), ``POST /v1/audio/speech`` (input, seed, response_format wav / flac / pcm: the sound
file itself), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

A model whose tokenizer holds conversations (chat markers or a chat template) is served as a chat: the messages
are the conversation and the answer is the assistant's turn. A base model is served as plain continuation: the
messages' content, in order, is the document it continues.

Safety: the server never reads a path or URL named in a request (media come inline); bodies, image pixels, audio
seconds, ``max_tokens`` and ``n`` have limits; an API key (``--api-key`` or ``OMNITOK_API_KEY``), when set, is
checked on every route but ``/health`` (as ``Authorization: Bearer KEY``, or ``?api_key=KEY`` for the page). Every
bad request gets a 4xx with a JSON error naming what is wrong; a full queue gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import secrets
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from omnitok.document import Audio, Conversation, Document, Image, Segment, Text, Turn
from omnitok.errors import OmnitokError
from omnitok.jsonfile import parse_json
from omnitok.model.decoder import CudaGraphs
from omnitok.model.sample import Prompt, prompt_tokens, sampling_config
from omnitok.model.sampler import SamplingConfig
from omnitok.serve.engine import Engine, Job, QueueFull
from omnitok.tokenizers.layout import Modality

CHAT_FIELDS = {"messages", "model", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "n", "omnitok", "user"}
IMAGE_FIELDS = {"prompt", "model", "n", "size", "seed", "response_format", "omnitok", "user"}
SPEECH_FIELDS = {"input", "model", "voice", "response_format", "speed", "seed", "omnitok", "user"}
SOUND_FORMATS = {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}  # response_format: media type
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+|audio/[a-z0-9.+-]+|application/octet-stream);base64,(.*)", re.S)


@dataclass
class ServeLimits:
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 60.0
    max_tokens: int = 4096  # the most new tokens one request may ask for
    max_n: int = 8  # images per /v1/images/generations request
    request_timeout: float = 300.0  # seconds from submission to the last token


@dataclass
class ServeConfig:
    name: str = "omnitok"  # the model id /v1/models reports
    api_key: str | None = None
    max_rows: int = 16  # jobs decoded at once
    max_cached_tokens: int = 1 << 16
    max_queue: int = 64
    compiled: bool = False  # the decoder's layers under torch.compile
    limits: ServeLimits = field(default_factory=ServeLimits)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # defaults a request may override


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class _Events:
    """A job's event queue that the engine's thread fills and an async handler awaits."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self, timeout: float):
        return await asyncio.wait_for(self.queue.get(), timeout)


# ---------------------------------------------------------------- requests in

def _decode_base64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise ApiError(400, f"{what} must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what} is not valid base64") from None


def _image(url: Any, limits: ServeLimits) -> Image:
    from PIL import Image as PILImage

    match = _DATA_URL.fullmatch(url.strip()) if isinstance(url, str) else None
    if match is None:
        raise ApiError(400, "images come inline as data URLs (data:image/png;base64,...): the server reads no paths "
                            "or URLs")
    data = _decode_base64(match.group(2), "the image data URL")
    try:
        with PILImage.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except PILImage.DecompressionBombError as e:  # PIL's own refusal, far beyond any limit here
        raise ApiError(413, f"the image is over the pixel limit of {limits.max_image_pixels}: {e}", "too_large") \
            from None
    except Exception:  # PIL raises several types for data that is not an image
        raise ApiError(400, "the image data URL holds no image PIL can read") from None
    if width * height > limits.max_image_pixels:
        raise ApiError(413, f"an image of {width}x{height} pixels is over the limit of {limits.max_image_pixels}",
                       "too_large")
    return Image(data)


def _audio(part: dict, limits: ServeLimits) -> Audio:
    import soundfile as sf

    audio = part.get("input_audio") or part.get("audio")
    if not isinstance(audio, dict):
        raise ApiError(400, "an audio part needs {\"input_audio\": {\"data\": BASE64_WAV, \"format\": \"wav\"}}")
    data = _decode_base64(audio.get("data"), "the audio data")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # soundfile raises RuntimeError / LibsndfileError for bad data
        raise ApiError(400, "the audio data is not a sound file soundfile can read (send WAV)") from None
    if info.duration > limits.max_audio_seconds:
        raise ApiError(413, f"a sound of {info.duration:.1f} s is over the limit of {limits.max_audio_seconds} s",
                       "too_large")
    return Audio(data)


def _segments(content: Any, where: str, limits: ServeLimits) -> list[Segment]:
    if isinstance(content, str):
        return [Text(content)]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: content must be a string or a list of parts")
    out: list[Segment] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(Text(part["text"]))
        elif kind == "image_url":
            image = part.get("image_url")
            out.append(_image(image.get("url") if isinstance(image, dict) else image, limits))
        elif kind in ("input_audio", "audio"):
            out.append(_audio(part, limits))
        else:
            raise ApiError(400, f"{where}: a content part must be text, image_url or input_audio, got {part!r:.80}")
    return out


def conversation_of(messages: Any, limits: ServeLimits) -> Conversation:
    """OpenAI-style messages as a conversation that asks for the assistant's next turn."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError(400, f"message {i} must be an object with 'role' and 'content'")
        turns.append(Turn(str(m["role"]), _segments(m["content"], f"message {i}", limits)))
    try:
        return Conversation(turns).check(prompt=True)
    except OmnitokError as e:
        raise ApiError(400, str(e)) from None


def sampling_of(body: dict, base: SamplingConfig, limits: ServeLimits, **fixed) -> SamplingConfig:
    """The request's sampling settings: the server's defaults, OpenAI's ``max_tokens`` / ``temperature`` /
    ``top_p`` (text), and omnitok's own as ``"omnitok": {"image.top_k": 500, ...}``; ``fixed`` (the route's own:
    an image route's output and grid) cannot be overridden."""
    overrides = body.get("omnitok", {})
    if not isinstance(overrides, dict):
        raise ApiError(400, "'omnitok' must be an object of sampling settings, e.g. {\"image.guidance\": 3}")
    taken = sorted(k for k in overrides if fixed.get(k) is not None)
    if taken:
        raise ApiError(400, f"'omnitok' cannot set {taken[0]!r} on this route (the route sets it)")
    for key, value in overrides.items():  # checked here, not left to the YAML parser's recursion limit (torch's
        # compiler raises the process's: a 500-deep list then parsed, where it had been a RecursionError)
        if not all(_scalar(v) for v in (value if isinstance(value, list) else [value])):
            raise ApiError(400, f"'omnitok' setting {key!r} must be a number, string, boolean or a flat list of them")
    settings = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limits.max_tokens:
            raise ApiError(400, f"max_tokens must be an integer from 1 to {limits.max_tokens}")
        fixed.setdefault("max_new_tokens", max_tokens)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            if not isinstance(body[key], int | float) or isinstance(body[key], bool):
                raise ApiError(400, f"{key} must be a number")
            settings.insert(0, f"text.{key}={float(body[key])}")
    try:
        cfg = sampling_config(settings, base, **fixed)
    except OmnitokError as e:
        raise ApiError(400, str(e)) from None
    if cfg.max_new_tokens > limits.max_tokens:
        raise ApiError(400, f"max_new_tokens must be at most {limits.max_tokens}")
    return cfg


def _scalar(value) -> bool:
    return value is None or isinstance(value, int | float | str | bool)


def _seed(body: dict) -> int:
    seed = body.get("seed")
    if seed is None:
        return secrets.randbelow(1 << 31)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ApiError(400, "seed must be an integer")
    return seed  # its range is the engine's to check (``Engine.submit``: a 400 like every refused job)


# ---------------------------------------------------------------- answers out

def _png(image: np.ndarray) -> str:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _sound(wave: np.ndarray, rate: int, kind: str = "wav") -> bytes:
    """A (channels, samples) waveform as a file of ``SOUND_FORMATS`` kind (pcm: bare 16-bit little-endian samples,
    channels interleaved). Every kind holds the 16-bit samples of the WAV file (the one ``omnitok sample`` writes):
    libsndfile rounds floats to 16 bits one way for WAV and another for FLAC, so FLAC and pcm are made from those
    samples, not from the floats."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave).T, rate, format="WAV", subtype="PCM_16")
    if kind == "wav":
        return buf.getvalue()
    buf.seek(0)
    samples, _ = sf.read(buf, dtype="int16", always_2d=True)
    if kind == "pcm":
        return samples.astype("<i2").tobytes()
    out = io.BytesIO()
    sf.write(out, samples, rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def _wav(wave: np.ndarray, rate: int) -> str:
    return base64.b64encode(_sound(wave, rate)).decode()


def media_part(tok, kind: str, data) -> dict:
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png(data)}}
    return {"type": "audio", "audio": {"data": _wav(data, tok.audio.sample_rate), "format": "wav"}}


def content_of(tok, output: list[int], end_id: int, media: dict[int, Any]) -> list[dict]:
    """The answer's ids as content parts in order: text, then each media span's decoded file."""
    body = output[:-1] if output and output[-1] == end_id else output
    parts, k = [], 0
    for seg in tok.parse(np.asarray(body, dtype=np.int64)):
        if seg.modality == "text":
            parts.append({"type": "text", "text": tok.text.decode(seg.ids)})
        else:
            data = media.get(k)
            k += 1
            if isinstance(data, Exception):
                raise ApiError(500, f"decoding a {seg.modality} span failed: {data}", "decode_failed")
            parts.append(media_part(tok, seg.modality, data))
    return parts


# ---------------------------------------------------------------- the app

class Metrics:
    def __init__(self):
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.tokens_window: list[tuple[float, int]] = []  # (time, engine tokens) samples for tokens/s

    def record_ttft(self, job: Job) -> None:
        if job.first_token is not None:
            self.ttft_sum += job.first_token - job.submitted
            self.ttft_count += 1

    def tokens_per_s(self, tokens: int) -> float:
        now = time.monotonic()
        self.tokens_window = [(t, n) for t, n in self.tokens_window if now - t < 10] + [(now, tokens)]
        (t0, n0), (t1, n1) = self.tokens_window[0], self.tokens_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use or out of range, or an address this machine
    does not have, is refused in one line at once. Port 0 takes a free one (``getsockname`` says which)."""
    if not 0 <= port <= 65535:  # getaddrinfo would wrap it round
        raise OmnitokError(f"port must be 0-65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        raise OmnitokError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock.set_inheritable(True)
    return sock


def create_app(model, tok, cfg: ServeConfig | None = None):
    """The FastAPI app serving ``model`` with its tokenizer ``tok``; the engine runs while the app does."""
    cfg = cfg or ServeConfig()
    limits = cfg.limits
    engine = Engine(model, tok, max_rows=cfg.max_rows, max_tokens=cfg.max_cached_tokens, max_queue=cfg.max_queue,
                    compiled=cfg.compiled)
    chat = tok.chat
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        engine.warm_up(cfg.sampling)  # --compile: before the first request, not in it
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="omnitok", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.code}}, e.status, headers=e.headers)

    @app.exception_handler(404)
    async def not_found(request, e):
        return JSONResponse({"error": {"message": f"no route {request.url.path}", "type": "not_found"}}, 404)

    @app.exception_handler(405)
    async def bad_method(request, e):
        return JSONResponse({"error": {"message": f"{request.method} is not allowed on {request.url.path}",
                                       "type": "method_not_allowed"}}, 405)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if cfg.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
                request.query_params.get("api_key", "")
            if not secrets.compare_digest(given.encode(), cfg.api_key.encode()):
                return JSONResponse({"error": {"message": "a valid API key is needed (Authorization: Bearer KEY)",
                                               "type": "unauthorized"}}, 401)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
            return JSONResponse({"error": {"message": f"the body is over the limit of {limits.max_body_bytes} "
                                                      "bytes", "type": "too_large"}}, 413)
        try:
            return await call_next(request)
        except Exception as e:  # a bug must cost one request, never the server
            return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                           "type": "internal"}}, 500)

    async def read_json(request: Request, known: set[str]) -> dict:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"the body is over the limit of {limits.max_body_bytes} bytes", "too_large")
        try:
            data = parse_json(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ApiError(400, f"unknown or unsupported field {unknown[0]!r}; this route takes "
                                f"{', '.join(sorted(known))}")
        return data

    def submit(job: Job) -> Job:
        try:
            return engine.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), "overloaded", {"Retry-After": "1"}) from None
        except OmnitokError as e:
            raise ApiError(400, str(e)) from None

    async def encode(prompt: Prompt) -> tuple:
        try:
            return await asyncio.to_thread(prompt_tokens, tok, [prompt], chat is not None)
        except OmnitokError as e:
            raise ApiError(400, str(e)) from None

    async def events_of(job: Job, request: Request):
        """The job's events until it is done; the job is cancelled if the client goes away meanwhile."""
        while True:
            try:
                event = await job.events.get(timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                continue
            yield event
            if event[0] == "done":
                metrics.record_ttft(job)
                return

    async def finished(job: Job, request: Request) -> dict[int, Any]:
        """Wait for the job's end; returns its decoded media by span."""
        return {event[1]: event[3] async for event in events_of(job, request) if event[0] == "media"}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.name, "object": "model", "owned_by": "omnitok",
                                            "chat": chat.kind if chat is not None else None}]}

    @app.get("/metrics")
    async def prometheus():
        s = engine.stats
        lines = ["# TYPE omnitok_requests_total counter", f"omnitok_requests_total {s['requests']}",
                 "# TYPE omnitok_requests_finished_total counter", f"omnitok_requests_finished_total {s['finished']}",
                 "# TYPE omnitok_requests_rejected_total counter", f"omnitok_requests_rejected_total {s['rejected']}",
                 "# TYPE omnitok_requests_cancelled_total counter",
                 f"omnitok_requests_cancelled_total {s['cancelled']}",
                 "# TYPE omnitok_requests_timed_out_total counter",
                 f"omnitok_requests_timed_out_total {s['timed_out']}",
                 "# TYPE omnitok_queue_depth gauge", f"omnitok_queue_depth {engine.queue_depth}",
                 "# TYPE omnitok_batch_rows gauge", f"omnitok_batch_rows {engine.batch_rows}",
                 "# TYPE omnitok_tokens_generated_total counter", f"omnitok_tokens_generated_total {s['tokens']}",
                 "# TYPE omnitok_forward_passes_total counter", f"omnitok_forward_passes_total {s['passes']}",
                 "# TYPE omnitok_sjd_drafts_total counter", f"omnitok_sjd_drafts_total {s['drafts']}",
                 "# TYPE omnitok_sjd_accepted_total counter", f"omnitok_sjd_accepted_total {s['accepted']}",
                 # --compile on a GPU: graphs captured (one per batch size and cache size; rising with every
                 # request would mean captures on the decoding path)
                 "# TYPE omnitok_cuda_graphs_captured_total counter",
                 f"omnitok_cuda_graphs_captured_total {CudaGraphs.captured}",
                 "# TYPE omnitok_tokens_per_second gauge",
                 f"omnitok_tokens_per_second {metrics.tokens_per_s(s['tokens']):.3f}",
                 "# TYPE omnitok_time_to_first_token_seconds summary",
                 f"omnitok_time_to_first_token_seconds_sum {metrics.ttft_sum:.6f}",
                 f"omnitok_time_to_first_token_seconds_count {metrics.ttft_count}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, CHAT_FIELDS)
        conversation = conversation_of(body.get("messages"), limits)
        if body.get("n", 1) != 1:
            raise ApiError(400, "n must be 1 for chat completions (ask /v1/images/generations for several images)")
        sampling = sampling_of(body, cfg.sampling, limits)
        seed = _seed(body)
        if chat is not None:
            prompt = Prompt("request", Document(conversation.segments), "request", conversation)
        else:  # a base model continues the messages' content
            prompt = Prompt("request", Document(conversation.segments))
        ids, end, forbidden, requests = await encode(prompt)
        job = submit(Job(ids[0], sampling, seed, end, tuple(forbidden), chat is not None, requests[0],
                         limits.request_timeout, events=_Events(asyncio.get_running_loop())))
        created, rid = int(time.time()), f"chatcmpl-{secrets.token_hex(12)}"
        if body.get("stream"):
            return StreamingResponse(stream(job, request, rid, created, end), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        media = await finished(job, request)
        if job.stopped.startswith("error"):
            raise ApiError(400, job.stopped.removeprefix("error: "))
        message = {"role": "assistant", "content": content_of(tok, job.output, end, media)}
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.name, "seed": seed,
                "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(job.stopped)}],
                "usage": {"prompt_tokens": len(ids[0]), "completion_tokens": len(job.output),
                          "total_tokens": len(ids[0]) + len(job.output)}}

    async def stream(job: Job, request: Request, rid: str, created: int, end: int):
        def chunk(delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": cfg.name, "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish}]}) + "\n\n"

        yield chunk({"role": "assistant"})
        text = tok.text.stream()  # the current text segment: its text as it becomes final
        try:
            async for event in events_of(job, request):
                if event[0] == "token":
                    t = event[1]
                    closes = t == end or tok.layout.modality_of(np.asarray([t]))[0] != Modality.TEXT
                    piece = text.flush() if closes else text.push(t)
                    if piece:
                        yield chunk({"content": piece})
                elif event[0] == "media":
                    _, k, kind, data = event
                    if isinstance(data, Exception):
                        yield chunk({"content": [{"type": "error", "error": f"decoding failed: {data}"}]})
                    else:
                        yield chunk({"content": [media_part(tok, kind, data)], "media_index": k})
                else:
                    piece = text.flush()  # the answer stopped inside its text (max_tokens)
                    if piece:
                        yield chunk({"content": piece})
                    yield chunk({}, _finish_reason(job.stopped))
                    yield "data: [DONE]\n\n"
        finally:
            if job.stopped is None:  # the client went away mid-stream
                job.cancel()

    async def media_of(request: Request, text: str, sampling: SamplingConfig, seed: int, n: int) -> list:
        """``n`` samples (seeds ``seed``, ``seed + 1``, ...) that answer (a chat model) or continue (a base model)
        ``text`` with one span of ``sampling.output``'s kind: their jobs and decoded spans."""
        turn = Conversation([Turn("user", [Text(text)])]) if chat is not None else None
        ids, end, forbidden, requests = await encode(Prompt(text, Document([Text(text)]), "request", turn))
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
        try:
            for i in range(n):
                jobs.append(submit(Job(ids[0], sampling, seed + i, end, tuple(forbidden), False, requests[0],
                                       limits.request_timeout, events=_Events(loop))))
        except ApiError:
            for job in jobs:  # the queue filled midway: the ones already in are not wanted any more
                job.cancel()
            raise
        out = []
        for job in jobs:
            media = await finished(job, request)
            if job.stopped.startswith("error"):
                raise ApiError(400, job.stopped.removeprefix("error: "))
            if not isinstance(media.get(0), np.ndarray):
                raise ApiError(500, f"no {sampling.output} came back ({job.stopped})", "decode_failed")
            out.append((job, media[0]))
        return out

    def text_field(body: dict, name: str) -> str:
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ApiError(400, f"{name!r} must be a non-empty string")
        return value

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await read_json(request, IMAGE_FIELDS)
        prompt_text = text_field(body, "prompt")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limits.max_n:
            raise ApiError(400, f"n must be an integer from 1 to {limits.max_n}")
        if body.get("response_format", "b64_json") != "b64_json":
            raise ApiError(400, "response_format must be b64_json (the server keeps no files to link to)")
        grid = None
        if body.get("size") is not None:
            rows, x, cols = str(body["size"]).lower().partition("x")
            if not x or not rows.isdigit() or not cols.isdigit():
                raise ApiError(400, "size is the image's grid of codes, ROWSxCOLS (e.g. 16x16)")
            grid = [int(rows), int(cols)]
        if not tok.layout.has_image:
            raise ApiError(400, "this model's token layout has no image modality")
        fixed = {"output": "image", "grid": grid, "max_new_tokens": limits.max_tokens}
        sampling = sampling_of({k: v for k, v in body.items() if k != "max_tokens"}, cfg.sampling, limits, **fixed)
        done = await media_of(request, prompt_text, sampling, _seed(body), n)
        return {"created": int(time.time()), "data": [{"b64_json": _png(image), "seed": job.seed}
                                                      for job, image in done]}

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        """OpenAI's speech route for any sound the model makes: ``input`` is the request (a chat model answers it
        with a sound) or the text a sound follows (a base model); the answer is the audio file itself."""
        body = await read_json(request, SPEECH_FIELDS)
        text = text_field(body, "input")
        if body.get("voice", "default") != "default":
            raise ApiError(400, "this model has one voice: leave out 'voice' or give \"default\"")
        kind = body.get("response_format", "wav")
        if not isinstance(kind, str) or kind not in SOUND_FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(SOUND_FORMATS)} (pcm: 16-bit "
                                "little-endian samples at the rate in the X-Sample-Rate header)")
        speed = body.get("speed", 1)
        if not isinstance(speed, int | float) or isinstance(speed, bool) or speed != 1:
            raise ApiError(400, "speed must be 1: the sound comes at the pace the model makes it")
        if not tok.layout.has_audio:
            raise ApiError(400, "this model's token layout has no audio modality")
        sampling = sampling_of(body, cfg.sampling, limits, output="audio", max_new_tokens=limits.max_tokens)
        [(job, wave)] = await media_of(request, text, sampling, _seed(body), 1)
        rate = tok.audio.sample_rate
        return Response(_sound(wave, rate, kind), media_type=SOUND_FORMATS[kind],
                        headers={"X-Seed": str(job.seed), "X-Sample-Rate": str(rate),
                                 "X-Channels": str(np.asarray(wave).shape[0])})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from importlib.resources import files

        return (files("omnitok.serve") / "page.html").read_text(encoding="utf-8")

    return app


def _finish_reason(stopped: str) -> str:
    return {"end": "stop", "length": "length"}.get(stopped, stopped)
