"""Hugging Face GPT-2 weights load into GPTModel and give the same logits and greedy tokens."""
import json
import re

import pytest
import torch

from parity import report
from tritongpt.errors import UserError
from tritongpt.train.generate import generate
from tritongpt.train.gpt2_weights import load_gpt2_pretrained, load_gpt2_safetensors

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, n_embd=48, n_layer=3, n_head=4, vocab=101, ctx=40, save_config=True):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  activation_function="gelu_new")
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random init has zero biases and unit LayerNorms: make them random too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    if not save_config:
        (tmp_path / "config.json").unlink()
    return hf, tmp_path / "model.safetensors"


def test_logits_and_greedy_tokens_match_transformers(tmp_path):
    hf, path = _hf_model(tmp_path)
    model = load_gpt2_safetensors(path).eval()
    idx = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        ref = hf(idx).logits
        out = model(idx)
    max_abs, rel = report(out, ref)
    print(f"logits max_abs={max_abs:.2e} rel={rel:.2e}")
    assert rel <= 1e-5
    prompt = idx[:1, :5]
    ours = generate(model, prompt, 12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_heads_without_config_json_come_from_a_name_that_fits_or_not_at_all(tmp_path):
    """The heads are not in the tensors' shapes: a wrong count would load and compute something
    else, silently. Without config.json: a --model whose width and depth are the file's, else
    OpenAI's size of that shape; our own presets' shapes are no evidence (mini is 256 x 6 with
    8 heads; this file has 4)."""
    hf, path = _hf_model(tmp_path, n_embd=256, n_layer=6, n_head=4, vocab=64, ctx=8, save_config=False)
    with pytest.raises(UserError, match="cannot tell the number of heads"):
        load_gpt2_safetensors(path)
    with pytest.raises(UserError, match="width 256 and 6 layers, but --model tiny has 128 and 4"):
        load_gpt2_safetensors(path, model_name="tiny")
    assert load_gpt2_safetensors(path, model_name="mini").config.n_head == 8  # what the user named
    # a name of the file's width but another depth is no evidence either (mini is 6 layers deep)
    _, shallow = _hf_model(tmp_path / "shallow", n_embd=256, n_layer=4, n_head=4, vocab=64, ctx=8, save_config=False)
    with pytest.raises(UserError, match="width 256 and 4 layers, but --model mini has 256 and 6"):
        load_gpt2_safetensors(shallow, model_name="mini")
    (tmp_path / "config.json").write_text('{"n_head": 4}')
    model = load_gpt2_safetensors(path, model_name="tiny")  # config.json decides; the name is moot
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert report(model.eval()(idx), hf(idx).logits)[1] < 1e-5


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_gpt2_safetensors(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.randn(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="missing tensor"):
        load_gpt2_safetensors(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="unknown GPT-2 model"):
        load_gpt2_pretrained("gpt3")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="junk.safetensors is not a readable safetensors file"):
        load_gpt2_safetensors(tmp_path / "junk.safetensors")
    base = {"wte.weight": torch.randn(10, 8), "wpe.weight": torch.randn(4, 8), "ln_f.weight": torch.ones(8)}
    save_file(base, str(tmp_path / "noblocks.safetensors"))
    with pytest.raises(UserError, match="no transformer blocks"):
        load_gpt2_safetensors(tmp_path / "noblocks.safetensors")
    save_file({**base, "wte.weight": torch.randn(80)}, str(tmp_path / "flat.safetensors"))
    with pytest.raises(UserError, match=r"tensor wte.weight has shape \(80,\), expected \[rows, width\]"):
        load_gpt2_safetensors(tmp_path / "flat.safetensors")  # was "ValueError: not enough values to unpack"


class _Touch:
    """A pickle that would create a file when unpickled: weights_only must refuse to run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_pytorch_model_bin_folder_loads_as_its_safetensors_does(tmp_path):
    """Hub repos saved before safetensors hold pytorch_model.bin (or its shards and their index): such a
    folder loads through load_checkpoint with the logits of the model saved, the file read with torch's
    weights_only (tensors only: a pickle that would run code is refused, and runs none). A folder with
    both forms reads the safetensors one, as transformers does. A damaged file, or one holding anything
    but a dict of named tensors, is refused naming the file."""
    import shutil

    from safetensors.torch import load_file

    from tritongpt.train.gpt2_weights import load_checkpoint

    hf, path = _hf_model(tmp_path / "st")
    idx = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        want = hf(idx).logits

    def logits_of(folder):
        with torch.no_grad():
            return load_checkpoint(folder).eval()(idx)

    single, sharded = tmp_path / "bin", tmp_path / "sharded"
    for folder in (single, sharded):
        folder.mkdir()
        shutil.copy(tmp_path / "st" / "config.json", folder)
    torch.save(hf.state_dict(), single / "pytorch_model.bin")  # older save_pretrained's: lm_head.weight too
    assert report(logits_of(single), want)[1] < 1e-5
    sd = load_file(str(path))  # transformers' own names ("transformer." prefix or not), split in two shards
    keys, weight_map = list(sd), {}
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert report(logits_of(sharded), want)[1] < 1e-5
    torch.save({k: v + 1.0 for k, v in sd.items()}, tmp_path / "st" / "pytorch_model.bin")  # other weights
    assert report(logits_of(tmp_path / "st"), want)[1] < 1e-5  # the safetensors file is the one read

    bad = single / "pytorch_model.bin"
    bad.write_bytes(bad.read_bytes()[:4000])
    with pytest.raises(UserError, match=f"{re.escape(str(bad))} is not a readable PyTorch weights file "
                                        r"\(RuntimeError"):
        load_checkpoint(single)
    torch.save([torch.randn(2)], bad)
    with pytest.raises(UserError, match="is not a PyTorch weights file: it holds a list, not a dict of named tensors"):
        load_checkpoint(single)
    torch.save({**sd, "step": 3}, bad)
    with pytest.raises(UserError, match="is not a PyTorch weights file: its entry 'step' is a int, not a tensor"):
        load_checkpoint(single)
    torch.save({k: v for k, v in sd.items() if not k.endswith("wte.weight")}, bad)
    with pytest.raises(UserError, match="pytorch_model.bin is not a GPT-2 weights file: missing tensor 'wte.weight'"):
        load_checkpoint(single)
    torch.save({**sd, "wte.weight": _Touch(tmp_path / "ran")}, bad)
    with pytest.raises(UserError, match=r"is not a readable PyTorch weights file \(UnpicklingError: Weights only"):
        load_checkpoint(single)
    assert not (tmp_path / "ran").exists()


def test_a_missing_layer_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _hf_model(tmp_path)
    sd = load_file(str(path))
    for name in ("h.1.mlp.c_fc.bias", "ln_f.bias"):
        (key,) = [k for k in sd if k.endswith(name)]  # "transformer." prefix or not
        save_file({k: v for k, v in sd.items() if k != key}, str(path))
        with pytest.raises(UserError, match=rf"missing tensor\(s\) \['{name}'\]"):
            load_gpt2_safetensors(path)


def test_nan_weights_are_named(tmp_path):
    """A NaN weight loaded silently: eval printed loss nan, generate crashed in torch.multinomial."""
    from safetensors.torch import load_file, save_file

    _, path = _hf_model(tmp_path)
    sd = load_file(str(path))
    (key,) = [k for k in sd if k.endswith("h.0.ln_1.weight")]
    sd[key][0] = float("inf")
    save_file(sd, str(path))
    with pytest.raises(UserError, match="tensor trf_blocks.0.norm1.weight holds NaN or inf"):
        load_gpt2_safetensors(path)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    """A tensor whose shape is not the one the file's sizes call for is a UserError naming it;
    copy_ alone would broadcast a [1] LayerNorm bias over the whole width without a word."""
    from safetensors.torch import load_file, save_file

    _, path = _hf_model(tmp_path)
    sd = load_file(str(path))
    (key,) = [k for k in sd if k.endswith("h.1.ln_1.bias")]
    sd[key] = torch.tensor([0.5])
    save_file(sd, str(path))
    with pytest.raises(UserError, match=r"tensor for trf_blocks.1.norm1.bias has shape \(1,\), expected \(48,\)"):
        load_gpt2_safetensors(path)


def test_an_untied_config_json_beside_weights_without_a_head_is_refused(hf_copy, tmp_path):
    """GPT-2's file has no lm_head (tied); a config.json that says tie_word_embeddings false beside it is a broken
    folder (transformers starts a random head), read as tied here."""
    path = hf_copy(_hf_model, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "tie_word_embeddings": False}))
    with pytest.raises(UserError, match="config.json says tie_word_embeddings false, but the weights beside it have "
                                        "no lm_head.weight"):
        load_gpt2_safetensors(path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn, torch.complex64])
def test_a_tensor_that_is_no_float_weight_is_refused_not_cast(hf_copy, tmp_path, dtype):
    """copy_ cast an int32 (a GPTQ file's codes), bool, FP8 (a file whose scales sit beside it) or complex tensor
    into the float parameter and loaded another model without a word; a float16 one is a plain cast."""
    from safetensors.torch import load_file, save_file

    path = hf_copy(_hf_model, tmp_path)
    sd = load_file(str(path))
    (key,) = [k for k in sd if k.endswith("h.1.mlp.c_fc.weight")]
    good = sd[key]
    save_file({**sd, key: (good * 100).to(dtype)}, str(path))
    with pytest.raises(UserError, match=rf"{path}: tensor for trf_blocks.1.ff.fc1.weight is "
                                        rf"{str(dtype).removeprefix('torch.')}, not a float weight"):
        load_gpt2_safetensors(path)
    save_file({**sd, key: good.half()}, str(path))
    assert torch.equal(load_gpt2_safetensors(path).trf_blocks[1].ff.fc1.weight, good.half().float().t())


@pytest.mark.parametrize("edit, said", [
    # each was a TypeError or an unhashable lookup deep in the readers, or GPTConfig's error naming no file
    ({"model_type": ["gpt2"]}, r"config.json: model_type must be a string \(the model family, as 'llama'\), got list"),
    ({"activation_function": ["gelu_new"]}, r"config.json has activation_function \['gelu_new'\]; this model "
                                            "computes 'gelu_new' only"),
    ({"n_head": "4"}, r"config.json says n_head '4'; it must be a positive integer"),
    ({"n_head": 0}, r"config.json says n_head 0; it must be a positive integer"),
    ({"n_head": 5}, r"config.json says n_head 5, which does not divide"),
])
def test_config_json_fields_of_the_wrong_type_are_named(hf_copy, tmp_path, edit, said):
    from tritongpt.train.gpt2_weights import load_checkpoint

    path = hf_copy(_hf_model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, **edit}))
    with pytest.raises(UserError, match=said):
        load_checkpoint(path)


def test_an_lm_head_equal_to_the_embedding_loads_tied_and_another_untied(tmp_path):
    """Some saves of GPT-2 carry lm_head.weight as a copy of wte.weight: that is the tied head
    (one matrix: fine-tuning keeps them one, an export writes one); an lm_head of its own is an
    untied head, and the logits are its."""
    from safetensors.torch import load_file, save_file

    hf, path = _hf_model(tmp_path)
    sd = load_file(str(path))
    wte = sd["transformer.wte.weight"]
    save_file({**sd, "lm_head.weight": wte.clone()}, str(path))
    model = load_gpt2_safetensors(path)
    assert model.config.tie_weights and model.out_head.weight is model.tok_emb.weight
    head = torch.randn_like(wte)
    save_file({**sd, "lm_head.weight": head}, str(path))
    model = load_gpt2_safetensors(path).eval()
    assert not model.config.tie_weights and torch.equal(model.out_head.weight, head)
    idx = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        h = hf.transformer(idx).last_hidden_state  # transformers' final hidden state, our head on it
        assert report(model(idx), h @ head.t())[1] < 1e-5


def test_load_checkpoint_notes_a_model_name_that_differs_in_any_size(tmp_path, capsys):
    """A tritongpt file carries its config, which is used; a --model that differs from it in any
    of layers, heads or width is noted (tiny is 4 layers of 4 heads at width 128: each differs
    alone here), and one that matches is not."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.gpt2_weights import load_checkpoint

    for n_layer, n_head, n_embd, noted in ((2, 4, 128, True), (4, 2, 128, True), (4, 4, 64, True),
                                           (4, 4, 128, False)):
        path = tmp_path / f"{n_layer}-{n_head}-{n_embd}.safetensors"
        GPTModel(GPTConfig(vocab_size=64, context_length=8, n_embd=n_embd, n_layer=n_layer, n_head=n_head)).save(path)
        cfg = load_checkpoint(path, "tiny").config
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (n_layer, n_head, n_embd)
        err = capsys.readouterr().err
        said = f"holds a model of n_layer {n_layer}, n_head {n_head}, n_embd {n_embd} (its saved config, used), not tiny's"
        assert (said in err) == noted and ("holds a model" in err) == noted, err


@pytest.mark.parametrize("kind", ["gpt2-config-json", "llama-folder", "peft-adapter"])
def test_load_checkpoint_notes_a_model_name_that_differs_for_every_kind_of_weights(tmp_path, capsys, kind):
    """--model is used only to tell a config-less GPT-2 file's heads: a Hugging Face folder (its config.json says
    the sizes) or a peft adapter (its base's) that differs from it is noted as our checkpoints are (the test above),
    not ignored without a word; each is 2 layers, tiny 4."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint

    base = GPTModel(GPTConfig(vocab_size=64, context_length=8, n_embd=32, n_layer=2, n_head=2))
    if kind == "llama-folder":
        from parity import hf_llama

        hf_llama(tmp_path / "w", 53)
        path, sizes = tmp_path / "w", "n_layer 2, n_head 4, n_embd 64"
    else:
        export_gpt2(base, tmp_path / "w")
        path, sizes = tmp_path / "w", "n_layer 2, n_head 2, n_embd 32"
    if kind == "peft-adapter":
        peft = pytest.importorskip("peft")
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "w")
        adapter = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
        adapter.save_pretrained(tmp_path / "adapter")
        path = tmp_path / "adapter"
    capsys.readouterr()
    cfg = load_checkpoint(path, "tiny").config
    assert sizes == f"n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}"  # (the file's, used)
    assert f"holds a model of {sizes} (its saved config, used), not tiny's" in capsys.readouterr().err
    load_checkpoint(path)  # no --model: nothing to note
    assert "holds a model" not in capsys.readouterr().err


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub reads the variable once, at import: if another test imported it first (transformers
    # does), only the constant stops the real network attempt (~23 s of timeouts here).
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError, match=r"could not fetch .*pass their path \(--weights for generate, --init"):
        load_gpt2_pretrained("gpt2-small", cache_dir=tmp_path)


class RemoteEntryNotFoundError(Exception):  # huggingface_hub >= 1.0's 404 for a file, by name
    pass


class LocalEntryNotFoundError(Exception):  # huggingface_hub's: offline, and the file not in the cache
    pass


def test_a_repo_without_model_safetensors_is_read_in_its_other_form_with_a_new_huggingface_hub(tmp_path,
                                                                                                 monkeypatch):
    """huggingface_hub >= 1.0 answers a file the repo lacks with RemoteEntryNotFoundError (< 1.0:
    EntryNotFoundError): the next weights form is asked for, not "offline?"; a repo with none is named as such.
    A file missing from the cache offline (LocalEntryNotFoundError) stays an offline error."""
    from tritongpt.train.gpt2_weights import hub_download

    hub = pytest.importorskip("huggingface_hub")
    (tmp_path / "pytorch_model.bin").write_bytes(b"weights")
    missing = RemoteEntryNotFoundError

    def download(repo, filename, cache_dir=None):
        if repo == "someone/old" and (tmp_path / filename).is_file():
            return str(tmp_path / filename)
        raise missing(filename)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    assert hub_download("someone/old") == str(tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"someone/none has none of model.safetensors, .*pytorch_model.bin.index.json"):
        hub_download("someone/none")
    missing = LocalEntryNotFoundError
    with pytest.raises(UserError, match=r"could not fetch someone/old from the Hugging Face Hub \(offline\?\): "
                                        r"LocalEntryNotFoundError"):
        hub_download("someone/old")


def test_config_json_that_disagrees_or_names_another_variant_is_refused(tmp_path):
    """config.json is read for the heads; what else it says must fit this model: an activation
    or eps it does not compute, or sizes other than the tensors', would load silently and give
    other numbers. Broken JSON is named."""
    _, path = _hf_model(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for change, said in (({"activation_function": "relu"},
                          "activation_function 'relu'; this model computes 'gelu_new'"),
                         ({"layer_norm_epsilon": 1e-2}, "layer_norm_epsilon 0.01"),
                         ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx True"),
                         ({"n_embd": 64}, "says n_embd 64, but the weights have 48"),
                         ({"n_positions": 1024}, "says n_positions 1024, but the weights have 40"),
                         ({"vocab_size": 50257}, "says vocab_size 50257, but the weights have 101"),
                         ({"n_layer": 2}, "says n_layer 2, but the weights have 3"),
                         # near misses count: eps 1e-6 or unscaled scores load and compute other numbers
                         ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
                         ({"scale_attn_weights": False}, "scale_attn_weights False"),
                         # another family's config (load_checkpoint hands GPT-Neo's to gpt_neo_weights)
                         ({"model_type": "gpt_neox"}, "says model_type 'gpt_neox': not a GPT-2 model"),
                         # a size of another type was called a wrong number ("says n_embd '48', but the weights
                         # have 48"), and a bad n_head was GPTConfig's error, naming no file
                         ({"n_embd": "48"}, "config.json: n_embd must be a positive integer, got '48'"),
                         ({"n_layer": 3.0}, "config.json: n_layer must be a positive integer, got 3.0"),
                         # (null too: transformers' GPT2Config refuses it; it is no absent n_head, read from --model)
                         ({"n_head": None}, "config.json says n_head None; it must be a positive integer"),
                         ({"n_head": 5}, "config.json says n_head 5, which does not divide the weights' width 48")):
        (tmp_path / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError, match=said):
            load_gpt2_safetensors(path)
    # a config.json without n_head: the advice was to put a config.json beside the file, where one is
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in good.items() if k != "n_head"}))
    with pytest.raises(UserError, match="config.json has no n_head; add it or pass --model"):
        load_gpt2_safetensors(path)
    (tmp_path / "config.json").write_text(json.dumps({**good, "activation_function": "gelu_pytorch_tanh"}))
    assert load_gpt2_safetensors(path).config.n_head == 4  # the same GELU, spelled by PyTorch
    for text, said in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list"),
                       ('{"n_ctx": "\xe9"}'.encode("latin-1"), r"config.json: not valid JSON \('utf-8' codec")):
        getattr(tmp_path / "config.json", "write_bytes" if isinstance(text, bytes) else "write_text")(text)
        with pytest.raises(UserError, match=said):
            load_gpt2_safetensors(path)


def test_config_json_null_scale_flags_are_refused_as_transformers_5_refuses_them(tmp_path):
    """GPT2Config (transformers 5: strict bool fields) refuses a null scale_attn_weights or
    scale_attn_by_inverse_layer_idx (4.x kept the None, and its attention tested it as false): refused by name, the
    one that is false by default too."""
    _, path = _hf_model(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for key, default in (("scale_attn_by_inverse_layer_idx", "false"), ("scale_attn_weights", "true")):
        (tmp_path / "config.json").write_text(json.dumps({**good, key: None}))
        with pytest.raises(UserError, match=f"config.json has {key} null; it must be true or false "
                                            rf"\(transformers refuses null here, and its default is {default}\)"):
            load_gpt2_safetensors(path)
    # read by truth, "false" would be true: a flag spelled as a string is named
    (tmp_path / "config.json").write_text(json.dumps({**good, "scale_attn_weights": "false"}))
    with pytest.raises(UserError, match="config.json has scale_attn_weights 'false'; it must be true or false"):
        load_gpt2_safetensors(path)


# -- export: a tritongpt model as a Hugging Face GPT-2 folder ---------------------------------------------
def _random_model(**overrides):
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=101, context_length=40, n_embd=48, n_layer=3, n_head=4)
    model = GPTModel(GPTConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # new models have zero biases and unit LayerNorms: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if model.config.padded_vocab_size > model.config.vocab_size:  # padding rows stay zero
            model.tok_emb.weight[model.config.vocab_size:] = 0
    return model


@pytest.mark.parametrize("overrides", [{}, {"bias": False, "tie_weights": False, "vocab_multiple": 64}],
                         ids=["gpt2-layout", "no-bias-untied-padded"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, overrides):
    """GPT2LMHeadModel.from_pretrained(folder) computes our logits; a model without biases gets
    zero ones, an untied head its own lm_head, a padded vocabulary loses its padding rows; our
    loader reads the folder back to the same function."""
    from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint

    model = _random_model(**overrides)
    paths = export_gpt2(model, tmp_path, eos_token_id=100)
    assert [p.name for p in paths] == ["model.safetensors", "config.json"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings == model.config.tie_weights and hf.config.eos_token_id == 100
    idx = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        ours = model(idx)
        max_abs, rel = report(hf(idx).logits, ours)
        print(f"exported logits max_abs={max_abs:.2e} rel={rel:.2e}")
        assert rel <= 1e-5
        assert report(load_checkpoint(paths[0]).eval()(idx), ours)[1] <= 1e-6
    assert json.loads(paths[1].read_text())["vocab_size"] == 101
    with pytest.raises(UserError, match="already holds a model"):
        export_gpt2(model, tmp_path)
    export_gpt2(model, tmp_path, overwrite=True)


def test_export_config_json_and_metadata_describe_the_model(tmp_path):
    """What other readers take from the folder, not only GPT2LMHeadModel: config.json's sizes
    (n_ctx too, which GGUF converters read for the context), the model's dropout (transformers
    trains with it), the same id as bos and eos (GPT2Config would say 50256 for bos, an id
    this vocabulary does not have), and the safetensors header's format "pt", which older
    transformers require to load the file at all."""
    from safetensors import safe_open

    from tritongpt.train.gpt2_weights import export_gpt2

    model = _random_model(dropout=0.25)
    weights, cfg_json = export_gpt2(model, tmp_path, eos_token_id=100)
    d = json.loads(cfg_json.read_text())
    want = {"model_type": "gpt2", "vocab_size": 101, "n_positions": 40, "n_ctx": 40, "n_embd": 48, "n_layer": 3,
            "n_head": 4, "resid_pdrop": 0.25, "embd_pdrop": 0.25, "attn_pdrop": 0.25, "bos_token_id": 100,
            "eos_token_id": 100, "tie_word_embeddings": True, "layer_norm_epsilon": 1e-5}
    assert {k: d.get(k) for k in want} == want
    with safe_open(str(weights), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_refuses_a_folder_holding_either_file(tmp_path):
    """export_gpt2 writes model.safetensors and config.json together: a folder holding either
    one (another model's config.json, say) is refused without overwrite, and left as it was."""
    from tritongpt.train.gpt2_weights import export_gpt2

    model = _random_model()
    for name in ("config.json", "model.safetensors"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("another model's")
        with pytest.raises(UserError, match="already holds a model"):
            export_gpt2(model, out)
        assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "another model's"


def test_export_command_then_generate_from_the_folder(tmp_path, capsys):
    """`tritongpt export RUN --out DIR` writes weights, config and the run's tokenizer; generate
    on the exported file finds that tokenizer and gives the run's own greedy text; a second
    export into the same folder is refused unless --overwrite."""
    from tritongpt import cli
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    run = tmp_path / "run"
    text = " ".join(f"the cat number {i} sat on mat {i * 7}, then the dog ran {i % 13} laps." for i in range(200))
    tok = BPETokenizer.train(text, 280, name="tiny")
    save_run_tokenizer(tok, run)
    _random_model(vocab_size=280).save(run / "model.safetensors")
    out = tmp_path / "hf"
    assert cli.main(["export", str(run / "model.safetensors"), "--out", str(out)]) == 0
    written = {"model.safetensors", "config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
               "tritongpt_tokenizer.json"}
    assert {p.name for p in out.iterdir()} == written
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("the cat")["input_ids"] == tok.encode("the cat")
    # the run's end of text is the model's eos (where transformers' generate stops) and the
    # tokenizer's bos and eos; the tokenizer's length limit is the model's context (40)
    eot = tok.special_tokens["<|endoftext|>"]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eot
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>" and hf_tok.eos_token_id == eot
    assert hf_tok.model_max_length == 40
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    assert "already holds model.safetensors" in capsys.readouterr().err
    texts = []
    for weights in (run / "model.safetensors", out / "model.safetensors"):
        assert cli.main(["generate", "--weights", str(weights), "--prompt", "the cat", "--temperature", "0",
                         "--max-new-tokens", "8", "--device", "cpu", "--kernels", "reference"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("the cat")


def test_export_over_an_earlier_one_leaves_no_tokenizer_of_another_model(tmp_path, capsys):
    """--overwrite with a tokenizer Hugging Face cannot read (another pattern than GPT-2's): the
    weights are replaced and the earlier export's vocab.json / merges.txt removed, so neither
    transformers nor generate pairs the new model with the old tokenizer."""
    from tritongpt import cli
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    text = " ".join(f"a cat {i} sat on mat {i * 7}; a dog ran {i % 13} laps." for i in range(200))
    out = tmp_path / "hf"
    for name, pat in (("gpt2-pattern", None), ("words", r"\s*\S+|\s+")):
        run = tmp_path / name
        kw = {"pat_str": pat} if pat else {}
        save_run_tokenizer(BPETokenizer.train(text, 280, name=name, **kw), run)
        _random_model(vocab_size=280).save(run / "model.safetensors")
        assert cli.main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "note: the tokenizer is not exported: tokenizer 'words' splits text with another pattern" in err
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tritongpt_tokenizer.json"}
    # tritongpt still finds the run's own tokenizer beside the weights (not one guessed by size)
    from tritongpt.train.sft import pick_tokenizer

    assert pick_tokenizer(None, out / "model.safetensors", 280).name == "words"


def test_export_keeps_out_of_run_folders_and_replaces_a_whole_model_folder(tmp_path, capsys):
    """--out may not be a run or checkpoint folder (its checkpoints would be shadowed or
    overwritten), even with --overwrite; over another model's folder, --overwrite removes every
    file transformers would read from before (a tokenizer.json, a generation_config.json, a peft
    adapter, with which from_pretrained would load the adapter's base model instead)."""
    from tritongpt import cli
    from tritongpt.train.gpt2_weights import is_hf_file
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    text = " ".join(f"a cat {i} sat on mat {i * 7}; a dog ran {i % 13} laps." for i in range(200))
    run = tmp_path / "run"
    save_run_tokenizer(BPETokenizer.train(text, 280, name="t"), run)
    _random_model(vocab_size=280).save(run / "model.safetensors")
    # another run's checkpoint folder, a run that wrote only metrics so far
    (tmp_path / "other-ckpt").mkdir()
    (tmp_path / "other-ckpt" / "state.pt").write_bytes(b"x")
    (tmp_path / "metrics-run").mkdir()
    (tmp_path / "metrics-run" / "metrics.jsonl").write_text('{"step": 1}\n')
    for out, named in ((run, "tokenizer.json"), (tmp_path / "other-run", "ckpt-0000010"),
                       (tmp_path / "other-ckpt", "state.pt"), (tmp_path / "metrics-run", "metrics.jsonl")):
        if out.name == "other-run":
            (out / "ckpt-0000010").mkdir(parents=True)
        assert cli.main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
        assert f"is a tritongpt run or checkpoint folder ({named}" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "other-ckpt").iterdir()] == ["state.pt"]
    # nor a bare model's own folder: --overwrite would replace the very file it exports
    bare = tmp_path / "bare"
    bare.mkdir()
    _random_model(vocab_size=280).save(bare / "model.safetensors")
    assert cli.main(["export", str(bare / "model.safetensors"), "--out", str(bare), "--overwrite"]) == 2
    assert "is a tritongpt run or checkpoint folder (model.safetensors)" in capsys.readouterr().err
    assert [p.name for p in bare.iterdir()] == ["model.safetensors"]
    assert not is_hf_file(bare / "model.safetensors")  # still ours, not an export written over it
    # the same folder reached through a symlink to the file, from another folder
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "m.safetensors").symlink_to(bare / "model.safetensors")
    assert cli.main(["export", str(tmp_path / "links" / "m.safetensors"), "--out", str(bare), "--overwrite"]) == 2
    assert "is a tritongpt run or checkpoint folder" in capsys.readouterr().err
    assert [p.name for p in bare.iterdir()] == ["model.safetensors"] and not is_hf_file(bare / "model.safetensors")
    # --out a file is named before anything is loaded
    assert cli.main(["export", str(run), "--out", str(run / "model.safetensors")]) == 2
    assert "model.safetensors is a file: name a folder" in capsys.readouterr().err
    old = tmp_path / "hf"
    old.mkdir()
    (old / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (old / "generation_config.json").write_text(json.dumps({"eos_token_id": 4095}))
    (old / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "gpt2", "peft_type": "LORA"}))
    # another model's special tokens and chat template would be read as this one's
    (old / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (old / "chat_template.jinja").write_text("{{ messages }}")
    stale = ["tokenizer.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
             "adapter_config.json"]
    assert cli.main(["export", str(run), "--out", str(old)]) == 2
    assert f"already holds {', '.join(stale)}:" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--out", str(old), "--overwrite"]) == 0
    assert {p.name for p in old.iterdir()}.isdisjoint(stale)
    assert transformers.AutoTokenizer.from_pretrained(old)("a cat")["input_ids"] == \
        BPETokenizer.load(run / "tokenizer.json").encode("a cat")


def test_an_export_folder_saved_again_by_transformers_uses_its_files(tmp_path, capsys):
    """export writes Hugging Face's tokenizer files and ours from one tokenizer, and tritongpt
    reads ours; once transformers saves the folder with a token added, its files win (ours
    would encode the new token as plain bytes), with a note."""
    from tritongpt import cli
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer, saved_tokenizer_path

    run, out = tmp_path / "run", tmp_path / "hf"
    text = " ".join(f"the cat number {i} sat on mat {i * 7}, then the dog ran {i % 13} laps." for i in range(200))
    save_run_tokenizer(BPETokenizer.train(text, 280, name="tiny"), run)
    _random_model(vocab_size=288).save(run / "model.safetensors")
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    assert saved_tokenizer_path(out / "model.safetensors") == out / "tritongpt_tokenizer.json"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    hf_tok.save_pretrained(out)
    capsys.readouterr()
    assert saved_tokenizer_path(out / "model.safetensors") == out
    assert "differ from tritongpt_tokenizer.json" in capsys.readouterr().err
    tok = pick_tokenizer(None, out / "model.safetensors", 288)
    text = "<|im_start|>the cat"
    assert tok.vocab_size == 281 and tok.encode(text, allowed_special="all") == hf_tok(text)["input_ids"]


def test_a_soft_capped_model_is_not_exported_and_an_earlier_export_stays(tmp_path, capsys):
    """GPT2LMHeadModel has no logit soft cap: it would load the weights and give other logits.
    The export is refused before any file is removed, so --overwrite leaves the earlier export."""
    from tritongpt import cli
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.gpt2_weights import export_gpt2, export_peft_adapter

    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    plain, capped = tmp_path / "plain", tmp_path / "capped"
    tok = BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")
    model = GPTModel(GPTConfig(vocab_size=280, context_length=40, n_embd=32, n_layer=1, n_head=2, logit_softcap=15.0))
    for run, m in ((plain, _random_model(vocab_size=280)), (capped, model)):
        save_run_tokenizer(tok, run)
        m.save(run / "model.safetensors")
    out = tmp_path / "hf"
    assert cli.main(["export", str(plain), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["export", str(capped), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "soft-caps its logits (logit_softcap 15)" in err and "cannot be exported as a GPT-2 folder" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(UserError, match="cannot be exported as a GPT-2 folder"):
        export_gpt2(GPTModel.load(capped / "model.safetensors"), tmp_path / "direct")
    with pytest.raises(UserError, match="cannot be exported as a peft adapter for GPT-2"):
        export_peft_adapter(model, tmp_path / "adapter", "gpt2")
    assert not (tmp_path / "direct").exists() and not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("window_layers", ["odd", "all"])
def test_a_model_with_local_attention_is_not_exported(tmp_path, window_layers):
    """GPT2LMHeadModel attends over the whole context in every layer: a windowed model's weights
    would give it other logits."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.gpt2_weights import export_gpt2, export_peft_adapter

    model = GPTModel(GPTConfig(vocab_size=280, context_length=40, n_embd=32, n_layer=2, n_head=2,
                               attention_window=8, window_layers=window_layers))
    with pytest.raises(UserError, match=rf"local attention \(attention_window 8, window_layers {window_layers}\), "
                                        r"which Hugging Face's GPT-2 does not: it cannot be exported as a GPT-2 "
                                        r"folder"):
        export_gpt2(model, tmp_path / "direct")
    with pytest.raises(UserError, match="local attention .* cannot be exported as a peft adapter for GPT-2"):
        export_peft_adapter(model, tmp_path / "adapter", "gpt2")
    assert not (tmp_path / "direct").exists() and not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("module,family", [
    ("gpt2", "GPT-2"), ("gpt_neo", "GPT-Neo"), ("llama", "Llama"), ("gemma", "Gemma"), ("olmo", "OLMo"),
    ("phi", "Phi"), ("phi3", "Phi-3"), ("neox", "GPT-NeoX"), ("gptj", "GPT-J"), ("falcon", "Falcon"),
    ("bloom", "BLOOM"), ("mpt", "MPT"), ("cohere", "Cohere"), ("stablelm", "StableLM"), ("moe", "MoE")])
def test_every_loader_names_a_missing_weights_file(module, family, tmp_path):
    """Each family's load_*_safetensors refuses a path with no file by its family's name (weights_file)."""
    import importlib

    mod = importlib.import_module(f"tritongpt.train.{module}_weights")
    missing = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match=f"^{re.escape(family)} weights file not found: {re.escape(str(missing))}$"):
        getattr(mod, f"load_{module}_safetensors")(missing)
