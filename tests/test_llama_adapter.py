"""`export RUN --adapter` of a Llama-family LoRA run (train/gpt2_weights.py peft_adapter): the update as the peft
adapter peft writes for a LlamaForCausalLM (Qwen2ForCausalLM ...), q_proj ... down_proj under their Hugging Face
names, for the run's --init folder. Checked against peft itself on bases transformers saved: PeftModel on the base
gives the run's logits and the merged export's; our own read_adapter (serve --lora-modules) reads it back at its
rank. QLoRA (--quantize) runs and runs on a GPTQ folder's own quantization too."""
import json

import pytest
import torch

from tritongpt.cli import main
from tritongpt.model.quant import QuantLinear
from tritongpt.train.gpt2_weights import load_checkpoint, read_adapter
from parity import report
from test_qlora import sft_argv

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 4096  # the default tokenizer's: sft's data is tokenized by it
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "ministral": ("MinistralConfig", "MinistralForCausalLM")}
# a Ministral's window in some layers only (layer_types), over a text longer than it: export writes it as Ministral
MINISTRAL = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], head_dim=8)


def hf_folder(path, family="llama", kv_heads=2, seed=0, **overrides):
    """A tiny random model of `family` saved by transformers (2 layers, 4 heads of 8 over kv_heads), its norms off
    their ones, with our tokenizer beside it (sft needs one of its vocabulary)."""
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, **overrides)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(path)
    save_run_tokenizer(default_tokenizer(), path)
    return path


