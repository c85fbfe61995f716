"""export --format gguf --gguf-type q4_0 / q4_1 / q5_0 / q5_1 (train/gguf_export.py), and a quantized model written
to its matching block type unrounded: transformers' GGUF loader gives our logits with our weights rounded as
ggml rounds them (the rounding written here in torch, after ggml-quants.c's reference quantizers), gguf.GGUFReader
each tensor's type, and .gguf -> kept Int8Linear / Int4Linear -> .gguf the same bytes."""
import numpy as np
import pytest
import torch

from test_gguf_export import ARCHS, LLAMA, TEXT, load_hf, logits, random_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tok():
    from tritongpt.train.tokenizer import BPETokenizer

    return BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")


def ggml_round(x, kind):
    """x [N, K] as ggml's `kind` rounds it, blocks of 32 along a row. q4_0 / q5_0: d = the block's signed largest
    |value| / -8 (-16), q = trunc(x / d + 8.5 (16.5)) clamped to 4 (5) bits, w = fp16(d) (q - 8 (16)); q4_1 / q5_1:
    d = (max - min) / 15 (31), q = trunc((x - min) / d + 0.5), w = fp16(d) q + fp16(min); q8_0: d = max |x| / 127,
    q = round(x / d) half away from zero, w = fp16(d) q."""
    b = x.reshape(-1, 32)
    half = lambda v: v.half().float()  # noqa: E731
    inv = lambda d: torch.where(d == 0, 0, 1 / d)  # noqa: E731
    if kind == "q8_0":
        d = b.abs().amax(dim=1, keepdim=True) / 127
        y = b * inv(d)
        w = half(d) * torch.sign(y) * torch.floor(y.abs() + 0.5)
    elif kind in ("q4_0", "q5_0"):
        z = 8 if kind == "q4_0" else 16
        d = b.gather(1, b.abs().argmax(dim=1, keepdim=True)) / -z
        q = torch.trunc(b * inv(d) + z + 0.5).clamp(0, 2 * z - 1)
        w = half(d) * (q - z)
    else:
        top = 15 if kind == "q4_1" else 31
        lo = b.amin(dim=1, keepdim=True)
        d = (b.amax(dim=1, keepdim=True) - lo) / top
        q = torch.trunc((b - lo) * inv(d) + 0.5).clamp(0, top)
        w = half(d) * q + half(lo)
    return w.reshape(x.shape)


def rounded(model, kind):
    """A copy of model with each matrix rounded as the `kind` file holds it: the LM head (out_head, or the tied
    embedding) as Q8_0, every other matrix as kind, norms, biases and GPT-2's position embeddings float."""
    import copy

    out = copy.deepcopy(model)
    head = "tok_emb.weight" if model.config.tie_weights else "out_head.weight"
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.ndim == 2 and name != "pos_emb.weight":
                p.copy_(ggml_round(p, "q8_0" if name == head else kind))
    return out


# their rounding against the float model: the logits' RMS difference relative to their RMS. Two layers of random
# weights (norms about 1, SwiGLU) amplify 4 and 5 bits a lot: measured 0.12 (GPT-2) to 0.68 (llama) at 4 bits,
# 0.05 to 0.44 at 5 (Q8_0: 0.07 at most)
LOOSE = {"q4_0": 0.8, "q4_1": 0.8, "q5_0": 0.55, "q5_1": 0.5}


@pytest.mark.parametrize("kind", list(LOOSE))
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_transformers_reads_our_logits(arch, kind, tok, tmp_path):
    """Each block type through transformers' GGUF loader: our model's logits with its weights rounded the file's
    way (1e-5 of the largest), and within the type's rounding of the float model (but not equal to it). The tensor
    types are llama.cpp's: kind for the blocks' matrices (GPT-2's fused attn_qkv too) and an untied token_embd, Q8_0
    for the LM head (output, or a tied token_embd), F32 for norms, biases, GPT-2's position embeddings."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(ARCHS[arch], 288)
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", tok, kind)
    ids = torch.tensor([tok.encode(TEXT, allowed_special="all")])
    theirs = load_hf(path)(ids).logits.detach()
    ours = logits(model, ids)
    scale = ours.abs().max().item()
    assert (theirs - logits(rounded(model, kind), ids)).abs().max().item() <= 1e-5 * scale
    off = ((theirs - ours).pow(2).mean().sqrt() / ours.pow(2).mean().sqrt()).item()
    assert 1e-3 < off <= LOOSE[kind]  # (not the float model's logits: the file's rounding)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType["MOSTLY_" + kind.upper()]
    K = T[kind.upper()]
    head = "token_embd.weight" if model.config.tie_weights else "output.weight"
    assert types[head] == T.Q8_0
    if arch != "gpt2" and head == "output.weight":
        assert types["token_embd.weight"] == K
    for name, t in types.items():
        if name == head:
            continue
        want = T.F32 if name.endswith((".bias", "_norm.weight")) or name == "position_embd.weight" else K
        assert t == want, name


def test_rows_not_whole_blocks_go_as_f16(tok, tmp_path):
    """n_embd 48 (no whole blocks of 32 in a row): the matrices reading it go as F16, as convert_hf_to_gguf.py does
    for Q8_0 (llama-quantize refuses them); ffn_down reads mlp_hidden 64 and is Q4_1."""
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(dict(LLAMA, n_embd=48), 288)
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "m.gguf", tok, "q4_1"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_up.weight"):
        assert types[name] == T.F16, name
    assert types["blk.0.ffn_down.weight"] == T.Q4_1 and types["blk.0.attn_norm.weight"] == T.F32


def _blocky(model):
    """model with one row's first block of each matrix zero and the next constant: ggml's special blocks (d 0 or
    -0, every level alike), beside random ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "emb" not in name:
                p[1, :32] = 0
                p[1, 32:64] = -0.25
    return model


