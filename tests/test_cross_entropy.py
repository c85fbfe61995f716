"""Triton cross-entropy (kernels/cross_entropy.py) vs float64 and vs the reference lm_loss.

On CPU the kernels run through Triton's interpreter with 64-wide vocabulary tiles, so a
vocabulary of a few hundred crosses several tiles and a ragged last one; the CUDA-marked test
repeats the check at GPT-2's vocabulary when a GPU is present.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from parity import assert_close_mixed, assert_close_rel
from tritongpt.kernels._common import saved_tensor_bytes
from tritongpt.kernels.cross_entropy import cross_entropy, linear_cross_entropy
from tritongpt.model.gpt import lm_loss

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
IGNORE = -100


def make(shape, V, dtype, device, gen, ignore_every=3):
    # logits of a trained LM's scale (std 3) plus a per-row offset: lse must not assume ~0 logits
    x = (torch.randn(*shape, V, generator=gen) * 3.0 + torch.randn(*shape, 1, generator=gen) * 5.0)
    x = x.to(device, dtype).requires_grad_()
    t = torch.randint(0, V, shape, generator=gen)
    if ignore_every:
        t.view(-1)[::ignore_every] = IGNORE
    return x, t.to(device)


def check_parity(shape, V, dtype, device, seed, reduction="none"):
    gen = torch.Generator().manual_seed(seed)
    x, t = make(shape, V, dtype, device, gen)
    out = cross_entropy(x, t, IGNORE, reduction)
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64.flatten(0, -2), t.flatten(), ignore_index=IGNORE, reduction=reduction)
    ref = ref.view(t.shape) if reduction == "none" else ref
    assert out.dtype == torch.float32
    # fresh upstream gradients, so each row's gradient is scaled by its own number
    g = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    (out * g.to(device, torch.float32)).sum().backward()
    (ref * g.to(device)).sum().backward()
    tol = TOL[dtype]
    # Rounding no fp32 implementation avoids (PyTorch's neither): a confident right answer has a
    # tiny loss log(1 + e^-margin), and its gradient p - 1 with p near 1, each off by a few fp32
    # epsilons: allow 4 per row of loss and per gradient entry (scaled by the row's upstream grad).
    eps = torch.finfo(torch.float32).eps
    counted = (t != IGNORE).double().cpu()
    g_rows = (g.cpu() * counted).expand(t.shape) if reduction == "none" else g.cpu() * counted / (
        counted.sum() if reduction == "mean" else 1.0)
    loss_floor = 4 * eps * (counted.sum().sqrt().item() if reduction == "none" else 1.0)
    grad_floor = 4 * eps * (g_rows.square().sum().item() * V) ** 0.5
    assert_close_mixed(out, ref, tol, loss_floor, f"loss {reduction}")
    assert x.grad.dtype == dtype  # the gradient comes back in the logits' dtype
    assert_close_mixed(x.grad, x64.grad, tol, grad_floor, "dlogits")
    # the reference module (what the model calls on the reference path) agrees too
    if reduction == "mean":
        assert_close_rel(out, lm_loss(x.detach().float().view(-1, 1, V), t.view(-1, 1), IGNORE), tol, "vs lm_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,V", [((1,), 5), ((7,), 100), ((37,), 257), ((2, 9), 130)])
def test_parity_fp64(shape, V, dtype, device):
    check_parity(shape, V, dtype, device, seed=V + len(shape))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(reduction, device):
    check_parity((3, 7), 150, torch.float32, device, seed=11, reduction=reduction)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink])
@given(n=st.integers(1, 12), V=st.integers(1, 300), seed=st.integers(0, 2**16))
@example(n=2, V=2, seed=0)  # one counted row, a confident right answer: loss ~1e-4, p - 1 ~ -1e-4
def test_shape_fuzz(n, V, seed, device):
    check_parity((n,), V, torch.float32, device, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_logits_count_only_the_classes(dtype, device):
    # a padded LM head's output (GPTConfig.vocab_multiple): 300 columns, the first 277 are classes
    gen = torch.Generator().manual_seed(11)
    x, t = make((37,), 300, dtype, device, gen)
    V = 277
    t = torch.where(t == IGNORE, t, t % V)
    out = cross_entropy(x, t, IGNORE, "none", vocab_size=V)
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64[:, :V], t, ignore_index=IGNORE, reduction="none")
    g = torch.rand(37, generator=gen, dtype=torch.float64).to(device) + 0.5
    (out * g.float()).sum().backward()
    (ref * g).sum().backward()
    assert_close_rel(out, ref, TOL[dtype], "loss")
    assert_close_rel(x.grad, x64.grad, TOL[dtype], "dlogits")
    assert x.grad.shape == (37, 300) and torch.count_nonzero(x.grad[:, V:]) == 0
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 300\]"):
        cross_entropy(x, t, vocab_size=301)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 277\)"):
        cross_entropy(x, torch.full_like(t, 280), vocab_size=V)


def test_any_ignore_index_and_logits_row_stride(device):
    """ignore_index 7 (a real class id, as a pad token is) and logits that are a column slice of
    a wider buffer (row stride 80, not V = 67): loss and gradient against float64, both kernels."""
    gen = torch.Generator().manual_seed(14)
    big = (torch.randn(12, 80, generator=gen) * 3).to(device)
    t = torch.randint(0, 67, (12,), generator=gen)
    t[::3] = 7
    t[1] = 7 if t[1] != 7 else 8
    t = t.to(device)
    x = big[:, :67].detach().requires_grad_()
    assert x.stride(0) == 80
    x64 = x.detach().double().requires_grad_()
    g = (torch.rand(12, generator=gen) + 0.5).to(device)
    got = cross_entropy(x, t, 7, "none")
    want = F.cross_entropy(x64, t, ignore_index=7, reduction="none")
    (got * g).sum().backward()
    (want * g.double()).sum().backward()
    assert (got[t == 7] == 0).all() and (got[t != 7] > 0).all()
    assert_close_rel(got, want, 1e-4, "loss, ignore_index 7")
    assert_close_rel(x.grad, x64.grad, 1e-4, "dlogits, ignore_index 7")

    # fp16 too: its gradients are made in backward, which must skip the same rows
    for dtype in (torch.float32, torch.float16):
        h = torch.randn(12, 16, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(67, 16, generator=gen).to(device, dtype).requires_grad_()
        h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
        got = linear_cross_entropy(h, w, t, 7, "sum", chunk_rows=5)
        want = F.cross_entropy(h64 @ w64.t(), t, ignore_index=7, reduction="sum")
        got.backward()
        want.backward()
        tol = TOL[dtype]
        assert_close_rel(got, want, tol, f"fused loss, ignore_index 7, {dtype}")
        assert_close_rel(h.grad, h64.grad, tol, f"dhidden, ignore_index 7, {dtype}")
        assert_close_rel(w.grad, w64.grad, tol, f"dweight, ignore_index 7, {dtype}")


def test_logits_transposed_in_memory(device):
    """logits [N, V] stored column-major (the transpose of a [V, N] buffer, as a head computed as
    W @ H^T gives): cross_entropy copies them to rows first. The ops themselves refuse a
    non-unit last stride; without the copy a valid input was refused."""
    gen = torch.Generator().manual_seed(19)
    x = (torch.randn(70, 9, generator=gen) * 3).to(device).t().detach().requires_grad_()
    assert x.stride() == (1, 9)
    t = torch.randint(0, 70, (9,), generator=gen).to(device)
    x64 = x.detach().double().requires_grad_()
    got, want = cross_entropy(x, t), F.cross_entropy(x64, t)
    got.backward()
    want.backward()
    assert_close_rel(got, want, 1e-5, "loss, column-major logits")
    assert_close_rel(x.grad, x64.grad, 1e-5, "dlogits, column-major logits")


def test_ignored_and_infinite_entries_behave_like_pytorch(device):
    x = torch.randn(4, 70, device=device)
    x[0] = float("-inf")
    x[0, 9] = 2.0           # a one-hot row: loss exactly 0
    x[1, 65] = float("-inf")  # the target's logit is -inf: loss inf
    t = torch.tensor([9, 65, IGNORE, 3], device=device)
    got = cross_entropy(x, t, IGNORE, "none")
    want = F.cross_entropy(x, t, ignore_index=IGNORE, reduction="none")
    assert got[0] == 0 and got[1] == float("inf") and got[2] == 0  # exactly, as PyTorch
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    everything_ignored = torch.full((4,), IGNORE, device=device)
    assert torch.isnan(cross_entropy(x, everything_ignored)) and torch.isnan(F.cross_entropy(x, everything_ignored))
    assert cross_entropy(x, everything_ignored, reduction="sum").item() == 0.0


def test_gradient_keeps_fp32_precision_at_large_logits(device):
    """Softmax does not change when every logit moves by the same amount, and PyTorch's fp32
    gradient does not either. Backward once recomputed p = exp(x - lse) from lse = m + log S
    saved as one fp32 number, rounded to the size of m: at logits near 5000 that cost 2.4e-4
    relative in every p (over the 1e-4 bound). It now keeps m and log S apart."""
    gen = torch.Generator().manual_seed(21)
    base = torch.randn(40, 300, generator=gen) * 3
    t = torch.randint(0, 300, (40,), generator=gen)
    for shift in (1000.0, 5000.0, 20000.0):
        x = (base + shift).to(device).requires_grad_()
        x64 = x.detach().cpu().double().requires_grad_()  # the fp32 logits exactly
        loss = cross_entropy(x, t.to(device))
        want = F.cross_entropy(x64, t)
        loss.backward()
        want.backward()
        assert_close_rel(loss, want, 1e-4, f"loss, logits near {shift}")
        assert_close_rel(x.grad, x64.grad, 1e-4, f"dlogits, logits near {shift}")


def test_confident_right_answers_keep_their_small_loss_at_large_logits(device):
    """A target whose logit leads the row by 8 has a loss of 1e-3 to 1e-2. The kernel forms it as
    (m - x_t) + log S, which keeps it to fp32 precision wherever the logits sit; (m + log S) - x_t
    rounds it to the size of m (an ulp is 2e-3 near 20000: tens of percent of the loss), and the
    other tests' losses are all of order 1, where that rounding is below 1e-4."""
    gen = torch.Generator().manual_seed(23)
    base = torch.randn(16, 200, generator=gen)
    t = torch.randint(0, 200, (16,), generator=gen)
    base[torch.arange(16), t] = base.max(1).values + 8.0
    for shift in (0.0, 1000.0, 20000.0):
        x = (base + shift).to(device)
        got = cross_entropy(x, t.to(device), reduction="none")
        want = F.cross_entropy(x.cpu().double(), t, reduction="none")
        assert want.max() < 0.05
        assert_close_rel(got.cpu(), want, 1e-4, f"losses of confident rows, logits near {shift}")


