"""Parity tests for kernels/attention.py (flash_attention) against a float64 textbook reference.

The reference is the attention core of tritongpt.model.layers.MultiHeadAttention written out in
plain torch: scores, bottom-right causal mask, softmax, dropout (with the kernel's own keep-mask,
rebuilt by dropout_mask), @ v. On CPU the kernels run in Triton's interpreter (~5 ms per
program), so shapes are small: B*H <= 2 and 16x16 tiles give grids of tens of programs.

bf16 rule (FlashAttention's): the kernel's relative error against float64 must be at most 2x the
error of PyTorch's own bf16 attention (the same formula evaluated in bf16: CPU bf16 matmul and
softmax accumulate in fp32 but round scores and weights to bf16) against float64. Measured on CPU:
torch bf16 2.7e-3..4.4e-3, kernel 1.7e-3..2.7e-3 (P is rounded to bf16 once, scores never are),
so no absolute floor is needed (BF16_FLOOR = 0).
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from parity import assert_close_rel, report
from tritongpt.kernels.attention import dropout_mask, flash_attention

BF16_FLOOR = 0.0


def same_document(doc_ids, Tq):
    """[B, Tq, Tk]: True where query i (position Tk - Tq + i) and key j lie in one run of equal
    ids, counted by hand."""
    B, Tk = doc_ids.shape
    run = [[0] * Tk for _ in range(B)]
    for b in range(B):
        for j in range(1, Tk):
            run[b][j] = run[b][j - 1] + int(doc_ids[b, j] != doc_ids[b, j - 1])
    run = torch.tensor(run)
    return run[:, Tk - Tq:, None] == run[:, None, :]


def reference_attention(q, k, v, causal=True, softmax_scale=None, keep=None, dropout_p=0.0, doc_ids=None,
                        window=None, softcap=None, alibi_slopes=None):
    """softmax(q k^T * scale [soft-capped] [+ ALiBi] + bottom-right causal mask [+ document mask] [+ window]),
    dropout with a given keep-mask, @ v."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap:  # Gemma 2's attn_logit_softcapping: before the masks
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:  # m_h (j - i), query i at position Tk - Tq + i, written out by loops
        bias = torch.tensor([[[m * (j - (Tk - Tq + i)) for j in range(Tk)] for i in range(Tq)]
                             for m in alibi_slopes.tolist()], dtype=torch.float64)
        scores = scores + bias.to(scores)
    if causal:
        future = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
        scores = scores.masked_fill(future.to(scores.device), float("-inf"))
    if doc_ids is not None:
        scores = scores.masked_fill(~same_document(doc_ids.cpu(), Tq)[:, None].to(scores.device), float("-inf"))
    if window is not None:  # keys more than window - 1 positions back
        too_far = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq) - window
        scores = scores.masked_fill(too_far.to(scores.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if keep is not None:
        weights = weights * keep.to(weights.dtype) / (1.0 - dropout_p)
    return weights @ v


def make_qkv(B, H, Tq, Tk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype) for T in (Tq, Tk, Tk))
    return q, k, v


def run_grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn on leaf copies of q, k, v (same dtype and layout)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def reference_grads(q, k, v, do, dtype=torch.float64, **kw):
    return run_grads(lambda a, b, c: reference_attention(a, b, c, **kw),
                     q.to(dtype), k.to(dtype), v.to(dtype), do)


NAMES = ("out", "dq", "dk", "dv")


def check_fp32(q, k, v, causal=True, softmax_scale=None, tag=""):
    do = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1)).to(q)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, causal=causal, softmax_scale=softmax_scale),
                    q, k, v, do)
    ref = reference_grads(q, k, v, do, causal=causal, softmax_scale=softmax_scale)
    for name, g, r in zip(NAMES, got, ref):
        if not r.any():  # T=1: one key, softmax is constant, dq = dk = 0 exactly; rel is undefined
            assert torch.isfinite(g).all() and g.abs().max() < 1e-5, f"{tag} {name} should be ~0"
            continue
        assert_close_rel(g, r, 1e-4, f"{tag} fp32 {name}")


# ----------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("T,D", [(1, 32), (17, 64), (64, 80), (100, 128), (40, 96), (23, 16)])
def test_fp32_causal_fwd_bwd(T, D, device):
    q, k, v = make_qkv(1, 2, T, T, D, torch.float32, device, seed=T * D)
    check_fp32(q, k, v, tag=f"T={T} D={D}")


def test_fp32_long_257(device):
    q, k, v = make_qkv(1, 1, 257, 257, 64, torch.float32, device, seed=257)
    check_fp32(q, k, v, tag="T=257")


@pytest.mark.parametrize("Tq,Tk", [(33, 20), (16, 48)])
def test_fp32_not_causal(Tq, Tk, device):
    q, k, v = make_qkv(2, 1, Tq, Tk, 32, torch.float32, device, seed=Tq + Tk)
    check_fp32(q, k, v, causal=False, softmax_scale=0.3, tag=f"noncausal {Tq}x{Tk}")


@pytest.mark.parametrize("Tq,Tk", [(1, 37), (5, 37), (20, 37)])
def test_fp32_kv_cache_slices(Tq, Tk, device):
    """Decode (Tq=1) and chunked prefill with bottom-right causal alignment; k/v are slices of a
    preallocated [B, H, Tmax, D] cache (the leaves here, so the kernel sees the strided views)
    and q is a head-split view of [B, T, H, D]."""
    B, H, Tmax, D = 1, 2, 64, 64
    g = torch.Generator().manual_seed(Tq)
    cache_k, cache_v = (torch.randn(B, H, Tmax, D, generator=g).to(device) for _ in range(2))
    q_bthd = torch.randn(B, Tq, H, D, generator=g).to(device)
    do = torch.randn(B, H, Tq, D, generator=g).to(device)

    def attend(fn, q_bthd, cache_k, cache_v):
        q, k, v = q_bthd.transpose(1, 2), cache_k[:, :, :Tk], cache_v[:, :, :Tk]
        assert not k.is_contiguous() and not v.is_contiguous() and (Tq == 1 or not q.is_contiguous())
        return fn(q, k, v)

    def grads(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q_bthd, cache_k, cache_v)]
        out = attend(fn, *leaves)
        out.backward(do.to(dtype))
        return [out.detach()] + [t.grad for t in leaves]

    got = grads(flash_attention, torch.float32)
    ref = grads(reference_attention, torch.float64)
    for name, g_, r in zip(("out", "dq", "dcache_k", "dcache_v"), got, ref):
        if name.startswith("dcache"):  # past Tk autograd's slice backward fills zeros, not the kernel
            g_, r = g_[:, :, :Tk], r[:, :, :Tk]
        if name == "dq":
            g_, r = g_.transpose(1, 2), r.transpose(1, 2)
        assert_close_rel(g_, r, 1e-4, f"cache Tq={Tq} Tk={Tk} {name}")


@pytest.mark.parametrize("Tq,Tk", [(20, 34), (40, 57)])
def test_fp32_causal_diagonal_not_on_a_tile_edge(Tq, Tk, device):
    """Tk - Tq of 14 and 17: the causal diagonal crosses tiles at offsets no other test uses, so
    a forward/dQ "fully visible" tile bound or a dK/dV first-tile bound one off shows here."""
    q, k, v = make_qkv(1, 1, Tq, Tk, 32, torch.float32, device, seed=Tq * Tk)
    check_fp32(q, k, v, tag=f"causal {Tq}x{Tk}")


def test_fp32_k_and_v_with_different_layouts(device):
    """k contiguous, v a head-split view of [B, T, H, D]: each is read with its own strides."""
    q, k, _ = make_qkv(1, 2, 16, 16, 32, torch.float32, device, seed=21)
    v = torch.randn(1, 16, 2, 32, generator=torch.Generator().manual_seed(22)).to(device).transpose(1, 2)
    assert k.stride() != v.stride()
    check_fp32(q, k, v, tag="k/v layouts")


def test_fp32_q_k_v_split_from_one_fused_projection(device):
    """q, k, v as GPT-2's c_attn output splits them: views of one [B, T, 3, H, D] buffer, none dense
    (each holds a third of it), so torch.empty_like(q) gives dq strides of its own, not q's: each
    gradient must be written with its own strides. The gradient of the fused leaf against float64."""
    B, H, T, D = 2, 2, 21, 32
    fused = torch.randn(B, T, 3 * H * D, generator=torch.Generator().manual_seed(23)).to(device)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(24)).to(device)

    def grads(fn, dtype):
        leaf = fused.to(dtype, copy=True).requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in leaf.view(B, T, 3, H, D).unbind(2))
        assert all(torch.empty_like(t).stride() != t.stride() for t in (q, k, v))  # not dense
        out = fn(q, k, v)
        out.backward(do.to(dtype))
        return out.detach(), leaf.grad

    for name, g, r in zip(("out", "dfused"), grads(flash_attention, torch.float32),
                          grads(reference_attention, torch.float64)):
        assert_close_rel(g, r, 1e-4, f"fused q, k, v {name}")


def test_matches_reference_module_core(device):
    """Same numbers as MultiHeadAttention.attend, the textbook core this kernel replaces."""
    from tritongpt.model.layers import MultiHeadAttention

    mha = MultiHeadAttention(n_embd=64, n_head=2, context_length=64).double()
    q, k, v = make_qkv(1, 2, 9, 30, 32, torch.float32, device, seed=3)
    ref = mha.attend(q.double().cpu(), k.double().cpu(), v.double().cpu())
    assert_close_rel(flash_attention(q, k, v), ref, 1e-4, "vs MultiHeadAttention.attend")


def test_matches_reference_module_core_with_every_mask(device):
    """attend with grouped KV heads, a window, a soft cap and packed documents, for queries that are
    the last 13 of 41 keys (the model refuses doc_ids with a cache, but attend is flash_attention's
    reference and the kernel takes them): attend's document mask must sit at the queries' positions
    Tk - Tq + i too. Each mask alone changes the answer."""
    from tritongpt.model.layers import MultiHeadAttention

    mha = MultiHeadAttention(n_embd=64, n_head=4, context_length=64, window=11, n_kv_head=2, softcap=1.5).double()
    doc_ids = runs([6, 17, 18], ids=[3, 1, 3])
    g = torch.Generator().manual_seed(41)
    q = (torch.randn(1, 4, 13, 16, generator=g) * 2).to(device)
    k, v = (torch.randn(1, 2, 41, 16, generator=g).to(device) for _ in range(2))
    ref = mha.attend(q.double().cpu(), k.double().cpu(), v.double().cpu(), doc_ids)
    masks = dict(window=11, softcap=1.5, doc_ids=doc_ids.to(device))
    got = flash_attention(q, k, v, softmax_scale=mha.softmax_scale, **masks)
    assert_close_rel(got, ref, 1e-4, "vs MultiHeadAttention.attend with every mask")
    # each mask bites (the documents: the windows of positions 28..33 reach back past their document's start, 23)
    for attr in ("window", "softcap", "doc_ids"):
        plain = MultiHeadAttention(n_embd=64, n_head=4, context_length=64, window=0 if attr == "window" else 11,
                                   n_kv_head=2, softcap=0.0 if attr == "softcap" else 1.5).double()
        args = (t.double().cpu() for t in (q, k, v))
        less = plain.attend(*args, None if attr == "doc_ids" else doc_ids)
        assert report(less, ref)[1] > 0.01, f"without {attr} attend gives the same: the test cannot fail"


