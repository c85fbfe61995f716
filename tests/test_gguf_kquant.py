"""export --format gguf --gguf-type q4_k_m / q4_k_s / q5_k_m / q5_k_s / q6_k: our numpy K-quant quantizers
(train/gguf_kquant.py) checked by gguf's own K-quant dequantizers and against a line-by-line port of ggml-quants.c's
reference quantizers, the tensor types of llama-quant.cpp's mixes (train/gguf_export.py's tensor_type), and the files
through transformers' GGUF loader and our own import."""
import numpy as np
import pytest
import torch

from test_gguf_export import ARCHS, LLAMA, TEXT, load_hf, logits, random_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
T = gguf.GGMLQuantizationType
WIDE = dict(n_embd=256, mlp_hidden=256)  # (rows of whole K-quant blocks: 256 inputs)


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")


def _matrix(seed=0):
    """Gaussian rows beside ggml's odd blocks: a block of zeros, a constant sub-block (negative: a min of its own),
    one positive constant, a tiny one (under GROUP_MAX_EPS for Q6_K), one outlier."""
    x = np.random.default_rng(seed).standard_normal((12, 512)).astype(np.float32)
    x[0, :256] = 0
    x[1, :32] = -0.5
    x[2, 32:64] = 0.25
    x[3, :16] = 1e-17
    x[4, 5] = 40.0
    return x


def _rel_rms(a, x):
    return float(np.sqrt(np.mean((a - x) ** 2)) / np.sqrt(np.mean(x ** 2)))


# relative RMS error on Gaussian rows, measured: Q4_K 0.072 (Q4_0 0.086, Q4_1 0.078), Q5_K 0.036 (Q5_0 0.043,
# Q5_1 0.038), Q6_K 0.018 (Q8_0 0.0054): each K-quant below the legacy types of its bits, as in llama.cpp's tables
BOUND = {"q4_k": (0.08, "q4_1"), "q5_k": (0.04, "q5_1"), "q6_k": (0.02, "q5_k")}


@pytest.mark.parametrize("kind", list(BOUND))
def test_blocks_hold_what_the_quantizer_chose(kind):
    """gguf.quants.dequantize of our blocks is exactly the value the quantizer computed from the levels and scales
    it chose (every field where ggml reads it), zero blocks decode to zero, and the error is below the next legacy
    type's."""
    from tritongpt.train.gguf_kquant import BLOCK_BYTES, QUANTIZERS

    x = _matrix()
    blocks, value = QUANTIZERS[kind](x)
    assert blocks.dtype == np.uint8 and blocks.shape == (12, 2 * BLOCK_BYTES[kind])
    assert np.array_equal(gguf.quants.dequantize(blocks, T[kind.upper()]), value)
    assert not value[0, :256].any()
    if kind == "q6_k":  # (a 16 of values under GROUP_MAX_EPS: scale 0)
        assert not value[3, :16].any()
    g = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    err = _rel_rms(QUANTIZERS[kind](g)[1], g)
    bound, legacy = BOUND[kind]
    theirs = _rel_rms(QUANTIZERS[legacy](g)[1], g) if legacy in QUANTIZERS else \
        _rel_rms(gguf.quants.dequantize(gguf.quants.quantize(g, T[legacy.upper()]), T[legacy.upper()]), g)
    assert 0.2 * bound < err < min(bound, theirs)


def _nearest(v):
    return int(np.rint(np.float32(v)))


def _ref_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """ggml-quants.c's make_qkx2_quants, one sub-block, a line at a time in float32 (use_mad false)."""
    f = np.float32
    mn, mx = min(x.min(), f(0)), x.max()
    sum_w, sum_x = w.sum(dtype=f), (w * x).sum(dtype=f)
    if mx == mn:
        return f(0), -mn, np.zeros(len(x), f)
    iscale = f(nmax) / (mx - mn)
    scale = f(1) / iscale
    L = np.array([max(0, min(nmax, _nearest(iscale * (v - mn)))) for v in x], f)
    best = (w * (scale * L + mn - x) ** 2).sum(dtype=f)
    for i in range(nstep + 1):
        iscale = (f(rmin) + f(rdelta) * i + nmax) / (mx - mn)
        La = np.array([max(0, min(nmax, _nearest(iscale * (v - mn)))) for v in x], f)
        sl, sl2, sxl = (w * La).sum(dtype=f), (w * La * La).sum(dtype=f), (w * La * x).sum(dtype=f)
        D = sum_w * sl2 - sl * sl
        if D > 0:
            s, m = (sum_w * sxl - sum_x * sl) / D, (sl2 * sum_x - sl * sxl) / D
            if m > 0:
                s, m = sxl / sl2, f(0)
            err = (w * (s * La + m - x) ** 2).sum(dtype=f)
            if err < best:
                L, best, scale, mn = La, err, s, m
    return scale, -mn, L