# the interpreter's numpy warns of the -inf - -inf that the kernel's where then discards
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_ignored_rows_of_minus_infinity_get_zero_gradient(device):
    """Padding positions are often masked with -inf logits and ignore_index targets. Their
    gradient is 0, as the docstring says (it was nan: exp(-inf - -inf) * 0; PyTorch's is nan
    too), so an additive -inf mask cannot poison the LM head's weight gradient."""
    gen = torch.Generator().manual_seed(22)
    h = torch.randn(6, 8, generator=gen).to(device)
    w = torch.randn(50, 8, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 50, (6,), generator=gen).to(device)
    masked = torch.tensor([False, True, False, False, True, False], device=device)
    t[masked] = IGNORE
    minus_inf = torch.zeros(6, 1, device=device).masked_fill(masked[:, None], float("-inf"))
    logits = h @ w.t() + minus_inf  # the addition passes the gradient through unchanged
    logits.retain_grad()
    cross_entropy(logits, t, ignore_index=IGNORE).backward()
    assert (logits.grad[masked] == 0).all() and torch.isfinite(w.grad).all()
    w64 = w.detach().double().requires_grad_()
    F.cross_entropy(h[~masked].double() @ w64.t(), t[~masked]).backward()  # the counted rows alone
    assert_close_rel(w.grad, w64.grad, 1e-4, "dweight with masked rows")


def test_targets_compare_with_ignore_index_as_int64(device):
    """int32 ids and an ignore_index past int32: the id -100 is not ignore_index 2^32 - 100, so it
    is refused (the check once compared them in int32, where they are equal, and the kernel then
    read the logit at column -100, another row's); ignore_index must fit in int64."""
    x = torch.randn(4, 50, device=device)
    t = torch.tensor([1, 2, -100, 3], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="target -100 at position 2 is outside"):
        cross_entropy(x, t, ignore_index=2 ** 32 - 100)
    with pytest.raises(ValueError, match="target -100 at position 2 is outside"):
        linear_cross_entropy(torch.randn(4, 8, device=device), torch.randn(50, 8, device=device), t,
                             ignore_index=2 ** 32 - 100)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        cross_entropy(x, t, ignore_index=2 ** 64)
    torch.testing.assert_close(cross_entropy(x, t, ignore_index=-100),
                               F.cross_entropy(x, t.long(), ignore_index=-100), rtol=1e-6, atol=0)


def test_keeps_two_floats_per_row_for_backward(device):
    """The reference saves an fp32 log-softmax of the whole [N, V] matrix; ours saves the row
    max and log-sum, [N] each."""
    gen = torch.Generator().manual_seed(5)
    x, t = make((24,), 200, torch.bfloat16, device, gen)
    ours, _ = saved_tensor_bytes(lambda: cross_entropy(x, t, IGNORE), exclude=(x, t))
    ref, _ = saved_tensor_bytes(lambda: lm_loss(x.view(24, 1, 200), t.view(24, 1), IGNORE), exclude=(x, t))
    print(f"saved for backward: reference {ref} bytes, triton {ours} bytes")
    assert ours <= 24 * (4 + 4 + 8) + 64  # per row: max and log-sum (fp32), the checked target copy (int64)
    assert ref >= 24 * 200 * 4          # at least one fp32 [N, V] tensor


def test_torch_compile_fullgraph(device):
    """The custom ops (fake impls) + autograd.Function trace into one graph, no breaks."""
    gen = torch.Generator().manual_seed(8)
    x, t = make((2, 5), 90, torch.float32, device, gen)
    fn = lambda x, t: cross_entropy(x, t, IGNORE) * 2.0  # noqa: E731
    y = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, t)
    y.backward()
    got = (y.detach(), x.grad.clone())
    x.grad = None
    y = fn(x, t)
    y.backward()
    assert_close_rel(got[0], y.detach(), 1e-6, "compiled loss")
    assert_close_rel(got[1], x.grad, 1e-6, "compiled dlogits")


def test_custom_ops_called_directly_check_their_inputs(device):
    """cross_entropy() arranges the ops' inputs; called directly, short targets, a transposed
    logits or n_classes past the row were read as they lay (no error, wrong losses), and a target
    past the vocabulary read past the row. Now: named errors, and nan for an unknown target (no
    host sync: the same holds under a CUDA-graph capture, which skips checked_targets)."""
    fwd, bwd = torch.ops.tritongpt.cross_entropy_fwd, torch.ops.tritongpt.cross_entropy_bwd
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(6, 40, generator=gen).to(device)
    t = torch.randint(0, 40, (6,), generator=gen).to(device)
    with pytest.raises(ValueError, match=r"targets has shape \(5,\), expected \(6,\)"):
        fwd(x, t[:5], IGNORE, 40)
    with pytest.raises(ValueError, match=r"unit stride on its last dim, got strides \(1, 6\)"):
        fwd(x.t().contiguous().t(), t, IGNORE, 40)
    with pytest.raises(ValueError, match=r"n_classes must be in \[1, 40\]"):
        fwd(x, t, IGNORE, 41)
    with pytest.raises(ValueError, match=r"n_classes must be in \[1, 40\] \(logits have 40 columns\), got 0"):
        fwd(x, t, IGNORE, 0)  # no class at all: every row's loss would be nan
    with pytest.raises(TypeError, match="targets has dtype float32"):
        fwd(x, t.float(), IGNORE, 40)
    with pytest.raises(ValueError, match=r"logits must have 2 dims, got shape \(1, 6, 40\)"):
        fwd(x[None], t, IGNORE, 40)
    with pytest.raises(ValueError, match="different devices.*targets is on meta"):
        fwd(x, t.to("meta"), IGNORE, 40)
    loss, row_max, log_sum, _ = fwd(x, t, IGNORE, 40)
    with pytest.raises(ValueError, match=r"grad_loss has shape \(3,\)"):
        bwd(torch.ones(3, device=device), x, t, row_max, log_sum, IGNORE, 40)

    t_bad = t.clone()
    t_bad[2], t_bad[4] = 40, -1  # neither a class nor ignore_index
    loss, row_max, log_sum, _ = fwd(x, t_bad, IGNORE, 40)
    dx = bwd(torch.ones(6, device=device), x, t_bad, row_max, log_sum, IGNORE, 40)
    bad = torch.tensor([False, False, True, False, True, False])
    assert loss[bad.to(device)].isnan().all() and dx[bad.to(device)].isnan().all()
    ref = F.cross_entropy(x.double(), t.double().long(), reduction="none")
    assert_close_rel(loss[~bad.to(device)], ref[~bad.to(device)], 1e-5, "the other rows' losses")
    assert not dx[~bad.to(device)].isnan().any()


