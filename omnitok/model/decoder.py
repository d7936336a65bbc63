"""A lean incremental forward pass over a Hugging Face Llama-family model, for sampling.

``model.generate`` spends most of a decoding step in module dispatch, mask building and a KV cache that grows by
concatenation. ``Decoder`` reads the same weights (nothing is copied) and runs a step as a short list of tensor ops
over a ``KVCache`` that is preallocated and grows by doubling. Rows of the cache can be dropped and added between
steps, which is what classifier-free guidance needs: an unconditional row joins while its sample is inside a media
span and leaves when the span closes.

With ``compiled``, decoding passes (one-token steps and SJD windows; prefills stay eager, one compute-bound pass
each) run one decoder layer under ``torch.compile`` with dynamic shapes (every layer calls the same compiled
function with its own weights, so compiling costs one layer's graph whatever the depth: with all the layers as one
graph, a 22-layer model's first compiled runs had not finished after about 5 minutes on an H200), in a static form:
new keys and values are written at columns given as a tensor (``index_copy_``) and attention reads the cache's whole
capacity under an explicit mask, so nothing in a pass depends on where in the cache it writes. On a GPU the decoding
passes (one-token steps, and windows padded to the widest the settings allow, ``window_width``) then run as CUDA
graphs (``CudaGraphs``): captured at a pass's first shape over the cache's current tensors and replayed after it, so
a 1B model's step is no longer paid in kernel launches (eager, it is launch-bound: ~16 ms a step on an H200 where
its weights take ~0.6 ms to read). Rows joining and leaving move data inside the cache's buffers (``KVCache``), so a
graph captured at a number of rows is replayed whenever the batch has that many again; only a cache that grows
replaces its buffers, and then the graphs are captured again. On a CPU the same static form runs without graphs.
(Slicing the cache at a symbolic ``start`` / ``end`` instead, as the eager path does, let a graph compiled where the
cache happened to be exactly full be reused for a larger cache: a size assertion failed inside the graph once the
server's cache grew.) The tokens are the same as eager (tested greedy, ``generate`` and the server's engine; the
graphs' plumbing with an emulated capture on the CPU).

Supported: ``llama``, ``mistral`` and ``qwen2`` without sliding windows, ``qwen3`` (QK-norm), i.e. every model that
``omnitok pretrain`` builds or continues from those families. Parity with Hugging Face is tested (logits with left
padding, greedy tokens equal to ``generate``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from omnitok.errors import OmnitokError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class KVCache:
    """Keys and values of every layer, ``(rows, kv_heads, capacity, head_dim)``, with a per-row mask of the
    positions that hold real tokens (left padding and the padding of rows that joined later are False).

    ``keys``, ``values`` and ``valid`` are views of the first ``rows`` rows of ``buffers``, which may hold more: rows
    that leave (``select``), rows that join (``extend``) and columns dropped (``trim``) move data inside them, and
    they are replaced only to grow (more rows or columns than they hold). A CUDA graph captured over them stays
    valid while a server's batch changes (``CudaGraphs``); replacing the tensors at every join and leave had an
    engine serving 48 short requests at 8 rows capture a graph on 167 of its 224 passes."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 64):
        shape = (rows, kv_heads, capacity, head_dim)
        self._replace([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                      [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                      torch.zeros((rows, capacity), dtype=torch.bool, device=device), rows)
        self.length = 0

    def _replace(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, rows: int) -> None:
        """New buffers (a new ``buffers`` object: graphs over the old ones are dropped), their first ``rows`` in use."""
        self.buffers = (keys, values, valid)
        self._use(rows)

    def _use(self, rows: int) -> None:
        keys, values, valid = self.buffers
        self.keys, self.values, self.valid = [k[:rows] for k in keys], [v[:rows] for v in values], valid[:rows]

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def row_capacity(self) -> int:
        return self.buffers[2].shape[0]

    def _tensors(self) -> list[tuple[torch.Tensor, int]]:
        """Every buffer's rows in use, with its column dimension."""
        return [(k, 2) for k in self.keys] + [(v, 2) for v in self.values] + [(self.valid, 1)]

    def _grown(self, rows: int, capacity: int, shift: int = 0) -> None:
        """Buffers of ``rows`` rows and ``capacity`` columns, the rows in use copied over (their columns ``shift``
        to the right)."""
        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            new = t.new_zeros((rows, *t.shape[1:dim], capacity, *t.shape[dim + 1:]))
            new[:t.shape[0]].narrow(dim, shift, self.length).copy_(t.narrow(dim, 0, self.length))
            return new

        n = self.rows
        keys, values = [grown(k, 2) for k in self.keys], [grown(v, 2) for v in self.values]
        self._replace(keys, values, grown(self.valid, 1), n)

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more positions (the capacity doubles, so appends cost amortised O(1))."""
        need = self.length + extra
        if need > self.capacity:
            self._grown(self.row_capacity, max(need, 2 * self.capacity))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order (moved to the front of the buffers)."""
        n = len(rows)
        for t, _ in self._tensors():
            t[:n] = t.index_select(0, rows)
        self._use(n)

    def extend(self, other: KVCache, end: int | None = None) -> None:
        """Append ``other``'s rows, right-aligned to end at column ``end`` (default: this cache's length; after it
        they are padding) and padded on their left; when they are longer, this cache's rows get padding on their
        left instead."""
        end = self.length if end is None else end
        if other.length > end:
            shift = other.length - end
            self._pad_left(shift)
            end += shift
        offset, n = end - other.length, other.length
        first, rows = self.rows, self.rows + other.rows
        if rows > self.row_capacity:
            self._grown(max(rows, 2 * self.row_capacity), self.capacity)
        self._use(rows)
        for (mine, dim), (theirs, _) in zip(self._tensors(), other._tensors()):
            mine = mine[first:]
            mine.zero_()
            mine.narrow(dim, offset, n).copy_(theirs.narrow(dim, 0, n))

    def _pad_left(self, n: int) -> None:
        """``n`` columns of padding before every row (positions are explicit, so nothing else moves)."""
        if self.length + n > self.capacity:
            self._grown(self.row_capacity, max(self.length + n, 2 * self.capacity), shift=n)
        else:
            for t, dim in self._tensors():
                t.narrow(dim, n, self.length).copy_(t.narrow(dim, 0, self.length).clone())
                t.narrow(dim, 0, n).zero_()
        self.length += n

    def clear(self) -> None:
        """No rows, no columns (the buffers stay, for the rows that join next)."""
        self._use(0)
        self.length = 0

    def rewind(self, kept: torch.Tensor, fed: int) -> None:
        """Forget the drafts that were not accepted: of the last ``fed`` columns, row ``r`` keeps its first
        ``kept[r]``; the cache ends after the longest kept run (the others' remaining columns are padding)."""
        start = self.length - fed
        columns = torch.arange(fed, device=self.valid.device)
        self.valid[:, start:self.length] &= columns[None, :] < kept[:, None]
        self.length = start + int(kept.max())

    def trim(self) -> None:
        """Drop the leading columns no row uses any more (rows that left took their positions with them), so a
        cache that rows keep joining and leaving does not grow without end: the rest moves to the front."""
        used = self.valid[:, : self.length].any(0)
        first = int(used.float().argmax()) if bool(used.any()) else self.length
        if first == 0:
            return
        kept = self.length - first
        for t, dim in self._tensors():
            t.narrow(dim, 0, kept).copy_(t.narrow(dim, first, kept).clone())
            t.narrow(dim, kept, first).zero_()
        self.length = kept


def cuda_graph(fn) -> tuple:
    """``fn()`` captured as a CUDA graph: (replay, output), the output tensor overwritten by each replay. A first run
    on a side stream compiles what is still to compile and sets up cuBLAS's workspaces (which a capture cannot);
    it writes the same keys and values into the cache as the replays will."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class CudaGraphs:
    """A compiled decoder's decoding passes as CUDA graphs: ``run(cache.keys, cache.values, *inputs)`` is captured
    once per shape of ``inputs`` (the rows in use among them) over the cache's buffers, then replayed with the new
    inputs copied into the graph's own. Rows joining and leaving move data inside the buffers (``KVCache``), so a
    graph captured at a number of rows serves whenever the batch has that many again; buffers replaced to grow drop
    every graph (they read and write the old buffers' memory). ``record`` captures (``cuda_graph``; a test emulates
    it on the CPU)."""

    captured = 0  # graphs captured in this process (the GPU check reports it)

    def __init__(self, run, record=cuda_graph):
        self.run, self.record = run, record
        self.buffers = None  # the cache buffers the graphs were captured over
        self.graphs: dict = {}

    def __call__(self, cache: KVCache, *inputs: torch.Tensor) -> torch.Tensor:
        if cache.buffers is not self.buffers:
            self.graphs.clear()
            self.buffers = cache.buffers
        shapes = tuple(t.shape for t in inputs)
        if shapes not in self.graphs:
            mine, keys, values = tuple(t.clone() for t in inputs), cache.keys, cache.values
            self.graphs[shapes] = (mine, *self.record(lambda: self.run(keys, values, *mine)))
            CudaGraphs.captured += 1
        mine, replay, out = self.graphs[shapes]
        for dst, src in zip(mine, inputs):
            dst.copy_(src)
        replay()
        return out


def _norm(w: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor:
    """A Llama-style RMSNorm's function in one op (computed in float32 like Hugging Face's module), weight ``w``."""
    return w * F.rms_norm(x.float(), w.shape, None, eps).to(x.dtype)


_MKL = torch.backends.mkl.is_available()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)``. On a CPU, a decoding pass's few tokens (2 to 64) against a large weight are computed as
    ``(w @ x.T).T``: MKL's product of a few rows with many outputs runs 2-6x slower there than the transposed one
    (two rows against a 2048 x 2048 weight 0.79 vs 0.44 ms, against an image span's 16k output columns 1.14 vs 0.52
    ms; at 128 rows or under 2^19 weights the plain product is as fast or faster), which made a guided image's two
    rows cost more than twice one. One token, prefills, GPUs and CPU builds without MKL (measured only with it) take
    ``F.linear``. Both round a batched row otherwise than the same row alone (MKL picks its kernels by the rows), so
    batches keep the same promise."""
    if x.device.type == "cpu" and _MKL and w.numel() >= 1 << 19 and 2 <= x.numel() // x.shape[-1] <= 64:
        xt = x.reshape(-1, x.shape[-1]).t()
        y = w @ xt if b is None else torch.addmm(b[:, None], w, xt)
        return y.t().contiguous().view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, b)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Decoder:
    """The forward pass of a supported Hugging Face causal LM, step by step over a ``KVCache``."""

    def __init__(self, model, compiled: bool = False):
        config = model.config
        kind = getattr(config, "model_type", "?")
        if kind not in SUPPORTED:
            raise OmnitokError(f"sampling supports {', '.join(SUPPORTED)} models; this one is {kind!r}")
        if getattr(config, "use_sliding_window", False) or (kind == "mistral" and config.sliding_window):
            raise OmnitokError("sampling does not support sliding-window attention")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise OmnitokError(f"sampling supports SiLU MLPs; this model uses {config.hidden_act!r}")
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers)
        attn = self.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps = config.rms_norm_eps  # every RMSNorm of these families (layers, QK-norm, final) uses it
        self.weights = []  # per layer, tensors only, read once: module attribute lookups cost more than a small matmul
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            qk_norm = (a.q_norm.weight, a.k_norm.weight) if hasattr(a, "q_norm") else (None, None)
            self.weights.append((layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight,
                                 a.k_proj.bias, a.v_proj.weight, a.v_proj.bias, *qk_norm, a.o_proj.weight,
                                 a.o_proj.bias, layer.post_attention_layernorm.weight, m.gate_proj.weight,
                                 m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias, m.down_proj.weight,
                                 m.down_proj.bias))
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        # torch.compile over one layer (dynamic shapes: the rows, the tokens fed and the cache length vary from step
        # to step without recompiling); embedding, RoPE tables, masks and cache bookkeeping stay in Python. Prefills
        # run eagerly: one pass each, compute-bound, and compiling them cost a graph for one row and one for more at
        # first use (CPU, `benchmarks.sample --compiled`: first runs 7.8 -> 5.8 s at batch 1, 8.7 -> 6.0 s at 8)
        self.static = compiled  # decoding passes in the static form (``_blocks`` with ``index``): compiled, graphs
        self.compiled = compiled
        self.layer = torch.compile(self._layer, dynamic=True) if compiled else self._layer
        self.graphs = CudaGraphs(self._static) if compiled and self.device.type == "cuda" else None

    def new_cache(self, rows: int, capacity: int = 64) -> KVCache:
        return KVCache(len(self.layers), rows, self.kv_heads, self.head_dim, self.dtype, self.device, capacity)

    def forward(self, cache: KVCache, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                columns: tuple[int, int] | None = None) -> torch.Tensor:
        """A prefill: feed ``ids`` (rows, t) at ``positions`` (rows, t); ``valid`` (rows, t) is False for padding.
        Returns the float32 logits after each row's last token (rows, V). With ``columns`` (lo, hi), only the logits
        of ids in [lo, hi) are computed and returned, (rows, hi - lo) (the tokens the next picks may take lie there:
        ``sampler.head_columns``). Always the sliced form, eagerly (also in a compiled decoder)."""
        return self._head(self._hidden(cache, ids, valid, positions, False)[:, -1], columns)

    def decode(self, cache: KVCache, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
               columns: tuple[int, int] | None = None) -> torch.Tensor:
        """A decoding pass: as ``forward``, but the logits after every fed token, (rows, t, V) (with ``columns``,
        (rows, t, hi - lo)): a one-token step (t = 1) or a window of drafts verified in one pass (speculative Jacobi
        decoding). Compiled, the static form (CUDA graphs on a GPU)."""
        return self._head(self._hidden(cache, ids, valid, positions, True), columns)

    def _head(self, h: torch.Tensor, columns: tuple[int, int] | None) -> torch.Tensor:
        """The output layer over hidden states ``h``, in float32; with ``columns`` (lo, hi), over those rows of its
        weight only, the logits of ids [lo, hi) (inside an image span that is the codes and the span's markers: about
        a third of a 52k vocabulary, and the same values as the whole product's columns)."""
        head = self.model.lm_head
        if columns is None:
            return _linear(h, head.weight, head.bias).float()
        lo, hi = columns
        return _linear(h, head.weight[lo:hi], None if head.bias is None else head.bias[lo:hi]).float()

    def window_width(self, longest: int, widest: int) -> int:
        """How many tokens a decoding pass feeds each row, given the longest row's (its last token and its drafts)
        and the widest window the settings allow (1 + ``sjd_window``): the longest; compiled, a window is padded to
        the widest, so that every window pass has one shape (one CUDA graph on a GPU, not one per width)."""
        return widest if self.static and longest > 1 else longest

    def _hidden(self, cache: KVCache, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                decode: bool) -> torch.Tensor:
        """The final normed hidden states of the fed tokens (rows, t, hidden); their keys and values go into
        ``cache``. ``decode``: a one-token step or a window (compiled: the graphs replayed step after step), not a
        prefill."""
        B, t = ids.shape
        cache.reserve(t)
        start, end = cache.length, cache.length + t
        cache.valid[:, start:end] = valid
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, positions)
        if self.static and decode:
            mask, _ = self._mask(cache, start, end, full=True)
            inputs = (x, cos[:, None], sin[:, None], mask, torch.arange(start, end, device=ids.device))
            x = self.graphs(cache, *inputs) if self.graphs else self._static(cache.keys, cache.values, *inputs)
        else:
            mask, causal = self._mask(cache, start, end)
            x = self._blocks(x, cos[:, None], sin[:, None], mask, causal, cache.keys, cache.values, start)
        cache.length = end
        return x

    def _blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, cache_keys: list[torch.Tensor], cache_values: list[torch.Tensor],
                start: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """Every decoder layer and the final norm over embedded tokens ``x`` (rows, t, hidden), their keys and values
        written into the cache's tensors at ``start``. With ``index`` (the columns ``start ...`` as a tensor) the
        static form: keys and values are written at ``index`` and attention reads the cache's whole capacity
        (``mask`` covers it), so neither shapes nor addresses depend on ``start`` (what a CUDA graph replays); its
        layers are ``layer`` (compiled or not). Without, the sliced form, always eager: prefills (one pass each,
        compute-bound) and an uncompiled decoder's passes."""
        group = self.heads // self.kv_heads
        if group > 1 and mask is not None:  # a row per grouped query (``_layer``), made once for every layer
            rows, _, t, width = mask.shape
            mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(rows, 1, group * t, width)
        layer = self._layer if index is None else self.layer
        # compiled, one code object serves every model in the process, a graph for each of one row or more, one
        # token or more: dynamo's default limit of 8 had the third model run eagerly, silently
        with torch._dynamo.config.patch(recompile_limit=64) if self.compiled else contextlib.nullcontext():
            for w, keys, values in zip(self.weights, cache_keys, cache_values):
                x = layer(x, cos, sin, mask, causal, w, keys, values, start, index)
        return _norm(self.body.norm.weight, self.eps, x)

    def _static(self, cache_keys: list[torch.Tensor], cache_values: list[torch.Tensor], x: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``_blocks`` in the static form, the cache first (what ``CudaGraphs`` captures)."""
        return self._blocks(x, cos, sin, mask, False, cache_keys, cache_values, 0, index)

    def _layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               weights: tuple, keys: torch.Tensor, values: torch.Tensor, start: int,
               index: torch.Tensor | None) -> torch.Tensor:
        """One decoder layer: tensor operations only, what ``torch.compile`` compiles (once for every layer)."""
        n1, wq, bq, wk, bk, wv, bv, qn, kn, wo, bo, n2, wg, bg, wu, bu, wd, bd = weights
        B, t, _ = x.shape
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        h = _norm(n1, self.eps, x)
        q = _linear(h, wq, bq).view(B, t, H, d)
        k = _linear(h, wk, bk).view(B, t, KV, d)
        v = _linear(h, wv, bv).view(B, t, KV, d).transpose(1, 2)
        if qn is not None:
            q, k = _norm(qn, self.eps, q), _norm(kn, self.eps, k)
        qk = _rotate(torch.cat([q, k], dim=2).transpose(1, 2), cos, sin)  # (B, H + KV, t, d)
        if index is None:
            keys[:, :, start:start + t] = qk[:, H:]
            values[:, :, start:start + t] = v
            keys, values = keys[:, :, :start + t], values[:, :, :start + t]
        else:
            keys.index_copy_(2, index, qk[:, H:])
            values.index_copy_(2, index, v)
        q, G = qk[:, :H], H // KV
        if G > 1 and not causal:
            # grouped-query attention without copying the cache: the G query heads that share a key / value head
            # (heads kv * G ... kv * G + G - 1, Hugging Face's repeat_kv order) become G * t queries of that head,
            # each under its own token's mask row (``_blocks`` repeats the rows); repeat_interleave wrote the whole
            # cache G times over per layer, which outweighed the weights' own reads at a long image span and 16 rows
            q = q.reshape(B, KV, G * t, d)
        elif G > 1:  # a causal prefill (SDPA's causal flag is per query index: it cannot take grouped queries)
            keys, values = keys.repeat_interleave(G, dim=1), values.repeat_interleave(G, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=self.scaling)
        x = x + _linear(out.reshape(B, H, t, d).transpose(1, 2).reshape(B, t, -1), wo, bo)
        h = _norm(n2, self.eps, x)
        return x + _linear(F.silu(_linear(h, wg, bg)) * _linear(h, wu, bu), wd, bd)

    @staticmethod
    def _mask(cache: KVCache, start: int, end: int, full: bool = False) -> tuple[torch.Tensor | None, bool]:
        """The attention mask of queries ``[start, end)`` over keys ``[0, end)`` (``full``: over the cache's whole
        capacity, always given, the static form): causal, padding hidden. Every query also sees itself, so a padding
        query never has an empty softmax (which would give NaN). Without padding, none (SDPA's causal flag)."""
        valid = cache.valid[:, :cache.capacity if full else end]
        if not full and (end - start == 1 or start == 0) and bool(valid.all()):
            return None, end - start > 1
        keys = torch.arange(valid.shape[1], device=valid.device)
        queries = torch.arange(start, end, device=valid.device)[:, None]
        mask = (keys[None, :] <= queries) & valid[:, None, :]  # (rows, t, keys)
        mask |= keys[None, :] == queries
        return mask[:, None], False
