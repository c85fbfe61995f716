"""kernels/quant.py's int8_linear (W8A16: int8 weight, one scale per output row) against float64.

The dequantization is exact in the kernel (every int8 is exact in fp32/bf16/fp16, the scale applied in fp32
after the K sum), so fp32 differs from float64 only by summation order; bf16/fp16 round x, the bias and y."""
import pytest
import torch
import torch.nn.functional as F

from parity import assert_close_rel, report
from tritongpt.kernels import quant
from tritongpt.kernels.quant import int8_linear
from tritongpt.model.quant import quantize_weight

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# the least relative error a 16-bit run shows on these shapes (y stored rounded: bf16 8 bits, fp16 11): above
# fp32's ~1e-7, so a run computed and stored in fp32, compared with itself, cannot pass for a 16-bit one
ROUNDING = {torch.bfloat16: 1e-4, torch.float16: 1e-5}
# ... and the most it may differ from float64's answer rounded to the 16-bit dtype: the kernel's only rounding is y's
# (x and the bias come rounded, q is exact, the scale, the K sum and the GELU are fp32), so it gives that rounded
# answer but where fp32's sum lands across a rounding boundary (~1e-6 relative, 0 to a few elements here). A scale
# or a pre-GELU value rounded to the 16-bit dtype first, as a dequantizing path does, is ~1e-3 away: within TOL,
# not within this
ROUNDED = 3e-4
GELU = {"gelu_tanh": "tanh", "gelu_erf": "none"}


