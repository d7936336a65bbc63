import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from omnitok.cli import main
from omnitok.errors import OmnitokError
from omnitok.tokenizers.text import TextTokenizer
from omnitok.train.text_tokenizer import TextTokenizerTrainConfig, train_text_tokenizer

HARD_STRINGS = ["", " ", "  two spaces", "trailing ", "tab\there\n\nnew lines\r\n", "emoji 😀🚀👩‍👩‍👧",
                "CJK 漢字かなカナ한국어", "combining é vs é", "NUL \x00 and bell \x07", "x" * 3000,
                "digits 1234567890 3.14159", "def f(x):\n    return x ** 2  # comment"]


def test_trains_on_real_text_and_reports_stats(sp_dir, sp_tok):
    report = json.loads((sp_dir / "train_report.json").read_text())
    assert sp_tok.vocab_size == report["vocabulary"]["size"] == 1000
    assert report["vocabulary"]["byte_pieces"] == 256
    assert report["corpus"]["lines"] > 10_000 and report["corpus"]["skipped"] == {}
    assert report["sample"]["character_coverage"] > 0.99
    assert report["sample"]["chars_per_token"] > 2.5  # BPE learned real merges on English docstrings
    assert (sp_tok.bos_id, sp_tok.eos_id) == (1, 2)
    # A common word is one piece; ids carry no bos/eos.
    ids = sp_tok.encode(["Return the value."])[0]
    assert len(ids) < len("Return the value.") / 2 and sp_tok.bos_id not in ids


@given(st.text(max_size=200))
@example("\u2581 a\u2581b")
@settings(max_examples=300, deadline=None)
def test_round_trips_arbitrary_unicode(sp_tok, text):
    """Exact, except SentencePiece's space symbol U+2581, which every SentencePiece model reads as a space."""
    ids = sp_tok.encode([text])[0]
    assert all(0 <= i < sp_tok.vocab_size for i in ids)
    assert sp_tok.decode(ids) == text.replace("\u2581", " ")


def test_round_trips_hard_strings_and_uses_byte_fallback(sp_tok):
    batch = sp_tok.encode(HARD_STRINGS)
    for text, ids in zip(HARD_STRINGS, batch):
        assert sp_tok.decode(ids) == text
    # Characters never seen in training are spelled in UTF-8 bytes, not mapped to <unk> (id 0). Byte pieces
    # follow <unk>, <s>, </s>, so byte b is id 3 + b.
    emoji = sp_tok.encode(["😀"])[0]
    assert 0 not in emoji and emoji[-4:] == [3 + b for b in "😀".encode()]


def test_save_and_reload_keep_ids_and_fingerprint(tmp_path, sp_tok):
    again = TextTokenizer.from_dir(sp_tok.save(tmp_path / "copy"))
    assert again.fingerprint == sp_tok.fingerprint
    assert again.encode(HARD_STRINGS) == sp_tok.encode(HARD_STRINGS)
    assert TextTokenizer.from_path(tmp_path / "copy" / "tokenizer.model").fingerprint == sp_tok.fingerprint


