"""``omnitok eval``: how good are the tokenizers, the model and its samples.

- ``tokenizer``: reconstruction through the real encode -> decode path. Images: PSNR and SSIM (torchmetrics, data
  range 1, on [0, 1] pixels at the tokenizer's input size), codebook usage and perplexity; audio: SI-SDR
  (torchmetrics) and multi-scale log-mel distance per clip, averaged, plus usage and perplexity per codebook. A PNG
  grid of originals vs reconstructions (images; log-mel spectrograms for audio) and a codebook-usage plot.
- ``lm``: per-modality next-token loss and perplexity of a model on held-out shards (each target token is counted
  under its own modality; the layout's special tokens form their own group).
- ``samples``: span validity and counts over an ``omnitok sample`` output directory, and with local CLIP / CLAP
  models how well the pictures and sounds match their prompts (``alignment.py``).

FID, CLIP and CLAP scores need networks that cannot be downloaded here, so they are computed only when local weights
are given (``--fid-features``: a ``torch.export``-ed program (``.pt2``) mapping (1, 3, H, W) images in [0, 1] to
(1, D) features, e.g. an Inception pool3 network exported by the user; ``--clip`` / ``--clap``: Hugging Face model
directories); otherwise the report lists them under ``skipped`` with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object, write_json_atomic
from omnitok.tokenizers.codebook import usage_stats
from omnitok.tokenizers.layout import TOKEN_KINDS, Span, image_span_length


def _usage_plot(counts: list[np.ndarray], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for c, label in zip(counts, labels):
        ordered = np.sort(c)[::-1]
        ax.plot(np.arange(1, len(ordered) + 1), ordered / max(ordered.sum(), 1), label=label)
    ax.set_xlabel("code rank")
    ax.set_ylabel("frequency")
    ax.set_yscale("log")
    ax.set_title("codebook usage (codes by frequency)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(rows: list[list[np.ndarray]], path: Path, scale: int = 1) -> None:
    """Rows of equally sized uint8 images, tiled with a 2 px gap."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    gap = 2
    canvas = np.full((len(rows) * (h + gap), max(len(r) for r in rows) * (w + gap), 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def eval_image_tokenizer(tokenizer_dir: str | Path, images: str | Path, out: str | Path, limit: int = 256,
                         fid_features: str | Path | None = None) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from omnitok.data.media import ImageFiles, list_images
    from omnitok.tokenizers.image import ImageTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = ImageTokenizer.from_dir(tokenizer_dir)
    items = list_images([images])[:limit]
    files = ImageFiles(items, tok.preprocess_config, tok.downsample)
    arrays, skipped = [], {}
    for i, (path, member) in enumerate(items):
        _, array = files[i, False]
        if isinstance(array, str):
            skipped[path if member is None else f"{path}:{member}"] = array
        else:
            arrays.append(array)
    if not arrays:
        raise OmnitokError(f"no readable image in {images}")
    codes = tok.encode_preprocessed(arrays)
    recon = tok.decode(codes)
    x, y = _to_float(arrays), _to_float(recon)
    report = {"images": len(arrays), "unreadable": skipped, "size": list(arrays[0].shape[:2]),
              "psnr": float(peak_signal_noise_ratio(y, x, data_range=1.0)),
              "ssim": float(structural_similarity_index_measure(y, x, data_range=1.0))}
    stats = usage_stats(np.concatenate([c.reshape(-1) for c in codes]), tok.codebook_size)
    report["codebook"] = {"size": tok.codebook_size, "usage": stats["usage"], "perplexity": stats["perplexity"]}
    report.update(_fid(fid_features, x, y))
    _grid([list(arrays[i:i + 8]) for i in range(0, min(len(arrays), 32), 8)] +
          [list(recon[i:i + 8]) for i in range(0, min(len(recon), 32), 8)], out / "reconstructions.png",
          scale=max(1, 128 // arrays[0].shape[0]))
    _usage_plot([stats["counts"]], ["image codes"], out / "codebook_usage.png")
    write_json_atomic(out / "image_report.json", report)
    return report


def _to_float(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _fid(weights: str | Path | None, real: torch.Tensor, fake: torch.Tensor) -> dict:
    if weights is None:
        return {"skipped": {"fid": "needs a local feature network (--fid-features, a torch.export .pt2 file); none "
                                   "given, and nothing can be downloaded"}}
    net = torch.export.load(str(weights)).module()
    with torch.no_grad():  # one image at a time: an exported program may have a fixed batch size
        a, b = (torch.cat([net(x[i:i + 1]) for i in range(len(x))]).double().numpy() for x in (real, fake))
    return {"fid": frechet_distance(a, b), "skipped": {}}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.asarray(linalg.sqrtm(s1 @ s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# STOI compares 384 ms stretches of speech (Taal et al. 2011), and the longest mel window is 2048 samples: clips
# shorter than this are listed under ``too_short`` rather than measured
MIN_CLIP_SECONDS = 0.5


def eval_audio_tokenizer(tokenizer_dir: str | Path, audio: str | Path, out: str | Path, limit: int = 64) -> dict:
    import soundfile as sf
    from pystoi import stoi
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

    from omnitok.data.media import list_audio
    from omnitok.tokenizers.audio import AudioError, AudioTokenizer, load_audio
    from omnitok.train.audio_losses import mel_distance, mel_spectrogram

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AudioTokenizer.from_dir(tokenizer_dir)
    clips, skipped, short = [], {}, {}
    for path in list_audio([audio])[:limit]:
        try:
            clip = load_audio(str(path), tok.sample_rate, tok.channels)
        except AudioError as e:
            skipped[str(path)] = str(e)
            continue
        if clip.shape[-1] < MIN_CLIP_SECONDS * tok.sample_rate:
            short[str(path)] = round(clip.shape[-1] / tok.sample_rate, 3)
            continue
        clips.append(clip)
    if not clips:
        raise OmnitokError(f"no readable audio of at least {MIN_CLIP_SECONDS} s in {audio}")
    codes = tok.encode([(c, tok.sample_rate) for c in clips])
    recon = tok.decode(codes)
    sdr, mel, intelligibility = [], [], []
    pairs = []
    (out / "samples").mkdir(exist_ok=True)
    for i, (x, y) in enumerate(zip(clips, recon)):
        x = torch.from_numpy(np.asarray(x, dtype=np.float32))
        y = torch.from_numpy(np.asarray(y, dtype=np.float32))[..., : x.shape[-1]]
        x = x[..., : y.shape[-1]]
        pairs.append((x, y))
        sdr.append(float(scale_invariant_signal_distortion_ratio(y, x).mean()))
        mel.append(float(mel_distance(x[None], y[None], tok.sample_rate)))
        # STOI (Taal et al. 2011) on the first channel: the standard predictor of speech intelligibility, 0..1
        intelligibility.append(float(stoi(x[0].numpy(), y[0].numpy(), tok.sample_rate)))
        if i < 8:
            sf.write(out / "samples" / f"clip{i}_original.wav", x.T.numpy(), tok.sample_rate)
            sf.write(out / "samples" / f"clip{i}_reconstruction.wav", y.clamp(-1, 1).T.numpy(), tok.sample_rate)
    report = {"clips": len(clips), "unreadable": skipped, "too_short": short, "sample_rate": tok.sample_rate,
              "seconds": float(sum(x.shape[-1] for x, _ in pairs) / tok.sample_rate),
              "si_sdr": float(np.mean(sdr)), "mel_distance": float(np.mean(mel)),
              "stoi": float(np.mean(intelligibility)), "per_clip_si_sdr": sdr, "per_clip_stoi": intelligibility}
    per_q = [usage_stats(np.concatenate([c[q] for c in codes]), size) for q, size in enumerate(tok.codebook_sizes)]
    report["codebooks"] = [{"size": size, "usage": s["usage"], "perplexity": s["perplexity"]}
                           for size, s in zip(tok.codebook_sizes, per_q)]
    report.update(codec=tok.kind, frame_rate=tok.frame_rate, tokens_per_second=tok.frame_rate * tok.num_codebooks)
    _usage_plot([s["counts"] for s in per_q], [f"codebook {q}" for q in range(len(per_q))],
                out / "codebook_usage.png")
    spectra = []
    for x, y in pairs[:8]:
        top = float(torch.log(mel_spectrogram(x[:1][None], tok.sample_rate, 1024, 64).max().clamp(min=1e-10)))
        spectra.append([mel_image(w[:1], tok.sample_rate, top) for w in (x, y)])
    _grid([[r[0] for r in spectra], [r[1] for r in spectra]], out / "reconstructions.png", scale=2)
    write_json_atomic(out / "audio_report.json", report)
    return report


def mel_image(wave: torch.Tensor, sample_rate: int, top: float, size: tuple[int, int] = (64, 96)) -> np.ndarray:
    """(1, T) wave -> (h, w, 3) uint8 log-mel spectrogram, low frequencies at the bottom, time left to right.

    ``top`` is the log magnitude shown white (the original clip's peak, so a reconstruction is drawn on its
    original's scale); 80 dB under it is black."""
    from PIL import Image

    from omnitok.train.audio_losses import mel_spectrogram

    m = torch.log(mel_spectrogram(wave[None], sample_rate, 1024, 64)[0].clamp(min=1e-10)).numpy()  # (64 mels, frames)
    span = 80 / 20 * np.log(10)
    m = (np.clip((m - (top - span)) / span, 0, 1) * 255).astype(np.uint8)[::-1]
    image = np.asarray(Image.fromarray(np.ascontiguousarray(m)).resize((size[1], size[0]), Image.BILINEAR))
    return np.repeat(image[..., None], 3, axis=-1)


# ---------------------------------------------------------------- the language model


@torch.inference_mode()
def eval_lm(model_dir: str | Path, shards: list[str], out: str | Path | None = None, max_docs: int = 1000,
            seq_len: int | None = None, batch_size: int = 8) -> dict:
    """Per-modality loss / perplexity of the model on documents from ``shards`` (directories or URL patterns), packed
    into ``seq_len``-token sequences (default: the model's positions), each document isolated (its own positions, no
    attention across documents) and none cut that fits in a sequence, so a document scores exactly as it would alone.
    A document longer than ``seq_len`` is cut as training cuts it; its continuation is scored from the cut."""
    from omnitok.data.shards import read_shard, trained_mask
    from omnitok.data.stream import Packer, batch_of, shard_urls
    from omnitok.model.loss import LossConfig, lm_loss
    from omnitok.model.sample import load_model
    from omnitok.train.pretrain import summarise_losses

    model, tok = load_model(model_dir)
    device = next(model.parameters()).device
    layout = tok.layout
    positions = model.config.max_position_embeddings
    seq_len = seq_len or positions
    if seq_len > positions:
        raise OmnitokError(f"--seq-len {seq_len} is beyond the model's {positions} positions")

    def documents():
        n = 0
        for spec in shards:
            for url in shard_urls(spec, layout):
                for _, tokens, meta in read_shard(url):  # a conversation scores the ids training trains
                    yield (tokens.astype(np.int64), [Span(*s) for s in meta["spans"]],
                           trained_mask(meta.get("trained"), len(tokens)))
                    n += 1
                    if n >= max_docs:
                        return

    stream, read = documents(), 0

    def next_document():
        nonlocal read
        document = next(stream, None)
        read += document is not None
        return document

    packer = Packer(layout, seq_len, next_document, keep_whole=True)
    sums: dict[str, float] = {}
    sequences = 0
    while rows := [r for r in (packer.sequence() for _ in range(batch_size)) if r is not None]:
        sequences += len(rows)
        batch = batch_of(rows, layout, isolate=True)
        logits = model(**batch.model_inputs(device)).logits  # the chunked loss makes no full fp32 copy
        _, metrics = lm_loss(logits, batch.labels.to(device), layout, LossConfig())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if not read:
        raise OmnitokError(f"no documents in {', '.join(shards)}")
    stats = summarise_losses(sums)
    report = {"documents": read, "tokens": int(sum(sums.get(f"{m}_tokens", 0.0) for m in TOKEN_KINDS)),
              "seq_len": seq_len, "sequences": sequences, "modalities": {}}
    for m in TOKEN_KINDS:
        if f"{m}_tokens" in stats:
            report["modalities"][m] = {"tokens": int(stats[f"{m}_tokens"]), "loss": stats[f"{m}_loss"],
                                       "perplexity": stats[f"{m}_ppl"]}
    report["all"] = {"loss": stats["loss"], "perplexity": float(np.exp(stats["loss"]))}
    if out is not None:
        write_json_atomic(Path(out), report)
    return report


# ---------------------------------------------------------------- samples


def eval_samples(directory: str | Path, clip: str | Path | None = None, clap: str | Path | None = None) -> dict:
    """Span validity and counts over an ``omnitok sample`` output directory; with a local CLIP (``clip``) or CLAP
    (``clap``) model directory, how well its pictures or sounds match their prompts' text (``alignment.py``)."""
    import soundfile as sf
    from PIL import Image

    directory = Path(directory)
    records = _sample_records(directory)
    counts = {"text": 0, "image": 0, "audio": 0}
    valid = {"image": 0, "audio": 0}
    problems = []
    tokens = 0
    for r in records:
        tokens += r["new_tokens"]
        for s in r["segments"]:
            counts[s["type"]] += 1
            if s["type"] == "text":
                continue
            try:
                path = directory / r["id"] / s["file"]
                if s["type"] == "image":
                    with Image.open(path) as img:
                        img.load()
                    matches = s["tokens"] == image_span_length(s["rows"], s["cols"])
                    problem = "" if matches else "token count does not match the grid"
                else:
                    wave, _ = sf.read(path)
                    problem = "" if len(wave) and np.isfinite(wave).all() else "empty or non-finite waveform"
            except Exception as e:  # noqa: BLE001 - any unreadable file is a finding, not a crash
                problem = f"{type(e).__name__}: {e}"
            valid[s["type"]] += not problem
            if problem:
                problems.append(f"{r['id']}/{s.get('file', '?')}: {problem}")
    report = {"samples": len(records), "new_tokens": tokens, "segments": counts,
              "valid": {k: (valid[k] / counts[k] if counts[k] else None) for k in valid},
              "stopped": {k: sum(r["stopped"] == k for r in records) for k in ("eos", "eot", "span", "max_new_tokens")},
              "problems": problems, **_alignment(directory, records, {"image": clip, "audio": clap})}
    write_json_atomic(directory / "eval_samples.json", report)
    return report


def _sample_records(directory: Path) -> list[dict]:
    """``samples.json``'s records, refused in one line unless each is a sample with its segments."""
    index = directory / "samples.json"
    data = read_json_object(index, f"{directory} is not an `omnitok sample` output (no samples.json)")
    records = data.get("samples")
    fields = {"id": str, "new_tokens": int, "stopped": str, "segments": list}
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in fields.items())
            and all(isinstance(seg, dict) and seg.get("type") in ("text", "image", "audio") for seg in r["segments"])
            for r in records):
        raise OmnitokError(f"{index} does not hold `omnitok sample` records (samples: each with "
                           f"{', '.join(fields)}; segments typed text, image or audio)")
    return records


def _alignment(directory: Path, records: list[dict], models: dict[str, str | Path | None]) -> dict:
    """CLIP and CLAP scores of the samples' pictures and sounds against their prompts' text; each score without a
    model, or with no picture or sound beside a prompt with words, is listed under ``skipped`` with the reason."""
    from omnitok.eval.alignment import Aligner, alignment_report

    scores, skipped = {}, {}
    for modality, name, flag in (("image", "clip_score", "--clip"), ("audio", "clap_score", "--clap")):
        if models[modality] is None:
            skipped[name] = f"needs a local {name[:4].upper()} model directory ({flag}); nothing can be downloaded"
            continue
        aligner = Aligner(models[modality], modality)  # one line if the directory holds no such model
        if any("prompt_text" not in r for r in records):
            skipped[name] = "samples.json has no prompt_text (made by an older omnitok): sample again"
            continue
        pairs = [(f"{r['id']}/{s['file']}", r["prompt_text"], directory / r["id"] / s["file"])
                 for r in records if r["prompt_text"] for s in r["segments"] if s["type"] == modality]
        if not pairs:
            skipped[name] = f"no {modality} beside a prompt with words"
            continue
        scores[name] = alignment_report(aligner, pairs)
    return {**scores, "skipped": skipped}
