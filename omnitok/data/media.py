"""Media files: which extensions are images or audio, finding them under folders and in tar shards, and the image
file dataset the VQ-GAN trainer and the tokenizer evaluation read. The one place that knows media file types;
corpus readers, trainers and evaluation all ask here."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omnitok.errors import OmnitokError

if TYPE_CHECKING:
    from omnitok.tokenizers.image import ImagePreprocessConfig

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
AUDIO_EXTENSIONS = frozenset({"wav", "flac", "mp3", "ogg", "opus", "aiff", "aif"})


def media_kind(name: str) -> str | None:
    """``"image"``, ``"audio"`` or None for a file name, a path or a bare extension (a WebDataset member's)."""
    ext = name.rsplit(".", 1)[-1].lower()
    return "image" if ext in IMAGE_EXTENSIONS else "audio" if ext in AUDIO_EXTENSIONS else None


def media_under(folder: Path, kind: str | None = None) -> list[Path]:
    """Media files (of ``kind``, or both) anywhere under ``folder``, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and media_kind(p.name) in ((kind,) if kind else
                                                                                            ("image", "audio")))


def list_images(sources: list[str | Path]) -> list[tuple[str, str | None]]:
    """Image files under directories, and image members of tar shards: ``(path, member or None)``, sorted."""
    items: list[tuple[str, str | None]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            items += [(str(p), None) for p in media_under(path, "image")]
        elif path.is_file() and path.suffix == ".tar":
            with tarfile.open(path) as tar:
                items += [(str(path), m.name) for m in tar.getmembers() if m.isfile() and media_kind(m.name) == "image"]
        else:
            raise OmnitokError(f"{source} is neither a directory of images nor a .tar shard")
    if not items:
        raise OmnitokError(f"no images found in {', '.join(map(str, sources))}")
    return sorted(items)


def list_audio(sources: list[str | Path]) -> list[Path]:
    """Audio files under directories, and files named directly, sorted."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += media_under(path, "audio")
        elif path.is_file():
            files.append(path)
        else:
            raise OmnitokError(f"{source} is neither an audio file nor a directory")
    if not files:
        raise OmnitokError(f"no audio files found in {', '.join(map(str, sources))}")
    return sorted(files)


class ImageFiles(torch.utils.data.Dataset):
    """Item ``(index, flip)`` -> ``(index, uint8 (H, W, 3) array or the error message)``."""

    def __init__(self, items: list[tuple[str, str | None]], preprocess: ImagePreprocessConfig, multiple: int):
        self.items, self.preprocess, self.multiple = items, preprocess, multiple

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[int, np.ndarray | str]:
        from omnitok.tokenizers.image import ImageError, prepare_image  # model code: loaded when images are read

        index, flip = key
        path, member = self.items[index]
        try:
            if member is None:
                source: Any = path
            else:
                with tarfile.open(path) as tar:
                    source = tar.extractfile(member).read()
            array = prepare_image(source, self.preprocess, self.multiple)
        except ImageError as e:
            return index, str(e)
        return index, np.ascontiguousarray(array[:, ::-1]) if flip else array