def test_backward_of_sum_zero_stride_grad(device):
    """out.sum().backward() hands the kernel an expanded dO with all strides 0."""
    q, k, v = make_qkv(1, 2, 20, 20, 32, torch.float32, device, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attention(*leaves).sum().backward()
    ref = reference_grads(q, k, v, torch.ones(1, 2, 20, 32, device=q.device))
    for name, g, r in zip(NAMES[1:], [t.grad for t in leaves], ref[1:]):
        assert_close_rel(g, r, 1e-4, f"sum-backward {name}")


# ----------------------------------------------------------------------------- bf16 / fp16 parity
@pytest.mark.parametrize("B,H,Tq,Tk,D", [(1, 2, 64, 64, 64), (2, 1, 17, 17, 80), (1, 2, 5, 37, 128)])
def test_bf16_within_2x_of_torch_bf16(B, H, Tq, Tk, D, device):
    q, k, v = make_qkv(B, H, Tq, Tk, D, torch.bfloat16, device, seed=Tq * D)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    got = run_grads(flash_attention, q, k, v, do)
    ref64 = reference_grads(q, k, v, do)
    torch_bf16 = reference_grads(q, k, v, do, dtype=torch.bfloat16)
    for name, g, r, t in zip(NAMES, got, ref64, torch_bf16):
        _, torch_rel = report(t, r)
        _, rel = assert_close_rel(g, r, 2e-2, f"bf16 {name}")  # NaN/inf guard and figures
        print(f"  torch bf16 {name}: rel={torch_rel:.3e}")
        assert rel <= 2 * torch_rel + BF16_FLOOR, f"bf16 {name}: {rel:.3e} > 2 x torch's {torch_rel:.3e} + floor"


def test_fp16_fwd_bwd(device):
    q, k, v = make_qkv(1, 2, 30, 30, 64, torch.float16, device, seed=16)
    do = torch.randn(1, 2, 30, 64, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    got = run_grads(flash_attention, q, k, v, do)
    ref = reference_grads(q, k, v, do)
    for name, g, r in zip(NAMES, got, ref):
        assert_close_rel(g, r, 3e-3, f"fp16 {name}")


# the interpreter's numpy warns of exp2 overflowing on future keys, which the causal mask then drops
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_fp16_scores_past_fp16_max_both_paths(device):
    """fp16 q and k of ~250: q.k reaches 1e6, past fp16's 65504. The reference module's attend
    computed the scores in fp16: inf, and every output and gradient NaN, where SDPA and the kernel
    (scores in fp32) are right (the softmax is one-hot there: dq = dk = 0, up to rounding). It now
    computes fp16 scores in fp32, also under autocast (which would cast the matmul back)."""
    from tritongpt.model.layers import MultiHeadAttention

    q, k, v = make_qkv(1, 2, 20, 20, 16, torch.float32, "cpu", seed=9)
    q, k, v = (q * 250).half(), (k * 250).half(), v.half()
    do = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(3)).half()
    ref64 = reference_grads(q, k, v, do)
    mha = MultiHeadAttention(n_embd=32, n_head=2, context_length=32).half()
    module = run_grads(mha.attend, q, k, v, do)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isfinite(sdpa).all()
    with torch.autocast("cpu", dtype=torch.float16):
        under_autocast = mha.attend(q, k, v)
    got = run_grads(flash_attention, q.to(device), k.to(device), v.to(device), do.to(device))
    # The kernel's softmax is exp2(s * scale * log2(e) - m): that product rounds to fp32, an
    # absolute error of ~|s| 2^-24 in a logit of 4e5, so up to ~2% in a probability of a near tie
    # (the reference's scale 1/4 is exact). fp32 inputs give the same dv error (4.3e-3 on an AMD
    # EPYC, under 3e-3 on an Intel Xeon: numpy's exp2 differs by an ulp), so this is fp32's floor.
    logits = (q.double() @ k.double().transpose(-1, -2)) * (16 ** -0.5 * math.log2(math.e))
    kernel_tol = max(3e-3, logits.abs().max().item() * 2.0 ** -24)
    for name, m, g, r in zip(NAMES, module, got, ref64):
        for who, t, tol in (("reference module", m, 3e-3), ("kernel", g, kernel_tol)):
            if name in ("dq", "dk"):  # ~0 exactly: finite and small next to dv
                assert torch.isfinite(t).all() and t.abs().max() < 1e-2, f"{who} {name}"
            else:
                assert_close_rel(t, r, tol, f"{who} fp16 {name}")
    assert_close_rel(under_autocast, ref64[0], 3e-3, "reference module fp16 out under autocast")


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("B,H,Tq,Tk", [(1, 2, 24, 40), (2, 3, 20, 37)])
def test_dropout_matches_reference_with_rebuilt_mask(B, H, Tq, Tk, device):
    """(2, 3): several sequences and several heads, so the (sequence, head) slot each kernel
    numbers its RNG counters, logsumexp and Delta by must be b * H + h in all of them (with one
    sequence or one head any order gives the same slot)."""
    D, p, seed = 32, 0.3, 1234
    q, k, v = make_qkv(B, H, Tq, Tk, D, torch.float32, device, seed=5)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(6)).to(device)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=p, seed=seed), q, k, v, do)
    keep = dropout_mask(seed, B, H, Tq, Tk, p, device)
    assert keep.dtype == torch.bool and keep.shape == (B, H, Tq, Tk)
    ref = reference_grads(q, k, v, do, keep=keep, dropout_p=p)
    for name, g, r in zip(NAMES, got, ref):
        assert_close_rel(g, r, 1e-4, f"dropout {name}")
    # The mask really bites: without it the output is far from the kernel's.
    no_drop = reference_attention(q.double(), k.double(), v.double())
    assert report(got[0], no_drop)[1] > 0.1


