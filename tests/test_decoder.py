from unittest import mock

import pytest
import torch
from test_pretrain_parts import LAYOUT

from omnitok.errors import OmnitokError
from omnitok.model.build import ModelConfig, build_model
from omnitok.model.decoder import CudaGraphs, Decoder
from omnitok.model.sampler import _left_padded


def hf_last_logits(model, seqs):
    """Hugging Face's own forward, one unpadded sequence at a time."""
    return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])


class Rerun:
    """CUDA graph capture emulated on the CPU, for ``CudaGraphs``: the output is one tensor that each replay
    overwrites, recomputed from the captured input tensors over the cache tensors of the capture, which is what a
    graph reads and writes (so inputs not copied in, or a graph replayed over a replaced cache, give wrong logits)."""

    def __init__(self):
        self.replays = 0

    def __call__(self, fn):
        out = fn()

        def replay():
            self.replays += 1
            out.copy_(fn())

        return replay, out


def decoder(model, form: str) -> Decoder:
    """An eager decoder; with ``form`` "static", it runs the compiled decoder's static form eagerly (keys and values
    written at tensor indices, attention over the cache's whole capacity: what compiled passes and CUDA graphs run);
    "graphs": its decoding passes through ``CudaGraphs`` with the capture emulated (``Rerun``)."""
    dec = Decoder(model)
    dec.static = form != "sliced"
    if form == "graphs":
        dec.graphs = CudaGraphs(dec._static, record=Rerun())
    return dec


FORMS = pytest.mark.parametrize("form", ["sliced", "static", "graphs"])


