"""flash_attention(..., kv_len=L): k and v a whole preallocated KV cache of Tk_cap positions, of which the first L
(a one-element tensor on q's device, read by the kernels) hold keys.

The result must be flash_attention on the cache sliced to L, whatever lies past L (the caches here hold NaN, inf
and huge values there), and match a float64 reference. The launch must not depend on L (grid, split count, every
host argument): a CUDA graph captured at one L replays at another, which test_a_launch_replays_at_another_length
checks by re-running the recorded launches after writing a new L into the same tensor. Under the interpreter a
KV tile is INTERPRET_BLOCK = 16 keys; the split path is forced by patching _num_splits (conftest.py's
forced_splits), as in tests/test_flash_decoding.py.
"""
import math

import pytest
import torch

from parity import assert_close_rel
from test_attention import make_qkv
from test_flash_decoding import reference_gqa as reference  # float64, the KV heads repeated for GQA
from tritongpt.kernels import attention
from tritongpt.kernels.attention import flash_attention

CAP = 64  # the caches' capacity: 4 tiles of 16 under the interpreter


def reference_lse(q, k, scale, softcap, slopes, window=None):
    """float64 base-2 logsumexp of the capped, ALiBi-biased, causal (and windowed) scores, written out."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    Tq, L = q.shape[2], k.shape[2]
    s = softcap * torch.tanh(q @ k.transpose(-2, -1) * scale / softcap)
    pos_q, pos_k = torch.arange(L - Tq, L, device=q.device)[:, None], torch.arange(L, device=q.device)[None, :]
    s = s + slopes.double()[:, None, None] * (pos_k - pos_q)
    hidden = (pos_k > pos_q) | ((pos_k <= pos_q - window) if window else False)
    return torch.logsumexp(s.masked_fill(hidden, float("-inf")), -1) / math.log(2)


def cache(B, Hkv, filled, D, dtype, device, seed=0):
    """k, v [B, Hkv, CAP, D] whose positions from `filled` on hold garbage: NaN, inf and 1e30 in k, -inf, NaN and
    -1e30 in v, in turn, so any of them read into a result shows."""
    _, k, v = make_qkv(B, Hkv, 1, CAP, D, torch.float32, device, seed=seed)
    for t, junk in ((k, (float("nan"), float("inf"), 1e30)), (v, (float("-inf"), float("nan"), -1e30))):
        for i, x in enumerate(junk):
            t[:, :, filled + i::3] = x
    return k.to(dtype), v.to(dtype)


def check(q, k, v, L, tol=1e-4, tag="", kv_dtype=torch.int64, **kw):
    """flash_attention with kv_len = L against the sliced call (equal: the same arithmetic) and float64."""
    with torch.no_grad():
        got = flash_attention(q, k, v, kv_len=torch.tensor(L, dtype=kv_dtype, device=q.device), **kw)
        sliced = flash_attention(q, k[:, :, :L], v[:, :, :L], **kw)
    ref = reference(q.double(), k[:, :, :L].double(), v[:, :, :L].double(), **kw)
    if q.device.type == "cpu":  # the interpreter runs the very same operations
        assert torch.equal(got, sliced), f"{tag}: kv_len differs from the sliced cache"
    else:
        assert_close_rel(got, sliced, 1e-6, f"{tag} vs sliced")
    return assert_close_rel(got, ref, tol, tag)


# ----------------------------------------------------------------------------- parity
# Every L, Tq, Hkv and split count, less two kinds of cases whose path another case here takes with the same
# Hkv, splits (and Tq): 33 keys at Tq = 1 (a ragged last tile, as 37's; 33 matters for 3 queries, whose diagonal
# starts a tile before it) and L = Tq split in 2 (its second split past L, as split5's splits past L at Tq).
CAUSAL_CASES = [pytest.param(L, Hkv, Tq, splits, id=f"{L}-{Hkv}-{Tq}-{name}")
                for L in ("Tq", 33, 37, CAP) for Hkv in (4, 2, 1) for Tq in (1, 3)
                for splits, name in ((1, "single"), (2, "split2"), (5, "split5"))
                if not (L == 33 and Tq == 1) and not (L == "Tq" and splits == 2)]


@pytest.mark.parametrize("L,Hkv,Tq,splits", CAUSAL_CASES)
def test_causal_matches_the_sliced_cache_and_float64(L, Hkv, Tq, splits, forced_splits, device):
    """L = Tq (only the query's own keys), 33 and 37 (not multiples of a tile: a ragged last tile; at 33 the
    diagonal of 3 queries starts a tile before it), CAP (full); GQA and MQA (the split path packs their heads);
    5 splits of 37 keys' 3 tiles leave empty splits."""
    L = Tq if L == "Tq" else L
    launches = forced_splits(splits)
    q, _, _ = make_qkv(2, 4, Tq, 1, 32, torch.float32, device, seed=L + Tq)
    k, v = cache(2, Hkv, L, 32, torch.float32, device, seed=L + Hkv)
    check(q, k, v, L, tag=f"L={L} H=4/{Hkv} Tq={Tq} splits={splits}")
    assert launches["launches"] == (2 if splits > 1 else 0)