def _ref_q45_k_values(x, nmax):
    """quantize_row_q4_K_ref (nmax 15) / quantize_row_q5_K_ref (31) on one 256-block, then dequantize_row_q4_K /
    q5_K: the block's values."""
    f = np.float32
    subs = x.reshape(8, 32)
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    res = [_ref_qkx2(s, np.sqrt((s * s).sum(dtype=f) / 32) + np.abs(s), nmax, rmin, 0.1, nstep) for s in subs]
    scales, mins = np.array([r[0] for r in res], f), np.array([r[1] for r in res], f)
    max_scale, max_min = max(scales.max(), f(0)), max(mins.max(), f(0))
    ls = [min(63, _nearest(f(63) / max_scale * s)) for s in scales]
    lm = [min(63, _nearest(f(63) / max_min * m)) for m in mins]
    d, dmin = np.float16(max_scale / f(63)).astype(f), np.float16(max_min / f(63)).astype(f)
    out = []
    for j, s in enumerate(subs):
        dj, mj = d * f(ls[j]), dmin * f(lm[j])
        L = [max(0, min(nmax, _nearest((v + mj) / dj))) for v in s] if dj else res[j][2]
        out += [dj * f(q) - mj for q in L]
    return np.array(out, f)


def _ref_q6_k_values(x):
    """quantize_row_q6_K_ref (make_qx_quants, rmse_type 1) on one 256-block, then dequantize_row_q6_K."""
    f = np.float32
    scales, Ls = [], []
    for s in x.reshape(16, 16):
        mx = s[np.abs(s).argmax()]
        iscale = f(-32) / mx
        L = [max(-32, min(31, _nearest(iscale * v))) for v in s]
        w = s * s
        slx, sl2 = (w * s * L).sum(dtype=f), (w * np.array(L, f) ** 2).sum(dtype=f)
        scale = slx / sl2
        best = scale * slx
        for i in [i for i in range(-9, 10) if i]:
            iscale = -(f(32) + f(0.1) * i) / mx
            La = [max(-32, min(31, _nearest(iscale * v))) for v in s]
            slx, sl2 = (w * s * La).sum(dtype=f), (w * np.array(La, f) ** 2).sum(dtype=f)
            if sl2 > 0 and slx * slx > best * sl2:
                L, scale, best = La, slx / sl2, slx / sl2 * slx
        scales.append(scale)
        Ls.append(L)
    max_scale = scales[int(np.abs(scales).argmax())]
    iscale = f(-128) / max_scale
    d = np.float16(f(1) / iscale).astype(f)
    out = []
    for j, s in enumerate(x.reshape(16, 16)):
        dj = d * f(min(127, _nearest(iscale * scales[j])))
        out += [dj * f(q) for q in ([max(-32, min(31, _nearest(v / dj))) for v in s] if dj else Ls[j])]
    return np.array(out, f)


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_matches_a_line_by_line_port_of_the_reference(kind):
    """Our vectorized search against ggml-quants.c's reference quantizer ported a line at a time (float32): the same
    values on Gaussian blocks (measured equal on 40 blocks; numpy's sums are ordered otherwise than the C's, so a
    near tie could still go the other way elsewhere)."""
    from tritongpt.train.gguf_kquant import QUANTIZERS

    x = np.random.default_rng(2).standard_normal((1, 1024)).astype(np.float32)
    ours = QUANTIZERS[kind](x)[1][0]
    ref = [_ref_q6_k_values(b) if kind == "q6_k" else _ref_q45_k_values(b, 15 if kind == "q4_k" else 31)
           for b in x.reshape(4, 256)]
    assert np.array_equal(ours, np.concatenate(ref))


# llama-quant.cpp's llama_tensor_get_type, pinned on an 8-layer model: use_more_bits picks layers 0, 3, 6, 7 (the
# first and last eighth, and every third between); Q4_K_S the first 4 attn_v and the first eighth of ffn_down
MIX = {"q4_k_m": ("Q4_K", {0: "Q6_K", 3: "Q6_K", 6: "Q6_K", 7: "Q6_K"}, {0: "Q6_K", 3: "Q6_K", 6: "Q6_K", 7: "Q6_K"}),
       "q5_k_m": ("Q5_K", {0: "Q6_K", 3: "Q6_K", 6: "Q6_K", 7: "Q6_K"}, {0: "Q6_K", 3: "Q6_K", 6: "Q6_K", 7: "Q6_K"}),
       "q4_k_s": ("Q4_K", {0: "Q5_K", 1: "Q5_K", 2: "Q5_K", 3: "Q5_K"}, {0: "Q5_K"}),
       "q5_k_s": ("Q5_K", {}, {}),
       "q6_k": ("Q6_K", {}, {})}


