"""Structured outputs' token mask: kernels/token_mask.py's apply_token_bitmask_ (in place, Triton) against
model/sampling.py's reference and a float64 loop over the bits written here; the packed layout and the masking against
xgrammar's own (skipped without xgrammar); the dispatcher; every refusal. The custom op's opcheck is in
tests/test_custom_ops.py."""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tritongpt.errors import UserError
from tritongpt.kernels.token_mask import apply_token_bitmask_
from tritongpt.model.sampling import (apply_token_bitmask, apply_token_bitmask_reference, pack_token_bitmask,
                                      unpack_token_bitmask)


def loop_reference(logits, bitmask, rows):
    """float64, token by token from the words' bits as Python ints: -inf where bit t % 32 of word t // 32 is 0."""
    out = logits.double().clone()
    words = bitmask.tolist()
    for r in rows:
        for t in range(logits.shape[1]):
            if not (words[r][t // 32] >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


def allowed_rows(B, V, gen):
    """One row of each kind a grammar gives, repeated to B: 50% random, sparse (3% allowed: a mostly banned block),
    dense (97%: a JSON string's body), all allowed, all banned (the whole row -inf)."""
    p = torch.rand(B, V, generator=gen)
    kinds = [p < 0.5, p < 0.03, p < 0.97, torch.ones_like(p, dtype=torch.bool), torch.zeros_like(p, dtype=torch.bool)]
    return torch.stack([kinds[b % len(kinds)][b] for b in range(B)])


def logits_view(B, V, dtype, device, gen, pad=5):
    """Random logits [B, V] as a row-strided view of a wider buffer whose padding is a sentinel (a write past V
    shows there), and the buffer."""
    buf = torch.full((B, V + pad), 7.0, dtype=dtype)
    buf[:, :V] = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    buf = buf.to(device)
    return buf[:, :V], buf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,V,indices", [(6, 1000, None), (5, 8229, None), (7, 8229, [4, 0, 6, 2]), (3, 7, [1]),
                                         (4, 96, [])],
                         ids=["V1000", "V8229-two-word-blocks", "V8229-indices", "V7-one-word", "V96-no-rows"])
def test_kernel_matches_reference_and_float64_loop(device, dtype, B, V, indices):
    """V below a word, a multiple of 32, and across the interpreter's word block (256 words) with a part; rows of every
    kind (sparse, dense, all allowed, all banned); rows strided; indices a subset in any order, or empty. The kernel,
    the reference and the loop agree exactly (only -inf is written), rows outside indices and the buffer's padding
    stay as they were."""
    gen = torch.Generator().manual_seed(B * V)
    logits, buf = logits_view(B, V, dtype, device, gen)
    bitmask = pack_token_bitmask(allowed_rows(B, V, gen)).to(device)
    buf0 = buf.clone()
    want = loop_reference(logits, bitmask, range(B) if indices is None else indices)
    ref = apply_token_bitmask_reference(logits, bitmask, indices)
    assert torch.equal(buf, buf0)  # the reference does not touch its input
    out = apply_token_bitmask_(logits, bitmask, indices)
    assert out is logits
    assert torch.equal(ref.double(), want)
    assert torch.equal(logits.double(), want)
    assert torch.equal(buf[:, V:], buf0[:, V:])


def test_all_banned_row_is_all_inf_and_all_allowed_row_untouched(device):
    """Documented: an all-zero bitmask row gives every logit -inf; an all-ones row (-1 words) leaves the row bit for
    bit."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 100, generator=gen).to(device)
    before = logits.clone()
    bitmask = torch.tensor([[0] * 4, [-1] * 4], dtype=torch.int32, device=device)
    apply_token_bitmask_(logits, bitmask)
    assert torch.isneginf(logits[0]).all()
    assert torch.equal(logits[1], before[1])


def test_pack_unpack_round_trip():
    """pack then unpack gives the allowed set back; the bits past V are 0; bit 31 set makes a negative word."""
    gen = torch.Generator().manual_seed(2)
    allowed = torch.rand(3, 75, generator=gen) < 0.5
    bm = pack_token_bitmask(allowed)
    assert bm.dtype == torch.int32 and bm.shape == (3, 3)
    assert torch.equal(unpack_token_bitmask(bm, 75), allowed)
    assert (bm[:, 2] >> 11).eq(0).all()  # tokens 75..95 of word 2: padding
    one = torch.zeros(1, 32, dtype=torch.bool)
    one[0, 31] = True
    assert pack_token_bitmask(one).item() == -2 ** 31


def test_dispatcher_reference_copies_triton_in_place(device):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 70, generator=gen).to(device)
    bitmask = pack_token_bitmask(torch.rand(2, 70, generator=gen) < 0.5).to(device)
    before = logits.clone()
    ref = apply_token_bitmask(logits, bitmask)
    assert ref is not logits and torch.equal(logits, before)
    out = apply_token_bitmask(logits, bitmask, triton=True)
    assert out is logits and torch.equal(out, ref)


def test_dispatcher_refuses_a_triton_flag_not_a_bool():
    """A truthy "no" took the in-place kernel: the caller's logits, kept by the reference, came back masked."""
    logits = torch.randn(2, 70)
    bitmask = pack_token_bitmask(torch.rand(2, 70) < 0.5)
    before = logits.clone()
    with pytest.raises(UserError, match="apply_token_bitmask: triton must be a bool, got str 'no'"):
        apply_token_bitmask(logits, bitmask, triton="no")
    assert torch.equal(logits, before)


