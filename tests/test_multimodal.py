import json
import shutil

import numpy as np
import pytest
from fakes import FakeAudioTokenizer, FakeImageTokenizer

from omnitok.cli import main
from omnitok.document import Audio, Document, Image, Text
from omnitok.errors import LayoutMismatch, MalformedSequence, OmnitokError
from omnitok.tokenizers import protocol
from omnitok.tokenizers.multimodal import MultimodalTokenizer, assemble
from omnitok.tokenizers.text import TextTokenizer


@pytest.fixture
def tok(sp_tok):
    return MultimodalTokenizer.build(sp_tok, FakeImageTokenizer(), FakeAudioTokenizer())


@pytest.fixture
def fake_types(monkeypatch):
    """Make the fakes loadable from directories, as the real image and audio tokenizers are."""
    monkeypatch.setitem(protocol.MEDIA_LOADERS["image"], "fake", FakeImageTokenizer.from_dir)
    monkeypatch.setitem(protocol.MEDIA_LOADERS["audio"], "fake", FakeAudioTokenizer.from_dir)


def exact_image(tok, rows, cols, seed):
    """An image the fake tokenizer encodes exactly (decoded from random codes)."""
    codes = np.random.default_rng(seed).integers(0, tok.image.codebook_size, (rows, cols))
    return codes, tok.image.decode([codes])[0]


def exact_audio(tok, frames, seed):
    codes = np.random.default_rng(seed).integers(0, tok.audio.codebook_size, (tok.audio.num_codebooks, frames))
    return codes, (tok.audio.decode([codes])[0][0], tok.audio.sample_rate)


def assert_same_document(decoded, original):
    original = original.merged()
    assert decoded.modalities == original.modalities
    for got, want in zip(decoded.segments, original.segments):
        if isinstance(want, Text):
            assert got.text == want.text
        elif isinstance(want, Image):
            np.testing.assert_array_equal(got.source, want.source)
        else:
            wave, sr = got.source
            assert sr == want.source[1]
            np.testing.assert_array_equal(wave[0], want.source[0])


def documents(tok):
    _, cat = exact_image(tok, 3, 5, seed=1)
    _, dog = exact_image(tok, 8, 8, seed=2)
    _, meow = exact_audio(tok, 7, seed=3)
    _, bark = exact_audio(tok, 1, seed=4)
    return {
        "text-only": Document([Text("Hello, world! 😀 漢字")]),
        "image-text": Document([Image(cat), Text(" A cat, 3 by 5 patches.")]),
        "text-image": Document([Text("A dog: "), Image(dog)]),
        "audio-text": Document([Audio(meow), Text("transcript: meow")]),
        "interleaved": Document([Text("First "), Text("a cat "), Image(cat), Text(""), Text(" then it says"),
                                 Audio(meow), Image(dog), Audio(bark), Text("\nThe end.")]),
    }


@pytest.mark.parametrize("kind", ["text-only", "image-text", "text-image", "audio-text", "interleaved"])
def test_documents_round_trip(tok, kind):
    doc = documents(tok)[kind]
    ids = tok.encode(doc)
    assert ids.dtype == np.int32
    assert ids[0] == tok.text.bos_id and ids[-1] == tok.text.eos_id
    assert_same_document(tok.decode(ids), doc)


def test_templates_follow_the_design(tok):
    layout = tok.layout
    cat_codes, cat = exact_image(tok, 3, 5, seed=1)
    meow_codes, meow = exact_audio(tok, 4, seed=3)
    enc = tok.encode_batch([Document([Text("A cat"), Image(cat), Audio(meow)])])[0]
    ids, spans = enc.ids, enc.spans
    text_ids = tok.text.encode(["A cat"])[0]
    assert [s.modality for s in spans] == ["text", "image", "audio"]
    assert (spans[0].start, spans[0].stop) == (1, 1 + len(text_ids))
    np.testing.assert_array_equal(ids[1:spans[0].stop], text_ids)
    image = ids[spans[1].start:spans[1].stop]
    assert list(image[:3]) == [layout.boi_id, layout.rows_id(3), layout.cols_id(5)] and image[-1] == layout.eoi_id
    np.testing.assert_array_equal(image[3:-1], layout.image_ids(cat_codes.reshape(-1)))  # row-major
    audio = ids[spans[2].start:spans[2].stop]
    assert audio[0] == layout.boa_id and audio[-1] == layout.eoa_id and len(audio) == 2 + 4 * 3
    # frame-major: frame f, codebook q at 1 + f * n_q + q
    for f in range(4):
        for q in range(3):
            assert audio[1 + f * 3 + q] == layout.audio_range(q)[0] + meow_codes[q, f]
    assert spans[2].stop == len(ids) - 1