@pytest.mark.parametrize("arch, kind", [("llama", "q4_0"), ("gpt2", "q4_0"), ("llama", "q4_1"),
                                        ("qwen2", "q8_0")])
def test_a_kept_gguf_writes_back_the_same_bytes(arch, kind, tok, tmp_path, capsys):
    """Our kind file read back kept quantized (gguf_import: Int4Linear / Int8Linear of group 32, Q4_0's negative
    d as flipped levels) and written again as kind: every tensor the same type and the same bytes, no note of a
    second rounding: the levels and fp16 scales copied (Llama's permuted q/k rows, GPT-2's fused attn_qkv, zero and
    constant blocks), the float embeddings' blocks quantized back to themselves."""
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    first = write_gguf(_blocky(random_model(ARCHS[arch], 288)), tmp_path / "a.gguf", tok, kind)
    kept = load_gguf(first)
    assert kept.quantized == ("int8" if kind == "q8_0" else "int4")
    capsys.readouterr()
    again = write_gguf(kept, tmp_path / "b.gguf", tok, kind)
    assert "quantized again" not in capsys.readouterr().err
    a, b = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (first, again))
    assert list(a) == list(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type and np.array_equal(t.data, b[name].data), name


@pytest.mark.parametrize("kind", ["q5_0", "q5_1"])
def test_int4_goes_into_5_bit_blocks_unrounded(kind, tok, tmp_path, capsys):
    """A kept Q4_1 model as q5_1 (d and m copied), a kept Q4_0 one as q5_0 (levels + 8): the file dequantizes
    (gguf.quants) to our layers' matrices exactly."""
    from tritongpt.model.quant import Int4Linear
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf

    model = random_model(LLAMA, 288)
    kept = load_gguf(write_gguf(model, tmp_path / "a.gguf", tok, "q4_1" if kind == "q5_1" else "q4_0"))
    capsys.readouterr()
    tensors = {t.name: t for t in gguf.GGUFReader(write_gguf(kept, tmp_path / "b.gguf", tok, kind)).tensors}
    assert "quantized again" not in capsys.readouterr().err
    up = kept.trf_blocks[1].ff.w_up
    assert isinstance(up, Int4Linear)
    t = tensors["blk.1.ffn_up.weight"]
    assert t.tensor_type == T[kind.upper()]
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(up.out_features, -1))
    assert torch.equal(got, up.dequantize())


def test_other_quantizations_are_quantized_again_with_a_note(tok, tmp_path, capsys):
    """`quantize`'s int4 (asymmetric groups: min and range / 15, no Q4_0 form) as q4_0, and its int8 (a scale a
    row, not a block) as q8_0: each matrix dequantized and rounded as ggml rounds a float one, and said."""
    import copy

    from tritongpt.model.quant import quantize_int4, quantize_int8
    from tritongpt.train.gguf_export import write_gguf

    model = random_model(LLAMA, 288)
    for kind, q in (("q4_0", quantize_int4(copy.deepcopy(model), group_size=32)),
                    ("q8_0", quantize_int8(copy.deepcopy(model)))):
        tensors = {t.name: t for t in gguf.GGUFReader(write_gguf(q, tmp_path / f"{kind}.gguf", tok, kind)).tensors}
        assert "dequantized and quantized again" in capsys.readouterr().err
        up = q.trf_blocks[0].ff.w_up
        t = tensors["blk.0.ffn_up.weight"]
        assert t.tensor_type == T[kind.upper()]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(up.out_features, -1))
        assert torch.equal(got, ggml_round(up.dequantize(), kind))


def test_cli_exports_a_quantized_model_unrounded(tok, tmp_path, capsys):
    """`tritongpt export MODEL.gguf --format gguf --gguf-type q4_0` on a Q4_0 file loads it kept (not dequantized
    as for a float type) and writes its blocks' bytes back; a `tritongpt quantize` int4 file (refused by export
    for float types: train or export the float weights) goes too, its groups quantized again (said)."""
    from tritongpt.cli import main
    from tritongpt.train.gguf_export import write_gguf

    tok.save(tmp_path / "tok.json")
    first = write_gguf(random_model(LLAMA, 288), tmp_path / "a.gguf", tok, "q4_0")
    out = tmp_path / "b.gguf"
    assert main(["export", str(first), "--tokenizer", str(tmp_path / "tok.json"), "--format", "gguf",
                 "--gguf-type", "q4_0", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "kept as int4" in err and "quantized again" not in err
    a, b = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (first, out))
    assert np.array_equal(a["blk.0.attn_q.weight"].data, b["blk.0.attn_q.weight"].data)
    from tritongpt.model.quant import quantize_int4

    quantize_int4(random_model(LLAMA, 288), group_size=32).save(tmp_path / "int4.safetensors")
    assert main(["export", str(tmp_path / "int4.safetensors"), "--tokenizer", str(tmp_path / "tok.json"), "--format",
                 "gguf", "--gguf-type", "q4_1", "--out", str(tmp_path / "c.gguf")]) == 0
    assert "dequantized and quantized again" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "int4.safetensors"), "--tokenizer", str(tmp_path / "tok.json"), "--format",
                 "gguf", "--gguf-type", "f16", "--out", str(tmp_path / "d.gguf")]) == 2
    assert "int4-quantized" in capsys.readouterr().err
