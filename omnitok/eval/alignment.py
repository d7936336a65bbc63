"""How well samples match their prompts: CLIP score (text, image) and CLAP score (text, audio).

Both embed the prompt's text and the sampled picture or sound with a contrastive model read from a local Hugging Face
directory (weights from safetensors only; the model's own processor files: tokenizer, image processor or audio
feature extractor), and take the cosine of the two embeddings. ``score`` is the CLIP score as torchmetrics and most
text-to-image papers report it, ``max(100 * cosine, 0)`` averaged over pairs; ``cosine`` is the plain mean, the
number text-to-audio papers call the CLAP score. Any model with ``get_text_features`` and ``get_image_features``
(CLIP, SigLIP, ...) or ``get_audio_features`` (CLAP) works.

Sounds are read as mono, resampled to the feature extractor's rate and cut to its longest input (``max_length_s``,
10 s for LAION's CLAP): its own handling of longer clips picks random chunks, which would make the score change from
run to run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnitok.device import default_device
from omnitok.errors import OmnitokError
from omnitok.weights import from_pretrained

BATCH = 16


class Aligner:
    """A contrastive (text, image) or (text, audio) model from a local directory."""

    def __init__(self, directory: str | Path, modality: str):
        from transformers import AutoModel, AutoProcessor

        if modality not in ("image", "audio"):
            raise ValueError(f"modality must be image or audio, got {modality!r}")
        directory = Path(directory)
        if not directory.is_dir():
            raise OmnitokError(f"{directory} is not a model directory")
        self.modality, self.directory = modality, directory
        self.device = default_device()
        model = from_pretrained(AutoModel, directory)
        getter = "get_image_features" if modality == "image" else "get_audio_features"
        if not (hasattr(model, "get_text_features") and hasattr(model, getter)):
            kind = "CLIP-like (text, image)" if modality == "image" else "CLAP-like (text, audio)"
            raise OmnitokError(f"{directory} holds a {type(model).__name__}, not a {kind} model")
        self.model = model.eval().to(self.device)
        try:
            processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OmnitokError(f"{directory}: cannot load the model's processor: {first[:300]}") from None
        self.tokenizer = processor.tokenizer
        self.media = processor.image_processor if modality == "image" else processor.feature_extractor
        positions = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", None)
        limits = [n for n in (self.tokenizer.model_max_length, positions) if n is not None and n < 1_000_000]
        self.max_text = min(limits) if limits else None

    def cosines(self, texts: list[str], media: list) -> np.ndarray:
        """The cosine of each (text, picture or sound) pair; ``media`` are PIL images, or (waveform, sample_rate)
        pairs with waveforms (samples,) or (channels, samples)."""
        if len(texts) != len(media):
            raise ValueError(f"{len(texts)} texts for {len(media)} {self.modality} items")
        out = [self._batch(texts[i:i + BATCH], media[i:i + BATCH]) for i in range(0, len(texts), BATCH)]
        return np.concatenate(out) if out else np.zeros(0)

    @torch.no_grad()
    def _batch(self, texts: list[str], media: list) -> np.ndarray:
        words = self.tokenizer(texts, padding=True, truncation=self.max_text is not None, max_length=self.max_text,
                               return_tensors="pt")
        text = _unit(self.model.get_text_features(input_ids=words["input_ids"].to(self.device),
                                                  attention_mask=words["attention_mask"].to(self.device)))
        if self.modality == "image":
            pixels = self.media([m.convert("RGB") for m in media], return_tensors="pt")["pixel_values"]
            other = _unit(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        else:
            rate = self.media.sampling_rate
            waves = [self._wave(w, r, rate) for w, r in media]
            features = self.media(waves, sampling_rate=rate, return_tensors="pt")
            inputs = {k: features[k].to(self.device) for k in ("input_features", "is_longer") if k in features}
            other = _unit(self.model.get_audio_features(**inputs))
        return (text * other).sum(-1).cpu().double().numpy()

    def _wave(self, wave: np.ndarray, rate: int, target: int) -> np.ndarray:
        import soxr

        wave = np.asarray(wave, dtype=np.float32)
        mono = wave.mean(0) if wave.ndim == 2 else wave
        if rate != target:
            mono = soxr.resample(mono, rate, target).astype(np.float32)
        return mono[:int(self.media.nb_max_samples)]


def _unit(out) -> torch.Tensor:
    """Unit-length embeddings: transformers 5 returns them as a model output's ``pooler_output``, 4.x as a tensor."""
    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(features.float(), dim=-1)


def alignment_report(aligner: Aligner, pairs: list[tuple[str, str, Path]]) -> dict:
    """Score ``(name, text, file)`` pairs; a file that cannot be read is skipped and counted (``eval samples`` lists
    it among its problems)."""
    import soundfile as sf
    from PIL import Image

    names, texts, media, unreadable = [], [], [], 0
    for name, text, path in pairs:
        try:
            if aligner.modality == "image":
                with Image.open(path) as img:
                    media.append(img.convert("RGB"))
            else:
                wave, rate = sf.read(path, dtype="float32", always_2d=True)
                media.append((wave.T, rate))
        except Exception:  # noqa: BLE001 - an unreadable file is a finding of the validity check, not a crash
            unreadable += 1
            continue
        names.append(name)
        texts.append(text)
    cos = aligner.cosines(texts, media)
    return {"model": str(aligner.directory), "pairs": len(names), "unreadable": unreadable,
            "score": float(np.maximum(100 * cos, 0).mean()) if len(cos) else None,
            "cosine": float(cos.mean()) if len(cos) else None,
            "per_segment": {n: round(float(c), 6) for n, c in zip(names, cos)}}
