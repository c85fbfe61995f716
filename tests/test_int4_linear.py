"""kernels/quant.py's int4_linear (W4A16: q in 0..15 packed two a byte, an fp32 scale and offset a group of G inputs)
against float64 and against model/quant.py's Int4Linear.

The kernel dequantizes each weight tile in fp32 (q * scale + offset) and rounds it to the compute dtype before the
dot, as the reference's dequantize().to(x.dtype) does: in fp32 the weight is the reference's, so fp32 differs from
float64 by the weight's fp32 rounding and the summation order; bf16/fp16 round x, the weight, the bias and y.
The interpreter's tile has BLOCK_K 64: G 16 and 32 put 4 and 2 whole groups in a K step, G 64 one, G 128 half of one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

from parity import assert_close_rel, report
from tritongpt.kernels import quant
from tritongpt.kernels.quant import int4_linear
from tritongpt.model.quant import Int4Linear, quantize_weight_int4, unpack_int4

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# the least relative error a 16-bit run shows on these shapes (x, the weight and y rounded): above fp32's ~1e-7
ROUNDING = {torch.bfloat16: 1e-4, torch.float16: 1e-5}
# ... and the most it may differ from float64's product of x and the weight dequantized in fp32 and rounded to the
# 16-bit dtype (the reference's weight), rounded to that dtype: the kernel's only other rounding is y's (the K sum,
# the bias add and the GELU are fp32). A weight rounded twice (q * scale in the 16-bit dtype, then + offset), or a
# pre-GELU value rounded first, is ~1e-3 away: within TOL, not within this
ROUNDED = 3e-4
GELU = {"gelu_tanh": "tanh", "gelu_erf": "none"}


def make(n, k, group_size, device, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    w[1, :group_size] = 0.25  # a constant group: scale 1, q 0, the offset the value itself
    q, scale, offset = quantize_weight_int4(w, group_size)
    b = torch.randn(n, generator=gen) if bias else None
    return q.to(device), scale.to(device), offset.to(device), (b.to(device) if bias else None)


def dequantized(q, scale, offset, dtype=torch.float64):
    """W = q * scale + offset per group: in float64, or (dtype fp32/16-bit) as the reference makes it, in fp32
    then rounded to dtype."""
    N, groups = scale.shape
    if dtype == torch.float64:
        u, s, o = unpack_int4(q).double(), scale.double(), offset.double()
    else:
        u, s, o = unpack_int4(q).float(), scale.float(), offset.float()
    w = u.view(N, groups, -1) * s[:, :, None] + o[:, :, None]
    return w.view(N, -1).to(dtype).double()


def reference(x, q, scale, offset, bias=None, activation=None, weight_dtype=torch.float64):
    """float64: x @ W.T + bias, then the GELU (or the squared ReLU)."""
    y = x.double() @ dequantized(q, scale, offset, weight_dtype).T
    if bias is not None:
        y = y + bias.double()
    if activation == "relu2":
        return F.relu(y) ** 2
    return F.gelu(y, approximate=GELU[activation]) if activation else y


def check(y, x, q, scale, offset, bias, activation, dtype, name):
    assert y.dtype == dtype, f"{name}: y is {y.dtype}, expected {dtype}"
    _, rel = assert_close_rel(y, reference(x, q, scale, offset, bias, activation), TOL[dtype], name)
    if dtype in ROUNDING:
        assert rel > ROUNDING[dtype], f"{name}: relative error {rel:.1e}: not rounded to {dtype}?"
        want = reference(x, q, scale, offset, bias, activation, weight_dtype=dtype).to(dtype)
        assert_close_rel(y, want, ROUNDED, f"{name} against the {dtype} weight's product rounded to {dtype}")
    return rel


# (M, K, N, G): M 1, 7, 37 against the 32-row tile, N 48 and 130 against the 64-wide one; K 64 one step of 4 groups,
# 80 a step of 4 groups then a partial step of one, 96 a step of 2 then a partial one, 192 three steps of one group
# each, 256 two steps a group
SHAPES = [(1, 64, 48, 16), (7, 80, 130, 16), (37, 96, 130, 32), (37, 192, 48, 64), (7, 256, 48, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m,k,n,g", SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu_tanh", "gelu_erf"])
def test_parity_against_float64(dtype, m, k, n, g, activation, device):
    q, scale, offset, b = make(n, k, g, device, seed=m + n + g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(device, dtype)
    b16 = b.to(dtype)
    with torch.no_grad():
        check(int4_linear(x, q, scale, offset, b16, activation), x, q, scale, offset, b16, activation, dtype,
              f"{dtype} {m}x{k}->{n} G{g} {activation} bias")
        if activation is None:  # without a bias
            check(int4_linear(x, q, scale, offset), x, q, scale, offset, None, None, dtype,
                  f"{dtype} {m}x{k}->{n} G{g} no bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n,g", [SHAPES[1], SHAPES[3]])
def test_relu2_epilogue_against_float64(dtype, m, k, n, g, device):
    """The squared-ReLU MLP's fc1 (mlp "relu2"): relu(y)^2 in the epilogue, after the bias, in fp32 then one
    rounding."""
    q, scale, offset, b = make(n, k, g, device, seed=m + n + g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(device, dtype)
    b16 = b.to(dtype)
    with torch.no_grad():
        y = int4_linear(x, q, scale, offset, b16, "relu2")
    check(y, x, q, scale, offset, b16, "relu2", dtype, f"{dtype} {m}x{k}->{n} G{g} relu2")
    assert (y == 0).any() and (y > 0).any()  # (both sides of the ReLU met)


@pytest.mark.parametrize("g", [16, 64])
def test_every_nibble_and_group_lands_on_its_input(g, device):
    """One-hot x picks one column of W: each k's nibble (low for even k, high for odd) and its group's scale and
    offset, at every k of two K steps, in fp32 (a swapped nibble or a group off by one is a wrong column: O(1) off;
    a GPU may fuse q * scale + offset into one rounding, the reference rounds twice: 1e-6)."""
    k, n = 128, 48
    q, scale, offset, _ = make(n, k, g, device, seed=g)
    y = int4_linear(torch.eye(k, device=device), q, scale, offset)
    assert_close_rel(y, dequantized(q, scale, offset).T, 1e-6, f"one-hot x, G{g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_leading_dims_and_strided_inputs(dtype, device, monkeypatch):
    """[2, 3, K] -> [2, 3, N]; a transposed view of x (copied to rows); rows at a stride > K (read in place); the
    weight's rows at a stride and scale/offset views at strides along both dims (read in place)."""
    k, n, g = 96, 48, 32
    q, scale, offset, b = make(n, k, g, device, seed=3)
    b = b.to(dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, k, generator=gen).to(device, dtype)
    y = int4_linear(x, q, scale, offset, b, "gelu_tanh")
    assert y.shape == (2, 3, n)
    check(y, x, q, scale, offset, b, "gelu_tanh", dtype, "leading dims")
    xt = torch.randn(k, 5, generator=gen).to(device, dtype).t()
    check(int4_linear(xt, q, scale, offset, b), xt, q, scale, offset, b, None, dtype, "transposed x")
    wide = torch.full((9, k + 28), float("nan"), device=device, dtype=dtype)
    xs = wide[:, 10:10 + k]  # NaN either side: a load past K's edge would show
    xs.copy_(torch.randn(9, k, generator=gen))
    seen = []
    real = quant._launch_int4
    monkeypatch.setattr(quant, "_launch_int4", lambda x, *a: seen.append(x.stride()) or real(x, *a))
    check(int4_linear(xs, q, scale, offset, b), xs, q, scale, offset, b, None, dtype, "rows at a stride")
    assert seen == [(k + 28, 1)]  # not copied
    q2, scale2, offset2, b2 = make(2 * n, k, g, device, seed=15)
    b2 = b2.to(dtype)
    q2, b2 = q2[::2], b2[::2]
    scale2 = scale2[::2].t().contiguous().t()  # [N, groups] at strides (1, N)
    offset2 = offset2[::2]  # at strides (2 * groups, 1)
    assert q2.stride() == (k, 1) and scale2.stride() == (1, n) and offset2.stride() == (2 * k // g, 1)
    check(int4_linear(x, q2, scale2, offset2, b2), x, q2, scale2, offset2, b2, None, dtype,
          "strided weight, scale, offset and bias")


def test_autocast_computes_in_its_dtype(device):
    k, n, g = 96, 130, 32
    q, scale, offset, b = make(n, k, g, device, seed=5)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(6)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = int4_linear(x, q, scale, offset, b, "gelu_erf")
    xb, bb = x.bfloat16(), b.bfloat16()
    check(y, xb, q, scale, offset, bb, "gelu_erf", torch.bfloat16, "autocast bf16")
    assert torch.equal(y, int4_linear(xb, q, scale, offset, bb, "gelu_erf"))
    assert report(y, reference(x, q, scale, offset, b, "gelu_erf"))[1] > ROUNDING[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("g", [16, 64])
@pytest.mark.parametrize("activation", [None, "gelu_tanh", "gelu_erf"])
def test_matches_the_reference_module(dtype, g, activation, device):
    """Int4Linear with use_triton False (dequantize, F.linear, the GELU module) and True (this kernel) agree."""
    k, n = 128, 130
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(g)) * k ** -0.5)
    layer = Int4Linear.from_linear(lin, group_size=g).to(device, dtype)
    assert layer.scale.dtype == torch.float32  # kept fp32 by QuantLinear._apply
    act = None if activation is None else nn.GELU(approximate=GELU[activation])
    x = torch.randn(2, 7, k, generator=torch.Generator().manual_seed(g + 1)).to(device, dtype)
    with torch.no_grad():
        layer.use_triton = False
        want = layer(x, act)
        layer.use_triton = True
        got = layer(x, act)
    assert got.dtype == want.dtype == dtype
    assert_close_rel(got, want, 1e-5 if dtype == torch.float32 else 1e-2, f"Int4Linear {dtype} G{g} {activation}")


