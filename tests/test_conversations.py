"""Conversations for instruction tuning: the two JSON forms people have, the checks, the chat markers in the token
layout, and which tokens carry loss (asserted token by token)."""

import json

import numpy as np
import pytest
import torch
from fakes import FakeAudioTokenizer, FakeImageTokenizer
from test_multimodal import exact_audio, exact_image

from omnitok.document import Conversation, Image, Text, Turn
from omnitok.errors import OmnitokError
from omnitok.tokenizers.layout import Modality, TokenLayout
from omnitok.tokenizers.multimodal import MultimodalTokenizer


@pytest.fixture
def tok(sp_tok):
    return MultimodalTokenizer.build(sp_tok, FakeImageTokenizer(), FakeAudioTokenizer(), chat=True)


@pytest.fixture
def media(tok):
    """File names a conversation refers to, the media the fakes encode exactly, and their codes."""
    cat_codes, cat = exact_image(tok, 3, 4, seed=1)
    meow_codes, meow = exact_audio(tok, 5, seed=2)
    return {"cat.png": (cat, cat_codes), "meow.wav": (meow, meow_codes)}


def resolve(conv, media, base=""):
    """The parsed conversation with each file name replaced by the media it stands for."""
    def real(seg):
        if isinstance(seg, Text):
            return seg
        return type(seg)(media[seg.source.removeprefix(base)][0])
    return Conversation([Turn(t.role, [real(s) for s in t.segments]) for t in conv.turns], conv.id)


def expected(tok, conv, media, loss_on="assistant"):
    """The ids and loss mask built by hand from the parts: bos, (<|role|> content <|eot|>)..., eos."""
    L = tok.layout
    ids, loss = [tok.text.bos_id], [False]
    for turn in conv.turns:
        trained = loss_on == "all" or turn.role == "assistant"
        ids.append(L.role_id(turn.role))
        loss.append(loss_on == "all")
        for seg in turn.segments:
            if isinstance(seg, Text):
                piece = tok.text.encode([seg.text])[0]
            elif isinstance(seg, Image):
                codes = media[seg.source][1]
                piece = [L.boi_id, L.rows_id(codes.shape[0]), L.cols_id(codes.shape[1]),
                         *L.image_ids(codes.reshape(-1)).tolist(), L.eoi_id]
            else:
                piece = [L.boa_id, *L.audio_ids(media[seg.source][1]).tolist(), L.eoa_id]
            ids += list(piece)
            loss += [trained] * len(piece)
        ids.append(L.eot_id)
        loss.append(trained)
    return ids + [tok.text.eos_id], loss + [loss_on == "all"]


MESSAGES = {"id": 7, "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "image": "cat.png"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Let me hear it."},
    {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "audio", "path": "meow.wav"}]},
]}
SHAREGPT = {"id": "s1", "image": "cat.png", "audio": ["meow.wav"], "conversations": [
    {"from": "human", "value": "<image>\nWhat is this?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "And the sound?"},
    {"from": "gpt", "value": "It says <audio> meow."},
]}


def test_messages_form_and_its_loss_mask_token_by_token(tok, media, tmp_path):
    conv = Conversation.from_messages(MESSAGES["messages"], base_dir=tmp_path, conv_id=MESSAGES["id"])
    assert conv.id == "7" and [t.role for t in conv.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.turns[1].segments[1].source == str(tmp_path / "cat.png")  # relative to the file's directory
    conv = resolve(conv, media, f"{tmp_path}/")
    named = Conversation.from_messages(MESSAGES["messages"])  # media named by bare file names
    for loss_on in ("assistant", "all"):
        enc = tok.encode_conversations([conv], loss_on=loss_on)[0]
        ids, loss = expected(tok, named, media, loss_on)
        assert enc.ids.tolist() == ids and enc.loss.tolist() == loss, loss_on
    enc = tok.encode_conversations([conv])[0]
    trained = enc.ids[enc.loss]
    L = tok.layout
    assert L.eot_id in trained and L.role_id("assistant") not in trained and L.boa_id in trained
    assert L.boi_id not in trained  # the user's picture carries no loss; the assistant's sound does
    assert [s.modality for s in enc.spans] == ["text", "text", "image", "text", "text", "text", "audio"]
    for s in enc.spans:  # spans cover exactly the content pieces, markers outside them
        assert enc.ids[s.start] not in (L.role_id("user"), L.role_id("assistant"), L.eot_id)


def test_sharegpt_form_with_placeholders_and_its_loss_mask(tok, media):
    conv = Conversation.from_sharegpt(SHAREGPT)
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert [type(s).__name__ for s in conv.turns[0].segments] == ["Image", "Text"]
    assert [type(s).__name__ for s in conv.turns[3].segments] == ["Text", "Audio", "Text"]
    enc = tok.encode_conversations([resolve(conv, media)])[0]
    ids, loss = expected(tok, conv, media)
    assert enc.ids.tolist() == ids and enc.loss.tolist() == loss
    # LLaVA's convention: media without a placeholder go before the first user text
    bare = Conversation.from_sharegpt({"image": "cat.png", "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}]})
    assert [type(s).__name__ for s in bare.turns[0].segments] == ["Image", "Text"]


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]}, "turn 0 is 'assistant'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
     "turn 1 \\(assistant\\) is empty"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]},
     "more <image> placeholders than image files"),
    ({"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> hi"},
                                                     {"from": "gpt", "value": "x"}]}, "more image files than"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown speaker 'robot'"),
])
def test_bad_conversations_are_refused_with_the_reason(record, message):
    with pytest.raises(OmnitokError, match=message):
        Conversation.from_sharegpt(record)


