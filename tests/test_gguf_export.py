"""export --format gguf (train/gguf_export.py), checked by transformers' own GGUF loader, which dequantizes the
file into a Hugging Face model and rebuilds its tokenizer from the file's metadata: its logits must be ours (with
our weights rounded as the file's type rounds them), its ids our tokenizer's."""
import numpy as np
import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(context_length=32, n_embd=64, n_layer=2, n_head=4)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, n_kv_head=2, tie_weights=False,
             mlp_hidden=64, rope_theta=500.0)
ARCHS = {
    # transformers' GGUF loader reads gpt2's context_length as n_ctx and leaves n_positions (the position
    # embedding's rows) at GPT2Config's 1024: a GPT-2 of another context does not load there (llama.cpp reads it)
    "gpt2": dict(context_length=1024, norm_eps=1e-5),
    "llama": LLAMA,
    "qwen2": dict(LLAMA, qkv_bias_only=True, tie_weights=True),
    # heads of their own width (4 x 128 over n_embd 64: key_length): transformers' GGUF loader maps no key to
    # Qwen3Config.head_dim, which stays at its default 128, so only that width loads there (every Qwen3's)
    "qwen3": dict(LLAMA, qk_norm=True, attention_head_dim=128),
}
TEXT = "a cat 12 sat on mat 84. a cat 7 sat<|endoftext|> on mat 49."


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")


def random_model(fields, vocab_size, seed=0):
    """Every weight random (norms about 1, biases nonzero): a permute, a bias or a norm the file misplaced shows."""
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=vocab_size, **{**TINY, **fields})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.3) + (1.0 if "norm" in name else 0.0))
    return model


def rounded(model, kind):
    """A copy of model with each matrix the file stores in `kind` rounded as it rounds it (GPT-2's position
    embeddings, the norms and biases stay f32). Q8_0 as ggml: blocks of 32 along a row, d = max|x| / 127 (stored as
    f16), q = round(x / d) half away from zero."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.ndim != 2 or name == "pos_emb.weight" or "norm" in name or kind == "f32":  # (2-D q/k norms too)
                continue
            if kind == "f16":
                p.copy_(p.half().float())
            elif kind == "bf16":
                p.copy_(p.bfloat16().float())
            else:
                blocks = p.reshape(-1, 32)
                d = blocks.abs().amax(dim=1, keepdim=True) / 127
                x = blocks * torch.where(d == 0, 0, 1 / d)
                q = torch.sign(x) * torch.floor(x.abs() + 0.5)
                p.copy_((d.half().float() * q).reshape(p.shape))
    return out


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out[0] if isinstance(out, tuple) else out)[..., :model.config.vocab_size]


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


# the format's rounding against the float model, relative to the largest logit: f16's 11 bits, bf16's 8, Q8_0's 127
# steps of a block's max, through two layers of random weights (which amplify it: Q8_0 measured 0.18 at most)
LOOSE = {"f32": 1e-5, "f16": 3e-2, "bf16": 0.15, "q8_0": 0.4}


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_transformers_reads_our_logits(arch, kind, tok, tmp_path):
    """transformers' GGUF loader gives our model's logits: within 1e-5 of ours with our weights rounded as the file
    rounds them (the file holds exactly those), and within the type's rounding of the float model. The model's
    vocabulary is past the tokenizer's (288 rows, 280 tokens): the file's [PAD] rows."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS[arch], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    ids = torch.tensor([tok.encode(TEXT, allowed_special="all")])
    theirs = load_hf(path)(ids).logits.detach()
    ours = logits(model, ids)
    assert theirs.shape == ours.shape
    scale = ours.abs().max().item()  # (about 10: the bounds are relative to it)
    assert (theirs - logits(rounded(model, kind), ids)).abs().max().item() <= 1e-5 * scale
    off = (theirs - ours).abs().max().item()
    assert off <= LOOSE[kind] * scale
    if kind != "f32":  # the rounding is the file's: the float weights are not what it holds
        assert off > 1e-4 * scale


