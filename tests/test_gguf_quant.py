"""GGUF files kept quantized (train/gguf_import.py _load_kept): a Q8_0 file's linears as Int8Linear (groups of 32),
a Q4_0 / Q4_1 file's as Int4Linear (group 32), the same matrices as the file's dequantized float load, bit for bit in
fp32 (so the same logits on both kernel paths), and transformers' GGUF loader's logits. Files written here with
gguf.GGUFWriter and gguf.quants.quantize (ggml's own block layout), a tiny untied llama."""
import numpy as np
import pytest
import torch

from test_gguf_export import logits
from tritongpt.model.quant import Int4Linear, Int8Linear, QuantLinear, linear_bytes

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

V, C, F, H, KV = 64, 64, 96, 4, 2
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write(path, qtype: str, other: dict | None = None, skew=None, tok=None, vocab: int = V, seed: int = 0):
    """A 2-layer llama .gguf: every matrix qtype (other: {tensor name: its type} for some), norms F32. skew(name, x):
    a weight changed before quantizing (the tests that need particular blocks). tok: a byte-level BPE tokenizer
    written as the file's own (the trainers encode text with it; else vocab placeholder tokens), of vocab rows.
    seed: the weights' (another file of the same shapes)."""
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    V = vocab
    mat = lambda o, i: (rng.standard_normal((o, i)) * 0.3).astype(np.float32)  # noqa: E731
    norm = lambda n: (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": mat(V, C), "output_norm.weight": norm(C), "output.weight": mat(V, C)}
    for i in range(2):
        g = f"blk.{i}."
        t.update({g + "attn_norm.weight": norm(C), g + "ffn_norm.weight": norm(C), g + "attn_q.weight": mat(C, C),
                  g + "attn_k.weight": mat(C // H * KV, C), g + "attn_v.weight": mat(C // H * KV, C),
                  g + "attn_output.weight": mat(C, C), g + "ffn_gate.weight": mat(F, C),
                  g + "ffn_up.weight": mat(F, C), g + "ffn_down.weight": mat(C, F)})
    w = gguf.GGUFWriter(path, "llama")
    for add, v in (("context_length", 64), ("embedding_length", C), ("block_count", 2), ("feed_forward_length", F),
                   ("head_count", H), ("head_count_kv", KV), ("layer_norm_rms_eps", 1e-5), ("vocab_size", V)):
        getattr(w, "add_" + add)(v)
    w.add_tokenizer_model("gpt2")
    if tok is None:
        w.add_token_list([f"t{i}" for i in range(V)])
    else:
        from tritongpt.train.gguf_export import tokenizer_fields

        toks = tokenizer_fields(tok, V)
        w.add_tokenizer_pre(toks["pre"])
        w.add_token_list(toks["tokens"])
        w.add_token_types(toks["types"])
        w.add_token_merges(toks["merges"])
        if toks["eos"] is not None:
            w.add_eos_token_id(toks["eos"])
    for name, x in t.items():
        if skew is not None:
            x = skew(name, x)
        kind = (other or {}).get(name, qtype)
        if x.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(x, T[kind]), raw_dtype=T[kind])
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


UP = "trf_blocks.0.ff.w_up.weight"  # (blk.0.ffn_up: gguf_export.GGUF_LAYER)


def nbytes(model):
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


IDS = torch.tensor([[3, 17, 40, 5, 62, 9]])


def same(model, want, kernels):
    """model's logits on IDS within 1e-5 (relative to the largest) of want's, on the kernel path given."""
    model.set_kernels(kernels)
    got = logits(model, IDS)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), kernels


@pytest.mark.parametrize("qtype, cls, stored, ratio", [("Q8_0", Int8Linear, torch.int8, 1.125 / 4),
                                                        ("Q4_0", Int4Linear, torch.uint8, 0.75 / 4),
                                                        ("Q4_1", Int4Linear, torch.uint8, 0.75 / 4)])
