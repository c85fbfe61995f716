"""read_adapter (train/gpt2_weights.py): a LoRA adapter's A and scale B, unmerged, for multi-LoRA serving, from a
peft folder (GPT-2's, a Llama's) or one of our LoRA checkpoints (float or QLoRA), and each file it refuses."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from parity import assert_close_rel
from test_lora import small, with_trained_lora
from tritongpt.errors import UserError
from tritongpt.model.lora import lora_linears, strip_lora
from tritongpt.train.gpt2_weights import (export_gpt2, export_peft_adapter, load_checkpoint, load_peft_adapter,
                                          read_adapter)

pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(model, adapter):
    """`model` computing x W^T + x A^T B^T in each module the adapter names: the update applied by hand."""
    model = copy.deepcopy(model)
    for name, (a, b) in adapter.items():
        a, b = a.to(model.tok_emb.weight.dtype), b.to(model.tok_emb.weight.dtype)
        model.get_submodule(name).register_forward_hook(lambda m, x, y, a=a, b=b: y + x[0] @ a.t() @ b.t())
    return model


@pytest.fixture(scope="module")
def peft_gpt2(tmp_path_factory):
    """(LoRA model, its frozen base as a Hugging Face folder, its peft adapter folder), by the repo's writers."""
    tmp = tmp_path_factory.mktemp("peft")
    model = with_trained_lora(small(seed=3), rank=3, alpha=5.0).eval()
    export_gpt2(strip_lora(copy.deepcopy(model)), tmp / "base")
    export_peft_adapter(model, tmp / "adapter", str(tmp / "base"))
    return model, tmp / "base", tmp / "adapter"


def test_a_peft_gpt2_adapter_reads_as_load_peft_adapters_merge(peft_gpt2):
    """base W + B A is load_peft_adapter's merged W in every adapted module (both readers agree, c_attn's q/k/v rows
    where they belong), and the base with x A^T B^T added by hand gives the merged model's logits."""
    model, base_dir, adapter_dir = peft_gpt2
    served = load_checkpoint(base_dir).double().eval()
    adapter = read_adapter(adapter_dir, served)
    assert set(adapter) == {name for name, _ in lora_linears(model)}
    merged = load_peft_adapter(adapter_dir).double().eval()
    for name, (a, b) in adapter.items():
        # (the export writes c_attn at rank 9, q's, k's and v's own 3 side by side: each reads back as its own 3)
        assert a.dtype == b.dtype == torch.float32 and a.shape[0] == b.shape[1] == 3
        assert_close_rel(served.get_submodule(name).weight + b.double() @ a.double(),
                         merged.get_submodule(name).weight, 1e-6)
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours, want, base = adapted(served, adapter)(x), merged(x), served(x)
    assert_close_rel(ours, want, 1e-6)
    assert (base - want).abs().max() > 1e-3  # the update counts


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_our_lora_checkpoint_reads_as_its_parametrization(tmp_path, quantized):
    """A = lora_A and B = scale lora_B exactly (float LoRA's parametrization, QLoRA's QuantLinear.lora), read
    from a checkpoint folder; the float base with the update by hand is the LoRA model (a QuantLinear fc1 applies
    GELU itself: no hook after it can add the update before the activation)."""
    from tritongpt.model.quant import quantize

    base = small(seed=5)
    if quantized:
        quantize(base, "int4", head=False, group_size=32)
    model = with_trained_lora(base, rank=2, alpha=7.0, targets="attn,mlp").eval()
    (tmp_path / "ckpt").mkdir()
    model.save(tmp_path / "ckpt" / "model.safetensors")
    served = strip_lora(copy.deepcopy(model))
    adapter = read_adapter(tmp_path / "ckpt", served)
    ups = {name: m.lora if quantized else m.parametrizations.weight[0] for name, m in lora_linears(model)}
    assert set(adapter) == set(ups) and len(ups) == 12
    for name, up in ups.items():
        a, b = adapter[name]
        assert up.scale == 3.5 and torch.equal(a, up.lora_A) and torch.equal(b, up.scale * up.lora_B), name
    if not quantized:
        x = torch.randint(0, 97, (2, 9))
        with torch.no_grad():
            assert_close_rel(adapted(served, adapter)(x), model(x), 1e-5)


