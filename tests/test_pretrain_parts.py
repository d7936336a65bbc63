import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.synthetic import write_shards
from omnitok.data.shards import ShardWriter, write_manifest
from omnitok.data.stream import PackedStream, StreamConfig
from omnitok.errors import OmnitokError
from omnitok.model.build import ModelConfig, build_model
from omnitok.model.loss import LossConfig, lm_loss
from omnitok.tokenizers.layout import IGNORE, Modality, TokenLayout

LAYOUT = TokenLayout(text_vocab_size=50, image_codebook_size=32, max_grid_side=4, audio_codebook_sizes=(16,) * 2,
                     audio_frame_rate=100.0)


def test_build_from_scratch_for_each_architecture():
    for arch in ("llama", "qwen3"):
        model = build_model(ModelConfig(arch=arch, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                        num_kv_heads=2), LAYOUT)
        logits = model(torch.randint(0, LAYOUT.vocab_size, (2, 7))).logits
        assert logits.shape == (2, 7, LAYOUT.vocab_size) == (2, 7, 128)
    assert "q_norm" in str(model)  # Qwen3: QK-norm, as Chameleon
    with pytest.raises(OmnitokError, match="arch"):
        ModelConfig(arch="gpt5")


def test_extending_a_pretrained_llm_keeps_its_rows_and_mean_initialises_the_new(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    llm.save_pretrained(tmp_path / "llm")
    model = build_model(ModelConfig(init_from=str(tmp_path / "llm")), LAYOUT)
    old_in, old_out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == LAYOUT.vocab_size
    assert torch.equal(new_in[:50], old_in) and torch.equal(new_out[:50], old_out)
    assert torch.allclose(new_in[50:], old_in.mean(0).expand(LAYOUT.vocab_size - 50, -1), atol=1e-3)
    text_only = torch.randint(0, 50, (1, 9))
    assert torch.allclose(model(text_only).logits[..., :50], llm(text_only).logits, atol=1e-5)
    with pytest.raises(OmnitokError, match="50 embedding rows but the token layout's text range has 60"):
        build_model(ModelConfig(init_from=str(tmp_path / "llm")), TokenLayout(text_vocab_size=60))


def test_loss_matches_cross_entropy_and_weights_by_modality():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, LAYOUT.vocab_size)
    labels = torch.tensor([[1, 5, LAYOUT.boi_id, *LAYOUT.image_ids(np.array([3, 4])).tolist(), LAYOUT.eoi_id, 7,
                            IGNORE, IGNORE],
                           [4, 5, 6, LAYOUT.boa_id, *LAYOUT.audio_ids(np.array([[1], [2]])).tolist(),
                            LAYOUT.eoa_id, 2, IGNORE]])
    loss, metrics = lm_loss(logits, labels, LAYOUT, LossConfig())
    reference = F.cross_entropy(logits.reshape(-1, LAYOUT.vocab_size), labels.reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert sum(int(metrics[f"{m}_tokens"]) for m in ("text", "special", "image", "audio")) == 15
    assert [int(metrics[f"{m}_tokens"]) for m in ("image", "audio", "special")] == [2, 2, 4]
    total = sum(metrics[f"{m}_loss"] for m in ("text", "special", "image", "audio"))
    assert torch.allclose(total / 15, reference, atol=1e-6)
    no_image, _ = lm_loss(logits, labels, LAYOUT, LossConfig(image=0.0))
    assert torch.allclose(no_image, (total - metrics["image_loss"]) / 15, atol=1e-6)
    with_z, _ = lm_loss(logits, labels, LAYOUT, LossConfig(z_loss=1e-4))
    lse = torch.logsumexp(logits, -1)[labels != IGNORE]
    assert torch.allclose(with_z - loss, 1e-4 * lse.pow(2).mean(), atol=1e-6)


def spans_of(seq, layout=LAYOUT):
    """Media spans inside one packed sequence, checked whole: (kind, start, stop) or an error."""
    seq = np.asarray(seq)
    out = []
    for start in np.flatnonzero(seq == layout.boi_id):
        r, c = layout.rows_of(int(seq[start + 1])), layout.cols_of(int(seq[start + 2]))
        assert seq[start + 3 + r * c] == layout.eoi_id, "image span cut or malformed"
        out.append(("image", start, start + 4 + r * c))
    return out


def test_packing_never_cuts_images_and_resumes_exactly(tmp_path):
    shards = write_shards(tmp_path / "a", LAYOUT, n_docs=120, shard_size=16)
    cfg = StreamConfig(shards=[str(shards)], seq_len=40, cond_dropout=0.0, seed=3)
    stream = PackedStream(cfg, LAYOUT, batch_size=4)
    for _ in range(30):
        ids, labels, _ = stream.next_batch()
        assert ids.shape == labels.shape == (4, 40)
        for seq, lab in zip(ids.tolist(), labels):
            spans_of(seq)  # every <|boi|> in a sequence is followed by its whole grid and <|eoi|>
            pads = np.flatnonzero(np.asarray(seq) == LAYOUT.pad_id)
            assert (lab[pads - 1][pads > 0] == IGNORE).all()  # predicting padding carries no loss
    assert 0 < stream.padding_fraction < 0.5
    # Resume: a stream restored from a saved position yields exactly the batches of the uninterrupted one.
    a = PackedStream(cfg, LAYOUT, batch_size=4)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(10)]  # crosses shard and epoch boundaries (120 docs)
    b = PackedStream(cfg, LAYOUT, batch_size=4)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch()[0]) for x in expected)


