"""Does a generated picture show what its caption says? Colour and shape checks for the demo's shapes.

The foreground is every pixel far from the background colour. Its colour is the nearest demo colour to the
foreground's median RGB; its shape is the demo shape whose ideal mask (same centroid, same area) overlaps it best
(IoU). On the corpus's own drawings both checks are right every time (tested), so on generated pictures they measure
the model, not the checker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omnitok.demo.corpus import BACKGROUND, COLOURS, SHAPES, shape_outline


def _ideal(shape: str, cx: float, cy: float, area: float, size: tuple[int, int]) -> np.ndarray:
    unit = {"circle": np.pi, "square": (2 * 0.85) ** 2, "triangle": 0.95 * 1.75}[shape]  # area at r = 1
    r = np.sqrt(area / unit)
    img = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(img)
    outline = shape_outline(shape, cx, cy, r)
    (draw.ellipse if shape == "circle" else draw.polygon)(outline, fill=1)
    return np.asarray(img).astype(bool)


def classify(image: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the main object in a uint8 (H, W, 3) picture; None where there is no clear object."""
    pixels = image.astype(np.float32)
    distance = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32), axis=-1)
    mask = distance > 80
    if mask.sum() < 0.03 * mask.size:
        return None, None
    median = np.median(pixels[mask], axis=0)
    colour = min(COLOURS, key=lambda c: float(np.linalg.norm(median - np.array(COLOURS[c]))))
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    # a triangle's centroid lies below its circumcentre (where the drawing puts the corners around)
    scores = {}
    for shape in SHAPES:
        oy = 0.0 if shape != "triangle" else -0.25 * np.sqrt(mask.sum() / (0.95 * 1.75))
        ideal = _ideal(shape, cx, cy + oy, float(mask.sum()), mask.shape)
        scores[shape] = (ideal & mask).sum() / max((ideal | mask).sum(), 1)
    return colour, max(scores, key=scores.get)


def caption_match(images: list[np.ndarray], colour: str, shape: str) -> dict:
    """How many pictures show the colour, the shape, and both; with the chance rates of a random demo picture."""
    found = [classify(img) for img in images]
    n = len(found)
    return {"images": n, "colour": sum(c == colour for c, _ in found), "shape": sum(s == shape for _, s in found),
            "both": sum(c == colour and s == shape for c, s in found),
            "chance": {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "both": 1 / (len(COLOURS) * len(SHAPES))}}


def classify_sound(wave: np.ndarray, rate: int) -> str | None:
    """Which of the demo's sounds a clip is, from its spectrum: a glide of the dominant frequency over time is a
    chirp (rising or falling); otherwise several strong peaks make a chord, and one peak a low or a high tone. None
    for silence."""
    wave = np.asarray(wave, dtype=np.float64)
    wave = wave if wave.ndim == 1 else wave.mean(axis=0)  # (channels, samples): their mean
    n, hop = 1024, 256
    if len(wave) < n or np.sqrt(np.mean(wave ** 2)) < 1e-3:
        return None
    frames = np.stack([wave[i:i + n] * np.hanning(n) for i in range(0, len(wave) - n + 1, hop)])
    spectra = np.abs(np.fft.rfft(frames, axis=-1))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    loud = spectra.max(axis=-1) > 0.1 * spectra.max()
    peak = freqs[spectra.argmax(axis=-1)][loud]
    if len(peak) >= 3:
        t = np.arange(len(peak))
        slope = np.polyfit(t, np.log2(np.maximum(peak, 20.0)), 1)[0] * len(peak)  # octaves over the clip
        if abs(slope) > 1.0:
            return "a rising chirp" if slope > 0 else "a falling chirp"
    mean = spectra[loud].mean(axis=0)
    strong = (mean > 0.35 * mean.max()) & (mean >= np.roll(mean, 1)) & (mean >= np.roll(mean, -1))
    if strong.sum() >= 2:
        return "a chord"
    return "a low tone" if freqs[mean.argmax()] < 500 else "a high tone"


def instruction_following(samples: str | Path, requests: list[dict]) -> dict:
    """How many answers in an ``omnitok sample`` directory (one sample per request, in order) do what their request
    asked (``chat_corpus.held_out_requests``): draw / then_draw / follow, the first picture shows the colour and the
    shape (each also counted alone); describe, the answer's text names both; play / then_play, the first clip is the
    sound asked for."""
    import json

    import soundfile as sf

    samples = Path(samples)
    records = json.loads((samples / "samples.json").read_text())["samples"]
    if len(records) != len(requests):
        raise ValueError(f"{samples} holds {len(records)} answers for {len(requests)} requests")
    out: dict[str, dict[str, int]] = {}
    for request, record in zip(requests, records):
        kind = request["kind"]
        pictured = kind in ("draw", "then_draw", "follow")
        tally = out.setdefault(kind, {"requests": 0, "right": 0} | ({"colour": 0, "shape": 0} if pictured else {}))
        tally["requests"] += 1
        first = {t: next((s for s in record["segments"] if s["type"] == t), None) for t in ("image", "audio")}
        folder = samples / record["id"]
        if pictured:
            if first["image"] is None:
                continue
            colour, shape = classify(np.asarray(Image.open(folder / first["image"]["file"]).convert("RGB")))
            tally["colour"] += colour == request["colour"]
            tally["shape"] += shape == request["shape"]
            tally["right"] += colour == request["colour"] and shape == request["shape"]
        elif kind == "describe":
            text = " ".join(s["text"] for s in record["segments"] if s["type"] == "text").lower()
            tally["right"] += request["colour"] in text and request["shape"] in text
        elif first["audio"] is not None:
            wave, rate = sf.read(folder / first["audio"]["file"], always_2d=True)
            tally["right"] += classify_sound(wave.T, rate) == request["sound"]
    return out
