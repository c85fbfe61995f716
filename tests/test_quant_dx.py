"""The input gradient of kernels/quant.py's int8_linear and int4_linear (QLoRA: the quantized weight is frozen, the
gradient flows through it to x): dx = dy @ W, W the dequantized weight, against float64 and against torch autograd
through F.linear on the dequantized weight.

The dx kernels dequantize each weight tile in fp32 and round it to dy's dtype before the dot (the reference module's
dequantize().to(dtype)), accumulate in fp32 and store dx in dy's dtype. The interpreter's tile is BLOCK_M 32,
BLOCK_N 64 (the reduction), BLOCK_K 64: the shapes below put N and K off those tiles' edges, and int4's K 64-steps
over 4 and 2 whole groups (G 16, 32), one (64) or part of one (128)."""
import pytest
import torch
import torch.nn.functional as F

from parity import assert_close_rel
from tritongpt.kernels import quant
from tritongpt.kernels.quant import int4_linear, int8_linear
from tritongpt.model.quant import quantize_weight, quantize_weight_int4, unpack_int4

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# the least relative error a 16-bit dx shows here (dy, the weight and dx rounded): above fp32's ~1e-7, so an fp32
# computation and store cannot pass for a 16-bit one
ROUNDING = {torch.bfloat16: 1e-4, torch.float16: 1e-5}
# ... and the most it may differ from float64's product of dy and the weight rounded to the 16-bit dtype, rounded to
# that dtype: the kernel's only other rounding is dx's (the N sum is fp32). A weight rounded twice (int4's q * scale,
# then + offset) or a product accumulated in 16 bits is ~1e-3 away
ROUNDED = 3e-4
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


def make(fmt, n, k, g, device, seed=0):
    """-> (the quantized tensors, the fp32 weight the reference modules dequantize, float64 W, a bias)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    b = torch.randn(n, generator=gen)
    if fmt == "int8":
        q, scale = quantize_weight(w)
        weight = (q, scale)
        deq = q.float() * scale[:, None]
        w64 = q.double() * scale.double()[:, None]
    elif fmt == "int8g":  # int8 with a scale a group of g inputs (a GPTQ 8-bit folder's): scale [n, k / g]
        q, scale = quantize_weight(w.view(-1, g))  # (each group a row of its own: its own scale)
        q, scale = q.view(n, k), scale.view(n, k // g)
        weight = (q, scale)
        deq = (q.float().view(n, -1, g) * scale[:, :, None]).view(n, k)
        w64 = (q.double().view(n, -1, g) * scale.double()[:, :, None]).view(n, k)
    else:
        w[1, :g] = 0.25  # a constant group: scale 1, q 0, the offset the value itself
        q, scale, offset = quantize_weight_int4(w, g)
        weight = (q, scale, offset)
        u = unpack_int4(q).view(n, -1, g)
        deq = (u.float() * scale[:, :, None] + offset[:, :, None]).view(n, k)
        w64 = (u.double() * scale.double()[:, :, None] + offset.double()[:, :, None]).view(n, k)
    return tuple(t.to(device) for t in weight), deq.to(device), w64.to(device), b.to(device)


def linear(fmt, x, weight, bias=None, activation=None):
    return (int4_linear if fmt == "int4" else int8_linear)(x, *weight, bias, activation)


def dx_of(fmt, x, weight, bias, dy):
    """x's gradient of linear(x) with the output gradient dy, and y."""
    x = x.detach().requires_grad_()
    y = linear(fmt, x, weight, bias)
    return torch.autograd.grad(y, x, dy)[0], y


def check(dx, dy, deq, w64, dtype, name):
    assert dx.dtype == dtype, f"{name}: dx is {dx.dtype}, expected {dtype}"
    _, rel = assert_close_rel(dx, dy.double() @ w64, TOL[dtype], name)
    if dtype in ROUNDING:
        assert rel > ROUNDING[dtype], f"{name}: relative error {rel:.1e}: not rounded to {dtype}?"
        want = (dy.double() @ deq.to(dtype).double()).to(dtype)
        assert_close_rel(dx, want, ROUNDED, f"{name} against the {dtype} weight's product rounded to {dtype}")
    return rel


