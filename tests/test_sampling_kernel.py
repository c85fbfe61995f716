"""Sampling's fused cuts and draw: kernels/sampling.py's sample_tokens (Triton) against a float64 reference written
here (the cuts by a sort, the draw by inverse CDF); sample_next's two paths drawing the same tokens from one seed;
generate() on the Triton path running the kernel and drawing the reference path's tokens; every refusal."""
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from launch_spy import FlagSpy

import tritongpt.kernels.sampling as ks
from tritongpt.errors import UserError
from tritongpt.kernels.sampling import sample_token_rows, sample_tokens
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.sampling import draw_from_probs, draw_with_uniform
from tritongpt.train.generate import generate, sample_next, sampling_logits


# where the per-row launch's differential tests run: the CPU always (Triton's interpreter), the GPU where there is
# one (the compiled kernel: blocks of 1,024 tokens, one row a program, where the interpreter takes a row whole)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def reference(logits, u, temperature, top_k=None, top_p=None, min_p=None):
    """float64: softmax((logits - max) / T) cut to the top k (ties kept), to the tokens whose mass above them (sorted,
    among the top k) is under top_p, to those at least min_p x the likeliest; then the inverse CDF at u."""
    z = logits.double()
    z = (z - z.amax(-1, keepdim=True)) / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None:
        keep &= z >= torch.topk(z, min(top_k, z.size(-1))).values[:, -1:]
    if top_p is not None:
        probs = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        above = sorted_p.cumsum(-1) - sorted_p
        keep &= torch.zeros_like(keep).scatter(-1, order, above < top_p)
    if min_p is not None:
        probs = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        keep &= probs >= min_p * probs.amax(-1, keepdim=True)
    return draw_from_probs(torch.exp(z).masked_fill(~keep, 0.0), u)


CASES = [  # (rows, V, temperature, top_k, top_p, min_p, dtype)
    (6, 300, 0.8, None, None, None, torch.float32),
    (5, 1000, 1.0, 17, None, None, torch.float32),
    (6, 777, 0.7, None, 0.9, None, torch.float32),
    (8, 513, 1.3, 40, 0.8, 0.05, torch.float32),
    (4, 2001, 1.0, None, None, 0.1, torch.bfloat16),
    (4, 650, 0.9, 100, 0.95, None, torch.float16),
]


@pytest.mark.parametrize("B,V,T,k,p,mp,dtype", CASES)
def test_the_kernel_draws_the_float64_references_token(B, V, T, k, p, mp, dtype):
    """Fresh random logits (a scale of 3: a few tokens hold most of the mass, as a model's do) and uniforms: every row
    draws the float64 reference's token (its sums' rounding could move a draw only where u falls within ~1e-6 of a
    token's edge)."""
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    u = torch.rand(B, generator=g)
    got = sample_tokens(logits, u, T, k, p, mp)
    assert got.dtype == torch.int64 and got.shape == (B,)
    assert got.tolist() == reference(logits.float(), u, T, k, p, mp).tolist()


def test_blocks_of_a_long_row_carry_the_counts_masses_and_running_sum(monkeypatch):
    """A row read in several blocks (64 at a time over 250 tokens, the last block part-full, as a GPU's 1,024 over
    50,257): the radix passes' counts and masses and the draw's running sum carry across blocks, each row its own
    (one row's logits at two uniforms, another's at two more)."""
    monkeypatch.setattr(ks, "_tiles", lambda V: (64, 4, 4))
    g = torch.Generator().manual_seed(1)
    for cut in (dict(top_k=90), dict(top_p=0.7), dict(top_k=200, top_p=0.9, min_p=0.02)):
        rows = (torch.randn(2, 250, generator=g) * 2).repeat_interleave(2, 0)
        u = torch.rand(4, generator=g)
        got = sample_tokens(rows, u, 1.1, **cut)
        assert got.tolist() == reference(rows, u, 1.1, **cut).tolist(), cut