def test_long_documents_split_only_in_text_or_at_audio_frames(tmp_path):
    layout = LAYOUT
    rng = np.random.default_rng(0)
    text = list(rng.integers(3, 50, 30))
    audio = [layout.boa_id, *layout.audio_ids(rng.integers(0, 16, (2, 40))).tolist(), layout.eoa_id]
    tokens = np.array([1, *text, *audio, 2], dtype=np.int32)
    spans = [["text", 1, 31], ["audio", 31, 31 + len(audio)]]
    (tmp_path / "s").mkdir()
    writer = ShardWriter(tmp_path / "s", 10, layout)
    writer.add("long", tokens, {"spans": spans})
    shard = writer.flush()
    layout.save(tmp_path / "s")
    write_manifest(tmp_path / "s", [shard], 1)
    stream = PackedStream(StreamConfig(shards=[str(tmp_path / "s")], seq_len=25, cond_dropout=0.0), layout, 1)
    pieces = []
    while sum(len(p) for p in pieces) < len(tokens):
        seq = stream.next_batch()[0][0].tolist()
        pieces.append([t for t in seq if t != layout.pad_id])
    assert np.array_equal(np.concatenate(pieces)[: len(tokens)], tokens)  # nothing lost, nothing reordered
    offset = 0
    for piece in pieces[:-1]:
        offset += len(piece)
        if 31 < offset < 31 + len(audio):
            assert (offset - 32) % 2 == 0  # inside the audio span only at a frame boundary (n_q = 2)