@pytest.mark.parametrize("call,err,match", [
    (lambda x, t: cross_entropy(x.long(), t), TypeError, "logits has dtype int64"),
    (lambda x, t: cross_entropy(x, t.float()), TypeError, "targets has dtype float32"),
    (lambda x, t: cross_entropy(x, t[:-1]), ValueError, r"targets has shape \(5,\); expected .*\(6,\)"),
    (lambda x, t: cross_entropy(x[:, :0], t), ValueError, "V >= 1"),
    (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction must be"),
    (lambda x, t: cross_entropy(x, t, ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (lambda x, t: cross_entropy(x, torch.tensor([0, 1, 40, 2, 3, 4])), ValueError,
     r"target 40 at position 2 is outside the vocabulary \[0, 40\)"),
    (lambda x, t: cross_entropy(x, torch.tensor([0, 1, 2, -1, 3, 4])), ValueError, "target -1 at position 3"),
    # the bounds themselves: the class count starts at 1, ignore_index must fit in int64, and
    # targets of logits' row count but another shape are not logits' leading shape
    (lambda x, t: cross_entropy(x, t, vocab_size=0), ValueError, r"vocab_size must be an int in \[1, 40\]"),
    (lambda x, t: cross_entropy(x, t, ignore_index=2 ** 63), ValueError, "ignore_index must fit in int64"),
    (lambda x, t: cross_entropy(x, t, ignore_index=-2 ** 63 - 1), ValueError, "ignore_index must fit in int64"),
    (lambda x, t: cross_entropy(x.view(2, 3, 40), t), ValueError, r"targets has shape \(6,\); expected .*\(2, 3\)"),
])
def test_bad_input_says_what(call, err, match):
    x, t = torch.randn(6, 40), torch.randint(0, 40, (6,))
    with pytest.raises(err, match=match):
        call(x, t)


def test_model_loss_uses_the_kernels_only_on_their_path(monkeypatch):
    from tritongpt.kernels import cross_entropy as ce
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    calls = []
    for cls in (ce.CrossEntropyFunction, ce.LinearCrossEntropyFunction):
        monkeypatch.setattr(cls, "apply", (lambda real, name: lambda *a: calls.append(name) or real(*a))(
            cls.apply, cls.__name__))
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_layer=1, n_head=2))
    idx = torch.randint(0, 50, (2, 8))
    ref, ref_rows = model(idx, targets=idx), model(idx, targets=idx, reduction="none")
    assert calls == []
    model.set_kernels({"cross_entropy"})
    assert model.config.kernels == "cross_entropy"
    ours = model(idx, targets=idx)  # the mean: LM head and loss fused
    ours_rows = model(idx, targets=idx, reduction="none")  # per token: the loss on the logits
    ours_sum = model(idx, targets=idx, reduction="sum")  # the sum is fused too: only "none" needs the logits
    assert calls == ["LinearCrossEntropyFunction", "CrossEntropyFunction", "LinearCrossEntropyFunction"]
    assert_close_rel(ours, ref, 1e-5, "model loss")
    assert_close_rel(ours_sum, ref_rows.sum(), 1e-5, "model summed loss")
    assert_close_rel(ours_rows, ref_rows, 1e-5, "model per-token losses")


# -- label smoothing and the z-loss ------------------------------------------------------------
def smoothed_z_loss64(logits64, t, label_smoothing, z_loss, reduction="none", ignore_index=IGNORE):
    """The objective written out in float64, apart from F.cross_entropy's own smoothing: each
    counted row's -sum_j q_j log p_j with q = (1 - eps) onehot(target) + eps / V, plus
    z_loss * logsumexp^2; ignored rows 0."""
    rows, tt = logits64.flatten(0, -2), t.flatten()
    counted = tt != ignore_index
    V = rows.shape[-1]
    q = torch.full_like(rows, label_smoothing / V)
    q[counted, tt[counted]] += 1 - label_smoothing
    lse = torch.logsumexp(rows, -1)
    loss = torch.where(counted, -(q * (rows - lse[:, None])).sum(-1) + z_loss * lse.square(), 0.0)
    if reduction == "none":
        return loss.view(t.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / counted.sum()


OPTIONS = [(0.1, 0.0), (0.0, 1e-2), (0.25, 3e-2), (1.0, 0.0)]  # (label_smoothing, z_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing,z_loss", OPTIONS)
@pytest.mark.parametrize("reduction,pad", [("none", 0), ("mean", 23)])
def test_smoothing_and_z_loss_parity_fp64(label_smoothing, z_loss, reduction, pad, dtype, device):
    """The loss and every logit's gradient against the objective in float64, with fresh upstream
    gradients per row; 257 classes cross four vocabulary tiles and end in a ragged one; pad 23:
    a padded vocabulary, whose columns are no classes (smoothing spreads over the first V only)."""
    gen = torch.Generator().manual_seed(int(label_smoothing * 100 + z_loss * 1000) + pad)
    V = 257
    x, t = make((37,), V + pad, dtype, device, gen)
    t = torch.where(t == IGNORE, t, t % V)
    out = cross_entropy(x, t, IGNORE, reduction, vocab_size=V, label_smoothing=label_smoothing, z_loss=z_loss)
    x64 = x.detach().double().requires_grad_()
    ref = smoothed_z_loss64(x64[:, :V], t, label_smoothing, z_loss, reduction)
    g = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    (out * g.to(device, torch.float32)).sum().backward()
    (ref * g.to(device)).sum().backward()
    assert_close_rel(out, ref, TOL[dtype], f"loss {reduction}")
    assert_close_rel(x.grad, x64.grad, TOL[dtype], "dlogits")
    assert x.grad.dtype == dtype and torch.count_nonzero(x.grad[:, V:]) == 0
    # and the reference module, which the reference path trains with
    lm = lm_loss(x64.detach()[:, :V].view(37, 1, V), t.view(37, 1), IGNORE, reduction, label_smoothing, z_loss)
    assert_close_rel(lm.view(ref.shape), ref, 1e-6, "lm_loss (in fp32)")


@pytest.mark.parametrize("label_smoothing,z_loss", OPTIONS[:3])
def test_smoothing_and_z_loss_sum_and_hypothesis_sizes(label_smoothing, z_loss, device):
    for n, V, seed in ((1, 1, 0), (3, 2, 1), (12, 65, 2), (5, 300, 3)):
        gen = torch.Generator().manual_seed(seed)
        x, t = make((n,), V, torch.float32, device, gen, ignore_every=4)
        out = cross_entropy(x, t, IGNORE, "sum", label_smoothing=label_smoothing, z_loss=z_loss)
        x64 = x.detach().double().requires_grad_()
        ref = smoothed_z_loss64(x64, t, label_smoothing, z_loss, "sum")
        out.backward()
        ref.backward()
        assert_close_mixed(out, ref, 1e-5, 8 * torch.finfo(torch.float32).eps * n, f"loss n={n} V={V}")
        assert_close_mixed(x.grad, x64.grad, 1e-5, 8 * torch.finfo(torch.float32).eps * n ** 0.5,
                           f"dlogits n={n} V={V}")


def padded_head_case(seed, dtype, device, logit_scale=2.0, V=277, pad=35, C=24):
    """(hidden [37, C], a weight of V classes + pad padding rows, targets with every 4th ignored,
    V, gen) for the fused head's option tests: logits of std about logit_scale."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(37, C, generator=gen) * 2.0).to(device, dtype).requires_grad_()
    w = (torch.randn(V + pad, C, generator=gen) * C ** -0.5 * logit_scale).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (37,), generator=gen)
    t[::4] = IGNORE
    return h, w, t.to(device), V, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_smoothing_and_z_loss_parity_fp64(dtype, reduction, device):
    # fp16 makes its gradients in backward (the deferred path): the options must reach it too
    h, w, t, V, gen = padded_head_case(31, dtype, device)
    loss = linear_cross_entropy(h, w, t, IGNORE, reduction, chunk_rows=10, vocab_size=V, label_smoothing=0.15,
                                z_loss=2e-2)
    g = torch.rand((), generator=gen).item() + 0.5
    (loss * g).backward()
    h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
    ref = smoothed_z_loss64((h64 @ w64.t())[:, :V], t, 0.15, 2e-2, reduction)
    (ref * g).backward()
    assert_close_rel(loss, ref, TOL[dtype], f"fused loss {reduction}")
    assert_close_rel(h.grad, h64.grad, TOL[dtype], "dhidden")
    assert_close_rel(w.grad, w64.grad, TOL[dtype], "dweight")
    assert torch.count_nonzero(w.grad[V:]) == 0


def assert_model_paths_agree(model, idx, y, w, reduction, logits64, **options):
    """model(idx, targets=y, **options) on the reference path against the objective on logits64
    (float64 logits of that model), then on the Triton loss path: the same loss and every parameter
    gradient. w: per-position weights of the losses for reduction "none"."""
    def run():
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets=y, ignore_index=IGNORE, reduction=reduction, **options)
        (loss * w if reduction == "none" else loss).sum().backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    model.set_kernels("reference")
    want = run()
    ref = smoothed_z_loss64(logits64, y, options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), reduction)
    assert_close_rel(want[0], ref.float(), 1e-5, f"reference path {reduction} vs float64")
    model.set_kernels({"cross_entropy"})
    got = run()
    model.set_kernels("reference")
    # a floor: the attention's key bias has no gradient but rounding (softmax ignores a shift)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_mixed(a, b, 1e-5, 1e-9, f"{reduction} {'loss' if i == 0 else f'grad {i}'}")


def test_model_loss_options_on_both_paths():
    """GPTModel.forward(label_smoothing=, z_loss=) reaches the loss on every path: the reference
    lm_loss, the fused LM head (mean, sum) and the per-token kernel (none), with the same loss and
    gradients; and a padded vocabulary's padding gets no share of the smoothing."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(4)
    model = GPTModel(GPTConfig(vocab_size=70, context_length=12, n_embd=16, n_layer=1, n_head=2, vocab_multiple=32))
    idx, y = torch.randint(0, 70, (3, 11)), torch.randint(0, 70, (3, 11))
    y[0, :4] = IGNORE
    w = torch.rand(3, 11)
    with torch.no_grad():
        logits64 = model.double()(idx)
    model.float()
    for reduction in ("mean", "sum", "none"):
        assert_model_paths_agree(model, idx, y, w, reduction, logits64, label_smoothing=0.2, z_loss=5e-2)


@pytest.mark.parametrize("label_smoothing,z_loss,match", [
    (1.5, 0.0, r"label_smoothing must be in \[0, 1\], got 1.5"),
    (-0.1, 0.0, r"label_smoothing must be in \[0, 1\]"),
    (float("nan"), 0.0, "label_smoothing must be a finite number, got nan"),
    (True, 0.0, "label_smoothing must be a finite number, got True"),
    ("0.1", 0.0, "label_smoothing must be a finite number"),
    (0.0, -1e-4, r"z_loss must be in \[0, inf\], got -0.0001"),
    (0.0, float("inf"), "z_loss must be a finite number, got inf"),
    (0.0, None, "z_loss must be a finite number, got None"),
])
def test_bad_loss_options_say_what_on_every_path(label_smoothing, z_loss, match, device):
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    x, t = torch.randn(6, 40, device=device), torch.randint(0, 40, (6,), device=device)
    h, w = torch.randn(6, 8, device=device), torch.randn(40, 8, device=device)
    model = GPTModel(GPTConfig(vocab_size=40, context_length=8, n_embd=8, n_layer=1, n_head=2)).to(device)
    calls = [lambda: cross_entropy(x, t, label_smoothing=label_smoothing, z_loss=z_loss),
             lambda: linear_cross_entropy(h, w, t, label_smoothing=label_smoothing, z_loss=z_loss),
             lambda: lm_loss(x.view(6, 1, 40), t.view(6, 1), label_smoothing=label_smoothing, z_loss=z_loss),
             lambda: model(t.view(2, 3), targets=t.view(2, 3), label_smoothing=label_smoothing, z_loss=z_loss)]
    if isinstance(label_smoothing, float) and z_loss is not None:  # the ops' schema makes floats of the others
        calls.append(lambda: torch.ops.tritongpt.cross_entropy_fwd(x, t, IGNORE, 40, label_smoothing, z_loss))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()



@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_smoothing_and_z_loss_skip_an_ignore_index_that_is_a_class(reduction, device):
    """ignore_index may be a class id (a pad token's): its rows get no loss, no z-loss and a zero
    gradient on every path, though their target is in [0, V) (lm_loss counts the rows that are not
    ignore_index, not those with a non-negative target)."""
    gen = torch.Generator().manual_seed(41)
    V, pad_id = 50, 3
    x, t = make((19,), V, torch.float32, device, gen, ignore_every=0)
    t[::3] = pad_id
    ignored = t == pad_id
    out = cross_entropy(x, t, pad_id, reduction, label_smoothing=0.2, z_loss=3e-2)
    x64 = x.detach().double().requires_grad_()
    ref = smoothed_z_loss64(x64, t, 0.2, 3e-2, reduction, ignore_index=pad_id)
    g = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    (out * g.to(device, torch.float32)).sum().backward()
    (ref * g.to(device)).sum().backward()
    assert_close_rel(out, ref, 1e-5, f"loss {reduction}")
    assert_close_rel(x.grad, x64.grad, 1e-5, "dlogits")
    assert torch.count_nonzero(x.grad[ignored]) == 0
    lm = lm_loss(x64.detach().view(19, 1, V), t.view(19, 1), pad_id, reduction, 0.2, 3e-2)
    assert_close_rel(lm.view(ref.shape), ref.detach(), 1e-6, "lm_loss")
    if reduction == "none":
        assert (out[ignored] == 0).all() and (lm.view(-1)[ignored] == 0).all()
        return
    h = torch.randn(19, 8, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(V, 8, generator=gen, dtype=torch.float64).to(device)
    fused = linear_cross_entropy(h.float(), w.float(), t, pad_id, label_smoothing=0.2, z_loss=3e-2)
    assert_close_rel(fused, smoothed_z_loss64(h @ w.t(), t, 0.2, 3e-2, "mean", ignore_index=pad_id), 1e-5,
                     "linear_cross_entropy")


def test_loss_options_compile_into_the_kernels_only_when_on(monkeypatch, device):
    """Each option is a constexpr flag, on exactly when it is not 0, in forward and backward alike:
    at 0 the kernels are the plain ones (no logit sum, no z scale: the default costs nothing)."""
    import tritongpt.kernels.cross_entropy as ce

    seen = []

    class Spy:  # records each launch's flags, then launches
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, kwargs["HAS_SMOOTH"], kwargs["HAS_Z"], kwargs["HAS_CAP"]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(ce, "_ce_fwd_kernel", Spy("fwd", ce._ce_fwd_kernel))
    monkeypatch.setattr(ce, "_ce_bwd_kernel", Spy("bwd", ce._ce_bwd_kernel))
    gen = torch.Generator().manual_seed(42)
    x, t = make((5,), 30, torch.float32, device, gen)
    h = torch.randn(5, 8, generator=gen).to(device).requires_grad_()
    w = torch.randn(30, 8, generator=gen).to(device)
    for label_smoothing, z_loss, softcap in ((0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.0, 1e-4, 0.0), (1.0, 2e-3, 0.0),
                                             (0.0, 0.0, 30.0), (0.1, 1e-4, 15.0), (0.0, 0.0, 0.5)):
        flags = (label_smoothing != 0, z_loss != 0, softcap != 0)
        want = [("fwd", *flags), ("bwd", *flags)]
        options = dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        seen.clear()
        cross_entropy(x, t, IGNORE, **options).backward()
        assert seen == want, options
        seen.clear()
        linear_cross_entropy(h, w, t, IGNORE, **options).backward()
        assert seen == want, ("linear", options)


def test_loss_option_ops_default_to_off_and_check_their_options_when_traced(device):
    """The ops' schemas default the three options (label smoothing, z-loss, soft cap) to 0 and RL's to off
    (temperature 1, no entropy: a call written before them computes the plain cross-entropy, backward as
    forward), and their fake impls
    refuse bad options as the real ops do: torch.compile's trace names the argument instead of
    compiling a kernel for it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd, bwd = torch.ops.tritongpt.cross_entropy_fwd, torch.ops.tritongpt.cross_entropy_bwd
    for op, rl in ((fwd, [("temperature", 1.0), ("entropy", False)]),
                   (bwd, [("temperature", 1.0), ("grad_entropy", None), ("entropy", None)])):
        tail = [(a.name, a.default_value) for a in op.default._schema.arguments[-3 - len(rl):]]
        assert tail == [("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", 0.0), *rl], tail
    gen = torch.Generator().manual_seed(43)
    x = torch.randn(6, 40, generator=gen).to(device).requires_grad_()
    t = torch.tensor([1, IGNORE, 7, 39, 0, 12], device=device)
    loss, row_max, log_sum, _ = fwd(x.detach(), t, IGNORE, 40)
    g = torch.rand(6, generator=gen).to(device) + 0.5
    F.cross_entropy(x, t, ignore_index=IGNORE, reduction="none").mul(g).sum().backward()
    assert_close_rel(loss, F.cross_entropy(x.detach(), t, ignore_index=IGNORE, reduction="none"), 1e-5, "loss")
    assert_close_rel(bwd(g, x.detach(), t, row_max, log_sum, IGNORE, 40), x.grad, 1e-5, "dlogits")
    mode = FakeTensorMode()
    fx, ft, fg, fm, fs = (mode.from_tensor(a) for a in (x.detach(), t, g, row_max, log_sum))
    with mode:
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
            fwd(fx, ft, IGNORE, 40, 1.5, 0.0)
        with pytest.raises(ValueError, match=r"z_loss must be in \[0, inf\], got -0.5"):
            bwd(fg, fx, ft, fm, fs, IGNORE, 40, 0.0, -0.5)
        with pytest.raises(ValueError, match=r"softcap must be a finite number >= 0 \(0: no cap\), got -1.0"):
            fwd(fx, ft, IGNORE, 40, 0.0, 0.0, -1.0)
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            bwd(fg, fx, ft, fm, fs, IGNORE, 40, 0.0, 0.0, float("inf"))
        assert fwd(fx, ft, IGNORE, 40, 0.1, 1e-4)[0].shape == (6,)  # good options trace
        assert fwd(fx, ft, IGNORE, 40, 0.1, 1e-4, 30.0)[0].shape == (6,)
        assert bwd(fg, fx, ft, fm, fs, IGNORE, 40, 0.0, 0.0, 30.0).shape == (6, 40)

# -- logit soft-capping -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,label_smoothing,z_loss,pad", [(5.0, 0.0, 0.0, 0), (30.0, 0.0, 0.0, 23),
                                                               (15.0, 0.1, 1e-2, 23)])
def test_softcap_parity_fp64(softcap, label_smoothing, z_loss, pad, dtype, device):
    """The loss of softcap * tanh(x / softcap), and the gradient through the tanh, against float64;
    with a cap of 5 most of these logits (std 3, row offsets of std 5) are well into the tanh's
    bend, and the other options compose with it (the z-loss's lse is the capped logits')."""
    gen = torch.Generator().manual_seed(int(softcap) + pad)
    V = 257
    x, t = make((37,), V + pad, dtype, device, gen)
    t = torch.where(t == IGNORE, t, t % V)
    out = cross_entropy(x, t, IGNORE, "none", vocab_size=V, label_smoothing=label_smoothing, z_loss=z_loss,
                        softcap=softcap)
    x64 = x.detach().double().requires_grad_()
    ref = smoothed_z_loss64(softcap * torch.tanh(x64[:, :V] / softcap), t, label_smoothing, z_loss)
    g = torch.rand(37, generator=gen, dtype=torch.float64) + 0.5
    (out * g.to(device, torch.float32)).sum().backward()
    (ref * g.to(device)).sum().backward()
    assert_close_rel(out, ref, TOL[dtype], "capped loss")
    assert_close_rel(x.grad, x64.grad, TOL[dtype], "dlogits through the cap")
    assert torch.count_nonzero(x.grad[:, V:]) == 0
    uncapped = cross_entropy(x.detach(), t, IGNORE, "none", vocab_size=V, label_smoothing=label_smoothing,
                             z_loss=z_loss)
    assert (uncapped - out.detach()).abs().max() > 1e-2  # the cap changed the losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_softcap_parity_fp64(dtype, device):
    h, w, t, V, _ = padded_head_case(33, dtype, device, logit_scale=6.0)
    loss = linear_cross_entropy(h, w, t, IGNORE, "mean", chunk_rows=10, vocab_size=V, softcap=8.0)
    loss.backward()
    h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
    ref = smoothed_z_loss64(8.0 * torch.tanh((h64 @ w64.t())[:, :V] / 8.0), t, 0.0, 0.0, "mean")
    ref.backward()
    assert_close_rel(loss, ref, TOL[dtype], "fused capped loss")
    assert_close_rel(h.grad, h64.grad, TOL[dtype], "dhidden")
    assert_close_rel(w.grad, w64.grad, TOL[dtype], "dweight")


def test_a_soft_capped_model_caps_its_logits_on_both_paths(tmp_path):
    """GPTConfig.logit_softcap: the logits every caller sees (sampling, log-probs) are
    c * tanh(head / c), and the loss on both paths is that of the capped logits: the same loss and
    every parameter gradient from the reference path (lm_loss on capped logits) and the kernels
    (the cap inside them), for mean, sum and none, with label smoothing and the z-loss too; the
    cap is saved with the model's config."""
    from tritongpt.errors import UserError
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(6)
    cfg = GPTConfig(vocab_size=70, context_length=12, n_embd=16, n_layer=1, n_head=2, vocab_multiple=32,
                    logit_softcap=2.0)
    model = GPTModel(cfg)
    with torch.no_grad():
        model.out_head.weight.mul_(20.0)  # logits of several units, so the cap bends them
    idx, y = torch.randint(0, 70, (3, 11)), torch.randint(0, 70, (3, 11))
    y[1, :3] = IGNORE
    with torch.no_grad():
        logits = model(idx)
        raw = model.out_head(model.hidden(idx))[..., :70]
    assert raw.abs().max() > 4.0 and logits.abs().max() < 2.0
    assert_close_rel(logits, 2.0 * torch.tanh(raw / 2.0), 1e-6, "capped logits")
    w = torch.rand(3, 11)
    for reduction, options in (("mean", {}), ("sum", {"label_smoothing": 0.1, "z_loss": 1e-2}), ("none", {})):
        assert_model_paths_agree(model, idx, y, w, reduction, logits.double(), **options)
    model.save(tmp_path / "m.safetensors")
    assert GPTModel.load(tmp_path / "m.safetensors").config.logit_softcap == 2.0
    for bad in (-1.0, float("nan"), "30"):
        with pytest.raises(UserError, match="GPTConfig.logit_softcap must be a finite number >= 0"):
            GPTConfig(logit_softcap=bad)


@pytest.mark.parametrize("value,match", [(-1.0, "softcap must be a finite number >= 0"),
                                         (float("inf"), "softcap must be a finite number >= 0"),
                                         (True, "got True")])
def test_bad_softcap_says_what(value, match, device):
    x, t = torch.randn(6, 40, device=device), torch.randint(0, 40, (6,), device=device)
    with pytest.raises(ValueError, match=match):
        cross_entropy(x, t, softcap=value)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(torch.randn(6, 8, device=device), torch.randn(40, 8, device=device), t, softcap=value)
    if isinstance(value, float):
        with pytest.raises(ValueError, match=match):
            torch.ops.tritongpt.cross_entropy_fwd(x, t, IGNORE, 40, 0.0, 0.0, value)


# -- the LM head and the loss fused (linear_cross_entropy) --------------------------------------
def check_linear_parity(shape, C, V, dtype, device, seed, reduction="mean", chunk_rows=10, pad=0):
    """pad: extra weight rows past the V classes (a padded vocabulary): no logit, zero gradient."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, C, generator=gen) * 2.0).to(device, dtype).requires_grad_()
    w = (torch.randn(V + pad, C, generator=gen) * C ** -0.5 * 2.0).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, shape, generator=gen)
    t.view(-1)[::4] = IGNORE
    t = t.to(device)
    g = torch.rand((), generator=gen).item() + 0.5  # a fresh upstream gradient
    loss = linear_cross_entropy(h, w, t, IGNORE, reduction, chunk_rows=chunk_rows, vocab_size=V if pad else None)
    (loss * g).backward()
    h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
    logits64 = (h64 @ w64.t())[..., :V]
    ref = F.cross_entropy(logits64.flatten(0, -2), t.flatten(), ignore_index=IGNORE, reduction=reduction)
    (ref * g).backward()
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == dtype
    assert_close_rel(loss, ref, tol, f"fused loss {reduction}")
    assert_close_rel(h.grad, h64.grad, tol, "dhidden")
    assert_close_rel(w.grad, w64.grad, tol, "dweight")
    assert torch.count_nonzero(w.grad[V:]) == 0  # padding rows: exactly no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_parity_fp64_across_chunks(dtype, reduction, device):
    # 37 rows in chunks of 10: three full chunks and a ragged one; V = 300 crosses vocab tiles
    check_linear_parity((37,), 24, 300, dtype, device, seed=7, reduction=reduction)


def test_linear_parity_3d_hidden_one_chunk(device):
    check_linear_parity((2, 9), 16, 130, torch.float32, device, seed=8, chunk_rows=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,pad", [(277, 35), (100, 200)])
def test_linear_padded_vocabulary(V, pad, dtype, device):
    # GPTConfig.vocab_multiple: the weight has V + pad rows, the classes are the first V. 277 + 35:
    # V and the row end fall in the same last tile; 100 + 200: whole tiles of padding after V
    check_linear_parity((37,), 24, V, dtype, device, seed=9, pad=pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_linear_gradient_of_hidden_or_weight_alone(trainable, dtype, device):
    """A frozen LM head (fine-tuning the body, or a head tied to a frozen embedding) or frozen
    hidden states (training a head on cached features): the one gradient asked for is made and
    matches float64. Every other test trained both, where swapping which flag asks for dhidden
    and which for dweight changes nothing; frozen, the hidden states got no gradient at all.
    fp16 too: its gradients are made in backward, from flags carried over from forward."""
    gen = torch.Generator().manual_seed(17)
    h = torch.randn(23, 16, generator=gen).to(device, dtype).requires_grad_(trainable == "hidden")
    w = (torch.randn(90, 16, generator=gen) * 0.5).to(device, dtype).requires_grad_(trainable == "weight")
    t = torch.randint(0, 90, (23,), generator=gen).to(device)
    linear_cross_entropy(h, w, t, chunk_rows=7).backward()
    h64, w64 = (a.detach().double().requires_grad_(a.requires_grad) for a in (h, w))
    F.cross_entropy(h64 @ w64.t(), t).backward()
    got, want = (h.grad, h64.grad) if trainable == "hidden" else (w.grad, w64.grad)
    assert got is not None, f"no gradient for the trainable {trainable}"
    assert got.dtype == dtype
    assert_close_rel(got, want, TOL[dtype], f"d{trainable} alone ({dtype})")


def test_linear_weight_gradient_of_many_chunks_keeps_bf16_precision(device):
    """dweight is a sum over chunks of bf16 products; summed in fp32 (as the forward does) the
    chunks' rounding averages out, summed in bf16 the running total is rounded once per chunk.
    96 chunks of one row: 8.6e-3 relative in bf16 (under the flat 1e-2 bound), 2.8e-3 in fp32,
    2.3e-3 for one chunk. Many chunks may cost at most 2x the error of one."""
    gen = torch.Generator().manual_seed(18)
    N, C, V = 96, 16, 70
    h = torch.randn(N, C, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(V, C, generator=gen) * 0.5).to(device, torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    w64 = w.double().requires_grad_()
    F.cross_entropy(h.double() @ w64.t(), t, reduction="sum").backward()
    rel = {}
    for chunk in (N, 1):
        wc = w.clone().requires_grad_()
        linear_cross_entropy(h, wc, t, reduction="sum", chunk_rows=chunk).backward()
        _, rel[chunk] = assert_close_rel(wc.grad, w64.grad, 1e-2, f"dweight, chunks of {chunk} rows")
    assert rel[1] <= 2 * rel[N], f"{N} chunks: {rel[1]:.2e} > 2 x one chunk's {rel[N]:.2e}"


def _addmm_out_dtype_stand_in(monkeypatch, adds_c=True):
    """torch.addmm with out_dtype (aten::addmm.dtype_out, CUDA only) on the CPU for the test: the 16-bit product
    summed in fp32 into out, c included (adds_c False: a broken one that drops c). -> its calls with out_dtype."""
    real, calls = torch.addmm, []

    def addmm(c, a, b, *args, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return real(c, a, b, *args, out=out, **kwargs) if out is not None else real(c, a, b, *args, **kwargs)
        calls.append(a.shape)
        prod = a.float() @ b.float()
        out.copy_((c + prod) if adds_c else prod)
        return out

    monkeypatch.setattr(torch, "addmm", addmm)
    return calls


@pytest.mark.parametrize("works", [True, False])
def test_linear_weight_gradient_summed_in_fp32_by_the_matmul_where_its_probe_passes(works, monkeypatch, device):
    """Where torch.addmm takes out_dtype, each chunk's dW product is summed into the fp32 gradient by the matmul
    (no 16-bit [V, C] product, cast copy and add). Used only after a probe on small operands matches float64 once
    per device and dtype: a backend that sums wrongly (here one that drops c) keeps the cast-and-add, and the
    gradients match float64 either way, the padded vocabulary's rows included."""
    from tritongpt.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "ACCUMULATE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(ce, "_ACCUMULATE_OK", {})
    calls = _addmm_out_dtype_stand_in(monkeypatch, adds_c=works)
    check_linear_parity((37,), 24, 277, torch.bfloat16, device, seed=19, pad=35)
    assert ce._ACCUMULATE_OK == {(torch.device(device), torch.bfloat16): works}
    # the probe's call, then (where it passed) one per chunk of 10 rows, on the weight's 277 + 35 rows only (the
    # head is padded to 320 for the matmuls)
    assert calls[0] == (70, 37)
    assert calls[1:] == ([(312, 10)] * 3 + [(312, 7)] if works else [])
    calls.clear()
    check_linear_parity((37,), 24, 300, torch.float32, device, seed=20)  # fp32: the plain fp32 matmul
    assert calls == []


def test_linear_weight_gradient_probe_refuses_a_backend_without_out_dtype(monkeypatch, device):
    """The CPU has no addmm out_dtype (CUDA only): with the CPU allowed, the probe's error means False."""
    from tritongpt.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "ACCUMULATE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(ce, "_ACCUMULATE_OK", {})
    assert ce._fp32_accumulate_ok(torch.device("cpu"), torch.bfloat16) is False
    assert ce._ACCUMULATE_OK == {(torch.device("cpu"), torch.bfloat16): False}


def test_linear_head_grads_under_a_fake_mode_leave_the_probe_alone(monkeypatch):
    """Traced under a dispatch mode (FakeTensorMode here; make_fx, torch.export alike) the head's gradients take the
    plain forms, as under torch.compile: the probe is not run there, where it could not read its sum (a fake one
    failed and kept False for the device for good) or would be traced into the graph. A plain call then probes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tritongpt.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "ACCUMULATE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(ce, "_ACCUMULATE_OK", {})
    calls = _addmm_out_dtype_stand_in(monkeypatch)

    def head_grads():
        gen = torch.Generator().manual_seed(8)
        dl, h, w = (torch.randn(*s, generator=gen).bfloat16() for s in ((10, 64), (10, 24), (64, 24)))
        dh, dw = torch.empty(10, 24, dtype=torch.bfloat16), torch.zeros(60, 24)
        ce._head_grads(dl, h, w, 0, 10, dh, dw, None)
        return dl, h, w, dh, dw

    with FakeTensorMode():
        head_grads()
    assert ce._ACCUMULATE_OK == {} and calls == []
    dl, h, w, dh, dw = head_grads()
    assert ce._ACCUMULATE_OK == {(torch.device("cpu"), torch.bfloat16): True} and len(calls) == 2
    assert_close_rel(dh, dl.double() @ w.double(), 1e-2, "dh")
    assert_close_rel(dw, dl.double().t()[:60] @ h.double(), 1e-6, "dw")


@pytest.mark.cuda
def test_linear_weight_gradient_summed_in_fp32_on_cuda():
    """On a GPU the head's bf16 dW parity holds at a GPT-2-like shape whichever way the probe went (some torch
    builds have addmm's out_dtype but refuse an fp32 self with bf16 operands: the probe then says False)."""
    from tritongpt.kernels import cross_entropy as ce

    dev = torch.device("cuda")
    ok = ce._fp32_accumulate_ok(dev, torch.bfloat16)
    print(f"addmm out_dtype accumulate on this torch ({torch.__version__}): {ok}")
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        assert ok is False
    check_linear_parity((1000,), 768, 5000, torch.bfloat16, dev, seed=21, chunk_rows=384, pad=24)


def test_linear_never_makes_all_the_logits(device):
    """Every tensor an op returns during forward and backward, counted: the fused path's largest
    is a chunk of logits or the weight's gradient, never the [N, V] logits the reference makes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from tritongpt.kernels.cross_entropy import _padded_count
    from tritongpt.model.gpt import lm_loss

    class Largest(TorchDispatchMode):
        numel = 0

        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
            return out

    N, C, V, chunk = 40, 16, 300, 8
    gen = torch.Generator().manual_seed(12)
    h = torch.randn(N, C, generator=gen).to(device).requires_grad_()
    w = torch.randn(V, C, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    with Largest() as ours:
        linear_cross_entropy(h, w, t, chunk_rows=chunk).backward()
    with Largest() as ref:
        lm_loss(torch.nn.functional.linear(h, w)[None], t[None]).backward()
    print(f"largest tensor: fused {ours.numel} elements, reference {ref.numel} (N*V = {N * V})")
    Vp = _padded_count(V)  # the head's rows padded for aligned matmuls (300 -> 320)
    assert ours.numel <= max(chunk * Vp, Vp * C) < N * V <= ref.numel
    # one loss kernel per chunk, but the targets are checked (a host sync) once per call
    assert ours.ops.count("tritongpt.cross_entropy_fwd") == N // chunk
    assert ours.ops.count("tritongpt.checked_targets") == 1
    # evaluation (no_grad, the weight still requires grad): the loss alone, no gradient work
    with Largest() as evaluation, torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_rows=chunk)
    assert evaluation.ops.count("tritongpt.cross_entropy_fwd") == N // chunk
    assert evaluation.ops.count("tritongpt.cross_entropy_bwd") == 0
    assert evaluation.ops.count("aten.mm") == N // chunk  # the logits' matmuls only
    torch.testing.assert_close(loss, lm_loss(torch.nn.functional.linear(h, w)[None], t[None]))


def test_linear_under_autocast_matches_the_linear_layer_path(device):
    """fp32 weights and hidden under bf16 autocast (training): the matmuls run in bf16 as
    nn.Linear's would, the gradients come back in fp32."""
    from tritongpt.model.gpt import lm_loss

    gen = torch.Generator().manual_seed(9)
    h = torch.randn(2, 11, 32, generator=gen).to(device).requires_grad_()
    head = torch.nn.Linear(32, 200, bias=False).to(device)
    t = torch.randint(0, 200, (2, 11), generator=gen).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, head.weight, t, chunk_rows=8)
    ours.backward()
    got = (ours.detach(), h.grad.clone(), head.weight.grad.clone())
    h.grad = head.weight.grad = None
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ref = lm_loss(head(h), t)
    ref.backward()
    assert got[1].dtype == got[2].dtype == torch.float32
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, (ref.detach(), h.grad, head.weight.grad)):
        assert_close_rel(a, b, 1e-2, f"autocast {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_under_autocast_multiplies_in_its_dtype_and_defers_only_fp16(dtype, device):
    """fp32 hidden and head under autocast: every head matmul runs in the autocast dtype, as
    nn.Linear's would (an fp32 matmul is parity-safe, so the parity tests cannot tell, but it is
    several times slower on a GPU, and under fp16 it skipped the loss-scale path). Only fp16
    leaves the gradients to backward; bf16 makes them in forward (one dlogits kernel per chunk)
    and its backward only scales them: no matmul, no kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in ("aten.mm", "tritongpt.cross_entropy_bwd"):
                self.calls.append((name, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(23)
    N, C, V, chunk = 13, 16, 70, 5  # three chunks, the last ragged
    h = torch.randn(N, C, generator=gen).to(device).requires_grad_()
    w = (torch.randn(V, C, generator=gen) * 0.5).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    t[::4] = IGNORE
    t = t.to(device)
    with Ops() as fwd, torch.autocast(device.type, dtype=dtype):
        loss = linear_cross_entropy(h, w, t, chunk_rows=chunk)
    with Ops() as bwd:
        (loss * 1.7).backward()
    mm = [dt for name, dts in fwd.calls + bwd.calls if name == "aten.mm" for dt in dts]
    assert mm and set(mm) == {dtype}, f"head matmuls ran in {sorted(set(map(str, mm)))}, not {dtype}"
    count = {phase: {op: sum(name == op for name, _ in m.calls) for op in ("aten.mm", "tritongpt.cross_entropy_bwd")}
             for phase, m in (("forward", fwd), ("backward", bwd))}
    # per chunk: the logits, then dlogits -> dhidden and dweight (the backward recomputes the logits)
    made, idle = ("backward", "forward") if dtype == torch.float16 else ("forward", "backward")
    assert count[made] == {"aten.mm": 3 * 3, "tritongpt.cross_entropy_bwd": 3}, count
    assert count[idle] == {"aten.mm": 3 if idle == "forward" else 0, "tritongpt.cross_entropy_bwd": 0}, count
    h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
    (F.cross_entropy(h64 @ w64.t(), t, ignore_index=IGNORE) * 1.7).backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert_close_rel(h.grad, h64.grad, 1e-2, f"dhidden under {dtype} autocast")
    assert_close_rel(w.grad, w64.grad, 1e-2, f"dweight under {dtype} autocast")


def test_linear_fp16_gradients_carry_the_loss_scale(device):
    """fp16 autocast with GradScaler's first scale (2^16): the gradients must be as good as
    nn.Linear's under the same scale. Made in forward at 1/n per row, with n = 2048 tokens and
    500 classes a typical p/n of 1e-6 is an fp16 subnormal and smaller ones flush to zero: 2.7x
    nn.Linear's error here (dhidden 9.0e-4 vs 3.3e-4), 26x at 16k tokens."""
    from tritongpt.model.gpt import lm_loss

    gen = torch.Generator().manual_seed(19)
    N, C, V, scale = 2048, 32, 500, 65536.0
    h = torch.randn(N, C, generator=gen, dtype=torch.float64)
    w = torch.randn(V, C, generator=gen, dtype=torch.float64) * 0.1
    t = torch.randint(0, V, (N,), generator=gen)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), t).backward()
    rel = {}
    for name in ("nn.Linear", "fused"):
        hh, ww = (a.float().to(device).requires_grad_() for a in (h, w))
        with torch.autocast(device.type, dtype=torch.float16):
            loss = lm_loss((hh @ ww.t())[None], t.to(device)[None]) if name == "nn.Linear" else \
                linear_cross_entropy(hh, ww, t.to(device), chunk_rows=700)
        (loss * scale).backward()
        rel[name] = [assert_close_rel(a.grad / scale, b.grad, 1e-2, f"{name} d{n}")[1]
                     for n, a, b in (("hidden", hh, h64), ("weight", ww, w64))]
    assert all(f <= 1.5 * r for f, r in zip(rel["fused"], rel["nn.Linear"])), rel


