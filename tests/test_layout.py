import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnitok.errors import LayoutMismatch, MalformedSequence, OmnitokError
from omnitok.tokenizers.layout import Modality, TokenLayout


@st.composite
def layouts(draw):
    image = draw(st.booleans())
    audio = draw(st.booleans())
    return TokenLayout(
        text_vocab_size=draw(st.integers(1, 70_000)),
        image_codebook_size=draw(st.integers(1, 20_000)) if image else 0,
        max_grid_side=draw(st.integers(1, 64)) if image else 0,
        audio_codebook_sizes=draw(st.lists(st.integers(1, 65_536), min_size=1, max_size=32)) if audio else (),
        audio_frame_rate=draw(st.sampled_from([12.5, 40.0, 50.0, 75.0, 44_100 / 512])) if audio else 0.0,
        fingerprints=draw(st.dictionaries(st.sampled_from(["text", "image", "audio"]),
                                          st.text("0123456789abcdef", min_size=64, max_size=64))),
    )


def small_layout(**kw) -> TokenLayout:
    args = dict(text_vocab_size=100, image_codebook_size=50, max_grid_side=4, audio_codebook_sizes=(8,) * 3,
                audio_frame_rate=100.0)
    return TokenLayout(**{**args, **kw})


@given(layouts())
@settings(max_examples=200, deadline=None)
def test_ranges_are_disjoint_cover_the_vocab_and_pad_to_64(layout):
    assert layout.vocab_size % 64 == 0 and layout.vocab_size - layout.used_vocab_size < 64
    position = 0
    for name, (start, stop) in layout.ranges.items():
        assert start == position and stop >= start, name
        position = stop
    assert position == layout.vocab_size
    special_start, special_stop = layout.ranges["special"]
    assert sorted(layout.specials.values()) == list(range(special_start, special_stop))
    # Each range's first and last id report that range's modality (numpy and torch agree).
    for modality, name in zip(Modality, layout.ranges):
        start, stop = layout.ranges[name]
        if stop > start:
            probe = np.array([start, stop - 1])
            assert (layout.modality_of(probe) == modality).all()
            assert (layout.modality_of(torch.from_numpy(probe)) == modality).all()


