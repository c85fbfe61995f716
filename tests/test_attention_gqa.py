"""Grouped-query and multi-query attention (k, v with Hkv < H heads) in kernels/attention.py.

The reference is the textbook one of test_attention.py on k and v repeat_interleave'd to H heads
(query head h reads KV head h // (H / Hkv), as SDPA's enable_gqa=True), in float64; autograd
through the repeat sums each KV head's gradient over its group, which the kernel's dK/dV pass
must do itself. Shapes stay small: the interpreter runs ~5 ms per program.
"""
import pytest
import torch

from parity import assert_close_rel, report
from test_attention import NAMES, reference_attention, run_grads
from tritongpt.kernels.attention import dropout_mask, flash_attention


def gqa_reference(q, k, v, **kw):
    group = q.shape[1] // k.shape[1]
    return reference_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kw)


def make_gqa(B, H, Hkv, Tq, Tk, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g) for _ in range(2))
    do = torch.randn(B, H, Tq, D, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v, do))


def check_gqa(B, H, Hkv, Tq, Tk, D, device, tag, dropout_p=0.0, seed=None, **masks):
    """fp32 out, dq, dk, dv against the float64 repeat_interleave reference (< 1e-4 relative)."""
    q, k, v, do = make_gqa(B, H, Hkv, Tq, Tk, D, torch.float32, device, seed=H * Tq + Hkv)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, dropout_p=dropout_p, seed=seed, **masks), q, k, v, do)
    keep = dropout_mask(seed, B, H, Tq, Tk, dropout_p, device) if dropout_p else None
    ref = run_grads(lambda a, b, c: gqa_reference(a, b, c, keep=keep, dropout_p=dropout_p, **masks),
                    q.double(), k.double(), v.double(), do.double())
    for name, g_, r in zip(NAMES, got, ref):
        assert_close_rel(g_, r, 1e-4, f"{tag} {name}")
    return got


# (B, H, Hkv, Tq, Tk, D) against the interpreter's 16 x 16 tiles: no length a multiple of 16
SHAPES = {
    "4 over 2, head dim 64": (1, 4, 2, 37, 37, 64),
    "6 over 1 (MQA), head dim 80": (1, 6, 1, 21, 21, 80),
    "3 over 3 (MHA)": (2, 3, 3, 19, 19, 64),
    "4 over 2, the last 13 of 41 keys": (1, 4, 2, 13, 41, 64),
    "6 over 1 (MQA), decode": (2, 6, 1, 1, 41, 80),
    "4 over 1, head dim 256 (Gemma 3 270M)": (1, 4, 1, 21, 21, 256),
    "4 over 1, head dim 256, decode": (1, 4, 1, 1, 41, 256),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_gqa_fwd_bwd(shape, device):
    check_gqa(*SHAPES[shape], device, shape)


def test_fp32_gqa_not_causal_with_a_scale(device):
    check_gqa(1, 4, 2, 20, 33, 64, device, "not causal", causal=False, softmax_scale=0.3)


def test_fp32_gqa_documents_window_and_dropout(device):
    """The masks and the dropout counters are the query head's: the dK/dV program of a KV head
    must redraw each group member's mask (dropout_mask rebuilds it for H heads)."""
    doc_ids = torch.tensor([[0] * 9 + [1] * 20 + [2] * 12]).to(device)  # 41 keys, documents of 9, 20, 12
    check_gqa(1, 4, 2, 41, 41, 64, device, "documents", doc_ids=doc_ids)
    check_gqa(1, 6, 1, 30, 30, 64, device, "window 9", window=9)
    check_gqa(1, 4, 2, 24, 40, 64, device, "dropout", dropout_p=0.25, seed=7)
    check_gqa(1, 4, 1, 13, 41, 80, device, "all three", dropout_p=0.2, seed=3, doc_ids=doc_ids, window=11)
    check_gqa(1, 4, 1, 13, 41, 256, device, "all three, head dim 256", dropout_p=0.2, seed=3, doc_ids=doc_ids,
              window=11)


def test_fp32_gqa_softcap(device):
    """Gemma 2's soft cap with grouped heads: each query head's capped scores, and the dK/dV program
    of a KV head applies each group member's 1 - tanh^2. A cap of 1.5 on scores of ~1 bends them."""
    got = check_gqa(1, 4, 2, 19, 37, 64, device, "softcap 1.5, the last 19 of 37 keys", softcap=1.5)
    q, k, v, do = make_gqa(1, 4, 2, 19, 37, 64, torch.float64, "cpu", seed=4 * 19 + 2)
    assert report(got[0], gqa_reference(q, k, v))[1] > 0.05  # the cap bites: without it the answer differs
    check_gqa(1, 6, 1, 13, 41, 80, device, "softcap 2, documents and dropout", dropout_p=0.2, seed=3, softcap=2.0,
              doc_ids=torch.tensor([[0] * 9 + [1] * 20 + [2] * 12]).to(device))


def test_fp32_gqa_kv_cache_slices(device):
    """k, v as slices of a preallocated [B, Hkv, Tmax, D] cache and q a head-split view of
    [B, Tq, H, D]: every stride comes from the views."""
    B, H, Hkv, Tq, Tk, Tmax, D = 1, 4, 2, 5, 37, 64, 64
    g = torch.Generator().manual_seed(5)
    cache_k, cache_v = (torch.randn(B, Hkv, Tmax, D, generator=g).to(device) for _ in range(2))
    q_bthd = torch.randn(B, Tq, H, D, generator=g).to(device)
    do = torch.randn(B, H, Tq, D, generator=g).to(device)

    def grads(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q_bthd, cache_k, cache_v)]
        out = fn(leaves[0].transpose(1, 2), leaves[1][:, :, :Tk], leaves[2][:, :, :Tk])
        out.backward(do.to(dtype))
        # past Tk autograd's slice backward fills zeros, not the kernel
        return out.detach(), leaves[0].grad.transpose(1, 2), leaves[1].grad[:, :, :Tk], leaves[2].grad[:, :, :Tk]

    for name, g_, r in zip(NAMES, grads(flash_attention, torch.float32), grads(gqa_reference, torch.float64)):
        assert_close_rel(g_, r, 1e-4, f"cache {name}")


