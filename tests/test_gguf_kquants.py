"""GGUF K-quants kept quantized (train/gguf_import.py _k_quant_packed): a Q4_K tensor as Int4Linear of group 32
(scale d sc, offset -dmin m), a Q6_K one as Int8Linear of group 16 (scale d sc, levels q - 32), the same fp32
matrices as gguf.quants.dequantize bit for bit, and a Q4_K_M-like file of both (model/quant.py mixed_layout). The
gguf package has no K-quant quantizer: the files hold random valid super-blocks (random levels and sub-scales, fp16
d's of either sign where said), a tiny 1-layer llama of width 256 (a K-quant row is whole 256-input super-blocks)."""
import numpy as np
import pytest
import torch

from test_gguf_export import logits
from tritongpt.model.quant import Int4Linear, Int8Linear, QuantLinear

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

V, C, F, H, KV = 64, 256, 256, 4, 1
IDS = torch.tensor([[3, 17, 40, 5, 62, 9]])
# llama.cpp's Q4_K_M: Q4_K linears, Q6_K attn_v / ffn_down (half the layers) and output, F32 norms
Q4_K_M = {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "output.weight": "Q6_K"}


def fp16_bytes(x):
    return np.asarray(x, dtype=np.float16)[..., None].view(np.uint8)