@given(layouts(), st.data())
@settings(max_examples=200, deadline=None)
def test_code_to_id_to_code_is_identity_for_every_modality_and_codebook(layout, data):
    text = np.array(data.draw(st.lists(st.integers(0, layout.text_vocab_size - 1), max_size=20)), dtype=np.int64)
    assert (layout.modality_of(text) == Modality.TEXT).all()
    if layout.has_image:
        codes = np.array(data.draw(st.lists(st.integers(0, layout.image_codebook_size - 1), min_size=1, max_size=50)))
        ids = layout.image_ids(codes)
        assert (layout.modality_of(ids) == Modality.IMAGE).all()
        np.testing.assert_array_equal(layout.image_codes(ids), codes)
        assert torch.equal(layout.image_codes(layout.image_ids(torch.from_numpy(codes))), torch.from_numpy(codes))
    if layout.has_audio:
        n_q, sizes = layout.audio_num_codebooks, np.array(layout.audio_codebook_sizes)
        frames = data.draw(st.integers(1, 12))
        seed = data.draw(st.integers(0, 2**31))
        codes = np.random.default_rng(seed).integers(0, sizes[:, None], (n_q, frames))  # codebooks of unequal sizes
        ids = layout.audio_ids(codes)
        assert ids.shape == (n_q * frames,)
        assert (layout.modality_of(ids) == Modality.AUDIO).all()
        for i, token in enumerate(ids):  # frame-major: position i holds codebook i % n_q of frame i // n_q
            start, stop = layout.audio_range(i % n_q)
            assert start <= token < stop and token - start == codes[i % n_q, i // n_q]
        np.testing.assert_array_equal(layout.audio_codes(ids), codes)
        assert torch.equal(layout.audio_codes(layout.audio_ids(torch.from_numpy(codes))), torch.from_numpy(codes))


@given(layouts())
@settings(max_examples=100, deadline=None)
def test_save_load_is_identity(tmp_path_factory, layout):
    path = layout.save(tmp_path_factory.mktemp("layout"))
    loaded = TokenLayout.load(path)
    assert loaded == layout
    assert loaded.to_json() == layout.to_json()


def test_every_id_of_a_small_layout_has_exactly_one_home():
    layout = small_layout()
    ids = np.arange(layout.vocab_size)
    modality = layout.modality_of(ids)
    for m, (start, stop) in zip(Modality, layout.ranges.values()):
        assert (modality[start:stop] == m).all()
    assert (modality[layout.used_vocab_size:] == Modality.RESERVED).all()


def test_special_tokens_and_grid_tokens():
    layout = small_layout()
    assert layout.special_id("<|boi|>") == layout.boi_id == 101
    assert layout.pad_id == 100
    for r in range(1, 5):
        assert layout.rows_of(layout.rows_id(r)) == r and layout.cols_of(layout.cols_id(r)) == r
    assert layout.special_name(layout.eoa_id) == "<|eoa|>"
    with pytest.raises(OmnitokError, match=r"unknown special token '<\|bos\|>'.*<\|boi\|>"):
        layout.special_id("<|bos|>")
    with pytest.raises(OmnitokError, match="outside 1..4"):
        layout.rows_id(5)
    with pytest.raises(MalformedSequence, match="expected a <\\|cols_C\\|> token"):
        layout.cols_of(layout.rows_id(2))
    text_only = TokenLayout(text_vocab_size=10)
    assert list(text_only.specials) == ["<|pad|>"]
    with pytest.raises(OmnitokError, match="no image modality"):
        text_only.image_ids(np.array([0]))


def test_fingerprint_mismatch_is_refused_naming_both():
    layout = small_layout(fingerprints={"image": "a" * 64})
    layout.check_fingerprint("image", "a" * 64, "tok/image")
    with pytest.raises(LayoutMismatch) as e:
        layout.check_fingerprint("image", "b" * 64, "tok/image")
    assert "a" * 64 in str(e.value) and "b" * 64 in str(e.value) and "tok/image" in str(e.value)
    with pytest.raises(LayoutMismatch, match="records no audio tokenizer"):
        layout.check_fingerprint("audio", "c" * 64, "tok/audio")
    with pytest.raises(LayoutMismatch, match="image_codebook_size is 51 there and 50 here"):
        layout.check_same(small_layout(image_codebook_size=51, fingerprints={"image": "a" * 64}), "tok", "shards")


def test_codes_out_of_range_and_ids_of_no_modality_are_refused():
    layout = small_layout()
    with pytest.raises(OmnitokError, match="image codes: value 50 is outside"):
        layout.image_ids(np.array([0, 50]))
    with pytest.raises(OmnitokError, match="image codes: value -1"):
        layout.image_ids(torch.tensor([-1]))
    with pytest.raises(OmnitokError, match="audio codes: value 8"):
        layout.audio_ids(np.full((3, 2), 8))
    with pytest.raises(OmnitokError, match="shape"):
        layout.audio_ids(np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(OmnitokError, match="image code ids"):
        layout.image_codes(np.array([layout.ranges["audio"][0]]))
    reserved = layout.ranges["reserved"][0]
    assert layout.modality_of(np.array([reserved]))[0] == Modality.RESERVED
    with pytest.raises(OmnitokError, match="audio code ids"):
        layout.audio_codes(np.array([reserved, reserved, reserved]))
    with pytest.raises(OmnitokError, match="vocab_size"):
        layout.modality_of(np.array([layout.vocab_size]))
    with pytest.raises(OmnitokError, match="integer"):
        layout.modality_of(np.array([1.5]))
    with pytest.raises(OmnitokError, match="text ids"):
        layout.check_text(np.array([5, 100]))


def test_malformed_audio_sequences_are_refused():
    layout = small_layout()
    ids = layout.audio_ids(np.arange(6).reshape(3, 2))
    with pytest.raises(MalformedSequence, match="not a whole number of frames"):
        layout.audio_codes(ids[:-1])
    swapped = ids.copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # frame 1: codebook 1 before codebook 0
    with pytest.raises(MalformedSequence, match="position 3 \\(frame 1\\) belongs to codebook 1"):
        layout.audio_codes(swapped)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["ranges"].update(image=[d["ranges"]["image"][0] - 1, d["ranges"]["image"][1]]), "overlap"),
    (lambda d: d["ranges"].update(special=[d["ranges"]["special"][0] + 1, d["ranges"]["special"][1]]),
     "belong to no range"),
    (lambda d: d.update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["specials"].update({"<|eoi|>": d["specials"]["<|boi|>"]}), "share id"),
    (lambda d: d["specials"].update({"<|boi|>": 3}), "outside the special range"),
    (lambda d: d.update(vocab_size=128), "vocab_size"),
    (lambda d: d.update(format="other"), "not an omnitok token layout"),
    (lambda d: d.update(audio_codebook_sizes=[8, 0]), "list of positive integers"),
    (lambda d: d.update(audio_frame_rate=-1), "audio_frame_rate"),
    (lambda d: d["specials"].update({"<|boi|>": d["specials"]["<|eoi|>"] + 100}), "outside the special range"),
])
def test_hand_edited_layout_files_are_refused_with_a_message(tmp_path, edit, message):
    data = small_layout().to_json()
    edit(data)
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OmnitokError, match=message):
        TokenLayout.load(path)


