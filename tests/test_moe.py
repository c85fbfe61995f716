"""Mixture-of-experts MLPs (GPTConfig.n_experts: layers.MoEFeedForward, its Triton path through
kernels/swiglu.py per expert) and the Mixtral, Qwen3-MoE and OLMoE folders (train/moe_weights.py).
Tiny models (2 layers, 4 experts, top 2, n_embd 64, experts of 32): the module against a float64 loop
over tokens, both kernel paths' logits, loss and every gradient, the load-balancing loss against
transformers' load_balancing_loss_func; tiny random transformers models saved to tmp_path (float64,
every tensor jittered): logits on both paths, the KV-cache decode, greedy tokens, export round trips,
refusals by name, a pretrain --init step. Nothing downloaded."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from parity import assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import MoEFeedForward
from tritongpt.train.gpt2_weights import load_checkpoint

VOCAB, CTX, T = 53, 40, 19
E, K, C, H = 4, 2, 64, 32


def moe_config(**kw):
    return GPTConfig(**{**dict(vocab_size=VOCAB, context_length=CTX, n_embd=C, n_layer=2, n_head=4, n_kv_head=2,
                               mlp="swiglu", mlp_hidden=H, n_experts=E, experts_per_token=K, position_encoding="rope",
                               norm="rmsnorm", bias=False, tie_weights=False), **kw})


def loop_moe(moe, x):
    """The MoE output token by token in float64: softmax over the router's scores, the k largest, their
    weights renormalized (norm_topk) or not, each chosen expert's act(x Wg^T) * (x Wu^T) Wd^T times its weight."""
    act = {"silu": F.silu, "gelu": lambda g: F.gelu(g, approximate="tanh")}[moe.activation]
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        p = torch.softmax(x[n] @ moe.router.weight.t(), -1)
        order = sorted(range(moe.n_experts), key=lambda e: -p[e].item())[:moe.top_k]
        total = sum(p[e] for e in order) if moe.norm_topk else 1.0
        for e in order:
            h = act(moe.w_gate[e] @ x[n]) * (moe.w_up[e] @ x[n])
            out[n] += p[e] / total * (moe.w_down[e] @ h)
    return out


@pytest.mark.parametrize("top_k,norm_topk,activation", [(2, True, "silu"), (2, False, "silu"), (1, True, "gelu"),
                                                        (3, False, "gelu")])
def test_the_module_is_a_float64_loop_over_tokens(top_k, norm_topk, activation):
    torch.manual_seed(0)
    moe = MoEFeedForward(C, H, E, top_k, norm_topk, activation=activation).double()
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)  # spread the scores: each top k is a clear choice
    x = torch.randn(3, 5, C, dtype=torch.float64)
    with torch.no_grad():
        got = moe(x)
        assert moe.router_logits.shape == (15, E)
        assert_close_rel(got.view(15, C), loop_moe(moe, x.view(15, C)), 1e-12, "MoE against the loop")


def _idle_expert_model(**kw):
    """A fp32 model whose routers leave some expert without a token in some layer for a (2, 5) batch: the seed
    is searched, as which expert idles depends on it. -> (model, idx, targets)."""
    for seed in range(100):
        torch.manual_seed(seed)
        model = GPTModel(moe_config(**kw))
        idx, targets = torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5))
        with torch.no_grad():
            model(idx)
        used = [b.ff.router_logits.softmax(-1).topk(K).indices.unique().numel() for b in model.trf_blocks]
        if min(used) < E:
            return model, idx, targets
    raise AssertionError("no seed idles an expert")


