"""Cohere (Command R, Aya) and Cohere2 (Command R7B): parallel blocks on one bias-free LayerNorm, scaled logits
(GPTConfig.logit_scale), RoPE in Cohere's interleaved pairs (q and k rows reordered per head), Cohere2's sliding
layers with RoPE and its global layers without, Command R+'s per-head q/k norms (use_qk_norm: qk_norm_width "each",
reordered along head_dim as q's and k's rows) (train/cohere_weights.py). Tiny random CohereForCausalLM and
Cohere2ForCausalLM models saved to tmp_path (float64, every tensor jittered so each one counts): logits on both
kernel paths, the KV-cache decode, greedy tokens, export round trips through transformers; what this model does
not compute refused by name; the logit scale on both loss paths. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers, rope_reads
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def hf_cohere(folder, kind="cohere", layers=2, tie=True, vocab=VOCAB, **config):
    """A tiny random CohereForCausalLM (kind "cohere2": Cohere2ForCausalLM, 4 layers, the fourth global) in float64:
    4 heads of 16 over 64 on 2 KV heads, RoPE base 500, logits scaled by 0.125, saved to folder, EOS and BOS 1.
    -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cls = transformers.CohereConfig if kind == "cohere" else transformers.Cohere2Config
    if kind == "cohere2":
        config = dict(dict(sliding_window=5), **config)
        layers = 4
    cfg = cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=CTX, layer_norm_eps=1e-6, logit_scale=0.125,
              tie_word_embeddings=tie, bos_token_id=1, eos_token_id=1, pad_token_id=0,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **config)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # unit norm weights would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("kind,tie", [("cohere", True), ("cohere2", False)])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, kind, tie):
    hf, path = hf_cohere(tmp_path, kind, tie=tie)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.norm_bias, c.mlp, c.parallel_residual, c.shared_norm, c.bias, c.kv_heads, c.tie_weights) == \
        ("layernorm", False, "swiglu", True, True, False, 2, tie)
    assert (c.logit_scale, c.rope_theta, c.norm_eps) == (0.125, 500.0, 1e-6)
    window = (5, "0,1,2", "3") if kind == "cohere2" else (0, "all", "")
    assert (c.attention_window, c.window_layers, c.nope_layers) == window
    logits_match_transformers(hf, model, VOCAB, T)


