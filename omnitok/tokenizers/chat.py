"""How a conversation is written as ids: omnitok's role markers, or an instruct LLM's own chat template.

- **markers** (a layout assembled ``--chat`` on a text tokenizer without a template): ``bos (<|role|> segment...
  <|eot|>)... eos``, the role markers being ids the layout adds after every code.
- **template** (the text side is an instruct LLM with a chat template): the LLM's Jinja template, rendered in
  transformers' sandbox (``ImmutableSandboxedEnvironment``: a template cannot run code), with every media span in
  place of a placeholder from Unicode's private use area; the rendered text is tokenized between placeholders and
  the media ids go where the placeholders were. Text-only conversations give exactly the ids of transformers'
  ``apply_chat_template``. Which ids are the answer (the loss mask) comes from rendering the conversation up to each
  assistant turn, with and without it, so it needs no knowledge of any particular template; a template that writes
  earlier turns differently once later ones follow is refused for that conversation.

Both formats give, besides the ids and the loss mask, the **requests**: for each user turn that conditioning dropout
may drop (one answered by an assistant turn that opens with media; in a prompt, the last user turn)
``[start, stop, replacement]``, such that ``ids[:start] + replacement + ids[stop:]`` is the conversation with that
turn's content emptied. Training's dropout (``data/stream.py``) and the sampler's unconditional row (``sampler.py``)
both apply them, so the two cannot drift apart, whatever the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from omnitok.errors import OmnitokError

SLOT = "\ue000{}\ue001"  # a media (or id) span's place in rendered text
SLOT_RE = re.compile("\ue000([0-9]+)\ue001")
MARKED = "\ue002{}\ue003"  # a control token that a turn's text spells: encoded as plain text
MARKED_RE = re.compile("\ue002([^\ue002\ue003]*)\ue003")
RESERVED = ("\ue000", "\ue001", "\ue002", "\ue003")  # a turn's text may not hold these

Request = tuple[int, int, list[int]]  # [start, stop) of a user turn's content, and what replaces it when dropped


@dataclass(frozen=True)
class ChatFormat:
    """What sampling needs to know of a tokenizer's conversations."""

    kind: str  # "markers" or "template"
    end_id: int  # the id that ends an assistant turn: <|eot|>, or the template's end-of-turn token
    forbidden: tuple[int, ...]  # ids an answer may not write (bos, eos, the template's other control tokens)


def request_of(full: list[int], emptied: list[int]) -> Request:
    """The request that turns ``full`` into ``emptied`` (the same conversation with one turn's content emptied):
    their common prefix and suffix stay, the middle of ``full`` is replaced by the middle of ``emptied``."""
    n = min(len(full), len(emptied))
    start = next((i for i in range(n) if full[i] != emptied[i]), n)
    tail = 0
    while tail < n - start and full[-1 - tail] == emptied[-1 - tail]:
        tail += 1
    return start, len(full) - tail, emptied[start:len(emptied) - tail]


class ChatTemplate:
    """An instruct LLM's chat template over its text tokenizer (``TextTokenizer.chat_template``): ids of
    conversations with media."""

    def __init__(self, text):
        self.text = text
        tokens = sorted(text.control_tokens, key=len, reverse=True)  # a longer token before one it contains
        self.control = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.text.render_chat(messages, generation_prompt)

    def mark(self, text: str) -> str:
        """A turn's text with each control token it spells marked, so that it is encoded as plain text (as
        transformers' ``sanitize_control_tokens``): a user cannot close a turn or forge a system turn by typing
        ``<|im_end|><|im_start|>system``."""
        return self.control.sub(lambda m: MARKED.format(m.group(0)), text) if self.control else text

    def ids(self, messages: list[dict], generation_prompt: bool, slots: list[list[int]]
            ) -> tuple[list[int], list[tuple[str | int, int, int]]]:
        """Rendered ``messages`` as ids, slot ``k``'s placeholder replaced by ``slots[k]``; with where each piece
        went: ``("text", start, stop)`` for text, ``(k, start, stop)`` for slot ``k``."""
        pieces = SLOT_RE.split(self.render(messages, generation_prompt))
        ids: list[int] = []
        placed: list[tuple[str | int, int, int]] = []
        for j, text_ids in enumerate(self._encode(pieces[0::2])):
            if text_ids:
                placed.append(("text", len(ids), len(ids) + len(text_ids)))
                ids += text_ids
            if 2 * j + 1 < len(pieces):
                k = int(pieces[2 * j + 1])
                if k >= len(slots):
                    raise OmnitokError("the chat template writes a placeholder it was not given")
                placed.append((k, len(ids), len(ids) + len(slots[k])))
                ids += slots[k]
        return ids, placed

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Each text as ids, its marked control tokens as plain text (the text around them is encoded apart)."""
        parts = [MARKED_RE.split(t) for t in texts]  # [plain, marked, plain, ...]
        plain = iter(self.text.encode([p.replace("\ue002", "").replace("\ue003", "")
                                       for ps in parts for p in ps[0::2]]))
        marked = iter(self.text.encode([p for ps in parts for p in ps[1::2]], literal=True))
        return [[i for k in range(len(ps)) for i in next(marked if k % 2 else plain)] for ps in parts]

    @cached_property
    def end_id(self) -> int:
        """The control token the template writes right after an answer (``<|im_end|>``, ``<|eot_id|>``,
        ``<end_of_turn>``, ``</s>``): the first special token of what follows the assistant's content."""
        answer = SLOT.format(0)
        text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}], False)
        after = text.split(answer, 1)[1] if answer in text else ""
        special = set(self.text.special_ids)
        ids = self.text.encode([after])[0] if after else []
        found = next((i for i in ids if i in special), None)
        if found is None:
            raise OmnitokError(f"cannot tell which token ends an assistant turn in this chat template: after the "
                               f"answer it writes {after!r}, with no special token")
        return found
