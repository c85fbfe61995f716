"""GGUF's Gemma architectures ("gemma", "gemma2", "gemma3") and Phi-3's ("phi3"), both ways (train/gguf_export.py,
train/gguf_import.py). Export is checked by transformers' own GGUF loader (it reads gemma2, gemma3 and phi3, not
gemma): its logits are ours. Import is checked against a Hugging Face model's own logits, its tensors written here
as convert_hf_to_gguf.py writes them (a Gemma's every norm as w + 1, q/k rows unpermuted; Phi-3's fused), not by
our writer. What llama.cpp fixes by architecture
(which layers are local, Gemma 3's local RoPE base, the scores' scale) a model must have, or is refused by name."""
import numpy as np
import pytest
import torch

from test_gguf_export import TEXT, load_hf, logits, random_model, rounded
from tritongpt.errors import UserError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

# heads of 256 (2 x 256 over n_embd 64): transformers' GGUF loader maps no key to query_pre_attn_scalar, which stays
# at Gemma2Config's and Gemma3TextConfig's 256, and llama.cpp scales by 1/sqrt(head_dim): only that width agrees
GEMMA = dict(context_length=32, n_embd=64, n_head=2, n_kv_head=1, attention_head_dim=256, norm="rmsnorm",
             mlp="geglu", mlp_hidden=64, position_encoding="rope", bias=False, scale_embeddings=True, norm_eps=1e-6)
ARCHS = {
    "gemma": dict(GEMMA, n_layer=2, rope_theta=500.0),
    # a window of 4 over a text of about 20 tokens: the local layers see less than the global ones
    "gemma2": dict(GEMMA, n_layer=2, post_norms=True, attention_window=4, window_layers="0", attn_softcap=50.0,
                   logit_softcap=30.0),
    # six layers: llama.cpp's gemma3 makes five of every six local, and the sixth global (its RoPE base 500)
    "gemma3": dict(GEMMA, n_layer=6, post_norms=True, qk_norm=True, attention_window=4, window_layers="0,1,2,3,4",
                   rope_theta=500.0, rope_local_theta=10000.0),
}


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")


