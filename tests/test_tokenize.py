import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import PHOTOS, jpeg
from PIL import Image

from omnitok.cli import main
from omnitok.data.shards import iter_samples, merge_shards, read_manifest
from omnitok.data.tokenize import TokenizeConfig, tokenize
from omnitok.errors import LayoutMismatch, OmnitokError
from omnitok.tokenizers.multimodal import MultimodalTokenizer

ASSETS = Path(__file__).parent / "assets"


def specs(corpus):
    return [str(corpus / "docs.jsonl"), str(corpus / "pairs"), str(corpus / "wds-{000..000}.tar")]


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*.tar"))}


def test_shards_read_back_with_plain_webdataset_and_decode_to_the_sources(tmp_path, tokdir, corpus, capsys):
    import webdataset as wds

    out = tmp_path / "shards"
    assert main(["tokenize", "--tokenizer", str(tokdir), "--input", *specs(corpus), "--out", str(out),
                 "--workers", "0", "--shard-size", "7"]) == 0
    printed = capsys.readouterr().out
    assert "24 samples in 4 shards" in printed and "errors: 0" in printed
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["samples"] == 24 and manifest["dtype"] == "int32"
    assert [s["samples"] for s in manifest["shards"]] == [7, 7, 7, 3]
    ours = {key: (tokens, meta) for key, tokens, meta in iter_samples(out)}
    plain = {}
    for sample in wds.WebDataset(str(out / "shard-{000000..000003}.tar"), shardshuffle=False):
        plain[sample["__key__"]] = (np.load(io.BytesIO(sample["tokens.npy"])), json.loads(sample["meta.json"]))
    assert set(plain) == set(ours) and len(plain) == 24
    for key, (tokens, meta) in plain.items():
        np.testing.assert_array_equal(tokens, ours[key][0])
        assert tokens.dtype == np.int32 and meta == ours[key][1]
    # Tokens decode back to the sources: text exactly, media to the codes of the source files.
    tok = MultimodalTokenizer.from_dir(tokdir)
    by_source = {meta["source"]: tokens for tokens, meta in plain.values()}
    doc0 = by_source[f"{corpus / 'docs.jsonl'}:1"]
    parsed = tok.parse(doc0)
    assert [p.modality for p in parsed] == ["text", "image", "text", "audio"]
    assert tok.text.decode(parsed[0].ids) == "Document 0: " and tok.text.decode(parsed[2].ids) == " and then"
    np.testing.assert_array_equal(parsed[1].ids, tok.image.encode([corpus / "media" / "img00.png"])[0])
    np.testing.assert_array_equal(parsed[3].ids, tok.audio.encode([corpus / "media" / "hello.wav"])[0])
    decoded = tok.decode(by_source[f"{corpus / 'pairs' / 'p3.jpg'}"])
    assert decoded.segments[0].text == "a small photo, number 3 😀" and decoded.segments[1].source.shape == (32, 32, 3)
    spans = json.loads(json.dumps(plain[next(iter(plain))][1]))["spans"]
    assert all(stop > start for _, start, stop in spans)
    assert main(["shards", "stats", str(out)]) == 0
    assert "24 samples in 4 shards" in capsys.readouterr().out and (out / "token_lengths.png").is_file()


def test_output_does_not_depend_on_workers_or_batch_size(tmp_path, tokdir, corpus):
    runs = {}
    for workers, batch in ((0, 16), (1, 3), (2, 5)):
        out = tmp_path / f"w{workers}b{batch}"
        tokenize(TokenizeConfig(inputs=specs(corpus), tokenizer=str(tokdir), out=str(out), workers=workers,
                                batch_size=batch, shard_size=5))
        runs[(workers, batch)] = digest(out)
    first = next(iter(runs.values()))
    assert len(first) == 5 and all(d == first for d in runs.values())