def test_reference_and_triton_paths_agree_on_loss_and_every_gradient(monkeypatch):
    """fp32, aux loss on: the logits, the loss and every parameter's gradient (the routers' and the idle
    expert's zero slice included) within 1e-4 relative. The Triton path is one grouped moe_mlp call a layer."""
    import tritongpt.kernels.moe as moe

    calls, real = [], moe.moe_mlp

    def counted(x, experts, *args, **kw):
        calls.append(tuple(experts.shape))
        return real(x, experts, *args, **kw)

    monkeypatch.setattr(moe, "moe_mlp", counted)
    model, idx, targets = _idle_expert_model(moe_aux_loss=0.05)
    results = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        model.zero_grad()
        with torch.no_grad():
            logits = model(idx)
        loss = model(idx, targets=targets)
        loss.backward()
        results[kernels] = logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (l_ref, loss_ref, g_ref), (l_tri, loss_tri, g_tri) = results["reference"], results["triton"]
    assert calls == [(idx.numel(), K)] * (2 * len(model.trf_blocks))  # two forwards, each layer once
    assert_close_rel(l_tri, l_ref, 1e-4, "logits")
    assert_close_rel(loss_tri, loss_ref, 1e-4, "loss")
    assert set(g_ref) == set(g_tri) and "trf_blocks.0.ff.router.weight" in g_ref
    for name in g_ref:
        assert_close_rel(g_tri[name], g_ref[name], 1e-4, name)
    assert g_ref["trf_blocks.1.ff.router.weight"].abs().sum() > 0


def test_a_model_that_ran_a_training_forward_can_be_copied_and_pickled():
    """The router logits a training forward leaves on the module (a non-leaf tensor of its graph) made copy.deepcopy
    and pickling refuse the model ("Only Tensors created explicitly by the user support the deepcopy protocol")."""
    import copy
    import io

    torch.manual_seed(0)
    model = GPTModel(moe_config(n_layer=1))
    idx = torch.randint(0, VOCAB, (2, 7))
    model(idx).sum().backward()
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        want = model(idx)
        assert torch.equal(twin(idx), want) and torch.equal(loaded(idx), want)
    assert model.trf_blocks[0].ff.router_logits is not None  # (the original keeps its own)


def test_the_aux_loss_is_transformers_load_balancing_loss():
    """router_aux_loss on a forward's router logits is transformers' load_balancing_loss_func on them (value and
    gradient as a function of the logits), and forward(targets=) adds moe_aux_loss times it to the mean loss."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tritongpt.model.layers import load_balancing_loss

    torch.manual_seed(1)
    model = GPTModel(moe_config(moe_aux_loss=0.03))
    with torch.no_grad():
        for b in model.trf_blocks:
            b.ff.router.weight.normal_(0, 0.3)  # an uneven load: the loss well above its even value k
    idx, targets = torch.randint(0, VOCAB, (3, 7)), torch.randint(0, VOCAB, (3, 7))
    with_aux = model(idx, targets=targets)
    logits = [b.ff.router_logits.detach().clone().requires_grad_() for b in model.trf_blocks]
    ours = load_balancing_loss(logits, K)
    load_balancing_loss([b.ff.router_logits for b in model.trf_blocks], K).backward()  # the kept logits' graph
    assert all(b.ff.router.weight.grad.abs().sum() > 0 for b in model.trf_blocks), "the aux loss misses a router"
    theirs = load_balancing_loss_func(tuple(logits), E, K)
    assert_close_rel(ours, theirs, 1e-6, "aux loss")
    assert ours.item() > K * 1.01
    dours, dtheirs = torch.autograd.grad(ours, logits), torch.autograd.grad(theirs, logits)
    for i, (a, b) in enumerate(zip(dours, dtheirs)):
        assert_close_rel(a, b, 1e-6, f"aux loss gradient, layer {i}")
    model.config.moe_aux_loss = 0.0
    plain = model(idx, targets=targets)
    assert math.isclose(with_aux.item() - plain.item(), 0.03 * ours.item(), rel_tol=1e-5)
    assert model(idx, targets=targets, reduction="none").shape == (3, 7)  # per-token losses: no aux term


def test_activation_checkpointing_and_a_saved_model_keep_the_function(tmp_path):
    torch.manual_seed(2)
    model = GPTModel(moe_config(moe_aux_loss=0.1, moe_norm_topk=False, experts_per_token=3))
    idx = torch.randint(0, VOCAB, (2, 9))
    grads = []
    for on in (False, True):
        model.set_activation_checkpointing(on)
        model.zero_grad()
        model(idx, targets=idx).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close_rel(grads[1][name], grads[0][name], 1e-6, name)
    model.save(tmp_path / "m.safetensors")
    back = GPTModel.load(tmp_path / "m.safetensors")
    assert (back.config.n_experts, back.config.experts_per_token, back.config.moe_norm_topk,
            back.config.moe_aux_loss) == (E, 3, False, 0.1)
    with torch.no_grad():
        assert torch.equal(back.eval()(idx), model.eval()(idx))


def test_a_half_module_routes_on_fp32_probabilities():
    """A bf16 module's softmax is taken in fp32, as transformers' routers do: its weights come back fp32 and are
    the fp32 softmax of the bf16 logits (bf16's own would round each weight to 8 bits)."""
    torch.manual_seed(3)
    moe = MoEFeedForward(C, H, E, K).bfloat16()
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    logits, weights, experts = moe.route(torch.randn(11, C).bfloat16())
    want, chosen = torch.softmax(logits.float(), -1).topk(K, dim=-1)
    assert weights.dtype == torch.float32 and torch.equal(experts, chosen)
    assert torch.equal(weights, want / want.sum(-1, keepdim=True))


def test_under_bf16_autocast_both_paths_give_the_experts_bf16_output_and_fp32_gradients():
    """fp32 weights under bf16 autocast (pretrain --dtype bf16 on the reference path, the CPU's): each expert's
    output is bf16, as the dense MLP's; the reference path summed it into an fp32 zeros_like(x) with index_add_,
    which refuses a bf16 source, so an MoE model could not train under autocast. Both paths within bf16's 1e-2 of
    a float64 module, input and weight gradients too."""
    import copy

    torch.manual_seed(4)
    moe = MoEFeedForward(C, H, E, K)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 7, C)
    dy = torch.randn(2, 7, C)
    moe64, x64 = copy.deepcopy(moe).double(), x.double().requires_grad_()
    (moe64(x64) * dy.double()).sum().backward()
    for triton in (False, True):
        moe.use_triton = triton
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(xi)
        assert y.dtype == torch.bfloat16, (triton, y.dtype)
        (y.float() * dy).sum().backward()
        assert_close_rel(y, moe64(x64), 1e-2, f"triton={triton} y")
        assert_close_rel(xi.grad, x64.grad, 1e-2, f"triton={triton} dx")
        for (name, p), p64 in zip(moe.named_parameters(), moe64.parameters()):
            assert p.grad.dtype == torch.float32
            assert_close_rel(p.grad, p64.grad, 1e-2, f"triton={triton} {name}.grad")


