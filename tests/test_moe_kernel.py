"""The grouped-GEMM mixture-of-experts kernel (kernels/moe.py) against a float64 loop over experts:
y and every gradient, an idle expert, one expert with every token, GeGLU, GPT-OSS's experts (biases and the
clamped SwiGLU), frozen weights, the refusals.
The module through both paths is tests/test_moe.py's; the ops' opcheck is tests/test_custom_ops.py's.

Sizes are odd on purpose (37 tokens, 5 experts, C 72, H 40): under the interpreter the tiles are 32
wide, so experts' rows end mid-tile, tiles cross from one expert's rows into the next's, every
product takes a partial second K step, and a weight gradient's grid is 3 x 2 tiles, not square (a
square one hides its tile index's row and column swapped).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from parity import assert_close_rel
from tritongpt.kernels.moe import ID_DTYPES, moe_mlp

N, E, K, C, H = 37, 5, 2, 72, 40
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ACTS = {"silu": lambda g: g * torch.sigmoid(g),
        "gelu": lambda g: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))}


def ref_moe(x, experts, wg, wu, wd, activation="silu", bg=None, bu=None, bd=None, limit=7.0, alpha=1.702):
    """y [N, k, C] written out expert by expert (run on float64 leaves); with biases and activation "gpt_oss" as
    MoEFeedForward._expert (transformers' GptOssExperts), whose autograd gives the clamp's gradient."""
    y = x.new_zeros(*experts.shape, wd.shape[1])
    for e in range(wg.shape[0]):
        token, slot = torch.where(experts == e)
        xe = x[token]
        g, u = xe @ wg[e].t(), xe @ wu[e].t()
        if bg is not None:
            g, u = g + bg[e], u + bu[e]
        if activation == "gpt_oss":
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
            a = (u + 1) * (g * torch.sigmoid(alpha * g))
        else:
            a = ACTS[activation](g) * u
        ye = a @ wd[e].t()
        y = y.index_put((token, slot), ye + bd[e] if bd is not None else ye)
    return y


def make(dtype, device, gen, idle=(E - 1,), everyone=None, up_view=False):
    """Fresh inputs; each token's k distinct experts drawn among those not idle; `everyone` takes slot 0
    of every token (its rows span two tiles and a part of a third). up_view: w_up a transposed view,
    strides unlike w_gate's (the launchers make the pair contiguous: the kernel has one set of strides)."""
    x = torch.randn(N, C, generator=gen)
    wg = torch.randn(E, H, C, generator=gen) * (1.5 / math.sqrt(C))  # g spans silu's curved region
    wu = torch.randn(E, H, C, generator=gen) / math.sqrt(C)
    wd = torch.randn(E, C, H, generator=gen) / math.sqrt(H)
    busy = torch.tensor([e for e in range(E) if e not in idle and e != everyone])
    experts = torch.stack([busy[torch.randperm(len(busy), generator=gen)[:K]] for _ in range(N)])
    if everyone is not None:
        experts[:, 0] = everyone
    params = [t.to(device, dtype) for t in (x, wg, wu, wd)]
    if up_view:
        params[2] = params[2].transpose(1, 2).contiguous().transpose(1, 2)
    return [p.requires_grad_() for p in params], experts.to(device)


def check_parity(dtype, device, seed, activation="silu", frozen=(), **routing):
    """Kernel vs float64: y and the gradients autograd asks for; the idle experts' are exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    params, experts = make(dtype, device, gen, **routing)
    for i in frozen:
        params[i].requires_grad_(False)
    y = moe_mlp(params[0], experts, *params[1:], activation=activation)
    assert y.dtype == dtype and y.shape == (N, K, C)
    dy = torch.randn(y.shape, generator=gen).to(device, dtype)
    y.backward(dy)
    leaves = [p.detach().double().requires_grad_() for p in params]
    y_ref = ref_moe(leaves[0], experts, *leaves[1:], activation=activation)
    y_ref.backward(dy.double())
    assert_close_rel(y, y_ref, TOL[dtype], f"{dtype} {activation} y")
    for i, name in enumerate(("dx", "dw_gate", "dw_up", "dw_down")):
        if i in frozen:
            assert params[i].grad is None, name
            continue
        assert params[i].grad.dtype == dtype, name
        assert_close_rel(params[i].grad, leaves[i].grad, TOL[dtype], f"{dtype} {activation} {name}")
        if i:
            for e in routing.get("idle", (E - 1,)):
                assert torch.equal(params[i].grad[e], torch.zeros_like(params[i].grad[e])), f"{name} idle {e}"
    return params, experts, dy


@pytest.mark.parametrize("dtype,activation", [(torch.float32, "silu"), (torch.bfloat16, "silu"),
                                              (torch.float16, "silu"), (torch.float32, "gelu")])
def test_forward_and_every_gradient_match_float64(dtype, activation, device):
    params, experts, dy = check_parity(dtype, device, seed=1, activation=activation)
    if dtype == torch.float32 and activation == "silu":  # dx's k rows are summed in a fixed order: no atomics
        grads = [p.grad for p in params]
        again = [p.detach().requires_grad_() for p in params]
        moe_mlp(again[0], experts, *again[1:]).backward(dy)
        assert all(torch.equal(a.grad, g) for a, g in zip(again, grads))


def test_one_expert_takes_every_token_and_two_are_idle(device):
    """w_up is a transposed view here too (strides unlike w_gate's, with which it shares a launch)."""
    params, _, _ = check_parity(torch.float32, device, seed=2, idle=(1, 3), everyone=2, up_view=True)
    assert params[2].stride() != params[1].stride()


@pytest.mark.parametrize("frozen", [(1,), (0, 2), (0, 1, 3), (0, 1, 2)],
                         ids=["w_gate frozen", "x and w_up frozen", "only w_up trains", "only w_down trains"])
def test_frozen_inputs_get_no_gradient_and_the_rest_stay_right(frozen, device):
    check_parity(torch.float32, device, seed=3, frozen=frozen)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_dw_down_from_the_stored_activation_or_recomputed(activation, device, monkeypatch):
    """The dg/du epilogue stores a = act(g) * u beside dg and du (STORE_ACT) for dW_down's plain per-expert
    product: forward's a, rounded (bit for bit under the interpreter), close to float64's, dg and du
    unchanged. dW_down recomputes a on its tiles only when no dg/du launch is made (x, w_gate and w_up
    frozen), and both paths give the same bf16 dW_down (bit for bit under the interpreter)."""
    from tritongpt.kernels import moe
    from tritongpt.kernels.mlp import EPI_SWIGLU, EPI_SWIGLU_GRAD

    gen = torch.Generator().manual_seed(49)
    params, experts = make(torch.bfloat16, device, gen)
    x, wg, wu, wd = (p.detach() for p in params)
    dy = torch.randn(N, K, C, generator=gen).to(device, torch.bfloat16)
    with torch.no_grad():
        order, offsets = moe._route(experts, E)
        a_fwd, (g, u) = moe._grouped(x, wg.transpose(1, 2), N * K, order, offsets, a_div=K, epilogue=EPI_SWIGLU,
                                     b2=wu.transpose(1, 2), gate=activation)
        grad = dict(a_div=1, epilogue=EPI_SWIGLU_GRAD, aux=g, aux2=u, gate=activation)
        dg, (du, a) = moe._grouped(dy.view(N * K, C), wd, N * K, order, offsets, store_act=True, **grad)
        dg_alone, du_alone = moe._grouped(dy.view(N * K, C), wd, N * K, order, offsets, **grad)
    assert torch.equal(dg, dg_alone) and torch.equal(du, du_alone)
    differ = (a != a_fwd).float().mean().item()
    assert differ == 0 if device.type == "cpu" else differ <= 0.01, differ
    want = ACTS[activation](g.double()) * u.double()
    assert ((a.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()  # one bf16 rounding of a
    recomputes = []
    expert_grad = moe._expert_grad
    monkeypatch.setattr(moe, "_expert_grad", lambda *a, **k: recomputes.append("rhs2" in k) or expert_grad(*a, **k))
    with torch.no_grad():
        stored = moe._bwd_launch(dy, x, g, u, order, offsets, wg, wu, wd, (True,) * 4, activation)[3]
        assert recomputes == [False, False]  # dW_down's, then dW_gate's and dW_up's
        recomputed = moe._bwd_launch(dy, x, g, u, order, offsets, wg, wu, wd, (False,) * 3 + (True,), activation)[3]
        assert recomputes[2:] == [True]
    if device.type == "cpu":
        assert torch.equal(stored, recomputed)
    else:
        assert_close_rel(stored, recomputed, 1e-2, "dw_down stored vs recomputed")


def test_the_combine_outside_gives_the_router_weights_their_gradient(device):
    """out = sum_k w y: the weights' gradient is sum_c dout y, which needs y unweighted per slot."""
    gen = torch.Generator().manual_seed(4)
    params, experts = make(torch.float32, device, gen)
    w = torch.rand(N, K, generator=gen).to(device).requires_grad_()
    dout = torch.randn(N, C, generator=gen).to(device)
    ((moe_mlp(params[0], experts, *params[1:]) * w[..., None]).sum(1) * dout).sum().backward()
    leaves = [p.detach().double() for p in params]
    w_ref = w.detach().double().requires_grad_()
    ((ref_moe(leaves[0], experts, *leaves[1:]) * w_ref[..., None]).sum(1) * dout.double()).sum().backward()
    assert_close_rel(w.grad, w_ref.grad, 1e-4, "routing weights' grad")


def test_no_tokens_gives_empty_output_and_zero_weight_gradients(device):
    gen = torch.Generator().manual_seed(5)
    params, _ = make(torch.float32, device, gen)
    x = params[0][:0].detach().requires_grad_()
    y = moe_mlp(x, torch.zeros(0, K, dtype=torch.long, device=device), *params[1:])
    assert y.shape == (0, K, C)
    y.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params[1:])


# GPT-OSS's experts. The pre-activations are multiples of 1/32 under 8 in magnitude (x in +-{1/2, 1}, the gate and
# up weights multiples of 1/16, their biases of 1/32): exact in bf16 and in any fp32 summation order, so the
# kernel's rounded g and u and float64's are the same numbers, and the clamp decides alike on both (a real-valued g
# within a bf16 rounding of the limit would flip there, one element's dg off by O(1)). The limit is on that grid,
# so some g and u land on it exactly: the clamp's gradient there (0, torch.clamp's) is checked too.
LIMIT = 1.0


def make_gpt_oss(dtype, device, gen, idle=(E - 1,)):
    """-> ([x, w_gate, w_up, w_down, b_gate, b_up, b_down] leaves, experts [N, K]); expert `idle` gets no token."""
    sign = torch.randint(0, 2, (N, C), generator=gen) * 2 - 1
    x = sign * torch.randint(1, 3, (N, C), generator=gen) / 2
    wg, wu = (torch.randint(-3, 4, (E, H, C), generator=gen) / 16 for _ in range(2))
    bg, bu = (torch.randint(-16, 17, (E, H), generator=gen) / 32 for _ in range(2))
    wd = torch.randn(E, C, H, generator=gen) / math.sqrt(H)
    bd = torch.randn(E, C, generator=gen) * 0.5
    busy = torch.tensor([e for e in range(E) if e not in idle])
    experts = torch.stack([busy[torch.randperm(len(busy), generator=gen)[:K]] for _ in range(N)])
    params = [t.to(device, dtype).requires_grad_() for t in (x, wg, wu, wd, bg, bu, bd)]
    return params, experts.to(device)


GPT_OSS_NAMES = ("dx", "dw_gate", "dw_up", "dw_down", "db_gate", "db_up", "db_down")


@pytest.mark.parametrize("dtype,frozen", [(torch.float32, ()), (torch.bfloat16, ()), (torch.float32, (0, 1, 2, 4, 5)),
                                          (torch.float32, (3, 4))],
                         ids=["fp32", "bf16", "only the down product trains", "w_down and b_gate frozen"])
def test_gpt_oss_experts_match_float64_where_the_clamp_bites(dtype, frozen, device):
    """Biases and the clamped SwiGLU: y and every gradient asked for against float64's autograd, fp32 within 1e-4,
    bf16 within 1e-2; the gate above the limit, the up past it both ways, and on it exactly (gradient 0), all in
    the routed rows; 37 tokens (odd), top 2 of 5 experts, one idle (its weights' and biases' gradients exact
    zeros). Frozen: only w_down and b_down train (a recomputed on dW_down's tiles, CLAMP there), or b_up's
    gradient made without b_gate's."""
    gen = torch.Generator().manual_seed(61)
    params, experts = make_gpt_oss(dtype, device, gen)
    for i in frozen:
        params[i].requires_grad_(False)
    leaves = [p.detach().double().requires_grad_() for p in params]
    x, wg, wu, _, bg, bu, _ = leaves
    rows, tok = experts.reshape(-1).cpu(), torch.arange(N).repeat_interleave(K)
    g = torch.einsum("nc,nhc->nh", x[tok], wg[rows]) + bg[rows]  # the routed rows' pre-activations
    u = torch.einsum("nc,nhc->nh", x[tok], wu[rows]) + bu[rows]
    assert g.abs().max() < 8 and u.abs().max() < 8  # on the 1/32 grid, exact in bf16
    for what, hits in (("g above", g > LIMIT), ("g on", g == LIMIT), ("u above", u > LIMIT), ("u on", u == LIMIT),
                       ("u below", u < -LIMIT), ("u on -", u == -LIMIT), ("g inside", g < LIMIT)):
        assert hits.sum() >= 3, what  # the clamp bites, forward and backward, and ties the limit
    y = moe_mlp(params[0], experts, *params[1:4], "gpt_oss", b_gate=params[4], b_up=params[5], b_down=params[6],
                limit=LIMIT)
    assert y.dtype == dtype and y.shape == (N, K, C)
    dy = torch.randn(y.shape, generator=gen).to(device, dtype)
    y.backward(dy)
    y_ref = ref_moe(leaves[0], experts, *leaves[1:4], "gpt_oss", *leaves[4:], limit=LIMIT)
    y_ref.backward(dy.double())
    assert_close_rel(y, y_ref, TOL[dtype], f"{dtype} gpt_oss y")
    for i, name in enumerate(GPT_OSS_NAMES):
        if i in frozen:
            assert params[i].grad is None, name
            continue
        assert params[i].grad.dtype == dtype, name
        assert_close_rel(params[i].grad, leaves[i].grad, TOL[dtype], f"{dtype} gpt_oss {name}")
        if i:
            assert torch.equal(params[i].grad[E - 1], torch.zeros_like(params[i].grad[E - 1])), f"{name} idle"


# GPT-OSS's experts at gpt-oss-like sizes, scaled down (its C 2880, H 2880, 32 experts, top 4): the autotuned tiles
# (BLOCK_M 64-128, several K steps, experts' rows ending mid-tile among 1027 tokens' 4108 rows) that the interpreter's
# 32-wide tiles above cannot reach. The same exactness as above, on a coarser grid so that the clamp at gpt-oss's own
# limit 7 bites: x in +-{1/2, 1}, the gate and up weights in {-1/4, 0, 1/4} (a share ~410 / C nonzero, so g and u
# have a standard deviation ~4 at any C), their biases multiples of 1/8 in [-2, 2]. Every product and partial sum is
# a multiple of 1/8 under 2^9 (exact in fp32 in any order, and in any accumulator of 12 bits or more), and g and u
# stay under 32 in magnitude (asserted): multiples of 1/8 under 32 are exact in bf16 (8 significant bits). So the
# kernel's stored bf16 g and u are float64's numbers, and the clamp and its gradient's masks decide alike on both;
# a bound that tolerated boundary flips instead would have to pass dg off by O(1) at the flipped elements, which is
# also what a wrong mask gives. 7 is on the grid: some g and u sit exactly on the limit (gradient 0 there).
CUDA_MOE_SHAPES = {  # (tokens, C, H, E, k)
    "1027 tokens C 1024 H 512 32 experts top 4": (1027, 1024, 512, 32, 4),
    "1027 tokens C 512 H 1024 8 experts top 4": (1027, 512, 1024, 8, 4),
}


def make_gpt_oss_at(n, c, h, e, k, dtype, device, gen):
    """make_gpt_oss's leaves at other sizes, on the 1/8 grid above; the last expert idle. Also -> the routed rows'
    float64 pre-activations g, u (to show the clamp bites, and that they are exact in bf16)."""
    sign = torch.randint(0, 2, (n, c), generator=gen) * 2 - 1
    x = sign * torch.randint(1, 3, (n, c), generator=gen) / 2
    share = min(1.0, 16 * 16 / (0.625 * c))  # var(g) = c * E[x^2] * E[w^2] = c * 0.625 * share / 16 = 16
    wg, wu = ((torch.randint(0, 2, (e, h, c), generator=gen) * 2 - 1) * (torch.rand(e, h, c, generator=gen) < share)
              / 4 for _ in range(2))
    bg, bu = (torch.randint(-16, 17, (e, h), generator=gen) / 8 for _ in range(2))
    wd = torch.randn(e, c, h, generator=gen) / math.sqrt(h)
    bd = torch.randn(e, c, generator=gen) * 0.5
    experts = torch.stack([torch.randperm(e - 1, generator=gen)[:k] for _ in range(n)])  # expert e - 1 idle
    params = [t.to(device, dtype).requires_grad_() for t in (x, wg, wu, wd, bg, bu, bd)]
    experts = experts.to(device)
    x64, wg64, wu64, bg64, bu64 = (t.to(device, torch.float64) for t in (x, wg, wu, bg, bu))
    rows, tok = experts.reshape(-1), torch.arange(n, device=device).repeat_interleave(k)
    # expert by expert (a gather of [n k, h, c] weights would take GBs)
    g, u = (torch.empty(n * k, h, dtype=torch.float64, device=device) for _ in range(2))
    for j in range(e):
        hit = rows == j
        g[hit] = x64[tok[hit]] @ wg64[j].t() + bg64[j]
        u[hit] = x64[tok[hit]] @ wu64[j].t() + bu64[j]
    return params, experts, g, u


def check_gpt_oss_at(shape, dtype, device, limit=7.0, seed=0):
    """y and every gradient of GPT-OSS's experts against float64's autograd within TOL[dtype], with the clamp biting
    at limit (the gate above it and on it, the up past it both ways and on it); the idle expert's gradients zero."""
    n, c, h, e, k = shape
    gen = torch.Generator().manual_seed(seed)
    params, experts, g, u = make_gpt_oss_at(n, c, h, e, k, dtype, device, gen)
    assert g.abs().max() < 32 and u.abs().max() < 32, "pre-activations past 32: not exact in bf16 on the 1/8 grid"
    for what, hits in (("g above", g > limit), ("g on", g == limit), ("u above", u > limit), ("u on", u == limit),
                       ("u below", u < -limit), ("u on -", u == -limit), ("g inside", g < limit)):
        assert hits.sum() >= 3, f"{what} the limit {limit}: {hits.sum().item()} elements"
    y = moe_mlp(params[0], experts, *params[1:4], "gpt_oss", b_gate=params[4], b_up=params[5], b_down=params[6],
                limit=limit)
    assert y.dtype == dtype and y.shape == (n, k, c)
    dy = torch.randn(y.shape, generator=gen).to(device, dtype)
    y.backward(dy)
    leaves = [p.detach().double().requires_grad_() for p in params]
    y_ref = ref_moe(leaves[0], experts, *leaves[1:4], "gpt_oss", *leaves[4:], limit=limit)
    y_ref.backward(dy.double())
    tag = f"{dtype} {n}x{c} H {h} E {e} top {k}"
    assert_close_rel(y, y_ref, TOL[dtype], f"{tag} y")
    for i, name in enumerate(GPT_OSS_NAMES):
        assert params[i].grad.dtype == dtype, name
        assert_close_rel(params[i].grad, leaves[i].grad, TOL[dtype], f"{tag} {name}")
        if i:
            assert torch.equal(params[i].grad[e - 1], torch.zeros_like(params[i].grad[e - 1])), f"{name} idle"


@pytest.mark.cuda
@pytest.mark.parametrize("shape", list(CUDA_MOE_SHAPES))
def test_cuda_gpt_oss_experts_bf16_at_gpt_oss_like_sizes(shape):
    """bf16, at gpt-oss's limit 7 and alpha 1.702: y and all seven gradients within the file's 16-bit bound (1e-2)
    of float64, the clamp biting in every way above."""
    check_gpt_oss_at(CUDA_MOE_SHAPES[shape], torch.bfloat16, torch.device("cuda"))


def test_gpt_oss_bias_and_limit_refusals(device):
    """The biases come as all three or none, of [E, H] / [E, C] and x's dtype; the limit and alpha are finite and
    positive (GPTConfig's rule for swiglu_limit / _alpha): each refused by name, before any launch."""
    params, experts = make_gpt_oss(torch.float32, device, torch.Generator().manual_seed(62))
    x, wg, wu, wd, bg, bu, bd = (p.detach() for p in params)
    with pytest.raises(ValueError, match="b_gate, b_up and b_down come together .* got b_gate and b_up only"):
        moe_mlp(x, experts, wg, wu, wd, "gpt_oss", b_gate=bg, b_up=bu)
    with pytest.raises(ValueError, match=rf"b_down has shape \({E}, {H}\), expected \({E}, {C}\)"):
        moe_mlp(x, experts, wg, wu, wd, b_gate=bg, b_up=bu, b_down=bg)
    with pytest.raises(TypeError, match="dtype mismatch: x is float32, b_up is bfloat16"):
        moe_mlp(x, experts, wg, wu, wd, b_gate=bg, b_up=bu.bfloat16(), b_down=bd)
    for name, value in (("limit", 0.0), ("limit", float("inf")), ("alpha", -1.0), ("limit", True)):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0 \(GPT-OSS's clamped SwiGLU\), "
                                             rf"got {value!r}"):
            moe_mlp(x, experts, wg, wu, wd, "gpt_oss", **{name: value})


def _good(device):
    params, experts = make(torch.float32, device, torch.Generator().manual_seed(6))
    return [p.detach() for p in params[:1]] + [experts] + [p.detach() for p in params[1:]]


@pytest.mark.parametrize("index,bad,error,match", [
    (1, torch.full((N, K), E), ValueError, rf"experts holds id {E}, outside \[0, {E}\) \(w_gate has {E} experts\)"),
    (1, -torch.ones(N, K, dtype=torch.long), ValueError, r"experts holds id -1, outside \[0, 5\)"),
    (1, torch.zeros(N, K), TypeError, r"experts has dtype float32; expected one of: int64, int32"),
    (1, torch.zeros(N + 1, K, dtype=torch.long), ValueError,
     rf"experts has shape \({N + 1}, {K}\), expected \({N}, k\)"),
    (1, torch.zeros(N, dtype=torch.long), ValueError, r"experts must have 2 dims"),
    (1, torch.zeros(N, 0, dtype=torch.long), ValueError,
     rf"experts has shape \({N}, 0\), expected \({N}, k\) with k >= 1"),
    (2, torch.randn(E, H, C + 1), ValueError, rf"w_gate has shape \({E}, {H}, {C + 1}\), expected \({E}, {H}, {C}\)"),
    (3, torch.randn(E + 1, H, C), ValueError, rf"w_up has shape \({E + 1}, {H}, {C}\), expected \({E}, {H}, {C}\)"),
    (4, torch.randn(E, H, C), ValueError, rf"w_down has shape \({E}, {H}, {C}\), expected \({E}, {C}, {H}\)"),
    (2, torch.randn(H, C), ValueError, r"w_gate must have 3 dims"),
    (4, torch.randn(E, C, H, dtype=torch.bfloat16), TypeError, r"dtype mismatch: x is float32, w_down is bfloat16"),
    (0, torch.randn(N, C, dtype=torch.float64), TypeError, r"x has dtype float64"),
])
def test_bad_inputs_are_refused_by_name(index, bad, error, match, device):
    args = _good(device)
    args[index] = bad.to(device)
    with pytest.raises(error, match=match):
        moe_mlp(*args)


def test_unknown_activation_and_devices_are_refused(device):
    args = _good(device)
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu', 'gpt_oss', got 'relu'"):
        moe_mlp(*args, activation="relu")
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu', 'gpt_oss', got 'relu'"):
        torch.ops.tritongpt.moe_mlp_fwd(*[t.to("meta") for t in args], "relu")  # the fake impl, as compile traces
    args[4] = args[4].to("meta")
    with pytest.raises(ValueError, match="different devices.*w_down is on meta"):
        moe_mlp(*args)


def test_check_experts_must_be_a_bool(device):
    """A string is no flag: a truthy "no" would run the check it means to skip, a falsy "" skip it."""
    for flag in ("no", ""):
        with pytest.raises(TypeError, match=f"check_experts must be a bool, got str {flag!r}"):
            moe_mlp(*_good(device), check_experts=flag)


def test_the_ops_refuse_what_moe_mlp_checks_before_them(device):
    """The ops are public too (torch.ops.tritongpt.*): no experts, an unknown activation, a dy of another
    dtype and a needs list of another length are refused there by name, before any launch; so are a
    second derivative and torch.func, which the kernel does not give."""
    x, experts, wg, wu, wd = _good(device)
    with pytest.raises(ValueError, match=r"w_gate has no experts \(shape \[0, H, C\]\)"):
        moe_mlp(x, experts, wg[:0], wu[:0], wd[:0], check_experts=False)
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu', 'gpt_oss', got 'relu'"):
        torch.ops.tritongpt.moe_mlp_fwd(x, experts, wg, wu, wd, "relu")
    y, *saved = torch.ops.tritongpt.moe_mlp_fwd(x, experts, wg, wu, wd)
    bwd_args = (x, experts, *saved, wg, wu, wd)
    with pytest.raises(TypeError, match="dtype mismatch: x is float32, dy is bfloat16"):
        torch.ops.tritongpt.moe_mlp_bwd(torch.randn_like(y).bfloat16(), *bwd_args, [True] * 4)
    with pytest.raises(ValueError, match=r"needs must hold 4 flags \(dx, dw_gate, dw_up, dw_down\), or 7 with the "
                                         r"biases' \(db_gate, db_up, db_down\), got 3"):
        torch.ops.tritongpt.moe_mlp_bwd(torch.randn_like(y), *bwd_args, [True] * 3)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="moe_mlp: the Triton kernel has no second derivative"):
        torch.autograd.grad(moe_mlp(x, experts, wg, wu, wd).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="moe_mlp: the Triton kernel does not support torch.func"):
        torch.func.grad(lambda t: moe_mlp(t, experts, wg, wu, wd).sum())(x.detach())


def test_autocast_casts_x_and_the_weights_first(device):
    """fp32 leaves under bf16 autocast: the kernel runs on their bf16 casts (the same y as the casts given
    by hand), and the gradients come back to the fp32 leaves in fp32."""
    params, experts = make(torch.float32, device, torch.Generator().manual_seed(8))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = moe_mlp(params[0], experts, *params[1:])
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, moe_mlp(params[0].bfloat16(), experts, *[p.bfloat16() for p in params[1:]]))
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_the_module_compiles_in_one_graph_through_the_kernel(device):
    """MoEFeedForward's Triton path under torch.compile(fullgraph=True): no graph break (no host read of
    the routing), the same output and input gradient as eager."""
    from tritongpt.model.layers import MoEFeedForward

    torch.manual_seed(7)
    # one tile wide (C 32, H 24): the trace and the routing do not depend on the sizes, whose tile edges are the
    # tests above's; a third of the interpreter's programs
    moe = MoEFeedForward(32, 24, E, K).to(device)
    moe.use_triton = True
    x = torch.randn(3, 7, 32, device=device, requires_grad=True)
    y = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    dx, x.grad = x.grad, None
    y_eager = moe(x)
    y_eager.sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(dx, x.grad)


def test_stored_activation_is_freed_once_dw_down_is_made(device, monkeypatch):
    """The a that the dg/du epilogue stores ([N*k, H], sorted rows) lives only until dW_down's per-expert
    product is made: no reference may be left when dW_gate's / dW_up's product and dx's launch run."""
    import weakref

    from tritongpt.kernels import moe

    gen = torch.Generator().manual_seed(53)
    params, experts = make(torch.float32, device, gen)
    x, wg, wu, wd = (p.detach() for p in params)
    dy = torch.randn(N, K, C, generator=gen).to(device)
    stored, alive = [], []
    grouped, expert_grad = moe._grouped, moe._expert_grad

    def spy(launch):
        def run(*args, **kwargs):
            if stored:
                alive.append(stored[0]() is not None)
            out = launch(*args, **kwargs)
            if kwargs.get("store_act"):
                stored.append(weakref.ref(out[1][1]))
            return out
        return run

    monkeypatch.setattr(moe, "_grouped", spy(grouped))
    monkeypatch.setattr(moe, "_expert_grad", spy(expert_grad))
    with torch.no_grad():
        y, g, u, order, offsets = moe._fwd_launch(x, experts, wg, wu, wd)
        moe._bwd_launch(dy, x, g, u, order, offsets, wg, wu, wd, (True,) * 4)
    assert len(stored) == 1 and alive == [True, False, False], alive  # dW_down reads it; then gone


# -- shape/routing fuzz ----------------------------------------------------------------------------

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes under the interpreter
@given(n=st.integers(0, 40), e=st.integers(1, 6), k=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 40),
       repeats=st.booleans(), frozen=st.sets(st.integers(0, 3), max_size=3), ids=st.sampled_from(ID_DTYPES),
       activation=st.sampled_from(["silu", "gelu"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_shape_fuzz(n, e, k, c, h, repeats, frozen, ids, activation, dtype, seed):
    """moe_mlp against the float64 loop over experts: tokens, experts, top-k, widths, routing drawn unevenly
    (a skewed preference over the experts, some of them idle; repeats: a token may pick one expert in two
    slots), any frozen inputs, int32 or int64 ids, both activations: y and each gradient made, idle experts'
    weight gradients exactly zero. fp32 within 1e-4, 16-bit within TOL."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    k = min(k, e) if not repeats else k
    x = torch.randn(n, c, generator=gen)
    wg = torch.randn(e, h, c, generator=gen) * (1.5 / math.sqrt(c))
    wu = torch.randn(e, h, c, generator=gen) / math.sqrt(c)
    wd = torch.randn(e, c, h, generator=gen) / math.sqrt(h)
    # skewed: each expert's weight a power of a uniform (some near 0: idle or nearly), at least one kept
    pref = torch.rand(e, generator=gen) ** 4 * (torch.rand(e, generator=gen) > 0.3)
    pref[int(torch.randint(0, e, (), generator=gen))] += 1.0
    experts = torch.multinomial(pref.expand(max(n, 1), e), k, replacement=repeats, generator=gen)[:n]
    params = [t.to(device, dtype).requires_grad_(i not in frozen) for i, t in enumerate((x, wg, wu, wd))]
    experts = experts.to(device, ids)
    y = moe_mlp(params[0], experts, *params[1:], activation=activation)
    assert y.dtype == dtype and y.shape == (n, k, c)
    dy = torch.randn(y.shape, generator=gen).to(device, dtype)
    if n:
        y.backward(dy)
    leaves = [p.detach().double().requires_grad_() for p in params]
    y_ref = ref_moe(leaves[0], experts.long(), *leaves[1:], activation=activation)
    what = f"{dtype} {activation} n={n} e={e} k={k} c={c} h={h} repeats={repeats} frozen={sorted(frozen)}"
    if not n:
        assert y.numel() == 0
        return
    y_ref.backward(dy.double())
    assert_close_rel(y, y_ref, TOL[dtype], f"y {what}")
    idle = [i for i in range(e) if not (experts == i).any()]
    for i, name in enumerate(("dx", "dw_gate", "dw_up", "dw_down")):
        if i in frozen:
            assert params[i].grad is None, f"{name} {what}"
            continue
        assert params[i].grad.dtype == dtype, name
        assert_close_rel(params[i].grad, leaves[i].grad, TOL[dtype], f"{name} {what}")
        for j in idle if i else ():
            assert torch.equal(params[i].grad[j], torch.zeros_like(params[i].grad[j])), f"{name} idle {j} {what}"
