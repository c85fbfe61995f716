"""Falcon: RoPE over LayerNorms, the exact GELU, multi-query or grouped attention with q, k and v fused in each
architecture's own layout, and three blocks (Falcon-7B's one shared norm, the new architecture's two parallel
norms, a sequential one) (train/falcon_weights.py). Tiny random FalconForCausalLMs saved to tmp_path
(float64, every tensor jittered so each one counts): logits on both kernel paths, the KV-cache decode, greedy
tokens, export round trips through transformers, a pretrain --init step; what this model does not compute
refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23
# config.json's block and attention: Falcon-7B's, Falcon-40B's (and 180B's), the new architecture with one
# norm, an old sequential one with a key/value head per query head, and 7B's with biases
KINDS = {"7b": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
         "40b": dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True),
         "new-one-norm": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
         "sequential": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False),
         "7b-bias": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=True),
         # Falcon-RW-1B's: ALiBi, sequential blocks, a key/value head per query head, biases
         "rw": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True, alibi=True)}


def hf_falcon(folder, kind="7b", layers=2, vocab=VOCAB, context=CTX, **config):
    """A tiny random FalconForCausalLM in float64 (4 heads of 16 over 64, RoPE base 500), saved to folder, EOS
    and BOS 1. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                    max_position_embeddings=context, layer_norm_epsilon=1e-6, bos_token_id=1,
                                    eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                    **{**KINDS[kind], **config})
    hf = transformers.FalconForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("kind,want", [("7b", (True, True, 1, False)), ("40b", (True, False, 2, False)),
                                       ("new-one-norm", (True, True, 2, False)),
                                       ("sequential", (False, False, 4, False)),
                                       ("7b-bias", (True, True, 1, True)), ("rw", (False, False, 4, True))],
                         ids=list(KINDS))
