"""``omnitok demo``: the whole pipeline on a laptop, through the real commands.

1. draw / synthesise a corpus of captioned shapes and sounds and documents mixing both (``omnitok.demo.corpus``);
2. train its text tokenizer (``omnitok text-tokenizer train``); take the image and audio tokenizers that ship with
   the package (trained by this project with ``omnitok image-tokenizer train`` / ``audio-tokenizer train``, configs
   ``configs/vqgan-demo-cpu.yaml`` and ``configs/codec-demo-cpu.yaml``; ``weights/README.md`` has the commands) and
   assemble all three (``omnitok tokenizer assemble``);
3. tokenize the corpus to WebDataset shards (``omnitok tokenize``);
4. pretrain a tiny Llama with DeepSpeed in one process (``omnitok pretrain``), which exports a Hugging Face model;
5. sample text -> image, text -> audio, image -> text and interleaved output (``omnitok sample``), check the
   samples (``omnitok eval samples``) and measure whether pictures of "a red circle" show a red circle;
6. instruction-tune the model on conversations built from the corpus (``omnitok.demo.chat_corpus``: the tokenizer
   assembled ``--chat``, ``omnitok tokenize`` on chat JSONL, ``omnitok finetune``), then ask the tuned
   model (``omnitok sample --chat``) and the pretrained one (the same requests as plain prompts) requests phrased in
   ways training never used, and measure how often each answers with the right picture, caption or sound;
7. write a gallery page and print a one-screen summary.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from omnitok.errors import OmnitokError

WEIGHTS = Path(__file__).parent / "weights"
SECTIONS = {  # name: (prompts, output modality, samples per prompt)
    "text_to_image": (["a red circle", "a blue square", "a yellow triangle", "a green circle"], "image", 4),
    "text_to_audio": (["a low tone", "a rising chirp", "a chord"], "audio", 2),
    "image_to_text": (["<image:{corpus}/images/blue_square_000.png>", "<image:{corpus}/images/red_triangle_001.png>",
                       "<image:{corpus}/images/green_circle_002.png>"], "text", 2),
    "interleaved": (["a yellow square and a chord", "a red triangle and a rising chirp"], "any", 2),
}
RED_CIRCLES = 32
TITLES = {"asked_tuned": "held-out requests: instruction-tuned model (chat)",
          "asked_base": "held-out requests: pretrained model (the same requests as plain prompts)"}
FOLLOWING = {"draw": "right picture", "describe": "names colour and shape", "play": "right sound",
             "follow": "follow-up: right picture", "then_play": "after a picture: right sound",
             "then_draw": "after a sound: right picture"}


def pretrain_config(out: Path, steps: int) -> dict:
    """The demo's tiny Llama: about 2.5M parameters, trained on 256-token sequences. 250 steps: its loss levels off
    by then (0.086 at 250, 0.078 at 300) once the corpus's sounds come in three pitches per kind (with free pitch
    jitter, audio loss was still 2.0 after 300 steps and the demo needed 700, 10 minutes in all)."""
    return {"tokenizer": str(out / "tokenizer"), "out": str(out / "run"),
            "model": {"arch": "llama", "hidden_size": 192, "intermediate_size": 512, "num_layers": 4, "num_heads": 4,
                      "num_kv_heads": 4, "max_position_embeddings": 512},
            "data": {"shards": [str(out / "shards")], "seq_len": 256, "cond_dropout": 0.1},
            "optim": {"lr": 4e-3, "warmup_steps": 20, "weight_decay": 0.0},
            "steps": steps, "micro_batch_size": 8, "zero_stage": 1, "checkpoint_every": steps, "log_every": 25}


def finetune_config(out: Path, steps: int) -> dict:
    """Full fine-tuning of the demo's model. Not LoRA: the conversations use words the tiny base never met in its
    captions ("Could", "It", "Paint"), whose embedding and output rows LoRA with marker rows leaves untrained (on
    the held-out requests LoRA answered 10/24 drawings, 2/12 captions, 5/10 sounds right; full fine-tuning 22/24,
    10/12, 4/10, in the same 150 steps and time)."""
    return {"tokenizer": str(out / "chat_tokenizer"), "out": str(out / "sft"),
            "model": {"init_from": str(out / "run" / "export")},
            "data": {"shards": [str(out / "chat_shards")], "seq_len": 256, "cond_dropout": 0.1},
            "method": "full",
            "optim": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0},
            "steps": steps, "micro_batch_size": 8, "zero_stage": 1, "checkpoint_every": steps, "log_every": 25}


def run_demo(omnitok: Callable[[list[str]], int], out: str | Path, steps: int = 250, seed: int = 0,
             sft_steps: int = 120) -> dict:
    """Run the demo in ``out`` through ``omnitok`` (the command line's ``main``, passed in by the ``demo`` command
    itself so that this module does not import the command line that imports it)."""
    from omnitok.demo.chat_corpus import phrasing_text
    from omnitok.demo.corpus import make_corpus
    from omnitok.demo.measure import caption_match

    def _run(step: str, argv: list[str]) -> None:
        print(f"\n== {step}: omnitok {' '.join(argv)}", flush=True)
        if omnitok(argv) != 0:
            raise OmnitokError(f"demo step '{step}' failed (see the message above)")

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OmnitokError(f"{out} is not empty; give a new --out directory")
    if not 0 <= seed < 1 << 32:  # every seed the demo derives from it (up to seed + 1000 + RED_CIRCLES) stays valid
        raise OmnitokError(f"--seed must be from 0 to 2**32 - 1, got {seed}")
    for part in ("image", "audio"):
        if not (WEIGHTS / part / "omnitok.json").is_file():
            raise OmnitokError(f"the package's demo {part} tokenizer is missing from {WEIGHTS}; reinstall omnitok")
    start = time.perf_counter()
    times = {}

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - start - sum(times.values()), 1)

    corpus = out / "corpus"
    counts = make_corpus(corpus, seed=seed)
    print(f"== corpus: {counts['images']} shape pictures, {counts['sounds']} sound clips, {counts['documents']} "
          f"documents in {corpus}")
    with open(corpus / "captions.txt", "a", encoding="utf-8") as f:  # the conversations' words too
        f.write("\n".join(phrasing_text()) + "\n")
    lap("corpus")
    _run("text tokenizer", ["text-tokenizer", "train", "--input", str(corpus / "captions.txt"), "--vocab-size", "320",
                            "--out", str(out / "tokenizers" / "text")])
    for part in ("image", "audio"):
        shutil.copytree(WEIGHTS / part, out / "tokenizers" / part)
    _run("assemble", ["tokenizer", "assemble", "--text", str(out / "tokenizers" / "text"), "--image",
                      str(out / "tokenizers" / "image"), "--audio", str(out / "tokenizers" / "audio"), "--out",
                      str(out / "tokenizer")])
    lap("tokenizers")
    _run("tokenize", ["tokenize", "--input", str(corpus / "docs.jsonl"), "--tokenizer", str(out / "tokenizer"),
                      "--out", str(out / "shards"), "--workers", "1", "--shard-size", "500"])
    lap("tokenize")
    config = out / "pretrain.yaml"
    config.write_text(yaml.safe_dump(pretrain_config(out, steps), sort_keys=False))
    _run("pretrain", ["pretrain", "--config", str(config)])
    lap("pretrain")
    model = out / "run" / "export"
    for name, (prompts, modality, n) in SECTIONS.items():
        argv = ["sample", "--model", str(model), "--out", str(out / "samples" / name), "--output-modality", modality,
                "--num-samples", str(n), "--seed", str(seed), "--max-new-tokens", "256", "--batch-size", "16",
                "text.temperature=0.7"]
        for p in prompts:
            argv += ["--prompt", p.format(corpus=corpus)]
        _run(f"sample {name}", argv)
    _run("red circles", ["sample", "--model", str(model), "--out", str(out / "samples" / "red_circle"),
                         "--output-modality", "image", "--num-samples", str(RED_CIRCLES), "--seed", str(seed + 1000),
                         "--batch-size", str(RED_CIRCLES), "--prompt", "a red circle"])
    for name in [*SECTIONS, "red_circle"]:
        _run(f"check {name}", ["eval", "samples", str(out / "samples" / name)])
    lap("sample")
    chats, following = instruction_tuning(_run, out, seed, sft_steps)
    lap("finetune")
    from PIL import Image

    pngs = sorted((out / "samples" / "red_circle").rglob("*.png"))
    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    match = caption_match(pictures, "red", "circle")
    summary = _summary(out, match, times, {**counts, "conversations": chats})
    summary["instruction_following"] = following
    _gallery(out, match)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(out, summary)
    return summary


def instruction_tuning(run: Callable[[str, list[str]], None], out: Path, seed: int, steps: int
                       ) -> tuple[int, dict]:
    """The demo's second stage on its pretrained model: conversations from the corpus, the tokenizer with chat
    markers, shards with loss masks, fine-tuning, and the held-out requests put to the tuned model (as chats)
    and to the pretrained one (as plain prompts). Returns the number of conversations and, per model, how often
    each kind of request was answered right (``measure.instruction_following``)."""
    from omnitok.demo.chat_corpus import conversations, held_out_requests
    from omnitok.demo.measure import instruction_following

    corpus = out / "corpus"
    chats = conversations(corpus, seed)
    run("assemble --chat", ["tokenizer", "assemble", "--text", str(out / "tokenizers" / "text"), "--image",
                            str(out / "tokenizers" / "image"), "--audio", str(out / "tokenizers" / "audio"),
                            "--out", str(out / "chat_tokenizer"), "--chat"])
    run("tokenize conversations", ["tokenize", "--input", str(corpus / "chats.jsonl"), "--tokenizer",
                                   str(out / "chat_tokenizer"), "--out", str(out / "chat_shards"), "--workers", "1",
                                   "--shard-size", "500"])
    config = out / "finetune.yaml"
    config.write_text(yaml.safe_dump(finetune_config(out, steps), sort_keys=False))
    run("finetune", ["finetune", "--config", str(config)])
    requests = held_out_requests(corpus)
    (corpus / "requests_chat.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                                                        for r in requests), encoding="utf-8")
    (corpus / "requests_plain.txt").write_text("".join(r["prompt"] + "\n" for r in requests), encoding="utf-8")
    asked = {"tuned": ["--chat", "--model", str(out / "sft" / "export"), "--prompts",
                       str(corpus / "requests_chat.jsonl")],
             "base": ["--model", str(out / "run" / "export"), "--prompts", str(corpus / "requests_plain.txt")]}
    for name, argv in asked.items():
        run(f"held-out requests, {name} model", ["sample", *argv, "--out", str(out / "samples" / f"asked_{name}"),
                                                 "--seed", str(seed), "--max-new-tokens", "160",
                                                 "--batch-size", "26", "text.temperature=0.7"])
    return chats, {name: instruction_following(out / "samples" / f"asked_{name}", requests) for name in asked}


def _summary(out: Path, match: dict, times: dict, counts: dict) -> dict:
    log = [json.loads(line) for line in (out / "run" / "train.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    sft = [json.loads(line) for line in (out / "sft" / "train.jsonl").read_text().splitlines()]
    sections = {}
    for name in [*SECTIONS, "red_circle"]:
        report = json.loads((out / "samples" / name / "eval_samples.json").read_text())
        sections[name] = {"samples": report["samples"], "segments": report["segments"], "valid": report["valid"]}
    return {"corpus": counts, "loss": {"first": first["loss"], "last": last["loss"], "steps": last["step"],
                                       "by_modality": {k[:-5]: v for k, v in last.items() if k.endswith("_loss")}},
            "finetune": {"first": sft[0]["loss"], "last": sft[-1]["loss"], "steps": sft[-1]["step"]},
            "samples": sections, "red_circle": match, "seconds": times}


def _gallery(out: Path, match: dict) -> None:
    from omnitok.model.sample import STYLE, records_html

    parts = ["<!doctype html><meta charset='utf-8'><title>omnitok demo</title>", STYLE, "<h1>omnitok demo</h1>",
             f"<p>Pictures for \"a red circle\": {match['colour']}/{match['images']} red, {match['shape']}/"
             f"{match['images']} circles, {match['both']}/{match['images']} both (chance: "
             f"{match['chance']['both']:.0%} both).</p>", "<p><img src='run/loss.png' style='width:480px'></p>"]
    for name in [*SECTIONS, "red_circle", "asked_tuned", "asked_base"]:
        records = json.loads((out / "samples" / name / "samples.json").read_text())["samples"]
        parts.append(f"<h2>{TITLES.get(name, name.replace('_', ' '))}</h2>")
        parts.append(records_html(records, prefix=f"samples/{name}/"))
    (out / "index.html").write_text("\n".join(parts), encoding="utf-8")


def _print_summary(out: Path, s: dict) -> None:
    m = s["red_circle"]
    lines = ["", "=" * 72, f"omnitok demo finished in {sum(s['seconds'].values()):.0f} s  ("
             + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items()) + ")",
             f"corpus        {s['corpus']['documents']} documents -> shards in {out / 'shards'}",
             f"pretrain      loss {s['loss']['first']:.2f} -> {s['loss']['last']:.2f} over {s['loss']['steps']} steps "
             f"(" + ", ".join(f"{k} {v:.2f}" for k, v in s["loss"]["by_modality"].items()) + ")",
             f"              checkpoints in {out / 'run' / 'checkpoints'}, model in {out / 'run' / 'export'}"]
    for name, sec in s["samples"].items():
        seg = sec["segments"]
        lines.append(f"{name:<14}{sec['samples']} samples: {seg['image']} images, {seg['audio']} audio clips, "
                     f"{seg['text']} text segments")
    lines += [f"red circle    {m['colour']}/{m['images']} red, {m['shape']}/{m['images']} circles, {m['both']}/"
              f"{m['images']} both; chance {m['chance']['colour']:.0%} / {m['chance']['shape']:.0%} / "
              f"{m['chance']['both']:.0%}",
              f"finetune      {s['corpus']['conversations']} conversations: loss {s['finetune']['first']:.2f} -> "
              f"{s['finetune']['last']:.2f} over {s['finetune']['steps']} steps; model in {out / 'sft' / 'export'}",
              "held-out phrasings, pretrained -> instruction-tuned model:"]
    base, tuned = s["instruction_following"]["base"], s["instruction_following"]["tuned"]
    for kind, what in FOLLOWING.items():
        b, t = base[kind], tuned[kind]
        extra = (f" (colour {b['colour']} -> {t['colour']}, shape {b['shape']} -> {t['shape']})"
                 if "colour" in t else "")
        lines.append(f"  {kind:<12}{what}: {b['right']}/{b['requests']} -> {t['right']}/{t['requests']}{extra}")
    lines += [f"gallery       {out / 'index.html'}", "=" * 72]
    print("\n".join(lines))
