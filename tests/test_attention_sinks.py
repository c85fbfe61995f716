"""Attention sinks (gpt-oss): a learned logit per query head, one more column of every row's softmax with no
value, dropped after it (transformers' GptOss eager_attention_forward). kernels/attention.py folds it into the
forward's epilogue (_sink_fold) and the split-KV combine; model/layers.py MultiHeadAttention.attend is the
textbook version (GPTConfig.attention_sinks).

The reference here is float64 and written out: softmax over [scores, sink], then the sink column dropped.
Shapes stay small (the interpreter's 16 x 16 tiles, lengths not multiples of 16)."""
import math

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, report
from test_attention import same_document
from tritongpt.errors import UserError
from tritongpt.kernels.attention import dropout_mask, flash_attention
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.generate import generate

NAMES = ("out", "dq", "dk", "dv", "dsinks")


def sink_reference(q, k, v, sinks, causal=True, window=None, doc_ids=None, softcap=None, keep=None, dropout_p=0.0):
    """softmax([q k^T / sqrt(D) (capped) + masks, sinks[h]])[..., :-1] (dropout by keep) @ v, k and v repeated to
    q's heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    # (the masks on the scores' device: the CUDA tests compute this reference in float64 on the GPU)
    pos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)  # bottom-right: query i at position Tk - Tq + i
    cols = torch.arange(Tk, device=q.device)[None, :]
    if causal:
        scores = scores.masked_fill(cols > pos, float("-inf"))
    if window is not None:
        scores = scores.masked_fill(cols <= pos - window, float("-inf"))
    if doc_ids is not None:
        scores = scores.masked_fill(~same_document(doc_ids, Tq)[:, None].to(q.device), float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    if keep is not None:  # dropout after the softmax, on the real columns only (nn.Dropout on the weights)
        weights = weights * keep.to(weights) / (1.0 - dropout_p)
    return weights @ v


def grads(fn, q, k, v, sinks, do):
    """(out, dq, dk, dv, dsinks) of fn on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def make(B, H, Hkv, Tq, Tk, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g) for _ in range(2))
    sinks = torch.randn(H, generator=g) * 2  # in the scores' range: a sink takes a real share of each row
    do = torch.randn(B, H, Tq, D, generator=g)
    return q, k, v, sinks, do


def check(shape, device, tag, dtype=torch.float32, tol=1e-4, **kw):
    q, k, v, sinks, do = make(*shape, seed=sum(shape))
    ref_kw = {**kw, **({"doc_ids": kw["doc_ids"].cpu()} if "doc_ids" in kw else {})}
    if kw.get("dropout_p"):  # the kernels' own keep-mask (dropout_mask), given to the reference
        B, H, Tq, _ = q.shape
        ref_kw = {**ref_kw, "keep": dropout_mask(kw["seed"], B, H, Tq, k.shape[2], kw["dropout_p"], device).cpu()}
        del ref_kw["seed"]
    got = grads(lambda a, b, c, s: flash_attention(a, b, c, sinks=s, **kw),
                *(t.to(device, dtype) for t in (q, k, v, sinks, do)))
    ref = grads(lambda a, b, c, s: sink_reference(a, b, c, s, **ref_kw),
                *(t.double() for t in (q, k, v, sinks, do)))
    for name, g_, r in zip(NAMES, got, ref):
        assert_close_rel(g_.double().cpu(), r, tol, f"{tag} {name}")