@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("L", [1, 37, CAP])
def test_not_causal(L, Tq, splits, forced_splits, device):
    """Without the causal mask every query sees keys [0, L) (L from 1, below Tq)."""
    forced_splits(splits)
    q, _, _ = make_qkv(1, 2, Tq, 1, 32, torch.float32, device, seed=L + 5)
    k, v = cache(1, 2, L, 32, torch.float32, device, seed=L + 6)
    check(q, k, v, L, tag=f"not causal L={L} Tq={Tq} splits={splits}", causal=False, softmax_scale=0.3)


@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_window_softcap_alibi(Tq, splits, forced_splits, device):
    """A sliding window (its bounds made for the capacity, indexed at the queries' positions L - Tq + i), Gemma 2's
    soft cap, ALiBi (the bias at those positions), on grouped heads, and an int32 kv_len."""
    forced_splits(splits)
    L = 45
    q, _, _ = make_qkv(1, 4, Tq, 1, 32, torch.float32, device, seed=Tq + 20)
    k, v = cache(1, 2, L, 32, torch.float32, device, seed=Tq + 21)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    for kw in (dict(window=20), dict(window=L - Tq + 1), dict(softcap=2.0), dict(alibi_slopes=slopes),
               dict(window=7, softcap=3.0, alibi_slopes=slopes, softmax_scale=0.5)):
        check(q * 3, k, v, L, tag=f"Tq={Tq} splits={splits} {sorted(kw)}", kv_dtype=torch.int32, **kw)


@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
def test_bf16(splits, forced_splits, device):
    forced_splits(splits)
    q, _, _ = make_qkv(1, 4, 3, 1, 64, torch.bfloat16, device, seed=30)
    k, v = cache(1, 2, 50, 64, torch.bfloat16, device, seed=31)
    check(q, k, v, 50, tol=1e-2, tag=f"bf16 splits={splits}")


def test_head_dim_80_padded(forced_splits, device):
    """A head dim the kernels pad (80 to 128, masked columns) over a cache."""
    forced_splits(2)
    q, _, _ = make_qkv(1, 2, 1, 1, 80, torch.float32, device, seed=40)
    k, v = cache(1, 2, 29, 80, torch.float32, device, seed=41)
    check(q, k, v, 29, tag="hd80")


@pytest.mark.parametrize("splits", [1, 2], ids=["single", "split2"])
@pytest.mark.parametrize("L", [20, 41])
def test_chunked_prefill_fp16_head_dim_96(L, splits, forced_splits, device):
    """A chunk of Tq = 20 queries (two query tiles of 16 under the interpreter, each with its own diagonal at
    L - Tq + i; packed GQA: 40 rows, three tiles) over a cache filled to L = Tq or 41, in fp16 with a padded head
    dim (96 to 128)."""
    forced_splits(splits)
    q, _, _ = make_qkv(1, 4, 20, 1, 96, torch.float16, device, seed=L + 100)
    k, v = cache(1, 2, L, 96, torch.float16, device, seed=L + 101)
    check(q, k, v, L, tol=1e-2, tag=f"prefill fp16 hd96 L={L} splits={splits}")


