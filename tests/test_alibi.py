"""ALiBi (GPTConfig.position_encoding "alibi"; BLOOM, MPT): the slopes against transformers' BLOOM, the
reference attention against a float64 one written out by hand, both paths of a tiny model (logits, loss,
every gradient), decode over the KV cache, the config's and the exports' refusals, pretrain's and bench
train's flag. The kernel's own tests are test_attention's test_*alibi*."""
import math
from types import SimpleNamespace

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, report
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import MultiHeadAttention, alibi_slopes

TINY = dict(vocab_size=67, context_length=40, n_embd=96, n_layer=2, n_head=6, position_encoding="alibi")


def _randomize(model):
    with torch.no_grad():  # fresh init has zero biases: random ones reach every gradient path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("H", [1, 3, 4, 6, 12, 16, 24])
def test_slopes_are_blooms(H):
    """alibi_slopes(H) against the slopes transformers' BLOOM builds (build_alibi_tensor at position 1:
    slope * 1), powers of two and not (6, 12, 24: the power of two below, then every other slope of
    twice as many). BLOOM raises an fp32 base to integer powers (2^-8 comes out 2.5 ulps off): within 4 ulps."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    want = bloom.build_alibi_tensor(torch.ones(1, 2), H, torch.float32)[:, 0, 1]
    got = alibi_slopes(H)
    assert got.dtype == torch.float32 and got.shape == (H,)
    torch.testing.assert_close(got, want, rtol=4.8e-7, atol=0)
    if H & (H - 1) == 0:  # the paper's 2^(-8 (h + 1) / H), written out
        assert got.tolist() == [torch.tensor(2.0 ** (-8 * (h + 1) / H)).item() for h in range(H)]


def hand_alibi_attention(q, k, v, slopes, scale, softcap=0.0):
    """float64 causal attention with ALiBi, one score at a time: q.k * scale - m_h (i - j) for query
    position i = Tk - Tq + i0 and key j <= i (with softcap c, the scaled q.k capped to c tanh(. / c) first)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i0 in range(Tq):
                i = Tk - Tq + i0
                s = torch.tensor([float(q[b, h, i0] @ k[b, h, j]) * scale for j in range(i + 1)], dtype=torch.float64)
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                s = s - float(slopes[h]) * (i - torch.arange(i + 1, dtype=torch.float64))
                out[b, h, i0] = torch.softmax(s, 0) @ v[b, h, :i + 1]
    return out


@pytest.mark.parametrize("Tq,Tk", [(13, 13), (4, 13)])
def test_reference_attend_is_alibi_by_hand(Tq, Tk):
    """MultiHeadAttention.attend with alibi against the float64 loop (a KV cache's Tq < Tk too): the
    bias follows the query's absolute position; without the slopes the answer is far off."""
    att = MultiHeadAttention(96, 12, 16, alibi=True)  # 12: slopes 2^(-k/2) too
    assert att.alibi is True and not list(att.buffers())  # the slopes are no state: made per device
    att.double()
    g = torch.Generator().manual_seed(Tq)
    q, k, v = (torch.randn(2, 12, T, 8, generator=g, dtype=torch.float64) for T in (Tq, Tk, Tk))
    want = hand_alibi_attention(q, k, v, alibi_slopes(12), att.softmax_scale)
    assert_close_rel(att.attend(q, k, v), want, 1e-12, "attend with ALiBi")
    plain = hand_alibi_attention(q, k, v, torch.zeros(12), att.softmax_scale)
    assert report(plain, want)[1] > 0.05
    assert "alibi" not in att.state_dict()  # a function of n_head, not a weight
    assert torch.equal(att.alibi_slopes(), alibi_slopes(12))
    att.bfloat16()  # rounded by a cast: the slopes come back exact in fp32
    assert torch.equal(att.alibi_slopes(), alibi_slopes(12))
    # one tensor from call to call: flash_attention reads a slopes tensor's values once (a GPU sync), not per call
    assert att.alibi_slopes() is att.alibi_slopes()
    # with a soft cap the bias comes after it (as flash_attention adds it): capped before, the answer differs
    capped = MultiHeadAttention(96, 12, 16, alibi=True, softcap=1.5).double()
    want = hand_alibi_attention(q, k, v, alibi_slopes(12), capped.softmax_scale, softcap=1.5)
    assert_close_rel(capped.attend(q, k, v), want, 1e-12, "attend with ALiBi after a soft cap")