def test_cohere2_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    hf, path = hf_cohere(tmp_path, "cohere2")
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
def test_export_round_trips_through_transformers(tmp_path, kind):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits, its model_type the
    family's (q and k rows back in Cohere's pair order), and load_checkpoint reads the export back."""
    from tritongpt.commands import export_target
    from tritongpt.train.cohere_weights import export_cohere

    hf, path = hf_cohere(tmp_path / "in", kind, tie=kind == "cohere")
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == {"cohere": "Cohere", "cohere2": "Cohere2"}[kind]
    export_cohere(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["logit_scale"]) == (kind, 0.125)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


@pytest.mark.parametrize("kind,change,match", [
    ("cohere", {"use_qk_norm": True}, "use_qk_norm true, but the weights lack q_norm's"),
    ("cohere", {"use_qk_norm": False}, "use_qk_norm false, but the weights have q_norm's"),
    ("cohere", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("cohere", {"attention_bias": True}, "attention_bias true"),
    ("cohere", {"logit_scale": 0.0}, "logit_scale 0.0; it must be a number > 0"),
    ("cohere", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}}, "type 'dynamic'"),
    # CohereConfig's default base is 10000 in transformers 4.x, 500000 in 5: read as 10000 here, one of two models
    ("cohere", {"rope_parameters": {"rope_type": "default"}},
     r"config\.json says no RoPE base \(rope_theta\): CohereConfig reads 10000 in transformers 4\.x and 500000 in 5"),
    ("cohere2", {"layer_types": ["full_attention"] * 4}, "no sliding_attention layer"),
    ("cohere2", {"layer_types": ["sliding_attention"] * 3}, "for each of the 4 layers"),
    ("cohere2", {"layer_types": ["sliding_attention"] * 3 + ["chunked_attention"]}, "'full_attention' for each"),
    ("cohere2", {"sliding_window": 0}, "sliding_window 0; it must be a positive integer"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ("cohere", {"max_position_embeddings": 40.0},
     r"config\.json: max_position_embeddings \(GPTConfig\.context_length\) must be a positive integer, got 40\.0"),
    # bool("false") is True: a flag spelled as a string is refused by name
    ("cohere", {"attention_bias": "false"}, "config.json has attention_bias 'false'; it must be true or false"),
], ids=["qk-norm", "qk-norm-weights", "activation", "attention-bias", "logit-scale", "dynamic-rope", "no-theta",
        "no-sliding",
        "layer-types", "layer-type-name", "window", "context-float", "attention-bias-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, kind, change, match):
    path = hf_copy(hf_cohere, tmp_path, kind, **({"use_qk_norm": True} if change.get("use_qk_norm") is False else {}))
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_the_rope_object_is_read_once(hf_copy, tmp_path, monkeypatch):
    """read_rope_parameters once a config: the Cohere reader's check for a RoPE base and _rope_theta read the same
    (object, key) pair; the check read it again."""
    from tritongpt.train import cohere_weights

    path = hf_copy(hf_cohere, tmp_path, "cohere")
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())  # (the base in rope_parameters)
    assert rope_reads(monkeypatch, path, cohere_weights) == 1


def test_heads_narrower_than_the_width_are_refused(tmp_path):
    """Cohere's heads are hidden_size / num_attention_heads wide (transformers' CohereAttention): a folder whose
    q/k/v/o weights have heads of 8 over a width of 64 with 4 heads is refused by name, not loaded as another
    model."""
    from safetensors.torch import load_file, save_file

    _, path = hf_cohere(tmp_path)
    sd = load_file(path)
    for name, t in sd.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            sd[name] = t[:t.shape[0] // 2].contiguous()
        elif name.endswith("o_proj.weight"):
            sd[name] = t[:, :t.shape[1] // 2].contiguous()
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="heads of 8 over a width of 64; Cohere's heads are hidden_size / "):
        load_checkpoint(path)


@pytest.mark.parametrize("extra", ["model.layers.0.post_attention_layernorm.weight",
                                   "model.layers.0.input_layernorm.bias"])
def test_a_norm_a_cohere_block_does_not_have_is_refused(tmp_path, extra):
    """A Cohere block has one bias-free LayerNorm before its parallel attention and MLP: a folder whose tensors
    add a post-attention norm or a norm bias is another model, refused by name rather than loaded without it."""
    from safetensors.torch import load_file, save_file

    _, path = hf_cohere(tmp_path)
    sd = load_file(path)
    sd[extra] = torch.randn(sd["model.layers.0.input_layernorm.weight"].shape, dtype=torch.float64)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="a post_attention_layernorm or a norm bias, which a Cohere block"):
        load_checkpoint(path)


def test_cohere2_without_layer_types_reads_its_pattern(tmp_path):
    """A Cohere2 config.json without layer_types: every sliding_window_pattern-th layer full (Cohere2Config's
    default 4: the fourth of 4), the rest sliding, as transformers reads it; use_qk_norm, not Cohere2's, unread;
    without logit_scale and max_position_embeddings, the config class's 0.0625 and 8192."""
    _, path = hf_cohere(tmp_path, "cohere2")
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items()
         if k not in ("layer_types", "sliding_window_pattern", "_sliding_window_pattern")}
    for pattern, want in ((None, ("0,1,2", "3")), (2, ("0,2", "1,3"))):
        cfg_json.write_text(json.dumps(d if pattern is None else {**d, "sliding_window_pattern": pattern}))
        c = load_checkpoint(path).config
        assert (c.window_layers, c.nope_layers, c.context_length) == (*want, CTX), pattern
    cfg_json.write_text(json.dumps({k: v for k, v in d.items() if k not in ("logit_scale", "max_position_embeddings")}))
    c = load_checkpoint(path).config  # the config class's defaults: Command R's
    assert (c.logit_scale, c.context_length) == (0.0625, 8192)
    # Cohere2Config has no use_qk_norm (Command R+'s): a stray one is not read, the folder has no q/k norms
    cfg_json.write_text(json.dumps({**d, "use_qk_norm": True}))
    assert not load_checkpoint(path).config.qk_norm


