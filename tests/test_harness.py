"""The training harness every trainer runs on: one run-directory layout, one resume rule, one way of counting."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from test_codec_train import SMALL as CODEC_SMALL
from test_pretrain import TINY as LM_TINY
from test_pretrain_parts import LAYOUT
from test_reliability import one_line, rerecord
from test_vqgan_train import TINY as VQ_TINY

from benchmarks.synthetic import write_shards
from omnitok import distributed
from omnitok.cli import main
from omnitok.errors import OmnitokError, Stopped
from omnitok.train import harness
from omnitok.train.checkpoint import complete_checkpoints
from omnitok.weights import load_safetensors

RUN_FILES = {"run_config.json", "train.jsonl", "eval.jsonl", "errors.jsonl", "tb", "checkpoints", "loss.png"}
HARNESS_CHECKPOINT_FILES = {"run.json", "rank00000.pt", "COMPLETE"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-step run of each trainer, checkpointed at step 2."""
    root = tmp_path_factory.mktemp("trainers")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "sounds").mkdir()
    t = np.arange(16_000 * 2) / 16_000
    for i in range(4):
        sf.write(root / "sounds" / f"{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32),
                 16_000)
    LAYOUT.save(root / "tok")
    write_shards(root / "shards", LAYOUT, n_docs=40, shard_size=20, seed=1)
    short = ["steps=2", "checkpoint_every=2", "eval_every=100"]
    commands = {
        "vqgan": ["image-tokenizer", "train", "--images", str(root / "images"), "--out", str(root / "vqgan"),
                  *VQ_TINY, "holdout=4", "batch_size=4", *short],
        "codec": ["audio-tokenizer", "train", "--audio", str(root / "sounds"), "--out", str(root / "codec"),
                  *CODEC_SMALL, "batch_size=2", *short],
        "pretrain": ["pretrain", f"tokenizer={root / 'tok'}", f"out={root / 'pretrain'}",
                     f"data.shards=[{root / 'shards'}]", *LM_TINY, "log_every=1", *short],
    }
    for name, command in commands.items():
        assert main(command) == 0, name
    return {name: root / name for name in commands} | {"commands": commands}


def test_every_trainer_writes_the_same_run_directory_layout(runs):
    for name in ("vqgan", "codec", "pretrain"):
        out = runs[name]
        assert RUN_FILES <= {p.name for p in out.iterdir()}, name
        train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
        assert [r["step"] for r in train] == [1, 2] and all("loss" in r and "skipped_steps" in r for r in train), name
        ckpts = complete_checkpoints(out / "checkpoints")
        assert [c.name for c in ckpts] == ["step_00000002"], name
        assert HARNESS_CHECKPOINT_FILES <= {p.name for p in ckpts[0].iterdir()}, name
        record = json.loads((ckpts[0] / "run.json").read_text())
        assert record["format"] == harness.FORMAT and record["step"] == 2, name
        assert record["config"] == json.loads((out / "run_config.json").read_text()), name
        assert list((out / "tb").iterdir()), name


def test_a_checkpoint_from_before_the_harness_is_refused_in_one_line(runs, tmp_path, capsys):
    import shutil

    for name in ("vqgan", "pretrain"):
        old = tmp_path / name
        shutil.copytree(runs[name], old)
        ckpt = complete_checkpoints(old / "checkpoints")[-1]
        record = json.loads((ckpt / "run.json").read_text())
        del record["format"]
        if name == "vqgan":  # the tokenizer trainers' loop wrote state.json
            (ckpt / "run.json").unlink()
            (ckpt / "state.json").write_text(json.dumps(record))
        else:
            (ckpt / "run.json").write_text(json.dumps(record))
        rerecord(ckpt)
        command = [str(old) if x == str(runs[name]) else x for x in runs["commands"][name]]
        command = [f"out={old}" if x.startswith("out=") else x for x in command]
        assert main([*command, "--resume"]) == 2
        assert "from before the shared training harness" in one_line(capsys), name


