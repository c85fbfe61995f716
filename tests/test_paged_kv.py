"""A paged KV cache (model/gpt.py PagedKVCache, flash_attention(block_table=)): keys in pages of a shared pool,
each row's pages named by its block table, in any order.

Each row of a batched step must compute what it computes alone with a KVCache (tests/test_kv_rows.py's rule),
whatever order its pages lie in, whatever the pool holds elsewhere (NaN here), for pages smaller than, equal to
and larger than the kernels' KV tile (16 keys under the interpreter)."""
import pytest
import torch

from parity import assert_close_rel
from test_attention import make_qkv
from test_decode_graph import CASES, VOCAB, tiny
from test_flash_decoding import reference_gqa
from test_kv_rows import PROMPTS, STEPS, alone
from tritongpt.errors import UserError
from tritongpt.kernels.attention import flash_attention
from tritongpt.model.layers import gather_pages


def paged(model, prompts, steps, kv_dtype, page_size):
    """The rows' prompts prefilled into their pages (reserved in turn, so the rows' pages interleave), then one
    forward a step over all rows."""
    cache = model.new_paged_cache(len(prompts), 24, page_size, max_len=16, kv_dtype=kv_dtype)
    for buf in (cache.k, cache.v):
        if buf.is_floating_point():
            buf.fill_(float("nan"))
    total = [p.numel() + steps.size(1) for p in prompts]
    for n in range(1, max(total) + 1):  # a page at a time, row after row: each row's pages scattered in the pool
        for i, t in enumerate(total):
            cache.reserve(i, min(n, t))
    for i, p in enumerate(prompts):
        model(p[None], cache.row(i))
    cache.fill.copy_(torch.tensor([p.numel() for p in prompts]))
    out = []
    for t in range(steps.size(1)):
        out.append(model(steps[:, t:t + 1], cache))
        cache.fill += 1
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("kernels,case,kv_dtype,page", [("reference", c, "auto", 4) for c in CASES]
                         + [("reference", "rope-gqa", "int8", 8), ("triton", "gpt2", "auto", 8),
                            ("triton", "window-softcap", "int8", 16), ("triton", "rope-gqa", "auto", 32)])
def test_each_row_of_a_paged_step_decodes_as_it_would_alone(kernels, case, kv_dtype, page):
    """Triton: each row alone on the reference path (as in tests/test_kv_rows.py); the float cases one layer, the
    int8 one two: the only interpreted decode where a layer's pages, int8 scales and device fill are read (~5 ms a
    Triton program)."""
    model = tiny(kernels, n_layer=1 if kernels == "triton" and kv_dtype == "auto" else 2, **CASES[case])
    g = torch.Generator().manual_seed(page)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in PROMPTS]
    steps = torch.randint(0, VOCAB, (len(PROMPTS), STEPS), generator=g)
    with torch.no_grad():
        got, cache = paged(model, prompts, steps, kv_dtype, page)
        model.set_kernels("reference")
        if page < 16:  # the rows' pages really are scattered: no row of several pages has them in one run
            several = [r for r in cache.pages if len(r) > 1]
            assert several and all(r != list(range(r[0], r[0] + len(r))) for r in several), cache.pages
        for i, p in enumerate(prompts):
            want = torch.stack(alone(model, p, steps[i], kv_dtype))
            assert_close_rel(got[i], want, 1e-5, f"{kernels} {case} {kv_dtype} page {page} row {i}")


