"""``omnitok tokenize --engine ray`` against ``--engine local`` on the same corpus, in one run: images/s and audio
clips/s on a local Ray cluster of ``--cpus`` CPUs, the local engine with as many processes (``--cpus - 1`` workers
preparing media, this process encoding; Ray: one encoder actor per two CPUs, the rest preparing):
``python -m benchmarks.tokenize_ray [--images 64] [--clips 256] [--cpus 2] [--rounds 2]``."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import photo_pairs, quiet_stderr, tokenizer_dir


def make_corpus(root: Path, images: int, clips: int) -> tuple[Path, Path]:
    """A folder of JPEG photo crops with captions, and one of 3-6 s FLAC clips at 44.1 kHz (resampled to 24 kHz)."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    photo_pairs(root / "photos", images)
    (root / "clips").mkdir()
    for i in range(clips):
        t = np.arange(int(44_100 * (3 + i % 4))) / 44_100
        wave = 0.3 * np.sin(2 * np.pi * (110 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(root / "clips" / f"{i:04d}.flac", wave.astype(np.float32), 44_100)
        (root / "clips" / f"{i:04d}.txt").write_text(f"tone {i}")
    return root / "photos", root / "clips"


def run(args: argparse.Namespace) -> dict:
    import ray

    from omnitok.data.tokenize import TokenizeConfig, tokenize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = tokenizer_dir(root, args.arch, audio=True)
        photos, clips = make_corpus(root, args.images, args.clips)
        (root / "one").mkdir()  # one photo: the engines' fixed start-up cost
        for suffix in (".jpg", ".txt"):
            (root / "one" / f"0000{suffix}").write_bytes((photos / f"0000{suffix}").read_bytes())
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        times: dict[tuple[str, str], list[float]] = {}
        digests = {}
        n = 0
        try:
            for _ in range(args.rounds):  # alternated, so that a noisy neighbour hits both engines alike
                for corpus, folder in (("one", root / "one"), ("images", photos), ("clips", clips)):
                    for engine in ("local", "ray"):
                        out = root / f"out{n}"
                        n += 1
                        cfg = TokenizeConfig(inputs=[str(folder)], tokenizer=str(tok), out=str(out),
                                             workers=args.cpus - 1, batch_size=args.batch, engine=engine)
                        start = time.perf_counter()
                        with quiet_stderr():
                            tokenize(cfg)
                        times.setdefault((corpus, engine), []).append(time.perf_counter() - start)
                        digests.setdefault(corpus, set()).add(
                            tuple(p.read_bytes() for p in sorted(out.glob("shard-*.tar"))))
        finally:
            ray.shutdown()
    assert all(len(d) == 1 for d in digests.values()), "the engines wrote different shards"
    counts = {"images": args.images, "clips": args.clips}
    fixed = {e: statistics.median(times[("one", e)]) for e in ("local", "ray")}
    result = {"start_up_s": fixed}
    print(f"omnitok tokenize, {args.arch} VQ-GAN at 256 px and 24 kHz EnCodec (1.5 kbps), batch {args.batch}, "
          f"{args.cpus} CPUs (local: {args.cpus - 1} workers + this process; ray: a local cluster of {args.cpus} "
          f"CPUs), median of {args.rounds} rounds; shards identical")
    print(f"  start-up (a one-photo corpus): local {fixed['local']:.1f} s, ray {fixed['ray']:.1f} s")
    for corpus, unit in (("images", "img/s"), ("clips", "clips/s")):
        took = {e: statistics.median(times[(corpus, e)]) for e in ("local", "ray")}
        rates = {e: counts[corpus] / took[e] for e in took}
        after = {e: took[e] - fixed[e] for e in took}  # start-up taken out; meaningless on a corpus this small
        steady = after["local"] / after["ray"] if min(after.values()) > 0 else None
        result[corpus] = {**rates, "ratio": rates["ray"] / rates["local"], "ratio_after_start_up": steady}
        print(f"  {corpus}: local {rates['local']:.2f} {unit}, ray {rates['ray']:.2f} {unit}, ratio "
              f"{result[corpus]['ratio']:.3f} (goal >= 0.8); start-up taken out: "
              + (f"{steady:.3f}" if steady is not None else "n/a (the corpus is too small)"))
    return result


class Utilization:
    """GPU utilization (percent of time a kernel ran, NVML's number) sampled by ``nvidia-smi`` every 100 ms while
    the block runs; nothing on a machine without it."""

    def __enter__(self):
        import shutil
        import subprocess

        self.samples: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            out = self.proc.communicate()[0]
            self.samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]

    def busy(self) -> float | None:
        """Mean utilization from the first to the last sample with any (start-up and shutdown left out)."""
        active = [i for i, x in enumerate(self.samples) if x > 0]
        return statistics.mean(self.samples[active[0]:active[-1] + 1]) / 100 if active else None


def gpu_busy(arch: str, images: int, batch: int) -> dict:
    """``--engine ray`` on this machine's devices (one encoder actor per GPU, a CPU one without): img/s of a folder of
    photos, and how busy the GPUs were while encoding (the issue's goal: > 0.8)."""
    import ray

    from omnitok.data.tokenize import TokenizeConfig, tokenize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = tokenizer_dir(root, arch, audio=True)
        photos, _ = make_corpus(root, images, 0)
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            start = time.perf_counter()
            with quiet_stderr(), Utilization() as use:
                tokenize(TokenizeConfig(inputs=[str(photos)], tokenizer=str(tok), out=str(root / "out"),
                                        batch_size=batch, engine="ray"))
            seconds = time.perf_counter() - start
        finally:
            ray.shutdown()
    return {"images_per_s": images / seconds, "gpu_busy": use.busy(), "samples": len(use.samples)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenize_ray", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["janus", "tiny"], default="janus")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
