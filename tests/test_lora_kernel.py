"""kernels/lora.py's add_lora_rows (multi-LoRA serving: each row of a batch its own adapter or none) against a float64
reference written here, row by row, on both its kernel pairs (per row, and grouped: tokens sorted into one segment an
adapter); and its refusals."""
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from parity import assert_close_mixed, assert_close_rel
from tritongpt.errors import UserError
from tritongpt.kernels import lora
from tritongpt.kernels.lora import MAX_RANK, add_lora_rows, segments
from tritongpt.model.lora import lora_rows_reference

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
VARIANTS = pytest.mark.parametrize("grouped", [False, True], ids=["rows", "grouped"])


def reference(y, x, lora_a, lora_b, index):
    """y + each row's delta in float64, one row at a time (not the gather + bmm the kernel file's torch path does)."""
    out = y.double().clone()
    for b, s in enumerate(index.tolist()):
        if s >= 0:
            out[b] += (x[b].double() @ lora_a[s].double().T) @ lora_b[s].double().T
    return out


def adapters(S, R, K, N, device, dtype, gen):
    """lora_a [S, R, K] and lora_b [S, N, R] as views of padded buffers (vLLM keeps its adapters in max-rank ones):
    every element the views leave out, the R padding and a slot before the first, is NaN, so a kernel reading past
    R (a dropped mask) or slot -1 (a row without adapter that does not return) gives NaN."""
    r_pad = max(16, 1 << (R - 1).bit_length())
    a_buf = torch.full((S + 1, r_pad, K), float("nan"), dtype=torch.float64)
    b_buf = torch.full((S + 1, N, r_pad), float("nan"), dtype=torch.float64)
    a_buf[1:, :R] = torch.randn(S, R, K, generator=gen, dtype=torch.float64) / K ** 0.5
    b_buf[1:, :, :R] = torch.randn(S, N, R, generator=gen, dtype=torch.float64)
    a_buf, b_buf = a_buf.to(device, dtype), b_buf.to(device, dtype)
    return a_buf[1:, :R], b_buf[1:, :, :R]


def case(B, T, K, N, R, S, index, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # x a non-contiguous view: [T, B, K] transposed
    x = torch.randn(T, B, K, generator=gen).to(device, dtype).transpose(0, 1)
    y = torch.randn(B, T, N, generator=gen).to(device, dtype)
    a, b = adapters(S, R, K, N, device, dtype, gen)
    return y, x, a, b, torch.tensor(index, device=device)


@VARIANTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,R,index", [(1, 5, [2, -1, 0, 2]), (19, 12, [1, -1, 1]), (19, 5, [0, 2, -1, 1])],
                         ids=["decode-R5", "prefill-R12", "prefill-R5-every-slot"])
def test_matches_float64_reference(device, dtype, T, R, index, grouped):
    """Non-power-of-two K 48, N 40 (a K and an N tile and a part), T 1 and 19 (a token tile and a part); rows without
    adapter, repeated slots and every slot; y random so the in-place add shows; x a transposed view; the adapters
    views of NaN-padded buffers. y is changed in place and returned; rows with index -1 exactly as they were."""
    S = 3
    y, x, a, b, idx = case(len(index), T, 48, 40, R, S, index, device, dtype, seed=T + R)
    y0 = y.clone()
    want = reference(y0, x, a, b, idx)
    with torch.no_grad():
        out = add_lora_rows(y, x, a, b, idx.int() if T == 1 else idx, grouped=grouped)
    assert out is y
    assert_close_rel(y, want, TOL[dtype], f"{dtype} T={T} R={R} grouped={grouped} y")
    on = idx >= 0
    assert torch.equal(y[~on], y0[~on])
    # the deltas alone, so a wrong slot cannot hide behind y's base
    assert_close_rel(y[on].double() - y0[on].double(), want[on] - y0[on].double(), TOL[dtype],
                     f"{dtype} T={T} R={R} delta")