def test_the_triton_path_keeps_the_modules_activation_and_dropout():
    """GeGLU experts through the kernel match the reference path; in training both paths drop the output at the
    module's rate (p 0.5: about half the entries zeroed, the rest doubled), and eval drops nothing."""
    torch.manual_seed(4)
    moe = MoEFeedForward(C, H, E, K, dropout=0.5, activation="gelu").eval()
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
        moe.w_gate.normal_(0, 0.3)  # g over gelu's curved region, where it is far from silu
        x = torch.randn(2, 7, C)
        ref = moe(x)
        moe.use_triton = True
        assert_close_rel(moe(x), ref, 1e-4, "GeGLU experts: Triton path against the reference")
        moe.train()
        for use_triton in (True, False):
            moe.use_triton = use_triton
            y = moe(x)
            kept = y != 0
            assert 0.3 < kept.float().mean() < 0.7, f"use_triton {use_triton}: no dropout"
            assert_close_rel(y[kept], 2 * ref[kept], 1e-4, f"use_triton {use_triton}: the kept entries")
    ff = GPTModel(moe_config(mlp="geglu", moe_norm_topk=False)).trf_blocks[0].ff  # what GPTConfig sets
    assert (ff.activation, ff.norm_topk) == ("gelu", False)


@pytest.mark.parametrize("change,match", [
    ({"n_experts": -1}, "GPTConfig.n_experts must be an integer >= 0"),
    ({"n_experts": 2.5}, "GPTConfig.n_experts must be an integer"),
    ({"experts_per_token": 0}, "GPTConfig.experts_per_token must be an integer >= 1"),
    ({"experts_per_token": 5}, "experts_per_token 5 is more than the n_experts 4"),
    ({"moe_norm_topk": "yes"}, "GPTConfig.moe_norm_topk must be True or False"),
    ({"moe_aux_loss": -0.1}, "GPTConfig.moe_aux_loss must be a finite number >= 0"),
    ({"moe_aux_loss": float("nan")}, "GPTConfig.moe_aux_loss must be a finite number"),
    ({"n_experts": 0, "moe_aux_loss": 0.01}, "moe_aux_loss 0.01 balances a router's load.*n_experts 0"),
    ({"mlp": "gelu", "mlp_hidden": 0}, "n_experts 4: the experts are gated MLPs.*mlp is 'gelu'"),
    ({"lora_rank": 4}, "lora_targets 'mlp'.*4 experts \\(n_experts\\)"),
])
def test_the_fields_are_checked_by_name(change, match):
    with pytest.raises(UserError, match=match):
        moe_config(**change)