def test_metadata_read_back(tok, tmp_path):
    """gguf.GGUFReader reads the hyperparameters llama.cpp needs, the tokenizer and each tensor's type back."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(dict(LLAMA, context_length=48, norm_eps=1e-6), 288)
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "m.gguf", tok, "q8_0"))

    def field(key):
        f = reader.fields[key]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
                    for i in f.data]
        return f.parts[f.data[0]][0]

    cfg = model.config
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for key, want in (("context_length", 48), ("embedding_length", 64), ("block_count", 2),
                      ("feed_forward_length", 64), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                      ("rope.dimension_count", 16), ("vocab_size", 288)):
        assert field(f"llama.{key}") == want, key
    assert field("llama.rope.freq_base") == pytest.approx(500.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 288 and tokens[tok.eot_id] == "<|endoftext|>" and tokens[280:] == [
        f"[PAD{i}]" for i in range(280, 288)]
    types = field("tokenizer.ggml.token_type")
    assert types[tok.eot_id] == 3 and types[0] == 1 and set(types[280:]) == {5}
    assert field("tokenizer.ggml.eos_token_id") == tok.eot_id == field("tokenizer.ggml.bos_token_id")
    assert len(field("tokenizer.ggml.merges")) == 280 - 256 - 1
    T = gguf.GGMLQuantizationType
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == T.Q8_0 and kinds["output.weight"] == T.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == T.F32 and kinds["output_norm.weight"] == T.F32
    # the layout llama.cpp reads: ggml's shape is [in, out] for a matrix [out, in]
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_k.weight"] == [64, 32] and shapes["token_embd.weight"] == [64, 288]


def test_q_and_k_rows_are_permuted_as_convert_hf_to_gguf_does(tok, tmp_path):
    """A Llama's attn_q/attn_k rows are each head's interleaved, llama.cpp's rope pairs: read back, they are
    convert_hf_to_gguf's permute of our rows (head h's row 2i is our i, 2i + 1 our i + d/2), not ours as they are."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(LLAMA, 288)
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "m.gguf", tok, "f32"))
    q = np.asarray(next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight").data)
    ours = model.trf_blocks[1].att.W_query.weight.detach().numpy()
    d = 16
    for h in range(4):
        for i in range(d // 2):
            np.testing.assert_array_equal(q[h * d + 2 * i], ours[h * d + i])
            np.testing.assert_array_equal(q[h * d + 2 * i + 1], ours[h * d + i + d // 2])


def test_qwen3_keys_and_tensors_llama_cpp_reads(tok, tmp_path):
    """llama.cpp's qwen3 (src/models/qwen3.cpp, load_arch_tensors) creates attn_q [n_embd, head_dim * n_head],
    attn_output its transpose, attn_q_norm and attn_k_norm [head_dim] and no biases, and asserts rope.dimension_count
    == key_length: written so, q/k rows as ours (qwen3 rotates in NeoX style, halves, as we do: no permute)."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS["qwen3"], 288)
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "m.gguf", tok, "f32"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "qwen3"
    for key, want in (("attention.key_length", 128), ("attention.value_length", 128), ("rope.dimension_count", 128),
                      ("attention.head_count", 4), ("attention.head_count_kv", 2), ("embedding_length", 64)):
        assert field(f"qwen3.{key}") == want, key
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == [64, 512] and shapes["blk.0.attn_k.weight"] == [64, 256]
    assert shapes["blk.0.attn_output.weight"] == [512, 64]
    assert shapes["blk.1.attn_q_norm.weight"] == shapes["blk.1.attn_k_norm.weight"] == [128]
    assert not [n for n in shapes if n.endswith(".bias")]
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    att = model.trf_blocks[1].att
    np.testing.assert_array_equal(data["blk.1.attn_q.weight"], att.W_query.weight.detach().numpy())
    np.testing.assert_array_equal(data["blk.1.attn_k_norm.weight"], att.k_norm.weight.detach().numpy())


def test_transformers_tokenizer_encodes_as_ours(tok, tmp_path):
    """AutoTokenizer.from_pretrained(dir, gguf_file=...) builds the file's tokenizer: our ids for text with the
    special token, digits and spaces, and for text it never saw."""
    from tritongpt.train.gguf_export import write_gguf

    path = write_gguf(random_model(ARCHS["llama"], 288), tmp_path / "m.gguf", tok, "f32")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in (TEXT, "  a  cat\n\n 123456 sat", "naïve café 東京 🙂", ""):
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text, allowed_special="all"), text


@pytest.mark.parametrize("kind, sequence", [("llama3", False), ("llama3", True), ("qwen2", False)])
def test_a_hugging_face_tokenizer_json(kind, sequence, tmp_path):
    """A run whose tokenizer is a Hugging Face tokenizer.json folder (Llama 3's split, Qwen2's): the file's
    vocabulary, merges, pre-tokenizer name and BOS/EOS give transformers our ids and ends. sequence: the
    post-processor as Llama 3's published tokenizer.json has it, ByteLevel then the BOS template in a Sequence
    (llama.cpp's llama-vocab.cpp load: tokenizer.ggml.add_bos_token overrides llama-bpe's add_bos default, so a
    False there would drop the <|begin_of_text|> every Llama 3 prompt starts with)."""
    import test_hf_tokenizer as th
    from tokenizers import processors

    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.tokenizer import get_tokenizer

    spec = th.build_tokenizer(kind, vocab=300)
    if sequence:
        spec.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), spec.post_processor])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=spec, eos_token=th.KINDS[kind][0],
                                                bos_token=th.KINDS[kind][1])
    assert (fast("a").input_ids[0] == fast.bos_token_id) is (kind == "llama3")  # transformers prepends it
    fast.save_pretrained(tmp_path / "tok")
    tok = get_tokenizer(tmp_path / "tok")
    arch = "llama" if kind == "llama3" else "qwen2"
    path = write_gguf(random_model(ARCHS[arch], tok.vocab_size), tmp_path / "m.gguf", tok, "f32")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert theirs.eos_token_id == tok.eot_id
    for text in th.FIXED:
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text), text
    reader = gguf.GGUFReader(path)
    pre = reader.fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == ("llama-bpe" if kind == "llama3" else "qwen2")
    add_bos = reader.fields["tokenizer.ggml.add_bos_token"]
    assert bool(add_bos.parts[add_bos.data[0]][0]) is (kind == "llama3")  # Llama 3's post-processor adds its BOS


@pytest.mark.parametrize("fields, said", [
    (dict(position_encoding="rope", rotary_dim=2, parallel_residual=True, gelu_approximate="none",
          tie_weights=False), "GPT-NeoX, which the GGUF writer does not write"),
    (dict(LLAMA, attention_window=8), "local attention"),
    (dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rescales its RoPE"),
    (dict(LLAMA, bias=True), "biases in its linear layers"),
    # (a StableLM is written since: stablelm; MPT's ALiBi without biases is not)
    (dict(position_encoding="alibi", bias=False, norm_bias=False, gelu_approximate="none"),
     "MPT, which the GGUF writer does not write"),
    # llama.cpp's qwen2 (src/models/qwen2.cpp, load_arch_tensors) creates attn_q and attn_output [n_embd, n_embd]:
    # a Qwen2 folder holds head_dim 32 over n_embd 64 with 4 heads, llama.cpp would refuse the file's shapes
    (dict(ARCHS["qwen2"], attention_head_dim=32), "heads of their own width"),
    (dict(LLAMA, scale_attention=False), "cannot be exported as a Llama folder"),  # the family's own
])
def test_refusals_by_name(fields, said, tok, tmp_path):
    from tritongpt.train.gguf_export import write_gguf

    with pytest.raises(UserError, match=said):
        write_gguf(random_model(fields, 288), tmp_path / "m.gguf", tok, "f16")
    assert not (tmp_path / "m.gguf").exists()  # refused before the file is opened


@pytest.mark.parametrize("kind", ["smollm", "llama3-removed"])
def test_a_tokenizer_gguf_cannot_say_is_refused(kind, tmp_path):
    """SmolLM's pre-tokenizer (digits alone, then GPT-2's split) has no GGUF name here: refused, not guessed. Nor
    Llama 3's regex in a Split that drops its matches (behavior Removed, here all of the text): llama.cpp's
    llama-bpe (llama-vocab.cpp: its regex_exprs, split by unicode_regex_split) keeps each match as a word."""
    import test_hf_tokenizer as th
    from tokenizers import Regex, pre_tokenizers

    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.tokenizer import get_tokenizer

    spec = th.build_tokenizer(kind.split("-")[0], vocab=300)
    if kind == "llama3-removed":
        spec.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(th.LLAMA3_PAT), behavior="removed"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=False)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=spec, eos_token=th.KINDS[kind.split("-")[0]][0])
    fast.save_pretrained(tmp_path / "tok")
    tok = get_tokenizer(tmp_path / "tok")
    with pytest.raises(UserError, match="pre-tokenizer"):
        write_gguf(random_model(LLAMA, tok.vocab_size), tmp_path / "m.gguf", tok, "f16")


def test_a_tokenizer_without_eos_is_noted(tmp_path, capsys):
    """No EOS key in the file makes llama.cpp's BPE vocabulary end text at id 11 (llama-vocab.cpp, load: the "gpt2"
    tokenizer's default special_eos_id = 11, then put among the end-of-generation ids): said, as GGUF cannot say
    "none"."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train(" ".join(f"a cat {i} sat." for i in range(50)), 270, special_tokens=(), name="no-eos")
    reader = gguf.GGUFReader(write_gguf(random_model(LLAMA, 272), tmp_path / "m.gguf", tok, "f32"))
    assert "tokenizer.ggml.eos_token_id" not in reader.fields
    assert "llama.cpp then takes id 11 as its EOS" in capsys.readouterr().err


def test_cli(tok, tmp_path, monkeypatch, capsys):
    """`tritongpt export CKPT --out NAME.gguf --format gguf --gguf-type q8_0`; its refusals: no gguf package (the
    pip command named), an --out that is no .gguf, --adapter, --gguf-type without --format gguf, a file there."""
    import sys

    from tritongpt.cli import main

    model = random_model(ARCHS["llama"], 280)
    model.save(tmp_path / "model.safetensors")
    tok.save(tmp_path / "tok.json")
    argv = ["export", str(tmp_path / "model.safetensors"), "--tokenizer", str(tmp_path / "tok.json"), "--format",
            "gguf", "--gguf-type", "q8_0", "--out"]
    out = tmp_path / "out" / "m.gguf"
    assert main(argv + [str(out)]) == 0
    assert "Q8_0" in capsys.readouterr().out
    ids = torch.tensor([tok.encode(TEXT, allowed_special="all")])
    want = logits(rounded(model, "q8_0"), ids)
    assert (load_hf(out)(ids).logits.detach() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    for extra, said in (([str(out)], "exists: pass --overwrite"), ([str(tmp_path / "m.bin")], "name it NAME.gguf"),
                        ([str(tmp_path / "x.gguf"), "--adapter"], "writes whole models only")):
        assert main(argv + extra) == 2
        assert said in capsys.readouterr().err
    assert main(argv[:4] + ["--gguf-type", "f16", "--out", str(tmp_path / "hf")]) == 2
    assert "pass --format gguf too" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    assert main(argv + [str(tmp_path / "y.gguf")]) == 2
    assert 'pip install -e ".[gguf]"' in capsys.readouterr().err
