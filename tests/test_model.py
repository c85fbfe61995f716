"""Reference model: configs, initialisation, causality, KV cache, save/load, the toggle's bookkeeping."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig, get_config
from tritongpt.model.gpt import GPTModel, lm_loss
from tritongpt.model.layers import GELU, FeedForward, LayerNorm, MultiHeadAttention
from tritongpt.model.toggle import resolve_kernels

SMALL = dict(vocab_size=97, context_length=24, n_embd=32, n_layer=2, n_head=4)


def test_gpt2_parameter_counts():
    with torch.device("meta"):
        assert GPTModel(get_config("gpt2-small")).num_params() == 124_439_808
        assert GPTModel(get_config("gpt2-small", tie_weights=False)).num_params() == 163_037_184
        assert GPTModel(get_config("gpt2-medium")).num_params() == 354_823_168


def test_unknown_model_and_bad_config():
    with pytest.raises(UserError, match="unknown model 'gpt5'"):
        get_config("gpt5")
    with pytest.raises(UserError, match="not divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(UserError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(UserError, match="unknown GPTConfig field.*n_heads"):
        get_config("tiny", n_heads=3)
    for field, bad in (("n_head", True), ("n_layer", 2.0), ("bias", "no"), ("tie_weights", "False"),
                       ("dropout", True), ("kernels", "bogus")):
        with pytest.raises(UserError, match=field if field != "kernels" else "unknown kernel"):
            GPTConfig(**{field: bad})
    cfg = GPTConfig(n_layer=np.int64(2), vocab_size=np.int32(100), bias=np.bool_(False))  # numpy's are fine
    assert type(cfg.n_layer) is int and cfg.to_dict()["vocab_size"] == 100 and cfg.bias is False


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, context_length=64, n_embd=256, n_layer=8, n_head=4)
    m = GPTModel(cfg)
    assert m.out_head.weight is m.tok_emb.weight
    assert abs(m.trf_blocks[0].att.W_query.weight.std().item() - 0.02) < 2e-3
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(m.trf_blocks[3].att.out_proj.weight.std().item() - resid) < 1e-3
    assert abs(m.trf_blocks[3].ff.fc2.weight.std().item() - resid) < 1e-3
    assert torch.count_nonzero(m.trf_blocks[0].ff.fc1.bias) == 0
    assert torch.equal(m.final_norm.weight, torch.ones(256))


def test_reference_layers_against_float64_formulas():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    ln = LayerNorm(40).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    ref = F.layer_norm(x, (40,), ln.weight, ln.bias, 1e-5)
    assert torch.allclose(ln(x), ref, atol=1e-12)
    assert torch.allclose(GELU()(x), F.gelu(x, approximate="tanh"), atol=1e-12)
    ff = FeedForward(40).double()
    assert ff.fc1.out_features == 160
    att = MultiHeadAttention(40, 4, 16).double()
    q = torch.randn(2, 4, 7, 10, dtype=torch.float64)
    k, v = torch.randn(2, 4, 11, 10, dtype=torch.float64), torch.randn(2, 4, 11, 10, dtype=torch.float64)
    # bottom-right aligned causal mask, as SDPA builds it from an explicit boolean mask
    allowed = torch.ones(7, 11, dtype=torch.bool).tril(diagonal=11 - 7)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(att.attend(q, k, v), ref, atol=1e-12)


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(2)
    m = GPTModel(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 97, (2, 20))
    idx2 = idx.clone()
    idx2[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = m(idx), m(idx2)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_chunks_match_full_forward():
    torch.manual_seed(3)
    m = GPTModel(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 97, (3, 19))
    full = m(idx)
    cache = m.new_cache(3)
    with torch.no_grad():
        parts = [m(idx[:, s:e], cache) for s, e in ((0, 7), (7, 8), (8, 19))]
        assert cache.pos == 19
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        with pytest.raises(UserError, match="exceeds the context length"):
            m(torch.randint(0, 97, (3, 6)), cache)
        # a cache made for another batch, or passed where targets were meant: named
        with pytest.raises(UserError, match=r"the KV cache holds 3 sequences, idx 1: make it with "
                                            r"model.new_cache\(1\)"):
            m(torch.randint(0, 97, (1, 2)), m.new_cache(3))
        with pytest.raises(UserError, match="pass targets by name"):
            m(idx, idx)
    for bad in (0, -1, 25, 2.0, True):
        with pytest.raises(UserError, match="KV cache length must be an int in"):
            m.new_cache(3, max_len=bad)
    # in place, layer after layer: autograd would find its saved keys changed; said up front
    with pytest.raises(UserError, match="the KV cache is for inference"):
        m(idx[:, :5], m.new_cache(3), targets=idx[:, 1:6])


def test_bad_inputs():
    m = GPTModel(GPTConfig(**SMALL))
    with pytest.raises(UserError, match="exceeds the context length 24"):
        m(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(UserError, match="dtype"):
        m(torch.zeros(1, 5))
    with pytest.raises(UserError, match="shape"):
        m(torch.zeros(5, dtype=torch.long))
    # ids past the vocabulary, also those a padded vocabulary has rows for (97 ids in 112 rows)
    padded = GPTModel(GPTConfig(**SMALL, vocab_multiple=16))
    for model in (m, padded):
        for bad in (97, 100, -1):
            with pytest.raises(UserError, match=rf"token id {bad} is outside the model's vocabulary \[0, 97\)"):
                model(torch.tensor([[3, bad, 5]]))


def test_targets_are_checked_alike_on_both_paths():
    """int32 and uint8 targets are ids like int64 ones (the reference's F.cross_entropy took
    only int64); targets not shaped like idx, or not integers, are named on both paths."""
    torch.manual_seed(5)
    m = GPTModel(GPTConfig(**SMALL))
    idx = torch.randint(0, 97, (2, 9))
    t = torch.randint(0, 97, (2, 9))
    want = m(idx, targets=t)
    for dtype in (torch.int32, torch.uint8, torch.int16):
        assert torch.equal(m(idx, targets=t.to(dtype)), want), dtype
    for kernels in ("reference", "cross_entropy"):
        m.set_kernels(kernels)
        with pytest.raises(UserError, match=r"targets must have idx's shape \(2, 9\)"):
            m(idx, targets=t.flatten())
        with pytest.raises(UserError, match="targets must hold integer token ids, got dtype torch.float32"):
            m(idx, targets=t.float())


def test_models_do_not_share_a_config_and_meta_init_works():
    """Each model has its own config (set_kernels/set_dropout on one left another built from
    the same object on the Triton path, dropout 0.3); a model built on the meta device and moved
    with to_empty() gets a real causal mask and its tied head back."""
    cfg = GPTConfig(**SMALL)
    a, b = GPTModel(cfg), GPTModel(cfg)
    a.set_kernels("layernorm").set_dropout(0.3)
    assert cfg.kernels == "reference" and cfg.dropout == 0.0
    assert b.config.kernels == "reference" and b.config.dropout == 0.0
    assert b.pad_vocab(8).kernels == frozenset()
    for bad in (1.5, -0.1, True, "0.1"):
        with pytest.raises(UserError, match="dropout must be in"):
            a.set_dropout(bad)

    torch.manual_seed(6)
    real = GPTModel(GPTConfig(**SMALL)).eval()
    with torch.device("meta"):
        m = GPTModel(GPTConfig(**SMALL))
    m = m.to_empty(device="cpu")
    assert m.out_head.weight is m.tok_emb.weight
    m.load_state_dict(real.state_dict())
    m.eval()
    for block in m.trf_blocks:
        assert torch.equal(block.att.mask, real.trf_blocks[0].att.mask)
    idx = torch.randint(0, 97, (2, 11))
    assert torch.equal(m(idx), real(idx))


def test_save_keeps_its_own_metadata_and_pad_vocab_keeps_frozen_weights(tmp_path):
    m = GPTModel(GPTConfig(**SMALL))
    for key in ("config", "format"):
        with pytest.raises(UserError, match=f"extra_metadata may not set {key}"):
            m.save(tmp_path / "w.safetensors", extra_metadata={key: "x"})
    m.save(tmp_path / "w.safetensors", extra_metadata={"note": "mine"})
    assert GPTModel.load(tmp_path / "w.safetensors").config == m.config
    m.pos_emb.weight.requires_grad_(False)
    p = m.pad_vocab(16)
    assert not p.pos_emb.weight.requires_grad and p.tok_emb.weight.requires_grad
    with pytest.raises(UserError, match="int multiple, got True"):
        m.pad_vocab(True)


def test_save_load_roundtrip_with_tied_weights(tmp_path):
    torch.manual_seed(4)
    m = GPTModel(GPTConfig(**SMALL, dropout=0.1)).eval()
    m.save(tmp_path / "w.safetensors")
    m2 = GPTModel.load(tmp_path / "w.safetensors").eval()
    assert m2.config.dropout == 0.1 and m2.out_head.weight is m2.tok_emb.weight
    idx = torch.randint(0, 97, (2, 9))
    assert torch.equal(m(idx), m2(idx))
    with pytest.raises(UserError, match="not found"):
        GPTModel.load(tmp_path / "missing.safetensors")


def test_a_damaged_weights_file_is_a_one_line_error(tmp_path):
    """A file whose saved config and tensors disagree, whose config is not JSON, or whose weights
    hold NaN: a UserError naming the file (was torch's RuntimeError, json's error, or a load that
    went through and gave NaN losses or a crash in sampling)."""
    import json

    from safetensors.torch import load_file, save_file

    from tritongpt.model.gpt import safetensors_metadata
    from tritongpt.train.reward import RewardModel

    path = tmp_path / "w.safetensors"
    GPTModel(GPTConfig(**SMALL)).save(path)
    meta, sd = safetensors_metadata(path), load_file(str(path))

    def damaged(tensors=sd, **config):
        out = tmp_path / f"damaged{len(list(tmp_path.glob('damaged*')))}.safetensors"
        save_file(tensors, str(out), metadata={**meta, **config} if "config" in config else
                  {**meta, "config": json.dumps({**json.loads(meta["config"]), **config})})
        return out

    for bad, match in ((damaged(n_layer=1), r"do not fit its saved model config \(Unexpected key"),
                       (damaged(context_length=12), "do not fit its saved model config.*pos_emb.weight"),
                       (damaged(config='{"n_layer": '), "saved model config is not valid JSON"),
                       (damaged(config="[1]"), "saved model config is a JSON list"),
                       (damaged(dropout=2.0), "saved model config: GPTConfig.dropout"),
                       (damaged({**sd, "pos_emb.weight": torch.full_like(sd["pos_emb.weight"], float("nan"))}),
                        "tensor pos_emb.weight holds NaN or inf")):
        with pytest.raises(UserError, match=r"damaged\d.safetensors: .*" + match):
            GPTModel.load(bad)
    path = tmp_path / "r.safetensors"
    RewardModel(GPTModel(GPTConfig(**SMALL))).save(path)
    sd = load_file(str(path))
    save_file({k: v for k, v in sd.items() if "trf_blocks.1." not in k}, str(path), safetensors_metadata(path))
    with pytest.raises(UserError, match=r"r.safetensors: its tensors do not fit .*Missing key"):
        RewardModel.load(path)


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_weight_files_follow_the_umask(umask, tmp_path):
    """Weights are readable like the run's other files (state.pt, tokenizer.json): safetensors
    creates its files 0600, so every checkpoint was unreadable to the group (a shared GPU box,
    a serving user) whatever the umask. All three writers: GPTModel, RewardModel, the Trainer's."""
    import os

    from tritongpt.train.loop import _SafetensorsSaver
    from tritongpt.train.reward import RewardModel

    m = GPTModel(GPTConfig(**SMALL))
    old = os.umask(umask)
    try:
        m.save(tmp_path / "gpt.safetensors")
        RewardModel(m).save(tmp_path / "reward.safetensors")
        _SafetensorsSaver(torch.nn.Linear(3, 2)).save(tmp_path / "saver.safetensors", {"step": 1})
        torch.save({}, tmp_path / "state.pt")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes
    assert GPTModel.load(tmp_path / "gpt.safetensors").config == m.config


