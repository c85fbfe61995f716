"""GPTModel: token + position embeddings (or RoPE in the attention), a stack of TransformerBlocks,
final norm (LayerNorm, or RMSNorm: GPTConfig.norm), LM head."""
import collections
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tritongpt._types import is_int, is_real, loss_options, temperature_value
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.layers import (FeedForward, LayerNorm, MoEFeedForward, MultiHeadAttention, MXFP4MoEFeedForward,
                                    PerHeadNorm, RMSNorm, Rotary, SwiGLUFeedForward, TransformerBlock, document_starts,
                                    load_balancing_loss, make_norm, quantize_kv, rope_seq_len)
from tritongpt.model.layers import KV_CACHE_DTYPES
from tritongpt.model.lora import AdapterLinear
from tritongpt.model.quant import QUANTIZED_FROM, QuantLinear, quantized_layout, swap_layers
from tritongpt.model.toggle import resolve_kernels, spec_string


@functools.lru_cache(maxsize=None)
def _rounded(value: float, dtype) -> float:
    """value rounded to dtype, as a Python float: made once per (value, dtype), not a tensor per step."""
    return torch.tensor(value, dtype=dtype).item()


class KVCache:
    """Preallocated keys and values of every layer, [n_layer, B, kv_heads, max_len, head_dim]
    (kv_heads: n_kv_head, or n_head; grouped-query attention keeps a cache n_head / n_kv_head smaller).

    `pos` is how many positions are filled. A layer writes its new keys at [pos, pos+T) and
    attends over [0, pos+T); the model advances `pos` once all layers have run.

    `on_device` (set by a CUDA-graph decode step, train/generate.py's DecodeGraph, while it runs): the same
    forward without a host int in it. The fill is read from `fill`, a one-element tensor on the cache's
    device that the caller sets to `pos` before the step; the new keys are written at [fill, fill + T)
    with index_copy_, and each layer attends over the whole buffer with kv_len = fill + T (flash_attention's
    kv_len, the reference's masks likewise), so one captured step replays at every fill. Such a forward leaves the
    host `pos` alone (nor checks the context against it): its caller advances the fill and keeps it in range.

    kv_dtype "int8" (generate's --kv-cache-dtype int8): k and v are stored as int8 with one fp32 scale per
    (layer, row, kv head, position) vector, k_scale and v_scale [n_layer, B, kv_heads, max_len] (layers.quantize_kv:
    symmetric, absmax / 127 over head_dim), about half a 16-bit cache's bytes (nbytes). `dtype` is kept (the
    float cache's; both attention paths read an int8 cache back in q's dtype). update quantizes what it writes, and
    every layer's attention reads the cache's int8 values, the new tokens' own too: a prefill attends over the same
    dequantized keys a later decode step reads, so a prompt fed whole or in chunks gives the same logits.
    "auto" (or None): the keys' own dtype, as before.

    A fill a row (continuous batching, train/engine.py): `fill` an integer tensor [B] with on_device set, row b's new
    keys go to [fill[b], fill[b] + T) and row b attends over its own [0, fill[b] + T), its tokens at those positions:
    each row a request of its own length in one forward (both attention paths read kv_len [B]). The caller advances
    the fill (the host `pos` means nothing there) and keeps it within max_len - T. `row(i)` is row i as a cache of
    its own (a request's prefill writes there), `rows(slots, starts, bound)` several rows at their own starts (the
    engine's batched prefill), `copy_row` copies a row's keys to another.

    `bound` (first_rows(n, bound), an eager step's: None by default and in a CUDA graph, whose shapes must not
    change): a host int >= every row's kv_len, the positions update's views keep ([0, bound) rather than the whole
    buffers; a PagedKVCache's block table its first pages for them), so the reference core's matmuls and masks run
    over the longest row's length, not max_len (the Triton kernels read kv_len a row either way).
    """

    row_index = None  # rows(): the buffers' rows a view is, where they are not consecutive

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int | None = None,
                 device="cpu", dtype=torch.float32, kv_dtype: str | None = None):
        if not is_int(batch_size) or batch_size < 1:
            raise UserError(f"KV cache batch_size must be a positive int, got {batch_size!r}")
        self.max_len, self.quantized = _checked_cache_args(cfg, max_len, dtype, kv_dtype)
        self.dtype = dtype
        self._allocate((cfg.n_layer, batch_size, cfg.kv_heads, self.max_len, cfg.head_dim), device)
        self.pos = 0
        self.on_device = False
        self.fill = torch.zeros(1, dtype=torch.int64, device=device)  # the fill on the device (on_device)
        self.current = None  # extent(T) of the forward running on_device, made once for all its layers
        self.block_table = None  # (a PagedKVCache's: where each row's pages are)
        self.bound = None  # on_device: a host bound on every row's kv_len (first_rows), None: the whole buffers

    def _allocate(self, shape, device):
        """k and v of `shape` (int8 for an int8 cache, else self.dtype), and an int8 cache's fp32 scales."""
        store = torch.int8 if self.quantized else self.dtype
        self.k = torch.empty(shape, device=device, dtype=store)
        self.v = torch.empty(shape, device=device, dtype=store)
        # zeros, not empty: a CUDA-graph step reads the whole buffers (masked past the fill), never a NaN scale there
        self.k_scale = torch.zeros(shape[:-1], device=device, dtype=torch.float32) if self.quantized else None
        self.v_scale = torch.zeros(shape[:-1], device=device, dtype=torch.float32) if self.quantized else None

    def _stored(self, k, v):
        """(the buffers, the new values as they are stored): k and v, or an int8 cache's k, v and their scales.
        Refused with gradients on: written in place, one layer after another, autograd's saved keys would be
        changed under it (a backward fails as soon as the model has two layers)."""
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise UserError("the KV cache is for inference (generation, chunked prefill): run the model "
                            "under torch.no_grad(); a loss to differentiate needs the whole sequence in "
                            "one forward without a cache")
        new = [k, v]
        if self.quantized:
            (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
            new = [kq, vq, ks, vs]
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None], new

    @property
    def batch_size(self) -> int:
        return self.k.size(1) if self.row_index is None else self.row_index.numel()

    @property
    def kv_dtype(self) -> str:
        return "int8" if self.quantized else "auto"

    @property
    def nbytes(self) -> int:
        """The bytes the cache holds: keys and values, and with int8 their scales."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale)
                   if t is not None)

    def extent(self, T: int):
        """On the device (on_device): the positions [T] of a forward's T new tokens, fill .. fill + T - 1, and the
        fill after it, kv_len [1] (the keys the layers attend over). GPTModel.hidden makes them once a forward
        (`current`): three small kernels, not three a layer and a use (in a graph too, each is a launch)."""
        if self.current is not None and self.current[0].shape[-1] == T:
            return self.current
        steps = torch.arange(T, device=self.fill.device)
        if self.fill.numel() == 1:
            return self.fill + steps, self.fill + T
        if self.fill.shape != (self.batch_size,):
            raise UserError(f"a KV cache's fill is one length, or one a row ([{self.batch_size}]), got shape "
                            f"{tuple(self.fill.shape)}")
        return self.fill[:, None] + steps, self.fill + T  # [B, T] and [B]: a fill a row

    def update(self, layer: int, k, v):
        """Writes a layer's new keys and values k, v [B, kv_heads, T, head_dim] at [pos, pos + T) and returns
        (k, v, k_scale, v_scale) of the whole prefix [0, pos + T) (on_device: the whole buffers, or their first
        `bound` positions): the cache's own views, k and v int8 with their fp32 scales [B, kv_heads, pos + T] for an
        int8 cache, else in the cache's dtype with scales None."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise UserError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        bufs, new = self._stored(k, v)
        if self.on_device:  # the whole buffers (or the first `bound` positions): the keys past kv_len are masked
            index = self.extent(k.size(2))[0]
            # the buffers' rows this view is (rows(): row_index where they are not consecutive)
            own = slice(None) if self.row_index is None else self.row_index
            if index.dim() == 2:  # a fill a row
                rows = torch.arange(self.batch_size, device=index.device) if self.row_index is None else own
            for buf, t in zip(bufs, new):
                if index.dim() == 1:
                    buf[layer].index_copy_(2, index, t.to(buf.dtype))
                else:  # row b's T new vectors at its own positions index[b]: indexed [B, T, kv_heads(, head_dim)]
                    buf[layer][rows[:, None], :, index] = t.transpose(1, 2).to(buf.dtype)
            views = [buf[layer][own, :, :self.bound] for buf in bufs]
        else:
            for buf, t in zip(bufs, new):
                buf[layer, :, :, self.pos:end] = t
            views = [buf[layer, :, :, :end] for buf in bufs]
        return tuple(views) if self.quantized else (*views, None, None)

    def reset(self):
        self.pos = 0

    def row(self, i: int, start: int = 0) -> "KVCache":
        """Row i as a cache of batch 1 on the same storage (its own host pos, from `start`): a forward through it
        writes row i's keys from there (continuous batching prefills a new request into its slot so; start > 0:
        the next chunk of a prompt whose first `start` positions the row holds, the engine's chunked prefill)."""
        self._check_row(i)
        self._check_length(start)
        view = self._rows(i, i + 1)
        view.pos, view.on_device = int(start), False
        view.fill = torch.zeros(1, dtype=torch.int64, device=self.fill.device)
        return view

    def first_rows(self, n: int, bound: int | None = None) -> "KVCache":
        """Rows 0..n-1 as a cache of batch n on the same storage, their fill a view of this one's (a fill a row):
        the batching engine's decode step runs only the rows up to the last busy one. bound: the class's (the
        caller keeps every row's kv_len within it)."""
        if not is_int(n) or not 1 <= n <= self.batch_size:
            raise UserError(f"a KV cache of {self.batch_size} rows has 1..{self.batch_size} first rows, got {n!r}")
        if bound is not None and (not is_int(bound) or not 1 <= bound <= self.max_len):
            raise UserError(f"a KV cache's bound is 1..{self.max_len} positions (or None), got {bound!r}")
        if self.fill.shape != (self.batch_size,):
            raise UserError(f"first_rows needs a fill a row ([{self.batch_size}]), got shape {tuple(self.fill.shape)}")
        view = self._rows(0, n)
        view.fill = self.fill[:n]
        view.bound = bound
        if bound is not None and view.block_table is not None:  # (a paged one's pools are read through its table)
            view.block_table = view.block_table[:, :view.pages_for(bound)]
        return view

    def rows(self, slots: list, starts: list, bound: int) -> "KVCache":
        """Rows `slots` as a cache of their own, row j's fill from starts[j] on the device (a fill a row): a forward
        of T tokens a row writes row j's at [starts[j], starts[j] + T), each row attending over its own prefix. The
        batching engine's batched prefill runs several requests' chunks so, each right-padded to the longest: a
        padded token's key lands past its row's chunk, where the row's next write goes before anything reads it.
        bound: the class's (>= every starts[j] + T). Consecutive slots are a view of the buffers; others are
        read through `row_index` (update writes into those rows and reads their first `bound` positions back, a
        copy a layer: a PagedKVCache reads any rows in place through its table)."""
        if not slots:
            raise UserError("rows() needs at least one slot")
        for i in slots:
            self._check_row(i)
        if list(slots) == list(range(slots[0], slots[0] + len(slots))):
            return self._batch_view(self._rows(slots[0], slots[-1] + 1), starts, bound)
        view = copy.copy(self)
        view.row_index, view.current = torch.tensor(list(slots), dtype=torch.long, device=self.k.device), None
        return self._batch_view(view, starts, bound)

    def _batch_view(self, view, starts: list, bound: int) -> "KVCache":
        if len(starts) != view.batch_size or not is_int(bound) or not 1 <= bound <= self.max_len:
            raise UserError(f"rows() needs a start a row ({view.batch_size}) and a bound in 1..{self.max_len}, got "
                            f"{len(starts)} starts and bound {bound!r}")
        view.fill = torch.tensor(starts, dtype=torch.int64, device=self.fill.device)
        view.on_device, view.bound = True, bound
        return view

    def _rows(self, start: int, end: int) -> "KVCache":
        view = copy.copy(self)
        for name in ("k", "v", "k_scale", "v_scale"):
            t = getattr(self, name)
            setattr(view, name, None if t is None else t[:, start:end])
        view.current = None
        return view

    def copy_row(self, src: int, dst: int, length: int):
        """Row src's first `length` positions (an int8 cache's scales too) into row dst: a request of n samples
        prefills its prompt once and copies it to its other rows."""
        self._check_row(src)
        self._check_row(dst)
        self._check_length(length)
        for buf in (self.k, self.v, self.k_scale, self.v_scale):
            if buf is not None:
                buf[:, dst, :, :length] = buf[:, src, :, :length]

    def _check_row(self, i):
        if not is_int(i) or not 0 <= i < self.batch_size:
            raise UserError(f"KV cache rows are 0..{self.batch_size - 1}, got {i!r}")

    def _check_length(self, length):
        if not is_int(length) or not 0 <= length <= self.max_len:
            what = "a paged KV cache" if self.block_table is not None else "a KV cache"
            raise UserError(f"{what} row holds 0..{self.max_len} positions, got {length!r}")

    def crop(self, length: int):
        """Keep the first `length` positions only (speculative decoding drops the keys of rejected draft tokens).
        Nothing is erased: the next update writes from `length` on, and attention only reads [0, pos + T), so
        the stale keys past it are never seen (either attention path; an int8 cache's scales likewise)."""
        if not is_int(length) or not 0 <= length <= self.pos:
            raise UserError(f"a KV cache holding {self.pos} positions can be cropped to 0..{self.pos}, got {length!r}")
        self.pos = int(length)

    def reorder(self, index):
        """Row i becomes the old row index[i] (a LongTensor of batch_size row numbers, repeats allowed): beam search
        keeps the beams whose continuations it chose, some twice, each with the keys of the text it extends (and
        an int8 cache's scales with them)."""
        index = torch.as_tensor(index, device=self.k.device)
        if index.dtype != torch.long or index.shape != (self.batch_size,):
            raise UserError(f"a KV cache of {self.batch_size} rows is reordered by {self.batch_size} row numbers "
                            f"(a long tensor), got {tuple(index.shape)} {index.dtype}")
        if bool(((index < 0) | (index >= self.batch_size)).any()):
            raise UserError(f"KV cache rows are 0..{self.batch_size - 1}, got {index.tolist()}")
        # only the filled positions (those past pos are never read), a layer at a time: the copy each makes is
        # one layer's, not the whole cache's (as transformers' caches reorder)
        scales = (*self.k_scale, *self.v_scale) if self.quantized else ()
        for layer in (*self.k, *self.v, *scales):
            layer[:, :, :self.pos] = layer[index, :, :self.pos]


