"""The split-KV ("flash-decoding") forward of kernels/attention.py against a float64 reference.

On a GPU `_num_splits` splits the KV length of a decode step across programs when the query
tiles alone leave SMs idle; under the interpreter it never splits (a program costs ~5 ms), so
these tests monkeypatch it to force 2, 3 or more splits than there are KV tiles (16 keys a tile
here). The backward is the single-pass one, reading O and the logsumexp the combine wrote: dq, dk
and dv match only if that logsumexp is exact.
"""
import mmap

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, report
from test_attention import NAMES, make_qkv, reference_attention, run_grads
from tritongpt.kernels import attention
from tritongpt.kernels.attention import flash_attention
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.generate import generate


@pytest.fixture
def splits(forced_splits):
    """force(n): conftest's forced_splits (n KV splits a forward; .launches counts split launches)."""
    return forced_splits


def reference_gqa(q, k, v, **kw):
    group = q.shape[1] // k.shape[1]
    return reference_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kw)


def check(q, k, v, tol, tag, **kw):
    """Out, dq, dk, dv of flash_attention(**kw) against the float64 reference; in bf16 (tol None) within
    2x PyTorch's own bf16 error, as tests/test_attention.py judges bf16."""
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)
    got = run_grads(lambda a, b, c: flash_attention(a, b, c, **kw), q, k, v, do)
    ref = run_grads(lambda a, b, c: reference_gqa(a, b, c, **kw), q.double(), k.double(), v.double(), do.double())
    low = run_grads(lambda a, b, c: reference_gqa(a, b, c, **kw), q, k, v, do) if tol is None else None
    for i, (name, g, r) in enumerate(zip(NAMES, got, ref)):
        if not r.any():  # one visible key a row: the softmax is constant, dq = dk = 0 exactly
            assert torch.isfinite(g).all() and g.abs().max() < 1e-5, f"{tag} {name} should be ~0"
            continue
        if tol is None:
            _, rel = assert_close_rel(g, r, 2e-2, f"{tag} bf16 {name}")
            torch_rel = report(low[i], r)[1]
            assert rel <= 2 * torch_rel, f"{tag} bf16 {name}: {rel:.3e} > 2 x torch's {torch_rel:.3e}"
        else:
            assert_close_rel(g, r, tol, f"{tag} {name}")


@pytest.mark.parametrize("n", [2, 3, 40])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 64), (1, 100), (1, 257), (3, 64), (3, 257), (17, 100), (17, 257)])
def test_fp32_split_matches_float64(n, Tq, Tk, splits, device):
    """40 splits is more than 257 keys' 17 tiles: the splits past the last tile are empty, and with
    Tq > 1 the causal mask hides a split's keys from the chunk's earlier rows (-inf maxima, no NaN)."""
    state = splits(n)
    q, k, v = make_qkv(1, 2, Tq, Tk, 32, torch.float32, device, seed=Tq * 1000 + Tk)
    check(q, k, v, 1e-4, f"splits={n} Tq={Tq} Tk={Tk}")
    assert state["launches"] == 1  # the forward took the split path


@pytest.mark.parametrize("Tq", [1, 5])
def test_fp32_split_reads_kv_cache_views(Tq, splits, device):
    """As the model calls it: q a head-split view of [B, Tq, H, D], k a slice of a longer cache [B, Hkv, Tmax, D],
    v a head-split view of [B, Tmax, Hkv, D] sliced too; each read with its own strides (batch ones too), and the
    output a view of [B, Tq, H, D] as the single pass's."""
    state = splits(2)
    B, H, Hkv, Tk, Tmax, D = 2, 4, 2, 37, 64, 32
    g = torch.Generator().manual_seed(Tq)
    q = torch.randn(B, Tq, H, D, generator=g).to(device).transpose(1, 2)
    k = torch.randn(B, Hkv, Tmax, D, generator=g).to(device)[:, :, :Tk]
    v = torch.randn(B, Tmax, Hkv, D, generator=g).to(device).transpose(1, 2)[:, :, :Tk]
    assert not k.is_contiguous() and not v.is_contiguous() and k.stride() != v.stride()
    out = flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous() and state["launches"] == 1
    assert_close_rel(out, reference_gqa(q.double(), k.double(), v.double()), 1e-4, f"cache views Tq={Tq}")


