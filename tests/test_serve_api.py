"""`omnitok serve`'s HTTP API through an in-process client and a real server process: chat completions (whole and
streamed), image generations, models, health, metrics, the API key, and bad requests that get a 4xx and never take
the server down."""

import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ASSETS, PHOTOS
from PIL import Image as PILImage

from omnitok.cli import main
from omnitok.model.sample import load_model
from omnitok.model.sampler import ModalitySampling, SamplingConfig
from omnitok.serve.app import ServeConfig, ServeLimits, create_app

SAMPLING = SamplingConfig(max_new_tokens=100, max_audio_s=0.06, image=ModalitySampling(top_k=50, guidance=2.0),
                          audio=ModalitySampling(guidance=1.5))


def png_url(array) -> str:
    buf = io.BytesIO()
    PILImage.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_b64() -> str:
    return base64.b64encode(next(ASSETS.glob("*.wav")).read_bytes()).decode()


@pytest.fixture(scope="module")
def client(chat_model_dir):
    from fastapi.testclient import TestClient

    model, tok = load_model(chat_model_dir)
    app = create_app(model, tok, ServeConfig(name="tiny-chat", sampling=SAMPLING,
                                             limits=ServeLimits(max_body_bytes=1 << 20, max_image_pixels=512 * 512,
                                                                max_tokens=200)))
    with TestClient(app) as c:
        yield c


def sse(response) -> list[dict]:
    events = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            events.append(json.loads(block[6:]))
    assert response.text.rstrip().endswith("data: [DONE]")
    return events


