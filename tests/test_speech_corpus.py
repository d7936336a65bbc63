import shutil

import pytest
import soundfile as sf

from omnitok.demo.speech_corpus import EVAL_SENTENCES, SENTENCES, make_speech_corpus


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_speech_corpus_holds_out_sentences(tmp_path):
    assert len(set(SENTENCES)) == len(SENTENCES)  # no evaluation sentence is also a training sentence
    counts = make_speech_corpus(tmp_path, tones_per_kind=1)
    assert counts == {"train": len(SENTENCES) - EVAL_SENTENCES + 5, "eval": EVAL_SENTENCES}
    speech = sf.read(tmp_path / "eval" / "speech_000.wav")[0]
    assert len(speech) > 22_050 and abs(speech).max() > 0.1  # over a second of audible speech


def test_speech_corpus_without_espeak_says_so(tmp_path, monkeypatch, capsys):
    from omnitok.demo import speech_corpus

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        speech_corpus.main(["--out", str(tmp_path)])
    assert "espeak-ng is not installed" in capsys.readouterr().err