def ids_of(tok):
    return torch.tensor([tok.encode(TEXT, allowed_special="all")])


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_transformers_reads_our_logits(arch, kind, tok, tmp_path):
    """transformers' GGUF loader (which subtracts the 1 from each norm again) gives our logits, with our weights
    rounded as the file rounds them; the file says the architecture, its window and (gemma2) its soft caps."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS[arch], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.attention.sliding_window"].contents() == 4
    if arch == "gemma2":
        assert reader.fields["gemma2.attn_logit_softcapping"].contents() == 50.0
        assert reader.fields["gemma2.final_logit_softcapping"].contents() == 30.0
    ids = ids_of(tok)
    theirs = load_hf(path)(ids).logits.detach()
    want = logits(rounded(model, kind), ids)
    assert (theirs - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_through_our_export(arch, kind, tok, tmp_path, capsys):
    """load_gguf of our export: the same config (Gemma's touches, the window's layers, Gemma 3's local RoPE base,
    Gemma 2's caps) and the logits of the model rounded as the file rounds it; a Q8_0 file's linears kept in int8."""
    from tritongpt.model.quant import Int8Linear
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    model = random_model(ARCHS[arch], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    back = load_gguf(path)
    for field in ("mlp", "scale_embeddings", "post_norms", "qk_norm", "attention_window", "window_layers",
                  "rope_theta", "rope_local_theta", "attn_softcap", "logit_softcap", "attention_scale_width",
                  "attention_head_dim", "n_kv_head", "norm_eps", "tie_weights"):
        assert getattr(back.config, field) == getattr(model.config, field), field
    assert isinstance(back.trf_blocks[0].att.W_query, Int8Linear) is (kind == "q8_0")
    ids = ids_of(tok)
    want = logits(rounded(model, kind), ids)
    assert (logits(back, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


HF = {"gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
      "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=4, attn_logit_softcapping=50.0,
                                                          final_logit_softcapping=30.0, rope_parameters={
                                                              "rope_type": "default", "rope_theta": 500.0})),
      "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=4, rope_parameters={
          "full_attention": {"rope_type": "default", "rope_theta": 500.0},
          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}))}
# Hugging Face's names -> convert_hf_to_gguf.py's, each block's
HF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
            "self_attn.k_norm": "attn_k_norm", "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm"}


def hf_gemma(arch):
    """A random Hugging Face Gemma of ARCHS[arch]'s shape (heads of 32, scaled by 1/sqrt(32) as llama.cpp does),
    every weight random (its norms' w about 0: Gemma's 1 + w about 1)."""
    cfg_name, cls, extra = HF[arch]
    n_layer = ARCHS[arch]["n_layer"]
    cfg = getattr(transformers, cfg_name)(vocab_size=288, hidden_size=64, intermediate_size=64,
                                          num_hidden_layers=n_layer, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=32, query_pre_attn_scalar=32, rms_norm_eps=1e-6,
                                          max_position_embeddings=32, attn_implementation="eager",
                                          **({"rope_theta": 500.0} if arch == "gemma" else {}), **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.3))
    return model


def write_converted(model, arch, path, edit=None):
    """model as convert_hf_to_gguf.py's Gemma*Model write it (F32): each norm's weight + 1, the tied head left out,
    Gemma 1's post_attention_layernorm the MLP's input norm (ffn_norm), Gemma 2's and 3's the attention's output
    norm. The vocabulary is 288 [PAD] rows: the logits are what is compared. edit(writer, tensors): change the file
    (the refusal tests)."""
    cfg = model.config
    sd = {k.removeprefix("model."): v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = dict(HF_NAMES, post_attention_layernorm="ffn_norm" if arch == "gemma" else "post_attention_norm")
    t = {"token_embd.weight": sd["embed_tokens.weight"], "output_norm.weight": sd["norm.weight"] + 1}
    for k, v in sd.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            base = rest.removesuffix(".weight")
            t[f"blk.{i}.{names[base]}.weight"] = v + 1 if base.endswith("norm") else v
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(32)
    w.add_embedding_length(64)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(32)
    w.add_value_length(32)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500.0)
    if arch != "gemma":
        w.add_sliding_window(4)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"[PAD{i}]" for i in range(288)])
    if edit is not None:
        edit(w, t)
    for name, x in t.items():
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_converted_hugging_face_gemma_reads_as_itself(arch, tmp_path):
    """A file laid out as llama.cpp's converter writes a Hugging Face Gemma: load_gguf's logits are that model's."""
    from tritongpt.train.gguf_import import load_gguf

    hf = hf_gemma(arch)
    ours = load_gguf(write_converted(hf, arch, tmp_path / "m.gguf"))
    ids = torch.randint(0, 288, (1, 20), generator=torch.Generator().manual_seed(1))
    want = hf(ids).logits.detach()
    assert (logits(ours, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


# one mapping per architecture, swapped: Gemma 1's MLP input matrices, Gemma 2's sandwich norms, Gemma 3's q/k norms
SWAPS = {"gemma": ("ffn_gate", "ffn_up"), "gemma2": ("post_attention_norm", "post_ffw_norm"),
         "gemma3": ("attn_q_norm", "attn_k_norm")}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_swapped_mapping_is_seen(arch, tok, tmp_path, monkeypatch):
    """With one pair of the tensor table swapped, the converted Hugging Face Gemma reads as another function, and
    (gemma2, gemma3) transformers reads our export as another: both checks above can fail."""
    from tritongpt.train import gguf_export
    from tritongpt.train.gguf_import import load_gguf

    a, b = SWAPS[arch]
    swap = {a: b, b: a}
    broken = tuple((ours, swap.get(theirs, theirs)) for ours, theirs in gguf_export.GGUF_LAYER[arch])
    monkeypatch.setitem(gguf_export.GGUF_LAYER, arch, broken)  # (gguf_import reads the same table)
    hf = hf_gemma(arch)
    ours = load_gguf(write_converted(hf, arch, tmp_path / "c.gguf"))
    ids = torch.randint(0, 288, (1, 20), generator=torch.Generator().manual_seed(1))
    want = hf(ids).logits.detach()
    assert (logits(ours, ids) - want).abs().max().item() > 1e-2 * want.abs().max().item()
    if arch != "gemma":
        model = random_model(ARCHS[arch], 288)
        theirs = load_hf(gguf_export.write_gguf(model, tmp_path / "m.gguf", tok, "f32"))(ids_of(tok)).logits
        want = logits(model, ids_of(tok))
        assert (theirs.detach() - want).abs().max().item() > 1e-2 * want.abs().max().item()


@pytest.mark.parametrize("arch, change, said", [
    ("gemma3", dict(window_layers="0,1"), "slides its window over layers [0, 1, 2, 3, 4]"),
    ("gemma3", dict(attention_window=0, rope_local_theta=0.0, rope_theta=10000.0),
     "local attention in layers none"),
    ("gemma3", dict(rope_local_theta=20000.0), "RoPE base of 20000, where llama.cpp's gemma3 fixes it at 10000"),
    ("gemma3", dict(logit_softcap=30.0), "soft-caps its logits (30)"),
    ("gemma3", dict(rope_scaling={"rope_type": "linear", "factor": 8.0}), "rescales its RoPE frequencies"),
    ("gemma3", dict(attention_scale_width=64), "by 1/sqrt(64), where llama.cpp's gemma3 of 6 layers scales them by "
     "1/sqrt(256)"),
    ("gemma2", dict(window_layers="1"), "slides its window over layers [0]"),
    ("gemma2", dict(attn_softcap=0.0), "does not soft-cap both"),
    ("gemma2", dict(tie_weights=False), "LM head of its own"),
    ("gemma", dict(tie_weights=False), "LM head of its own"),
])
def test_export_refusals_by_name(arch, change, said, tok, tmp_path):
    """What llama.cpp fixes by architecture (not read from the file) a model must have, or it is refused before
    the file is opened."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model({**ARCHS[arch], **change}, 288)
    with pytest.raises(UserError, match="cannot be exported as a GGUF file") as e:
        write_gguf(model, tmp_path / "m.gguf", tok, "f32")
    assert said in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("arch, edit, said", [
    ("gemma2", lambda w, t: t.update({"output.weight": t["token_embd.weight"] * 2}),
     "output.weight, an LM head of its own, which llama.cpp's gemma2 never reads"),
    ("gemma3", lambda w, t: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(8.0)),
     "gemma3.rope.scaling.type is 'linear'"),
])
def test_import_refusals_by_name(arch, edit, said, tmp_path):
    """What a Gemma file holds that this model does not compute: a gemma2 head of its own (llama.cpp never reads
    one), a gemma3's rescaled RoPE (its 4B and up's)."""
    from tritongpt.train.gguf_import import load_gguf

    path = write_converted(hf_gemma(arch), arch, tmp_path / "m.gguf", edit)
    with pytest.raises(UserError) as e:
        load_gguf(path)
    assert said in str(e.value)


def test_a_q4_0_gemma3_is_kept_as_the_file_holds_it(tok, tmp_path):
    """A Q4_0 export read back keeps its blocks' linears as int4 (the path QLoRA trains beside): the same logits as
    the file dequantized to float."""
    from tritongpt.model.quant import Int4Linear
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    path = write_gguf(random_model(ARCHS["gemma3"], 288), tmp_path / "m.gguf", tok, "q4_0")
    kept, dense = load_gguf(path), load_gguf(path, quantized=False)
    assert isinstance(kept.trf_blocks[5].ff.w_up, Int4Linear)
    ids = ids_of(tok)
    want = logits(dense, ids)
    assert (logits(kept, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("arch, n_layer, width", [("gemma3", 62, 32), ("gemma3", 26, 0), ("gemma2", 46, 32),
                                                  ("gemma2", 42, 0)])
def test_the_27b_scale_is_read_by_layer_count(arch, n_layer, width, tmp_path):
    """llama.cpp scales a Gemma 2 27B's (46 layers) and a Gemma 3 27B's (62) scores by 1/sqrt(n_embd / n_head),
    others' by 1/sqrt(head_dim): read as attention_scale_width (0: the head's, 16 here)."""
    from tritongpt.train.gguf_import import gguf_config

    w = gguf.GGUFWriter(tmp_path / "m.gguf", arch)
    w.add_context_length(32)
    w.add_embedding_length(64)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_sliding_window(4)
    w.add_tensor("token_embd.weight", np.ones((288, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, cfg = gguf_config(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "m.gguf")
    assert cfg.attention_scale_width == width and cfg.head_dim == 16


# Phi-3 (Phi-4-mini's shape: GQA, a partial rotary; export_target writes a full-rotary Phi-3 as the Llama it is)
PHI3 = dict(context_length=32, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, norm="rmsnorm", mlp="swiglu",
            mlp_hidden=64, position_encoding="rope", bias=False, rope_theta=500.0, rotary_dim=8, tie_weights=False)


def load_hf_phi3(path):
    """transformers' GGUF loader on a phi3 file, told the partial rotary it does not read (rope.dimension_count:
    its phi3 table maps it to nothing) and without Phi3Config's pad id 32000, past this vocabulary."""
    cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    cfg.rope_parameters["partial_rotary_factor"] = 0.5
    cfg.pad_token_id = None
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=cfg,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_transformers_reads_our_phi3(kind, tok, tmp_path):
    """Phi-3's fused attn_qkv (q, then the fewer k and v rows) and ffn_up (gate, then up) as transformers' GGUF
    loader splits them: our logits, with our weights rounded as the file rounds them."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(PHI3, 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "phi3"
    assert reader.fields["phi3.rope.dimension_count"].contents() == 8
    assert [int(x) for x in reader.tensors[[t.name for t in reader.tensors].index("blk.0.attn_qkv.weight")].shape] \
        == [64, 64 + 2 * 32]
    ids = ids_of(tok)
    theirs = load_hf_phi3(path)(ids).logits.detach()
    want = logits(rounded(model, kind), ids)
    assert (theirs - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0"])
def test_phi3_round_trip(kind, tok, tmp_path):
    """Our phi3 export read back: the partial rotary, the fused tensors split (a Q8_0 / Q4_0 file's rows kept as
    int8 / int4, the same logits as the file dequantized)."""
    from tritongpt.model.quant import Int4Linear, Int8Linear, QuantLinear
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    model = random_model(PHI3, 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    back = load_gguf(path)
    assert back.config.rotary_dim == 8 and back.config.n_kv_head == 2 and not back.config.tie_weights
    cls = {"f32": torch.nn.Linear, "q8_0": Int8Linear, "q4_0": Int4Linear}[kind]
    assert isinstance(back.trf_blocks[1].att.W_key, cls) and isinstance(back.trf_blocks[1].ff.w_gate, cls)
    ids = ids_of(tok)
    if kind == "q4_0":
        assert isinstance(back.trf_blocks[0].ff.w_up, QuantLinear)
        want = logits(load_gguf(path, quantized=False), ids)
    else:
        want = logits(rounded(model, kind), ids)
    assert (logits(back, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def hf_phi3(window=None):
    """A random Hugging Face Phi-3 of PHI3's shape (its norms about 1), a window over every layer if asked."""
    cfg = transformers.Phi3Config(vocab_size=288, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  rms_norm_eps=1e-5, pad_token_id=None, sliding_window=window,
                                  tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                   "partial_rotary_factor": 0.5},
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + 1.0 if "norm" in name else torch.randn_like(p) * 0.3)
    return model


