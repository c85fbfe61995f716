"""BLOOM: ALiBi, a LayerNorm on the embeddings (embed_norm), q, k and v fused per head, the tanh GELU
(train/bloom_weights.py). Tiny random BloomForCausalLMs saved to tmp_path (float64, every tensor jittered so each
one counts): logits on both kernel paths, bf16, the KV-cache decode, greedy tokens, export round trips through
transformers, a pretrain --init step; what this model does not compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, T = 53, 23


def hf_bloom(folder, heads=4, width=64, layers=2, vocab=VOCAB, jitter=0.3, **config):
    """A tiny random BloomForCausalLM in float64 (heads of width / heads, every tensor jittered by jitter
    standard deviations), saved to folder, EOS and BOS 1. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=vocab, hidden_size=width, n_layer=layers, n_head=heads,
                                   layer_norm_epsilon=1e-6, bos_token_id=1, eos_token_id=1, **config)
    hf = transformers.BloomForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * jitter)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("heads,width", [(4, 64), (6, 96)], ids=["4-heads", "6-heads"])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, heads, width):
    """6 heads: ALiBi's slopes for a head count that is not a power of two (BLOOM's interleaved extra ones)."""
    hf, path = hf_bloom(tmp_path, heads, width)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.position_encoding, c.embed_norm, c.norm_bias, c.bias, c.has_qkv_bias, c.gelu_approximate,
            c.tie_weights, c.n_head, c.context_length) == ("alibi", True, True, True, True, "tanh", True, heads, 2048)
    logits_match_transformers(hf, model, VOCAB, T)


