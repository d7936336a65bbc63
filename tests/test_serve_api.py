"""`omnitok serve`'s HTTP API through an in-process client and a real server process: chat completions (whole and
streamed), image generations, models, health, metrics, the API key, and bad requests that get a 4xx and never take
the server down."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ASSETS, PHOTOS
from PIL import Image as PILImage

from omnitok.model.sample import load_model
from omnitok.model.sampler import ModalitySampling, SamplingConfig
from omnitok.serve.app import ServeConfig, ServeLimits, create_app

SAMPLING = SamplingConfig(max_new_tokens=100, max_audio_frames=6, image=ModalitySampling(top_k=50, guidance=2.0),
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


def test_image_generations_give_n_pictures_of_the_asked_grid(client):
    r = client.post("/v1/images/generations", json={"prompt": "Draw a red circle.", "n": 3, "size": "4x6",
                                                    "seed": 5})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6, 7]
    for d in data:
        assert PILImage.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size == (24, 16)  # 4 rows, 6 cols


def test_models_health_metrics_and_the_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0] == {"id": "tiny-chat", "object": "model", "owned_by": "omnitok",
                                                          "chat": "markers"}
    metrics = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    assert values["omnitok_requests_total"] >= 1 and values["omnitok_tokens_generated_total"] > 0
    assert values["omnitok_time_to_first_token_seconds_count"] >= 1 and "omnitok_queue_depth" in values
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<script>" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from outside: no CDN


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
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
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "omnitok": {"image.top_q": 3}}, 400, "top_q"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature must be"),
])
def test_bad_chat_requests_get_a_4xx_naming_the_problem(client, body, status, message):
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
    for bad in ({"prompt": ""}, {"prompt": "x", "n": 99}, {"prompt": "x", "size": "big"},
                {"prompt": "x", "size": "99x99"}, {"prompt": "x", "response_format": "url"}):
        assert client.post("/v1/images/generations", json=bad).status_code == 400
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


def test_a_base_model_is_served_as_continuation(model_dir):
    from fastapi.testclient import TestClient

    model, tok = load_model(model_dir)
    with TestClient(create_app(model, tok, ServeConfig(sampling=SAMPLING))) as c:
        assert c.get("/v1/models").json()["data"][0]["chat"] is None
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a red circle"}],
                                                 "seed": 1, "max_tokens": 40})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_real_server_process_answers_a_real_http_client(chat_model_dir, tmp_path):
    import httpx

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "omnitok", "serve", "--model", str(chat_model_dir), "--port",
                               str(port), "--max-new-tokens", "60"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMNITOK_API_KEY": "k"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "server.log").read_text())
        headers = {"Authorization": "Bearer k"}
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"messages": [{"role": "user", "content": "Draw a red circle."}], "seed": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert httpx.post(url + "/v1/chat/completions", content=b"{", headers=headers).status_code == 400
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 200  # still serving
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