def test_bad_messages_are_refused_with_the_reason():
    with pytest.raises(OmnitokError, match="turn 2 is 'user' where 'assistant' belongs"):
        Conversation.from_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                    {"role": "user", "content": "b"}])
    with pytest.raises(OmnitokError, match="unknown role 'robot'"):
        Conversation.from_messages([{"role": "robot", "content": "a"}])
    with pytest.raises(OmnitokError, match="a content part must be text, image or audio"):
        Conversation.from_messages([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])


def test_chat_markers_live_in_the_layout_and_a_layout_without_them_refuses_chat(sp_tok, tok, tmp_path):
    L = tok.layout
    roles = [L.role_id(r) for r in ("system", "user", "assistant")] + [L.eot_id]
    assert roles == list(range(*L.ranges["chat"])) and roles[0] == L.ranges["audio"][1]  # right after the codes
    assert (L.modality_of(np.array(roles)) == int(Modality.SPECIAL)).all()
    again = TokenLayout.from_json(json.loads(json.dumps(L.to_json())))
    assert again == L and again.chat
    plain = MultimodalTokenizer.build(sp_tok, FakeImageTokenizer(), FakeAudioTokenizer())
    assert "chat" not in plain.layout.to_json()  # layouts without markers are written as before
    markers = ("<|system|>", "<|user|>", "<|assistant|>", "<|eot|>")
    assert plain.layout.specials == {k: v for k, v in L.specials.items() if k not in markers}
    for name in ("text", "special", "image", "audio"):  # a base model's every id means the same with chat markers
        assert plain.layout.ranges[name] == L.ranges[name]
    conv = Conversation([Turn("user", [Text("hi")]), Turn("assistant", [Text("hello")])])
    with pytest.raises(OmnitokError, match="no chat markers.*--chat"):
        plain.encode_conversations([conv])
    with pytest.raises(OmnitokError, match="loss_on must be one of assistant, all"):
        tok.encode_conversations([conv], loss_on="user")
    np.testing.assert_array_equal(tok.encode_conversations([conv, conv])[1].ids,
                                  tok.encode_conversations([conv])[0].ids)  # batching changes nothing