def huge_png_header(side: int = 20000) -> bytes:
    """A PNG that says it is ``side`` x ``side`` pixels (its header, and a token of data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def ask(client, content, seed, **extra):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                     "seed": seed, **extra})


def test_chat_completions_answer_with_text_pictures_and_sounds_the_same_way_streamed_or_not(client):
    question = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": png_url(
        np.asarray(PILImage.fromarray(PHOTOS[0]).resize((32, 32))))}},
        {"type": "input_audio", "input_audio": {"data": wav_b64(), "format": "wav"}}]
    kinds = set()
    for seed in range(4):
        whole = ask(client, question, seed)
        assert whole.status_code == 200, whole.text
        body = whole.json()
        assert body["model"] == "tiny-chat" and body["seed"] == seed and body["object"] == "chat.completion"
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and choice["message"]["role"] == "assistant"
        parts = choice["message"]["content"]
        assert ask(client, question, seed).json()["choices"][0]["message"]["content"] == parts  # seeded
        for part in parts:
            kinds.add(part["type"])
            if part["type"] == "image_url":
                png = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                width, height = PILImage.open(io.BytesIO(png)).size
                assert width % 4 == 0 and height % 4 == 0  # a grid of 4-pixel codes
            elif part["type"] == "audio":
                import soundfile as sf

                wave, rate = sf.read(io.BytesIO(base64.b64decode(part["audio"]["data"])))
                assert rate == 24000 and len(wave) > 0
        streamed = sse(ask(client, question, seed, stream=True))
        assert streamed[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert streamed[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
        text = "".join(e["choices"][0]["delta"]["content"] for e in streamed
                       if isinstance(e["choices"][0]["delta"].get("content"), str))
        assert text == "".join(p["text"] for p in parts if p["type"] == "text")
        media = [p for e in streamed if isinstance(e["choices"][0]["delta"].get("content"), list)
                 for p in e["choices"][0]["delta"]["content"]]
        assert media == [p for p in parts if p["type"] != "text"]
    assert {"image_url", "audio"} <= kinds  # this model favours pictures and sounds


@pytest.mark.parametrize("sjd", [{}, {"image.sjd_window": 6, "audio.sjd_window": 4}], ids=["plain", "sjd"])
def test_a_seeded_request_answers_what_omnitok_sample_writes_for_that_seed(client, chat_model_dir, tmp_path, sjd):
    import soundfile as sf

    from omnitok.cli import main

    assert main(["sample", "--chat", "--model", str(chat_model_dir), "--out", str(tmp_path / "s"), "--seed", "7",
                 "--num-samples", "3", "--max-new-tokens", "100", "max_audio_s=0.06", "image.top_k=50",
                 "image.guidance=2", "audio.guidance=1.5", *[f"{k}={v}" for k, v in sjd.items()],
                 "--prompt", "Draw a red circle."]) == 0
    for k in range(3):  # sample k has seed 7 + k
        record = json.loads((tmp_path / "s" / f"{k:03d}" / "sample.json").read_text())
        parts = ask(client, "Draw a red circle.", 7 + k, omnitok=sjd).json()["choices"][0]["message"]["content"]
        assert [p["type"] for p in parts] == [{"image": "image_url", "audio": "audio"}.get(s["type"], "text")
                                              for s in record["segments"]]
        for part, seg in zip(parts, record["segments"]):
            if seg["type"] == "text":
                assert part["text"] == seg["text"]
            elif seg["type"] == "image":
                png = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                ours = np.asarray(PILImage.open(io.BytesIO(png)))
                assert np.array_equal(ours, np.asarray(PILImage.open(tmp_path / "s" / f"{k:03d}" / seg["file"])))
            else:
                ours, _ = sf.read(io.BytesIO(base64.b64decode(part["audio"]["data"])))
                theirs, _ = sf.read(tmp_path / "s" / f"{k:03d}" / seg["file"])
                assert np.array_equal(ours, theirs)


def test_image_generations_give_n_pictures_of_the_asked_grid(client):
    r = client.post("/v1/images/generations", json={"prompt": "Draw a red circle.", "n": 3, "size": "4x6",
                                                    "seed": 5})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6, 7]
    for d in data:
        assert PILImage.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size == (24, 16)  # 4 rows, 6 cols


def test_speech_answers_with_the_sound_omnitok_sample_writes_for_that_seed(client, chat_model_dir, tmp_path):
    """OpenAI's speech route, for any sound: the file itself, WAV, FLAC or bare 16-bit samples, each the sound that
    ``omnitok sample --chat --output-modality audio`` writes for the seed."""
    import soundfile as sf

    from omnitok.cli import main

    assert main(["sample", "--chat", "--model", str(chat_model_dir), "--out", str(tmp_path / "s"), "--seed", "3",
                 "--output-modality", "audio", "--max-new-tokens", "100", "max_audio_s=0.06", "audio.guidance=1.5",
                 "--prompt", "Play a rising chirp."]) == 0
    theirs, rate = sf.read(tmp_path / "s" / "000" / "01.wav", dtype="int16")
    for kind in ("wav", "flac", "pcm"):
        r = client.post("/v1/audio/speech", json={"input": "Play a rising chirp.", "seed": 3, "voice": "default",
                                                  "response_format": kind})
        assert r.status_code == 200, r.text
        assert r.headers["x-seed"] == "3" and r.headers["x-sample-rate"] == str(rate) == "24000"
        assert r.headers["content-type"] == {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}[kind]
        if kind == "pcm":
            ours = np.frombuffer(r.content, dtype="<i2").reshape(-1, int(r.headers["x-channels"])).squeeze(-1)
        else:
            ours, their_rate = sf.read(io.BytesIO(r.content), dtype="int16")
            assert their_rate == rate
        assert len(ours) > 0 and np.array_equal(ours, theirs)
    for bad, message in (({"input": ""}, "'input' must be"), ({"input": "x", "voice": "alloy"}, "one voice"),
                         ({"input": "x", "response_format": "mp3"}, "wav, flac, pcm"),
                         ({"input": "x", "speed": 1.5}, "speed must be 1"),
                         ({"input": "x", "stream": True}, "'stream'"), ({"input": "x", "seed": "one"}, "seed must be"),
                         ({"input": "x", "omnitok": {"output": "image"}}, "cannot set 'output'")):
        r = client.post("/v1/audio/speech", json=bad)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_models_health_metrics_and_the_page(client):
    from omnitok.model.decoder import CudaGraphs

    graphs_before = CudaGraphs.captured
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0] == {"id": "tiny-chat", "object": "model", "owned_by": "omnitok",
                                                          "chat": "markers"}
    r = client.post("/v1/images/generations", json={"prompt": "Draw a red circle.", "size": "4x6", "seed": 1,
                                                    "omnitok": {"image.sjd_window": 8}})
    assert r.status_code == 200, r.text
    metrics = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    assert values["omnitok_requests_total"] >= 1 and values["omnitok_tokens_generated_total"] > 0
    # the picture's 24 codes were drafted in windows of up to 8 (speculative Jacobi decoding)
    assert 0 <= values["omnitok_sjd_accepted_total"] <= values["omnitok_sjd_drafts_total"]
    assert values["omnitok_sjd_drafts_total"] >= 8 and values["omnitok_forward_passes_total"] > 0
    assert values["omnitok_time_to_first_token_seconds_count"] >= 1 and "omnitok_queue_depth" in values
    # the process's count (tests before this one emulated captures); none on a CPU
    assert values["omnitok_cuda_graphs_captured_total"] == CudaGraphs.captured == graphs_before
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<script>" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from outside: no CDN


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ({"messages": [{"role": "user", "content": "hi"}], "omnitok": {"image.guidance": json.loads("[" * 500 + "]" * 500)}
      }, 400, "'image.guidance' must be a number, string, boolean or a flat list"),  # once a 500 from the YAML parser
    ({"messages": [{"role": "user", "content": "hi"}], "omnitok": {"grid": [4, {"a": 1}]}}, 400, "flat list of them"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "'user' belongs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     400, "reads no paths or URLs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     400, "reads no paths or URLs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     400, "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     400, "no image PIL can read"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "aGVsbG8="}}]}]},
     400, "not a sound file"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "text, image_url or input_audio"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "a seed must be from 0 to 2**64 - 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 1 << 64}, 400, "a seed must be from 0 to 2**64 - 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "7"}, 400, "seed must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "omnitok": {"image.top_q": 3}}, 400, "top_q"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}, 400, "unsupported field 'logit_bias'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                      + "{bomb}"}}]}]},
     413, "over the pixel limit"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "{broken_wav}"}}]}]},
     400, "not a sound file"),
])
def test_bad_chat_requests_get_a_4xx_naming_the_problem(client, body, status, message):
    if isinstance(body, dict):  # a 20000 x 20000 PNG (its header: nothing is decoded) and a WAV with a broken header
        wav = next(ASSETS.glob("*.wav")).read_bytes()
        body = json.loads(json.dumps(body).replace("{bomb}", base64.b64encode(huge_png_header()).decode()).replace(
            "{broken_wav}", base64.b64encode(b"RIFX" + wav[4:12] + b"junk" + wav[16:]).decode()))
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/chat/completions", **kwargs)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_limits_routes_and_a_full_queue_are_refused_and_the_server_goes_on(client):
    big = np.zeros((600, 600, 3), dtype=np.uint8)
    r = ask(client, [{"type": "image_url", "image_url": {"url": png_url(big)}}], 0)
    assert r.status_code == 413 and "over the limit of 262144" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413 and "body is over the limit" in r.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/chat/completions").status_code == 405
    for bad in ({"prompt": ""}, {"prompt": "x", "n": 10000}, {"prompt": "x", "size": "big"}, {"prompt": "x", "q": 1},
                {"prompt": "x", "size": "99x99"}, {"prompt": "x", "response_format": "url"},
                {"prompt": "x", "omnitok": {"output": "audio"}}, {"prompt": "x", "omnitok": {"max_new_tokens": 5}},
                {"prompt": "x", "n": 2, "seed": (1 << 64) - 1}):  # the second picture's seed is one too many
        assert client.post("/v1/images/generations", json=bad).status_code == 400
    for bad in ({"input": "x", "response_format": "mp3"}, {"input": "x", "response_format": ["wav"]},
                {"input": "x", "response_format": {}}):
        assert client.post("/v1/audio/speech", json=bad).status_code == 400
    engine = client.app.state.engine
    engine.max_queue = 0
    try:
        r = ask(client, "hi", 0)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        engine.max_queue = 64
    assert ask(client, "Draw a red circle.", 0).status_code == 200  # and it goes on


def test_the_api_key_guards_every_route_but_health(chat_model_dir):
    from fastapi.testclient import TestClient

    model, tok = load_model(chat_model_dir)
    with TestClient(create_app(model, tok, ServeConfig(api_key="s3cret", sampling=SAMPLING))) as c:
        assert c.get("/health").status_code == 200
        for path in ("/", "/v1/models", "/metrics"):
            assert c.get(path).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/?api_key=s3cret").status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_the_server_warms_its_engine_up_with_its_own_sampling_defaults(chat_model_dir, monkeypatch):
    """``omnitok serve --compile image.sjd_window=16``: the engine's warm-up (before the first request) gets the
    server's defaults, so it also compiles the windows they draft (``test_serve``: what the warm-up does with them)."""
    from fastapi.testclient import TestClient

    from omnitok.serve.engine import Engine

    seen = []
    monkeypatch.setattr(Engine, "warm_up", lambda self, defaults: seen.append(defaults))
    model, tok = load_model(chat_model_dir)
    cfg = ServeConfig(compiled=True, sampling=SamplingConfig(image=ModalitySampling(sjd_window=16)))
    with TestClient(create_app(model, tok, cfg)) as c:
        assert c.get("/health").status_code == 200
    assert seen == [cfg.sampling]


