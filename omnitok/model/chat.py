"""``omnitok chat``: a conversation with an instruction-tuned model in the terminal.

Each line the user types is a user turn (text with ``<image:PATH>`` / ``<audio:PATH>`` references); the model answers
with the assistant's turn, sampled with the grammar that ends it at ``<|eot|>`` and guidance whose unconditional row is
the conversation with the last user turn's content dropped (``sampler.py``). Text is printed; each image and sound
the answer holds is written to ``OUT/NNN/KK.png`` / ``.wav`` and its path printed. The history is kept as the ids the
model saw and wrote (its own codes, not a re-encoding of the decoded media), so every turn continues the same
sequence. Commands: ``/reset`` forgets the history, ``/save PATH`` writes the conversation as chat JSON (the
``messages`` form that ``omnitok tokenize`` and ``omnitok sample --chat`` read), ``/quit`` ends the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from omnitok.document import Conversation, Document, Image, Text, Turn
from omnitok.errors import OmnitokError
from omnitok.jsonfile import write_json_atomic
from omnitok.model.sample import Prompt, SpanDecoder, check_media, segments_of, write_sample
from omnitok.model.sampler import SamplingConfig, check_request, generate, new_token_budget
from omnitok.tokenizers.multimodal import MultimodalTokenizer

HELP = "type a message (<image:PATH> / <audio:PATH> to attach media); /reset, /save PATH, /quit"


class ChatSession:
    """One conversation: the ids so far, and its turns as chat messages for ``/save``."""

    def __init__(self, model, tok: MultimodalTokenizer, out: str | Path, sampling: SamplingConfig, seed: int = 0):
        tok.layout.need_chat()
        check_request(tok.layout, sampling)
        self.model, self.tok, self.out, self.sampling, self.seed = model, tok, Path(out), sampling, seed
        self.replies = 0  # numbers the answers' folders across resets
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = [self.tok.text.bos_id]
        self.messages: list[dict] = []

    def ask(self, line: str) -> dict:
        """The assistant's answer to the user turn ``line``: its record (``sample.json``'s form, files in
        ``out/NNN``)."""
        tok, layout = self.tok, self.tok.layout
        turn = Conversation([Turn("user", segments_of(line, Path.cwd()))]).check(prompt=True)  # text, never JSON
        prompt = Prompt(line, Document(turn.segments), conversation=turn)
        check_media(prompt)
        turn = tok.encode_conversations([prompt.conversation], prompt=True)[0].ids.tolist()[1:]  # after bos
        ids = self.ids + turn
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

        new = generate(self.model, layout, [ids], layout.eot_id, self.sampling, seeds=[seed], on_span=on_span,
                       forbidden=[tok.text.bos_id, tok.text.eos_id], nonempty=True)[0]
        record = write_sample(self.out, job, prompt, seed, new, decoder.finish(), tok, layout.eot_id, budget,
                              budget < self.sampling.max_new_tokens)
        self.replies += 1
        self.ids = ids + new + ([layout.eot_id] if new[-1:] != [layout.eot_id] else [])  # a closed turn
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
        write_json_atomic(path, {"messages": self.messages})
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
