"""GPT-Neo: Hugging Face's weights load into GPTModel with its logits on both kernel paths, export back
to a folder transformers reads, and the two GPT-Neo fields (scale_attention, qkv_bias) agree between
paths. Tiny random GPTNeoForCausalLM models (2 heads of 16: the Triton attention's smallest head dim),
saved to tmp_path: nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, report, save_run
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig, get_config
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, WINDOW, T = 50, 16, 4, 13  # T > WINDOW: the local layers mask something
ALTERNATING = [[["global", "local"], 1], [["global"], 1]]  # 3 layers: global, local, global


def _hf_model(folder, attention_types=ALTERNATING, n_layer=3, vocab=VOCAB, tie=True, save_config=True,
              window=WINDOW):
    torch.manual_seed(0)
    cfg = transformers.GPTNeoConfig(vocab_size=vocab, max_position_embeddings=CTX, hidden_size=32, num_layers=n_layer,
                                    num_heads=2, attention_types=attention_types, window_size=window,
                                    resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
                                    tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():  # random init has zero biases and unit LayerNorms: make every tensor count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    if not save_config:
        (folder / "config.json").unlink()
    return hf, folder / "model.safetensors"


def _random_neo(**overrides):
    """Our own model in GPT-Neo's shape (unscaled, no q/k/v bias), every tensor random."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=32, n_layer=3, n_head=2, attention_window=WINDOW,
               window_layers="odd", scale_attention=False, qkv_bias=False)
    model = GPTModel(GPTConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.tok_emb.weight[model.config.vocab_size:] = 0  # padding rows (vocab_multiple) stay zero
    return model


def test_the_local_mask_is_transformers_own():
    """GPT-Neo's local layers keep `bias ^ tril(bias, -window_size)` of the causal mask: query i sees
    i - window < j <= i. Ours masks outside_window on top of the causal mask; both read with the
    KV cache's bottom-right alignment (the last Tq rows of the Tk x Tk mask)."""
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    from tritongpt.model.layers import in_the_future, outside_window

    hf = GPTNeoSelfAttention(transformers.GPTNeoConfig(max_position_embeddings=CTX, hidden_size=32, num_heads=2,
                                                       window_size=WINDOW), "local")
    theirs = hf.bias[0, 0]  # True: attended
    for Tq, Tk in ((CTX, CTX), (1, 9), (3, 11)):
        ours = ~(in_the_future(Tq, Tk) | outside_window(Tq, Tk, WINDOW))
        assert torch.equal(ours, theirs[Tk - Tq:Tk, :Tk]), (Tq, Tk)
    assert int(theirs[-1].sum()) == WINDOW


@pytest.mark.parametrize("types", [ALTERNATING, [[["local"], 3]], [[["global"], 3]]],
                         ids=["alternating", "all-local", "all-global"])
def test_logits_match_transformers_on_both_paths(tmp_path, types):
    """Our loaded model gives GPTNeoForCausalLM's logits (fp32: its scores are fp32 whatever the
    weights' dtype) on the reference and the Triton path, over more positions than the window."""
    hf, path = _hf_model(tmp_path, types)
    model = load_checkpoint(path).eval()
    cfg = model.config
    local = "local" in types[0][0]
    assert (cfg.attention_window, cfg.window_layers) == ((WINDOW, "all" if types[0][0] == ["local"] else "odd")
                                                         if local else (0, "all"))
    assert not cfg.scale_attention and not cfg.qkv_bias and cfg.bias and cfg.tie_weights
    assert model.trf_blocks[0].att.W_query.bias is None and model.trf_blocks[0].att.out_proj.bias is not None
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ref = hf(idx).logits
        assert_close_rel(model(idx), ref, 1e-5, "reference path logits")
        assert_close_rel(model.set_kernels("triton")(idx), ref, 1e-5, "triton path logits")


def test_kv_cache_decode_and_greedy_tokens_match(tmp_path):
    """Token by token through the KV cache (past the window) gives the whole sequence's logits, on
    both paths; greedy decoding gives transformers' tokens. The Triton path decodes 4 single tokens (3 of
    them past the window) and the rest as one chunk over the cache: each launch costs the interpreter time."""
    from parity import decode_token_by_token
    from tritongpt.train.generate import generate

    hf, path = _hf_model(tmp_path)
    model = load_checkpoint(path).eval()
    idx = torch.randint(0, VOCAB, (1, T))
    for kernels, singles in (("reference", None), ("triton", WINDOW)):
        model.set_kernels(kernels)
        whole, steps, _ = decode_token_by_token(model, idx, prefill=3, singles=singles)
        assert_close_rel(steps, whole, 1e-5, f"{kernels} cached decode")
    model.set_kernels("reference")
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_no_scale_no_qkv_bias_paths_agree_in_logits_and_every_gradient():
    """scale_attention=False and qkv_bias=False on the Triton path (fp32) against the reference
    path in float64: logits, the input embeddings' gradient and every parameter's; and the fields
    change the function (the unscaled model is not the scaled one)."""
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=32, n_layer=3, n_head=2, attention_window=WINDOW,
                    window_layers="odd", scale_attention=False, qkv_bias=False)
    ref = _random_neo()
    assert ref.config == GPTConfig(**{**cfg.to_dict(), "kernels": ref.config.kernels})
    assert {n for n, _ in ref.named_parameters() if "att.W_" in n and n.endswith(".bias")} == set()
    tri = GPTModel(cfg)
    tri.load_state_dict(ref.state_dict())
    ref.double().set_kernels("reference")
    tri.set_kernels("triton")
    idx = torch.randint(0, VOCAB, (2, T))
    targets = torch.randint(0, VOCAB, (2, T))
    out = {}
    for name, m in (("ref", ref), ("tri", tri)):
        m.zero_grad()
        logits = m(idx)
        (logits.double().sin().sum() + m(idx, targets=targets)).backward()
        out[name] = logits, {n: p.grad for n, p in m.named_parameters()}
    assert_close_rel(out["tri"][0], out["ref"][0], 1e-5, "logits")
    for n, g in out["ref"][1].items():
        assert_close_rel(out["tri"][1][n], g, 1e-4, f"grad {n}")
    scaled = GPTModel(GPTConfig(**{**cfg.to_dict(), "scale_attention": True})).double()
    scaled.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert report(scaled(idx), ref(idx))[1] > 1e-3


