"""Triton cross-entropy (kernels/cross_entropy.py) vs float64 and vs the reference lm_loss.

On CPU the kernels run through Triton's interpreter with 64-wide vocabulary tiles, so a
vocabulary of a few hundred crosses several tiles and a ragged last one; the CUDA-marked test
repeats the check at GPT-2's vocabulary when a GPU is present.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from parity import assert_close_rel
from tritongpt.kernels._common import saved_tensor_bytes
from tritongpt.kernels.cross_entropy import cross_entropy
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
    assert_close_rel(out, ref, tol, f"loss {reduction}")
    assert x.grad.dtype == dtype  # the gradient comes back in the logits' dtype
    assert_close_rel(x.grad, x64.grad, tol, "dlogits")
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
def test_shape_fuzz(n, V, seed, device):
    check_parity((n,), V, torch.float32, device, seed)


def test_ignored_and_infinite_entries_behave_like_pytorch(device):
    x = torch.randn(4, 70, device=device)
    x[0] = float("-inf")
    x[0, 9] = 2.0           # a one-hot row: loss exactly 0
    x[1, 65] = float("-inf")  # the target's logit is -inf: loss inf
    t = torch.tensor([9, 65, IGNORE, 3], device=device)
    assert torch.equal(cross_entropy(x, t, IGNORE, "none"), F.cross_entropy(x, t, ignore_index=IGNORE, reduction="none"))
    everything_ignored = torch.full((4,), IGNORE, device=device)
    assert torch.isnan(cross_entropy(x, everything_ignored)) and torch.isnan(F.cross_entropy(x, everything_ignored))
    assert cross_entropy(x, everything_ignored, reduction="sum").item() == 0.0


def test_keeps_one_float_per_row_for_backward(device):
    """The reference saves an fp32 log-softmax of the whole [N, V] matrix; ours saves lse [N]."""
    gen = torch.Generator().manual_seed(5)
    x, t = make((24,), 200, torch.bfloat16, device, gen)
    ours, _ = saved_tensor_bytes(lambda: cross_entropy(x, t, IGNORE), exclude=(x, t))
    ref, _ = saved_tensor_bytes(lambda: lm_loss(x.view(24, 1, 200), t.view(24, 1), IGNORE), exclude=(x, t))
    print(f"saved for backward: reference {ref} bytes, triton {ours} bytes")
    assert ours <= 24 * 4 + 64          # lse (fp32 per row), plus the flattened targets' view at most
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
])
def test_bad_input_says_what(call, err, match):
    x, t = torch.randn(6, 40), torch.randint(0, 40, (6,))
    with pytest.raises(err, match=match):
        call(x, t)


def test_model_loss_uses_the_kernel_only_on_its_path(monkeypatch):
    from tritongpt.kernels import cross_entropy as ce
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    calls = []
    real = ce.CrossEntropyFunction.apply
    monkeypatch.setattr(ce.CrossEntropyFunction, "apply", lambda *a: calls.append(1) or real(*a))
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_layer=1, n_head=2))
    idx = torch.randint(0, 50, (2, 8))
    ref = model(idx, targets=idx)
    assert calls == []
    model.set_kernels({"cross_entropy"})
    assert model.config.kernels == "cross_entropy"
    ours = model(idx, targets=idx)
    assert calls == [1]
    assert_close_rel(ours, ref, 1e-5, "model loss")


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
