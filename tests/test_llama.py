"""Llama: a model with RMSNorm, a SwiGLU MLP, RoPE and grouped-query attention is Hugging Face's
LlamaForCausalLM. Its weights load into GPTModel with transformers' logits on both kernel paths,
export back to a folder transformers reads, and what this model does not compute is refused by
name. Tiny random LlamaForCausalLM models (heads of 16: the Triton attention's smallest head dim),
saved to tmp_path: nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, hf_llama, logits_match_transformers, pretrain_argv, save_run
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def _hf_model(folder, **kw):
    return hf_llama(folder, VOCAB, **kw)


@pytest.mark.parametrize("kw", [{}, {"tie": True, "kv_heads": 1}, {"bias": True, "kv_heads": 4}],
                         ids=["gqa-untied", "mqa-tied", "mha-biases"])
def test_logits_match_transformers_on_both_paths(tmp_path, kw):
    """transformers' logits in float64 within ~6e-7 (it computes RMSNorm in fp32 whatever the
    weights' dtype, and RoPE's inverse frequencies as 1 / base^(2i/D) in fp32, ours base^(-2i/D)
    rounded once: their last bits differ), and the Triton path's in fp32."""
    hf, path = _hf_model(tmp_path, **kw)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.position_encoding, c.rope_theta, c.norm_eps, c.mlp_hidden, c.kv_heads, c.bias,
            c.tie_weights) == ("rmsnorm", "swiglu", "rope", 5000.0, 1e-6, 88, kw.get("kv_heads", 2),
                               kw.get("bias", False), kw.get("tie", False))
    logits_match_transformers(hf, model, VOCAB, T)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # Qwen2: its q/k/v biases (test_mistral_qwen2.py)