def test_nan_stays_in_its_row(device):
    k, n, g = 96, 130, 16
    q, scale, offset, b = make(n, k, g, device, seed=7)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(8)).to(device)
    x[20, k - 1] = float("nan")  # the last column: in the K edge's partial step
    y = int4_linear(x, q, scale, offset, b, "gelu_tanh")
    assert torch.isnan(y[20]).all()
    rest = torch.cat([y[:20], y[21:]])
    assert torch.isfinite(rest).all()
    ref = reference(x, q, scale, offset, b, "gelu_tanh")
    assert_close_rel(rest, torch.cat([ref[:20], ref[21:]]), 1e-4, "rows without the NaN")


def test_no_rows_launches_nothing(device, monkeypatch):
    q, scale, offset, b = make(48, 64, 16, device)
    launches = []
    monkeypatch.setattr(quant, "launch_tuned", lambda *a, **kw: launches.append(a))
    y = int4_linear(torch.randn(2, 0, 64, device=device), q, scale, offset, b)
    assert y.shape == (2, 0, 48) and y.dtype == torch.float32 and launches == []


def _bad(device, **change):
    """int4_linear's arguments (x [5, 64], qweight [48, 32], scale and offset [48, 4]: G 16) with some replaced."""
    q, scale, offset, b = make(48, 64, 16, device)
    args = dict(x=torch.randn(5, 64, device=device), qweight=q, scale=scale, offset=offset, bias=b, activation=None)
    for name, fn in change.items():
        args[name] = fn(args[name])
    return args