# the mean's row gradient is 1/0 = inf, multiplied into rows the kernel then zeroes: NumPy warns
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_every_target_ignored_is_nan_mean_and_zero_sum(dtype, device):
    """As F.cross_entropy (and cross_entropy on the logits): with no counted target the mean is
    nan (0 / 0) and the sum 0, and every gradient is exactly 0, fp16's deferred ones included."""
    gen = torch.Generator().manual_seed(29)
    t = torch.full((7,), IGNORE, device=device)
    for reduction in ("mean", "sum"):
        h = torch.randn(7, 8, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(11, 8, generator=gen).to(device, dtype).requires_grad_()
        loss = linear_cross_entropy(h, w, t, IGNORE, reduction, chunk_rows=3)
        ref = F.cross_entropy(h.detach().double() @ w.detach().double().t(), t, ignore_index=IGNORE,
                              reduction=reduction)
        assert torch.equal(loss.isnan(), ref.isnan()) and (ref.isnan() or loss.item() == ref.item() == 0.0)
        loss.backward()
        assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w)), reduction


def test_linear_without_grad_computes_only_the_loss(device):
    gen = torch.Generator().manual_seed(10)
    h, w = torch.randn(20, 16, generator=gen).to(device), torch.randn(90, 16, generator=gen).to(device)
    t = torch.randint(0, 90, (20,), generator=gen).to(device)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_rows=7)
    assert not loss.requires_grad
    assert_close_rel(loss, F.cross_entropy(h.double() @ w.double().t(), t), 1e-5, "no-grad loss")


