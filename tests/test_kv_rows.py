"""A KV cache filled to a different length in each row (continuous batching, train/engine.py): KVCache.fill [B]
with on_device, flash_attention(kv_len=[B]) and the reference's masks for it.

Each row of a batched step must compute what that row computes alone: its own prompt's keys, its tokens at its own
positions (learned position embeddings, RoPE, ALiBi, a sliding window), whatever lies in the cache past its fill
(NaN here) and whatever the other rows hold."""
import pytest
import torch

from parity import assert_close_rel
from test_attention import make_qkv
from test_attention_kv_len import cache as junk_cache
from test_decode_graph import CASES, VOCAB, tiny
from test_flash_decoding import reference_gqa
from tritongpt.errors import UserError
from tritongpt.kernels.attention import flash_attention

PROMPTS = (5, 9, 2)  # each row's prompt length: not a tile's multiple, the rows' diagonals in different tiles
STEPS = 3


def alone(model, prompt, steps, kv_dtype):
    """Row by row, the host path: the logits of each decode step of one row fed its own tokens."""
    cache = model.new_cache(1, 16, kv_dtype=kv_dtype)
    model(prompt[None], cache)
    return [model(steps[None, t:t + 1], cache)[0, -1] for t in range(steps.numel())]


def batched(model, prompts, steps, kv_dtype, T=1):
    """All rows in one forward a step: each prompt prefilled into its row (KVCache.row), then the fill a row."""
    cache = model.new_cache(len(prompts), 16, kv_dtype=kv_dtype)
    for buf in (cache.k, cache.v):
        if buf.is_floating_point():
            buf.fill_(float("nan"))  # past each row's fill: never read into a result
    for i, p in enumerate(prompts):
        model(p[None], cache.row(i))
    cache.fill = torch.tensor([p.numel() for p in prompts], device=steps.device)
    cache.on_device = True
    out = []
    for t in range(0, steps.size(1), T):
        out.append(model(steps[:, t:t + T], cache))
        cache.fill += T
    assert cache.pos == 0  # on_device: the fill is the caller's, the host pos untouched
    return torch.cat(out, 1)


@pytest.mark.parametrize("kernels,case,kv_dtype", [("reference", c, "auto") for c in CASES]
                         + [("reference", "rope-gqa", "int8"), ("triton", "gpt2", "auto"),
                            ("triton", "window-softcap", "int8"), ("triton", "alibi", "auto")])
def test_each_row_of_a_batched_step_decodes_as_it_would_alone(kernels, case, kv_dtype):
    """Triton: one layer (the layers' caches are the reference cases' to check; the kernels run the same in each),
    each row alone on the reference path, the same weights (~5 ms a Triton program: 12 interpreted forwards less)."""
    model = tiny(kernels, n_layer=1 if kernels == "triton" else 2, **CASES[case])
    g = torch.Generator().manual_seed(len(case))
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in PROMPTS]
    steps = torch.randint(0, VOCAB, (len(PROMPTS), STEPS), generator=g)
    with torch.no_grad():
        got = batched(model, prompts, steps, kv_dtype)
        model.set_kernels("reference")
        for i, p in enumerate(prompts):
            want = torch.stack(alone(model, p, steps[i], kv_dtype))
            assert_close_rel(got[i], want, 1e-5, f"{kernels} {case} {kv_dtype} row {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("kernels,kv_dtype", [("reference", "auto"), ("triton", "auto"), ("triton", "int8")])
def test_each_row_decodes_as_it_would_alone_on_cuda_in_bf16(kernels, kv_dtype):
    """On a GPU in bf16 (the kernels' tiles, splits and tuning there): each row within bf16's tolerance of itself
    decoded alone."""
    model = tiny(kernels, **CASES["rope-gqa"]).cuda().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).cuda() for n in PROMPTS]
    steps = torch.randint(0, VOCAB, (len(PROMPTS), STEPS), generator=g).cuda()
    with torch.no_grad():
        got = batched(model, prompts, steps, kv_dtype)
        for i, p in enumerate(prompts):
            want = torch.stack(alone(model, p, steps[i], kv_dtype))
            assert_close_rel(got[i].float(), want.float(), 1e-2, f"{kernels} {kv_dtype} row {i}")


def test_a_row_copied_decodes_as_its_source():
    """copy_row: a request of n samples prefills once and copies its prompt's keys (an int8 cache's scales too)."""
    model = tiny("reference", **CASES["rope-gqa"])
    prompt, step = torch.randint(0, VOCAB, (7,)), torch.randint(0, VOCAB, (3, 1))
    with torch.no_grad():
        cache = model.new_cache(3, 16, kv_dtype="int8")
        model(prompt[None], cache.row(2))
        cache.copy_row(2, 0, 7)
        cache.fill, cache.on_device = torch.tensor([7, 1, 7]), True
        got = model(step, cache)
        want = [alone(model, prompt, step[i], "int8")[0] for i in (0, 2)]
    assert_close_rel(got[0, -1], want[0], 1e-5, "copied row")
    assert_close_rel(got[2, -1], want[1], 1e-5, "source row")