@pytest.mark.parametrize("D", [32, 64, 80, 128, 256])
def test_fp32_split_head_dims(D, splits, device):
    splits(3)
    q, k, v = make_qkv(1, 1, 2, 70, D, torch.float32, device, seed=D)
    check(q, k, v, 1e-4, f"D={D}")


@pytest.mark.parametrize("Tq,Tk", [(33, 20), (1, 50)])
def test_fp32_split_not_causal(Tq, Tk, splits, device):
    splits(3)
    q, k, v = make_qkv(2, 1, Tq, Tk, 32, torch.float32, device, seed=Tq + Tk)
    check(q, k, v, 1e-4, f"noncausal {Tq}x{Tk}", causal=False, softmax_scale=0.3)


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("Tq", [1, 17])
def test_fp32_split_gqa(kv_heads, Tq, splits, device):
    splits(3)
    q, _, _ = make_qkv(1, 4, Tq, 1, 32, torch.float32, device, seed=Tq)
    _, k, v = make_qkv(1, kv_heads, 1, 100, 32, torch.float32, device, seed=kv_heads)
    check(q, k, v, 1e-4, f"gqa 4/{kv_heads} Tq={Tq}")


def test_split_rows_pack_the_query_heads_of_a_kv_head():
    """Grouped-query decode packs the GROUP query heads of a KV head into one tile's rows while they are few."""
    assert attention._split_rows(32, 8, 1) == (8, 4, True)     # Llama's decode step: 4 rows a KV head
    assert attention._split_rows(4, 1, 17) == (4, 17, False)   # 68 rows: each query head its own tiles
    assert attention._split_rows(12, 12, 1) == (12, 1, False)  # multi-head attention: nothing to pack


@pytest.mark.parametrize("Tq", [1, 5])
def test_fp32_split_packed_gqa_alibi_and_documents(Tq, splits, device):
    """Packed grouped-query rows each keep their own query head's ALiBi slope and their own position's
    document (and window) bounds; rows past GROUP * Tq in the tile (16 rows, 3 x 5 or 3 x 1 live) are dropped."""
    splits(3)
    q, _, _ = make_qkv(2, 6, Tq, 1, 32, torch.float32, device, seed=Tq + 40)
    _, k, v = make_qkv(2, 2, 1, 90, 32, torch.float32, device, seed=Tq + 41)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625], device=device)
    doc_ids = torch.tensor([[0] * 40 + [1] * 50, [0] * 87 + [1] * 3]).to(device)
    check(q, k, v, 1e-4, f"packed alibi Tq={Tq}", alibi_slopes=slopes)
    check(q, k, v, 1e-4, f"packed documents Tq={Tq}", doc_ids=doc_ids, window=30)


@pytest.mark.parametrize("Tq", [1, 17])
def test_fp32_split_documents_and_window(Tq, splits, device):
    """Documents (a row's keys start at its document's start: whole splits before it hidden) and a
    sliding window (the same bounds), with their intersection."""
    splits(3)
    Tk = 100
    doc_ids = torch.tensor([[0] * 30 + [1] * 45 + [2] * 25, [0] * 90 + [1] * 10]).to(device)
    q, k, v = make_qkv(2, 2, Tq, Tk, 32, torch.float32, device, seed=Tq + 7)
    for kw in (dict(doc_ids=doc_ids), dict(window=24), dict(doc_ids=doc_ids, window=40)):
        check(q, k, v, 1e-4, f"Tq={Tq} {sorted(kw)}", **kw)


@pytest.mark.parametrize("Tq", [1, 3])
def test_fp32_split_softcap_and_alibi(Tq, splits, device):
    splits(2)
    q, k, v = make_qkv(1, 2, Tq, 100, 32, torch.float32, device, seed=Tq + 11)
    q = q * 4  # scores large enough that the cap bends them
    slopes = torch.tensor([0.25, 0.0625], device=device)
    check(q, k, v, 1e-4, f"softcap Tq={Tq}", softcap=5.0)
    check(q, k, v, 1e-4, f"alibi Tq={Tq}", alibi_slopes=slopes)


@pytest.mark.parametrize("Tq,Tk", [(1, 100), (17, 257)])
def test_bf16_split_within_2x_of_torch_bf16(Tq, Tk, splits, device):
    splits(3)
    q, k, v = make_qkv(1, 2, Tq, Tk, 64, torch.bfloat16, device, seed=Tq + Tk)
    check(q, k, v, None, f"Tq={Tq} Tk={Tk}")


