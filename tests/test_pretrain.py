import json

import pytest
import torch
from conftest import killed_after_first_checkpoint_then_resumed, one_and_two_processes
from test_pretrain_parts import LAYOUT

from benchmarks.synthetic import write_shards
from omnitok.cli import main
from omnitok.errors import OmnitokError
from omnitok.train import harness
from omnitok.train import pretrain as pretrain_module
from omnitok.train.checkpoint import complete_checkpoints
from omnitok.train.pretrain import load_pretrain_config, pretrain

TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "data.seq_len=48", "micro_batch_size=4", "optim.lr=0.003", "optim.warmup_steps=5",
        "log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    LAYOUT.save(root / "tok")  # the trainer needs the layout; export copies the whole directory
    write_shards(root / "train", LAYOUT, n_docs=200, shard_size=25, seed=1)
    write_shards(root / "heldout", LAYOUT, n_docs=40, shard_size=20, seed=2)
    return root


def run_args(data, out, *extra):
    return [f"tokenizer={data / 'tok'}", f"out={out}", f"data.shards=[{data / 'train'}]", *TINY, *extra]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_falls_per_modality_and_the_export_loads_with_vanilla_transformers(tmp_path, data, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["pretrain", *run_args(data, out, "steps=40", "checkpoint_every=20",
                                       f"eval.shards=[{data / 'heldout'}]", "eval_every=20", "eval.batches=2")]) == 0
    assert "pretraining done" in capsys.readouterr().out
    train = records(out / "train.jsonl")
    assert [r["step"] for r in train] == list(range(1, 41))
    first, last = (sum(r["loss"] for r in rs) / 5 for rs in (train[:5], train[-5:]))
    assert last < first - 1.0
    assert {"text_loss", "image_loss", "audio_loss", "special_loss", "tokens_per_s", "data_wait", "padding"} <= set(
        train[-1])
    assert train[-1]["special_acc"] > 0.3  # the grammar's markers are the first thing a model learns
    evals = records(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 20, 40] and evals[2]["loss"] < evals[1]["loss"] + 0.2 < evals[0]["loss"]
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_00000020", "step_00000040"]
    assert list((out / "tb").iterdir())
    # The export is a plain Hugging Face directory with the tokenizer beside; logits equal the training model's.
    hf = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "tokenizer" / "layout.json").is_file()
    again = tmp_path / "again"
    assert main(["export", str(out), "--out", str(again)]) == 0
    hf2 = AutoModelForCausalLM.from_pretrained(again).eval()
    ids = torch.randint(0, LAYOUT.used_vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, hf2(ids).logits, atol=1e-5)
        assert hf(ids).logits.shape == (2, 20, LAYOUT.vocab_size)


def test_resume_sees_the_same_batches_and_losses(tmp_path, data, monkeypatch):
    full = load_pretrain_config(None, run_args(data, tmp_path / "a", "steps=8", "checkpoint_every=4"))
    pretrain(full)
    killed = load_pretrain_config(None, run_args(data, tmp_path / "b", "steps=8", "checkpoint_every=4"))
    killed_after_first_checkpoint_then_resumed(monkeypatch, pretrain_module.PretrainTask, pretrain, killed)
    a = [(r["step"], r["loss"], r["text_loss"]) for r in records(tmp_path / "a" / "train.jsonl")]
    b = [(r["step"], r["loss"], r["text_loss"]) for r in records(tmp_path / "b" / "train.jsonl")]
    assert len(a) == len(b) == 8
    assert a == b  # bit for bit, before and after the resume point
    with pytest.raises(OmnitokError, match="already holds a training run"):
        pretrain(full)