REFUSED = {
    "qweight int8": (dict(qweight=lambda q: q.to(torch.int8)), TypeError, "qweight has dtype int8; expected one of: "
                     "uint8"),
    "qweight float": (dict(qweight=lambda q: q.float()), TypeError, "qweight has dtype float32"),
    "qweight 3-D": (dict(qweight=lambda q: q[None]), ValueError, "qweight must have 2 dims"),
    "qweight 1-D": (dict(qweight=lambda q: q[0]), ValueError, "qweight must have 2 dims"),
    "qweight along K strided": (dict(qweight=lambda q: q.t().contiguous().t()), ValueError,
                                "qweight must have unit stride along its last dim"),
    "K mismatch": (dict(x=lambda x: x[:, :60]), ValueError, r"x has 60 features .* K = 64"),
    "x unpacked K": (dict(x=lambda x: x[:, :32]), ValueError, r"x has 32 features .* K = 64"),
    "scale int": (dict(scale=lambda s: s.int()), TypeError, "scale has dtype int32"),
    "offset int": (dict(offset=lambda o: o.long()), TypeError, "offset has dtype int64"),
    "scale rows": (dict(scale=lambda s: s[:47]), ValueError, r"scale has shape \(47, 4\); expected \[N, K / G\]"),
    "scale 1-D": (dict(scale=lambda s: s[:, 0]), ValueError, "scale must have 2 dims"),
    "group size 8": (dict(scale=lambda s: s.repeat(1, 2), offset=lambda o: o.repeat(1, 2)), ValueError,
                     r"scale has shape \(48, 8\); .* group size G in 16, 32"),
    "group size 64 / 3": (dict(scale=lambda s: s[:, :3], offset=lambda o: o[:, :3]), ValueError,
                          r"scale has shape \(48, 3\)"),
    "no groups": (dict(scale=lambda s: s[:, :0], offset=lambda o: o[:, :0]), ValueError,
                  r"scale has shape \(48, 0\)"),
    "offset shape": (dict(offset=lambda o: o[:, :2]), ValueError, r"offset has shape \(48, 2\), expected \(48, 4\)"),
    "bias shape": (dict(bias=lambda b: b[:40]), ValueError, r"bias has shape \(40,\), expected \(48,\)"),
    "bias int": (dict(bias=lambda b: b.long()), TypeError, "bias has dtype int64"),
    "x int": (dict(x=lambda x: x.long()), TypeError, "x has dtype int64"),
    "x scalar": (dict(x=lambda x: x[0, 0]), ValueError, "x must have at least 1 dim"),
    "x not a tensor": (dict(x=lambda x: x.tolist()), TypeError, "x must be a torch.Tensor"),
    "devices scale": (dict(scale=lambda s: s.to("meta")), ValueError,
                      "tensors on different devices: .*scale is on meta"),
    "devices offset": (dict(offset=lambda o: o.to("meta")), ValueError,
                       "tensors on different devices: .*offset is on meta"),
    "empty N": (dict(qweight=lambda q: q[:0], scale=lambda s: s[:0], offset=lambda o: o[:0], bias=lambda b: b[:0]),
                ValueError, r"qweight has shape \(0, 32\); N \(outputs\)"),
    "activation": (dict(activation=lambda a: "relu"), ValueError,
                   "int4_linear: activation must be None, 'gelu_tanh', 'gelu_erf' or 'relu2'"),
    # x's gradient flows through the frozen weight (tests/test_quant_dx.py); the rest get none
    "activation with grad": (dict(x=lambda x: x.requires_grad_(), activation=lambda a: "gelu_erf"), RuntimeError,
                             "int4_linear: activation='gelu_erf' while x requires grad: .* activation=None and "
                             "apply the activation"),
    "scale requires grad": (dict(scale=lambda s: s.requires_grad_()), RuntimeError,
                            "int4_linear: scale requires grad, but .* frozen"),
    "offset requires grad": (dict(offset=lambda o: o.requires_grad_()), RuntimeError,
                             "int4_linear: offset requires grad, but .* frozen"),
    "bias requires grad": (dict(bias=lambda b: b.requires_grad_()), RuntimeError,
                           "int4_linear: bias requires grad, but .* frozen"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_input_is_refused_by_name(case, device):
    change, error, match = REFUSED[case]
    args = _bad(device, **change)
    with pytest.raises(error, match=match):
        int4_linear(**args)


@pytest.mark.parametrize("case", ["qweight int8", "qweight along K strided", "K mismatch", "group size 8",
                                  "offset shape", "bias shape", "devices offset", "activation"])
def test_the_op_refuses_by_name_too(case, device):
    """A direct call of the op (torch.compile's view of it) makes the same checks, and its layout one: a transposed x
    was read as if row-major, a wrong answer without an error."""
    change, error, match = REFUSED[case]
    args = _bad(device, **change)
    with pytest.raises(error, match=match):
        torch.ops.tritongpt.int4_linear(*args.values())
    q, scale, offset, b = make(48, 64, 16, device)
    with pytest.raises(ValueError, match="reads x with unit stride on its last dim"):
        torch.ops.tritongpt.int4_linear(torch.randn(64, 5, device=device).t(), q, scale, offset, b, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_an_act_order_layer_gathers_x_into_its_stored_order_on_both_paths(dtype, device):
    """An act-order GPTQ layer (in_perm: stored column j is input in_perm[j], train/hf_quant.py) is the matrix
    dequantize() gives, in the inputs' own order, times x as it is: both paths within the kernel's TOL of float64,
    in every dtype (the gather only moves x's values: no rounding of its own), and torch.compile fullgraph the
    same. Without the gather (or gathering by the inverse order) the result is O(1) off."""
    k, n = 96, 48
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(5)) * k ** -0.5)
    layer = Int4Linear.from_linear(lin, group_size=32)
    layer.set_in_perm(torch.randperm(k, generator=torch.Generator().manual_seed(6)))
    layer = layer.to(device, dtype)
    assert layer.in_perm.dtype == torch.int64 and layer.scale.dtype == torch.float32
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    w = layer.dequantize().double()  # (the inputs' own order)
    want = x.double() @ w.T + layer.bias.double()
    unordered = x.double() @ layer._stored().double().T + layer.bias.double()  # (the stored order: no gather)
    assert (unordered - want).abs().max() > 0.1 * want.abs().max()
    with torch.no_grad():
        for use_triton in (False, True):
            layer.use_triton = use_triton
            got = layer(x)
            assert got.dtype == dtype
            assert_close_rel(got, want, TOL[dtype], f"act-order {dtype} triton={use_triton}")
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, got)


