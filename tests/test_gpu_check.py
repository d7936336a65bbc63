"""The GPU check's reduced mode runs every part of the full check on the CPU, so the script does not rot between the
sessions that have a GPU (its numbers here mean nothing)."""

import json
import math

import pytest
import torch


def numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    return [float(tree)] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


@pytest.mark.slow
def test_the_reduced_check_writes_every_part_of_the_report(tmp_path, capsys):
    from benchmarks.gpu_check import main

    out = tmp_path / "report.json"
    report = main(["--reduced", "--out", str(out), "--device", "cpu"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for part in ("sampler", "image_spans", "pretrain", "vqgan", "audio", "tokenize_ray"):
        values = numbers(report[part])
        assert values and all(math.isfinite(v) and v >= 0 for v in values), part
    for guidance in ("guidance_1", "guidance_3"):
        for batch in ("batch1", "batch8"):
            row = report["image_spans"][guidance][batch]
            assert row["sjd"]["passes"] < row["plain"]["passes"]  # drafts stood on the random model
    assert report["pretrain"]["ours"] > 0 and report["pretrain"]["mfu"] is None  # no peak FLOP/s for a CPU
    assert "compiled_batch1" not in report["sampler"]  # the reduced check does not compile
    assert sorted(report["audio"]) == ["dac", "encodec", "mimi", "wavtokenizer", "xcodec", "xcodec2"]
    assert report["tokenize_ray"]["images_per_s"] > 0 and report["tokenize_ray"]["gpu_busy"] is None  # no nvidia-smi


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the full check")
def test_the_full_check_needs_a_gpu(capsys):
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit) as stop:
        main(["--out", "/dev/null"])
    assert stop.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err
