"""Mistral, Qwen2 and Qwen3: Llama's nearest relatives, each a GPTConfig field or two away from it.
Mistral's sliding window is our local attention (attention_window, every layer); Qwen2's biases
on q, k and v alone are qkv_bias_only; Qwen3's q/k norms and head width are qk_norm and
attention_head_dim. Their weights load with transformers' logits on both kernel paths, a KV-cache
decode and greedy generation match (Qwen2's: tests/test_llama.py), and export writes each back as
its own model_type (test_llama.py's round trips). Tiny random models saved to tmp_path: nothing
downloaded."""
import json
import re

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, hf_llama, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def _check_logits(hf, model):
    logits_match_transformers(hf, model, VOCAB, T)


@pytest.mark.parametrize("kw", [{}, {"tie": True, "kv_heads": 1}], ids=["gqa-untied", "mqa-tied"])
def test_qwen2_loads_with_biases_on_q_k_v_only(tmp_path, kw):
    hf, path = hf_llama(tmp_path, VOCAB, kind="qwen2", **kw)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.bias, c.qkv_bias_only, c.has_qkv_bias, c.attention_window, c.tie_weights) == \
        (False, True, True, 0, kw.get("tie", False))
    biases = sorted({n.split(".", 2)[2] for n, _ in model.named_parameters() if n.endswith(".bias")})
    assert biases == ["att.W_key.bias", "att.W_query.bias", "att.W_value.bias"]
    _check_logits(hf, model)


@pytest.mark.parametrize("window", [7, None], ids=["window-7", "no-window"])
def test_mistral_sliding_window_is_our_local_attention(tmp_path, window):
    """A window of 7 over 23 positions: query i sees keys i-6..i in both models (an off-by-one,
    i-7..i, fails the logits); the KV-cache decode keeps the window too."""
    hf, path = hf_llama(tmp_path, VOCAB, kind="mistral", sliding_window=window)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.attention_window, c.window_layers, c.bias, c.has_qkv_bias) == (window or 0, "all", False, False)
    _check_logits(hf, model)
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        _, decoded, _ = decode_token_by_token(model, idx, whole=False)
        assert_close_rel(decoded, hf(idx).logits, 2e-6, "decoded over the cache")


def test_mistral_without_sliding_window_key_reads_transformers_default(tmp_path):
    """MistralConfig's sliding_window is 4096 when config.json does not name it."""
    _, path = hf_llama(tmp_path, VOCAB, kind="mistral", sliding_window=7)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    del d["sliding_window"]
    cfg_json.write_text(json.dumps(d))
    assert transformers.AutoConfig.from_pretrained(tmp_path).sliding_window == 4096
    assert load_checkpoint(path).config.attention_window == 4096


@pytest.mark.parametrize("kind, window", [("qwen2", 4096), ("qwen3", 4096), ("smollm3", 0)])
def test_a_qwen_window_without_sliding_window_key_reads_transformers_default(tmp_path, kind, window):
    """use_sliding_window true and no sliding_window: Qwen2Config's and Qwen3Config's width is 4096 (it was read as
    no window here), SmolLM3Config's none."""
    _, path = hf_llama(tmp_path, VOCAB, kind=kind, layers=1, use_sliding_window=True, sliding_window=7,
                       max_window_layers=0, layer_types=["sliding_attention"])
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    del d["sliding_window"]
    cfg_json.write_text(json.dumps(d))
    assert transformers.AutoConfig.from_pretrained(tmp_path).sliding_window == (window or None)
    assert load_checkpoint(path).config.attention_window == window


