"""GGUF's Falcon ("falcon"), BLOOM ("bloom") and StableLM ("stablelm") architectures, both ways (train/gguf_export.py,
train/gguf_import.py). Export is checked by transformers' own GGUF loader where it reads the architecture (bloom,
stablelm without q/k norms, and a Falcon-7B-style falcon: it reads no key for Falcon-40B's new decoder architecture
nor StableLM 2 12B's qk_layernorm); import by a Hugging Face model's own logits, its
tensors written as convert_hf_to_gguf.py writes them (gguf's tensor map for the names, the converters' q/k/v
regrouping), not by our writer; and our export read back. What llama.cpp's falcon cannot hold is refused by name."""
import numpy as np
import pytest
import torch

from test_gguf_export import TEXT, load_hf, logits, random_model, rounded
from tritongpt.errors import UserError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

FALCON = dict(position_encoding="rope", bias=False, gelu_approximate="none", parallel_residual=True, norm_eps=1e-5)
STABLELM = dict(norm="layernorm", mlp="swiglu", position_encoding="rope", bias=False, n_kv_head=2, mlp_hidden=64,
                rotary_dim=4, tie_weights=False, norm_eps=1e-5)
ARCHS = {
    # Falcon-7B's block: one norm, multi-query attention
    "falcon7b": dict(FALCON, shared_norm=True, n_kv_head=1),
    # Falcon-40B's: two norms (attn_norm_2 for the attention), grouped key/value heads
    "falcon40b": dict(FALCON, n_kv_head=2),
    "bloom": dict(position_encoding="alibi", embed_norm=True),
    # Stable LM 2 1.6B's: q/k/v biases; a quarter of each head rotated (transformers' GGUF loader reads no
    # partial_rotary_factor and keeps StableLmConfig's 0.25); its own head
    "stablelm": dict(STABLELM, qkv_bias_only=True),
    "stablelm_parallel": dict(STABLELM, parallel_residual=True, shared_norm=True, tie_weights=True),
    # StableLM 2 12B's: the parallel block on one norm (no ffn_norm), each head's own q/k LayerNorm weights
    "stablelm12b": dict(STABLELM, parallel_residual=True, shared_norm=True, qk_norm=True, qk_norm_width="each"),
}
GGUF_ARCH = {"falcon7b": "falcon", "falcon40b": "falcon", "bloom": "bloom", "stablelm": "stablelm",
             "stablelm_parallel": "stablelm", "stablelm12b": "stablelm"}


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")