def test_a_kill_while_saving_leaves_the_previous_checkpoint_resumable(tmp_path, data, monkeypatch):
    cfg = load_pretrain_config(None, run_args(data, tmp_path / "k", "steps=6", "checkpoint_every=3"))
    real = harness.write_json_atomic

    def dies_at_step_6(path, payload):
        if "step" in payload and payload["step"] == 6:
            raise KeyboardInterrupt  # the process is killed in the middle of writing the step-6 checkpoint
        return real(path, payload)

    monkeypatch.setattr(harness, "write_json_atomic", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(harness, "write_json_atomic", real)
    assert [p.name for p in complete_checkpoints(tmp_path / "k" / "checkpoints")] == ["step_00000003"]
    assert (tmp_path / "k" / "checkpoints" / ".tmp-step_00000006").is_dir()  # the half-written one
    pretrain(cfg, resume=True)
    assert [p.name for p in complete_checkpoints(tmp_path / "k" / "checkpoints")] == ["step_00000003",
                                                                                       "step_00000006"]
    assert [r["step"] for r in records(tmp_path / "k" / "train.jsonl")] == [1, 2, 3, 4, 5, 6]  # 4..6 once


def test_ranks_read_disjoint_samples(data):
    from omnitok.data.stream import PackedStream, StreamConfig

    cfg = StreamConfig(shards=[str(data / "train")], seq_len=48, lanes=2)
    ranks = [PackedStream(cfg, LAYOUT, 4, rank=r, world=2) for r in range(2)]
    orders = [set(s._order()) for r in ranks for s in r.sources]
    assert orders[0] and orders[1] and not orders[0] & orders[1]  # disjoint shards
    single = PackedStream(cfg, LAYOUT, 8)  # one rank reading both lanes: the same global batch
    ids = single.next_batch()[0]
    assert torch.equal(ids[:4], ranks[0].next_batch()[0]) and torch.equal(ids[4:], ranks[1].next_batch()[0])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_two_process_deepspeed_matches_one_process(tmp_path, data, zero):
    """2 ranks over gloo with micro batch 4 = 1 rank with micro batch 8: the same global batches, the same losses."""
    common = [a for a in run_args(data, tmp_path / "x", "steps=5", "checkpoint_every=100", "data.lanes=2",
                                  f"zero_stage={zero}") if not a.startswith(("out=", "micro_batch_size="))]
    one_and_two_processes("pretrain", common, tmp_path, micro_batch=8)
    a = [r["loss"] for r in records(tmp_path / "one" / "train.jsonl")]
    b = [r["loss"] for r in records(tmp_path / "two" / "train.jsonl")]
    assert len(a) == len(b) == 5
    assert a == pytest.approx(b, rel=1e-4)
    assert a[-1] < a[0]
    # the logged padding is every rank's sequences, not rank 0's alone
    padding = [[r["padding"] for r in records(tmp_path / d / "train.jsonl")] for d in ("one", "two")]
    assert padding[0] == pytest.approx(padding[1], abs=1e-12) and padding[0][-1] > 0


def test_loss_falls_on_shards_made_by_the_real_tokenizers(tmp_path, tokdir, corpus):
    """image-text and audio-text documents through `omnitok tokenize` (VQ-GAN, EnCodec, SentencePiece), then
    `omnitok pretrain` on the shards."""
    from omnitok.data.tokenize import TokenizeConfig, tokenize

    inputs = [str(corpus / "docs.jsonl"), str(corpus / "pairs"), str(corpus / "wds-000.tar")]
    tokenize(TokenizeConfig(inputs=inputs, tokenizer=str(tokdir), out=str(tmp_path / "shards"), workers=0,
                            shard_size=6))
    out = tmp_path / "run"
    args = [f"tokenizer={tokdir}", f"out={out}", f"data.shards=[{tmp_path / 'shards'}]", *TINY, "data.seq_len=128",
            "steps=30", "checkpoint_every=100"]
    assert main(["pretrain", *args]) == 0
    train = records(out / "train.jsonl")
    assert all(r["image_tokens"] > 0 for r in train[-5:]) and sum(r.get("audio_tokens", 0) for r in train) > 0
    first, last = (sum(r["loss"] for r in rs) / 5 for rs in (train[:5], train[-5:]))
    assert last < first - 1.0


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("zero", [0, 1])
def test_non_finite_losses_and_gradients_are_skipped_and_counted(tmp_path, data, monkeypatch, zero):
    """Two micro-batches a step: a step with a non-finite loss (in its first micro-batch) or gradient (its second)
    is skipped whole, and every step still hands DeepSpeed both micro-batches, so the accumulation boundaries of the
    steps after it stay where they were."""
    import deepspeed

    real = pretrain_module.lm_loss
    calls = {"n": 0}

    def flaky(logits, labels, layout, cfg, normalizer=None):
        calls["n"] += 1
        loss, metrics = real(logits, labels, layout, cfg, normalizer=normalizer)
        if calls["n"] == 5:  # step 3, first micro-batch
            return loss * float("nan"), metrics
        if calls["n"] == 10:  # step 5, second micro-batch
            return _NaNGradient.apply(loss), metrics
        return loss, metrics

    engines, real_init = [], deepspeed.initialize

    def initialize(*args, **kwargs):
        engine, *rest = real_init(*args, **kwargs)
        engines.append(engine)
        backward = engine.backward
        engine.micro_seen = []
        engine.backward = lambda loss: (engine.micro_seen.append(engine.micro_steps), backward(loss))[1]
        return (engine, *rest)

    monkeypatch.setattr(pretrain_module, "lm_loss", flaky)
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    out = tmp_path / "run"
    pretrain(load_pretrain_config(None, run_args(data, out, "steps=8", "grad_accum=2", "checkpoint_every=100",
                                                 f"zero_stage={zero}")))
    train = records(out / "train.jsonl")
    assert train[-1]["skipped_steps"] == 2 and train[1]["skipped_steps"] == 0 and train[4]["skipped_steps"] == 2
    assert engines[0].micro_seen == list(range(16)) and engines[0].micro_steps == 16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "export")
    assert all(torch.isfinite(p).all() for p in model.parameters())  # nothing non-finite reached the weights

    calls["n"] = -100  # from now on every loss is non-finite
    monkeypatch.setattr(pretrain_module, "lm_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    with pytest.raises(OmnitokError, match="3 steps in a row had a non-finite loss or gradient"):
        pretrain(load_pretrain_config(None, run_args(data, tmp_path / "bad", "steps=8", "max_nonfinite=3")))


def test_continuing_a_pretrained_llm_exports_its_architecture(tmp_path, data):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=LAYOUT.text_vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "llm")
    out = tmp_path / "run"
    pretrain(load_pretrain_config(None, run_args(data, out, "steps=3", "checkpoint_every=3",
                                                 f"model.init_from={tmp_path / 'llm'}")))
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    a = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert a.config.hidden_size == 32 and a.config.vocab_size == LAYOUT.vocab_size
    ids = torch.randint(0, LAYOUT.used_vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)