def test_dropout_mask_statistics(device):
    B, H, Tq, Tk, p = 2, 3, 128, 128, 0.3
    keep = dropout_mask(7, B, H, Tq, Tk, p, device).cpu()
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    print(f"kept fraction {frac:.4f}, expected {1 - p:.4f} +- {sigma:.4f}")
    assert abs(frac - (1 - p)) < 4 * sigma
    assert torch.equal(keep, dropout_mask(7, B, H, Tq, Tk, p, device).cpu())  # reproducible
    assert not torch.equal(keep, dropout_mask(8, B, H, Tq, Tk, p, device).cpu())  # seed matters
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("Tq,Tk", [(32, 32), (16, 64)])
def test_dropout_counters_never_overlap(Tq, Tk, device):
    """Each (sequence, head, row, col) entry has its own RNG counter: no plane is another's (or
    its own) copy at any shift. Read as +-1 sequences of Tq*Tk counters, two independent planes
    agree at a shift s on about half of their overlap (|correlation| ~ 1/sqrt(overlap) < 0.05);
    planes sharing counters shifted by s would correlate fully there. Tq < Tk too: with square
    planes a row stride of Tq instead of Tk numbers the counters the same way."""
    B, H, p = 2, 3, 0.3
    keep = dropout_mask(11, B, H, Tq, Tk, p, device).cpu().reshape(B * H, -1)
    x = keep.double() * 2 - 1
    x = x - x.mean(1, keepdim=True)   # P(keep) = 0.7 makes the raw +-1 product biased
    N = x.shape[1]
    fx = torch.fft.rfft(x, n=2 * N)
    shifts = torch.arange(-(N // 2), N // 2 + 1)
    overlap = (N - shifts.abs()).double()
    worst = 0.0
    for i in range(B * H):
        for j in range(i, B * H):
            corr = torch.fft.irfft(fx[i].conj() * fx[j], n=2 * N)[shifts % (2 * N)]  # sum x_i[t] x_j[t+s]
            corr = corr / (overlap * x[i].std() * x[j].std())
            if i == j:
                corr[shifts == 0] = 0
            worst = max(worst, corr.abs().max().item())
    print(f"largest |correlation| between shifted planes: {worst:.3f}")
    assert worst < 0.3


def test_dropout_seed_from_torch_rng(device):
    q, k, v = make_qkv(1, 1, 16, 16, 32, torch.float32, device, seed=9)
    torch.manual_seed(42)
    a = flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(42)
    b = flash_attention(q, k, v, dropout_p=0.5)
    c = flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_a_seed_tensor_is_taken_modulo_2_to_the_31(device):
    """An int seed is refused past 2^31; a seed tensor (e.g. a generator's 64-bit state) is
    read modulo 2^31, as documented: 2^31 + 5 gives seed 5's mask, 2^30 + 5 another one."""
    mask = {s: dropout_mask(s, 1, 2, 19, 23, 0.5, device)
            for s in (5, torch.tensor(2 ** 31 + 5), torch.tensor(2 ** 30 + 5))}
    five, wrapped, other = mask.values()
    assert 0.3 < five.float().mean().item() < 0.7
    assert torch.equal(wrapped, five)
    assert not torch.equal(other, five)


def test_the_mask_is_tl_rand_of_the_seeds_low_31_bits(device):
    """The kernels read the seed through a pointer, but draw what they drew as a scalar argument: keep iff
    tl.rand(seed mod 2^31, (bh * Tq + i) * Tk + j) >= p, rebuilt here by a kernel of the test's own with the
    seed an int argument (masks made before the seed moved to the device stay reproducible)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scalar_seed_mask(Out, seed, Tq, Tk, p, BLOCK: tl.constexpr):
        rows, cols = tl.arange(0, BLOCK)[:, None], tl.arange(0, BLOCK)[None, :]
        counters = tl.program_id(0).to(tl.int64) * Tq * Tk + rows.to(tl.int64) * Tk + cols
        tl.store(Out + counters, (tl.rand(seed, counters) >= p).to(tl.int8), mask=(rows < Tq) & (cols < Tk))

    B, H, Tq, Tk, p = 1, 2, 19, 23, 0.5
    for seed, value in ((5, 5), (2 ** 31 - 1, 2 ** 31 - 1), (torch.tensor(2 ** 32 + 9), 9)):
        want = torch.empty(B, H, Tq, Tk, dtype=torch.int8, device=device)
        scalar_seed_mask[(B * H,)](want, value, Tq, Tk, p, BLOCK=32)
        assert torch.equal(dropout_mask(seed, B, H, Tq, Tk, p, device), want.bool()), seed


class LaunchRecorder:
    """Stands in for a Triton kernel (kernel[grid](...)): keeps each launch's arguments by name, runs nothing."""

    def __init__(self, kernel):
        self.names, self.launches = kernel.arg_names, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append({**dict(zip(self.names, args)), **kwargs})


def test_the_launchers_pass_the_seed_tensor_and_never_read_it_on_the_host(monkeypatch):
    """The forward and both backward passes get the seed tensor itself as their Seed pointer (they read it on
    the device), so a launch neither waits on the GPU nor breaks a CUDA-graph capture. On meta tensors, where
    any host read (.item(), int()) raises: a launch path that read the seed could not get through."""
    from tritongpt.kernels import attention

    kernels = {name: LaunchRecorder(getattr(attention, name))
               for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")}
    for name, spy in kernels.items():
        monkeypatch.setattr(attention, name if name == "_attn_bwd_preprocess" else name + "_run", spy)
    q = torch.empty(1, 2, 20, 16, device="meta")
    seed = torch.empty((), dtype=torch.int64, device="meta")
    for p in (0.1, 0.0):
        o, lse = attention._fwd_launch(q, q, q, True, 0.25, p, seed)
        attention._bwd_launch(torch.empty_like(o), q, q, q, o, lse, True, 0.25, p, seed)
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        (drop, plain) = kernels[name].launches
        assert drop["HAS_DROPOUT"] and drop["Seed"] is seed, name
        # without dropout a never-read stand-in, the same for every launch (no tensor made per call)
        assert not plain["HAS_DROPOUT"] and plain["Seed"] is not seed and plain["Seed"].device == q.device, name
        assert plain["Seed"] is kernels["_attn_fwd"].launches[1]["Seed"]


def test_the_seed_the_op_gets_is_on_qs_device(monkeypatch):
    """flash_attention draws the seed on q's device (torch's generator there), makes an int seed there and moves
    a seed tensor there, so a compiled step holds no CPU tensor (inductor skips CUDA graphs for a graph with one).
    On fake CUDA tensors: traced, nothing runs, no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from tritongpt.kernels import attention

    with FakeTensorMode():
        q = torch.empty(1, 2, 16, 16, device="cuda")
        cpu_seed = torch.empty((), dtype=torch.int32)  # a user's, on the CPU: moved (copied) over
    got, op = [], attention._flash_attn_fwd
    monkeypatch.setattr(attention, "_flash_attn_fwd", lambda *args: got.append(args[6]) or op(*args))
    for seed in (None, 7):
        gm = make_fx(lambda a: flash_attention(a, a, a, dropout_p=0.1, seed=seed), tracing_mode="fake")(q)
        assert got[-1].device == q.device and got[-1].dtype == torch.int64 and got[-1].shape == ()
        devices = {n.meta["val"].device for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
        assert devices == {q.device}, gm.graph
    make_fx(lambda a, s: flash_attention(a, a, a, dropout_p=0.1, seed=s), tracing_mode="fake")(q, cpu_seed)
    assert got[-1].device == q.device and got[-1].dtype == torch.int64 and len(got) == 3


def test_the_op_refuses_a_seed_it_cannot_read(device):
    """A direct call of the op reads the seed on q's device as one int64: another device or dtype is refused,
    naming both, in the real and the fake (traced) op, and by the backward op, which a caller may call directly
    too (its kernels read the seed as the forward's do); without dropout the seed is never read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, bwd = torch.ops.tritongpt.flash_attn_fwd, torch.ops.tritongpt.flash_attn_bwd
    q, k, v = make_qkv(1, 1, 16, 16, 16, torch.float32, device)
    o, lse = op(q, k, v, True, 0.25, 0.1, torch.tensor(5, device=device))
    for bad in (torch.tensor(5, device="meta"), torch.tensor(5, dtype=torch.int32, device=device),
                torch.tensor([5, 6], device=device), torch.tensor(5.0, device=device)):
        with pytest.raises(ValueError, match=r"the seed must be one int64 on q's device"):
            op(q, k, v, True, 0.25, 0.1, bad)
        with pytest.raises(ValueError, match=r"the seed must be one int64 on q's device"):
            bwd(torch.ones_like(o), q, k, v, o, lse, True, 0.25, 0.1, bad)
    with FakeTensorMode():
        fq = torch.empty(1, 1, 16, 16, device="cuda")
        with pytest.raises(ValueError, match=r"on q's device cuda:0, got torch.int64 \(\) on cpu"):
            op(fq, fq, fq, True, 0.25, 0.1, torch.tensor(5))
    out, _ = op(q, k, v, True, 0.25, 0.0, torch.tensor([5, 6], dtype=torch.int32, device=device))  # p = 0: not read
    assert torch.equal(out, op(q, k, v, True, 0.25, 0.0, None)[0])


def test_the_ops_refuse_a_meta_tensor_beside_real_ones(device):
    """A meta tensor among the ops' arguments sends the whole call to the fake impl (the Meta backend outranks
    the others), which made empty outputs: a direct call with a meta seed (the backward op's own seed check never
    ran), meta ALiBi slopes, document bounds, keys or an output returned uninitialised memory as attention or its
    gradients. Refused, naming the argument; the backward's fake checks the seed as the forward's does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd, bwd = torch.ops.tritongpt.flash_attn_fwd, torch.ops.tritongpt.flash_attn_bwd
    q, k, v = make_qkv(1, 2, 16, 16, 16, torch.float32, device)
    seed, slopes = torch.tensor(5, device=device), torch.tensor([0.5, 0.25], device=device)
    starts = torch.zeros(1, 16, dtype=torch.int32, device=device)
    o, lse = fwd(q, k, v, True, 0.25, 0.1, seed)
    meta = lambda t: t.to("meta")  # noqa: E731
    for name, args in (("seed", (q, k, v, True, 0.25, 0.0, meta(seed))),
                       ("alibi", (q, k, v, True, 0.25, 0.0, None, None, None, 0.0, meta(slopes))),
                       ("starts", (q, k, v, True, 0.25, 0.0, None, meta(starts), starts)),
                       ("v", (q, k, meta(v), True, 0.25, 0.0, None))):
        with pytest.raises(ValueError, match=f"flash_attn_fwd: {name} is on meta, q on {q.device}"):
            fwd(*args)
    with pytest.raises(ValueError, match=r"the seed must be one int64 on q's device .* on meta"):
        bwd(o, q, k, v, o, lse, True, 0.25, 0.1, meta(seed))  # read with dropout: the seed's own check
    for name, args in (("seed", (o, q, k, v, o, lse, True, 0.25, 0.0, meta(seed))),  # never read, still routed
                       ("ends", (o, q, k, v, o, lse, True, 0.25, 0.0, None, starts, meta(starts))),
                       ("lse", (o, q, k, v, o, meta(lse), True, 0.25, 0.0, None)),
                       ("alibi", (o, q, k, v, o, lse, True, 0.25, 0.0, None, None, None, 0.0, meta(slopes)))):
        with pytest.raises(ValueError, match=f"flash_attn_bwd: {name} is on meta, q on {q.device}"):
            bwd(*args)
    with FakeTensorMode():
        fq = torch.empty(1, 1, 16, 16, device="cuda")
        fo, flse = fwd(fq, fq, fq, True, 0.25, 0.1, torch.empty((), dtype=torch.int64, device="cuda"))
        with pytest.raises(ValueError, match=r"on q's device cuda:0, got torch.int64 \(\) on cpu"):
            bwd(fo, fq, fq, fq, fo, flse, True, 0.25, 0.1, torch.tensor(5))
    with torch.device("meta"):  # all on meta: the fake impls' own use (bench compile, shape checks)
        mo, mlse = fwd(meta(q), meta(k), meta(v), True, 0.25, 0.1, meta(seed))
        assert mo.shape == q.shape and bwd(mo, meta(q), meta(k), meta(v), mo, mlse, True, 0.25, 0.1,
                                           meta(seed))[0].is_meta


def test_flash_attention_moves_a_seed_tensor_to_qs_device(device):
    """A seed tensor on another device than q (a CPU one, q on the GPU; meta here too) is moved, not refused:
    the same mask as that seed given as an int."""
    q, k, v = make_qkv(1, 2, 16, 16, 16, torch.float32, device, seed=31)
    want = flash_attention(q, k, v, dropout_p=0.5, seed=5)
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.5, seed=torch.tensor(5, dtype=torch.int32)), want)
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.5, seed=torch.tensor([5], device=device)), want)
    with pytest.raises(NotImplementedError):  # meta holds no value to move: torch refuses the copy
        flash_attention(q, k, v, dropout_p=0.5, seed=torch.tensor(5, device="meta"))


def test_no_queries_give_zero_key_and_value_gradients(device, nan_filled_empty):
    """Tq = 0 against Tk = 5 keys (an empty chunk): an empty output, and dK = dV = 0 exactly, as
    SDPA gives (the kernels do not run, so the gradients are not left as uninitialised memory)."""
    gen = torch.Generator().manual_seed(27)
    q = torch.randn(2, 3, 0, 16, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(2, 3, 5, 16, generator=gen).to(device).requires_grad_() for _ in range(2))
    out = flash_attention(q, k, v, causal=False)
    assert out.shape == (2, 3, 0, 16)
    (out.sum() * 1.5).backward()
    assert q.grad.shape == q.shape
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_without_dropout_torch_rng_is_left_alone(device):
    """dropout_p = 0 draws no seed: the Triton path consumes torch's RNG as the reference path
    (SDPA without dropout) does, so sampling after an eval forward is the same on both paths."""
    q, k, v = make_qkv(1, 2, 9, 9, 16, torch.float32, device, seed=28)
    state = torch.get_rng_state()
    flash_attention(q, k, v)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_aot_eager(device):
    q, k, v = make_qkv(1, 2, 16, 20, 32, torch.float32, device, seed=11)

    def loss(a, b, c):
        return (flash_attention(a, b, c, dropout_p=0.2, seed=3) * 2).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager = run_grads(lambda a, b, c: loss(a, b, c).reshape(1), q, k, v, torch.ones(1))
    comp = run_grads(lambda a, b, c: compiled(a, b, c).reshape(1), q, k, v, torch.ones(1))
    for name, e, c in zip(("loss", "dq", "dk", "dv"), eager, comp):
        assert torch.equal(e, c), f"compiled {name} differs"


def test_custom_op_opcheck(device):
    q, k, v = make_qkv(1, 1, 16, 16, 32, torch.float32, device, seed=12)
    k = torch.cat([k, k], dim=2)[:, :, :16]  # a strided KV-cache slice
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, 0.1,
            torch.tensor(5, device=device))
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default, args)


def test_without_dropout_a_compiled_graph_holds_no_seed_tensor(device):
    """Without dropout the op gets seed None, not a CPU zeros(()): a compiled graph then holds no CPU tensor,
    which would make inductor skip CUDA graphs (mode="reduce-overhead") for the whole step. Gradients as eager."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = make_qkv(1, 2, 16, 20, 32, torch.float32, device, seed=14)
    gm = make_fx(lambda a, b, c: flash_attention(a, b, c))(q, k, v)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    attn = [n for n in calls if "flash_attn_fwd" in str(n.target)]
    assert len(attn) == 1 and attn[0].args[6] is None
    assert not any(n.op == "call_function" and n.target in (torch.ops.aten.zeros.default,
                                                             torch.ops.aten.scalar_tensor.default) for n in calls)
    seen = []
    compiled = torch.compile(lambda a, b, c: flash_attention(a, b, c).square().sum(), fullgraph=True,
                             backend=lambda g, ex: seen.append(g) or g)
    eager = run_grads(lambda a, b, c: flash_attention(a, b, c).square().sum().reshape(1), q, k, v, torch.ones(1))
    comp = run_grads(lambda a, b, c: compiled(a, b, c).reshape(1), q, k, v, torch.ones(1))
    for name, e, c in zip(("loss", "dq", "dk", "dv"), eager, comp):
        assert torch.equal(e, c), f"compiled {name} differs"
    assert seen and not any("zeros" in str(n.target) for g in seen for n in g.graph.nodes)
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, 0.0, None))


def test_the_op_with_dropout_and_no_seed_is_refused(device):
    q, k, v = make_qkv(1, 1, 8, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="dropout_p 0.1 needs a seed tensor"):
        torch.ops.tritongpt.flash_attn_fwd(q, k, v, True, 0.25, 0.1, None)


def test_custom_op_called_directly_checks_shapes(device):
    """The op also gives the logsumexp, so a caller may use it directly; it took a head dim the
    kernels lack and causal Tq > Tk, and gave garbage (NaN rows)."""
    op = torch.ops.tritongpt.flash_attn_fwd
    seed = torch.tensor(0)
    with pytest.raises(ValueError, match="head_dim 24"):
        op(*make_qkv(1, 1, 8, 8, 24, torch.float32, device), True, 0.25, 0.0, seed)
    q, k, v = make_qkv(1, 1, 8, 4, 16, torch.float32, device)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        op(q, k, v, True, 0.25, 0.0, seed)
    out, lse = op(q, k, v, False, 0.25, 0.0, seed)  # what it returns: o and the base-2 logsumexp
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.25
    assert_close_rel(out, torch.softmax(scores, -1) @ v.double(), 1e-5, "op out")
    assert_close_rel(lse, torch.logsumexp(scores, -1) / math.log(2), 1e-5, "op lse (base 2)")


# ----------------------------------------------------------------------------- packed documents
def runs(*lengths_per_row, ids=None):
    """doc_ids [B, T] with runs of the given lengths in each row (ids 0, 1, 2, ... unless given)."""
    rows = [sum(([(ids[i] if ids else i)] * n for i, n in enumerate(lengths)), []) for lengths in lengths_per_row]
    return torch.tensor(rows)


DOC_LAYOUTS = {
    # random run lengths, a different layout in each row
    "ragged": (2, 2, 45, 45, 16, runs([7, 1, 19, 3, 15], [30, 2, 13])),
    "one token each / one whole": (2, 1, 40, 40, 32, runs([1] * 40, [40])),
    # starts on the 16-row tiles' edges, and a run of ids seen before (A B A: three documents)
    "tile edges, A B A": (1, 2, 48, 48, 16, runs([16, 16, 16], ids=[5, 2, 5])),
    "queries the last 13 of 41 keys": (2, 1, 13, 41, 16, runs([10, 25, 6], [33, 8])),
    "head dim 80": (1, 1, 37, 37, 80, runs([5, 20, 12])),
}


@pytest.mark.parametrize("layout", list(DOC_LAYOUTS))
def test_fp32_documents_fwd_bwd(layout, device):
    """doc_ids: a query sees its own document's keys only, as the float64 reference masks them;
    forward and every gradient, for layouts whose starts fall inside tiles, on tile edges, with
    one-token documents, with queries that are the last Tq of Tk positions."""
    B, H, Tq, Tk, D, doc_ids = DOC_LAYOUTS[layout]
    q, k, v = make_qkv(B, H, Tq, Tk, D, torch.float32, device, seed=Tq + D)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(7)).to(device)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, doc_ids=doc_ids.to(device)), q, k, v, do)
    ref = reference_grads(q, k, v, do, doc_ids=doc_ids)
    for name, g, r in zip(NAMES, got, ref):
        assert_close_rel(g, r, 1e-4, f"{layout} {name}")
    # the mask bites: without it the output is another
    assert report(got[0], reference_attention(q.double(), k.double(), v.double()))[1] > 0.05