def test_tokenize_records_the_trained_ids_and_the_stream_trains_only_those(chat_tokdir, tmp_path):
    import shutil

    from conftest import ASSETS, PHOTOS
    from PIL import Image as PILImage

    from omnitok.data.shards import iter_samples
    from omnitok.data.stream import PackedStream, StreamConfig
    from omnitok.data.tokenize import TokenizeConfig, tokenize
    from omnitok.tokenizers.layout import IGNORE

    PILImage.fromarray(PHOTOS[0]).save(tmp_path / "cat.png")
    shutil.copy(next(ASSETS.glob("*.wav")), tmp_path / "meow.wav")
    missing = {"messages": [{"role": "user", "content": [{"type": "image", "image": "nowhere.png"}]},
                            {"role": "assistant", "content": "a cat"}]}
    lines = [MESSAGES, SHAREGPT, {"messages": [{"role": "user", "content": "hi"}]}, missing]  # 2 good, 2 bad
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    manifest = tokenize(TokenizeConfig(inputs=[str(tmp_path / "chats.jsonl")], tokenizer=str(chat_tokdir),
                                       out=str(tmp_path / "shards"), workers=0))
    assert manifest["samples"] == 2 and manifest["error_count"] == 2
    errors = [json.loads(x) for x in (tmp_path / "shards" / "errors.jsonl").read_text().splitlines()]
    assert "no assistant turn" in errors[0]["error"] and "nowhere.png" in errors[1]["error"]
    layout = TokenLayout.load(chat_tokdir / "layout.json")
    assistant, eot = layout.role_id("assistant"), layout.eot_id
    trained_total, length = 0, 0
    for _, tokens, meta in iter_samples(tmp_path / "shards"):
        length += len(tokens)
        ranges = meta["trained"]
        assert len(ranges) == 2  # the two assistant turns, each from its first id through its <|eot|>
        for start, stop in ranges:
            assert tokens[start - 1] == assistant and tokens[stop - 1] == eot
            assert eot not in tokens[start:stop - 1] and layout.role_id("user") not in tokens[start:stop]
            trained_total += stop - start
    stream = PackedStream(StreamConfig(shards=[str(tmp_path / "shards")], seq_len=length, cond_dropout=0.0), layout, 1)
    batch = stream.next_batch()  # exactly the two conversations in one row, each isolated
    labelled = batch.labels != IGNORE
    assert int(labelled.sum()) == trained_total
    assert torch.equal(batch.labels[labelled], batch.ids[:, 1:][labelled[:, :-1]])


def test_guidance_dropout_empties_the_request_before_a_media_answer(tok, media, tmp_path):
    """With conditioning dropout, the user turn before an assistant turn that opens with a picture loses its content
    (markers kept): the unconditional case guidance samples from. The assistant's ids stay trained."""
    from omnitok.data.shards import ShardWriter, sample_meta, write_manifest
    from omnitok.data.stream import PackedStream, StreamConfig
    from omnitok.tokenizers.layout import IGNORE

    cat = media["cat.png"][0]
    conv = Conversation([Turn("user", [Text("Draw a cat.")]), Turn("assistant", [Image(cat), Text("Done.")])])
    enc = tok.encode_conversations([conv])[0]
    (tmp_path / "s").mkdir()
    writer = ShardWriter(tmp_path / "s", 10, tok.layout)
    writer.add("c0", enc.ids, sample_meta(enc))
    write_manifest(tmp_path / "s", [writer.flush()], 1)
    tok.layout.save(tmp_path / "s" / "layout.json")
    L = tok.layout
    request = len(tok.text.encode(["Draw a cat."])[0])
    ids = enc.ids.tolist()
    for dropout, want in ((0.0, ids), (1.0, ids[:2] + ids[2 + request:])):  # bos <|user|> | "Draw a cat." | <|eot|>
        cfg = StreamConfig(shards=[str(tmp_path / "s")], seq_len=128, cond_dropout=dropout)
        batch = PackedStream(cfg, L, 1).next_batch()  # the conversation first in the row
        n = len(want)
        assert batch.ids[0, :n].tolist() == want
        labelled = batch.ids[0, 1:n][batch.labels[0, :n - 1] != IGNORE].tolist()
        assert labelled == enc.ids[1:][enc.loss[1:]].tolist()  # the same ids trained either way


@pytest.mark.parametrize("layout", [TokenLayout(text_vocab_size=40, image_codebook_size=16, max_grid_side=3, chat=True),
                                    TokenLayout(text_vocab_size=40, audio_codebook_sizes=(8,) * 2,
                                                audio_frame_rate=100.0, chat=True)])
def test_guidance_dropout_on_a_layout_with_one_media_modality(layout, tmp_path):
    """Conversations on an image-only or audio-only layout: every request before a media answer is emptied."""
    from benchmarks.synthetic import write_shards
    from omnitok.data.stream import PackedStream, StreamConfig

    write_shards(tmp_path / "s", layout, n_docs=20, shard_size=10, chat=True, image_p=1.0, audio_p=1.0, text=(0, 1))
    stream = PackedStream(StreamConfig(shards=[str(tmp_path / "s")], seq_len=64, cond_dropout=1.0), layout, 4)
    ids = stream.next_batch().ids
    user, eot = layout.role_id("user"), layout.eot_id
    opens = np.flatnonzero(ids.flatten().numpy() == user)
    assert len(opens) > 4 and all(ids.flatten()[i + 1] == eot for i in opens if i + 1 < ids.numel())


