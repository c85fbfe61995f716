"""pytest-benchmark timings of the CPU-side pieces (collected by default: *_test.py).

Each benchmark runs 3 rounds of a small workload (well under a second each), so the default
suite stays fast; `pytest tests/bench_cpu_test.py --benchmark-only` shows the table, and
`--benchmark-autosave` keeps it under .benchmarks/. Every benchmark also checks its result,
so a broken code path fails here rather than timing garbage.
"""
import pytest
import torch

from tritongpt.bench.cpu import corpus_text

ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_tiny_model_forward(benchmark):
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 64))

    def run():
        with torch.no_grad():
            return model(idx)

    logits = benchmark.pedantic(run, **ROUNDS)
    assert logits.shape == (2, 64, cfg.vocab_size) and torch.isfinite(logits).all()


def test_bench_reference_layernorm_fwd_bwd(benchmark):
    from tritongpt.model.layers import LayerNorm

    torch.manual_seed(0)
    ln = LayerNorm(256)
    x = torch.randn(512, 256, requires_grad=True)
    dy = torch.randn(512, 256)

    def run():
        x.grad = None
        y = ln(x)
        y.backward(dy)
        return y

    y = benchmark.pedantic(run, **ROUNDS)
    ref = torch.nn.functional.layer_norm(x, (256,), ln.weight, ln.bias, ln.eps)
    assert torch.allclose(y, ref, atol=1e-5) and x.grad is not None


def test_bench_reference_mlp_fwd_bwd(benchmark):
    from tritongpt.model.layers import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(128)
    x = torch.randn(256, 128, requires_grad=True)

    def run():
        x.grad = None
        y = ff(x)
        y.sum().backward()
        return y

    y = benchmark.pedantic(run, **ROUNDS)
    assert y.shape == x.shape and torch.isfinite(x.grad).all()


def test_bench_reference_exact_gelu_mlp_fwd_bwd(benchmark):
    """bench kernels' mlp_exact_gelu reference (GPT-NeoX's erf GELU), checked against F.gelu(approximate="none")."""
    import torch.nn.functional as F

    from tritongpt.model.layers import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(128, approximate="none")
    x = torch.randn(256, 128, requires_grad=True)

    def run():
        x.grad = None
        y = ff(x)
        y.sum().backward()
        return y

    y = benchmark.pedantic(run, **ROUNDS)
    ref = ff.fc2(F.gelu(ff.fc1(x), approximate="none"))
    assert torch.allclose(y, ref, atol=1e-5) and torch.isfinite(x.grad).all()


def test_bench_reference_partial_rotary_fwd_bwd(benchmark):
    """bench kernels' rope_partial reference at Pythia's 16 of 64 columns: the other 48 pass through."""
    from tritongpt.model.layers import Rotary, apply_rotary

    torch.manual_seed(0)
    rot = Rotary(64, rotary_dim=16)
    q, k = (torch.randn(2, 4, 128, 64, requires_grad=True) for _ in range(2))
    pos = torch.arange(128)

    def run():
        q.grad = k.grad = None
        qr, kr = rot(q, k, pos)
        (qr.sum() + kr.sum()).backward()
        return qr

    qr = benchmark.pedantic(run, **ROUNDS)
    assert torch.equal(qr[..., 16:], q[..., 16:])
    assert torch.allclose(qr[..., :16], apply_rotary(q[..., :16], pos), atol=1e-6)


def test_bench_reference_attention_core(benchmark):
    from tritongpt.model.layers import MultiHeadAttention

    torch.manual_seed(0)
    att = MultiHeadAttention(128, 4, 128).eval()
    q, k, v = (torch.randn(2, 4, 128, 32) for _ in range(3))
    out = benchmark.pedantic(lambda: att.attend(q, k, v), **ROUNDS)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bench_tokenizer_encode(benchmark):
    tok_mod = pytest.importorskip("tritongpt.train.tokenizer")
    text = corpus_text()
    tok = tok_mod.BPETokenizer.train(text[:4000], vocab_size=300)
    sample = text[:20_000]
    ids = benchmark.pedantic(lambda: tok.encode(sample), **ROUNDS)
    assert len(ids) > 0 and tok.decode(ids) == sample