@pytest.mark.parametrize("kind", list(MIX))
def test_mix_rule_on_8_layers(kind):
    """Each tensor's type in an 8-layer Llama of width 256: output Q6_K, an untied token_embd the mix's base type,
    attn_v and ffn_down per MIX, every other matrix the base type, norms F32."""
    from tritongpt.train.gguf_export import tensor_type

    base, attn_v, ffn_down = MIX[kind]
    assert tensor_type(kind, "output.weight", (288, 256), 8, head=True) == "q6_k"
    assert tensor_type(kind, "token_embd.weight", (288, 256), 8) == base.lower()
    assert tensor_type(kind, "output_norm.weight", (256,), 8) == "f32"
    for i in range(8):
        assert tensor_type(kind, f"blk.{i}.attn_v.weight", (128, 256), 8) == attn_v.get(i, base).lower(), i
        assert tensor_type(kind, f"blk.{i}.ffn_down.weight", (256, 256), 8) == ffn_down.get(i, base).lower(), i
        for other in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert tensor_type(kind, f"blk.{i}.{other}.weight", (256, 256), 8) == base.lower()


def test_mix_rule_fused_qkv_70b_and_tied_head():
    """A fused attn_qkv (GPT-2, Phi-3) is Q5_K in Q4_K_M, Q6_K in Q5_K_M, the base type in the _S mixes; a 70B
    Llama's attn_v Q5_K where the mix says Q4_K; a tied token_embd (the head) Q6_K."""
    from tritongpt.train.gguf_export import tensor_type

    qkv = {k: tensor_type(k, "blk.1.attn_qkv.weight", (768, 256), 2) for k in ("q4_k_m", "q5_k_m", "q4_k_s", "q5_k_s")}
    assert qkv == {"q4_k_m": "q5_k", "q5_k_m": "q6_k", "q4_k_s": "q4_k", "q5_k_s": "q5_k"}
    # (layer 20 of 80: not one of use_more_bits' layers, which are Q6_K either way)
    assert tensor_type("q4_k_m", "blk.20.attn_v.weight", (1024, 8192), 80, big=True) == "q5_k"
    assert tensor_type("q4_k_m", "blk.20.attn_v.weight", (1024, 8192), 80) == "q4_k"
    assert tensor_type("q4_k_m", "blk.1.attn_v.weight", (1024, 8192), 80, big=True) == "q6_k"
    assert tensor_type("q4_k_s", "blk.9.attn_v.weight", (1024, 8192), 80, big=True) == "q5_k"
    assert tensor_type("q4_k_m", "token_embd.weight", (288, 256), 2, head=True) == "q6_k"


def test_widths_not_whole_blocks_fall_back_as_llama_quantize():
    """Rows of 64 (no block of 256): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (tensor_type_fallback), the head Q8_0;
    rows of 48 (no block of 32): F16. The legacy types' head: Q6_K at width 256, Q8_0 at 64 (its fallback)."""
    from tritongpt.train.gguf_export import tensor_type

    assert tensor_type("q4_k_m", "blk.1.attn_q.weight", (64, 64), 8) == "q5_0"
    assert tensor_type("q4_k_m", "blk.0.attn_v.weight", (32, 64), 8) == "q8_0"  # (Q6_K on layer 0)
    assert tensor_type("q5_k_s", "blk.1.attn_q.weight", (64, 64), 8) == "q5_1"
    assert tensor_type("q6_k", "blk.1.attn_q.weight", (64, 64), 8) == "q8_0"
    assert tensor_type("q4_k_m", "output.weight", (288, 64), 8, head=True) == "q8_0"
    assert tensor_type("q4_k_m", "blk.1.attn_q.weight", (48, 48), 8) == "f16"
    for kind in ("q4_0", "q4_1", "q5_0", "q5_1"):
        assert tensor_type(kind, "output.weight", (288, 256), 2, head=True) == "q6_k"
        assert tensor_type(kind, "output.weight", (288, 64), 2, head=True) == "q8_0"
        assert tensor_type(kind, "blk.0.attn_v.weight", (128, 256), 2) == kind
    assert tensor_type("q8_0", "output.weight", (288, 256), 2, head=True) == "q8_0"