def test_torch_path_matches_the_reference(device):
    """lora_rows_reference (AdapterLinear's, the benchmark's torch provider: gather + two bmm's) gives the float64
    loop's deltas, 0 at -1."""
    y, x, a, b, idx = case(4, 3, 48, 40, 12, 3, [2, -1, 0, 2], device, torch.float64)
    assert_close_rel(y.double() + lora_rows_reference(x, a.contiguous(), b.contiguous(), idx).double(),
                     reference(y, x, a, b, idx), 1e-12, "torch path")


@VARIANTS
def test_no_adapter_rows_leave_y_untouched(device, grouped):
    """A batch with no adapter at all: y bit for bit as it was, NaN padding or not (grouped: every segment empty)."""
    y, x, a, b, idx = case(2, 5, 48, 40, 5, 3, [-1, -1], device, torch.float32)
    y0 = y.clone()
    with torch.no_grad():
        add_lora_rows(y, x, a, b, idx, index_checked=True, grouped=grouped)
    assert torch.equal(y, y0)


def test_a_strided_or_expanded_index_gives_each_row_its_own_slot(device):
    """index a view (every other element of a longer tensor; one slot expand()ed over the batch): the per-row kernels
    read index[b] at index + b, which past a stride-1 index read a neighbour's slot or memory past the tensor (the
    grouped ones sort a copy of it)."""
    y, x, a, b, _ = case(3, 2, 48, 40, 5, 3, [0, 0, 0], device, torch.float32, seed=9)
    for idx in (torch.tensor([2, 7, -1, 7, 0, 7], device=device)[::2], torch.tensor([1], device=device).expand(3)):
        want = reference(y, x, a, b, idx)
        got = y.clone()
        with torch.no_grad():
            add_lora_rows(got, x, a, b, idx, grouped=False)
        assert_close_rel(got, want, 1e-4, f"index strides {idx.stride()}")


def test_segments_sort_tokens_by_slot():
    """The grouped kernels' map: tokens b * T + t in a stable sort by slot, -1's first, and each slot's span of it
    (slots 1 and 3 empty, their spans of length 0)."""
    order, bounds = segments(torch.tensor([2, -1, 0, 2]), 2, 4)
    assert order.tolist() == [2, 3, 4, 5, 0, 1, 6, 7]
    assert bounds.tolist() == [2, 4, 4, 8, 8]


def test_grouped_segment_longer_than_a_tile(device):
    """Slot 1 has 18 tokens from 6 rows spread through the batch: more than a tile (BLOCK_M 16 under the
    interpreter), so its segment takes two programs, the second with 2 tokens; slot 0 has 3, slot 2 none."""
    index = [1, 0, 1, 1, -1, 1, 1, 1]
    y, x, a, b, idx = case(len(index), 3, 48, 40, 5, 3, index, device, torch.float32, seed=5)
    want = reference(y, x, a, b, idx)
    with torch.no_grad():
        add_lora_rows(y, x, a, b, idx, grouped=True)
    assert_close_rel(y, want, 1e-4, "slot 1 over two tiles")


@pytest.mark.parametrize("T,grouped", [(1, True), (16, False)])
def test_grouped_none_picks_by_the_rows_tokens(device, monkeypatch, T, grouped):
    """grouped=None (AdapterLinear's call): the segment kernels when a row has fewer than 16 tokens, else per row."""
    calls = []
    monkeypatch.setattr(lora, "segments", lambda *a: calls.append(1) or segments(*a))
    y, x, a, b, idx = case(2, T, 48, 40, 5, 3, [0, 2], device, torch.float32)
    want = reference(y, x, a, b, idx)
    with torch.no_grad():
        add_lora_rows(y, x, a, b, idx, index_checked=True)
    assert bool(calls) == grouped
    assert_close_rel(y, want, 1e-4, f"T={T}")


def refusal(device, **change):
    y, x, a, b, idx = case(3, 2, 48, 40, 5, 3, [0, -1, 2], device, torch.float32)
    args = dict(y=y, x=x, lora_a=a, lora_b=b, index=idx)
    args.update({k: v(args) if callable(v) else v for k, v in change.items()})
    return args


