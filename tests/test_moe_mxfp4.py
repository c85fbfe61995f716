"""GPT-OSS's MXFP4 experts kept packed: kernels/moe.py moe_mlp_mxfp4 (the grouped kernel decoding each weight tile in
registers) and model/layers.py MXFP4MoEFeedForward (its reference: the weights dequantized, then the float MoE).

Random valid blocks (every e2m1 code, scales near 127 so the values are a model's size); 4 experts, top-2, C 64 and
H 32 (whole MXFP4 blocks of 32), 37 tokens: under the interpreter's 32-wide tiles an expert's rows end mid-tile
and each product takes two K steps. swiglu_limit 2 so the clamp bites. The decode itself is checked bit for bit
(one-hot rows through one product, both ways the kernel reads a weight) against hf_quant.mxfp4_dequantize.
"""
import pytest
import torch

from parity import assert_close_rel
from test_moe_kernel import ref_moe
from tritongpt.errors import UserError
from tritongpt.kernels.moe import Mxfp4Weight, _grouped, _route, moe_mlp_mxfp4
from tritongpt.model.layers import MoEFeedForward, MXFP4MoEFeedForward
from tritongpt.train.hf_quant import mxfp4_dequantize

pytestmark = pytest.mark.usefixtures("one_thread")

N, E, K, C, H, LIMIT = 37, 4, 2, 64, 32, 2.0