def test_inference_under_no_grad_and_inference_mode(device):
    args = _bad(device, x=lambda x: x.requires_grad_(), bias=lambda b: b.requires_grad_())
    want = reference(args["x"].detach(), args["qweight"], args["scale"], args["offset"], args["bias"].detach())
    with torch.no_grad():
        assert_close_rel(int4_linear(**args), want, 1e-4, "no_grad")
    with torch.inference_mode():
        assert_close_rel(int4_linear(**args), want, 1e-4, "inference_mode")


def test_torch_compile_fullgraph_matches_eager(device):
    q, scale, offset, b = make(130, 96, 32, device, seed=9)
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(10)).to(device)

    def block(x):
        return int4_linear(x * 0.5, q, scale, offset, b, "gelu_tanh") + 1.0

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, inputs)

    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, backend=backend, fullgraph=True)(x)
    assert torch.equal(got, want)
    assert "tritongpt.int4_linear" in str(graphs[0].graph)  # the op, opaque in the graph


def test_opcheck(device):
    q, scale, offset, b = make(130, 96, 32, device, seed=11)
    x = torch.randn(37, 96, generator=torch.Generator().manual_seed(12)).to(device)
    op = torch.ops.tritongpt.int4_linear.default
    torch.library.opcheck(op, (x, q, scale, offset, b, "gelu_erf"))
    torch.library.opcheck(op, (x.bfloat16(), q, scale.bfloat16(), offset.bfloat16(), None, None))


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.bfloat16, "tf32")])
def test_fp32_products_are_ieee_and_g_is_the_groups(dtype, precision, device, monkeypatch):
    """fp32 dots take IEEE products (the interpreter does not model TF32: the launch's flag is checked); G is K over
    scale's second dim; the flags name the epilogue asked for."""
    q, scale, offset, b = make(48, 128, 32, device)
    seen = []
    real = quant.launch_tuned
    monkeypatch.setattr(quant, "launch_tuned", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    int4_linear(torch.randn(3, 128, device=device, dtype=dtype), q, scale, offset, None, "gelu_erf")
    assert seen == [dict(G=32, HAS_BIAS=False, ACTIVATION=True, GELU_ERF=True, RELU2=False,
                    PRECISION=precision)]


def test_prune_keeps_decode_or_prefill_tiles_a_g_fits():
    """The GPU configs' prune: decode tiles (BLOCK_M 16) up to 16 rows, prefill ones above, and no K step of more
    than MAX_GROUPS_A_STEP groups while a config with fewer is left."""
    import triton

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64, "BLOCK_K": k, "GROUP_M": 1})
               for m, k in ((16, 256), (16, 128), (64, 64), (128, 256))]
    blocks = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) for c in cs]  # noqa: E731
    assert blocks(quant._int4_prune(configs, {"M_BUCKET": 1}, G=128)) == [(16, 256), (16, 128)]
    assert blocks(quant._int4_prune(configs, {"M_BUCKET": 16}, G=16)) == [(16, 128)]  # 256 / 16 = 16 groups
    assert blocks(quant._int4_prune(configs, {"M_BUCKET": 32}, G=16)) == [(64, 64)]
    assert blocks(quant._int4_prune(configs[:1], {"M_BUCKET": 1}, G=16)) == [(16, 256)]  # the only one: kept
    assert all(c.kwargs["BLOCK_K"] in (16, 32, 64, 128, 256, 512, 1024) for c in quant._int4_configs())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 8, 300])
