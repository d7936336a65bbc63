"""What omnitok promises a hostile or unlucky user (README, Reliability): nothing it loads runs code, a damaged
newest checkpoint is survived, no sample is silently lost, and bad usage is one line."""

import io
import json
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import TINY
from test_pretrain_parts import LAYOUT

from benchmarks.synthetic import write_shards
from omnitok.cli import main
from omnitok.data.shards import read_shard, shard_stats
from omnitok.errors import OmnitokError
from omnitok.train import checkpoint as checkpoint_module
from omnitok.train import deepspeed_io
from omnitok.train.checkpoint import COMPLETE, complete_checkpoints
from omnitok.weights import load_torch_file

MARKER = Path("/tmp/omnitok-test-payload-ran")


class Payload:
    """Unpickling this creates ``MARKER``: the proof that a load ran code."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


@pytest.fixture(autouse=True)
def no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a payload ran"


def test_the_payload_runs_when_unpickled_freely(tmp_path):
    """The test's own check can fail: a free unpickle of the payload creates the marker."""
    pickle.loads(pickle.dumps(Payload()))
    assert MARKER.exists()
    MARKER.unlink()


def plant(path: Path) -> None:
    """Put a payload into ``path``: beside the real contents of a torch file, or as the whole file otherwise."""
    if path.suffix == ".pt":
        obj = load_torch_file(path, deepspeed_io.allowed_classes())
        torch.save({**obj, "evil": Payload()} if isinstance(obj, dict) else Payload(), path)
    else:
        path.write_bytes(pickle.dumps(Payload()))


def rerecord(ckpt: Path) -> None:
    """Rewrite the checkpoint's COMPLETE record to match its files, as someone sharing a tampered run would."""
    files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": checkpoint_module._sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != COMPLETE}
    (ckpt / COMPLETE).write_text(json.dumps({"files": files}))


def one_line(capsys) -> str:
    """The one-line error `main` printed (in-process, an exception other than OmnitokError would have propagated
    instead of rc 2). Other stderr lines may come from DeepSpeed's logger and are not the error."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("omnitok: error:")]
    assert len(errors) == 1 and err.endswith(errors[0]), err[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    LAYOUT.save(root / "tok")
    write_shards(root / "train", LAYOUT, n_docs=60, shard_size=20, seed=1)
    return root


def args(shards, out, *extra):
    return [f"tokenizer={shards / 'tok'}", f"out={out}", f"data.shards=[{shards / 'train'}]", *TINY, *extra]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """A ZeRO-1 run with checkpoints at steps 2 and 4: model states, optimizer partition, rank state."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["pretrain", *args(shards, out, "steps=4", "checkpoint_every=2", "zero_stage=1")]) == 0
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_run_directory_holds_the_files_these_tests_attack(run):
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    names = sorted(p.name for p in ckpt.iterdir())
    assert "model.safetensors" in names and "run.json" in names and "rank00000.pt" in names
    assert any(n.endswith("optim_states.pt") for n in names) and any(n.endswith("model_states.pt") for n in names)


def test_no_file_of_a_checkpoint_runs_code_on_resume_or_export(run, shards, tmp_path, capsys):
    files = sorted(p.name for p in complete_checkpoints(run / "checkpoints")[-1].iterdir() if p.name != COMPLETE)
    for name in files:
        for command in ("resume", "export"):
            target = copy_run(run, tmp_path / command / name)
            ckpt = complete_checkpoints(target / "checkpoints")[-1]
            plant(ckpt / name)
            rerecord(ckpt)
            if command == "resume":
                rc = main(["pretrain", *args(shards, target, "steps=6", "checkpoint_every=2", "zero_stage=1"),
                           "--resume"])
                read = name != "model.safetensors"  # resume takes the weights from DeepSpeed's files
            else:
                rc = main(["export", str(target), "--out", str(tmp_path / "out" / name)])
                read = True  # export reads model.safetensors and run.json; the pickles are checked, never opened
            if read:
                assert rc == 2 and name in one_line(capsys), (command, name)
            else:
                assert rc == 0, (command, name)
                capsys.readouterr()
            assert not MARKER.exists(), (command, name)