def test_consistent_but_edited_tables_are_refused(tmp_path):
    data = small_layout().to_json()
    data["specials"] = {**data["specials"], "<|boi|>": data["specials"]["<|eoi|>"],
                        "<|eoi|>": data["specials"]["<|boi|>"]}  # swapped: disjoint, inside range, but wrong
    (tmp_path / "layout.json").write_text(json.dumps(data))
    with pytest.raises(OmnitokError, match="stored 'specials' does not follow from its sizes"):
        TokenLayout.load(tmp_path)


def test_a_version_1_file_reads_with_the_same_ids_and_takes_the_codec_frame_rate(tmp_path):
    """Version 1 recorded one size for every audio codebook and no frame rate: the ids are the same, so shards and
    models written under it are read under the version 2 layout of the same codec."""
    now = small_layout(audio_codebook_sizes=(8,) * 3, audio_frame_rate=75.0)
    old = now.to_json()
    del old["audio_codebook_sizes"], old["audio_frame_rate"]
    old.update(version=1, audio_codebook_size=8, audio_num_codebooks=3)
    (tmp_path / "layout.json").write_text(json.dumps(old))
    read = TokenLayout.load(tmp_path)
    assert read.audio_codebook_sizes == (8, 8, 8) and read.audio_frame_rate == 0.0
    assert read.ranges == now.ranges and read.specials == now.specials
    now.check_reads(read, "the tokenizer", "old shards")  # the rate a version 1 file lacks names no id
    read.check_reads(now, "an old export", "new shards")
    read.check_same(now, "old shards", "a new part")  # resuming or merging across the versions
    assert read.with_audio_frame_rate(75.0) == now
    with pytest.raises(OmnitokError, match="does not record the audio codec's frame rate"):
        read.audio_frames(1.0)
    with pytest.raises(LayoutMismatch, match="12.5 frames/s, but the layout records 75"):
        now.with_audio_frame_rate(12.5)
    with pytest.raises(LayoutMismatch, match="audio_frame_rate"):
        now.check_reads(dataclasses.replace(now, audio_frame_rate=50.0), "a", "b")


def test_audio_codebooks_of_unequal_sizes_and_seconds_of_frames():
    layout = small_layout(audio_codebook_sizes=(4, 16, 2), audio_frame_rate=12.5)
    assert [layout.audio_range(q) for q in range(3)] == [(layout.ranges["audio"][0] + a, layout.ranges["audio"][0] + b)
                                                         for a, b in [(0, 4), (4, 20), (20, 22)]]
    codes = np.array([[3, 0], [15, 9], [1, 0]])
    np.testing.assert_array_equal(layout.audio_codes(layout.audio_ids(codes)), codes)
    with pytest.raises(OmnitokError, match="codebook 0 has 4 codes, got 5"):
        layout.audio_ids(np.array([[5, 0], [0, 0], [0, 0]]))
    with pytest.raises(MalformedSequence, match="belongs to codebook 1"):
        layout.audio_codes(layout.audio_ids(codes)[[1, 0, 2, 3, 4, 5]])
    assert [layout.audio_frames(s) for s in (0.08, 1.0, 10.0, 0.01)] == [1, 13, 125, 1]
    assert "codebooks of 4, 16, 2, 12.5 frames/s" in layout.describe()