def test_both_paths_agree(one_thread):
    """A tiny ALiBi model (6 heads: non-power-of-two slopes, T 37: ragged tiles; one layer, for the interpreter):
    no position embedding, and logits, loss and every gradient equal on the reference and the Triton path
    (fp32, 1e-4)."""
    torch.manual_seed(0)
    model = _randomize(GPTModel(GPTConfig(**{**TINY, "n_layer": 1})))
    assert model.pos_emb is None and not any("pos" in n or "alibi" in n for n in model.state_dict())
    idx = torch.randint(0, 67, (1, 37))  # one row: the interpreter's programs are B x H
    targets = torch.randint(0, 67, (1, 37))
    results = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            logits = model(idx)
        loss = model(idx, targets=targets)
        loss.backward()
        results[kernels] = logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results["reference"], results["triton"]
    assert_close_rel(logits, ref_logits, 1e-4, "logits")
    assert_close_rel(loss, ref_loss, 1e-4, "loss")
    for name, g in ref_grads.items():
        if name.endswith("W_key.bias"):  # q.b_k shifts a whole row of scores: zero in exact arithmetic
            assert g.abs().max() < 1e-6 and grads[name].abs().max() < 1e-6
            continue
        assert_close_rel(grads[name], g, 1e-4, f"grad {name}")
    model.set_kernels("reference")
    for blk in model.trf_blocks:  # the same weights without the bias: other logits, so the test can fail
        blk.att.alibi = False
    with torch.no_grad():
        assert report(model(idx), ref_logits)[1] > 1e-2


def test_kv_cache_decode_equals_the_whole_sequence(one_thread):
    """Prefill, single tokens, then a chunk over the KV cache give the whole sequence's logits on both
    paths: the bias of query i is at its position in the cache, not in the chunk."""
    torch.manual_seed(1)
    model = _randomize(GPTModel(GPTConfig(**TINY))).eval()
    idx = torch.randint(0, 67, (1, 29))
    with torch.no_grad():
        whole = model(idx)
    for kernels, singles in (("reference", None), ("triton", 3)):
        model.set_kernels(kernels)
        _, decoded, _ = decode_token_by_token(model, idx, singles=singles, whole=False)
        assert_close_rel(decoded, whole, 1e-5, f"decoded over the cache, {kernels}")


