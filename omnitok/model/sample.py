"""``omnitok sample``: prompts in, interleaved text, PNG and WAV files out, with an HTML page.

- Prompts: text with media references (``A cat <image:cat.png> says``), a JSON document (``{"segments": [...]}`` or a
  list of segments), or a file of prompts, one per line, either form (media paths relative to the file).
- Chat requests (``--chat``, a model whose tokenizer holds conversations: chat markers or the text LLM's own chat
  template): text as the user's turn, or JSON lines with ``messages`` (or ShareGPT ``conversations``) ending with a
  user turn; each sample is the assistant's answer, which ends at the end of its turn (``prompt_tokens``;
  ``chat.py`` holds the terminal session).
- The model directory is an ``omnitok export`` (a Hugging Face directory with ``tokenizer/`` beside the weights), or
  any causal-LM directory given with ``--tokenizer``; the model's vocabulary and the tokenizer's layout must agree.
- Media is decoded while sampling goes on: each span is handed to a decoder thread the moment it closes; the thread
  decodes every span waiting at that time in one batch per modality.
- Output: ``DIR/NNN/sample.json`` (ordered segments with file names and token counts), ``DIR/NNN/KK.png`` / ``.wav``,
  ``DIR/NNN/text.txt``, and ``DIR/index.html`` showing every sample's interleaved result.
"""

from __future__ import annotations

import html
import json
import queue
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from omnitok.config import apply_overrides, build, check_seed, to_dict
from omnitok.device import default_device, model_dtype
from omnitok.document import Audio, Conversation, Document, Image, Text, Turn
from omnitok.errors import OmnitokError
from omnitok.jsonfile import parse_json, write_json_atomic
from omnitok.model.sampler import SamplingConfig, check_request, generate, new_token_budget
from omnitok.tokenizers.chat import Request
from omnitok.tokenizers.layout import LAYOUT_FILE, TokenLayout
from omnitok.tokenizers.multimodal import MultimodalTokenizer
from omnitok.weights import from_pretrained

_REFERENCE = re.compile(r"<(image|audio):([^<>]+)>")


@dataclass
class Prompt:
    label: str  # as the user wrote it
    document: Document  # a chat prompt's: every turn's segments, for the media checks
    source: str = "prompt"
    conversation: Conversation | None = None  # a chat prompt: the conversation the assistant answers next

    @property
    def text(self) -> str:
        """What the prompt says in words (a chat prompt: its last user turn), without its media: the text that CLIP
        and CLAP scores compare the samples with."""
        segments = self.conversation.last_user_segments if self.conversation is not None else self.document.segments
        return " ".join(" ".join(s.text.split()) for s in segments if isinstance(s, Text) and s.text.strip())


def _json_prompt(text: str, label: str | None) -> Any:
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        raise OmnitokError(f"prompt {label or text[:40]!r} looks like JSON but is not: {e.msg} (column {e.colno})"
                           ) from None


def parse_chat_prompt(text: str, base_dir: str | Path | None = None, label: str | None = None) -> Prompt:
    """A chat request: JSON with ``messages`` (or ShareGPT ``conversations``) ending with a user turn, or text with
    media references as the one user turn."""
    stripped = text.strip()
    if stripped.startswith("{"):
        data = _json_prompt(stripped, label)
        if not isinstance(data, dict) or not ("messages" in data or "conversations" in data):
            raise OmnitokError(f"chat prompt {label or stripped[:40]!r}: a JSON chat prompt holds 'messages'")
        conv = (Conversation.from_messages(data["messages"], base_dir, prompt=True) if "messages" in data
                else Conversation.from_sharegpt(data, base_dir, prompt=True))
        shown = "".join(s.text if isinstance(s, Text) else f"<{type(s).__name__.lower()}>"
                        for s in conv.last_user_segments)
    else:
        conv = Conversation([Turn("user", segments_of(text, base_dir))])
        shown = text
    conv.check(prompt=True)
    return Prompt(label or shown, Document(conv.segments), conversation=conv)