def test_command_r_plus_qk_norms_load_reordered_match_transformers_and_export_back(tmp_path):
    """Command R+'s use_qk_norm: q_norm [4, 16] and k_norm [2, 16] (over the KV heads), each head's weight
    reordered along head_dim as its q and k rows are (even dimensions first): logits on both paths and the decode
    over the KV cache are transformers'; the export puts the order back, transformers reads it with the same
    logits, and load_checkpoint reads it back to the same config."""
    from tritongpt.commands import export_target
    from tritongpt.train.cohere_weights import export_cohere

    hf, path = hf_cohere(tmp_path / "in", use_qk_norm=True)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.qk_norm, c.qk_norm_width, c.norm_bias) == (True, "each", False)
    att, theirs = model.trf_blocks[1].att, hf.model.layers[1].self_attn
    assert (att.q_norm.weight.shape, att.k_norm.weight.shape) == ((4, 16), (2, 16))
    assert torch.allclose(att.q_norm.weight[2, :8], theirs.q_norm.weight[2, 0::2], atol=1e-6)  # even dims first
    assert torch.allclose(att.k_norm.weight[1, 8:], theirs.k_norm.weight[1, 1::2], atol=1e-6)
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    assert export_target(model.config)[0] == "Cohere"
    export_cohere(model, tmp_path / "out", eos_token_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_qk_norm"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "q/k norms exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


def _cohere_like(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4, n_kv_head=2,
               position_encoding="rope", norm="layernorm", norm_bias=False, mlp="swiglu", bias=False,
               parallel_residual=True, shared_norm=True, logit_scale=0.25, rope_theta=500.0)
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


def test_logit_scale_on_both_loss_paths_and_its_checks():
    """logits * logit_scale: the model's logits are an unscaled twin's times the scale, and the loss and every
    gradient are the float64 reference's on the Triton path (the fused head + loss reads the scaled hidden
    state); a scale that is not a finite number > 0, or one with a head bias, is refused by name."""
    torch.manual_seed(3)
    ref = _cohere_like().double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    plain = _cohere_like(logit_scale=1.0).double()
    plain.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, VOCAB, (2, 19)), torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        assert_close_rel(ref(idx), plain(idx) * 0.25, 1e-12, "scaled logits")
    want = ref(idx, targets=targets)
    want.backward()
    model = _cohere_like().float()
    model.load_state_dict(ref.state_dict())
    model.set_kernels("triton")
    loss = model(idx, targets=targets)
    loss.backward()
    assert_close_rel(loss.double().reshape(1), want.reshape(1), 1e-5, "loss")
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rel(p.grad.double(), grads[name].grad, 1e-4, name)
    with torch.no_grad():  # per-token losses: the kernel on the (scaled) logits, not the fused head
        assert_close_rel(model(idx, targets=targets, reduction="none").double(),
                         ref(idx, targets=targets, reduction="none"), 1e-5, "per-token losses")
    for bad, match in ((0.0, "logit_scale must be a finite number > 0"), (float("nan"), "finite number > 0"),
                       (True, "finite number > 0")):
        with pytest.raises(UserError, match=match):
            GPTConfig(logit_scale=bad)
    with pytest.raises(UserError, match="logit_scale.*head_bias"):
        GPTConfig(logit_scale=0.5, head_bias=True)