def test_fp16_split(splits, device):
    splits(3)
    q, k, v = make_qkv(1, 2, 5, 90, 64, torch.float16, device, seed=16)
    check(q, k, v, 3e-3, "fp16")


def test_dropout_keeps_the_single_pass(splits, device):
    """Dropout (training only) never splits: the split kernel has no keep-mask."""
    state = splits(3)
    q, k, v = make_qkv(1, 2, 1, 64, 32, torch.float32, device)
    flash_attention(q, k, v, dropout_p=0.5, seed=3)
    assert state["launches"] == 0
    flash_attention(q, k, v)
    assert state["launches"] == 1


def test_num_splits_heuristic(monkeypatch):
    """The interpreter never splits; on a GPU (132 SMs, two programs each) a decode step splits when
    its query tiles leave most of them idle, into splits of >= SPLIT_MIN_KEYS keys."""
    cuda = torch.device("cuda")
    if attention.INTERPRET:
        assert attention._num_splits(1, 32, 1, 16384, torch.device("cpu")) == 1
    monkeypatch.setattr(attention, "INTERPRET", False)
    monkeypatch.setattr(attention, "_sm_count", lambda device: 132)
    assert attention._num_splits(1, 32, 1, 16384, cuda) == 8        # 32 tiles, 264 slots
    assert attention._num_splits(1, 12, 1, 16384, cuda) == 22       # GPT-2's 12 heads
    assert attention._num_splits(1, 32, 1, 1024, cuda) == 4         # 1024 keys: 4 splits of 256
    assert attention._num_splits(1, 32, 1, 300, cuda) == 1          # too short to split
    assert attention._num_splits(8, 32, 1, 16384, cuda) == 1        # 256 tiles already fill the GPU
    assert attention._num_splits(1, 1, 1, 10 ** 6, cuda) == attention.MAX_SPLITS
    assert attention._num_splits(1, 32, 65, 16384, cuda) == 1       # a prefill chunk, not a decode step


def test_greedy_decode_same_tokens_with_splits(splits):
    """Greedy decoding over the KV cache on the Triton path: the same tokens with the KV split in 3
    as without (prefill of 20 tokens, then single tokens over 2-3 KV tiles), and as the reference;
    the logits of a decode over the cache agree to fp32 rounding (tokens alone could hide an error). One layer: the
    split path is the same in each (~5 ms a Triton program)."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=61, context_length=40, n_embd=32, n_layer=1, n_head=2)).eval()
    idx = torch.randint(0, 61, (1, 20))  # one row: the batch strides are test_fp32_split_reads_kv_cache_views's
    outs, logits = {}, {}
    try:
        for name, n in (("reference", None), ("single", 1), ("split", 3)):
            model.set_kernels("reference" if n is None else "attention")
            state = splits(n or 1)
            outs[name] = generate(model, idx, 12, temperature=0.0)
            if name == "split":
                assert state["launches"] == 12  # the prefill and 11 steps (the last token's forward is never run)
            # the prefill, 4 single tokens, then a chunk of 8 (Tq = 8 over the filled cache)
            logits[name] = decode_token_by_token(model, outs["reference"], prefill=20, singles=4, whole=False)[1]
    finally:
        model.set_kernels("reference")
    assert torch.equal(outs["single"], outs["split"])
    assert torch.equal(outs["reference"], outs["split"])
    assert_close_rel(logits["split"], logits["single"], 1e-5, "decode logits, split vs single pass")


GUARDED_SLOPES = r"""
import ctypes, mmap
import numpy as np
import torch
from tritongpt.kernels import attention
from test_flash_decoding import reference_gqa

attention._num_splits = lambda B, H, Tq, Tk, device: 3
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page)
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + page, page, 0) == 0  # PROT_NONE
H = 6
slopes = torch.from_numpy(np.frombuffer(buf, np.float32, H, page - 4 * H))  # its last slope ends the page
slopes.copy_(torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]))
for Tq in (1, 5):  # one process for both (each a torch import, ~3 s)
    g = torch.Generator().manual_seed(Tq)
    q = torch.randn(2, H, Tq, 32, generator=g)
    k, v = (torch.randn(2, 2, 90, 32, generator=g) for _ in range(2))
    out = attention.flash_attention(q, k, v, alibi_slopes=slopes)
    ref = reference_gqa(q.double(), k.double(), v.double(), alibi_slopes=slopes)
    print("Tq", Tq, "max abs err", (out.double() - ref).abs().max().item())
    assert torch.allclose(out.double(), ref, atol=1e-4), Tq