@pytest.mark.parametrize("L", [1, 37])
def test_not_causal_packed_gqa(L, forced_splits, device):
    """Without the causal mask on the split path's packed heads (4 query heads on one KV head, 3 queries each)."""
    forced_splits(3)
    q, _, _ = make_qkv(1, 4, 3, 1, 32, torch.float32, device, seed=L + 110)
    k, v = cache(1, 1, L, 32, torch.float32, device, seed=L + 111)
    check(q, k, v, L, tag=f"not causal packed L={L}", causal=False, softmax_scale=0.3)


@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
def test_the_ops_logsumexp_matches_the_sliced_cache(splits, forced_splits, device):
    """The op also returns the logsumexp (base 2), which ALiBi's query positions L - Tq + i shift (the output, a
    softmax, does not see a per-row constant): equal to the sliced call's, with a window's bounds made for the
    capacity there and for L here, as flash_attention makes them, and to float64's."""
    forced_splits(splits)
    L, Tq = 41, 3
    q, _, _ = make_qkv(1, 4, Tq, 1, 32, torch.float32, device, seed=90)
    k, v = cache(1, 2, L, 32, torch.float32, device, seed=91)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    op = torch.ops.tritongpt.flash_attn_fwd
    for window in (None, 9):
        bounds = [attention.window_bounds(window, T, 1, device) if window else (None, None) for T in (CAP, L)]
        o, lse = op(q, k, v, True, 0.3, 0.0, None, *bounds[0], 2.0, slopes, torch.tensor(L, device=device))
        o_sliced, lse_sliced = op(q, k[:, :, :L], v[:, :, :L], True, 0.3, 0.0, None, *bounds[1], 2.0, slopes)
        assert torch.isfinite(lse).all(), window
        assert_close_rel(lse, reference_lse(q, k[:, :, :L], 0.3, 2.0, slopes, window), 1e-5, f"lse window={window}")
        ref = reference(q.double(), k[:, :, :L].double(), v[:, :, :L].double(), softmax_scale=0.3, softcap=2.0,
                        alibi_slopes=slopes, window=window)
        assert_close_rel(o, ref, 1e-4, f"o window={window}")
        if device.type == "cpu":  # the same operations (on a GPU, binaries specialized on another Tk)
            assert torch.equal(o, o_sliced) and torch.equal(lse, lse_sliced), window
        else:
            assert_close_rel(o, o_sliced, 1e-6, f"o window={window}")
            assert_close_rel(lse, lse_sliced, 1e-6, f"lse window={window}")


# ----------------------------------------------------------------------------- one launch, any length
class Replay:
    """Records every kernel launch of the forward (the tuned kernel through launch_tuned, the combine through
    kernel[grid]) and runs it; replay() runs the recorded launches again with the very same arguments, as a CUDA
    graph replays its captured kernels."""

    def __init__(self, monkeypatch):
        self.launches = []
        tuned = attention.launch_tuned

        def record_tuned(kernel, grid, *args, **kwargs):
            self.launches.append((lambda *a, **k: tuned(kernel, grid, *a, **k), args, kwargs))
            return tuned(kernel, grid, *args, **kwargs)

        combine = attention._attn_fwd_combine

        class Combine:
            def __getitem__(_, grid):
                def run(*args, **kwargs):
                    self.launches.append((combine[grid], args, kwargs))
                    return combine[grid](*args, **kwargs)
                return run

        monkeypatch.setattr(attention, "launch_tuned", record_tuned)
        monkeypatch.setattr(attention, "_attn_fwd_combine", Combine())

    def replay(self):
        for fn, args, kwargs in self.launches:
            fn(*args, **kwargs)

    def host_values(self):
        """Everything but the tensors of each launch (ints, floats, flags, grids): what a graph bakes in."""
        return [([a for a in args if not isinstance(a, torch.Tensor)], kwargs) for _, args, kwargs in self.launches]