def make(n, k, device, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    w[1] = 0.0  # a zero row: scale 1, q 0
    q, scale = quantize_weight(w)  # gpt-fast's scheme: symmetric, an fp32 scale a row (a zero row: scale 1)
    b = torch.randn(n, generator=gen) if bias else None
    return q.to(device), scale.to(device), (b.to(device) if bias else None)


def reference(x, q, scale, bias=None, activation=None):
    """float64: x @ (q * scale[:, None]).T + bias, then the GELU (or the squared ReLU)."""
    y = x.double() @ (q.double() * scale.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    if activation == "relu2":
        return F.relu(y) ** 2
    return F.gelu(y, approximate=GELU[activation]) if activation else y


def check(y, ref, dtype, name):
    assert y.dtype == dtype, f"{name}: y is {y.dtype}, expected {dtype}"
    _, rel = assert_close_rel(y, ref, TOL[dtype], name)
    if dtype in ROUNDING:
        assert rel > ROUNDING[dtype], f"{name}: relative error {rel:.1e}: not rounded to {dtype}?"
        assert_close_rel(y, ref.to(dtype), ROUNDED, f"{name} against float64 rounded to {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (7, 100, 130), (37, 100, 130), (37, 64, 48)])
@pytest.mark.parametrize("activation", [None, "gelu_tanh", "gelu_erf"])
def test_parity_against_float64(dtype, m, k, n, activation, device):
    q, scale, b = make(n, k, device, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(device, dtype)
    b16 = b.to(dtype)
    with torch.no_grad():
        check(int8_linear(x, q, scale, b16, activation), reference(x, q, scale, b16, activation), dtype,
              f"{dtype} {m}x{k}->{n} {activation} bias")
    if activation is None:  # without a bias: the epilogue's scale alone
        check(int8_linear(x, q, scale), reference(x, q, scale), dtype, f"{dtype} {m}x{k}->{n} no bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(7, 100, 130), (37, 64, 48)])
def test_relu2_epilogue_against_float64(dtype, m, k, n, device):
    """The squared-ReLU MLP's fc1 (mlp "relu2"): relu(y)^2 in the epilogue, after the scale and the bias, in fp32
    then one rounding; per-row and group scales."""
    q, scale, b = make(n, k, device, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(device, dtype)
    b16 = b.to(dtype)
    with torch.no_grad():
        y = int8_linear(x, q, scale, b16, "relu2")
        check(y, reference(x, q, scale, b16, "relu2"), dtype, f"{dtype} {m}x{k}->{n} relu2")
        assert (y == 0).any() and (y > 0).any()  # (both sides of the ReLU met)
        if k % 32 == 0:
            qg, sg, w64 = grouped(n, k, 32, device, seed=m)
            want = F.relu(x.double() @ w64.T + b16.double()) ** 2
            assert_close_rel(int8_linear(x, qg, sg, b16, "relu2"), want, TOL[dtype], f"{dtype} G32 relu2")


def grouped(n, k, g, device, seed=0):
    """int8 q [n, k] with a scale a group of g inputs [n, k / g] (a GPTQ 8-bit folder's), and the float64 W."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    w[:, g:2 * g] *= 10  # (the second group of each row far larger: a group's scale read for another is seen)
    q, scale = quantize_weight(w.view(-1, g))  # each group a row of its own
    q, scale = q.view(n, k), scale.view(n, k // g)
    w64 = (q.double().view(n, -1, g) * scale.double()[:, :, None]).view(n, k)
    return q.to(device), scale.to(device), w64.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n,g", [(7, 96, 37, 32), (5, 256, 33, 128), (3, 80, 65, 16)])
def test_group_scales_against_float64(dtype, m, k, n, g, device):
    """Group scales [N, K / G]: each weight tile dequantized in the K loop (2 whole groups a 64-wide step at G 32, K
    96 ending inside a step; part of one at 128; 4 at 16), against float64's x @ W^T + bias; in bf16 against the
    product with the weight rounded to bf16, as the reference module rounds its dequantized weight. Odd M and N."""
    q, scale, w64 = grouped(n, k, g, device, seed=m + n)
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype)
    with torch.no_grad():
        y = int8_linear(x, q, scale, b, "gelu_tanh")
        ref = F.gelu(x.double() @ w64.T + b.double(), approximate="tanh")
    assert y.dtype == dtype
    assert_close_rel(y, ref, TOL[dtype], f"{dtype} {m}x{k}->{n} G{g}")
    if dtype == torch.bfloat16:
        want = F.gelu(x.double() @ w64.to(dtype).double().T + b.double(), approximate="tanh").to(dtype)
        assert_close_rel(y, want, ROUNDED, f"{dtype} G{g} against the bf16 weight's product")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_leading_dims_and_strided_x(dtype, device, monkeypatch):
    """[2, 3, K] -> [2, 3, N]; a transposed view of x (copied to rows) and rows at a stride > K (read in place)."""
    k, n = 100, 48
    q, scale, b = make(n, k, device, seed=3)
    b = b.to(dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, k, generator=gen).to(device, dtype)
    y = int8_linear(x, q, scale, b, "gelu_tanh")
    assert y.shape == (2, 3, n)
    check(y, reference(x, q, scale, b, "gelu_tanh"), dtype, "leading dims")
    xt = torch.randn(k, 5, generator=gen).to(device, dtype).t()  # [5, K], unit stride along the rows
    assert xt.stride() == (1, 5)
    check(int8_linear(xt, q, scale, b), reference(xt, q, scale, b), dtype, "transposed x")
    wide = torch.full((9, k + 28), float("nan"), device=device, dtype=dtype)
    xs = wide[:, 10:10 + k]  # rows 128 apart, NaN either side: a load past K's edge would show
    xs.copy_(torch.randn(9, k, generator=gen))
    seen = []
    real = quant._launch
    monkeypatch.setattr(quant, "_launch", lambda x, *a: seen.append(x.stride()) or real(x, *a))
    check(int8_linear(xs, q, scale, b), reference(xs, q, scale, b), dtype, "rows at a stride")
    assert seen == [(k + 28, 1)]  # not copied
    # q's rows at a stride (every other row of a bigger weight), scale and bias as strided views
    q2, scale2, b2 = make(2 * n, k, device, seed=15)
    b2 = b2.to(dtype)
    assert q2[::2].stride() == (2 * k, 1) and scale2[::2].stride() == (2,)
    check(int8_linear(x, q2[::2], scale2[::2], b2[::2]), reference(x, q2[::2], scale2[::2], b2[::2]), dtype,
          "strided weight, scale and bias")


def test_autocast_computes_in_its_dtype(device):
    """Under autocast (bf16) an fp32 x and bias are cast first, as nn.Linear's inputs: y is bf16, and equal to the
    kernel on the cast inputs."""
    k, n = 100, 130
    q, scale, b = make(n, k, device, seed=5)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(6)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = int8_linear(x, q, scale, b, "gelu_erf")
    xb, bb = x.bfloat16(), b.bfloat16()
    check(y, reference(xb, q, scale, bb, "gelu_erf"), torch.bfloat16, "autocast bf16")
    assert torch.equal(y, int8_linear(xb, q, scale, bb, "gelu_erf"))
    # the fp32 inputs' own result differs by x's rounding: the cast really happened
    assert report(y, reference(x, q, scale, b, "gelu_erf"))[1] > ROUNDING[torch.bfloat16]


def test_nan_stays_in_its_row(device):
    k, n = 100, 130
    q, scale, b = make(n, k, device, seed=7)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(8)).to(device)
    x[20, 99] = float("nan")  # the last column: inside the K edge's partial tile
    y = int8_linear(x, q, scale, b, "gelu_tanh")
    assert torch.isnan(y[20]).all()
    rest = torch.cat([y[:20], y[21:]])
    assert torch.isfinite(rest).all()
    ref = reference(x, q, scale, b, "gelu_tanh")
    assert_close_rel(rest, torch.cat([ref[:20], ref[21:]]), 1e-4, "rows without the NaN")


def test_no_rows_launches_nothing(device, monkeypatch):
    q, scale, b = make(48, 64, device)
    launches = []
    monkeypatch.setattr(quant, "launch_tuned", lambda *a, **kw: launches.append(a))
    y = int8_linear(torch.randn(2, 0, 64, device=device), q, scale, b)
    assert y.shape == (2, 0, 48) and y.dtype == torch.float32 and launches == []


def _bad(device, **change):
    """int8_linear's arguments (x [5, 64], qweight [48, 64]) with some replaced."""
    q, scale, b = make(48, 64, device)
    args = dict(x=torch.randn(5, 64, device=device), qweight=q, scale=scale, bias=b, activation=None)
    for name, fn in change.items():
        args[name] = fn(args[name])
    return args


REFUSED = {
    "qweight float": (dict(qweight=lambda q: q.float()), TypeError, "qweight has dtype float32; expected one of: int8"),
    "qweight uint8": (dict(qweight=lambda q: q.to(torch.uint8)), TypeError, "qweight has dtype uint8"),
    "qweight 3-D": (dict(qweight=lambda q: q[None]), ValueError, "qweight must have 2 dims"),
    "qweight along K strided": (dict(qweight=lambda q: q.t().contiguous().t()), ValueError,
                                "qweight must have unit stride along K"),
    "K mismatch": (dict(x=lambda x: x[:, :60]), ValueError, "x has 60 features .* K = 64"),
    "scale int": (dict(scale=lambda s: s.int()), TypeError, "scale has dtype int32"),
    "scale shape": (dict(scale=lambda s: s[:47]), ValueError, r"scale has shape \(47,\), expected \(48,\)"),
    "scale 3-D": (dict(scale=lambda s: s[:, None, None]), ValueError,
                  r"scale has shape \(48, 1, 1\), expected \(48,\)"),
    # group scales [N, K / G] (a GPTQ 8-bit folder's): G one of GROUP_SIZES, K a multiple of it
    "group scales of 3": (dict(scale=lambda s: s[:, None].repeat(1, 3)), ValueError,
                          r"scale has shape \(48, 3\); group scales must be \[N, K / G\] = \[48, K / G\] for qweight "
                          r"\(48, 64\) \(K = 64\) with a group size G in 16, 32"),
    "group scales rows": (dict(scale=lambda s: s[:40, None].repeat(1, 2)), ValueError,
                          r"scale has shape \(40, 2\); group scales must be \[N, K / G\] = \[48, K / G\]"),
    "bias shape": (dict(bias=lambda b: b[:40]), ValueError, r"bias has shape \(40,\), expected \(48,\)"),
    "bias int": (dict(bias=lambda b: b.long()), TypeError, "bias has dtype int64"),
    "x int": (dict(x=lambda x: x.long()), TypeError, "x has dtype int64"),
    "x complex": (dict(x=lambda x: x.to(torch.complex64)), TypeError, "x has dtype complex64"),
    "x scalar": (dict(x=lambda x: x[0, 0]), ValueError, "x must have at least 1 dim"),
    "x not a tensor": (dict(x=lambda x: x.tolist()), TypeError, "x must be a torch.Tensor"),
    "devices": (dict(scale=lambda s: s.to("meta")), ValueError, "tensors on different devices: .*scale is on meta"),
    "empty K": (dict(qweight=lambda q: q[:, :0], x=lambda x: x[:, :0]), ValueError,
                r"qweight has shape \(48, 0\); N \(outputs\) and K \(inputs\) must both be at least 1"),
    "empty N": (dict(qweight=lambda q: q[:0], scale=lambda s: s[:0], bias=lambda b: b[:0]), ValueError,
                r"qweight has shape \(0, 64\); N \(outputs\)"),
    "activation": (dict(activation=lambda a: "relu"), ValueError,
                   "activation must be None, 'gelu_tanh', 'gelu_erf' or 'relu2'"),
    # x's gradient flows through the frozen weight (tests/test_quant_dx.py); the rest get none
    "activation with grad": (dict(x=lambda x: x.requires_grad_(), activation=lambda a: "gelu_tanh"), RuntimeError,
                             "int8_linear: activation='gelu_tanh' while x requires grad: .* activation=None and "
                             "apply the activation"),
    "scale requires grad": (dict(scale=lambda s: s.requires_grad_()), RuntimeError,
                            "int8_linear: scale requires grad, but .* frozen"),
    "bias requires grad": (dict(bias=lambda b: b.requires_grad_()), RuntimeError,
                           "int8_linear: bias requires grad, but .* frozen"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_input_is_refused_by_name(case, device):
    change, error, match = REFUSED[case]
    args = _bad(device, **change)
    with pytest.raises(error, match=match):
        int8_linear(**args)


def test_inference_under_no_grad_and_inference_mode(device):
    """The refusals are for grad mode only: the same inputs run under no_grad and inference_mode."""
    args = _bad(device, x=lambda x: x.requires_grad_(), bias=lambda b: b.requires_grad_())
    want = reference(args["x"].detach(), args["qweight"], args["scale"], args["bias"].detach())
    with torch.no_grad():
        assert_close_rel(int8_linear(**args), want, 1e-4, "no_grad")
    with torch.inference_mode():
        assert_close_rel(int8_linear(**args), want, 1e-4, "inference_mode")


def test_the_op_refuses_what_the_kernel_cannot_read(device):
    """A direct call of the op (torch.compile's view of it) checks x's layout too: a transposed x was read as if
    row-major, a wrong answer without an error."""
    q, scale, b = make(48, 64, device)
    x = torch.randn(64, 5, device=device).t()
    with pytest.raises(ValueError, match="reads x with unit stride on its last dim"):
        torch.ops.tritongpt.int8_linear(x, q, scale, b, None)
    with pytest.raises(ValueError, match="x has 60 features"):
        torch.ops.tritongpt.int8_linear(x.t()[:60].t(), q, scale, b, None)


def test_torch_compile_fullgraph_matches_eager(device):
    q, scale, b = make(130, 100, device, seed=9)
    x = torch.randn(2, 7, 100, generator=torch.Generator().manual_seed(10)).to(device)

    def block(x):
        return int8_linear(x * 0.5, q, scale, b, "gelu_tanh") + 1.0

    graphs = []

    def backend(gm, inputs):  # aot_eager, recording the graph dynamo made
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, inputs)

    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, backend=backend, fullgraph=True)(x)
    assert torch.equal(got, want)
    assert "tritongpt.int8_linear" in str(graphs[0].graph)  # the op, opaque in the graph


def test_opcheck(device):
    q, scale, b = make(130, 100, device, seed=11)
    x = torch.randn(37, 100, generator=torch.Generator().manual_seed(12)).to(device)
    op = torch.ops.tritongpt.int8_linear.default
    torch.library.opcheck(op, (x, q, scale, b, "gelu_erf"))
    torch.library.opcheck(op, (x.bfloat16(), q, scale.bfloat16(), None, None))


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.bfloat16, "tf32")])
def test_fp32_products_are_ieee(dtype, precision, device, monkeypatch):
    """fp32 dots take IEEE products (tl.dot's default is TF32, ~1e-3 relative on a GPU, which the interpreter does
    not model: the launch's flag is checked here); the flags name the epilogue asked for."""
    q, scale, b = make(48, 64, device)
    seen = []
    real = quant.launch_tuned
    monkeypatch.setattr(quant, "launch_tuned", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    int8_linear(torch.randn(3, 64, device=device, dtype=dtype), q, scale, None, "gelu_erf")
    assert seen == [dict(G=0, HAS_BIAS=False, ACTIVATION=True, GELU_ERF=True, RELU2=False,
                    PRECISION=precision)]


def test_eager_call_skips_the_dispatcher(device, monkeypatch):
    """Plain eager runs the op's function directly (_common.custom_op's .call); through the dispatcher (the fast
    path off) the same bits."""
    from tritongpt.kernels import _common

    q, scale, b = make(130, 100, device, seed=13)
    x = torch.randn(7, 100, generator=torch.Generator().manual_seed(14)).to(device, torch.bfloat16)
    seen = []
    real = quant._int8_linear_op._backend_fns[None]
    monkeypatch.setitem(quant._int8_linear_op._backend_fns, None, lambda *a, **kw: seen.append(1) or real(*a, **kw))
    fast = int8_linear(x, q, scale, b, "gelu_tanh")
    assert seen == []
    monkeypatch.setattr(_common, "plain_eager", lambda args: False)
    assert torch.equal(int8_linear(x, q, scale, b, "gelu_tanh"), fast) and seen == [1]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 8, 300])
@pytest.mark.parametrize("k,n,activation", [(768, 3072, "gelu_tanh"), (3072, 768, None)])
def test_gpt2_small_sizes_on_cuda(dtype, m, k, n, activation):
    """GPT-2 small's fc1 (with its GELU) and fc2 on a GPU: the autotuned decode tiles (1 and 8 rows) and the
    prefill ones (300), each pick against float64; torch.compile of a call gives the eager bits."""
    q, scale, b = make(n, k, "cuda", seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).to("cuda", dtype)
    b = b.to(dtype)
    with torch.no_grad():
        y = int8_linear(x, q, scale, b, activation)
        check(y, reference(x, q, scale, b, activation), dtype, f"cuda {dtype} {m}x{k}->{n}")
        compiled = torch.compile(lambda t: int8_linear(t, q, scale, b, activation), fullgraph=True)
        assert torch.equal(compiled(x), y)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 7, 333])