def test_batch_encoding_equals_one_by_one(tok):
    docs = list(documents(tok).values())
    batch = tok.encode_batch(docs)
    for doc, enc in zip(docs, batch):
        np.testing.assert_array_equal(enc.ids, tok.encode(doc))


def test_parse_refuses_malformed_sequences(tok):
    layout = tok.layout
    _, cat = exact_image(tok, 2, 2, seed=1)
    _, meow = exact_audio(tok, 2, seed=3)
    good = tok.encode(Document([Text("x"), Image(cat), Audio(meow)]))
    boi = int(np.flatnonzero(good == layout.boi_id)[0])
    boa = int(np.flatnonzero(good == layout.boa_id)[0])
    cases = {
        "<|eoi|> must be at": np.delete(good, boi + 3),  # one image code short
        "expected a <|rows_R|> token": np.delete(good, boi + 1),
        "not an audio code": np.insert(good, boa + 1, layout.image_ids(np.array([0]))),
        "not a whole number of frames": np.delete(good, boa + 1),
        "belongs to codebook 1": good[np.r_[0:boa + 1, boa + 2, boa + 1, boa + 3:len(good)]],
        "has no <|eoa|>": good[:-2],
        "unexpected <|pad|>": np.insert(good, 2, layout.pad_id),
        "unexpected a reserved id": np.insert(good, 2, layout.ranges["reserved"][0]),
        "image at position": good[:boi + 4],
    }
    for message, ids in cases.items():
        with pytest.raises(MalformedSequence, match=message.replace("|", "\\|").replace("(", "\\(")):
            tok.parse(ids)


def test_bad_documents_are_refused(tok, sp_tok):
    with pytest.raises(OmnitokError, match="document d7 is empty"):
        tok.encode(Document([Text("")], id="d7"))
    with pytest.raises(OmnitokError, match="outside 1..8"):
        tok.encode(Document([Image(np.zeros((36, 4, 3), np.uint8))]))  # 9 rows of patches
    with pytest.raises(OmnitokError, match="too short"):
        tok.encode(Document([Audio((np.zeros(3, np.float32), 800))]))  # under one frame
    text_only = MultimodalTokenizer.build(sp_tok)
    with pytest.raises(OmnitokError, match="has no image tokenizer"):
        text_only.encode(Document([Image(np.zeros((8, 8, 3), np.uint8))]))


