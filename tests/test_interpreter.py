"""Triton's CPU interpreter as the kernels run in it: kernels/_common.skip_interpreter_repatching (triton.language
patched once a launch, not again at every device-function call) changes nothing but the time."""
import dataclasses
import inspect

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from tritongpt.kernels import _common


@triton.jit
def _twice_the_sum(x):
    return tl.sum(x, axis=0) * 2  # a device function calling another (tl.sum is a @triton.jit one too)


@triton.jit
def _sums_kernel(x_ptr, out_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * N + tl.arange(0, N))
    tl.store(out_ptr + row, _twice_the_sum(x) + _twice_the_sum(x * x))


def _launch_counting_getmembers(monkeypatch, x):
    """The kernel's output on x [rows, N] and how many times the interpreter listed a module's members meanwhile."""
    calls = []
    real = inspect.getmembers
    monkeypatch.setattr(inspect, "getmembers", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = torch.empty(x.shape[0])
    _sums_kernel[(x.shape[0],)](x, out, x.shape[1])
    monkeypatch.setattr(inspect, "getmembers", real)
    return out, len(calls)


def test_device_calls_do_not_patch_again_and_the_kernels_answer_is_the_same(monkeypatch):
    if not _common.INTERPRETER_FAST:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) with the pieces the shim wraps")
    x = torch.randn(5, 16)
    want = 2 * (x.double().sum(1) + (x.double() ** 2).sum(1))
    fast, fast_lists = _launch_counting_getmembers(monkeypatch, x)
    # Triton's own behaviour: every device call (20 here: 5 programs x 2 calls x (ours + tl.sum)) patches again
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.triton_patch)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", interpreter.GridExecutor.__call__.__wrapped__)
    slow, slow_lists = _launch_counting_getmembers(monkeypatch, x)
    assert torch.equal(fast, slow)
    assert ((fast.double() - want).norm() / want.norm()).item() < 1e-6
    assert fast_lists <= 8 < 40 <= slow_lists, (fast_lists, slow_lists)  # (the first device call may patch tl.core)
    # the launch's own patching is undone when it ends, as Triton does: tl.load is the compiler's builtin again
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.arange)


@triton.jit
def _int_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    a, b = tl.load(a_ptr + offs), tl.load(b_ptr + offs)
    tl.store(out_ptr + offs, a * b + a - b)  # int32 ops: each one sanitized, unless skipped


def test_overflow_checks_the_interpreter_drops_are_not_computed_and_the_kernels_answer_is_the_same(monkeypatch):
    """kernels/_common.skip_discarded_overflow_checks: Triton's int32 + - * build an int64 overflow check for a
    device_assert that does nothing with debug off (the interpreter's always); skipped, the same answers (an
    overflow wraps, as compiled code does), and no check is built."""
    if not _common.INTERPRETER_NO_OVERFLOW_CHECKS:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) with the options the shim changes")
    builder = interpreter.interpreter_builder
    assert builder.options.sanitize_overflow is False and builder.options.debug is False
    a = torch.randint(-2**31, 2**31 - 1, (3, 16), dtype=torch.int32)  # (a * b overflows: it wraps)
    b = torch.randint(-2**31, 2**31 - 1, (3, 16), dtype=torch.int32)
    want = (a.long() * b.long() + a.long() - b.long() + 2**31) % 2**32 - 2**31
    built = []
    real = interpreter.interpreter_semantic.less_equal
    monkeypatch.setattr(interpreter.interpreter_semantic, "less_equal", lambda *x: built.append(1) or real(*x))
    answers = {}
    for sanitized in (False, True):
        monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=sanitized))
        out = torch.empty_like(a)
        before = len(built)
        _int_kernel[(3,)](a, b, out, 16)
        answers[sanitized] = (out, len(built) - before)
    assert torch.equal(answers[False][0], want.int()) and torch.equal(answers[True][0], want.int())
    assert answers[False][1] == 0 < answers[True][1], answers  # (Triton's own: 3 ops x 3 programs checked)