def test_memory_and_speed_settings_train_the_same_model(tmp_path, data, capsys):
    """Activation checkpointing and another attention kernel compute the same steps; a resumed run may switch them;
    an unknown kernel is one line."""
    def losses(name, *extra):
        pretrain(load_pretrain_config(None, run_args(data, tmp_path / name, "steps=4", "checkpoint_every=2", *extra)))
        return [r["loss"] for r in records(tmp_path / name / "train.jsonl")]

    plain = losses("plain")
    assert losses("checkpointed", "activation_checkpointing=true") == pytest.approx(plain, abs=1e-5)
    assert losses("eager", "attention=eager") == pytest.approx(plain, abs=1e-4)
    pretrain(load_pretrain_config(None, run_args(data, tmp_path / "eager", "steps=6", "checkpoint_every=2",
                                                 "activation_checkpointing=true")), resume=True)
    assert [r["step"] for r in records(tmp_path / "eager" / "train.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert main(["pretrain", *run_args(data, tmp_path / "bad", "steps=2", "attention=fast")]) == 2
    assert "attention must be one of sdpa, eager" in capsys.readouterr().err


def test_a_compiled_model_trains_the_same_steps(tmp_path, data):
    """``compile`` (here the aot_eager backend: dynamo's graph capture and AOT autograd without code generation, which
    the CPU test machine cannot afford to wait for) trains the steps the eager model trains."""
    from torch._dynamo.utils import counters

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["compile=aot_eager"])):
        counters.clear()
        pretrain(load_pretrain_config(None, run_args(data, tmp_path / name, "steps=3", "checkpoint_every=3", *extra)))
        runs[name] = [r["loss"] for r in records(tmp_path / name / "train.jsonl")]
        assert (counters["stats"]["unique_graphs"] > 0) == (name == "compiled")  # dynamo captured the model
    assert runs["compiled"] == pytest.approx(runs["eager"], abs=1e-4)