def test_assemble_writes_a_directory_that_reloads(tmp_path, fake_types, sp_dir, capsys):
    (tmp_path / "img").mkdir()
    FakeImageTokenizer(seed=5).save(tmp_path / "img")
    FakeAudioTokenizer().save(tmp_path / "aud")
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--image", str(tmp_path / "img"),
                 "--audio", str(tmp_path / "aud"), "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "image    [" in out and "audio tokenizer" in out
    tok = MultimodalTokenizer.from_dir(tmp_path / "tok")
    assert tok.layout.fingerprints["image"] == FakeImageTokenizer(seed=5).fingerprint
    assert set(tok.layout.fingerprints) == {"text", "image", "audio"}
    assert tok.layout.vocab_size % 64 == 0
    doc = documents(tok)["interleaved"]
    assert_same_document(tok.decode(tok.encode(doc)), doc)
    assert main(["tokenizer", "info", str(tmp_path / "tok")]) == 0
    assert "3 codebooks x 16" in capsys.readouterr().out
    # The directory is never overwritten: shards made with it would stop matching.
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--out", str(tmp_path / "tok")]) == 2
    assert "already holds a tokenizer" in capsys.readouterr().err


def test_a_replaced_part_is_refused_naming_both_fingerprints(tmp_path, fake_types, sp_dir, hf_dir):
    FakeImageTokenizer(seed=5).save(tmp_path / "img")
    tok = assemble(sp_dir, tmp_path / "tok", image=tmp_path / "img")
    # Swap the image tokenizer for one with other weights (palette).
    shutil.rmtree(tmp_path / "tok" / "image")
    FakeImageTokenizer(seed=6).save(tmp_path / "tok" / "image")
    with pytest.raises(LayoutMismatch) as e:
        MultimodalTokenizer.from_dir(tmp_path / "tok")
    assert tok.layout.fingerprints["image"] in str(e.value)
    assert FakeImageTokenizer(seed=6).fingerprint in str(e.value)
    # Same for the text part.
    shutil.rmtree(tmp_path / "tok" / "image")
    FakeImageTokenizer(seed=5).save(tmp_path / "tok" / "image")
    shutil.rmtree(tmp_path / "tok" / "text")
    shutil.copytree(hf_dir, tmp_path / "tok" / "text")
    with pytest.raises(LayoutMismatch, match="text tokenizer"):
        MultimodalTokenizer.from_dir(tmp_path / "tok")


def test_directory_problems_get_one_clear_message(tmp_path, fake_types, sp_dir, capsys):
    FakeImageTokenizer().save(tmp_path / "img")
    info = json.loads((tmp_path / "img" / "omnitok.json").read_text())
    (tmp_path / "img" / "omnitok.json").write_text(json.dumps({**info, "type": "vqgan9000"}))
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--image", str(tmp_path / "img"),
                 "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown image tokenizer type 'vqgan9000'" in err[0]
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--audio", str(sp_dir),
                 "--out", str(tmp_path / "tok")]) == 2
    assert "holds a tokenizer for 'text', not for 'audio'" in capsys.readouterr().err
    with pytest.raises(OmnitokError, match="no layout.json"):
        MultimodalTokenizer.from_dir(tmp_path)
    tok = assemble(sp_dir, tmp_path / "t2", image=None)
    (tmp_path / "t2" / "layout.json").write_text(
        json.dumps({**tok.layout.to_json(), "fingerprints": {**tok.layout.fingerprints, "audio": "0" * 64}}))
    with pytest.raises(OmnitokError, match="records an audio tokenizer, but .*/audio is missing"):
        MultimodalTokenizer.from_dir(tmp_path / "t2")


def test_text_range_can_exceed_the_tokenizer_for_padded_llm_embeddings(sp_tok):
    tok = MultimodalTokenizer.build(sp_tok, FakeImageTokenizer(), text_vocab_size=1024)
    assert tok.layout.ranges["text"] == (0, 1024) and tok.layout.boi_id == 1025
    with pytest.raises(OmnitokError, match="smaller than the text tokenizer's 1000"):
        MultimodalTokenizer.build(sp_tok, text_vocab_size=999)


def test_document_json_form(tmp_path):
    doc = Document.from_json({"id": 7, "segments": [{"text": "hi"}, {"image": "a.png"}, {"audio": "s3://b/c.wav"}]},
                             base_dir=tmp_path)
    assert doc.id == "7" and doc.modalities == ["text", "image", "audio"]
    assert doc.segments[1].source == str(tmp_path / "a.png") and doc.segments[2].source == "s3://b/c.wav"
    for bad, message in [({"segments": [{"video": "x"}]}, "segment 0"), ([{"text": 3}], "must be a string"),
                         ({"segs": []}, "unknown key 'segs'"), ("text", "list of segments")]:
        with pytest.raises(OmnitokError, match=message):
            Document.from_json(bad)


@pytest.fixture
def hf_dir(tmp_path, sp_dir):
    """A text tokenizer directory with another fingerprint (the same model loaded through the HF backend)."""
    from transformers import AutoTokenizer

    (tmp_path / "llama").mkdir()
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "llama" / "tokenizer.model")
    (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "llama")) == 1000
    return TextTokenizer.from_path(tmp_path / "llama").save(tmp_path / "hf_text")