def edited_copy(folder, out, key, edit):
    """folder's copy (config.json, model.safetensors) with the tensor `key` edited in place by edit(tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    sd = load_file(folder / "model.safetensors")
    edit(sd[key])
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def run_lora(folder, out, *extra):
    assert main(sft_argv(folder, out, "--max-steps", "2", "--lora-rank", "4", "--lora-alpha", "6", *extra)) == 0
    return out


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("qwen2", 4), ("ministral", 2)],
                         ids=["llama-gqa", "qwen2-biases", "ministral-window"])
def test_peft_puts_a_llama_runs_adapter_on_its_init_with_the_runs_logits(tmp_path, capsys, family, kv_heads):
    """peft's PeftModel on the run's --init folder (LlamaForCausalLM.from_pretrained) with the exported adapter gives
    the LoRA run's logits (unmerged, as it trained) and the merged export's; the config is peft's for that class;
    read_adapter reads it back as the run's A and scale B, at the run's rank."""
    folder = hf_folder(tmp_path / "init", family, kv_heads, **(MINISTRAL if family == "ministral" else {}))
    run = run_lora(folder, tmp_path / "run")
    capsys.readouterr()
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["export", str(run), "--out", str(adapter), "--adapter"]) == 0
    said = capsys.readouterr().out
    name = {"llama": "a Llama", "qwen2": "a Qwen2", "ministral": "a Ministral"}[family]
    assert f"of {name} with 2 layers, for the base {folder}" in said
    assert main(["export", str(run), "--out", str(merged)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "base_model_name_or_path", "bias",
                                   "fan_in_fan_out", "rank_pattern", "alpha_pattern")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 6, "base_model_name_or_path": str(folder),
        "bias": "none", "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}}
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = load_checkpoint(run, merge=False).eval()
    idx = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    model_cls = getattr(transformers, CLASSES[family][1])
    on_base = peft.PeftModel.from_pretrained(model_cls.from_pretrained(folder), adapter).eval()
    # every module's update is there, under peft's names (its own load would silently skip a misnamed one)
    lora_b = {n: p for n, p in on_base.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 7 and all(p.abs().sum() > 0 for p in lora_b.values())
    want = logits(ours, idx)
    got = logits(on_base, idx)
    rel = report(got, want)[1]
    print(f"peft on the --init vs the run (fp32): rel {rel:.2e}")
    assert rel < 1e-5
    assert report(logits(model_cls.from_pretrained(merged).eval(), idx), got)[1] < 1e-5
    # and back, merged into its base_model_name_or_path (--weights ADAPTER: generate, chat, --init)
    assert report(logits(load_checkpoint(adapter).eval(), idx), got)[1] < 1e-5
    # serve --lora-modules' reader: the run's own A and scale B, each module at rank 4
    served = load_checkpoint(folder)
    read = read_adapter(adapter, served)
    ups = {n.removesuffix(".parametrizations.weight.0"): m for n, m in ours.named_modules()
           if n.endswith("parametrizations.weight.0")}
    assert sorted(read) == sorted(ups) and len(read) == 2 * 7
    for n, (a, b) in read.items():
        assert a.shape[0] == b.shape[1] == 4
        assert torch.equal(a, ups[n].lora_A) and torch.allclose(b, 1.5 * ups[n].lora_B, rtol=1e-6, atol=0)


def test_a_qlora_llama_runs_adapter_goes_on_its_float_init(tmp_path, capsys):
    """sft --quantize int4 on a Llama folder: the adapter holds the updates the run trained beside its quantized
    matrices, for the float --init (checked as the run quantized it); peft on that folder is the float model plus
    those updates."""
    folder = hf_folder(tmp_path / "init")
    run = run_lora(folder, tmp_path / "run", "--quantize", "int4", "--group-size", "32", "--lora-targets", "attn")
    capsys.readouterr()
    adapter = tmp_path / "adapter"
    assert main(["export", str(run), "--out", str(adapter), "--adapter"]) == 0
    assert "the adapter goes on the float base" in capsys.readouterr().err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    trained = load_checkpoint(run, merge=False, quantized_ok=True)
    ups = {n: m.lora for n, m in trained.named_modules() if isinstance(m, QuantLinear) and m.lora is not None}
    float_base = load_checkpoint(folder)
    read = read_adapter(adapter, float_base)
    assert sorted(read) == sorted(ups) and len(read) == 2 * 4
    for n, (a, b) in read.items():
        assert torch.equal(a, ups[n].lora_A) and torch.allclose(b, 1.5 * ups[n].lora_B, rtol=1e-6, atol=0)
    # the float --init plus the run's updates, applied by hand, is what peft computes on that folder
    with torch.no_grad():
        for n, (a, b) in read.items():
            w = float_base.get_submodule(n).weight
            w.add_(b.double().matmul(a.double()).to(w.dtype))
    idx = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))
    on_base = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(folder), adapter).eval()
    rel = report(logits(on_base, idx), logits(float_base.eval(), idx))[1]
    print(f"peft on the float --init vs it plus the run's updates (fp32): rel {rel:.2e}")
    assert rel < 1e-5
    # a base whose q_proj quantizes otherwise (a weight moved by several steps: the float tensors all the same)
    moved = edited_copy(folder, tmp_path / "moved", "model.layers.1.self_attn.q_proj.weight",
                        lambda w: w[3, :5].add_(1.0))
    assert main(["export", str(run), "--out", str(tmp_path / "bad"), "--adapter", "--base", str(moved)]) == 2
    assert "its model.layers.1.self_attn.q_proj.weight, quantized as the run's (int4, group 32), differs (W_query's " \
           "scale in" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_run_on_a_gptq_folders_own_base_exports_its_adapter_for_the_folder(tmp_path, capsys):
    """sft --lora-rank on a GPTQ Llama folder: the adapter goes on that folder (checked bit for bit against the run's
    frozen int4 matrices), as peft puts LoRA on a GPTQ model; on the folder's float twin (its matrices dequantized,
    the model a GPTQ kernel computes) peft gives the run's logits."""
    from safetensors.torch import load_file

    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer
    from test_hf_quantized import quantized_folder

    folder, _ = quantized_folder(tmp_path, "gptq-v1-sym", vocab=V)
    save_run_tokenizer(default_tokenizer(), folder)
    run = run_lora(folder, tmp_path / "run")
    capsys.readouterr()
    adapter = tmp_path / "adapter"
    assert main(["export", str(run), "--out", str(adapter), "--adapter"]) == 0
    assert "its GPTQ Linears: the run's frozen matrices" in capsys.readouterr().err
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    twin = tmp_path / "gptq-v1-sym-float"  # (quantized_folder's: the same config.json without quantization_config)
    on_twin = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(twin), adapter).eval()
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    ours = load_checkpoint(run, merge=False, quantized_ok=True).eval()
    rel = report(logits(on_twin, idx), logits(ours, idx))[1]
    print(f"peft on the GPTQ folder's float twin vs the run (fp32): rel {rel:.2e}")
    assert rel < 1e-5
    # another GPTQ folder of the same float tensors, one packed code of its q_proj changed: refused by that buffer
    qweight = next(k for k in load_file(folder / "model.safetensors") if k.endswith("q_proj.qweight"))
    recoded = edited_copy(folder, tmp_path / "recoded", qweight, lambda q: q[0, :2].add_(1))
    assert main(["export", str(run), "--out", str(tmp_path / "bad"), "--adapter", "--base", str(recoded)]) == 2
    assert f"its {qweight.removesuffix('.qweight')}.weight, as its folder's int4 matrices load, differs (W_query's " \
           "qweight in" in capsys.readouterr().err
    # the float twin is not the run's base: it loads float, and the run trained on the folder's int4 matrices
    assert main(["export", str(run), "--out", str(tmp_path / "bad"), "--adapter", "--base", str(twin)]) == 2
    assert "is not the model this LoRA update was trained on" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_llama_adapters_base_must_be_the_runs_and_other_families_are_refused_by_name(tmp_path, capsys):
    """--base another folder (other weights, another RoPE base, fewer KV heads) is refused naming what differs; a
    LoRA run of a family whose adapter is not written (Gemma's) is refused by name before anything is written."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.model.lora import add_lora
    from test_hf_quantized import GEMMA, PHI3

    folder = hf_folder(tmp_path / "init")
    run = run_lora(folder, tmp_path / "run")
    out = tmp_path / "adapter"
    for base, said in ((hf_folder(tmp_path / "other", seed=1), "its model.embed_tokens.weight differs by up to"),
                       (hf_folder(tmp_path / "theta", rope_theta=500.0), "its config.json's rope_theta is 500.0, "
                                                                          "not 10000.0"),
                       (hf_folder(tmp_path / "mha", kv_heads=4), "its config.json's num_key_value_heads is 4, not 2"),
                       (tmp_path / "none", "no such Hugging Face Llama folder")):
        capsys.readouterr()
        assert main(["export", str(run), "--out", str(out), "--adapter", "--base", str(base)]) == 2, base
        err = capsys.readouterr().err
        assert said in err, err
        assert not out.exists()
    # Gemma's scaled embeddings and GeGLU, Phi-3's fused qkv_proj and gate_up_proj: their classes' peft adapters are
    # not written here (each is exported merged, as its family's folder)
    for name, fields in (("Gemma", GEMMA), ("Phi-3", PHI3)):
        model = GPTModel(GPTConfig(vocab_size=V, context_length=32, n_embd=64, n_layer=1, n_head=4, **fields))
        (tmp_path / name).mkdir()
        add_lora(model, 2).save(tmp_path / name / "model.safetensors")
        assert main(["export", str(tmp_path / name), "--out", str(out), "--adapter", "--tokenizer", "default"]) == 2
        assert "--adapter writes a peft adapter for Hugging Face's GPT-2 or a Llama-family model (Llama, Mistral, " \
               f"Ministral, Qwen2, Qwen3 or SmolLM3), and this model is a {name} (norm rmsnorm" in capsys.readouterr().err
        assert not out.exists()


def test_a_hub_repo_as_a_llama_adapters_base_is_compared_when_in_the_local_cache(tmp_path, monkeypatch, capsys):
    """A Hub repo id (a run's --init of one, or --base) is the adapter's base_model_name_or_path as it is; its
    weights, when the local Hub cache holds them, are compared with the run's frozen model like a folder's."""
    import huggingface_hub

    from tritongpt.errors import UserError
    from tritongpt.train.gpt2_weights import adapter_base

    cache = {"org/tiny-llama": hf_folder(tmp_path / "init"), "org/other": hf_folder(tmp_path / "other", seed=1)}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(cache[repo] / name)
                        if repo in cache and (cache[repo] / name).is_file() else None)
    monkeypatch.chdir(tmp_path)  # (no folder "org" here: the names are repo ids)
    frozen = load_checkpoint(cache["org/tiny-llama"])
    assert adapter_base("org/tiny-llama", None, frozen) == "org/tiny-llama"
    with pytest.raises(UserError, match="--base org/other is not the model this LoRA update was trained on: its "
                                        "model.embed_tokens.weight differs"):
        adapter_base("org/other", None, frozen)
    capsys.readouterr()
    assert adapter_base(None, "org/uncached", frozen) == "org/uncached"
    assert "the adapter's base org/uncached is not in the local Hub cache" in capsys.readouterr().err


def test_a_llama_adapter_merged_into_a_base_of_another_family_is_refused_by_name(tmp_path):
    """load_peft_adapter (--weights ADAPTER) maps a Llama adapter's module names onto a Llama's rows only: a GPT-2
    base (of any shapes) is refused naming why, as read_adapter refuses a served one."""
    from safetensors.torch import save_file

    from tritongpt.errors import UserError
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.gpt2_weights import export_gpt2, load_peft_adapter

    export_gpt2(GPTModel(GPTConfig(vocab_size=V, context_length=16, n_embd=32, n_layer=1, n_head=2)), tmp_path / "gpt2")
    gen = torch.Generator().manual_seed(0)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.randn(2, 32, generator=gen), key.format("B"): torch.randn(32, 2, generator=gen)},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "base_model_name_or_path": str(tmp_path / "gpt2")}))
    with pytest.raises(UserError, match="a peft adapter for Llama, and its base model is no Llama: this model learns "
                                        "position embeddings"):
        load_peft_adapter(tmp_path)