def ids_of(tok):
    return torch.tensor([tok.encode(TEXT, allowed_special="all")])


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("name", ["falcon7b", "bloom", "stablelm", "stablelm_parallel"])
def test_transformers_reads_our_logits(name, kind, tok, tmp_path):
    """transformers' GGUF loader (BLOOM's q/k/v regrouped per head again by its BloomTensorProcessor; StableLM's
    q/k/v biases and parallel block told by the file's tensors) gives our logits, with our weights rounded as the
    file rounds them."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS[name], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    reader = gguf.GGUFReader(path)
    arch = GGUF_ARCH[name]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.attention.layer_norm_epsilon"].contents() == pytest.approx(1e-5)
    ids = ids_of(tok)
    theirs = load_hf(path)(ids).logits.detach()
    want = logits(rounded(model, kind), ids)
    assert (theirs - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_round_trip_through_our_export(name, kind, tok, tmp_path):
    """load_gguf of our export: the same config (the block's norms, key/value heads, positions, biases) and the
    logits of the model rounded as the file rounds it; a Q8_0 file's linears kept in int8."""
    from tritongpt.model.quant import Int8Linear
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    model = random_model(ARCHS[name], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("blk.0.attn_norm_2.weight" in names) is (name == "falcon40b")
    assert ("token_embd_norm.bias" in names) is (name == "bloom")
    assert ("blk.0.attn_q_norm.weight" in names) is (name == "stablelm12b")
    back = load_gguf(path)
    # (a tied StableLM's head is written as output, which llama.cpp's stablelm needs: it reads back untied)
    tied = model.config.tie_weights and GGUF_ARCH[name] != "stablelm"
    assert back.config.tie_weights is tied
    for field in ("position_encoding", "parallel_residual", "shared_norm", "kv_heads", "embed_norm", "bias",
                  "gelu_approximate", "norm", "norm_eps", "rope_theta", "mlp", "rotary_dim", "qkv_bias_only",
                  "qk_norm", "qk_norm_width", "ff_hidden"):
        assert getattr(back.config, field) == getattr(model.config, field), field
    assert isinstance(back.trf_blocks[0].att.W_query, Int8Linear) is (kind == "q8_0")
    ids = ids_of(tok)
    want = logits(rounded(model, kind), ids)
    assert (logits(back, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def hf_model(name):
    """A random Hugging Face Falcon (7B's or 40B's block) or BLOOM of ARCHS[name]'s shape, every weight random."""
    if name == "bloom":
        cfg = transformers.BloomConfig(vocab_size=288, hidden_size=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5)
        cls = transformers.BloomForCausalLM
    elif name.startswith("stablelm"):
        twelve = name == "stablelm12b"
        cfg = transformers.StableLmConfig(vocab_size=288, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.25,
                                          use_qkv_bias=name == "stablelm", use_parallel_residual=twelve,
                                          qk_layernorm=twelve, layer_norm_eps=1e-5, max_position_embeddings=32,
                                          tie_word_embeddings=False)
        cls = transformers.StableLmForCausalLM
    else:
        new = name == "falcon40b"
        cfg = transformers.FalconConfig(vocab_size=288, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_kv_heads=2 if new else None, new_decoder_architecture=new,
                                        multi_query=not new, parallel_attn=True, bias=False, alibi=False,
                                        max_position_embeddings=32, layer_norm_epsilon=1e-5)
        cls = transformers.FalconForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in n else 0.3) + (1.0 if "norm" in n and n.endswith(
                "weight") else 0.0))
    return model


def write_converted(model, name, path, edit=None):
    """model as convert_hf_to_gguf.py's FalconModel / BloomModel / StableLMModel write it (F32): gguf's tensor map
    for the names, query_key_value regrouped from Hugging Face's layout (Falcon: per key/value group, a group's queries
    then its key then its value; BLOOM: per head, q k v) into all queries, all keys, all values; StableLM's per-head
    q/k LayerNorms stacked into one [n_head, head_dim] weight (its _stack_qk_norm); the tied head left out. The
    vocabulary is 288 [PAD] rows: the logits are what is compared. edit(writer, tensors): change the file."""
    cfg = model.config
    arch = GGUF_ARCH[name]
    n_head, D = 4, 16
    kv = 2 if name == "falcon40b" or arch == "stablelm" else 1 if arch == "falcon" else n_head
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    t = {}
    sd = model.state_dict()
    for k in [k for k in sd if "_layernorm.norms.0." in k]:  # StableLM 2 12B's per-head q/k norms, stacked
        base = k.split(".norms.")[0]
        sd[base + ".weight"] = torch.stack([sd.pop(f"{base}.norms.{h}.weight") for h in range(n_head)
                                            if f"{base}.norms.{h}.weight" in sd])
    for k, v in sd.items():
        if k == "lm_head.weight" and arch != "stablelm":
            continue
        v = v.detach().float()
        if "query_key_value" in k:
            if arch == "falcon":  # FalconModel.modify_tensors: view(n_head_kv, n_head // n_head_kv + 2, head_dim, ...)
                qkv = v.view(kv, n_head // kv + 2, D, -1)
                v = torch.cat([qkv[:, :-2].reshape(n_head * D, -1), qkv[:, [-2]].reshape(kv * D, -1),
                               qkv[:, [-1]].reshape(kv * D, -1)]).reshape(v.shape)
            else:  # BloomModel.modify_tensors: (n_head, 3, head_dim, ...) -> q, k, v
                qkv = v.view(n_head, 3, D, -1)
                v = torch.cat([qkv[:, i].reshape(n_head * D, -1) for i in range(3)]).reshape(v.shape)
        hf = k.removeprefix("transformer.") if arch == "bloom" else k
        new = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert new is not None, k
        t[new] = v.numpy()
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(32)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(64 if arch == "stablelm" else 256)
    w.add_head_count(n_head)
    w.add_head_count_kv(kv)
    w.add_layer_norm_eps(1e-5)
    if arch == "stablelm":
        w.add_rope_dimension_count(4)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"[PAD{i}]" for i in range(288)])
    if edit is not None:
        edit(w, t)
    for n, x in t.items():
        w.add_tensor(n, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cfg.vocab_size == 288
    return path


@pytest.mark.parametrize("name", [n for n in ARCHS if n != "stablelm_parallel"])
def test_a_converted_hugging_face_model_reads_as_itself(name, tmp_path):
    """A file laid out as llama.cpp's converter writes a Hugging Face Falcon (7B's block, 40B's), BLOOM or StableLM
    (1.6B's q/k/v biases, 12B's parallel block and per-head q/k norms): load_gguf's logits are that model's."""
    from tritongpt.train.gguf_import import load_gguf

    hf = hf_model(name)
    path = write_converted(hf, name, tmp_path / "m.gguf")
    if name == "falcon40b":
        assert "blk.0.attn_norm_2.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    ours = load_gguf(path)
    ids = torch.randint(0, 288, (1, 20), generator=torch.Generator().manual_seed(1))
    want = hf(ids).logits.detach()
    assert (logits(ours, ids) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_falcon_norms_swapped_are_seen(tmp_path, monkeypatch):
    """With Falcon-40B's two norms the other way round (the attention on attn_norm, the MLP on attn_norm_2), the
    converted Hugging Face Falcon reads as another function: the check above can fail on that mapping."""
    from tritongpt.train import gguf_export, gguf_import

    table = gguf_export.layer_table

    def swapped(arch, cfg):
        swap = {"attn_norm": "attn_norm_2", "attn_norm_2": "attn_norm"}
        return tuple((ours, swap.get(theirs, theirs)) for ours, theirs in table(arch, cfg))

    monkeypatch.setattr(gguf_import, "layer_table", swapped)
    hf = hf_model("falcon40b")
    ours = gguf_import.load_gguf(write_converted(hf, "falcon40b", tmp_path / "m.gguf"))
    ids = torch.randint(0, 288, (1, 20), generator=torch.Generator().manual_seed(1))
    want = hf(ids).logits.detach()
    assert (logits(ours, ids) - want).abs().max().item() > 1e-2 * want.abs().max().item()


@pytest.mark.parametrize("fields, said", [
    # Falcon-RW: its scaled ALiBi makes it a Falcon folder, but llama.cpp's falcon always rotates
    (dict(position_encoding="alibi", alibi_scaled=True, bias=False, gelu_approximate="none"), "Falcon-RW's ALiBi"),
    (dict(FALCON, parallel_residual=False, n_kv_head=1), "has sequential blocks"),
    (dict(FALCON, shared_norm=True, bias=True), "biases on its projections"),
])
def test_falcon_export_refusals_by_name(fields, said, tok, tmp_path):
    """What llama.cpp's falcon has no tensor or graph for is refused before the file is opened."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(fields, 288)
    with pytest.raises(UserError, match="cannot be exported as a GGUF file") as e:
        write_gguf(model, tmp_path / "m.gguf", tok, "f32")
    assert said in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("name, edit, said", [
    ("falcon7b", lambda w, t: w.add_rope_dimension_count(8), "falcon.rope.dimension_count is 8, not the head's 16"),
    ("falcon7b", lambda w, t: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), "rescaled RoPE"),
    ("bloom", lambda w, t: w.add_head_count_kv(2), "but BLOOM has a key/value head for each"),
    ("bloom", lambda w, t: w.add_feed_forward_length(128), "not 4 x bloom.embedding_length"),
    ("stablelm", lambda w, t: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), "rescaled RoPE"),
])
def test_import_refusals_by_name(name, edit, said, tmp_path):
    """A file whose metadata asks for what these readers do not compute is refused by name."""
    from tritongpt.train.gguf_import import load_gguf

    path = write_converted(hf_model(name), name, tmp_path / "m.gguf", edit)
    with pytest.raises(UserError, match=said):
        load_gguf(path)