def test_hostile_files_are_recorded_and_every_good_sample_is_kept(tmp_path, tokdir):
    root = tmp_path / "hostile"
    root.mkdir()
    photo = PHOTOS[1]
    good = {"cmyk.jpg": jpeg(np.asarray(Image.fromarray(photo).convert("CMYK").convert("RGB")), quality=90)}
    buf = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(buf, format="JPEG")
    good["cmyk.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)).save(buf, format="PNG")
    good["gray16.png"] = buf.getvalue()
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    good["palette.png"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    good["rotated.jpg"] = jpeg(photo, exif=exif.tobytes())
    for name, data in good.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"good {name}")
    t96 = np.arange(48_000) / 96_000
    sf.write(root / "eight.wav", np.stack([0.1 * np.sin(2 * np.pi * 200 * (c + 1) * t96) for c in range(8)], 1),
             96_000)
    (root / "eight.txt").write_text("eight channels")
    bad = {"truncated.jpg": jpeg(photo)[:3000], "empty.png": b"", "corrupt.wav": b"RIFF\x10\x00\x00\x00WAVEfmt junk"}
    from test_image_tokenizer import png  # a header that claims 20000 x 20000 pixels
    bad["bomb.png"] = png(20000, 20000, 8, b"\0" * 100)
    for name, data in bad.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"bad {name}")
    (root / "latin1.jpg").write_bytes(good["rotated.jpg"])
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "more.jsonl").write_text(json.dumps({"image": "hostile/missing.png", "text": "gone"}) + "\n"
                                         + "{broken json\n" + json.dumps([{"text": ""}]) + "\n"
                                         + "[" * 100_000 + "]" * 100_000 + "\n")  # too deep for json's parser
    out = tmp_path / "shards"
    manifest = tokenize(TokenizeConfig(inputs=[str(root), str(tmp_path / "more.jsonl")], tokenizer=str(tokdir),
                                       out=str(out), workers=2, shard_size=4))
    sources = {meta["source"] for _, _, meta in iter_samples(out)}
    assert sources == {str(root / n) for n in [*good, "eight.wav"]}
    errors = {Path(e["source"].rsplit(":", 1)[0] if e["source"].endswith(("1", "2", "3")) else e["source"]).name:
              e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors["truncated.jpg"] == "corrupt or truncated image"
    assert errors["empty.png"] == "not an image file Pillow can read"
    assert errors["corrupt.wav"] == "not a sound file libsndfile can read"
    assert errors["bomb.png"] == "over Pillow's decompression-bomb limit"
    assert errors["latin1.jpg"] == "caption is not UTF-8"
    assert manifest["error_count"] == 9 and manifest["samples"] == 5
    lines = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["reason"] for e in lines} >= {"cannot open", "empty document"}
    assert any(e["reason"].startswith("line is not JSON") for e in lines)
    deep = [e["error"] for e in lines if e["source"].endswith("more.jsonl:4")]
    assert deep == ["line is not JSON (nested too deeply)"]


