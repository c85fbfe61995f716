"""Reference model: configs, initialisation, causality, KV cache, save/load, the toggle's bookkeeping."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig, get_config
from tritongpt.model import gpt as gpt_module
from tritongpt.model.gpt import GPTModel, lm_loss
from tritongpt.model.layers import GELU, FeedForward, LayerNorm, MultiHeadAttention
from tritongpt.model.toggle import KERNEL_NAMES, resolve_kernels

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
    # a numpy float32 cap (from an array or a config) is stored as a float: the config is saved as JSON
    cfg = GPTConfig(logit_softcap=np.float32(2.5), dropout=np.float32(0.25))
    assert type(cfg.logit_softcap) is float and json.loads(json.dumps(cfg.to_dict()))["logit_softcap"] == 2.5


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
    with to_empty() gets its tied head back and computes the real model's logits."""
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

    one_nan = sd["pos_emb.weight"].clone()
    one_nan[3, 5] = float("nan")  # one element, mid-tensor: all_finite's min and max both see it
    for bad, match in ((damaged(n_layer=1), r"do not fit its saved model config \(Unexpected key"),
                       (damaged(context_length=12), "do not fit its saved model config.*pos_emb.weight"),
                       (damaged(config='{"n_layer": '), "saved model config is not valid JSON"),
                       (damaged(config="[1]"), "saved model config is a JSON list"),
                       (damaged(dropout=2.0), "saved model config: GPTConfig.dropout"),
                       (damaged({**sd, "pos_emb.weight": one_nan}),
                        "tensor pos_emb.weight holds NaN or inf")):
        with pytest.raises(UserError, match=r"damaged\d.safetensors: .*" + match):
            GPTModel.load(bad)
    path = tmp_path / "r.safetensors"
    RewardModel(GPTModel(GPTConfig(**SMALL))).save(path)
    sd = load_file(str(path))
    save_file({k: v for k, v in sd.items() if "trf_blocks.1." not in k}, str(path), safetensors_metadata(path))
    with pytest.raises(UserError, match=r"r.safetensors: its tensors do not fit .*Missing key"):
        RewardModel.load(path)


def test_safetensors_own_error_is_reported_in_one_line(tmp_path, monkeypatch):
    """A file safetensors cannot open is one line naming the file, with the first line of
    safetensors' own message (unreadable_safetensors' docstring), however many lines that has."""
    import safetensors

    path = tmp_path / "w.safetensors"
    GPTModel(GPTConfig(**SMALL)).save(path)

    def refuse(*args, **kwargs):
        raise OSError("header too large\n  at byte 8\n  (a truncated download?)")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    with pytest.raises(UserError) as err:
        GPTModel.load(path)
    assert str(err.value) == f"{path} is not a readable safetensors file (OSError: header too large)"


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