def test_the_fields_are_bools_saved_with_the_weights_and_older_configs_read_as_gpt2(tmp_path):
    for field in ("scale_attention", "qkv_bias"):
        for bad in ("False", 0, None):
            with pytest.raises(UserError, match=f"GPTConfig.{field} must be True or False, got {bad!r}"):
                GPTConfig(**{field: bad})
    model = _random_neo()
    model.save(tmp_path / "m.safetensors")
    loaded = GPTModel.load(tmp_path / "m.safetensors").eval()
    assert not loaded.config.scale_attention and not loaded.config.qkv_bias
    idx = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    old = {k: v for k, v in GPTConfig().to_dict().items() if k not in ("scale_attention", "qkv_bias")}
    assert GPTConfig.from_dict(old).scale_attention and GPTConfig.from_dict(old).qkv_bias


def test_presets_have_the_published_parameter_counts():
    """gpt-neo-125m / 1.3B / 2.7B: GPTNeoForCausalLM's count (built on the meta device), tied head."""
    for name, (C, L, H) in {"gpt-neo-125m": (768, 12, 12), "gpt-neo-1.3B": (2048, 24, 16),
                            "gpt-neo-2.7B": (2560, 32, 20)}.items():
        cfg = get_config(name)
        assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.context_length, cfg.attention_window, cfg.window_layers,
                cfg.scale_attention, cfg.qkv_bias) == (C, L, H, 2048, 256, "odd", False, False)
        with torch.device("meta"):
            ours = GPTModel(cfg).num_params()
            theirs = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
                hidden_size=C, num_layers=L, num_heads=H, attention_types=[[["global", "local"], L // 2]])
            ).num_parameters()
        print(f"{name}: {ours:,}")
        assert ours == theirs


@pytest.mark.parametrize("edit, said", [
    ({"activation_function": "relu"}, "activation_function 'relu'; this model computes 'gelu_new' only"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
    ({"intermediate_size": 100}, "intermediate_size 100"),
    ({"window_size": 0}, "window_size 0"),
    ({"attention_types": [[["local", "global"], 1], [["local"], 1]]}, "attention_types makes layers"),
    ({"attention_types": [[["global"], 1], [["local"], 2]]}, "attention_types makes layers"),
    ({"attention_types": [[["global", "local"], 2]]}, "attention_types gives 4 layers, the weights have 3"),
    ({"attention_types": [[["global"], 2]]}, "attention_types gives 2 layers, the weights have 3"),
    ({"attention_types": [[["global", "sparse"], 1], [["global"], 1]]}, "attention_types names 'sparse'"),
    ({"attention_types": [["global", 3]]}, r"attention_types .* is not a list of \[\[kinds...\], times\]"),
    ({"hidden_size": 64}, "hidden_size 64, but the weights have 32"),
    ({"max_position_embeddings": 32}, "max_position_embeddings 32, but the weights have 16"),
    ({"num_layers": 4}, "num_layers 4, but the weights have 3"),
    ({"num_heads": None}, "config.json names no num_heads"),
    # GPTConfig's refusals, naming neither the file nor its key, before
    ({"num_heads": 4.0}, r"config.json says num_heads 4\.0; it must be a positive integer"),
    ({"num_heads": 3}, "config.json says num_heads 3, which does not divide the weights' width 32"),
])
def test_config_json_naming_what_this_model_does_not_compute_is_refused(hf_copy, tmp_path, edit, said):
    path = hf_copy(_hf_model, tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**good, **edit}))
    with pytest.raises(UserError, match=said):
        load_checkpoint(path)