@pytest.mark.parametrize("splits", [3, 1], ids=["split3", "single"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_a_launch_replays_at_another_length(Tq, splits, forced_splits, monkeypatch, device):
    """The launches made at L = 37 (3 tiles, the last ragged), run again unchanged after 49 then 20 are written
    into the same kv_len tensor, give the results at 49 (4 tiles; the diagonal of 3 queries in the third) and at
    20: the same NUM_SPLITS, grid and host arguments serve every length, the kernels read it. A fresh call at 20
    makes the very same host arguments."""
    forced_splits(splits)
    q, _, _ = make_qkv(1, 4, Tq, 1, 32, torch.float32, device, seed=Tq + 50)
    k, v = cache(1, 2, 50, 32, torch.float32, device, seed=Tq + 51)  # garbage from 50 on; 37..49 a stale tail
    kv_len = torch.tensor(37, device=device)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    rec = Replay(monkeypatch)
    with torch.no_grad():
        out = flash_attention(q, k, v, kv_len=kv_len, window=30, alibi_slopes=slopes)
        first = rec.host_values()
        assert len(rec.launches) == (2 if splits > 1 else 1)
        for L in (37, 49, 20):
            if L != 37:
                kv_len.fill_(L)
                out.fill_(float("nan"))  # whatever the replay does not write stays NaN
                rec.replay()
            want = reference(q.double(), k[:, :, :L].double(), v[:, :, :L].double(), window=30, alibi_slopes=slopes)
            assert_close_rel(out, want, 1e-4, f"replayed at L={L} Tq={Tq} splits={splits}")
        n = len(rec.launches)
        flash_attention(q, k, v, kv_len=kv_len, window=30, alibi_slopes=slopes)  # kv_len holds 20 now
        assert rec.host_values()[n:] == first


def test_the_launchers_pass_kv_len_itself_and_never_read_it(monkeypatch):
    """On meta tensors (any host read raises): the forward launchers pass the caller's tensor as KV_LEN with
    HAS_KV_LEN, and without kv_len the never-read stand-in with HAS_KV_LEN False."""
    from test_attention import LaunchRecorder

    spies = {name: LaunchRecorder(getattr(attention, name)) for name in ("_attn_fwd", "_attn_fwd_split")}
    for name, spy in spies.items():
        monkeypatch.setattr(attention, name + "_run", spy)
    monkeypatch.setattr(attention, "_attn_fwd_combine", LaunchRecorder(attention._attn_fwd_combine))
    q, k = torch.empty(1, 4, 1, 16, device="meta"), torch.empty(1, 2, 64, 16, device="meta")
    kv_len = torch.empty((), dtype=torch.int64, device="meta")
    for splits in (1, 3):
        monkeypatch.setattr(attention, "_num_splits", lambda *args, n=splits: n)
        for given in (kv_len, None):
            attention._fwd_launch(q, k, k, True, 0.25, 0.0, None, kv_len=given)
    for name, spy in spies.items():
        (with_len, without) = spy.launches
        assert with_len["KV_LEN"] is kv_len and with_len["HAS_KV_LEN"] and with_len["Tk"] == 64, name
        assert without["KV_LEN"] is not kv_len and not without["HAS_KV_LEN"], name
        assert without["KV_LEN"] is attention._stand_in(q.device, torch.int32), name


@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
def test_an_unchecked_length_is_clamped_to_the_buffers(splits, forced_splits, device):
    """A value out of range that reaches the kernels unchecked (a replayed graph; here the launcher called
    directly) is clamped: above the capacity to it, so nothing past the K/V buffers is read (they are views of
    longer ones whose tail is NaN), and with causal below Tq to Tq."""
    forced_splits(splits)
    q, _, _ = make_qkv(1, 4, 3, 1, 32, torch.float32, device, seed=80)
    k, v = cache(1, 2, CAP, 32, torch.float32, device, seed=81)  # all CAP positions hold keys
    k, v = (torch.cat([t, torch.full_like(t, float("nan"))], 2)[:, :, :CAP] for t in (k, v))  # NaN past them
    # (a huge one last: without the clamp the ones before fail first, on NaN, instead of a read far past memory)
    for L, like in ((CAP + 1, CAP), (2 * CAP, CAP), (-5, 3), (0, 3), (10 ** 6, CAP)):
        out, _ = attention._fwd_launch(q, k, v, True, 0.25, 0.0, None, kv_len=torch.tensor(L, device=device))
        want, _ = attention._fwd_launch(q, k[:, :, :like], v[:, :, :like], True, 0.25, 0.0, None)
        assert torch.isfinite(want).all() and torch.equal(out, want), L
        ref = reference(q.double(), k[:, :, :like].double(), v[:, :, :like].double(), softmax_scale=0.25)
        assert_close_rel(out, ref, 1e-4, f"clamped L={L}")


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_reads_the_length_at_run_time(device):
    """torch.compile(fullgraph=True) traces flash_attention with kv_len (no host read of it while tracing); the
    compiled function follows a new value written into the tensor (not baked in), and the op still checks the
    value of a CPU kv_len when it runs."""
    q, _, _ = make_qkv(1, 4, 1, 1, 16, torch.float32, device, seed=60)
    k, v = cache(1, 2, 40, 16, torch.float32, device, seed=61)
    kv_len = torch.tensor([30], device=device)

    def step(a, b, c, n):
        return flash_attention(a, b, c, kv_len=n) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for L in (30, 40):
            kv_len.fill_(L)
            got = compiled(q, k, v, kv_len)
            assert torch.equal(got, flash_attention(q, k[:, :, :L], v[:, :, :L]) * 2), L
            assert_close_rel(got, reference(q.double(), k[:, :, :L].double(), v[:, :, :L].double()) * 2, 1e-4,
                             f"compiled L={L}")
        if device.type == "cpu":
            kv_len.fill_(CAP + 1)
            with pytest.raises(ValueError, match=f"kv_len {CAP + 1} is out of range"):
                compiled(q, k, v, kv_len)


# ----------------------------------------------------------------------------- refusals
def small(device):
    q, _, _ = make_qkv(1, 2, 3, 1, 16, torch.float32, device, seed=70)
    k, v = cache(1, 2, 20, 16, torch.float32, device, seed=71)
    return q, k, v, torch.tensor(20, device=device)


def test_refused_with_gradients(device):
    q, k, v, n = small(device)
    with pytest.raises(ValueError, match="kv_len is for inference only"):
        flash_attention(q.requires_grad_(), k, v, kv_len=n)
    with torch.no_grad():  # the same tensors without grad mode: fine
        flash_attention(q, k, v, kv_len=n)


def test_refused_with_dropout(device):
    q, k, v, n = small(device)
    with torch.no_grad(), pytest.raises(ValueError, match="kv_len is for inference: dropout_p must be 0"):
        flash_attention(q, k, v, dropout_p=0.1, kv_len=n)


def test_refused_with_documents(device):
    q, k, v, n = small(device)
    with torch.no_grad(), pytest.raises(ValueError, match="kv_len does not take doc_ids"):
        flash_attention(q, k, v, doc_ids=torch.zeros(1, CAP, dtype=torch.int64, device=device), kv_len=n)


@pytest.mark.parametrize("bad,error,match", [
    (20, TypeError, "kv_len must be a one-element int32/int64 tensor on q's device .* got int"),
    ("tensor", TypeError, "kv_len must hold an int32 or int64 .* got dtype torch.float32"),
    ("bool", TypeError, "kv_len must hold an int32 or int64 .* got dtype torch.bool"),
    ("two", ValueError, r"kv_len must be one element \(shape \[\] or \[1\]\) or one a batch row \(\[1\]\), "
            r"got shape \(2,\)"),
    ("1x1", ValueError, r"kv_len must be one element \(shape \[\] or \[1\]\) or one a batch row \(\[1\]\), "
            r"got shape \(1, 1\)"),
    ("meta", ValueError, "kv_len is on meta, q on"),
])
def test_bad_kv_len(bad, error, match, device):
    q, k, v, _ = small(device)
    bad = {"tensor": torch.tensor(20.0, device=device), "bool": torch.tensor(True, device=device),
           "two": torch.tensor([20, 20], device=device), "1x1": torch.tensor([[20]], device=device),
           "meta": torch.tensor(20, device="meta")}.get(bad, bad)
    with torch.no_grad(), pytest.raises(error, match=match):
        flash_attention(q, k, v, kv_len=bad)


def test_lengths_checked_must_be_a_bool(device):
    """A truthy "no" would skip the host check of kv_len on a GPU, the check it asks to keep: refused by name before
    the length is read (here one out of range)."""
    q, k, v, _ = small(device)
    with torch.no_grad(), pytest.raises(TypeError, match="lengths_checked must be a bool, got str 'no'"):
        flash_attention(q, k, v, kv_len=torch.tensor(CAP + 1, device=device), lengths_checked="no")


@pytest.mark.parametrize("causal,L,lo", [(True, 2, "3"), (True, CAP + 1, "3"), (False, 0, "1"), (False, -5, "1"),
                                         (False, CAP + 1, "1")])
def test_out_of_range_value(causal, L, lo, device):
    """With causal L >= Tq (3 here: the queries are the last Tq of L positions), without it L >= 1; at most the
    capacity. Both for flash_attention and the op called directly (which checks a CPU kv_len itself)."""
    q, k, v, _ = small(device)
    n = torch.tensor([L], dtype=torch.int32, device=device)
    match = rf"kv_len {L} is out of range: it must lie in \[{lo}, {CAP}\]"
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, causal=causal, kv_len=n)
    if device.type == "cpu":
        with pytest.raises(ValueError, match=match):
            torch.ops.tritongpt.flash_attn_fwd(q, k, v, causal, 0.25, 0.0, None, kv_len=n)


@pytest.mark.parametrize("causal,Tq,Tk,L,match", [
    (True, 5, 3, 3, r"causal attention needs Tq <= Tk .* got Tq=5 > Tk=3"),
    (False, 1, 0, 0, r"k and v have no positions \(Tk=0\)"),
])
def test_a_bad_shape_is_named_before_the_lengths_range(causal, Tq, Tk, L, match, device):
    """Shapes that leave kv_len no valid value (a causal Tq past the cache, an empty cache) are refused by name, as
    without kv_len, not as "kv_len 3 is out of range: it must lie in [5, 3]" (a range that cannot hold any)."""
    q = torch.randn(1, 2, Tq, 16, device=device)
    k = torch.randn(1, 2, Tk, 16, device=device)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, causal=causal, kv_len=torch.tensor(L, device=device))


