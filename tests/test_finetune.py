"""`omnitok finetune`: instruction tuning from an export on conversation shards, LoRA through PEFT or every weight,
on pretraining's harness (resume, ranks) and exported as a plain Hugging Face model or as PEFT's adapter."""

import dataclasses
import json

import pytest
import torch
from conftest import killed_after_first_checkpoint_then_resumed, one_and_two_processes

from benchmarks.synthetic import write_shards
from omnitok import distributed
from omnitok.cli import main
from omnitok.tokenizers.layout import TokenLayout
from omnitok.train import finetune as finetune_module
from omnitok.train.finetune import finetune, load_finetune_config
from omnitok.train.pretrain import load_pretrain_config, pretrain

# 123 ids used, so the 4 chat markers fit in the padding to 128: the base export has the chat layout's rows
BASE = TokenLayout(text_vocab_size=46, image_codebook_size=32, max_grid_side=4, audio_codebook_sizes=(16,) * 2,
                   audio_frame_rate=100.0)
CHAT = dataclasses.replace(BASE, chat=True)
TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "data.seq_len=64", "micro_batch_size=4", "optim.warmup_steps=2", "log_every=1"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A base model pretrained on documents, and conversation shards on the same layout with chat markers."""
    root = tmp_path_factory.mktemp("sft")
    BASE.save(root / "tok")
    CHAT.save(root / "chat_tok")
    write_shards(root / "docs", BASE, n_docs=100, shard_size=25, seed=1)
    write_shards(root / "chats", CHAT, n_docs=120, shard_size=30, seed=2, chat=True)
    pretrain(load_pretrain_config(None, [f"tokenizer={root / 'tok'}", f"out={root / 'base'}",
                                         f"data.shards=[{root / 'docs'}]", *TINY, "optim.lr=0.003", "steps=20",
                                         "checkpoint_every=20"]))
    assert CHAT.vocab_size == BASE.vocab_size
    return root


def args(sft, out, *extra):
    return [f"tokenizer={sft / 'chat_tok'}", f"out={out}", f"data.shards=[{sft / 'chats'}]",
            f"model.init_from={sft / 'base' / 'export'}", *TINY, *extra]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_trains_adapters_and_added_rows_only_and_the_merged_export_equals_the_adapter(sft, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert main(["finetune", *args(sft, out, "steps=24", "checkpoint_every=12", "optim.lr=0.01",
                                   "lora.dropout=0.0")]) == 0
    assert "fine-tuning done (lora)" in capsys.readouterr().out
    losses = [r["loss"] for r in records(out / "train.jsonl")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.15  # random answers: the grammar and the markers
    base = AutoModelForCausalLM.from_pretrained(sft / "base" / "export").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "export").eval()  # vanilla transformers
    assert type(merged) is type(base)
    b, m = base.state_dict(), merged.state_dict()
    added = list(range(BASE.used_vocab_size, CHAT.used_vocab_size))  # the chat markers
    assert added == [CHAT.role_id("system"), CHAT.role_id("user"), CHAT.role_id("assistant"), CHAT.eot_id]
    others = torch.ones(CHAT.vocab_size, dtype=torch.bool)
    others[added] = False
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(m[key][others], b[key][others])  # rows of tokens not trained: bit for bit
        assert not torch.equal(m[key][added], b[key][added])  # the markers' rows were trained
    for key in b:
        if "norm" in key:
            assert torch.equal(m[key], b[key])  # frozen
        elif "proj" in key:
            assert not torch.equal(m[key], b[key])  # the LoRA update, merged
    # The adapter alone, applied by PEFT to the base on disk, gives the merged model's logits.
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft / "base" / "export"),
                                        out / "export" / "adapter").eval()
    ids = torch.randint(0, CHAT.used_vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-5)
    assert main(["export", str(out), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "tokenizer" / "layout.json").is_file()
    assert main(["export", str(out), "--out", str(tmp_path / "merged")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, merged(ids).logits)


def test_lora_resumes_exactly(sft, tmp_path, monkeypatch):
    common = ("steps=6", "checkpoint_every=3", "optim.lr=0.01")  # with LoRA dropout: its RNG resumes too
    finetune(load_finetune_config(None, args(sft, tmp_path / "a", *common)))
    killed = load_finetune_config(None, args(sft, tmp_path / "b", *common))
    killed_after_first_checkpoint_then_resumed(monkeypatch, finetune_module.FinetuneTask, finetune, killed)
    a, b = ([(r["step"], r["loss"]) for r in records(tmp_path / d / "train.jsonl")] for d in ("a", "b"))
    assert len(a) == 6 and a == b


def test_full_fine_tuning_and_what_each_method_trains(sft, tmp_path):
    from transformers import AutoModelForCausalLM

    counts = {}
    for method, extra in (("full", []), ("lora", []), ("lora", ["lora.token_rows=all"]), ("lora", ["lora.r=2"])):
        cfg = load_finetune_config(None, args(sft, tmp_path / "x", f"method={method}", *extra))
        task = finetune_module.FinetuneTask(cfg, distributed.join())
        counts[(method, *extra)] = sum(p.numel() for p in task.engine.module.parameters() if p.requires_grad)
    total = counts[("full",)]
    assert total == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sft / "base" / "export").parameters())
    h, v, layers, inter = 64, CHAT.vocab_size, 2, 128
    # rank 16 times (in + out) for q, o (h -> h), k, v (h -> 32: 2 kv heads), gate, up (h -> inter), down
    lora_per_layer = 16 * (2 * (h + h) + 2 * (h + 32) + 2 * (h + inter) + (inter + h))
    assert counts[("lora",)] == layers * lora_per_layer + 2 * 4 * h  # + 4 marker rows in embed_tokens and lm_head
    assert counts[("lora", "lora.token_rows=all")] == layers * lora_per_layer + 2 * v * h
    assert counts[("lora", "lora.r=2")] == layers * lora_per_layer // 8 + 2 * 4 * h
    finetune(load_finetune_config(None, args(sft, tmp_path / "full", "method=full", "steps=3", "checkpoint_every=3")))
    base = AutoModelForCausalLM.from_pretrained(sft / "base" / "export").state_dict()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "export").state_dict()
    assert all(not torch.equal(full[k], base[k]) for k in base if "norm" in k)  # every weight moved
    assert not (tmp_path / "full" / "export" / "adapter").exists()


def test_wrong_usage_is_one_line(sft, tmp_path, capsys):
    common = [a for a in args(sft, tmp_path / "w", "steps=1") if not a.startswith("model.init_from")]
    for extra, message in (([], "'model.init_from' (the exported model directory to fine-tune) is required"),
                           ([f"model.init_from={sft / 'base' / 'export'}", "lora.targets=[qkv]"],
                            "lora.targets qkv name no module"),
                           ([f"model.init_from={sft / 'base' / 'export'}", "method=qlora"], "method must be lora")):
        assert main(["finetune", *common, *extra]) == 2
        err = capsys.readouterr().err  # after transformers' loading bar, where the model was loaded
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert main(["export", str(sft / "base"), "--out", str(tmp_path / "e"), "--adapter"]) == 2
    assert "is not a LoRA fine-tuning run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_lora_matches_one_process(sft, tmp_path, zero):
    """2 ranks over gloo with micro batch 2 = 1 rank with micro batch 4: the same global batches, the same losses
    and weights, with frozen base weights partitioned by ZeRO 2 and 3 (LoRA dropout off: its masks are drawn per
    rank)."""
    common = [a for a in args(sft, tmp_path / "x", "steps=4", "checkpoint_every=4", "data.lanes=2",
                              f"zero_stage={zero}", "lora.dropout=0.0", "optim.lr=0.01")
              if not a.startswith(("out=", "micro_batch_size="))]
    one_and_two_processes("finetune", common, tmp_path, micro_batch=4)
    a, b = ([r["loss"] for r in records(tmp_path / d / "train.jsonl")] for d in ("one", "two"))
    assert len(a) == len(b) == 4 and a == pytest.approx(b, rel=1e-4) and a[-1] < a[0]
    from safetensors.torch import load_file

    w0 = load_file(sft / "base" / "export" / "model.safetensors")
    w1, w2 = (load_file(tmp_path / d / "export" / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys() == w0.keys()
    # the same update: gloo sums the ranks' gradients in another order than one process does, and Adam turns a
    # gradient of float-noise size into a step of about lr whatever its size, so single elements of a LoRA factor can
    # move apart (seen: 1 run in 5 failed an element-wise atol of 1e-5); the update as a whole may not (measured
    # gaps: 2e-6 and 4.5e-5). A lost all-reduce, each rank stepping on its half of the batch, would move whole
    # tensors apart.
    gaps = {k: float((w1[k] - w2[k]).norm() / (w1[k] - w0[k]).norm().clamp(min=1e-12)) for k in w1}
    assert max(gaps.values()) < 1e-2, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    assert all(torch.equal(w1[k], w0[k]) == torch.equal(w2[k], w0[k]) for k in w1)  # the same weights moved


def test_conversations_longer_than_a_sequence_are_skipped_and_recorded(sft, tmp_path):
    """Cut, a conversation's answer would be trained without its request: it is skipped, named in errors.jsonl and
    counted in the train records; the run goes on."""
    out = tmp_path / "short"
    finetune(load_finetune_config(None, [*args(sft, out, "steps=3", "checkpoint_every=3"), "data.seq_len=40"]))
    errors = records(out / "errors.jsonl")
    train = records(out / "train.jsonl")
    assert errors and all("does not fit in data.seq_len 40; skipped" in e["error"] for e in errors)
    assert all("chats/shard-" in e["error"] and " sample " in e["error"] for e in errors)
    assert train[-1]["conversations_skipped"] == len(errors)
    assert [r["step"] for r in train] == [1, 2, 3]
