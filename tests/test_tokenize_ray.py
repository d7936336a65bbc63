"""``omnitok tokenize --engine ray`` on a local Ray cluster: the local engine's bytes, crashes, kills, no Ray."""

import gc
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import PHOTOS, jpeg
from PIL import Image
from test_tokenize import digest, kill_after_shards, specs

from omnitok.cli import main
from omnitok.data.shards import iter_samples, read_manifest
from omnitok.data.tokenize import TokenizeConfig, tokenize
from omnitok.tokenizers.multimodal import MultimodalTokenizer

ray = pytest.importorskip("ray")
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster of 2 CPUs (one encoder, one to prepare media: no room to spare) whose workers die on media
    named crash*, whose encoders take 10 s over a block from files named busy* and log each start
    (tests/worker_crash.py); yields the cluster's address and the log's path."""
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    starts = tmp_path_factory.mktemp("encoders") / "starts"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMNITOK_TEST_ENCODER_STARTS": str(starts)},
                          "worker_process_setup_hook": "worker_crash.install"})
    yield ray.get_runtime_context().gcs_address, starts
    ray.shutdown()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, corpus):
    """The interleaved JSONL, pair folder and tar of ``corpus``, plus hostile files and lines."""
    root = tmp_path_factory.mktemp("mixed")
    hostile = root / "hostile"
    hostile.mkdir()
    photo = PHOTOS[2][::4, ::4]
    files = {"good.jpg": jpeg(photo), "truncated.jpg": jpeg(PHOTOS[1])[:3000], "empty.png": b"",
             "corrupt.wav": b"RIFF\x10\x00\x00\x00WAVEfmt junk"}
    for name, data in files.items():
        (hostile / name).write_bytes(data)
        (hostile / name).with_suffix(".txt").write_text(f"caption of {name}")
    sf.write(hostile / "stereo.wav", 0.1 * np.random.default_rng(0).standard_normal((6000, 2)), 44_100)
    (hostile / "stereo.txt").write_text("stereo noise")
    (root / "more.jsonl").write_text(json.dumps({"image": "hostile/missing.png", "text": "gone"}) + "\n"
                                     + "{broken json\n" + json.dumps([{"text": "just text"}]) + "\n")
    media = corpus / "media"
    chats = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                        {"type": "image", "image": str(media / "img01.png")}]},
                           {"role": "assistant", "content": "A photo."},
                           {"role": "user", "content": "Draw one and say hello."},
                           {"role": "assistant", "content": [{"type": "image", "image": str(media / "img02.png")},
                                                             {"type": "audio", "audio": str(media / "hello.wav")}]}]},
             {"image": str(media / "img03.png"), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                   {"from": "gpt", "value": "A crop."}]},
             {"messages": [{"role": "user", "content": "no answer"}]}]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return [*specs(corpus), str(hostile), str(root / "more.jsonl"), str(root / "chats.jsonl")]


def outputs(directory: Path) -> tuple:
    manifest = read_manifest(directory)
    for volatile in ("seconds", "command"):
        manifest.pop(volatile)
    return digest(directory), (directory / "errors.jsonl").read_text(), manifest


def test_without_ray_the_engine_says_how_to_install_it(tmp_path, tokdir, corpus, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["tokenize", "--tokenizer", str(tokdir), "--input", str(corpus / "pairs"), "--out",
                 str(tmp_path / "s"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "omnitok: error: --engine ray needs Ray: pip install 'omnitok[ray]' (or pip install ray)"
    assert not (tmp_path / "s").exists()


def test_a_cluster_nothing_answers_for_is_refused_in_one_line(tmp_path, tokdir, corpus, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["tokenize", "--tokenizer", str(tokdir), "--input", str(corpus / "pairs"), "--out",
                 str(tmp_path / "s"), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"omnitok: error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert not (tmp_path / "s").exists()


def test_the_ray_engine_writes_the_local_engines_bytes(tmp_path, cluster, chat_tokdir, mixed, monkeypatch):
    common = {"inputs": mixed, "tokenizer": str(chat_tokdir), "shard_size": 5}
    tokenize(TokenizeConfig(**common, out=str(tmp_path / "local"), workers=0, batch_size=4))
    local = outputs(tmp_path / "local")
    assert len(local[0]) == 6 and read_manifest(tmp_path / "local")["error_count"] == 6
    metas = [meta for _, _, meta in iter_samples(tmp_path / "local")]
    assert sum("trained" in m for m in metas) == 2 and sum("requests" in m for m in metas) == 1  # conversations
    # other blocks and batches than the local run's; this process, the driver, loads no model (its tokenizer
    # loader fails here), the cluster's workers do
    starts = cluster[1]
    starts.unlink(missing_ok=True)
    with monkeypatch.context() as m:
        m.setattr(MultimodalTokenizer, "from_dir", classmethod(lambda cls, d: pytest.fail("the driver loaded it")))
        tokenize(TokenizeConfig(**common, out=str(tmp_path / "ray"), engine="ray", batch_size=3))
    assert outputs(tmp_path / "ray") == local
    assert len(starts.read_text().splitlines()) == 1  # one encoder (2 CPUs), started once for all the blocks
    assert cluster_idle()  # the encoder went with the job (the next test needs both CPUs)


def test_a_damaged_tokenizer_is_refused_in_one_line_before_any_output(tmp_path, cluster, tokdir, corpus, capsys):
    damaged = tmp_path / "tok"
    shutil.copytree(tokdir, damaged)
    layout = json.loads((damaged / "layout.json").read_text())
    layout["fingerprints"]["image"] = "0" * 64
    (damaged / "layout.json").write_text(json.dumps(layout))
    assert main(["tokenize", "--tokenizer", str(damaged), "--input", str(corpus / "pairs"), "--out",
                 str(tmp_path / "s"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image tokenizer at" in err[0] and "has fingerprint" in err[0], err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_worker_that_dies_on_a_file_loses_only_that_item(tmp_path, cluster, tokdir, corpus):
    """The worker preparing crash.png dies while the encoder is busy with busy.png's block (tests/worker_crash.py
    orders them): the job ends with that item recorded and no encoder left. With Python's cycle collector off: Ray
    Data, used before, left a failed dataset's busy encoder referenced from a cycle of garbage, and on 2 CPUs the
    retry waited forever for its CPU (twice in CI); the driver now kills its encoders itself."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, name in enumerate(["a", "b", "busy", "c", "crash", "d"]):
        Image.fromarray(PHOTOS[i % 4][::8, ::8]).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"photo {name}")
    common = {"inputs": [str(folder)], "tokenizer": str(tokdir), "batch_size": 2}
    gc.disable()
    try:
        manifest = tokenize(TokenizeConfig(**common, out=str(tmp_path / "ray"), engine="ray"))
    finally:
        gc.enable()
    assert cluster_idle()
    errors = [json.loads(line) for line in (tmp_path / "ray" / "errors.jsonl").read_text().splitlines()]
    assert [(e["source"], e["reason"]) for e in errors] == [(str(folder / "crash.png"), "a worker died preparing "
                                                             "this item")]
    assert manifest["errors"] == {"a worker died preparing this item": 1}
    tokenize(TokenizeConfig(**common, out=str(tmp_path / "local"), workers=0))  # no hook here: crash.png is read
    local = {key: tokens.tobytes() for key, tokens, meta in iter_samples(tmp_path / "local")
             if meta["source"] != str(folder / "crash.png")}
    ours = {key: tokens.tobytes() for key, tokens, _ in iter_samples(tmp_path / "ray")}
    assert ours == local and len(ours) == 5