def test_linear_with_no_features_and_numpy_ints(device):
    """C = 0: every logit is 0, the loss is log V and the gradients are empty; ignore_index may
    be any integer type PyTorch takes (a numpy int64 from a dataset's pad id)."""
    import math

    import numpy as np

    h = torch.empty(6, 0, device=device, requires_grad=True)
    w = torch.empty(50, 0, device=device, requires_grad=True)
    t = torch.tensor([1, 2, 3, -100, 4, 5], device=device)
    loss = linear_cross_entropy(h, w, t, np.int64(-100))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(50), rel=1e-6)
    assert h.grad.shape == (6, 0) and w.grad.shape == (50, 0)
    x = torch.randn(6, 9, device=device)
    t = torch.tensor([1, 2, 3, 7, 4, 5], device=device)
    assert cross_entropy(x, t, np.int32(7)).item() == pytest.approx(F.cross_entropy(x, t, ignore_index=7).item())
    # vocab_size and chunk_rows too (they refused numpy ints that ignore_index took)
    assert cross_entropy(x, t, vocab_size=np.int64(8)).item() == pytest.approx(F.cross_entropy(x[:, :8], t).item())
    w = torch.randn(9, 4, device=device)
    h = torch.randn(6, 4, device=device)
    assert linear_cross_entropy(h, w, t, chunk_rows=np.int64(4)).item() == pytest.approx(
        linear_cross_entropy(h, w, t, chunk_rows=4).item())