def test_kv_cache_decode_and_greedy_tokens_match(tmp_path, kind):
    from parity import decode_token_by_token
    from tritongpt.train.generate import generate

    hf, path = _hf_model(tmp_path, kind=kind)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        whole, decoded, cache = decode_token_by_token(model, idx)
        assert_close_rel(decoded, hf(idx).logits, 2e-6, "decoded over the cache")
        assert_close_rel(decoded, whole, 1e-12, "decoded against the whole sequence")
        assert cache.k[0].shape[1] == 2  # the KV heads (GQA): the cache is n_head / n_kv_head smaller
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def _random_llama(**overrides):
    """Our own model in Llama's shape, every tensor random."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, bias=False,
               position_encoding="rope", rope_theta=500.0, norm="rmsnorm", mlp="swiglu", mlp_hidden=72)
    model = GPTModel(GPTConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.tok_emb.weight[model.config.vocab_size:] = 0  # padding rows (vocab_multiple) stay zero
    return model


@pytest.mark.parametrize("overrides, kind", [
    ({}, "llama"), ({"tie_weights": False, "vocab_multiple": 16, "norm_eps": 1e-6}, "llama"),
    ({"bias": True, "qkv_bias": False, "n_kv_head": 0}, "llama"),
    ({"attention_head_dim": 32, "tie_weights": False}, "llama"),
    # Llama's relatives (test_mistral_qwen2.py): each written as its own model_type
    ({"qkv_bias_only": True}, "qwen2"), ({"qkv_bias_only": True, "attention_window": 5, "tie_weights": False}, "qwen2"),
    ({"attention_window": 5}, "mistral"), ({"qk_norm": True, "attention_head_dim": 32}, "qwen3"),
], ids=["tied", "untied-padded-eps", "biases-but-qkv", "heads-of-32", "qwen2", "qwen2-window-untied", "mistral-window",
        "qwen3-heads-of-32"])
def test_export_round_trip(tmp_path, overrides, kind):
    """ours -> a folder of its model_type -> transformers' logits are ours; load_checkpoint reads
    it back with the same config (a bias=True model without q/k/v biases goes out with zero ones)."""
    from tritongpt.train.llama_weights import FAMILIES, export_llama

    model = _random_llama(**overrides).double()
    paths = export_llama(model, tmp_path, eos_token_id=7)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(hf).__name__ == FAMILIES[kind] and hf.config.eos_token_id == 7
    assert hf.config.tie_word_embeddings == model.config.tie_weights
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ours = model(idx)
        assert_close_rel(hf(idx).logits, ours, 2e-6, "exported logits")
        back = load_checkpoint(paths[0]).double().eval()
        assert_close_rel(back(idx), ours, 1e-12, "loaded back")
    want = {k: v for k, v in model.config.to_dict().items() if k not in ("vocab_multiple", "qkv_bias")}
    assert {k: v for k, v in back.config.to_dict().items() if k in want} == want
    with pytest.raises(UserError, match="already holds a model"):
        export_llama(model, tmp_path)


@pytest.mark.parametrize("edit, said", [
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5000.0, "factor": 8.0}},
     "rope_parameters of type 'dynamic'; this model computes unscaled RoPE ('default'), or scaled by 'linear' or "
     "'llama3'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 5000.0, "factor": 8.0}},
     "rope_parameters: longrope scaling takes short_factor, long_factor, original_max_position_embeddings, factor, "
     "attention_factor; missing short_factor, long_factor, original_max_position_embeddings"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling of type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 1.0, "original_max_position_embeddings": 256}},
     "high_freq_factor 1 must be above low_freq_factor 4"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's SwiGLU computes 'silu' only"),
    ({"head_dim": 32}, "says head_dim 32, but the weights have 16"),
    ({"mlp_bias": True}, "attention_bias False and mlp_bias True"),
    ({"sliding_window": 8}, "sliding_window 8"),
    ({"intermediate_size": 96}, "says intermediate_size 96, but the weights have 88"),
    ({"num_hidden_layers": 3}, "says num_hidden_layers 3, but the weights have 2"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta -1.0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta 0; it must be a number > 0"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5; this model rotates every dimension"),
    # transformers 4.x reads the flat rope_theta, 5 rope_parameters' (5000 in the fixture): two models. It was
    # read as rope_parameters'
    ({"rope_theta": 321.0}, "has rope_theta 321.0, but this model's RoPE reads the rope_theta in rope_parameters, "
                            "5000.0 (transformers 4.x reads rope_theta, 5 the rope_theta in rope_parameters): "
                            "make them agree"),
    # beside a rope_scaling object that says its own base, transformers 5 reads that one (the message said
    # "rope_scaling' rope_theta" before)
    ({"rope_theta": 321.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
     "has rope_theta 321.0, but this model's RoPE reads the rope_theta in rope_scaling, 500.0 (transformers 4.x reads "
     "rope_theta, 5 the rope_theta in rope_scaling): make them agree"),
    ({"vocab_size": 64}, "says vocab_size 64, but the weights have 53"),
    ({"hidden_size": 32}, "says hidden_size 32, but the weights have 64"),
    # fields of the wrong type: a ZeroDivisionError, a TypeError or an unhashable lookup before, or (a rope_scaling
    # that is no object) passed over and loaded as unscaled RoPE
    ({"num_attention_heads": 0}, "says num_attention_heads 0; it must be a positive integer"),
    ({"num_attention_heads": "4"}, "says num_attention_heads '4'; it must be a positive integer"),
    ({"num_attention_heads": 3, "head_dim": None}, "num_attention_heads 3, which does not divide the 64 rows of"),
    ({"num_key_value_heads": 0}, "says num_key_value_heads 0; it must be a positive integer"),
    ({"rope_parameters": None, "rope_scaling": ["linear", 2.0]},
     "has rope_scaling ['linear', 2.0]; it must be an object (rope_type and its fields) or null"),
    ({"rope_parameters": {"rope_type": ["linear"], "factor": 2.0}},
     "has rope_parameters of type ['linear']; its rope_type must be a string"),
    # bool("false") is True: read as biases, then refused for tensors the file never had
    ({"attention_bias": "false", "mlp_bias": "false"}, "has attention_bias 'false'; it must be true or false"),
])
def test_config_json_naming_what_this_model_does_not_compute_is_refused(hf_copy, tmp_path, edit, said):
    path = hf_copy(_hf_model, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d.update(edit)
    cfg_json.write_text(json.dumps(d))
    with pytest.raises(UserError, match="config.json (has|says) ") as e:
        load_checkpoint(path)
    assert said in str(e.value)


@pytest.mark.parametrize("edit, said", [
    ({"max_position_embeddings": "40"}, "max_position_embeddings (GPTConfig.context_length) must be a positive "
                                        "integer, got '40'"),
    # a real float is no count: refused, not truncated
    ({"max_position_embeddings": 40.0}, "max_position_embeddings (GPTConfig.context_length) must be a positive "
                                        "integer, got 40.0"),
    ({"max_position_embeddings": None}, "max_position_embeddings (GPTConfig.context_length) must be a positive "
                                        "integer, got None"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps (GPTConfig.norm_eps) must be a number in (0, 1), got '1e-5'"),
    ({"rms_norm_eps": 0}, "rms_norm_eps (GPTConfig.norm_eps) must be a number in (0, 1), got 0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads (GPTConfig.n_kv_head) must divide n_head=4 (0: as many as "
                                 "n_head), got 3"),
])
def test_config_json_fields_gptconfig_refuses_name_the_file_and_its_key(hf_copy, tmp_path, edit, said):
    """Fields the reader passes on as config.json gives them were refused by GPTConfig, naming its own field only
    (GPTConfig.context_length ...): the refusal now names the file and the file's key."""
    path = hf_copy(_hf_model, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **edit}))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"{cfg_json}: {said}"


