"""RL's log-probs and entropies through the loss kernel (kernels/cross_entropy.py: temperature, entropy), the
model's GPTModel.token_logprobs on both paths, and the RL update that no longer makes torch's log-softmax on the
Triton path. The RL trainer's first step on both paths against float64: tests/test_rlhf.py."""
import pytest
import torch
import torch.nn.functional as F

from parity import assert_close_mixed, assert_close_rel
from tritongpt.kernels.cross_entropy import cross_entropy, linear_cross_entropy
from tritongpt.model.config import GPTConfig
from tritongpt.errors import UserError
from tritongpt.model.gpt import GPTModel

IGNORE = -100
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def logp_entropy64(x64, t, temperature=1.0, softcap=0.0):
    """The textbook: log_softmax of the (capped, then tempered) logits in float64, -logp of each counted target
    (0 where ignored) and every row's entropy -sum p log p."""
    # a -inf logit as -1e4: p = 0 exactly in float64 and p log p = 0, with a gradient (0) that is not nan
    z = torch.where(x64 == float("-inf"), -1e4, x64)
    z = z if not softcap else softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z / temperature, -1)
    loss = -logp_all.gather(-1, t.clamp_min(0)[:, None])[:, 0] * (t != IGNORE)
    return loss, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("N,V,pad,temperature,softcap,dtype", [
    (37, 203, 0, 1.0, 0.0, torch.float32),    # rows and V not powers of two, crossing tiles
    (37, 203, 21, 0.7, 0.0, torch.float32),   # a padded vocabulary, a temperature
    (19, 130, 5, 1.6, 5.0, torch.float32),    # the soft cap first, then the temperature
    (37, 203, 21, 0.7, 0.0, torch.bfloat16),
])
def test_logp_and_entropy_forward_and_backward_match_float64(N, V, pad, temperature, softcap, dtype, device):
    """The per-row loss (-logp), the entropy of softmax(logits / temperature), and the logits' gradient of
    sum(g1 loss) + sum(g2 entropy) (both in the one backward pass) against float64; ignored targets get their
    entropy, and its gradient, all the same; a -inf logit (a masked token) has p log p = 0, not nan."""
    gen = torch.Generator().manual_seed(N + V + pad)
    x = torch.randn(N, V + pad, generator=gen) * 3.0 + torch.randn(N, 1, generator=gen) * 5.0
    x[3, 7] = x[5, 100] = float("-inf")
    x = x.to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    t[::4] = IGNORE
    t[5] = 101  # a counted target beside the -inf logit
    loss, ent = cross_entropy(x, t.to(device), IGNORE, "none", vocab_size=V, temperature=temperature,
                              entropy=True, softcap=softcap)
    x64 = x.detach().double()[:, :V].cpu().requires_grad_()
    want_loss, want_ent = logp_entropy64(x64, t, temperature, softcap)
    g1, g2 = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    ((loss * g1.to(device, torch.float32)).sum() + (ent * g2.to(device, torch.float32)).sum()).backward()
    ((want_loss * g1).sum() + (want_ent * g2).sum()).backward()
    tol = TOL[dtype]
    eps = torch.finfo(torch.float32).eps
    assert loss.dtype == ent.dtype == torch.float32 and ent.shape == (N,)
    assert want_ent.min() > 0.01 and want_loss.abs().max() > 0.01  # nothing passes on zeros
    assert_close_mixed(loss, want_loss, tol, 4 * eps * N ** 0.5, "loss")
    assert_close_rel(ent, want_ent, tol, "entropy")
    assert_close_rel(ent[::4], want_ent[::4], tol, "ignored rows' entropy")
    assert x.grad.dtype == dtype
    assert (x.grad[:, V:] == 0).all()  # the padding columns
    assert x.grad[3, 7] == 0 and x.grad[5, 100] == 0
    assert_close_mixed(x.grad[:, :V], x64.grad, tol, 4 * eps * (N * V) ** 0.5, "dlogits")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("fastest", [None, {"fwd": 3, "bwd": 2}], ids=["launch", "gpu-per-row"])