def test_lm_loss_ignores_masked_targets():
    torch.manual_seed(5)
    logits = torch.randn(2, 4, 10)
    targets = torch.randint(0, 10, (2, 4))
    masked = targets.clone()
    masked[:, :2] = -100
    expect = F.cross_entropy(logits[:, 2:].reshape(-1, 10), targets[:, 2:].reshape(-1))
    assert torch.allclose(lm_loss(logits, masked), expect)


def test_toggle_resolution_and_state_dict_unchanged():
    assert resolve_kernels("reference", "cpu") == frozenset()
    assert resolve_kernels("auto", "cpu") == frozenset()
    assert resolve_kernels("auto", "cuda") == {"layernorm", "mlp", "attention", "cross_entropy"}
    assert resolve_kernels("layernorm,mlp", "cpu") == {"layernorm", "mlp"}
    assert resolve_kernels({"attention"}, "cpu") == {"attention"}
    with pytest.raises(UserError, match="unknown kernel"):
        resolve_kernels("layernorm,softmax", "cpu")
    for bad in ({"mlp": False}, 1, ["mlp", 2]):  # a dict read as its keys turned mlp on
        with pytest.raises(UserError, match="kernels must be"):
            resolve_kernels(bad, "cpu")
    # a head dim the Triton attention lacks: said when the kernels are picked, not at forward
    with pytest.raises(UserError, match="supports head dims .* this model's is 8"):
        GPTModel(GPTConfig(vocab_size=50, context_length=16, n_embd=32, n_head=4, kernels="triton"))
    odd = GPTModel(GPTConfig(vocab_size=50, context_length=16, n_embd=32, n_head=4, kernels="layernorm,mlp"))
    with pytest.raises(UserError, match="supports head dims"):
        odd.set_kernels("attention")
    m = GPTModel(GPTConfig(**dict(SMALL, n_head=2)))  # head dim 16: one the Triton attention has
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.set_kernels("triton")
    assert m.config.kernels == "triton"
    assert all(b.norm1.use_triton and b.ff.use_triton and b.att.use_triton for b in m.trf_blocks)
    assert m.final_norm.use_triton
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    m.set_kernels(["mlp"])
    assert m.config.kernels == "mlp" and not m.final_norm.use_triton and m.trf_blocks[0].ff.use_triton