"""


@pytest.mark.skipif(not hasattr(mmap, "PROT_READ"), reason="needs POSIX mmap and mprotect")
def test_packed_rows_past_the_group_read_no_slope():
    """The rows of a packed tile past GROUP * Tq (16 rows, 3 x 5 or 3 x 1 live) belong to no query head: they must
    not load an ALiBi slope from past the [H] slopes. The slopes end a page whose next page faults on any read
    (under the interpreter a load reads host memory), so a read past them kills the process."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", GUARDED_SLOPES], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"


@pytest.mark.parametrize("n", [3, 5])
def test_split_starting_on_a_tile_of_minus_inf_scores(n, splits, device):
    """Keys whose scores are all -inf for a row (a -inf component that q weighs positively) weigh 0, as in
    PyTorch. The single pass meets keys 32-47 after finite ones; a split that starts on that tile (70 keys,
    5 tiles: 3 splits of 2 tiles, or 5 of 1) has no finite max yet and must not take exp2(-inf - -inf) = NaN."""
    splits(n)
    q, k, v = make_qkv(1, 2, 3, 70, 32, torch.float32, device, seed=5)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[:, :, 32:48, 0] = float("-inf")
    out = flash_attention(q, k, v)
    ref = reference_gqa(q.double(), k.double(), v.double())
    assert torch.isfinite(ref).all()
    assert_close_rel(out, ref, 1e-4, f"a tile of -inf scores, splits={n}")


@pytest.mark.parametrize("causal", [True, False])
def test_single_pass_first_tile_of_minus_inf_scores(causal, device):
    """The single-pass forward (training's) likewise: keys 0-15, the first KV tile every row visits (16 wide under
    the interpreter, at least that on a GPU), score -inf for every row (a -inf component that q weighs
    positively). They weigh 0, as in PyTorch; a row's max is still -inf after that tile, and exp2(-inf - -inf)
    was NaN."""
    q, k, v = make_qkv(1, 2, 40, 70, 32, torch.float32, device, seed=6)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[:, :, :16, 0] = float("-inf")
    out = flash_attention(q, k, v, causal=causal)
    ref = reference_gqa(q.double(), k.double(), v.double(), causal=causal)
    keep = torch.isfinite(ref).all(-1)  # causal rows that see only those keys are NaN in PyTorch too
    assert keep.any()
    assert_close_rel(out[keep], ref[keep], 1e-4, "a first tile of -inf scores")


@pytest.mark.cuda
@pytest.mark.parametrize("H,Hkv,D", [(12, 12, 64), (32, 8, 128)], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("Tq", [1, 4])
def test_cuda_decode_splits_as_the_gpu_chooses(H, Hkv, D, Tq):
    """On a GPU, _num_splits decides (batch 1 over 4096 cached keys splits: the grid would leave most SMs idle):
    one decode step (Tq 1) and a 4-token speculative check (Tq 4), bf16, GPT-2's heads and Llama's grouped ones
    (packed), against float64 within 2x PyTorch's own bf16 error (out and dq/dk/dv through the unchanged backward);
    the split path's output equals the single pass's to bf16 rounding."""
    cuda = torch.device("cuda")
    assert attention._num_splits(1, *attention._split_rows(H, Hkv, Tq)[:2], 4096, cuda) > 1
    q, k, v = make_qkv(1, H, Tq, 4096, D, torch.bfloat16, cuda, seed=Tq + H)
    k, v = k[:, :Hkv].contiguous(), v[:, :Hkv].contiguous()
    check(q, k, v, None, f"decode H={H} Hkv={Hkv} D={D} Tq={Tq}")
    split = flash_attention(q, k, v)
    single = attention._num_splits
    try:
        attention._num_splits = lambda *args: 1
        one = flash_attention(q, k, v)
    finally:
        attention._num_splits = single
    assert_close_rel(split.float(), one.float(), 1e-2, "split vs single pass")