class Counting(harness.ModuleTask):
    """A linear regression whose steps can be told to fail: no usable batch (None) or a non-finite loss."""

    shown = ()

    def __init__(self, fail: dict[int, str]):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.fail = fail

    def modules(self):
        return {"model": self.model}

    def optimizers(self):
        return {"model": self.opt}

    def batches(self, start, steps):
        for step in range(start + 1, steps + 1):
            if self.fail.get(step) == "empty":
                yield None, [f"step {step}: nothing readable"]
            else:
                g = torch.Generator().manual_seed(step)
                yield torch.randn(8, 3, generator=g), []

    def train_step(self, step, x):
        loss = ((self.model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        if self.fail.get(step) == "nan":
            return None
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item(), "constant": 2.0}

    def evaluate(self, step, out, writer):
        return {}

    def export(self, out: Path):
        pass


def _run(task, out, resume=False, **settings):
    return harness.run(task, harness.RunSettings(**settings), {"steps": settings["steps"]}, out,
                       world=distributed.single(torch.device("cpu")), resume=resume, desc="test")


def test_records_are_window_means_and_skips_are_counted(tmp_path):
    _run(Counting({3: "empty", 5: "nan"}), tmp_path / "a", steps=8, log_every=4, checkpoint_every=100)
    train = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == [4, 8]
    assert [r["constant"] for r in train] == [2.0, 2.0] and [r["skipped_steps"] for r in train] == [1, 2]
    errors = [json.loads(x) for x in (tmp_path / "a" / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"step": 3, "error": "step 3: nothing readable"}]
    # steps without usable input do not count towards max_nonfinite; non-finite ones in a row do
    _run(Counting({2: "empty", 3: "empty", 4: "empty"}), tmp_path / "b", steps=6, max_nonfinite=2)
    with pytest.raises(OmnitokError, match="2 steps in a row had a non-finite loss"):
        _run(Counting({2: "nan", 3: "nan"}), tmp_path / "c", steps=6, max_nonfinite=2)


class Preempted(Counting):
    """Sends this process a stop signal during one step, as a scheduler does before it kills a job."""

    def __init__(self, at: int, signum: int):
        super().__init__({})
        self.at, self.signum = at, signum

    def train_step(self, step, x):
        if step == self.at:
            os.kill(os.getpid(), self.signum)
        return super().train_step(step, x)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_saves_a_checkpoint_at_that_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path,
                                                                                                       signum):
    settings = {"steps": 8, "log_every": 3, "checkpoint_every": 100}
    before = [signal.getsignal(s) for s in harness.STOP_SIGNALS]
    _run(Counting({}), tmp_path / "whole", **settings)
    with pytest.raises(Stopped, match=f"stopped by {signal.Signals(signum).name} after step 5 of 8") as stopped:
        _run(Preempted(5, signum), tmp_path / "cut", **settings)
    assert stopped.value.signum == signum
    assert [signal.getsignal(s) for s in harness.STOP_SIGNALS] == before  # put back
    assert [p.name for p in complete_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step_00000005"]
    _run(Counting({}), tmp_path / "cut", resume=True, **settings)
    whole, cut = ((tmp_path / d / "train.jsonl").read_text() for d in ("whole", "cut"))
    assert cut == whole and [json.loads(x)["step"] for x in cut.splitlines()] == [3, 6, 8]  # the window spans the stop
    a, b = (load_safetensors(tmp_path / d / "checkpoints" / "step_00000008" / "model.safetensors")
            for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_while_checkpointing_is_one_line_keeps_the_last_checkpoint_and_frees_the_partial_one(
        tmp_path, monkeypatch):
    """torch.save on a full disk raises an opaque RuntimeError about stream positions after a short write; the
    harness recognises the full disk, removes the half-written checkpoint and says what to do."""
    import shutil
    from collections import namedtuple

    real_save, real_usage = torch.save, shutil.disk_usage

    def short_write(obj, path):
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    settings = {"steps": 6, "log_every": 1, "checkpoint_every": 2}
    _run(Counting({}), tmp_path / "whole", **settings)
    calls = {"n": 0}

    def full_from_the_second_save(obj, path):
        calls["n"] += 1
        return (short_write if calls["n"] == 2 else real_save)(obj, path)

    monkeypatch.setattr(torch, "save", full_from_the_second_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(1, 1, 0))
    with pytest.raises(OmnitokError, match="saving the step 4 checkpoint failed: the disk holding .* is full; the "
                                           "newest complete checkpoint is kept: free space, then rerun with --resume"):
        _run(Counting({}), tmp_path / "run", **settings)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002"] and not list(root.glob(".tmp-*"))
    # a failure that is not a full disk keeps its traceback
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    calls["n"] = 1
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _run(Counting({}), tmp_path / "run", resume=True, **settings)
    monkeypatch.setattr(torch, "save", real_save)
    _run(Counting({}), tmp_path / "run", resume=True, **settings)
    assert (tmp_path / "run" / "train.jsonl").read_text() == (tmp_path / "whole" / "train.jsonl").read_text()