def test_cli_train_skips_and_counts_bad_lines(tmp_path, capsys):
    good = [f"line number {i} of a small corpus about cats, dogs and {i % 7} birds" for i in range(400)]
    (tmp_path / "a.txt").write_bytes("\n".join(good).encode() + b"\nbad \xff\xfe bytes\n")
    records = [json.dumps({"text": f"record {i}\nsecond line {i}"}) for i in range(100)]
    (tmp_path / "b.jsonl").write_text("\n".join(records + ["{not json", json.dumps({"txt": "no"}),
                                                           "[" * 5000 + "]" * 5000]) + "\n")  # too deep to parse
    assert main(["text-tokenizer", "train", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                 "--vocab-size", "320", "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "1 no text field, 2 not JSON, 1 not UTF-8" in out and "coverage" in out and "characters per token" in out
    report = json.loads((tmp_path / "tok" / "train_report.json").read_text())
    assert report["corpus"]["lines"] == 400 + 200
    tok = TextTokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size == 320 and tok.decode(tok.encode(["second line 7"])[0]) == "second line 7"


def test_training_bad_input_gets_clear_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"\n\n\xff\xfe\n")
    with pytest.raises(OmnitokError, match=r"no usable text \(skipped: 1 not UTF-8\)"):
        train_text_tokenizer([tmp_path / "empty.txt"], tmp_path / "t1", TextTokenizerTrainConfig(vocab_size=300))
    (tmp_path / "small.txt").write_text("tiny corpus\n" * 10)
    with pytest.raises(OmnitokError, match="too large for this corpus"):
        train_text_tokenizer([tmp_path / "small.txt"], tmp_path / "t2", TextTokenizerTrainConfig(vocab_size=5000))
    capsys.readouterr()
    assert main(["text-tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "t3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"omnitok: error: input file not found: {tmp_path / 'missing.txt'}"
    with pytest.raises(OmnitokError, match="too small"):
        TextTokenizerTrainConfig(vocab_size=100)


def test_encode_and_decode_refuse_bad_input(sp_tok):
    with pytest.raises(OmnitokError, match="list of strings"):
        sp_tok.encode("just a string")
    with pytest.raises(OmnitokError, match="text 1 is a bytes"):
        sp_tok.encode(["ok", b"bytes"])
    with pytest.raises(OmnitokError, match="lone surrogate"):
        sp_tok.encode(["bad \ud800"])
    with pytest.raises(OmnitokError, match="id 1000 is not a text id"):
        sp_tok.decode([5, 1000])


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory, stdlib_corpus):
    """A byte-level BPE tokenizer.json (GPT-2 style) trained with Hugging Face tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(stdlib_corpus)], trainer)
    tok.enable_truncation(16)  # a setting some tokenizer.json files carry; it must not cut our ids
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_tok(hf_json):
    return TextTokenizer.from_path(hf_json)


def streamed(tok, ids) -> list[str]:
    """The pieces a ``TextStream`` gives for ``ids`` pushed one by one, then flushed."""
    stream = tok.stream()
    return [stream.push(i) for i in ids] + [stream.flush()]


@given(st.text(max_size=150), st.lists(st.integers(3, 799), max_size=40))
@example("emoji 😀🚀👩‍👩‍👧 CJK 漢字かな  two spaces\n", [])
@settings(max_examples=150, deadline=None)
def test_streamed_pieces_join_to_the_decoded_text(sp_tok, hf_tok, text, ids):
    """What a streamed answer shows is, joined, what decoding the whole answer gives: for encoded text and for
    arbitrary ids (byte pieces that never finish a character included), SentencePiece and byte-level BPE alike; no
    piece shows an unfinished character before the end."""
    for tok in (sp_tok, hf_tok):
        for seq in (tok.encode([text])[0], ids):
            pieces = streamed(tok, seq)
            assert "".join(pieces) == tok.decode(seq)
            assert not any(p.endswith("\ufffd") for p in pieces[:-1] if "\ufffd" not in tok.decode(seq))


def test_a_long_stream_decodes_each_id_a_few_times_not_the_whole_answer_each_time(sp_tok, hf_tok, monkeypatch):
    text = " ".join(HARD_STRINGS) * 2
    for tok in (sp_tok, hf_tok):
        ids = tok.encode([text])[0]
        decoded = []
        decode = type(tok).decode
        monkeypatch.setattr(type(tok), "decode", lambda self, seq: decoded.append(len(seq)) or decode(self, seq))
        assert "".join(streamed(tok, ids)) == decode(tok, ids)
        monkeypatch.undo()
        assert len(ids) > 1000 and sum(decoded) < 12 * len(ids), (len(ids), sum(decoded))


def test_hf_tokenizer_json_gives_the_same_ids_as_tokenizers(hf_json):
    ours = TextTokenizer.from_path(hf_json)
    ref = Tokenizer.from_file(str(hf_json))
    ref.no_truncation()
    assert (ours.bos_id, ours.eos_id) == (ref.token_to_id("<s>"), ref.token_to_id("</s>"))
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    texts = HARD_STRINGS + ["Return a new list with the items sorted."]
    for text, ids in zip(texts, ours.encode(texts)):
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text  # byte-level is lossless


def test_hf_backend_reloads_with_same_fingerprint(tmp_path, hf_json):
    ours = TextTokenizer.from_path(hf_json, bos_token="<pad>", eos_token="</s>")
    assert ours.bos_id == Tokenizer.from_file(str(hf_json)).token_to_id("<pad>")
    again = TextTokenizer.from_dir(ours.save(tmp_path / "t"))
    assert again.fingerprint == ours.fingerprint and again.bos_id == ours.bos_id
    assert again.encode(HARD_STRINGS) == ours.encode(HARD_STRINGS)


def test_pretrained_llm_directories_load_with_their_bos_and_eos(tmp_path, hf_json, sp_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # A fast-tokenizer LLM directory, as save_pretrained writes it.
    fast = PreTrainedTokenizerFast(tokenizer_file=str(hf_json), bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "llm")
    ours = TextTokenizer.from_path(tmp_path / "llm")
    hf = AutoTokenizer.from_pretrained(tmp_path / "llm")
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    for text, ids in zip(HARD_STRINGS, ours.encode(HARD_STRINGS)):
        assert ids == hf.encode(text, add_special_tokens=False)
    # A Llama-style directory with only tokenizer.model: transformers converts it (this needs protobuf; without
    # it the conversion silently yields a 3-token vocabulary, which the vocab size check below catches).
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}))
    llama = TextTokenizer.from_path(tmp_path / "llama")
    assert (llama.vocab_size, llama.bos_id, llama.eos_id) == (1000, 1, 2)
    sp = TextTokenizer.from_dir(sp_dir)
    assert llama.encode(["Return the value of x."]) == sp.encode(["Return the value of x."])


def test_unrecognised_sources_are_refused(tmp_path):
    with pytest.raises(OmnitokError, match="does not exist"):
        TextTokenizer.from_path(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(OmnitokError, match="is not a text tokenizer"):
        TextTokenizer.from_path(tmp_path / "x.txt")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(OmnitokError, match="not a SentencePiece model"):
        TextTokenizer.from_path(tmp_path / "bad.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(OmnitokError, match="not a Hugging Face tokenizer.json"):
        TextTokenizer.from_path(tmp_path / "tokenizer.json")