@pytest.mark.parametrize("splits", [1, 2], ids=["single", "split2"])
@pytest.mark.parametrize("page,D", [(8, 32), (32, 80)])
def test_flash_attention_reads_each_rows_pages(page, D, splits, forced_splits, device):
    """flash_attention(block_table=) row b against float64 over the keys its pages hold in order (the rest of the
    pool NaN), GQA (packed on the split path), int8 with its scales in pages, a window, a cap and ALiBi; a head dim
    the kernels pad (80 in a 128-wide tile: the padded columns of a page's rows masked)."""
    forced_splits(splits)
    B, Hkv, pages = 3, 2, 24
    lens = [3, 37, 20]
    q, _, _ = make_qkv(B, 4, 3, 1, D, torch.float32, device, seed=page)
    k = torch.full((pages, Hkv, page, D), float("nan"), device=device)
    v = k.clone()
    table = torch.zeros(B, -(-40 // page), dtype=torch.int32, device=device)
    order = torch.randperm(pages, generator=torch.Generator().manual_seed(page)).tolist()
    for b, L in enumerate(lens):
        for j in range(-(-L // page)):
            table[b, j] = order.pop()
            k[table[b, j]] = torch.randn(Hkv, page, D, device=device)
            v[table[b, j]] = torch.randn(Hkv, page, D, device=device)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    kv_len = torch.tensor(lens, device=device)
    for kw in (dict(), dict(window=7, softcap=3.0, alibi_slopes=slopes)):
        with torch.no_grad():
            got = flash_attention(q, k, v, kv_len=kv_len, block_table=table, **kw)
        rows_k, rows_v = gather_pages(k, table), gather_pages(v, table)
        for b, L in enumerate(lens):
            ref = reference_gqa(q[b:b + 1].double(), rows_k[b:b + 1, :, :L].double(),
                                rows_v[b:b + 1, :, :L].double(), **kw)
            assert_close_rel(got[b:b + 1], ref, 1e-4, f"page {page} D {D} row {b} {sorted(kw)}")
    # int8: the scales in pages beside the values (the reference: the same int8 rows read back)
    kq = torch.randint(-127, 128, k.shape, dtype=torch.int8, device=device)
    vq = torch.randint(-127, 128, v.shape, dtype=torch.int8, device=device)
    ks, vs = (torch.rand(k.shape[:3], device=device) / 50 for _ in range(2))
    with torch.no_grad():
        got = flash_attention(q, kq, vq, kv_len=kv_len, block_table=table, k_scale=ks, v_scale=vs)
    rows_k = gather_pages(kq, table).double() * gather_pages(ks, table).double()[..., None]
    rows_v = gather_pages(vq, table).double() * gather_pages(vs, table).double()[..., None]
    for b, L in enumerate(lens):
        ref = reference_gqa(q[b:b + 1].double(), rows_k[b:b + 1, :, :L], rows_v[b:b + 1, :, :L])
        assert_close_rel(got[b:b + 1], ref, 1e-4, f"int8 page {page} D {D} row {b}")


def test_pages_are_reserved_released_and_reused_and_a_full_pool_refuses():
    model = tiny("reference")
    cache = model.new_paged_cache(2, 5, 4, max_len=16)
    cache.reserve(0, 9)  # 3 pages
    cache.reserve(0, 5)  # kept: a row never shrinks by reserve
    assert len(cache.pages[0]) == 3 and len(cache.free) == 2
    assert cache.block_table[0, :3].tolist() == cache.pages[0]
    with pytest.raises(UserError, match="has 2 free pages of 4 positions; row 1 needs 3 more for 12 positions"):
        cache.reserve(1, 12)
    assert cache.pages[1] == [] and len(cache.free) == 2  # nothing taken by a refusal
    first = list(cache.pages[0])
    cache.release(0)
    # the row's table names the scratch page (never given out): a stale fill's write lands there, not in a held page
    assert cache.pages[0] == [] and len(cache.free) == 5 and cache.block_table[0].tolist() == [5] * 4
    assert cache.num_pages == 5 and cache.k.size(1) == 6
    cache.reserve(1, 12)
    assert cache.pages[1] == first  # the released pages out first, in their order
    with pytest.raises(UserError, match=r"a paged KV cache row holds 0..16 positions, got 17"):
        cache.reserve(0, 17)
    with pytest.raises(UserError, match=r"KV cache rows are 0..1, got 2"):
        cache.release(2)
    with pytest.raises(UserError, match="reserve row 0 first"):
        cache.copy_row(1, 0, 5)
    for call, said in ((cache.reset, "release"), (lambda: cache.crop(1), "fill"),
                       (lambda: cache.reorder(torch.tensor([1, 0])), "beam search takes a KVCache")):
        with pytest.raises(UserError, match=said):
            call()
    with pytest.raises(UserError, match="num_pages must be a positive int, got 0"):
        model.new_paged_cache(2, 0)


def test_shared_pages_are_refcounted_cached_by_a_hash_chain_and_evicted_least_recently_freed():
    """Prefix caching's bookkeeping (the engine's use: tests/test_engine.py). A block's key is its whole prefix's:
    block B after A is not block B after C. A cached page no row holds is free but stays in the index until a reserve
    takes it, the never-cached pages first; a shared page is never written (row(i, start) and copy_row refuse)."""
    model = tiny("reference")
    cache = model.new_paged_cache(3, 6, 4, max_len=16)
    A, B, C = (torch.randint(0, VOCAB, (4,), generator=torch.Generator().manual_seed(i)) for i in range(3))
    cache.reserve(0, 9)
    cache.register(0, torch.cat([A, B, C[:1]]))  # 2 full blocks
    assert cache.lookup(torch.cat([A, B, C])) == cache.pages[0][:2] and cache.lookup(torch.cat([B, A])) == []
    cache.attach(1, cache.lookup(torch.cat([A, C])))  # A's page only
    cache.reserve(1, 8)
    cache.register(1, torch.cat([A, C]))
    assert cache.lookup(torch.cat([A, C])) == [cache.pages[0][0], cache.pages[1][1]]
    assert cache.refs[cache.pages[0][0]] == 2 and cache.shared == [0, 1, 0]
    cache.reserve(2, 4)
    cache.register(2, C)
    assert cache.lookup(torch.cat([C, B])) == cache.pages[2]  # C's page, not A's B after it
    with pytest.raises(UserError, match="row 1's first 4 positions are in shared pages, never written: .* got 3"):
        cache.row(1, start=3)
    with pytest.raises(UserError, match="include ones shared with other rows or cached"):
        cache.copy_row(2, 0, 4)
    with pytest.raises(UserError, match="row 1 holds 2 pages: only a row with none attaches shared ones"):
        cache.attach(1, [])
    assert len(cache.free) == 1
    a, ab, ac, c = cache.pages[0][0], cache.pages[0][1], cache.pages[1][1], cache.pages[2][0]
    uncached = cache.pages[0][2]
    for row in (0, 2, 1):
        cache.release(row)
    # all free; the cached ones in the order a reserve evicts them: a row's last blocks first, A (row 1's too) last
    assert not any(cache.refs) and len(cache.free) == 6 and list(cache.cached) == [ab, c, ac, a]
    with pytest.raises(UserError, match="page .* is free: only a held or cached page is shared"):
        cache.attach(0, [uncached])
    cache.reserve(0, 12)  # 3 pages: the 2 never cached, then A + B's
    assert cache.pages[0][2] == ab and list(cache.cached) == [c, ac, a] and ab not in cache.key_of
    assert cache.lookup(torch.cat([A, B])) == [a] and cache.lookup(torch.cat([A, C])) == [a, ac]
    cache.attach(1, [a, ac])  # held again: no longer evictable
    assert list(cache.cached) == [c] and len(cache.free) == 1


def test_a_row_copied_into_its_own_pages_decodes_as_its_source():
    model = tiny("reference", **CASES["rope-gqa"])
    prompt, step = torch.randint(0, VOCAB, (7,)), torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        cache = model.new_paged_cache(2, 8, 4, max_len=16, kv_dtype="int8")
        cache.reserve(1, 8)
        model(prompt[None], cache.row(1))
        cache.reserve(0, 8)
        cache.copy_row(1, 0, 7)
        cache.fill.copy_(torch.tensor([7, 7]))
        got = model(step, cache)
        want = [alone(model, prompt, step[i], "int8")[0] for i in range(2)]
    for i in range(2):
        assert_close_rel(got[i, -1], want[i], 1e-5, f"row {i}")


def test_the_op_with_a_block_table_compiles_and_passes_opcheck(device):
    """torch.compile(fullgraph=True) traces flash_attention(block_table=) through the op's fake (no host read of the
    table), the compiled call reads the table at run time (a new page order, the same answer), and opcheck checks the
    op's schema, fake and dispatch with the table as its last input."""
    q, _, _ = make_qkv(2, 2, 2, 1, 16, torch.float32, device, seed=5)
    k, v = (torch.randn(7, 2, 4, 16, device=device) for _ in range(2))
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)
    kv_len = torch.tensor([9, 11], device=device)

    def step(a, b, c, n, t):
        return flash_attention(a, b, c, kv_len=n, block_table=t) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = step(q, k, v, kv_len, table)
        assert torch.equal(compiled(q, k, v, kv_len, table), want)
        moved = table.clone()
        moved[1, 0] = 6  # row 1's first page moved to page 6
        k[6], v[6] = k[3], v[3]
        k[3], v[3] = float("nan"), float("nan")
        assert torch.equal(compiled(q, k, v, kv_len, moved), want)
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default,
                          (q, k, v, True, 0.25, 0.0, None, None, None, 0.0, None, kv_len, None, None, moved))


@pytest.mark.parametrize("table,kv_len,error,match", [
    ("int64", "ok", ValueError, r"block_table must be int32 \[B, pages a row\] = \[2, n >= 1\]"),
    ("one_row", "ok", ValueError, r"block_table must be int32 .* got torch.int32 \[1, 3\]"),
    # column-major (a transposed table made contiguous): the kernels step one element a page, so this read other
    # rows' pages and gave a wrong answer with no error
    ("column_major", "ok", ValueError, r"block_table must have unit stride along a row's pages, got strides \(1, 2\)"),
    ("ok", None, ValueError, "block_table \\(a paged KV cache\\) needs kv_len"),
    ("page_9", "ok", ValueError, r"block_table names page 9, but the pool has pages 0..5"),
    ("ok", "long", ValueError, r"kv_len 13 \(batch row 1\) is out of range: it must lie in \[1, 12\]"),
])
def test_a_bad_block_table_is_named(table, kv_len, error, match, device):
    q, _, _ = make_qkv(2, 2, 1, 1, 16, torch.float32, device, seed=3)
    k = torch.randn(6, 2, 4, 16, device=device)
    tables = {"ok": torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)}
    tables["int64"] = tables["ok"].long()
    tables["one_row"] = tables["ok"][:1]
    tables["column_major"] = tables["ok"].t().contiguous().t()
    tables["page_9"] = torch.tensor([[0, 1, 2], [3, 4, 9]], dtype=torch.int32, device=device)
    lens = {"ok": torch.tensor([5, 9], device=device), "long": torch.tensor([5, 13], device=device), None: None}
    with torch.no_grad(), pytest.raises(error, match=match):
        flash_attention(q, k, k, kv_len=lens[kv_len], block_table=tables[table])



def test_int8_scales_not_in_pages_are_named_as_the_pools(device):
    """Scales of the rows' shape [B, Hkv, Tk] beside a paged int8 cache: the refusal names the pool's shape
    [pages, Hkv, page size], where it said [B, Hkv, Tk] = [6, 2, 4] (the pool's sizes under the rows' names)."""
    q, _, _ = make_qkv(2, 2, 1, 1, 16, torch.float32, device, seed=3)
    kq = torch.randint(-127, 128, (6, 2, 4, 16), dtype=torch.int8, device=device)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)
    rows_scale = torch.rand(2, 2, 12, device=device)
    with torch.no_grad(), pytest.raises(ValueError, match=r"k_scale must be float32 \[pages, Hkv, page size\] "
                                                          r"\(the pool's, as k's pages\) = \[6, 2, 4\]"):
        flash_attention(q, kq, kq, kv_len=torch.tensor([5, 9], device=device), block_table=table,
                        k_scale=rows_scale, v_scale=rows_scale)

@pytest.mark.cuda
def test_lengths_checked_by_the_caller_are_never_read_on_the_host():
    """On a GPU flash_attention reads a per-row kv_len and a block table on the host to check them (a sync), unless
    the caller keeps them in range (lengths_checked: the model's caches, which the batching engine's eager step
    calls every layer): then nothing waits on the GPU."""
    q, _, _ = make_qkv(2, 2, 1, 1, 64, torch.bfloat16, "cuda", seed=1)
    k = torch.randn(6, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
    kv_len = torch.tensor([5, 30], device="cuda")
    with torch.no_grad():
        flash_attention(q, k, k, kv_len=kv_len, block_table=table)  # warm: compiled, tuned
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            flash_attention(q, k, k, kv_len=kv_len, block_table=table, lengths_checked=True)
            with pytest.raises(RuntimeError, match="synchroniz"):
                flash_attention(q, k, k, kv_len=kv_len, block_table=table)
        finally:
            torch.cuda.set_sync_debug_mode("default")