def test_loads_its_blocks_and_matches_transformers_on_both_paths(tmp_path, kind, want):
    hf, path = hf_falcon(tmp_path, kind)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.parallel_residual, c.shared_norm, c.kv_heads, c.bias) == want
    assert (c.has_qkv_bias, c.gelu_approximate, c.rotary_dim, c.tie_weights, c.head_bias) == \
        (want[3], "none", 0, True, False)
    rope = ("alibi", True, 10000.0) if kind == "rw" else ("rope", False, 500.0)  # RW's: ALiBi, RoPE's base unread
    assert (c.position_encoding, c.alibi_scaled, c.rope_theta) == rope
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    hf, path = hf_falcon(tmp_path, "40b")
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_round_trips_through_transformers(tmp_path, kind):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits (q, k and v fused in the
    layout the written architecture reads), and load_checkpoint reads the export back to the same config."""
    from tritongpt.train.falcon_weights import export_falcon

    hf, path = hf_falcon(tmp_path / "in", kind)
    model = load_checkpoint(path).double().eval()
    export_falcon(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())  # the architecture the folder came in
    assert (d["model_type"], d["new_decoder_architecture"]) == ("falcon", KINDS[kind]["new_decoder_architecture"])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "FalconForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config.to_dict() == {**model.config.to_dict(), "kernels": again.config.kernels}


@pytest.mark.parametrize("change,match", [
    ({"activation": "relu"}, "activation 'relu'; this model's Falcon MLP computes 'gelu'"),
    ({"ffn_hidden_size": 100}, r"an MLP 256 wide \(ffn_hidden_size 100\)"),
    ({"num_attention_heads": 8}, "query_key_value has 96 rows; 8 query heads over 1 key/value heads of 8 need 80"),
    ({"num_attention_heads": 4.0},  # (gpt2_weights.head_count)
     r"config\.json says num_attention_heads 4\.0; it must be a positive integer"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
     "rope_parameters of type 'linear'"),
    ({"model_type": "RefinedWebModel"}, "the remote-code Falcon format"),
    ({"new_decoder_architecture": True, "num_kv_heads": 3}, "num_kv_heads 3, which does not divide "
                                                            "num_attention_heads 4"),
    ({"partial_rotary_factor": 0.5}, "has a partial rotary factor; Falcon rotates whole heads"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"max_position_embeddings": 40.0},
     r"config\.json: max_position_embeddings \(GPTConfig\.context_length\) must be a positive integer, got 40\.0"),
    ({"layer_norm_epsilon": 0},
     r"config\.json: layer_norm_epsilon \(GPTConfig\.norm_eps\) must be a number in \(0, 1\), got 0"),
    # read by truthiness, "false" was true: ALiBi over RoPE-trained weights (loaded without a word), biases the file
    # does not have, the new architecture's q/k/v layout
    *[({key: "false"}, f"config.json has {key} 'false'; it must be true or false")
      for key in ("alibi", "bias", "new_decoder_architecture", "multi_query", "parallel_attn")],
], ids=["activation", "mlp-width", "heads", "heads-type", "scaled-rope", "remote-code", "kv-heads", "partial-rotary",
        "context-float", "eps-zero", "alibi-type", "bias-type", "new-arch-type", "multi-query-type",
        "parallel-attn-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_falcon, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_a_null_block_flag_is_false_as_transformers_reads_it(hf_copy, tmp_path):
    """FalconConfig keeps a null parallel_attn or multi_query as None, which its model tests as false: the
    sequential block with a key/value head per query head, not FalconConfig's defaults (true), whose shared norm
    and single key/value head this file does not have."""
    path = hf_copy(hf_falcon, tmp_path, "sequential")
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "parallel_attn": None, "multi_query": None}))
    c = load_checkpoint(path).config
    assert (c.parallel_residual, c.shared_norm, c.kv_heads) == (False, False, 4)


def test_a_config_without_the_block_fields_is_falcon_7bs(tmp_path):
    """FalconConfig's defaults, as transformers reads a config.json that omits them: parallel_attn and multi_query
    true, the old architecture, so one shared norm and one key/value head (Falcon-7B's block); the new
    architecture without num_ln_in_parallel_attn has two norms (transformers' FalconDecoderLayer)."""
    _, path = hf_falcon(tmp_path, "7b")
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    for key in ("parallel_attn", "multi_query", "new_decoder_architecture", "num_kv_heads"):
        d.pop(key, None)
    cfg_json.write_text(json.dumps(d))
    c = load_checkpoint(path).config
    assert (c.parallel_residual, c.shared_norm, c.kv_heads) == (True, True, 1)
    # Falcon-40B's own config.json has no num_ln_in_parallel_attn: the new architecture's two norms
    _, path = hf_falcon(tmp_path, "40b")
    d = json.loads(cfg_json.read_text())
    del d["num_ln_in_parallel_attn"]
    cfg_json.write_text(json.dumps(d))
    c = load_checkpoint(path).config
    assert (c.parallel_residual, c.shared_norm, c.kv_heads) == (True, False, 2)
    _, path = hf_falcon(tmp_path, "40b", num_kv_heads=4)  # without num_kv_heads: a key/value head per query head
    d = json.loads(cfg_json.read_text())
    del d["num_kv_heads"]
    cfg_json.write_text(json.dumps(d))
    assert load_checkpoint(path).config.kv_heads == 4
    del d["num_attention_heads"]  # FalconConfig's 71 (Falcon-7B's), which 64 wide weights do not divide into
    cfg_json.write_text(json.dumps(d))
    with pytest.raises(UserError, match="num_attention_heads 71, which does not divide the weights' width 64"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["rw", "7b"])
def test_falcon_rw_alibi_is_scaled_with_the_scores(tmp_path, kind):
    """Falcon-RW (alibi true): ALiBi with its slopes divided by sqrt(head_dim) (alibi_scaled), transformers'
    logits on both paths (4 heads: slopes powers of two, which transformers' bf16 bias keeps exact), the
    KV-cache decode, greedy tokens (the export round trip: test_export_round_trips_through_transformers[rw]).
    Also on Falcon-7B's multi-query parallel block with alibi true."""
    from tritongpt.train.generate import generate

    hf, path = hf_falcon(tmp_path / "in", kind, alibi=True)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.position_encoding, c.alibi_scaled, c.kv_heads) == ("alibi", True, 4 if kind == "rw" else 1)
    assert torch.allclose(model.trf_blocks[0].att.alibi_slopes(), torch.tensor([2.0 ** -2, 2 ** -4, 2 ** -6,
                                                                                2 ** -8]) / 4)
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    theirs = hf.generate(idx[:, :3], max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(model, idx[:, :3], 8), theirs)


def test_alibi_scaled_is_refused_where_it_means_nothing_and_by_bloom_and_mpt(tmp_path):
    """alibi_scaled needs ALiBi; BLOOM's and MPT's exports name it; export_target sends it to Falcon even
    without biases (MPT's shape otherwise)."""
    from tritongpt.commands import export_target
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.bloom_weights import refuse_not_bloom
    from tritongpt.train.mpt_weights import refuse_not_mpt

    with pytest.raises(UserError, match="GPTConfig.alibi_scaled scales ALiBi's slopes; this model has "
                                        "position_encoding 'rope'"):
        GPTConfig(position_encoding="rope", alibi_scaled=True)
    base = dict(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, position_encoding="alibi", alibi_scaled=True)
    with pytest.raises(UserError, match="GPTConfig.alibi_scaled must be True or False, got 'yes'"):
        GPTConfig(**{**base, "alibi_scaled": "yes"})
    with pytest.raises(UserError, match=r"adds ALiBi's bias before the scores' 1/sqrt\(head_dim\) scale "
                                        r"\(alibi_scaled, Falcon-RW's\), where BLOOM adds it after"):
        refuse_not_bloom(GPTModel(GPTConfig(**base, embed_norm=True)), "a BLOOM folder")
    mpt = GPTConfig(**base, bias=False, norm_bias=False, gelu_approximate="none")
    with pytest.raises(UserError, match="where MPT adds it after"):
        refuse_not_mpt(GPTModel(mpt), "an MPT folder")
    assert export_target(mpt)[0] == "Falcon"
    family, refuse, _ = export_target(GPTConfig(**{**base, "alibi_scaled": False}))
    with pytest.raises(UserError, match=r"ALiBi, position_encoding alibi\)"):
        refuse(GPTModel(GPTConfig(**{**base, "alibi_scaled": False})), "x")


def test_pretrain_from_a_falcon_folder_then_export_picks_falcon(tmp_path, corpus):
    """One step of `pretrain --init <Falcon-7B-shaped folder>`, then `export`: the run's model goes out as a
    Falcon (its shared norm and single key/value head are no GPT-NeoX), which transformers reads."""
    from tritongpt.cli import main

    hf_falcon(tmp_path / "in", vocab=300, context=64)
    run = tmp_path / "run"
    assert main(pretrain_argv(corpus, run, "--init", str(tmp_path / "in"), "--max-steps", "1")) == 0
    model = load_checkpoint(run).eval()
    assert (model.config.shared_norm, model.config.kv_heads) == (True, 1)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "falcon"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, model(idx), 1e-5, "transformers on the export")


