"""Qwen2-MoE folders (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B; train/moe_weights.py) and the shared expert they bring
(GPTConfig.moe_shared_hidden: MoEFeedForward's shared_expert and its sigmoid gate). Tiny random
Qwen2MoeForCausalLM models saved to tmp_path (float64, every tensor jittered so no gate or bias is a no-op; 4
experts of 32, top 2, a shared expert of 48, q/k/v biases): logits on both kernel paths, the export read back by
transformers, the KV-cache decode and greedy tokens, the merged expert layout, windows by layer_types,
refusals by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

VOCAB, CTX, T = 53, 40, 11
E, K, C, H, S = 4, 2, 64, 32, 48


def hf_qwen2_moe(folder, layers=2, **config):
    """A tiny random Qwen2MoeForCausalLM in float64 saved to folder (norm_topk_prob false, Qwen1.5-MoE's).
    -> (the model, its model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=C, intermediate_size=96, moe_intermediate_size=H,
        shared_expert_intermediate_size=S, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CTX, tie_word_embeddings=False, num_experts=E, num_experts_per_tok=K,
        norm_topk_prob=False, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        experts_implementation="eager", **config)  # (grouped_mm: no float64)
    hf = transformers.Qwen2MoeForCausalLM(cfg).double().eval()
    with torch.no_grad():  # zero biases, unit norms and zero routers would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def test_a_folder_loads_its_fields_and_matches_transformers_on_both_paths(tmp_path):
    hf, path = hf_qwen2_moe(tmp_path)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.n_experts, c.experts_per_token, c.ff_hidden, c.moe_shared_hidden, c.moe_norm_topk) == (E, K, H, S, False)
    assert (c.qkv_bias_only, c.bias, c.qk_norm, c.attention_window, c.moe_aux_loss) == (True, False, False, 0, 0.0)
    logits_match_transformers(hf, model, VOCAB, T)  # reference within 2e-6, Triton (fp32) within 1e-5


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    from tritongpt.train.generate import generate

    hf, path = hf_qwen2_moe(tmp_path, layers=1)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    ours = generate(model, idx[:, :3], 6)
    theirs = hf.generate(idx[:, :3], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_the_shared_expert_and_its_gate_change_the_logits(tmp_path):
    """The shared expert and its gate both matter here: dropping either (the gate's sigmoid taken as 1, or the
    shared expert's output as 0) moves the logits far past the tolerance the folder's model is held to."""
    hf, path = hf_qwen2_moe(tmp_path, layers=1)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        want = hf(idx).logits
        assert_close_rel(model(idx), want, 2e-6, "with the shared expert")
        ff = model.trf_blocks[0].ff
        gate = ff.shared_gate.weight.clone()
        ff.shared_gate.weight.fill_(1e4)  # sigmoid 1 for every token: the gate dropped
        assert (model(idx) - want).abs().max() > 1e-2
        ff.shared_gate.weight.copy_(gate)
        ff.shared_expert.w_down.weight.zero_()  # the shared expert dropped
        assert (model(idx) - want).abs().max() > 1e-2


def test_both_paths_agree_on_loss_and_every_gradient_with_a_shared_expert():
    """fp32, one layer: the Triton path (grouped moe_mlp for the routed experts, kernels/swiglu.py for the shared
    one) gives the reference path's logits, loss and every gradient, the shared expert's and its gate's included;
    the state dict is the same module's on both (its shared_expert.* and shared_gate names)."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=C, n_layer=1, n_head=4, mlp="swiglu",
                               mlp_hidden=H, n_experts=E, experts_per_token=K, position_encoding="rope",
                               norm="rmsnorm", bias=False, moe_shared_hidden=S, moe_aux_loss=0.05))
    with torch.no_grad():
        model.trf_blocks[0].ff.shared_gate.weight.normal_(0, 0.3)  # a gate that varies by token
    idx, targets = torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5))
    results = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        assert model.trf_blocks[0].ff.shared_expert.use_triton == (kernels == "triton")
        model.zero_grad()
        loss = model(idx, targets=targets)
        loss.backward()
        results[kernels] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss_ref, g_ref), (loss_tri, g_tri) = results["reference"], results["triton"]
    assert_close_rel(loss_tri, loss_ref, 1e-4, "loss")
    assert {"trf_blocks.0.ff.shared_gate.weight", "trf_blocks.0.ff.shared_expert.w_down.weight"} <= set(g_ref)
    for name in g_ref:
        assert_close_rel(g_tri[name], g_ref[name], 1e-4, name)
    assert g_ref["trf_blocks.0.ff.shared_gate.weight"].abs().sum() > 0


def test_export_round_trips_through_transformers_and_the_merged_layout_reads(tmp_path):
    """Loaded, exported (one tensor per expert, the Hub's names), read by transformers' AutoModelForCausalLM: the
    same logits; load_checkpoint reads it back to the same config; transformers 5's merged layout (gate_up_proj,
    down_proj) reads to the same logits."""
    from safetensors.torch import load_file, save_file

    from tritongpt.train.moe_weights import export_moe

    transformers = pytest.importorskip("transformers")
    hf, path = hf_qwen2_moe(tmp_path / "in")
    model = load_checkpoint(path).double().eval()
    export_moe(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["shared_expert_intermediate_size"], d["norm_topk_prob"]) == ("qwen2_moe", S, False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    assert type(back).__name__ == "Qwen2MoeForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        want = hf(idx).logits
        assert_close_rel(back(idx).logits, want, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    sd = load_file(path)
    for i in range(2):
        pre = f"model.layers.{i}.mlp.experts"
        names = [[f"{pre}.{e}.{w}.weight" for e in range(E)] for w in ("gate_proj", "up_proj", "down_proj")]
        sd[f"{pre}.gate_up_proj"] = torch.cat([torch.stack([sd.pop(n) for n in names[0]]),
                                               torch.stack([sd.pop(n) for n in names[1]])], 1)
        sd[f"{pre}.down_proj"] = torch.stack([sd.pop(n) for n in names[2]])
    save_file(sd, path)
    with torch.no_grad():
        assert_close_rel(load_checkpoint(path).double().eval()(idx), want, 2e-6, "the merged layout")


def test_a_window_in_the_layers_layer_types_names_reads_and_exports(tmp_path):
    """use_sliding_window with layer_types: the window in the layers it names (transformers 5 fills layer_types
    in: the even layers below max_window_layers), the same logits over a context longer than the window, and the
    export writes those layers back."""
    from tritongpt.train.moe_weights import export_moe

    transformers = pytest.importorskip("transformers")
    hf, path = hf_qwen2_moe(tmp_path / "in", layers=3, use_sliding_window=True, sliding_window=4,
                            max_window_layers=3)
    model = load_checkpoint(path).double().eval()
    assert (model.config.attention_window, model.config.window_layers) == (4, "0,2")
    idx = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "windowed")
    export_moe(model, tmp_path / "out", eos_token_id=1)
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert back.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert back.sliding_window == 4


@pytest.mark.parametrize("change,match", [
    ({"mlp_only_layers": [0, 1]}, "leave no layer of its 2 a mixture of experts"),
    ({"mlp_only_layers": [-1]}, r"mlp_only_layers \[-1\]; it must be a list of layer indices below"),
    ({"n_shared_experts": 2}, r"n_shared_experts 2 \(shared experts beside the routed ones, as DeepSeek's, "
                              r"ungated\); Qwen2-MoE routes every token to its top k experts and one shared expert"),
    ({"shared_expert_intermediate_size": 16}, "shared_expert_intermediate_size 16, but the shared expert's weights "
                                              "have 48"),
    ({"use_sliding_window": True, "layer_types": None}, "use_sliding_window true and no layer_types"),
    ({"qkv_bias": "true"}, "config.json has qkv_bias 'true'; it must be true or false"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's experts compute 'silu' only"),
])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_qwen2_moe, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_the_field_is_checked_and_the_export_refuses_what_qwen2_moe_lacks():
    from tritongpt.commands import export_target

    base = dict(vocab_size=VOCAB, context_length=CTX, n_embd=C, n_layer=2, n_head=4, mlp="swiglu", mlp_hidden=H,
                n_experts=E, position_encoding="rope", norm="rmsnorm", bias=False, moe_shared_hidden=S)
    with pytest.raises(UserError, match="GPTConfig.moe_shared_hidden 48 is the width of a shared expert beside "
                                        "routed ones, and this model has none"):
        GPTConfig(**{**base, "n_experts": 0})
    with pytest.raises(UserError, match="GPTConfig.moe_shared_hidden must be an integer >= 0, got -1"):
        GPTConfig(**{**base, "moe_shared_hidden": -1})
    assert export_target(GPTConfig(**base))[0] == "Qwen2-MoE"
    for change, match in (({"qk_norm": True}, "normalizes q and k .qk_norm., where Qwen2-MoE"),
                          ({"bias": True}, "has biases, where Qwen2-MoE has none but on q, k and v"),
                          ({"qkv_bias_only": True, "moe_shared_hidden": 0}, "has biases on q, k and v only "
                           r"\(Qwen2's\), where Mixtral has none")):
        cfg = GPTConfig(**{**base, **change})
        with pytest.raises(UserError, match=match):
            export_target(cfg)[1](GPTModel(cfg), "a folder")