@pytest.mark.parametrize("dtype,Hkv,D", [(torch.bfloat16, 2, 64), (torch.float16, 2, 64), (torch.bfloat16, 1, 256)])
def test_half_gqa_within_2x_of_torch(dtype, Hkv, D, device):
    """bf16/fp16 out and every gradient within 2x the error of PyTorch's own attention in that
    dtype (the same repeat_interleave reference) against float64; Gemma 3 270M's heads in bf16."""
    q, k, v, do = make_gqa(1, 4, Hkv, 29, 29, D, dtype, device, seed=31)
    got = run_grads(flash_attention, q, k, v, do)
    ref64 = run_grads(gqa_reference, q.double(), k.double(), v.double(), do.double())
    torch_half = run_grads(gqa_reference, q, k, v, do)
    for name, g_, r, t in zip(NAMES, got, ref64, torch_half):
        _, torch_rel = report(t, r)
        _, rel = assert_close_rel(g_, r, 2e-2, f"{dtype} {name}")
        print(f"  torch {dtype} {name}: rel={torch_rel:.3e}")
        assert rel <= 2 * torch_rel, f"{dtype} {name}: {rel:.3e} > 2 x torch's {torch_rel:.3e}"


def test_gqa_no_queries_give_zero_key_and_value_gradients(device, nan_filled_empty):
    q, k, v, do = make_gqa(1, 4, 2, 0, 5, 32, torch.float32, device, seed=0)
    _, dq, dk, dv = run_grads(lambda a, b, c: flash_attention(a, b, c, causal=False), q, k, v, do)
    assert dq.shape == q.shape and dk.shape == dv.shape == (1, 2, 5, 32)
    assert not dk.any() and not dv.any()


def test_gqa_custom_op_and_compile(device):
    """opcheck of both ops on GQA shapes (the fakes give dk, dv Hkv heads) and torch.compile
    giving the eager bits, dropout included."""
    # a chunk of 8 over 12 keys: one ragged tile each (16 a tile under the interpreter)
    q, k, v, _ = make_gqa(1, 4, 2, 8, 12, 32, torch.float32, device, seed=11)
    seed = torch.tensor(5, device=device)
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, 0.1, seed))

    def loss(a, b, c):
        return (flash_attention(a, b, c, dropout_p=0.2, seed=3) * 2).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager = run_grads(lambda a, b, c: loss(a, b, c).reshape(1), q, k, v, torch.ones(1))
    comp = run_grads(lambda a, b, c: compiled(a, b, c).reshape(1), q, k, v, torch.ones(1))
    for name, e, c in zip(("loss", "dq", "dk", "dv"), eager, comp):
        assert torch.equal(e, c), f"compiled {name} differs"


def test_gqa_bad_input(device):
    q, k, v, _ = make_gqa(1, 6, 4, 8, 8, 32, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match=r"q's heads \(6\) must be a multiple of k's and v's \(4\)"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads"):
        flash_attention(q, k[:, :2], v[:, :3])
    with pytest.raises(ValueError, match=r"q's heads \(6\) must be a multiple of k's and v's \(0\)"):
        flash_attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=r"q's heads \(2\) must be a multiple of k's and v's \(4\)"):
        flash_attention(q[:, :2], k, v)  # more KV heads than query heads
    op = torch.ops.tritongpt.flash_attn_fwd  # the op itself checks too
    with pytest.raises(ValueError, match=r"must be a multiple of k's and v's \(4\)"):
        op(q, k, v, True, 0.25, 0.0, torch.tensor(0))