# (B, H, Hkv, Tq, Tk, D): lengths 1, 17, 37 against 16-wide tiles
SHAPES = {
    "one token": (1, 2, 2, 1, 1, 64),
    "17, head dim 64": (2, 2, 2, 17, 17, 64),
    "37, head dim 32": (1, 3, 3, 37, 37, 32),
    "GQA 4 over 2, the last 17 of 37 keys": (1, 4, 2, 17, 37, 64),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_sinks_fwd_bwd(shape, device):
    check(SHAPES[shape], device, shape)


def test_fp32_sinks_window_softcap_and_not_causal(device):
    check((1, 4, 2, 37, 37, 32), device, "window 5", window=5)
    check((1, 2, 2, 17, 37, 32), device, "softcap", softcap=3.0)
    check((1, 2, 1, 17, 37, 32), device, "not causal", causal=False)


def test_fp32_sinks_dropout(device):
    check((1, 1, 1, 17, 20, 16), device, "dropout", dropout_p=0.3, seed=5)


def test_fp32_sinks_documents(device):
    doc_ids = torch.tensor([[0] * 9 + [1] * 20 + [2] * 8])
    check((1, 2, 2, 37, 37, 32), device, "documents", doc_ids=doc_ids.to(device))


def test_bf16_sinks(device):
    check((1, 4, 2, 37, 37, 64), device, "bf16", dtype=torch.bfloat16, tol=1e-2)


@pytest.mark.parametrize("n", [1, 3])
def test_sinks_decode_splits_and_kv_len(n, forced_splits, device):
    """Decode over a preallocated cache (kv_len one length, then one a row; a paged cache) through the single
    pass (n = 1) and the split-KV path's combine (n = 3: it must add the sink, the splits' partials leave it out);
    GQA packed."""
    state = forced_splits(n)
    q, k, v, sinks, _ = make(2, 4, 2, 1, 41, 64, seed=7)
    q, k, v, sinks = (t.to(device) for t in (q, k, v, sinks))
    with torch.no_grad():
        for lens in ([29], [29, 41]):
            kv_len = torch.tensor(lens if len(lens) > 1 else lens[0], device=device)
            got = flash_attention(q, k, v, sinks=sinks, kv_len=kv_len)
            for b in range(2):
                L = lens[min(b, len(lens) - 1)]
                want = sink_reference(q[b:b + 1].double().cpu(), k[b:b + 1, :, :L].double().cpu(),
                                      v[b:b + 1, :, :L].double().cpu(), sinks.double().cpu())
                assert_close_rel(got[b:b + 1].double().cpu(), want, 1e-4, f"splits={n} kv_len={lens} row {b}")
        # a paged cache: the same keys in pages of 8, each row's pages in reverse order of the pool
        pool_k, pool_v = (t[:, :, :40].reshape(2, 2, 5, 8, 64).permute(0, 2, 1, 3, 4).reshape(10, 2, 8, 64)
                          for t in (k, v))
        table = torch.arange(10, dtype=torch.int32, device=device).view(2, 5).flip(1).contiguous()
        pool_k, pool_v = (t[torch.arange(10).view(2, 5).flip(1).flatten().argsort().to(device)]
                          for t in (pool_k, pool_v))
        lens = torch.tensor([29, 40], device=device)
        got = flash_attention(q, pool_k, pool_v, sinks=sinks, kv_len=lens, block_table=table)
        for b, L in enumerate((29, 40)):
            want = sink_reference(q[b:b + 1].double().cpu(), k[b:b + 1, :, :L].double().cpu(),
                                  v[b:b + 1, :, :L].double().cpu(), sinks.double().cpu())
            assert_close_rel(got[b:b + 1].double().cpu(), want, 1e-4, f"splits={n} paged row {b}")
        # a chunk of 3 (the causal mask hides a split from the chunk's first rows) with a window
        q3 = torch.randn(2, 4, 3, 64, generator=torch.Generator().manual_seed(3)).to(device)
        got = flash_attention(q3, k, v, sinks=sinks, window=20)
        want = sink_reference(*(t.double().cpu() for t in (q3, k, v, sinks)), window=20)
        assert_close_rel(got.double().cpu(), want, 1e-4, f"splits={n} chunk of 3, window 20")
    assert (state["launches"] > 0) == (n > 1)


def test_minus_inf_sinks_are_no_sinks_and_a_sink_matters(device):
    q, k, v, sinks, do = (t.to(device) for t in make(1, 2, 2, 17, 17, 32, seed=11))
    plain = grads(lambda a, b, c, s: flash_attention(a, b, c), q, k, v, sinks, do)
    none = grads(lambda a, b, c, s: flash_attention(a, b, c, sinks=s), q, k, v,
                 torch.full_like(sinks, float("-inf")), do)
    for name, a, b in zip(NAMES[:4], plain, none):
        assert torch.equal(a, b), name
    assert not none[4].any()  # a -inf sink takes no share: its gradient is 0
    with torch.no_grad():
        very_negative = flash_attention(q, k, v, sinks=torch.full_like(sinks, -1e4))
        sunk = flash_attention(q, k, v, sinks=torch.full_like(sinks, 2.0))
    assert torch.allclose(very_negative, plain[0], rtol=0, atol=1e-6)
    # a sink shrinks every row's weights: no no-op
    assert (sunk - plain[0]).abs().max() > 0.1


def test_sinks_refused_by_name(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    with pytest.raises(ValueError, match=r"sinks must be a float tensor \[H\] = \[2\]"):
        flash_attention(q, q, q, sinks=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="sinks must be a float tensor"):
        flash_attention(q, q, q, sinks=torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="sinks must be a float tensor"):
        flash_attention(q, q, q, sinks=[0.0, 0.0])
    with pytest.raises(UserError, match="attention_sinks must be True or False"):
        GPTConfig(attention_sinks="yes")


TINY = dict(vocab_size=61, context_length=40, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, position_encoding="rope",
            norm="rmsnorm", mlp="swiglu", bias=False, attention_window=7, window_layers="odd", attention_sinks=True)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(**TINY))
    with torch.no_grad():
        for block in model.trf_blocks:
            block.att.sinks.normal_(0.0, 2.0)  # not init's ~0: each sink takes a real share
    return model


def test_model_sinks_both_paths(device):
    """Logits, loss and every gradient (the sinks' too) agree on the reference and Triton paths; the state dict
    carries the sinks."""
    model = tiny_model().to(device)
    assert tuple(model.trf_blocks[0].att.sinks.shape) == (4,)
    idx = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(1)).to(device)
    runs = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        model.zero_grad()
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        assert torch.allclose(model(idx[:, :-1], targets=idx[:, 1:]), loss, rtol=1e-5, atol=0)  # the model's own
        loss.backward()
        runs[kernels] = (logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_logits, ref_loss, ref_grads), (tri_logits, tri_loss, tri_grads) = runs["reference"], runs["triton"]
    assert_close_rel(tri_logits, ref_logits, 1e-4, "logits")
    assert abs(tri_loss.item() - ref_loss.item()) < 1e-5
    assert any(".att.sinks" in n for n in ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        assert_close_rel(tri_grads[name], g, 1e-3, name)
    # save/load keeps the sinks: a fresh model with other sinks gives the same logits once loaded
    state = model.state_dict()
    assert {n for n in state if "sinks" in n} == {f"trf_blocks.{i}.att.sinks" for i in range(2)}
    other = tiny_model(seed=5).to(device).eval()
    other.load_state_dict(state)
    model.set_kernels("reference")
    with torch.no_grad():
        assert torch.equal(other.eval()(idx), model.eval()(idx))


def test_model_sinks_decode(device):
    """Greedy decode over the KV cache (float and int8) gives the same tokens on both paths, and the Triton path's
    steps over the cache give the reference path's logits."""
    model = tiny_model().to(device)
    idx = torch.randint(0, 61, (1, 14), generator=torch.Generator().manual_seed(1)).to(device)
    model.eval()
    tokens = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        with torch.no_grad():
            tokens[kernels] = generate(model, idx[:, :5], 4, temperature=0.0)
            # an int8 KV cache: the kernels' INT8_KV loads under the same epilogue
            tokens[kernels, "int8"] = generate(model, idx[:, :5], 4, temperature=0.0, kv_cache_dtype="int8")
    assert torch.equal(tokens["reference"], tokens["triton"])
    assert torch.equal(tokens["reference", "int8"], tokens["triton", "int8"])
    # the Triton path's cache steps (prefill, single tokens, a chunk: Tq < Tk in the kernel) give the reference
    # path's whole-sequence logits (greedy tokens of a tiny random model alone could agree by chance)
    model.set_kernels("reference")
    with torch.no_grad():
        want = model(idx)
    model.set_kernels("triton")
    _, stepped, _ = decode_token_by_token(model, idx, prefill=6, singles=2, whole=False)
    assert_close_rel(stepped, want, 1e-4, "decoded over the cache, triton")


def test_export_refuses_sinks(tmp_path):
    """No Hugging Face family this exports to has sinks: writing the other weights would drop them silently."""
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.llama_weights import refuse_not_llama

    gpt2 = GPTModel(GPTConfig(vocab_size=61, context_length=16, n_embd=32, n_layer=1, n_head=2, attention_sinks=True))
    with pytest.raises(UserError, match="has attention sinks .* cannot be exported as a GPT-2 folder"):
        export_gpt2(gpt2, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()
    with pytest.raises(UserError, match="has attention sinks .*Llama.* cannot be exported as a Llama folder"):
        refuse_not_llama(GPTModel(GPTConfig(**{**TINY, "attention_window": 0})), "a Llama folder", "Llama")


# ----------------------------------------------------------------------------- GPU (gpt-oss sizes)
# The bf16 rule of tests/test_attention.py (FlashAttention's), for 16-bit runs at sizes the interpreter cannot reach:
# the kernel's relative error against float64 (forward and every gradient, the sinks given) at most 2x the error of
# PyTorch's own fused attention (SDPA: flash for the causal mask, a fused masked kernel for the window; never its
# math backend, which computes half inputs in fp32 and would be no yardstick) in the same dtype against float64, on
# the same q, k, v and dO without sinks: SDPA has none, and a sink changes no rounding the kernels do but the
# epilogue's fp32 sum. The sinks' own gradient has no SDPA counterpart: at most 2x the error of the textbook
# reference above evaluated in that dtype (torch's own 16-bit ops), and within 1e-2. Measured under the interpreter
# at T 96-99 (head dim 64, GQA 4 over 2, a window of 32 and none): the kernel 0.96-1.04x SDPA's error in bf16 and
# fp16 (dk, dv 0.7x), dsinks 0.24-0.58x the textbook's.
CUDA_SHAPES = {  # (B, H, Hkv, T, D, window): gpt-oss's head dim 64 and window 128, GQA, a length off the tiles
    "T 1024 hd64 GQA 8/2 window 128": (2, 8, 2, 1024, 64, 128),
    "T 1027 hd64 GQA 8/2 causal": (2, 8, 2, 1027, 64, None),
    "T 1027 hd128 GQA 8/1 window 128": (1, 8, 1, 1027, 128, 128),
    "T 1024 hd128 GQA 4/2 causal": (2, 4, 2, 1024, 128, None),
}


def sdpa_grads(q, k, v, do, window):
    """(out, dq, dk, dv) of SDPA in q's dtype without sinks, k and v repeated to q's heads, on a fused backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    T, group = q.shape[2], q.shape[1] // k.shape[1]
    pos = torch.arange(T, device=q.device)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window) if window else None

    def sdpa(a, b, c):
        b, c = b.repeat_interleave(group, 1), c.repeat_interleave(group, 1)
        if band is None:
            return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)
        return torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=band)

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = sdpa(*leaves)
        out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(CUDA_SHAPES))
def test_cuda_16bit_sinks_within_2x_of_sdpa(shape, dtype):
    B, H, Hkv, T, D, window = CUDA_SHAPES[shape]
    q, k, v, sinks, do = (t.to("cuda", dtype) for t in make(B, H, Hkv, T, T, D, seed=T + D))
    got = grads(lambda a, b, c, s: flash_attention(a, b, c, sinks=s, window=window), q, k, v, sinks, do)
    ref = grads(lambda a, b, c, s: sink_reference(a, b, c, s, window=window), *(t.double() for t in (q, k, v, sinks)),
                do.double())
    textbook = grads(lambda a, b, c, s: sink_reference(a, b, c, s, window=window), q, k, v, sinks, do)
    no_sinks = torch.full((H,), float("-inf"), device="cuda", dtype=torch.float64)
    ref_plain = grads(lambda a, b, c, s: sink_reference(a, b, c, no_sinks, window=window),
                      *(t.double() for t in (q, k, v, sinks)), do.double())
    sdpa = sdpa_grads(q, k, v, do, window)
    for name, g, r, t, s, rp in zip(NAMES, got, ref, textbook, sdpa + [None], ref_plain):
        _, rel = assert_close_rel(g, r, 2e-2 if name != "dsinks" else 1e-2, f"cuda {shape} {dtype} {name}")
        yard, what = (report(t, r)[1], "the textbook's") if name == "dsinks" else (report(s, rp)[1], "SDPA's")
        print(f"  {what} {name}: rel={yard:.3e}")
        assert rel <= 2 * yard, f"{shape} {dtype} {name}: {rel:.3e} > 2 x {what} {yard:.3e}"
    # the sinks take a real share of these rows: without them the output is another
    assert report(ref_plain[0], ref[0])[1] > 0.05


@pytest.mark.cuda
@pytest.mark.parametrize("splits", ["chosen", 1])
def test_cuda_decode_with_sinks_kv_len_and_window(splits, forced_splits):
    """A decode step over a preallocated bf16 cache on the GPU (gpt-oss's heads: 64 wide, 8 query heads a KV head):
    one length, then one a row, with and without window 128, through the split-KV path the launch chooses (its
    combine adds the sinks) and the single pass; each row against float64 on its filled keys, within 1e-2 (bf16's
    output rounding is ~2e-3; a sink left out is 0.2-0.9 off here)."""
    from tritongpt.kernels import attention

    B, H, Hkv, cap, D = 2, 16, 2, 4096, 64
    if splits == "chosen":  # the launch's own choice at batch 2 (8 query heads packed a KV head): a split here
        assert attention._num_splits(B, *attention._split_rows(H, Hkv, 1)[:2], cap, torch.device("cuda")) > 1
    # (the fixture counts the split path's launches; forcing 1 puts every call on the single pass)
    state = forced_splits(1) if splits == 1 else forced_splits(attention._num_splits(
        B, *attention._split_rows(H, Hkv, 1)[:2], cap, torch.device("cuda")))
    q, k, v, sinks, _ = make(B, H, Hkv, 1, cap, D, seed=9)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in (q, k, v))
    # fp32 sinks (a checkpoint's parameter), raised by 5: over thousands of keys a sink near 0 takes ~0.3% of a row
    # (measured: 0.25-0.6% off without it, 4-5% in the window), at +5 20-90%
    sinks = (sinks + 5.0).cuda()
    with torch.no_grad():
        for lens in ([3000], [3000, 1234]):
            kv_len = torch.tensor(lens if len(lens) > 1 else lens[0], device="cuda")
            for window in (None, 128):
                got = flash_attention(q, k, v, sinks=sinks, kv_len=kv_len, window=window)
                for b in range(B):
                    L = lens[min(b, len(lens) - 1)]
                    want = sink_reference(*(t[b:b + 1].double() for t in (q, k[:, :, :L], v[:, :, :L])),
                                          sinks.double(), window=window)
                    plain = sink_reference(*(t[b:b + 1].double() for t in (q, k[:, :, :L], v[:, :, :L])),
                                           torch.full_like(sinks, float("-inf")).double(), window=window)
                    assert report(plain, want)[1] > 0.05  # the sinks matter here
                    assert_close_rel(got[b:b + 1], want, 1e-2, f"splits {splits} kv_len {lens} window {window} "
                                                               f"row {b}")
    assert (state["launches"] > 0) == (splits != 1), state


@pytest.mark.cuda
def test_cuda_graph_decoding_with_sinks():
    """tests/test_decode_graph.py's real capture and replay, on the tiny GPT with sinks (GQA, RoPE, a window on odd
    layers) on the Triton path in fp32: the graph draws the eager greedy tokens, and each replayed step's logits are
    within 1e-4 of the eager step's (the kernels read the sinks and kv_len from the device at every replay)."""
    import tritongpt.train.generate as gen

    model = tiny_model().cuda().eval()
    model.set_kernels("triton")
    idx = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2)).cuda()
    want = gen.generate(model, idx, 30)
    got = gen.generate(model, idx, 30, cuda_graph=True)
    assert torch.equal(got, want)
    with torch.no_grad():
        host, dev = model.new_cache(2, 40), model.new_cache(2, 40)
        model(idx, host)
        model(idx, dev)
        graph = gen.DecodeGraph(model, dev)
        tok = idx[:, -1:]
        for _ in range(20):
            want = gen.last_logits(model, tok, host)
            got = graph(tok)
            assert ((got - want).norm() / want.norm()).item() < 1e-4
            tok = want[:, -1].argmax(-1, keepdim=True)
