"""GGUF's mixtures of experts, both ways (train/gguf_export.py, train/gguf_import.py): Mixtral as a "llama" with
experts, "qwen3moe", "qwen2moe" (its gated shared expert) and "olmoe", as convert_hf_to_gguf.py lays them out
(ffn_gate_inp [E, C] in F32, ffn_{gate,up,down}_exps stacked [E, ...], each expert's rows quantized). Read back:
the same logits; transformers' GGUF loader (it maps qwen2moe and qwen3moe, not a llama's or olmoe's experts) gives
ours within 1e-5. What llama.cpp fixes by architecture (whether the top k is renormalized) is refused otherwise."""
import copy

import numpy as np
import pytest
import torch

from test_gguf_export import TEXT, logits, random_model
from tritongpt.errors import UserError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, n_kv_head=2, tie_weights=False,
           mlp_hidden=32, n_experts=4, experts_per_token=2)
ARCHS = {"llama": dict(MOE),  # Mixtral: a "llama" with experts (its q/k rows permuted as a Llama's)
         "qwen3moe": dict(MOE, qk_norm=True),
         "olmoe": dict(MOE, qk_norm=True, qk_norm_width="all", moe_norm_topk=False),
         "qwen2moe": dict(MOE, qkv_bias_only=True, moe_shared_hidden=64, moe_norm_topk=False)}


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")


def ids_of(tok):
    return torch.tensor([tok.encode(TEXT, allowed_special="all")])


def rounded(model, kind):
    """model with each tensor the file quantizes rounded as Q8_0 rounds it (blocks of 32 along the last axis: the
    experts' rows too); the routers, the shared gate (1-D in the file), norms and biases stay f32."""
    out = copy.deepcopy(model)
    if kind == "f32":
        return out
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.ndim < 2 or name.endswith(("router.weight", "shared_gate.weight")):
                continue
            blocks = p.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            x = blocks * torch.where(d == 0, 0, 1 / d)
            q = torch.sign(x) * torch.floor(x.abs() + 0.5)
            p.copy_((d.half().float() * q).reshape(p.shape))
    return out


def close(got, want, tol):
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip(arch, kind, tok, tmp_path):
    """load_gguf of our export: the same MoE config and the logits of the model rounded as the file rounds it."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    model = random_model(ARCHS[arch], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    back = load_gguf(path)
    for field in ("n_experts", "experts_per_token", "moe_norm_topk", "moe_shared_hidden", "mlp_hidden", "qk_norm",
                  "qk_norm_width", "qkv_bias_only", "n_kv_head"):
        assert getattr(back.config, field) == getattr(model.config, field), field
    ids = ids_of(tok)
    close(logits(back, ids), logits(rounded(model, kind), ids), 1e-6)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_transformers_reads_our_logits(arch, kind, tok, tmp_path):
    """transformers' GGUF loader gives our logits (1e-5). It maps no key to moe_intermediate_size,
    shared_expert_intermediate_size or norm_topk_prob (its configs' defaults: 768 / 1408, 5632 / 2048, False),
    so they are passed as a reader of such a file must; norm_topk_prob True for qwen3moe, as llama.cpp's
    qwen3moe always renormalizes."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS[arch], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    extra = dict(moe_intermediate_size=32, norm_topk_prob=arch == "qwen3moe")
    if arch == "qwen2moe":
        extra["shared_expert_intermediate_size"] = 64
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                           **extra).eval()
    ids = ids_of(tok)
    close(hf(ids).logits.detach(), logits(rounded(model, kind), ids), 1e-5)


def test_keys_and_tensors_llama_cpp_reads(tok, tmp_path):
    """The keys and tensors llama-model.cpp loads for a qwen2moe: expert_count / expert_used_count,
    expert_feed_forward_length, expert_shared_feed_forward_length; ggml shapes {C, E} for the router (F32 in a Q8_0
    file, as convert_hf_to_gguf.py and llama-quant.cpp keep it), {C, H, E} / {H, C, E} for the experts (Q8_0),
    ffn_gate_inp_shexp a 1-D {C}."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS["qwen2moe"], 288)
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "m.gguf", tok, "q8_0"))
    f = {k: reader.fields[f"qwen2moe.{k}"].contents() for k in ("expert_count", "expert_used_count",
                                                               "expert_feed_forward_length",
                                                               "expert_shared_feed_forward_length")}
    assert f == {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32,
                 "expert_shared_feed_forward_length": 64}
    t = {x.name: (x.tensor_type.name, [int(s) for s in x.shape]) for x in reader.tensors}
    assert t["blk.1.ffn_gate_inp.weight"] == ("F32", [64, 4])
    assert t["blk.1.ffn_gate_exps.weight"] == ("Q8_0", [64, 32, 4])
    assert t["blk.1.ffn_up_exps.weight"] == ("Q8_0", [64, 32, 4])
    assert t["blk.1.ffn_down_exps.weight"] == ("Q8_0", [32, 64, 4])
    assert t["blk.1.ffn_gate_inp_shexp.weight"] == ("F32", [64])
    assert t["blk.1.ffn_down_shexp.weight"] == ("Q8_0", [64, 64])
    assert "blk.1.ffn_gate.weight" not in t
    # expert 2's gate rows are its own: the stack is in the experts' order
    raw = next(x for x in reader.tensors if x.name == "blk.1.ffn_gate_exps.weight")
    stack = gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(4, 32, 64)
    want = rounded(model, "q8_0").trf_blocks[1].ff.w_gate[2].detach().numpy()
    assert np.array_equal(stack[2], want)


@pytest.mark.parametrize("arch, fields, said", [
    ("qwen3moe", dict(moe_norm_topk=False), "moe_norm_topk False .* llama.cpp's qwen3moe always renormalizes"),
    ("olmoe", dict(moe_norm_topk=True), "moe_norm_topk True .* llama.cpp's olmoe never renormalizes"),
    ("qwen2moe", dict(moe_norm_topk=True), "moe_norm_topk True .* llama.cpp's qwen2moe never renormalizes")])
def test_what_llama_cpp_fixes_is_refused_by_name(arch, fields, said, tok, tmp_path):
    from tritongpt.train.gguf_export import write_gguf

    model = random_model({**ARCHS[arch], **fields}, 288)
    with pytest.raises(UserError, match=said):
        write_gguf(model, tmp_path / "m.gguf", tok, "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_gpt_oss_is_refused_by_name(tok, tmp_path):
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(dict(MOE, bias=True, moe_bias=True, moe_activation="gpt_oss", attention_sinks=True), 288)
    with pytest.raises(UserError, match="a GPT-OSS, which the GGUF writer does not write"):
        write_gguf(model, tmp_path / "m.gguf", tok, "f32")


@pytest.mark.parametrize("key, value, said", [
    ("expert_used_count", 5, "expert_used_count is 5, more than the 4 experts"),
    ("expert_gating_func", 2, "expert_gating_func is 2, which llama.cpp's qwen3moe does not read")])
def test_a_file_this_cannot_compute_is_refused_by_name(key, value, said, tok, tmp_path):
    """A qwen3moe file with more experts used than there are, or sigmoid gating (another MoE's key)."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    src = gguf.GGUFReader(write_gguf(random_model(ARCHS["qwen3moe"], 288), tmp_path / "m.gguf", tok, "f32"))
    w = gguf.GGUFWriter(tmp_path / "bad.gguf", "qwen3moe")
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name == f"qwen3moe.{key}":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), kind, sub_type=sub)
    w.add_uint32(f"qwen3moe.{key}", value)
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=[int(s) for s in reversed(t.shape)],
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match=said):
        load_gguf(tmp_path / "bad.gguf")


