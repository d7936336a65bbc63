"""Does a generated picture show what its caption says? Colour and shape checks for the demo's shapes.

The foreground is every pixel far from the background colour. Its colour is the nearest demo colour to the
foreground's median RGB; its shape is the demo shape whose ideal mask (same centroid, same area) overlaps it best
(IoU). On the corpus's own drawings both checks are right every time (tested), so on generated pictures they measure
the model, not the checker.
"""

from __future__ import annotations

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