def test_the_commands_default_lora_targets_leave_the_experts_out(capsys):
    """No --lora-targets on a mixture-of-experts model: LoRA on the attention, said (the dense default, attn,mlp,
    would be refused); named targets are still the user's."""
    from argparse import Namespace

    from tritongpt.commands import apply_lora

    model = apply_lora(GPTModel(moe_config()), Namespace(lora_rank=2, lora_alpha=4.0, lora_targets=None))
    assert model.config.lora_targets == "attn"
    assert "LoRA on the attention only: this model's MLPs are 4 experts" in capsys.readouterr().err
    with pytest.raises(UserError, match="LoRA target 'mlp'.*4 experts"):
        apply_lora(GPTModel(moe_config()), Namespace(lora_rank=2, lora_alpha=4.0, lora_targets="mlp"))


def test_lora_adapts_the_attention_and_refuses_the_experts():
    from tritongpt.model.lora import add_lora

    model = GPTModel(moe_config())
    with pytest.raises(UserError, match="LoRA target 'mlp'.*4 experts.*--lora-targets attn"):
        add_lora(model, 4, targets="attn,mlp")
    add_lora(model, 4, targets="attn")
    idx = torch.randint(0, VOCAB, (1, 6))
    model(idx, targets=idx).backward()
    assert model.trf_blocks[0].att.W_query.parametrizations.weight[0].lora_B.grad is not None
    assert model.trf_blocks[0].ff.w_gate.grad is None  # frozen


# -- Mixtral, Qwen3-MoE, OLMoE folders -------------------------------------------------------------------
KINDS = ("mixtral", "qwen3_moe", "olmoe")
CLASSES = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe"}


