"""Chat with an instruction-tuned model: the grammar that ends the assistant's turn at <|eot|>, guidance's
unconditional row, `omnitok sample --chat`, and `omnitok chat`'s session (history, /reset, /save, bad lines)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import ASSETS, PHOTOS
from PIL import Image as PILImage

from omnitok.cli import main
from omnitok.document import Conversation, Image, Text, Turn
from omnitok.model.chat import ChatSession, chat_loop
from omnitok.model.sample import load_model, parse_chat_prompt, prompt_tokens
from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate, unconditional
from omnitok.tokenizers.layout import Modality

SAMPLING = SamplingConfig(max_new_tokens=120, max_audio_s=0.06, image=ModalitySampling(top_k=50, guidance=2.0),
                          audio=ModalitySampling(guidance=1.5))


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return load_model(chat_model_dir)


def test_an_answer_ends_at_its_eot_and_never_writes_document_or_role_markers(chat):
    model, tok = chat
    L = tok.layout
    prompts = [parse_chat_prompt(t) for t in ("Draw a red circle.", "Play a rising chirp.", "Hello")] * 20
    ids, end, forbidden, requests = prompt_tokens(tok, prompts, chat=True)
    assert end == L.eot_id and ids[0][-1] == L.role_id("assistant") and ids[0][1] == L.role_id("user")
    answers = generate(model, L, ids, end, SAMPLING, seeds=list(range(len(ids))), forbidden=forbidden,
                       nonempty=True, requests=requests)
    ended = 0
    for new in answers:
        body = new[:-1] if new[-1] == L.eot_id else new
        assert body  # an answer is never empty
        ended += new[-1] == L.eot_id
        assert L.eot_id not in body
        assert not {tok.text.bos_id, tok.text.eos_id, *(L.role_id(r) for r in ("system", "user", "assistant"))} & set(
            body)
        parts = tok.parse(np.asarray(body, dtype=np.int64))  # every span well formed
        assert sum(p.span.stop - p.span.start for p in parts) == len(body)
    assert ended > 40  # most answers close their turn within the budget
    media = {p.modality for new in answers for p in tok.parse(np.asarray(new[:-1], dtype=np.int64))}
    assert {"image", "audio"} <= media
    # the first token of an answer may open a span (this model favours the openers and <|eot|>, which may not come
    # first): greedy answers start with a picture or a sound
    greedy = generate(model, L, ids[:3], end, dataclasses.replace(SAMPLING, greedy=True), forbidden=forbidden,
                      nonempty=True)
    assert all(new[0] in (L.boi_id, L.boa_id) for new in greedy)


def test_guidance_drops_the_last_user_turn_as_training_dropout_does(chat, tmp_path):
    """The sampler's unconditional row of a chat equals what conditioning dropout trains for the same conversation:
    the content of the user turn before an answer that opens with media, markers kept; earlier turns stay."""
    from omnitok.data.shards import ShardWriter, sample_meta, write_manifest
    from omnitok.data.stream import PackedStream, StreamConfig

    _, tok = chat
    L = tok.layout
    photo = tmp_path / "p.png"
    PILImage.fromarray(PHOTOS[1]).resize((32, 32)).save(photo)
    conv = Conversation([Turn("user", [Text("Hello there.")]), Turn("assistant", [Text("Hi.")]),
                         Turn("user", [Text("Draw a red circle.")]), Turn("assistant", [Image(str(photo))])])
    enc = tok.encode_conversations([conv])[0]
    ids = enc.ids.tolist()
    boi = ids.index(L.boi_id)
    (tmp_path / "s").mkdir()
    writer = ShardWriter(tmp_path / "s", 10, L)
    writer.add("c0", enc.ids, sample_meta(enc))
    write_manifest(tmp_path / "s", [writer.flush()], 1)
    L.save(tmp_path / "s" / "layout.json")
    dropped = PackedStream(StreamConfig(shards=[str(tmp_path / "s")], seq_len=256, cond_dropout=1.0), L, 1)
    trained_on = dropped.next_batch().ids[0].tolist()
    asked = tok.encode_conversations([Conversation(conv.turns[:-1])], prompt=True)[0]
    assert asked.ids.tolist() == ids[:boi]
    uncond = unconditional(ids[:boi], L, asked.requests[-1])
    assert trained_on[: len(uncond) + 1] == uncond + [L.boi_id]
    first_user = ids.index(L.role_id("user"))
    request = len(tok.text.encode(["Draw a red circle."])[0])
    assert uncond == ids[: boi - 2 - request] + ids[boi - 2:boi]  # <|user|> | request | <|eot|> <|assistant|>
    assert uncond[first_user:first_user + 3] == ids[first_user:first_user + 3]  # the first exchange stays
    # a document (no chat markers) keeps the old rule: the text right before the span dropped
    doc = [tok.text.bos_id, *tok.text.encode(["a red circle"])[0]]
    assert unconditional(doc, L) == doc[:1]
    # every marker kept: <|user|> <|eot|> <|assistant|> <|eot|> <|user|> <|eot|> <|assistant|>
    assert (L.modality_of(np.array(uncond)) == Modality.SPECIAL).sum() == 7


def test_sample_chat_writes_answers_for_text_and_json_requests(chat_model_dir, tmp_path, capsys):
    PILImage.fromarray(PHOTOS[0]).save(tmp_path / "cat.png")
    requests = tmp_path / "chats.jsonl"
    requests.write_text("\n".join([
        json.dumps({"messages": [{"role": "system", "content": "You draw."},
                                 {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                              {"type": "image", "image": "cat.png"}]}]}),
        "Play a rising chirp."]) + "\n")
    out = tmp_path / "out"
    assert main(["sample", "--chat", "--model", str(chat_model_dir), "--prompts", str(requests), "--prompt",
                 "Draw a red circle.", "--out", str(out), "--max-new-tokens", "100", "--num-samples", "2",
                 "image.guidance=2"]) == 0
    assert "6 samples" in capsys.readouterr().out
    records = json.loads((out / "samples.json").read_text())["samples"]
    assert [r["prompt"] for r in records[::2]] == ["Draw a red circle.", "What is this?<image>",
                                                   "Play a rising chirp."]
    assert {r["stopped"] for r in records} <= {"eot", "span", "max_new_tokens"} and "eot" in {
        r["stopped"] for r in records}
    # an answer cannot be asked of a conversation that ends with the assistant, nor of a model without markers
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                              "content": "b"}]}) + "\n")
    assert main(["sample", "--chat", "--model", str(chat_model_dir), "--prompts", str(bad), "--out",
                 str(tmp_path / "o")]) == 2
    assert "must end with a user turn" in capsys.readouterr().err


def test_chat_session_keeps_history_and_its_commands_work(chat, chat_model_dir, tmp_path, monkeypatch, capsys):
    from omnitok.data.tokenize import TokenizeConfig, tokenize

    model, tok = chat
    monkeypatch.chdir(tmp_path)
    PILImage.fromarray(PHOTOS[2]).save(tmp_path / "cat.png")
    shutil.copy(next(ASSETS.glob("*.wav")), tmp_path / "meow.wav")
    session = ChatSession(model, tok, tmp_path / "answers", SAMPLING, seed=3)
    shown = []
    chat_loop(session, ["Draw a red circle.", "What is this? <image:cat.png>", "<audio:meow.wav> and this?",
                        "/save saved.json", "<image:missing.png>", "/bogus", "/save", "/save /",
                        "/save cat.png/x.json", "/reset", "hello again", "/quit", "never read"], shown.append)
    assert shown[0].startswith("type a message")
    errors = [s for s in shown if s.startswith("error:")]
    assert len(errors) == 5 and "missing.png does not exist" in errors[0] and "unknown command /bogus" in errors[1]
    assert "/save needs a path" in errors[2] and "(history cleared)" in shown and "(saved to saved.json)" in shown
    # a directory, a folder that cannot be made (it used to end the chat with a traceback, history lost)
    assert errors[3] == "error: cannot save to /: it is a directory; give a file name (/save chat.json)"
    assert errors[4].startswith("error: cannot save to cat.png/x.json: ")
    answers = [s for s in shown if not s.startswith(("type a message", "error:", "("))]
    assert len(answers) == session.replies == 4 and session.ids[0] == tok.text.bos_id
    assert session.ids.count(tok.layout.role_id("user")) == 1  # after /reset, one exchange
    assert session.ids[-2:] == [tok.layout.eot_id, tok.text.eos_id]
    for k in range(4):
        record = json.loads((tmp_path / "answers" / f"{k:03d}" / "sample.json").read_text())
        assert record["seed"] == 3 + k
        for s in record["segments"]:
            if "file" in s:
                path = tmp_path / "answers" / record["id"] / s["file"]
                assert path.is_file() and str(path) in answers[k]
    # the saved conversation is training data: three exchanges, the answers' media as files, and it tokenizes
    saved = json.loads((tmp_path / "saved.json").read_text())
    conv = Conversation.from_messages(saved["messages"])
    assert [t.role for t in conv.turns] == ["user", "assistant"] * 3
    (tmp_path / "saved.jsonl").write_text(json.dumps(saved) + "\n")
    manifest = tokenize(TokenizeConfig(inputs=[str(tmp_path / "saved.jsonl")], tokenizer=str(chat_model_dir /
                                                                                             "tokenizer"),
                                       out=str(tmp_path / "shards"), workers=0))
    assert manifest["samples"] == 1 and manifest["error_count"] == 0
    # the ids of the second exchange continue the first's exactly
    again = ChatSession(model, tok, tmp_path / "again", SAMPLING, seed=3)
    again.ask("Draw a red circle.")
    first = again.ids[:-1]  # all but the eos that closes it
    again.ask("What is this? <image:cat.png>")
    assert again.ids[: len(first)] == first
    again.ask("{braces} and [brackets] are text in a chat, not JSON")
    assert len(again.messages) == 6


def test_chat_command_reads_the_terminal_and_refuses_a_model_without_markers(chat_model_dir, model_dir, tmp_path,
                                                                            monkeypatch, capsys):
    lines = iter(["Draw a red circle.", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(chat_model_dir), "--out", str(tmp_path / "c"), "--max-new-tokens", "60"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("type a message") and (tmp_path / "c" / "000" / "sample.json").is_file()
    assert main(["chat", "--model", str(model_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat markers" in err[0]