def parse_prompt(text: str, base_dir: str | Path | None = None, label: str | None = None) -> Prompt:
    """A text prompt with ``<image:path>`` / ``<audio:path>`` references, or a JSON document."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        data = _json_prompt(stripped, label)
        return Prompt(label or stripped, Document.from_json(data, base_dir))
    return Prompt(label or text, Document(segments_of(text, base_dir)))


def segments_of(text: str, base_dir: str | Path | None = None) -> list:
    """Text with ``<image:path>`` / ``<audio:path>`` references as segments (paths relative to ``base_dir``)."""
    segments, pos = [], 0
    for match in _REFERENCE.finditer(text):
        if match.start() > pos:
            segments.append(Text(text[pos:match.start()]))
        path = Path(match.group(2).strip())
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        segments.append(Image(str(path)) if match.group(1) == "image" else Audio(str(path)))
        pos = match.end()
    if pos < len(text):
        segments.append(Text(text[pos:]))
    return segments


def read_prompt_file(path: str | Path, chat: bool = False) -> list[Prompt]:
    """One prompt per non-empty line (text or JSON); with ``chat``, chat requests (``parse_chat_prompt``)."""
    parse = parse_chat_prompt if chat else parse_prompt
    path = Path(path)
    if not path.is_file():
        raise OmnitokError(f"prompt file {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise OmnitokError(f"prompt file {path} is not UTF-8 text (byte {e.start})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                prompts.append(parse(line, path.parent, label=None if chat else line.strip()))
            except OmnitokError as e:
                raise OmnitokError(f"{path.name}:{n}: {e}") from None
            prompts[-1].source = f"{path.name}:{n}"
    if not prompts:
        raise OmnitokError(f"prompt file {path} holds no prompt")
    return prompts


def check_media(prompt: Prompt) -> None:
    for seg in prompt.document.segments:
        if isinstance(seg, Image | Audio) and isinstance(seg.source, str) and "://" not in seg.source:
            if not Path(seg.source).is_file():
                kind = "image" if isinstance(seg, Image) else "audio"
                raise OmnitokError(f"{prompt.source}: {kind} file {seg.source} does not exist")


def load_model(model_dir: str | Path, tokenizer_dir: str | Path | None = None, device: torch.device | None = None):
    """The causal LM of ``model_dir`` and its tokenizer (``model_dir/tokenizer`` unless given), checked to agree."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise OmnitokError(f"{model_dir} is not a model directory (no config.json); give an `omnitok export` output")
    own = model_dir / "tokenizer"
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else own
    if not (tokenizer_dir / LAYOUT_FILE).is_file():
        raise OmnitokError(f"no tokenizer at {tokenizer_dir} ({LAYOUT_FILE} missing); give --tokenizer DIR")
    tok = MultimodalTokenizer.from_dir(tokenizer_dir)
    if tokenizer_dir != own and (own / LAYOUT_FILE).is_file():
        tok.layout.check_same(TokenLayout.load(own / LAYOUT_FILE), str(tokenizer_dir), f"the model's {own}")
    device = device or default_device()
    model = from_pretrained(AutoModelForCausalLM, model_dir, dtype=model_dtype(device)).to(device).eval()
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != tok.layout.vocab_size:
        raise OmnitokError(f"the model in {model_dir} has {rows} token rows but the tokenizer's layout has "
                           f"{tok.layout.vocab_size} ids: they were not trained together")
    return model, tok


class SpanDecoder:
    """Decodes closed media spans. Results are kept for ``finish``, or with ``on_done`` handed to it as they come:
    ``on_done(key, array)``, or ``on_done(key, error)`` for the spans of a batch that failed (decoding goes on).

    ``background`` (default: when the media tokenizers run on a GPU) decodes on a thread of its own, batching
    whatever is waiting, so that decoding overlaps sampling. Otherwise each span is decoded in the caller's thread as
    it is submitted: on a CPU the two compete for the same cores, and small oneDNN convolutions and LSTMs run 3-4x
    slower on a second thread that runs torch ops (tiny EnCodec clips: 2.9 ms each on the main thread, 10 ms on a
    second one; a 5 s clip at the published size 0.21 s and 0.27 s); the 1000-prompt test took 41 s with a decoding
    thread and 32 s without on a quiet machine, 83 s and 34 s on a busy one."""

    def __init__(self, tok: MultimodalTokenizer, on_done: Callable[[Any, Any], None] | None = None,
                 background: bool | None = None):
        self.tok, self.on_done = tok, on_done
        self.done: dict[tuple[int, int], np.ndarray] = {}
        self.error: BaseException | None = None
        if background is None:
            devices = [getattr(part, "device", None) for part in (tok.image, tok.audio)]  # not in the protocol
            background = any(d is not None and torch.device(d).type != "cpu" for d in devices)
        self.todo: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True) if background else None
        if self.thread is not None:
            self.thread.start()

    def submit(self, key: Any, modality: str, ids: list[int]) -> None:
        if self.thread is None:
            self._decode([(key, modality, ids)])
        else:
            self.todo.put((key, modality, ids))

    def _run(self) -> None:
        while True:
            items = [self.todo.get()]
            while not self.todo.empty():
                items.append(self.todo.get())
            self._decode([item for item in items if item is not None])
            if any(item is None for item in items):
                return

    def _decode(self, items: list[tuple[Any, str, list[int]]]) -> None:
        for modality in ("image", "audio"):
            batch = [(key, ids) for key, m, ids in items if m == modality]
            if not batch:
                continue
            try:
                codes = [self.tok.parse(np.asarray(ids))[0].ids for _, ids in batch]
                codec = self.tok.image if modality == "image" else self.tok.audio
                results = list(zip([key for key, _ in batch], codec.decode(codes)))
            except Exception as e:  # handed to finish(), or to on_done for each span of the batch
                if self.on_done is None:
                    self.error = e
                    continue
                results = [(key, e) for key, _ in batch]
            for key, out in results:
                if self.on_done is not None:
                    self.on_done(key, out)
                else:
                    self.done[key] = out

    def finish(self) -> dict[tuple[int, int], np.ndarray]:
        if self.thread is not None:
            self.todo.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.done