def test_a_packed_row_computes_each_document_as_if_alone(device):
    """Documents packed in one row give, output and gradients, what each gives alone (its own
    causal attention from its first position)."""
    lengths = [9, 23, 1, 14]
    doc_ids = runs(lengths).to(device)
    q, k, v = make_qkv(1, 2, 47, 47, 32, torch.float32, device, seed=8)
    do = torch.randn(1, 2, 47, 32, generator=torch.Generator().manual_seed(9)).to(device)
    packed = run_grads(lambda a, b, c: flash_attention(a, b, c, doc_ids=doc_ids), q, k, v, do)
    at = 0
    for n in lengths:
        part = slice(at, at + n)
        alone = run_grads(flash_attention, q[:, :, part], k[:, :, part], v[:, :, part], do[:, :, part])
        for name, p, a in zip(NAMES, packed, alone):
            if n == 1 and name in ("dq", "dk"):  # one key: the softmax is constant, both 0
                assert p[:, :, part].abs().max() < 1e-6 and a.abs().max() < 1e-6
                continue
            assert_close_rel(p[:, :, part], a, 1e-5, f"document of {n} {name}")
        at += n


def check_bf16_masked(B, H, Tq, Tk, D, seed, tag, **masks):
    """flash_attention(**masks) in bf16 within 2x the error of PyTorch's bf16 (the reference with
    the same masks) against float64, forward and every gradient."""
    q, k, v = make_qkv(B, H, Tq, Tk, D, torch.bfloat16, device=masks.pop("device"), seed=seed)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(seed + 1)).to(q)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, **masks), q, k, v, do)
    ref64 = reference_grads(q, k, v, do, **masks)
    torch_bf16 = reference_grads(q, k, v, do, dtype=torch.bfloat16, **masks)
    for name, g, r, t in zip(NAMES, got, ref64, torch_bf16):
        _, torch_rel = report(t, r)
        _, rel = assert_close_rel(g, r, 2e-2, f"bf16 {tag} {name}")
        assert rel <= 2 * torch_rel + BF16_FLOOR, f"bf16 {name}: {rel:.3e} > 2 x torch's {torch_rel:.3e}"


def test_bf16_documents_within_2x_of_torch_bf16(device):
    B, H, Tq, Tk, D, doc_ids = DOC_LAYOUTS["ragged"]
    check_bf16_masked(B, H, Tq, Tk, 64, 21, "documents", device=device, doc_ids=doc_ids.to(device))


def test_dropout_with_documents(device):
    B, H, Tq, Tk, D, doc_ids = DOC_LAYOUTS["queries the last 13 of 41 keys"]
    p, seed = 0.25, 99
    q, k, v = make_qkv(B, H, Tq, Tk, D, torch.float32, device, seed=3)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(4)).to(device)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=p, seed=seed, doc_ids=doc_ids.to(device)),
                    q, k, v, do)
    keep = dropout_mask(seed, B, H, Tq, Tk, p, device)
    ref = reference_grads(q, k, v, do, keep=keep, dropout_p=p, doc_ids=doc_ids)
    for name, g, r in zip(NAMES, got, ref):
        assert_close_rel(g, r, 1e-4, f"dropout documents {name}")


def test_document_bounds_are_each_runs_first_and_one_past_its_last():
    from tritongpt.kernels.attention import document_bounds

    starts, ends = document_bounds(torch.tensor([[7, 7, 3, 3, 3, 7, 1], [0, 0, 0, 0, 0, 0, 0]]))
    assert starts.dtype == ends.dtype == torch.int32
    assert starts.tolist() == [[0, 0, 2, 2, 2, 5, 6], [0] * 7]
    assert ends.tolist() == [[2, 2, 5, 5, 5, 6, 7], [7] * 7]


def test_documents_bad_input(device):
    q, k, v = make_qkv(2, 1, 8, 12, 16, torch.float32, device)
    ids = torch.zeros(2, 12, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"doc_ids \(document masking\) needs causal=True"):
        flash_attention(q, k, v, causal=False, doc_ids=ids)
    with pytest.raises(ValueError, match=r"doc_ids must be \[B, Tk\] = \[2, 12\] .one id per key position., "
                                         r"got \(2, 8\)"):
        flash_attention(q, k, v, doc_ids=ids[:, :8])
    with pytest.raises(TypeError, match="doc_ids must hold integer document ids, got dtype torch.float32"):
        flash_attention(q, k, v, doc_ids=ids.float())
    with pytest.raises(TypeError, match="doc_ids must hold integer document ids, got dtype torch.bool"):
        flash_attention(q, k, v, doc_ids=ids.bool())
    with pytest.raises(TypeError, match="doc_ids must be an integer tensor"):
        flash_attention(q, k, v, doc_ids=[[0] * 12] * 2)
    with pytest.raises(ValueError, match=f"doc_ids is on meta, q on {device.type}: they must share a device"):
        flash_attention(q, k, v, doc_ids=ids.to("meta"))
    op, seed = torch.ops.tritongpt.flash_attn_fwd, torch.tensor(0)
    starts = torch.zeros(2, 12, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="need both starts and ends"):
        op(q, k, v, True, 0.25, 0.0, seed, starts, None)
    with pytest.raises(ValueError, match=r"ends must be int32 \[B, Tk\]"):
        op(q, k, v, True, 0.25, 0.0, seed, starts, starts.long())
    # the kernels read a row's bounds at unit stride, and mask by them inside the causal range only
    strided = torch.zeros(2, 24, dtype=torch.int32, device=device)[:, ::2]
    with pytest.raises(ValueError, match=r"starts must be int32 .* with unit stride"):
        op(q, k, v, True, 0.25, 0.0, seed, strided, starts)
    with pytest.raises(ValueError, match="document masking needs causal=True"):
        op(q, k, v, False, 0.25, 0.0, seed, starts, starts)