def test_a_row_of_only_masked_logits_has_entropy_0_on_both_paths(monkeypatch, fastest, device):
    """A row whose every logit is -inf (every token masked) has entropy 0 on both paths, not 0 / 0 = nan (a nan
    entropy made RL's masked mean nan, the mask's 0 times nan): the loss kernel's (its per-lane running sums and,
    driven on the CPU, the GPU's per-row ones), with no nan in its gradient either, and the reference's (rlhf's
    logprobs_and_entropy, GPTModel.token_logprobs' entropy_of), whose -inf logit in a row of finite ones adds 0
    too (0 * -inf was nan there)."""
    from test_cross_entropy import _stand_in_gpu

    from tritongpt.train.rlhf import logprobs_and_entropy

    if fastest is not None:
        if device.type == "cuda":
            pytest.skip("the GPU launch path stood in for on the CPU (a GPU runs its own in the other case)")
        _stand_in_gpu(monkeypatch, fastest)
    gen = torch.Generator().manual_seed(11)
    N, V, T = 6, 70, 0.8
    x = torch.randn(N, V, generator=gen) * 3
    x[2] = float("-inf")
    x[4, 9] = float("-inf")
    t = torch.randint(0, V, (N,), generator=gen)
    t[2] = IGNORE
    want_loss, want_ent = logp_entropy64(x.double(), t, T)
    rows = [0, 1, 3, 4, 5]
    assert want_ent[rows].min() > 0.1  # nothing passes on zeros
    xk = x.clone().to(device).requires_grad_()
    loss, ent = cross_entropy(xk, t.to(device), IGNORE, "none", temperature=T, entropy=True)
    (loss.sum() + ent.sum()).backward()
    assert ent[2] == 0 and loss[2] == 0
    assert_close_rel(ent[rows], want_ent[rows], 1e-4, "entropy")
    assert xk.grad.isfinite().all() and (xk.grad[2] == 0).all() and xk.grad[4, 9] == 0
    # the reference: rows t of a [1, N + 1, V] text's logits give the entropy of position t
    xr = torch.cat([x, torch.zeros(1, V)])[None].requires_grad_()
    _, ent_ref = logprobs_and_entropy(xr, torch.zeros(1, N + 1, dtype=torch.long), True, T)
    ent_ref.sum().backward()
    assert ent_ref[0, 2] == 0
    assert_close_rel(ent_ref[0, rows], want_ent[rows], 1e-4, "reference entropy")
    assert xr.grad[0, rows].isfinite().all() and xr.grad[0, 4, 9] == 0


