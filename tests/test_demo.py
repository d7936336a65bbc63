import json

import numpy as np

from omnitok.demo.corpus import COLOURS, SHAPES, draw_shape, make_corpus, synth_sound
from omnitok.demo.measure import caption_match, classify


def test_the_shape_checker_reads_every_corpus_drawing_right():
    rng = np.random.default_rng(5)
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(5):
                assert classify(draw_shape(colour, shape, rng)) == (colour, shape)
    assert classify(np.full((32, 32, 3), 240, dtype=np.uint8)) == (None, None)  # nothing drawn


def test_caption_match_counts_against_chance():
    rng = np.random.default_rng(0)
    images = [draw_shape("red", "circle", rng) for _ in range(3)] + [draw_shape("red", "square", rng),
                                                                     draw_shape("blue", "circle", rng)]
    m = caption_match(images, "red", "circle")
    assert (m["images"], m["colour"], m["shape"], m["both"]) == (5, 4, 4, 3)
    assert m["chance"]["both"] == 1 / 12


def test_corpus_is_deterministic_and_well_formed(tmp_path):
    a = make_corpus(tmp_path / "a", per_shape=2, per_sound=2, mixed=3)
    make_corpus(tmp_path / "b", per_shape=2, per_sound=2, mixed=3)
    assert a == {"images": 24, "sounds": 10, "documents": 34 + 12 + 3}  # caption -> media, a third reversed, mixed
    assert (tmp_path / "a" / "docs.jsonl").read_bytes() == (tmp_path / "b" / "docs.jsonl").read_bytes()
    docs = [json.loads(line)["segments"] for line in (tmp_path / "a" / "docs.jsonl").read_text().splitlines()]
    assert sum("text" in d[0] for d in docs) == 34 + 3 and sum("text" in d[-1] for d in docs) == 12
    wave = synth_sound("a high tone", np.random.default_rng(0), seconds=1.0)
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) - 880) < 30  # 1 s at 24 kHz: bin = Hz