def test_the_op_refuses_dropout_and_its_backward_refuses_kv_len(device):
    """A direct caller of the op: kv_len checked there too (dropout, device), and a backward through an op call
    with kv_len raises instead of giving gradients of the whole cache."""
    q, k, v, n = small(device)
    op = torch.ops.tritongpt.flash_attn_fwd
    with pytest.raises(ValueError, match="kv_len is for inference: dropout_p must be 0"):
        op(q, k, v, True, 0.25, 0.1, torch.tensor(3, device=device), kv_len=n)
    with pytest.raises(ValueError, match="kv_len is on meta"):
        op(q, k, v, True, 0.25, 0.0, None, kv_len=torch.tensor(20, device="meta"))
    o, _ = op(q.requires_grad_(), k, v, True, 0.25, 0.0, None, kv_len=n)
    with pytest.raises(RuntimeError, match="flash_attn_fwd with kv_len is inference only"):
        o.sum().backward()


def test_the_op_with_kv_len_passes_opcheck(device):
    q, k, v, n = small(device)
    torch.library.opcheck(torch.ops.tritongpt.flash_attn_fwd.default,
                          (q, k, v, True, 0.25, 0.0, None, None, None, 0.0, None, n))


# ----------------------------------------------------------------------------- a GPU: capture and replay
@pytest.mark.cuda
@pytest.mark.parametrize("H,Hkv,D", [(12, 12, 64), (32, 8, 128)], ids=["gpt2", "llama-gqa"])
def test_cuda_graph_replays_a_decode_step_at_new_lengths(H, Hkv, D):
    """A decode step (bf16, a 4096-position cache at batch 1: the GPU's own split count) captured in a CUDA graph at
    L = 1000 and replayed after writing other lengths into kv_len (the cache past L full of NaN) gives the sliced
    call's results; the eager call before the capture checks the value (one .item()), the capture does not."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(1, H, 1, D, device=cuda, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, 4096, D, device=cuda, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k[:, :, 3000:], v[:, :, 3000:] = float("nan"), float("nan")
    kv_len = torch.tensor(1000, device=cuda)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            flash_attention(q, k, v, kv_len=kv_len)  # warm-up: tunes, compiles, checks the value
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_attention(q, k, v, kv_len=kv_len)
        for L in (1000, 2999, 1, 1777):
            kv_len.fill_(L)
            graph.replay()
            want = flash_attention(q, k[:, :, :L], v[:, :, :L])
            assert_close_rel(out.float(), want.float(), 1e-2, f"replayed at L={L}")
            ref = reference(q.double(), k[:, :, :L].double(), v[:, :, :L].double())
            assert_close_rel(out.float(), ref, 1e-2, f"replayed at L={L} vs float64")