def test_bf16_logits_are_close(tmp_path):
    """Both in bf16 (BLOOM rounds its ALiBi bias to bf16 too; ours adds it in fp32): 1e-2 relative on both paths
    (measured 8.4e-3 reference, 5.6e-3 Triton; transformers' own bf16 is 6.0e-3 from its float64). Weights
    jittered by 0.1: at 0.3 the logits' bf16 error alone is 1.3e-2."""
    hf, path = hf_bloom(tmp_path, jitter=0.1)
    model = load_checkpoint(path).to(torch.bfloat16).eval()
    hf = hf.to(torch.bfloat16)
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        want = hf(idx).logits.double()
        for kernels in ("reference", "triton"):
            assert_close_rel(model.set_kernels(kernels)(idx).double(), want, 1e-2, f"bf16, {kernels}")


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    hf, path = hf_bloom(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_round_trips_through_transformers(tmp_path, tie):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits (q, k and v fused back per
    head), and load_checkpoint reads the export back to the same config."""
    from tritongpt.train.bloom_weights import export_bloom

    hf, path = hf_bloom(tmp_path / "in", tie_word_embeddings=tie, seq_length=96)  # a context not the 2048 default
    model = load_checkpoint(path).double().eval()
    assert (model.config.tie_weights, model.config.context_length) == (tie, 96)
    export_bloom(model, tmp_path / "out", eos_token_id=1)
    # transformers 5 unties a tied config whose file holds two different matrices (4.x ties them): the file says
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["tie_word_embeddings"], written["seq_length"]) == (tie, 96)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "BloomForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config.to_dict() == {**model.config.to_dict(), "kernels": again.config.kernels}


def test_hf_copy_gives_the_builds_own_file_and_builds_again_after_a_failure(hf_copy, tmp_path):
    """conftest's hf_copy: the copy's file is the one the build returned (a sharded model's index), and a build
    that raised is not kept (its half-saved folder copied to the next test as its model)."""
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "model-00001-of-00002.safetensors").write_text("weights")
        if len(calls) == 1:
            raise OSError("disk full")
        (folder / "model.safetensors.index.json").write_text("{}")
        return None, folder / "model.safetensors.index.json"

    with pytest.raises(OSError, match="disk full"):
        hf_copy(build, tmp_path / "a")
    for to in ("b", "c"):
        path = hf_copy(build, tmp_path / to)
        assert path == tmp_path / to / "model.safetensors.index.json" and path.read_text() == "{}"
    assert len(calls) == 2


@pytest.mark.parametrize("change,match", [
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm true"),
    ({"n_head": 5}, "n_head 5, which does not divide the weights' width 64"),
    # a count of another type: gpt2_weights.head_count's wording, as the other readers'
    ({"n_head": 4.0}, r"config\.json says n_head 4\.0; it must be a positive integer"),
    ({"n_layer": 3}, "n_layer 3, but the weights have 2"),
    ({"seq_length": 0}, "seq_length 0"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"layer_norm_epsilon": "1e-5"},
     r"config\.json: layer_norm_epsilon \(GPTConfig\.norm_eps\) must be a number in \(0, 1\), got '1e-5'"),
    # bool("false") is True: a flag spelled as a string is refused by name
    ({"apply_residual_connection_post_layernorm": "false"},
     "config.json has apply_residual_connection_post_layernorm 'false'; it must be true or false"),
], ids=["post-layernorm-residual", "heads", "heads-type", "layers", "context", "eps-type", "post-layernorm-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_bloom, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_config_json_aliases_are_read(tmp_path):
    """BloomConfig's attribute_map: num_attention_heads for n_head and n_embed for hidden_size, as transformers
    reads a config.json that spells them so (6 heads: a default of 8 would not divide 96)."""
    _, path = hf_bloom(tmp_path, 6, 96)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d["num_attention_heads"], d["n_embed"] = d.pop("n_head"), d.pop("hidden_size") + 1
    cfg_json.write_text(json.dumps(d))
    with pytest.raises(UserError, match="says hidden_size 97, but the weights have 96"):
        load_checkpoint(path)
    d["n_embed"] = 96
    cfg_json.write_text(json.dumps(d))
    assert load_checkpoint(path).config.n_head == 6
    d["num_attention_heads"] = 5  # a count that does not divide is named as the file spells it
    cfg_json.write_text(json.dumps(d))
    with pytest.raises(UserError, match="config.json says num_attention_heads 5, which does not divide the weights' "
                                        "width 96"):
        load_checkpoint(path)


def test_an_mlp_not_4_hidden_size_wide_is_refused_by_name(tmp_path):
    """BLOOM's MLP is 4 hidden_size wide (no config field says otherwise): a folder whose dense_h_to_4h has half
    as many rows is refused by the MLP's name, before any tensor is read into the model."""
    from safetensors.torch import load_file, save_file

    _, path = hf_bloom(tmp_path)
    sd = load_file(path)
    for name, t in sd.items():
        if ".dense_h_to_4h." in name:
            sd[name] = t[:t.shape[0] // 2].contiguous()
        elif name.endswith("dense_4h_to_h.weight"):
            sd[name] = t[:, :t.shape[1] // 2].contiguous()
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"dense_h_to_4h has 128 rows; BLOOM's MLP is 4 hidden_size wide \(256\)"):
        load_checkpoint(path)


def test_slow_but_exact_is_refused_and_plain_tensor_parallel_reads(tmp_path):
    """pretraining_tp 2 alone changes nothing in transformers' BLOOM (read as usual, the same logits); with
    slow_but_exact it sums the output projections in slices without their biases, another function: refused."""
    hf, path = hf_bloom(tmp_path, pretraining_tp=2)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "pretraining_tp 2")
    hf_bloom(tmp_path, pretraining_tp=2, slow_but_exact=True)
    with pytest.raises(UserError, match="slow_but_exact true with pretraining_tp 2"):
        load_checkpoint(path)
    # slow_but_exact alone (pretraining_tp absent: BloomConfig's 1) is the plain function: read
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    del d["pretraining_tp"]
    cfg_json.write_text(json.dumps(d))
    assert load_checkpoint(path).config.position_encoding == "alibi"


def test_pretrain_from_a_bloom_folder_then_export_picks_bloom(tmp_path, corpus):
    """One step of `pretrain --init <BLOOM folder>`, then `export`: the run's model goes out as a BLOOM, which
    transformers reads."""
    from tritongpt.cli import main

    hf_bloom(tmp_path / "in", vocab=300)
    run = tmp_path / "run"
    assert main(pretrain_argv(corpus, run, "--init", str(tmp_path / "in"), "--max-steps", "1")) == 0
    model = load_checkpoint(run).eval()
    assert (model.config.embed_norm, model.config.position_encoding) == (True, "alibi")
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "bloom"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, model(idx), 1e-5, "transformers on the export")


def small(**fields):
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    return GPTModel(GPTConfig(**{**dict(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, position_encoding="alibi",
                                        embed_norm=True), **fields}))


@pytest.mark.parametrize("fields,match", [
    (dict(embed_norm=False, position_encoding="rope"), r"rotates q and k by their positions .* cannot be exported as "
                                                       "a BLOOM"),
    (dict(bias=False), "has projections without biases, where BLOOM has them on all"),
    (dict(gelu_approximate="none"), "computes the exact GELU"),
    (dict(n_kv_head=2), "2 key/value heads for 4 query heads"),
    (dict(parallel_residual=True), "parallel blocks"),
    (dict(norm_bias=False), r"LayerNorms without biases \(norm_bias False\)"),
    (dict(head_bias=True), "LM-head bias"),
], ids=["rope", "no-bias", "exact-gelu", "gqa", "parallel", "norm-bias", "head-bias"])
def test_export_refuses_what_bloom_cannot_say(tmp_path, fields, match):
    from tritongpt.train.bloom_weights import export_bloom

    with pytest.raises(UserError, match=match):
        export_bloom(small(**fields), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields,family,match", [
    (dict(), "BLOOM", None),
    (dict(position_encoding="rope"), "GPT-NeoX", "normalizes its token embeddings .embed_norm"),
    (dict(position_encoding="learned"), "GPT-2", "normalizes its token embeddings .embed_norm"),
    (dict(embed_norm=False), "GPT-2", r"biases each head's attention scores by distance \(ALiBi"),
    (dict(position_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False), "Llama",
     "normalizes its token embeddings .embed_norm"),
    (dict(position_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_experts=4), "Mixtral",
     "normalizes its token embeddings .embed_norm"),
], ids=["bloom", "rope-is-neox", "learned-is-gpt2", "alibi-without-embed-norm", "llama", "mixtral"])
def test_export_target_routes_embed_norm_and_alibi(fields, family, match):
    """ALiBi with embed_norm goes to BLOOM; embed_norm elsewhere is refused by name by the family the rest picks,
    and an ALiBi model no family takes is refused naming ALiBi."""
    from tritongpt.commands import export_target

    model = small(**fields)
    got, refuse, _ = export_target(model.config)
    assert got == family
    if match is None:
        refuse(model, "x")
    else:
        with pytest.raises(UserError, match=match):
            refuse(model, "x")


