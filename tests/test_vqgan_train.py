import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from omnitok.cli import main
from omnitok.errors import OmnitokError
from omnitok.tokenizers.image import ImageTokenizer
from omnitok.train.checkpoint import complete_checkpoints, latest_checkpoint, save_checkpoint
from omnitok.train.lpips import LPIPS
from omnitok.train.vqgan import load_train_config, train_vqgan

TINY = ["model.base_channels=32", "model.channel_multipliers=[1,1,2]", "model.num_res_blocks=1",
        "model.latent_channels=32", "model.codebook_size=256", "preprocess.image_size=32", "batch_size=16",
        "lr=0.001", "holdout=16", "num_workers=0", "keep_checkpoints=2"]


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """320 real-photo crops (48 px, saved as PNG and JPEG) plus one corrupt file."""
    root = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for i in range(320):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 48), rng.integers(0, p.shape[1] - 48)
        Image.fromarray(p[y:y + 48, x:x + 48]).save(root / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def losses(out):
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_raises_held_out_psnr(tmp_path, crops, capsys):
    out = tmp_path / "vq"
    assert main(["image-tokenizer", "train", "--images", str(crops), "--out", str(out), *TINY, "steps=60",
                 "eval_every=30", "checkpoint_every=30", "gan.start=40", "gan.channels=32"]) == 0
    printed = capsys.readouterr()
    assert "training without the perceptual loss" in printed.out + printed.err
    assert "held-out PSNR" in printed.out
    record = losses(out)
    assert [r["step"] for r in record] == list(range(1, 61))
    # Reconstruction loss (the total also holds the adversarial term from step 41 on).
    first, last = (np.mean([r["l1"] + r["l2"] for r in rs]) for rs in (record[:5], record[-5:]))
    assert last < 0.7 * first
    assert all(r["d"] > 0 for r in record[40:]) and all(r["d"] == 0 for r in record[:40])  # GAN from step 41
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 30, 60]
    assert evals[-1]["psnr"] > evals[0]["psnr"] + 3 and evals[-1]["psnr"] > evals[1]["psnr"]
    assert evals[-1]["codebook_usage"] > 0.05
    # The broken file is recorded, not fatal (it may or may not be drawn in 60 steps; it is counted if it is).
    for line in (out / "errors.jsonl").read_text().splitlines():
        assert "broken.jpg" in json.loads(line)["error"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step_{s:08d}.png" for s in (0, 30, 60)]
    grid = np.asarray(Image.open(out / "samples" / "step_00000060.png"))
    assert grid.shape == (64, 8 * 32, 3)
    assert list((out / "tb").iterdir())
    # The output directory is a working image tokenizer.
    tok = ImageTokenizer.from_dir(out)
    codes = tok.encode([crops / "000.jpg"])
    assert codes[0].shape == (8, 8) and tok.decode(codes)[0].shape == (32, 32, 3)


def test_resume_continues_with_the_same_batches_and_losses(tmp_path, crops):
    cfg = load_train_config(None, [*TINY, "steps=8", "eval_every=100", "checkpoint_every=4", "gan.start=5",
                                   "gan.channels=32"])
    train_vqgan([crops], tmp_path / "a", cfg, device="cpu")
    short = load_train_config(None, [*TINY, "steps=4", "eval_every=100", "checkpoint_every=4", "gan.start=5",
                                     "gan.channels=32"])
    train_vqgan([crops], tmp_path / "b", short, device="cpu")
    train_vqgan([crops], tmp_path / "b", cfg, resume=True, device="cpu")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra == rb  # every loss term, bit for bit, before and after the resume point
    with pytest.raises(OmnitokError, match="already holds a training run"):
        train_vqgan([crops], tmp_path / "a", cfg, device="cpu")
    other = load_train_config(None, [*TINY, "steps=8", "lr=0.01"])
    with pytest.raises(OmnitokError, match="config differs from the one .*'lr': 0.001 then, 0.01 now"):
        train_vqgan([crops], tmp_path / "b", other, resume=True, device="cpu")


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    def write_ok(d):
        (d / "weights").write_text("ok")

    def crash(d):
        (d / "weights").write_text("half")
        raise KeyboardInterrupt  # the process dies mid-save

    save_checkpoint(tmp_path, 10, write_ok, keep=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 20, crash, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    save_checkpoint(tmp_path, 20, write_ok, keep=2)
    save_checkpoint(tmp_path, 30, write_ok, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000020", "step_00000030"]
    assert not list(tmp_path.glob(".tmp-*"))



def test_sigterm_to_the_whole_process_group_stops_with_a_checkpoint_despite_loader_workers(tmp_path, crops):
    """SLURM signals every process of a job: the data-loader workers must leave it to the trainer (a worker killed by
    it ended the run at once with DataLoader's error and no checkpoint)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "vq"
    args = [a if a != "num_workers=0" else "num_workers=2" for a in TINY]
    run = subprocess.Popen([sys.executable, "-m", "omnitok", "image-tokenizer", "train", "--images", str(crops),
                            "--out", str(out), *args, "steps=400", "eval_every=1000", "checkpoint_every=1000"],
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "train.jsonl").exists() or len(losses(out)) < 2:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    step = losses(out)[-1]["step"]
    assert run.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"omnitok: stopped by SIGTERM after step {step} of 400; its checkpoint is "
                                            "saved: rerun the same command with --resume to continue")
    assert complete_checkpoints(out / "checkpoints")[-1].name == f"step_{step:08d}"

def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(OmnitokError, match="unknown setting 'model.colour'"):
        load_train_config(None, ["model.colour=3"])
    with pytest.raises(OmnitokError, match="must be 'crop'"):
        load_train_config(None, ["preprocess.resize=fit"])
    with pytest.raises(OmnitokError, match="key=value"):
        load_train_config(None, ["steps"])
    with pytest.raises(OmnitokError, match="dead_code_share must be >= 0"):
        load_train_config(None, ["model.dead_code_share=-0.5"])
    with pytest.raises(OmnitokError, match="no images found"):
        train_vqgan([tmp_path], tmp_path / "out", load_train_config(None, []), device="cpu")


def test_lpips_loads_standard_weight_files(tmp_path):
    """VGG16 in torchvision's key layout and LPIPS heads in the lpips package's layout, as their files hold them."""
    torch.manual_seed(0)
    ref = LPIPS()
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # the classifier is ignored
    heads = {f"lin{i}.model.1.weight": torch.rand_like(lin.weight) for i, lin in enumerate(ref.lins)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "lpips_vgg.pth")
    lpips = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth")
    assert torch.equal(lpips.lins[2].weight, heads["lin2.model.1.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d = lpips(x, y)
    assert (d > 0).all() and torch.allclose(d, lpips(y, x), rtol=1e-5)
    assert (lpips(x, (x + 0.6 * torch.randn_like(x)).clamp(-1, 1)) > d).all()  # more noise, further away
    torch.save({"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(OmnitokError, match="not LPIPS VGG linear heads"):
        LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "bad.pth")