def q4_k(rng, N, K, d_sign=1.0):
    """Random block_q4_K super-blocks of N rows of K: fp16 d (times d_sign) and dmin, random 6-bit sub-scales and
    mins (the 12 packed bytes: any bytes are valid), random nibbles."""
    raw = rng.integers(0, 256, (N, K // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = fp16_bytes(d_sign * rng.uniform(2e-4, 1e-3, raw.shape[:2]))
    raw[..., 2:4] = fp16_bytes(rng.uniform(1e-4, 1e-3, raw.shape[:2]))
    return raw.reshape(N, -1)


def q6_k(rng, N, K):
    """Random block_q6_K super-blocks: random ql / qh bits, int8 sub-scales of either sign (one 0), fp16 d, negative
    in the first row's super-block."""
    raw = rng.integers(0, 256, (N, K // 256, 210), dtype=np.uint8)
    d = rng.uniform(5e-5, 2e-4, raw.shape[:2])
    d[0] *= -1
    raw[..., 208:210] = fp16_bytes(d)
    raw[1, 0, 192] = 0  # a sub-block of scale 0
    return raw.reshape(N, -1)


def write(path, qtype: str, other: dict | None = None, tok=None, vocab: int = V, seed: int = 0, d_sign=1.0):
    """A 1-layer llama .gguf whose matrices are qtype (other: {tensor name: type} for some; "F32" a float one),
    norms F32; tok: the tokenizer written as the file's own (else placeholder tokens)."""
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, C), "output.weight": (vocab, C), "blk.0.attn_q.weight": (C, C),
              "blk.0.attn_k.weight": (C // H * KV, C), "blk.0.attn_v.weight": (C // H * KV, C),
              "blk.0.attn_output.weight": (C, C), "blk.0.ffn_gate.weight": (F, C), "blk.0.ffn_up.weight": (F, C),
              "blk.0.ffn_down.weight": (C, F)}
    kinds = {n: (other or {}).get(n, "F32" if n == "token_embd.weight" else qtype) for n in shapes}
    w = gguf.GGUFWriter(path, "llama")
    for add, v in (("context_length", 64), ("embedding_length", C), ("block_count", 1), ("feed_forward_length", F),
                   ("head_count", H), ("head_count_kv", KV), ("layer_norm_rms_eps", 1e-5), ("vocab_size", vocab)):
        getattr(w, "add_" + add)(v)
    w.add_tokenizer_model("gpt2")
    if tok is None:
        w.add_token_list([f"t{i}" for i in range(vocab)])
    else:
        from tritongpt.train.gguf_export import tokenizer_fields

        toks = tokenizer_fields(tok, vocab)
        w.add_tokenizer_pre(toks["pre"])
        w.add_token_list(toks["tokens"])
        w.add_token_types(toks["types"])
        w.add_token_merges(toks["merges"])
        w.add_eos_token_id(toks["eos"])
    for name, (N, K) in shapes.items():
        if kinds[name] == "F32":
            w.add_tensor(name, (rng.standard_normal((N, K)) * 0.3).astype(np.float32))
        else:
            raw = q4_k(rng, N, K, d_sign) if kinds[name] == "Q4_K" else q6_k(rng, N, K)
            w.add_tensor(name, raw, raw_dtype=T[kinds[name]])
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(C)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(path):
    """{tensor name: gguf.quants.dequantize's fp32 matrix} of the file's quantized tensors."""
    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors if t.tensor_type.name != "F32"}


def check_exact(model, flat, path):
    """Every kept layer's matrix is the float load's bit for bit, and (attn_q / attn_k aside: the float load
    un-permutes their rows) gguf.quants.dequantize's; its scales all > 0 (check_quantized_scales)."""
    from tritongpt.train.gguf_export import GGUF_LAYER

    theirs = dequantized(path)
    layers = {f"trf_blocks.0.{ours}": f"blk.0.{g}.weight" for ours, g in GGUF_LAYER["llama"] if "norm" not in g}
    kept = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(kept) == sorted(layers) and len(kept) == 7
    for name, m in kept.items():
        w = m.dequantize()
        assert torch.equal(w, flat.get_submodule(name).weight), name
        if not layers[name].endswith(("attn_q.weight", "attn_k.weight")):
            assert torch.equal(w, theirs[layers[name]]), name
        assert bool((m.scale > 0).all()), name
    return kept


def same(model, want, kernels):
    model.set_kernels(kernels)
    got = logits(model, IDS)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), kernels


@pytest.mark.parametrize("qtype, cls, group", [("Q4_K", Int4Linear, 32), ("Q6_K", Int8Linear, 16)])
def test_k_quant_kept_exactly(qtype, cls, group, tmp_path, capsys):
    """All-Q4_K / all-Q6_K blocks: kept as cls of `group` inputs, gguf's matrices bit for bit (Q6_K's negative
    d and a sub-scale of 0 among them), the float load's logits on both kernel paths."""
    from tritongpt.train.gguf_import import load_gguf

    path = write(tmp_path / "m.gguf", qtype)
    ours, flat = load_gguf(path), load_gguf(path, quantized=False)
    assert f"7 {qtype} linears of the blocks kept as {cls.mode} (groups of {group} inputs)" in capsys.readouterr().err
    kept = check_exact(ours, flat, path)
    assert all(type(m) is cls and m.group_size == group for m in kept.values())
    assert ours.quantized == cls.mode and ours.quantized_group_size == group and not ours.quantized_layers
    want = logits(flat, IDS)
    same(ours, want, "reference")
    same(ours, want, {"mlp"})  # kernels/quant.py's int4 / int8 kernels (int8 at group 16), under the interpreter
    if qtype == "Q6_K":  # row 0's negative d: its levels negated (scales > 0: check_exact); row 1's sc 0: scale 1
        up = ours.get_submodule("trf_blocks.0.ff.w_up")
        assert up.scale[1, 0] == 1 and (up.qweight[1, :16] == 0).all()


def test_a_negative_q4_k_d_is_dequantized_by_name(tmp_path, capsys):
    """A Q4_K super-block whose d < 0 (llama.cpp never writes one) has no exact Int4Linear form (flipped levels
    round their sum otherwise): the file loads float, the note naming the tensor."""
    from tritongpt.train.gguf_import import load_gguf

    model = load_gguf(write(tmp_path / "m.gguf", "Q4_K", d_sign=-1.0))
    assert not getattr(model, "quantized", None)
    assert "is Q4_K with a negative block scale" in capsys.readouterr().err


def test_a_q4_k_m_file_keeps_each_linear_in_its_own_layout(tmp_path, capsys):
    """Q4_K linears, Q6_K attn_v and ffn_down (and head), F32 norms: the Q4_K ones Int4Linear of group 32, the
    Q6_K ones Int8Linear of group 16, the head float; the float load's matrices and logits on both kernel paths;
    saved and loaded back (the other layers recorded as quantized_layers), the same buffers and logits; info
    names both layouts."""
    from tritongpt.cli import main
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.gguf_import import load_gguf

    path = write(tmp_path / "m.gguf", "Q4_K", Q4_K_M)
    ours, flat = load_gguf(path), load_gguf(path, quantized=False)
    err = capsys.readouterr().err
    assert "7 Q4_K/Q6_K linears of the blocks kept as int4 (groups of 32 inputs) where Q4_K, int8 (groups of " \
           "16 inputs) where Q6_K; its Q6_K embedding / head tensors dequantized" in err
    kept = check_exact(ours, flat, path)
    eight = {"trf_blocks.0.att.W_value", "trf_blocks.0.ff.w_down"}
    assert {n for n, m in kept.items() if type(m) is Int8Linear and m.group_size == 16} == eight
    assert all(type(m) is Int4Linear and m.group_size == 32 for n, m in kept.items() if n not in eight)
    assert type(ours.out_head) is torch.nn.Linear and ours.quantized == "int4" and ours.quantized_group_size == 32
    assert ours.quantized_layers == {n: ("int8", 16) for n in eight}
    want = logits(flat, IDS)
    same(ours, want, "reference")
    same(ours, want, {"mlp"})
    ours.set_kernels("reference")
    ours.save(tmp_path / "q.safetensors")
    back = GPTModel.load(tmp_path / "q.safetensors", quantized_ok=True).eval()
    assert back.quantized_layers == ours.quantized_layers and back.quantized_from == "gguf"
    mine, theirs = dict(ours.named_buffers()), dict(back.named_buffers())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(back, IDS), logits(ours, IDS))
    assert main(["info", "--weights", str(tmp_path / "q.safetensors")]) == 0
    assert "2 of them int8 with an fp32 scale a group of 16 inputs" in capsys.readouterr().out
    # a reward model on it (its file names the layers "backbone.*"): saved and loaded back as it is
    from tritongpt.train.reward import RewardModel

    RewardModel(ours).save(tmp_path / "r.safetensors")
    reward = RewardModel.load(tmp_path / "r.safetensors", quantized_ok=True)
    assert reward.backbone.quantized_layers == ours.quantized_layers
    assert all(torch.equal(mine[k], v) for k, v in reward.backbone.named_buffers())