def test_document_bounds_given_to_the_op_at_other_row_strides(device):
    """The op's starts and ends may come with row strides of their own (slices of wider
    tensors): the kernels stepped both by starts' stride, so a batch row's ends were read from
    the wrong place and its dK/dV skipped query tiles it needs."""
    from tritongpt.kernels.attention import document_bounds

    q, k, v = make_qkv(2, 1, 20, 20, 16, torch.float32, device, seed=17)
    do = torch.randn(2, 1, 20, 16, generator=torch.Generator().manual_seed(18)).to(device)
    starts, ends = document_bounds(runs([6, 14], [11, 9]).to(device))
    wide_ends = torch.cat([ends, torch.zeros_like(ends)], 1)[:, :20]  # row stride 40, starts' 20
    assert torch.equal(wide_ends, ends) and wide_ends.stride(0) != starts.stride(0)

    def op(s, e):
        return lambda a, b, c: torch.ops.tritongpt.flash_attn_fwd(a, b, c, True, 0.25, 0.0, torch.tensor(0), s, e)[0]

    want = run_grads(op(starts, ends), q, k, v, do)
    for s, e in ((starts, wide_ends), (torch.cat([starts, starts], 1)[:, 20:], ends)):
        for name, g, w in zip(NAMES, run_grads(op(s, e), q, k, v, do), want):
            assert torch.equal(g, w), name


def check_bounds_op_and_compile(q, k, v, starts, ends, **masks):
    """opcheck of the op with these bounds, and torch.compile of flash_attention(**masks) giving
    the eager bits."""
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, 0.0, torch.tensor(0),
            starts, ends)
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default, args)

    def loss(a, b, c):
        return flash_attention(a, b, c, **masks).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager = run_grads(lambda a, b, c: loss(a, b, c).reshape(1), q, k, v, torch.ones(1))
    comp = run_grads(lambda a, b, c: compiled(a, b, c).reshape(1), q, k, v, torch.ones(1))
    for name, e, c in zip(("loss", "dq", "dk", "dv"), eager, comp):
        assert torch.equal(e, c), f"compiled {name} differs"


def test_documents_custom_op_opcheck_and_compile(device):
    from tritongpt.kernels.attention import document_bounds

    q, k, v = make_qkv(1, 1, 20, 20, 16, torch.float32, device, seed=13)
    check_bounds_op_and_compile(q, k, v, *document_bounds(runs([6, 14]).to(device)), doc_ids=runs([6, 14]).to(device))


# ----------------------------------------------------------------------------- local attention
WINDOW_LAYOUTS = {  # (B, H, Tq, Tk, D, window) against 16 x 16 tiles in the interpreter
    "window 5, inside a tile": (2, 1, 37, 37, 32, 5),
    "window of one tile": (1, 2, 45, 45, 16, 16),
    "window 17, a tile and one": (1, 1, 40, 40, 64, 17),
    "queries the last 13 of 41 keys": (2, 1, 13, 41, 16, 7),
    "one query, decode": (1, 1, 1, 41, 32, 9),
    "window 30 of 50, head dim 80": (1, 1, 50, 50, 80, 30),
}


def check_window(B, H, Tq, Tk, D, window, device, tag, doc_ids=None, dropout_p=0.0, seed=None):
    q, k, v = make_qkv(B, H, Tq, Tk, D, torch.float32, device, seed=Tq + window)
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(window)).to(device)
    masks = dict(window=window, doc_ids=doc_ids)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=dropout_p, seed=seed, **masks), q, k, v, do)
    keep = dropout_mask(seed, B, H, Tq, Tk, dropout_p, device) if dropout_p else None
    ref = reference_grads(q, k, v, do, keep=keep, dropout_p=dropout_p, **masks)
    for name, g, r in zip(NAMES, got, ref):
        assert_close_rel(g, r, 1e-4, f"{tag} {name}")
    return q, k, v, got


@pytest.mark.parametrize("layout", list(WINDOW_LAYOUTS))
def test_fp32_window_fwd_bwd(layout, device):
    """window=W: query i sees keys i - W < j <= i, as the float64 reference masks them; forward
    and every gradient, windows inside a tile, of one tile and across tile edges, with queries
    that are the last Tq of Tk positions (a KV cache)."""
    q, k, v, got = check_window(*WINDOW_LAYOUTS[layout], device, layout)
    if q.shape[2] > WINDOW_LAYOUTS[layout][-1]:  # the window bites: without it the output is another
        assert report(got[0], reference_attention(q.double(), k.double(), v.double()))[1] > 0.05


def test_window_with_documents_and_dropout(device):
    """A window inside packed documents (each query: its own document's keys within its window),
    and with dropout: the same mask as the reference with the kernel's keep-mask."""
    check_window(2, 1, 45, 45, 16, 9, device, "window 9 in documents", doc_ids=runs([10, 25, 10], [30, 15]).to(device))
    check_window(1, 2, 13, 41, 16, 11, device, "window 11, dropout 0.25", dropout_p=0.25, seed=5)


def test_window_edges(device):
    """window 1 sees only itself (the output is v, dq and dk vanish); a window as long as the
    sequence, or longer, masks nothing and takes the dense kernels: the same bits as no window."""
    q, k, v = make_qkv(1, 2, 21, 21, 16, torch.float32, device, seed=4)
    do = torch.randn(1, 2, 21, 16, generator=torch.Generator().manual_seed(5)).to(device)
    out, dq, dk, dv = run_grads(lambda a, b, c: flash_attention(a, b, c, window=1), q, k, v, do)
    assert torch.allclose(out, v, atol=1e-6) and torch.allclose(dv, do, atol=1e-6)
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5
    dense = run_grads(flash_attention, q, k, v, do)
    for window in (21, 1000, 2 ** 40):
        for name, g, d in zip(NAMES, run_grads(lambda a, b, c: flash_attention(a, b, c, window=window), q, k, v, do),
                              dense):
            assert torch.equal(g, d), f"window {window} {name}"


def test_window_skips_the_tiles_outside_it(device):
    """The KV tiles before every row's window are never read: NaN values there do not reach the
    rows of later tiles (the dense kernel reads them: P x NaN spreads to every row)."""
    q, k, v = make_qkv(1, 1, 64, 64, 16, torch.float32, device, seed=6)
    v[:, :, :16] = float("nan")
    late = slice(48, 64)  # rows 48.. with a window of 20 see keys 29.. only
    assert torch.isfinite(flash_attention(q, k, v, window=20)[:, :, late]).all()
    assert torch.isnan(flash_attention(q, k, v)[:, :, late]).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's, on NaN rows
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_window_skips_the_tiles_outside_it_in_every_pass(device):
    """As above for the backward passes too, with queries the last 45 of 61 keys (a ragged query tile):
    forward and dQ never read the KV tiles before every row's window (NaN keys and values there do
    not reach the late rows' output and dq), dK/dV never reads the query tiles past every key's
    window (NaN queries there do not reach the first keys' dk, dv). Reading them would change no
    finite answer, only the cost (a window's layer is O(T W)): NaN is what makes the reads show."""
    q, k, v = make_qkv(1, 1, 45, 61, 16, torch.float32, device, seed=7)
    do = torch.randn(1, 1, 45, 16, generator=torch.Generator().manual_seed(8)).to(device)
    late = slice(32, 45)  # positions 48.. with a window of 20 see keys 29.. only
    k[:, :, :16], v[:, :, :16] = float("nan"), float("nan")
    out, dq, _, _ = run_grads(lambda a, b, c: flash_attention(a, b, c, window=20), q, k, v, do)
    assert torch.isfinite(out[:, :, late]).all() and torch.isfinite(dq[:, :, late]).all()
    q, k, v = make_qkv(1, 1, 45, 61, 16, torch.float32, device, seed=7)
    q[:, :, late] = float("nan")  # keys 0..15 are seen by positions up to 34 only: rows up to 18
    _, _, dk, dv = run_grads(lambda a, b, c: flash_attention(a, b, c, window=20), q, k, v, do)
    assert torch.isfinite(dk[:, :, :16]).all() and torch.isfinite(dv[:, :, :16]).all()
    assert torch.isnan(run_grads(flash_attention, q, k, v, do)[2][:, :, :16]).all()  # the dense kernel reads them


def test_bf16_window_within_2x_of_torch_bf16(device):
    B, H, Tq, Tk, D, window = WINDOW_LAYOUTS["window 17, a tile and one"]
    check_bf16_masked(B, H, Tq, Tk, D, 22, "window", device=device, window=window)


def test_window_bounds(device):
    from tritongpt.kernels.attention import _doc_args, document_bounds, window_bounds

    starts, ends = window_bounds(3, 7, batch=2)
    assert starts.dtype == ends.dtype == torch.int32 and starts.shape == (2, 7)
    assert starts.tolist() == [[0, 0, 0, 1, 2, 3, 4]] * 2
    assert ends.tolist() == [[3, 4, 5, 6, 7, 7, 7]] * 2
    # one row for the batch, both at stride 0, and the kernels are given them so (not copied per row)
    assert starts.stride(0) == ends.stride(0) == 0 and _doc_args(None, starts, ends)[2] == 0
    assert window_bounds(7, 7) == (None, None)  # nothing to mask
    starts, ends = window_bounds(6, 7)  # one position short of the sequence: the last query loses key 0
    assert starts.tolist() == [[0, 0, 0, 0, 0, 0, 1]] and ends.tolist() == [[6, 7, 7, 7, 7, 7, 7]]
    # with documents: each position's own document within its window
    docs = document_bounds(torch.tensor([[7, 7, 7, 7, 7, 1, 1]], device=device))
    starts, ends = window_bounds(3, 7, 1, None, *docs)  # on the documents' device
    assert starts.device == ends.device == docs[0].device
    assert starts.tolist() == [[0, 0, 0, 1, 2, 5, 5]] and ends.tolist() == [[3, 4, 5, 5, 5, 7, 7]]
    # a window that masks nothing leaves the documents' bounds as they are (not the dense kernels' None)
    assert all(w is d for w, d in zip(window_bounds(7, 7, 1, None, *docs), docs, strict=True))


def test_window_bad_input(device):
    q, k, v = make_qkv(1, 1, 8, 8, 16, torch.float32, device)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"window must be at least 1 .a query sees itself., got {bad}"):
            flash_attention(q, k, v, window=bad)
    for bad in (2.0, "8", True):
        with pytest.raises(TypeError, match="window must be an int"):
            flash_attention(q, k, v, window=bad)
    with pytest.raises(ValueError, match=r"window \(local attention\) needs causal=True"):
        flash_attention(q, k, v, causal=False, window=4)
    # causal as flash_attention takes it (1, numpy's bool: == True) is causal with a window and documents too
    import numpy as np

    ids = torch.tensor([[0] * 3 + [1] * 5], device=device)
    want = flash_attention(q, k, v, window=4, doc_ids=ids)
    for causal in (1, np.bool_(True)):
        assert torch.equal(flash_attention(q, k, v, causal=causal, window=4, doc_ids=ids), want)


def test_window_custom_op_opcheck_and_compile(device):
    """The window's bounds reach the op expanded (one row for the batch, stride 0)."""
    from tritongpt.kernels.attention import window_bounds

    q, k, v = make_qkv(2, 1, 20, 20, 16, torch.float32, device, seed=14)
    starts, ends = window_bounds(6, 20, 2, device)
    assert starts.stride(0) == 0
    check_bounds_op_and_compile(q, k, v, starts, ends, window=6)