def test_a_chunk_a_row_at_once():
    """T = 2 new tokens a row (chunked prefill or a verification step), rows at their own positions."""
    model = tiny("reference", **CASES["alibi"])
    prompts = [torch.randint(0, VOCAB, (n,)) for n in PROMPTS]
    steps = torch.randint(0, VOCAB, (len(PROMPTS), 4))
    with torch.no_grad():
        got = batched(model, prompts, steps, "auto", T=2)
        for i, p in enumerate(prompts):
            cache = model.new_cache(1, 16)
            model(p[None], cache)
            want = torch.cat([model(steps[i:i + 1, t:t + 2], cache) for t in (0, 2)], 1)[0]
            assert_close_rel(got[i], want, 1e-5, f"row {i}")


@pytest.mark.parametrize("splits", [1, 2], ids=["single", "split2"])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_flash_attention_reads_a_length_a_row(splits, Hkv, forced_splits, device):
    """Each row b of flash_attention(kv_len=[B]) is the float64 reference over its own first kv_len[b] keys (the
    caches hold NaN, inf and 1e30 past them), on the single pass and the split one (its GQA rows packed), with a
    window, a cap and ALiBi at each row's own positions."""
    forced_splits(splits)
    lens = [3, 37, 20]
    q, _, _ = make_qkv(3, 4, 3, 1, 32, torch.float32, device, seed=Hkv)
    rows = [junk_cache(1, Hkv, L, 32, torch.float32, device, seed=Hkv + b) for b, L in enumerate(lens)]
    k, v = (torch.cat(t) for t in zip(*rows))  # row b's junk from its own fill on
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    for kw in (dict(), dict(window=7, softcap=3.0, alibi_slopes=slopes)):
        with torch.no_grad():
            got = flash_attention(q, k, v, kv_len=torch.tensor(lens, device=device), **kw)
        for b, L in enumerate(lens):
            ref = reference_gqa(q[b:b + 1].double(), k[b:b + 1, :, :L].double(), v[b:b + 1, :, :L].double(), **kw)
            assert_close_rel(got[b:b + 1], ref, 1e-4, f"row {b} L={L} {sorted(kw)}")


@pytest.mark.parametrize("lens,match", [
    ([20, 20, 20], r"kv_len must be one element \(shape \[\] or \[1\]\) or one a batch row \(\[2\]\)"),
    ([20, 2], r"kv_len 2 \(batch row 1\) is out of range: it must lie in \[3, 40\]"),
    ([41, 20], r"kv_len 41 \(batch row 0\) is out of range"),
])
def test_a_bad_length_a_row_is_named(lens, match, device):
    q, _, _ = make_qkv(2, 2, 3, 1, 16, torch.float32, device, seed=5)
    k, v = junk_cache(2, 2, 20, 16, torch.float32, device, seed=6)
    k, v = torch.cat([k, k[:, :, :8]], 2), torch.cat([v, v[:, :, :8]], 2)[:, :, :40]
    k = k[:, :, :40]
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, kv_len=torch.tensor(lens, device=device))


@pytest.mark.parametrize("case", ["gpt2", "rope-gqa"])
def test_a_row_continues_a_prefill_from_its_start(case):
    """KVCache.row(i, start): a prompt of 11 fed to row 1 in chunks of 4, 4, 3 (the engine's chunked prefill), each
    from where the last ended, gives the whole prompt's last logits, against a float64 prefill of it whole."""
    model = tiny("reference", **CASES[case])
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        for start, end in ((0, 4), (4, 8), (8, 11)):
            out = model(ids[:, start:end], cache.row(1, start=start))[0, -1]
        ref = model.double()(ids)[0, -1]
    assert_close_rel(out.double(), ref, 1e-4, f"{case} chunked prefill")


def test_the_cache_refuses_what_it_cannot_do():
    model = tiny("reference")
    cache = model.new_cache(2, 16)
    with pytest.raises(UserError, match=r"KV cache rows are 0..1, got 2"):
        cache.row(2)
    with pytest.raises(UserError, match=r"a KV cache row holds 0..16 positions, got 17"):
        cache.row(0, start=17)
    with pytest.raises(UserError, match=r"KV cache rows are 0..1, got -1"):
        cache.copy_row(-1, 0, 3)
    with pytest.raises(UserError, match=r"a KV cache row holds 0..16 positions, got 17"):
        cache.copy_row(0, 1, 17)
    cache.fill, cache.on_device = torch.tensor([1, 2, 3]), True
    with pytest.raises(UserError, match=r"a KV cache's fill is one length, or one a row \(\[2\]\), got shape \(3,\)"):
        with torch.no_grad():
            model(torch.zeros(2, 1, dtype=torch.long) + 1, cache)