def test_a_model_built_here_exports_as_cohere_and_other_exports_refuse_its_fields(tmp_path):
    """A GPTModel made with Cohere's fields (not loaded) is written as Cohere, whose logits transformers
    reproduces; the Llama, StableLM and GPT-2 exports name the logit scale they cannot say, the Cohere one what
    Cohere does not compute."""
    from tritongpt.commands import export_target
    from tritongpt.train.cohere_weights import export_cohere
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.stablelm_weights import export_stablelm

    torch.manual_seed(1)
    model = _cohere_like().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert export_target(model.config)[0] == "Cohere"
    export_cohere(model, tmp_path / "c")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "built here, read by transformers")
    for export, kw in ((export_llama, dict(norm="rmsnorm", norm_bias=True, parallel_residual=False,
                                           shared_norm=False)),
                       (export_stablelm, dict(norm_bias=True, parallel_residual=False, shared_norm=False)),
                       (export_gpt2, dict(position_encoding="learned", mlp="gelu", norm_bias=True,
                                          parallel_residual=False, shared_norm=False))):
        with pytest.raises(UserError, match=r"scales its logits \(logit_scale 0.25.*a Cohere or Granite folder may "
                                            "take it"):
            export(_cohere_like(**kw), tmp_path / "no")
    for change, match in (({"norm_bias": True}, "LayerNorms without biases"),
                          ({"parallel_residual": False, "shared_norm": False}, "beside each other on one norm"),
                          ({"qk_norm": True}, r"normalizes q and k with one weight for every head \(qk_norm_width "
                                              r"'head'\), where Cohere's q/k norms"),
                          ({"qk_norm": True, "qk_norm_width": "each", "attention_window": 5, "nope_layers": "1",
                            "window_layers": "0"}, r"that head's own \(qk_norm_width 'each'\), which Hugging Face's "
                                                   "Cohere2 does not"),
                          ({"nope_layers": "1"}, r"layers without RoPE \(1\) and no local attention"),
                          ({"attention_window": 5, "window_layers": "0"}, "rotates q and k in layers other than its "
                                                                           "local ones"),
                          ({"logit_softcap": 5.0}, "soft-caps its logits")):
        with pytest.raises(UserError, match=match):
            export_target(_cohere_like(**change).config)[1](_cohere_like(**change), "a Cohere folder")


def test_logit_scale_is_threaded(corpus, tmp_path, capsys):
    """pretrain --logit-scale builds scaled logits (and is refused against an --init that differs, and outside
    (0, inf)); bench train takes the flag and its row says it; the resume check names the flag."""
    from types import SimpleNamespace

    from parity import pretrain_argv
    from tritongpt.bench import cli as bcli
    from tritongpt.bench import report as breport
    from tritongpt.bench import train_step
    from tritongpt.cli import build_parser
    from tritongpt.cli import main as cli_main
    from tritongpt.train.loop import Trainer, TrainArgs
    from tritongpt.train.pretrain import check_args, parse_args

    a = parse_args(["--tokenizer", str(corpus.tok), "--logit-scale", "0.5"])
    assert check_args(a, TrainArgs.from_namespace(a))[0].config.logit_scale == 0.5
    a = parse_args(["--tokenizer", str(corpus.tok), "--logit-scale", "-1"])
    with pytest.raises(UserError, match="--logit-scale must be a finite number > 0"):
        check_args(a, TrainArgs.from_namespace(a))
    hf_cohere(tmp_path / "in", vocab=300)
    assert cli_main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "in"), "--logit-scale", "1")) == 2
    assert "--logit-scale 1 would change what --init's model computes (its logit_scale is 0.125)" in \
        capsys.readouterr().err
    args = build_parser().parse_args(["bench", "train", "--logit-scale", "0.0625"])
    assert bcli.model_flags(args)["logit_scale"] == 0.0625
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, vocab_size=64, logit_scale=0.0625)
    assert row["status"] == "ok" and row["config"]["logit_scale"] == 0.0625
    assert "logit_scale=0.0625" in breport.models_line([row])
    saved = GPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, logit_scale=0.0625)
    plain = GPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4)
    with pytest.raises(UserError, match=r"scales its logits by 0.0625, this run's by 1 \(1: unscaled\).*"
                                        "--logit-scale 0.0625"):
        Trainer._check_same_function(SimpleNamespace(_cfg=plain, name="pretrain"), "ckpt", saved.to_dict())