@pytest.mark.parametrize("change,message", [
    (dict(x=lambda a: a["x"][0]), r"x must be \[B, T, K\], got shape \(2, 48\)"),
    (dict(lora_a=lambda a: a["lora_a"][..., :40]), "lora_a .* has K = 40, x .* has K = 48"),
    (dict(lora_b=lambda a: a["lora_b"][:2]), r"lora_b has shape \(2, 40, 5\), expected \[S, N, R\]"),
    (dict(lora_b=lambda a: a["lora_b"][..., :4]), r"lora_b has shape \(3, 40, 4\)"),
    (dict(y=lambda a: a["y"][:, :, :39].contiguous()), r"y has shape \(3, 2, 39\), expected"),
    (dict(y=lambda a: a["y"][:2]), r"y has shape \(2, 2, 40\)"),
    (dict(index=lambda a: a["index"][:2]), r"index has shape \(2,\), expected \(3,\)"),
    (dict(lora_a=lambda a: torch.zeros(3, MAX_RANK + 1, 48), lora_b=lambda a: torch.zeros(3, 40, MAX_RANK + 1)),
     f"rank R = {MAX_RANK + 1} is above the kernel's largest, {MAX_RANK}"),
    (dict(lora_b=lambda a: a["lora_b"].double()), "lora_b is float64, x is float32"),
    (dict(y=lambda a: a["y"].bfloat16()), "y is bfloat16, x is float32"),
    (dict(x=lambda a: a["x"].int(), y=lambda a: a["y"].int()), "x has dtype int32; expected float32"),
    (dict(index=lambda a: a["index"].float()), "index has dtype float32; expected int32 or int64"),
    (dict(index=lambda a: a["index"].to("meta")), "index is on meta, x on"),
    (dict(lora_a=lambda a: a["lora_a"].to("meta")), "lora_a is on meta, x on"),
    (dict(x=lambda a: a["x"].transpose(1, 2).contiguous().transpose(1, 2)), "x must have unit stride on its last"),
    (dict(y=lambda a: a["y"].transpose(0, 1).contiguous().transpose(0, 1)), "y must be contiguous"),
    (dict(index=lambda a: torch.tensor([0, 3, -1], device=a["x"].device)), r"index\[1\] = 3 is outside \[-1, 3\)"),
    (dict(index=lambda a: torch.tensor([0, -1, -2], device=a["x"].device)), r"index\[2\] = -2 is outside"),
    (dict(x=lambda a: a["x"].clone().requires_grad_()), "x requires grad; the kernel is inference-only"),
    (dict(lora_b=lambda a: a["lora_b"].clone().requires_grad_()), "lora_b requires grad"),
    (dict(lora_a=lambda a: a["lora_a"].clone().requires_grad_()), "lora_a requires grad"),
    (dict(grouped="yes"), "grouped must be None .* True or False, got 'yes'"),
    (dict(index_checked="no"), "index_checked must be a bool, got str 'no'"),  # truthy: the range check skipped
], ids=["x-rank", "K", "S", "R", "N", "B-y", "B-index", "max-rank", "dtype-lora_b", "dtype-y", "dtype-float",
        "dtype-index", "device-index", "device-lora_a", "x-stride", "y-stride", "index-above", "index-below",
        "grad-x", "grad-lora_b", "grad-lora_a", "grouped", "index_checked"])
def test_refusals_name_the_problem(device, change, message):
    args = refusal(device, **change)
    y0 = args["y"].clone()
    with pytest.raises(UserError, match=message):
        add_lora_rows(**args)
    assert torch.equal(args["y"], y0)


def test_grad_refusal_is_only_where_grad_is_enabled(device):
    """Under no_grad a weight that requires grad is fine (serving's frozen copy of a trained one)."""
    args = refusal(device, lora_a=lambda a: a["lora_a"].clone().requires_grad_())
    want = reference(args["y"], args["x"], args["lora_a"], args["lora_b"], args["index"])
    with torch.no_grad():
        add_lora_rows(**args)
    assert_close_rel(args["y"], want, 1e-4, "under no_grad")