def test_parts_together_equal_the_single_process_output(tmp_path, tokdir, corpus):
    def samples(directory):
        return {key: tokens.tobytes() for key, tokens, _ in iter_samples(directory)}

    tokenize(TokenizeConfig(inputs=specs(corpus), tokenizer=str(tokdir), out=str(tmp_path / "single"), workers=0))
    for part in range(3):
        tokenize(TokenizeConfig(inputs=specs(corpus), tokenizer=str(tokdir), out=str(tmp_path / f"part{part}"),
                                workers=0, num_parts=3, part=part))
    parts = [samples(tmp_path / f"part{p}") for p in range(3)]
    assert all(parts) and not set(parts[0]) & set(parts[1])
    assert main(["shards", "merge", "--out", str(tmp_path / "merged"), *[str(tmp_path / f"part{p}")
                                                                         for p in range(3)]]) == 0
    assert samples(tmp_path / "merged") == samples(tmp_path / "single")
    # the same items twice (keys hash where an item is, so they would repeat): refused before anything is written
    for pair, said in ((["part0", "part2", "part0"], "part0 and .*part0 are the same part \\(1 of 3\\)"),
                       (["single", "part1"], "single and .*part1 both tokenized '")):
        with pytest.raises(OmnitokError, match=f"{said}.*: merged, those samples would be in the set twice"):
            merge_shards(tmp_path / "again", [tmp_path / name for name in pair])
        assert not (tmp_path / "again").exists()
    # a part's shard cut short by a bad copy, or gone: refused in one line naming it, before anything is written
    shard = tmp_path / "part1" / read_manifest(tmp_path / "part1")["shards"][0]["name"]
    whole = shard.read_bytes()
    cut = "not a whole shard tar"
    for damage, said in ((whole[: len(whole) // 2], cut), (whole[: len(whole) - 512], cut), (None, "missing")):
        shard.unlink()
        if damage is not None:
            shard.write_bytes(damage)
        with pytest.raises(OmnitokError, match=f"^{shard}: {said}.*copy that part again or re-make it"):
            merge_shards(tmp_path / "again", [tmp_path / f"part{p}" for p in range(3)])
        assert not (tmp_path / "again").exists()


def kill_after_shards(args: list[str], out: Path, shards: int, env: dict | None = None, wait: float = 120) -> None:
    """Run ``omnitok tokenize ARGS`` in a process and SIGKILL it once the manifest lists ``shards`` shards (or a
    little after, or when it ends first)."""
    proc = subprocess.Popen([sys.executable, "-m", "omnitok", "tokenize", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + wait
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= shards:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10  # its worker processes (same command line) end soon after it
    while time.time() < deadline and _running(str(out)):
        time.sleep(0.2)
    assert not _running(str(out))


def _running(word: str) -> list[int]:
    """Processes whose command line holds ``word`` (none where there is no /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if word.encode() in cmdline.read_bytes().split(b"\0"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_killed_runs_resume_to_identical_shards(tmp_path, tokdir, corpus):
    args = ["--tokenizer", str(tokdir), "--input", *specs(corpus), "--workers", "1", "--shard-size", "2",
            "--batch-size", "2"]
    tokenize(TokenizeConfig(inputs=specs(corpus), tokenizer=str(tokdir), out=str(tmp_path / "clean"), workers=0,
                            shard_size=2, batch_size=2))
    expected = digest(tmp_path / "clean")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    interrupted = 0
    for kill_at in (1, 3, 6):  # kill once the manifest lists this many shards (of 12), or a little after
        kill_after_shards([*args, "--out", str(out)], out, kill_at, env)
        interrupted += not read_manifest(out)["complete"]  # a kill can land after a fast run has finished
    assert interrupted >= 1
    assert main(["tokenize", *args, "--out", str(out)]) == 0
    assert digest(out) == expected and read_manifest(out)["samples"] == read_manifest(tmp_path / "clean")["samples"]
    assert (out / "errors.jsonl").read_text() == (tmp_path / "clean" / "errors.jsonl").read_text()


def test_a_shard_directory_of_another_layout_is_refused_before_any_work(tmp_path, tokdir, corpus, sp_dir):
    tokenize(TokenizeConfig(inputs=[str(corpus / "pairs")], tokenizer=str(tokdir), out=str(tmp_path / "s"),
                            workers=0))
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--out", str(tmp_path / "text-only")]) == 0
    before = digest(tmp_path / "s")
    with pytest.raises(LayoutMismatch, match="differs"):
        tokenize(TokenizeConfig(inputs=[str(corpus / "pairs")], tokenizer=str(tmp_path / "text-only"),
                                out=str(tmp_path / "s"), workers=0))
    assert digest(tmp_path / "s") == before
    with pytest.raises(Exception, match="different command"):
        tokenize(TokenizeConfig(inputs=[str(corpus / "pairs")], tokenizer=str(tokdir), out=str(tmp_path / "s"),
                                workers=0, shard_size=3))


def test_pipe_urls_read_the_same_samples_as_paths(tmp_path, tokdir, corpus):
    tar = corpus / "wds-000.tar"
    for name, spec in (("path", str(tar)), ("pipe", f"pipe:cat {tar}")):
        tokenize(TokenizeConfig(inputs=[spec], tokenizer=str(tokdir), out=str(tmp_path / name), workers=0))
    path = {k: t.tobytes() for k, t, _ in iter_samples(tmp_path / "path")}
    pipe = {k: t.tobytes() for k, t, _ in iter_samples(tmp_path / "pipe")}
    assert len(path) == 5 and path == pipe


def test_a_worker_that_dies_on_a_file_loses_only_that_item(tmp_path, tokdir, monkeypatch):
    from worker_crash import crashing

    from omnitok.data import prepare

    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, name in enumerate(["a", "crash", "b", "c", "d", "e"]):
        Image.fromarray(PHOTOS[i % 4][::8, ::8]).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"photo {name}")
    common = {"inputs": [str(folder)], "tokenizer": str(tokdir), "batch_size": 2, "shard_size": 2}
    tokenize(TokenizeConfig(**common, out=str(tmp_path / "clean"), workers=0))
    monkeypatch.setattr(prepare.Preprocessor, "segments", crashing(prepare.Preprocessor.segments))  # forked workers
    manifest = tokenize(TokenizeConfig(**common, out=str(tmp_path / "crashed"), workers=2))
    errors = [json.loads(line) for line in (tmp_path / "crashed" / "errors.jsonl").read_text().splitlines()]
    assert [(e["source"], e["reason"]) for e in errors] == [(str(folder / "crash.png"), "a worker died preparing "
                                                             "this item")]
    assert manifest["samples"] == 5 and manifest["errors"] == {"a worker died preparing this item": 1}
    clean = {k: t.tobytes() for k, t, meta in iter_samples(tmp_path / "clean") if "crash" not in meta["source"]}
    assert {k: t.tobytes() for k, t, _ in iter_samples(tmp_path / "crashed")} == clean


def test_a_tar_sample_whose_members_are_ambiguous_is_recorded_and_the_shards_stay_readable(tmp_path, tokdir):
    """A key that comes back after another sample, or one sample with two members of one extension (``a.txt`` twice,
    ``c.png`` and ``c.PNG``): which file is meant is unknown, so that sample is recorded; before, the key was
    written twice and omnitok's own reader refused the whole shard."""
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    photo = jpeg(PHOTOS[0][::8, ::8])
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        for name, caption in [("a", b"first a"), ("b", b"b"), ("a", b"second a"), ("c", b"c"), ("d", b"d")]:
            add(tar, f"{name}.jpg", photo)
            add(tar, f"{name}.txt", caption)
            if name == "c":
                add(tar, "c.JPG", photo)
            if name == "d":
                add(tar, "d.txt", b"another caption")
        add(tar, "e.jpg", photo)
        add(tar, "e.txt", b"e")
    out = tmp_path / "shards"
    manifest = tokenize(TokenizeConfig(inputs=[str(tmp_path / "in.tar")], tokenizer=str(tokdir), out=str(out),
                                       workers=0))
    tok = MultimodalTokenizer.from_dir(tokdir)
    written = {meta["source"].rsplit(":", 1)[1]: tok.decode(ids).segments for _, ids, meta in iter_samples(out)}
    assert set(written) == {"a", "b", "e"} and written["a"][0].text == "first a"  # caption-first pairs
    assert manifest["errors"] == {"sample key comes again after other samples": 1, "two jpg members in one sample": 1,
                                  "two txt members in one sample": 1}
    assert main(["shards", "stats", str(out)]) == 0


def test_a_full_disk_is_one_line_and_the_rerun_ends_with_the_shards_of_an_uninterrupted_run(tmp_path, tokdir, corpus,
                                                                                         monkeypatch, capsys):
    import errno

    from omnitok.data import shards

    args = ["tokenize", "--tokenizer", str(tokdir), "--input", *specs(corpus), "--workers", "0", "--shard-size", "5"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    real, written = shards._member, {"n": 0}

    def full_disk(tar, name, data):
        written["n"] += 1
        if written["n"] > 25:  # in the third shard (two members a sample)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tar, name, data)

    monkeypatch.setattr(shards, "_member", full_disk)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"omnitok: error: writing shard-000002.tar failed: the disk holding {out} is full; the shards before it are "
        "complete: free space, then rerun the same command to continue")
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]  # no .tmp left
    monkeypatch.setattr(shards, "_member", real)
    assert main([*args, "--out", str(out)]) == 0
    assert digest(out) == digest(tmp_path / "clean")