def test_a_base_model_is_served_as_continuation(model_dir):
    from fastapi.testclient import TestClient

    model, tok = load_model(model_dir)
    with TestClient(create_app(model, tok, ServeConfig(sampling=SAMPLING))) as c:
        assert c.get("/v1/models").json()["data"][0]["chat"] is None
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a red circle"}],
                                                 "seed": 1, "max_tokens": 40})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 40


@contextlib.contextmanager
def running_server(model_dir, tmp_path, *args, env=None):
    """`omnitok serve` in a process of its own on the free loopback port it picks (``--port 0``, read from the URL it
    prints): yields its URL and its process."""
    import httpx

    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "omnitok", "serve", "--model", str(model_dir), "--port", "0",
                               *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        for _ in range(240):
            url = re.search(r"on (http://127\.0\.0\.1:\d+)/", log_path.read_text())
            if url or server.poll() is not None:
                break
            time.sleep(0.5)
        assert url and server.poll() is None, log_path.read_text()
        url = url.group(1)
        for _ in range(240):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            raise AssertionError("the server did not start")
        assert server.poll() is None, log_path.read_text()
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_an_address_it_cannot_listen_on_is_refused_in_one_line_before_the_model_loads(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setattr("omnitok.model.sample.load_model", lambda *a, **k: pytest.fail("it loaded the model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, says in [(["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
                           (["--port", "99999"], "port must be 0-65535, got 99999"),  # not wrapped round to 34463
                           (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:8000: Cannot assign requested"),
                           (["--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid:8000: ")]:
            assert main(["serve", "--model", str(tmp_path), *args]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"omnitok: error: {says}"), err


def test_the_real_server_process_answers_a_real_http_client(chat_model_dir, tmp_path):
    import httpx

    with running_server(chat_model_dir, tmp_path, "--max-new-tokens", "60", env={"OMNITOK_API_KEY": "k"}) as (url, _):
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the environment
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"messages": [{"role": "user", "content": "Draw a red circle."}], "seed": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert httpx.post(url + "/v1/chat/completions", content=b"{", headers=headers).status_code == 400
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 200  # still serving


def rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


@pytest.mark.slow
def test_load_mixed_concurrent_requests_with_cancellations_and_malformed_ones(chat_model_dir, tmp_path):
    """32 requests at once: 22 valid (chats with text, pictures and sounds in and out, streamed or not, image
    generations and speech), 5 cancelled midway by their clients, 5 malformed. Every valid one gets what it gets
    alone, the malformed get a 4xx, the cancelled leave the batch, nothing hangs, and another round does not grow the
    memory."""
    import asyncio

    import httpx

    photo = png_url(np.asarray(PILImage.fromarray(PHOTOS[2]).resize((32, 32))))
    asks = ["Draw a red circle.", "Play a rising chirp.", "Hello",
            [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": photo}}],
            [{"type": "input_audio", "input_audio": {"data": wav_b64()}}, {"type": "text", "text": "And this?"}]]
    valid = []
    for i in range(22):
        if i % 6 == 5:
            valid.append(("/v1/images/generations", {"prompt": "Draw a blue square.", "seed": i}))
        elif i % 12 == 4:
            valid.append(("/v1/audio/speech", {"input": "Play a falling chirp.", "seed": i}))
        else:
            valid.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": asks[i % 5]}],
                                                   "seed": i, "stream": i % 2 == 0}))
    malformed = [b"{", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                   "image_url": {"url": "/etc/passwd"}}]}]},
                 {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1},
                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9},
                 {"messages": "hi"}]

    async def one(client, url, path, body):
        if body.get("stream"):
            async with client.stream("POST", url + path, json=body) as r:
                events = [json.loads(line[6:]) async for line in r.aiter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                           if isinstance(e["choices"][0]["delta"].get("content"), str))
            media = [p for e in events if isinstance(e["choices"][0]["delta"].get("content"), list)
                     for p in e["choices"][0]["delta"]["content"]]
            return r.status_code, {"text": text, "media": media, "end": events[-1]["choices"][0]["finish_reason"]}
        r = await client.post(url + path, json=body)
        if path.endswith("speech"):
            return r.status_code, r.content  # the WAV file
        if path.endswith("completions") and r.status_code == 200:
            parts = r.json()["choices"][0]["message"]["content"]
            return r.status_code, {"text": "".join(p["text"] for p in parts if p["type"] == "text"),
                                   "media": [p for p in parts if p["type"] != "text"],
                                   "end": r.json()["choices"][0]["finish_reason"]}
        return r.status_code, r.json()["data"]  # the pictures and their seeds

    async def cancelled(client, url, seed):
        # a whole 8x8 picture (68 tokens at least): the client leaves after the first chunk, long before the end
        body = {"messages": [{"role": "user", "content": "Draw a red circle."}], "seed": seed, "stream": True,
                "max_tokens": 200, "omnitok": {"output": "image", "grid": [8, 8]}}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # the client goes away midway
        return r.status_code

    async def bad(client, url, body):
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        return (await client.post(url + "/v1/chat/completions", **kwargs)).status_code

    async def all_at_once(url):
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.wait_for(asyncio.gather(
                *(one(client, url, path, body) for path, body in valid),
                *(cancelled(client, url, 100 + k) for k in range(5)),
                *(bad(client, url, body) for body in malformed)), 600)

    async def solo(url):
        async with httpx.AsyncClient(timeout=300) as client:
            return [await one(client, url, path, body) for path, body in valid]

    def settled(url):
        for _ in range(120):  # the cancelled requests leave the batch, nothing is left waiting
            m = {line.split()[0]: float(line.split()[1]) for line in httpx.get(url + "/metrics").text.splitlines()
                 if not line.startswith("#")}
            if m["omnitok_batch_rows"] == 0 and m["omnitok_queue_depth"] == 0 and \
                    m["omnitok_requests_finished_total"] == m["omnitok_requests_total"]:
                return m
            time.sleep(0.5)
        raise AssertionError(f"the server did not settle: {m}")

    settings = ["--max-new-tokens", "100", "--max-rows", "8", "image.guidance=2", "image.top_k=50",
                "audio.guidance=1.5", "max_audio_s=0.06"]
    with running_server(chat_model_dir, tmp_path, *settings) as (url, server):
        alone = asyncio.run(solo(url))
        assert all(status == 200 for status, _ in alone)
        assert {p["type"] for _, r in alone if isinstance(r, dict) and "media" in r for p in r["media"]} >= {
            "image_url", "audio"}
        assert all(len(r) > 44 for (path, _), (_, r) in zip(valid, alone) if path.endswith("speech"))  # WAV samples
        idle = rss_mib(server.pid)
        for round in (1, 2):
            results = asyncio.run(all_at_once(url))
            for (status, got), (_, want) in zip(results[:22], alone):
                assert status == 200 and got == want
            assert all(status == 200 for status in results[22:27])
            assert [status for status in results[27:]] == [400] * 5
            assert settled(url)["omnitok_requests_cancelled_total"] == 5 * round  # they stopped midway
            after = rss_mib(server.pid)
        assert after < idle * 1.25 + 50, (idle, after)  # no growth that stays