def test_deepspeed_loads_are_weights_only_even_past_the_first_check(run, shards, tmp_path, capsys, monkeypatch):
    """With the pickle scan switched off, DeepSpeed's own loads (through omnitok's checkpoint engine) refuse."""
    monkeypatch.setattr(checkpoint_module, "unsafe_globals", lambda path, allowed=(): [])
    for pattern in ("*model_states.pt", "*optim_states.pt"):
        target = copy_run(run, tmp_path / pattern.strip("*."))
        ckpt = complete_checkpoints(target / "checkpoints")[-1]
        victim = next(ckpt.glob(pattern))
        plant(victim)
        rerecord(ckpt)
        rc = main(["pretrain", *args(shards, target, "steps=6", "checkpoint_every=2", "zero_stage=1"), "--resume"])
        assert rc == 2 and "not a weights-only torch file" in one_line(capsys)
        assert not MARKER.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, shards, tmp_path, capsys):
    want = [json.loads(x)["loss"] for x in (run / "train.jsonl").read_text().splitlines()]  # the uninterrupted run
    damages = {"truncated optimizer states": lambda c: _truncate(next(c.glob("*optim_states.pt"))),
               "missing model states": lambda c: next(c.glob("*model_states.pt")).unlink(),
               "truncated rank state": lambda c: _truncate(c / "rank00000.pt")}
    for what, damage in damages.items():
        target = copy_run(run, tmp_path / what.replace(" ", "_"))
        damage(complete_checkpoints(target / "checkpoints")[-1])
        assert main(["pretrain", *args(shards, target, "steps=4", "checkpoint_every=2", "zero_stage=1"),
                     "--resume"]) == 0, what
        printed = capsys.readouterr()
        assert "checkpoint step_00000004 is damaged" in printed.out + printed.err, what
        got = [json.loads(x) for x in (target / "train.jsonl").read_text().splitlines()]
        assert [r["step"] for r in got] == [1, 2, 3, 4], what  # steps 3-4 trained again, recorded once
        assert [r["loss"] for r in got] == pytest.approx(want, abs=1e-5), what
    target = copy_run(run, tmp_path / "all")
    for ckpt in complete_checkpoints(target / "checkpoints"):
        _truncate(ckpt / "rank00000.pt")
    assert main(["pretrain", *args(shards, target, "steps=6", "checkpoint_every=2"), "--resume"]) == 2
    assert "no intact checkpoint" in one_line(capsys)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_moved_run_resumes_and_a_changed_setting_is_named(run, shards, tmp_path, capsys):
    moved = copy_run(run, tmp_path / "elsewhere" / "moved")
    assert main(["pretrain", *args(shards, moved, "steps=5", "checkpoint_every=2", "zero_stage=1"), "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (moved / "train.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    capsys.readouterr()
    other = copy_run(run, tmp_path / "other")
    assert main(["pretrain", *args(shards, other, "steps=6", "checkpoint_every=2", "zero_stage=1",
                                   "optim.lr=0.01"), "--resume"]) == 2
    err = one_line(capsys)
    assert "'optim.lr': 0.003 then, 0.01 now" in err


def test_a_run_written_before_new_settings_existed_still_resumes(run, shards, tmp_path, capsys):
    """run.json written by an older omnitok lacks settings added since (here data.isolate_documents and
    loss.chunk_rows) and has an empty COMPLETE record: it resumes, and a setting it does hold is still compared."""
    old = copy_run(run, tmp_path / "old")
    ckpt = complete_checkpoints(old / "checkpoints")[-1]
    saved = json.loads((ckpt / "run.json").read_text())
    del saved["config"]["data"]["isolate_documents"], saved["config"]["loss"]["chunk_rows"]
    (ckpt / "run.json").write_text(json.dumps(saved))
    (ckpt / COMPLETE).write_text("")
    assert main(["pretrain", *args(shards, old, "steps=5", "checkpoint_every=2", "zero_stage=1"), "--resume"]) == 0
    capsys.readouterr()
    assert main(["pretrain", *args(shards, old, "steps=6", "checkpoint_every=2", "zero_stage=2"), "--resume"]) == 2
    assert "'zero_stage': 1 then, 2 now" in one_line(capsys)


def test_the_first_record_after_a_resume_covers_the_whole_log_window(shards, tmp_path):
    """Logged every 4 steps, checkpointed every 2: a run killed after step 2 logs at 4 what the full run logs."""
    from omnitok.train import pretrain as pretrain_module
    from omnitok.train.pretrain import load_pretrain_config, pretrain

    extra = ["steps=8", "checkpoint_every=2", "log_every=4"]
    pretrain(load_pretrain_config(None, args(shards, tmp_path / "a", *extra)))
    real_export = pretrain_module.PretrainTask.export

    def export_then_die(*a):
        real_export(*a)
        raise KeyboardInterrupt

    killed = load_pretrain_config(None, args(shards, tmp_path / "b", *extra))
    pretrain_module.PretrainTask.export = export_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(killed)
    finally:
        pretrain_module.PretrainTask.export = real_export
    pretrain(killed, resume=True)
    a, b = ([json.loads(x) for x in (tmp_path / d / "train.jsonl").read_text().splitlines()] for d in "ab")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8]
    for x, y in zip(a, b):
        for key in ("loss", "text_loss", "image_tokens", "padding"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key


# ---------------------------------------------------------------- the tokenizer trainers' loop


def test_tokenizer_trainers_refuse_payloads_and_survive_damage(tmp_path, capsys):
    from PIL import Image
    from test_vqgan_train import TINY as VQ_TINY

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    def command(out, steps, *resume):
        return ["image-tokenizer", "train", "--images", str(images), "--out", str(out), *VQ_TINY, "holdout=4",
                "batch_size=4", "eval_every=100", "checkpoint_every=2", f"steps={steps}", *resume]

    out = tmp_path / "vq"
    assert main(command(out, 4)) == 0
    capsys.readouterr()
    ckpts = complete_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]

    poisoned = copy_run(out, tmp_path / "poisoned")
    ckpt = complete_checkpoints(poisoned / "checkpoints")[-1]
    plant(ckpt / "rank00000.pt")
    rerecord(ckpt)
    assert main(command(poisoned, 6, "--resume")) == 2
    assert "rank00000.pt" in one_line(capsys)

    damaged = copy_run(out, tmp_path / "damaged")
    _truncate(next(complete_checkpoints(damaged / "checkpoints")[-1].glob("*.safetensors")))
    assert main(command(damaged, 6, "--resume")) == 0
    printed = capsys.readouterr()
    assert "checkpoint step_00000004 is damaged" in printed.out + printed.err
    steps = [json.loads(x)["step"] for x in (damaged / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- shards


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_shard_samples_that_need_pickle_are_refused_in_one_line(tmp_path, capsys):
    good = (_npy(np.arange(5, dtype=np.int32)), b'{"spans": []}')
    cases = {"object tokens": (_npy(np.array([Payload()], dtype=object)), good[1]),
             "pickled meta": (good[0], pickle.dumps(Payload())),
             "float tokens": (_npy(np.ones(3, dtype=np.float32)), good[1])}
    for what, (tokens, meta) in cases.items():
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        _tar(d / "shard-000000.tar", [("k.tokens.npy", tokens), ("k.meta.json", meta)])
        with pytest.raises(OmnitokError, match="shard-000000.tar: sample 'k'"):
            read_shard(str(d / "shard-000000.tar"))
        (d / "manifest.json").write_text(json.dumps({"format": "omnitok.shards", "version": 1, "shards": [
            {"name": "shard-000000.tar", "samples": 1}], "samples": 1, "tokens": {}, "errors": {}, "error_count": 0,
            "complete": True}))
        assert main(["shards", "stats", str(d)]) == 2  # the report lists it, then one line says so
        out, err = capsys.readouterr()
        assert "damaged shards: 1 of 1" in out and "sample 'k'" in out
        assert err.strip() == f"omnitok: error: 1 damaged shard in {d} (above)"



def test_a_shard_copied_over_another_is_reported_by_shards_stats(shards, tmp_path, capsys, monkeypatch):
    """Every shard is whole, but one is not the shard written there: another shard of the set (a copy over it; one
    corpus's shards merged twice: training would read its samples twice) or one from another set. `shards stats`
    names it and exits 2; a hash collision alone reports nothing."""
    data = tmp_path / "train"
    shutil.copytree(shards / "train", data)
    first, _, third = sorted(data.glob("*.tar"))
    shutil.copyfile(first, third)
    assert main(["shards", "stats", str(data), "--no-plot"]) == 2
    out, err = capsys.readouterr()
    assert re.search(rf"shards unlike the manifest: 1 of 3\n{re.escape(str(third))}: holds 20 samples of \d+ tokens; "
                     r"the manifest lists 20 of \d+ \(a shard from elsewhere copied over it\?\)", out)
    assert (f"repeated samples: 1 of 3 shards hold samples whose keys an earlier shard has (training reads them "
            f"twice: remove the copies, or re-make the set)\n{third}: 20 of its 20 samples have the keys of earlier "
            f"samples (20 of {first.name}): a shard copied over another, or one corpus merged twice?") in out
    assert err.strip() == (f"omnitok: error: 1 shard unlike the manifest and 1 shard repeating samples in {data} "
                           "(above)")
    other = tmp_path / "other"
    write_shards(other, LAYOUT, n_docs=80, shard_size=20, seed=7)  # its fourth shard: keys this set has not
    shutil.copytree(shards / "train", data, dirs_exist_ok=True)
    shutil.copyfile(sorted(other.glob("*.tar"))[3], third)
    assert main(["shards", "stats", str(data), "--no-plot"]) == 2
    out, err = capsys.readouterr()
    assert "shards unlike the manifest: 1 of 3" in out and "repeated" not in out
    assert err.strip() == f"omnitok: error: 1 shard unlike the manifest in {data} (above)"
    clean = tmp_path / "clean"
    shutil.copytree(shards / "train", clean)
    monkeypatch.setattr("builtins.hash", lambda key: 7)  # every key collides: the keys themselves decide
    assert main(["shards", "stats", str(clean), "--no-plot"]) == 0
    assert "repeated" not in capsys.readouterr().out


def test_a_damaged_shard_is_skipped_and_recorded_and_training_goes_on(shards, tmp_path, capsys):
    """A shard cut short (a bad copy): `shards stats` lists it and exits 2; pretraining skips it each epoch, says so
    on the terminal and in errors.jsonl, and trains on the other shards."""
    data = tmp_path / "train"
    shutil.copytree(shards / "train", data)
    damaged = sorted(data.glob("*.tar"))[1]
    damaged.write_bytes(damaged.read_bytes()[:3000])
    assert main(["shards", "stats", str(data), "--no-plot"]) == 2
    out, err = capsys.readouterr()
    assert f"damaged shards: 1 of 3 (training skips them)\n{damaged}: not a whole shard tar" in out
    assert err.strip() == f"omnitok: error: 1 damaged shard in {data} (above)"
    run = tmp_path / "run"
    assert main(["pretrain", *args(shards, run, "steps=8"), f"data.shards=[{data}]"]) == 0  # 3 epochs of 2 shards
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    assert len(errors) >= 2 and all(e["error"].startswith(f"{damaged}: not a whole shard tar (unexpected end of "
                                                          "data)") for e in errors)
    assert {e["error"].rsplit(" ", 1)[1] for e in errors} >= {"0", "1"}  # skipped again in each epoch
    said = re.findall(rf"step (\d+): {re.escape(str(damaged))}: not a whole shard tar", capsys.readouterr().out)
    assert [int(step) for step in said] == [e["step"] for e in errors]  # each printed when it was recorded
    assert json.loads((run / "train.jsonl").read_text().splitlines()[-1])["step"] == 8
    for tar in data.glob("*.tar"):  # nothing left to train on: one line that says why
        tar.write_bytes(b"")
    assert main(["pretrain", *args(shards, tmp_path / "none", "steps=2"), f"data.shards=[{data}]"]) == 2
    assert re.search(r"shard set 0 holds no samples for rank 0 \(the last problem: .*: not a whole shard tar",
                     one_line(capsys))



def test_a_shard_that_stops_where_a_member_would_begin_is_damaged_not_silently_short(tmp_path):
    """tarfile takes a tar that stops exactly where a member would begin (a copy cut on a block boundary, as
    4 KiB-aligned cuts often are) or that holds garbage there for a whole, shorter archive: its other samples would
    be lost without a word. Such a shard, and a ``pipe:`` command that fails after a good stream, are damaged; a cut
    one is also caught by ``shards merge``'s quick check (size and last bytes)."""
    from omnitok.data.shards import _not_whole

    sample = (_npy(np.arange(5, dtype=np.int32)), b'{"spans": []}')
    whole = tmp_path / "whole.tar"
    _tar(whole, [(f"k{i}.{ext}", data) for i in range(6) for ext, data in zip(("tokens.npy", "meta.json"), sample)])
    assert len(read_shard(str(whole))) == len(read_shard(f"pipe:cat {whole}")) == 6 and not _not_whole(whole)
    with tarfile.open(whole) as tar:
        third = tar.getmembers()[4].offset  # where sample k2's first header begins
    data = whole.read_bytes()
    cut, garbage = tmp_path / "cut.tar", tmp_path / "garbage.tar"
    cut.write_bytes(data[:third])
    garbage.write_bytes(data[:third] + b"x" * 512 + data[third + 512:])
    for damaged in (cut, garbage):
        with tarfile.open(damaged) as tar:
            assert len(tar.getmembers()) == 4  # what tarfile alone makes of it
        for url in (str(damaged), f"pipe:cat {damaged}"):
            with pytest.raises(OmnitokError, match=f"^{re.escape(url)}: not a whole shard tar \\(it ends without "
                                                   "tar's end-of-archive block"):
                read_shard(url)
    assert _not_whole(cut).startswith("not a whole shard tar (it does not end as tar ends an archive")
    with pytest.raises(OmnitokError, match="not a whole shard tar \\(the command exited with status 3\\)"):
        read_shard(f"pipe:cat {whole}; exit 3")

def test_a_key_that_appears_twice_is_an_error_never_a_drop(tmp_path):
    a = (_npy(np.arange(3, dtype=np.int32)), b'{"spans": []}')
    _tar(tmp_path / "x.tar", [("k.tokens.npy", a[0]), ("k.meta.json", a[1]), ("k.tokens.npy", a[0]),
                              ("k.meta.json", a[1])])
    with pytest.raises(OmnitokError, match="'k' appears twice"):
        read_shard(str(tmp_path / "x.tar"))
    _tar(tmp_path / "y.tar", [("k.tokens.npy", a[0]), ("k.meta.json", a[1]), ("j.tokens.npy", a[0]),
                              ("j.meta.json", a[1]), ("k.tokens.npy", a[0]), ("k.meta.json", a[1])])
    with pytest.raises(OmnitokError, match="'k' appears twice"):
        read_shard(str(tmp_path / "y.tar"))


def test_every_sample_is_counted_alike_by_manifest_stats_and_one_epoch_of_training(tmp_path, sp_dir):
    """Two corpora with the same file stem and ids in different folders, and a repeated id within one file: six
    documents in, six samples in the manifest, in `shards stats`, in plain webdataset and in one training epoch."""
    import webdataset as wds

    from omnitok.data.stream import _Source, shard_urls
    from omnitok.data.tokenize import TokenizeConfig, tokenize
    from omnitok.tokenizers.multimodal import assemble

    assemble(sp_dir, tmp_path / "tok")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        lines = [{"id": "same", "segments": [{"text": f"{folder} one"}]},
                 {"id": "same", "segments": [{"text": f"{folder} two"}]},
                 {"id": "other", "segments": [{"text": f"{folder} three"}]}]
        (tmp_path / folder / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "shards"
    manifest = tokenize(TokenizeConfig(inputs=[str(tmp_path / "a" / "docs.jsonl"), str(tmp_path / "b" / "docs.jsonl")],
                                       tokenizer=str(tmp_path / "tok"), out=str(out), workers=0, shard_size=4))
    assert manifest["samples"] == 6
    stats, damaged = shard_stats(out)
    assert damaged == []
    histogram = [int(line.split()[-1]) for line in stats.splitlines() if line.startswith("  ")]
    assert "6 samples" in stats and sum(histogram) == 6
    urls = shard_urls(str(out))
    plain = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(plain) == 6 and len({s["__key__"] for s in plain}) == 6
    source = _Source(urls, 0, seed=0, rank=0, world=1)
    epoch = []
    while source.epoch == 0:
        tokens = source.next()[0]
        if source.epoch == 0:
            epoch.append(tokens.tolist())
    assert len(epoch) == 6 and len({tuple(t) for t in epoch}) == 6
    with pytest.raises(OmnitokError, match="given twice"):
        tokenize(TokenizeConfig(inputs=[str(tmp_path / "a" / "docs.jsonl")] * 2, tokenizer=str(tmp_path / "tok"),
                                out=str(tmp_path / "twice"), workers=0))


# ---------------------------------------------------------------- sample and eval: the exported model directory


def test_no_file_of_an_export_runs_code_in_sample_or_eval(model_dir, tmp_path, capsys):
    """Each file of an `omnitok export` (weights, configs, the tokenizer's parts) replaced by a pickle payload:
    sampling and evaluation never run it, and stop with one line (or do not need the file)."""
    files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    assert len(files) >= 8
    refused = 0
    for rel in files:
        target = tmp_path / str(rel).replace("/", "_")
        shutil.copytree(model_dir, target)
        plant(target / rel)
        rc = main(["sample", "--model", str(target), "--prompt", "a red circle", "--out", str(target / "out"),
                   "--max-new-tokens", "6", "--output-modality", "text"])
        assert rc in (0, 2), rel
        if rc == 2:
            one_line(capsys)
            refused += 1
        capsys.readouterr()
        assert main(["eval", "lm", "--model", str(target), "--shards", str(tmp_path / "none")]) == 2
        one_line(capsys)
        assert not MARKER.exists(), rel
    assert refused >= len(files) - 2  # all but files transformers may skip (generation_config.json)
    pickled = tmp_path / "bin"
    shutil.copytree(model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"evil": Payload()}, pickled / "pytorch_model.bin")
    assert main(["sample", "--model", str(pickled), "--prompt", "a", "--out", str(tmp_path / "o")]) == 2
    assert "safetensors weights only" in one_line(capsys)


def test_sample_usage_errors_are_one_line(model_dir, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(model_dir, truncated)
    _truncate(truncated / "model.safetensors")
    base = ["sample", "--prompt", "a", "--out", str(tmp_path / "o")]
    assert main([*base, "--model", str(truncated)]) == 2
    assert str(truncated) in one_line(capsys)
    for flags, said in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                        (["--batch-size", "-3"], "--batch-size must be at least 1"),
                        (["--num-samples", "0"], "--num-samples and --batch-size must be at least 1")):
        assert main([*base, "--model", str(model_dir), *flags]) == 2
        assert said.split(" must")[0] in one_line(capsys)
    assert main([*base, "--model", str(model_dir), "text.top_k=abc"]) == 2
    assert "setting 'sampling.text.top_k' must be a whole number, got 'abc'" in one_line(capsys)


def test_a_config_value_of_the_wrong_type_names_the_setting(tmp_path, capsys):
    from omnitok.train.pretrain import load_pretrain_config

    for override, said in (("steps=abc", "setting 'steps' must be a whole number, got 'abc'"),
                           ("optim.lr=fast", "setting 'optim.lr' must be a number, got 'fast'"),
                           ("bf16=maybe", "setting 'bf16' must be true or false, got 'maybe'"),
                           ("data.shards=3", "setting 'data.shards' must be a list"),
                           ("seed=-1", "a seed must be from 0 to 2**64 - 1, got -1"),
                           ("steps=[", "override 'steps=[' is not valid YAML: while parsing a flow node")):
        with pytest.raises(OmnitokError, match=re.escape(said)):
            load_pretrain_config(None, ["tokenizer=x", override])
    assert main(["pretrain", "tokenizer=x", "steps=abc"]) == 2
    assert "setting 'steps' must be a whole number" in one_line(capsys)
    cfg = load_pretrain_config(None, ["tokenizer=x", "optim.lr=1", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 1 and cfg.optim.betas == (0.9, 0.95)  # ints pass for floats; lists for tuples
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"steps: 3\n\xd0\x00\n")  # not UTF-8 (a binary given by mistake)
    for command in ("pretrain", "finetune"):
        assert main([command, "--config", str(binary)]) == 2
        assert f"{binary} is not valid YAML: 'utf-8' codec can't decode byte 0xd0" in one_line(capsys)


def test_sampling_stops_at_the_models_positions_per_prompt(model_dir, tmp_path, capsys):
    """A 64-position copy of the test model: each prompt gets only what fits, whatever its batch holds."""
    from omnitok.model.sample import SampleRequest, load_model, parse_prompt, sample
    from omnitok.model.sampler import SamplingConfig

    small = tmp_path / "small"
    shutil.copytree(model_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (small / "config.json").write_text(json.dumps(config))
    model, tok = load_model(small)
    short, long = parse_prompt("a"), parse_prompt("a red circle and then " * 6)
    n_long = len(tok.encode_batch([long.document])[0].ids) - 1
    cfg = SamplingConfig(max_new_tokens=200, output="text")
    alone = sample(model, tok, [long], tmp_path / "alone", SampleRequest(cfg, seed=3), progress=False)
    both = sample(model, tok, [short, long], tmp_path / "both", SampleRequest(cfg, seed=3, num_samples=1),
                  progress=False)
    assert "only" in capsys.readouterr().err
    assert alone[0]["new_tokens"] <= 64 - n_long and both[1]["new_tokens"] <= 64 - n_long
    assert both[0]["new_tokens"] <= 63
    assert alone[0]["stopped"] in ("eos", "context")
    if alone[0]["stopped"] == "context":
        assert alone[0]["new_tokens"] == 64 - n_long
    with pytest.raises(OmnitokError, match="leaves no room"):
        sample(model, tok, [parse_prompt("a red circle " * 40)], tmp_path / "none", SampleRequest(cfg),
               progress=False)


# ---------------------------------------------------------------- error records


def test_error_reasons_group_paths_with_spaces_and_missing_files_alike(tmp_path, tokdir):
    from PIL import Image

    from omnitok.data.tokenize import TokenizeConfig, tokenize

    folder = tmp_path / "my photos"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "fine.png")
    (folder / "bad one.png").write_bytes(b"not a png")
    (folder / "bad two.png").write_bytes(b"not a png either")
    docs = [[{"text": "a"}, {"image": "my photos/missing one.png"}], [{"text": "b"}, {"audio": "my photos/gone.wav"}],
            [{"text": "c"}, {"image": "my photos/bad one.png"}], [{"text": "d"}, {"image": "my photos/bad two.png"}],
            [{"text": "e"}, {"image": "my photos/fine.png"}]]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    manifest = tokenize(TokenizeConfig(inputs=[str(tmp_path / "docs.jsonl")], tokenizer=str(tokdir),
                                       out=str(tmp_path / "out"), workers=0))
    assert manifest["samples"] == 1 and manifest["error_count"] == 4
    assert manifest["errors"] == {"cannot open": 2, "not an image file Pillow can read": 2}


def test_lanes_are_disjoint_within_an_epoch_and_fair_across_epochs():
    """The documented trade-off (data/stream.py): 5 shards over 2 lanes. In each epoch the lanes' shares are
    disjoint and cover the set; over many epochs each lane reads every shard about equally often per read."""
    from omnitok.data.stream import _Source

    urls = [f"s{i}.tar" for i in range(5)]
    counts = np.zeros((2, 5))
    for epoch in range(400):
        shares = []
        for lane in range(2):
            source = _Source(urls, 0, seed=3, rank=lane, world=2)
            source.epoch = epoch
            shares.append(source._order())
            counts[lane, shares[-1]] += 1
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(5))
    per_read = counts / counts.sum(axis=1, keepdims=True)  # how often each shard is a lane's next read
    assert np.abs(per_read - 0.2).max() < 0.04