def test_rank_and_alpha_patterns_and_rslora_scale_each_module(peft_gpt2, tmp_path):
    """h.0.mlp.c_fc at rank 2 and alpha 3 (rank_pattern, alpha_pattern), the other modules at the config's r and
    lora_alpha; use_rslora divides by sqrt(r)."""
    _, base_dir, adapter_dir = peft_gpt2
    folder = tmp_path / "adapter"
    folder.mkdir()
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_{}.weight"
    tensors[key.format("A")], tensors[key.format("B")] = torch.randn(2, 32), torch.randn(128, 2)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["rank_pattern"]["h.0.mlp.c_fc"], config["alpha_pattern"]["h.0.mlp.c_fc"] = 2, 3
    served = load_checkpoint(base_dir)
    for rslora in (False, True):
        (folder / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": rslora}))
        adapter = read_adapter(folder, served)
        root = (lambda r: r ** 0.5) if rslora else (lambda r: r)
        a, b = adapter["trf_blocks.0.ff.fc1"]
        assert torch.equal(a, tensors[key.format("A")]) and torch.equal(b, 3 / root(2) * tensors[key.format("B")])
        other = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
        assert torch.equal(adapter["trf_blocks.1.ff.fc1"][1], 5 / root(3) * tensors[other])


def test_a_llama_peft_adapter_maps_onto_our_modules(tmp_path):
    """q_proj ... down_proj are W_query ... w_down (train/llama_weights.py's names), grouped-query k/v included."""
    llama = dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, n_kv_head=1, n_head=4)
    served = small(seed=7, **llama)
    ours = {"self_attn.q_proj": "att.W_query", "self_attn.k_proj": "att.W_key", "self_attn.v_proj": "att.W_value",
            "self_attn.o_proj": "att.out_proj", "mlp.gate_proj": "ff.w_gate", "mlp.up_proj": "ff.w_up",
            "mlp.down_proj": "ff.w_down"}
    tensors = {}
    for i in range(2):
        for theirs, mine in ours.items():
            m = served.get_submodule(f"trf_blocks.{i}.{mine}")
            key = f"base_model.model.model.layers.{i}.{theirs}.lora_"
            tensors[key + "A.weight"], tensors[key + "B.weight"] = torch.randn(4, m.in_features), \
                torch.randn(m.out_features, 4)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 6}))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    adapter = read_adapter(tmp_path, served)
    assert len(adapter) == 14
    for i in range(2):
        for theirs, mine in ours.items():
            a, b = adapter[f"trf_blocks.{i}.{mine}"]
            key = f"base_model.model.model.layers.{i}.{theirs}.lora_"
            assert torch.equal(a, tensors[key + "A.weight"]) and torch.equal(b, 1.5 * tensors[key + "B.weight"])
    with pytest.raises(UserError, match="a peft adapter for Llama, and the served model is no Llama: this model "
                                        "learns position embeddings"):
        read_adapter(tmp_path, small())