def test_the_interpreters_dtype_table_built_once_gives_tritons_answers():
    """kernels/_common.memoize_interpreter_dtypes: a Triton dtype's NumPy one from a table built once, as Triton's
    _get_np_dtype (which builds its table on every call) gives it: scalars, blocks, pointers, blocks of pointers."""
    if not _common.INTERPRETER_DTYPES_MEMOIZED:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) with the function the shim replaces")
    fast = interpreter._get_np_dtype
    slow = fast.triton_get_np_dtype
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32, tl.int64, tl.uint64,
               tl.float16, tl.bfloat16, tl.float32, tl.float64, tl.float8e5, tl.float8e4nv]
    types = scalars + [tl.block_type(t, [4, 8]) for t in scalars] + [tl.pointer_type(t) for t in scalars]
    types += [tl.block_type(tl.pointer_type(tl.float32), [16]), tl.block_type(tl.bfloat16, [2, 4, 1])]
    for _ in range(2):  # (the second time from the table)
        for t in types:
            assert fast(t) == slow(t), t
    with pytest.raises(KeyError):  # (a dtype Triton has no NumPy type for: its own error, each time)
        fast(tl.void)


def test_tensors_of_one_shape_share_it_and_hold_what_tritons_constructor_gives(monkeypatch):
    """kernels/_common.share_interpreter_shapes: tl.tensor's shape and numel made once a block shape; every field
    as Triton's own constructor sets it, and a kernel's answer the same with either."""
    if not _common.INTERPRETER_SHAPES_SHARED:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) with the constructor the shim replaces")
    ours = tl.core.tensor.__init__
    theirs = ours.triton_init
    for ty in (tl.block_type(tl.float32, [4, 8]), tl.block_type(tl.pointer_type(tl.bfloat16), [16]), tl.int32):
        a, b, want = (object.__new__(tl.core.tensor) for _ in range(3))
        ours(a, "h", ty)
        ours(b, "h2", ty)
        theirs(want, "h", ty)
        assert (a.handle, a.type, a.dtype, a.numel.value) == (want.handle, want.type, want.dtype, want.numel.value)
        assert [d.value for d in a.shape] == [d.value for d in want.shape] and a.shape.type == want.shape.type
        assert a.shape is b.shape and a.numel is b.numel  # (made once a shape)
    x = torch.randn(5, 16)
    fast, _ = _launch_counting_getmembers(monkeypatch, x)
    monkeypatch.setattr(tl.core.tensor, "__init__", theirs)
    slow, _ = _launch_counting_getmembers(monkeypatch, x)
    assert torch.equal(fast, slow)


def test_block_types_made_from_a_table_hold_what_tritons_constructor_gives_and_refuse_what_it_refuses():
    """kernels/_common.share_interpreter_block_types: a block type's shape, numel and name checked and made once an
    (element type, shape), then copied; the same fields as Triton's constructor, its errors on the first call."""
    if not _common.INTERPRETER_BLOCK_TYPES_SHARED:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) with the constructor the shim replaces")
    ours = tl.core.block_type.__init__
    theirs = ours.triton_init
    for elem, shape in ((tl.float32, [4, 8]), (tl.pointer_type(tl.bfloat16), [tl.constexpr(16)]),
                        (tl.int8, [2, 1, 32]), (tl.float32, [8, 4])):
        a, b, want = (object.__new__(tl.core.block_type) for _ in range(3))
        ours(a, elem, shape)
        ours(b, elem, list(shape))
        theirs(want, elem, shape)
        for got in (a, b):
            assert (got.element_ty, list(got.shape), got.numel, got.name) == \
                (want.element_ty, list(want.shape), want.numel, want.name), (got.name, want.name)
        assert a == want and b.shape is a.shape  # (the second from the table)
    for shape, error in (([4, 6], ValueError), ([], TypeError), ((4, 8), AssertionError)):  # (a Python tuple too)
        for _ in range(2):
            with pytest.raises(error):
                tl.block_type(tl.float32, shape)