@pytest.mark.parametrize("said", [False, None], ids=["false", "null"])
def test_an_untied_config_json_beside_weights_without_a_head_is_refused(hf_copy, tmp_path, said):
    """tie_word_embeddings false beside weights with no lm_head: transformers starts a random head (a broken
    folder). Tying was decided from the weights alone, so it loaded tied here: another model, without a word.
    (null: transformers 5's LlamaConfig refuses it, whatever the weights: refused here as a null, by name.)"""
    path = hf_copy(_hf_model, tmp_path, tie=True)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "tie_word_embeddings": said}))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(
        f"{cfg_json} says tie_word_embeddings false, but the weights beside it have no lm_head.weight: transformers "
        "would start a random LM head" if said is False else
        f"{cfg_json} has tie_word_embeddings null; it must be true or false (transformers refuses null here")


def test_a_config_json_without_tie_word_embeddings_unties_as_its_model_types_default(hf_copy, tmp_path):
    """LlamaConfig's default is untied: a Llama folder whose config.json does not say tie_word_embeddings and whose
    weights have no lm_head loads in transformers with a random head. It loaded tied here (no head read as tied,
    whatever the model type): refused, naming the field and the type's default. Saying true still loads tied."""
    path = hf_copy(_hf_model, tmp_path, tie=True)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    assert d.pop("tie_word_embeddings") is True  # (save_pretrained writes it: true is not LlamaConfig's default)
    cfg_json.write_text(json.dumps(d))
    with pytest.raises(UserError, match=r"does not say tie_word_embeddings \(model_type 'llama': transformers' default "
                                        r"false\), but the weights beside it have no lm_head.weight"):
        load_checkpoint(path)
    cfg_json.write_text(json.dumps({**d, "tie_word_embeddings": True}))
    assert load_checkpoint(path).config.tie_weights


def test_the_untied_by_default_model_types_are_transformers_own():
    """UNTIED_BY_DEFAULT is what transformers' configs say where config.json is silent: each of the model types the
    readers take, tied or untied by default as its config class is."""
    from transformers import CONFIG_MAPPING

    from tritongpt.train.gpt2_weights import UNTIED_BY_DEFAULT

    tied = {"gpt2", "gpt_neo", "bloom", "falcon", "mpt", "gemma", "gemma2", "gemma3_text", "cohere", "cohere2",
            "smollm3", "starcoder2", "gpt_bigcode"}
    for model_type in sorted(tied | UNTIED_BY_DEFAULT):
        assert CONFIG_MAPPING[model_type]().tie_word_embeddings == (model_type not in UNTIED_BY_DEFAULT), model_type