# -- a padded vocabulary (GPTConfig.vocab_multiple) ------------------------------------------------
def test_padded_vocabulary_config():
    assert get_config("gpt2-small", vocab_multiple=64).padded_vocab_size == 50304
    assert get_config("gpt2-small").padded_vocab_size == 50257
    assert GPTConfig(vocab_size=128, vocab_multiple=64).padded_vocab_size == 128
    with pytest.raises(UserError, match="vocab_multiple must be a positive integer"):
        GPTConfig(vocab_multiple=0)
    saved = get_config("tiny").to_dict()
    del saved["vocab_multiple"]  # a checkpoint written before the field existed
    assert GPTConfig.from_dict(saved).padded_vocab_size == 4096
    with torch.device("meta"):  # 47 more embedding rows, counted once (the head is tied)
        assert GPTModel(get_config("gpt2-small", vocab_multiple=64)).num_params() == 124_439_808 + 47 * 768


@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocabulary_is_the_same_model(tmp_path, tied):
    """With the same weights, a padded model gives the unpadded one's logits, loss and gradients;
    its padding rows start at zero and get no gradient, so they are never trained."""
    torch.manual_seed(5)
    plain = GPTModel(GPTConfig(**SMALL, tie_weights=tied))  # vocab 97
    padded = GPTModel(GPTConfig(**SMALL, tie_weights=tied, vocab_multiple=16))  # 112 rows
    assert padded.tok_emb.weight.shape == padded.out_head.weight.shape == (112, 32)
    assert torch.count_nonzero(padded.tok_emb.weight[97:]) == torch.count_nonzero(padded.out_head.weight[97:]) == 0
    with torch.no_grad():
        for (name, p), (_, q) in zip(plain.named_parameters(), padded.named_parameters()):
            q[:p.shape[0]].copy_(p)
    idx, y = torch.randint(0, 97, (2, 11)), torch.randint(0, 97, (2, 11))
    y[0, :3] = -100
    logits = padded(idx)
    assert logits.shape == (2, 11, 97)  # no padding column reaches a caller (sampling, log-probs)
    torch.testing.assert_close(logits, plain(idx))
    for m in (plain, padded):
        m(idx, targets=y).backward()
    torch.testing.assert_close(padded(idx, targets=y), plain(idx, targets=y))
    torch.testing.assert_close(padded(idx, targets=y, reduction="none"), plain(idx, targets=y, reduction="none"))
    for (name, p), (_, q) in zip(plain.named_parameters(), padded.named_parameters()):
        torch.testing.assert_close(q.grad[:p.shape[0]], p.grad, msg=name)
        assert torch.count_nonzero(q.grad[p.shape[0]:]) == 0, name

    padded.save(tmp_path / "w.safetensors")
    back = GPTModel.load(tmp_path / "w.safetensors")
    assert back.config.vocab_multiple == 16 and torch.equal(back(idx), logits.detach())