def test_dispatcher_masks_each_row_of_an_expanded_row_by_its_own_bitmask_row(device):
    """The engine's n samples of one prompt draw their first token from its prefill's one row expand()ed (stride 0):
    the dispatcher's Triton path masks a copy, each row by its own bitmask row, as the reference (the in-place
    kernel refuses such logits)."""
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(1, 70, generator=gen).to(device)
    before = row.clone()
    bitmask = pack_token_bitmask(torch.rand(3, 70, generator=gen) < 0.5).to(device)
    for indices in (None, [2, 0]):
        want = apply_token_bitmask_reference(row.expand(3, -1), bitmask, indices)
        got = apply_token_bitmask(row.expand(3, -1), bitmask, indices, triton=True)
        assert torch.equal(got, want), indices
        assert torch.equal(row, before)
    assert not torch.equal(want[0], want[2])  # (the rows' bans differ: one row's memory could not hold both)


xgr = None
try:
    import xgrammar as xgr
except ImportError:
    pass
needs_xgrammar = pytest.mark.skipif(xgr is None, reason="xgrammar is not installed (the structured extra)")


@needs_xgrammar
def test_layout_and_masking_match_xgrammar(device):
    """A GrammarMatcher on a 70-token vocabulary (three words, the last partial) fills xgrammar's bitmask for the regex
    (a|b)+c: at the start a, b, ab, ba; after 'a' also c. Our pack of those sets is xgrammar's words, bit for bit,
    and our kernel and reference on its bitmask give xgrammar's own masking (torch_native), with and without
    indices."""
    vocab = ["<eos>", "a", "b", "c", "ab", "ba", "x", "y"] + [f"t{i}" for i in range(62)]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[0])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info, max_threads=1).compile_regex("(a|b)+c"))
    bitmask = xgr.allocate_token_bitmask(3, len(vocab))  # row 2 left as allocated: all allowed
    matcher.fill_next_token_bitmask(bitmask, 0)
    assert matcher.accept_token(vocab.index("a"))
    matcher.fill_next_token_bitmask(bitmask, 1)
    want = [{"a", "b", "ab", "ba"}, {"a", "b", "c", "ab", "ba"}]
    allowed = torch.tensor([[tok in want[r] for tok in vocab] for r in range(2)])
    assert torch.equal(pack_token_bitmask(allowed), bitmask[:2])
    assert torch.equal(unpack_token_bitmask(bitmask[:2], len(vocab)), allowed)

    gen = torch.Generator().manual_seed(5)
    bitmask = bitmask.to(device)
    for indices in (None, [1, 2]):
        logits = torch.randn(3, len(vocab), generator=gen).to(device)
        theirs = logits.clone()
        xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=indices, backend="torch_native")
        assert torch.equal(apply_token_bitmask_reference(logits, bitmask, indices), theirs)
        assert torch.equal(apply_token_bitmask_(logits, bitmask, indices), theirs)


def refusal_args(device, **change):
    logits = torch.randn(3, 70, device=device)
    args = dict(logits=logits, bitmask=torch.full((3, 3), -1, dtype=torch.int32, device=device), indices=None)
    args.update({k: v(args) if callable(v) else v for k, v in change.items()})
    return args