def test_no_op_broadcasts_and_casts_return_their_operands_and_the_rest_are_tritons():
    """kernels/_common.skip_interpreter_no_op_broadcasts_and_casts: on the interpreter's semantic object, a broadcast
    of two operands of one shape (or two scalars) and a cast to the dtype a value has return the operands themselves,
    as Triton's code does; other broadcasts and casts give what Triton's give."""
    if not _common.INTERPRETER_NO_OP_CASTS_SKIPPED:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) with the methods the shim wraps")
    import numpy as np
    semantic = interpreter.interpreter_semantic
    fast_broadcast, fast_cast = semantic.broadcast_impl_value, semantic.cast
    slow_broadcast, slow_cast = fast_broadcast.triton_method, fast_cast.triton_method
    rng = np.random.default_rng(0)

    def value(dtype, shape):
        data = rng.standard_normal(shape or ()).astype(np.float32 if dtype is tl.float32 else np.float16)
        ty = tl.block_type(dtype, list(shape)) if shape else dtype
        return tl.core.tensor(interpreter.TensorHandle(np.asarray(data), dtype), ty)

    for a, b in ((value(tl.float32, (4, 8)), value(tl.float16, (4, 8))), (value(tl.float32, ()),
                                                                          value(tl.float16, ()))):
        for fn in (fast_broadcast, lambda x, y: slow_broadcast(semantic, x, y)):
            got = fn(a, b)
            assert got[0] is a and got[1] is b
    for a, b in ((value(tl.float32, (4, 1)), value(tl.float32, (1, 8))), (value(tl.float32, (4, 8)),
                                                                          value(tl.float32, ())),
                 (value(tl.float32, ()), value(tl.float16, (2, 4))), (value(tl.float32, (8,)),
                                                                      value(tl.float32, (4, 8)))):
        fast, slow = fast_broadcast(a, b), slow_broadcast(semantic, a, b)
        for f, s in zip(fast, slow):
            assert f.type == s.type and np.array_equal(f.handle.data, s.handle.data)
    x = value(tl.float32, (4, 8))
    assert fast_cast(x, tl.float32) is x and slow_cast(semantic, x, tl.float32) is x
    half, want = fast_cast(x, tl.float16), slow_cast(semantic, x, tl.float16)
    assert half.type == want.type == tl.block_type(tl.float16, [4, 8])
    assert np.array_equal(half.handle.data, want.handle.data) and half.handle.data.dtype == np.float16
    with pytest.raises(ValueError, match="incompatible dimensions"):  # (Triton's own refusal, through the shim)
        fast_broadcast(value(tl.float32, (4, 8)), value(tl.float32, (2, 8)))


def test_a_kernel_answers_the_same_without_the_no_op_shortcuts(monkeypatch):
    if not _common.INTERPRETER_NO_OP_CASTS_SKIPPED:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) with the methods the shim wraps")
    x = torch.randn(5, 16)
    fast, _ = _launch_counting_getmembers(monkeypatch, x)
    for name in ("broadcast_impl_value", "cast"):
        monkeypatch.delattr(interpreter.interpreter_semantic, name)  # (the class's own methods again)
    slow, _ = _launch_counting_getmembers(monkeypatch, x)
    assert torch.equal(fast, slow)


@triton.jit
def _narrow_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, _common.cast(tl.load(x_ptr + offs), tl.bfloat16))


def test_cast_into_bf16_rounds_to_nearest_even_and_keeps_every_nan_a_nan():
    """_common.cast is torch's fp32 -> bf16 rounding bit for bit, and a NaN of any payload stays a NaN: the rounding's
    carry once turned 0x7FFFFFFF into -0.0 and a low payload (0x7F800001) into inf, a NaN swallowed."""
    torch.manual_seed(0)
    finite = torch.randn(61) * torch.logspace(-30, 30, 61)
    edges = torch.tensor([3.3895e38, -3.3895e38, 1e-40, float("inf"), float("-inf")])  # (rounds to inf, subnormal)
    nans = torch.tensor([0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF - 2**32, 0x7F800001, 0x7FBFFFFF, 0x7FFF8000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([finite, edges, nans])
    pad = torch.full((128,), 1.5)
    pad[:x.numel()] = x
    wide = torch.empty(128, dtype=torch.bfloat16)
    _narrow_kernel[(1,)](pad, wide, 128)
    out = wide[:x.numel()]
    want = x.to(torch.bfloat16)
    fin = ~torch.isnan(x)
    assert torch.equal(out[fin].view(torch.int16), want[fin].view(torch.int16))
    assert torch.isnan(out[~fin].float()).all(), out[~fin]