# (format, K, N, G): N 48 and 130 against the 64-wide reduction step, K 100 / 80 / 96 off the 64-wide dx tile;
# int8g: int8 with group scales, 2 whole groups a 64-wide K tile (G 32, K 96: the last tile's second group past K),
# 4 (G 16, a GGUF Q6_K's sub-blocks; K 80: the last tile's 3 groups past K) or part of one (G 128)
SHAPES = [("int8", 100, 130, None), ("int8", 64, 48, None), ("int8g", 96, 130, 32), ("int8g", 80, 48, 16),
          ("int8g", 256, 48, 128),
          ("int4", 80, 130, 16), ("int4", 96, 130, 32), ("int4", 192, 48, 64), ("int4", 256, 48, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m", [1, 7, 37])
@pytest.mark.parametrize("fmt,k,n,g", SHAPES)
def test_dx_against_float64(fmt, k, n, g, m, dtype, device):
    weight, deq, w64, b = make(fmt, n, k, g, device, seed=m + n + k)
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    dx, y = dx_of(fmt, x, weight, b.to(dtype), dy)
    with torch.no_grad():  # the forward is the inference one
        assert torch.equal(y, linear(fmt, x, weight, b.to(dtype)))
    check(dx, dy, deq, w64, dtype, f"{fmt} G{g} {dtype} dx {m}x{n} -> {k}")


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_autograd_through_f_linear(fmt, g, dtype, device):
    """x [2, 5, K] through linear then a loss, against the same through F.linear on the reference module's weight
    (dequantized in fp32, rounded to the compute dtype): the same dx, and no gradient anywhere else."""
    k, n = 96, 130
    weight, deq, _, b = make(fmt, n, k, g, device, seed=1)
    b = b.to(dtype)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = linear(fmt, x1, weight, b)
    y2 = F.linear(x2, deq.to(dtype), b)
    assert y1.shape == (2, 5, n) and y1.requires_grad
    (F.gelu(y1.float()) ** 2).sum().backward()
    (F.gelu(y2.float()) ** 2).sum().backward()
    assert x1.grad.dtype == dtype and x1.grad.shape == x.shape
    assert_close_rel(x1.grad, x2.grad, 1e-5 if dtype == torch.float32 else 1e-2, f"{fmt} {dtype} dx vs F.linear")
    assert all(t.grad is None for t in weight) and b.grad is None


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 16)])
def test_autocast_dx_in_its_dtype(fmt, g, device):
    """Under autocast (bf16) an fp32 x is cast first: y is bf16, the kernel's dx is bf16 (dy's dtype), cast back to
    x's fp32 by autograd; it equals the dx op on the bf16 dy."""
    k, n = 96, 130
    weight, deq, w64, b = make(fmt, n, k, g, device, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, k, generator=gen).to(device).requires_grad_()
    dy = torch.randn(7, n, generator=gen).to(device, torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = linear(fmt, x, weight, b)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    assert x.grad.dtype == torch.float32
    op = quant._int8_linear_dx_op if fmt == "int8" else quant._int4_linear_dx_op
    direct = op(dy, *weight)
    assert direct.dtype == torch.bfloat16 and torch.equal(x.grad, direct.float())
    check(direct, dy, deq, w64, torch.bfloat16, f"{fmt} autocast bf16 dx")


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 32)])
def test_strided_weight_scale_and_offset(fmt, g, device):
    """The weight's rows at a stride (every other row of a bigger one), the scale and offset as views at strides
    along both dims: read in place by the dx kernels as by the forward."""
    k, n = 96, 48
    weight, deq, w64, b = make(fmt, 2 * n, k, g, device, seed=13)
    if fmt == "int8":
        strided = (weight[0][::2], weight[1][::2])
        assert strided[0].stride() == (2 * k, 1) and strided[1].stride() == (2,)
    else:
        strided = (weight[0][::2], weight[1][::2].t().contiguous().t(), weight[2][::2])
        assert strided[1].stride() == (1, n) and strided[2].stride() == (2 * k // g, 1)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(7, k, generator=gen).to(device)
    dy = torch.randn(7, n, generator=gen).to(device)
    dx, _ = dx_of(fmt, x, strided, b[::2], dy)
    assert_close_rel(dx, dy.double() @ w64[::2], 1e-4, f"{fmt} dx, strided weight")


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 64)])
def test_expanded_dy_and_no_rows(fmt, g, device):
    """y.sum().backward() hands an expanded dy (stride 0): read as what it is; no rows launches nothing."""
    k, n = 128, 48
    weight, _, w64, b = make(fmt, n, k, g, device, seed=5)
    x = torch.randn(3, k, device=device, requires_grad=True)
    linear(fmt, x, weight, b).sum().backward()
    assert_close_rel(x.grad, w64.sum(0).expand(3, k), 1e-5, f"{fmt} dx of y.sum()")
    x0 = torch.randn(0, k, device=device, requires_grad=True)
    linear(fmt, x0, weight, b).sum().backward()
    assert x0.grad.shape == (0, k)


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 16)])
def test_nan_in_dy_stays_in_its_row(fmt, g, device):
    k, n = 96, 130
    weight, _, w64, b = make(fmt, n, k, g, device, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(37, k, generator=gen).to(device)
    dy = torch.randn(37, n, generator=gen).to(device)
    dy[20, n - 1] = float("nan")  # the last output: in the N edge's partial step
    dx, _ = dx_of(fmt, x, weight, b, dy)
    assert torch.isnan(dx[20]).all()
    rest = torch.cat([dx[:20], dx[21:]])
    assert torch.isfinite(rest).all()
    want = dy.double() @ w64
    assert_close_rel(rest, torch.cat([want[:20], want[21:]]), 1e-4, f"{fmt} rows without the NaN")


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int8g", 32), ("int4", 32)])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.bfloat16, "tf32")])
def test_dx_is_the_triton_kernel(fmt, g, dtype, precision, device, monkeypatch):
    """The backward launches the format's dx kernel (IEEE products in fp32: the interpreter does not model TF32,
    so the launch's flag is checked), not a dequantized matmul."""
    weight, _, _, b = make(fmt, 48, 128, g, device)
    seen = []
    real = quant.launch_tuned
    monkeypatch.setattr(quant, "launch_tuned", lambda k, *a, **kw: seen.append((k, kw)) or real(k, *a, **kw))
    x = torch.randn(3, 128, device=device, dtype=dtype, requires_grad=True)
    y = linear(fmt, x, weight, b.to(dtype))
    y.backward(torch.ones_like(y))
    kernel = quant._int4_linear_dx_kernel if fmt == "int4" else quant._int8_linear_dx_kernel
    assert seen[1:] == [(kernel, dict(G=g or 0, PRECISION=precision))]  # (int8's G 0: a scale a row)


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 32)])
def test_torch_compile_fullgraph_with_backward(fmt, g, device):
    """A compiled function calling the op, then backward: the forward and backward graphs hold the ops (opaque),
    and x's gradient is the eager one."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    weight, _, _, b = make(fmt, 130, 96, g, device, seed=9)
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(10)).to(device)

    def block(x):
        return F.gelu(linear(fmt, x * 0.5, weight, b)) + 1.0

    graphs = {}

    def keep(kind):
        def compiler(gm, inputs):
            graphs[kind] = str(gm.graph)
            return make_boxed_func(gm)
        return compiler

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = block(x1)
    want.sum().backward()
    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    got = torch.compile(block, backend=backend, fullgraph=True)(x2)
    got.sum().backward()
    assert torch.equal(got, want) and torch.equal(x2.grad, x1.grad)
    assert f"tritongpt.{fmt}_linear.default" in graphs["fw"]
    assert f"tritongpt.{fmt}_linear_dx.default" in graphs["bw"]


def test_opcheck_with_x_requiring_grad(device):
    """torch.library.opcheck with x requiring grad checks the registered autograd (and the dx ops' fakes under
    aot_dispatch); the dx ops themselves too."""
    x = torch.randn(37, 96, generator=torch.Generator().manual_seed(12)).to(device)
    weight8, _, _, b = make("int8", 130, 96, None, device, seed=11)
    weight4, _, _, _ = make("int4", 130, 96, 32, device, seed=11)
    dy = torch.randn(37, 130, device=device)
    torch.library.opcheck(torch.ops.tritongpt.int8_linear.default, (x.clone().requires_grad_(), *weight8, b, None))
    torch.library.opcheck(torch.ops.tritongpt.int4_linear.default,
                          (x.bfloat16().requires_grad_(), *weight4, None, None))
    torch.library.opcheck(torch.ops.tritongpt.int8_linear_dx.default, (dy, *weight8))
    torch.library.opcheck(torch.ops.tritongpt.int4_linear_dx.default, (dy.bfloat16(), *weight4))


@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 16)])
def test_direct_op_calls_refuse_what_has_no_gradient(fmt, g, device):
    """int8_linear() / int4_linear() refuse these first (tests/test_int*_linear.py); a direct call of the op reaches
    the backward, which refuses them by name rather than return no gradient or a wrong one."""
    weight, _, _, b = make(fmt, 48, 64, g, device)
    op = torch.ops.tritongpt.int8_linear if fmt == "int8" else torch.ops.tritongpt.int4_linear
    x = torch.randn(5, 64, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward through activation='gelu_tanh'"):
        op(x, *weight, b, "gelu_tanh").sum().backward()
    scale = weight[1].clone().requires_grad_()
    args = (weight[0], scale) + weight[2:]
    with pytest.raises(RuntimeError, match="scale requires grad, but it is frozen"):
        op(x, *args, b, None).sum().backward()
    with pytest.raises(RuntimeError, match="bias requires grad, but it is frozen"):
        op(x.detach(), *weight, b.clone().requires_grad_(), None).sum().backward()
    y = linear(fmt, x, weight, b)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_dx_op_refuses_by_name(fmt, device):
    weight, _, _, _ = make(fmt, 48, 64, 16, device)
    op = torch.ops.tritongpt.int8_linear_dx if fmt == "int8" else torch.ops.tritongpt.int4_linear_dx
    with pytest.raises(ValueError, match="dy has 40 outputs .* N = 48"):
        op(torch.randn(3, 40, device=device), *weight)
    with pytest.raises(ValueError, match="reads dy with unit stride on its last dim"):
        op(torch.randn(48, 3, device=device).t(), *weight)
    with pytest.raises(TypeError, match="dy has dtype int64"):
        op(torch.zeros(3, 48, dtype=torch.long, device=device), *weight)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m", [8, 4096])
@pytest.mark.parametrize("fmt,g", [("int8", None), ("int4", 128), ("int4", 32)])
@pytest.mark.parametrize("k,n", [(768, 3072), (3072, 768)])
def test_gpt2_small_sizes_on_cuda(fmt, g, k, n, m, dtype):
    """GPT-2 small's fc1 and fc2 on a GPU: dx through the autotuned few-row and training tiles against float64."""
    weight, deq, w64, b = make(fmt, n, k, g, "cuda", seed=m)
    gen = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    dy = torch.randn(m, n, generator=gen).to("cuda", dtype)
    dx, _ = dx_of(fmt, x, weight, b.to(dtype), dy)
    check(dx, dy, deq, w64, dtype, f"cuda {fmt} G{g} {dtype} dx {m}x{n} -> {k}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 7, 333])
@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("k,n", [(768, 3072), (3072, 768)])
def test_int8_group_scales_dx_gpt2_small_sizes_on_cuda(g, k, n, m, dtype):
    """int8 with group scales (scale [N, K / G]) on a GPU: dx through the autotuned few-row tiles (1 and 7 rows) and
    the training ones (333) at GPT-2 small's fc1 and fc2, K tiles of several groups (G 32) or part of one (G 128),
    against float64 within the 16-bit bound (check: TOL, ROUNDING and the rounded weight's product within ROUNDED);
    the forward under grad is the inference one."""
    weight, deq, w64, b = make("int8g", n, k, g, "cuda", seed=m + g)
    gen = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    dy = torch.randn(m, n, generator=gen).to("cuda", dtype)
    dx, y = dx_of("int8g", x, weight, b.to(dtype), dy)
    with torch.no_grad():
        assert torch.equal(y, linear("int8g", x, weight, b.to(dtype)))
    check(dx, dy, deq, w64, dtype, f"cuda int8 G{g} {dtype} dx {m}x{n} -> {k}")