@pytest.mark.parametrize("k,n,activation", [(768, 3072, "gelu_tanh"), (3072, 768, None)])
def test_gpt2_small_sizes_on_cuda(dtype, m, k, n, activation):
    """GPT-2 small's fc1 (with its GELU) and fc2 at G 128 on a GPU: the autotuned decode tiles (1 and 8 rows) and
    the prefill ones (300), each pick against float64; torch.compile of a call gives the eager bits."""
    q, scale, offset, b = make(n, k, 128, "cuda", seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).to("cuda", dtype)
    b = b.to(dtype)
    with torch.no_grad():
        y = int4_linear(x, q, scale, offset, b, activation)
        check(y, x, q, scale, offset, b, activation, dtype, f"cuda {dtype} {m}x{k}->{n} G128")
        compiled = torch.compile(lambda t: int4_linear(t, q, scale, offset, b, activation), fullgraph=True)
        assert torch.equal(compiled(x), y)


def _gpu_tiles():
    """The GPU branch's configs of _int4_configs (the interpreter launches one tile of its own)."""
    import tritongpt.kernels.quant as kq

    real = kq.triton_interpreting
    kq.triton_interpreting = lambda: False
    try:
        return [c.kwargs for c in kq._int4_configs()]
    finally:
        kq.triton_interpreting = real