def test_a_config_json_without_gpt_neo_config_defaults_reads_them_as_transformers_does(tmp_path):
    """A hand-written config.json may leave out what GPTNeoConfig defaults (gelu_new, eps 1e-5, window
    256; attention_types: 24 layers, global and local in turn) or say the MLP width outright:
    transformers' own model from the same folder is the reference."""
    _, path = _hf_model(tmp_path)
    defaulted = ("activation_function", "layer_norm_epsilon", "window_size", "intermediate_size")
    cfg = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items() if k not in defaulted}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 4 * 32}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_checkpoint(path).eval()
    assert (model.config.attention_window, model.config.window_layers) == (hf.config.window_size, "odd") == (256, "odd")
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 1e-5, "defaults' logits")
    del cfg["attention_types"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="attention_types gives 24 layers, the weights have 3"):
        load_checkpoint(path)


def test_without_config_json_a_file_of_a_published_shape_reads_as_that_model(tmp_path, monkeypatch, capsys):
    """No config.json: the heads are --model's, else those of the GPT-Neo size of the file's width
    and depth; the local layers GPT-Neo's (256 positions, the odd layers). A stand-in preset of
    the tiny model's shape plays the published size (a real one is 125M parameters)."""
    from tritongpt.model import config
    from tritongpt.train import gpt_neo_weights

    monkeypatch.setitem(config.PRESETS, "neo-tiny", dict(n_embd=32, n_layer=3, n_head=2))
    hf, path = _hf_model(tmp_path, window=256, save_config=False)
    idx = torch.randint(0, VOCAB, (2, T))
    for name in ("neo-tiny", None):
        if name is None:  # the published sizes by width and depth
            monkeypatch.setitem(gpt_neo_weights.HUB_REPOS, "neo-tiny", "example/neo-tiny")
        model = load_checkpoint(path, name).eval()
        c = model.config
        assert (c.n_head, c.attention_window, c.window_layers, c.scale_attention, c.qkv_bias) == \
            (2, 256, "odd", False, False), name
        assert "read as GPT-Neo with 2 heads and local attention over 256 positions in the odd layers" in \
            capsys.readouterr().err
        with torch.no_grad():
            assert_close_rel(model(idx), hf(idx).logits, 1e-5, f"no config.json, --model {name}")


def test_without_config_json_the_heads_come_from_model(tmp_path, capsys):
    """The tensors are recognised by their names; the heads and local layers are in no tensor. (A
    tensor of another rank is refused by name, not unpacked into a width.)"""
    from safetensors.torch import load_file, save_file

    _, path = _hf_model(tmp_path, save_config=False)
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    save_file({**load_file(path), "transformer.wpe.weight": torch.zeros(CTX)}, str(bad))
    with pytest.raises(UserError, match=r"tensor wpe.weight has shape \(16,\)"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match="cannot tell the heads and local layers"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="width 32 and 3 layers, but --model gpt-neo-125m has 768 and 12"):
        load_checkpoint(path, "gpt-neo-125m")


@pytest.mark.parametrize("overrides", [{}, {"window_layers": "all"}, {"attention_window": 0, "n_layer": 2},
                                       {"bias": False, "tie_weights": False, "vocab_multiple": 16},
                                       {"bias": False, "qkv_bias": True}],
                         ids=["odd", "all-local", "no-window", "no-bias-untied-padded", "no-bias-qkv-bias-default"])