def write_converted_phi3(model, path, window=None, edit=None):
    """model as convert_hf_to_gguf.py's Phi3MiniModel writes it (F32): qkv_proj as attn_qkv, gate_up_proj as ffn_up,
    rope.dimension_count the rotated width."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    t = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
         "output.weight": sd["lm_head.weight"]}
    for k, v in sd.items():
        if k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            t[f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight"] = v
    w = gguf.GGUFWriter(path, "phi3")
    for key, value in (("context_length", 32), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 64), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("rope.dimension_count", 8)):
        w.add_uint32(f"phi3.{key}", value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500.0)
    if window:
        w.add_sliding_window(window)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"[PAD{i}]" for i in range(288)])
    if edit is not None:
        edit(w, t)
    for name, x in t.items():
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("window", [None, 4])
def test_a_converted_hugging_face_phi3_reads_as_itself(window, tmp_path):
    """A Phi-3 laid out as llama.cpp's converter writes it (a window over every layer too, as Phi-3-mini-4k's):
    load_gguf's logits are the Hugging Face model's."""
    from tritongpt.train.gguf_import import load_gguf

    hf = hf_phi3(window)
    ours = load_gguf(write_converted_phi3(hf, tmp_path / "m.gguf", window))
    assert ours.config.attention_window == (window or 0) and ours.config.rotary_dim == 8
    ids = torch.randint(0, 288, (1, 20), generator=torch.Generator().manual_seed(1))
    want = hf(ids).logits.detach()
    assert (logits(ours, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_phi3_swapped_gate_and_up_is_seen(tmp_path, monkeypatch):
    """With ffn_up's halves read the other way round (up, then gate) the converted Phi-3 is another function."""
    from tritongpt.train import gguf_export
    from tritongpt.train.gguf_import import load_gguf

    monkeypatch.setitem(gguf_export.FUSED, "phi3", {**gguf_export.FUSED["phi3"], "ffn_up": ("ff.w_up", "ff.w_gate")})
    hf = hf_phi3()
    ours = load_gguf(write_converted_phi3(hf, tmp_path / "m.gguf"))
    ids = torch.randint(0, 288, (1, 20), generator=torch.Generator().manual_seed(1))
    want = hf(ids).logits.detach()
    assert (logits(ours, ids) - want).abs().max().item() > 1e-2 * want.abs().max().item()