def test_conditioning_dropout_and_mixture(tmp_path):
    a = write_shards(tmp_path / "a", LAYOUT, n_docs=60, shard_size=20, seed=1)
    b = write_shards(tmp_path / "b", LAYOUT, n_docs=60, shard_size=20, seed=2)
    always = PackedStream(StreamConfig(shards=[str(a)], seq_len=64, cond_dropout=1.0), LAYOUT, 8)
    seqs = torch.cat([always.next_batch()[0] for _ in range(5)])
    for seq in seqs.tolist():
        for start in np.flatnonzero(np.asarray(seq) == LAYOUT.boi_id):
            if start > 0:  # what precedes an image is never a text token: it was dropped
                assert LAYOUT.modality_of(np.array([seq[start - 1]]))[0] != Modality.TEXT or seq[start - 1] in (1, 2)
    mixed = PackedStream(StreamConfig(shards=[str(a), str(b)], weights=[0.8, 0.2], seq_len=64), LAYOUT, 8)
    for _ in range(20):
        mixed.next_batch()
    read = [s.state() for s in mixed.sources]
    first = 60 * read[0]["epoch"] + 20 * read[0]["shard"] + read[0]["sample"]  # documents drawn from each set
    second = 60 * read[1]["epoch"] + 20 * read[1]["shard"] + read[1]["sample"]
    assert first > 2.5 * second
    with pytest.raises(OmnitokError, match="cannot hold the longest image span"):
        PackedStream(StreamConfig(shards=[str(a)], seq_len=16), LAYOUT, 1)
    with pytest.raises(OmnitokError, match="differs"):
        PackedStream(StreamConfig(shards=[str(a)]), TokenLayout(text_vocab_size=60), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_whole_and_cross_entropy(dtype):
    """The cross-entropy runs over chunks of rows; any chunk size gives the same loss, gradient and per-modality
    metrics as one chunk, and as torch's own cross-entropy (in fp32)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 11, LAYOUT.vocab_size).to(dtype)
    labels = torch.randint(0, LAYOUT.used_vocab_size, (3, 11))
    labels[0, :3] = IGNORE
    results = []
    for chunk in (33, 7, 5, 1):
        x = logits.clone().requires_grad_()
        loss, metrics = lm_loss(x, labels, LAYOUT, LossConfig(chunk_rows=chunk, z_loss=1e-3, image=0.5))
        loss.backward()
        results.append((loss.detach(), x.grad, metrics))
    for loss, grad, metrics in results[1:]:
        assert torch.allclose(loss, results[0][0], atol=1e-6) and torch.equal(grad, results[0][1])
        assert {k: v.item() for k, v in metrics.items()} == {k: v.item() for k, v in results[0][2].items()}
    if dtype == torch.float32:
        x = logits.clone().requires_grad_()
        plain = F.cross_entropy(x.reshape(-1, LAYOUT.vocab_size), labels.reshape(-1), ignore_index=IGNORE)
        plain.backward()
        y = logits.clone().requires_grad_()
        ours, _ = lm_loss(y, labels, LAYOUT, LossConfig(chunk_rows=4))
        ours.backward()
        assert torch.allclose(ours, plain, atol=1e-6) and torch.allclose(y.grad, x.grad, atol=1e-7)
    else:
        assert results[0][1].dtype == torch.bfloat16  # the gradient is written in the logits' dtype


def test_a_packed_document_sees_only_itself(tmp_path):
    """Document isolation: in a packed batch, each document gets the logits and loss it gets alone (1e-5), with
    transformers' own masking from the packed position ids; without isolation it does not."""
    shards = write_shards(tmp_path / "a", LAYOUT, n_docs=40, shard_size=40)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
                        LAYOUT).eval()
    cfg = StreamConfig(shards=[str(shards)], seq_len=64, cond_dropout=0.0, seed=0)
    batch = PackedStream(cfg, LAYOUT, batch_size=2).next_batch()
    plain = PackedStream(StreamConfig(**{**cfg.__dict__, "isolate_documents": False}), LAYOUT, 2).next_batch()
    assert torch.equal(batch.ids, plain.ids) and plain.positions is None
    with torch.no_grad():
        packed = model(**batch.model_inputs(torch.device("cpu"))).logits
        mixed = model(**plain.model_inputs(torch.device("cpu"))).logits
    checked = crossed = 0
    for b in range(2):
        starts = torch.nonzero(batch.positions[b] == 0).flatten().tolist() + [64]
        for start, stop in zip(starts, starts[1:]):
            seq = batch.ids[b, start:stop]
            if seq[0] != 1 or seq[-1] == LAYOUT.pad_id:  # bos is 1 in these documents
                continue  # the continued tail of a document, or padding
            with torch.no_grad():
                alone = model(input_ids=seq[None]).logits[0]
            assert torch.allclose(packed[b, start:stop], alone, atol=1e-5)
            loss_alone, _ = lm_loss(alone[None, :-1], seq[None, 1:], LAYOUT, LossConfig())
            loss_packed, _ = lm_loss(packed[b:b + 1, start:stop - 1], batch.labels[b:b + 1, start:stop - 1], LAYOUT,
                                     LossConfig())
            assert torch.allclose(loss_packed, loss_alone, atol=1e-5)
            assert batch.labels[b, stop - 1] == IGNORE  # the next document's first token is not a target
            checked += 1
            crossed += start > 0 and not torch.allclose(mixed[b, start:stop], alone, atol=1e-3)
    assert checked >= 3 and crossed >= 1  # documents after others were checked, and isolation changed them
