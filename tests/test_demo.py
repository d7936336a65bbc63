import json
from pathlib import Path

import numpy as np

from omnitok.cli import main
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


def test_the_sound_checker_reads_every_corpus_sound_right():
    from omnitok.demo.corpus import SAMPLE_RATE, SOUNDS
    from omnitok.demo.measure import classify_sound

    rng = np.random.default_rng(3)
    for kind in SOUNDS:
        for _ in range(5):
            wave = synth_sound(kind, rng)
            assert classify_sound(wave, SAMPLE_RATE) == kind
            assert classify_sound(np.stack([wave, wave]), SAMPLE_RATE) == kind  # (channels, samples)
    assert classify_sound(np.zeros(12000), SAMPLE_RATE) is None


def test_conversations_train_on_some_phrasings_and_hold_the_others_out(tmp_path):
    from omnitok.demo.chat_corpus import PHRASINGS, conversations, held_out_requests, phrasing_text
    from omnitok.document import Conversation

    make_corpus(tmp_path, per_shape=6, per_sound=2, mixed=0)
    n = conversations(tmp_path)
    lines = (tmp_path / "chats.jsonl").read_text().splitlines()
    # every picture drawn, a third described, a third followed up, a sixth then a sound; every sound twice, a quarter
    # of them then a picture
    assert n == len(lines) == 12 * 6 + 24 + 24 + 12 + 5 * 2 * 2 + 5
    answers = [[m["content"][0]["type"] for m in json.loads(line)["messages"] if m["role"] == "assistant"
                and isinstance(m["content"], list)] for line in lines]
    assert answers.count(["image", "audio"]) == 12 and answers.count(["audio", "image"]) == 5
    texts = []
    for line in lines:
        conv = Conversation.from_messages(json.loads(line)["messages"], tmp_path)  # a valid training conversation
        for seg in conv.segments:
            if hasattr(seg, "text"):
                texts.append(seg.text)
            else:
                assert Path(seg.source).is_file()  # paths relative to the file, resolved
    held = held_out_requests(tmp_path)
    assert {r["kind"] for r in held} == {"draw", "describe", "play", "then_play", "then_draw", "follow"}
    switching = [[m["content"][0]["type"] for m in r["messages"] if m["role"] == "assistant"] for r in held
                 if r["kind"].startswith("then_")]
    assert switching.count(["image"]) == 10 and switching.count(["audio"]) == 12  # the other medium came first
    for r in held:
        asked = [p["text"] for m in r["messages"] if m["role"] == "user" for p in m["content"] if p["type"] == "text"]
        assert asked[-1] not in texts  # the measured phrasing was never trained on
        assert asked[-1] in r["prompt"]  # the base model gets the same request
    for kind, (_, held_out) in PHRASINGS.items():
        assert not any(p.split("{")[0] and p.split("{")[0] in t for p in held_out for t in texts), kind
    words = set(" ".join(phrasing_text()).split())
    assert {"Paint", "Change", "Tell", "chirp", "triangle"} <= words


def test_the_demo_refuses_a_used_directory_or_a_bad_seed_before_any_work(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").touch()
    for argv, says in ([str(tmp_path / "used")], "is not empty"), ([str(tmp_path / "new"), "--seed", "-1"],
                                                                    "--seed must be from 0 to 2**32 - 1, got -1"):
        assert main(["demo", "--out", *argv]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