@dataclass
class SampleRequest:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_samples: int = 1  # per prompt, seeds seed, seed+1, ...
    seed: int = 0
    batch_size: int = 8
    chat: bool = False  # prompts are conversations; each sample is the assistant's next turn
    compiled: bool = False  # the decoder's layers under torch.compile (the first batch waits for the compiler)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise OmnitokError(f"--num-samples and --batch-size must be at least 1, got {self.num_samples} and "
                               f"{self.batch_size}")
        for seed in (self.seed, self.seed + self.num_samples - 1):  # the first sample's and the last one's
            check_seed(seed)


def sampling_config(overrides: list[str], base: SamplingConfig | None = None, **flags) -> SamplingConfig:
    """``SamplingConfig`` from ``key=value`` overrides (``image.top_k=500``) plus the CLI's flags, over ``base``
    (default: the defaults)."""
    data = {**(to_dict(base) if base is not None else {}), **{k: v for k, v in flags.items() if v is not None}}
    data = apply_overrides(data, overrides)
    cfg = build(SamplingConfig, data, "sampling.")
    if cfg.grid is not None:
        cfg = replace(cfg, grid=tuple(cfg.grid))
    return cfg


def sample(model, tok: MultimodalTokenizer, prompts: list[Prompt], out: str | Path, request: SampleRequest,
           progress: bool = True) -> list[dict]:
    """Sample every prompt ``num_samples`` times; writes the output directory; returns each sample's record."""
    from tqdm import tqdm

    out = Path(out)
    check_request(tok.layout, request.sampling)
    prompt_ids, end, forbidden, requests = prompt_tokens(tok, prompts, request.chat)
    budget = new_token_budget(model, request.sampling, [len(x) for x in prompt_ids])
    for i, b in enumerate(budget):
        if b < request.sampling.max_new_tokens:
            tqdm.write(f"prompt {i + 1}: only {b} new tokens fit in the model's "
                       f"{model.config.max_position_embeddings} positions (max_new_tokens is "
                       f"{request.sampling.max_new_tokens}); its samples stop there", file=sys.stderr)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(request.num_samples)]
    decoder = SpanDecoder(tok)
    results: dict[int, list[int]] = {}
    bar = tqdm(total=len(jobs), desc="sampling", unit="sample", disable=not progress)
    for start in range(0, len(jobs), request.batch_size):
        batch = list(range(start, min(start + request.batch_size, len(jobs))))
        ids = [prompt_ids[jobs[j][0]] for j in batch]
        closed: dict[int, int] = {}

        def on_span(b: int, modality: str, span: list[int], batch=batch, closed=closed) -> None:
            job = batch[b]
            closed[job] = closed.get(job, 0) + 1
            decoder.submit((job, closed[job] - 1), modality, span)

        new = generate(model, tok.layout, ids, end, request.sampling,
                       seeds=[request.seed + j for j in batch], on_span=on_span, forbidden=forbidden,
                       nonempty=request.chat, requests=[requests[jobs[j][0]] for j in batch],
                       compiled=request.compiled)
        results.update(zip(batch, new))
        bar.update(len(batch))
    bar.close()
    media = decoder.finish()
    records = [write_sample(out, j, prompts[i], request.seed + j, results[j], media, tok, end, budget[i],
                            budget[i] < request.sampling.max_new_tokens) for j, (i, _) in enumerate(jobs)]
    write_json_atomic(out / "samples.json", {"sampling": to_dict(request.sampling), "samples": records})
    (out / "index.html").write_text(_html(records), encoding="utf-8")
    return records


class PromptTokens(NamedTuple):
    ids: list[list[int]]  # each prompt's ids
    end: int  # the id that ends a sample
    forbidden: list[int]  # ids a sample may not write
    requests: list[Request | None]  # what guidance's unconditional row drops from each (chat prompts)