# ----------------------------------------------------------------------------- head dim 256 (Gemma)
HEAD_DIM_256 = {  # (B, H, Tq, Tk, flash_attention's masks and dropout): no length a multiple of 16
    "causal": (1, 2, 37, 37, {}),
    "not causal, a scale": (2, 1, 20, 33, dict(causal=False, softmax_scale=0.07)),
    "window 9": (1, 1, 45, 45, dict(window=9)),
    "documents and dropout, the last 13 of 41 keys": (1, 1, 13, 41, dict(doc_ids=runs([10, 25, 6]), dropout_p=0.25,
                                                                        seed=5)),
    "one query, decode": (1, 2, 1, 41, {}),
}


@pytest.mark.parametrize("case", list(HEAD_DIM_256))
def test_fp32_head_dim_256_fwd_bwd(case, device):
    """Gemma's 256-wide heads (one BLOCK_D = 256 tile, none padded): forward and every gradient
    against float64, causal or not, a window, documents with dropout, and decode (one query, 41 keys)."""
    B, H, Tq, Tk, masks = HEAD_DIM_256[case]
    masks = {k: (m.to(device) if isinstance(m, torch.Tensor) else m) for k, m in masks.items()}
    p, seed = masks.pop("dropout_p", 0.0), masks.pop("seed", None)
    q, k, v = make_qkv(B, H, Tq, Tk, 256, torch.float32, device, seed=Tq * Tk)
    do = torch.randn(B, H, Tq, 256, generator=torch.Generator().manual_seed(Tk)).to(device)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=p, seed=seed, **masks), q, k, v, do)
    keep = dropout_mask(seed, B, H, Tq, Tk, p, device) if p else None
    ref = reference_grads(q, k, v, do, keep=keep, dropout_p=p, **masks)
    for name, g, r in zip(NAMES, got, ref):
        assert_close_rel(g, r, 1e-4, f"hd256 {case} {name}")
    # the upper half of the head on its own: a kernel that kept only 128 columns would fail here
    assert report(got[0][..., 128:], ref[0][..., 128:])[1] < 1e-4


@pytest.mark.parametrize("Tq,Tk,masks", [(37, 37, {}), (19, 45, dict(window=17))])
def test_bf16_head_dim_256_within_2x_of_torch_bf16(Tq, Tk, masks, device):
    check_bf16_masked(1, 2, Tq, Tk, 256, Tq + Tk, "hd256", device=device, **masks)


# ----------------------------------------------------------------------------- soft cap (Gemma 2)
SOFTCAP_CASES = {  # (B, H, Tq, Tk, D, flash_attention's arguments): no length a multiple of 16
    "causal, c 3": (1, 2, 37, 37, 32, dict(softcap=3.0)),
    "not causal, a scale, c 2": (2, 1, 21, 45, 64, dict(causal=False, softmax_scale=0.3, softcap=2.0)),
    "the last 19 of 45 keys, c 4": (1, 2, 19, 45, 32, dict(softcap=4.0)),
    "one query, decode, c 2": (1, 1, 1, 41, 32, dict(softcap=2.0)),
    "documents, c 3": (2, 1, 45, 45, 16, dict(doc_ids=runs([7, 1, 19, 3, 15], [30, 2, 13]), softcap=3.0)),
    "window 17, c 5": (1, 1, 40, 40, 64, dict(window=17, softcap=5.0)),
    "dropout, head dim 80, c 3": (2, 1, 24, 40, 80, dict(dropout_p=0.3, seed=77, softcap=3.0)),
    "head dim 256, window 9, c 4": (1, 1, 33, 33, 256, dict(window=9, softcap=4.0)),
    "a cap below 1, c 0.6": (1, 1, 21, 21, 16, dict(softcap=0.6)),  # (a flag from c > 1 took it as no cap)
}


@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
def test_fp32_softcap_fwd_bwd(case, device):
    """softcap=c: every scaled score s becomes c tanh(s / c) before the masks, as the float64
    reference computes it; forward and every gradient (dS through the cap's 1 - tanh^2), causal or
    not, chunked prefill and decode, documents, a window, dropout against dropout_mask, head dims
    80 (padded) and 256. q is doubled so the scores are a few units and the caps of 2..5 bend them."""
    B, H, Tq, Tk, D, kw = SOFTCAP_CASES[case]
    kw = {n: (a.to(device) if isinstance(a, torch.Tensor) else a) for n, a in kw.items()}
    p, seed = kw.pop("dropout_p", 0.0), kw.pop("seed", None)
    q, k, v = make_qkv(B, H, Tq, Tk, D, torch.float32, device, seed=Tq * Tk + D)
    q = q * 2
    do = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(Tq)).to(device)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=p, seed=seed, **kw), q, k, v, do)
    keep = dropout_mask(seed, B, H, Tq, Tk, p, device) if p else None
    ref = reference_grads(q, k, v, do, keep=keep, dropout_p=p, **kw)
    uncapped = reference_grads(q, k, v, do, keep=keep, dropout_p=p, **dict(kw, softcap=None))
    for name, g, r, u in zip(NAMES, got, ref, uncapped):
        assert_close_rel(g, r, 1e-4, f"softcap {case} {name}")
        if name != "dv" or Tq > 1:  # the cap bends the answer (decode's dv: one row's weights, still bent)
            assert report(u, r)[1] > 0.05, f"{case} {name}: the cap does not change it; the test cannot fail"


@pytest.mark.parametrize("Tq,Tk,masks", [(37, 37, dict(softcap=2.0)), (19, 45, dict(window=17, softcap=3.0))])
def test_bf16_softcap_within_2x_of_torch_bf16(Tq, Tk, masks, device):
    check_bf16_masked(1, 2, Tq, Tk, 64, Tq + Tk, "softcap", device=device, **masks)


def test_softcap_none_or_zero_is_no_cap_and_a_large_one_almost(device):
    """None and 0 take the kernels without the cap (the same bits); a cap far above the scores
    changes them by ~s^3 / (3 c^2) only. A tanh off by 1e-7 absolute near 0 (2 sigmoid(2u) - 1)
    was off by 1e-7 c there: 1e-1 in every score at c = 1e6."""
    q, k, v = make_qkv(1, 2, 29, 29, 32, torch.float32, device, seed=31)
    do = torch.randn(1, 2, 29, 32, generator=torch.Generator().manual_seed(32)).to(device)
    plain = run_grads(flash_attention, q, k, v, do)
    for cap in (None, 0, 0.0):
        for name, g, w in zip(NAMES, run_grads(lambda a, b, c: flash_attention(a, b, c, softcap=cap), q, k, v, do),
                              plain):
            assert torch.equal(g, w), f"softcap {cap!r} {name}"
    ref = reference_grads(q, k, v, do)
    for cap in (1e4, 1e6, 1e30):
        for name, g, r in zip(NAMES, run_grads(lambda a, b, c: flash_attention(a, b, c, softcap=cap), q, k, v, do),
                              ref):
            assert_close_rel(g, r, 1e-5, f"softcap {cap:g} {name}")


def test_softcap_custom_op_opcheck_and_compile(device):
    """The ops take softcap last (old call sites keep working); opcheck with it, and torch.compile of
    flash_attention(softcap=...) gives the eager bits."""
    # T 12: one ragged tile (16 a tile under the interpreter), a quarter of 20's programs' work
    q, k, v = make_qkv(1, 1, 12, 12, 16, torch.float32, device, seed=15)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, 0.1,
            torch.tensor(5, device=device), None, None, 2.5)
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default, args)

    def loss(a, b, c):
        return flash_attention(a, b, c, softcap=2.5, dropout_p=0.1, seed=5).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager = run_grads(lambda a, b, c: loss(a, b, c).reshape(1), q, k, v, torch.ones(1))
    comp = run_grads(lambda a, b, c: compiled(a, b, c).reshape(1), q, k, v, torch.ones(1))
    for name, e, c in zip(("loss", "dq", "dk", "dv"), eager, comp):
        assert torch.equal(e, c), f"compiled {name} differs"


def test_softcap_bad_values(device):
    """softcap: None, 0 or a finite real > 0, refused by name otherwise (on the op too)."""
    import numpy as np

    q, k, v = make_qkv(1, 1, 8, 8, 16, torch.float32, device)
    for bad in (True, "50", torch.tensor(50.0), [50.0]):
        with pytest.raises(TypeError, match="softcap must be a float"):
            flash_attention(q, k, v, softcap=bad)
    for bad in (-1.0, -50, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"softcap must be a finite number > 0 .*, got {bad}"):
            flash_attention(q, k, v, softcap=bad)
    for bad in (1e-40, 3e38):  # c log2(e) or its inverse past fp32
        with pytest.raises(ValueError, match=re.escape(f"softcap {bad!r} is out of range")):
            flash_attention(q, k, v, softcap=bad)
    op, seed = torch.ops.tritongpt.flash_attn_fwd, torch.tensor(0)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        op(q, k, v, True, 0.25, 0.0, seed, None, None, -2.0)
    o, lse = op(q, k, v, True, 0.25, 0.0, seed, None, None, 2.0)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        torch.ops.tritongpt.flash_attn_bwd(torch.ones_like(o), q, k, v, o, lse, True, 0.25, 0.0, seed, None, None,
                                           float("nan"))
    want = flash_attention(q, k, v, softcap=2.0)  # numpy's numbers are numbers
    assert torch.equal(flash_attention(q, k, v, softcap=np.float32(2.0)), want)
    assert torch.equal(o, want)


# ----------------------------------------------------------------------------- ALiBi (BLOOM, MPT)
ALIBI_CASES = {  # (B, H, Hkv, Tq, Tk, D, slopes: "model" for alibi_slopes(H) else random, flash_attention's arguments)
    "H 6, T 37": (1, 6, 6, 37, 37, 32, "model", {}),
    "GQA 6 over 2, T 37": (1, 6, 2, 37, 37, 16, "model", {}),
    "the last 5 of 37 keys, GQA 6 over 3": (1, 6, 3, 5, 37, 32, "model", {}),
    "one query, decode": (1, 2, 2, 1, 41, 32, "random", {}),
    "documents": (2, 1, 1, 45, 45, 16, "random", dict(doc_ids=runs([7, 1, 19, 3, 15], [30, 2, 13]))),
    "window 9, softcap 3": (1, 2, 2, 37, 37, 32, "random", dict(window=9, softcap=3.0)),
    "not causal, a scale": (1, 2, 2, 21, 45, 32, "random", dict(causal=False, softmax_scale=0.3)),
    "dropout, head dim 80": (1, 2, 1, 24, 40, 80, "random", dict(dropout_p=0.3, seed=77)),
}