def test_auto_leaves_the_dot_kernels_out_below_ampere(monkeypatch, capsys):
    """Below compute capability 8.0 Triton's tl.dot is scalar FMAs (the sm_75 compile check has
    no MMA instruction): auto keeps the LayerNorm, RoPE and the fused loss there, not the MLP and
    attention, and a trainer given them anyway says they will be slow."""
    from types import SimpleNamespace

    from tritongpt.train.common import note_slow_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    no_dot = {"layernorm", "cross_entropy", "rope"}
    for cap, want in (((7, 0), no_dot), ((7, 5), no_dot),
                      ((8, 0), set(KERNEL_NAMES)), ((9, 0), set(KERNEL_NAMES))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert resolve_kernels("auto", "cuda") == want, cap
        assert resolve_kernels("triton", "cuda") == set(KERNEL_NAMES)  # asked for: given
        for kernels, said in (("triton", "the Triton mlp and attention"),
                              ("layernorm,attention", "the Triton attention "), ("layernorm,cross_entropy", None)):
            note_slow_kernels([SimpleNamespace(config=SimpleNamespace(kernels=kernels))], "cuda")
            err = capsys.readouterr().err
            if said and cap < (8, 0):
                assert said in err and f"(this GPU: {cap[0]}.{cap[1]})" in err, (cap, kernels, err)
            else:
                assert err == "", (cap, kernels, err)


def test_spec_string_round_trips_every_kernel_subset():
    """GPTConfig.kernels stores spec_string's text and a load resolves it again: every subset
    of the kernels comes back as itself ("triton" only for all four, "reference" for none)."""
    from itertools import combinations

    from tritongpt.model.toggle import spec_string

    for n in range(len(KERNEL_NAMES) + 1):
        for subset in map(frozenset, combinations(KERNEL_NAMES, n)):
            text = spec_string(subset)
            assert resolve_kernels(text, "cpu", check_device=False) == subset, (subset, text)
            assert (text == "triton") == (n == len(KERNEL_NAMES)) and (text == "reference") == (n == 0), text


def test_toggle_resolution_and_state_dict_unchanged():
    assert resolve_kernels("reference", "cpu") == frozenset()
    assert resolve_kernels("auto", "cpu") == frozenset()
    assert resolve_kernels("auto", "cuda") == {"layernorm", "mlp", "attention", "cross_entropy", "rope"}
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


def test_pad_vocab_keeps_the_logit_softcap():
    """A soft-capped model padded (sft --vocab-multiple) is the same function: its cap comes along,
    and so the same capped logits, and back again."""
    torch.manual_seed(7)
    m = GPTModel(GPTConfig(**SMALL, logit_softcap=1.5)).eval()
    idx = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        m.tok_emb.weight.mul_(30.0)  # logits of several units: the cap bends them
        want = m(idx)
        assert want.abs().max() <= 1.5 and m.out_head(m.hidden(idx)).abs().max() > 3.0
        p = m.pad_vocab(16)
        assert p.config.logit_softcap == 1.5 and p.pad_vocab(1).config.logit_softcap == 1.5
        torch.testing.assert_close(p(idx), want)


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


# -- pinned by a mutation pass over model/ (each test fails on a plausible slip that no other caught) --
def _gpt2_float64(model, idx):
    """GPT-2's forward written out in float64 from the state_dict, head by head (no view/transpose
    of [B, T, C] into heads): pre-LN blocks, biased variance with eps 1e-5 inside the square root,
    tanh GELU, causal softmax(q k^T / sqrt(d)), the head's first vocab_size rows."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    d, T = cfg.n_embd // cfg.n_head, idx.shape[1]

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = sd["tok_emb.weight"][idx] + sd["pos_emb.weight"][:T]
    for i in range(cfg.n_layer):
        b = f"trf_blocks.{i}."
        h = ln(x, b + "norm1")
        q, k, v = (lin(h, b + "att.W_" + n) for n in ("query", "key", "value"))
        heads = []
        for j in range(cfg.n_head):
            s = slice(j * d, (j + 1) * d)
            scores = (q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[..., s])
        x = x + lin(torch.cat(heads, -1), b + "att.out_proj")
        x = x + lin(gelu(lin(ln(x, b + "norm2"), b + "ff.fc1")), b + "ff.fc2")
    return ln(x, "final_norm") @ sd["out_head.weight"][:cfg.vocab_size].T


@pytest.mark.parametrize("tied,vocab_multiple", [(True, 1), (False, 16)])
def test_logits_match_gpt2_written_out_in_float64(tied, vocab_multiple):
    """The whole forward against GPT-2's definition (every weight randomized, so biases and
    LayerNorm affines count). Both paths share the module wiring, so a slip in it is invisible to
    the parity tests: a post-LN block (x = LN(x + f(x))) passed every other test."""
    torch.manual_seed(8)
    m = GPTModel(GPTConfig(**SMALL, tie_weights=tied, vocab_multiple=vocab_multiple))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m = m.double().eval()
    idx = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(m(idx), _gpt2_float64(m, idx), rtol=0, atol=1e-10)


def test_gpt2_init_of_embeddings_head_and_every_bias():
    """GPT-2's init covers the embeddings too (N(0, 0.02), not nn.Embedding's N(0, 1)), and
    only the residual projections' weights get the 1/sqrt(2 n_layer) scale: every Linear bias,
    out_proj's and fc2's included, starts at zero."""
    torch.manual_seed(9)
    m = GPTModel(GPTConfig(vocab_size=500, context_length=256, n_embd=64, n_layer=2, n_head=4, tie_weights=False))
    for name in ("tok_emb.weight", "pos_emb.weight", "out_head.weight"):
        w = dict(m.named_parameters())[name]
        assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3, name
    biases = {n: p for n, p in m.named_parameters() if n.endswith(".bias") and "norm" not in n}
    assert len(biases) == 2 * 6  # W_query, W_key, W_value, out_proj, fc1, fc2 per block
    assert all(torch.count_nonzero(p) == 0 for p in biases.values()), \
        [n for n, p in biases.items() if torch.count_nonzero(p)]
    no_bias = GPTModel(GPTConfig(**SMALL, bias=False))
    assert all(mod.bias is None for mod in no_bias.modules() if isinstance(mod, torch.nn.Linear))


def test_untied_head_stays_its_own_through_moves_and_load(tmp_path):
    """_apply re-ties the head only for a tied model: an untied one moved (to(), load()'s move)
    keeps its own head's values instead of quietly becoming the embedding."""
    torch.manual_seed(10)
    m = GPTModel(GPTConfig(**SMALL, tie_weights=False)).eval()
    head = m.out_head.weight.detach().clone()
    m = m.to("cpu").to(torch.float64).to(torch.float32)
    assert m.out_head.weight is not m.tok_emb.weight and torch.equal(m.out_head.weight, head)
    m.save(tmp_path / "w.safetensors")
    back = GPTModel.load(tmp_path / "w.safetensors")
    assert back.out_head.weight is not back.tok_emb.weight and torch.equal(back.out_head.weight, head)


def test_each_kernel_name_turns_on_exactly_its_modules():
    """set_kernels({name}) flips use_triton on that name's module type and no other (attention
    was only ever checked with all four on; rope: a RoPE model's Rotary modules)."""
    from tritongpt.model.layers import Rotary
    from tritongpt.model.toggle import KERNEL_NAMES

    m = GPTModel(GPTConfig(**dict(SMALL, n_head=2), position_encoding="rope"))
    kinds = {"layernorm": LayerNorm, "mlp": FeedForward, "attention": MultiHeadAttention, "rope": Rotary}
    for name in KERNEL_NAMES:
        m.set_kernels({name})
        assert m.kernels == {name} and m.config.kernels == name
        for kernel, kind in kinds.items():
            mods = [mod for mod in m.modules() if isinstance(mod, kind)]
            assert mods and all(mod.use_triton == (kernel == name) for mod in mods), (name, kernel)


def test_set_dropout_reaches_every_dropout_and_the_saved_config(tmp_path):
    """set_dropout sets all 1 + 3 n_layer dropouts and the config (what save() writes and load()
    rebuilds); a rate of 1 (every activation zeroed) is refused, by GPTConfig too, as is one below 0."""
    m = GPTModel(GPTConfig(**SMALL))
    m.set_dropout(0.25)
    rates = [mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert rates == [0.25] * (1 + 3 * SMALL["n_layer"]) and m.config.dropout == 0.25
    m.save(tmp_path / "w.safetensors")
    back = GPTModel.load(tmp_path / "w.safetensors")
    assert back.config.dropout == 0.25 and all(mod.p == 0.25 for mod in back.modules()
                                               if isinstance(mod, torch.nn.Dropout))
    with pytest.raises(UserError, match="dropout must be in"):
        m.set_dropout(1.0)
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match="GPTConfig.dropout must be in"):
            GPTConfig(dropout=bad)


def test_int32_and_empty_token_ids():
    """int32 ids are ids (the same logits as int64); a batch of zero-length sequences gives
    [B, 0, vocab_size] logits on either path (the id check must not take the min of nothing); bool targets are
    refused, not read as ids 0 and 1."""
    torch.manual_seed(11)
    m = GPTModel(GPTConfig(**SMALL, vocab_multiple=16)).eval()
    idx = torch.randint(0, 97, (2, 6))
    assert torch.equal(m(idx.int()), m(idx))
    with warnings.catch_warnings():  # and quietly (Tensor.var warns when it reduces no rows)
        warnings.simplefilter("error")
        assert m(idx[:, :0]).shape == (2, 0, 97)
        assert m.set_kernels({"layernorm", "mlp", "cross_entropy"})(idx[:, :0]).shape == (2, 0, 97)
    m.set_kernels("reference")
    with pytest.raises(UserError, match="targets must hold integer token ids, got dtype torch.bool"):
        m(idx, targets=idx > 50)


def test_kv_cache_overflow_reset_and_gradients_through_values():
    """A cache shorter than the context: the chunk that passes its end is a UserError naming the
    capacity (not a slice assignment's shape error), and reset() starts it over at position 0.
    Gradients through the values alone (every weight frozen but one layer's W_value) are refused
    like any other: the cache is written in place."""
    torch.manual_seed(12)
    m = GPTModel(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 97, (1, 9))
    cache = m.new_cache(1, max_len=8)
    with torch.no_grad():
        m(idx[:, :5], cache)
        with pytest.raises(UserError, match=r"KV cache overflow: 9 positions > capacity 8"):
            m(idx[:, 5:], cache)
        cache.reset()
        assert cache.pos == 0
        torch.testing.assert_close(m(idx[:, :8], cache), m(idx[:, :8]))
    for p in m.parameters():
        p.requires_grad_(False)
    m.trf_blocks[-1].att.W_value.weight.requires_grad_(True)
    with pytest.raises(UserError, match="the KV cache is for inference"):
        m(idx, m.new_cache(1))


def test_dropout_sites_embeddings_attention_weights_mlp_output():
    """Where each dropout acts, pinned elementwise (p = 0.5: a kept value is exactly twice the
    undropped one): on tok_emb + pos_emb before the first block, on the attention weights after
    the softmax, and on the MLP's output after fc2 (on both of its paths)."""
    torch.manual_seed(13)
    m = GPTModel(GPTConfig(**SMALL))
    idx = torch.randint(0, 97, (2, 10))
    m.drop_emb.p = 0.5
    seen = []
    m.trf_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        m(idx)
    x0 = (m.tok_emb.weight[idx] + m.pos_emb.weight[:10]).detach()
    kept = seen[0] != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(seen[0][kept], 2 * x0[kept])

    att = MultiHeadAttention(16, 2, 16, dropout=0.5).double()  # head dim 8
    q, k = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    v = torch.eye(8, dtype=torch.float64).expand(2, 2, 8, 8)  # ctx is then the weights themselves
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    w = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf")), -1)
    ctx = att.train().attend(q, k, v)
    kept = ctx != 0
    assert (kept & ~allowed).sum() == 0 and (~kept & allowed).any() and kept.any()
    torch.testing.assert_close(ctx[kept], 2 * w[kept], rtol=1e-12, atol=0)

    ff = FeedForward(16, dropout=0.5)
    x = torch.randn(4, 16)
    for use_triton in (False, True):  # the Triton MLP's output goes through the same dropout
        ff.use_triton = use_triton
        with torch.no_grad():
            y0, y = ff.eval()(x), ff.train()(x)
        kept = y != 0
        assert kept.any() and (~kept).any(), use_triton
        torch.testing.assert_close(y[kept], 2 * y0[kept], rtol=1e-6, atol=0, msg=f"use_triton={use_triton}")


def test_attention_output_goes_through_its_residual_dropout():
    """MultiHeadAttention's last step: dropout on the output projection (its docstring: "output
    projection; dropout"), on both attention paths. With the weights' dropout off, a kept value is
    exactly twice the eval-mode output (p = 0.5) and the dropped ones are zero."""
    torch.manual_seed(19)
    att = MultiHeadAttention(32, 2, 16, dropout=0.5)  # head dim 16: the Triton path takes it
    att.attn_drop.p = 0.0
    x = torch.randn(2, 9, 32)
    for use_triton in (False, True):
        att.use_triton = use_triton
        with torch.no_grad():
            y0, y = att.eval()(x), att.train()(x)
        kept = y != 0
        assert kept.any() and (~kept).any(), use_triton
        torch.testing.assert_close(y[kept], 2 * y0[kept], rtol=1e-5, atol=1e-6, msg=f"use_triton={use_triton}")


@pytest.mark.parametrize("kernels", ["reference", "cross_entropy"])
def test_loss_ignore_index_and_reduction_on_both_loss_paths(kernels):
    """forward(targets=, ignore_index=, reduction=) against -log softmax in float64, on each loss
    path (fused LM head + loss for mean/sum, the kernel on the logits for per-token): an
    ignore_index that is a real class id (5) must be the one skipped, not -100, and "sum" and
    "none" must not fall back to the mean."""
    torch.manual_seed(14)
    m = GPTModel(GPTConfig(**SMALL, vocab_multiple=16)).eval()
    idx, y = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    y[0, :3] = 5
    y[1, 4] = 5
    with torch.no_grad():
        logp = torch.log_softmax(m(idx).double(), -1)
    counted = y != 5
    per = torch.where(counted, -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), 0.0)
    want = {"mean": per.sum() / counted.sum(), "sum": per.sum(), "none": per}
    m.set_kernels(kernels)
    for reduction, expect in want.items():
        with torch.no_grad():
            got = m(idx, targets=y, ignore_index=5, reduction=reduction)
        assert got.dtype == torch.float32 and got.shape == expect.shape, reduction
        torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6, msg=reduction)