@FORMS
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.inference_mode()
def test_logits_match_hugging_face_with_padding_steps_and_spliced_rows(arch, form):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                    num_kv_heads=2), LAYOUT).eval()
    dec = decoder(model, form)
    seqs = [[1, 5, 9, 12, 40, 3], [1, 7], [1, 30, 31, 32]]
    cache = dec.new_cache(3, capacity=4)  # small, so the cache must grow
    ids, valid, pos = _left_padded(seqs, LAYOUT.pad_id, dec.device)
    ours = dec.forward(cache, ids, valid, pos)
    torch.testing.assert_close(ours, hf_last_logits(model, seqs), atol=1e-5, rtol=1e-5)
    nxt = pos[:, -1] + 1
    for token in (11, 60, 4):  # decode steps
        seqs = [s + [token] for s in seqs]
        ours = dec.decode(cache, torch.full((3, 1), token), torch.ones(3, 1, dtype=torch.bool), nxt[:, None])[:, 0]
        nxt = nxt + 1
        torch.testing.assert_close(ours, hf_last_logits(model, seqs), atol=1e-5, rtol=1e-5)
    # drop row 1, splice in a new shorter row, step all: every row still equals its sequence alone
    cache.select(torch.tensor([0, 2]))
    seqs, nxt = [seqs[0], seqs[2]], nxt[[0, 2]]
    extra = dec.new_cache(1)
    ids, valid, pos = _left_padded([[1, 44, 45]], LAYOUT.pad_id, dec.device)
    dec.forward(extra, ids, valid, pos)
    cache.extend(extra)
    seqs.append([1, 44, 45])
    nxt = torch.cat([nxt, pos[:, -1] + 1])
    ours = dec.decode(cache, torch.full((3, 1), 8), torch.ones(3, 1, dtype=torch.bool), nxt[:, None])[:, 0]
    torch.testing.assert_close(ours, hf_last_logits(model, [s + [8] for s in seqs]), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_graphs_serve_every_batch_of_their_size_and_are_captured_again_when_the_cache_grows():
    """A graph is captured per number of rows and replayed whenever the batch has that many again, after rows left
    and joined (they move inside the cache's buffers); a cache that grows replaces its buffers and the graphs with
    them. Each step's logits are Hugging Face's: a graph replayed over rows that moved, or over the old buffers,
    would give other ones."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2),
                        LAYOUT).eval()
    dec = decoder(model, "graphs")
    record = dec.graphs.record
    seqs = [[1, 5, 9], [1, 7, 8]]
    cache = dec.new_cache(2, capacity=16)
    ids, valid, pos = _left_padded(seqs, LAYOUT.pad_id, dec.device)
    dec.forward(cache, ids, valid, pos)  # a prefill: no graph
    before = CudaGraphs.captured
    nxt = pos[:, -1] + 1

    def step(token):
        nonlocal seqs, nxt
        seqs = [s + [token] for s in seqs]
        rows = len(seqs)
        ours = dec.decode(cache, torch.full((rows, 1), token), torch.ones(rows, 1, dtype=torch.bool),
                          nxt[:, None])[:, 0]
        torch.testing.assert_close(ours, hf_last_logits(model, seqs), atol=1e-5, rtol=1e-5)
        nxt = nxt + 1

    for token in range(20, 26):
        step(token)
    assert (CudaGraphs.captured - before, record.replays) == (1, 6)  # one shape, one cache: one graph
    cache.select(torch.tensor([1]))  # row 0 leaves: row 1 moves to the front of the buffers
    seqs, nxt = [seqs[1]], nxt[1:]
    step(30)
    assert CudaGraphs.captured - before == 2 and len(dec.graphs.graphs) == 2  # a 1-row graph beside the 2-row one
    extra = dec.new_cache(1)
    ids, valid, pos = _left_padded([[1, 44, 45, 46]], LAYOUT.pad_id, dec.device)
    dec.forward(extra, ids, valid, pos)
    cache.extend(extra)  # a row joins: two rows again
    seqs, nxt = seqs + [[1, 44, 45, 46]], torch.cat([nxt, pos[:, -1] + 1])
    for token in (31, 32):
        step(token)
    assert CudaGraphs.captured - before == 2  # the 2-row graph, replayed over the rows now there
    cache.trim()  # nothing to drop (row 1 started at the first column): the buffers stay
    while cache.length < cache.capacity:
        step(33)
    buffers = cache.buffers
    step(34)  # the cache grows: new buffers, the graphs over the old ones dropped
    assert cache.buffers is not buffers and CudaGraphs.captured - before == 3 and len(dec.graphs.graphs) == 1


class CopyingCache:
    """The cache's row and column moves as plain copies (every operation builds new tensors, as the first version
    of ``KVCache`` did): one layer's keys (rows, 1, columns, 2) and the valid mask, the reference for the in-place
    moves."""

    def __init__(self, keys: torch.Tensor, valid: torch.Tensor, length: int):
        self.keys, self.valid, self.length = keys.clone(), valid.clone(), length

    def select(self, rows):
        self.keys, self.valid = self.keys[rows], self.valid[rows]

    def extend(self, other, end):
        if other.length > end:
            shift = other.length - end
            self.keys = torch.cat([self.keys.new_zeros((*self.keys.shape[:2], shift, 2)), self.keys], dim=2)
            self.valid = torch.cat([self.valid.new_zeros((len(self.valid), shift)), self.valid], dim=1)
            self.length, end = self.length + shift, end + shift
        keys = self.keys.new_zeros((other.rows, 1, self.keys.shape[2], 2))
        valid = self.valid.new_zeros((other.rows, self.valid.shape[1]))
        keys[:, :, end - other.length:end] = other.keys[0][:, :, :other.length]
        valid[:, end - other.length:end] = other.valid[:, :other.length]
        self.keys, self.valid = torch.cat([self.keys, keys]), torch.cat([self.valid, valid])

    def trim(self):
        used = self.valid[:, :self.length].any(0)
        first = int(used.float().argmax()) if bool(used.any()) else self.length
        self.keys, self.valid, self.length = self.keys[:, :, first:], self.valid[:, first:], self.length - first


def test_the_caches_moves_in_place_keep_every_row_as_copies_would():
    """Random passes (columns written), rows leaving, rows joining (before or after a window, longer or shorter
    than the cache), rewinds, trims and growth: the rows and columns in use hold what plain copies would hold. The
    in-place moves overlap their own data (padding on the left, trimming), which a copy never does."""
    from omnitok.model.decoder import KVCache

    g = torch.Generator().manual_seed(0)

    def new(rows, length):
        cache = KVCache(1, rows, 1, 2, torch.float32, torch.device("cpu"), capacity=max(1, length))
        cache.keys[0][:, :, :length] = torch.randn((rows, 1, length, 2), generator=g)
        cache.valid[:, :length] = torch.rand((rows, length), generator=g) < 0.8
        cache.length = length
        return cache

    cache = new(2, 3)
    ref = CopyingCache(cache.keys[0], cache.valid, 3)
    fed, buffers = 1, {id(cache.buffers)}
    for _ in range(300):
        op = int(torch.randint(5, (1,), generator=g))
        if op == 0:  # a pass writes t columns, as Decoder._hidden does
            fed = int(torch.randint(1, 5, (1,), generator=g))
            cache.reserve(fed)
            keys = torch.randn((cache.rows, 1, fed, 2), generator=g)
            valid = torch.rand((cache.rows, fed), generator=g) < 0.9
            cache.keys[0][:, :, cache.length:cache.length + fed] = keys
            cache.valid[:, cache.length:cache.length + fed] = valid
            width = ref.length + fed - ref.keys.shape[2]
            if width > 0:
                ref.keys = torch.cat([ref.keys, ref.keys.new_zeros((*ref.keys.shape[:2], width, 2))], dim=2)
                ref.valid = torch.cat([ref.valid, ref.valid.new_zeros((len(ref.valid), width))], dim=1)
            ref.keys[:, :, ref.length:ref.length + fed], ref.valid[:, ref.length:ref.length + fed] = keys, valid
            cache.length = ref.length = cache.length + fed
        elif op == 1 and cache.rows > 1:  # rows leave (some of them, in another order)
            rows = torch.randperm(cache.rows, generator=g)[:int(torch.randint(1, cache.rows, (1,), generator=g))]
            cache.select(rows)
            ref.select(rows)
        elif op == 2 and cache.rows < 12:  # rows join: at the end, or where the last window began
            other = new(int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 14, (1,), generator=g)))
            end = cache.length - (fed - 1 if torch.rand((1,), generator=g) < 0.5 else 0)
            ref.extend(other, end)
            cache.extend(other, end)
        elif op == 3 and cache.length >= fed:  # the last window's drafts fall, row by row
            kept = torch.randint(1, fed + 1, (cache.rows,), generator=g)
            cache.rewind(kept, fed)
            ref.valid[:, ref.length - fed:ref.length] &= torch.arange(fed)[None] < kept[:, None]
            ref.length = ref.length - fed + int(kept.max())
            fed = 1
        elif op == 4:
            cache.trim()
            ref.trim()
        buffers.add(id(cache.buffers))
        assert cache.length == ref.length and cache.rows == len(ref.valid)
        torch.testing.assert_close(cache.keys[0][:, :, :cache.length], ref.keys[:, :, :ref.length], rtol=0, atol=0)
        assert torch.equal(cache.valid[:, :cache.length], ref.valid[:, :ref.length])
        assert not cache.valid[:, cache.length:].any()  # beyond the length nothing counts as a token
    assert 2 < len(buffers) < 20  # grown now and then, not replaced at every move


def test_unsupported_models_are_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(OmnitokError, match="'gpt2'"):
        Decoder(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


@FORMS
@torch.inference_mode()
def test_a_window_of_drafts_then_rewound_rows_match_hugging_face(form):
    """Speculative decoding's cache moves: a window of tokens fed at once gives the logits after each of them, and
    rows that keep different numbers of them go on exactly as their kept sequences alone; a row spliced in between
    the window and the rewind (a server admitting a request) ends at the window's first column and goes on as its
    sequence alone."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2),
                        LAYOUT).eval()
    dec = decoder(model, form)
    seqs = [[1, 5, 9, 12], [1, 7]]
    cache = dec.new_cache(2)
    ids, valid, pos = _left_padded(seqs, LAYOUT.pad_id, dec.device)
    dec.forward(cache, ids, valid, pos)
    window = torch.tensor([[40, 41, 42, 43], [20, 21, 22, 23]])
    positions = (pos[:, -1] + 1)[:, None] + torch.arange(4)
    logits = dec.decode(cache, window, torch.ones(2, 4, dtype=torch.bool), positions)
    for r in range(2):
        full = model(torch.tensor([seqs[r] + window[r].tolist()])).logits[0, -4:]
        torch.testing.assert_close(logits[r], full, atol=1e-5, rtol=1e-5)
    extra = dec.new_cache(1)
    ids, valid, pos = _left_padded([[1, 44, 45, 46, 47, 48, 49, 50]], LAYOUT.pad_id, dec.device)  # longer than all
    dec.forward(extra, ids, valid, pos)
    cache.extend(extra, end=cache.length - 4 + 1)
    kept = torch.tensor([3, 1, 1])  # row 0 keeps 40 41 42, row 1 keeps 20, the new row its last token
    cache.rewind(kept, 4)
    seqs = [seqs[0] + [40, 41, 42], seqs[1] + [20], [1, 44, 45, 46, 47, 48, 49, 50]]
    nxt = torch.cat([positions[:, 0] + kept[:2], pos[:, -1] + 1])
    for token in (11, 60):
        seqs = [s + [token] for s in seqs]
        ours = dec.decode(cache, torch.full((3, 1), token), torch.ones(3, 1, dtype=torch.bool), nxt[:, None])[:, 0]
        nxt = nxt + 1
        torch.testing.assert_close(ours, hf_last_logits(model, seqs), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_compiled_decoder_gives_the_same_greedy_tokens(model_dir):
    """Under torch.compile the greedy tokens are the eager ones. The model is the one test_serve's compiled engine
    runs (dynamo reuses graphs across models of one architecture, so the two tests pay for one set of compiles)."""
    from omnitok.model.sample import load_model
    from omnitok.model.sampler import ModalitySampling, SamplingConfig, generate

    model, tok = load_model(model_dir)
    prompts = [[1, 5 + i, 6, 7 + i][: 2 + i % 3] for i in range(6)]
    # one image each: prefill, one-token steps (markers), windows of drafts, guidance rows joining and leaving
    cfg = SamplingConfig(greedy=True, output="image", grid=(2, 3), max_new_tokens=40,
                         image=ModalitySampling(guidance=2.0, sjd_window=4))
    widths = []
    decode = Decoder.decode

    def recorded(self, cache, ids, *args):
        widths.append(ids.shape[1])
        return decode(self, cache, ids, *args)

    with mock.patch.object(Decoder, "decode", recorded):
        compiled = generate(model, tok.layout, prompts, tok.text.eos_id, cfg, compiled=True)
    assert compiled == generate(model, tok.layout, prompts, tok.text.eos_id, cfg)
    assert set(widths) == {1, 5}  # steps, and every window padded to 1 + sjd_window: one shape, one CUDA graph


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (8, 1), (2, 17), (64, 1), (65, 1), (4, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_few_rows_multiply_transposed_on_the_cpu_with_the_same_values(shape, bias):
    """``_linear``: 2 to 64 tokens against a weight of 2^19 elements or more go as ``(w @ x.T).T`` (MKL's product
    of a few rows is several times slower here), equal to ``F.linear`` up to float rounding; one token, more than
    64 and small weights take ``F.linear`` itself."""
    import torch.nn.functional as F

    from omnitok.model import decoder

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, 512, generator=g)
    for out in (1024, 256):  # 2^19 elements, and a quarter of that
        w = torch.randn(out, 512, generator=g) / 512 ** 0.5
        b = torch.randn(out, generator=g) if bias else None
        with mock.patch.object(decoder.F, "linear", wraps=F.linear) as plain:
            y = decoder._linear(x, w, b)
        transposed = decoder._MKL and 2 <= shape[0] * shape[1] <= 64 and out == 1024
        assert plain.called != transposed
        assert y.shape == (*shape, out) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