def test_a_longrope_model_is_refused_a_fill_on_the_device():
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
               "original_max_position_embeddings": 12}
    model = tiny("reference", position_encoding="rope", rope_scaling=scaling)
    cache = model.new_cache(2, 16)
    cache.fill, cache.on_device = torch.tensor([0, 0]), True
    with torch.no_grad(), pytest.raises(UserError, match="LongRoPE.*fill is on the device"):
        model(torch.ones(2, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("kernels,case,paged", [("reference", c, False) for c in CASES]
                         + [("reference", "rope-gqa", True), ("triton", "gpt2", False), ("triton", "alibi", True)])
def test_rows_run_right_padded_chunks_each_at_its_own_start(kernels, case, paged):
    """KVCache.rows (the engine's batched prefill): rows 3 and 1 (not consecutive: a slot cache's row index) and
    rows 1 and 2 (a view), each holding a prefix of its own (5, 2, 7 positions), take chunks of 4 and 2 tokens in
    one forward, the short one right-padded to 4: each row's real positions' logits are its chunk's fed alone
    through row(i, start), and the keys it holds after them are the same (both paths, a paged cache). Triton: the
    batched forward alone runs interpreted, one layer; the prefixes and each chunk alone on the reference path."""
    model = tiny(kernels, n_layer=1 if kernels == "triton" else 2, **CASES[case])
    gen = torch.Generator().manual_seed(5)
    prefix = {1: 2, 2: 7, 3: 5}
    texts = {i: torch.randint(0, VOCAB, (1, n + 4), generator=gen) for i, n in prefix.items()}

    def new_cache():
        if not paged:
            return model.new_cache(4, 16)
        cache = model.new_paged_cache(4, 16, 4, 16)
        for i in range(4):
            cache.reserve(i, 16)
        return cache

    def rows_of(cache, i):  # row i's first prefix + 4 keys of layer 0, as a slot cache would hold them
        if not paged:
            return cache.k[0, i, :, :prefix[i] + 4]
        return torch.cat([cache.k[0, p] for p in cache.pages[i]], 1)[:, :prefix[i] + 4]
    for slots, lengths in (([3, 1], [4, 2]), ([1, 2], [4, 2])):
        batched, single = new_cache(), new_cache()
        with torch.no_grad():
            model.set_kernels("reference")
            for cache in (batched, single):
                for i, n in prefix.items():
                    model(texts[i][:, :n], cache.row(i))
            chunks = [texts[i][0, prefix[i]:prefix[i] + t] for i, t in zip(slots, lengths)]
            ids = torch.stack([torch.cat([c, c[-1:].expand(4 - len(c))]) for c in chunks])
            model.set_kernels(kernels)
            got = model(ids, batched.rows(slots, [prefix[i] for i in slots], max(prefix[i] for i in slots) + 4))
            model.set_kernels("reference")
            for j, (i, c) in enumerate(zip(slots, chunks)):
                want = model(c[None], single.row(i, start=prefix[i]))[0]
                assert_close_rel(got[j, :len(c)], want, 1e-5, f"{case} rows {slots}: row {i}")
                n = prefix[i] + len(c)
                assert_close_rel(rows_of(batched, i)[:, :n], rows_of(single, i)[:, :n], 1e-5, f"row {i}'s keys")


def test_rows_refuses_what_it_cannot_do():
    model = tiny("reference")
    cache, paged = model.new_cache(3, 16), model.new_paged_cache(3, 8, 4, 16)
    with pytest.raises(UserError, match=r"rows\(\) needs at least one slot"):
        cache.rows([], [], 4)
    with pytest.raises(UserError, match=r"KV cache rows are 0..2, got 3"):
        cache.rows([0, 3], [0, 0], 4)
    with pytest.raises(UserError, match=r"rows\(\) needs a start a row \(2\) and a bound in 1..16, got 1 starts and "
                                        r"bound 4"):
        cache.rows([0, 2], [0], 4)
    with pytest.raises(UserError, match=r"a bound in 1..16, got 2 starts and bound 17"):
        paged.rows([2, 0], [0, 0], 17)
    paged.reserve(0, 8)
    paged.register(0, torch.arange(8))
    paged.attach(1, paged.lookup(torch.arange(9)))
    with pytest.raises(UserError, match=r"row 1's first 8 positions are in shared pages, never written: its fill "
                                        r"starts at or past them, got 4"):
        paged.rows([0, 1], [8, 4], 12)
