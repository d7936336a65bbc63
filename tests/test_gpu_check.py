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
    from benchmarks.gpu_check import PARTS, main

    out = tmp_path / "report.json"
    report = main(["--reduced", "--out", str(out), "--device", "cpu", "--parts", *PARTS])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["failed"] == [], {name: report[name] for name in report["failed"]}
    for part in ("sampler", "image_spans", "pretrain", "vqgan", "audio", "tokenize_ray", "exact", "kernels"):
        values = numbers(report[part])
        assert values and all(math.isfinite(v) and v >= 0 for v in values), part
    for batch in ("batch1", "batch8"):
        row = report["image_spans"][batch]
        assert row["sjd"]["passes"] < row["plain"]["passes"]  # drafts stood on the random model
        assert row["unguided"]["passes"] == row["plain"]["passes"]  # guidance runs its rows in the same passes
        assert all(0 < row[k]["sampler_share"] < 1 for k in ("unguided", "plain", "sjd"))
        assert all(row[k]["bound_fraction"] > 0 for k in ("unguided", "plain", "sjd"))
    assert report["pretrain"]["ours"] > 0 and report["pretrain"]["mfu"] is None  # no peak FLOP/s for a CPU
    assert report["vqgan"]["codes_differ_alone_vs_batch"] == 0  # float32 on the CPU: the batch changes no code
    for batch in ("compiled_batch1", "compiled_batch8"):  # compiled: the same tokens; CUDA graphs on a GPU only
        row = report["sampler"][batch]
        assert row["same_tokens"] and row["first_difference"] is None and row["graphs_captured"] == 0
    drift = report["sampler"]["compiled_drift"]  # float32 on the CPU: rounding far below the logits' spread
    assert drift["steps"] == 16 and drift["max_drift"] < 1e-4 and drift["flips"] == 0
    assert sorted(report["audio"]) == ["dac", "encodec", "mimi", "wavtokenizer", "xcodec", "xcodec2"]
    bf16 = report["audio"]["encodec"]["bf16"]  # the EnCodec batch in bf16, against float32
    assert bf16["batch"] == 4 and len(bf16["codes_differ_per_codebook"]) == report["audio"]["encodec"]["codebooks"]
    assert 0 <= bf16["codes_differ"] < 0.5 and bf16["decode_snr_db"] > 20  # rounding, not another codec
    assert report["tokenize_ray"]["images_per_s"] > 0 and report["tokenize_ray"]["gpu_busy"] is None  # no nvidia-smi
    for shape in ("rows1_cached9", "rows2_cached17"):  # no CUDA graph to split off on a CPU: the operators instead
        split = report["kernels"][shape]
        assert split["pass_ms"] > 0 and "graph_ms" not in split and split["top_kernels"][0]["us"] > 0
    exact = report["exact"]
    assert list(exact) == ["float32"]  # bfloat16 too on a GPU
    settings = ["image", "image_guided", "image_guided_sjd", "audio_sjd", "mixed_sjd"]
    assert [k for k in exact["float32"] if k in settings] == settings
    # on this CPU in float32 these seeds keep their samples in a batch (other kernels may round a draw over a boundary)
    assert all(exact["float32"][k]["alone_equals_batch"] == exact["float32"][k]["of"] == 8 for k in settings)
    assert exact["float32"]["greedy_sjd_equals_greedy"] and exact["float32"]["greedy_first_difference"] is None
    assert exact["float32"]["logit_drift"]["relative_to_std"] < 1e-4  # float32 rounding, if anything


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """A GPU session is short: one broken measurement costs its own part of the report, not the rest."""
    from benchmarks import gpu_check

    for module, name in ((gpu_check.sample, "run"), (gpu_check.sjd, "random_model"), (gpu_check.pretrain, "run"),
                         (gpu_check.audio, "bf16"), (gpu_check.tokenize_ray, "gpu_busy"), (gpu_check.exactness, "run")):
        monkeypatch.setattr(module, name, lambda *args, **kw: {"value": 1.0})
    monkeypatch.setattr(gpu_check.sample, "pass_split", lambda *a, **kw: {"rows1": {"pass_ms": 1.0, "top_kernels": []}})
    monkeypatch.setattr(gpu_check.audio, "run", lambda args: {"encodec": {"value": 1.0}})

    def broken(args):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(gpu_check.image, "run", broken)
    out = tmp_path / "report.json"
    report = gpu_check.main(["--reduced", "--out", str(out), "--device", "cpu", "--parts", *gpu_check.PARTS])
    assert report["failed"] == ["vqgan"] and report["vqgan"] == {"error": "RuntimeError: no kernel image is available"}
    assert report["tokenize_ray"] == report["exact"] == {"value": 1.0}  # the others ran
    assert report["kernels"] == {"rows1": {"pass_ms": 1.0, "top_kernels": []}}
    assert report["audio"] == {"encodec": {"value": 1.0, "bf16": {"value": 1.0}}}
    assert json.loads(out.read_text())["failed"] == ["vqgan"]
    some = gpu_check.main(["--reduced", "--out", str(out), "--device", "cpu", "--parts", "audio", "sampler"])
    assert [k for k in gpu_check.PARTS if k in some] == ["sampler", "audio"] and some["failed"] == []
    default = gpu_check.main(["--reduced", "--out", str(out), "--device", "cpu"])  # the five measurements
    assert [k for k in gpu_check.PARTS if k in default] == ["sampler", "image_spans", "pretrain", "vqgan", "audio"]

    def half_way(args, out):  # the eager numbers measured, then the compiled decoder fails
        out["batch1"] = {"ours": 62.0}
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(gpu_check.sample, "run", half_way)
    some = gpu_check.main(["--reduced", "--out", str(out), "--device", "cpu", "--parts", "sampler"])
    assert some["sampler"] == {"batch1": {"ours": 62.0}, "error": "RuntimeError: CUDA error: operation not permitted "
                                                                  "when stream is capturing"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the full check")
def test_the_full_check_needs_a_gpu(capsys):
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit) as stop:
        main(["--out", "/dev/null"])
    assert stop.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_the_profile_names_where_a_passs_time_goes():
    """The GPU check's kernel lists (its ``kernels`` part), here over CPU operators: the costliest first, with its
    calls per call."""
    from benchmarks.common import top_kernels

    a = torch.randn(384, 384)
    rows = top_kernels(lambda: torch.mm(a, a).relu_(), torch.device("cpu"), steps=4)
    assert rows[0]["name"] == "aten::mm" and rows[0]["calls"] == 1 and rows[0]["us"] > 0
    assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True)