def test_phi3_refusals_and_notes(tok, tmp_path, capsys):
    """LongRoPE is refused both ways by name (its rope_factors_long / _short, picked by llama.cpp by the context
    size); a fused tensor of other rows than the metadata's heads refused; a window written with llama.cpp's
    running without it said."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                "original_max_position_embeddings": 16, "factor": 2.0}
    with pytest.raises(UserError, match="has LongRoPE .* which this writer does not write .*rope_factors_long"):
        write_gguf(random_model(dict(PHI3, rope_scaling=longrope), 288), tmp_path / "l.gguf", tok, "f32")
    assert not (tmp_path / "l.gguf").exists()
    hf = hf_phi3()
    path = write_converted_phi3(hf, tmp_path / "f.gguf", edit=lambda w, t: t.update(
        {"rope_factors_long.weight": np.full(4, 2.0, np.float32), "rope_factors_short.weight": np.ones(4, np.float32)}))
    with pytest.raises(UserError, match="rope_factors_long / rope_factors_short .*LongRoPE.*does not apply"):
        load_gguf(path)
    path = write_converted_phi3(hf, tmp_path / "q.gguf", edit=lambda w, t: t.update(
        {"blk.1.attn_qkv.weight": np.concatenate([t["blk.1.attn_qkv.weight"]] * 2)}))
    with pytest.raises(UserError, match=r"tensor blk.1.attn_qkv.weight has shape \(256, 64\), but its metadata says "
                       "128 rows"):
        load_gguf(path)
    write_gguf(random_model(dict(PHI3, attention_window=4), 288), tmp_path / "w.gguf", tok, "f32")
    assert "runs without it" in capsys.readouterr().err