def test_rows_a_stride_apart_wider_than_the_vocabulary():
    """The engine hands a view of its batch's logits cut to a request's vocab_limit (lg[:, :limit]): rows a stride of
    300 apart, 257 tokens read of each, every other row."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(6, 300, generator=g) * 2
    rows, u = wide[::2, :257], torch.rand(3, generator=g)
    assert rows.stride(0) == 600
    assert sample_tokens(rows, u, 0.9, 50, 0.9).tolist() == reference(rows, u, 0.9, 50, 0.9).tolist()


def test_ties_at_the_cut_are_kept_and_cut_or_masked_tokens_never_drawn():
    """Top-k keeps every token tied with the k-th (the reference's `logits < kth` too); a -inf token (a grammar's or
    a bad word's) is never drawn; u = 0 draws the first kept token, u just under 1 the last; a row of -inf only
    draws token 0 (draw_from_probs' answer too). Each sweep of u is finer than the least kept token's mass."""
    row = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5, float("-inf"), 3.0, 2.0, -1.0])
    sweep = lambda n: (torch.arange(n) + 0.5) / n  # noqa: E731
    kept = sample_tokens(row.expand(12, -1).contiguous(), sweep(12), 1.0, top_k=3).tolist()
    assert set(kept) == {1, 2, 3, 4, 7, 8}, kept  # the two 3.0s and all four 2.0s tied at the third
    edges = sample_tokens(row.expand(2, -1).contiguous(), torch.tensor([0.0, 1 - 2**-24]), 1.0, top_k=3).tolist()
    assert edges == [1, 8]
    many = sample_tokens(row.expand(20, -1).contiguous(), sweep(20), 5.0)
    assert set(many.tolist()) == set(range(10)) - {6}, many
    assert many.tolist() == reference(row.expand(20, -1), sweep(20), 5.0).tolist()
    empty = torch.full((2, 10), float("-inf"))
    assert sample_tokens(empty, torch.rand(2), 1.0, top_p=0.5).tolist() == [0, 0]


def test_top_p_weighs_the_mass_of_the_top_k_alone():
    """Top-p after top-k renormalises over the k kept (the reference's order): on a nearly flat row of 120 tokens the
    top 10 hold a twelfth of the mass, so top_p 0.5 keeps about 5 of them, not all 10 (a cut against the whole row's
    mass). A sweep of u finer than a kept token's mass draws each kept token, as the reference."""
    g = torch.Generator().manual_seed(4)
    row = torch.randn(1, 120, generator=g) * 0.05
    u = (torch.arange(16) + 0.5) / 16
    got = sample_tokens(row.expand(16, -1).contiguous(), u, 1.0, top_k=10, top_p=0.5)
    want = reference(row.expand(16, -1), u, 1.0, top_k=10, top_p=0.5)
    assert got.tolist() == want.tolist() and 4 <= len(set(want.tolist())) <= 6, want


def test_sample_next_draws_the_same_tokens_on_both_paths():
    """One seed, the same logits: the Triton path's fused cuts and draw give the reference path's tokens, with the
    biases and penalties (torch's on both) before them, and where a cut it does not fuse (typical_p) runs first."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 301, generator=g) * 2
    seen = torch.randint(0, 301, (6, 9), generator=g)
    settings = [dict(temperature=0.9), dict(temperature=1.2, top_k=30, top_p=0.85, min_p=0.01),
                dict(temperature=0.8, top_p=0.6, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={5: 4.0}),
                dict(temperature=1.0, typical_p=0.7, top_k=50)]
    for s in settings:
        runs = [sample_next(logits, generator=torch.Generator().manual_seed(7), seen=seen, generated_from=4,
                            triton=t, **s) for t in (False, True)]
        assert runs[0].shape == (6, 1) and torch.equal(*runs), s


def test_generate_on_the_triton_path_runs_the_kernel_and_draws_the_reference_paths_tokens(monkeypatch):
    """A tiny GPT sampled with top-k and top-p from one seed: the Triton path (its head's "cross_entropy" kernels)
    launches the sampling kernel at every step and draws the reference path's very tokens."""
    launches, real = [], ks._launch
    monkeypatch.setattr(ks, "_launch", lambda *a: launches.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=24, n_embd=32, n_layer=1, n_head=2)).eval()
    idx = torch.randint(0, 97, (3, 5))
    out = {}
    for path in ("reference", "triton"):
        model.set_kernels(path)
        out[path] = generate(model, idx, 4, temperature=1.1, top_k=20, top_p=0.9,
                             generator=torch.Generator().manual_seed(5))
    assert len(launches) == 4 and launches[0] == (3, 97), launches
    assert torch.equal(out["reference"], out["triton"])


def test_bad_arguments_are_refused_by_name():
    x = torch.randn(2, 50)
    u = torch.rand(2)
    for args, match in [((x.long(), u, 1.0), "dtype int64"), ((x[0], u, 1.0), "2-D"),
                        ((x, u.double(), 1.0), "u must be a float32"), ((x, torch.rand(3), 1.0), r"shape \(2,\)"),
                        ((x, u, 0.0), "temperature"), ((x, u, float("nan")), "temperature"),
                        ((x.t().contiguous().t(), u, 1.0), "unit stride"), ((x, u, 1.0, 0), "top_k"),
                        ((x, u, 1.0, None, 1.5), "top_p"), ((x, u, 1.0, None, None, -0.1), "min_p"),
                        ((x[:, :0], u, 1.0), "tokens a row"), ((x, u, 1e-46), "smallest normal"),
                        ((x, u, 1e39), "above fp32's largest"),  # (Triton could not pass it: InterpreterError)
                        ((x, u, "1.0"), "temperature must be a number, got str"),
                        ((x, u, None), "temperature must be a number, got NoneType"),
                        ((x, u, 1.0, None, "0.9"), "top_p must be a number"),
                        ((x, u, 1.0, None, None, [0.1]), "min_p must be a number"),
                        ((x, u, 1.0, None, None, 0.1, 1), "min_p_first must be a bool, got int 1"),
                        ((x, u, torch.tensor(True)), "temperature must be a number, got Tensor"),
                        ((x, u, 1.0, None, torch.tensor([True])), "top_p must be a number")]:
        with pytest.raises(UserError, match=match):
            sample_tokens(*args)
    if torch.cuda.is_available():
        with pytest.raises(UserError, match="one device"):
            sample_tokens(x.cuda(), u, 1.0)


def fp32_reference(logits, u, temperature, **cut):
    """The reference path itself: sampling_logits' cuts (fp32, top-p's sums in float64), then draw_with_uniform."""
    return draw_with_uniform(sampling_logits(logits, temperature, **cut), u)


def sweep(n):
    """n uniforms spread over [0, 1): a draw at each, finer than the least kept token's mass in these rows."""
    return (torch.arange(n) + 0.5) / n


def test_negative_zero_ties_with_zero_at_the_top_k_cut():
    """-0.0 and 0.0 are one value (the reference's `logits < kth` keeps both) though their bits differ: where the
    max is 0.0, a -0.0 logit's tempered value is -0.0 - 0.0 = -0.0 beside the max's 0.0, and top_k = 1 keeps both,
    in either order (with 0.0 second largest after a 1.0 they temper alike)."""
    for row, k, drawn in (([0.0, -0.0, -1.0], 1, {0, 1}), ([-0.0, 0.0, -1.0], 1, {0, 1}),
                          ([1.0, 0.0, -0.0, -1.0], 2, {0, 1, 2})):
        rows = torch.tensor(row).expand(12, -1).contiguous()
        got = sample_tokens(rows, sweep(12), 1.0, top_k=k)
        assert got.tolist() == reference(rows, sweep(12), 1.0, top_k=k).tolist() and set(got.tolist()) == drawn, row


def test_a_top_p_below_fp32s_range_keeps_the_likeliest_token():
    """A top_p too small for fp32 (1e-50, 5e-324: 0 there) keeps the likeliest token, as any top_p under its
    probability does in the reference's float64; rounded to 0 it cut every token and drew token 0."""
    rows = torch.tensor([[1.0, 3.0, 2.0, 0.5]]).expand(2, -1).contiguous()
    for top_p in (1e-30, 1e-50, 5e-324):
        assert sample_tokens(rows, torch.tensor([0.1, 0.9]), 1.0, top_p=top_p).tolist() == [1, 1], top_p


@pytest.mark.parametrize("dev", DEVICES)
def test_a_tiny_top_p_keeps_the_likeliest_token_of_any_row(dev):
    """top_p 1e-30 (what sample_tokens and the engine send for any top_p under it) and 1e-9 keep the likeliest
    token alone, whatever the row: the mass above the top digit was the row's mass less a running sum of it,
    whose rounding (~1e-7 of the mass) passed so small a limit, so no digit was under it and every token was cut
    (token 0 drawn: here in one row of 8, seed 1's). Scalar launches and the per-row one, T 1.5, V 50. On CUDA it
    settles that the compiled kernel's sums (a GPU's reduction order, not the interpreter's numpy) keep it so."""
    g = torch.Generator().manual_seed(1)
    logits, u = torch.randn(8, 50, generator=g).to(dev), torch.rand(8, generator=g).to(dev)
    want = logits.argmax(-1).tolist()
    got = {top_p: sample_tokens(logits, u, 1.5, top_p=top_p).tolist() for top_p in (1e-30, 1e-9)}
    T, k, p, mp, first = row_tensors([(1.5, None, 1e-30, None, False), (1.5, None, 1e-9, None, True)] * 4)
    got["rows"] = sample_token_rows(logits, u, T, k, p, mp, first).tolist()
    assert got == {1e-30: want, 1e-9: want, "rows": want}


def test_a_row_holding_nan_draws_token_0_as_the_reference():
    """A NaN logit (either sign: 0/0 gives the negative one) leaves nothing to draw: token 0 on both paths
    (draw_from_probs' answer), with or without the cuts, the other rows drawn as ever. Its key sorted above +inf (or
    below -inf) and its NaN total drew whichever token ended the kept set."""
    row = torch.tensor([1.0, 2.0, 3.0, 2.5, 0.5])
    rows = row.repeat(3, 1)
    rows[0, 1] = float("nan")
    rows[2, 3] = -float("nan")
    u = torch.tensor([0.9, 0.9, 0.9])
    for cut in (dict(), dict(top_k=2), dict(top_p=0.5, min_p=0.1)):
        got = sample_tokens(rows, u, 1.0, **cut).tolist()
        assert got == [0, 3, 0] == reference(rows, u, 1.0, **cut).tolist(), cut
        assert sample_next(rows, 1.0, generator=torch.Generator().manual_seed(0), triton=True, **cut)[::2].sum() == 0


def test_ties_are_the_tempered_logits_ties():
    """The cuts compare (logit - max) / T in fp32, as the reference does: logits that differ by less than that
    difference's rounding are one value there and a top-k tie. -30 and its next float up, 80 below the max: both
    -80 after the shift (fp32 spacing 8e-6 at 80), so top_k = 2 keeps both; and 1, 2, 3 beside 1e30 (at T = 1e30
    all -1). (The fp32 reference, sampling_logits, here: the float64 one above has no such ties.)"""
    near = torch.tensor([50.0, torch.nextafter(torch.tensor(-30.0), torch.tensor(0.0)).item(), -30.0, -60.0])
    for row, T in ((near, 40.0), (torch.tensor([1e30, 1.0, 2.0, 3.0]), 1e30)):
        rows = row.expand(12, -1).contiguous()
        got = sample_tokens(rows, sweep(12), T, top_k=2)
        want = fp32_reference(rows, sweep(12), T, top_k=2)
        assert got.tolist() == want.tolist() and len(set(got.tolist())) >= 3, row


def test_ties_at_the_top_p_cut_are_kept_in_vocabulary_order_while_under_it(monkeypatch):
    """Tokens tied at the top-p boundary are ranked in vocabulary order (the reference's stable sort), each kept while
    the mass above it, the tied ones before it included, is under top_p: in [2, 1, 3, 2, 0.5, 2, 1, 2] top_p cuts
    the 2s after two, so tokens 2, 0 and 3 are kept (keeping all four 2s, the kernel drew 5 and 7 too). Then one
    logit L and N of logit 0, top_p a third of a token's mass either side of the first m + 1 0s' (test_generate's
    rows, read 256 at a time: the ties' ranks carry across blocks): the last kept token, drawn at u just under 1, is
    m or m + 1 on both paths."""
    row = torch.tensor([2.0, 1.0, 3.0, 2.0, 0.5, 2.0, 1.0, 2.0])
    w = row.double().exp()
    top_p = float((w[2] + 1.5 * w[0]) / w.sum())
    rows = row.expand(12, -1).contiguous()
    got = sample_tokens(rows, sweep(12), 1.0, top_p=top_p)
    assert got.tolist() == fp32_reference(rows, sweep(12), 1.0, top_p=top_p).tolist()
    assert set(got.tolist()) == {0, 2, 3}, got
    monkeypatch.setattr(ks, "_tiles", lambda V: (256, 4, 4))
    for N, L, m in ((1000, 2.0, 500), (300, 0.0, 123)):
        rows = torch.zeros(2, N + 1)
        rows[:, 0] = L
        Z = math.exp(L) + N
        for side in (-1, 1):
            top_p = (math.exp(L) + m + side / 3) / Z
            u = torch.full((2,), 1 - 2**-24)
            want = [m + (side > 0)] * 2
            assert sample_tokens(rows, u, 1.0, top_p=top_p).tolist() == want, (N, L, m, side)
            assert fp32_reference(rows, u, 1.0, top_p=top_p).tolist() == want, (N, L, m, side)


# (temperature, top_k, top_p, min_p, min_p_first): a row's settings for sample_token_rows, each cut on and off, top_k
# past V and 1, top_p 1 and below fp32's range, both min_p orders
ROW_SETTINGS = [(0.8, None, None, None, False), (1.3, 20, None, None, False), (0.7, None, 0.8, None, False),
                (1.0, 30, 0.9, 0.05, False), (0.9, None, 0.7, 0.1, True), (1.1, 400, 1.0, 0.02, True),
                (0.6, 1, 0.5, None, False), (2.0, 50, 1e-40, 0.3, True)]


def row_tensors(settings):
    """sample_token_rows' [B] tensors for a list of settings (None: 0 for top_k and min_p, 1 for top_p)."""
    T, k, p, mp, first = zip(*settings)
    return (torch.tensor(T), torch.tensor([x or 0 for x in k]), torch.tensor([1.0 if x is None else x for x in p]),
            torch.tensor([x or 0.0 for x in mp]), torch.tensor(first))


@pytest.mark.parametrize("dev,V", [("cpu", 157), pytest.param("cuda", 157, marks=pytest.mark.cuda),
                                   pytest.param("cuda", 50257, marks=pytest.mark.cuda)])
def test_each_rows_settings_in_one_launch_draw_its_scalar_launchs_token(monkeypatch, dev, V):
    """Eight logits rows (V 157, bfloat16), each with its own settings and drawn at a sweep of 4 uniforms, in one
    launch of the kernel: every row draws the token sample_tokens draws for it alone (the same u) and the reference
    path's (sampling_logits then draw_with_uniform, per row). On CUDA it settles that the compiled per-row launch
    (host settings sent without waiting) draws each row's scalar launch's exact id, at 157 tokens and at GPT-2's
    50,257 (49 blocks a row: the counts, masses and running sum carried across them); there the fp32 reference's
    own sums may move a draw whose u falls within their rounding of an edge, so one row in the 32 may differ from it
    (as test_gpt2_and_qwen_vocabularies_on_cuda allows), never from the scalar launch."""
    spy = FlagSpy(ks._sample_kernel, ("PER_ROW",))
    monkeypatch.setattr(ks, "_sample_kernel", spy)
    g, n = torch.Generator().manual_seed(11), 4
    logits = (torch.randn(len(ROW_SETTINGS), V, generator=g) * 1.5).bfloat16().repeat_interleave(n, 0).to(dev)
    u = sweep(n).repeat(len(ROW_SETTINGS)).to(dev)
    got = sample_token_rows(logits, u, *(t.repeat_interleave(n) for t in row_tensors(ROW_SETTINGS)))
    assert spy.launched == [True] and got.dtype == torch.int64 and got.shape == (len(u),) and got.device == u.device
    off = 0  # (rows whose token the fp32 reference's rounding moved)
    for j, (T, k, p, mp, first) in enumerate(ROW_SETTINGS):
        rows = slice(j * n, (j + 1) * n)
        alone = sample_tokens(logits[rows], u[rows], T, k, p, mp, min_p_first=first)
        ref = fp32_reference(logits[rows], u[rows], T, top_k=k, top_p=p, min_p=mp, min_p_first=first)
        assert got[rows].tolist() == alone.tolist(), (j, got[rows], alone)
        off += (alone != ref).sum().item()
        assert off <= (1 if V > 1024 else 0), (j, got[rows], alone, ref)
    assert len(set(got.tolist())) > 10  # (not one token everywhere)


@pytest.mark.parametrize("dev", DEVICES)
def test_a_top_k_past_int32_is_no_cut_as_in_the_scalar_launch(dev):
    """top_k is V or more for no cut, any int64 among them: 2^32 + 1 (and 2^40 + 3) draw what no top-k draws, as
    sample_tokens' launch does, not the top-1 (top-3) cut the kernel's int32 read would wrap them to. On CUDA: the
    compiled kernel's read of the int64 settings."""
    g = torch.Generator().manual_seed(5)
    logits, u = (torch.randn(8, 50, generator=g) * 2).to(dev), sweep(8).to(dev)
    T, _, p, mp, first = row_tensors([(1.0, None, None, None, False)] * 8)
    want = sample_tokens(logits, u, 1.0).tolist()
    assert len(set(want)) > 3  # (a top-1 or top-3 cut would draw fewer tokens)
    for k in (2**32 + 1, 2**40 + 3, 2**63 - 1):
        got = sample_token_rows(logits, u, T, torch.full((8,), k, dtype=torch.int64), p, mp, first)
        assert got.tolist() == want, k


def test_sample_token_rows_refuses_bad_settings_by_name_before_launching(monkeypatch):
    """Each setting's dtype, shape and device, and its values (top_k < 0, top_p outside (0, 1], min_p outside
    [0, 1], a temperature of 0 or inf, NaN anywhere) are refused naming the setting (and the row), before any
    launch."""
    launched = []
    monkeypatch.setattr(ks, "_launch_rows", lambda *a: launched.append(a))
    x, u = torch.randn(3, 50), torch.rand(3)
    ok = row_tensors(ROW_SETTINGS[3:6])

    def given(i, value):
        return ok[:i] + (value,) + ok[i + 1:]
    nan = float("nan")
    for i, value, match in [(0, ok[0].double(), "temperature must be a float32 tensor of shape \\(3,\\)"),
                            (0, ok[0][:2], r"temperature must be .* shape \(3,\)"),
                            (0, 0.8, "temperature must be a float32 tensor .* got float"),
                            (1, ok[1].float(), "top_k must be a int32 or int64 tensor"),
                            (2, ok[2].to("meta"), "top_p is on meta, logits on cpu"),
                            (4, ok[4].int(), "min_p_first must be a bool tensor"),
                            (0, torch.tensor([0.8, 0.0, 1.0]), "temperature must be a finite .* got 0.0 in row 1"),
                            (0, torch.tensor([0.8, 1.0, float("inf")]), "temperature .* got inf in row 2"),
                            (0, torch.tensor([nan, 1.0, 1.0]), "temperature .* got nan in row 0"),
                            (1, torch.tensor([5, -1, 0]), r"top_k must be an int >= 0 .* got -1 in row 1"),
                            (2, torch.tensor([0.5, 1.0, 0.0]), r"top_p must be in \(0, 1\] .* got 0.0 in row 2"),
                            (2, torch.tensor([1.5, 1.0, 0.5]), r"top_p must be in \(0, 1\] .* got 1.5 in row 0"),
                            (2, torch.tensor([0.5, nan, 0.5]), "top_p .* got nan in row 1"),
                            (3, torch.tensor([0.0, -0.1, 0.0]), r"min_p must be in \[0, 1\] .* in row 1"),
                            (3, torch.tensor([0.0, 0.0, nan]), "min_p .* got nan in row 2")]:
        with pytest.raises(UserError, match="sample_token_rows: " + match):
            sample_token_rows(x, u, *given(i, value))
    with pytest.raises(UserError, match="sample_token_rows: u must be a float32"):
        sample_token_rows(x, u.double(), *ok)
    assert launched == []
    sample_token_rows(x, u, *ok)  # (the spy: the checked call does reach the launch)
    assert len(launched) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("V", [50257, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_and_qwen_vocabularies_on_cuda(V, dtype):
    """Compiled for the GPU (blocks of 1,024, the copies after three passes): 64 rows of random logits at GPT-2's and
    Qwen's vocabularies under each set of cuts draw the float64 reference's token on all but the rare row whose u
    falls within the fp32 sums' rounding of an edge (at most one in 64)."""
    g = torch.Generator(device="cuda").manual_seed(V)
    logits = (torch.randn(64, V, generator=g, device="cuda") * 3).to(dtype)
    u = torch.rand(64, generator=g, device="cuda")
    for cut in (dict(), dict(top_k=50), dict(top_p=0.9), dict(top_k=50, top_p=0.9, min_p=0.05)):
        got = sample_tokens(logits, u, 0.8, **cut).cpu()
        want = reference(logits.float().cpu(), u.cpu(), 0.8, **cut)
        assert (got != want).sum() <= 1, (cut, (got != want).nonzero())


# -- shape/cut fuzz: which tokens survive the cuts, exactly --------------------------------------------------

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes under the interpreter
@given(B=st.integers(1, 3), V=st.integers(1, 400), T=st.sampled_from([0.3, 1.0, 2.5]),
       top_k=st.none() | st.integers(1, 420), top_p=st.none() | st.floats(0.01, 1.0),
       min_p=st.none() | st.floats(0.0, 0.5), ties=st.booleans(), banned=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_shape_fuzz(B, V, T, top_k, top_p, min_p, ties, banned, dtype, seed):
    """sample_tokens' survivors against sampling_logits' (the reference path's cuts, -inf for a cut token) over rows,
    vocabularies (one token, a partial block), temperature, top-k (past V too), top-p, min-p, logits with many ties
    (whole numbers) or -inf tokens (a grammar's bans), each dtype. The draw is deterministic in u: at the midpoint of
    surviving tokens' CDF intervals (float64 masses; the first, the last and 6 more of those wider than 1e-4) the
    kernel draws that very token, so the survivors and their order are the reference's; at any other u it draws a
    survivor."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    if ties:
        logits = logits.round()
    if banned:
        logits[torch.rand(B, V, generator=g) < 0.3] = float("-inf")
        logits[:, int(torch.randint(0, V, (), generator=g))] = 0.0  # one drawable token a row
    logits = logits.to(dtype)
    cut = dict(top_k=top_k, top_p=top_p, min_p=min_p)
    keep = torch.isfinite(sampling_logits(logits, T, **cut))
    z = logits.double().masked_fill(~keep, float("-inf"))
    probs = torch.softmax((z - z.amax(-1, keepdim=True)) / T, -1)
    edges = probs.cumsum(-1)
    rows, us, want = [], [], []
    for b in range(B):
        wide = (keep[b] & (probs[b] > 1e-4)).nonzero().flatten()
        # a draw a program row under the interpreter: the first and last survivors and 6 others, not all of them
        pick = wide[torch.randperm(len(wide), generator=g)[:6]].tolist() + wide[[0, -1]].tolist() if len(wide) else []
        for t in pick:
            rows.append(b)
            us.append((edges[b, t] - probs[b, t] / 2).item())
            want.append(t)
        for u in torch.rand(2, generator=g).tolist():
            rows.append(b)
            us.append(u)
            want.append(None)
    u = torch.tensor(us, dtype=torch.float32)
    got = sample_tokens(logits[rows], u, T, **cut).tolist()
    what = f"{dtype} B={B} V={V} T={T} {cut} ties={ties} banned={banned}"
    for r, w, t in zip(rows, want, got):
        assert keep[r, t], f"row {r} drew token {t}, which the cuts remove: {what}"
        assert w is None or t == w, f"row {r}: token {t} drawn at the midpoint of survivor {w}'s interval: {what}"