def test_export_round_trip(tmp_path, overrides):
    """ours -> GPT-Neo folder -> GPTNeoForCausalLM's logits are ours; load_checkpoint reads it back."""
    from tritongpt.train.gpt_neo_weights import export_gpt_neo

    model = _random_neo(**overrides)
    paths = export_gpt_neo(model, tmp_path, eos_token_id=7)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPTNeoForCausalLM" and hf.config.eos_token_id == 7
    # said, not left to the tensors: told tied, transformers (5.24) keeps a file's own lm_head only with a warning
    assert hf.config.tie_word_embeddings == model.config.tie_weights
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ours = model(idx)
        assert_close_rel(hf(idx).logits, ours, 1e-5, "exported logits")
        back = load_checkpoint(paths[0]).eval()
        assert_close_rel(back(idx), ours, 1e-6, "loaded back")
    c = back.config
    assert (c.attention_window, c.window_layers if c.attention_window else "-", c.tie_weights) == \
        (model.config.attention_window, model.config.window_layers if model.config.attention_window else "-",
         model.config.tie_weights)
    with pytest.raises(UserError, match="already holds a model"):
        export_gpt_neo(model, tmp_path)
    (tmp_path / "config.json").unlink()  # either file is one to keep
    with pytest.raises(UserError, match="already holds a model"):
        export_gpt_neo(model, tmp_path)