@pytest.mark.parametrize("fields,family", [
    (dict(shared_norm=True, n_kv_head=1, bias=False), "Falcon"),
    (dict(bias=False), "Falcon"),
    (dict(n_kv_head=2), "Falcon"),
    ({}, "GPT-NeoX"),
    (dict(shared_norm=True, gelu_approximate="tanh"), "Phi"),
    (dict(shared_norm=True, head_bias=True), "Phi"),
    (dict(shared_norm=True, head_bias=True, qkv_bias=False), "GPT-J"),
], ids=["falcon-7b", "no-bias", "gqa", "neox", "tanh-is-phi", "phi", "gptj"])
def test_export_picks_the_family_that_says_the_model(fields, family):
    """RoPE over LayerNorms and a GELU MLP in parallel blocks: Falcon's touches (one norm, grouped heads, no
    biases) with its exact GELU go to Falcon; GPT-NeoX's two norms with biases to GPT-NeoX; an LM-head bias or
    the tanh GELU to Phi (or GPT-J, without q/k/v biases)."""
    from tritongpt.commands import export_target
    from tritongpt.model.config import GPTConfig

    cfg = GPTConfig(**{**dict(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, position_encoding="rope",
                              parallel_residual=True, gelu_approximate="none"), **fields})
    assert export_target(cfg)[0] == family


def test_alibi_scaled_is_threaded(corpus):
    """pretrain --position-encoding alibi --alibi-scaled builds Falcon-RW's attention; bench train takes the flag
    and its row says it; the resume check names the flag."""
    from types import SimpleNamespace

    from tritongpt.bench import cli as bcli
    from tritongpt.bench import report as breport
    from tritongpt.bench import train_step
    from tritongpt.cli import build_parser
    from tritongpt.model.config import GPTConfig
    from tritongpt.train.loop import Trainer, TrainArgs
    from tritongpt.train.pretrain import check_args, parse_args

    a = parse_args(["--tokenizer", str(corpus.tok), "--position-encoding", "alibi", "--alibi-scaled"])
    model = check_args(a, TrainArgs.from_namespace(a))[0]
    att = model.trf_blocks[0].att
    assert model.config.alibi_scaled and torch.allclose(att.alibi_slopes() * att.head_dim ** 0.5,
                                                        torch.tensor([2.0 ** (-8 * (h + 1) / 4) for h in range(4)]))
    args = build_parser().parse_args(["bench", "train", "--position-encoding", "alibi", "--alibi-scaled"])
    assert bcli.model_flags(args)["alibi_scaled"] is True
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, vocab_size=64, position_encoding="alibi",
                                          alibi_scaled=True)
    assert row["status"] == "ok" and row["config"]["alibi_scaled"] is True
    assert "ALiBi scaled with the scores" in breport.models_line([row])
    saved = GPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, position_encoding="alibi", alibi_scaled=True)
    plain = GPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, position_encoding="alibi")
    with pytest.raises(UserError, match="adds ALiBi's bias before the scores' scale, this run's model adds ALiBi's "
                                        "bias after.*--alibi-scaled"):
        Trainer._check_same_function(SimpleNamespace(_cfg=plain, name="pretrain"), "ckpt", saved.to_dict())