def alibi_case(case, dtype, device):
    """q, k, v, do, the slopes and the other arguments of an ALIBI_CASES entry."""
    from tritongpt.model.layers import alibi_slopes

    B, H, Hkv, Tq, Tk, D, which, kw = ALIBI_CASES[case]
    kw = {n: (a.to(device) if isinstance(a, torch.Tensor) else a) for n, a in kw.items()}
    q, k, v = make_qkv(B, H, Tq, Tk, D, dtype, device, seed=Tq * Tk + D)
    k, v = k[:, :Hkv].contiguous(), v[:, :Hkv].contiguous()
    # random slopes of 0.1..0.6: a bias of a few units over a few dozen positions, in every head
    g = torch.Generator().manual_seed(Tk)
    slopes = alibi_slopes(H) if which == "model" else torch.rand(H, generator=g) * 0.5 + 0.1
    do = torch.randn(B, H, Tq, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do, slopes.to(device), kw


def alibi_reference_grads(q, k, v, do, dtype=torch.float64, **kw):
    """reference_grads with KV heads repeated for their query heads (dk, dv summed over the group)."""
    group = q.shape[1] // k.shape[1]
    return run_grads(lambda a, b, c: reference_attention(a, b.repeat_interleave(group, 1),
                                                         c.repeat_interleave(group, 1), **kw),
                     q.to(dtype), k.to(dtype), v.to(dtype), do)


@pytest.mark.parametrize("case", list(ALIBI_CASES))
def test_fp32_alibi_fwd_bwd(case, device):
    """alibi_slopes: each scaled score of query position i (Tk - Tq + i) and key j gets m_h (j - i),
    as the float64 reference adds it; forward and every gradient, 6 heads (the non-power-of-two
    slopes), GQA, chunked prefill and decode, documents, a window with a soft cap (the bias after
    the cap), non-causal, dropout. Without the bias the reference is far off, so the test can fail."""
    q, k, v, do, slopes, kw = alibi_case(case, torch.float32, device)
    p, seed = kw.pop("dropout_p", 0.0), kw.pop("seed", None)
    B, H, Tq, Tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=p, seed=seed, alibi_slopes=slopes, **kw),
                    q, k, v, do)
    keep = dropout_mask(seed, B, H, Tq, Tk, p, device) if p else None
    ref = alibi_reference_grads(q, k, v, do, keep=keep, dropout_p=p, alibi_slopes=slopes.cpu(), **kw)
    plain = alibi_reference_grads(q, k, v, do, keep=keep, dropout_p=p, **kw)
    for name, g, r, u in zip(NAMES, got, ref, plain):
        assert_close_rel(g, r, 1e-4, f"alibi {case} {name}")
        assert report(u, r)[1] > 0.02, f"{case} {name}: the bias does not change it; the test cannot fail"


@pytest.mark.parametrize("case", ["GQA 6 over 2, T 37", "the last 5 of 37 keys, GQA 6 over 3"])
def test_bf16_alibi_within_1e_2(case, device):
    """bf16 with ALiBi against float64: within 1e-2 relative, and within 2x PyTorch's own bf16."""
    q, k, v, do, slopes, kw = alibi_case(case, torch.bfloat16, device)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, alibi_slopes=slopes, **kw), q, k, v, do)
    ref = alibi_reference_grads(q, k, v, do, alibi_slopes=slopes.cpu(), **kw)
    torch_bf16 = alibi_reference_grads(q, k, v, do, dtype=torch.bfloat16, alibi_slopes=slopes.cpu(), **kw)
    for name, g, r, t in zip(NAMES, got, ref, torch_bf16):
        _, rel = assert_close_rel(g, r, 1e-2, f"bf16 alibi {case} {name}")
        assert rel <= 2 * report(t, r)[1], f"bf16 alibi {name}: {rel:.3e} > 2 x torch's"


def test_alibi_decode_rows_equal_the_whole_sequence(device):
    """A chunk of the last Tq queries over all Tk keys (the KV cache's call) gives the rows the whole
    sequence gives them: the bias follows positions Tk - Tq + i, not the chunk's own indices."""
    from tritongpt.model.layers import alibi_slopes

    q, k, v = make_qkv(1, 6, 37, 37, 32, torch.float32, device, seed=6)
    slopes = alibi_slopes(6).to(device)
    whole = flash_attention(q, k, v, alibi_slopes=slopes)
    for Tq in (1, 3, 20):
        chunk = flash_attention(q[:, :, -Tq:], k, v, alibi_slopes=slopes)
        assert_close_rel(chunk, whole[:, :, -Tq:], 1e-5, f"alibi chunk of {Tq}")


def test_alibi_custom_op_opcheck_and_compile(device):
    """The ops take the slopes last (old call sites keep working); opcheck with them, and torch.compile
    of flash_attention(alibi_slopes=...) gives the eager bits."""
    q, k, v = make_qkv(1, 2, 12, 12, 16, torch.float32, device, seed=15)  # T 12: one ragged tile
    slopes = torch.tensor([0.25, 0.5], device=device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, 0.1,
            torch.tensor(5, device=device), None, None, 0.0, slopes)
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default, args)

    def loss(a, b, c):
        return flash_attention(a, b, c, alibi_slopes=slopes, dropout_p=0.1, seed=5).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager = run_grads(lambda a, b, c: loss(a, b, c).reshape(1), q, k, v, torch.ones(1))
    comp = run_grads(lambda a, b, c: compiled(a, b, c).reshape(1), q, k, v, torch.ones(1))
    for name, e, c in zip(("loss", "dq", "dk", "dv"), eager, comp):
        assert torch.equal(e, c), f"compiled {name} differs"


def test_alibi_slopes_requiring_grad_are_refused_not_left_without_a_gradient(device):
    """The kernels take the slopes as a constant: slopes that require grad (learnable ones) are refused while grad is
    on, instead of a backward that leaves their .grad None; under no_grad they are read as any slopes."""
    q, k, v = make_qkv(1, 2, 8, 8, 16, torch.float32, device)
    slopes = torch.tensor([0.5, 0.25], device=device, requires_grad=True)
    with pytest.raises(ValueError, match=r"alibi_slopes requires grad, but the kernels take the slopes as a constant "
                       r"\(no gradient\): pass alibi_slopes.detach\(\), or learn them in torch .*alibi_bias"):
        flash_attention(q, k, v, alibi_slopes=slopes)
    with torch.no_grad():
        assert torch.equal(flash_attention(q, k, v, alibi_slopes=slopes), flash_attention(q, k, v,
                                                                                          alibi_slopes=slopes.detach()))


def test_the_op_refuses_alibi_slopes_requiring_grad_too(device):
    """A direct caller of the registered op, whose backward returns None for the slopes: refused while grad is on
    (slopes alone requiring grad, or beside q), read as any slopes under no_grad or detached."""
    q, k, v = make_qkv(1, 2, 8, 8, 16, torch.float32, device)
    slopes = torch.tensor([0.5, 0.25], device=device, requires_grad=True)
    op = torch.ops.tritongpt.flash_attn_fwd
    args = (True, 0.25, 0.0, None, None, None, 0.0)
    for q_in in (q, q.clone().requires_grad_()):
        with pytest.raises(ValueError, match=r"flash_attn_fwd: alibi requires grad, but the kernels take the slopes "
                                             r"as a constant \(no gradient\): pass alibi.detach\(\)"):
            op(q_in, k, v, *args, slopes)
    with torch.no_grad():
        want, _ = op(q, k, v, *args, slopes)
    got, _ = op(q.clone().requires_grad_(), k, v, *args, slopes.detach())
    assert torch.equal(got, want)


