from __future__ import annotations

import ast
import io
import json
import shutil
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import soundfile as sf
import torch
from PIL import Image

from omnitok.cli import main
from omnitok.model.build import ModelConfig, build_model
from omnitok.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from omnitok.tokenizers.audio_import import encodec_model
from omnitok.tokenizers.image import ImagePreprocessConfig, ImageTokenizer
from omnitok.tokenizers.layout import TokenLayout
from omnitok.tokenizers.text import TextTokenizer
from omnitok.tokenizers.vqgan import VQGAN, VQGANConfig
from omnitok.train.text_tokenizer import TextTokenizerTrainConfig, train_text_tokenizer

ASSETS = Path(__file__).parent / "assets"


def stdlib_docstrings(max_modules: int = 120) -> list[str]:
    """Real English text with code in it: docstrings of the Python standard library."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_modules]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stdlib_docstrings.txt"
    path.write_text("\n".join(stdlib_docstrings()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory, stdlib_corpus) -> Path:
    out = tmp_path_factory.mktemp("sp") / "text"
    train_text_tokenizer([stdlib_corpus], out, TextTokenizerTrainConfig(vocab_size=1000))
    return out


@pytest.fixture(scope="session")
def sp_tok(sp_dir) -> TextTokenizer:
    return TextTokenizer.from_dir(sp_dir)


PHOTOS = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]


@pytest.fixture(scope="session")
def tokdir(tmp_path_factory, sp_dir):
    """A tokenizer with small real image (VQ-GAN, 32 px -> 8x8) and audio (narrow 24 kHz EnCodec) parts."""
    root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(base_channels=32, channel_multipliers=(1, 1, 2), num_res_blocks=1, latent_channels=32,
                           codebook_size=256, codebook_dim=8))
    vq.quantize.vq._codebook.embed.copy_(torch.nn.functional.normalize(torch.randn(1, 256, 8), dim=-1))
    ImageTokenizer(vq, ImagePreprocessConfig(image_size=32), device="cpu").save(root / "image")
    model = encodec_model("24khz", num_filters=8, hidden_size=32, codebook_dim=32).eval()
    for layer in model.quantizer.layers:
        layer.codebook.embed.normal_(0, 0.02)
    AudioTokenizer(model, AudioTokenizerConfig(bandwidth=1.5), device="cpu").save(root / "audio")
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--image", str(root / "image"), "--audio",
                 str(root / "audio"), "--out", str(root / "tok")]) == 0
    return root / "tok"


def jpeg(array, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """An interleaved JSONL, a folder of pairs and a WebDataset tar, all real photos / sounds."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "media").mkdir()
    for i in range(12):
        p = PHOTOS[i % 4]
        y, x = rng.integers(0, 200), rng.integers(0, 200)
        Image.fromarray(p[y:y + 96, x:x + 96]).save(root / "media" / f"img{i:02d}.png")
    shutil.copy(ASSETS / "speech_hello_22k.wav", root / "media" / "hello.wav")
    docs = [[{"text": f"Document {i}: "}, {"image": f"media/img{i:02d}.png"}, {"text": " and then"},
             {"audio": "media/hello.wav"}] if i % 3 == 0 else
            {"id": f"d{i}", "segments": [{"image": f"media/img{i:02d}.png"}, {"text": f"caption number {i}"}]}
            for i in range(12)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    pairs = root / "pairs"
    pairs.mkdir()
    for i in range(6):
        Image.fromarray(PHOTOS[i % 4][::4, ::4]).save(pairs / f"p{i}.jpg")
        (pairs / f"p{i}.txt").write_text(f"a small photo, number {i} 😀")
    sf.write(pairs / "tone.flac", (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)).astype(np.float32),
             16000)
    (pairs / "tone.txt").write_text("a 440 Hz tone")
    with tarfile.open(root / "wds-000.tar", "w") as tar:
        for i in range(5):
            for ext, data in (("jpg", jpeg(PHOTOS[(i + 1) % 4][::8, ::8])), ("txt", f"tar sample {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokdir):
    """A random-weight model laid out like an `omnitok export`: HF files plus tokenizer/."""
    root = tmp_path_factory.mktemp("model") / "export"
    layout = TokenLayout.load(tokdir / "layout.json")
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
                        layout)
    with torch.no_grad():  # random weights favour no token class; make media spans frequent
        model.lm_head.weight[[layout.boi_id, layout.boa_id]] *= 0
        model.lm_head.weight[[layout.boi_id, layout.boa_id], 0] = 3.0
        model.model.embed_tokens.weight[:, 0] = 1.0
    model.save_pretrained(str(root))
    shutil.copytree(tokdir, root / "tokenizer")
    return root


@pytest.fixture(scope="session")
def chat_tokdir(tmp_path_factory, tokdir, sp_dir):
    """The real test tokenizer's parts assembled with the chat markers."""
    out = tmp_path_factory.mktemp("chat") / "tok"
    assert main(["tokenizer", "assemble", "--text", str(sp_dir), "--image", str(tokdir.parent / "image"), "--audio",
                 str(tokdir.parent / "audio"), "--out", str(out), "--chat"]) == 0
    return out


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, chat_tokdir):
    """A random-weight model on the chat layout, laid out like an `omnitok finetune` export; its output rows favour
    media openers and <|eot|>, so answers are short and hold media."""
    root = tmp_path_factory.mktemp("chat_model") / "export"
    layout = TokenLayout.load(chat_tokdir / "layout.json")
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
                        layout)
    with torch.no_grad():
        favoured = [layout.boi_id, layout.boa_id, layout.eot_id]
        model.lm_head.weight[favoured] *= 0
        model.lm_head.weight[favoured, 0] = 2.0
        model.model.embed_tokens.weight[:, 0] = 1.0
    model.save_pretrained(str(root))
    shutil.copytree(chat_tokdir, root / "tokenizer")
    return root


def killed_after_first_checkpoint_then_resumed(monkeypatch, task_cls, train, cfg) -> None:
    """Run ``train(cfg)`` until its first checkpoint is exported, kill it there, then ``train(cfg, resume=True)``."""
    real = task_cls.export

    def export_then_die(*args):
        real(*args)
        raise KeyboardInterrupt  # killed right after the checkpoint

    monkeypatch.setattr(task_cls, "export", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(task_cls, "export", real)
    train(cfg, resume=True)


def one_and_two_processes(command: str, settings: list[str], root: Path, micro_batch: int) -> tuple[Path, Path]:
    """``omnitok COMMAND`` in one process with ``micro_batch`` sequences per step (``root/one``) and in two processes
    over gloo with half as many each (``root/two``): the same global batch. Returns the two run directories."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "PYTHONUNBUFFERED": "1"}
    runs = {"one": [sys.executable, "-m", "omnitok"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    "-m", "omnitok"]}
    for name, launch in runs.items():
        batch = micro_batch if name == "one" else micro_batch // 2
        done = subprocess.run([*launch, command, *settings, f"out={root / name}", f"micro_batch_size={batch}"],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    return root / "one", root / "two"
