"""The image tokenizer: real-world image files -> VQ-GAN code grids, and code grids -> uint8 images.

Preprocessing handles what corpora contain: EXIF orientation, transparency (RGBA, LA, palette with a transparent
colour) composited on white (as Chameleon does), CMYK, 16-bit and grayscale images; truncated files and images
over the pixel limit (Pillow's decompression-bomb limit, 89.5 MP by default) raise one ``ImageError`` naming the
file. Then either
- ``resize="crop"``: shorter side to ``image_size``, centre crop to ``image_size`` square, or
- ``resize="fit"``: keep the aspect ratio, longer side ``image_size``, each side rounded to a multiple of the
  downsampling factor; the grid's rows and columns go into the sequence (ARCHITECTURE.md), so any shape decodes.

That is omnitok's own recipe (``recipe="omnitok"``). An imported tokenizer records its original pipeline instead
(``recipe`` = the import format), so a model trained on its codes sees the pixels it was trained on:
- ``chameleon`` (``chameleon/inference/image_tokenizer.py``): transparency blended on white with the blend truncated
  to uint8; shorter side to ``image_size`` with LANCZOS (up or down), centre crop; ``x / 255 * 2 - 1`` in float64;
- ``llamagen`` (ADM's ``center_crop_arr``, used by LlamaGen's code extraction): transparency dropped
  (``convert("RGB")``); halved with BOX while the shorter side is at least twice ``image_size``, then BICUBIC to
  it, centre crop; ``(x / 255 - 0.5) / 0.5`` in float32;
- ``janus`` (Janus' ``VLMImageProcessor``): transparency dropped; longer side to ``image_size`` with BICUBIC
  (sides truncated, at least 14), padded to a square with (127, 127, 127); ``(x * (1/255) - 0.5) / 0.5``.
Each recipe hands the model the tensor layout its original does: contiguous NCHW float32 (Janus' processor stacks
its arrays into a new one), except Chameleon's, whose original passes a permuted (channels-last) view. The layout
picks the convolution kernels, and with them the last bits of the latents and near-tie codes.
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import save_file

from omnitok.config import build, to_dict
from omnitok.device import autocast, default_device
from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object, write_json_atomic
from omnitok.tokenizers.protocol import fingerprint, read_part_info, write_part_info
from omnitok.tokenizers.vqgan import VQGAN, VQGANConfig
from omnitok.weights import load_safetensors, load_weights

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
PILLOW_PIXEL_LIMIT = 89_478_485
RECIPES = ("omnitok", "chameleon", "llamagen", "janus")


class ImageError(OmnitokError):
    """One image could not be used; the message names it and says why."""


@dataclass
class ImagePreprocessConfig:
    image_size: int = 256
    resize: str = "crop"  # "crop" (square) or "fit" (aspect-preserving grid); omnitok's own recipe only
    max_pixels: int = PILLOW_PIXEL_LIMIT  # larger images are refused before they are decoded
    recipe: str = "omnitok"  # or an imported tokenizer's original pipeline: "chameleon", "llamagen", "janus"

    def __post_init__(self) -> None:
        if self.resize not in ("crop", "fit"):
            raise OmnitokError(f"image resize must be 'crop' or 'fit', got {self.resize!r}")
        if self.recipe not in RECIPES:
            raise OmnitokError(f"image recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.recipe != "omnitok" and self.resize != "crop":
            raise OmnitokError(f"resize='fit' is omnitok's own recipe; the {self.recipe} recipe sizes images its "
                               "original way")
        if self.image_size < 1 or self.max_pixels < 1:
            raise OmnitokError("image_size and max_pixels must be positive")


def _name(source: Any) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return f"<{type(source).__name__}>"


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Integer images of more than 8 bits (16-bit PNG, TIFF) scaled to 0..255; floats read as 0..1."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "f":
        return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    a = a.astype(np.int64)
    top = 255 if a.max(initial=0) <= 255 else 65535
    return ((np.clip(a, 0, top) * 255 + top // 2) // top).astype(np.uint8)


def _to_rgb(img: Image.Image, recipe: str = "omnitok") -> Image.Image:
    """8-bit RGB: transparency composited on white (omnitok), blended on white and truncated (chameleon) or dropped
    (llamagen, janus: their loaders call ``convert("RGB")``)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_uint8(np.asarray(img))
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if img.mode == "RGB" or recipe in ("llamagen", "janus"):
        return img.convert("RGB")
    if recipe == "chameleon":
        rgba = np.asarray(img.convert("RGBA"))
        if (rgba[..., 3] == 255).all():
            return img.convert("RGB")
        alpha = rgba[..., 3:] / 255.0
        return Image.fromarray(((1 - alpha) * 255 + alpha * rgba[..., :3]).astype(np.uint8), "RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: Any, max_pixels: int = PILLOW_PIXEL_LIMIT, recipe: str = "omnitok") -> Image.Image:
    """Path, file bytes, PIL image or array -> upright 8-bit RGB PIL image (transparency as ``recipe`` handles it);
    raises ``ImageError`` naming the file."""
    name = _name(source)
    if isinstance(source, np.ndarray):
        a = source
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ImageError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {source.shape}")
        a = _to_uint8(a)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[a.shape[2]]
        return _to_rgb(Image.fromarray(a[..., 0] if mode == "L" else a, mode), recipe)
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else open(source, "rb")  # noqa: SIM115
        except OSError as e:
            raise ImageError(f"{name}: cannot open ({e.strerror or e})") from None
        with fp, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp)
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
                img.load()
            except ImageError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImageError(f"{name}: over Pillow's decompression-bomb limit ({e})") from None
            except UnidentifiedImageError:
                raise ImageError(f"{name}: not an image file Pillow can read") from None
            except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
                raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # malformed EXIF blocks raise a variety of errors inside Pillow
        raise ImageError(f"{name}: unreadable EXIF orientation ({e})") from None
    return _to_rgb(img, recipe)