@pytest.mark.parametrize("edit, window, layers", [
    ({"use_sliding_window": False, "sliding_window": 7}, 0, "all"),  # the window is off: every layer global
    ({"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 0}, 7, "all"),
    ({"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 2}, 0, "all"),  # from layer 2 of 2: none
    ({"use_sliding_window": True, "sliding_window": 7, "layers": 4,
      "layer_types": ["full_attention", "sliding_attention"] * 2}, 7, "odd"),
], ids=["off", "all-layers", "past-the-last-layer", "odd-layers"])
def test_qwen2_sliding_window_is_read_as_transformers_does(tmp_path, edit, window, layers):
    hf, path = hf_llama(tmp_path, VOCAB, kind="qwen2", **edit)
    model = load_checkpoint(path).double().eval()
    assert (model.config.attention_window, model.config.window_layers) == (window, layers)
    _check_logits(hf, model)


def test_a_qwen2_window_over_other_layers_is_a_list_and_a_bad_window_is_refused_by_name(tmp_path):
    """Layers 1 and 2 of 3 (max_window_layers 1) are window_layers "1,2": transformers' logits; the
    export writes them as layer_types, read back by transformers and by us alike."""
    from tritongpt.train.llama_weights import export_llama

    hf, path = hf_llama(tmp_path, VOCAB, kind="qwen2", layers=3, use_sliding_window=True, sliding_window=7,
                        max_window_layers=1)
    model = load_checkpoint(path).double().eval()
    assert (model.config.attention_window, model.config.window_layers) == (7, "1,2")
    _check_logits(hf, model)
    export_llama(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == \
        ["full_attention", "sliding_attention", "sliding_attention"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, model(idx), 2e-6, "exported window list")
    assert load_checkpoint(tmp_path / "out" / "model.safetensors").config.window_layers == "1,2"
    cfg_json = tmp_path / "config.json"
    for kind, bad in (("mistral", 0), ("mistral", "7"), ("qwen2", -1)):
        d = json.loads(cfg_json.read_text())
        cfg_json.write_text(json.dumps({**d, "model_type": kind, "sliding_window": bad, "max_window_layers": 0}))
        with pytest.raises(UserError, match=f"has sliding_window {bad!r}; it must be a positive integer or null"):
            load_checkpoint(path)
    # bool("false") is True: the window this file switches off was read as on
    cfg_json.write_text(json.dumps({**d, "model_type": "qwen2", "use_sliding_window": "false", "sliding_window": 7}))
    with pytest.raises(UserError, match="has use_sliding_window 'false'; it must be true or false"):
        load_checkpoint(path)


def _random(**overrides):
    """Our own Llama-shaped model (test_llama's, same vocabulary and context), every tensor random."""
    from test_llama import _random_llama

    return _random_llama(**overrides).double()


def test_what_none_of_the_three_computes_is_refused_by_name():
    from tritongpt.train.llama_weights import refuse_not_llama

    from tritongpt.train.llama_weights import hf_family

    # a window in some layers only is Ministral's (layer_types: test_more_families.py), never Mistral's
    odd = _random(attention_window=5, window_layers="odd")
    assert hf_family(odd.config) == "ministral"
    with pytest.raises(UserError, match=r"has local attention \(attention_window 5\) in its odd layers, where "
                                        "Mistral's sliding window, if any, is in every layer: it cannot be exported"):
        refuse_not_llama(odd, "X", "Mistral")
    for overrides, said in (
            ({"attention_window": 5, "bias": True}, "where Llama attends to the whole context (a Mistral folder would "
             "take the window, but Mistral's projections have no biases)"),
            ({"qkv_bias_only": True, "norm": "layernorm"}, "normalizes with layernorm, where Qwen2 has RMSNorms"),
            ({"qk_norm": True, "qkv_bias_only": True}, "has biases on q, k and v only (Qwen2's), where Qwen3"),
            ({"qk_norm": True, "bias": True}, "has biases in its MLP, where Qwen3's has none")):
        with pytest.raises(UserError) as e:
            refuse_not_llama(_random(**overrides), "X")
        assert said in str(e.value)
    with pytest.raises(UserError, match="GPTConfig.qkv_bias_only gives the query, key and value projections biases "
                                        "in a model without others"):
        GPTConfig(bias=True, qkv_bias_only=True)
    with pytest.raises(UserError, match="GPTConfig.qkv_bias_only must be True or False, got 'yes'"):
        GPTConfig(bias=False, qkv_bias_only="yes")
    with pytest.raises(UserError, match="GPTConfig.attention_head_dim must be an integer >= 0"):
        GPTConfig(attention_head_dim=-1)
    from tritongpt.train.gpt2_weights import refuse_not_gpt2
    from tritongpt.train.gpt_neo_weights import refuse_not_gpt_neo

    gpt2 = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=1, n_head=4)
    for overrides, said in (({"attention_head_dim": 32}, "this model's heads are 32 wide (attention_head_dim; 4 of "
                             "them over n_embd 64), where Hugging Face's GPT-2 has n_embd / n_head"),
                            ({"qk_norm": True}, "normalizes each head's q and k (qk_norm), which Hugging Face's "
                             "GPT-2")):
        with pytest.raises(UserError, match=re.escape(said)):
            refuse_not_gpt2(GPTModel(GPTConfig(**gpt2, **overrides)), "X")
        with pytest.raises(UserError, match=re.escape(said.replace("GPT-2", "GPT-Neo"))):
            refuse_not_gpt_neo(GPTModel(GPTConfig(**gpt2, **overrides, scale_attention=False, qkv_bias=False)), "X")


@pytest.mark.parametrize("head_dim", [32, 16], ids=["own-head-width", "hidden-over-heads"])
def test_qwen3_loads_with_qk_norms_and_its_own_head_width(tmp_path, head_dim):
    """Qwen3: each head's q and k RMSNorm-ed before RoPE (weights of their own), heads 32 wide over
    a width of 64 (4 heads: q is 128 wide), no biases; transformers' logits on both paths (the
    Triton path's RMSNorm kernel normalizes the heads too), the cache and greedy tokens."""
    hf, path = hf_llama(tmp_path, VOCAB, kind="qwen3", head_dim=head_dim)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.qk_norm, c.head_dim, c.attention_head_dim, c.bias, c.has_qkv_bias) == \
        (True, head_dim, 0 if head_dim == 16 else head_dim, False, False)
    assert model.trf_blocks[0].att.W_query.weight.shape == (4 * head_dim, 64)
    _check_logits(hf, model)
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        _, decoded, _ = decode_token_by_token(model, idx, whole=False)
        assert_close_rel(decoded, hf(idx).logits, 2e-6, "decoded over the cache")
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 8)
    theirs = hf.generate(idx[:, :3], max_new_tokens=8, do_sample=False, pad_token_id=0)  # stops at its EOS, 0
    assert torch.equal(ours[:, :theirs.shape[1]], theirs)


def test_a_head_dim_the_weights_do_not_have_and_another_family_are_refused_by_name(tmp_path):
    _, path = hf_llama(tmp_path, VOCAB, kind="qwen3", head_dim=32)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    cfg_json.write_text(json.dumps({**d, "head_dim": 16}))
    with pytest.raises(UserError, match="config.json says head_dim 16, but the weights have 32"):
        load_checkpoint(path)
    # (olmoe and qwen2_moe are read: train/moe_weights.py)
    cfg_json.write_text(json.dumps({**d, "model_type": "deepseek_v2"}))
    with pytest.raises(UserError, match="config.json says model_type 'deepseek_v2': not a GPT-2 model \\(tritongpt "
                                        "reads Hugging Face's gpt2, gpt_neo, gpt_oss, llama, mistral, .*, glm4, "
                                        "exaone4, mixtral, qwen3_moe, olmoe and qwen2_moe models\\)"):
        load_checkpoint(path)
    # every model_type that refusal lists is one a reader takes (its own refusals differ: not "not a GPT-2 model")
    from tritongpt.train.gpt2_weights import read_model_types
    for kind in read_model_types()[1:]:
        cfg_json.write_text(json.dumps({**d, "model_type": kind}))
        try:
            load_checkpoint(path)
        except UserError as e:
            assert "not a GPT-2 model" not in str(e), (kind, e)
    # OLMo 2's loader reads its own block: a Qwen3 folder called one has input norms OLMo 2 has not
    cfg_json.write_text(json.dumps({**d, "model_type": "olmo2"}))
    with pytest.raises(UserError, match="tensor layers.0.input_layernorm is not OLMo 2's"):
        load_checkpoint(path)
    # Gemma 3's loader reads its own tensor names: a Qwen3 folder called one lacks the sandwich norms
    cfg_json.write_text(json.dumps({**d, "model_type": "gemma3_text", "query_pre_attn_scalar": 32}))
    with pytest.raises(UserError, match="missing tensor.*pre_feedforward_layernorm"):
        load_checkpoint(path)


def test_pretrain_from_a_qwen2_folder_export_it_and_resume_it(corpus, tmp_path, capsys):
    """A practitioner's path: --init a Qwen2 folder, train a step, export: a Qwen2 folder that
    transformers runs with our logits; `info` names the biases; a resume whose flags would drop
    the q/k/v biases is refused by name, and one with the run's --init goes on."""
    from tritongpt.cli import main

    hf_llama(tmp_path / "qwen", 300, kind="qwen2", context=64)
    cfg_json = tmp_path / "qwen" / "config.json"  # GPT-2's eps, as the flags' model below has
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "rms_norm_eps": 1e-5}))

    def argv(out, *extra):
        return pretrain_argv(corpus, out, "--max-steps", "1", "--init", str(tmp_path / "qwen"), *extra)

    assert main(argv(tmp_path / "run")) == 0
    assert "context 64, trained on 32-token blocks, biases on q/k/v only" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "Qwen2 with 2 layers" in capsys.readouterr().out
    model = load_checkpoint(tmp_path / "run").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    assert main(["info", "--weights", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "qkv_bias_only" in out and "and qkv_bias_only gives q/k/v theirs" in out
    llama = ("--norm", "rmsnorm", "--mlp", "swiglu", "--mlp-hidden", "88", "--position-encoding", "rope",
             "--rope-theta", "5000", "--no-bias")
    more = ("--max-steps", "2", "--resume")
    assert main(pretrain_argv(corpus, tmp_path / "run", *llama, *more)) == 2
    assert "model has biases on q/k/v only, this run's model has no biases: pass the run's own --init" in \
        capsys.readouterr().err
    assert main(argv(tmp_path / "run", *more)) == 0
    assert main(argv(tmp_path / "again", "--bias")) == 2
    assert "--bias would change the shapes of --init's weights (its linear layers have biases on q/k/v only)" in \
        capsys.readouterr().err


def test_a_qwen3_run_resumes_with_its_init_and_counts_its_wider_attention(corpus, tmp_path, capsys):
    """pretrain --init a Qwen3 folder, then a resume whose flags build a Llama (no q/k norms, heads
    of n_embd / n_head) is refused by name; MFU's attention FLOPs count the queries' own width
    (4 heads of 32 over n_embd 64: twice nanoGPT's 4 C T)."""
    from tritongpt.cli import main
    from tritongpt.train.loop import attention_forward_flops

    hf_llama(tmp_path / "qwen3", 300, kind="qwen3", head_dim=32, context=64)
    cfg_json = tmp_path / "qwen3" / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "rms_norm_eps": 1e-5}))
    assert main(pretrain_argv(corpus, tmp_path / "run", "--max-steps", "1", "--init", str(tmp_path / "qwen3"))) == 0
    assert "heads of 32, q/k norms" in capsys.readouterr().out
    cfg = load_checkpoint(tmp_path / "run").config
    assert attention_forward_flops(cfg, 32) == 2 * 4 * 64 * 32 * cfg.n_layer
    llama = ("--norm", "rmsnorm", "--mlp", "swiglu", "--mlp-hidden", "88", "--position-encoding", "rope",
             "--rope-theta", "5000", "--no-bias", "--n-kv-head", "2")
    assert main(pretrain_argv(corpus, tmp_path / "run", *llama, "--max-steps", "2", "--resume")) == 2
    assert "model normalizes each head's q and k and has heads of 32, this run's model does not normalize each " \
           "head's q and k and has heads of n_embd / n_head: pass the run's own --init" in capsys.readouterr().err
