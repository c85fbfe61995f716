"""GPT-OSS folders (openai/gpt-oss-20b, -120b as BF16 copies; train/gpt_oss_weights.py) and what they bring: expert
and router biases (GPTConfig.moe_bias), the clamped SwiGLU (moe_activation "gpt_oss"), attention sinks, q/k/v/o
biases, alternating window layers and YaRN with truncate false. Tiny random GptOssForCausalLM models saved to
tmp_path (float64, every tensor jittered so no bias, sink or norm is a no-op; swiglu_limit 2 so the clamp bites):
logits on the reference path and the Triton path (every kernel: the MoE one with the expert biases and the clamp),
the KV-cache decode and greedy tokens, the export read back by transformers, loss and gradients across paths,
refusals by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

VOCAB, CTX, T = 53, 40, 11
E, K, C, H, LIMIT, WINDOW = 4, 2, 64, 32, 2.0, 4
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 10, "rope_theta": 500.0}


def hf_gpt_oss(folder, layers=2, **config):
    """A tiny random GptOssForCausalLM in float64 saved to folder (layer 0 sliding, layer 1 full). -> (the model,
    its model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=C, intermediate_size=H, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=CTX, num_local_experts=E,
        num_experts_per_tok=K, sliding_window=WINDOW, swiglu_limit=LIMIT, rope_parameters=dict(YARN),
        bos_token_id=2, eos_token_id=1, pad_token_id=0, experts_implementation="eager", **config)
    hf = transformers.GptOssForCausalLM(cfg).double().eval()
    with torch.no_grad():  # zero biases and sinks, unit norms would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def _pre_activations(model, idx):
    """Layer 0's experts' gate and up pre-activations (every expert on every token), to see the clamp bite."""
    ff, x = model.trf_blocks[0].ff, model.trf_blocks[0].norm2
    h = model.tok_emb(idx)
    h = h + model.trf_blocks[0].att(model.trf_blocks[0].norm1(h))
    h = x(h).reshape(-1, C)
    g = torch.einsum("nc,ehc->neh", h, ff.w_gate) + ff.b_gate
    u = torch.einsum("nc,ehc->neh", h, ff.w_up) + ff.b_up
    return g, u


def test_a_folder_loads_its_fields_and_matches_transformers(tmp_path):
    hf, path = hf_gpt_oss(tmp_path)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.n_experts, c.experts_per_token, c.ff_hidden, c.moe_norm_topk, c.moe_bias, c.moe_activation) == \
        (E, K, H, True, True, "gpt_oss")
    assert (c.swiglu_limit, c.swiglu_alpha, c.attention_sinks, c.bias, c.tie_weights) == (LIMIT, 1.702, True, True,
                                                                                          False)
    assert (c.attention_window, c.window_layers, c.rope_theta, c.moe_aux_loss) == (WINDOW, "0", 500.0, 0.0)
    assert c.rope_scaling["truncate"] is False
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        g, u = _pre_activations(model, idx)
        assert (g > LIMIT).any() and (u.abs() > LIMIT).any() and (u.abs() < LIMIT).any()  # the clamp bites
        want = hf(idx).logits
        assert_close_rel(model(idx), want, 2e-6, "reference path")
        model.float().set_kernels("triton")
        assert all(b.ff.use_triton for b in model.trf_blocks)  # the experts on the MoE kernel, biases and clamp
        assert_close_rel(model(idx).double(), want, 1e-5, "triton path (experts, attention with sinks, rope, norms)")