def test_pad_vocab_gives_the_same_model_with_aligned_rows():
    """GPTModel.pad_vocab: published GPT-2 weights fine-tuned with a padded head (sft --vocab-multiple)."""
    torch.manual_seed(6)
    m = GPTModel(GPTConfig(**SMALL)).eval().set_kernels({"layernorm"}).set_activation_checkpointing(True)
    with torch.no_grad():
        m.tok_emb.weight.add_(torch.randn_like(m.tok_emb.weight))
    idx = torch.randint(0, 97, (2, 7))
    before = torch.random.get_rng_state()
    p = m.pad_vocab(16)
    assert torch.equal(torch.random.get_rng_state(), before)  # its throwaway init used a forked RNG
    assert p.tok_emb.weight.shape == (112, 32) and p.out_head.weight is p.tok_emb.weight
    assert p.kernels == m.kernels and not p.training and p.config.vocab_multiple == 16
    assert p.activation_checkpointing
    assert torch.count_nonzero(p.tok_emb.weight[97:]) == 0
    torch.testing.assert_close(p(idx), m(idx))
    back = p.pad_vocab(1)  # and back: the padding removed, the weights exactly the original's
    assert back.tok_emb.weight.shape == (97, 32)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    with pytest.raises(UserError, match="vocab_multiple must be a positive integer"):
        m.pad_vocab(0)