@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("k,n,activation", [(768, 3072, "gelu_tanh"), (3072, 768, None)])
def test_group_scales_gpt2_small_sizes_on_cuda(dtype, m, g, k, n, activation):
    """Group scales (a GPTQ 8-bit folder's) at GPT-2 small's fc1 (with its GELU) and fc2 on a GPU: the autotuned
    decode tiles (1 and 7 rows) and prefill ones (333), K steps of several groups (G 32) or inside one (G 128), against
    float64 within the 16-bit bound (TOL), rounded as a 16-bit run is (ROUNDING), and within ROUNDED of float64's
    product with the weight rounded to the dtype (the kernel rounds q * scale as the reference module does)."""
    q, scale, w64 = grouped(n, k, g, "cuda", seed=m + g)
    gen = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    b = torch.randn(n, generator=gen).to("cuda", dtype)
    with torch.no_grad():
        y = int8_linear(x, q, scale, b, activation)
    name = f"cuda {dtype} G{g} {m}x{k}->{n}"

    def act(t):
        return F.gelu(t, approximate=GELU[activation]) if activation else t

    assert y.dtype == dtype
    _, rel = assert_close_rel(y, act(x.double() @ w64.T + b.double()), TOL[dtype], name)
    assert rel > ROUNDING[dtype], f"{name}: relative error {rel:.1e}: not rounded to {dtype}?"
    want = act(x.double() @ w64.to(dtype).double().T + b.double()).to(dtype)
    assert_close_rel(y, want, ROUNDED, f"{name} against the {dtype} weight's product")