def test_export_command_picks_the_family_and_refuses_what_neither_computes(tmp_path, capsys):
    """`tritongpt export`: an unscaled model without q/k/v biases becomes a GPT-Neo folder (with the
    run's tokenizer, which generate then finds: the same greedy text); a model with q/k/v biases off
    but scaled scores is GPT-2 with zero biases (the same function); scaled with local layers, or
    unscaled with q/k/v biases, is refused by name before anything is written."""
    from tritongpt import cli

    run, tok = save_run(tmp_path, _random_neo(vocab_size=280))
    out = tmp_path / "neo"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    assert "GPT-Neo with 3 layers" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt_neo"
    assert transformers.AutoTokenizer.from_pretrained(out)("a cat")["input_ids"] == tok.encode("a cat")
    texts = []
    for weights in (run / "model.safetensors", out / "model.safetensors"):
        assert cli.main(["generate", "--weights", str(weights), "--prompt", "a cat", "--temperature", "0",
                         "--max-new-tokens", "6", "--device", "cpu", "--kernels", "reference"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("a cat")

    no_qkv_bias, _ = save_run(tmp_path, _random_neo(vocab_size=280, scale_attention=True, attention_window=0), "gpt2")
    assert cli.main(["export", str(no_qkv_bias), "--out", str(tmp_path / "gpt2-out")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2-out").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, 280, (1, T))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, load_checkpoint(no_qkv_bias).eval()(idx), 1e-5, "GPT-2 with zero q/k/v bias")

    capsys.readouterr()
    for overrides, said in (({"scale_attention": True}, "local attention (attention_window 4, window_layers odd), "
                                                        "which Hugging Face's GPT-2 does not: it cannot be exported "
                                                        "as a GPT-2 folder (nor as GPT-Neo"),
                            ({"qkv_bias": True}, "query, key and value projections have biases (qkv_bias True), "
                                                 "which GPT-Neo's have not: it cannot be exported as a GPT-Neo folder"),
                            ({"logit_softcap": 5.0}, "logit_softcap 5), which Hugging Face's GPT-Neo does not"),
                            ({"position_encoding": "rope"}, "(position_encoding rope), where Hugging Face's GPT-Neo "
                                                            "learns position embeddings"),
                            ({"n_kv_head": 1}, "grouped-query attention (n_kv_head 1 key/value heads for 2 query heads), "
                                               "which Hugging Face's GPT-Neo does not")):
        bad, _ = save_run(tmp_path, _random_neo(vocab_size=280, **overrides), "bad")
        assert cli.main(["export", str(bad), "--out", str(tmp_path / "refused"), "--overwrite"]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


def test_export_adapter_of_a_gpt_neo_lora_run_is_refused_by_name_before_any_file_goes(tmp_path, capsys):
    """--adapter writes peft adapters for GPT-2 only: a GPT-Neo LoRA run's is refused for its unscaled
    scores, first (not for a missing --base), and an earlier export in --out is left as it was."""
    from tritongpt import cli
    from tritongpt.model.lora import add_lora

    run, _ = save_run(tmp_path, add_lora(_random_neo(vocab_size=280), 2))
    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(["export", str(run), "--adapter", "--out", str(out), "--overwrite"]) == 2
    assert "(scale_attention False), which Hugging Face's GPT-2 does: it cannot be exported as a peft adapter " \
           "for GPT-2" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_gpt2_export_and_adapters_refuse_unscaled_scores(tmp_path):
    from tritongpt.train.gpt2_weights import export_gpt2, export_peft_adapter

    model = _random_neo(attention_window=0)
    with pytest.raises(UserError, match=r"does not scale its attention scores by 1/sqrt\(head_dim\) \(scale_attention "
                                        r"False\), which Hugging Face's GPT-2 does: it cannot be exported as a GPT-2"):
        export_gpt2(model, tmp_path / "gpt2")
    with pytest.raises(UserError, match="scale_attention False.* cannot be exported as a peft adapter for GPT-2"):
        export_peft_adapter(model, tmp_path / "adapter", "gpt2")
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "adapter").exists()


def test_gpt_neo_export_refuses_what_gpt_neo_does_not_compute(tmp_path):
    """export_gpt_neo itself (not only `tritongpt export`'s choice of family) refuses scaled scores,
    q/k/v biases and a logit soft cap, before any file is written."""
    from tritongpt.train.gpt_neo_weights import export_gpt_neo

    for overrides, said in (({"scale_attention": True}, r"scales its attention scores by 1/sqrt\(head_dim\)"),
                            ({"qkv_bias": True}, r"projections have biases \(qkv_bias True\)"),
                            ({"logit_softcap": 5.0}, r"soft-caps its logits \(logit_softcap 5\)")):
        with pytest.raises(UserError, match=said + ".* cannot be exported as a GPT-Neo folder"):
            export_gpt_neo(_random_neo(**overrides), tmp_path / "neo")
        assert not (tmp_path / "neo").exists()


def test_hub_names_download_weights_config_and_tokenizer(tmp_path, monkeypatch, capsys):
    """gpt-neo-125m goes through hf_hub_download as gpt2-small does (here served from a folder the
    test writes, as the Hub cache would hold it); --init gets its tokenizer from those files,
    not GPT-2's by vocabulary size."""
    import huggingface_hub

    from tritongpt.train.sft import load_init_model, pick_tokenizer

    snapshot = tmp_path / "snapshot"
    hf, _ = _hf_model(snapshot, vocab=280)
    _, tok = save_run(tmp_path, _random_neo(vocab_size=280))
    for name, text in tok.hf_files(CTX).items():
        (snapshot / name).write_text(text, encoding="utf-8")
    asked = []

    def download(repo, filename, cache_dir=None):
        asked.append((repo, filename))
        if not (snapshot / filename).is_file():
            raise FileNotFoundError(filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename: str(snapshot / filename) if repo == "EleutherAI/gpt-neo-125m" else None)
    model = load_init_model("gpt-neo-125m").eval()
    assert {("EleutherAI/gpt-neo-125m", f) for f in ("model.safetensors", "config.json", "vocab.json")} <= set(asked)
    idx = torch.randint(0, 280, (1, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 1e-5, "downloaded model")
    assert pick_tokenizer(None, "gpt-neo-125m", 280).hash == tok.hash
    # generate --pretrained takes the name too, with the same tokenizer (the default one has more tokens than 280)
    from tritongpt import cli

    capsys.readouterr()
    assert cli.main(["generate", "--pretrained", "--model", "gpt-neo-125m", "--prompt", "a cat", "--temperature", "0",
                     "--max-new-tokens", "3", "--device", "cpu", "--kernels", "reference"]) == 0
    assert capsys.readouterr().out.startswith("a cat")


def test_the_benchmarks_sdpa_swap_keeps_unscaled_scores():
    """bench's reference+SDPA baseline (use_sdpa_attention) passes the model's scale to SDPA, whose
    default is 1/sqrt(head_dim): with and without the KV cache, the reference path's logits."""
    from tritongpt.bench.train_step import use_sdpa_attention

    model = _random_neo().double()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ref = model(idx)
        swapped = use_sdpa_attention(_random_neo().double())
        assert_close_rel(swapped(idx), ref, 1e-12, "sdpa swap")
        cache = swapped.new_cache(2)
        steps = torch.cat([swapped(idx[:, :5], cache), swapped(idx[:, 5:], cache)], 1)
        assert_close_rel(steps, ref, 1e-12, "sdpa swap, cached")