def cluster_idle(timeout: float = 15) -> bool:
    """Whether every CPU of the test cluster is free again within ``timeout`` s: no encoder outlived its job."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_shards_of_an_uninterrupted_run(tmp_path, cluster, tokdir, corpus):
    """Last in the module: the rerun restarts the cluster (3 CPUs, without the crash hook) and resumes with two
    encoders (so that they leave one CPU to prepare media); three are refused."""
    args = ["--tokenizer", str(tokdir), "--input", *specs(corpus), "--shard-size", "2", "--batch-size", "2",
            "--engine", "ray"]
    tokenize(TokenizeConfig(inputs=specs(corpus), tokenizer=str(tokdir), out=str(tmp_path / "clean"), workers=0,
                            shard_size=2))
    out = tmp_path / "killed"
    kill_after_shards([*args, "--out", str(out), "--ray-address", cluster[0]], out, 3, wait=180)
    killed = read_manifest(out)
    assert not killed["complete"] and 3 <= len(killed["shards"]) < 12
    ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    assert main(["tokenize", *args, "--out", str(tmp_path / "all"), "--encoders", "3"]) == 2
    assert main(["tokenize", *args, "--out", str(out), "--encoders", "2"]) == 0
    assert outputs(out) == outputs(tmp_path / "clean")