def test_the_interleave_the_clamp_and_the_sinks_each_change_the_logits(tmp_path):
    """Each GPT-OSS particular matters at these numbers: gate and up read as halves (Mixtral's merged layout) instead
    of interleaved columns, the clamp lifted, or the sinks dropped, moves the logits far past the tolerance."""
    hf, path = hf_gpt_oss(tmp_path, layers=1)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, T))
    ff, att = model.trf_blocks[0].ff, model.trf_blocks[0].att
    with torch.no_grad():
        want = hf(idx).logits
        assert_close_rel(model(idx), want, 2e-6, "as read")
        gate_up = torch.cat((ff.w_gate, ff.w_up), 1)  # the halves of the interleaved [2H] rows, not the parity
        saved = ff.w_gate.clone(), ff.w_up.clone()
        ff.w_gate.copy_(gate_up[:, 0::2]), ff.w_up.copy_(gate_up[:, 1::2])
        assert (model(idx) - want).abs().max() > 1e-2
        ff.w_gate.copy_(saved[0]), ff.w_up.copy_(saved[1])
        ff.limit = 1e9
        assert (model(idx) - want).abs().max() > 1e-2
        ff.limit = LIMIT
        att.sinks.fill_(-1e4)  # exp(-1e4) = 0: no sink
        assert (model(idx) - want).abs().max() > 1e-2


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    """Past the window (T 11 > 4): the sliding layer's cache and the full one's, token by token, on both paths; then
    greedy tokens as transformers' generate."""
    from tritongpt.train.generate import generate

    hf, path = hf_gpt_oss(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        want = hf(idx).logits
    for kernels, dtype, tol, singles in (("reference", torch.float64, 2e-6, None), ("triton", torch.float32, 1e-5, 2)):
        model.to(dtype).set_kernels(kernels)
        _, decoded, _ = decode_token_by_token(model, idx, prefill=3, singles=singles, whole=False)
        assert_close_rel(decoded.double(), want, tol, f"decoded over the cache, {kernels}")
    model.double().set_kernels("reference")
    ours = generate(model, idx[:, :3], 8)
    theirs = hf.generate(idx[:, :3], max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def _tiny(**kw):
    return GPTConfig(**{**dict(vocab_size=VOCAB, context_length=CTX, n_embd=C, n_layer=1, n_head=4, n_kv_head=2,
                               mlp="swiglu", mlp_hidden=H, n_experts=E, experts_per_token=K, position_encoding="rope",
                               norm="rmsnorm", bias=True, attention_sinks=True, moe_bias=True,
                               moe_activation="gpt_oss", swiglu_limit=LIMIT, moe_aux_loss=0.05), **kw})


def test_both_paths_agree_on_loss_and_every_gradient():
    """fp32, one layer: the Triton path (the MoE kernel with the expert biases and the clamped SwiGLU, attention with
    sinks, RoPE, RMSNorm, the loss) gives the reference path's loss and every gradient, the expert and router
    biases' and the sinks' included, with the clamp biting (gate above the limit, up past it); the state dict is
    the same on both."""
    torch.manual_seed(0)
    model = GPTModel(_tiny())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_gate", "b_up", "b_down", "router.bias", "sinks")):
                p.normal_(0, 1.5)  # zeros at init: make them count (and the gate and up biases cross the limit)
    idx, targets = torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        g, u = _pre_activations(model, idx)
        assert (g > LIMIT).sum() > 10 and (u > LIMIT).sum() > 10 and (u < -LIMIT).sum() > 10  # the clamp bites
    results = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        assert model.trf_blocks[0].ff.use_triton == (kernels == "triton")
        model.zero_grad()
        loss = model(idx, targets=targets)
        loss.backward()
        results[kernels] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                            list(model.state_dict()))
    (loss_ref, g_ref, keys_ref), (loss_tri, g_tri, keys_tri) = results["reference"], results["triton"]
    assert keys_ref == keys_tri
    assert_close_rel(loss_tri, loss_ref, 1e-4, "loss")
    for name in ("trf_blocks.0.ff.b_gate", "trf_blocks.0.ff.b_up", "trf_blocks.0.ff.b_down",
                 "trf_blocks.0.ff.router.bias", "trf_blocks.0.att.sinks"):
        assert g_ref[name].abs().sum() > 0, name
    for name in g_ref:
        assert_close_rel(g_tri[name], g_ref[name], 1e-4, name)


def test_export_round_trips_through_transformers(tmp_path):
    """Loaded, exported (merged experts, gate and up interleaved again), read by transformers' AutoModelForCausalLM:
    the same logits; load_checkpoint reads it back to the same config; `export`'s choice of family is GPT-OSS."""
    from tritongpt.commands import export_target
    from tritongpt.train.gpt_oss_weights import export_gpt_oss

    transformers = pytest.importorskip("transformers")
    hf, path = hf_gpt_oss(tmp_path / "in")
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == "GPT-OSS"
    export_gpt_oss(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["layer_types"], d["rope_parameters"]["truncate"]) == \
        ("gpt_oss", ["sliding_attention", "full_attention"], False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    assert type(back).__name__ == "GptOssForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")  # its norms kept fp32
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


@pytest.fixture(scope="module")
def hf_copy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    hf_gpt_oss(folder, layers=1)
    return folder


@pytest.mark.parametrize("change,match", [
    # (an MXFP4 folder is read: tests/test_gpt_oss_mxfp4.py; this one's experts are float)
    ({"quantization_config": {"quant_method": "mxfp4"}}, "says MXFP4 quantization, but no tensor is MXFP4"),
    ({"attention_bias": False}, "attention_bias false"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_local_experts": 8}, "num_local_experts 8, but the router scores 4"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types .* each of its 1 layers"),
    ({"rope_parameters": {**YARN, "mscale": 1.0}}, "mscale"),
    # (a factor that is no number was said as a missing attention_factor, which YaRN's default would fill)
    ({"rope_parameters": {**YARN, "factor": "4"}}, "rope_parameters: factor must be a finite number > 0, got '4'"),
    ({"rope_parameters": {**YARN, "factor": None}}, "rope_parameters: factor must be a finite number > 0, got None"),
], ids=["mxfp4", "attention-bias", "activation", "experts", "layer-types", "yarn-mscale", "yarn-factor-text",
        "yarn-factor-null"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    import shutil

    shutil.copytree(hf_copy, tmp_path / "m")
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(tmp_path / "m" / "model.safetensors")


def test_the_fields_are_checked_and_the_exports_refuse_what_their_families_lack(tmp_path):
    from tritongpt.train.gpt_oss_weights import export_gpt_oss
    from tritongpt.train.moe_weights import export_moe

    for bad, match in (({"moe_bias": "yes"}, "moe_bias must be True or False"),
                       ({"moe_activation": "relu"}, "moe_activation must be one of glu, gpt_oss"),
                       ({"swiglu_limit": 0.0}, "swiglu_limit must be a finite number > 0"),
                       ({"moe_activation": "glu", "swiglu_limit": 3.0}, "swiglu_limit 3 sets GPT-OSS's clamped"),
                       ({"mlp": "geglu"}, "moe_activation 'gpt_oss' is a clamped SwiGLU"),
                       ({"n_experts": 0, "moe_aux_loss": 0.0}, "moe_bias True and moe_activation 'gpt_oss' are "
                                                              "GPT-OSS's")):
        with pytest.raises(UserError, match=match):
            _tiny(**bad)
    with pytest.raises(UserError, match="has GPT-OSS's experts .* a GPT-OSS folder takes them"):
        export_moe(GPTModel(_tiny(bias=False, attention_sinks=False)), tmp_path / "mixtral")
    with pytest.raises(UserError, match="tie_weights True, where GPT-OSS's is False"):
        export_gpt_oss(GPTModel(_tiny(tie_weights=True)), tmp_path / "tied")
    with pytest.raises(UserError, match="attention_sinks False, where GPT-OSS's is True"):
        export_gpt_oss(GPTModel(_tiny(attention_sinks=False)), tmp_path / "sinkless")


def test_the_expert_biases_are_not_weight_decayed_nor_orthogonalized():
    """param_groups decays matrices, never biases, and Muon orthogonalizes the blocks' matrices (block_matrices):
    the experts' [E, H] and [E, C] biases are 2-d but biases, in neither."""
    from tritongpt.train.common import block_matrices, param_groups

    model = GPTModel(_tiny())
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.1))
    ff = model.trf_blocks[0].ff
    assert {id(ff.b_gate), id(ff.b_up), id(ff.b_down), id(ff.router.bias)} <= no_decay
    assert {id(ff.w_gate), id(ff.w_up), id(ff.w_down), id(ff.router.weight)} <= decay
    muon = set(map(id, block_matrices(model)))
    assert id(ff.router.weight) in muon and not {id(ff.b_gate), id(ff.b_up), id(ff.b_down)} & muon


def test_pretrains_header_says_the_sinks_and_the_experts_biases_and_clamp(capsys):
    """pretrain's header names every architecture field a model has: a GPT-OSS-shaped model's sinks, expert biases
    and clamped SwiGLU too (without them it read as a Mixtral's "4 experts (top 2, renormalized)")."""
    from types import SimpleNamespace as NS

    from tritongpt.train.pretrain import print_header

    args = NS(init="gpt-oss", model=None, data="d.txt", document_mask=False)
    trainer = NS(device="cpu", dtype=torch.float32, ddp=False, world_size=1)
    splits = {"train": [0] * 8, "val": [0] * 2, "bos_id": None}
    print_header(args, NS(batch_size=1, grad_accum=1, max_steps=1), GPTModel(_tiny()), NS(name="t"), CTX, splits,
                 trainer)
    out = capsys.readouterr().out
    assert ", attention sinks, " in out
    assert "4 experts (top 2, renormalized, with biases, clamped SwiGLU (limit 2, alpha 1.702), load-balancing loss " \
           "x0.05)" in out


def test_the_engine_batches_requests_to_transformers_tokens_each(tmp_path):
    """Continuous batching (train/engine.py) of a tiny GPT-OSS: four prompts of different lengths (past the window,
    the first and the last on one prefix), three rows at once so the last waits and reads that prefix's pages, a paged
    cache with prefix caching and chunked prefill: each
    request's greedy tokens are transformers' generate of that prompt alone."""
    from tritongpt.train.engine import Engine

    hf, path = hf_gpt_oss(tmp_path)
    model = load_checkpoint(path).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, VOCAB, (1, T), generator=g) for T in (8, 5, 1, 13, 2)]  # (no 0: transformers' pad id)
    prompts = [torch.cat([ids[0], ids[1]], 1), ids[2], ids[3], torch.cat([ids[0], ids[4]], 1)]
    engine = Engine(model, max_batch=3, kv_pages=24, page_size=4, prefix_caching=True, max_prefill_tokens=6)
    handles = [engine.submit(p, 6) for p in prompts]
    while engine.running or engine.waiting:
        engine.step()
    assert engine.stats["cached_prompt_tokens"] >= 8  # the shared prefix read back from the cache
    for h, p in zip(handles, prompts):
        with torch.no_grad():
            want = hf.generate(p, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(h.wait(), want)



# ----------------------------------------------------------------------------- GPU
# The tiny GPT-OSS of test_both_paths_agree_on_loss_and_every_gradient, two layers (the first windowed, as gpt-oss's
# sliding layers are), on the GPU. bf16's bound is relative, as the attention sinks' GPU tests': the Triton path's
# logits at most 2x the error of the reference path run in bf16 (torch's own 16-bit ops on the same model), both
# against the float64 reference path, and within 1e-2. The loss, a mean over 32 tokens' log-softmaxes whose rounding
# errors average out, within 1e-3 of float64's (measured under the interpreter at seeds 0-3: the logits 5.1-5.2e-3
# on the Triton path, 5.5-5.8e-3 on the reference path's bf16; the loss at most 5.5e-5). Seed 11: no token's top 2
# of 4 experts within 0.79 of a tie in float64 (the router logits' bf16 error is ~1e-2), so both paths route every
# token as float64 does (asserted) and no expert swap (an O(1) jump in a token's logits) can land in the error.
GPU_SEED, GPU_T = 11, 16


def _gpu_model(seed=GPU_SEED):
    torch.manual_seed(seed)
    model = GPTModel(_tiny(n_layer=2, attention_window=WINDOW, window_layers="0"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_gate", "b_up", "b_down", "router.bias", "sinks")):
                p.normal_(0, 1.5)  # as test_both_paths_agree_on_loss_and_every_gradient: they count, the clamp bites
    return model


def check_16bit_against_float64(device, dtype=torch.bfloat16, seed=GPU_SEED):
    import copy

    from parity import report

    model = _gpu_model(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    idx, targets = (torch.randint(0, VOCAB, (2, GPU_T), generator=gen).to(device) for _ in range(2))
    runs = {}
    for path, kernels, dt in (("float64", "reference", torch.float64), ("reference", "reference", dtype),
                              ("triton", "triton", dtype)):
        m = copy.deepcopy(model).to(device, dt).set_kernels(kernels).eval()
        assert all(b.ff.use_triton == (kernels == "triton") for b in m.trf_blocks)
        with torch.no_grad():
            logits = m(idx)
            routed = [b.ff.router_logits.double() for b in m.trf_blocks]
            loss = m(idx, targets=targets)
            if path == "float64":
                g, u = _pre_activations(m, idx)
        assert logits.dtype == dt
        runs[path] = (logits.double(), loss.double(), routed)
    assert (g > LIMIT).sum() > 10 and (u > LIMIT).sum() > 10 and (u < -LIMIT).sum() > 10  # the clamp bites
    (want, want_loss, want_routed) = runs["float64"]
    for i, r in enumerate(want_routed):
        top3 = r.topk(3, -1).values
        assert (top3[:, 1] - top3[:, 2]).min() > 0.5, f"layer {i}: a token's 2nd and 3rd experts nearly tie"
    yard = report(runs["reference"][0], want)[1]
    for path in ("reference", "triton"):
        logits, loss, routed = runs[path]
        for i, (r, w) in enumerate(zip(routed, want_routed)):
            assert torch.equal(r.topk(K, -1).indices.sort(-1).values, w.topk(K, -1).indices.sort(-1).values), \
                f"{path} layer {i}: another choice of experts than float64's"
        _, rel = assert_close_rel(logits, want, 1e-2, f"{path} {dtype} logits")
        assert rel <= 2 * yard, f"{path} {dtype} logits: {rel:.3e} > 2 x the reference path's {yard:.3e}"
        assert rel > 1e-4, f"{path}: relative error {rel:.1e}: not computed in {dtype}?"
        assert abs(loss - want_loss).item() <= 1e-3 * want_loss.item(), (path, loss.item(), want_loss.item())


def check_fp32_greedy(device, seed=GPU_SEED):
    """Greedy tokens past the window over the KV cache, the Triton path's and the reference path's in fp32, equal; and
    the Triton path's cache steps give the reference path's whole-sequence logits within 1e-4 (greedy tokens of a
    tiny random model alone could agree by chance)."""
    from tritongpt.train.generate import generate

    model = _gpu_model(seed).to(device).eval()
    idx = torch.randint(0, VOCAB, (2, GPU_T), generator=torch.Generator().manual_seed(seed + 2)).to(device)
    tokens = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        with torch.no_grad():
            tokens[kernels] = generate(model, idx[:, :5], 20, temperature=0.0)
    assert tokens["triton"].shape == (2, 25)
    assert torch.equal(tokens["reference"], tokens["triton"])
    model.set_kernels("reference")
    with torch.no_grad():
        want = model(idx)
    model.set_kernels("triton")
    _, stepped, _ = decode_token_by_token(model, idx, prefill=6, singles=4, whole=False)
    assert_close_rel(stepped, want, 1e-4, "decoded over the cache, triton")


@pytest.mark.cuda
def test_cuda_tiny_gpt_oss_bf16_triton_path_against_float64():
    """bf16 on the Triton path (the MoE kernel with the biases and the clamp, attention with sinks and a window, the
    norms, the loss kernel): logits and loss against the float64 reference path within the bound above."""
    check_16bit_against_float64(torch.device("cuda"))


@pytest.mark.cuda
def test_cuda_tiny_gpt_oss_fp32_greedy_decode_is_the_reference_paths():
    check_fp32_greedy(torch.device("cuda"))