def test_pad_vocab_builds_its_new_model_on_the_reference_path(monkeypatch):
    """pad_vocab builds the new model on the CPU before moving it; asking for Triton there
    fails on a GPU machine (no interpreter), so only the moved model gets the caller's kernels."""
    import tritongpt.model.gpt as gpt

    m = GPTModel(GPTConfig(**dict(SMALL, n_head=2))).set_kernels("triton")
    asked = []
    real = gpt.resolve_kernels
    monkeypatch.setattr(gpt, "resolve_kernels", lambda spec, device, check=True:
                        asked.append((spec, check)) or real(spec, device, check))
    p = m.pad_vocab(16)
    assert asked == [("reference", False), ("triton", True)] and p.kernels == m.kernels


# -- large presets, config parsing, the toggle's spec strings, pad_vocab keeps the dtype --
def test_large_presets_and_config_parsing():
    from tritongpt.model.toggle import spec_string

    with torch.device("meta"):
        assert GPTModel(get_config("gpt2-large")).num_params() == 774_030_080
        assert GPTModel(get_config("gpt2-xl")).num_params() == 1_557_611_200
    assert get_config("gpt2-large").head_dim == 64 and get_config("gpt2-xl").n_layer == 48
    with pytest.raises(UserError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"vocab_size": 10, "n_embdd": 8})
    assert resolve_kernels("layernorm, mlp", "cpu") == {"layernorm", "mlp"}
    assert spec_string(frozenset({"mlp", "attention"})) == "mlp,attention"
    m = GPTModel(GPTConfig(vocab_size=97, context_length=8, n_embd=16, n_layer=1, n_head=2)).to(torch.bfloat16)
    assert m.pad_vocab(16).tok_emb.weight.dtype == torch.bfloat16


def test_ids_outside_the_vocabulary_under_torch_compile_raise_not_abort(tmp_path):
    """Compiled with inductor on the CPU, an id past the vocabulary hit inductor's own bounds
    check, which aborts the process (std::runtime_error in a compiled kernel): in a subprocess,
    so the test itself survives the old behaviour."""
    import shutil
    import subprocess
    import sys

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler")
    script = tmp_path / "oov.py"
    script.write_text(
        "import tritongpt, torch\n"
        "from tritongpt.model.config import GPTConfig\n"
        "from tritongpt.model.gpt import GPTModel\n"
        "m = torch.compile(GPTModel(GPTConfig(vocab_size=64, context_length=16, n_embd=32, n_layer=1, n_head=2)))\n"
        "m(torch.randint(0, 64, (1, 8)))\n"
        "for bad in (70, -1):\n"
        "    try:\n"
        "        m(torch.full((1, 8), bad))\n"
        "    except RuntimeError as e:\n"
        "        print('raised:', str(e).splitlines()[0])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("raised: token ids must be in [0, 64)") == 2, done.stdout + done.stderr[-2000:]