def test_kept_quantized_as_the_file_holds_it(qtype, cls, stored, ratio, tmp_path, capsys):
    """The blocks' 14 linears are cls with fp32 group-32 scales (the LM head and embedding float), the same logits as
    the float load on the reference and the Triton path, within the memory its blocks take (1 byte + an fp32 scale
    a 32 for Q8_0, half a byte + a scale and offset for Q4_x: linear_bytes exactly that share of fp32's)."""
    from tritongpt.train.gguf_import import load_gguf

    path = write(tmp_path / "m.gguf", qtype)
    ours, flat = load_gguf(path), load_gguf(path, quantized=False)
    assert f"14 {qtype} linears of the blocks kept as {cls.mode}" in capsys.readouterr().err
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(type(m) is cls and m.group_size == 32 for m in layers)
    assert all(m.qweight.dtype == stored and m.scale.dtype == torch.float32 for m in layers)
    assert type(ours.out_head) is torch.nn.Linear and ours.quantized == cls.mode and ours.quantized_from == "gguf"
    assert not any(isinstance(m, QuantLinear) for m in flat.modules())
    # the matrices themselves: the float load's, bit for bit
    for name, m in ours.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), flat.get_submodule(name).weight), name
    want = logits(flat, IDS)
    same(ours, want, "reference")
    same(ours, want, {"mlp"})  # the QuantLinears' Triton kernels (kernels/quant.py; on the interpreter here)
    head = 4 * V * C  # (float in both)
    assert linear_bytes(ours) - head == ratio * (linear_bytes(flat) - head)
    assert nbytes(ours) < 0.45 * nbytes(flat)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_transformers_reads_it_as_we_do(qtype, tmp_path):
    """transformers' own GGUF loader (gguf_file=) and the kept-quantized model: the same logits (the Q/K rows'
    un-permute applied to the packed rows, their scales with them)."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.train.gguf_import import load_gguf

    path = write(tmp_path / "m.gguf", qtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        want = theirs(IDS).logits
    same(load_gguf(path), want, "reference")


def test_negative_and_zero_scales(tmp_path):
    """llama.cpp's Q4_0 d is the signed largest value / -8: a block whose largest is positive has d < 0, stored
    here as the flipped levels 15 - q with scale -d (scales stay positive, as check_quantized_scales wants); a block
    of zeros has d 0 (scale 1, levels 0 here), in Q4_0 and Q8_0. Both are the float load's matrix exactly."""
    from tritongpt.train.gguf_import import load_gguf

    def skew(name, x):
        if name == "blk.0.ffn_up.weight":
            x = x.copy()
            x[0, :32] = 0  # d = 0
            x[1, :32] = np.abs(x[1, :32]) + 0.1  # largest positive: Q4_0's d < 0
            x[2, :32] = -np.abs(x[2, :32]) - 0.1  # largest negative: d > 0
        return x

    for qtype in ("Q4_0", "Q8_0"):
        path = write(tmp_path / f"{qtype}.gguf", qtype, skew=skew)
        ours, flat = load_gguf(path), load_gguf(path, quantized=False)
        assert ours.quantized == ("int4" if qtype == "Q4_0" else "int8")
        for name, m in ours.named_modules():
            if isinstance(m, QuantLinear):
                assert bool((m.scale > 0).all()), name
                assert torch.equal(m.dequantize(), flat.get_submodule(name).weight), name
        up = ours.get_submodule(UP.removesuffix(".weight"))
        assert torch.equal(up.dequantize()[0, :32], torch.zeros(32)) and up.scale[0, 0].item() == 1