@pytest.mark.parametrize("g", [16, 128, 1024])  # several groups a K step; one whole; part of one
def test_every_gpu_tile_reads_its_groups_right(g, device):
    """The GPU's decode and prefill tiles (BLOCK_K 64 to 256: up to 16 groups a K step at G 16, a sixteenth of one at
    G 1024), which the interpreter's one tile never takes: each launched on the kernel itself at a K of whole steps
    and a partial one past them, rows and columns past the tile edges, against float64 (fp32, IEEE products). A step
    whose first group, group mask or scale tile were off is O(1) wrong."""
    tiles = _gpu_tiles()
    assert {t["BLOCK_K"] for t in tiles} == {64, 128, 256}
    for t in tiles:
        bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
        k = max(g, bk) + g  # a partial last step when the step holds several groups, whole steps otherwise
        m, n = 3 if bm == 16 else bm + 3, bn + 5
        q, scale, offset, b = make(n, k, g, device, seed=bk + bn + g)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(g + bm)).to(device)
        y = torch.full((m, n), float("nan"), device=device)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        quant._int4_linear_kernel.fn[grid](
            x, q, scale, offset, b, y, m, n, k, quant._bucket(m), x.stride(0), q.stride(0), scale.stride(0),
            scale.stride(1), offset.stride(0), offset.stride(1), y.stride(0), G=g, HAS_BIAS=True, ACTIVATION=False,
            GELU_ERF=False, RELU2=False, PRECISION="ieee", **t)
        assert_close_rel(y, reference(x, q, scale, offset, b), 1e-5, f"tile {t} G{g} K{k} {m}x{n}")
