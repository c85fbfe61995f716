"""MXFP4 (gpt-oss's experts: transformers' quant_method "mxfp4") dequantized at load (train/hf_quant.py
mxfp4_dequantize, mxfp4_experts, mxfp4_spec): bit for bit transformers' convert_moe_packed_tensors, the format's
textbook decode, a quantizer written here from the OCP MX spec round-tripped within the format's error bound, and
what is not MXFP4 as gpt-oss stores it refused by name."""
import json

import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.train.hf_quant import folder_dequantized, folder_quantization, mxfp4_dequantize, mxfp4_experts, \
    mxfp4_spec

pytestmark = pytest.mark.usefixtures("one_thread")

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; 8..15 their negatives (the sign bit 3)


def random_mxfp4(E=2, R=6, G=3, seed=0):
    """(blocks uint8 [E, R, G, 16], scales uint8 [E, R, G]): every byte value likely, scales 110..140 with a few
    extreme exponents (0: subnormal floats; 252: up to 1.5 * 2 ** 127, the largest below float32's inf) among them."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, R, G, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 141, (E, R, G), dtype=torch.uint8, generator=g)
    scales.view(-1)[:4] = torch.tensor([0, 1, 127, 252], dtype=torch.uint8)
    # (the draw is fixed; this says it covers what the test claims to)
    assert set((blocks & 15).unique().tolist()) == set(range(16)) == set((blocks >> 4).unique().tolist())
    return blocks, scales


def textbook(blocks, scales):
    """float64 [E, G * 32, R]: each e2m1 code decoded from its bits (sign, 2-bit exponent of bias 1, 1-bit mantissa;
    exponent 0 subnormal) times 2 ** (scale - 127), value 2j + h of a block from byte j's low (h 0) or high nibble."""
    E, R, G, _ = blocks.shape
    out = torch.empty(E, G * 32, R, dtype=torch.float64)
    for e in range(E):
        for r in range(R):
            for g in range(G):
                scale = 2.0 ** (int(scales[e, r, g]) - 127)
                for j in range(16):
                    byte = int(blocks[e, r, g, j])
                    for h, n in enumerate((byte & 15, byte >> 4)):
                        exp, man = (n >> 1) & 3, n & 1
                        mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
                        out[e, g * 32 + 2 * j + h, r] = (-mag if n & 8 else mag) * scale
    return out