@pytest.mark.parametrize("field,value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                         ("rotary_dim", 8), ("nope_layers", "0"), ("rope_local_theta", 1e4)])
def test_rope_fields_refused_by_name(field, value):
    """The RoPE-only fields are refused on an ALiBi model, each by its name and the model's encoding."""
    extra = dict(attention_window=8) if field == "rope_local_theta" else {}
    with pytest.raises(UserError, match=f"GPTConfig.{field} .*position_encoding 'alibi'"):
        GPTConfig(**TINY, **{field: value}, **extra)
    with pytest.raises(UserError, match="position_encoding must be one of learned, rope, alibi, got 'ALiBi'"):
        GPTConfig(**{**TINY, "position_encoding": "ALiBi"})


def _alibi_like(**fields):
    return GPTModel(GPTConfig(**{**TINY, "n_layer": 1, **fields}))


# (family, refuse function's module and name, GPTConfig fields that make the model that family's shape but for ALiBi)
REFUSALS = [
    ("GPT-2", "gpt2_weights", "refuse_not_gpt2", {}),
    ("GPT-Neo", "gpt_neo_weights", "refuse_not_gpt_neo", dict(scale_attention=False)),
    ("GPT-NeoX", "neox_weights", "refuse_not_neox", dict(parallel_residual=True, gelu_approximate="none")),
    ("GPT-J", "gptj_weights", "refuse_not_gptj", dict(parallel_residual=True, shared_norm=True, head_bias=True)),
    ("Falcon", "falcon_weights", "refuse_not_falcon", dict(parallel_residual=True, shared_norm=True, bias=False)),
    ("Phi", "phi_weights", "refuse_not_phi", dict(parallel_residual=True, shared_norm=True, head_bias=True)),
    ("Llama", "llama_weights", "refuse_not_llama", dict(norm="rmsnorm", mlp="swiglu", bias=False)),
    ("Phi-3", "phi3_weights", "refuse_not_phi3", dict(norm="rmsnorm", mlp="swiglu", bias=False)),
    ("StableLM", "stablelm_weights", "refuse_not_stablelm", dict(mlp="swiglu", bias=False)),
    ("Gemma", "gemma_weights", "refuse_not_gemma", dict(norm="rmsnorm", mlp="geglu", bias=False,
                                                        scale_embeddings=True)),
    ("OLMo", "olmo_weights", "refuse_not_olmo", dict(norm="rmsnorm", mlp="swiglu", bias=False, post_norms=True,
                                                     pre_norms=False)),
]


@pytest.mark.parametrize("family,module,refuse,fields", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_export_refuses_alibi_by_name(family, module, refuse, fields):
    """No Hugging Face family we write biases scores by distance: each refusal says ALiBi, and never the untrue
    "learns position embeddings" (the RoPE families' row read position_encoding != "rope" as learned)."""
    import importlib

    fn = getattr(importlib.import_module(f"tritongpt.train.{module}"), refuse)
    with pytest.raises(UserError) as e:
        fn(_alibi_like(**fields), "a folder")
    said = str(e.value)
    assert "ALiBi" in said and "position_encoding alibi" in said, said
    assert "learns position embeddings," not in said and "rotates q and k by their" not in said, said


def test_export_command_refuses_alibi(tmp_path, capsys):
    """`export` of an ALiBi checkpoint: refused by name, nothing written."""
    from parity import save_run
    from tritongpt.cli import main

    run, _ = save_run(tmp_path, _alibi_like(vocab_size=280))
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "biases each head's attention scores by distance (ALiBi" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_pretrain_and_bench_train_take_alibi(corpus, tmp_path, capsys):
    """pretrain --position-encoding alibi builds an ALiBi model (no pos_emb), refused from GPT-2's learned
    weights by name; bench train's --position-encoding takes it, and its row names it without a RoPE base."""
    from parity import pretrain_argv
    from tritongpt.cli import main as cli_main

    from tritongpt.bench import cli as bcli
    from tritongpt.bench import report as breport
    from tritongpt.bench import train_step
    from tritongpt.cli import build_parser
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.pretrain import check_args, parse_args

    a = parse_args(["--tokenizer", str(corpus.tok), "--position-encoding", "alibi"])
    model = check_args(a, TrainArgs.from_namespace(a))[0]
    assert model.config.position_encoding == "alibi" and model.pos_emb is None
    assert all(blk.att.alibi and blk.att.rotary is None for blk in model.trf_blocks)
    assert cli_main(pretrain_argv(corpus, tmp_path / "run", "--init", "gpt2-small", "--position-encoding",
                                  "alibi")) == 2
    assert "GPT-2's weights were trained with learned position embeddings, not ALiBi: --position-encoding alibi " \
           "cannot start from them" in capsys.readouterr().err
    with pytest.raises(UserError, match="--rope-theta 500 is RoPE's base"):
        a = parse_args(["--tokenizer", str(corpus.tok), "--position-encoding", "alibi", "--rope-theta", "500"])
        check_args(a, TrainArgs.from_namespace(a))
    args = build_parser().parse_args(["bench", "train", "--position-encoding", "alibi"])
    assert bcli.model_flags(args)["position_encoding"] == "alibi"
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, vocab_size=64, position_encoding="alibi")
    assert row["status"] == "ok" and row["config"]["position_encoding"] == "alibi"
    assert "rope_theta" not in row["config"]
    assert "ALiBi" in breport.models_line([row]) and "theta" not in breport.models_line([row])


def test_a_resume_that_would_change_positions_says_alibi():
    """The resume check compares position_encoding: an ALiBi checkpoint resumed as learned (or the other way)
    is refused, saying ALiBi, not "learns position embeddings", for the ALiBi side."""
    from tritongpt.train.loop import Trainer

    alibi = GPTConfig(**TINY)
    saved = alibi.to_dict()
    Trainer._check_same_function(SimpleNamespace(_cfg=alibi, name="pretrain"), "ckpt", saved)
    learned = GPTConfig(**{**saved, "position_encoding": "learned"})
    with pytest.raises(UserError, match=r"biases its attention scores by distance \(ALiBi\), this run's model learns "
                                        r"position embeddings: pass --position-encoding alibi"):
        Trainer._check_same_function(SimpleNamespace(_cfg=learned, name="pretrain"), "ckpt", saved)
    with pytest.raises(UserError, match=r"learns position embeddings, this run's model biases its attention scores "
                                        r"by distance \(ALiBi\)"):
        Trainer._check_same_function(SimpleNamespace(_cfg=alibi, name="pretrain"), "ckpt", learned.to_dict())


def test_slopes_are_the_geometric_rule():
    """Every power of two: m_h = 2^(-8 (h + 1) / H), so the first slope is 2^(-8 / H), the last 2^-8."""
    for H in (1, 2, 8, 32):
        s = alibi_slopes(H)
        assert math.isclose(s[0].item(), 2 ** (-8 / H), rel_tol=1e-7) and math.isclose(s[-1].item(), 2 ** -8)


@pytest.mark.parametrize("Tq,Tk", [(13, 13), (4, 13)])
def test_bench_sdpa_attend_adds_the_bias(Tq, Tk):
    """bench train's SDPA baseline (reference+compile+sdpa) gives attend's answer on an ALiBi module (the bias
    as SDPA's float mask), whole sequence and a cache's Tq < Tk; GQA too."""
    from tritongpt.bench.train_step import sdpa_attend

    att = MultiHeadAttention(96, 12, 16, alibi=True, n_kv_head=4)
    g = torch.Generator().manual_seed(Tk - Tq)
    q = torch.randn(2, 12, Tq, 8, generator=g)
    k, v = (torch.randn(2, 4, Tk, 8, generator=g) for _ in range(2))
    assert_close_rel(sdpa_attend(att, q, k, v), att.attend(q, k, v), 1e-5, "SDPA with ALiBi")


def test_bias_is_relative_to_the_query_position():
    """alibi_bias [H, Tq, Tk] is m_h (j - i) with i the query's position in the cache (Tk - Tq + i0): 0 at the
    query's own key, m_h times minus the distance behind it. (A bias counted from the chunk's own row differs by a
    constant per row, which the softmax cannot see: attention outputs cannot catch it, so it is checked here.)"""
    from tritongpt.model.layers import alibi_bias

    slopes = alibi_slopes(6)
    for Tq, Tk in ((5, 5), (3, 11), (1, 9)):
        bias = alibi_bias(slopes, Tq, Tk)
        want = torch.tensor([[[float(m) * (j - (Tk - Tq + i)) for j in range(Tk)] for i in range(Tq)]
                             for m in slopes])
        assert torch.equal(bias, want)
        assert bias[:, torch.arange(Tq), Tk - Tq + torch.arange(Tq)].eq(0).all()


def test_an_empty_built_model_has_its_slopes():
    """GPTModel.empty (what every loader builds: on the meta device, then to_empty, which leaves buffers
    unset) gives ALiBi's slopes: the model has no buffer, the slopes are made from n_head when first asked."""
    from tritongpt.model.gpt import GPTModel

    model = GPTModel.empty(_alibi_like(n_head=4).config)
    assert not list(model.buffers())
    for block in model.trf_blocks:
        assert torch.equal(block.att.alibi_slopes(), alibi_slopes(4))


def test_an_alibi_model_compiles_in_one_graph_from_its_first_call():
    """torch.compile(fullgraph=True) traces the slopes' per-device cache on the first call (nothing made yet): no
    graph break, the eager loss, and the slopes kept for the next call."""
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(0)
    model = _randomize(GPTModel(GPTConfig(**{**TINY, "n_layer": 1})))
    idx = torch.randint(0, 67, (2, 19))
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, targets=idx)
    assert list(model.trf_blocks[0].att._alibi_slopes) == [torch.device("cpu")]
    assert_close_rel(loss, model(idx, targets=idx), 1e-6, "compiled loss")