def test_mixed_files_are_dequantized_and_heads_float(tmp_path, capsys):
    """Blocks' linears of a type not kept (a Q5_0 among Q4_0) load as the float model, the types named; of two kept
    types (a Q4_0 among Q8_0) each keeps its own layout (mixed_layout: more in test_gguf_kquants.py); a head of
    another type beside Q4_0 blocks (llama.cpp's Q4_0 keeps output.weight Q6_K) is dequantized alone: the head is
    float here as in a GPTQ folder's model."""
    from tritongpt.train.gguf_import import load_gguf

    kept = load_gguf(write(tmp_path / "h.gguf", "Q4_0", {"output.weight": "Q8_0"}))
    assert kept.quantized == "int4" and "its Q4_0, Q8_0 embedding / head tensors dequantized" in \
        capsys.readouterr().err
    flat = load_gguf(write(tmp_path / "Q4_0.gguf", "Q4_0", {"blk.1.ffn_down.weight": "Q5_0"}))
    assert not getattr(flat, "quantized", None) and not any(isinstance(m, QuantLinear) for m in flat.modules())
    assert "its blocks' linears are Q4_0, Q5_0: kept quantized only where each is one of Q8_0, Q4_0, Q4_1, Q4_K, " \
        "Q6_K" in capsys.readouterr().err
    path = write(tmp_path / "Q8_0.gguf", "Q8_0", {"blk.1.ffn_down.weight": "Q4_0"})
    mixed, flat = load_gguf(path), load_gguf(path, quantized=False)
    down = "trf_blocks.1.ff.w_down"
    assert mixed.quantized == "int8" and mixed.quantized_layers == {down: ("int4", 32)}
    assert type(mixed.get_submodule(down)) is Int4Linear
    for name, m in mixed.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), flat.get_submodule(name).weight), name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_saves_loads_and_trains_lora_beside_it(qtype, tmp_path, capsys):
    """Saved (GPTModel.save) and loaded back (quantized_ok), it is the same layers, buffers and logits, recorded as a
    GGUF file's quantization (info says so); load_checkpoint without quantized_ok (trainers, export, merge) gives the
    float model; LoRA updates beside its frozen layers (QLoRA) take a step: their B moves, the layers do not."""
    from tritongpt.cli import main
    from tritongpt.model.gpt import GPTModel
    from tritongpt.model.lora import add_lora
    from tritongpt.train.gguf_import import load_gguf
    from tritongpt.train.gpt2_weights import load_checkpoint

    path = write(tmp_path / "m.gguf", qtype)
    model = load_gguf(path)
    model.save(tmp_path / "q.safetensors")
    back = GPTModel.load(tmp_path / "q.safetensors", quantized_ok=True).eval()
    assert back.quantized == model.quantized and back.quantized_from == "gguf"
    mine, theirs = dict(model.named_buffers()), dict(back.named_buffers())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(back, IDS), logits(model, IDS))
    assert not getattr(load_checkpoint(path), "quantized", None)  # (quantized_ok False: dequantized)
    assert load_checkpoint(path, quantized_ok=True).quantized == model.quantized
    capsys.readouterr()
    assert main(["info", "--weights", str(tmp_path / "q.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"quantized    {model.quantized}: 14 matrices" in out and "a GGUF file's own" in out
    add_lora(model, 2)
    model.train()
    frozen = {k: v.clone() for k, v in model.named_buffers()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    B = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    before = [b.clone() for b in B]
    loss = model(IDS[:, :-1], targets=IDS[:, 1:])
    loss.backward()
    opt.step()
    assert B and any(not torch.equal(b, b0) for b, b0 in zip(B, before))
    assert all(torch.equal(v, frozen[k]) for k, v in model.named_buffers())


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama", "qwen3"])
def test_our_q8_0_export_read_back_kept(arch, tmp_path):
    """Our own q8_0 export of each architecture read back kept int8: GPT-2's fused attn_qkv split by rows (scales
    with them), fc1/fc2 and Qwen2's q/k/v biases on the QuantLinears, Qwen3's q/k norms float beside them, a tied head tied: the float load's logits."""
    from test_gguf_export import ARCHS, random_model
    from tritongpt.train.gguf_export import write_gguf
    from tritongpt.train.gguf_import import load_gguf
    from tritongpt.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train(" ".join(f"a cat {i} sat." for i in range(50)), 270, name="tiny")
    path = write_gguf(random_model(ARCHS[arch], 288), tmp_path / "m.gguf", tok, "q8_0")
    ours, flat = load_gguf(path), load_gguf(path, quantized=False)
    assert ours.quantized == "int8" and ours.config.tie_weights is flat.config.tie_weights
    for name, m in ours.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), flat.get_submodule(name).weight), name
            bias = flat.get_submodule(name).bias
            assert (m.bias is None) is (bias is None) and (bias is None or torch.equal(m.bias, bias))
    same(ours, logits(flat, IDS), "reference")


# ----------------------------------------------------------------------------- GPU
# The kept layers on a GPU: a .gguf written as above, loaded kept and moved there, its logits on the Triton path
# (kernels/quant.py's int8_linear with group-32 scales, int4_linear with group-32 scales and fp32 offsets, as
# bench/compile_check.py builds them) against the float load of the same file. fp32: the same matrices bit for bit,
# so within 1e-5 of the largest logit (same()'s bound). bf16: both round x and the weight tile to bf16 (the kernels
# cast q * scale + offset to x's dtype for the tensor-core dot, the float load's F.linear holds bf16 weights), so the
# yardstick is the float load's own bf16 run on the reference path: the Triton path's relative error against the
# float load in float64 at most 2x that one's (measured under the interpreter: ~0.8-0.9x), and rounded (> 1e-4).
# These random weights (std 0.3, not scaled by width) amplify rounding through two layers (test_gguf_export's
# LOOSE): no absolute 1e-2 would hold for either path (measured: ~3e-2 relative on both).
GPU_IDS = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(5))


def check_kept_on(device, qtype, tmp_path, monkeypatch):
    import copy

    from parity import assert_close_rel, report
    from tritongpt.train.gguf_import import load_gguf

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32: ieee dots on both
    path = write(tmp_path / f"{qtype}.gguf", qtype)
    kept, flat = load_gguf(path).to(device), load_gguf(path, quantized=False).to(device)
    assert kept.quantized in ("int4", "int8") and all(m.qweight.device.type == device.type for m in
                                                      kept.modules() if isinstance(m, QuantLinear))
    ids = GPU_IDS.to(device)
    kept.set_kernels("triton")
    assert all(m.use_triton for m in kept.modules() if isinstance(m, QuantLinear))
    want = logits(flat.set_kernels("reference"), ids)
    got = logits(kept, ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), f"{qtype} fp32"
    want64 = logits(copy.deepcopy(flat).double(), ids)
    yard = report(logits(copy.deepcopy(flat).bfloat16(), ids), want64)[1]
    kept16 = copy.deepcopy(kept).bfloat16()
    assert all(m.scale.dtype == torch.float32 for m in kept16.modules() if isinstance(m, QuantLinear))
    got16 = logits(kept16, ids)
    assert got16.dtype == torch.bfloat16
    _, rel = assert_close_rel(got16, want64, 2 * yard, f"{qtype} bf16 triton path (2x the float load's bf16 error)")
    assert rel > 1e-4, f"{qtype}: relative error {rel:.1e}: not computed in bf16?"


def check_qlora_on(device, qtype, tmp_path):
    """A QLoRA step on the file's own layers: LoRA (rank 4, random A and B) beside the kept layers, one backward on
    each path (the Triton path's quantized matmuls and their dx kernels; the reference's dequantized F.linear). fp32:
    the losses within 1e-5, every A and B gradient within 1e-4 (the same matrices). Under bf16 autocast each A and
    B gradient of the Triton path within 2x the reference path's own bf16 error, both against fp32's reference
    path: these unscaled random weights amplify bf16's rounding through two layers (measured under the interpreter:
    up to 0.25 relative on the reference path, the Triton path's 0.8-1.1x that), so test_qlora's fixed 3e-2 would
    hold for neither. Then an SGD step on the Triton path moves every B and no kept buffer."""
    import copy

    from test_qlora import lora_grads, random_updates, rel
    from tritongpt.model.lora import add_lora
    from tritongpt.train.gguf_import import load_gguf

    model = load_gguf(write(tmp_path / f"{qtype}-lora.gguf", qtype)).to(device)
    add_lora(model, 4)
    random_updates(model, 0.02)
    assert all(p.device.type == device.type for p in model.parameters())
    ids = GPU_IDS.to(device)
    runs = {}
    for kernels, autocast in (("reference", None), ("triton", None), ("reference", torch.bfloat16),
                              ("triton", torch.bfloat16)):
        m = copy.deepcopy(model).set_kernels(kernels).train()
        with torch.autocast(device.type, autocast or torch.float32, enabled=autocast is not None):
            loss = m(ids, targets=ids)
        loss.backward()
        runs[kernels, autocast] = (loss.item(), lora_grads(m))
    loss, want = runs["reference", None]
    assert len(want) == 2 * 14 and all(g.abs().max() > 0 for g in want.values())
    tri_loss, tri = runs["triton", None]
    assert abs(tri_loss - loss) <= 1e-5 * loss, (tri_loss, loss)
    for name, g in want.items():
        assert rel(tri[name], g) < 1e-4, (qtype, "fp32", name, rel(tri[name], g))
    (_, ref16), (_, tri16) = runs["reference", torch.bfloat16], runs["triton", torch.bfloat16]
    for name, g in want.items():
        yard, err = rel(ref16[name], g), rel(tri16[name], g)
        assert 1e-4 < err <= 2 * yard, (qtype, "bf16", name, err, yard)
    model.set_kernels("triton").train()
    frozen = {k: v.clone() for k, v in model.named_buffers()}
    B = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    before = [b.detach().clone() for b in B]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.autocast(device.type, torch.bfloat16):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    opt.step()
    assert len(B) == 14 and all(not torch.equal(b, b0) for b, b0 in zip(B, before))
    assert all(torch.equal(v, frozen[k]) for k, v in model.named_buffers())


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_kept_layers_on_cuda_fp32_and_bf16_against_the_float_load(qtype, tmp_path, monkeypatch):
    check_kept_on(torch.device("cuda"), qtype, tmp_path, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_a_qlora_step_on_cuda_beside_the_kept_layers(qtype, tmp_path):
    check_qlora_on(torch.device("cuda"), qtype, tmp_path)
