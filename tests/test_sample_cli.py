import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnitok.cli import main
from omnitok.document import Audio, Document
from omnitok.document import Image as ImageSegment
from omnitok.errors import OmnitokError
from omnitok.model.sample import SampleRequest, SpanDecoder, load_model, parse_prompt, sample
from omnitok.model.sampler import ModalitySampling, SamplingConfig


@pytest.mark.slow
def test_every_media_span_of_many_random_samples_decodes(model_dir, tmp_path):
    model, tok = load_model(model_dir)
    rng = np.random.default_rng(0)
    words = ["a red circle", "a low tone", "two squares", "then", "and", "chirp", "blue"]
    prompts = [parse_prompt(" ".join(rng.choice(words, rng.integers(1, 4)))) for _ in range(1000)]
    cfg = SamplingConfig(max_new_tokens=90, max_audio_s=0.08, image=ModalitySampling(top_k=50, guidance=2.0),
                         audio=ModalitySampling(guidance=1.5))
    records = sample(model, tok, prompts, tmp_path, SampleRequest(cfg, batch_size=250), progress=False)
    kinds = {"image": 0, "audio": 0}
    for r in records:
        for s in r["segments"]:
            if s["type"] == "image":
                kinds["image"] += 1
                assert s["rows"] * s["cols"] + 4 == s["tokens"]
                assert Image.open(tmp_path / r["id"] / s["file"]).size == (4 * s["cols"], 4 * s["rows"])
            elif s["type"] == "audio":
                kinds["audio"] += 1
                wave, rate = sf.read(tmp_path / r["id"] / s["file"])
                assert rate == 24000 and len(wave) == s["frames"] * 320 and np.isfinite(wave).all()
            else:
                ids = tok.text.encode([s["text"]])[0]
                assert all(0 <= i < tok.layout.text_vocab_size for i in ids)
    assert kinds["image"] > 100 and kinds["audio"] > 100


def test_spans_decode_the_same_on_a_background_thread_and_in_the_callers(model_dir):
    """A GPU decodes on a thread of its own (batching what is waiting), a CPU in the caller's thread: the same arrays,
    and an error raised by ``finish`` in both."""
    _, tok = load_model(model_dir)
    rng = np.random.default_rng(0)
    doc = Document([ImageSegment(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                    Audio((0.1 * rng.standard_normal(2400).astype(np.float32), 24_000)),
                    ImageSegment(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))])
    ids = tok.encode_batch([doc])[0].ids
    spans = [(p.modality, ids[p.span.start:p.span.stop].tolist()) for p in tok.parse(ids) if p.modality != "text"]
    assert [m for m, _ in spans] == ["image", "audio", "image"]
    done = {}
    for background in (True, False):
        decoder = SpanDecoder(tok, background=background)
        assert (decoder.thread is not None) == background
        for k, (modality, span) in enumerate(spans):
            decoder.submit(k, modality, span)
        done[background] = decoder.finish()
    assert sorted(done[True]) == sorted(done[False]) == [0, 1, 2]
    for k in range(3):  # a thread batches the images waiting: float sums in another order, a pixel may round apart
        np.testing.assert_allclose(done[True][k].astype(np.float32), done[False][k], atol=1 if k != 1 else 1e-6)
    assert done[False][0].shape == (32, 32, 3) and done[False][1].shape == (1, 8 * 320)  # 2400 samples: 8 frames
    for background in (True, False):
        decoder = SpanDecoder(tok, background=background)
        decoder.submit(0, "audio", spans[0][1])  # an image span handed over as a sound
        with pytest.raises(OmnitokError, match="audio codes must have shape"):
            decoder.finish()


def test_sample_command_writes_files_and_a_page(model_dir, tmp_path, capsys):
    photo = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photo)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('{"segments": [{"text": "describe "}, {"image": "cat.png"}]}\nplain words\n\n')
    out = tmp_path / "out"
    assert main(["sample", "--model", str(model_dir), "--prompt", f"A cat <image:{photo}> says", "--prompts",
                 str(prompts), "--out", str(out), "--max-new-tokens", "80", "--num-samples", "2",
                 "image.guidance=2", "text.temperature=0.9"]) == 0
    assert "6 samples" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for k in range(6):
        record = json.loads((out / f"{k:03d}" / "sample.json").read_text())
        assert record["seed"] == k and (out / f"{k:03d}" / "text.txt").is_file()
        for s in record["segments"]:
            if "file" in s:
                assert (out / record["id"] / s["file"]).is_file() and f"{record['id']}/{s['file']}" in page
    assert json.loads((out / "samples.json").read_text())["sampling"]["image"]["guidance"] == 2
    # output image: always exactly one image, of the requested grid
    assert main(["sample", "--model", str(model_dir), "--prompt", "a red circle", "--out", str(tmp_path / "img"),
                 "--output-modality", "image", "--grid", "4x8", "--num-samples", "3", "--max-new-tokens", "40"]) == 0
    for k in range(3):
        record = json.loads((tmp_path / "img" / f"{k:03d}" / "sample.json").read_text())
        assert [(s["type"], s.get("rows"), s.get("cols")) for s in record["segments"]] == [("image", 4, 8)]
        assert record["stopped"] == "span"


def test_bad_requests_get_one_line(model_dir, tmp_path, capsys, sp_dir):
    def error(*argv):
        assert main(["sample", "--model", str(model_dir), "--out", str(tmp_path / "o"), *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert "missing.png does not exist" in error("--prompt", "see <image:missing.png>")
    assert "outside 1..8" in error("--prompt", "x", "--grid", "9x9")
    assert "--grid must look like" in error("--prompt", "x", "--grid", "big")
    assert "give --prompt" in error()
    assert "unknown setting 'sampling.image.topk'" in error("--prompt", "x", "image.topk=3")
    text_only = tmp_path / "textonly"
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--out", str(text_only)]) == 0
    assert "differs from" in error("--prompt", "x", "--tokenizer", str(text_only))
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer"))
    assert "not trained together" in error("--prompt", "x", "--model", str(bare), "--tokenizer", str(text_only))
    assert "not a model directory" in error("--prompt", "x", "--model", str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle\n\n{"image": "x.png"\n')  # the bad line is the third
    assert error("--prompts", str(prompts)).startswith("omnitok: error: prompts.txt:3: prompt '{\"image\": \"x.png\"' "
                                                       "looks like JSON but is not: Expecting ',' delimiter (column")
    prompts.write_bytes(b"a red circle\na bad \xff byte\n")
    assert error("--prompts", str(prompts)) == f"omnitok: error: prompt file {prompts} is not UTF-8 text (byte 19)"
    assert error("--prompts", str(tmp_path)) == f"omnitok: error: prompt file {tmp_path} is not a file"
    assert "a seed must be from 0 to 2**64 - 1, got -1" in error("--prompt", "x", "--seed", "-1")
    assert f"got {1 << 64}" in error("--prompt", "x", "--seed", str((1 << 64) - 1), "--num-samples", "2")
