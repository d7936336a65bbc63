"""A small, reproducible speech + tone corpus for codec experiments on CPU.

``python -m omnitok.demo.speech_corpus --out DIR`` writes

- ``DIR/train/``: espeak-ng sentences in several voices and speeds, and the demo's tones, chords and chirps;
- ``DIR/eval/``: other sentences (never in ``train``) in the same voices, for ``omnitok eval tokenizer``.

espeak-ng (``apt-get install espeak-ng``) is the only thing it needs beyond omnitok. The codec numbers in
``configs/codec-small-cpu.yaml`` were measured on this corpus with the defaults.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

from omnitok.demo.corpus import SAMPLE_RATE, SOUNDS, synth_sound
from omnitok.errors import OmnitokError

SENTENCES = [
    "The small boat drifted slowly past the harbour wall.", "Please put the green cups on the top shelf.",
    "A cold wind blew across the empty field all night.", "She counted seven birds sitting on the fence.",
    "Bring the map so we can find the old bridge.", "The kettle whistled while the bread was toasting.",
    "Heavy rain kept the children inside for the afternoon.", "He fixed the broken chair with glue and string.",
    "Our train leaves the station at a quarter past nine.", "The painter mixed blue and yellow to make green.",
    "Fresh snow covered every roof in the quiet village.", "Turn left at the church and walk up the hill.",
    "The clock on the tower struck twelve at midnight.", "My sister plays the violin in a summer orchestra.",
    "Thick fog rolled in from the sea before dawn.", "The farmer sold apples and pears at the market.",
    "Keep the window open when you cook the fish.", "A loud knock at the door woke the sleeping dog.",
    "The museum opens its new hall of fossils today.", "We watched the sunset from the top of the dunes.",
    "Six students waited outside the lecture room.", "The recipe asks for two eggs and a cup of flour.",
    "Lightning flashed and the lights went out at once.", "Tom wrote a long letter to his grandmother.",
    "The river rose quickly after the storm passed.", "Please speak slowly so everyone can follow.",
    "Bright lanterns lit the path through the garden.", "The pilot checked the engines before take off.",
    "A thin cat slept on the warm stone steps.", "They planted tomatoes beside the kitchen door.",
    "The library closes early on Sunday evenings.", "Quick footsteps echoed down the long corridor.",
    "She found a silver coin under the old carpet.", "The band played a cheerful tune in the square.",
    "Lift the box carefully because the glass is fragile.", "Wild horses grazed on the edge of the forest.",
    # evaluation sentences (the last twelve)
    "The baker opened his shop before the sun came up.", "A red kite floated high above the green meadow.",
    "Mark the date of the meeting in your calendar.", "The children laughed at the clown's funny hat.",
    "Water dripped from the leaking pipe all morning.", "We need fresh batteries for the kitchen radio.",
    "The ship's captain shouted orders over the wind.", "Grey clouds gathered slowly over the mountains.",
    "Her new bicycle has a basket and a bell.", "The soup tastes better with a pinch of salt.",
    "Four geese walked across the road in a line.", "The teacher wrote the answer on the blackboard.",
]
VOICES = ["en", "en+f3", "en-us+m3"]
EVAL_SENTENCES = 12


def speak(text: str, voice: str, speed: int, path: Path) -> None:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True)


def make_speech_corpus(out: str | Path, tones_per_kind: int = 10, seed: int = 0) -> dict[str, int]:
    """Writes ``out/train`` and ``out/eval``; returns how many files each holds."""
    if shutil.which("espeak-ng") is None:
        raise OmnitokError("espeak-ng is not installed (apt-get install espeak-ng)")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for split in ("train", "eval"):
        (out / split).mkdir(parents=True, exist_ok=True)
    train, held = SENTENCES[:-EVAL_SENTENCES], SENTENCES[-EVAL_SENTENCES:]
    for split, sentences in (("train", train), ("eval", held)):
        for i, text in enumerate(sentences):
            speak(text, VOICES[i % len(VOICES)], int(rng.integers(140, 206)), out / split / f"speech_{i:03d}.wav")
    for kind in SOUNDS:
        for i in range(tones_per_kind):
            name = kind.removeprefix("a ").replace(" ", "_")
            sf.write(out / "train" / f"{name}_{i:03d}.wav", synth_sound(kind, rng, seconds=1.0), SAMPLE_RATE)
    return {split: len(list((out / split).glob("*.wav"))) for split in ("train", "eval")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        counts = make_speech_corpus(args.out)
    except OmnitokError as e:
        parser.error(str(e))
    print(f"{counts['train']} training files in {args.out}/train, {counts['eval']} held-out sentences in "
          f"{args.out}/eval")


if __name__ == "__main__":
    main()