def test_older_config_json_with_rope_theta_and_without_rms_norm_eps_reads_as_transformers_does(tmp_path):
    """transformers 4.x wrote rope_theta, not rope_parameters; a config.json without rms_norm_eps
    means LlamaConfig's default, 1e-6."""
    _, path = _hf_model(tmp_path)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    del d["rope_parameters"], d["rms_norm_eps"]
    cfg_json.write_text(json.dumps({**d, "rope_theta": 321.0}))
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.norm_eps) == (321.0, transformers.LlamaConfig().rms_norm_eps) == (321.0, 1e-6)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads"])
def test_config_json_without_a_size_it_needs_is_refused_by_name(tmp_path, key):
    _, path = _hf_model(tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({k: v for k, v in json.loads(cfg_json.read_text()).items() if k != key}))
    with pytest.raises(UserError, match=f"config.json names no {key}"):
        load_checkpoint(path)


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 256}


@pytest.mark.parametrize("edit, want", [
    # the Hub's Llama 3.1 / 3.2 (transformers 4.x's): a flat rope_theta and rope_scaling
    ({"rope_parameters": None, "rope_theta": 321.0, "rope_scaling": LLAMA31_SCALING}, (321.0, LLAMA31_SCALING)),
    # beside a rope_parameters (5000, unscaled) neither 4.x nor 5 reads: the flat base, or 10000
    ({"rope_theta": 321.0, "rope_scaling": LLAMA31_SCALING}, (321.0, LLAMA31_SCALING)),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, (10000.0, {"rope_type": "linear", "factor": 2.0})),
], ids=["hub-llama31", "stale-params-flat-theta", "stale-params-no-theta"])
def test_a_rope_scaling_object_stands_in_for_rope_parameters_as_in_transformers(hf_copy, tmp_path, edit, want):
    """transformers 5 reads `rope_scaling or rope_parameters` (4.x reads no rope_parameters at all): beside a
    rope_scaling object, rope_parameters' base (5000 in the fixture) is not read. It was read here: RoPE's base
    5000 where transformers rotates with the flat rope_theta, or 10000."""
    path = hf_copy(_hf_model, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **edit}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rope_scaling) == want
    assert c.rope_theta == theirs["rope_theta"] and all(theirs[k] == v for k, v in want[1].items())


def test_an_untied_file_whose_head_is_its_embedding_loads_tied(tmp_path):
    """lm_head.weight equal to embed_tokens.weight (a tied model saved untied): one matrix, as the
    GPT-2 reader does; the logits are transformers'."""
    hf, path = _hf_model(tmp_path)
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight)
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(path).double().eval()
    assert model.config.tie_weights and model.out_head.weight is model.tok_emb.weight
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 1e-6, "tied from an untied file")


def test_another_model_type_is_refused_and_a_sharded_folder_is_read_whole(tmp_path):
    """A Mamba config.json is not read as GPT-2's tensor names (once: "missing tensor 'wte.weight'").
    A sharded save_pretrained folder (model.safetensors.index.json and its shards) loads with the
    logits of the model saved; a shard missing, or named outside the folder, is named."""
    _, path = _hf_model(tmp_path / "mamba")
    cfg_json = tmp_path / "mamba" / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "model_type": "mamba"}))
    with pytest.raises(UserError, match="config.json says model_type 'mamba': not a GPT-2 model \\(tritongpt reads "
                                        "Hugging Face's gpt2, gpt_neo, .*, llama, .* and qwen2_moe models\\)"):
        load_checkpoint(path)
    folder = tmp_path / "sharded"
    hf, _ = _hf_model(folder)
    hf.save_pretrained(folder, max_shard_size="20KB")
    (folder / "model.safetensors").unlink(missing_ok=True)  # the unsharded one, if left
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(load_checkpoint(folder).double()(idx), hf(idx).logits, 2e-6, "sharded")
    (folder / shards[1]).rename(tmp_path / shards[1])
    with pytest.raises(UserError, match=f"model.safetensors.index.json names shard\\(s\\) that are not beside it: "
                                        f"{shards[1]}"):
        load_checkpoint(folder)
    index["weight_map"]["lm_head.weight"] = "../" + shards[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"names shard\\(s\\) outside its folder: ../{shards[1]}"):
        load_checkpoint(folder)