def test_a_damaged_quantized_layers_entry_is_refused(tmp_path):
    """A saved mixed model's quantized_layers that is not {layer: [mode, group]} of its layers: refused by name."""
    from safetensors.torch import load_file, save_file

    from tritongpt.errors import UserError
    from tritongpt.model.gpt import GPTModel, safetensors_metadata
    from tritongpt.train.gguf_import import load_gguf

    load_gguf(write(tmp_path / "m.gguf", "Q4_K", Q4_K_M)).save(tmp_path / "q.safetensors")
    meta = safetensors_metadata(tmp_path / "q.safetensors")
    ok = '"trf_blocks.0.att.W_value": ["int8", 16], "trf_blocks.0.ff.w_down": ["int8", 16]'
    for bad in ('{"trf_blocks.0.att.W_value": ["int8", 24], "trf_blocks.0.ff.w_down": ["int8", 16]}',
                '{%s, "trf_blocks.9.ff.w_up": ["int8", 16]}' % ok, '{%s, "x": ["int2", 16]}' % ok, "[1]"):
        save_file(load_file(tmp_path / "q.safetensors"), tmp_path / "bad.safetensors",
                  {**meta, "quantized_layers": bad})
        with pytest.raises(UserError, match="quantized_layers"):
            GPTModel.load(tmp_path / "bad.safetensors", quantized_ok=True)


def test_a_qlora_step_beside_the_mixed_layers(tmp_path):
    """LoRA beside the Q4_K_M file's kept layers: one step on the Triton path moves every B, no kept buffer, and the
    loss is the float load's with the same updates (both paths' gradients through the int4 and int8 dx kernels)."""
    from test_qlora import random_updates
    from tritongpt.model.lora import add_lora
    from tritongpt.train.gguf_import import load_gguf

    path = write(tmp_path / "m.gguf", "Q4_K", Q4_K_M)
    model = load_gguf(path)
    assert model.quantized == "int4" and len(model.quantized_layers) == 2
    add_lora(model, 2)
    assert sum(isinstance(m, QuantLinear) and m.lora is not None for m in model.modules()) == 7
    random_updates(model, 0.02)
    model.set_kernels({"mlp"}).train()
    frozen = {k: v.clone() for k, v in model.named_buffers()}
    B = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    before = [b.detach().clone() for b in B]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(IDS[:, :-1], targets=IDS[:, 1:])
    loss.backward()
    opt.step()
    assert len(B) == 7 and all(not torch.equal(b, b0) for b, b0 in zip(B, before))
    assert all(torch.equal(v, frozen[k]) for k, v in model.named_buffers())


def test_sft_trains_lora_on_a_q4_k_m_files_own_layers_resumes_and_exports_merged(tmp_path, capsys):
    """`sft --init x.gguf --lora-rank R` on the Q4_K_M file: QLoRA beside its mixed kept layers (recorded as "gguf
    int4"), the checkpoint's base the file's layers bit for bit and of both layouts, a resume goes on, and the merged
    export is the float model of the run's logits."""
    import json

    from test_gguf_qlora import VOCAB
    from test_qlora import rel, sft_argv
    from test_qlora_gptq import base_buffers
    from tritongpt.cli import main
    from tritongpt.model.lora import has_lora
    from tritongpt.train import common
    from tritongpt.train.gguf_import import load_gguf
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train(" ".join(f"Say {w}. {w} not {w}" for w in ("hi", "yes", "no", "ok", "up", "go") * 9),
                             270, name="tiny")
    path = write(tmp_path / "m.gguf", "Q4_K", Q4_K_M, tok=tok, vocab=VOCAB)
    out = tmp_path / "run"
    assert main(sft_argv(path, out, "--max-steps", "2", "--lora-rank", "4", "--lr", "5e-2")) == 0
    assert "QLoRA on --init's own GGUF quantization: the base's 7 matrices int4 (group 32) + 2 int8 (group 16)" \
        in capsys.readouterr().err
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert state["args"]["init_quantized"] == "gguf int4"
    run = load_checkpoint(out, quantized_ok=True).eval()
    assert run.quantized_layers == {"trf_blocks.0.att.W_value": ("int8", 16), "trf_blocks.0.ff.w_down": ("int8", 16)}
    assert all(p.abs().sum() > 0 for n, p in run.named_parameters() if n.endswith("lora_B"))
    want, got = base_buffers(load_gguf(path)), base_buffers(run)
    assert len(want) >= 7 * 2 and sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert main(sft_argv(path, out, "--max-steps", "3", "--lora-rank", "4", "--lr", "5e-2", "--resume")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    run = load_checkpoint(out, quantized_ok=True).eval()
    merged = load_checkpoint(tmp_path / "hf").eval()
    assert not getattr(merged, "quantized", None) and not has_lora(merged)
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(merged(idx), run(idx)) < 1e-5