def test_lm_loss_on_bf16_logits_is_computed_in_fp32():
    """lm_loss upcasts: bf16 logits give an fp32 loss equal to the float64 one to fp32 precision
    (a bf16 cross-entropy is off in the third digit)."""
    torch.manual_seed(15)
    logits = (torch.randn(3, 7, 50) * 4).bfloat16()
    t = torch.randint(0, 50, (3, 7))
    per = -torch.log_softmax(logits.double(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    for reduction, expect in (("mean", per.mean()), ("sum", per.sum()), ("none", per)):
        got = lm_loss(logits, t, reduction=reduction)
        assert got.dtype == torch.float32 and got.shape == expect.shape
        torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-6)


def test_non_embedding_count_and_save_metadata(tmp_path):
    """num_params(non_embedding=True) leaves out the position embeddings only: GPT-2 small's
    123.65M (nanoGPT's figure, 124,439,808 - 1024 x 768). save() writes format=tritongpt (how
    gpt2_weights tells its files from Hugging Face's) and keeps the caller's extra metadata."""
    from tritongpt.model.gpt import safetensors_metadata

    with torch.device("meta"):
        assert GPTModel(get_config("gpt2-small")).num_params(non_embedding=True) == 123_653_376
    m = GPTModel(GPTConfig(**SMALL))
    m.save(tmp_path / "w.safetensors", extra_metadata={"note": "mine", "step": 7})
    meta = safetensors_metadata(tmp_path / "w.safetensors")
    assert meta["format"] == "tritongpt" and meta["note"] == "mine" and meta["step"] == "7"


def test_load_starts_on_the_reference_path_unless_told(tmp_path):
    """load() ignores the kernels the file was saved with (a model saved on a GPU with Triton
    would fail on a CPU without the interpreter): reference, unless kernels= says otherwise.
    A safetensors file without a tritongpt config, or a reward model's, is named as such."""
    from safetensors.torch import save_file

    from tritongpt.train.reward import RewardModel

    m = GPTModel(GPTConfig(**dict(SMALL, n_head=2))).set_kernels("layernorm,mlp")
    m.save(tmp_path / "w.safetensors")
    back = GPTModel.load(tmp_path / "w.safetensors")
    assert back.kernels == frozenset() and back.config.kernels == "reference"
    assert not any(getattr(mod, "use_triton", False) for mod in back.modules())
    asked = GPTModel.load(tmp_path / "w.safetensors", kernels="mlp")
    assert asked.kernels == {"mlp"} and asked.trf_blocks[0].ff.use_triton
    save_file({"w": torch.zeros(2)}, str(tmp_path / "hf.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="has no tritongpt config in its metadata"):
        GPTModel.load(tmp_path / "hf.safetensors")
    RewardModel(GPTModel(GPTConfig(**SMALL))).save(tmp_path / "r.safetensors")
    with pytest.raises(UserError, match="is a reward model .*pass it as --reward"):
        GPTModel.load(tmp_path / "r.safetensors")


def test_presets_are_the_published_gpt2_shapes():
    """The four GPT-2 sizes as published (layers, heads, width; 50257 tokens, 1024 positions):
    a head count is invisible to num_params but not to loaded weights. "gpt2" is Hugging Face's
    name for the small one; an override of None keeps the preset's value (how the CLI passes
    options left unset)."""
    published = {"gpt2-small": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                 "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    for name, shape in published.items():
        cfg = get_config(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.context_length) == (*shape, 50257, 1024)
        assert cfg.tie_weights and cfg.bias
    assert get_config("gpt2") == get_config("gpt2-small")
    cfg = get_config("tiny", dropout=None, vocab_size=None, n_layer=2)
    assert cfg.dropout == 0.0 and cfg.vocab_size == 4096 and cfg.n_layer == 2


def test_resolve_kernels_checks_the_device_only_when_there_are_kernels(monkeypatch):
    """No kernels need no device (a CPU without the interpreter runs the reference path, however
    the empty set is spelled); a kernel there is refused with the way out, but not for a model
    about to move (check_device=False); a device that is neither CUDA nor the CPU is refused."""
    import tritongpt.model.toggle as toggle

    monkeypatch.setattr(toggle, "triton_interpreting", lambda: False)
    for empty in ("reference", "", [], set(), " , "):
        assert resolve_kernels(empty, "cpu") == frozenset(), empty
    with pytest.raises(UserError, match="only through Triton's interpreter"):
        resolve_kernels("mlp", "cpu")
    assert resolve_kernels("mlp", "cpu", check_device=False) == {"mlp"}
    monkeypatch.undo()
    with pytest.raises(UserError, match="needs a CUDA or CPU device, not meta"):
        resolve_kernels("mlp", "meta")


def test_reference_layers_keep_the_input_dtype():
    """fp16 statistics are computed in fp32 but the output is cast back: LayerNorm and GELU give
    fp16 for fp16 (an fp32 output would meet the next layer's fp16 weights), and bf16 for bf16,
    with the values of the fp32 formula to the dtype's precision."""
    torch.manual_seed(16)
    x = torch.randn(3, 40) * 3
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        ln = LayerNorm(40).to(dtype)
        y = ln(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), F.layer_norm(x.to(dtype).float(), (40,)), rtol=tol, atol=tol)
        g = GELU()(x.to(dtype))
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), F.gelu(x.to(dtype).float(), approximate="tanh"), rtol=tol, atol=tol)


# -- pinned by a second mutation pass over model/ (edge cases of the documented behaviour) --
def test_kv_cache_batch_size_must_be_a_positive_int():
    """new_cache(batch_size): a batch of 0 (or a negative, float or bool one) is the UserError
    naming the argument, not a cache that holds no sequence or torch's shape error."""
    m = GPTModel(GPTConfig(**SMALL))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(UserError, match=rf"KV cache batch_size must be a positive int, got {bad!r}"):
            m.new_cache(bad)
    assert m.new_cache(3, max_len=5).k.shape == (2, 3, 4, 5, 8)


def test_config_dropout_is_stored_as_a_python_float(tmp_path):
    """GPTConfig stores dropout as a float, whatever real number it was given: a numpy float32
    (what an array or a sweep hands over) would otherwise reach save()'s json.dumps, which
    cannot write it, and an int 0 would be saved as the int it is."""
    cfg = GPTConfig(**SMALL, dropout=np.float32(0.25))
    assert type(cfg.dropout) is float and cfg.dropout == 0.25
    assert type(GPTConfig(**SMALL, dropout=0).dropout) is float
    GPTModel(cfg).save(tmp_path / "w.safetensors")
    back = GPTModel.load(tmp_path / "w.safetensors")
    assert back.config.dropout == 0.25 and back.trf_blocks[1].att.attn_drop.p == 0.25


def test_fp16_model_on_the_meta_device_runs_a_forward():
    """A model built on the meta device (shapes only, as for sizing a GPT-2 without its memory)
    and cast to fp16 runs its forward there: the attention's autocast check asks nothing of the
    meta device, where asking raises."""
    with torch.device("meta"):
        m = GPTModel(GPTConfig(**SMALL)).half()
        out = m(torch.randint(0, 97, (2, 5)))
    assert out.shape == (2, 5, 97) and out.dtype == torch.float16 and out.is_meta


def test_padded_logits_are_a_view_of_the_heads_output():
    """forward's docstring: with a padded vocabulary the logits are a view into the head's
    [B, T, padded] output (no copy of the largest activation), its rows still padded-wide."""
    torch.manual_seed(17)
    m = GPTModel(GPTConfig(**SMALL, vocab_multiple=16)).eval()  # 97 ids in 112 rows
    with torch.no_grad():
        logits = m(torch.randint(0, 97, (3, 7)))
    assert logits.shape == (3, 7, 97) and logits.stride() == (7 * 112, 112, 1)


@pytest.mark.parametrize("kernels", ["reference", "cross_entropy"])
def test_loss_of_a_chunk_run_through_the_kv_cache(kernels):
    """forward(idx, cache, targets=) under no_grad (a chunked evaluation): the loss of a later
    chunk is that of its positions in the whole sequence, on both loss paths (the fused one must
    read the cache's positions too), and the cache advances by the chunk."""
    torch.manual_seed(18)
    m = GPTModel(GPTConfig(**SMALL)).eval().set_kernels(kernels)
    idx, y = torch.randint(0, 97, (2, 13)), torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        logp = torch.log_softmax(m.set_kernels("reference")(idx).double(), -1)
        m.set_kernels(kernels)
        want = -logp[:, 6:].gather(-1, y[:, 6:, None]).mean()
        cache = m.new_cache(2)
        m(idx[:, :6], cache)
        got = m(idx[:, 6:], cache, targets=y[:, 6:])
    assert cache.pos == 13
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_malformed_ids_and_targets_are_user_errors():
    """Token ids in a dtype nn.Embedding cannot index with (int16, uint8), complex targets, and
    targets that are not a tensor: each a UserError naming the problem, not torch's traceback."""
    m = GPTModel(GPTConfig(**SMALL))
    idx = torch.randint(0, 97, (2, 5))
    for dtype in (torch.int16, torch.uint8):
        with pytest.raises(UserError, match=f"idx must hold integer token ids, got dtype {dtype}"):
            m(idx.to(dtype))
    with pytest.raises(UserError, match="targets must hold integer token ids, got dtype torch.complex64"):
        m(idx, targets=idx.to(torch.complex64))
    with pytest.raises(UserError, match="targets must be a tensor of token ids, got list"):
        m(idx, targets=idx.tolist())


def test_new_cache_takes_an_explicit_dtype_over_the_one_it_would_pick():
    """new_cache(dtype=) is the cache's dtype as given, also under autocast (where it would
    otherwise pick the autocast dtype); without it: the weights' dtype, or autocast's."""
    m = GPTModel(GPTConfig(**SMALL))
    assert m.new_cache(2).k.dtype == torch.float32
    assert m.new_cache(2, max_len=7, dtype=torch.float64).v.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.new_cache(2).k.dtype == torch.bfloat16
        assert m.new_cache(2, dtype=torch.float32).k.dtype == torch.float32


def test_the_causal_mask_is_made_per_call_not_stored_for_the_whole_context():
    """in_the_future(Tq, Tk) is the last Tq rows of the Tk x Tk upper triangle (the KV cache's
    alignment), and no layer keeps a [context, context] buffer: a 131072-position model (Llama 3's)
    builds without one and runs a short sequence as the same weights at a 64-position context."""
    from tritongpt.model.layers import in_the_future

    for tq, tk in ((1, 1), (5, 5), (1, 9), (3, 11), (11, 11)):
        full = torch.triu(torch.ones(tk, tk, dtype=torch.bool), diagonal=1)
        assert torch.equal(in_the_future(tq, tk), full[tk - tq:]), (tq, tk)
    torch.manual_seed(0)
    small = dict(SMALL, position_encoding="rope")
    long = GPTModel(GPTConfig(**dict(small, context_length=131072))).eval()
    assert sum(b.numel() for b in long.buffers()) < 1_000_000
    short = GPTModel(GPTConfig(**dict(small, context_length=64))).eval()
    short.load_state_dict(long.state_dict())
    idx = torch.randint(0, SMALL["vocab_size"], (2, 13))
    with torch.no_grad():
        assert torch.equal(long(idx), short(idx))


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_bad_loss_arguments_and_a_foreign_cache_are_user_errors(kernels):
    """Up front, on both paths: a target outside the vocabulary (the reference loss raised a bare IndexError), a
    reduction or an ignore_index torch's loss named its own way, and a KV cache made for another model shape or
    dtype (an IndexError or a shape mismatch deep in a layer, or with more layers a forward that ran)."""
    small = dict(SMALL, n_head=2)  # (a head dim the Triton attention takes)
    m = GPTModel(GPTConfig(**small)).eval().set_kernels(kernels)
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    for bad in (97, -1):
        with pytest.raises(UserError, match=rf"target {bad} is outside the model's vocabulary \[0, 97\) and is "
                                            r"not ignore_index \(-100\)"):
            m(idx, targets=torch.full_like(idx, bad))
    ignored = idx.clone()
    ignored[:, 2:] = -1  # ignore_index=-1: those are ignored, not refused
    default = ignored.where(ignored >= 0, -100)
    torch.testing.assert_close(m(idx, targets=ignored, ignore_index=-1), m(idx, targets=default))
    with pytest.raises(UserError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        m(idx, targets=idx, reduction="avg")
    with pytest.raises(UserError, match="ignore_index must be an int, got 'x'"):
        m(idx, targets=idx, ignore_index="x")
    with torch.no_grad():
        for other in (dict(n_layer=1), dict(n_layer=3), dict(n_head=4), dict(n_embd=64)):
            cache = GPTModel(GPTConfig(**dict(small, **other))).new_cache(2)
            with pytest.raises(UserError, match=r"the KV cache is for \d+ layers of \d+ kv heads of dim \d+, this "
                                                r"model has 2 of 2 of dim 16: make it with model.new_cache\(2\)"):
                m(idx, cache)
        with pytest.raises(UserError, match="the KV cache holds torch.float16 keys and this model computes "
                                            "torch.float32 ones"):
            m(idx, m.new_cache(2, dtype=torch.float16))
        # an int8 cache's values are read back in q's dtype, whatever float dtype it was made for
        torch.testing.assert_close(m(idx, m.new_cache(2, dtype=torch.float16, kv_dtype="int8")),
                                   m(idx, m.new_cache(2, kv_dtype="int8")))


def test_load_names_a_bad_map_location(tmp_path):
    path = tmp_path / "m.safetensors"
    GPTModel(GPTConfig(**SMALL)).save(path)
    with pytest.raises(UserError, match="map_location: unknown device 'nodev'; use cpu, cuda or cuda:N"):
        GPTModel.load(path, map_location="nodev")


def test_load_refuses_a_quantized_ok_not_a_bool(tmp_path):
    path = tmp_path / "m.safetensors"
    GPTModel(GPTConfig(**SMALL)).save(path)
    from tritongpt.train.reward import RewardModel

    for load in (GPTModel.load, RewardModel.load):  # ("no" is truthy: it would let a quantized file in)
        with pytest.raises(UserError, match="quantized_ok must be True or False, got 'no'"):
            load(path, quantized_ok="no")


def test_load_refuses_an_unknown_kernel_name_before_reading_the_weights(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    GPTModel(GPTConfig(**SMALL)).save(path)
    monkeypatch.setattr(gpt_module, "load_saved_weights", lambda *a: pytest.fail("read the weights first"))
    with pytest.raises(UserError, match=r"unknown kernel\(s\) \['bogus'\]"):
        GPTModel.load(path, kernels="bogus")