def test_entropy_without_a_gradient_costs_the_loss_nothing(monkeypatch, device):
    """An entropy nobody differentiates (RL without an entropy bonus) leaves backward as the loss's alone: the
    kernel compiles without the entropy's term (HAS_ENT off) and the gradient is the plain cross-entropy's."""
    import tritongpt.kernels.cross_entropy as ce

    flags = []
    kernel = ce._ce_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                flags.append(kw["HAS_ENT"])
                return kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(ce, "_ce_bwd_kernel", Spy())
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 70, generator=gen) * 3).to(device).requires_grad_()
    t = torch.randint(0, 70, (9,), generator=gen).to(device)
    loss, ent = cross_entropy(x, t, reduction="sum", temperature=0.8, entropy=True)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64 / 0.8, t, reduction="sum").backward()
    assert_close_rel(x.grad, x64.grad, 1e-5, "dlogits")
    assert flags == [False]
    x.grad = None
    cross_entropy(x, t, temperature=0.8, entropy=True)[1].sum().backward()  # the entropy's gradient alone
    assert flags == [False, True] and x.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_per_row_logp_and_entropy_across_chunks_match_float64(dtype, device):
    """linear_cross_entropy with reduction "none" and the entropy: the head's logits a chunk at a time (three
    chunks, a ragged last one), a padded vocabulary and a bias, at a temperature; every gradient (hidden,
    weight, bias) against float64, made in backward from the per-row upstream gradients."""
    gen = torch.Generator().manual_seed(7)
    N, C, V, W = 45, 16, 60, 70
    h = torch.randn(N, C, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(W, C, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(W, generator=gen).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    t[::7] = IGNORE
    loss, ent = linear_cross_entropy(h, w, t.to(device), reduction="none", chunk_rows=16, vocab_size=V, bias=b,
                                     temperature=0.7, entropy=True)
    h64, w64, b64 = (a.detach().double().cpu().requires_grad_() for a in (h, w, b))
    want_loss, want_ent = logp_entropy64((h64 @ w64.t() + b64)[:, :V], t, 0.7)
    g1, g2 = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    ((loss * g1.to(device, torch.float32)).sum() + (ent * g2.to(device, torch.float32)).sum()).backward()
    ((want_loss * g1).sum() + (want_ent * g2).sum()).backward()
    tol = TOL[dtype]
    assert_close_mixed(loss, want_loss, tol, 1e-6, "loss")
    assert_close_rel(ent, want_ent, tol, "entropy")
    for name, got, want in (("hidden", h, h64), ("weight", w, w64), ("bias", b, b64)):
        assert got.grad.dtype == dtype
        assert_close_rel(got.grad, want.grad, tol, f"d{name}")
    assert (w.grad[V:] == 0).all() and (b.grad[V:] == 0).all()


@pytest.mark.parametrize("scale,temperature,dtype", [(100.0, 0.05, torch.float32), (100.0, 1.0, torch.float32),
                                                     (100.0, 20.0, torch.float32), (100.0, 1.0, torch.bfloat16)])
def test_extreme_logits_entropy_has_no_cancellation(scale, temperature, dtype, device):
    """Logits scaled x100 (|z| up to ~2e4 at T 0.05), at temperatures 0.05, 1 and 20, fp32 and bf16 inputs: each
    row's entropy within 8 fp32 epsilons of (1 + H), -logp within 8 of (1 + -logp), and the entropy's gradient
    within 8 of its row's largest, against float64 of the tempered logits the kernel reads (z = x * fl32(1 / T):
    rounding x / T to fp32 moves z by up to |z| eps ~ 1e-3, every fp32 implementation's error, which would hide the
    formula's). The kernel's H = log S - t / S sums exp(z - m) (z - m) relative to the running max; the textbook
    lse - sum_j p_j z_j cancels two numbers of the size of z and is off by ~|z| eps."""
    gen = torch.Generator().manual_seed(int(scale + 100 * temperature))
    N, V = 24, 300
    x = torch.randn(N, V, generator=gen) * 3 * scale
    # every other row's runner-up within ~2 T of its top logit: entropies well above 0 even at T 0.05
    top = x.argmax(-1)[::2]
    x[::2, (top + 1) % V] = x[::2].amax(-1) - 2 * temperature * torch.rand(N // 2, generator=gen)
    x = x.to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    g = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    loss, ent = cross_entropy(x, t.to(device), reduction="none", temperature=temperature, entropy=True)
    (ent * g.to(device, torch.float32)).sum().backward()
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    z64 = (x.detach().float().cpu() * inv_t).double().requires_grad_()  # z rounded to fp32, as the kernel's
    want_loss, want_ent = logp_entropy64(z64, t)
    (want_ent * g).sum().backward()
    want_grad = z64.grad * inv_t.double()
    eps = torch.finfo(torch.float32).eps
    assert want_ent.max() > 0.1 and want_loss.max() > 1.0  # not every row one-hot: nothing passes on zeros
    for name, got, want in (("entropy", ent, want_ent), ("-logp", loss, want_loss)):
        err = (got.detach().double().cpu() - want).abs()
        assert (err <= 8 * eps * (1 + want.abs())).all(), (name, (err / (eps * (1 + want.abs()))).max().item())
    # dH/dz_j = -p_j (log p_j + H): in any fp32 arithmetic log p_j + H is off by ~eps (|log p_j| + H), which an
    # exact tie's 0 shows (H = log 2 and log p = -log 2, each rounded): 8 times that, plus 8 eps of the largest
    logp = torch.log_softmax(z64.detach(), -1)
    scale = (g * inv_t.double())[:, None] * logp.exp() * (logp.abs() + want_ent.detach()[:, None] + 1)
    err = (x.grad.double().cpu() - want_grad).abs()
    rounding = 0.0 if dtype == torch.float32 else 2.0 ** -8 * want_grad.abs()  # written in the logits' dtype
    bound = 8 * eps * (scale + want_grad.abs().max()) + rounding
    assert (err <= bound).all(), (err / bound).max().item()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("fastest", [{"fwd": 0, "bwd": 0}, {"fwd": 3, "bwd": 2}, {"fwd": 4, "bwd": 3}],
                         ids=["per-lane", "per-row", "narrow-tiles"])
def test_gpu_launch_path_logp_and_entropy_each_autotuned_shape(monkeypatch, fastest):
    """The GPU branch of the launchers (one row a program, the autotuned tile widths, and the per-row running max
    and sums, LANE_MAX False, which the interpreter's own launch never takes) with a temperature and the entropy:
    -logp, the entropy and the gradient of both against float64, on rows of 5000 logits crossing one to three
    tiles, the first tiles of one all -inf (the entropy's running sum moved from a max still -inf), one with a
    single finite logit (entropy 0, no nan), an ignored target (its entropy and gradient all the same), and padding
    columns holding 1e4 and nan (absent)."""
    from test_cross_entropy import _stand_in_gpu

    _stand_in_gpu(monkeypatch, fastest)
    V, pad, T = 5000, 23, 0.6
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(5, V + pad, generator=gen) * 3 + torch.randn(5, 1, generator=gen) * 5
    x[:, V:] = 1e4
    x[::2, V + 1] = float("nan")
    x[0, :4100] = float("-inf")  # every tile of 2048 or 4096 columns before the target's, the 8192 one in part
    x[1, :V] = float("-inf")
    x[1, 4321] = 1.0
    t = torch.tensor([4500, 4321, IGNORE, 7, 11])
    x.requires_grad_()
    loss, ent = cross_entropy(x, t, IGNORE, "none", vocab_size=V, temperature=T, entropy=True)
    x64 = x.detach()[:, :V].double().requires_grad_()
    want_loss, want_ent = logp_entropy64(x64, t, T)
    g1, g2 = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    ((loss * g1.float()).sum() + (ent * g2.float()).sum()).backward()
    ((want_loss * g1).sum() + (want_ent * g2).sum()).backward()
    assert loss[1] == 0 and ent[1] == 0 and want_ent[[0, 2, 3, 4]].min() > 0.1
    assert_close_mixed(loss, want_loss, 1e-5, 1e-6, "-logp")
    assert_close_mixed(ent, want_ent, 1e-5, 1e-6, "entropy")
    assert (x.grad[:, V:] == 0).all() and (x.grad[0, :4100] == 0).all()
    assert_close_mixed(x.grad[:, :V], x64.grad, 1e-4, 1e-6, "dlogits")


def _model(kernels, dtype=torch.float32, **kw):
    torch.manual_seed(5)
    cfg = GPTConfig(vocab_size=37, context_length=16, n_embd=32, n_layer=1, n_head=2, vocab_multiple=8, **kw)
    return GPTModel(cfg).to(dtype).set_kernels(kernels)


@pytest.mark.parametrize("softcap", [0.0, 6.0])
def test_model_token_logprobs_on_both_paths_match_float64(softcap):
    """GPTModel.token_logprobs (log-probs and entropies at a temperature) and the parameters' gradients of
    sum(g1 logp) + sum(g2 entropy): the reference path (log_softmax) and the Triton path (the fused head + loss
    kernel) in fp32 against the reference path in float64; a soft-capped head (Gemma 2's) too."""
    idx = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    g1, g2 = (torch.rand(3, 10, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (2, 3))
    out = {}
    for kernels, dtype in (("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32)):
        model = _model(kernels, dtype, logit_softcap=softcap)
        logp, ent = model.token_logprobs(idx, temperature=0.7, entropy=True)
        assert logp.dtype == ent.dtype == torch.float32 if dtype == torch.float32 else True
        ((logp * g1.to(dtype)).sum() + (ent * g2.to(dtype)).sum()).backward()
        out[kernels, dtype] = logp, ent, {n: p.grad for n, p in model.named_parameters()}
    want_logp, want_ent, want_grads = out["reference", torch.float64]
    assert want_ent.min() > 0.1 and want_logp.max() < -0.1
    for key in (("reference", torch.float32), ("triton", torch.float32)):
        logp, ent, grads = out[key]
        assert_close_rel(logp, want_logp, 1e-5, f"{key[0]} logp")
        assert_close_rel(ent, want_ent, 1e-5, f"{key[0]} entropy")
        for name, g in grads.items():
            if want_grads[name].abs().max() < 1e-6:  # W_key's bias: 0 in exact arithmetic
                continue
            assert_close_rel(g, want_grads[name], 1e-4, f"{key[0]} {name}.grad")
    assert _model("reference").token_logprobs(idx)[1] is None


def test_model_token_logprobs_without_the_entropy_or_its_gradient():
    """Without entropy=True: (logp, None); entropy_grad=False: an entropy with no graph on either path."""
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(4))
    for kernels in ("reference", "triton"):
        model = _model(kernels)
        logp, ent = model.token_logprobs(idx)
        assert ent is None and logp.shape == (2, 8) and logp.requires_grad
        logp2, ent = model.token_logprobs(idx, entropy=True, entropy_grad=False)
        assert not ent.requires_grad and ent.shape == (2, 8) and ent.min() > 0
        assert_close_rel(logp2, logp, 1e-6, f"{kernels} logp")


@pytest.mark.parametrize("temperature,entropy_grad", [(1.0, False), (0.7, True)])
def test_reference_path_update_is_the_old_logits_math_bit_for_bit(temperature, entropy_grad):
    """On the reference path the update's PolicyWithValue.logprobs (GPTModel.token_logprobs on the trunk the value
    head reads) is what rlhf's logprobs_and_entropy of PolicyWithValue's (logits, values) computed before, op for op:
    log-probs, entropies, values and every parameter's gradient equal bit for bit, at temperature 1 with the entropy
    only logged (ent_coef 0: no graph) and at a temperature with an entropy bonus. A reference-path run, and one
    resumed from before the change, sees the same numbers."""
    from tritongpt.train.rlhf import PolicyWithValue, logprobs_and_entropy

    model = PolicyWithValue(_model("reference"))
    torch.nn.init.normal_(model.value_head.weight)  # (zero at init: no gradient through it to compare)
    idx = torch.randint(0, 37, (3, 10), generator=torch.Generator().manual_seed(8))
    out = []
    for new in (False, True):
        model.zero_grad(set_to_none=True)
        if new:
            logp, ent, values = model.logprobs(idx, temperature, entropy=True, entropy_grad=entropy_grad)
        else:
            logits, values = model(idx)
            logp, ent = logprobs_and_entropy(logits, idx, entropy_grad, temperature)
        assert ent.requires_grad == entropy_grad
        loss = (logp * torch.linspace(-1, 1, 9)).sum() + values.square().sum() + (ent.sum() if entropy_grad else 0)
        loss.backward()
        out.append((logp, ent, values, {n: p.grad for n, p in model.named_parameters()}))
    (logp, ent, values, grads), (logp2, ent2, values2, grads2) = out
    assert torch.equal(logp, logp2) and torch.equal(ent, ent2) and torch.equal(values, values2)
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert grads["value_head.weight"].abs().max() > 0 and logp.max() < 0 and ent.min() > 0


def test_token_logprobs_compiles_fullgraph_on_the_triton_path():
    """torch.compile(fullgraph=True) of GPTModel.token_logprobs on the Triton path, at a temperature with the
    entropy differentiated (the fused head + loss's custom ops through their fake impls, the fourth output included,
    and its autograd Function's deferred backward): no graph break, and the log-probs, the entropies and every
    parameter's gradient eager's."""
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(6))
    model = _model("triton")

    def fn(idx):
        logp, ent = model.token_logprobs(idx, temperature=0.7, entropy=True)
        return logp, ent, logp.sum() + 0.3 * ent.sum()

    got = {}
    for name, f in (("compiled", torch.compile(fn, backend="aot_eager", fullgraph=True)), ("eager", fn)):
        model.zero_grad(set_to_none=True)
        logp, ent, loss = f(idx)
        loss.backward()
        got[name] = logp.detach(), ent.detach(), {n: p.grad for n, p in model.named_parameters()}
    (logp, ent, grads), (want_logp, want_ent, want_grads) = got["compiled"], got["eager"]
    assert_close_rel(logp, want_logp, 1e-6, "compiled logp")
    assert_close_rel(ent, want_ent, 1e-6, "compiled entropy")
    assert max(g.abs().max() for g in want_grads.values() if g is not None) > 0
    for n, g in want_grads.items():
        assert (grads[n] is None) == (g is None), n
        if g is not None:
            assert torch.allclose(grads[n], g, rtol=1e-5, atol=1e-7), n


def test_an_rl_update_on_the_triton_path_makes_no_log_softmax(tmp_path, monkeypatch):
    """The rollout's old and reference log-probs and the update's log-probs and entropy (GRPO with an entropy
    bonus at a temperature) on the Triton path go through the loss kernel: its forward launched at the sampling
    temperature, without the entropy for the scoring (the policy's and the reference's) and with it for the update,
    and torch's log_softmax, whose [B, T-1, V] fp32 output was the update's largest tensor, is never called over
    the vocabulary, nor softmax or F.cross_entropy (a log-softmax of their own). (The reference path's calls are
    counted by the same spy: old, reference, the update's; it launches no loss kernel.)"""
    import tritongpt.kernels.cross_entropy as ce
    from test_rlhf import _tiny_rl_trainer
    from tritongpt.train.rlhf import score_rollout

    calls, launches = [], []
    spied = [(torch, "log_softmax"), (torch.Tensor, "log_softmax"), (F, "log_softmax"), (torch, "softmax"),
             (torch.Tensor, "softmax"), (F, "softmax"), (F, "cross_entropy")]
    real = [getattr(owner, name) for owner, name in spied]
    fwd_launch = ce._fwd_launch

    def spy(fn):
        def counted(*args, **kw):
            calls.append((fn.__name__, tuple(args[0].shape)))
            return fn(*args, **kw)
        return counted

    def launched(logits, targets, ignore_index, n_classes, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
                 temperature=1.0, entropy=False):
        launches.append((temperature, entropy))
        return fwd_launch(logits, targets, ignore_index, n_classes, label_smoothing, z_loss, softcap, temperature,
                          entropy)
    ro = None
    for kernels in ("reference", "cross_entropy"):
        t = _tiny_rl_trainer(tmp_path / kernels, algo="grpo", kernels=kernels, prompts_per_iter=2, group_size=2,
                             ent_coef=0.05, temperature=0.7)
        ro = t.rollout() if ro is None else ro  # one rollout (the sampling is not what is counted)
        calls.clear()
        launches.clear()
        for (owner, name), fn in zip(spied, real):
            monkeypatch.setattr(owner, name, spy(fn))
        monkeypatch.setattr(ce, "_fwd_launch", launched)
        score_rollout(ro, t.model, t.ref, t.reward_model, temperature=0.7)
        scored = list(launches)
        t.update(ro)
        monkeypatch.undo()
        assert t.policy.kernels == ({"cross_entropy"} if kernels == "cross_entropy" else set())
        assert t.update_log and t.update_log[-1]["entropy"] > 0
        # over the vocabulary (the reference attention's softmax over keys is not one)
        over_vocab = [(name, shape) for name, shape in calls if shape[-1] >= t.policy.config.vocab_size]
        if kernels == "reference":
            assert sum(name == "log_softmax" for name, _ in over_vocab) >= 3, calls
            assert launches == [], launches
        else:
            assert over_vocab == [], over_vocab
            chunks = -(-len(ro) // 32)  # score_rollout's chunks, each scored by the policy and the reference
            assert scored == [(0.7, False)] * 2 * chunks, scored
            assert launches[len(scored):] and set(launches[len(scored):]) == {(0.7, True)}, launches


def _bwd_with_grad_entropy_alone(x, t):
    loss, row_max, log_sum, _ = torch.ops.tritongpt.cross_entropy_fwd(x, t, IGNORE, 40)
    torch.ops.tritongpt.cross_entropy_bwd(torch.ones(6), x, t, row_max, log_sum, IGNORE, 40, 0.0, 0.0, 0.0, 1.0,
                                          torch.ones(6), None)


@pytest.mark.parametrize("call,err,match", [
    (lambda x, t: cross_entropy(x, t, temperature=0), ValueError, "temperature must be a finite number > 0, got 0"),
    (lambda x, t: cross_entropy(x, t, temperature=-0.5), ValueError, "temperature must be .* > 0, got -0.5"),
    (lambda x, t: cross_entropy(x, t, temperature=float("nan")), ValueError, "temperature must be .* > 0, got nan"),
    (lambda x, t: cross_entropy(x, t, temperature=float("inf")), ValueError, "temperature must be .* > 0, got inf"),
    (lambda x, t: cross_entropy(x, t, temperature="1"), ValueError, "temperature must be .* > 0, got '1'"),
    (lambda x, t: cross_entropy(x, t, entropy=1), TypeError, "entropy must be a bool, got int"),
    (lambda x, t: cross_entropy(x, t, entropy=True, label_smoothing=0.1), ValueError,
     r"with a temperature or the entropy takes no label_smoothing or z_loss \(got temperature 1.0, entropy True"),
    (lambda x, t: cross_entropy(x, t, temperature=2.0, z_loss=1e-4), ValueError, "takes no label_smoothing or z_loss"),
    (lambda x, t: linear_cross_entropy(x[:, :8], torch.randn(40, 8), t, reduction="none", temperature=0.0),
     ValueError, "temperature must be a finite number > 0, got 0.0"),
    (lambda x, t: linear_cross_entropy(x[:, :8], torch.randn(40, 8), t, entropy=True, z_loss=1e-4), ValueError,
     "takes no label_smoothing or z_loss"),
    (lambda x, t: torch.ops.tritongpt.cross_entropy_fwd(x, t, IGNORE, 40, 0.0, 0.0, 0.0, -1.0), ValueError,
     "temperature must be a finite number > 0, got -1.0"),
    (lambda x, t: torch.ops.tritongpt.cross_entropy_fwd(x, t, IGNORE, 40, 0.1, 0.0, 0.0, 1.0, True), ValueError,
     "takes no label_smoothing or z_loss"),
    (_bwd_with_grad_entropy_alone, ValueError, "takes grad_entropy and the forward's entropy together"),
    (lambda x, t: _model("reference").token_logprobs(t.view(2, 3) % 37, temperature=0.0), ValueError,
     "temperature must be a finite number > 0, got 0.0"),
    (lambda x, t: _model("triton").token_logprobs(t.view(2, 3) % 37, temperature=-2), ValueError,
     "temperature must be a finite number > 0, got -2"),
    # both paths refuse what the kernel refuses (the reference path read entropy=1 as True), and a hidden that is
    # not hidden(idx) by name (the Triton path blamed the targets' shape, the reference path's gather its index)
    *[(lambda x, t, k=k: _model(k).token_logprobs(t.view(2, 3) % 37, entropy=1), TypeError,
       "token_logprobs: entropy must be a bool, got int") for k in ("reference", "triton")],
    (lambda x, t: _model("reference").token_logprobs(t.view(2, 3) % 37, entropy_grad=None), TypeError,
     "token_logprobs: entropy_grad must be a bool, got NoneType"),
    *[(lambda x, t, k=k: _model(k).token_logprobs(t.view(2, 3) % 37, hidden=torch.zeros(2, 4, 32)), UserError,
       r"token_logprobs: hidden must be hidden\(idx\), \[2, 3, 32\], got \(2, 4, 32\)")
      for k in ("reference", "triton")],
    # a hidden of another width, and with a caller's hidden the ids hidden() would have checked (the reference
    # path failed in the head's matmul or the gather, the Triton path in its kernel's checks of the targets)
    *[(lambda x, t, k=k: _model(k).token_logprobs(t.view(2, 3) % 37, hidden=torch.zeros(2, 3, 16)), UserError,
       r"token_logprobs: hidden must be hidden\(idx\), \[2, 3, 32\], got \(2, 3, 16\)")
      for k in ("reference", "triton")],
    *[(lambda x, t, k=k, ids=ids: _model(k).token_logprobs(ids, hidden=torch.zeros(*ids.shape, 32)), UserError,
       said) for k in ("reference", "triton") for ids, said in (
          (torch.ones(2, 3), "idx must hold integer token ids, got dtype torch.float32"),
          (torch.full((2, 3), 37), r"token id 37 is outside the model's vocabulary \[0, 37\)"),
          (torch.ones(3, dtype=torch.long), r"idx must be \[batch, time\] token ids, got shape \(3,\)"))],
    (lambda x, t: _model("triton").token_logprobs([[1, 2]], hidden=torch.zeros(1, 2, 32)), UserError,
     "idx must be a .batch, time. tensor of token ids, got list"),
])
def test_bad_rl_options_say_what(call, err, match):
    x, t = torch.randn(6, 40), torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(err, match=match):
        call(x, t)