def test_an_export_continues_on_its_layout_with_chat_markers(tmp_path, data, capsys):
    """Instruction tuning starts from a pretrained export on the same layout plus the chat markers: every learned row
    is kept bit for bit (new rows for the markers), training continues from the trained weights, and a layout whose
    ids mean something else is refused in one line."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from omnitok.model.build import ModelConfig, build_model

    base = tmp_path / "base"
    pretrain(load_pretrain_config(None, run_args(data, base, "steps=30", "checkpoint_every=30")))
    chat = dataclasses.replace(LAYOUT, chat=True)
    chat.save(tmp_path / "chat" / "layout.json")
    model = build_model(ModelConfig(init_from=str(base / "export")), chat)
    trained = AutoModelForCausalLM.from_pretrained(base / "export").get_input_embeddings().weight
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == chat.vocab_size > trained.shape[0]
    assert torch.equal(rows[: trained.shape[0]], trained)  # every learned row as it was
    args = [a for a in run_args(data, tmp_path / "sft", "steps=2", "checkpoint_every=2")
            if not a.startswith("tokenizer=")]
    pretrain(load_pretrain_config(None, [f"tokenizer={tmp_path / 'chat'}", *args,
                                         f"model.init_from={base / 'export'}"]))
    # it starts from the trained weights: well below an untrained model (which starts near ln(vocab)), though above
    # where the base run ended, since the 64 new rows are mean-initialised and take some probability at first
    assert records(tmp_path / "sft" / "train.jsonl")[0]["loss"] < records(base / "train.jsonl")[0]["loss"] - 0.3
    other = dataclasses.replace(LAYOUT, image_codebook_size=16)
    other.save(tmp_path / "other" / "layout.json")
    kept = [a for a in args if not a.startswith("out=")]
    assert main(["pretrain", f"tokenizer={tmp_path / 'other'}", f"out={tmp_path / 'x'}", *kept,
                 f"model.init_from={base / 'export'}"]) == 2
    assert "image_codebook_size is 32 there and 16 here" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, data):
    """Real preemption through torchrun's two ranks over gloo: SIGTERM to rank 1 alone, then SIGTERM to torchrun
    itself (which forwards it to both ranks, as a scheduler's does); each time every rank stops after the same step,
    that step's checkpoint is saved, and ``--resume`` goes on from it: every step is recorded once."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "run"
    args = [a for a in run_args(data, out, "checkpoint_every=1000", "data.lanes=2") if not a.startswith("micro")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}

    def launch(steps, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(port), "-m", "omnitok", "pretrain", *args, "micro_batch_size=2",
                                 f"steps={steps}", *extra], env=env, stderr=subprocess.PIPE, text=True)

    def stop(process, victim) -> tuple[int, str]:
        """Signal ``victim`` once the run has logged a step past its last checkpoint; the step it stopped after."""
        seen = len(records(out / "train.jsonl")) if (out / "train.jsonl").exists() else 0
        deadline = time.monotonic() + 180
        while not (out / "train.jsonl").exists() or len(records(out / "train.jsonl")) < seen + 2:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(victim(process), signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        last = records(out / "train.jsonl")[-1]["step"]
        assert last < 400 and complete_checkpoints(out / "checkpoints")[-1].name == f"step_{last:08d}"
        return last, err

    first = launch(400)
    def rank1(process):
        return next(c.pid for c in psutil.Process(process.pid).children() if c.environ()["RANK"] == "1")

    step, err = stop(first, rank1)
    assert f"omnitok: stopped by a stop signal to another rank after step {step} of 400" in err
    assert f"omnitok: stopped by SIGTERM after step {step} of 400" in err
    second = launch(400, "--resume")
    step2, err = stop(second, lambda p: p.pid)  # torchrun: it forwards SIGTERM to both ranks
    assert step2 > step and f"omnitok: stopped by SIGTERM after step {step2} of 400" in err
    third = launch(step2 + 2, "--resume")
    assert third.wait(timeout=180) == 0
    assert [r["step"] for r in records(out / "train.jsonl")] == list(range(1, step2 + 3))