def _tampered(src, dst, edit):
    """Our checkpoint `src` rewritten to `dst` with edit(tensors) applied, its metadata kept."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(src)
    edit(tensors)
    save_file(tensors, dst, metadata=meta)
    return dst


@pytest.mark.parametrize("config, said", [
    ({"r": 0}, "r is 0; it must be a positive integer"),  # was a ZeroDivisionError
    ({"r": -3}, "r is -3; it must be a positive integer"),  # merged with its sign flipped
    ({"r": "3"}, "r is '3'; it must be a positive integer"),  # TypeError
    ({"lora_alpha": None}, "lora_alpha is None; it must be a finite number"),  # TypeError
    ({"rank_pattern": ["c_attn"]}, "rank_pattern must be an object of module name patterns to values, got list"),
    ({"alpha_pattern": {"(c_attn": 2}}, r"alpha_pattern key '\(c_attn' is not a regular expression"),  # re.error
    ({"rank_pattern": {"c_attn": 0}}, r"rank_pattern\['c_attn'\] is 0; it must be a positive integer"),
    # compiles alone, but peft (and _pattern_value) match it inside (.*\.)?(key)$, where a global flag is an error
    ({"rank_pattern": {"(?i)C_ATTN": 2}}, r"rank_pattern key '\(\?i\)C_ATTN' cannot be matched as peft matches it"),
    ({"integer tensors": True}, r"h.0.attn.c_attn: lora_A is int32, not a float tensor"),  # cast by .float()
])
def test_adapter_config_fields_of_the_wrong_type_are_named(peft_gpt2, tmp_path, config, said):
    """What peft's scale (lora_alpha / r, per module by the patterns) is made of, and the A and B themselves: each
    bad one named by file and field, by both readers (merged, load_checkpoint; unmerged, read_adapter)."""
    _, base_dir, adapter_dir = peft_gpt2
    good = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    if "integer tensors" in config:
        config, tensors = {}, {k: (v * 100).to(torch.int32) for k, v in tensors.items()}
    (tmp_path / "adapter_config.json").write_text(json.dumps({**good, **config}))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    where = "adapter_config.json" if config else "adapter_model.safetensors"
    for read in (load_checkpoint, lambda p: read_adapter(p, small())):
        with pytest.raises(UserError, match=f"{where}: {said}"):
            read(tmp_path)


@pytest.mark.parametrize("key", ["use_rslora", "use_dora"])
def test_adapter_flags_spelled_as_strings_are_refused_by_name(peft_gpt2, tmp_path, key):
    """peft tests use_rslora and use_dora by truth: a "false" was read as rsLoRA's scale (alpha / sqrt(r), another
    model) or refused as DoRA. Anything but true, false or null is refused, naming the file and the key."""
    _, _, adapter_dir = peft_gpt2
    good = json.loads((adapter_dir / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**good, key: "false"}))
    save_file(load_file(adapter_dir / "adapter_model.safetensors"), tmp_path / "adapter_model.safetensors")
    for read in (load_checkpoint, lambda p: read_adapter(p, small())):
        with pytest.raises(UserError, match=f"adapter_config.json has {key} 'false'; it must be true or false"):
            read(tmp_path)


def test_each_file_that_is_no_fitting_adapter_is_refused_by_name(peft_gpt2, tmp_path):
    model, base_dir, adapter_dir = peft_gpt2
    served = load_checkpoint(base_dir)
    plain = tmp_path / "plain.safetensors"
    small().save(plain)
    ckpt = tmp_path / "lora.safetensors"
    model.save(ckpt)
    q = "trf_blocks.0.att.W_query.parametrizations.weight.0.lora_"

    def peft(config=None, edit=None):
        folder = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}"  # one each: the cases are written first
        folder.mkdir()
        good = json.loads((adapter_dir / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**good, **(config or {})}))
        tensors = load_file(adapter_dir / "adapter_model.safetensors")
        (edit or (lambda t: None))(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
        return folder

    def nan(t):
        t["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"][0, 2] = float("nan")

    def foreign(t):
        t["base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight"] = torch.randn(3, 32)

    cases = [
        (plain, served, rf"{plain} has no LoRA \(its config's lora_rank is 0\)"),
        (base_dir, served, "model.safetensors has no LoRA: not a tritongpt checkpoint"),
        (ckpt, small(n_layer=3), r"its config has n_layer 2 \(served: 3\)"),
        (ckpt, small(n_embd=48, n_head=3), r"n_embd 32 \(served: 48\), n_head 2 \(served: 3\)"),
        (_tampered(ckpt, tmp_path / "moved.safetensors",
                   lambda t: t.update({q.replace("W_query", "W_nope") + "A": t.pop(q + "A"),
                                       q.replace("W_query", "W_nope") + "B": t.pop(q + "B")})),
         served, "the adapter adapts trf_blocks.0.att.W_nope, which the served model has no Linear of"),
        (_tampered(ckpt, tmp_path / "wide.safetensors", lambda t: t.update({q + "A": torch.randn(4, 40)})), served,
         r"trf_blocks.0.att.W_query's lora_A \(4, 40\) and lora_B \(32, 3\) do not make an update of the served "
         r"\[32, 32\] weight"),
        (_tampered(ckpt, tmp_path / "nan.safetensors", lambda t: t[q + "B"].fill_(float("inf"))), served,
         "trf_blocks.0.att.W_query's LoRA B holds NaN or inf"),
        (adapter_dir, small(n_layer=1), r"h.1.attn.c_attn: the base has only 1 layers"),
        (adapter_dir, small(n_embd=48, n_head=2), r"h.0.attn.c_attn: lora_A \(9, 32\) and lora_B \(96, 9\) do "
                                                  r"not make an update of its \[48, 144\] weight"),
        (peft(edit=nan), served, "trf_blocks.1.ff.fc2's LoRA A holds NaN or inf"),
        (peft({"use_dora": True}), served, "use_dora is True; only a plain LoRA adapter"),
        (peft(edit=foreign), served, "gpt_neox.layers.0.attention.query_key_value.lora_A.weight' is not a LoRA A "
                                     "or B of GPT-2's c_attn, c_proj or c_fc, nor of a Llama's"),
        (adapter_dir, small(norm="rmsnorm"), "a peft adapter for GPT-2, and the served model is no GPT-2: this model "
                                             "normalizes with rmsnorm"),
    ]
    for path, model_, said in cases:
        with pytest.raises(UserError, match=said):
            read_adapter(path, model_)