def prepare_image(source: Any, cfg: ImagePreprocessConfig, multiple: int) -> np.ndarray:
    """One image (path, bytes, PIL image, array) -> uint8 (H, W, 3) at the model's input size, by ``cfg.recipe``.
    Raises ``ImageError`` naming the file."""
    return resize(load_image(source, cfg.max_pixels, cfg.recipe), cfg, multiple)


def resize(img: Image.Image, cfg: ImagePreprocessConfig, multiple: int) -> np.ndarray:
    """Resize (and crop or pad) an RGB image to the model's input size by ``cfg.recipe``; returns uint8 (H, W, 3)."""
    w, h = img.size
    size = cfg.image_size
    if cfg.recipe == "chameleon":
        scale = size / min(w, h)
        img = img.resize((round(scale * w), round(scale * h)), Image.Resampling.LANCZOS)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif cfg.recipe == "llamagen":
        while min(img.size) >= 2 * size:
            img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
        scale = size / min(img.size)
        img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
        a = np.asarray(img)
        top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        return np.ascontiguousarray(a[top:top + size, left:left + size], dtype=np.uint8)
    elif cfg.recipe == "janus":
        longest = max(w, h)
        nh, nw = max(int(h / longest * size), 14), max(int(w / longest * size), 14)
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        if nw != nh:
            square = Image.new("RGB", (max(nw, nh),) * 2, (127, 127, 127))
            square.paste(img, ((max(nw, nh) - nw) // 2, (max(nw, nh) - nh) // 2))
            img = square
    elif cfg.resize == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        scale = size / max(w, h)
        nw = min(size, max(multiple, round(w * scale / multiple) * multiple))
        nh = min(size, max(multiple, round(h * scale / multiple) * multiple))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


class ImageTokenizer:
    """Images <-> code grids through a VQ-GAN.

    ``encode(images)``: images (paths, bytes, PIL images, arrays) -> list of int64 ``(rows, cols)`` code arrays.
    ``decode(codes)``: list of ``(rows, cols)`` arrays -> list of uint8 ``(rows*ds, cols*ds, 3)`` arrays.
    """

    def __init__(self, model: VQGAN, preprocess: ImagePreprocessConfig | None = None,
                 device: torch.device | str | None = None, batch_size: int = 16):
        self.preprocess_config = preprocess or ImagePreprocessConfig()
        if self.preprocess_config.image_size % model.config.downsample:
            raise OmnitokError(f"image_size {self.preprocess_config.image_size} is not a multiple of the "
                               f"downsampling factor {model.config.downsample}")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size
        self._fingerprint: str | None = None

    @property
    def config(self) -> VQGANConfig:
        return self.model.config

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def max_grid_side(self) -> int:
        return self.preprocess_config.image_size // self.downsample

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(_config_dict(self.config, self.preprocess_config), self.model.state_dict())
        return self._fingerprint

    def preprocess(self, image: Any) -> np.ndarray:
        """One image (any accepted form) -> uint8 (H, W, 3) at the model's input size. Raises ``ImageError``."""
        return prepare_image(image, self.preprocess_config, self.downsample)

    @torch.inference_mode()
    def encode(self, images: list[Any]) -> list[np.ndarray]:
        """Batch of images -> code grids; images of the same size share a forward pass."""
        arrays = [self.preprocess(im) for im in images]
        return self.encode_preprocessed(arrays)

    @torch.inference_mode()
    def encode_preprocessed(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Already preprocessed uint8 (H, W, 3) arrays (``preprocess``) -> code grids."""
        out: list[np.ndarray | None] = [None] * len(arrays)
        for shape, idx in _group_by_shape(arrays).items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                pixels = model_input(np.stack([arrays[i] for i in chunk]), self.preprocess_config.recipe)
                pixels = pixels.to(self.device)  # (B, 3, H, W) in [-1, 1]
                with autocast(self.device):
                    codes = self.model.encode(pixels)  # (B, rows, cols); lookup itself runs in fp32
                for i, c in zip(chunk, codes.cpu().numpy()):
                    out[i] = c.astype(np.int64)
        return out

    @torch.inference_mode()
    def decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Code grids -> uint8 (H, W, 3) images."""
        grids = [np.asarray(c) for c in codes]
        for g in grids:
            if g.ndim != 2 or g.size == 0:
                raise OmnitokError(f"image codes must be a non-empty (rows, cols) grid, got shape {g.shape}")
            if g.min() < 0 or g.max() >= self.codebook_size:
                raise OmnitokError(f"image code {int(g.max() if g.max() >= self.codebook_size else g.min())} is "
                                   f"outside the codebook [0, {self.codebook_size})")
        out: list[np.ndarray | None] = [None] * len(grids)
        for shape, idx in _group_by_shape(grids).items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                batch = torch.from_numpy(np.stack([grids[i] for i in chunk]).astype(np.int64)).to(self.device)
                with autocast(self.device):
                    pixels = self.model.decode(batch)  # (B, 3, H, W)
                for i, im in zip(chunk, pixels_to_uint8(pixels).cpu().numpy()):
                    out[i] = im
        return out

    # ---------------------------------------------------------------- directory form

    def save(self, directory: str | Path) -> Path:
        return save_tokenizer_dir(self.model, self.preprocess_config, directory)

    @classmethod
    def from_dir(cls, directory: str | Path, device: torch.device | str | None = None) -> ImageTokenizer:
        directory = Path(directory)
        read_part_info(directory, "image", "vqgan")
        cfg = read_json_object(directory / CONFIG_FILE, f"{directory} has no {CONFIG_FILE}")
        unknown = set(cfg) - {"model", "preprocess"}
        if unknown:
            raise OmnitokError(f"{directory / CONFIG_FILE}: unknown key {sorted(unknown)[0]!r}")
        model = VQGAN(build(VQGANConfig, cfg.get("model", {}), "model."))
        load_weights(model, load_safetensors(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE))
        return cls(model, build(ImagePreprocessConfig, cfg.get("preprocess", {}), "preprocess."), device=device)


def model_input(images: np.ndarray, recipe: str = "omnitok") -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], with the arithmetic and memory layout of ``recipe``'s
    original pipeline (a value can round differently in float32 and float64, and the layout picks the kernels)."""
    if recipe == "chameleon":  # a permuted view, as Chameleon's own `_vqgan_input_from` hands its model
        return torch.from_numpy(images / 255.0 * 2 - 1).permute(0, 3, 1, 2).float()
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (B, 3, H, W)
    if recipe == "llamagen":
        return (torch.from_numpy(x).float().div(255) - 0.5) / 0.5
    if recipe == "janus":
        return (torch.from_numpy((x.astype(np.float64) * (1 / 255.0)).astype(np.float32)) - 0.5) / 0.5
    return torch.from_numpy(x).float() / 127.5 - 1.0


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """The inverse of ``model_input``: model pixels (B, 3, H, W) in [-1, 1] -> uint8 images (B, H, W, 3), rounded,
    on the same device."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def _config_dict(model: VQGANConfig, preprocess: ImagePreprocessConfig) -> dict:
    pre = to_dict(preprocess)
    if pre["recipe"] == "omnitok":  # the default leaves config files and fingerprints as they were before recipes
        del pre["recipe"]
    return {"model": to_dict(model), "preprocess": pre}


def save_tokenizer_dir(model: VQGAN, preprocess: ImagePreprocessConfig, directory: str | Path) -> Path:
    """Write an image tokenizer directory (weights, config, omnitok.json) from a model, training or not."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    write_json_atomic(directory / CONFIG_FILE, _config_dict(model.config, preprocess))
    write_part_info(directory, "image", "vqgan")
    return directory


def _group_by_shape(arrays: list[np.ndarray]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, a in enumerate(arrays):
        groups[a.shape].append(i)
    return groups