def mxfp4_quantize(weight):
    """(blocks, scales) of a float weight [E, X, R] (GptOssExperts' layout; blocks of 32 along X), from the OCP MX
    spec: each block's shared exponent floor(log2(amax)) - 2 (e2m1's largest exponent), as an e8m0 byte (bias 127,
    clamped to -127..127); each value / 2 ** exponent rounded to the nearest e2m1 value, ties to the even code,
    beyond 6 saturated to 6."""
    w = weight.double().transpose(1, 2)  # [E, R, X]
    E, R, X = w.shape
    w = w.reshape(E, R, X // 32, 32)
    amax = w.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    x = w / torch.exp2(exp)[..., None]
    levels = torch.tensor(E2M1, dtype=torch.float64)
    dist = (x.abs()[..., None] - levels).abs()
    tied = dist == dist.amin(-1, keepdim=True)
    # among the nearest, the even code (its mantissa bit 0); a single nearest one wins alone
    code = (tied * (1 + (torch.arange(8) % 2 == 0))).argmax(-1)
    code = torch.where(x.abs() >= 6, 7, code) + 8 * (x < 0)
    pairs = code.reshape(E, R, X // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantize_is_transformers_convert_moe_packed_tensors_bit_for_bit(dtype):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = random_mxfp4()
    ours = mxfp4_dequantize(blocks, scales, dtype)
    theirs = mx.convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape == (2, 96, 6)
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # (-0.0 and 0.0 told apart too)
    assert torch.equal(ours.view(bits), theirs.view(bits))
    assert ours.abs().max() > 1e-3 and (ours.double() != 0).float().mean() > 0.8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mxfp4_dequantize_is_the_textbook_decode_of_each_code(dtype):
    blocks, scales = random_mxfp4(E=2, R=3, G=2, seed=1)
    want = textbook(blocks, scales)
    got = mxfp4_dequantize(blocks, scales, dtype)
    # exact in each: every MXFP4 value (from 0.5 * 2 ** -127) is a float32 and a bfloat16
    assert got.dtype == dtype and torch.equal(got.double(), want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # (-0.0, code 8)


def test_the_quantizer_rounds_to_nearest_ties_to_even_and_saturates():
    """The test's own quantizer, checked by hand: amax 5 gives exponent floor(log2 5) - 2 = 0 (byte 127); the
    midpoints go to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4)."""
    vals = [5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -5, -0.3, 2.9, 0.0, 6.0] + [0.0] * 20
    w = torch.tensor(vals, dtype=torch.float64).reshape(1, 32, 1)
    blocks, scales = mxfp4_quantize(w)
    assert scales.tolist() == [[[127]]]
    got = mxfp4_dequantize(blocks, scales, torch.float64).reshape(-1)[:12].tolist()
    assert got == [4, 4, 2, 2, 1, 1, 0, -4, -0.5, 3, 0, 6]
    # a block of amax 7 (exponent 0: 7 > 6) saturates to 6
    w[0, 0, 0] = 7.0
    blocks, scales = mxfp4_quantize(w)
    assert scales.tolist() == [[[127]]] and mxfp4_dequantize(blocks, scales, torch.float64)[0, 0, 0] == 6


def test_quantized_random_weights_dequantize_within_the_formats_error_bound():
    """Each value within half a step of e2m1's grid at its magnitude (0.25, 0.5, 1 times the block's 2 ** exponent),
    or, above 6 (saturated), within 2 of it; and the block's largest value never off by more than a quarter of it."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 64, 5, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, 5, dtype=torch.float64)
    blocks, scales = mxfp4_quantize(w)
    got = mxfp4_dequantize(blocks, scales, torch.float64)
    unit = torch.exp2(scales.double() - 127).repeat_interleave(32, dim=2).transpose(1, 2)  # [E, X, R]
    x = w.abs() / unit
    bound = torch.where(x < 2, 0.25, torch.where(x < 4, 0.5, torch.where(x <= 6, 1.0, 2.0))) * unit
    err = (got - w).abs()
    assert bool((err <= bound).all()) and err.max() > 0
    amax = w.abs().transpose(1, 2).reshape(3, 5, 2, 32).amax(-1)
    assert ((err.transpose(1, 2).reshape(3, 5, 2, 32).amax(-1)) <= amax / 4).all()
    # the blocks of the fp32 decode are the float64 one's
    assert torch.equal(mxfp4_dequantize(blocks, scales).double(), got)


@pytest.mark.parametrize("blocks, scales, said", [
    (torch.zeros(1, 2, 1, 16, dtype=torch.int8), torch.zeros(1, 2, 1, dtype=torch.uint8), r"int8 \(1, 2, 1, 16\), not"),
    (torch.zeros(1, 2, 1, 32, dtype=torch.uint8), torch.zeros(1, 2, 1, dtype=torch.uint8), r"\(1, 2, 1, 32\), not"),
    (torch.zeros(2, 1, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8), r"\(2, 1, 16\), not uint8"),
    (torch.zeros(1, 2, 1, 16, dtype=torch.uint8), torch.zeros(1, 2, 1, dtype=torch.int32), "scales are int32"),
    (torch.zeros(1, 2, 1, 16, dtype=torch.uint8), torch.zeros(1, 2, 1, dtype=torch.float32), "scales are float32"),
    (torch.zeros(1, 2, 1, 16, dtype=torch.uint8), torch.zeros(1, 1, 2, dtype=torch.uint8),
     r"scales are uint8 \(1, 1, 2\), where blocks \(1, 2, 1, 16\) .* uint8 \(1, 2, 1\)"),
    (torch.ones(1, 2, 1, 16, dtype=torch.uint8), torch.full((1, 2, 1), 255, dtype=torch.uint8), "255, e8m0's NaN"),
    (torch.full((1, 2, 1, 16), 0x44, dtype=torch.uint8), torch.full((1, 2, 1), 254, dtype=torch.uint8),
     r"2 \*\* 128 or more"),
    (torch.full((1, 2, 1, 16), 0x66, dtype=torch.uint8), torch.full((1, 2, 1), 253, dtype=torch.uint8),
     r"2 \*\* 128 or more"),  # (4 * 2 ** 126)
])
def test_what_is_not_mxfp4_is_refused_by_name(blocks, scales, said):
    with pytest.raises(UserError, match=said):
        mxfp4_dequantize(blocks, scales, what="f: layers.0.mlp.experts.down_proj")


def test_a_scale_of_254_below_float_range_is_a_value():
    ok = mxfp4_dequantize(torch.full((1, 1, 1, 16), 0x33, dtype=torch.uint8), torch.full((1, 1, 1), 254,
                                                                                          dtype=torch.uint8))
    assert bool((ok == 1.5 * 2.0 ** 127).all())


GPT_OSS_SKIP = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def gpt_oss_tensors(layers=(0, 1), E=2, H=64, I=32, seed=3):
    """A reader's sd (no "model." prefix) of gpt-oss's MXFP4 experts as its checkpoints store them, with biases and
    one attention weight, and the float [E, in, out] tensors they stand for."""
    g = torch.Generator().manual_seed(seed)
    sd, want = {}, {}
    for i in layers:
        base = f"layers.{i}.mlp.experts."
        for proj, (X, R) in (("gate_up_proj", (H, 2 * I)), ("down_proj", (I, H))):
            w = torch.randn(E, X, R, generator=g, dtype=torch.float64) * 0.05
            sd[base + proj + "_blocks"], sd[base + proj + "_scales"] = mxfp4_quantize(w)
            want[base + proj] = mxfp4_dequantize(sd[base + proj + "_blocks"], sd[base + proj + "_scales"])
            sd[base + proj + "_bias"] = torch.randn(E, R, generator=g, dtype=torch.bfloat16)
        sd[f"layers.{i}.self_attn.q_proj.weight"] = torch.randn(H, H, generator=g, dtype=torch.bfloat16)
    return sd, want


def test_mxfp4_experts_replaces_each_pair_by_its_float_tensor_in_gpt_oss_experts_layout(capsys):
    sd, want = gpt_oss_tensors()
    keep = {k: v for k, v in sd.items() if not k.endswith(("_blocks", "_scales"))}
    spec = mxfp4_spec({"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_SKIP, "_where": "c"}, "gpt_oss")
    out = mxfp4_experts(sd, spec, "f")
    assert sorted(out) == sorted([*keep, *want])
    for k, v in want.items():
        assert out[k].dtype == torch.bfloat16 and torch.equal(out[k].float(), v)  # (exact: bf16 holds MXFP4)
    assert out["layers.1.mlp.experts.gate_up_proj"].shape == (2, 64, 64)  # [E, H, 2I]
    assert out["layers.1.mlp.experts.down_proj"].shape == (2, 32, 64)  # [E, I, H]
    assert all(out[k] is v for k, v in keep.items())
    assert "4 MXFP4 expert weights are dequantized to bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("edit, said", [
    (lambda sd: sd.pop("layers.0.mlp.experts.down_proj_scales"),
     "MXFP4 tensor layers.0.mlp.experts.down_proj_blocks has no layers.0.mlp.experts.down_proj_scales"),
    (lambda sd: sd.pop("layers.1.mlp.experts.gate_up_proj_blocks"),
     "gate_up_proj_scales has no layers.1.mlp.experts.gate_up_proj_blocks"),
    (lambda sd: sd.__setitem__("layers.0.mlp.experts.down_proj", torch.ones(2, 32, 64)),
     "layers.0.mlp.experts.down_proj is stored both as a float tensor and as MXFP4"),
    (lambda sd: [sd.__setitem__("layers.0.self_attn.q_proj" + p, sd.pop("layers.0.mlp.experts.down_proj" + p))
                 for p in ("_blocks", "_scales")],
     "layers.0.self_attn.q_proj_blocks / _scales are MXFP4"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.endswith(("_blocks", "_scales"))],
     "says MXFP4 quantization, but no tensor is MXFP4"),
    (lambda sd: sd["layers.1.mlp.experts.down_proj_scales"].view(-1).__setitem__(0, 255), "down_proj: a scale is 255"),
])
def test_mxfp4_experts_refuses_what_is_not_a_gpt_oss_experts_pair_by_name(edit, said):
    sd, _ = gpt_oss_tensors()
    edit(sd)
    spec = mxfp4_spec({"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_SKIP, "_where": "c"}, "gpt_oss")
    with pytest.raises(UserError, match=said.replace("*", r"\*")):
        mxfp4_experts(sd, spec, "f")


def test_experts_left_float_by_modules_to_not_convert_are_matched_to_a_module_boundary():
    """"model.layers.1" leaves layer 1 float (its MXFP4 pair then unclear, refused), not layer 10 with it; transformers'
    should_convert_module matches so."""
    q = {"quant_method": "mxfp4", "modules_to_not_convert": [*GPT_OSS_SKIP, "model.layers.1"], "_where": "c"}
    sd, want = gpt_oss_tensors(layers=(10,))
    assert torch.equal(mxfp4_experts(sd, mxfp4_spec(q, "gpt_oss"), "f")["layers.10.mlp.experts.down_proj"].float(),
                       want["layers.10.mlp.experts.down_proj"])
    sd, _ = gpt_oss_tensors(layers=(1,))
    with pytest.raises(UserError, match="leaves layers.1.mlp.experts float \\(modules_to_not_convert\\)"):
        mxfp4_experts(sd, mxfp4_spec(q, "gpt_oss"), "f")
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return
    names = [f"model.layers.{i}.mlp.{m}" for i in (1, 10) for m in ("experts", "router")]
    keep = mxfp4_spec(q, "gpt_oss")["keep"]
    assert [keep(n) for n in names] == [True, True, False, True]
    assert [keep(n) for n in names] == [not should_convert_module(n, q["modules_to_not_convert"]) for n in names]


def test_an_mxfp4_folder_is_read_for_gpt_oss_and_refused_by_name_for_other_model_types(tmp_path):
    cfg = tmp_path / "config.json"
    q = {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_SKIP}
    cfg.write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": q}))
    packed, spec = folder_quantization(cfg)
    assert packed is None and spec["method"] == "mxfp4"
    sd, want = gpt_oss_tensors(layers=(0,))
    out = folder_dequantized(sd, spec, "f", prefix="model.")
    assert torch.equal(out["layers.0.mlp.experts.gate_up_proj"].float(), want["layers.0.mlp.experts.gate_up_proj"])
    for model_type in ("llama", "qwen2_moe", None):
        cfg.write_text(json.dumps({"model_type": model_type, "quantization_config": q}))
        with pytest.raises(UserError, match=f"quant_method 'mxfp4'.*model_type {model_type!r}: MXFP4 is read for "
                                            "gpt-oss's experts.*stored as MXFP4's uint8 FP4 blocks with e8m0 "
                                            "exponent scales"):
            folder_quantization(cfg)


def test_mxfp4_spec_refuses_other_methods_and_malformed_modules_to_not_convert():
    with pytest.raises(UserError, match="quant_method 'fp8'.*MXFP4 only"):
        mxfp4_spec({"quant_method": "fp8", "_where": "c"}, "gpt_oss")
    with pytest.raises(UserError, match="modules_to_not_convert 'lm_head': a list of module names"):
        mxfp4_spec({"quant_method": "mxfp4", "modules_to_not_convert": "lm_head", "_where": "c"}, "gpt_oss")