@pytest.mark.parametrize("change,message", [
    (dict(logits=lambda a: a["logits"][0]), r"logits must be 2-D \[rows, V\], got shape \(70,\)"),
    (dict(bitmask=lambda a: a["bitmask"][None]), r"bitmask must be 2-D \[rows, ceil\(V / 32\)\], got shape"),
    (dict(logits=[[0.0]]), "logits must be a torch.Tensor, got list"),
    (dict(logits=lambda a: a["logits"].double()), "logits has dtype float64; expected float32, bfloat16 or float16"),
    (dict(bitmask=lambda a: a["bitmask"].long()), "bitmask has dtype int64; expected int32"),
    (dict(bitmask=lambda a: torch.full((3, 4), -1, dtype=torch.int32, device=a["logits"].device)),
     r"bitmask has shape \(3, 4\), logits \(3, 70\): a bitmask row takes ceil\(V / 32\) = 3 int32 words for V = 70"),
    (dict(logits=lambda a: a["logits"][:, :64]), r"bitmask has shape \(3, 3\), logits \(3, 64\).* = 2 int32 words"),
    (dict(bitmask=lambda a: a["bitmask"][:2]), "bitmask has 2 rows, logits 3: without indices"),
    (dict(indices=[0, 3]), r"indices\[1\] = 3 is outside \[0, 3\)"),
    (dict(indices=[-1]), r"indices\[0\] = -1 is outside \[0, 3\)"),
    (dict(indices=lambda a: torch.tensor([0])), "indices must be a host list of ints"),
    (dict(indices=[0.0]), "indices must be a host list of ints"),
    (dict(bitmask=lambda a: a["bitmask"].to("meta")), "bitmask is on meta, logits on"),
    (dict(logits=lambda a: torch.randn(70, 3, device=a["logits"].device).T),
     r"logits must have unit stride on its last dim, got strides \(1, 3\)"),
    (dict(bitmask=lambda a: a["bitmask"].T.contiguous().T), "bitmask must have unit stride on its last dim"),
    (dict(logits=lambda a: a["logits"][:1].expand(3, -1)), r"logits' rows overlap in memory \(strides \(0, 1\)"),
    (dict(logits=lambda a: a["logits"].to("meta"), bitmask=lambda a: a["bitmask"].to("meta")),
     "logits is on meta; Triton kernels run on CUDA"),
    (dict(logits=lambda a: a["logits"].requires_grad_()), "logits requires grad; the mask is for sampling"),
])
def test_refusals(device, change, message):
    """Each bad argument a UserError naming it (the shape, dtype, device, stride, index, grad); all but the kernel's
    own (strides, a device Triton cannot run on, grad) from the reference too: they share the check."""
    args = refusal_args(device, **change)
    with pytest.raises(UserError, match=message):
        apply_token_bitmask_(**args)
    if not any(w in message for w in ("stride", "Triton", "grad")):  # the kernel's own refusals
        with pytest.raises(UserError, match=message):
            apply_token_bitmask_reference(**args)


def test_pack_refuses_non_bool():
    with pytest.raises(UserError, match="allowed must be a bool tensor"):
        pack_token_bitmask(torch.ones(2, 3))


# -- shape fuzz ----------------------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes under the interpreter
@given(B=st.integers(0, 9), V=st.integers(0, 9000), extra_rows=st.integers(0, 3), data=st.data(),
       raw=st.booleans(), pad=st.integers(0, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_shape_fuzz(B, V, extra_rows, data, raw, pad, dtype, seed):
    """apply_token_bitmask_ against the float64 loop and the reference over rows, vocabularies (none, under a word,
    across the interpreter's 256-word block), a bitmask with more rows than logits, indices (None, or any host list
    of rows in range: any order, repeats, empty), words as pack_token_bitmask makes them or raw int32s (any bits,
    those past V and bit 31 too), row-strided logits: equal exactly, the padding past V untouched. (The float64 loop
    on small cases only.)"""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    logits, buf = logits_view(B, V, dtype, device, gen, pad=pad)
    n_words = (V + 31) // 32
    indices = data.draw(st.none() | st.lists(st.integers(0, B - 1), max_size=12) if B else st.none(), "indices")
    rows = B + (extra_rows if indices is not None else 0)
    if raw:
        bitmask = torch.randint(-2**31, 2**31, (rows, n_words), generator=gen, dtype=torch.int64).to(torch.int32)
        bitmask[torch.rand(rows, n_words, generator=gen) < 0.2] = -1  # whole words allowed: blocks with no store
    elif rows:
        bitmask = pack_token_bitmask(allowed_rows(rows, V, gen))
    else:  # (allowed_rows stacks its rows: none to stack)
        bitmask = torch.zeros(0, n_words, dtype=torch.int32)
    bitmask = bitmask.to(device)
    buf0 = buf.clone()
    ref = apply_token_bitmask_reference(logits, bitmask, indices)
    # the Python loop costs a second per 50k tokens: past that the reference (checked against it above) stands in
    want = loop_reference(logits, bitmask, range(B) if indices is None else indices) if B * V <= 20000 else ref.double()
    with torch.no_grad():
        out = apply_token_bitmask_(logits, bitmask, indices)
    assert out is logits
    assert torch.equal(ref.double(), want)
    assert torch.equal(logits.double(), want), (B, V, rows, indices, raw)
    assert torch.equal(buf[:, V:], buf0[:, V:])