def test_embed_norm_and_norm_bias_fields_are_threaded(corpus, tmp_path, capsys):
    """GPTConfig.embed_norm and norm_bias: checked by name, on both kernel paths (the embedding norm a LayerNorm
    kernel, a bias-free LayerNorm too), pretrain's --embed-norm/--no-norm-bias (and refused against an --init
    that differs), bench train's flags and its row, the resume check naming the flags, info."""
    from types import SimpleNamespace

    from parity import save_run
    from tritongpt.bench import cli as bcli
    from tritongpt.bench import report as breport
    from tritongpt.bench import train_step
    from tritongpt.cli import build_parser
    from tritongpt.cli import main as cli_main
    from tritongpt.model.config import GPTConfig
    from tritongpt.train.loop import Trainer, TrainArgs
    from tritongpt.train.pretrain import check_args, parse_args

    with pytest.raises(UserError, match="GPTConfig.embed_norm must be True or False"):
        GPTConfig(embed_norm="yes")
    with pytest.raises(UserError, match="GPTConfig.norm_bias False drops the LayerNorms' biases; this model's norm "
                                        "is 'rmsnorm'"):
        GPTConfig(norm="rmsnorm", norm_bias=False)
    model = small(norm_bias=False).eval()
    assert model.embed_norm.bias is None and model.final_norm.bias is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        idx = torch.randint(0, VOCAB, (2, T))
        want = model(idx)
        by_hand = model.set_kernels("reference").embed_norm(model.tok_emb(idx))
        assert torch.allclose(by_hand, torch.nn.functional.layer_norm(model.tok_emb(idx), (64,),
                                                                      model.embed_norm.weight, None, 1e-5), atol=1e-5)
        model.set_kernels("triton")
        assert model.embed_norm.use_triton and model.final_norm.use_triton
        assert_close_rel(model(idx), want, 1e-5, "triton path, embed_norm without norm biases")

    a = parse_args(["--tokenizer", str(corpus.tok), "--position-encoding", "alibi", "--embed-norm",
                    "--no-norm-bias"])
    cfg = check_args(a, TrainArgs.from_namespace(a))[0].config
    assert (cfg.embed_norm, cfg.norm_bias) == (True, False)
    hf_bloom(tmp_path / "in", vocab=300)
    assert cli_main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "in"), "--no-embed-norm")) == 2
    assert "--embed-norm False would change what --init's model computes" in capsys.readouterr().err

    args = build_parser().parse_args(["bench", "train", "--embed-norm", "--no-norm-bias"])
    assert (bcli.model_flags(args)["embed_norm"], bcli.model_flags(args)["norm_bias"]) == (True, False)
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, vocab_size=64, embed_norm=True, norm_bias=False)
    assert row["status"] == "ok" and (row["config"]["embed_norm"], row["config"]["norm_bias"]) == (True, False)
    assert "embedding norm" in breport.models_line([row]) and "no norm biases" in breport.models_line([row])

    saved = GPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, embed_norm=True, norm_bias=False)
    plain = GPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4)
    with pytest.raises(UserError, match="normalizes its token embeddings and has LayerNorms without biases, this "
                                        "run's model does not normalize.*--embed-norm --no-norm-bias"):
        Trainer._check_same_function(SimpleNamespace(_cfg=plain, name="pretrain"), "ckpt", saved.to_dict())

    run, _ = save_run(tmp_path, small(norm_bias=False))
    assert cli_main(["info", "--weights", str(run)]) == 0
    out = capsys.readouterr().out
    assert "embed_norm      True" in out and "norm_bias       False" in out