def test_linear_refuses_a_second_derivative(device):
    """The gradients are made in forward, so they are constants to autograd: a gradient penalty
    through the fused head must raise, not come out without its hidden/weight terms."""
    gen = torch.Generator().manual_seed(16)
    h = torch.randn(6, 16, generator=gen).to(device).requires_grad_()
    w = torch.randn(50, 16, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 50, (6,), generator=gen).to(device)
    scale = torch.ones((), device=device, requires_grad=True)
    for loss in (lambda: linear_cross_entropy(h, w, t) * scale, lambda: linear_cross_entropy(h, w, t)):
        # (without the scale the upstream gradient is a constant too: the old once_differentiable
        # guard let that through, and the second derivative came out 0)
        with pytest.raises(RuntimeError, match="linear_cross_entropy: the Triton kernel has no second derivative"):
            torch.autograd.grad(loss(), h, create_graph=True)
    (g,) = torch.autograd.grad(linear_cross_entropy(h, w, t) * scale, h)  # first order: fine
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("autocast,options", [(None, {}), (torch.float16, {}),
                                              (torch.float16, {"label_smoothing": 0.1, "z_loss": 1e-3})])
def test_linear_torch_compile_fullgraph(device, autocast, options):
    """Dynamo traces the chunk loop (unrolled) with the custom ops inside: no graph breaks; under
    fp16 autocast, the backward's chunk loop too (the gradients wait for the upstream one), with
    the loss options as the ops' constants."""
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(8, 16, generator=gen).to(device).requires_grad_()  # two chunks of 5 rows, the last ragged
    w = torch.randn(70, 16, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 70, (8,), generator=gen).to(device)

    def fn(h, w, t):
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return linear_cross_entropy(h, w, t, chunk_rows=5, **options) * 3.0

    y = torch.compile(fn, backend="aot_eager", fullgraph=True)(h, w, t)
    y.backward()
    got = (y.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    y = fn(h, w, t)
    y.backward()
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, (y.detach(), h.grad, w.grad)):
        assert_close_rel(a, b, 1e-6, f"compiled {name}")


