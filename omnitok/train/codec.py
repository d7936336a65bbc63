"""``omnitok audio-tokenizer train``: train or fine-tune the EnCodec architecture (no training recipe ships with the
``encodec`` package).

The encoder and decoder are transformers' ``EncodecModel`` modules of a preset (sizes may be overridden); the
residual quantizer is vector-quantize-pytorch's ``ResidualVQ`` with EMA codebooks, k-means initialisation, dead-code
replacement and quantizer dropout (each batch uses the first k codebooks, k random, so one codec serves every
bandwidth). Losses follow EnCodec: L1 on the waveform, L1 + L2 on mel spectrograms at six scales, the commitment
loss, and optionally the multi-scale STFT discriminator (hinge loss plus feature matching). Two more, for small codecs
on speech: L2 on the waveform, and L1 on floored log-mel spectrograms; the mel terms may join after a start step.

The quantizer may start after a plain-autoencoder warm-up; k-means then initialises its codebooks from several batches
(``_init_codebooks``), and the commitment loss is taken relative to the embedding's mean square once that exceeds 1.
The learning rates may fall linearly to 0 over the last ``lr_decay_steps`` (constant before: a run resumed before the
decay began can be lengthened).

The trained codebooks are copied into the ``EncodecModel``'s own quantizer, so the output directory is an ordinary
audio tokenizer (``AudioTokenizer.from_dir``); evaluation goes through that inference path. Beside it: held-out WAV
samples (original and reconstruction) in ``samples/``, SI-SDR, mel distance and STOI in ``eval.jsonl`` and
TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from tqdm import tqdm
from vector_quantize_pytorch import ResidualVQ

from omnitok import distributed
from omnitok.config import apply_overrides, build, load_config_file, to_dict
from omnitok.data.media import list_audio
from omnitok.device import autocast, default_device
from omnitok.errors import OmnitokError
from omnitok.tokenizers.audio import PRESETS, AudioTokenizer, AudioTokenizerConfig, save_tokenizer_dir
from omnitok.tokenizers.audio_import import encodec_model
from omnitok.tokenizers.codebook import scale_dead_code_threshold, usage_stats
from omnitok.train import harness
from omnitok.train.audio_losses import MultiScaleSTFTDiscriminator, mel_distance, mel_losses
from omnitok.train.harness import ModuleTask, RunSettings

KMEANS_VECTORS_PER_CODE = 16  # k-means initialisation draws on at least this many encoder frames per code


@dataclass
class CodecModelConfig:
    preset: str = "24khz"
    sizes: dict[str, Any] = field(default_factory=dict)  # EncodecConfig overrides: num_filters, hidden_size, ...

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise OmnitokError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if PRESETS[self.preset].get("chunk_length_s"):
            raise OmnitokError("training the chunked 48 kHz codec is not supported; use 24khz or 32khz")


@dataclass
class CodecGANConfig:
    enabled: bool = False
    start: int = 0  # adversarial losses join after this step
    weight: float = 3.0  # EnCodec's lambda_g
    feature_weight: float = 3.0  # lambda_feat
    channels: int = 32
    lr: float = 3e-4


@dataclass
class CodecTrainConfig(RunSettings):
    steps: int = 20000
    model: CodecModelConfig = field(default_factory=CodecModelConfig)
    gan: CodecGANConfig = field(default_factory=CodecGANConfig)
    bandwidth: float | None = None  # the saved tokenizer's bandwidth (default: the largest the codec has)
    batch_size: int = 8
    segment_s: float = 1.0
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    lr_decay_steps: int = 0  # the learning rates fall linearly to 0 over the last this many steps (0: constant)
    time_weight: float = 0.1  # EnCodec's lambda_t, on the waveform L1
    time_l2_weight: float = 0.0  # waveform L2: its optimum under doubt is the mean, not L1's median (silence), so a
    # small codec starting on speech leaves the silent output it otherwise keeps for thousands of steps
    mel_weight: float = 1.0
    log_mel_weight: float = 0.0  # L1 on log-mel spectrograms floored 80 dB under the peak: weighs the quiet high
    # bands (consonants) that the waveform and magnitude losses neglect
    mel_start_step: int = 0  # the mel losses join after this step (a small codec learns the waveform first)
    quantizer_dropout: bool = True
    vq_warmup_steps: int = 0  # train as a plain autoencoder first; k-means then starts from a trained encoder
    ema_decay: float = 0.99
    commitment_weight: float = 1.0
    dead_code_share: float = 0.25  # a code used less than this share of a uniform code (EMA) is replaced by a batch
    # vector (omnitok.tokenizers.codebook); 0: never
    holdout: int = 2  # files kept out of training for evaluation
    eval_seconds: float = 2.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.check_run_settings()
        if self.batch_size < 1 or self.holdout < 1 or self.segment_s <= 0:
            raise OmnitokError("batch_size, holdout and segment_s must be positive")
        if self.dead_code_share < 0:
            raise OmnitokError("dead_code_share must be >= 0 (0: never replace codes)")
        if self.lr_decay_steps < 0 or self.vq_warmup_steps < 0:
            raise OmnitokError("lr_decay_steps and vq_warmup_steps must be >= 0")


def load_codec_config(path: str | Path | None, overrides: list[str]) -> CodecTrainConfig:
    return build(CodecTrainConfig, apply_overrides(load_config_file(path), overrides))


class CodecTask(ModuleTask):
    """EnCodec training as a task of the training harness (``omnitok.train.harness``)."""

    shown = ("si_sdr",)

    def __init__(self, sources: list[str | Path], cfg: CodecTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        self.codec = encodec_model(cfg.model.preset, **cfg.model.sizes).to(device).train()
        c = self.codec.config
        if c.codebook_dim != c.hidden_size:
            raise OmnitokError("codebook_dim must equal hidden_size (EnCodec has no projection before its quantizer)")
        self.rate, self.channels, self.hop = c.sampling_rate, c.audio_channels, c.hop_length
        self.bandwidth = cfg.bandwidth if cfg.bandwidth is not None else float(max(c.target_bandwidths))
        if self.bandwidth not in c.target_bandwidths:
            raise OmnitokError(f"bandwidth {self.bandwidth} is not among the codec's {list(c.target_bandwidths)}")
        # threshold_ema_dead_code > 0 turns dead-code replacement on; its count is set for each batch in train_step
        self.rvq = ResidualVQ(dim=c.hidden_size, num_quantizers=c.num_quantizers, codebook_size=c.codebook_size,
                              decay=cfg.ema_decay, kmeans_init=True, kmeans_iters=10,
                              threshold_ema_dead_code=cfg.dead_code_share, commitment_weight=cfg.commitment_weight,
                              quantize_dropout=cfg.quantizer_dropout and c.num_quantizers > 1,
                              rotation_trick=False).to(device)
        self.disc = MultiScaleSTFTDiscriminator(cfg.gan.channels, self.channels).to(device)
        params = list(self.codec.encoder.parameters()) + list(self.codec.decoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.gan.lr, betas=cfg.betas, weight_decay=0.0)

        self.startup_errors: list[str] = []
        files = []
        for path in list_audio(sources):
            try:
                info = sf.info(str(path))
                if info.frames == 0:
                    raise ValueError("holds no samples")
                files.append((path, info.samplerate, info.frames))
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                self.startup_errors.append(f"{path}: unreadable ({e})")
        if len(files) <= cfg.holdout:
            raise OmnitokError(f"{len(files)} readable audio files are too few: {cfg.holdout} are held out")
        order = np.random.default_rng([cfg.seed, 0]).permutation(len(files))
        self.train_files = [files[i] for i in order[cfg.holdout:]]
        durations = np.array([frames / rate for _, rate, frames in self.train_files])
        self.durations, self.pick_p = durations, durations / durations.sum()  # files drawn by duration
        self.segment = int(cfg.segment_s * self.rate) // self.hop * self.hop  # samples per training clip
        seconds = int(cfg.eval_seconds * self.rate)
        held = []
        for i in order[:cfg.holdout]:  # a held-out file that cannot be read is recorded; the others are the set
            try:
                held.append(self._read(files[i], 0, seconds))
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                self.startup_errors.append(f"{files[i][0]}: unreadable ({e}); not held out")
        if not held:
            raise OmnitokError(f"none of the {cfg.holdout} held-out audio files can be read: "
                               f"{self.startup_errors[-1]}")
        self.held = torch.stack(held)  # (H, C, T)

    # ---------------------------------------------------------------- data

    def _read(self, file: tuple[Path, int, int], start_s: float, samples: int) -> torch.Tensor:
        """``samples`` at the model rate and channels from ``start_s`` seconds into a file, zero-padded at the end."""
        path, rate, frames = file
        first = int(start_s * rate)
        count = min(frames - first, int(np.ceil(samples * rate / self.rate)) + 64)
        wave, _ = sf.read(str(path), start=first, frames=count, dtype="float32", always_2d=True)  # (n, ch)
        if not np.isfinite(wave).all():  # one such clip would make the whole batch's loss non-finite
            raise ValueError("holds NaN or infinite samples")
        if wave.shape[1] != self.channels:
            mono = wave.mean(axis=1, keepdims=True)
            wave = np.repeat(mono, self.channels, axis=1) if self.channels == 2 else mono
        if rate != self.rate:
            wave = soxr.resample(wave, rate, self.rate, quality="HQ")
        out = np.zeros((self.channels, samples), np.float32)
        n = min(samples, len(wave))
        out[:, :n] = wave[:n].T
        return torch.from_numpy(out)

    def _batch(self, step: int) -> tuple[torch.Tensor | None, list[str]]:
        """The batch of ``step``: a pure function of the seed and the step."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 3, step])
        picks = rng.choice(len(self.train_files), size=cfg.batch_size, p=self.pick_p)
        clips, errors = [], []
        for i in picks:
            offset = rng.random() * max(0.0, self.durations[i] - cfg.segment_s)
            try:
                clips.append(self._read(self.train_files[i], offset, self.segment))
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                errors.append(f"{self.train_files[i][0]}: unreadable at {offset:.2f} s ({e})")
        return (torch.stack(clips) if clips else None), errors

    def batches(self, start: int, steps: int):
        for step in range(start + 1, steps + 1):
            batch, errors = self._batch(step)
            yield batch, (self.startup_errors + errors if step == start + 1 else errors)

    # ---------------------------------------------------------------- training

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"codec": self.codec, "rvq": self.rvq, "discriminator": self.disc}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"codec": self.opt, "discriminator": self.disc_opt}

    def train_step(self, step: int, batch: torch.Tensor) -> dict[str, float] | None:
        cfg, device = self.cfg, self.device
        x = batch.to(device)  # (B, C, T)
        gan_on = cfg.gan.enabled and step > cfg.gan.start
        zero = torch.zeros((), device=device)
        with autocast(device):
            emb = self.codec.encoder(x)  # (B, D, frames)
            if step <= cfg.vq_warmup_steps:  # autoencoder warm-up: the decoder sees the continuous embedding
                quantized, codes, commit = emb.transpose(1, 2), torch.zeros(1, 1, 0, device=device), zero
            else:
                if not self.rvq.layers[0]._codebook.initted:
                    self._init_codebooks(step, emb)
                for layer in self.rvq.layers:
                    scale_dead_code_threshold(layer, cfg.dead_code_share, emb.shape[0] * emb.shape[-1])
                with torch.autocast(device_type=device.type, enabled=False):
                    quantized, codes, commit = self.rvq(emb.float().transpose(1, 2))  # (B, frames, D), (B, frames, q)
                # EnCodec's absolute loss while the embedding's mean square is at most 1, relative to it above: the
                # encoder's output grows in an autoencoder warm-up (mean square 46 after 2000 steps of the small
                # config, 1400 on another run), and the absolute loss then outweighs the reconstruction losses
                commit = commit / emb.detach().float().pow(2).mean().clamp(min=1.0)
            rec = self.codec.decoder(quantized.transpose(1, 2))[..., : x.shape[-1]]  # (B, C, T)
            time_loss, time_l2 = (x - rec).abs().mean(), (x - rec).pow(2).mean()
            loss = cfg.time_weight * time_loss + cfg.time_l2_weight * time_l2 + commit.sum()
            mel_on = step > cfg.mel_start_step and (cfg.mel_weight > 0 or cfg.log_mel_weight > 0)
            with torch.set_grad_enabled(mel_on):  # otherwise computed for the record only, without a graph
                mel_loss, log_mel = mel_losses(x, rec, self.rate)
            if mel_on:
                loss = loss + cfg.mel_weight * mel_loss + cfg.log_mel_weight * log_mel
            g_adv, feat = zero, zero
            if gan_on:
                real, fake = self.disc(x), self.disc(rec)
                g_adv = torch.stack([F.relu(1 - logits).mean() for logits, _ in fake]).mean()
                feat = torch.stack([(fr - ff).abs().mean() / (fr.abs().mean() + 1e-8)
                                    for (_, fs_r), (_, fs_f) in zip(real, fake)
                                    for fr, ff in zip(fs_r, fs_f)]).mean()
                loss = loss + cfg.gan.weight * g_adv + cfg.gan.feature_weight * feat
        if not torch.isfinite(loss):
            return None
        decay = min(1.0, (cfg.steps - step + 1) / cfg.lr_decay_steps) if cfg.lr_decay_steps else 1.0
        for opt, lr in ((self.opt, cfg.lr), (self.disc_opt, cfg.gan.lr)):
            for group in opt.param_groups:
                group["lr"] = lr * decay
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.codec.parameters(), cfg.grad_clip)
        self.opt.step()
        d_loss = zero
        if gan_on:
            with autocast(device):
                real, fake = self.disc(x), self.disc(rec.detach())
                d_loss = torch.stack([F.relu(1 - r).mean() + F.relu(1 + f).mean()
                                      for (r, _), (f, _) in zip(real, fake)]).mean()
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
        return {"loss": loss.item(), "time_l1": time_loss.item(), "time_l2": time_l2.item(), "mel": mel_loss.item(),
                "log_mel": log_mel.item(),
                "commit": commit.sum().item(), "g_adv": g_adv.item(), "feature": feat.item(), "d": d_loss.item(),
                "grad_norm": grad_norm.item(), "lr": cfg.lr * decay,
                "quantizers_active": int((codes >= 0).any(dim=0).any(dim=0).sum())}  # dropout marks unused with -1

    def _init_codebooks(self, step: int, emb: torch.Tensor) -> None:
        """k-means initialisation of every codebook from this batch's embeddings and those of the following steps'
        batches (pure functions of the step, so a resumed run initialises alike), KMEANS_VECTORS_PER_CODE frames per
        code. From one batch of a few hundred frames for 256 codes, k-means memorises the batch: in-sample error 0,
        on the next batch 43 % of the embedding's variance (1.2 % from 16 frames per code), and the commitment loss
        then jumps a hundredfold on the step after the start."""
        needed = KMEANS_VECTORS_PER_CODE * self.codec.config.codebook_size
        embs, frames, later = [emb.detach().float()], emb.shape[0] * emb.shape[-1], step
        with torch.no_grad(), autocast(self.device):
            while frames < needed:
                later += 1
                batch, _ = self._batch(later)
                if batch is not None:
                    embs.append(self.codec.encoder(batch.to(self.device)).float())
                    frames += embs[-1].shape[0] * embs[-1].shape[-1]
        vectors = torch.cat(embs).transpose(1, 2)  # (B', frames, D)
        for layer in self.rvq.layers:
            scale_dead_code_threshold(layer, self.cfg.dead_code_share, vectors.shape[0] * vectors.shape[1])
        dropout, self.rvq.quantize_dropout = self.rvq.quantize_dropout, False  # every layer initialised at once
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            self.rvq(vectors)
            for layer in self.rvq.layers:  # use counts as if gathered from batches of the usual size
                layer._codebook.cluster_size.mul_(emb.shape[0] / vectors.shape[0])
                layer._codebook.embed_avg.mul_(emb.shape[0] / vectors.shape[0])
        self.rvq.quantize_dropout = dropout

    # ---------------------------------------------------------------- evaluation and export

    def _copy_codebooks(self) -> None:
        """The trained ResidualVQ codebooks -> the EncodecModel's own quantizer (its inference path)."""
        with torch.no_grad():
            for q, layer in enumerate(self.codec.quantizer.layers):
                src = self.rvq.layers[q]._codebook
                layer.codebook.embed.copy_(src.embed[0])
                layer.codebook.embed_avg.copy_(src.embed_avg[0])
                layer.codebook.cluster_size.copy_(src.cluster_size[0])
                layer.codebook.inited.fill_(1.0)

    def evaluate(self, step: int, out: Path, writer: Any) -> dict[str, float]:
        from pystoi import stoi
        from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

        self._copy_codebooks()
        was_training = self.codec.training
        self.codec.eval()
        quantized = step > self.cfg.vq_warmup_steps  # in the warm-up the codebooks are not initialised yet
        with torch.inference_mode():
            x = self.held.to(self.device)
            if quantized:  # the inference path of the exported tokenizer
                codes = self.codec.encode(x, bandwidth=self.bandwidth).audio_codes  # (1, H, n_q, frames)
                rec = self.codec.decode(codes, [None]).audio_values[..., : x.shape[-1]].float()
                usage = usage_stats(codes[0, :, 0], self.codec.config.codebook_size)
            else:  # the autoencoder the warm-up trains
                rec = self.codec.decoder(self.codec.encoder(x))[..., : x.shape[-1]].float()
                usage = {"usage": 0.0, "perplexity": 0.0}
        self.codec.train(was_training)
        metrics = {
            "quantized": float(quantized),
            "si_sdr": float(scale_invariant_signal_distortion_ratio(rec.cpu(), x.cpu()).mean()),
            "stoi": float(np.mean([stoi(a[0].numpy(), b[0].numpy(), self.rate) for a, b in zip(x.cpu(), rec.cpu())])),
            "mel_distance": float(mel_distance(x.cpu(), rec.cpu(), self.rate)),
            "codebook0_usage": usage["usage"],
            "codebook0_perplexity": usage["perplexity"],
        }
        folder = out / "samples" / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (orig, recon) in enumerate(zip(x.cpu(), rec.cpu())):
            sf.write(folder / f"clip{i}_original.wav", orig.T.numpy(), self.rate)
            sf.write(folder / f"clip{i}_reconstruction.wav", recon.clamp(-1, 1).T.numpy(), self.rate)
            writer.add_audio(f"eval/clip{i}", recon.clamp(-1, 1).mean(0), step, sample_rate=self.rate)
        return metrics

    def export(self, out: Path) -> None:
        self._copy_codebooks()
        save_tokenizer_dir(self.codec, AudioTokenizerConfig(bandwidth=self.bandwidth), out)


def train_codec(sources: list[str | Path], out: str | Path, cfg: CodecTrainConfig, resume: bool = False,
                device: torch.device | str | None = None) -> dict[str, float]:
    """Train (or resume) a codec; returns the last evaluation metrics."""
    device = torch.device(device) if device is not None else default_device()
    task = CodecTask(sources, cfg, device)
    if not cfg.gan.enabled:
        tqdm.write("training without the MS-STFT discriminator (gan.enabled=false)")
    metrics = harness.run(task, cfg, to_dict(cfg), Path(out), world=distributed.single(device), resume=resume,
                      desc="codec").eval
    AudioTokenizer.from_dir(out)  # the result loads as an ordinary audio tokenizer
    return metrics