def test_alibi_bad_slopes(device):
    """alibi_slopes: None or a finite fp32 [H] tensor on q's device, refused by name otherwise (the op too)."""
    q, k, v = make_qkv(1, 2, 8, 8, 16, torch.float32, device)
    with pytest.raises(TypeError, match="alibi_slopes must be a float32 tensor"):
        flash_attention(q, k, v, alibi_slopes=[0.5, 0.25])
    for bad in (torch.ones(3, device=device), torch.ones(1, 2, device=device), torch.ones(2, dtype=torch.float64,
                                                                                          device=device),
                torch.ones(2, dtype=torch.bfloat16, device=device), torch.ones(2, device="meta")):
        with pytest.raises(ValueError, match=re.escape("alibi_slopes must be float32 [H] = [2]")):
            flash_attention(q, k, v, alibi_slopes=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alibi_slopes must be finite"):
            flash_attention(q, k, v, alibi_slopes=torch.tensor([0.5, bad], device=device))
    # the values are read once per tensor while unchanged: an in-place write is read again
    slopes = torch.tensor([0.5, 0.25], device=device)
    flash_attention(q, k, v, alibi_slopes=slopes)
    slopes[1] = float("nan")
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        flash_attention(q, k, v, alibi_slopes=slopes)
    op, seed, slopes = torch.ops.tritongpt.flash_attn_fwd, torch.tensor(0), torch.tensor([0.5, 0.25], device=device)
    with pytest.raises(ValueError, match="alibi_slopes must be float32"):
        op(q, k, v, True, 0.25, 0.0, seed, None, None, 0.0, slopes[:1])
    o, lse = op(q, k, v, True, 0.25, 0.0, seed, None, None, 0.0, slopes)
    with pytest.raises(ValueError, match="alibi_slopes must be float32"):
        torch.ops.tritongpt.flash_attn_bwd(torch.ones_like(o), q, k, v, o, lse, True, 0.25, 0.0, seed, None, None,
                                           0.0, slopes.double())
    assert torch.equal(o, flash_attention(q, k, v, alibi_slopes=slopes))
    # a strided view is read by its values
    assert torch.equal(flash_attention(q, k, v, alibi_slopes=torch.tensor([0.5, 9.0, 0.25], device=device)[::2]), o)


# ----------------------------------------------------------------------------- bad input
def test_softmax_scale_must_be_a_finite_float(device):
    """A tensor scale (a learnable temperature) was read by float(): no gradient reached it, and
    torch.compile failed inside the op on a SymFloat; "0.3", True, nan and inf were taken too, and
    a scale whose fp32 scale * log2(e) is inf (1e39) gave NaN everywhere."""
    q, k, v = make_qkv(1, 1, 8, 8, 16, torch.float32, device)
    temperature = torch.nn.Parameter(torch.tensor(0.25))
    with pytest.raises(TypeError, match="softmax_scale must be a Python float, got a tensor"):
        flash_attention(q, k, v, softmax_scale=temperature)
    for bad in ("0.3", True):
        with pytest.raises(TypeError, match="softmax_scale must be a float"):
            flash_attention(q, k, v, softmax_scale=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softmax_scale must be finite"):
            flash_attention(q, k, v, softmax_scale=bad)
    # finite as a Python float, but times log2(e) past fp32's 3.4e38, as the kernels take it:
    # every output was NaN (SDPA's fp32 scores are inf/NaN there too)
    for bad in (1e39, -2.4e38):
        with pytest.raises(ValueError, match="softmax_scale .* is too large"):
            flash_attention(q, k, v, softmax_scale=bad)
    want = reference_attention(q.double(), k.double(), v.double(), softmax_scale=1e30)  # one-hot rows
    assert_close_rel(flash_attention(q, k, v, softmax_scale=1e30), want, 1e-5, "scale 1e30")
    import numpy as np  # numbers of any kind are fine, 0 and negative scales too

    for scale in (np.float32(0.25), 0, -0.5):
        want = reference_attention(q.double(), k.double(), v.double(), softmax_scale=float(scale))
        assert_close_rel(flash_attention(q, k, v, softmax_scale=scale), want, 1e-5, f"scale {scale}")


def test_positive_scale_below_fp32s_smallest_normal_is_uniform_not_nan(device):
    """A positive scale whose fp32 scale * log2(e) is 0 (1e-46) or subnormal (1e-40, which a GPU may flush to 0):
    the forward's folded scale (FOLD_SCALE: the masked raw score -inf times the scale) made 0 * -inf = NaN in
    every causally masked row, where SDPA and the unfolded scores give near-uniform weights."""
    q, k, v = make_qkv(1, 2, 8, 8, 16, torch.float32, device, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)
    for scale in (1e-46, 1e-40):
        out, dq, dk, dv = run_grads(lambda a, b, c: flash_attention(a, b, c, softmax_scale=scale), q, k, v, do)
        ref = reference_grads(q, k, v, do, softmax_scale=scale)
        assert_close_rel(out, ref[0], 1e-5, f"out, scale {scale}")
        assert_close_rel(dv, ref[3], 1e-5, f"dv, scale {scale}")
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all(), f"scale {scale}"


def test_bad_inputs(device, monkeypatch):
    q, k, v = make_qkv(1, 1, 8, 8, 32, torch.float32, device)
    with pytest.raises(ValueError, match="head_dim 48"):
        flash_attention(*make_qkv(1, 1, 8, 8, 48, torch.float32, device))
    with pytest.raises(TypeError, match="float64"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="dtype mismatch"):
        flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flash_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="4 dims"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="must agree on batch and head_dim"):
        flash_attention(q, torch.cat([k, k], 0), torch.cat([v, v], 0))
    with pytest.raises(ValueError, match=r"q's heads \(1\) must be a multiple of k's and v's \(2\)"):
        flash_attention(q, torch.cat([k, k], 1), torch.cat([v, v], 1))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        flash_attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="no positions"):
        flash_attention(q, k[:, :, :0], v[:, :, :0], causal=False)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        flash_attention(q, k, v, dropout_p="0.1")
    with pytest.raises(TypeError, match="seed"):
        flash_attention(q, k, v, dropout_p=0.1, seed=1.5)
    for seed in (torch.tensor(1.5), torch.tensor([1, 2]), torch.tensor(True)):  # int(1.5) would be seed 1's mask
        with pytest.raises(TypeError, match="seed tensor must hold one integer"):
            flash_attention(q, k, v, dropout_p=0.1, seed=seed)
    for seed in (-1, 2 ** 31):  # the kernels take 31 bits: 2^31 would be seed 0's mask
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^31\)"):
            flash_attention(q, k, v, dropout_p=0.1, seed=seed)
    import numpy as np  # a numpy seed is the int it holds

    assert torch.equal(flash_attention(q, k, v, dropout_p=0.1, seed=np.int64(5)),
                       flash_attention(q, k, v, dropout_p=0.1, seed=5))
    with pytest.raises(TypeError, match="causal must be a bool, got 'False'"):
        flash_attention(q, k, v, causal="False")
    with pytest.raises(ValueError, match="meta"):
        flash_attention(q.to("meta"), k.to("meta"), v.to("meta"))
    # a CUDA grid holds at most 65535 heads and sequences (expanded views: no memory)
    many = q[:, :, :2].expand(65536, 1, 2, 32)
    with pytest.raises(ValueError, match="at most 65535 of each: got batch 65536"):
        flash_attention(many, many, many)
    with pytest.raises(ValueError, match="batch x heads = 65536"):
        dropout_mask(1, 4096, 16, 2, 2, 0.1, device)
    for p in (1.0, -0.1):  # the kernel's range: p = 1 kept nothing, a negative p everything
        with pytest.raises(ValueError, match=rf"p must be in \[0, 1\), got {p}"):
            dropout_mask(1, 1, 1, 2, 2, p, device)
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            flash_attention(q, k, v)


def test_autocast_casts_the_inputs_like_sdpa(device):
    """Under autocast the inputs go to the autocast dtype first, mixed ones included (an fp32 KV
    cache beside bf16 queries): the same answer as the inputs cast by hand."""
    q, k, v = make_qkv(1, 2, 5, 9, 32, torch.float32, device)
    want = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = flash_attention(q.bfloat16(), k, v)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_refuses_a_head_too_long_for_32_bit_offsets():
    """Within one (batch, head) the kernels use 32-bit offsets: a slice spanning 2^31 elements
    (here rows 2^30 apart, as views into a fused projection of a huge sequence would be) is
    refused before any launch. Meta tensors: shapes and strides without memory."""
    from tritongpt.kernels.attention import _fwd_launch

    big = torch.empty(2 ** 31 + 64, device="meta").as_strided((1, 1, 3, 64), (0, 0, 2 ** 30, 1))
    ok = torch.empty(1, 1, 3, 64, device="meta")
    with pytest.raises(ValueError, match=r"one head of k .* spans 2147483712 elements"):
        _fwd_launch(ok, big, ok, True, 0.125, 0.0, torch.tensor(0))


def test_no_tile_that_fits_the_gpu_is_said_by_kernel_and_inputs(device, monkeypatch):
    """When autotune finds no tile within a GPU's shared memory (fp32 dK/dV at head dim 256 on a T4:
    66,560 B of 65,536, from `bench compile --arch 75`), Triton launches one anyway and raises its
    own OutOfResources, naming neither kernel nor input. The launcher says which kernel, for which
    inputs, and what to use instead. Triton's error is stood in for (no GPU here is that small);
    the forward before it runs for real."""
    import triton

    from tritongpt.kernels import attention
    from tritongpt.kernels._common import device_name

    class NoTileFits:  # what a launch of the autotuned dK/dV kernel raises on such a GPU
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise triton.OutOfResources(66560, 65536, "shared memory")
            return launch

    monkeypatch.setattr(attention, "_attn_bwd_dkdv_run", NoTileFits())
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 3, 3, 256, torch.float32, device))
    out = flash_attention(q, k, v)
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError) as caught:
        out.sum().backward()
    message = str(caught.value)
    where = device_name(q.device)  # "NVIDIA T4 (sm_75)" on a GPU
    assert (where == "cpu (Triton's interpreter)") if device.type == "cpu" else re.fullmatch(r".+ \(sm_\d+\)", where)
    assert message.startswith(f"attention.backward: no tile of this Triton kernel fits {where} for inputs "
                              "float32 [1, 2, 3, 256], float32 [1, 2, 3, 256]")
    assert "Required: 66560, Hardware limit: 65536" in message and "--kernels reference" in message
    assert isinstance(caught.value.__cause__, triton.OutOfResources)


# ----------------------------------------------------------------------------- GPU (GPT-2 sizes)
@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128, 256])
def test_cuda_gpt2_sizes_bf16(D):
    B, H, T = 4, 12, 1024
    q, k, v = make_qkv(B, H, T, T, D, torch.bfloat16, torch.device("cuda"), seed=D)
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    got = run_grads(flash_attention, q, k, v, do)
    ref64 = reference_grads(q, k, v, do)
    torch_bf16 = run_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, do)
    for name, g, r, t in zip(NAMES, got, ref64, torch_bf16):
        _, torch_rel = report(t, r)
        _, rel = assert_close_rel(g, r, 2e-2, f"cuda D={D} bf16 {name}")
        assert rel <= 2 * torch_rel + BF16_FLOOR, f"{name}: {rel:.3e} > 2 x sdpa's {torch_rel:.3e} + floor"


@pytest.mark.cuda
def test_cuda_fp32_and_dropout_gpt2_size():
    B, H, T, D, p = 2, 12, 1024, 64, 0.1
    q, k, v = make_qkv(B, H, T, T, D, torch.float32, torch.device("cuda"), seed=1)
    do = torch.randn(B, H, T, D, device="cuda")
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=p, seed=99), q, k, v, do)
    keep = dropout_mask(99, B, H, T, T, p, "cuda")
    ref = reference_grads(q, k, v, do, keep=keep, dropout_p=p)
    for name, g, r in zip(NAMES, got, ref):
        assert_close_rel(g, r, 1e-4, f"cuda fp32 dropout {name}")


@pytest.mark.cuda
def test_cuda_graphs_capture_a_compiled_step_with_attention_dropout(monkeypatch):
    """torch.compile(mode="reduce-overhead") of a training step of a tiny GPT on the Triton path with dropout:
    the seed is drawn on the GPU and read there, so inductor skips no graph (a CPU seed tensor made it skip:
    "skipping cudagraphs due to cpu device"); cudagraph_or_error makes any skip raise, the counter double-checks.
    Three steps (warm-up, record, replay), a fresh attention mask each (every other dropout off): finite losses
    that differ, finite gradients."""
    from torch._dynamo.utils import counters

    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=64, context_length=32, n_embd=64, n_layer=2, n_head=2, dropout=0.1,
                               kernels="triton")).cuda().train()
    for name, module in model.named_modules():  # attention's dropout alone: the losses differ by its masks
        if isinstance(module, torch.nn.Dropout) and not name.endswith("attn_drop"):
            module.p = 0.0
    idx = torch.randint(0, 64, (2, 32), device="cuda")

    def step(idx):
        loss = model(idx, targets=idx)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, mode="reduce-overhead")
    losses = []
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        losses.append(compiled(idx).item())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 3, losses


def test_no_stand_in_tensor_is_made_per_call(monkeypatch, device):
    """Without documents or ALiBi the kernels get one-element stand-ins for those pointers (never
    read). They are made once per device and dtype: a torch.zeros per call was an allocation and a
    fill kernel on the GPU, four per forward + backward, host time in every small attention call."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=gen).to(device).requires_grad_() for _ in range(3))
    flash_attention(q, k, v, causal=True).sum().backward()  # the stand-ins exist from here on

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was made per call")

    q.grad = k.grad = v.grad = None
    with monkeypatch.context() as m:
        m.setattr(torch, "zeros", refuse)
        out = flash_attention(q, k, v, causal=True)
        out.sum().backward()
    ref = F.scaled_dot_product_attention(q.detach().double(), k.detach().double(), v.detach().double(), is_causal=True)
    assert_close_rel(out.detach().double(), ref, 1e-4, "out")
    assert q.grad is not None and torch.isfinite(q.grad).all()