def test_conversations_in_webdataset_tars_tokenize_as_their_jsonl_twins(chat_tokdir, tmp_path):
    """A tar sample's json member with messages (media named by member extension) or ShareGPT conversations
    (placeholders for the sample's media members) gives the same ids and loss mask as the same conversation in JSONL
    with files; a reference to a member the sample lacks is recorded and the job goes on."""
    import io
    import shutil
    import tarfile

    from conftest import ASSETS, PHOTOS
    from PIL import Image as PILImage

    from omnitok.data.shards import iter_samples
    from omnitok.data.tokenize import TokenizeConfig, tokenize

    PILImage.fromarray(PHOTOS[0]).save(tmp_path / "cat.png")
    PILImage.fromarray(PHOTOS[3]).save(tmp_path / "rocket.jpg")
    shutil.copy(next(ASSETS.glob("*.wav")), tmp_path / "meow.wav")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image",
                                                                                      "image": "{cat}"}]},
                {"role": "assistant", "content": "A cat."}]
    sharegpt = [{"from": "human", "value": "<image>\nDescribe the rocket."},
                {"from": "gpt", "value": "A rocket, and its sound: <audio>"}]
    as_files = [{"id": "a", "messages": json.loads(json.dumps(messages).replace("{cat}", "cat.png"))},
                {"id": "b", "conversations": sharegpt, "image": "rocket.jpg", "audio": "meow.wav"}]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(x) for x in as_files) + "\n")
    members = [("a.json", json.dumps({"messages": json.loads(json.dumps(messages).replace("{cat}", "png"))})),
               ("a.png", tmp_path / "cat.png"), ("b.json", json.dumps({"conversations": sharegpt})),
               ("b.jpg", tmp_path / "rocket.jpg"), ("b.wav", tmp_path / "meow.wav"),
               ("c.json", json.dumps({"messages": json.loads(json.dumps(messages).replace("{cat}", "webp"))})),
               ("c.png", tmp_path / "cat.png")]
    with tarfile.open(tmp_path / "chats.tar", "w") as tar:
        for name, body in members:
            data = body.read_bytes() if isinstance(body, type(tmp_path)) else body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = {}
    for name in ("chats.jsonl", "chats.tar"):
        manifest = tokenize(TokenizeConfig(inputs=[str(tmp_path / name)], tokenizer=str(chat_tokdir),
                                           out=str(tmp_path / f"shards-{name}"), workers=0))
        out[name] = [(tokens.tolist(), meta["trained"]) for _, tokens, meta in iter_samples(tmp_path /
                                                                                           f"shards-{name}")]
        assert manifest["samples"] == 2 and manifest["error_count"] == (name == "chats.tar")
    assert out["chats.jsonl"] == out["chats.tar"]
    error = json.loads((tmp_path / "shards-chats.tar" / "errors.jsonl").read_text().splitlines()[0])["error"]
    assert "member 'webp', which this sample does not hold (its media members: png)" in error


def test_the_stream_skips_conversations_longer_than_a_sequence_and_still_cuts_documents(tmp_path):
    from benchmarks.synthetic import write_shards
    from omnitok.data.shards import iter_samples
    from omnitok.data.stream import PackedStream, StreamConfig

    layout = TokenLayout(text_vocab_size=40, image_codebook_size=16, max_grid_side=3, chat=True)
    write_shards(tmp_path / "c", layout, n_docs=30, shard_size=10, chat=True, text=(1, 30))
    write_shards(tmp_path / "d", layout, n_docs=30, shard_size=10, text=(1, 30))
    seq = 32
    long = sum(len(t) > seq for _, t, _ in iter_samples(tmp_path / "c"))
    assert 0 < long < 30
    stream = PackedStream(StreamConfig(shards=[str(tmp_path / "c")], seq_len=seq, cond_dropout=0.0), layout, 2)
    user, assistant = layout.role_id("user"), layout.role_id("assistant")
    for _ in range(40):  # over an epoch: every long conversation met at least once
        for row in stream.next_batch().ids:
            assert (row == user).sum() == (row == assistant).sum()  # no exchange split between sequences
    problems = stream.take_problems()
    assert stream.skipped == len(problems) >= long and stream.take_problems() == []
    assert all(f"does not fit in data.seq_len {seq}; skipped" in p and "shard-" in p for p in problems)
    documents = PackedStream(StreamConfig(shards=[str(tmp_path / "d")], seq_len=seq, cond_dropout=0.0), layout, 2)
    for _ in range(40):
        documents.next_batch()
    assert documents.skipped == 0 and documents.take_problems() == []  # documents are cut, as before
