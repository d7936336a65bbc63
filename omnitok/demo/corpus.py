"""The demo corpus: coloured shapes with captions, tones / chords / chirps with captions, and documents mixing both.

Everything is drawn or synthesised from a seed, so the corpus is the same on every machine. Images are 32x32 px
(8x8 grids with the demo's VQ-GAN); clips are 0.5 s at 24 kHz (38 frames of EnCodec codes: short, so that the
tiny LM's few CPU minutes go mostly to learning which picture a caption asks for).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (240, 240, 240)
IMAGE_SIZE = 32
SAMPLE_RATE = 24000
SOUND_SECONDS = 0.5
SOUNDS = ("a low tone", "a high tone", "a chord", "a rising chirp", "a falling chirp")


def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple:
    """The circle's box or the polygon of a square / triangle centred at (cx, cy) with 'radius' r."""
    if shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]


def draw_shape(colour: str, shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    # Three sizes, centred: a tiny LM trained for a few CPU minutes then learns what the captions say. With free
    # jitter it spends those minutes memorising hundreds of distinct code grids and ignores the caption.
    r = size * rng.choice([0.28, 0.32, 0.36])
    cx = cy = size / 2
    outline = shape_outline(shape, cx, cy, r)
    (draw.ellipse if shape == "circle" else draw.polygon)(outline, fill=COLOURS[colour])
    return np.asarray(img)


def synth_sound(kind: str, rng: np.random.Generator, seconds: float = SOUND_SECONDS,
                rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    # Three pitches per kind, for the reason the shapes come in three sizes: with a free jitter (uniform 0.97-1.03)
    # the tiny LM spent its minutes memorising 150 distinct code sequences (audio loss 2.0 after 300 steps).
    jitter = rng.choice([0.97, 1.0, 1.03])
    if kind == "a low tone":
        wave = np.sin(2 * np.pi * 220 * jitter * t)
    elif kind == "a high tone":
        wave = np.sin(2 * np.pi * 880 * jitter * t)
    elif kind == "a chord":
        wave = sum(np.sin(2 * np.pi * f * jitter * t) for f in (262, 330, 392)) / 3
    else:  # chirps: the frequency glides exponentially between 200 and 1000 Hz
        f0, f1 = (200, 1000) if kind == "a rising chirp" else (1000, 200)
        k = np.log(f1 / f0) / seconds
        wave = np.sin(2 * np.pi * f0 * jitter * (np.exp(k * t) - 1) / k)
    fade = np.minimum(1, np.minimum(t, seconds - t) / 0.02)
    return (0.5 * wave * fade).astype(np.float32)


def make_corpus(root: str | Path, per_shape: int = 60, per_sound: int = 30, mixed: int = 240,
                seed: int = 0, sound_seconds: float = SOUND_SECONDS) -> dict:
    """Writes ``images/``, ``audio/`` and ``docs.jsonl`` (the ``omnitok tokenize`` input) under ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, sounds, docs = [], [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for i in range(per_shape):
                path = f"images/{colour}_{shape}_{i:03d}.png"
                Image.fromarray(draw_shape(colour, shape, rng)).save(root / path)
                images.append((f"a {colour} {shape}", path))
    for kind in SOUNDS:
        for i in range(per_sound):
            path = f"audio/{kind[2:].replace(' ', '_')}_{i:03d}.wav"
            sf.write(root / path, synth_sound(kind, rng, sound_seconds), SAMPLE_RATE)
            sounds.append((kind, path))
    for i, (caption, path) in enumerate(images + sounds):
        key = "image" if path.startswith("images/") else "audio"
        docs.append([{"text": caption}, {key: path}])  # caption -> media
        if i % 3 == 0:  # media -> caption for a third: enough to describe, and generation stays mostly conditioned
            docs.append([{key: path}, {"text": caption}])
    for _ in range(mixed):  # with 120 the model mostly ended after the picture (P(<|boa|>) 0.18); with 240, 0.90
        (ic, ip), (sc, sp) = images[rng.integers(len(images))], sounds[rng.integers(len(sounds))]
        docs.append([{"text": f"{ic} and {sc}"}, {"image": ip}, {"audio": sp}])  # one caption, two media
    order = rng.permutation(len(docs))
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({"id": f"doc{i:05d}", "segments": docs[i]}) + "\n")
    captions = sorted({c for c, _ in images + sounds} | {f"a {c} {s} and {k}" for c in COLOURS for s in SHAPES
                                                          for k in SOUNDS})
    (root / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return {"images": len(images), "sounds": len(sounds), "documents": len(docs)}