def prompt_tokens(tok: MultimodalTokenizer, prompts: list[Prompt], chat: bool) -> PromptTokens:
    """Each prompt's ids and how its samples end: documents are continued (not ended) and end at eos; chat requests
    open the assistant's turn, which ends at the chat format's end of turn (``<|eot|>``, or the template's)."""
    if chat:
        fmt = tok.need_chat()
        encoded = tok.encode_conversations([p.conversation for p in prompts], prompt=True)
        return PromptTokens([e.ids.tolist() for e in encoded], fmt.end_id, list(fmt.forbidden),
                            [e.requests[-1] for e in encoded])
    eos = tok.text.eos_id
    ids = [e.ids.tolist() for e in tok.encode_batch([p.document for p in prompts])]
    return PromptTokens([x[:-1] if x and x[-1] == eos else x for x in ids], eos, [], [None] * len(ids))


def write_sample(out: Path, job: int, prompt: Prompt, seed: int, ids: list[int], media: dict, tok, end: int,
                 max_new: int, by_context: bool) -> dict:
    """Sample ``job``'s files in ``out/NNN`` (text, PNG, WAV, sample.json) from its new ids (ending at ``end``
    when it ended) and its decoded media (``media[(job, k)]``: its k-th span); returns its record."""
    import soundfile as sf
    from PIL import Image as PILImage

    folder = out / f"{job:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    body = ids[:-1] if ids and ids[-1] == end else ids
    segments, text, span = [], [], 0
    for k, part in enumerate(tok.parse(np.asarray(body, dtype=np.int64)), 1):
        tokens = part.span.stop - part.span.start
        if part.modality == "text":
            segments.append({"type": "text", "text": tok.text.decode(part.ids), "tokens": tokens})
            text.append(segments[-1]["text"])
            continue
        data = media[(job, span)]
        span += 1
        name = f"{k:02d}.png" if part.modality == "image" else f"{k:02d}.wav"
        if part.modality == "image":
            PILImage.fromarray(data).save(folder / name)
            rows, cols = part.ids.shape
            segments.append({"type": "image", "file": name, "rows": rows, "cols": cols, "tokens": tokens})
        else:
            rate = tok.audio.sample_rate
            sf.write(folder / name, np.asarray(data).T, rate)
            segments.append({"type": "audio", "file": name, "frames": int(part.ids.shape[1]),
                             "seconds": round(np.asarray(data).shape[-1] / rate, 3), "tokens": tokens})
        text.append(f"[{part.modality}: {name}]")
    ended = "eot" if prompt.conversation is not None else "eos"  # the assistant's turn ended, or the document
    stopped = (ended if ids and ids[-1] == end else
               "span" if len(ids) < max_new else "context" if by_context else "max_new_tokens")
    record = {"id": f"{job:03d}", "prompt": prompt.label, "prompt_text": prompt.text, "source": prompt.source,
              "seed": seed, "new_tokens": len(ids), "stopped": stopped, "segments": segments}
    write_json_atomic(folder / "sample.json", record)
    (folder / "text.txt").write_text("".join(text), encoding="utf-8")
    return record


STYLE = ("<style>body{font-family:sans-serif;max-width:60em;margin:auto}section{border-bottom:1px solid #ccc;"
         "padding:.5em 0}.prompt{color:#555}img{image-rendering:pixelated;width:160px;vertical-align:middle;"
         "margin:4px}audio{vertical-align:middle}.text{white-space:pre-wrap}</style>")


def _html(records: list[dict]) -> str:
    return "\n".join(["<!doctype html><meta charset='utf-8'><title>omnitok samples</title>", STYLE,
                      f"<h1>omnitok samples</h1><p>{len(records)} samples</p>", records_html(records)])


def records_html(records: list[dict], prefix: str = "") -> str:
    """One section per sample: its prompt, then its segments in order (text, inline images, audio players)."""
    parts = []
    for r in records:
        parts.append(f"<section><h3>{r['id']} <small>seed {r['seed']}, {r['new_tokens']} tokens, "
                     f"stopped at {r['stopped']}</small></h3><p class='prompt'>{html.escape(r['prompt'])}</p><div>")
        for s in r["segments"]:
            src = html.escape(f"{prefix}{r['id']}/{s.get('file', '')}")
            if s["type"] == "text":
                parts.append(f"<span class='text'>{html.escape(s['text'])}</span>")
            elif s["type"] == "image":
                parts.append(f"<img src='{src}' title='{s['rows']}x{s['cols']} codes'>")
            else:
                parts.append(f"<audio controls src='{src}' title='{s['seconds']} s'></audio>")
        parts.append("</div></section>")
    return "\n".join(parts)