def packed(rows, inputs, seed, lo=119, hi=125):
    """(blocks uint8 [E, rows, inputs / 32, 16], scales uint8 [E, rows, inputs / 32]) drawn at random."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, rows, inputs // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(lo, hi, (E, rows, inputs // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def experts_inputs(seed=0, n=N):
    """(x [n, C], experts [n, K] distinct ids, gate_up blocks/scales, down blocks/scales, biases b_gate, b_up,
    b_down), and the float64 weights they stand for (w_gate, w_up [E, H, C], w_down [E, C, H])."""
    g = torch.Generator().manual_seed(seed)
    gub, gus = packed(2 * H, C, seed + 1)
    dnb, dns = packed(C, H, seed + 2)
    x = torch.randn(n, C, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    biases = [torch.randn(E, H, generator=g), torch.randn(E, H, generator=g), torch.randn(E, C, generator=g)]
    gate_up = mxfp4_dequantize(gub, gus, torch.float64)  # transformers' [E, C, 2H]: gate the even columns
    floats = (gate_up[..., 0::2].transpose(1, 2), gate_up[..., 1::2].transpose(1, 2),
              mxfp4_dequantize(dnb, dns, torch.float64).transpose(1, 2))
    return x, experts, (gub, gus, dnb, dns), biases, floats


@pytest.mark.parametrize("dtype, tol, limit", [(torch.float32, 1e-5, LIMIT), (torch.bfloat16, 1e-2, 7.0)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [N, 5])
def test_mxfp4_experts_match_float64_on_their_dequantized_weights_forward_and_dx(dtype, tol, limit, n):
    """fp32 within 1e-5 of float64, the clamp biting (limit 2); bf16 within 1e-2 at gpt-oss's limit 7 (at 2 a bf16
    g or u rounded across the limit flips its gradient's mask: tests/test_moe_kernel.py's grids are for that). Both
    bit for bit moe_mlp, the float kernel, on the dequantized weights in that dtype (the clamp at 2 there too)."""
    from tritongpt.kernels.moe import moe_mlp

    x, experts, blocks, biases, floats = experts_inputs(n=n)
    dy = torch.randn(n, K, C, generator=torch.Generator().manual_seed(9))
    x64 = x.double().requires_grad_()
    want = ref_moe(x64, experts, *floats, "gpt_oss", *(b.double() for b in biases), limit=limit)
    want.backward(dy.double())
    bias = dict(zip(("b_gate", "b_up", "b_down"), (b.to(dtype) for b in biases)))
    xt = x.to(dtype).requires_grad_()
    y = moe_mlp_mxfp4(xt, experts, *blocks, **bias, limit=limit)
    y.backward(dy.to(dtype))
    assert y.dtype == xt.grad.dtype == dtype
    assert_close_rel(y, want, tol, f"y {dtype}")
    assert_close_rel(xt.grad, x64.grad, tol, f"dx {dtype}")
    assert want.abs().max() > 1 and x64.grad.abs().max() > 1
    if limit == LIMIT:  # the clamp bites: some gate past the limit, some up past it both ways
        g = torch.einsum("nc,nkhc->nkh", x.double(), floats[0][experts]) + biases[0].double()[experts]
        u = torch.einsum("nc,nkhc->nkh", x.double(), floats[1][experts]) + biases[1].double()[experts]
        assert (g > LIMIT).any() and (u > LIMIT).any() and (u < -LIMIT).any()
    for lim in {limit, LIMIT}:
        xt, xf = (x.to(dtype).requires_grad_() for _ in range(2))
        y = moe_mlp_mxfp4(xt, experts, *blocks, **bias, limit=lim)
        yf = moe_mlp(xf, experts, *(w.to(dtype) for w in floats), "gpt_oss", **bias, limit=lim)
        y.backward(dy.to(dtype)), yf.backward(dy.to(dtype))
        assert torch.equal(y, yf) and torch.equal(xt.grad, xf.grad), lim


@pytest.mark.parametrize("transposed", [True, False], ids=["blocks-along-K", "blocks-along-N"])
def test_the_kernels_decode_is_mxfp4_dequantize_bit_for_bit(transposed):
    """One-hot rows of x through one product read W [E, R, G * 32] as B [K, N] = W^T (forward) or W (dx): each
    output row is a column or row of W, the decoded values exactly (fp32, IEEE: every term but one is 0 x value;
    -0.0 comes out 0.0 so, the sum starting at 0).
    Every code, and the extreme scales 0 (a subnormal 2 ** -127), 1, 127 and 252 among them."""
    R, G = 40, 2
    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (2, R, G, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 141, (2, R, G), dtype=torch.uint8, generator=g)
    scales.view(-1)[:4] = torch.tensor([0, 1, 127, 252], dtype=torch.uint8)
    want = mxfp4_dequantize(blocks, scales).transpose(1, 2)  # [E, R, G * 32]: a Linear's [out, in]
    w = Mxfp4Weight(blocks, scales)
    inputs = G * 32 if transposed else R
    x = torch.eye(inputs).repeat(2, 1)  # row i one-hot at i % inputs; rows of expert 0 then expert 1
    experts = (torch.arange(2 * inputs) // inputs)[:, None]
    order, offsets = _route(experts, 2)
    out = torch.empty(2 * inputs, R if transposed else G * 32)
    _grouped(x, w.transpose(1, 2) if transposed else w, 2 * inputs, order, offsets, a_div=1, scatter=True, out=out)
    got = out.view(2, inputs, -1)
    expect = want.transpose(1, 2) if transposed else want  # x e_i @ W^T = W[:, i]; x e_i @ W = W[i, :]
    assert torch.equal(got, expect)
    assert (want == 0).float().mean() < 0.2 and want.abs().min() == 0 and bool((want.abs() < 2.0 ** -120).any())


def test_mxfp4_experts_refuse_bad_input_by_name():
    x, experts, (gub, gus, dnb, dns), biases, _ = experts_inputs(n=3)
    with pytest.raises(ValueError, match=r"gate_up_scales has shape \(4, 64, 1\), expected \(4, 64, 2\)"):
        moe_mlp_mxfp4(x, experts, gub, gus[:, :, :1], dnb, dns)
    with pytest.raises(ValueError, match="x has 48 features, not a multiple of 32: MXFP4 blocks hold 32"):
        moe_mlp_mxfp4(x[:, :48], experts, gub, gus, dnb, dns)
    with pytest.raises(TypeError, match="down_blocks has dtype int8"):
        moe_mlp_mxfp4(x, experts, gub, gus, dnb.view(torch.int8), dns)
    with pytest.raises(ValueError, match="b_gate requires grad, but the MXFP4 experts .* are frozen"):
        moe_mlp_mxfp4(x, experts, gub, gus, dnb, dns, b_gate=biases[0].requires_grad_(), b_up=biases[1],
                      b_down=biases[2])
    with pytest.raises(ValueError, match="hidden 48 is not a multiple of 32"):
        MXFP4MoEFeedForward(C, 48, E, K)
    moe = MXFP4MoEFeedForward(C, H, E, K, limit=LIMIT)
    with pytest.raises(UserError, match=r"layer 3: down_scales is uint8 \(4, 64, 2\), not uint8 \(4, 64, 1\)"):
        moe.set_packed(gub, gus, dnb, torch.zeros(E, C, 2, dtype=torch.uint8), what="layer 3")
    bad = gus.clone()
    bad[1, 2, 0] = 255
    with pytest.raises(UserError, match="gate_up_scales holds 255, e8m0's NaN"):
        moe.set_packed(gub, bad, dnb, dns)
    bad[1, 2, 0], big = 254, gub.clone()
    big[1, 2, 0, 0] = 0x07  # 6 * 2 ** 127: past float32
    with pytest.raises(UserError, match=r"2 \*\* 128 or more"):
        moe.set_packed(big, bad, dnb, dns)


def test_the_module_is_the_float_moe_of_its_dequantized_weights_on_both_paths():
    """The reference bit for bit MoEFeedForward holding the dequantized weights; the Triton path within fp32's
    rounding, x's gradient too; the router trains through both, the experts (buffers) never."""
    x, _, blocks, biases, floats = experts_inputs()
    moe = MXFP4MoEFeedForward(C, H, E, K, limit=LIMIT)
    moe.set_packed(*blocks)
    flt = MoEFeedForward(C, H, E, K, bias=True, activation="gpt_oss", limit=LIMIT)
    with torch.no_grad():
        for name, b in zip(("b_gate", "b_up", "b_down"), biases):
            getattr(moe, name).copy_(b), getattr(flt, name).copy_(b)
        for name, w in zip(("w_gate", "w_up", "w_down"), floats):
            getattr(flt, name).copy_(w)
        flt.router.load_state_dict(moe.router.state_dict())
    assert not any(p.requires_grad for n, p in moe.named_parameters() if not n.startswith("router."))
    xs = x.view(1, N, C)
    want = flt(xs)
    outs, grads = [], []
    for triton in (False, True):
        moe.use_triton = triton
        xi = xs.clone().requires_grad_()
        out = moe(xi)
        out.pow(2).sum().backward()
        outs.append(out), grads.append((xi.grad, moe.router.weight.grad.clone()))
        moe.router.weight.grad = None
    assert torch.equal(outs[0], want)
    assert_close_rel(outs[1], want, 1e-5, "triton path")
    for (dx, dr), (dx0, dr0) in zip(grads[1:], grads[:1]):
        assert_close_rel(dx, dx0, 1e-5, "dx")
        assert_close_rel(dr, dr0, 1e-5, "router's gradient")
    assert dr0.abs().max() > 0