class PagedKVCache(KVCache):
    """A KV cache in pages (vLLM's PagedAttention, Kwon et al. 2023): keys and values of every layer in one pool of
    pages, [n_layer, num_pages, kv_heads, page_size, head_dim], and a block table [B, pages a row] naming the pages
    of each row in order, position n of row b in page table[b, n // page_size] at slot n % page_size. A row holds
    only the pages its text needs: requests of very different lengths share one pool, where a KVCache gives every
    row the longest text's room (continuous batching's memory, train/engine.py).

    Always a fill a row on the device (KVCache's on_device with fill [B]): row b's new keys go to its positions
    [fill[b], fill[b] + T), which `reserve(b, length)` must have given pages first (the host keeps the free list:
    reserve and release are host calls, between forwards; a position past a row's pages goes to a scratch page
    no row reads), and row b attends over its own [0, fill[b] + T). Both
    attention paths read the pages in place: the Triton kernels through the table (flash_attention's
    block_table), the reference by gathering each row's pages into the rows a KVCache would hold
    (layers.gather_pages). kv_dtype "int8" as KVCache's, the scales in pages too. row(i) is row i as a cache of
    its own whose fill starts at 0 (a request's prefill); copy_row copies a row's keys into another's pages.

    Shared pages (vLLM's automatic prefix caching): a page has a refcount, the rows whose tables name it. attach(row,
    pages) gives a row with no pages shared ones as its first, read-only: its writes start past them (row(i, start)
    refuses a start inside them), so a shared page is never written again. register(row, ids) enters the row's full
    blocks of its text ids in a prefix index, keyed by a hash chain (sha256 of the previous block's key and this
    block's token ids: a key names the whole prefix up to its block, so equal keys hold equal keys and values);
    lookup(ids) gives the pages of ids' longest cached run of full blocks. A cached page no row holds stays cached
    (evictable) until a reserve needs it: never-cached free pages go out first, then the cached ones least recently
    released first; `free` counts both."""

    def __init__(self, cfg: GPTConfig, batch_size: int, num_pages: int, page_size: int = 16,
                 max_len: int | None = None, device="cpu", dtype=torch.float32, kv_dtype: str | None = None):
        for name, n in (("batch_size", batch_size), ("num_pages", num_pages), ("page_size", page_size)):
            if not is_int(n) or n < 1:
                raise UserError(f"a paged KV cache's {name} must be a positive int, got {n!r}")
        self.max_len, self.quantized = _checked_cache_args(cfg, max_len, dtype, kv_dtype)
        self.dtype, self.page_size = dtype, page_size
        # one page more than asked: the scratch page, never given out, which every table entry of a row without a
        # page names, so a row the engine runs without a request (its stale fill) writes there, never into a
        # page another row holds
        self._allocate((cfg.n_layer, num_pages + 1, cfg.kv_heads, page_size, cfg.head_dim), device)
        self.scratch = num_pages
        # zeros: the engine's rows that ended read it past their pages, and their padding's logits must be finite
        # (a sampled draw refuses a NaN distribution), whatever memory the pool was given
        self.k[:, self.scratch], self.v[:, self.scratch] = 0, 0
        self.block_table = torch.full((batch_size, -(-self.max_len // page_size)), self.scratch, dtype=torch.int32,
                                      device=device)
        self.fill = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.pos, self.on_device, self.current, self.bound = 0, True, None, None
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the pages a release gave back go out first
        self.pages = [[] for _ in range(batch_size)]  # each row's pages, in order (the host's copy of the table)
        self.refs = [0] * num_pages  # the rows holding each page
        self.shared = [0] * batch_size  # each row's first pages it attached (read-only to it)
        self.index, self.key_of = {}, {}  # the prefix index: block key -> page, and back
        self.cached = collections.OrderedDict()  # cached pages no row holds (page -> key), least recently freed first

    @property
    def free(self) -> list:
        """The pages a reserve can take, the next one last: the cached ones no row holds (the most recently
        released taken last of all), then the never-cached free ones."""
        return [*reversed(self.cached), *self._free]

    @property
    def num_free(self) -> int:
        """len(free), without making the list (the engine asks at every admission)."""
        return len(self._free) + len(self.cached)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        page, key = self.cached.popitem(last=False)  # evicted: its block leaves the index
        del self.index[key], self.key_of[page]
        return page

    @property
    def batch_size(self) -> int:
        return self.block_table.size(0)

    @property
    def num_pages(self) -> int:
        """The pages rows can hold (the scratch page not counted)."""
        return self.k.size(1) - 1

    def pages_for(self, length: int) -> int:
        return -(-length // self.page_size)

    def reserve(self, row: int, length: int):
        """Give row `row` pages for positions [0, length) (the ones it has kept). Refused, with nothing taken, when
        the pool has too few free pages or length is past the row's max_len."""
        self._check_row(row)
        self._check_length(length)
        more = self.pages_for(length) - len(self.pages[row])
        free = self.num_free
        if more > free:
            raise UserError(f"the paged KV cache has {free} free pages of {self.page_size} positions; row "
                            f"{row} needs {more} more for {length} positions")
        if more > 0:
            new = [self._take() for _ in range(more)]
            for page in new:
                self.refs[page] = 1
            self._append(row, new)

    def _append(self, row: int, new: list):
        start = len(self.pages[row])
        self.pages[row] += new
        self.block_table[row, start:start + len(new)] = torch.tensor(new, dtype=torch.int32)

    def release(self, row: int):
        """Row `row`'s pages back to the pool (its request ended); its fill back to 0, its table to the scratch
        page. A page other rows still hold stays theirs; a cached one no row holds stays cached, evictable (its last
        block first: a prefix's first blocks are the ones most shared)."""
        self._check_row(row)
        for page in reversed(self.pages[row]):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.cached[page] = self.key_of[page]
                else:
                    self._free.append(page)
        self.pages[row], self.shared[row] = [], 0
        self.block_table[row] = self.scratch
        self.fill[row] = 0

    def block_keys(self, ids, salt: bytes = b"") -> list:
        """The keys of the full blocks of token ids [T] (a hash chain: each block's from the previous one's, the
        first's from salt: what else the keys and values depend on, a LoRA adapter's name; vLLM's extra keys)."""
        ids = ids.detach().to("cpu", torch.int64).contiguous().numpy()
        # (the salt hashed: as raw bytes, a 32-byte salt could equal some prefix's key, and start its chain)
        keys, key = [], hashlib.sha256(salt).digest() if salt else b""
        for j in range(len(ids) // self.page_size):
            key = hashlib.sha256(key + ids[j * self.page_size:(j + 1) * self.page_size].tobytes()).digest()
            keys.append(key)
        return keys

    def lookup(self, ids, salt: bytes = b"") -> list:
        """The cached pages of token ids' longest run of full blocks from the start (the pages to attach)."""
        pages = []
        for key in self.block_keys(ids, salt):
            if key not in self.index:
                break
            pages.append(self.index[key])
        return pages

    def attach(self, row: int, pages: list):
        """Row `row`, holding no pages, takes `pages` (cached ones, or another row's) as its first, shared and
        read-only: its fill starts past them (row(i, start))."""
        self._check_row(row)
        if self.pages[row]:
            raise UserError(f"row {row} holds {len(self.pages[row])} pages: only a row with none attaches shared ones")
        for page in pages:
            if self.refs[page] == 0 and page not in self.cached:
                raise UserError(f"page {page} is free: only a held or cached page is shared")
            self.cached.pop(page, None)  # held again: no longer evictable
            self.refs[page] += 1
        self._append(row, list(pages))
        self.shared[row] = len(pages)

    def register(self, row: int, ids, salt: bytes = b""):
        """Row `row`'s full blocks of its text ids [T] (prefilled: their keys in its first pages) into the prefix
        index (salt: block_keys'); a block already there keeps its page."""
        self._check_row(row)
        keys = self.block_keys(ids, salt)
        if len(keys) > len(self.pages[row]):
            raise UserError(f"row {row} holds {len(self.pages[row])} pages, not the {len(keys)} full blocks of its "
                            f"{len(ids)} tokens")
        for key, page in zip(keys, self.pages[row]):
            if key not in self.index and page not in self.key_of:
                self.index[key], self.key_of[page] = page, key

    def update(self, layer: int, k, v):
        """Writes row b's new keys and values k, v [B, kv_heads, T, head_dim] at its positions [fill[b], fill[b] + T)
        in its pages, and returns this layer's pools (k, v, k_scale, v_scale) with the scales None for a float cache;
        the attention reads them through block_table."""
        bufs, new = self._stored(k, v)
        positions = self.extent(k.size(2))[0]
        positions = positions.expand(k.size(0), -1) if positions.dim() == 1 else positions  # [B, T]
        page = self.block_table.gather(1, positions // self.page_size).long()
        slot = positions % self.page_size
        for buf, t in zip(bufs, new):  # each [B, T, kv_heads(, head_dim)] vector to its page and slot
            buf[layer][page, :, slot] = t.transpose(1, 2).to(buf.dtype)
        views = [buf[layer] for buf in bufs]
        return tuple(views) if self.quantized else (*views, None, None)

    def row(self, i: int, start: int = 0) -> "PagedKVCache":
        """Row i as a cache of batch 1 on the same pool and pages, its fill from `start` (a request's prefill, after
        reserve(i, length); start > 0: the rest of a prompt whose first `start` positions are cached). A start
        inside the row's shared pages is refused: it would write into pages other rows read."""
        self._check_length(start)
        self._check_start(i, start)
        view = self._rows(i, i + 1)
        view.fill = torch.full((1,), start, dtype=torch.int64, device=self.fill.device)
        return view

    def rows(self, slots: list, starts: list, bound: int) -> "PagedKVCache":
        """KVCache.rows for any slots (their block table's rows gathered: the pool read in place), the table cut to
        bound's pages; a start inside a row's shared pages refused (row()'s rule)."""
        for i, start in zip(slots, starts):
            self._check_start(i, start)
        view = copy.copy(self)
        index = torch.tensor(list(slots), dtype=torch.long, device=self.block_table.device)
        view.pages, view.current = [self.pages[i] for i in slots], None
        view.block_table = self.block_table[index, :self.pages_for(bound)]
        return self._batch_view(view, starts, bound)

    def _check_start(self, i: int, start: int):
        """Row i exists and a fill of its from `start` writes past its shared pages (other rows read them)."""
        self._check_row(i)
        if start < self.shared[i] * self.page_size:
            raise UserError(f"row {i}'s first {self.shared[i] * self.page_size} positions are in shared pages, "
                            f"never written: its fill starts at or past them, got {start}")

    def _rows(self, start: int, end: int) -> "PagedKVCache":
        """Rows start..end-1 on the same pool: their block table rows (first_rows: the engine's busy rows)."""
        view = copy.copy(self)
        view.block_table, view.pages, view.current = self.block_table[start:end], self.pages[start:end], None
        return view

    def copy_row(self, src: int, dst: int, length: int):
        """Row src's first `length` positions into row dst's pages (reserved first), page by page."""
        self._check_row(src)
        self._check_row(dst)
        self._check_length(length)
        n = self.pages_for(length)
        if len(self.pages[src]) < n or len(self.pages[dst]) < n:
            raise UserError(f"copying {length} positions needs {n} pages in both rows: reserve row {dst} first")
        pairs = [(a, b) for a, b in zip(self.pages[src][:n], self.pages[dst][:n]) if a != b]  # (a shared one: as is)
        if any(self.refs[b] > 1 or b in self.key_of for _, b in pairs):
            raise UserError(f"row {dst}'s first {n} pages include ones shared with other rows or cached: never "
                            "written, they are not copied into")
        if pairs:
            src_pages, dst_pages = (list(t) for t in zip(*pairs))
            for buf in (self.k, self.v, self.k_scale, self.v_scale):
                if buf is not None:
                    buf[:, dst_pages] = buf[:, src_pages]

    def reset(self):
        raise UserError("a paged KV cache is emptied a row at a time: release(row)")

    def crop(self, length: int):
        raise UserError("a paged KV cache keeps each row's length in its fill: set fill[row] (and release pages)")

    def reorder(self, index):
        raise UserError("a paged KV cache's rows are not reordered (beam search takes a KVCache)")


def entropy_of(logp_all, logits):
    """-sum p log p over the last dim of log_softmax(logits) (logp_all; logits only read where -inf): a -inf logit
    (a masked token) adds 0, not 0 * -inf = nan, and a row of only -inf logits (its log_softmax nan throughout) has
    entropy 0, as the loss kernel's (kernels/cross_entropy.py); a row with a nan logit stays nan."""
    # log p read as 0 at a -inf logit (every one of such a row's): p log p = 1 * 0 there, with no gradient through
    # it, not 0 * -inf (or nan) = nan
    logp = logp_all.masked_fill(logits == float("-inf"), 0.0)
    return -(logp.exp() * logp).sum(-1)


def _host_check(t) -> bool:
    """Whether ids in t can be checked on the host with a clear error: on the CPU, eager, outside a dispatch mode
    (torch.compile and make_fx's modes trace the values away)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()


def _checked_cache_args(cfg, max_len, dtype, kv_dtype) -> tuple:
    """A KV cache's (KVCache's, PagedKVCache's) length and storage checked: (max_len, whether it is int8)."""
    length = cfg.context_length if max_len is None else max_len
    if not is_int(length) or not 1 <= length <= cfg.context_length:
        raise UserError(f"KV cache length must be an int in [1, context_length {cfg.context_length}], got {max_len!r}")
    quantized = check_kv_cache_dtype(kv_dtype) == "int8"
    # int8 here made a float cache of int8 buffers that update truncated into, refused only at the first forward
    # and in other words: the int8 cache is kv_dtype's
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"KV cache dtype must be a float torch.dtype (the keys' compute dtype), got {dtype!r}; "
                        'an int8 cache is kv_dtype="int8"')
    return length, quantized


def check_kv_cache_dtype(kv_dtype) -> str:
    """A KV cache's storage by name: None or "auto" (the keys' own dtype) or "int8" (KVCache's quantized one)."""
    if kv_dtype is None:
        return "auto"
    if not isinstance(kv_dtype, str) or kv_dtype not in KV_CACHE_DTYPES:
        raise UserError(f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        # its own copy: set_kernels and set_dropout write to it, and another model built from
        # the same config object must not change with them
        cfg = self.config = copy.copy(cfg)
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        # GPT-2's learned absolute positions; with RoPE the attention rotates q and k instead, and
        # there is no such parameter (nor a pos_emb.weight in the state_dict)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd) if cfg.position_encoding == "learned" else None
        # BLOOM's word_embeddings_layernorm: the embeddings normalized before the first block
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop_emb = nn.Dropout(cfg.dropout)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = make_norm(cfg)
        # head_bias (Phi-1/1.5/2, GPT-J): a bias on every logit, its own parameter even when the weight is tied
        self.out_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=cfg.head_bias)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: the projections that write into the residual stream get std 0.02/sqrt(2 n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight", "w_down.weight", "ff.w_down")):  # (MoE's: ff.w_down)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        with torch.no_grad():  # padding rows (cfg.vocab_multiple) are no token: zero, and never trained
            self.tok_emb.weight[cfg.vocab_size:].zero_()
            self.out_head.weight[cfg.vocab_size:].zero_()  # (the head's bias starts zero: _init_weights)
        self.kernels = frozenset()
        # names only: a model is built on the CPU and may be moved to a GPU before it runs
        self.set_kernels(cfg.kernels, check_device=False)
        self.activation_checkpointing = False
        self.adapters = None  # serving LoRA adapters unmerged (model/lora.py serve_adapters): their AdapterRows
        if cfg.lora_rank:  # a saved LoRA model: its parametrizations, for its weights to load into
            from tritongpt.model.lora import attach_lora

            attach_lora(self)

    @classmethod
    def empty(cls, cfg: GPTConfig) -> "GPTModel":
        """GPTModel(cfg) with its parameters allocated on the CPU but not initialised (built on the
        meta device): for weights about to be copied over all of them, which random init would only
        delay (9.8 s of the 16.6 s a 0.6B-parameter Qwen2-shaped folder took to load on a 2-core CPU)."""
        with torch.device("meta"):
            model = cls(cfg)
        return model.to_empty(device="cpu")  # (the model has no buffers, which to_empty would leave unset)

    @classmethod
    def _empty_quantized(cls, cfg, path, meta, quantized_ok):
        """A quantized file's model, its QuantLinears (model/quant.py quantized_layout) and the rest allocated on the
        CPU but not filled: the float matrices are never made, so it loads where its float model would not fit."""
        mode, head, group = meta["quantized"], meta.get("quantized_head"), meta.get("quantized_group_size")
        # (int8 has a group size where its scales are a GPTQ 8-bit folder's groups, Int8Linear.group_size)
        if mode not in ("int8", "int4") or head not in ("true", "false") or (mode == "int4" and group is None):
            raise UserError(f"{path}: quantized {mode!r} (head {head!r}, group size {group!r}) is not a quantization "
                            "this version reads (int8, or int4 with a group size; head true or false)")
        if not quantized_ok and cfg.lora_rank:
            raise UserError(f"{path} is a QLoRA checkpoint (LoRA updates on an {mode} base): generate, chat, serve, "
                            "eval, hellaswag and lambada run it, `tritongpt export` writes it merged (the base "
                            "dequantized); to train on, resume its run (--resume) or start from the float model")
        # (older files, and those `tritongpt quantize` writes, have no quantized_from; an unknown one is not credited)
        made = QUANTIZED_FROM.get(meta.get("quantized_from"))
        made = ("a GGUF file's own quantization, saved" if made == "GGUF" else
                f"a Hugging Face {made} folder's own quantization, saved") if made else "`tritongpt quantize`"
        if not quantized_ok:
            raise UserError(f"{path} is {mode}-quantized ({made}), for inference: generate, chat, "
                            "serve, eval, hellaswag and lambada run it; train, export or merge the float weights it "
                            "was made from")
        if group is not None and not group.isdigit():
            raise UserError(f"{path}: quantized_group_size {group!r} is not a number (a damaged {mode} file)")
        # (a mixed GGUF file's layers of another layout than mode's: model/quant.py mixed_layout)
        other = _mixed_layers(path, meta["quantized_layers"]) if meta.get("quantized_layers") else {}
        check_quantized_dtypes(path, mode, other)
        with torch.device("meta"):  # a QLoRA checkpoint's updates go on the quantized layers, after the layout
            model = cls(dataclasses.replace(cfg, lora_rank=0) if cfg.lora_rank else cfg)
        try:
            model = quantized_layout(model, mode, head == "true", int(group or 0),
                                     int8_group_size=int(group) if group else None)
        except UserError as e:
            raise UserError(f"{path}: its {mode} layout does not fit its config ({e})") from None
        model.quantized_from = meta.get("quantized_from") if meta.get("quantized_from") in QUANTIZED_FROM else None
        if other:
            try:
                swap_layers(model, other)
            except (UserError, AttributeError) as e:
                raise UserError(f"{path}: its quantized_layers do not fit its config ({e})") from None
        _act_order_layers(model, path)
        if cfg.lora_rank:
            from tritongpt.model.lora import attach_lora

            model.config = cfg
            attach_lora(model)
        return model.to_empty(device="cpu").eval()

    def _apply(self, fn, *args, **kwargs):
        # A move that makes new tensors (to_empty() after building on the meta device) gives
        # each module its own parameter: tie the head to the embedding again.
        out = super()._apply(fn, *args, **kwargs)
        if self.config.tie_weights and isinstance(self.out_head, nn.Linear) \
                and self.out_head.weight is not self.tok_emb.weight:  # (a quantized head, model/quant.py, is its own)
            self.out_head.weight = self.tok_emb.weight
        return out

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- the toggle -------------------------------------------------------------------------
    def set_kernels(self, spec, check_device: bool = True):
        """Pick the path: "reference", "triton", "auto", or a subset of
        {"layernorm", "mlp", "attention", "cross_entropy", "rope"} (cross_entropy is the loss in
        forward(targets=); rope rotates q and k when GPTConfig.position_encoding is "rope";
        layernorm switches the model's norms, whichever GPTConfig.norm makes them: LayerNorm or RMSNorm;
        mlp the model's MLP, GELU or SwiGLU as GPTConfig.mlp says).

        Only flags change; the parameters (and so the state_dict) stay exactly as they are.
        check_device=False skips the check that the weights' device can run Triton (CUDA, or
        the CPU with the interpreter on), for a model about to be moved.
        """
        names = resolve_kernels(spec, self.tok_emb.weight.device, check_device)
        if "attention" in names:
            from tritongpt.kernels.attention import SUPPORTED_HEAD_DIMS

            if self.config.head_dim not in SUPPORTED_HEAD_DIMS:
                raise UserError(f"the Triton attention supports head dims {SUPPORTED_HEAD_DIMS}, and this "
                                f"model's is {self.config.head_dim} (n_embd {self.config.n_embd} / n_head "
                                f"{self.config.n_head}): leave 'attention' out of the kernels")
        if "rope" in names and self.config.position_encoding == "rope":
            from tritongpt.kernels.rope import MAX_HEAD_DIM

            if self.config.head_dim > MAX_HEAD_DIM:
                raise UserError(f"the Triton RoPE supports head dims up to {MAX_HEAD_DIM}, and this model's is "
                                f"{self.config.head_dim}: leave 'rope' out of the kernels")
        for m in self.modules():
            if isinstance(m, (LayerNorm, RMSNorm, PerHeadNorm)):
                m.use_triton = "layernorm" in names
            elif isinstance(m, (FeedForward, SwiGLUFeedForward, MoEFeedForward)):
                m.use_triton = "mlp" in names
            elif isinstance(m, MultiHeadAttention):
                m.use_triton = "attention" in names
            elif isinstance(m, Rotary):
                m.use_triton = "rope" in names
            elif isinstance(m, (QuantLinear, AdapterLinear)):  # quantized matmuls, served adapters: the matmul
                m.use_triton = "mlp" in names                  # kernels' name
        self.kernels = names
        self.config.kernels = spec_string(names)
        return self

    def set_activation_checkpointing(self, on: bool = True):
        """Keep only each block's input for backward and run the block's forward again there.

        A block's saved activations (its LayerNorm outputs, q/k/v, the attention output and
        logsumexp, the MLP's pre-activation, ...) are ~13x its input [B, T, C] on the Triton path
        in fp32 (the reference path keeps T x T attention weights too), so a training step then
        holds about one [B, T, C] tensor per layer, for one more forward pass of the blocks (a
        step costs ~1/3 more). Either kernel path; the gradients are the same as without (dropout
        masks included: the recomputation replays the RNG, and the Triton attention's seed is
        drawn from it, the generator of the activations' device, whose state the replay restores).
        Only where gradients are recorded: inference is unchanged.
        """
        if not isinstance(on, bool):  # 1 == True: a number would pass `in (True, False)`
            raise UserError(f"activation checkpointing is True or False, got {on!r}")
        self.activation_checkpointing = bool(on)
        return self

    def set_dropout(self, p: float):
        """Change every dropout rate (embeddings, attention weights, residual, MLP) and the config's."""
        if not is_real(p) or not 0.0 <= p < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {p!r}")
        for m in self.modules():
            if isinstance(m, nn.Dropout):  # attention's too: the Triton path reads its p
                m.p = float(p)
        self.config.dropout = float(p)
        return self

    # -- forward ----------------------------------------------------------------------------
    def hidden(self, idx, cache: KVCache | None = None, doc_ids=None):
        """Final-LayerNorm hidden states [B, T, C] (what the LM, value and reward heads read).

        doc_ids [B, T]: several documents packed in each row, a run of equal ids each. Each
        document's positions count from 0 and its tokens attend to its own tokens only, so a
        packed row computes what each of its documents would alone (SFT packing, and pretraining
        with documents kept apart)."""
        if cache is not None and not isinstance(cache, KVCache):
            raise UserError(f"the second argument is the KV cache, got {type(cache).__name__}: "
                            "pass targets by name, model(idx, targets=targets)")
        self._check_idx(idx)
        B, T = idx.shape
        if cache is not None:
            self._check_cache(cache, B)
        start = cache.pos if cache is not None else 0
        on_device = cache is not None and cache.on_device
        # (on_device: the positions are on the device; its callers keep them within the cache, DecodeGraph and the
        # engine on the host)
        if start + T > self.config.context_length and not on_device:
            raise UserError(f"sequence of {start + T} tokens exceeds the context length "
                            f"{self.config.context_length}")
        if on_device and self._rope_len(start, T, None, None) is not None:
            raise UserError("a LongRoPE model's rotation follows its text's length, a host int: it cannot run a KV "
                            "cache whose fill is on the device (a CUDA-graph step, continuous batching)")
        # on_device: every layer's positions and kv_len, cache.current from the try below (which clears it)
        current = cache.extent(T) if on_device else None
        pos = current[0] if current is not None else torch.arange(start, start + T, device=idx.device)
        if doc_ids is not None:
            self._check_doc_ids(idx, doc_ids, cache)
            pos = pos - document_starts(doc_ids)  # [B, T]: each document from position 0
        x = self.tok_emb(idx)
        if self.config.scale_embeddings:  # Gemma's sqrt(n_embd), rounded to the embeddings' dtype as Gemma's is
            x = x * _rounded(math.sqrt(self.config.n_embd), x.dtype)
        if self.config.embedding_multiplier != 1.0:  # Granite's (muP's): the embeddings times a float
            x = x * self.config.embedding_multiplier
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.pos_emb is not None:
            x, rope_pos = self.drop_emb(x + self.pos_emb(pos)), None
        else:  # RoPE: the positions go to each attention, which rotates q and k by them
            x, rope_pos = self.drop_emb(x), pos
        rope_len = self._rope_len(start, T, pos, doc_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        mlp_out = None  # the last block's MLP output: the LayerNorm after it adds it to x
        try:
            if current is not None:
                cache.current = current
            for block in self.trf_blocks:
                if recompute and cache is None:  # (a cache refuses gradients anyway)
                    if mlp_out is not None:  # added here, so that a checkpoint keeps one tensor, not two
                        x = x + mlp_out
                    x, mlp_out = torch.utils.checkpoint.checkpoint(block, x, None, doc_ids, None, rope_pos, rope_len,
                                                                   use_reentrant=False)
                else:
                    x, mlp_out = block(x, cache, doc_ids, mlp_out, rope_pos, rope_len)
        finally:
            if cache is not None:
                cache.current = None
        if cache is not None and not on_device:  # (on_device: the callers advance the fill)
            cache.pos += T
        return self.final_norm(x) if mlp_out is None else self.final_norm.add_and_norm(x, mlp_out)[1]

    def _rope_len(self, start, T, pos, doc_ids):
        """LongRoPE's length for this forward, transformers' max(position_ids) + 1, once for every layer
        (None for another RoPE: unused). Packed documents' positions are a tensor: one device sync a
        forward, only under longrope; else start + T, known on the host."""
        scaling = self.config.rope_scaling
        if self.pos_emb is not None or not scaling or scaling["rope_type"] != "longrope":
            return None
        return start + T if doc_ids is None else rope_seq_len(pos, T)

    @staticmethod
    def _check_doc_ids(idx, doc_ids, cache):
        if cache is not None:
            raise UserError("doc_ids (packed documents) are for training and scoring, not with a KV cache")
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.is_floating_point() or doc_ids.is_complex() \
                or doc_ids.dtype == torch.bool:
            what = doc_ids.dtype if isinstance(doc_ids, torch.Tensor) else type(doc_ids).__name__
            raise UserError(f"doc_ids must be an integer tensor of document ids, got {what}")
        if doc_ids.shape != idx.shape:
            raise UserError(f"doc_ids must have idx's shape {tuple(idx.shape)} (one document id per token), "
                            f"got {tuple(doc_ids.shape)}")
        if doc_ids.device != idx.device:
            raise UserError(f"doc_ids is on {doc_ids.device}, idx on {idx.device}")

    def _check_idx(self, idx):
        if not isinstance(idx, torch.Tensor):
            raise UserError(f"idx must be a [batch, time] tensor of token ids, got {type(idx).__name__}")
        if idx.dim() != 2:
            raise UserError(f"idx must be [batch, time] token ids, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise UserError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        self._check_token_ids(idx)

    def _check_cache(self, cache, B):
        """A cache made for another model (fewer layers, other heads) failed deep in a layer with an IndexError or a
        shape mismatch, and one of another float dtype in the attention's matmul."""
        if cache.batch_size != B:
            raise UserError(f"the KV cache holds {cache.batch_size} sequences, idx {B}: "
                            f"make it with model.new_cache({B})")
        cfg = self.config
        got = (cache.k.size(0), cache.k.size(2), cache.k.size(-1))
        if got != (cfg.n_layer, cfg.kv_heads, cfg.head_dim):
            raise UserError(f"the KV cache is for {got[0]} layers of {got[1]} kv heads of dim {got[2]}, this model "
                            f"has {cfg.n_layer} of {cfg.kv_heads} of dim {cfg.head_dim}: make it with "
                            f"model.new_cache({B})")
        # (under autocast the keys take the autocast dtype; an int8 cache is read back in q's dtype)
        w = self.tok_emb.weight
        if not cache.quantized and not torch.is_autocast_enabled(w.device.type) and cache.dtype != w.dtype:
            raise UserError(f"the KV cache holds {cache.dtype} keys and this model computes {w.dtype} ones: "
                            f"make it with model.new_cache({B})")

    def _check_token_ids(self, idx):
        """Ids must be in [0, vocab_size). nn.Embedding catches ids past its rows, but with a padded
        vocabulary the padding rows would be looked up silently. On the CPU a clear error (the
        check is cheap there); compiled on the CPU, or padded on a GPU, an asynchronous assert, so
        no step waits for it and the graph has no data-dependent branch. (Compiled on the CPU even
        unpadded: inductor's own bounds check there aborts the whole process. Unpadded on a GPU,
        the embedding's own device-side check suffices and a training step gains no launches.)"""
        V = self.config.vocab_size
        on_cpu = idx.device.type == "cpu"
        if _host_check(idx):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
                bad = idx[(idx < 0) | (idx >= V)][0]
                raise UserError(f"token id {int(bad)} is outside the model's vocabulary [0, {V})")
        elif on_cpu or self.config.padded_vocab_size != V:
            torch._assert_async(((idx >= 0) & (idx < V)).all(), f"token ids must be in [0, {V})")

    def forward(self, idx, cache: KVCache | None = None, targets=None, ignore_index: int = -100,
                reduction: str = "mean", doc_ids=None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                head_input: bool = False):
        """Logits [B, T, vocab_size] for every position (a view into the padded head's output when
        the vocabulary is padded); with targets [B, T] (idx's shape, integer ids), the LM loss instead:
        its mean over counted targets, or with reduction="none" each position's -log p (fp32 [B, T]).
        label_smoothing and z_loss: training objectives' options, as lm_loss takes them (0: plain CE).

        The loss is computed here, not by the caller, so that the toggle reaches it (and DDP and
        torch.compile see it as part of the model): reference lm_loss on the LM head's logits, or
        on the Triton path (kernels/cross_entropy.py) the LM head and the loss fused, the logits
        made a chunk of rows at a time and never whole (per-token losses: the fused
        cross-entropy on the logits, which never makes an fp32 copy of them).
        A mixture-of-experts model's mean loss gets GPTConfig.moe_aux_loss times its routers' load-balancing loss.
        head_input=True: what the LM head reads instead ([B, T, C], _head_input of hidden()), for a loss fused
        with the head outside the model (train/distill.py's linear_distill_loss); through forward, so that DDP
        and torch.compile see the call. No targets then.
        """
        if head_input:
            if targets is not None:
                raise UserError("forward(head_input=True) returns the LM head's input, not a loss: pass no targets")
            return self._head_input(self.hidden(idx, cache, doc_ids))
        loss = self._forward(idx, cache, targets, ignore_index, reduction, doc_ids, label_smoothing, z_loss)
        if targets is not None and self.config.moe_aux_loss and reduction == "mean":
            aux = self.config.moe_aux_loss * self.router_aux_loss()
            self.logged_moe_aux = aux.detach()  # the Trainer's moe_aux column (train/common.py's take_moe_aux)
            loss = loss + aux
        return loss

    def router_aux_loss(self, mask=None):
        """The load-balancing loss (layers.load_balancing_loss) of the last forward's routers, every layer's
        tokens together; what forward(targets=) adds times GPTConfig.moe_aux_loss to the mean loss (not to
        per-token or summed losses: the objectives that train on those, sft's sums or DPO's log-probs, add it
        themselves, train/common.py's moe_aux_term). None for a dense model.

        mask: None (every token: pretrain's windows have no padding), or the forward's [B, T] true at its real
        tokens: a padded batch's pad tokens are left out, as transformers' attention_mask leaves them out."""
        logits = [b.ff.router_logits for b in self.trf_blocks if isinstance(b.ff, MoEFeedForward)]
        if not logits:
            return None
        if mask is not None and mask.numel() != logits[0].shape[0]:
            raise ValueError(f"router_aux_loss: a mask of {tuple(mask.shape)} ({mask.numel()} tokens) for a "
                             f"forward of {logits[0].shape[0]} tokens: pass the last forward's [B, T]")
        return load_balancing_loss(logits, self.config.experts_per_token, mask)

    def _forward(self, idx, cache, targets, ignore_index, reduction, doc_ids, label_smoothing, z_loss):
        if targets is not None:
            targets = self._checked_targets(idx, targets, ignore_index, reduction)
        triton_loss = targets is not None and "cross_entropy" in self.kernels
        # (a quantized head, model/quant.py, makes its logits itself: the fused head + loss takes a float weight)
        if triton_loss and reduction != "none" and isinstance(self.out_head, nn.Linear):
            from tritongpt.kernels.cross_entropy import linear_cross_entropy

            h = self._head_input(self.hidden(idx, cache, doc_ids))
            return linear_cross_entropy(h, self.out_head.weight, targets, ignore_index, reduction,
                                        vocab_size=self.config.vocab_size, label_smoothing=label_smoothing,
                                        z_loss=z_loss,
                                        softcap=self.config.logit_softcap, bias=self.out_head.bias)
        h = self.hidden(idx, cache, doc_ids)
        if triton_loss:  # per-token losses: the kernel reads the padded rows whole, aligned
            from tritongpt.kernels.cross_entropy import cross_entropy

            return cross_entropy(self.out_head(self._head_input(h)), targets, ignore_index, reduction,
                                 vocab_size=self.config.vocab_size,
                                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=self.config.logit_softcap)
        logits = self.logits(h)
        if targets is None:
            return logits
        return lm_loss(logits, targets, ignore_index, reduction, label_smoothing, z_loss)

    def _checked_targets(self, idx, targets, ignore_index=-100, reduction="mean"):
        """targets as both loss paths take them: shaped like idx, integer ids (as int64: the
        reference's F.cross_entropy takes no other integer dtype), each in the vocabulary or ignore_index (on the
        CPU, as _check_token_ids: the reference loss raised a bare IndexError there, the Triton one checks its own)."""
        if reduction not in ("mean", "sum", "none"):
            raise UserError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not is_int(ignore_index):
            raise UserError(f"ignore_index must be an int, got {ignore_index!r}")
        if not isinstance(targets, torch.Tensor):
            raise UserError(f"targets must be a tensor of token ids, got {type(targets).__name__}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise UserError(f"targets must hold integer token ids, got dtype {targets.dtype}")
        if isinstance(idx, torch.Tensor) and targets.shape != idx.shape:
            raise UserError(f"targets must have idx's shape {tuple(idx.shape)} (one next token per "
                            f"position), got {tuple(targets.shape)}")
        targets, V = targets.long(), self.config.vocab_size
        if _host_check(targets):
            bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
            if bad.any():  # (the ids picked out only to name one)
                raise UserError(f"target {int(targets[bad][0])} is outside the model's vocabulary [0, {V}) and is "
                                f"not ignore_index ({ignore_index})")
        return targets

    def logits(self, h):
        """The LM head on hidden states (from hidden()): logits [..., vocab_size], a view that leaves
        a padded head's extra columns out (they are no token), for every caller alike; with the head's bias
        when GPTConfig.head_bias (Phi-1/1.5/2), as every loss path adds it; soft-capped
        to c * tanh(logits / c) when GPTConfig.logit_softcap is c > 0 (the Triton loss does the same
        inside its kernels: kernels/cross_entropy.py, softcap); scaled by GPTConfig.logit_scale first (Cohere's)."""
        logits = self.out_head(self._head_input(h))
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        V = self.config.vocab_size
        return logits if logits.shape[-1] == V else logits[..., :V]

    def token_logprobs(self, idx, temperature: float = 1.0, entropy: bool = False, hidden=None,
                       entropy_grad: bool = True):
        """(logp, entropy): log p(idx[:, t+1] | idx[:, :t+1]) for t < T-1, fp32 [B, T-1], and with entropy=True
        each of those positions' entropy -sum_j p_j log p_j, fp32 [B, T-1] (else None), both of
        softmax(logits / temperature): the distribution sampling draws from at that temperature (RL's old,
        new and reference log-probs). hidden: hidden(idx), when the caller has it (PolicyWithValue's value head
        reads the same trunk). entropy_grad=False: the entropy without a gradient (only logged).

        Reference path: log_softmax of the logits in fp32 over the whole vocabulary, [B, T-1, V] (and p log p as
        large again for the entropy). Triton path ("cross_entropy" in the kernels): kernels/cross_entropy.py's
        loss kernel, whose per-row loss is -logp and which sums the entropy in the same pass over the logits;
        with a plain nn.Linear head, the head fused with it (linear_cross_entropy), so the logits only ever
        exist a chunk of rows at a time and no fp32 copy of them at all."""
        temperature = temperature_value(temperature)
        for name, flag in (("entropy", entropy), ("entropy_grad", entropy_grad)):
            if not isinstance(flag, bool):  # as both paths read it (the kernel refuses a non-bool entropy)
                raise TypeError(f"token_logprobs: {name} must be a bool, got {type(flag).__name__}")
        if hidden is not None:  # (hidden() checks idx; a caller's hidden skips that: idx is the targets then)
            self._check_idx(idx)
        h = self.hidden(idx) if hidden is None else hidden
        if not isinstance(h, torch.Tensor) or h.shape != (*idx.shape, self.config.n_embd):
            raise UserError(f"token_logprobs: hidden must be hidden(idx), [{', '.join(map(str, idx.shape))}, "
                            f"{self.config.n_embd}], "
                            f"got {tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
        targets = idx[:, 1:]
        if "cross_entropy" in self.kernels:
            from tritongpt.kernels.cross_entropy import cross_entropy, linear_cross_entropy

            h = self._head_input(h[:, :-1])
            options = dict(reduction="none", vocab_size=self.config.vocab_size, softcap=self.config.logit_softcap,
                           temperature=temperature, entropy=entropy)
            if isinstance(self.out_head, nn.Linear):
                out = linear_cross_entropy(h, self.out_head.weight, targets, bias=self.out_head.bias, **options)
            else:  # a quantized head makes its logits itself
                out = cross_entropy(self.out_head(h), targets, **options)
            loss, ent = out if entropy else (out, None)
            return -loss, (ent if ent is None or entropy_grad else ent.detach())
        logits = self.logits(h)[:, :-1].float()
        logp_all = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if not entropy:
            return logp, None
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            return logp, entropy_of(logp_all, logits)

    def _head_input(self, h):
        """h as every LM-head path reads it: times GPTConfig.logit_scale when set, (s h) W^T = s (h W^T), so the
        fused head + loss kernel computes scaled logits unchanged (a bias, which the config refuses with a scale,
        would stay unscaled)."""
        return h * self.config.logit_scale if self.config.logit_scale != 1.0 else h

    def pad_vocab(self, multiple: int) -> "GPTModel":
        """This model with its embedding and LM head rows padded to a multiple of `multiple`
        (GPTConfig.vocab_multiple; 1 removes the padding): a new model with the same outputs, for
        fine-tuning published GPT-2 weights with the aligned head (`tritongpt sft --vocab-multiple`)."""
        from dataclasses import replace

        if not is_int(multiple):
            raise UserError(f"pad_vocab needs an int multiple, got {multiple!r}")
        if getattr(self, "quantized", None):
            raise UserError("pad_vocab is for fine-tuning the float weights; this model is quantized, for inference")
        # built on the CPU first: with the reference path, since Triton there needs the
        # interpreter (off on a GPU machine); the caller's kernels are set once it has moved
        cfg = replace(self.config, vocab_multiple=multiple, kernels="reference")  # checks multiple
        V, Vp = cfg.vocab_size, cfg.padded_vocab_size
        state = self.state_dict()
        for key in ("tok_emb.weight", "out_head.weight", "out_head.bias"):  # the tied head's key too: same tensor
            if key in state:  # a bias only with GPTConfig.head_bias
                rows = state[key][:V]
                state[key] = torch.cat([rows, rows.new_zeros(Vp - V, *rows.shape[1:])])
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not shift the caller's RNG
            new = GPTModel(cfg)
        new.load_state_dict(state)
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        for name, p in new.named_parameters():
            p.requires_grad_(name not in frozen)
        w = self.tok_emb.weight
        new.set_activation_checkpointing(self.activation_checkpointing)
        return new.to(w.device, w.dtype).set_kernels(self.config.kernels).train(self.training)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, kv_dtype: str | None = None
                  ) -> KVCache:
        """A preallocated KV cache in the dtype the keys will have: under autocast (bf16 on a
        GPU) the projections run in the autocast dtype, so an fp32 cache would double its memory
        and hand the attention mixed dtypes. kv_dtype "int8": stored as int8 with a scale per
        vector, read back in q's dtype (KVCache)."""
        return KVCache(self.config, batch_size, max_len, self.tok_emb.weight.device, self._cache_dtype(dtype), kv_dtype)

    def _cache_dtype(self, dtype=None):
        w = self.tok_emb.weight
        if dtype is None:
            autocast = torch.is_autocast_enabled(w.device.type)
            dtype = torch.get_autocast_dtype(w.device.type) if autocast else w.dtype
        return dtype

    def new_paged_cache(self, batch_size: int, num_pages: int, page_size: int = 16, max_len: int | None = None,
                        dtype=None, kv_dtype: str | None = None) -> PagedKVCache:
        """A PagedKVCache of num_pages pages in the dtype the keys will have (as new_cache)."""
        return PagedKVCache(self.config, batch_size, num_pages, page_size, max_len, self.tok_emb.weight.device,
                            self._cache_dtype(dtype), kv_dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without position embeddings
        (a RoPE model has none to leave out)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    # -- weights on disk --------------------------------------------------------------------
    def save(self, path, extra_metadata: dict | None = None):
        """Weights as safetensors, with the config (and any extra strings) in its metadata."""
        if any(isinstance(m, MXFP4MoEFeedForward) for m in self.modules()):
            # (no checkpoint layout says them: GPTModel.load would build float experts and refuse the blocks)
            raise UserError("this model's experts are kept MXFP4 (a GPT-OSS folder's): a tritongpt checkpoint does "
                            "not hold them; export_gpt_oss writes them back as they are, or load the folder "
                            "dequantized (load_gpt_oss_safetensors(path, quantized=False)) to save a float model")
        meta = {"config": json.dumps(self.config.to_dict()), "format": "tritongpt", **self.quantized_metadata()}
        taken = sorted(set(extra_metadata or {}) & set(meta))
        if taken:  # they say how to read the file: another value would make it unloadable
            raise UserError(f"extra_metadata may not set {', '.join(taken)}: save() writes them")
        save_safetensors(self, path, {**meta, **(extra_metadata or {})})

    def quantized_metadata(self) -> dict:
        """How a quantized model's file says it is quantized (model/quant.py; _empty_quantized reads it): its
        int8/int4 matrices and scales are saved as they are. {} for a float model. (A reward model's file says
        the same of its backbone.)"""
        if not getattr(self, "quantized", None):
            return {}
        meta = {"quantized": self.quantized, "quantized_head": str(self.quantized_head).lower()}
        if self.quantized_group_size:
            meta.update(quantized_group_size=self.quantized_group_size)
        if getattr(self, "quantized_from", None):  # (a Hugging Face folder's own quantization, kept: hf_quant.py)
            meta.update(quantized_from=self.quantized_from)
        if getattr(self, "quantized_layers", None):  # (a mixed GGUF file's layers of another layout: mixed_layout)
            meta.update(quantized_layers=json.dumps({n: list(lg) for n, lg in self.quantized_layers.items()}))
        return meta

    @classmethod
    def load(cls, path, map_location="cpu", kernels=None, quantized_ok: bool = False) -> "GPTModel":
        """A model saved by save(): its config, its weights as fp32 parameters (what training
        keeps; autocast makes the bf16 copies), in train mode like any new module.

        A quantized one (`tritongpt quantize`, model/quant.py) only where quantized_ok (the commands that run a
        model: generate, chat, serve, eval, hellaswag, lambada): its Linears are Int8Linears or Int4Linears, in eval
        mode."""
        from pathlib import Path

        if not isinstance(quantized_ok, bool):  # ("no" is truthy: it would let a quantized file in)
            raise UserError(f"quantized_ok must be True or False, got {quantized_ok!r}")
        if not Path(path).is_file():
            raise UserError(f"weights file not found: {path}")
        try:  # (safetensors' own error came after reading the file's header, naming no argument)
            torch.device(map_location)
        except (RuntimeError, TypeError):
            raise UserError(f"map_location: unknown device {map_location!r}; use cpu, cuda or cuda:N") from None
        if kernels is not None:
            resolve_kernels(kernels, map_location, check_device=False)  # (a bad name refused before the weights load)
        meta = safetensors_metadata(path)
        if meta.get("kind") == "reward_model":
            raise UserError(f"{path} is a reward model (a scalar head, not an LM head): "
                            "pass it as --reward (or to `reward --init`, to train it on), or load it with "
                            "tritongpt.train.reward.RewardModel.load")
        if "config" not in meta:
            raise UserError(f"{path} has no tritongpt config in its metadata "
                            "(for Hugging Face GPT-2 files use tritongpt.train.gpt2_weights)")
        cfg = saved_config(path, meta)
        cfg.kernels = "reference"
        if meta.get("quantized"):
            model = cls._empty_quantized(cfg, path, meta, quantized_ok)
        else:
            model = cls.empty(cfg)  # every tensor comes from the file (load_saved_weights refuses one missing)
        load_saved_weights(model, path, map_location)
        if meta.get("quantized"):
            check_quantized_scales(model, path)
        model.to(map_location)
        if kernels is not None:
            model.set_kernels(kernels)
        return model


def save_safetensors(module: nn.Module, path, metadata: dict):
    """module's weights (shared tensors once) to path as safetensors, readable like any other
    file the run writes: safetensors creates its files owner-only (0600), whatever the umask."""
    from safetensors.torch import save_model

    save_model(module, str(path), metadata={k: str(v) for k, v in metadata.items()})
    readable_like_other_files(path)


def readable_like_other_files(path):
    """Give a file safetensors wrote owner-only (0600) the umask's usual permissions."""
    umask = os.umask(0)  # the only portable way to read the umask is to set it, then put it back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def safetensors_metadata(path) -> dict:
    """The metadata of a .safetensors file; a file that is not one (a state.pt, a truncated
    download) is a one-line UserError, not safetensors' own exception."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise unreadable_safetensors(path, e) from None


def saved_config(path, meta: dict) -> GPTConfig:
    """The GPTConfig in a tritongpt file's metadata; damaged JSON is a UserError naming the file."""
    try:
        d = json.loads(meta["config"])
    except ValueError as e:
        raise UserError(f"{path}: its saved model config is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: its saved model config is a JSON {type(d).__name__}, not an object")
    try:
        return GPTConfig.from_dict(d)
    except UserError as e:
        raise UserError(f"{path}: its saved model config: {e}") from None


def load_saved_weights(module: nn.Module, path, map_location="cpu"):
    """path's tensors into module (built from the config saved with them): a tensor missing,
    extra or of another shape (a damaged file, or its config edited) is a UserError naming the
    file and the tensors, not torch's traceback; so is a weight that is NaN or inf."""
    from safetensors.torch import load_model

    try:
        load_model(module, str(path), device=str(map_location))
    except RuntimeError as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        why = why if len(why) <= 300 else why[:300] + "..."
        raise UserError(f"{path}: its tensors do not fit its saved model config ({why})") from None
    check_finite_weights(module, path)


def _mixed_layers(path, text: str) -> dict:
    """The saved quantized_layers ({name: [mode, group size]}, a mixed GGUF file's other layers) as {name: (mode,
    group size)}; anything else refused by name (a damaged file)."""
    try:
        layers = json.loads(text)
    except ValueError:
        layers = None
    if not isinstance(layers, dict) or not all(
            isinstance(v, list) and len(v) == 2 and v[0] in ("int8", "int4") and is_int(v[1]) for v in layers.values()):
        raise UserError(f"{path}: quantized_layers {text[:80]!r} is not {{layer: [\"int8\" or \"int4\", group size]}} "
                        "(a damaged file)")
    return {n: (m, int(g)) for n, (m, g) in layers.items()}


def _act_order_layers(model, path):
    """The Int4Linears of a quantized file's layout (on the meta device) given the in_perm buffer the file holds for
    them (an act-order GPTQ layer's, model/quant.py Int4Linear), so that it loads into them; a reward model's file
    names them under its backbone."""
    from safetensors import safe_open

    from tritongpt.model.quant import Int4Linear

    with safe_open(str(path), framework="pt") as f:
        perms = [k.removesuffix(".in_perm") for k in f.keys() if k.endswith(".in_perm")]
    if not perms:
        return
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear) and any(k == name or k.endswith("." + name) for k in perms):
            m.in_perm = torch.empty(m.in_features, dtype=torch.int64, device=m.qweight.device)


def check_quantized_scales(model, path):
    """A UserError naming the first quantized layer of a loaded int8/int4 file whose scales are not all positive:
    quantize_weight(_int4) makes every scale > 0 (a row or group with no range gets 1), so a 0 or negative one is a
    damaged file (a zeroed or sign-flipped row), not a model. NaN and inf are check_finite_weights'. Likewise an
    act-order layer's in_perm that is not a permutation of its inputs."""
    from tritongpt.model.quant import check_in_perm

    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.scale.numel() and not bool((m.scale > 0).all()):
            raise UserError(f"{path}: tensor {name}.scale holds a scale of 0 or below ({m.mode} scales are "
                            "positive: a damaged file)")
        if isinstance(m, QuantLinear) and getattr(m, "in_perm", None) is not None:
            check_in_perm(m.in_perm, m.in_features, f"{path}: tensor {name}.in_perm")


QUANTIZED_DTYPES = {  # (safetensors dtype, name) of each quantized tensor an int8/int4 file must hold
    "int8": {".qweight": ("I8", "int8"), ".scale": ("F32", "fp32")},
    "int4": {".qweight": ("U8", "uint8"), ".scale": ("F32", "fp32"), ".offset": ("F32", "fp32"),
             ".in_perm": ("I64", "int64")},  # (an act-order GPTQ layer's input order, where it has one)
}


def check_quantized_dtypes(path, mode: str, other: dict | None = None):
    """A UserError naming the first quantized matrix of an int8/int4 file (`tritongpt quantize`) not stored as its
    mode stores it (int8; int4's packed uint8), or a scale (offset) that is not fp32: loading casts whatever the file
    holds into those buffers, so a foreign layout (uint8 read as int8: 128..255 wrapped to negatives) or a scale cut
    to bf16 would load as another model. other: {layer: (mode, group)} of layers of another mode (a mixed file's)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            layer = name.rpartition(".")[0]  # (a reward model's file names its backbone's layers "backbone.*")
            layer_mode = next((m for n, (m, _) in (other or {}).items() if layer == n or layer.endswith("." + n)), mode)
            want = QUANTIZED_DTYPES[layer_mode]
            suffix = next((s for s in want if name.endswith(s)), None)
            if suffix and (dtype := f.get_slice(name).get_dtype()) != want[suffix][0]:
                raise UserError(f"{path}: tensor {name} is {dtype}, not {want[suffix][1]} (a damaged {layer_mode} "
                                "file, or one another tool wrote: quantize the float weights with `tritongpt "
                                "quantize`)")


def check_finite_weights(module: nn.Module, path):
    """A UserError naming the first tensor of module's that holds NaN or inf: such a file (damaged,
    or saved from a diverged run) would give NaN losses or crash sampling, far from the cause."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point() and t.numel() and not all_finite(t):
                raise UserError(f"{path}: tensor {name} holds NaN or inf values (a damaged checkpoint)")


def all_finite(t: torch.Tensor) -> bool:
    """Whether t (non-empty) holds no NaN or inf: its min and max are finite, as NaN propagates to
    both. One pass and no copy, where isfinite(t).all() writes a bool per element first: 13 ms
    against 850 ms for 150M fp32 elements on a 2-core CPU."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def unreadable_safetensors(path, e: Exception) -> UserError:
    """safetensors' own error about a file (truncated, foreign), as one line naming the file."""
    first = str(e).splitlines()[0] if str(e) else ""
    return UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {first})")


def lm_loss(logits, targets, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
            z_loss: float = 0.0):
    """Mean next-token cross-entropy over positions whose target is not ignore_index (in fp32);
    reduction "sum" or "none" (per position, shaped like targets; ignored positions are 0).
    label_smoothing: PyTorch's (the target spreads that much of its weight over all classes).
    z_loss: PaLM's auxiliary z_loss * logsumexp(logits)^2 per counted position, which keeps the
    softmax's normaliser near 1 (a coefficient: 1e-4 in PaLM; 0, the default, adds nothing).

    The reference loss. Triton twins: kernels/cross_entropy.py, cross_entropy (on logits) and
    linear_cross_entropy (the LM head and the loss together), used by
    GPTModel.forward(idx, targets=...) when the toggle includes "cross_entropy"."""
    label_smoothing, z_loss = loss_options(label_smoothing, z_loss)
    flat, flat_targets = logits.flatten(0, 1).float(), targets.flatten()
    loss = F.cross_entropy(flat, flat_targets, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        counted = flat_targets != ignore_index
        z = torch.where(counted, z_loss * torch.logsumexp(flat, -1).square(), 0.0)
        loss = loss + (z if reduction == "none" else z.sum() if reduction == "sum" else z.sum() / counted.sum())
    return loss.view(targets.shape) if reduction == "none" else loss