def test_a_llama_file_without_its_config_json_is_refused_by_name(tmp_path):
    _, path = _hf_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="looks like a Llama model, whose heads, RoPE base and norm eps are in its "
                                        "config.json: put that file beside it"):
        load_checkpoint(path)


def test_export_command_writes_a_llama_folder_and_refuses_what_llama_does_not_compute(tmp_path, capsys):
    """`tritongpt export` of an RMSNorm + SwiGLU model writes a Llama folder with the run's tokenizer
    (generate then gives the same greedy text from either); an RMSNorm or SwiGLU model with another
    of GPT-2's pieces is refused as a Llama, naming that piece, before anything is written (with LayerNorms it
    is StableLM's, and written as one)."""
    from tritongpt import cli

    run, tok = save_run(tmp_path, _random_llama(vocab_size=280))
    out = tmp_path / "llama"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    assert "Llama with 2 layers" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert transformers.AutoTokenizer.from_pretrained(out)("a cat")["input_ids"] == tok.encode("a cat")
    texts = []
    for weights in (run / "model.safetensors", out / "model.safetensors"):
        assert cli.main(["generate", "--weights", str(weights), "--prompt", "a cat", "--temperature", "0",
                         "--max-new-tokens", "6", "--device", "cpu", "--kernels", "reference"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("a cat")

    for overrides, said in (({"position_encoding": "learned"}, "learns position embeddings (position_encoding "
                                                               "learned), where Llama rotates q and k (RoPE)"),
                            ({"mlp": "gelu", "mlp_hidden": 0}, "has a GELU MLP, where Llama's is SwiGLU"),
                            ({"scale_attention": False}, "does not scale its attention scores by 1/sqrt(head_dim)"),
                            ({"attention_window": 8, "bias": True}, "has local attention (attention_window 8), "
                             "where Llama attends to the whole context (a Mistral folder would take the window, but "
                             "Mistral's projections have no biases)"),
                            ({"logit_softcap": 5.0}, "soft-caps its logits (logit_softcap 5)")):
        bad, _ = save_run(tmp_path, _random_llama(vocab_size=280, **overrides), "bad")
        assert cli.main(["export", str(bad), "--out", str(tmp_path / "refused"), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert said in err and "it cannot be exported as a Llama folder" in err
        assert not (tmp_path / "refused").exists()
    # LayerNorms with SwiGLU are StableLM's pieces: such a model goes out as a StableLM, not a Llama
    layernorm, _ = save_run(tmp_path, _random_llama(vocab_size=280, norm="layernorm"), "layernorm")
    assert cli.main(["export", str(layernorm), "--out", str(tmp_path / "stablelm")]) == 0
    assert "StableLM with" in capsys.readouterr().out

    # a LoRA run of a Llama: its peft adapter goes on a Llama folder (tests/test_llama_adapter.py), which a run
    # without its --init must name; the merged model is a Llama
    lora, _ = save_run(tmp_path, _random_llama(vocab_size=280, lora_rank=2), "lora")
    assert cli.main(["export", str(lora), "--adapter", "--out", str(tmp_path / "adapter")]) == 2
    assert "--adapter: name the model it goes on with --base (a Hugging Face Llama folder" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()
    assert cli.main(["export", str(lora), "--out", str(tmp_path / "merged")]) == 0


def test_gpt2_and_gpt_neo_exports_refuse_another_norm_eps():
    from tritongpt.train.gpt2_weights import refuse_not_gpt2
    from tritongpt.train.gpt_neo_weights import refuse_not_gpt_neo

    model = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=8, n_embd=16, n_layer=1, n_head=1, norm_eps=1e-6))
    with pytest.raises(UserError, match=r"norms add eps 1e-06 \(GPTConfig.norm_eps\), where Hugging Face's GPT-2 adds"):
        refuse_not_gpt2(model, "a GPT-2 folder")
    model.config.scale_attention, model.config.qkv_bias = False, False
    with pytest.raises(UserError, match=r"norms add eps 1e-06 \(GPTConfig.norm_eps\), where GPT-Neo's add 1e-05"):
        refuse_not_gpt_neo(model, "a GPT-Neo folder")


@pytest.mark.parametrize("eps", [0, -1e-5, 1.0, float("nan"), "1e-5", True])
def test_norm_eps_is_checked(eps):
    with pytest.raises(UserError, match=r"GPTConfig.norm_eps must be a number in \(0, 1\)"):
        GPTConfig(norm_eps=eps)


def test_norm_eps_is_stored_as_a_python_float(tmp_path):
    """A numpy eps (a config built from arrays) is kept as float: the config is saved as JSON."""
    import numpy as np

    cfg = GPTConfig(vocab_size=VOCAB, context_length=8, n_embd=16, n_layer=1, n_head=1, norm_eps=np.float32(1e-6))
    assert type(cfg.norm_eps) is float
    GPTModel(cfg).save(tmp_path / "m.safetensors")
    assert GPTModel.load(tmp_path / "m.safetensors").config.norm_eps == cfg.norm_eps


def test_the_norms_add_norm_eps_on_both_paths():
    """A tiny eps against a large one on rows of small spread: the norm's output moves, on the
    reference path and the kernel alike (eps reaches both)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 1e-3
    for norm in ("layernorm", "rmsnorm"):
        outs = {}
        for eps in (1e-6, 1e-5):
            model = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=8, n_embd=16, n_layer=1, n_head=1, norm=norm,
                                       norm_eps=eps))
            for kernels in ("reference", "layernorm"):
                model.set_kernels(kernels)
                outs[eps, kernels] = model.final_norm(x)
        for kernels in ("reference", "layernorm"):
            assert (outs[1e-6, kernels] - outs[1e-5, kernels]).abs().max() > 0.1, (norm, kernels)
        for eps in (1e-6, 1e-5):
            assert_close_rel(outs[eps, "layernorm"], outs[eps, "reference"], 1e-5, f"{norm} eps {eps}")


def test_a_resume_reads_a_config_from_before_norm_eps_as_gpt2s():
    """A checkpoint saved before GPTConfig.norm_eps (and norm, mlp) resumes as GPT-2's LayerNorm
    with eps 1e-5; one without bias reads as biases: only a run whose flags build another model is
    refused, by name (once: KeyError 'norm' for --norm rmsnorm on such a run)."""
    from types import SimpleNamespace

    from tritongpt.train.loop import Trainer

    sizes = dict(vocab_size=VOCAB, context_length=8, n_embd=16, n_layer=1, n_head=1)
    old = {k: v for k, v in GPTConfig(**sizes).to_dict().items() if k not in ("norm_eps", "norm", "mlp", "mlp_hidden")}
    for cfg, refused in ((GPTConfig(**sizes), None), (GPTConfig(**sizes, norm_eps=1e-6), "adds eps 1e-05 in its norms"),
                         (GPTConfig(**sizes, bias=False), "model has biases in its linear layers"),
                         (GPTConfig(**sizes, norm="rmsnorm"), "normalizes with layernorm, this run's model with "
                                                               "rmsnorm: pass --norm layernorm")):
        trainer = SimpleNamespace(_cfg=cfg, name="pretrain")
        for saved in (old, {k: v for k, v in old.items() if k != "bias"}):
            if refused is None:
                Trainer._check_same_function(trainer, "ckpt", saved)
            else:
                with pytest.raises(UserError, match=refused):
                    Trainer._check_same_function(trainer, "ckpt", saved)


def test_pretrain_a_llama_export_it_and_resume_it(corpus, tmp_path, capsys):
    """A practitioner's path: pretrain --norm rmsnorm --mlp swiglu --position-encoding rope --n-kv-head
    --no-bias builds a Llama; export writes a folder transformers runs with our logits; --init of
    that folder (its config.json's eps, 1e-6 here) trains on; a resume whose flags would build another
    model (biases, or the default eps) is refused by name."""
    from tritongpt.cli import main
    llama = ("--norm", "rmsnorm", "--mlp", "swiglu", "--position-encoding", "rope", "--n-kv-head", "1", "--no-bias")

    def argv(out, *extra):
        return pretrain_argv(corpus, out, "--max-steps", "1", *extra)

    assert main(argv(tmp_path / "run", *llama)) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    c = model.config
    assert (c.norm, c.mlp, c.position_encoding, c.kv_heads, c.bias) == ("rmsnorm", "swiglu", "rope", 1, False)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    capsys.readouterr()
    # a resume builds the model from the flags: with biases it would be another model
    more = ("--max-steps", "2", "--resume")
    assert main(argv(tmp_path / "run", *llama[:-1], *more)) == 2
    assert "model has no biases, this run's model has biases in its linear layers: pass --no-bias" in \
        capsys.readouterr().err
    assert main(argv(tmp_path / "run", *llama, *more)) == 0
    # --init keeps the folder's own function: biases would change its shapes
    cfg_json = tmp_path / "hf" / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "rms_norm_eps": 1e-6}))
    capsys.readouterr()
    assert main(argv(tmp_path / "tuned", "--init", str(tmp_path / "hf"), "--bias")) == 2
    assert "--bias would change the shapes of --init's weights (its linear layers have none)" in capsys.readouterr().err
    assert main(argv(tmp_path / "tuned", "--init", str(tmp_path / "hf"))) == 0
    assert load_checkpoint(tmp_path / "tuned").config.norm_eps == 1e-6
    capsys.readouterr()
    assert main(argv(tmp_path / "tuned", *llama, *more)) == 2  # the flags' model adds GPT-2's 1e-5
    assert "model adds eps 1e-06 in its norms, this run's model 1e-05: pass the run's own --init" in \
        capsys.readouterr().err


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_scaled_rope_is_transformers(tmp_path, scaling):
    """Llama 3.1's and 3.2's RoPE (rope_type llama3) and linear scaling: the inverse frequencies
    are transformers' (heads of 16 at theta 5000 over an original context of 256: wavelengths
    6.3 to 10800, so some kept, one blended, the rest stretched); a folder with it loads with
    transformers' logits on both paths (the Triton kernel reads the same frequencies), and
    exports back with it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tritongpt.model.layers import rope_inv_freq
    from tritongpt.train.llama_weights import export_llama

    rope = {"rope_theta": 5000.0, **scaling}
    hf, path = _hf_model(tmp_path / "in", rope_parameters=rope)
    want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf.config, "cpu")
    ours = rope_inv_freq(16, 5000.0, "cpu", scaling)
    assert_close_rel(ours.double(), want.double(), 1e-6, "inverse frequencies")
    assert not torch.allclose(ours, rope_inv_freq(16, 5000.0, "cpu"))  # it did scale
    model = load_checkpoint(path).double().eval()
    assert model.config.rope_scaling == scaling
    logits_match_transformers(hf, model, VOCAB, T)
    export_llama(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    logits_match_transformers(back, load_checkpoint(tmp_path / "out").double().eval(), VOCAB, T)
    with pytest.raises(UserError, match="GPTConfig.rope_scaling stretches RoPE's frequencies; this model has "
                                        "position_encoding 'learned'"):
        GPTConfig(rope_scaling=scaling)