@VARIANTS
def test_index_checked_skips_the_range_check(device, grouped):
    """index_checked=True reads no index back: slot S of adapters that are the first S of S + 1 in memory is taken
    as the caller's word instead of refused. The per-row kernels read it (here the next adapter, which exists); the
    grouped ones sort it past every segment, so that row is left as it is. An index below -1 is no adapter on both
    pairs: the per-row kernels return on any negative slot, the grouped ones sort it before every segment."""
    y, x, a, b, _ = case(2, 3, 48, 40, 5, 3, [0, 0], device, torch.float32)
    index = torch.tensor([2, -3], device=device)
    want = y.double() if grouped else reference(y, x, a, b, index)
    with pytest.raises(UserError, match=r"index\[0\] = 2 is outside \[-1, 2\)"):
        add_lora_rows(y, x, a[:2], b[:2], index, grouped=grouped)
    add_lora_rows(y, x, a[:2], b[:2], index, index_checked=True, grouped=grouped)
    assert_close_rel(y, want, 1e-4, "slot 2 of 2")


@pytest.mark.cuda
@VARIANTS
@pytest.mark.parametrize("T", [1, 128])
@pytest.mark.parametrize("K,N", [(768, 2304), (768, 3072), (3072, 768)])
def test_gpt2_small_widths_on_cuda(T, K, N, grouped):
    """GPT-2 small's qkv, fc1 and fc2 at R 16 in bf16, 8 rows over 4 adapters and the base model, decode and prefill."""
    index = [0, -1, 3, 1, 1, 2, -1, 0]
    y, x, a, b, idx = case(8, T, K, N, 16, 4, index, "cuda", torch.bfloat16, seed=K + N + T)
    y0 = y.clone()
    want = reference(y0, x, a, b, idx)
    with torch.no_grad():
        add_lora_rows(y, x, a, b, idx, grouped=grouped)
    assert_close_rel(y, want, 1e-2, f"cuda bf16 T={T} {K}->{N} grouped={grouped}")
    on = idx >= 0
    assert torch.equal(y[~on], y0[~on])
    assert_close_rel(y[on].double() - y0[on].double(), want[on] - y0[on].double(), 1e-2, "delta")


# -- shape fuzz --------------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes under the interpreter
@given(B=st.integers(0, 5), T=st.integers(0, 40), K=st.integers(1, 80), N=st.integers(1, 80),
       R=st.one_of(st.integers(1, 40), st.sampled_from([64, 100, MAX_RANK])), S=st.integers(1, 4),
       grouped=st.sampled_from([None, False, True]), int32=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
@example(B=2, T=25, K=1, N=25, R=1, S=2, grouped=True, int32=True, dtype=torch.bfloat16, seed=1024)  # the floor's
def test_shape_fuzz(B, T, K, N, R, S, grouped, int32, dtype, seed):
    """add_lora_rows against the float64 loop over rows, slots, tokens (partial token tiles, decode's 1, none),
    widths, ranks up to MAX_RANK, each kernel pair, int32 or int64 slots, each float dtype: y and the deltas
    alone within 1e-4 (fp32) or 1e-2 (16-bit), the deltas with a floor of y's rounding; rows with index -1 exactly
    as they were."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(-1, S, (B,), generator=gen).tolist()
    y, x, a, b, idx = case(B, T, K, N, R, S, index, device, dtype, seed=seed)
    idx = idx.to(torch.int32 if int32 else torch.int64)  # (an empty list makes a float tensor)
    y0 = y.clone()
    want = reference(y0, x, a, b, idx)
    with torch.no_grad():
        out = add_lora_rows(y, x, a, b, idx, grouped=grouped)
    assert out is y and y.dtype == dtype
    what = f"{dtype} B={B} T={T} K={K} N={N} R={R} S={S} grouped={grouped} index={index}"
    on = idx >= 0
    assert torch.equal(y[~on], y0[~on]), what
    if y[on].numel():
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert_close_rel(y, want, tol, f"y {what}")
        # the delta read back from y carries y's rounding (eps of |y| at most): at K 1, R 1 a delta is a product of
        # three normals, often small beside y, and 2e-2 off relative in bf16 from that rounding alone
        floor = torch.finfo(dtype).eps * want[on].norm().item()
        assert_close_mixed(y[on].double() - y0[on].double(), want[on] - y0[on].double(), tol, floor, f"delta {what}")