def test_the_file_has_the_mix_and_its_file_type(tok, tmp_path, capsys):
    """A q4_k_m file of an 8-layer Llama read by gguf.GGUFReader: general.file_type MOSTLY_Q4_K_M (15), each
    tensor's type as tensor_type says (attn_v / ffn_down Q6_K on layers 0, 3, 6, 7), each K-quant tensor what our
    quantizer makes of the matrix. At width 64 the fallbacks are said."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_kquant import QUANTIZERS

    model = random_model(dict(LLAMA, **WIDE, n_layer=8), 288)
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "m.gguf", tok, "q4_k_m"))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M == 15
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == [T.Q6_K, T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_K,
                                                                    T.Q4_K, T.Q6_K, T.Q6_K]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [types[f"blk.{i}.attn_v.weight"]
                                                                      for i in range(8)]
    assert types["blk.5.ffn_up.weight"] == T.Q4_K and types["blk.5.attn_norm.weight"] == T.F32
    t = {t.name: t for t in reader.tensors}["blk.4.ffn_down.weight"]
    w = model.trf_blocks[4].ff.w_down.weight.detach().numpy()
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape), QUANTIZERS["q4_k"](w)[1])
    capsys.readouterr()
    narrow = gguf.GGUFReader(write_gguf(random_model(LLAMA, 288), tmp_path / "n.gguf", tok, "q5_k_m"))
    assert "not whole blocks of 256" in capsys.readouterr().err
    types = {t.name: t.tensor_type for t in narrow.tensors}
    # (of 2 layers use_more_bits takes layer 1 only: 7 * 2 / 8 = 1)
    assert (types["blk.1.attn_q.weight"], types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"],
            types["output.weight"]) == (T.Q5_1, T.Q5_1, T.Q8_0, T.Q8_0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_and_our_import_read_q4_k_m(arch, tok, tmp_path):
    """A q4_k_m file through transformers' GGUF loader (which dequantizes K-quants with gguf) gives the logits of
    our import of the same file dequantized (1e-5 of the largest), and those are the float model's within 4-bit
    rounding, not equal to them, and closer than a q4_0 file's (whose head is Q6_K at this width too). GPT-2's
    fused attn_qkv is Q5_K there. Measured (relative RMS of the logits): llama 0.40 (q4_0 0.45), gpt2 0.072
    (0.116)."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    model = random_model(dict(ARCHS[arch], **(WIDE if arch == "llama" else dict(n_embd=256))), 288)
    with torch.no_grad():  # (random_model's 0.3 at width 256 is chaos: any rounding changes every logit)
        for name, p in model.named_parameters():
            if p.ndim == 2 and "emb" not in name:
                p.mul_(0.3)
    path = write_gguf(model, tmp_path / "m.gguf", tok, "q4_k_m")
    if arch == "gpt2":
        assert {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}["blk.1.attn_qkv.weight"] == T.Q5_K
    ids = torch.tensor([tok.encode(TEXT, allowed_special="all")])
    theirs = load_hf(path)(ids).logits.detach()
    ours = logits(load_gguf(path, quantized=False), ids)  # (every tensor dequantized by gguf, into our model)
    scale = ours.abs().max().item()
    assert (theirs - ours).abs().max().item() <= 1e-5 * scale
    float_ = logits(model, ids)
    off = lambda x: ((x - float_).pow(2).mean().sqrt() / float_.pow(2).mean().sqrt()).item()  # noqa: E731
    # (random weights through two layers amplify 4 bits a lot: Q4_0's own file is further off)
    legacy = write_gguf(model, tmp_path / "q4_0.gguf", tok, "q4_0")
    head = "output.weight" if arch == "llama" else "token_embd.weight"  # (GPT-2's head is its tied embedding)
    assert {t.name: t.tensor_type for t in gguf.GGUFReader(legacy).tensors}[head] == T.Q6_K  # (llama-quantize's)
    q4_0 = logits(load_gguf(legacy, quantized=False), ids)
    assert 1e-3 < off(ours) < off(q4_0)
    kept = logits(load_gguf(path), ids)  # (however the import keeps Q4_K: the same function)
    assert (kept - ours).abs().max().item() <= 1e-3 * scale


def test_cli_writes_a_k_mix_and_refuses_a_bare_k_type(tok, tmp_path, capsys):
    """`tritongpt export CKPT --format gguf --gguf-type q5_k_s`: a MOSTLY_Q5_K_S file; q4_k (llama-quantize's alias
    of q4_k_m, no mix here) refused by name, by the command and by write_gguf."""
    from tritongpt.cli import main
    from tritongpt.errors import UserError
    from tritongpt.train.gguf_export import write_gguf

    tok.save(tmp_path / "tok.json")
    model = random_model(dict(LLAMA, **WIDE), 288)
    model.save(tmp_path / "m.safetensors")
    out = tmp_path / "m.gguf"
    argv = ["export", str(tmp_path / "m.safetensors"), "--tokenizer", str(tmp_path / "tok.json"), "--format", "gguf",
            "--out", str(out)]
    assert main(argv + ["--gguf-type", "q5_k_s"]) == 0
    assert "Q5_K_S" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q5_K_S
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"] == T.Q5_K
    with pytest.raises(SystemExit):
        main(argv + ["--gguf-type", "q4_k", "--overwrite"])
    assert "q4_k" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"'q4_k'.*q4_k_m or q4_k_s"):
        write_gguf(model, tmp_path / "k.gguf", tok, "q4_k")