def hf_moe(folder, kind="mixtral", layers=2, vocab=VOCAB, context=CTX, **config):
    """A tiny random MixtralForCausalLM, Qwen3MoeForCausalLM or OlmoeForCausalLM in float64 (4 experts of 32, top
    2, heads of 16, 2 KV heads; Qwen3-MoE's top 2 renormalized), saved to folder, EOS 1 and BOS 2.
    -> (the model, its model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    experts = {"num_local_experts": E} if kind == "mixtral" else {"num_experts": E}
    if kind == "qwen3_moe":
        experts.update(moe_intermediate_size=H, norm_topk_prob=True)
    cls = CLASSES[kind]
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=vocab, hidden_size=C, intermediate_size=H, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=False, num_experts_per_tok=K,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, experts_implementation="eager",  # grouped_mm: no float64
        **{"rms_norm_eps": 1e-6, **experts, **config})
    hf = getattr(transformers, cls + "ForCausalLM")(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero routers would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_loads_its_fields_and_matches_transformers_on_both_paths(tmp_path, kind):
    hf, path = hf_moe(tmp_path, kind)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.n_experts, c.experts_per_token, c.ff_hidden, c.mlp, c.norm, c.bias, c.kv_heads) == \
        (E, K, H, "swiglu", "rmsnorm", False, 2)
    assert c.moe_norm_topk == (kind != "olmoe")
    assert (c.qk_norm, c.qk_norm_width) == {"mixtral": (False, "head"), "qwen3_moe": (True, "head"),
                                            "olmoe": (True, "all")}[kind]
    logits_match_transformers(hf, model, VOCAB, T)
    # the fields tiny folders all share are read too: another top k and another norm eps
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "num_experts_per_tok": 3,
                                    "rms_norm_eps": 1e-5}))
    c = load_checkpoint(path).config
    assert (c.experts_per_token, c.norm_eps) == (3, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path, kind):
    from tritongpt.train.generate import generate

    hf, path = hf_moe(tmp_path, kind)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trips_through_transformers(tmp_path, kind):
    """Loaded, exported (one tensor per expert, the Hub's names), read by transformers' AutoModelForCausalLM: the
    same logits and model_type; load_checkpoint reads it back to the same config; transformers' fused layout
    (gate_up_proj, down_proj) is read too."""
    from safetensors.torch import load_file, save_file

    from tritongpt.train.moe_weights import export_moe

    transformers = pytest.importorskip("transformers")
    hf, path = hf_moe(tmp_path / "in", kind)
    model = load_checkpoint(path).double().eval()
    export_moe(model, tmp_path / "out", eos_token_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    assert type(back).__name__ == CLASSES[kind] + "ForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        want = hf(idx).logits
        assert_close_rel(back(idx).logits, want, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    if kind != "mixtral":  # Qwen3-MoE and OLMoE renormalize the top k or not: the export says which the model does
        cfg_json = tmp_path / "in" / "config.json"
        saved = cfg_json.read_text()
        for norm in (True, False):
            cfg_json.write_text(json.dumps({**json.loads(saved), "norm_topk_prob": norm}))
            export_moe(load_checkpoint(path), tmp_path / f"out-{norm}", eos_token_id=1)
            assert json.loads((tmp_path / f"out-{norm}" / "config.json").read_text())["norm_topk_prob"] is norm
        cfg_json.write_text(saved)
    # the fused layout: gate_up_proj [E, 2H, C] (gate rows first) and down_proj [E, C, H]
    sd = load_file(path)
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(2):
        pre = f"model.layers.{i}.{block}.experts"
        names = [[f"{pre}.{e}.{w}.weight" for e in range(E)] for w in (gate, up, down)]
        sd[f"{pre}.gate_up_proj"] = torch.cat([torch.stack([sd.pop(n) for n in names[0]]),
                                               torch.stack([sd.pop(n) for n in names[1]])], 1)
        sd[f"{pre}.down_proj"] = torch.stack([sd.pop(n) for n in names[2]])
    save_file(sd, path)
    fused = load_checkpoint(path).double().eval()
    with torch.no_grad():
        assert_close_rel(fused(idx), want, 2e-6, "the fused layout")
    sd[f"{pre}.gate_up_proj"] = sd[f"{pre}.gate_up_proj"][:, 1:].contiguous()  # 2H - 1 rows: no halves
    save_file(sd, path)
    odd = rf"layers.1.{block}.experts.gate_up_proj has shape \({E}, {2 * H - 1}, {C}\), not \[experts, 2 hidden"
    with pytest.raises(UserError, match=odd):
        load_checkpoint(path)


@pytest.mark.parametrize("kind,change,match", [
    ("qwen3_moe", {"shared_expert_intermediate_size": 16},
     "shared_expert_intermediate_size 16 \\(a gated shared expert, Qwen2-MoE's: read under model_type qwen2_moe\\)"),
    ("olmoe", {"n_shared_experts": 2}, "n_shared_experts 2 \\(shared experts beside the routed ones, as DeepSeek's"),
    ("mixtral", {"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'.*softmax then top k"),
    # dense layers are read (tests/test_moe_layers.py); a set that names no layer, or none sparse, is refused
    ("qwen3_moe", {"mlp_only_layers": [2]}, "mlp_only_layers \\[2\\]; it must be a list of layer indices below "
                                            "num_hidden_layers 2"),
    ("qwen3_moe", {"mlp_only_layers": [1], "decoder_sparse_step": 2}, "leave no layer of its 2 a mixture of experts"),
    ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step 0; it must be an integer >= 1"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "layer 1 is dense .*'layers.1.mlp.gate_proj.weight' \\(its MLP\\) is "
                                            "missing"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv 8.0; this model does not clamp"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's experts compute 'silu' only"),
    ("mixtral", {"num_local_experts": 8}, "num_local_experts 8, but the router scores 4 experts"),
    ("qwen3_moe", {"moe_intermediate_size": 48}, "intermediate_size 48, but the weights have 32"),
    ("olmoe", {"num_experts": 8}, "num_experts 8, but the router scores 4 experts"),
    ("olmoe", {"attention_bias": True}, "attention_bias True and mlp_bias None; this model reads OLMoE without biases"),
    ("mixtral", {"router_type": "expert_choice"}, "router_type 'expert_choice' and scoring_func 'softmax'"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ("qwen3_moe", {"num_experts_per_tok": "2"},
     r"config\.json: num_experts_per_tok \(GPTConfig\.experts_per_token\) must be an integer >= 1, got '2'"),
    ("mixtral", {"max_position_embeddings": 40.0},
     r"config\.json: max_position_embeddings \(GPTConfig\.context_length\) must be a positive integer, got 40\.0"),
    # bool("false") is True: a flag spelled as a string is refused by name
    ("qwen3_moe", {"norm_topk_prob": "false"}, "config.json has norm_topk_prob 'false'; it must be true or false"),
    ("olmoe", {"attention_bias": "false"}, "config.json has attention_bias 'false'; it must be true or false"),
])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, kind, change, match):
    path = hf_copy(hf_moe, tmp_path, kind)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_without_a_rope_base_reads_the_familys_default_as_transformers(hf_copy, tmp_path, kind):
    """A config.json that says no rope_theta: MixtralConfig's base is 1000000 (in 4.x and 5), Qwen3-MoE's and
    OLMoE's 10000. Mixtral's was read as 10000 here: another model."""
    transformers = pytest.importorskip("transformers")
    path = hf_copy(hf_moe, tmp_path, kind)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d["rope_parameters"].pop("rope_theta")
    cfg_json.write_text(json.dumps(d))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"]
    assert load_checkpoint(path).config.rope_theta == theirs == (1e6 if kind == "mixtral" else 1e4)


@pytest.mark.parametrize("kind, window", [("mixtral", 0), ("qwen3_moe", 4096)])
def test_a_config_without_a_sliding_window_reads_the_familys_default_as_transformers(hf_copy, tmp_path, kind, window):
    """A config.json that names no sliding_window: MixtralConfig's default is none (it was read as Mistral's 4096
    here: a window transformers does not have), Qwen3MoeConfig's 4096 where use_sliding_window says so (it was
    read as none)."""
    transformers = pytest.importorskip("transformers")
    path = hf_copy(hf_moe, tmp_path, kind)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d.pop("sliding_window", None)
    cfg_json.write_text(json.dumps({**d, "use_sliding_window": True} if kind == "qwen3_moe" else d))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).sliding_window
    assert (load_checkpoint(path).config.attention_window, theirs) == (window, window or None)


def test_other_exports_refuse_experts_and_the_moe_export_refuses_what_its_families_lack(tmp_path):
    from tritongpt.commands import export_target
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.olmo_weights import export_olmo

    model = GPTModel(moe_config())
    assert export_target(model.config)[0] == "Mixtral"
    assert export_target(moe_config(qk_norm=True))[0] == "Qwen3-MoE"
    assert export_target(moe_config(qk_norm=True, qk_norm_width="all"))[0] == "OLMoE"
    for export, family in ((export_gpt2, "GPT-2"), (export_llama, "Llama"), (export_olmo, "OLMo 2")):
        with pytest.raises(UserError, match=f"4 experts with a router \\(n_experts.*Hugging Face's {family} does "
                                            "not have: it cannot be exported"):
            export(model, tmp_path / "x")
    refuse = export_target(model.config)[1]
    for change, match in (({"moe_norm_topk": False}, "does not renormalize its top k.*Mixtral always does"),
                          ({"mlp": "geglu"}, "has GEGLU experts, where Mixtral's are SwiGLU"),
                          ({"bias": True}, "has biases, where Mixtral has none"),
                          ({"attention_window": 4, "window_layers": "odd"}, "layers odd only, where Mixtral's"),
                          ({"logit_softcap": 30.0}, "soft-caps its logits"),
                          ({"nope_layers": "1"}, r"has layers without RoPE \(1\), which Mixtral does not"),
                          ({"qk_norm": True, "qk_norm_width": "all", "attention_window": 4},
                           "has local attention, which OLMoE does not"),
                          ({"qk_norm": True, "attention_window": 4, "window_layers": "odd"},
                           "local attention in layers odd only, where Qwen3-MoE's window is in every layer"),
                          ({"qk_norm": True, "qk_norm_width": "each"},
                           "weights of that head's own .*which Hugging Face's Qwen3-MoE does not")):
        other = GPTModel(moe_config(**change))
        with pytest.raises(UserError, match=match):
            export_target(other.config)[1](other, "a Mixtral folder")
    refuse(model, "a Mixtral folder")  # a plain one passes


def test_pretrain_from_a_mixtral_folder_trains_and_exports_back(corpus, tmp_path, capsys):
    """--init a Mixtral folder with --moe-aux-loss, train a step, export: a Mixtral folder that transformers runs
    with our logits; `info` shows the MoE fields; --n-experts that differs from --init's is refused by name."""
    from tritongpt.cli import main

    transformers = pytest.importorskip("transformers")
    hf_moe(tmp_path / "m", vocab=300, context=64, rms_norm_eps=1e-5)
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "m"), "--max-steps", "1",
                              "--moe-aux-loss", "0.01")) == 0
    out = capsys.readouterr().out
    assert "4 experts (top 2" in out
    model = load_checkpoint(tmp_path / "run").eval()
    assert (model.config.n_experts, model.config.moe_aux_loss) == (E, 0.01)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    assert main(["info", "--weights", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "n_experts       4" in out and "moe_aux_loss    0.01" in out
    assert main(pretrain_argv(corpus, tmp_path / "run2", "--init", str(tmp_path / "m"), "--max-steps", "1",
                              "--n-experts", "8")) == 2
    assert "--n-experts 8 would change what --init's model computes (its n_experts is 4)" in capsys.readouterr().err


def test_a_resume_that_would_change_the_experts_is_refused_by_name():
    from types import SimpleNamespace

    from tritongpt.train.loop import Trainer, flops_per_token

    saved = moe_config().to_dict()
    Trainer._check_same_function(SimpleNamespace(_cfg=moe_config(), name="pretrain"), "ckpt", saved)
    for change, refused in (({"n_experts": 0}, "routes each token to 2 of 4 experts \\(weights renormalized\\), this "
                                               "run's model has a dense MLP: pass --n-experts 4 --experts-per-token 2"),
                            ({"experts_per_token": 1}, "this run's model routes each token to 1 of 4 experts"),
                            ({"moe_norm_topk": False}, "\\(weights not renormalized\\): pass the run's own --init")):
        cfg = moe_config(**change)
        with pytest.raises(UserError, match=refused):
            Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt", saved)
    # the experts' other fields change the function (and the state dict: a shared expert's weights, the biases),
    # refused by name before the weights' load would fail on their shapes
    for change, refused in (({"moe_shared_hidden": 8}, "no shared expert.*this run's model has .*a shared "
                                                       "expert of width 8"),
                            ({"moe_bias": True}, "has no router and expert biases.*this run's model .*has router"),
                            ({"moe_activation": "gpt_oss"}, "computes the gated MLP mlp names; this run's model .*"
                                                            "computes GPT-OSS's clamped SwiGLU \\(limit 7, alpha 1.702")):
        with pytest.raises(UserError, match=refused + ".*: pass the run's own --init"):
            Trainer._check_same_function(SimpleNamespace(_cfg=moe_config(**change), name="pretrain"), "ckpt", saved)
    oss = moe_config(moe_activation="gpt_oss", moe_bias=True)
    with pytest.raises(UserError, match="limit 7, alpha 1.702\\); this run's model .*limit 5, alpha 1.702"):
        Trainer._check_same_function(SimpleNamespace(_cfg=moe_config(moe_activation="gpt_oss", moe_bias=True,
                                                                     swiglu_limit=5.0), name="sft"), "ckpt",
                                     oss.to_dict())
    # MFU's 6N counts the experts a token meets: top 2 of 4 is a dense MLP's two experts' worth
    model, dense = GPTModel(moe_config()), GPTModel(moe_config(n_experts=2))
    assert flops_per_token(model.config, model.num_params(), 8) == \
        flops_per_token(dense.config, dense.num_params(), 8) + 6 * 2 * (E - 2) * C