@pytest.mark.parametrize("call,err,match", [
    (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction must be"),
    (lambda h, w, t: linear_cross_entropy(h, w[:, :5], t), ValueError, r"hidden \(6, 8\) and weight \(40, 5\)"),
    (lambda h, w, t: linear_cross_entropy(h, w.bfloat16(), t), TypeError, "dtype mismatch: hidden is float32, weight is bfloat16"),
    (lambda h, w, t: linear_cross_entropy(h, w, t[:3]), ValueError, "targets has shape"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=0), ValueError, "chunk_rows must be a positive int"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, vocab_size=41), ValueError, r"vocab_size must be an int in \[1, 40\]"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, vocab_size=0), ValueError, r"vocab_size must be an int in \[1, 40\]"),
    (lambda h, w, t: linear_cross_entropy(h.view(2, 3, 8), w, t), ValueError, r"targets has shape \(6,\); expected"),
    (lambda h, w, t: linear_cross_entropy(h, w, t.clamp(min=35), vocab_size=30), ValueError,
     r"target 3\d at position 0 is outside the vocabulary \[0, 30\)"),
])
def test_linear_bad_input_says_what(call, err, match):
    h, w, t = torch.randn(6, 8), torch.randn(40, 8), torch.randint(0, 40, (6,))
    with pytest.raises(err, match=match):
        call(h, w, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-deferred"])
def test_linear_head_matmuls_see_a_padded_vocabulary(dtype, device):
    """GPT-2's 50257 head rows make logits whose row stride no 16-byte vector or TMA copy can walk,
    and cuBLAS ran the fused head + loss at 103 TFLOPS on an H200 (bench/results/nvidia-h200). The
    head's matmuls (logits, dhidden, dweight; fp16's again in backward) see the rows padded to 320
    (HEAD_ROW_MULTIPLE), never the 300 of the weight; the gradients keep the weight's 300 rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tritongpt.kernels.cross_entropy import HEAD_ROW_MULTIPLE

    class MatmulShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.shapes.append([tuple(a.shape) for a in (*args, out) if isinstance(a, torch.Tensor)])
            return out

    N, C, V, chunk = 40, 16, 300, 16
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(N, C, generator=gen).to(device, dtype).requires_grad_()
    w = torch.randn(V, C, generator=gen).to(device, dtype).requires_grad_()
    b = torch.randn(V, generator=gen).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    with MatmulShapes() as seen:
        linear_cross_entropy(h, w, t, chunk_rows=chunk, bias=b).backward()
    dims = [d for call in seen.shapes for shape in call for d in shape]
    assert 320 % HEAD_ROW_MULTIPLE == 0 and V not in dims, seen.shapes
    # three chunks, each: logits, dh, dW; fp16 makes its gradients in backward from the logits again
    want = 9 if dtype == torch.bfloat16 else 12
    assert sum(1 for call in seen.shapes if any(320 in shape for shape in call)) == want, seen.shapes
    assert w.grad.shape == (V, C) and b.grad.shape == (V,) and h.grad.shape == (N, C)
    h64, w64, b64 = (a.detach().double().requires_grad_() for a in (h, w, b))
    torch.nn.functional.cross_entropy(h64 @ w64.t() + b64, t).backward()
    for got, want, name in ((h.grad, h64.grad, "dh"), (w.grad, w64.grad, "dW"), (b.grad, b64.grad, "db")):
        assert_close_rel(got, want, TOL[dtype], name)


def test_fp16_deferred_path_keeps_no_padded_copy_until_backward(device):
    """fp16 makes its gradients in backward from recomputed logits: it keeps the weight as given and pads it
    again there, so no padded copy of the head (77 MB for GPT-2) lives from forward to backward."""
    N, C, V = 24, 16, 300
    gen = torch.Generator().manual_seed(14)
    h = torch.randn(N, C, generator=gen).to(device, torch.float16).requires_grad_()
    w = torch.randn(V, C, generator=gen).to(device, torch.float16).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = linear_cross_entropy(h, w, t, chunk_rows=8)
    assert (V, C) in saved and not any(shape and shape[0] == 320 for shape in saved), saved
    loss.backward()
    h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
    torch.nn.functional.cross_entropy(h64 @ w64.t(), t).backward()
    assert_close_rel(w.grad, w64.grad, TOL[torch.float16], "dW")
    assert_close_rel(h.grad, h64.grad, TOL[torch.float16], "dh")


# -- the LM head's bias (GPTConfig.head_bias: Phi-1/1.5/2, GPT-J) --------------------------------
def check_linear_bias_parity(dtype, device, seed, options=(), chunk_rows=10, V=277, pad=35, reduction="mean"):
    """linear_cross_entropy(..., bias=b) against float64 torch on (h @ W.T + b)[:, :V]: loss, dh, dW and db;
    37 rows in chunks of 10 (a ragged last one), every 4th row ignored, pad padding rows past the V classes."""
    options = dict(options)
    h, w, t, V, gen = padded_head_case(seed, dtype, device, logit_scale=3.0, V=V, pad=pad, C=23)
    b = (torch.randn(V + pad, generator=gen) * 2.0).to(device, dtype).requires_grad_()
    g = torch.rand((), generator=gen).item() + 0.5  # a fresh upstream gradient
    loss = linear_cross_entropy(h, w, t, IGNORE, reduction, chunk_rows=chunk_rows, vocab_size=V, bias=b, **options)
    (loss * g).backward()
    h64, w64, b64 = (a.detach().double().requires_grad_() for a in (h, w, b))
    logits64 = (h64 @ w64.t() + b64)[:, :V]
    cap = options.get("softcap", 0.0)
    if cap:
        logits64 = cap * torch.tanh(logits64 / cap)
    ref = smoothed_z_loss64(logits64, t, options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), reduction)
    (ref * g).backward()
    tol = TOL[dtype]
    assert b.grad.dtype == dtype
    assert_close_rel(loss, ref, tol, f"fused loss with a bias {options}")
    assert_close_rel(h.grad, h64.grad, tol, "dhidden")
    assert_close_rel(w.grad, w64.grad, tol, "dweight")
    assert_close_rel(b.grad, b64.grad, tol, "dbias")
    assert torch.count_nonzero(b.grad[V:]) == 0 and torch.count_nonzero(w.grad[V:]) == 0  # padding: none


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_head_bias_parity_fp64(dtype, reduction, device):
    # fp16 makes its gradients in backward from recomputed logits (the deferred path): the bias must be in those
    check_linear_bias_parity(dtype, device, 41, reduction=reduction)


@pytest.mark.parametrize("options", [{"label_smoothing": 0.15}, {"z_loss": 2e-2}, {"softcap": 8.0}],
                         ids=["smoothing", "z-loss", "softcap"])
def test_linear_head_bias_with_each_loss_option(options, device):
    check_linear_bias_parity(torch.float32, device, 43, options.items())


def test_linear_head_bias_whole_tiles_of_padding_one_chunk(device):
    check_linear_bias_parity(torch.float32, device, 44, chunk_rows=None, V=100, pad=200)


@pytest.mark.parametrize("make,match", [
    (lambda w: w[:, 0][:-1], r"bias has shape \(39,\); expected \(40,\)"),
    (lambda w: w[:2], r"bias has shape \(2, 8\)"),
    (lambda w: w[:, 0].double(), "bias is float64, weight float32"),
    (lambda w: w[:, 0].tolist(), "bias must be a torch.Tensor or None, got list"),
    (lambda w: w[:, 0].to("meta"), "bias is on meta, weight on cpu"),
], ids=["length", "2d", "dtype", "list", "device"])
def test_linear_bad_head_bias_says_what(make, match):
    from tritongpt.errors import UserError

    h, w, t = torch.randn(6, 8), torch.randn(40, 8), torch.randint(0, 40, (6,))
    with pytest.raises(UserError, match=match):
        linear_cross_entropy(h, w, t, bias=make(w))


def test_linear_head_bias_gradient_is_made_only_when_wanted_and_in_fp16_waits_for_backward(monkeypatch, device):
    """A trainable head bias, the only trainable input: under no_grad no dlogits kernel runs (an evaluation pays
    for the loss only); under fp16 autocast its gradient waits for backward, as dhidden's and dweight's do (the
    loss scale only arrives there), and carries that scale."""
    import tritongpt.kernels.cross_entropy as ce

    launches = []
    real = ce._bwd_launch
    monkeypatch.setattr(ce, "_bwd_launch", lambda *a, **k: launches.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(45)
    h, w = torch.randn(13, 16, generator=gen).to(device), (torch.randn(70, 16, generator=gen) * 0.5).to(device)
    b = torch.randn(70, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 70, (13,), generator=gen)
    t[::4] = IGNORE
    t = t.to(device)
    with torch.no_grad():
        linear_cross_entropy(h, w, t, chunk_rows=5, bias=b)
    assert launches == []
    with torch.autocast(device.type, dtype=torch.float16):
        loss = linear_cross_entropy(h, w, t, chunk_rows=5, bias=b)
    assert launches == []  # deferred: nothing made in forward
    (loss * 1024.0).backward()
    assert len(launches) == 3  # one per chunk, in backward
    b64 = b.detach().double().requires_grad_()
    (F.cross_entropy(h.double() @ w.double().t() + b64, t, ignore_index=IGNORE) * 1024.0).backward()
    assert b.grad.dtype == torch.float32
    assert_close_rel(b.grad, b64.grad, 1e-2, "dbias under fp16 autocast")


def test_model_head_bias_loss_on_every_path():
    """GPTConfig.head_bias: the reference lm_loss, the fused head (mean, sum) and the per-token kernel (none) on a
    padded vocabulary give the float64 objective's loss and the same gradients, the head's bias's included (its
    padding entries none); pad_vocab keeps the logits, the bias padded with zeros."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(6)
    model = GPTModel(GPTConfig(vocab_size=70, context_length=12, n_embd=16, n_layer=1, n_head=2, vocab_multiple=32,
                               head_bias=True))
    assert model.out_head.bias.shape == (96,) and torch.count_nonzero(model.out_head.bias) == 0
    with torch.no_grad():
        model.out_head.bias[:70] = torch.randn(70) * 3.0
    idx, y = torch.randint(0, 70, (3, 11)), torch.randint(0, 70, (3, 11))
    y[0, :4] = IGNORE
    w = torch.rand(3, 11)
    with torch.no_grad():
        logits64 = model.double()(idx)
        no_bias = model.hidden(idx) @ model.out_head.weight.t()
    assert_close_rel(logits64 - no_bias[..., :70], model.out_head.bias[:70].expand(3, 11, 70), 1e-12, "the bias")
    model.float()
    for reduction in ("mean", "sum", "none"):
        assert_model_paths_agree(model, idx, y, w, reduction, logits64, label_smoothing=0.1)
        assert torch.count_nonzero(model.out_head.bias.grad[70:]) == 0
    unpadded = model.pad_vocab(1)
    assert unpadded.out_head.bias.shape == (70,)
    padded = unpadded.pad_vocab(64)
    assert torch.count_nonzero(padded.out_head.bias[70:]) == 0
    with torch.no_grad():
        assert_close_rel(padded(idx), model(idx), 1e-6, "pad_vocab with a head bias")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpt2_vocab_cuda(dtype):
    check_parity((4099,), 50257, dtype, torch.device("cuda"), seed=3, reduction="mean")


