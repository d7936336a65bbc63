"""The demo's instruction-tuning data: conversations built from its corpus, in phrasings split between those trained
on and those held out to measure instruction following.

Four kinds of request, each with its answer taken from the corpus: draw a shape (the answer is the picture),
describe a picture (the answer names its colour and shape), play a sound (the answer is the clip), and the follow-up
"now make it green" after a picture (the answer is the same shape in the new colour); and chats that switch medium,
a sound asked for after a picture and a picture after a sound. ``conversations`` writes the training set (chat
JSONL, the ``messages`` form); ``held_out_requests`` the requests the demo measures the base and the tuned model on,
phrased only in ways training never used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from omnitok.demo.corpus import COLOURS, SHAPES, SOUNDS

PHRASINGS = {  # kind: (trained on, held out)
    # Trained phrasings of pictures and sounds share their openings ("Please", "Can you", "Let me", "Make"), so the
    # request's content words, not its first word, must decide between a picture and a sound.
    "draw": (["Draw a {colour} {shape}.", "Please draw a {colour} {shape}.", "Show me a {colour} {shape}.",
              "Can you draw a {colour} {shape}?", "Let me see a {colour} {shape}.",
              "Make a picture of a {colour} {shape}.", "I would like a picture of a {colour} {shape}."],
             ["Could you show me a {colour} {shape}?", "Paint a {colour} {shape} for me."]),
    "describe": (["What shape is this?", "Describe this picture.", "What is in this image?"],
                 ["Tell me what you see.", "What is drawn here?"]),
    "play": (["Play {sound}.", "Please play {sound}.", "Can you play {sound}?", "Let me hear {sound}.",
              "Make the sound of {sound}."],
             ["Could you play {sound} for me?", "I want to hear {sound}."]),
    "follow": (["Now make it {colour}.", "Make it {colour} instead."], ["Change it to {colour}."]),
}
ANSWER = "It is a {colour} {shape}."


def _images(corpus: Path) -> dict[tuple[str, str], list[str]]:
    return {(c, s): sorted(p.name for p in (corpus / "images").glob(f"{c}_{s}_*.png")) for c in COLOURS
            for s in SHAPES}


def _sounds(corpus: Path) -> dict[str, list[str]]:
    return {k: sorted(p.name for p in (corpus / "audio").glob(f"{k[2:].replace(' ', '_')}_*.wav")) for k in SOUNDS}


def _user(text: str, image: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image", "image": f"images/{image}"})
    return {"role": "user", "content": parts}


def _media(kind: str, path: str) -> dict:
    return {"role": "assistant", "content": [{"type": kind, kind: path}]}


def conversations(corpus: str | Path, seed: int = 0) -> int:
    """Writes ``corpus/chats.jsonl`` (paths relative to it): every picture asked for once, a third of them described,
    a third changed by a follow-up and a sixth followed by a request for a sound; every sound asked for twice, a
    quarter of the times followed by a request for a picture; each request in a trained phrasing drawn at random.
    Returns the number of conversations."""
    corpus = Path(corpus)
    rng = np.random.default_rng(seed)
    trained = {kind: phrasings for kind, (phrasings, _) in PHRASINGS.items()}

    def say(kind: str, **names) -> str:
        return trained[kind][rng.integers(len(trained[kind]))].format(**names)

    images, sounds, out = _images(corpus), _sounds(corpus), []

    def sound_turns() -> list[dict]:
        sound = SOUNDS[rng.integers(len(SOUNDS))]
        clips = sounds[sound]
        return [_user(say("play", sound=sound)), _media("audio", f"audio/{clips[rng.integers(len(clips))]}")]

    def picture_turns() -> list[dict]:
        colour, shape = list(images)[rng.integers(len(images))]
        files = images[(colour, shape)]
        return [_user(say("draw", colour=colour, shape=shape)),
                _media("image", f"images/{files[rng.integers(len(files))]}")]

    for (colour, shape), files in images.items():
        for i, name in enumerate(files):
            out.append([_user(say("draw", colour=colour, shape=shape)), _media("image", f"images/{name}")])
            if i % 6 == 5:  # then a sound
                out.append([*out[-1], *sound_turns()])
            if i % 3 == 0:
                out.append([_user(say("describe"), name),
                            {"role": "assistant", "content": ANSWER.format(colour=colour, shape=shape)}])
            if i % 3 == 1:
                other = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)]
                again = images[(other, shape)][i]
                out.append([_user(say("draw", colour=colour, shape=shape)), _media("image", f"images/{name}"),
                            _user(say("follow", colour=other)), _media("image", f"images/{again}")])
    for sound, files in sounds.items():
        for j, name in enumerate(files * 2):
            out.append([_user(say("play", sound=sound)), _media("audio", f"audio/{name}")])
            if j % 4 == 3:  # then a picture
                out.append([*out[-1], *picture_turns()])
    order = rng.permutation(len(out))
    with open(corpus / "chats.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({"id": f"chat{i:05d}", "messages": out[i]}) + "\n")
    return len(out)


def held_out_requests(corpus: str | Path) -> list[dict]:
    """The measured requests, in held-out phrasings only: each with its ``kind`` (draw, describe, play, follow;
    then_play, a sound asked for after a picture turn; then_draw, a picture after a sound), what a right answer holds
    (``colour`` / ``shape`` / ``sound``), the chat ``messages`` for the tuned model and the same content as a plain
    prompt for the base model (``prompt``: text with ``<image:PATH>`` / ``<audio:PATH>`` references).

    then_play and then_draw measure switching medium within a chat (training switches in trained phrasings only, so
    the text tokenizer and the pretraining stay as they were: a session that added phrasings for it saw the red
    circles fall from 32/32 to 6/32, the tiny demo is that sensitive). They come last, so the other requests keep
    their sampling seeds."""
    corpus = Path(corpus)
    images, requests = _images(corpus), []
    for colour in COLOURS:
        for shape in SHAPES:
            for phrasing in PHRASINGS["draw"][1]:
                text = phrasing.format(colour=colour, shape=shape)
                requests.append({"kind": "draw", "colour": colour, "shape": shape, "messages": [_user(text)],
                                 "prompt": text})
            name = images[(colour, shape)][-1]
            text = PHRASINGS["describe"][1][len(requests) % 2]
            requests.append({"kind": "describe", "colour": colour, "shape": shape,
                             "messages": [_user(text, name)], "prompt": f"{text} <image:images/{name}>"})
    for sound in SOUNDS:
        for phrasing in PHRASINGS["play"][1]:
            text = phrasing.format(sound=sound)
            requests.append({"kind": "play", "sound": sound, "messages": [_user(text)], "prompt": text})
    for k, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("yellow", "triangle"),
                                         ("green", "circle"), ("red", "square"), ("blue", "triangle")]):
        other = list(COLOURS)[(list(COLOURS).index(colour) + 1 + k % 3) % len(COLOURS)]
        first = PHRASINGS["draw"][0][k % len(PHRASINGS["draw"][0])].format(colour=colour, shape=shape)
        name = images[(colour, shape)][-2]
        follow = PHRASINGS["follow"][1][0].format(colour=other)
        requests.append({"kind": "follow", "colour": other, "shape": shape,
                         "messages": [_user(first), _media("image", f"images/{name}"), _user(follow)],
                         "prompt": f"{first} <image:images/{name}> {follow}"})
    sounds, pairs = _sounds(corpus), [(colour, shape) for colour in COLOURS for shape in SHAPES]
    drawn, played = PHRASINGS["draw"][0], PHRASINGS["play"][0]
    for k, sound in enumerate(SOUNDS):
        for j, phrasing in enumerate(PHRASINGS["play"][1]):
            colour, shape = pairs[(2 * k + j) % len(pairs)]
            first, name, text = (drawn[(k + j) % len(drawn)].format(colour=colour, shape=shape),
                                 images[(colour, shape)][-2], phrasing.format(sound=sound))
            requests.append({"kind": "then_play", "sound": sound,
                             "messages": [_user(first), _media("image", f"images/{name}"), _user(text)],
                             "prompt": f"{first} <image:images/{name}> {text}"})
    for k, (colour, shape) in enumerate(pairs):
        sound = SOUNDS[k % len(SOUNDS)]
        first, name, text = (played[k % len(played)].format(sound=sound), sounds[sound][-1],
                             PHRASINGS["draw"][1][k % 2].format(colour=colour, shape=shape))
        requests.append({"kind": "then_draw", "colour": colour, "shape": shape,
                         "messages": [_user(first), _media("audio", f"audio/{name}"), _user(text)],
                         "prompt": f"{first} <audio:audio/{name}> {text}"})
    return requests


def phrasing_text() -> list[str]:
    """Every phrasing with every name filled in (the text tokenizer's training text must cover them)."""
    lines = []
    for kind, (trained, held_out) in PHRASINGS.items():
        for phrasing in trained + held_out:
            if "{sound}" in phrasing:
                lines += [phrasing.format(sound=k) for k in SOUNDS]
            elif "{shape}" in phrasing:
                lines += [phrasing.format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
            elif "{colour}" in phrasing:
                lines += [phrasing.format(colour=c) for c in COLOURS]
            else:
                lines.append(phrasing)
    return lines + [ANSWER.format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