# A Hugging Face Mixtral / OLMoE laid out as convert_hf_to_gguf.py writes it (LlamaModel with experts: q/k rows
# permuted; OlmoeModel: not), not by our writer: what llama.cpp reads of either, read here with its own logits.
HF = {"llama": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, rope_theta=500.0)),
      "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, norm_topk_prob=False, rope_theta=500.0))}
HF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"}


@pytest.mark.parametrize("arch", list(HF))
def test_a_hugging_face_moe_as_convert_hf_to_gguf_writes_it(arch, tmp_path):
    from tritongpt.train.gguf_export import permute_qk
    from tritongpt.train.gguf_import import load_gguf

    cfg_name, cls, extra = HF[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=288, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                                          max_position_embeddings=32, rms_norm_eps=1e-6,
                                          attn_implementation="eager", **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.3) + (1.0 if "norm" in name else 0.0))
    w = gguf.GGUFWriter(tmp_path / "m.gguf", arch)
    for key, value in (("context_length", 32), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 32), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("expert_count", 4), ("expert_used_count", 2)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 500.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    sd = {k.removeprefix("model."): v.detach().float().numpy() for k, v in hf.state_dict().items()}
    t = {"token_embd.weight": sd["embed_tokens.weight"], "output_norm.weight": sd["norm.weight"],
         "output.weight": sd["lm_head.weight"]}
    for i in range(2):
        for theirs, ours in HF_NAMES.items():
            if f"layers.{i}.{theirs}.weight" in sd:
                t[f"blk.{i}.{ours}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
        if arch == "llama":
            for name, heads in (("attn_q", 4), ("attn_k", 2)):
                t[f"blk.{i}.{name}.weight"] = permute_qk(torch.from_numpy(t[f"blk.{i}.{name}.weight"]),
                                                         heads).numpy()
        gate_up = sd[f"layers.{i}.mlp.experts.gate_up_proj"]  # [E, 2H, C]: gate's rows, then up's
        t[f"blk.{i}.ffn_gate_exps.weight"], t[f"blk.{i}.ffn_up_exps.weight"] = gate_up[:, :32], gate_up[:, 32:]
        t[f"blk.{i}.ffn_down_exps.weight"] = sd[f"layers.{i}.mlp.experts.down_proj"]
    for name, value in t.items():
        w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_gguf(tmp_path / "m.gguf")
    assert ours.config.moe_norm_topk is (arch == "llama")
    ids = torch.randint(0, 288, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    close(logits(ours, ids), want, 1e-5)


def test_a_k_quant_mix_quantizes_each_expert_s_rows(tok, tmp_path):
    """q4_k_m on a mixture of experts: the 3-D expert stacks go through the K-quant quantizers row by row (each
    expert's rows whole 256-blocks), the router stays F32, and the file read back holds exactly the experts gguf's
    own dequantizer gives (the stack's leading dims kept, not folded into its rows)."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    model = random_model(dict(ARCHS["qwen3moe"], n_embd=256, n_head=4, mlp_hidden=256), 288)
    path = write_gguf(model, tmp_path / "m.gguf", tok, "q4_k_m")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.ffn_down_exps.weight"] in ("Q4_K", "Q6_K")
    back = load_gguf(path)
    file = {t.name: t for t in reader.tensors}
    for i in range(2):
        for ours, theirs in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
            t = file[f"blk.{i}.ffn_{theirs}_exps.weight"]
            got = getattr(back.trf_blocks[i].ff, ours).detach().numpy()  # (MoEFeedForward: [E, rows, in])
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got.shape)
            assert np.array_equal(got, want), (i, ours)
            assert 0 < np.abs(want - getattr(model.trf_blocks[i].ff, ours).detach().numpy()).max() < 0.2