def test_per_token_logprobs_through_the_model_on_both_paths():
    """DPO and RLHF's reference log-probs go through the model's loss path (reduction="none"):
    the same numbers and gradients as log_softmax + gather, on either path."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.preference import model_token_logprobs, token_logprobs

    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=70, context_length=12, n_embd=16, n_layer=1, n_head=2))
    idx = torch.randint(0, 70, (3, 11))
    w = torch.rand(3, 10)  # fresh weights per position, so every gradient entry is exercised

    def run(fn):
        model.zero_grad(set_to_none=True)
        lp = fn()
        (lp * w).sum().backward()
        return lp.detach(), model.out_head.weight.grad.clone()

    want, want_grad = run(lambda: token_logprobs(model(idx), idx))
    for path in ("reference", {"cross_entropy"}):
        model.set_kernels(path)
        got, got_grad = run(lambda: model_token_logprobs(model, idx))
        assert got.shape == (3, 10) and got.dtype == torch.float32
        assert_close_rel(got, want, 1e-5, f"log-probs {path}")
        assert_close_rel(got_grad, want_grad, 1e-5, f"lm head grad {path}")
    model.set_kernels("reference")


@pytest.mark.cuda
@pytest.mark.parametrize("pad", [0, 47])  # 47: GPT-2's vocabulary padded to 50304 (16-byte vector loads)
def test_linear_gpt2_sizes_cuda(pad):
    check_linear_parity((4099,), 768, 50257, torch.bfloat16, torch.device("cuda"), seed=4, chunk_rows=None,
                        pad=pad)


@pytest.mark.cuda
def test_linear_head_bias_phi2_sizes_cuda():
    """Phi-2's LM head (2560 wide, 51200 classes, bf16) with its bias over 4099 rows, in the default chunks (the
    GPU's tiles and several chunks, which the interpreter's small cases never reach): loss, dh, dW and db against
    float64 within bf16's bound."""
    gen = torch.Generator().manual_seed(46)
    N, C, V, dev = 4099, 2560, 51200, torch.device("cuda")
    h = torch.randn(N, C, generator=gen).to(dev, torch.bfloat16).requires_grad_()
    w = (torch.randn(V, C, generator=gen) * C ** -0.5 * 3.0).to(dev, torch.bfloat16).requires_grad_()
    b = torch.randn(V, generator=gen).to(dev, torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(dev)
    loss = linear_cross_entropy(h, w, t, bias=b)
    loss.backward()
    h64, w64, b64 = (a.detach().double().requires_grad_() for a in (h, w, b))
    ref = F.cross_entropy(h64 @ w64.t() + b64, t)
    ref.backward()
    for got, want, what in ((loss, ref, "loss"), (h.grad, h64.grad, "dh"), (w.grad, w64.grad, "dW"), (b.grad, b64.grad, "db")):
        assert_close_rel(got, want, TOL[torch.bfloat16], what)


# -- the GPU launch path: autotuned tiles, pipelining, per-row or per-lane running max ------------------
def _stand_in_gpu(monkeypatch, fastest):
    """Run the loss launchers' GPU branch on the CPU: the interpreter launches one row a program (BLOCK_R 1) with
    the shapes autotune times, the fastest[kernel]-th shape left by the prune the quickest (autotune_stub)."""
    from autotune_stub import time_as_told

    from tritongpt.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "INTERPRET", False)
    monkeypatch.setattr(ce, "SMALL_N", 0)  # a handful of rows, every shape timed
    return time_as_told(monkeypatch, {"fwd": (ce._ce_fwd_tuned, ce._prune_tiles),
                                      "bwd": (ce._ce_bwd_tuned, ce._prune_tiles)}, fastest)


@pytest.mark.parametrize("fastest", [{"fwd": 0, "bwd": 0}, {"fwd": 3, "bwd": 2}, {"fwd": 4, "bwd": 3}],
                         ids=["per-lane", "per-row", "narrow-tiles"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 15.0}],
                         ids=["plain", "smooth-z-cap"])
def test_gpu_launch_path_each_autotuned_shape_is_right(monkeypatch, fastest, options):
    """On a GPU the loss runs one row a program with an autotuned tile width, warps, pipelined tile loop and (forward)
    per-lane or per-row running max and sum (LANE_MAX). Each picked shape, driven on the CPU, gives the float64
    loss and gradient: rows of 5000 logits (plus 23 padding columns) cross one to three tiles, the last ragged."""
    from tritongpt.kernels import cross_entropy as ce

    timed = _stand_in_gpu(monkeypatch, fastest)
    gen = torch.Generator().manual_seed(17)
    V, pad = 5000, 23
    x, t = make((3,), V + pad, torch.float32, torch.device("cpu"), gen)  # row 0 ignored, 1 and 2 counted
    t = torch.where(t == IGNORE, t, t % V)
    out = cross_entropy(x, t, IGNORE, "none", vocab_size=V, **options)
    x64 = x.detach().double().requires_grad_()
    logits64 = x64[:, :V]
    if options:
        logits64 = options["softcap"] * torch.tanh(logits64 / options["softcap"])
    ref = smoothed_z_loss64(logits64, t, options.get("label_smoothing", 0.0), options.get("z_loss", 0.0))
    g = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    (out * g.float()).sum().backward()
    (ref * g).sum().backward()
    assert_close_rel(out, ref, 1e-4, "loss")
    assert_close_rel(x.grad, x64.grad, 1e-4, "dlogits")
    assert torch.count_nonzero(x.grad[:, V:]) == 0
    fwd, bwd = timed["fwd"][fastest["fwd"]], timed["bwd"][fastest["bwd"]]
    assert ce._ce_fwd_tuned.cache and list(ce._ce_fwd_tuned.cache.values())[0] is fwd
    assert list(ce._ce_bwd_tuned.cache.values())[0] is bwd
    assert len(timed["fwd"]) == len(ce.FWD_SHAPES) and len(timed["bwd"]) == len(ce.BWD_SHAPES)  # none repeat at 8192
    assert {c.kwargs["LANE_MAX"] for c in timed["fwd"]} == {True, False}
    # later calls launch the picks without Triton's autotuner (_common.launch_tuned), with the same result
    from triton.runtime.autotuner import Autotuner
    monkeypatch.setattr(Autotuner, "run", lambda *a, **k: pytest.fail("autotuned again"))
    x2 = x.detach().clone().requires_grad_()
    out2 = cross_entropy(x2, t, IGNORE, "none", vocab_size=V, **options)
    (out2 * g.float()).sum().backward()
    assert torch.equal(out2, out) and torch.equal(x2.grad, x.grad)
    assert ce._ce_fwd_tuned.tritongpt_picks and list(ce._ce_fwd_tuned.tritongpt_picks.values())[0] is fwd


def test_loss_tiles_prune_to_the_row_width():
    """Tiles no wider than the row's next power of two; shapes that become the same, once."""
    import triton

    from tritongpt.kernels import cross_entropy as ce

    configs = [triton.Config({"BLOCK_V": b, "NUM_STAGES": s, "LANE_MAX": lane}, num_warps=w, num_stages=s)
               for b, w, s, lane in ce.FWD_SHAPES]
    for W, widest in ((50257, 8192), (1000, 1024), (3, 4)):
        kept = ce._prune_tiles(configs, {"W": W, "N_BUCKET": 4096})
        assert max(c.kwargs["BLOCK_V"] for c in kept) == widest
        shapes = [(c.kwargs["BLOCK_V"], c.num_warps, c.num_stages, c.kwargs["LANE_MAX"]) for c in kept]
        assert len(set(shapes)) == len(shapes) and all(c.kwargs["NUM_STAGES"] == c.num_stages for c in kept)
    assert len(ce._prune_tiles(configs, {"W": 50257, "N_BUCKET": 4096})) == len(ce.FWD_SHAPES)
    # few rows (a chunk's ragged end): the first shape, untimed
    assert [c.kwargs for c in ce._prune_tiles(configs, {"W": 50257, "N_BUCKET": ce.SMALL_N})] == [
        {"BLOCK_V": 4096, "NUM_STAGES": 1, "LANE_MAX": True}]


# the interpreter's numpy warns of the -inf - -inf that the kernels' wheres then discard
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("fastest", [0, 2, 4, 5], ids=["per-lane", "per-row", "per-row-2048", "per-row-8192"])
def test_gpu_launch_path_rows_of_minus_infinity(monkeypatch, fastest):
    """The GPU branch's shapes (per-row LANE_MAX=False ones too) on the rows the interpreter's per-lane shape is
    tested with: a one-hot row (loss exactly 0), a -inf target logit (inf), an ignored row of -inf (loss and
    gradient 0), a counted row of -inf (nan, as PyTorch), a row whose first tiles are all -inf (a per-row max
    still -inf after them), and padding columns past V holding large values and nan (absent)."""
    _stand_in_gpu(monkeypatch, {"fwd": fastest, "bwd": fastest})
    V, pad = 5000, 23
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, V + pad, generator=gen) * 3
    x[:, V:] = 1e4
    x[::2, V + 1] = float("nan")
    x[0, :V] = float("-inf")
    x[0, 9] = 2.0
    x[1, 65] = float("-inf")
    x[2, :V] = float("-inf")
    x[3, :4100] = float("-inf")  # every tile of 2048 or 4096 columns before the target's, the 8192 one in part
    x[4, :V] = float("-inf")
    t = torch.tensor([9, 65, IGNORE, 4500, 7, 11])
    x.requires_grad_()
    out = cross_entropy(x, t, IGNORE, "none", vocab_size=V)
    want = F.cross_entropy(x.detach()[:, :V].double(), t, ignore_index=IGNORE, reduction="none")
    assert out[0] == 0 and out[1] == float("inf") and out[2] == 0 and torch.isnan(out[4]) and torch.isnan(want[4])
    torch.testing.assert_close(out[[3, 5]].double(), want[[3, 5]], rtol=1e-5, atol=0)
    finite = [0, 2, 3, 5]
    out[finite].sum().backward()
    x64 = x.detach()[:, :V].double().requires_grad_()
    counted = [0, 3, 5]  # (PyTorch's gradient of the ignored row of -inf is nan; ours 0, as documented)
    F.cross_entropy(x64[counted], t[counted], reduction="sum").backward()
    assert (x.grad[2] == 0).all() and (x.grad[:, V:] == 0).all()
    torch.testing.assert_close(x.grad[counted, :V].double(), x64.grad[counted], rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_padding_columns_of_nan_get_zero_gradient(softcap, device):
    """Columns past vocab_size are absent whatever they hold: a padded logits buffer whose padding was never
    written (nan) gives the classes' loss and gradient, and 0 in the padding columns, as the backward's
    docstring says. The soft cap's derivative read the padding's tanh after the padding was zeroed: nan * 0."""
    gen = torch.Generator().manual_seed(31)
    V, pad = 70, 10
    x = (torch.randn(5, V + pad, generator=gen) * 3).to(device)
    x[:, V:] = float("nan")
    x.requires_grad_()
    t = torch.tensor([1, 2, IGNORE, 69, 0], device=device)
    out = cross_entropy(x, t, IGNORE, "none", vocab_size=V, softcap=softcap)
    out.sum().backward()
    x64 = x.detach()[:, :V].double().requires_grad_()
    logits64 = softcap * torch.tanh(x64 / softcap) if softcap else x64
    ref = F.cross_entropy(logits64, t, ignore_index=IGNORE, reduction="none")
    ref.sum().backward()
    assert_close_rel(out, ref, 1e-5, "loss, nan padding")
    assert torch.count_nonzero(x.grad[:, V:]) == 0 and not x.grad.isnan().any()
    assert_close_rel(x.grad[:, :V], x64.grad, 1e-4, "dlogits, nan padding")
