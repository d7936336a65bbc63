"""``omnitok chat``: a conversation with an instruction-tuned model in the terminal.

Each line the user types is a user turn (text with ``<image:PATH>`` / ``<audio:PATH>`` references); the model answers
with the assistant's turn, sampled with the grammar that ends it at the end of its turn (``<|eot|>``, or the chat
template's) and guidance whose unconditional row is the conversation with the last user turn's content dropped
(``sampler.py``). Text is printed; each image and sound the answer holds is written to ``OUT/NNN/KK.png`` / ``.wav``
and its path printed. The history is kept as turns whose media and answers are the ids the model saw and wrote (its
own codes, not a re-encoding of decoded media); each question encodes that conversation in the tokenizer's chat
format, so a chat template sees every turn as it would in training. Commands: ``/reset`` forgets the history,
``/save PATH`` writes the conversation as chat JSON (the ``messages`` form that ``omnitok tokenize`` and
``omnitok sample --chat`` read), ``/quit`` ends the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from omnitok.config import check_seed
from omnitok.document import Conversation, Document, Image, Text, Tokens, Turn
from omnitok.errors import OmnitokError
from omnitok.jsonfile import write_json_atomic
from omnitok.model.sample import Prompt, SpanDecoder, check_media, segments_of, write_sample
from omnitok.model.sampler import SamplingConfig, check_request, generate, new_token_budget
from omnitok.tokenizers.multimodal import MultimodalTokenizer

HELP = "type a message (<image:PATH> / <audio:PATH> to attach media); /reset, /save PATH, /quit"


class ChatSession:
    """One conversation: the ids so far, and its turns as chat messages for ``/save``."""

    def __init__(self, model, tok: MultimodalTokenizer, out: str | Path, sampling: SamplingConfig, seed: int = 0,
                 compiled: bool = False):
        self.format = tok.need_chat()
        check_request(tok.layout, sampling)
        self.model, self.tok, self.out, self.sampling, self.seed = model, tok, Path(out), sampling, check_seed(seed)
        self.compiled = compiled
        self.replies = 0  # numbers the answers' folders across resets
        self.reset()

    def reset(self) -> None:
        self.turns: list[Turn] = []  # media and answers as ids (Tokens)
        self.messages: list[dict] = []

    @property
    def ids(self) -> list[int]:
        """The conversation so far as ids, closed as a training conversation is (empty before the first answer)."""
        return self.tok.encode_conversations([Conversation(self.turns)])[0].ids.tolist() if self.turns else []

    def ask(self, line: str) -> dict:
        """The assistant's answer to the user turn ``line``: its record (``sample.json``'s form, files in
        ``out/NNN``)."""
        tok, end = self.tok, self.format.end_id
        turn = Conversation([Turn("user", segments_of(line, Path.cwd()))]).check(prompt=True)  # text, never JSON
        prompt = Prompt(line, Document(turn.segments), conversation=turn)
        check_media(prompt)
        user = Turn("user", tok.encode_media(turn.turns[0].segments))
        encoded = tok.encode_conversations([Conversation([*self.turns, user])], prompt=True)[0]
        ids = encoded.ids.tolist()
        try:
            budget = new_token_budget(self.model, self.sampling, [len(ids)])[0]
        except OmnitokError:
            raise OmnitokError("the conversation fills the model's positions; /reset to start a new one") from None
        decoder = SpanDecoder(tok)
        job, seed = self.replies, self.seed + self.replies
        spans = [0]

        def on_span(b: int, modality: str, span: list[int]) -> None:
            decoder.submit((job, spans[0]), modality, span)
            spans[0] += 1

        new = generate(self.model, tok.layout, [ids], end, self.sampling, seeds=[seed], on_span=on_span,
                       forbidden=self.format.forbidden, nonempty=True, requests=[encoded.requests[-1]],
                       compiled=self.compiled)[0]
        record = write_sample(self.out, job, prompt, seed, new, decoder.finish(), tok, end, budget,
                              budget < self.sampling.max_new_tokens)
        self.replies += 1
        body = new[:-1] if new[-1:] == [end] else new  # the chat format closes the turn
        answer = [Tokens(tuple(body[p.span.start:p.span.stop]), p.modality)
                  for p in tok.parse(np.asarray(body, dtype=np.int64))]
        self.turns += [user, Turn("assistant", answer)]
        folder = self.out / record["id"]
        self.messages += [{"role": "user", "content": [_part(s) for s in prompt.conversation.turns[0].segments]},
                          {"role": "assistant", "content": [
                              {"type": "text", "text": s["text"]} if s["type"] == "text" else
                              {"type": s["type"], s["type"]: str((folder / s["file"]).resolve())}
                              for s in record["segments"]]}]
        return record

    def save(self, path: str | Path) -> Path:
        if not self.messages:
            raise OmnitokError("nothing to save yet: the conversation is empty")
        path = Path(path)
        if path.is_dir():
            raise OmnitokError(f"cannot save to {path}: it is a directory; give a file name (/save chat.json)")
        try:
            write_json_atomic(path, {"messages": self.messages})
        except OSError as e:  # a folder that cannot be made, no permission, a full disk: the chat goes on
            raise OmnitokError(f"cannot save to {path}: {e.strerror or e}") from None
        return path


def _part(segment) -> dict:
    if isinstance(segment, Text):
        return {"type": "text", "text": segment.text}
    kind = "image" if isinstance(segment, Image) else "audio"
    return {"type": kind, kind: str(Path(segment.source).resolve())}


def reply_text(record: dict, out: Path) -> str:
    """The answer as the terminal shows it: text, and each media file's path in brackets."""
    return "".join(s["text"] if s["type"] == "text" else f" [{s['type']}: {out / record['id'] / s['file']}] "
                   for s in record["segments"]).strip()


def chat_loop(session: ChatSession, lines: Iterable[str], write: Callable[[str], None]) -> None:
    """Answer each line until ``/quit`` or the end of input; a bad line (a missing file, a bad command) is one
    line of explanation, and the session goes on."""
    write(HELP)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        try:
            if command == "/quit":
                break
            if command == "/reset":
                session.reset()
                write("(history cleared)")
            elif command == "/save":
                if not arg.strip():
                    raise OmnitokError("/save needs a path: /save chat.json")
                write(f"(saved to {session.save(arg.strip())})")
            elif command.startswith("/"):
                raise OmnitokError(f"unknown command {command}; {HELP}")
            else:
                write(reply_text(session.ask(line), session.out))
        except OmnitokError as e:
            write(f"error: {e}")
